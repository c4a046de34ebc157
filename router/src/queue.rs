//! The waiting queue: requests for the base model and, per adapter, requests waiting for their
//! adapter (`registry`). `QueueState` is a plain struct (the policy, unit-tested); `Queue` is a
//! cloneable handle to the task that owns it. That task also runs the adapters' downloads,
//! loads and offloads in the background, so answering the batcher never waits on them.

use crate::adapter::{AdapterKey, AdapterRequest};
use crate::api::AdapterStatus;
use crate::client::{DownloadedAdapter, LoadedAdapter, ShardClient, ShardError};
use crate::entry::Entry;
use crate::errors::{AdapterCommandError, InferError};
use crate::exchange::ExchangeConfig;
use crate::metrics as m;
use crate::pb;
use crate::registry::{
    Action, ActionResult, AdapterRegistry, AdapterTemplate, Fetched, Outcome, TemplateWaiter,
    Waiter,
};
use crate::template::ChatTemplate;
use shared_prefix::SharedPrefixes;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::{Instant, MissedTickBehavior};

/// How often the queue task re-plans adapter slots when nothing else happens (cycle times
/// expire without an event).
const TICK: Duration = Duration::from_millis(100);

/// A new batch taken from the queue.
#[derive(Debug)]
pub struct NextBatch {
    /// The batch's entries by request id.
    pub entries: HashMap<u64, Entry>,
    /// What the shard's Prefill receives.
    pub batch: pb::Batch,
}

/// The queue's limits.
#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    /// KV-cache block size of the shard.
    pub block_size: u32,
    /// The shards compute at most the prefill budget of prompt tokens per step and prefill longer
    /// prompts in chunks over several steps: a prompt counts as at most the whole budget.
    pub chunked_prefill: bool,
    /// The shards compute the prompt blocks that requests of one Prefill share once (see
    /// `shared_prefix`): those count once against the prefill budget.
    pub prefix_caching: bool,
    /// Adapter slots and rotation.
    pub exchange: ExchangeConfig,
}

type Waiting = VecDeque<(u64, Entry)>;

/// The queue's state and policy.
#[derive(Debug)]
pub struct QueueState {
    base: Waiting,
    adapters: AdapterRegistry,
    next_request_id: u64,
    next_batch_id: u64,
    block_size: u32,
    chunked_prefill: bool,
    prefix_caching: bool,
}

impl QueueState {
    pub fn new(config: QueueConfig) -> Self {
        Self {
            base: VecDeque::new(),
            adapters: AdapterRegistry::new(config.exchange),
            next_request_id: 0,
            next_batch_id: 0,
            block_size: config.block_size,
            chunked_prefill: config.chunked_prefill,
            prefix_caching: config.prefix_caching,
        }
    }

