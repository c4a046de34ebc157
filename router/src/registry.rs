//! The adapters the router tracks, each with its own queue of waiting requests and its state:
//! Queued → Downloading → Downloaded → Loading → Active → (Offloading → Downloaded). A plain
//! struct owned by the queue task: it never waits on the shard; it emits `Action`s (download,
//! load, offload) that the queue task runs in the background and reports back with `complete`.
//!
//! Downloads start as soon as a request names the adapter (prefetch, not limited by slots);
//! slots are given by the pure policy in `exchange`. A new adapter in a local directory that
//! finds a slot free (and nobody waiting for one) skips the separate download: one `FetchAndLoad`
//! call to the shard reads and installs it, which saves its first request a shard round trip and
//! the decode step it waits behind. If it turns out not to fit the memory budget, it waits as a
//! downloaded adapter would. An adapter that fails to download or load
//! fails its own queued requests and is forgotten, so a later request retries it. A download
//! brings the adapter's own chat template, if it ships one; chat requests wait for it before
//! their prompt is rendered.

use crate::adapter::{AdapterKey, AdapterRequest, AdapterSource};
use crate::api::{AdapterState, AdapterStatus};
use crate::client::ShardError;
use crate::entry::Entry;
use crate::errors::{adapter_error, AdapterCommandError, InferError};
use crate::exchange::{self, ExchangeConfig, Phase, SlotView};
use crate::metrics as m;
use crate::template::ChatTemplate;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Downloaded adapters kept tracked while unused; beyond this the least recently used are
/// forgotten (the shard keeps its own host cache).
const MAX_IDLE_TRACKED: usize = 256;
/// Failed adapters remembered for `GET /adapters`.
const MAX_FAILURES_SHOWN: usize = 16;

pub type Waiter = oneshot::Sender<Result<AdapterStatus, AdapterCommandError>>;

/// An adapter's own chat template: None when it ships none, Err (why) when it does not compile.
pub type AdapterTemplate = Result<Option<Arc<ChatTemplate>>, String>;
/// Hears an adapter's chat template once it is downloaded, or why it could not be.
pub type TemplateWaiter = oneshot::Sender<Result<AdapterTemplate, InferError>>;

/// Shard work the queue task runs in the background.
#[derive(Debug)]
pub enum Action {
    Download(AdapterRequest, u32),
    Load(AdapterRequest, u32),
    /// Load an adapter not downloaded yet, if it fits (`LoadAdapter` with `if_fits`).
    FetchAndLoad(AdapterRequest, u32),
    Offload(AdapterRequest, u32),
}

/// What a shard reports about a fetched adapter: its share of the adapter memory budget, and its
/// chat template.
pub type Fetched = (f32, AdapterTemplate);

/// How an action ended.
#[derive(Debug)]
pub enum Outcome {
    Downloaded(Result<Fetched, ShardError>),
    Loaded(Result<(), ShardError>),
    /// Whether it was installed (false: it does not fit the budget now), and what was fetched.
    FetchedAndLoaded(Result<(bool, Fetched), ShardError>),
    Offloaded(Result<bool, ShardError>),
}

#[derive(Debug)]
pub struct ActionResult {
    pub index: u32,
    pub key: Arc<AdapterKey>,
    pub outcome: Outcome,
}

#[derive(Debug)]
struct Tracked {
    request: AdapterRequest,
    index: u32,
    state: AdapterState,
    pinned: bool,
    draining: bool,
    queue: VecDeque<(u64, Entry)>,
    running: usize,
    memory_fraction: Option<f32>,
    last_error: Option<String>,
    /// Since when it wants a slot it does not hold.
    waiting_since: Option<Instant>,
    active_since: Option<Instant>,
    last_used: Instant,
    /// Some request was admitted since it became active.
    served: bool,
    download_started: Option<Instant>,
    /// Seconds the download took, until the first activation records the load time.
    download_secs: Option<f64>,
    load_started: Option<Instant>,
    /// Metrics label, once downloaded.
    label: Option<String>,
    load_waiters: Vec<Waiter>,
    unload_waiters: Vec<Waiter>,
    /// Known once downloaded.
    chat_template: AdapterTemplate,
    template_waiters: Vec<TemplateWaiter>,
}

