//! Finding things on disk: the programs the launcher starts, and the local directory of the
//! model whose tokenizer the router loads.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Directories searched for the launcher's sibling programs, in order: the directory the
/// launcher was started from (as typed, so a symlink in a virtualenv's `bin/` counts), the
/// directory of its resolved executable, then `PATH`.
pub fn search_dirs(
    argv0: Option<&Path>,
    exe: Option<&Path>,
    path: Option<&OsString>,
) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let typed = argv0.filter(|p| p.components().count() > 1);
    for program in typed.into_iter().chain(exe) {
        if let Some(dir) = program.parent() {
            dirs.push(dir.to_path_buf());
        }
    }
    if let Some(path) = path {
        dirs.extend(std::env::split_paths(path));
    }
    let mut seen = Vec::new();
    dirs.retain(|d| {
        let fresh = !seen.contains(d);
        seen.push(d.clone());
        fresh
    });
    dirs
}

/// The directories of [`search_dirs`] for this process.
pub fn default_search_dirs() -> Vec<PathBuf> {
    let argv0 = std::env::args_os().next().map(PathBuf::from);
    let exe = std::env::current_exe().ok();
    search_dirs(
        argv0.as_deref(),
        exe.as_deref(),
        std::env::var_os("PATH").as_ref(),
    )
}

/// The first executable file named `name` in `dirs`.
pub fn find_program(name: &str, dirs: &[PathBuf]) -> Result<PathBuf, String> {
    dirs.iter()
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| {
            format!(
                "`{name}` was not found beside the launcher nor on PATH; install it \
                 (`make install` puts it in .venv/bin) or add its directory to PATH"
            )
        })
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The Hugging Face Hub cache directory, as the Hub library decides it: the explicit one, else
/// `HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`, `HF_HOME/hub`, `XDG_CACHE_HOME/huggingface/hub`,
/// `HOME/.cache/huggingface/hub`.
/// `model_id` as a local directory that the download step would return untouched: it holds
/// `*.safetensors` weights, no `.bin` weights that might need converting and no index to check
/// (those cases go through `lorax-server download-weights`). Skipping the step saves starting a
/// Python process.
pub fn ready_local_dir(model_id: &str) -> Option<PathBuf> {
    let dir = Path::new(model_id);
    let names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    let safetensors = names.iter().any(|n| n.ends_with(".safetensors"));
    let needs_checks = names
        .iter()
        .any(|n| n.ends_with(".bin") || n.ends_with(".safetensors.index.json"));
    if safetensors && !needs_checks {
        std::fs::canonicalize(dir).ok()
    } else {
        None
    }
}

pub fn hub_cache_dir(
    explicit: Option<&Path>,
    env: impl Fn(&str) -> Option<OsString>,
) -> Option<PathBuf> {
    if let Some(dir) = explicit {
        return Some(dir.to_path_buf());
    }
    for key in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"] {
        if let Some(dir) = env(key) {
            return Some(PathBuf::from(dir));
        }
    }
    if let Some(home) = env("HF_HOME") {
        return Some(PathBuf::from(home).join("hub"));
    }
    let cache = env("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(cache.join("huggingface").join("hub"))
}

/// The snapshot directory of a Hub model in a Hub cache:
/// `<cache>/models--org--name/snapshots/<commit>`, the commit read from `refs/<revision>`
/// (or the revision itself when it is a commit hash).
pub fn hub_snapshot(cache: &Path, model_id: &str, revision: Option<&str>) -> Option<PathBuf> {
    let repo = cache.join(format!("models--{}", model_id.replace('/', "--")));
    let revision = revision.unwrap_or("main");
    let direct = repo.join("snapshots").join(revision);
    if direct.is_dir() {
        return Some(direct);
    }
    let commit = std::fs::read_to_string(repo.join("refs").join(revision)).ok()?;
    let snapshot = repo.join("snapshots").join(commit.trim());
    snapshot.is_dir().then_some(snapshot)
}