    pub fn len(&self) -> usize {
        self.base.len() + self.adapters.queued()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn adapters(&mut self) -> &mut AdapterRegistry {
        &mut self.adapters
    }

    /// Appends an entry to its adapter's queue; returns its request id.
    pub fn append(&mut self, entry: Entry) -> u64 {
        let id = self.next_request_id;
        self.next_request_id += 1;
        match entry.request.adapter.clone() {
            Some(adapter) => self.adapters.enqueue(id, entry, &adapter, Instant::now()),
            None if entry.priority => self.base.push_front((id, entry)),
            None => self.base.push_back((id, entry)),
        }
        id
    }

    /// The running batch's requests per adapter index (see `AdapterRegistry::set_running`).
    pub fn set_running(&mut self, running: &HashMap<u32, usize>) {
        self.adapters.set_running(running, Instant::now());
    }

    /// Takes entries oldest first across the base model and the active adapters (requests of
    /// other adapters wait for theirs) while the new batch's prompt tokens stay within
    /// `prefill_token_budget` and its reserved tokens within `token_budget`; the first entry that
    /// does not fit ends the batch (no jumping ahead). Cancelled entries are dropped. A prompt
    /// counts as the tokens the shard computes: with chunked prefill at most the budget, with
    /// prefix caching its blocks shared with requests taken before it count once.
    /// Returns None when nothing fits, or when fewer than `min_size` entries fit.
    pub fn next_batch(
        &mut self,
        min_size: Option<usize>,
        prefill_token_budget: u32,
        token_budget: u32,
    ) -> Option<NextBatch> {
        let block_size = self.block_size;
        let chunked = self.chunked_prefill;
        // Under chunked prefill the shards bound each step's tokens themselves.
        let mut shared = (self.prefix_caching && !chunked).then(SharedPrefixes::default);
        let mut queues: Vec<(u32, &mut Waiting)> = vec![(0, &mut self.base)];
        queues.extend(self.adapters.admissible_queues());
        for (_, queue) in queues.iter_mut() {
            queue.retain(|(_, entry)| !entry.is_cancelled());
        }
        let waiting: usize = queues.iter().map(|(_, q)| q.len()).sum();
        if waiting < min_size.unwrap_or(1).max(1) {
            return None;
        }
        let mut prefill_tokens: u32 = 0;
        let mut reserved_tokens: u32 = 0;
        let mut taken: Vec<(usize, u64, Entry)> = Vec::new();
        while let Some(pos) = oldest_front(&queues) {
            let (index, queue) = &queues[pos];
            let (_, entry) = queue.front()?;
            let request = &entry.request;
            let cost = shared.as_ref().map(|shared| {
                let logprobs = request.decoder_input_details;
                shared.cost(*index, &request.input_ids, block_size, logprobs)
            });
            let prompt = match &cost {
                Some(cost) => cost.computed,
                None if chunked => request.input_length.min(prefill_token_budget),
                None => request.input_length,
            };
            let prefill = prefill_tokens + prompt;
            let reserved = reserved_tokens + entry.reserved_tokens(block_size);
            if prefill > prefill_token_budget || reserved > token_budget {
                break;
            }
            if let (Some(shared), Some(cost)) = (shared.as_mut(), cost) {
                shared.take(cost);
            }
            prefill_tokens = prefill;
            reserved_tokens = reserved;
            let (id, entry) = queues[pos].1.pop_front()?;
            taken.push((pos, id, entry));
        }
        if taken.is_empty() || taken.len() < min_size.unwrap_or(0) {
            for (pos, id, entry) in taken.into_iter().rev() {
                queues[pos].1.push_front((id, entry));
            }
            return None;
        }
        let indices: Vec<u32> = queues.iter().map(|(index, _)| *index).collect();
        let now = Instant::now();
        let mut requests = Vec::with_capacity(taken.len());
        let mut entries = HashMap::with_capacity(taken.len());
        let mut admitted: HashMap<u32, usize> = HashMap::new();
        for (pos, id, mut entry) in taken {
            entry.admitted(now);
            entry.adapter_index = indices[pos];
            *admitted.entry(entry.adapter_index).or_insert(0) += 1;
            requests.push(to_proto_request(id, &entry));
            entries.insert(id, entry);
        }
        for (index, n) in admitted {
            self.adapters.admitted(index, n, now);
        }
        let batch = pb::Batch {
            id: self.next_batch_id,
            size: requests.len() as u32,
            requests,
            max_tokens: reserved_tokens,
        };
        self.next_batch_id += 1;
        Some(NextBatch { entries, batch })
    }
}

/// The queue whose first entry goes next: a priority entry (a health probe), else the oldest
/// (request ids grow with arrival).
fn oldest_front(queues: &[(u32, &mut Waiting)]) -> Option<usize> {
    queues
        .iter()
        .enumerate()
        .filter_map(|(pos, (_, queue))| {
            queue
                .front()
                .map(|(id, entry)| ((!entry.priority, *id), pos))
        })
        .min()
        .map(|(_, pos)| pos)
}

fn to_proto_request(id: u64, entry: &Entry) -> pb::Request {
    let request = &entry.request;
    pb::Request {
        id,
        input_ids: request.input_ids.clone(),
        parameters: Some(request.parameters),
        stopping_parameters: Some(request.stopping_parameters.clone()),
        prefill_logprobs: request.decoder_input_details,
        top_n_tokens: request.top_n_tokens,
        adapter_index: entry.adapter_index,
        grammar: request.grammar.clone(),
    }
}

type Reply<T> = oneshot::Sender<T>;

enum Command {
    Append(Box<Entry>),
    NextBatch {
        min_size: Option<usize>,
        prefill_token_budget: u32,
        token_budget: u32,
        running: HashMap<u32, usize>,
        reply: Reply<Option<NextBatch>>,
    },
    ListAdapters(Reply<Vec<AdapterStatus>>),
    LoadAdapter(AdapterRequest, bool, Waiter),
    UnloadAdapter(Arc<AdapterKey>, Waiter),
    PinAdapter(Arc<AdapterKey>, bool, Waiter),
    ChatTemplate(AdapterRequest, TemplateWaiter),
}

/// Handle to the queue task.
#[derive(Clone, Debug)]
pub struct Queue {
    commands: mpsc::UnboundedSender<Command>,
    /// Requests waiting, as of the last command the task handled.
    waiting: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Self::Append(_) => "Append",
            Self::NextBatch { .. } => "NextBatch",
            Self::ListAdapters(_) => "ListAdapters",
            Self::LoadAdapter(..) => "LoadAdapter",
            Self::UnloadAdapter(..) => "UnloadAdapter",
            Self::PinAdapter(..) => "PinAdapter",
            Self::ChatTemplate(..) => "ChatTemplate",
        };
        f.write_str(name)
    }
}