impl Tracked {
    /// A request's error for this adapter refused by the shard while doing `what`.
    fn error(&self, what: &str, err: &ShardError) -> InferError {
        let key = &self.request.key;
        adapter_error(&key.describe(), key.source.as_str(), what, err)
    }

    fn wants_slot(&self) -> bool {
        !self.queue.is_empty() || self.pinned || !self.load_waiters.is_empty()
    }

    /// The shard has reported its memory fraction and chat template.
    fn fetched(&self) -> bool {
        self.memory_fraction.is_some()
    }

    fn phase(&self) -> Phase {
        match self.state {
            AdapterState::Downloaded => match self.waiting_since {
                Some(since) if self.wants_slot() => Phase::Waiting { since },
                _ => Phase::Idle,
            },
            AdapterState::Loading => Phase::Loading,
            AdapterState::Active => Phase::Active {
                since: self.active_since.unwrap_or(self.last_used),
                draining: self.draining,
            },
            AdapterState::Offloading => Phase::Offloading,
            _ => Phase::Idle,
        }
    }

    /// Records what the shard fetched (the first time: its chat template goes to the requests
    /// waiting for it); false when it can never fit the adapter memory budget.
    fn fetched_now(&mut self, (fraction, chat_template): Fetched, now: Instant) -> bool {
        if !fits_budget(fraction) {
            self.memory_fraction = Some(fraction);
            return false;
        }
        if !self.fetched() {
            self.download_secs = self.download_started.map(|s| (now - s).as_secs_f64());
            self.label = Some(m::register_adapter_label(&self.request.key.describe()));
            for waiter in self.template_waiters.drain(..) {
                let _ = waiter.send(Ok(chat_template.clone()));
            }
            self.chat_template = chat_template;
        }
        self.memory_fraction = Some(fraction);
        true
    }

    /// The shard installed it: requests may be admitted (the batcher should look again). Its load
    /// time counts from the download's start, or from the fetch-and-load's.
    fn activate(&mut self, now: Instant) {
        self.state = AdapterState::Active;
        self.active_since = Some(now);
        self.last_used = now;
        self.served = false;
        self.draining = false;
        let load = self.load_started.map_or(0.0, |s| (now - s).as_secs_f64());
        let total = load + self.download_secs.take().unwrap_or(0.0);
        m::adapter_loaded(self.label.as_deref().unwrap_or(m::UNKNOWN_ADAPTER), total);
        let status = self.status(now);
        for waiter in self.load_waiters.drain(..) {
            let _ = waiter.send(Ok(status.clone()));
        }
    }

    fn status(&self, now: Instant) -> AdapterStatus {
        let key = &self.request.key;
        AdapterStatus {
            adapter_id: key.describe(),
            adapter_ids: key.ids.clone(),
            merged_adapters: key.merged_adapters(),
            adapter_source: key.source,
            private: key.is_private(),
            state: self.state,
            index: Some(self.index),
            pinned: self.pinned,
            draining: self.draining,
            queued: self.queue.len(),
            running: self.running,
            memory_fraction: self.memory_fraction,
            active_for_s: (self.state == AdapterState::Active)
                .then(|| self.active_since.map(|s| (now - s).as_secs_f64()))
                .flatten(),
            last_error: self.last_error.clone(),
        }
    }
}

/// Whether an adapter taking `fraction` of the adapter memory budget can ever be loaded.
fn fits_budget(fraction: f32) -> bool {
    fraction.is_finite() && fraction <= 1.0 + exchange::MEMORY_SLACK
}

/// The tracked adapters, keyed by their index (1..; freed indices are reused).
#[derive(Debug)]
pub struct AdapterRegistry {
    adapters: BTreeMap<u32, Tracked>,
    by_key: HashMap<Arc<AdapterKey>, u32>,
    failures: VecDeque<(Arc<AdapterKey>, String)>,
    config: ExchangeConfig,
    /// Actions asked for by management commands, returned by the next `schedule`.
    pending: Vec<Action>,
    /// An adapter became active since the last `take_woke`.
    woke: bool,
}

impl AdapterRegistry {
    pub fn new(config: ExchangeConfig) -> Self {
        Self {
            adapters: BTreeMap::new(),
            by_key: HashMap::new(),
            failures: VecDeque::new(),
            config,
            pending: Vec::new(),
            woke: false,
        }
    }

