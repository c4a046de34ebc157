//! The launcher end to end against stand-ins: shell scripts named `lorax-server` and
//! `lorax-router` on PATH that record how they were started and behave as told by `FAKE_*`
//! environment variables. No network, no Python.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const FAKE_SERVER: &str = r#"#!/bin/sh
# Stand-in for `lorax-server`.
cmd=$1; shift
case "$cmd" in
download-weights)
  echo "$@" > "$FAKE_DIR/download.args"
  if [ -n "$FAKE_DOWNLOAD_FAIL" ]; then
    echo "Repository not found: $1" >&2
    exit 1
  fi
  echo "fetching $1"
  mkdir -p "$FAKE_DIR/model"
  echo "$FAKE_DIR/model"
  ;;
serve)
  echo "$@" > "$FAKE_DIR/shard-$RANK.args"
  env > "$FAKE_DIR/shard-$RANK.env"
  uds=""
  while [ $# -gt 0 ]; do
    case "$1" in --uds-path) uds=$2; shift;; esac
    shift
  done
  sleep 1000 &
  echo $! > "$FAKE_DIR/shard-$RANK.child.pid"
  echo $$ > "$FAKE_DIR/shard-$RANK.pid"
  if [ "$FAKE_SHARD_FAIL_RANK" = "$RANK" ]; then
    sleep 0.3
    echo "Traceback (most recent call last):" >&2
    echo "torch.OutOfMemoryError: CUDA out of memory in shard $RANK" >&2
    exit 1
  fi
  if [ -z "$FAKE_NO_SOCKET" ]; then
    touch "$uds-$RANK"
  fi
  echo "shard $RANK serving on $uds-$RANK"
  wait
  ;;
*)
  echo "unknown command $cmd" >&2
  exit 2
  ;;
esac
"#;

const FAKE_ROUTER: &str = r#"#!/bin/sh
# Stand-in for `lorax-router`.
printf '%s\n' "$@" > "$FAKE_DIR/router.args.tmp"
env > "$FAKE_DIR/router.env"
sleep 1000 &
echo $! > "$FAKE_DIR/router.child.pid"
echo $$ > "$FAKE_DIR/router.pid"
mv "$FAKE_DIR/router.args.tmp" "$FAKE_DIR/router.args"
if [ -n "$FAKE_ROUTER_FAIL" ]; then
  echo "Error: address already in use (port $FAKE_ROUTER_FAIL)" >&2
  exit 3
fi
echo "router listening"
wait
"#;

/// A temporary world: `bin/` with the stand-ins, the recordings, the launcher's output.
struct World {
    dir: tempfile::TempDir,
}