/// The local directory of the model, for the router's tokenizer: the model id itself when it is
/// a directory, else the directory `download-weights` printed on its last stdout line, else the
/// model's snapshot in the Hub cache. `None` when none of them exists.
pub fn model_dir(
    model_id: &str,
    revision: Option<&str>,
    download_last_line: Option<&str>,
    hub_cache: Option<&Path>,
) -> Option<PathBuf> {
    let local = Path::new(model_id);
    if local.is_dir() {
        return Some(absolute(local));
    }
    if let Some(printed) = download_last_line.map(str::trim).filter(|l| !l.is_empty()) {
        let printed = Path::new(printed);
        if printed.is_dir() {
            return Some(absolute(printed));
        }
    }
    hub_snapshot(hub_cache?, model_id, revision)
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn env_from<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |key| {
            pairs
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn search_order_is_typed_dir_exe_dir_then_path() {
        let path = OsString::from("/usr/bin:/venv/bin");
        let dirs = search_dirs(
            Some(Path::new("/venv/bin/lorax-launcher")),
            Some(Path::new("/src/target/release/lorax-launcher")),
            Some(&path),
        );
        assert_eq!(
            dirs,
            [
                PathBuf::from("/venv/bin"),
                PathBuf::from("/src/target/release"),
                PathBuf::from("/usr/bin"),
            ]
        );
        // A bare name typed at the shell was found through PATH: it names no directory.
        let dirs = search_dirs(Some(Path::new("lorax-launcher")), None, None);
        assert!(dirs.is_empty());
    }

    #[test]
    fn finds_only_executable_files() {
        let tmp = tempfile::tempdir().unwrap();
        let first = tmp.path().join("a");
        let second = tmp.path().join("b");
        fs::create_dir_all(&first).unwrap();
        fs::create_dir_all(&second).unwrap();
        fs::write(first.join("prog"), "not executable").unwrap();
        fs::write(second.join("prog"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(second.join("prog"), fs::Permissions::from_mode(0o755)).unwrap();
        let dirs = [first, second.clone()];
        assert_eq!(find_program("prog", &dirs).unwrap(), second.join("prog"));
        let err = find_program("other", &dirs).unwrap_err();
        assert!(err.contains("`other` was not found"), "{err}");
    }

    #[test]
    fn hub_cache_follows_the_hub_library_precedence() {
        let explicit = Path::new("/explicit");
        assert_eq!(
            hub_cache_dir(Some(explicit), env_from(&[("HF_HUB_CACHE", "/x")])),
            Some(PathBuf::from("/explicit"))
        );
        let all = [
            ("HUGGINGFACE_HUB_CACHE", "/legacy"),
            ("HF_HOME", "/hf"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(
            hub_cache_dir(None, env_from(&all)),
            Some(PathBuf::from("/legacy"))
        );
        assert_eq!(
            hub_cache_dir(None, env_from(&all[1..])),
            Some(PathBuf::from("/hf/hub"))
        );
        assert_eq!(
            hub_cache_dir(None, env_from(&all[2..])),
            Some(PathBuf::from("/home/u/.cache/huggingface/hub"))
        );
        assert_eq!(hub_cache_dir(None, env_from(&[])), None);
    }

    #[test]
    fn model_dir_prefers_local_then_printed_then_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("hub");
        let repo = cache.join("models--org--name");
        let snapshot = repo.join("snapshots").join("abc123");
        fs::create_dir_all(&snapshot).unwrap();
        fs::create_dir_all(repo.join("refs")).unwrap();
        fs::write(repo.join("refs").join("main"), "abc123\n").unwrap();

        let local = tmp.path().join("local-model");
        fs::create_dir_all(&local).unwrap();
        let local_id = local.to_str().unwrap();
        assert_eq!(
            model_dir(local_id, None, None, None),
            Some(fs::canonicalize(&local).unwrap())
        );
        let printed = tmp.path().join("printed");
        fs::create_dir_all(&printed).unwrap();
        assert_eq!(
            model_dir("org/name", None, printed.to_str(), Some(&cache)),
            Some(fs::canonicalize(&printed).unwrap())
        );
        assert_eq!(
            model_dir("org/name", None, Some("Downloaded."), Some(&cache)),
            Some(snapshot.clone())
        );
        assert_eq!(
            model_dir("org/name", Some("abc123"), None, Some(&cache)),
            Some(snapshot)
        );
        assert_eq!(model_dir("org/name", Some("v9"), None, Some(&cache)), None);
        assert_eq!(model_dir("org/other", None, None, Some(&cache)), None);
    }

    #[test]
    fn only_plain_safetensors_directories_skip_the_download_step() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        fs::create_dir_all(&dir).unwrap();
        let id = dir.to_str().unwrap();
        assert_eq!(ready_local_dir(id), None); // no weights: the downloader explains
        fs::write(dir.join("model.safetensors"), b"").unwrap();
        assert_eq!(ready_local_dir(id), Some(fs::canonicalize(&dir).unwrap()));
        fs::write(dir.join("pytorch_model.bin"), b"").unwrap(); // may need converting
        assert_eq!(ready_local_dir(id), None);
        fs::remove_file(dir.join("pytorch_model.bin")).unwrap();
        fs::write(dir.join("model.safetensors.index.json"), b"{}").unwrap(); // to be checked
        assert_eq!(ready_local_dir(id), None);
        assert_eq!(ready_local_dir("org/name"), None);
    }
}
