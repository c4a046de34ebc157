//! Child processes of the launcher: spawned in a process group of their own (so one signal reaches
//! a child and everything it started, and a terminal's Ctrl-C reaches only the launcher), their
//! output streamed into the launcher's log, the last lines kept for error reports, and stopped
//! with SIGTERM, then SIGKILL after a grace period.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tracing::Span;

use crate::childlog;

/// Lines of each output stream kept for the error report of a child that fails.
pub const TAIL_LINES: usize = 20;

/// How often waiting loops look at children, sockets and signals.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// What to run: a program, its arguments and the environment variables added to the launcher's.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    /// Variables of the launcher's environment the child does not inherit.
    pub env_remove: Vec<OsString>,
}

impl CommandSpec {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        CommandSpec {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            env_remove: Vec::new(),
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn env_remove(mut self, key: impl Into<OsString>) -> Self {
        self.env_remove.push(key.into());
        self
    }

    /// The arguments as text, for logs and tests.
    pub fn args_lossy(&self) -> Vec<String> {
        self.args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }
}

/// The last lines one output stream of a child wrote.
#[derive(Clone, Default)]
struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    fn push(&self, line: String) {
        let mut lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    fn lines(&self) -> Vec<String> {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().cloned().collect()
    }
}

/// One output stream of a child: a thread logs each line under the child's span (at the line's
/// own level, see `childlog`) and keeps the tail.
struct Stream {
    tail: Tail,
    reader: JoinHandle<()>,
}

impl Stream {
    fn start(source: impl Read + Send + 'static, span: Span) -> Self {
        let tail = Tail::default();
        let kept = tail.clone();
        let reader = thread::spawn(move || {
            let _entered = span.enter();
            let mut source = BufReader::new(source);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match source.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        let line = childlog::parse(line.trim_end_matches(['\n', '\r']));
                        childlog::emit(&line);
                        kept.push(line.text);
                    }
                }
            }
        });
        Stream { tail, reader }
    }
}

/// A running (or finished) child of the launcher.
pub struct Supervised {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    stdout: Stream,
    stderr: Stream,
}

impl Supervised {
    /// Starts `spec` in a new process group with stdin closed and stdout/stderr piped into the
    /// launcher's log under `span`. `name` is how errors refer to the child ("shard 1").
    pub fn spawn(name: &str, spec: &CommandSpec, span: Span) -> io::Result<Self> {
        let mut command = Command::new(&spec.program);
        for key in &spec.env_remove {
            command.env_remove(key);
        }
        command
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        die_with_parent(&mut command);
        let mut child = command.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot start {}: {e}", spec.program.display()),
            )
        })?;
        let stdout = Stream::start(child.stdout.take().expect("piped"), span.clone());
        let stderr = Stream::start(child.stderr.take().expect("piped"), span);
        Ok(Supervised {
            name: name.to_string(),
            child,
            status: None,
            stdout,
            stderr,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status once the child has exited (reaping it), `None` while it runs.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Sends `signal` to the child's process group: the child and whatever it started.
    /// The group outlives its leader while members remain, and its id is not reused meanwhile.
    pub fn signal_group(&self, signal: i32) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(-(self.pid() as libc::pid_t), signal);
        }
    }

    /// Whether any process of the child's group is still alive (zombies do not count).
    fn group_alive(&self) -> bool {
        crate::procfs::group_has_live_members(self.pid())
    }

    /// Waits (at most `timeout`) until both output streams are closed, so the tails are complete.
    pub fn drain_output(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !(self.stdout.reader.is_finished() && self.stderr.reader.is_finished())
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The last lines the child wrote to stderr.
    pub fn stderr_tail(&self) -> Vec<String> {
        self.stderr.tail.lines()
    }

    /// The last lines the child wrote to stdout.
    pub fn stdout_tail(&self) -> Vec<String> {
        self.stdout.tail.lines()
    }

    /// A report of a child that ended: its status and its last stderr lines (its last stdout
    /// lines when it wrote nothing to stderr).
    pub fn failure_report(&mut self) -> String {
        self.drain_output(Duration::from_secs(1));
        let status = self
            .try_exit()
            .map(describe_status)
            .unwrap_or_else(|| "is still running".to_string());
        let (which, lines) = match self.stderr_tail() {
            lines if !lines.is_empty() => ("stderr", lines),
            _ => ("stdout", self.stdout_tail()),
        };
        if lines.is_empty() {
            return format!("{} {status} and wrote nothing", self.name);
        }
        format!(
            "{} {status}; its last {which} lines:\n{}",
            self.name,
            lines.join("\n")
        )
    }
}