impl World {
    fn new(with_router: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir_all(&bin).unwrap();
        let mut fakes = vec![("lorax-server", FAKE_SERVER)];
        if with_router {
            fakes.push(("lorax-router", FAKE_ROUTER));
        }
        for (name, script) in fakes {
            let path = bin.join(name);
            fs::write(&path, script).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        World { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    fn pid(&self, name: &str) -> u32 {
        self.read(name)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} holds no pid"))
    }

    /// The launcher with `args`, the stand-ins first on PATH, and `env` added.
    fn launch(&self, args: &[&str], env: &[(&str, &str)]) -> Launcher {
        let path = format!("{}:/usr/bin:/bin", self.path("bin").display());
        let uds = self.path("sock");
        let mut command = Command::new(env!("CARGO_BIN_EXE_lorax-launcher"));
        command
            .args(["--shard-uds-path", uds.to_str().unwrap()])
            .args(args)
            .env_clear()
            .env("PATH", path)
            .env("FAKE_DIR", self.dir.path())
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(fs::File::create(self.path("launcher.out")).unwrap())
            .stderr(fs::File::create(self.path("launcher.err")).unwrap());
        Launcher(command.spawn().unwrap())
    }

    /// Everything the launcher printed.
    fn output(&self) -> String {
        self.read("launcher.out") + &self.read("launcher.err")
    }

    fn wait_for(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.path(name).exists() {
            assert!(
                Instant::now() < deadline,
                "{name} never appeared; launcher said:\n{}",
                self.output()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The launcher process; killed if a test fails before it exits.
struct Launcher(Child);

impl Launcher {
    fn signal(&self, signal: i32) {
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, signal);
        }
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "launcher did not exit in time");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `pid` is a live process (a zombie waiting to be reaped is not).
fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn assert_all_gone(world: &World, pid_files: &[&str]) {
    // Processes killed by a signal may take a moment to be torn down by the kernel.
    let deadline = Instant::now() + Duration::from_secs(5);
    for name in pid_files {
        let pid = world.pid(name);
        while alive(pid) {
            assert!(
                Instant::now() < deadline,
                "{name} ({pid}) outlived the launcher"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

const ALL_PIDS_2: [&str; 6] = [
    "shard-0.pid",
    "shard-0.child.pid",
    "shard-1.pid",
    "shard-1.child.pid",
    "router.pid",
    "router.child.pid",
];

#[test]
fn starts_shards_and_router_then_sigterm_stops_everything() {
    let world = World::new(true);
    let mut launcher = world.launch(
        &[
            "--model-id",
            "org/model",
            "--num-shard",
            "2",
            "--dtype",
            "float32",
        ],
        &[
            ("PORT", "8123"),
            ("MAX_BATCH_TOTAL_TOKENS", "9000"),
            ("CORS_ALLOW_ORIGIN", "http://a,http://b"),
            ("KV_CACHE_BLOCKS", "32"),
            ("MASTER_PORT", "29999"),
            ("HUGGING_FACE_HUB_TOKEN", "hf_secret"),
        ],
    );
    world.wait_for("router.args");
    world.wait_for("router.pid");

    assert_eq!(world.read("download.args").trim(), "org/model");
    let uds = world.path("sock");
    for rank in 0..2 {
        let args = world.read(&format!("shard-{rank}.args"));
        assert_eq!(
            args.trim(),
            format!(
                "org/model --uds-path {} --dtype float32 --sharded --kv-cache-blocks 32",
                uds.display()
            )
        );
        let env = world.read(&format!("shard-{rank}.env"));
        for expected in [
            format!("RANK={rank}"),
            format!("LOCAL_RANK={rank}"),
            "WORLD_SIZE=2".to_string(),
            "MASTER_ADDR=localhost".to_string(),
            "MASTER_PORT=29999".to_string(),
            "HUGGING_FACE_HUB_TOKEN=hf_secret".to_string(),
            "HF_TOKEN=hf_secret".to_string(),
        ] {
            assert!(env.lines().any(|l| l == expected), "{expected} missing");
        }
    }
    let router: Vec<String> = world
        .read("router.args")
        .lines()
        .map(String::from)
        .collect();
    let value_of = |flag: &str| {
        let at = router.iter().position(|a| a == flag).expect(flag);
        router[at + 1].clone()
    };
    assert_eq!(
        value_of("--master-shard-uds-path"),
        format!("{}-0", uds.display())
    );
    let model_dir = fs::canonicalize(world.path("model")).unwrap();
    assert_eq!(value_of("--tokenizer-name"), model_dir.to_str().unwrap());
    assert_eq!(value_of("--model-id"), "org/model");
    assert_eq!(value_of("--port"), "8123");
    assert_eq!(value_of("--hostname"), "0.0.0.0");
    assert_eq!(value_of("--max-batch-total-tokens"), "9000");
    assert_eq!(value_of("--max-input-length"), "1024");
    let origins: Vec<&String> = router
        .windows(2)
        .filter(|w| w[0] == "--cors-allow-origin")
        .map(|w| &w[1])
        .collect();
    assert_eq!(origins, ["http://a", "http://b"]);
    // The router gets its settings as flags only.
    let router_env = world.read("router.env");
    assert!(!router_env.lines().any(|l| l.starts_with("PORT=")));
    assert!(!router_env
        .lines()
        .any(|l| l.starts_with("CORS_ALLOW_ORIGIN=")));
    assert!(router_env.lines().any(|l| l == "HF_TOKEN=hf_secret"));

    // Shards' output reaches the launcher's log.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !world.output().contains("shard 1 serving") {
        assert!(Instant::now() < deadline, "{}", world.output());
        thread::sleep(Duration::from_millis(20));
    }

    launcher.signal(libc::SIGTERM);
    let status = launcher.wait(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", world.output());
    assert_all_gone(&world, &ALL_PIDS_2);
}

#[test]
fn sigint_stops_everything_too() {
    let world = World::new(true);
    let mut launcher = world.launch(&["--model-id", "org/model"], &[]);
    world.wait_for("router.pid");
    launcher.signal(libc::SIGINT);
    let status = launcher.wait(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", world.output());
    assert_all_gone(
        &world,
        &[
            "shard-0.pid",
            "shard-0.child.pid",
            "router.pid",
            "router.child.pid",
        ],
    );
}

#[test]
fn a_dying_shard_stops_the_others_and_is_reported() {
    let world = World::new(true);
    let mut launcher = world.launch(
        &["--model-id", "org/model", "--num-shard", "2"],
        &[("FAKE_SHARD_FAIL_RANK", "1")],
    );
    let status = launcher.wait(Duration::from_secs(20));
    let output = world.output();
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(output.contains("shard 1 exited with code 1"), "{output}");
    assert!(output.contains("CUDA out of memory in shard 1"), "{output}");
    assert!(!world.path("router.pid").exists(), "router started anyway");
    assert_all_gone(
        &world,
        &[
            "shard-0.pid",
            "shard-0.child.pid",
            "shard-1.pid",
            "shard-1.child.pid",
        ],
    );
}

#[test]
fn a_dying_router_stops_the_shards_and_is_reported() {
    let world = World::new(true);
    let mut launcher = world.launch(
        &["--model-id", "org/model", "--num-shard", "2"],
        &[("FAKE_ROUTER_FAIL", "3000")],
    );
    let status = launcher.wait(Duration::from_secs(20));
    let output = world.output();
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(output.contains("router exited with code 3"), "{output}");
    assert!(
        output.contains("address already in use (port 3000)"),
        "{output}"
    );
    assert_all_gone(&world, &ALL_PIDS_2);
}

#[test]
fn a_failed_download_is_reported_and_nothing_starts() {
    let world = World::new(true);
    let mut launcher = world.launch(
        &["--model-id", "org/private"],
        &[("FAKE_DOWNLOAD_FAIL", "1")],
    );
    let status = launcher.wait(Duration::from_secs(20));
    let output = world.output();
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains("downloading the weights failed"),
        "{output}"
    );
    assert!(
        output.contains("Repository not found: org/private"),
        "{output}"
    );
    assert!(!world.path("shard-0.args").exists());
}

#[test]
fn download_only_stops_after_the_download() {
    // No router is installed: it is not needed.
    let world = World::new(false);
    let mut launcher = world.launch(
        &["--model-id", "org/model", "--revision", "v1"],
        &[("DOWNLOAD_ONLY", "yes")],
    );
    let status = launcher.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", world.output());
    assert_eq!(
        world.read("download.args").trim(),
        "org/model --revision v1"
    );
    assert!(!world.path("shard-0.args").exists());
}

#[test]
fn a_missing_router_is_reported_before_downloading() {
    let world = World::new(false);
    let mut launcher = world.launch(&["--model-id", "org/model"], &[]);
    let status = launcher.wait(Duration::from_secs(20));
    let output = world.output();
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(output.contains("`lorax-router` was not found"), "{output}");
    assert!(!world.path("download.args").exists());
}

#[test]
fn shards_that_never_open_their_socket_time_out() {
    let world = World::new(true);
    let mut launcher = world.launch(
        &["--model-id", "org/model", "--shard-startup-timeout-s", "1"],
        &[("FAKE_NO_SOCKET", "1")],
    );
    let status = launcher.wait(Duration::from_secs(20));
    let output = world.output();
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(output.contains("did not open their sockets"), "{output}");
    assert!(output.contains("sock-0 is missing"), "{output}");
    assert!(!world.path("router.pid").exists());
    assert_all_gone(&world, &["shard-0.pid", "shard-0.child.pid"]);
}

#[test]
fn invalid_limits_from_the_environment_are_refused() {
    let world = World::new(true);
    let mut launcher = world.launch(
        &["--model-id", "org/model"],
        &[("MAX_INPUT_LENGTH", "4000")],
    );
    let status = launcher.wait(Duration::from_secs(10));
    let output = world.output();
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(
        output.contains("--max-input-length (4000) must not exceed --max-total-tokens (2048)"),
        "{output}"
    );
    assert!(!world.path("download.args").exists());
}

#[test]
fn json_output_writes_json_lines() {
    let world = World::new(true);
    let mut launcher = world.launch(&["--model-id", "org/model"], &[("JSON_OUTPUT", "1")]);
    world.wait_for("router.pid");
    launcher.signal(libc::SIGTERM);
    assert_eq!(launcher.wait(Duration::from_secs(15)).code(), Some(0));
    assert!(world
        .read("router.args")
        .lines()
        .any(|l| l == "--json-output"));
    let log = world.read("launcher.out");
    assert!(log.lines().count() > 3, "{log}");
    for line in log.lines() {
        assert!(
            line.starts_with('{') && line.ends_with('}') && line.contains("\"level\""),
            "not a JSON log line: {line}"
        );
    }
    assert!(
        log.contains("\"rank\":0"),
        "shard lines carry their rank: {log}"
    );
}

#[test]
fn shards_die_with_a_launcher_killed_hard() {
    let world = World::new(true);
    let mut launcher = world.launch(&["--model-id", "org/model", "--num-shard", "2"], &[]);
    world.wait_for("router.pid");
    launcher.signal(libc::SIGKILL);
    launcher.wait(Duration::from_secs(5));
    // The kernel kills the direct children (parent-death signal); their own children are theirs.
    assert_all_gone(&world, &["shard-0.pid", "shard-1.pid", "router.pid"]);
    for name in ["shard-0.child.pid", "shard-1.child.pid", "router.child.pid"] {
        unsafe {
            libc::kill(world.pid(name) as libc::pid_t, libc::SIGKILL);
        }
    }
}

#[test]
fn a_local_model_directory_is_the_tokenizer() {
    let world = World::new(true);
    let model = world.path("my-model");
    fs::create_dir_all(&model).unwrap();
    let mut launcher = world.launch(&["--model-id", model.to_str().unwrap()], &[]);
    world.wait_for("router.args");
    let router = world.read("router.args");
    let canonical = fs::canonicalize(&model).unwrap();
    assert!(
        router.lines().any(|l| Path::new(l) == canonical),
        "{router}"
    );
    launcher.signal(libc::SIGTERM);
    assert_eq!(launcher.wait(Duration::from_secs(15)).code(), Some(0));
}
