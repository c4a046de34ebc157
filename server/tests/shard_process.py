"""The shard's gRPC service on a unix socket, for tests that talk to it: a real `lorax-server serve`
subprocess, or a servicer served from a thread of the test's own process (to reach into its engine)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from lorax_server.pb import generate_pb2_grpc as pb_grpc

EXE = shutil.which("lorax-server", path=str(Path(sys.executable).parent)) or "lorax-server"


@contextmanager
def run_shard(
    model_dir: Path, sock_dir: Path, *flags: str
) -> Iterator[tuple[pb_grpc.LoraxServiceStub, subprocess.Popen, Path]]:
    """`lorax-server serve MODEL_DIR FLAGS...` with a stub connected to its socket; stopped on exit."""
    uds = str(sock_dir / "shard")
    proc = subprocess.Popen(
        [EXE, "serve", str(model_dir), "--uds-path", uds, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    sock = Path(f"{uds}-0")
    deadline = time.time() + 120
    while not sock.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"shard exited: {proc.stdout.read().decode()}")
        if time.time() > deadline:
            proc.kill()
            raise TimeoutError("shard did not start")
        time.sleep(0.1)
    channel = grpc.insecure_channel(f"unix://{sock}")
    try:
        yield pb_grpc.LoraxServiceStub(channel), proc, sock
    finally:
        channel.close()
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def in_process(servicer: pb_grpc.LoraxServiceServicer, tmp: Path) -> Iterator[pb_grpc.LoraxServiceStub]:
    """`servicer` behind a real grpc.aio server on a unix socket, its loop on a thread of this process."""
    url = f"unix://{tmp / 'shard-0'}"
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> grpc.aio.Server:
        server = grpc.aio.server()
        pb_grpc.add_LoraxServiceServicer_to_server(servicer, server)
        server.add_insecure_port(url)
        await server.start()
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    channel = grpc.insecure_channel(url)
    try:
        yield pb_grpc.LoraxServiceStub(channel)
    finally:
        channel.close()
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