/// "exited with code 1", "was killed by signal 9".
pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => format!("ended ({status})"),
    }
}

/// Makes the kernel SIGKILL the child if the launcher dies without cleaning up (even by SIGKILL),
/// so no shard outlives it. Children are only spawned from the main thread, which lives as long
/// as the launcher (the signal is tied to the spawning thread).
#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut Command) {
    // SAFETY: the closure only makes async-signal-safe calls (getppid, prctl).
    let parent = unsafe { libc::getpid() };
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                // The launcher already died between fork and prctl.
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}

/// Stops `children` together: SIGTERM to each process group, then SIGKILL to the groups still
/// alive after `grace`. Returns once every child is reaped and its group is empty (or, after
/// SIGKILL, once the leaders are reaped).
pub fn shutdown(children: &mut [&mut Supervised], grace: Duration) {
    for child in children.iter() {
        child.signal_group(libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    loop {
        crate::procfs::reap_orphans();
        let mut all_gone = true;
        for child in children.iter_mut() {
            let reaped = child.try_exit().is_some();
            all_gone &= reaped && !child.group_alive();
        }
        if all_gone {
            return;
        }
        if Instant::now() >= deadline {
            break;
        }
        thread::sleep(POLL_INTERVAL);
    }
    for child in children.iter_mut() {
        if child.try_exit().is_none() || child.group_alive() {
            tracing::warn!(
                "{} did not stop within {}s of SIGTERM; killing it",
                child.name,
                grace.as_secs_f32()
            );
            child.signal_group(libc::SIGKILL);
        }
        if child.status.is_none() {
            child.status = child.child.wait().ok();
        }
    }
}

/// SIGINT and SIGTERM sent to the launcher, recorded instead of ending it.
#[derive(Clone)]
pub struct Signals(Arc<AtomicUsize>);

impl Signals {
    pub fn install() -> io::Result<Self> {
        let received = Arc::new(AtomicUsize::new(0));
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register_usize(signal, received.clone(), signal as usize)?;
        }
        Ok(Signals(received))
    }

    /// A flag that no signal sets, for tests.
    #[cfg(test)]
    pub fn none() -> Self {
        Signals(Arc::new(AtomicUsize::new(0)))
    }

    /// The last signal received, if any.
    pub fn received(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            signal => Some(signal as i32),
        }
    }
}

/// What ended a wait on a set of children.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// The launcher received this signal.
    Signal(i32),
    /// The child at this index exited.
    Exited(usize),
}