/// The answer of a management command whose task went away.
fn gone() -> AdapterCommandError {
    AdapterCommandError::Failed(InferError::Generation("the queue stopped".into()))
}

impl Queue {
    /// Spawns the task that owns the queue state. `notify` wakes the batcher when an adapter
    /// becomes active.
    pub fn spawn(client: Arc<dyn ShardClient>, config: QueueConfig, notify: Arc<Notify>) -> Self {
        let (commands, receiver) = mpsc::unbounded_channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        tokio::spawn(queue_task(
            QueueState::new(config),
            receiver,
            waiting.clone(),
            client,
            notify,
        ));
        Self { commands, waiting }
    }

    /// Requests waiting for a batch (their adapter's included), as of the last command the
    /// task handled: after `next_batch` returns, what it left in the queue.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Queues an entry (never blocks).
    pub fn append(&self, entry: Entry) {
        // The queue task lives as long as any handle; a send error means shutdown.
        let _ = self.commands.send(Command::Append(Box::new(entry)));
    }

    /// See `QueueState::next_batch`; `running` counts the running batch's requests per
    /// adapter index (adapters are offloaded only when none of their requests run).
    pub async fn next_batch(
        &self,
        min_size: Option<usize>,
        prefill_token_budget: u32,
        token_budget: u32,
        running: HashMap<u32, usize>,
    ) -> Option<NextBatch> {
        let (reply, answer) = oneshot::channel();
        let command = Command::NextBatch {
            min_size,
            prefill_token_budget,
            token_budget,
            running,
            reply,
        };
        self.commands.send(command).ok()?;
        answer.await.ok().flatten()
    }

    /// Every tracked adapter (and recent failures).
    pub async fn adapters(&self) -> Vec<AdapterStatus> {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::ListAdapters(reply)).is_err() {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }

