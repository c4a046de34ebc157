//! What `GET /health` answers: whether this server can serve now, not merely whether its
//! processes answer. The batching loop reports every shard step here; the handler then needs
//! no shard call while steps keep succeeding. When no step succeeded lately (the server is idle,
//! or stuck), one probe must succeed within the stall bound: for a generating model a one-token
//! generation of the base model, through the normal queue ahead of waiting requests (so it
//! delays them by at most one step); for an encoder model (no generation) the shard's Health
//! call, which runs a tiny forward. Probes are not requests: they take no concurrency permit and
//! no request metric.

use crate::client::ShardClient;
use crate::entry::{Entry, InferStreamResponse};
use crate::errors::InferError;
use crate::queue::Queue;
use crate::validation::ValidGenerateRequest;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Mutex, Notify};
use tokio::time::Instant;

/// No step completed, or one step has run, for longer than this: unhealthy.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// An idle server proves it can generate at most this often.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// "Never" in the nanosecond clocks below.
const NEVER: u64 = u64::MAX;

/// The shard calls a step can be; `step_method` holds 1 + the index of the running one.
const STEP_METHODS: [&str; 4] = ["prefill", "decode", "embed", "classify"];

/// The health check's bounds.
#[derive(Debug, Clone, Copy)]
pub struct HealthConfig {
    /// Longest a step may run, and longest a probe may wait for its token.
    pub stall_timeout: Duration,
    /// A step that succeeded within this long ago proves health without a probe.
    pub probe_interval: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            probe_interval: DEFAULT_PROBE_INTERVAL,
        }
    }
}

/// Shared by the batching loop (which reports steps) and the `/health` handler. Times are
/// nanoseconds since `epoch` in atomics, so the loop never waits on a lock to report.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    config: HealthConfig,
    epoch: Instant,
    last_success: AtomicU64,
    step_started: AtomicU64,
    /// 0 while no step runs, else 1 + its index in `STEP_METHODS`.
    step_method: AtomicU64,
    loop_alive: AtomicBool,
    /// One probe at a time; concurrent checks wait for its answer.
    probe: Mutex<()>,
    /// What a generation probe generates; None for a record whose probe is the shard's Health
    /// (`check_shard`).
    probe_request: Option<ValidGenerateRequest>,
}

/// Marks the batching loop stopped when dropped (also when its task panics).
pub struct LoopGuard(Health);

impl Drop for LoopGuard {
    fn drop(&mut self) {
        self.0.inner.loop_alive.store(false, Ordering::SeqCst);
    }
}

impl Health {
    /// `probe_request` is what a probe generates (see `Validation::probe_request`).
    pub fn new(config: HealthConfig, probe_request: ValidGenerateRequest) -> Self {
        Self::with_probe(config, Some(probe_request))
    }

    /// A record whose probe is the shard's Health call (`check_shard`): the encoder calls' one.
    pub fn without_generation(config: HealthConfig) -> Self {
        Self::with_probe(config, None)
    }