/// Looks once at the signals, then at each child: the first thing that happened, if any.
pub fn poll(children: &mut [Supervised], signals: &Signals) -> Option<Event> {
    if let Some(signal) = signals.received() {
        return Some(Event::Signal(signal));
    }
    children
        .iter_mut()
        .position(|child| child.try_exit().is_some())
        .map(Event::Exited)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> CommandSpec {
        CommandSpec::new("/bin/sh").arg("-c").arg(script)
    }

    fn start(script: &str) -> Supervised {
        Supervised::spawn("test child", &sh(script), Span::none()).unwrap()
    }

    fn alive(pid: u32) -> bool {
        // A zombie is not alive; /proc/<pid>/stat's third field is the state.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    fn wait_exit(child: &mut Supervised) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = child.try_exit() {
                return status;
            }
            thread::sleep(POLL_INTERVAL);
        }
        panic!("child did not exit");
    }

    #[test]
    fn keeps_the_last_stderr_lines_for_the_report() {
        let mut child = start("for i in $(seq 1 30); do echo err$i >&2; done; echo out; exit 3");
        let status = wait_exit(&mut child);
        assert_eq!(status.code(), Some(3));
        let report = child.failure_report();
        assert!(
            report.starts_with("test child exited with code 3"),
            "{report}"
        );
        assert!(
            report.contains("err30") && report.contains("err11"),
            "{report}"
        );
        assert!(!report.contains("err10\n"), "{report}");
        assert_eq!(child.stderr_tail().len(), TAIL_LINES);
        assert_eq!(child.stdout_tail(), ["out"]);
    }

    #[test]
    fn reports_stdout_when_stderr_is_empty() {
        let mut child = start("echo only-out; exit 1");
        wait_exit(&mut child);
        let report = child.failure_report();
        assert!(report.contains("stdout lines:\nonly-out"), "{report}");
    }

    #[test]
    fn environment_is_added() {
        let spec = sh("echo \"$LAUNCHER_TEST_VAR\"").env("LAUNCHER_TEST_VAR", "value-1");
        let mut child = Supervised::spawn("env", &spec, Span::none()).unwrap();
        wait_exit(&mut child);
        child.drain_output(Duration::from_secs(2));
        assert_eq!(child.stdout_tail(), ["value-1"]);
    }

    #[test]
    fn removed_variables_are_not_inherited_but_added_ones_win() {
        let spec = sh("echo \"${HOME:-no-home}|${LAUNCHER_ADDED:-none}\"")
            .env_remove("HOME")
            .env_remove("LAUNCHER_ADDED")
            .env("LAUNCHER_ADDED", "/added");
        let mut child = Supervised::spawn("env", &spec, Span::none()).unwrap();
        wait_exit(&mut child);
        child.drain_output(Duration::from_secs(2));
        assert_eq!(child.stdout_tail(), ["no-home|/added"]);
    }

    #[test]
    fn missing_program_is_a_clear_error() {
        let err = Supervised::spawn("x", &CommandSpec::new("/nonexistent/prog"), Span::none())
            .err()
            .unwrap();
        assert!(err.to_string().contains("cannot start /nonexistent/prog"));
    }

    #[test]
    fn shutdown_stops_the_child_and_its_own_children() {
        // The shell starts a grandchild (sleep) and waits for it.
        let mut child = start("sleep 60 & echo $! ; wait");
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.stdout_tail().is_empty() && Instant::now() < deadline {
            thread::sleep(POLL_INTERVAL);
        }
        let grandchild: u32 = child.stdout_tail()[0].parse().unwrap();
        assert!(alive(grandchild));
        let started = Instant::now();
        shutdown(&mut [&mut child], Duration::from_secs(10));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(child.try_exit().unwrap().signal(), Some(libc::SIGTERM));
        assert!(!alive(child.pid()));
        assert!(!alive(grandchild));
    }

    #[test]
    fn shutdown_kills_a_child_that_ignores_sigterm() {
        let mut child = start("trap '' TERM; echo ready; while :; do sleep 0.05; done");
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.stdout_tail().is_empty() && Instant::now() < deadline {
            thread::sleep(POLL_INTERVAL);
        }
        let started = Instant::now();
        shutdown(&mut [&mut child], Duration::from_millis(300));
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(child.try_exit().unwrap().signal(), Some(libc::SIGKILL));
        assert!(!alive(child.pid()));
    }

    #[test]
    fn poll_reports_the_first_exited_child_and_signals_first() {
        let mut children = vec![start("sleep 30"), start("exit 0")];
        let signals = Signals::none();
        let deadline = Instant::now() + Duration::from_secs(5);
        let event = loop {
            if let Some(event) = poll(&mut children, &signals) {
                break event;
            }
            assert!(Instant::now() < deadline);
            thread::sleep(POLL_INTERVAL);
        };
        assert_eq!(event, Event::Exited(1));
        signals.0.store(libc::SIGTERM as usize, Ordering::SeqCst);
        assert_eq!(
            poll(&mut children, &signals),
            Some(Event::Signal(libc::SIGTERM))
        );
        let (a, b) = children.split_at_mut(1);
        shutdown(&mut [&mut a[0], &mut b[0]], Duration::from_secs(5));
    }

    #[test]
    fn describes_exit_codes_and_signals() {
        assert_eq!(
            describe_status(ExitStatus::from_raw(2 << 8)),
            "exited with code 2"
        );
        assert_eq!(
            describe_status(ExitStatus::from_raw(9)),
            "was killed by signal 9"
        );
    }
}