    async fn ask(
        &self,
        command: impl FnOnce(Waiter) -> Command,
    ) -> Result<AdapterStatus, AdapterCommandError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(command(reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Downloads and activates an adapter (pinned when `pin`); answers once it is active.
    pub async fn load_adapter(
        &self,
        request: AdapterRequest,
        pin: bool,
    ) -> Result<AdapterStatus, AdapterCommandError> {
        self.ask(|reply| Command::LoadAdapter(request, pin, reply))
            .await
    }

    /// Offloads an idle adapter; answers once it is off the device.
    pub async fn unload_adapter(
        &self,
        key: Arc<AdapterKey>,
    ) -> Result<AdapterStatus, AdapterCommandError> {
        self.ask(|reply| Command::UnloadAdapter(key, reply)).await
    }

    /// Pins (never offloaded) or unpins a tracked adapter.
    pub async fn pin_adapter(
        &self,
        key: Arc<AdapterKey>,
        pinned: bool,
    ) -> Result<AdapterStatus, AdapterCommandError> {
        self.ask(|reply| Command::PinAdapter(key, pinned, reply))
            .await
    }

    /// The adapter's own chat template, once it is downloaded (it is downloaded now when it is
    /// not tracked yet); an error when it cannot be downloaded.
    pub async fn adapter_chat_template(
        &self,
        request: AdapterRequest,
    ) -> Result<AdapterTemplate, InferError> {
        let stopped = || InferError::Generation("the queue stopped".into());
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::ChatTemplate(request, reply))
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn queue_task(
    mut state: QueueState,
    mut commands: mpsc::UnboundedReceiver<Command>,
    waiting: Arc<AtomicUsize>,
    client: Arc<dyn ShardClient>,
    notify: Arc<Notify>,
) {
    let (results_tx, mut results) = mpsc::unbounded_channel();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut labels = HashSet::new();
    let mut published = None;
    loop {
        let ticked = tokio::select! {
            command = commands.recv() => match command {
                Some(command) => {
                    handle(&mut state, command, &waiting);
                    false
                }
                None => break,
            },
            Some(result) = results.recv() => {
                state.adapters.complete(result, Instant::now());
                false
            }
            _ = tick.tick() => true,
        };
        for action in state.adapters.schedule(Instant::now()) {
            tokio::spawn(run_action(client.clone(), results_tx.clone(), action));
        }
        if state.adapters.take_woke() {
            notify.notify_one();
        }
        let counts = (state.len(), state.adapters.active_count());
        waiting.store(counts.0, Ordering::Release);
        // The gauges when the counts moved, and every tick: the per-adapter ones cost a label
        // lookup per adapter, too much for every request and step with hundreds of adapters.
        if ticked || published != Some(counts) {
            metrics::gauge!("lorax_queue_size").set(counts.0 as f64);
            metrics::gauge!("lorax_adapters_active").set(counts.1 as f64);
            m::adapter_queue_sizes(&state.adapters.queue_sizes(), &mut labels);
            published = Some(counts);
        }
    }
}

fn handle(state: &mut QueueState, command: Command, waiting: &AtomicUsize) {
    let now = Instant::now();
    match command {
        Command::Append(entry) => {
            state.append(*entry);
        }
        Command::NextBatch {
            min_size,
            prefill_token_budget,
            token_budget,
            running,
            reply,
        } => {
            state.set_running(&running);
            let next = state.next_batch(min_size, prefill_token_budget, token_budget);
            // Before the reply: the batcher reads what this batch left waiting as soon as it has it.
            waiting.store(state.len(), Ordering::Release);
            // When the batcher went away (shutdown) its entries are dropped: their clients
            // see the stream end.
            let _ = reply.send(next);
        }
        Command::ListAdapters(reply) => {
            let _ = reply.send(state.adapters.list(now));
        }
        Command::LoadAdapter(request, pin, waiter) => {
            state.adapters.load(&request, pin, waiter, now);
        }
        Command::UnloadAdapter(key, waiter) => state.adapters.unload(&key, waiter, now),
        Command::PinAdapter(key, pinned, waiter) => {
            let _ = waiter.send(state.adapters.set_pinned(&key, pinned, now));
        }
        Command::ChatTemplate(request, waiter) => {
            state.adapters.chat_template(&request, waiter, now);
        }
    }
}

/// Runs one shard call for an adapter and reports how it ended.
async fn run_action(
    client: Arc<dyn ShardClient>,
    results: mpsc::UnboundedSender<ActionResult>,
    action: Action,
) {
    let (request, index, outcome) = match action {
        Action::Download(request, index) => {
            let key = &request.key;
            let result = client
                .download_adapter(key.to_proto(), key.source.to_proto(), request.token())
                .await
                .map(fetched);
            (request, index, Outcome::Downloaded(result))
        }
        Action::Load(request, index) => {
            let result = load(client.as_ref(), &request, index, false).await;
            (request, index, Outcome::Loaded(result.map(|_| ())))
        }
        Action::FetchAndLoad(request, index) => {
            let result = load(client.as_ref(), &request, index, true).await;
            let outcome = result.map(|l| (l.loaded, fetched(l.downloaded)));
            (request, index, Outcome::FetchedAndLoaded(outcome))
        }
        Action::Offload(request, index) => {
            let key = &request.key;
            let result = client
                .offload_adapter(key.to_proto(), key.source.to_proto(), index)
                .await;
            (request, index, Outcome::Offloaded(result))
        }
    };
    let _ = results.send(ActionResult {
        index,
        key: request.key,
        outcome,
    });
}

async fn load(
    client: &dyn ShardClient,
    request: &AdapterRequest,
    index: u32,
    if_fits: bool,
) -> Result<LoadedAdapter, ShardError> {
    let key = &request.key;
    let (parameters, source) = (key.to_proto(), key.source.to_proto());
    client
        .load_adapter(parameters, source, index, request.token(), if_fits)
        .await
}

/// What a download (or a fetch-and-load) reports, its chat template compiled here, off the queue
/// task.
fn fetched(d: DownloadedAdapter) -> Fetched {
    (d.memory_fraction, compile_template(d.chat_template))
}

/// An adapter's own chat template, compiled here, off the queue task.
fn compile_template(shipped: Option<pb::AdapterChatTemplate>) -> AdapterTemplate {
    let Some(t) = shipped else { return Ok(None) };
    ChatTemplate::new(t.template, t.bos_token, t.eos_token).map(|t| Some(Arc::new(t)))
}

mod shared_prefix;
#[cfg(test)]
mod tests;