    fn with_probe(config: HealthConfig, probe_request: Option<ValidGenerateRequest>) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                epoch: Instant::now(),
                last_success: AtomicU64::new(NEVER),
                step_started: AtomicU64::new(NEVER),
                step_method: AtomicU64::new(0),
                loop_alive: AtomicBool::new(false),
                probe: Mutex::new(()),
                probe_request,
            }),
        }
    }

    pub fn config(&self) -> HealthConfig {
        self.inner.config
    }

    fn now_ns(&self) -> u64 {
        self.inner.epoch.elapsed().as_nanos() as u64
    }

    fn since(&self, ns: u64) -> Option<Duration> {
        (ns != NEVER).then(|| Duration::from_nanos(self.now_ns().saturating_sub(ns)))
    }

    /// Called by the batching task when it starts; the loop counts as stopped once the guard
    /// is dropped.
    pub fn loop_started(&self) -> LoopGuard {
        self.inner.loop_alive.store(true, Ordering::SeqCst);
        LoopGuard(self.clone())
    }

    /// A shard step (one of `STEP_METHODS`: `prefill`, `decode`, `embed`, `classify`) begins.
    pub fn step_started(&self, method: &str) {
        let index = STEP_METHODS.iter().position(|m| *m == method);
        let code = index.map_or(2, |i| i as u64 + 1);
        self.inner
            .step_started
            .store(self.now_ns(), Ordering::SeqCst);
        self.inner.step_method.store(code, Ordering::SeqCst);
    }

    /// The running step returned; `ok` when it succeeded.
    pub fn step_finished(&self, ok: bool) {
        self.inner.step_method.store(0, Ordering::SeqCst);
        self.inner.step_started.store(NEVER, Ordering::SeqCst);
        if ok {
            self.inner
                .last_success
                .store(self.now_ns(), Ordering::SeqCst);
        }
    }

    /// Why the server cannot generate now, judged without a probe: the loop stopped, or a step
    /// has run for longer than the bound. Some(Ok) when a recent step proves health.
    fn quick_verdict(&self) -> Option<Result<(), String>> {
        let bound = self.inner.config.stall_timeout;
        if !self.inner.loop_alive.load(Ordering::SeqCst) {
            return Some(Err("the batching loop has stopped".into()));
        }
        let code = self.inner.step_method.load(Ordering::SeqCst) as usize;
        let method = STEP_METHODS.get(code.wrapping_sub(1)).unwrap_or(&"decode");
        if let Some(running) = self.since(self.inner.step_started.load(Ordering::SeqCst)) {
            if running > bound {
                let article = if method.starts_with('e') { "an" } else { "a" };
                return Some(Err(format!(
                    "{article} {method} step has been running for {:.1}s (bound {:.1}s)",
                    running.as_secs_f64(),
                    bound.as_secs_f64()
                )));
            }
        }
        let recent = self
            .since(self.inner.last_success.load(Ordering::SeqCst))
            .is_some_and(|ago| ago < self.inner.config.probe_interval);
        recent.then_some(Ok(()))
    }

    /// Ok when the server can generate now; otherwise the reason. May run a probe through
    /// `queue` (waking the batcher with `notify`) and wait up to the stall bound for it.
    pub async fn check(&self, queue: &Queue, notify: &Notify) -> Result<(), String> {
        self.check_with(self.probe(queue, notify)).await
    }

    /// As `check`, for a model that does not generate: the probe is the shard's Health call
    /// (a tiny forward), bounded by the stall timeout; its success counts as a step's.
    pub async fn check_shard(&self, client: &dyn ShardClient) -> Result<(), String> {
        let bound = self.inner.config.stall_timeout;
        let probe = async {
            match tokio::time::timeout(bound, client.health()).await {
                Ok(Ok(())) => {
                    self.inner
                        .last_success
                        .store(self.now_ns(), Ordering::SeqCst);
                    Ok(())
                }
                Ok(Err(err)) => Err(format!("the shard's health check failed: {err}")),
                Err(_) => Err(format!(
                    "the shard's health check did not answer within {:.1}s",
                    bound.as_secs_f64()
                )),
            }
        };
        self.check_with(probe).await
    }

    /// The verdict without a probe when there is one, else `probe`'s (one probe at a time).
    async fn check_with(
        &self,
        probe: impl std::future::Future<Output = Result<(), String>>,
    ) -> Result<(), String> {
        if let Some(verdict) = self.quick_verdict() {
            return verdict;
        }
        let _probe = self.inner.probe.lock().await;
        // A probe that finished while this check waited for the lock answers it too.
        if let Some(verdict) = self.quick_verdict() {
            return verdict;
        }
        probe.await
    }

    async fn probe(&self, queue: &Queue, notify: &Notify) -> Result<(), String> {
        let bound = self.inner.config.stall_timeout;
        let Some(request) = self.inner.probe_request.clone() else {
            return Err("this model does not generate: its health is the shard's".into());
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        queue.append(Entry::probe(request, tx));
        notify.notify_one();
        let answer = tokio::time::timeout(bound, async {
            loop {
                match rx.recv().await {
                    Some(Ok(InferStreamResponse::End(_))) => return Ok(()),
                    Some(Ok(_)) => continue,
                    Some(Err(err)) => return Err(err),
                    None => return Err(InferError::IncompleteGeneration),
                }
            }
        })
        .await;
        match answer {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(format!("the health generation failed: {err}")),
            // Dropping the receiver cancels the probe (the batcher drops cancelled entries).
            Err(_) => Err(match self.quick_verdict() {
                Some(Err(reason)) => reason,
                _ => format!(
                    "no generation step completed within {:.1}s",
                    bound.as_secs_f64()
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::valid_request;

    fn health(stall_ms: u64, probe_ms: u64) -> Health {
        let config = HealthConfig {
            stall_timeout: Duration::from_millis(stall_ms),
            probe_interval: Duration::from_millis(probe_ms),
        };
        Health::new(config, valid_request(1, 1))
    }

    #[tokio::test]
    async fn a_stopped_loop_is_unhealthy() {
        let h = health(1000, 600_000);
        assert!(h.quick_verdict().unwrap().unwrap_err().contains("stopped"));
        let alive = h.loop_started();
        assert!(h.quick_verdict().is_none(), "no step yet: a probe decides");
        drop(alive);
        assert!(h.quick_verdict().unwrap().unwrap_err().contains("stopped"));
    }

    #[tokio::test]
    async fn a_recent_step_proves_health_and_a_long_one_disproves_it() {
        // A probe interval far longer than the test: "recent" cannot depend on its speed.
        let h = health(50, 600_000);
        let _alive = h.loop_started();
        h.step_started("prefill");
        h.step_finished(true);
        assert_eq!(h.quick_verdict(), Some(Ok(())));
        h.step_started("decode");
        tokio::time::sleep(Duration::from_millis(80)).await;
        let reason = h.quick_verdict().unwrap().unwrap_err();
        assert!(reason.contains("decode step has been running"), "{reason}");
        // A failed step is no proof.
        h.step_finished(false);
        let h2 = health(50, 600_000);
        let _alive2 = h2.loop_started();
        h2.step_started("decode");
        h2.step_finished(false);
        assert!(h2.quick_verdict().is_none());
    }

    #[tokio::test]
    async fn an_encoder_record_probes_the_shard_and_names_its_calls() {
        use crate::testing::FakeShard;
        let config = HealthConfig {
            stall_timeout: Duration::from_millis(50),
            probe_interval: Duration::from_secs(600),
        };
        let shard = FakeShard::encoder(100, true, false);
        let h = Health::without_generation(config);
        let _alive = h.loop_started();
        shard.set_healthy(false);
        let reason = h.check_shard(&shard).await.unwrap_err();
        assert!(
            reason.contains("the shard's health check failed"),
            "{reason}"
        );
        shard.set_healthy(true);
        assert_eq!(h.check_shard(&shard).await, Ok(()));
        // The successful probe proves health for the interval: no further call needed.
        shard.set_healthy(false);
        assert_eq!(h.check_shard(&shard).await, Ok(()));
        h.step_started("embed");
        tokio::time::sleep(Duration::from_millis(80)).await;
        let reason = h.check_shard(&shard).await.unwrap_err();
        assert!(
            reason.starts_with("an embed step has been running"),
            "{reason}"
        );
    }
}
