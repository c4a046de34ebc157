"""A small local server that speaks the part of the Hugging Face Hub's HTTP API that downloads use.

Tests point ``HF_ENDPOINT`` at it, so hub code paths run for real without the network. Repos live
as plain directories under ``repos_dir`` (``repos_dir/org/name/<files>``) and are registered with
``add_repo``, which also sets who may read them. Each repo has a single branch, ``main``, whose
commit sha is a hash of the files' contents, so editing a file on disk makes a new commit.

Endpoints (what ``huggingface_hub`` calls, old and new versions):

- ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}``: model info with ``sha``
  and ``siblings``;
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=``: the file listing;
- ``POST /api/models/{repo}/paths-info/{rev}``: metadata of given paths;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: a file, with ``ETag``, ``X-Repo-Commit``,
  ``Content-Length`` (and ``X-Linked-Etag``/``X-Linked-Size`` for LFS-style files), ranges honoured.

Access follows the Hub: an unknown token gets 401 "Invalid credentials in Authorization header"; a
private repo answers 401 ``RepoNotFound`` without a token and 404 with another valid token; a gated
repo answers 401 ``GatedRepo`` without a token and 403 with another one; unknown repos, revisions and
files get 404 with ``X-Error-Code`` ``RepoNotFound``/``RevisionNotFound``/``EntryNotFound``.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx", ".gguf")


@dataclass
class RepoAccess:
    private: bool = False
    gated: bool = False
    token: str | None = None  # the one token that may read a private or gated repo
    delay_s: float = 0.0  # every request for this repo waits this long (a slow source)


@dataclass
class FileEntry:
    path: str
    data: bytes

    @property
    def is_lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES)

    @property
    def blob_id(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def etag(self) -> str:
        return hashlib.sha256(self.data).hexdigest() if self.is_lfs else self.blob_id

    def tree_entry(self) -> dict:
        entry: dict = {"type": "file", "oid": self.blob_id, "size": len(self.data), "path": self.path}
        if self.is_lfs:
            entry["lfs"] = {"oid": self.etag, "size": len(self.data), "pointerSize": 134}
        return entry


class FakeHub:
    """The server plus its repo registry. Iterating gives ``(url, repos_dir, add_repo)``."""

    def __init__(self, repos_dir: Path) -> None:
        self.repos_dir = Path(repos_dir)
        self.repos: dict[str, RepoAccess] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request served
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def __iter__(self) -> Iterator:
        return iter((self.url, self.repos_dir, self.add_repo))

    def start(self) -> FakeHub:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop open keep-alive connections, so clients see connection errors."""
        if self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        self._thread.join()
        self._thread = None

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        private: bool = False,
        token: str | None = None,
        gated: bool = False,
        delay_s: float = 0.0,
    ) -> Path:
        """Create (or replace the files of) a model repo and return its directory."""
        root = self.repos_dir / repo_id
        for name, data in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.repos[repo_id] = RepoAccess(private=private, gated=gated, token=token, delay_s=delay_s)
        return root

    def downloaded(self, repo_id: str) -> set[str]:
        """Files of ``repo_id`` whose content was fetched (GET on resolve), by path in the repo."""
        marker = f"/{repo_id}/resolve/"
        out = set()
        for method, path in self.requests:
            if method == "GET" and path.startswith(marker):
                out.add(unquote(path[len(marker) :].split("?")[0].split("/", 1)[1]))
        return out

    # Repo contents ------------------------------------------------------------------------------

    def files(self, repo_id: str) -> dict[str, FileEntry]:
        root = self.repos_dir / repo_id
        entries = {}
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            entries[rel] = FileEntry(rel, path.read_bytes())
        return entries

    def sha(self, repo_id: str, files: dict[str, FileEntry] | None = None) -> str:
        files = self.files(repo_id) if files is None else files
        digest = hashlib.sha1(repo_id.encode())
        for path, entry in files.items():
            digest.update(f"{path}\0{entry.blob_id}\0".encode())
        return digest.hexdigest()

    def known_tokens(self) -> set[str]:
        with self._lock:
            return {access.token for access in self.repos.values() if access.token}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: FakeHub

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()

    def process_request(self, request, client_address) -> None:
        with self._conn_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._conn_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._conn_lock:
            connections, self._connections = self._connections, set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # Routing ------------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        with hub._lock:
            hub.requests.append((method, self.path))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            route = self._route(method, url.path)
            if route is None:
                raise HubError(404, f"no such endpoint: {method} {url.path}")
            handler, repo_id, rest = route
            access = hub.repos.get(repo_id)
            if access is not None and access.delay_s:
                time.sleep(access.delay_s)
            self._check_access(repo_id)
            handler(method, repo_id, rest, query, body)
        except HubError as err:
            self._send_error(err)

    def _route(self, method: str, path: str) -> tuple[Callable, str, str] | None:
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/") :]
            for keyword, handler, methods in (
                ("/revision/", self._model_info, ("GET",)),
                ("/tree/", self._tree, ("GET",)),
                ("/paths-info/", self._paths_info, ("POST",)),
            ):
                if keyword in rest and method in methods:
                    repo_id, after = rest.split(keyword, 1)
                    return handler, unquote(repo_id), after
            if method == "GET":
                return self._model_info, unquote(rest.strip("/")), "main"
            return None
        if "/resolve/" in path and method in ("GET", "HEAD"):
            repo_id, after = path[1:].split("/resolve/", 1)
            return self._resolve, unquote(repo_id), after
        return None

    def _check_access(self, repo_id: str) -> None:
        hub = self.server.hub
        auth = self.headers.get("Authorization") or ""
        token = auth[len("Bearer ") :].strip() if auth.startswith("Bearer ") else None
        if token and token not in hub.known_tokens():
            raise HubError(401, "Invalid credentials in Authorization header")
        with hub._lock:
            access = hub.repos.get(repo_id)
        if access is None or not (hub.repos_dir / repo_id).is_dir():
            raise HubError(404, "Repository not found", "RepoNotFound")
        if access.private and token != access.token:
            raise HubError(401 if token is None else 404, "Repository not found", "RepoNotFound")
        if access.gated and token != access.token:
            message = f"Access to model {repo_id} is restricted and you are not in the authorized list."
            raise HubError(401 if token is None else 403, message, "GatedRepo")

    def _revision(self, repo_id: str, raw: str, files: dict[str, FileEntry]) -> str:
        revision = unquote(raw)
        sha = self.server.hub.sha(repo_id, files)
        if revision not in ("main", sha):
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    # Endpoints ----------------------------------------------------------------------------------

    def _model_info(self, method: str, repo_id: str, rest: str, query: dict, body: bytes) -> None:
        hub = self.server.hub
        files = hub.files(repo_id)
        sha = self._revision(repo_id, rest.strip("/"), files)
        access = hub.repos[repo_id]
        siblings = []
        for entry in files.values():
            sibling: dict = {"rfilename": entry.path}
            if query.get("blobs") in ("True", "true", "1"):
                tree = entry.tree_entry()
                sibling.update(size=tree["size"], blobId=tree["oid"])
                if "lfs" in tree:
                    sibling["lfs"] = {"sha256": entry.etag, "size": tree["size"], "pointerSize": 134}
            siblings.append(sibling)
        info = {
            "_id": sha[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "lastModified": "2024-01-01T00:00:00.000Z",
            "createdAt": "2024-01-01T00:00:00.000Z",
            "private": access.private,
            "gated": "manual" if access.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "library_name": "transformers",
            "siblings": siblings,
        }
        self._send_json(info)

    def _tree(self, method: str, repo_id: str, rest: str, query: dict, body: bytes) -> None:
        files = self.server.hub.files(repo_id)
        raw_rev, _, raw_path = rest.partition("/")
        self._revision(repo_id, raw_rev, files)
        prefix = unquote(raw_path).strip("/")
        recursive = query.get("recursive") in ("True", "true", "1")
        entries = _tree_entries(files)
        if prefix and not any(e["path"] == prefix and e["type"] == "directory" for e in entries):
            raise HubError(404, f"Entry not found: {prefix}", "EntryNotFound")
        base = prefix + "/" if prefix else ""
        listed = []
        for entry in entries:
            path = entry["path"]
            if not path.startswith(base) or path == prefix:
                continue
            if recursive or "/" not in path[len(base) :]:
                listed.append(entry)
        self._send_json(listed)

    def _paths_info(self, method: str, repo_id: str, rest: str, query: dict, body: bytes) -> None:
        files = self.server.hub.files(repo_id)
        self._revision(repo_id, rest.strip("/"), files)
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(body or b"{}").get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        wanted = {p.strip("/") for p in ([paths] if isinstance(paths, str) else paths)}
        self._send_json([e for e in _tree_entries(files) if e["path"] in wanted])

    def _resolve(self, method: str, repo_id: str, rest: str, query: dict, body: bytes) -> None:
        files = self.server.hub.files(repo_id)
        raw_rev, _, raw_path = rest.partition("/")
        sha = self._revision(repo_id, raw_rev, files)
        entry = files.get(unquote(raw_path))
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        data, status, extra = entry.data, 200, {}
        ranged = _parse_range(self.headers.get("Range"), len(data))
        if ranged is not None and method == "GET":
            start, end = ranged
            data, status = data[start : end + 1], 206
            extra["Content-Range"] = f"bytes {start}-{end}/{len(entry.data)}"
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{entry.etag}"')
        self.send_header("X-Repo-Commit", sha)
        if entry.is_lfs:
            self.send_header("X-Linked-Etag", f'"{entry.etag}"')
            self.send_header("X-Linked-Size", str(len(entry.data)))
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()
        if method == "GET":
            self.wfile.write(data)

    # Responses ----------------------------------------------------------------------------------

    def _send_json(self, payload: object, status: int = 200) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, err: HubError) -> None:
        data = json.dumps({"error": err.message}).encode()
        self.send_response(err.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Error-Message", err.message)
        if err.code:
            self.send_header("X-Error-Code", err.code)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def _tree_entries(files: dict[str, FileEntry]) -> list[dict]:
    """Tree entries of every file and every directory, directories first, like the Hub lists them."""
    dirs = sorted({"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)})
    entries = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d} for d in dirs]
    return entries + [entry.tree_entry() for entry in files.values()]


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` → inclusive (start, end), or None to send everything."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[len("bytes=") :].partition("-")
    try:
        if first:
            start, end = int(first), int(last) if last else size - 1
        else:
            start, end = max(size - int(last), 0), size - 1
    except ValueError:
        return None
    if start > end or start >= size:
        return None
    return start, min(end, size - 1)