    /// The adapter's index, tracking it (state Queued) when new.
    pub fn track(&mut self, request: &AdapterRequest, now: Instant) -> u32 {
        if let Some(&index) = self.by_key.get(&request.key) {
            return index;
        }
        let index = (1..).find(|i| !self.adapters.contains_key(i)).unwrap_or(1);
        let last_error = self
            .failures
            .iter()
            .find(|(k, _)| *k == request.key)
            .map(|(_, e)| e.clone());
        self.failures.retain(|(k, _)| *k != request.key);
        self.by_key.insert(request.key.clone(), index);
        self.adapters.insert(
            index,
            Tracked {
                request: request.clone(),
                index,
                state: AdapterState::Queued,
                pinned: false,
                draining: false,
                queue: VecDeque::new(),
                running: 0,
                memory_fraction: None,
                last_error,
                waiting_since: None,
                active_since: None,
                last_used: now,
                served: false,
                download_started: None,
                download_secs: None,
                load_started: None,
                label: None,
                load_waiters: Vec::new(),
                unload_waiters: Vec::new(),
                chat_template: Ok(None),
                template_waiters: Vec::new(),
            },
        );
        index
    }

    /// Queues a request for its adapter.
    pub fn enqueue(&mut self, id: u64, entry: Entry, request: &AdapterRequest, now: Instant) {
        let index = self.track(request, now);
        if let Some(a) = self.adapters.get_mut(&index) {
            a.queue.push_back((id, entry));
        }
    }

    /// Requests waiting for any adapter.
    pub fn queued(&self) -> usize {
        self.adapters.values().map(|a| a.queue.len()).sum()
    }

    /// The queues requests may be admitted from: active adapters that are not draining.
    pub fn admissible_queues(&mut self) -> Vec<(u32, &mut VecDeque<(u64, Entry)>)> {
        self.adapters
            .values_mut()
            .filter(|a| a.state == AdapterState::Active && !a.draining)
            .map(|a| (a.index, &mut a.queue))
            .collect()
    }

    /// `n` requests of adapter `index` were put in a batch.
    pub fn admitted(&mut self, index: u32, n: usize, now: Instant) {
        if let Some(a) = self.adapters.get_mut(&index) {
            a.running += n;
            a.last_used = now;
            a.served = true;
        }
    }

    /// The running batch's requests per adapter index, as the batcher holds them.
    pub fn set_running(&mut self, running: &HashMap<u32, usize>, now: Instant) {
        for a in self.adapters.values_mut() {
            a.running = running.get(&a.index).copied().unwrap_or(0);
            if a.running > 0 {
                a.last_used = now;
            }
        }
    }

    /// Whether an adapter became active since the last call (the batcher should look again).
    pub fn take_woke(&mut self) -> bool {
        std::mem::take(&mut self.woke)
    }

