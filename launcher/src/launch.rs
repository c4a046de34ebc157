//! The launcher's four steps: download the weights, start the shards and wait for their sockets,
//! start the router, then supervise until a signal (clean stop) or a child's exit (failure).
//! Every path out of here leaves no child running.

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tracing::{error, info, info_span, warn};

use crate::args::Args;
use crate::commands::{self, ChildEnv};
use crate::locate;
use crate::process::{poll, shutdown, Event, Signals, Supervised, POLL_INTERVAL};
use crate::procfs;

/// How long a child may take to exit after SIGTERM before it is killed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Where the launcher finds its children and how it treats them.
pub struct Launcher {
    pub args: Args,
    pub env: ChildEnv,
    pub server: PathBuf,
    pub router: PathBuf,
    pub signals: Signals,
    pub grace: Duration,
}

/// The children started so far: shards first, then the router.
struct Children {
    list: Vec<Supervised>,
    shards: usize,
}

impl Children {
    /// Stops the router first (it stops taking requests), then the shards together.
    fn stop(&mut self, grace: Duration) {
        let split = self.shards.min(self.list.len());
        let (shards, router) = self.list.split_at_mut(split);
        if !router.is_empty() {
            shutdown(&mut router.iter_mut().collect::<Vec<_>>(), grace);
        }
        shutdown(&mut shards.iter_mut().collect::<Vec<_>>(), grace);
    }

    /// Child `index` ended on its own: stop the others, and describe what it left on stderr.
    fn fail(&mut self, index: usize, grace: Duration) -> anyhow::Error {
        error!(
            "{} stopped unexpectedly; shutting down",
            self.list[index].name()
        );
        self.stop(grace);
        anyhow!(self.list[index].failure_report())
    }
}

impl Launcher {
    /// Finds `lorax-server` and `lorax-router` (the router only when it will be needed), so a
    /// missing program is reported before a long download.
    pub fn new(args: Args, signals: Signals) -> anyhow::Result<Self> {
        let dirs = locate::default_search_dirs();
        let server = locate::find_program("lorax-server", &dirs).map_err(|e| anyhow!(e))?;
        let router = match args.download_only {
            true => PathBuf::new(),
            false => locate::find_program("lorax-router", &dirs).map_err(|e| anyhow!(e))?,
        };
        let env = ChildEnv::from_args(&args);
        Ok(Launcher {
            args,
            env,
            server,
            router,
            signals,
            grace: SHUTDOWN_GRACE,
        })
    }

    /// Runs the launcher to its end: `Ok` after `--download-only` or a stop by SIGINT/SIGTERM,
    /// an error when a step or a child fails.
    pub fn run(&self) -> anyhow::Result<()> {
        let Some(model_dir) = self.download()? else {
            return Ok(());
        };
        if self.args.download_only {
            info!("Weights are ready in {}", model_dir.display());
            return Ok(());
        }
        let mut children = Children {
            list: Vec::new(),
            shards: self.args.num_shard,
        };
        if !self.start_shards(&mut children)? {
            return Ok(());
        }
        let spec = commands::router(&self.router, &self.args, &self.env, &model_dir);
        info!("Starting the router: {}", spec.args_lossy().join(" "));
        match Supervised::spawn("router", &spec, info_span!("router")) {
            Ok(router) => children.list.push(router),
            Err(e) => {
                children.stop(self.grace);
                return Err(e.into());
            }
        }
        info!(
            "Router started; serving {} on {}:{}",
            self.args.model_id, self.args.hostname, self.args.port
        );
        self.supervise(&mut children)
    }

    /// Step 1: `download-weights`. The model's local directory, or `None` when stopped by a
    /// signal.
    fn download(&self) -> anyhow::Result<Option<PathBuf>> {
        if let Some(dir) = locate::ready_local_dir(&self.args.model_id) {
            info!(
                "{} holds safetensors weights: nothing to download",
                dir.display()
            );
            return Ok(Some(dir));
        }
        info!("Downloading the weights of {}", self.args.model_id);
        let spec = commands::download(&self.server, &self.args, &self.env);
        let mut children = Children {
            list: vec![Supervised::spawn(
                "download-weights",
                &spec,
                info_span!("download"),
            )?],
            shards: 1,
        };
        if let Waited::Signal = self.wait(&mut children, |_| false, None)? {
            return Ok(None);
        }
        // The downloader exited; this also ends anything it left running in its group.
        children.stop(self.grace);
        let child = &mut children.list[0];
        let status = child.try_exit().expect("exited");
        if !status.success() {
            let report = child.failure_report();
            bail!("downloading the weights failed: {report}");
        }
        child.drain_output(Duration::from_secs(1));
        let last_line = child.stdout_tail().pop();
        let hub_cache = locate::hub_cache_dir(self.args.huggingface_hub_cache.as_deref(), |key| {
            std::env::var_os(key)
        });
        let dir = locate::model_dir(
            &self.args.model_id,
            self.args.revision.as_deref(),
            last_line.as_deref(),
            hub_cache.as_deref(),
        );
        Ok(Some(dir.unwrap_or_else(|| {
            warn!(
                "No local directory found for {}; the router gets the model id as its tokenizer",
                self.args.model_id
            );
            PathBuf::from(&self.args.model_id)
        })))
    }