    /// Starts downloads (or fetch-and-loads into free slots), gives and takes slots (see
    /// `exchange`), forgets surplus idle adapters.
    pub fn schedule(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = std::mem::take(&mut self.pending);
        let mut free_slots = self.free_slots();
        for a in self.adapters.values_mut() {
            a.queue.retain(|(_, e)| !e.is_cancelled());
            a.load_waiters.retain(|w| !w.is_closed());
            a.template_waiters.retain(|w| !w.is_closed());
            if a.state == AdapterState::Queued {
                // A chat request waits for the template before it is queued: it wants a slot too.
                // Only local files: a slow remote fetch would hold the slot while it downloads.
                let wanted = a.wants_slot() || !a.template_waiters.is_empty();
                let local = a.request.key.source == AdapterSource::Local;
                if free_slots > 0 && wanted && local {
                    free_slots -= 1;
                    a.state = AdapterState::Loading;
                    a.load_started = Some(now);
                    actions.push(Action::FetchAndLoad(a.request.clone(), a.index));
                } else {
                    a.state = AdapterState::Downloading;
                    a.download_started = Some(now);
                    actions.push(Action::Download(a.request.clone(), a.index));
                }
            }
            let holds = matches!(
                a.state,
                AdapterState::Loading | AdapterState::Active | AdapterState::Offloading
            );
            if !a.wants_slot() || holds {
                a.waiting_since = None;
            } else if a.waiting_since.is_none() {
                a.waiting_since = Some(now);
            }
        }
        let plan = exchange::plan(&self.views(), &self.config, now);
        for index in plan.drain {
            self.adapters.entry(index).and_modify(|a| a.draining = true);
        }
        for index in plan.undrain {
            self.adapters
                .entry(index)
                .and_modify(|a| a.draining = false);
            // Its queued requests may be admitted again: an idle batcher must look.
            self.woke = true;
        }
        for index in plan.offload {
            if let Some(a) = self.adapters.get_mut(&index) {
                a.state = AdapterState::Offloading;
                actions.push(Action::Offload(a.request.clone(), index));
            }
        }
        // The plan counts a fetch-and-load of unknown size as taking no memory: loads wait until it
        // reports, so that the shard does not refuse one for lack of memory the plan did not see.
        let unknown_size_loading = self
            .adapters
            .values()
            .any(|a| a.state == AdapterState::Loading && !a.fetched());
        let loads = if unknown_size_loading {
            Vec::new()
        } else {
            plan.load
        };
        for index in loads {
            if let Some(a) = self.adapters.get_mut(&index) {
                a.state = AdapterState::Loading;
                a.waiting_since = None;
                a.load_started = Some(now);
                actions.push(Action::Load(a.request.clone(), index));
            }
        }
        self.forget_surplus_idle();
        actions
    }

    /// Slots a new adapter may take at once, before its size is known: none while a downloaded
    /// adapter waits for one (it goes first) or the memory budget is spent.
    fn free_slots(&self) -> usize {
        let waiting = self
            .adapters
            .values()
            .any(|a| a.state == AdapterState::Downloaded && a.wants_slot());
        let holding = || {
            self.adapters.values().filter(|a| {
                matches!(
                    a.state,
                    AdapterState::Loading | AdapterState::Active | AdapterState::Offloading
                )
            })
        };
        let memory: f32 = holding().filter_map(|a| a.memory_fraction).sum();
        if waiting || memory >= 1.0 {
            return 0;
        }
        self.config
            .max_active_adapters
            .saturating_sub(holding().count())
    }

    /// The tracked adapters as the exchange policy sees them.
    fn views(&self) -> Vec<SlotView> {
        self.adapters
            .values()
            .map(|a| SlotView {
                index: a.index,
                phase: a.phase(),
                pinned: a.pinned,
                queued: a.queue.len(),
                running: a.running,
                last_used: a.last_used,
                served: a.served,
                memory_fraction: a.memory_fraction.unwrap_or(0.0),
            })
            .collect()
    }

    fn forget_surplus_idle(&mut self) {
        let mut idle: Vec<(Instant, u32)> = self
            .adapters
            .values()
            .filter(|a| a.state == AdapterState::Downloaded && !a.wants_slot())
            .map(|a| (a.last_used, a.index))
            .collect();
        if idle.len() <= MAX_IDLE_TRACKED {
            return;
        }
        idle.sort();
        for (_, index) in &idle[..idle.len() - MAX_IDLE_TRACKED] {
            self.forget(*index);
        }
    }

    fn forget(&mut self, index: u32) -> Option<Tracked> {
        let a = self.adapters.remove(&index)?;
        self.by_key.remove(&a.request.key);
        Some(a)
    }

    /// Applies the result of a background action.
    pub fn complete(&mut self, result: ActionResult, now: Instant) {
        let Some(a) = self.adapters.get_mut(&result.index) else {
            return;
        };
        if a.request.key != result.key {
            return;
        }
        match result.outcome {
            Outcome::Downloaded(Ok(fetched)) => {
                if a.fetched_now(fetched, now) {
                    a.state = AdapterState::Downloaded;
                } else {
                    self.fail_too_large(result.index);
                }
            }
            Outcome::FetchedAndLoaded(Ok((loaded, fetched))) => {
                if !a.fetched_now(fetched, now) {
                    self.fail_too_large(result.index);
                } else if loaded {
                    a.activate(now);
                    self.woke = true;
                } else {
                    // Fetched, but the budget is taken: it waits for a slot like any download.
                    a.state = AdapterState::Downloaded;
                }
            }
            Outcome::Loaded(Ok(())) => {
                a.activate(now);
                self.woke = true;
            }
            Outcome::Offloaded(Ok(_)) => {
                a.state = AdapterState::Downloaded;
                a.draining = false;
                a.active_since = None;
                let status = a.status(now);
                for waiter in a.unload_waiters.drain(..) {
                    let _ = waiter.send(Ok(status.clone()));
                }
            }
            Outcome::Offloaded(Err(err)) => {
                // Still on the device: back to active (still draining if it was); retried
                // when the policy asks again.
                tracing::warn!("offloading adapter {} failed: {err}", a.index);
                a.state = AdapterState::Active;
                a.last_error = Some(err.message());
                let error = match err.code() {
                    tonic::Code::FailedPrecondition => AdapterCommandError::Conflict(err.message()),
                    _ => AdapterCommandError::Failed(a.error("offload", &err)),
                };
                for waiter in a.unload_waiters.drain(..) {
                    let _ = waiter.send(Err(error.clone()));
                }
            }
            // A fetch-and-load fails where a download would (the fetch, or the adapter's files).
            Outcome::Downloaded(Err(err)) | Outcome::FetchedAndLoaded(Err(err)) => {
                self.fail(result.index, "download", &err)
            }
            Outcome::Loaded(Err(err)) => self.fail(result.index, "load", &err),
        }
    }

    /// Larger than the whole adapter memory budget: no exchange can ever make room for it, so it
    /// fails now rather than evicting every other adapter first (or waiting forever behind a
    /// pinned one).
    fn fail_too_large(&mut self, index: u32) {
        let fraction = self.adapters.get(&index).and_then(|a| a.memory_fraction);
        let err = ShardError::status(
            tonic::Code::ResourceExhausted,
            format!(
                "it needs {} times the whole adapter memory budget (raise \
                 --adapter-memory-fraction)",
                fraction.unwrap_or(f32::INFINITY)
            ),
        );
        self.fail(index, "load", &err);
    }

    /// Fails every request and waiter of the adapter with the shard's reason, and forgets it.
    fn fail(&mut self, index: u32, what: &str, err: &ShardError) {
        let Some(a) = self.forget(index) else { return };
        let error = a.error(what, err);
        tracing::warn!("{error}");
        m::adapter_failed(err.code());
        for (_, entry) in a.queue {
            let _ = entry.response_tx.send(Err(error.clone()));
        }
        for waiter in a.load_waiters.into_iter().chain(a.unload_waiters) {
            let _ = waiter.send(Err(AdapterCommandError::Failed(error.clone())));
        }
        for waiter in a.template_waiters {
            let _ = waiter.send(Err(error.clone()));
        }
        self.failures.push_front((a.request.key, error.to_string()));
        self.failures.truncate(MAX_FAILURES_SHOWN);
    }

    /// Every tracked adapter, by index, then the recent failures.
    pub fn list(&self, now: Instant) -> Vec<AdapterStatus> {
        let mut list: Vec<AdapterStatus> = self.adapters.values().map(|a| a.status(now)).collect();
        for (key, error) in &self.failures {
            list.push(AdapterStatus {
                adapter_id: key.describe(),
                adapter_ids: key.ids.clone(),
                merged_adapters: key.merged_adapters(),
                adapter_source: key.source,
                private: key.is_private(),
                state: AdapterState::Failed,
                index: None,
                pinned: false,
                draining: false,
                queued: 0,
                running: 0,
                memory_fraction: None,
                active_for_s: None,
                last_error: Some(error.clone()),
            });
        }
        list
    }

    /// Requests queued per metrics label (adapters not downloaded yet count as unknown).
    pub fn queue_sizes(&self) -> HashMap<String, usize> {
        let mut sizes = HashMap::new();
        for a in self.adapters.values() {
            let label = a.label.as_deref().unwrap_or(m::UNKNOWN_ADAPTER);
            *sizes.entry(label.to_string()).or_insert(0) += a.queue.len();
        }
        sizes
    }

    /// Adapters holding a slot (loading or active).
    pub fn active_count(&self) -> usize {
        self.adapters
            .values()
            .filter(|a| matches!(a.state, AdapterState::Active | AdapterState::Loading))
            .count()
    }
}

mod commands;