    /// Step 2: start every shard and wait for its socket. `false` when stopped by a signal.
    fn start_shards(&self, children: &mut Children) -> anyhow::Result<bool> {
        let sockets: Vec<PathBuf> = (0..self.args.num_shard)
            .map(|rank| commands::shard_socket(&self.args, rank))
            .collect();
        for socket in &sockets {
            if socket.exists() {
                std::fs::remove_file(socket)
                    .with_context(|| format!("cannot remove stale socket {}", socket.display()))?;
            }
        }
        for rank in 0..self.args.num_shard {
            let spec = commands::shard(&self.server, &self.args, &self.env, rank);
            if rank == 0 {
                info!(
                    "Starting {} shard(s): {}",
                    sockets.len(),
                    spec.args_lossy().join(" ")
                );
            }
            match Supervised::spawn(&format!("shard {rank}"), &spec, info_span!("shard", rank)) {
                Ok(shard) => children.list.push(shard),
                Err(e) => {
                    children.stop(self.grace);
                    return Err(e.into());
                }
            }
        }
        let timeout = Duration::from_secs(self.args.shard_startup_timeout_s);
        let ready = |_: &Children| sockets.iter().all(|s| s.exists());
        match self.wait(children, ready, Some(timeout)) {
            Ok(Waited::Ready) => {
                info!("All {} shard(s) are ready", sockets.len());
                Ok(true)
            }
            Ok(Waited::Signal) => Ok(false),
            Ok(Waited::Exited(index)) => Err(children.fail(index, self.grace)),
            Err(e) => {
                let missing: Vec<usize> = (0..sockets.len())
                    .filter(|&rank| !sockets[rank].exists())
                    .collect();
                children.stop(self.grace);
                let mut message = format!(
                    "the shards did not open their sockets within --shard-startup-timeout-s ({e})"
                );
                for rank in missing {
                    message.push_str(&format!(
                        "\n{} is missing; {}",
                        sockets[rank].display(),
                        children.list[rank].failure_report()
                    ));
                }
                Err(anyhow!(message))
            }
        }
    }

    /// Step 4: wait for a signal (stop everything, `Ok`) or a child's exit (stop the rest, error).
    fn supervise(&self, children: &mut Children) -> anyhow::Result<()> {
        match self.wait(children, |_| false, None)? {
            Waited::Exited(index) => Err(children.fail(index, self.grace)),
            Waited::Signal | Waited::Ready => Ok(()),
        }
    }

    /// Waits until `ready` holds, a child exits, or a signal arrives (the children are then
    /// stopped). An error only when `timeout` passes.
    fn wait(
        &self,
        children: &mut Children,
        ready: impl Fn(&Children) -> bool,
        timeout: Option<Duration>,
    ) -> anyhow::Result<Waited> {
        let started = Instant::now();
        let pid_one = std::process::id() == 1;
        loop {
            if pid_one {
                // In a container the launcher adopts what its children leave behind.
                procfs::reap_orphans();
            }
            match poll(&mut children.list, &self.signals) {
                Some(Event::Signal(signal)) => {
                    info!("Received signal {signal}; stopping");
                    children.stop(self.grace);
                    info!("All children stopped");
                    return Ok(Waited::Signal);
                }
                Some(Event::Exited(index)) => return Ok(Waited::Exited(index)),
                None if ready(children) => return Ok(Waited::Ready),
                None => {}
            }
            if let Some(timeout) = timeout.filter(|t| started.elapsed() >= *t) {
                bail!("still waiting after {}s", timeout.as_secs());
            }
            thread::sleep(POLL_INTERVAL);
        }
    }
}

/// What ended a [`Launcher::wait`].
enum Waited {
    Ready,
    Signal,
    Exited(usize),
}
