//! The waiting queue: FIFO entries with their token budget. `QueueState` is a plain struct (the
//! policy, unit-tested); `Queue` is a cloneable handle to the task that owns it.

use crate::errors::InferError;
use crate::infer::InferStreamResponse;
use crate::pb;
use crate::validation::ValidGenerateRequest;
use std::collections::{HashMap, VecDeque};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Where a request's generations go; closed when the client went away.
pub type ResponseSender = mpsc::UnboundedSender<Result<InferStreamResponse, InferError>>;

/// A request waiting for, or running in, a batch.
#[derive(Debug)]
pub struct Entry {
    pub request: ValidGenerateRequest,
    pub response_tx: ResponseSender,
    /// When it entered the queue.
    pub queue_time: Instant,
    /// When it was put in a batch.
    pub batch_time: Option<Instant>,
}

impl Entry {
    pub fn new(request: ValidGenerateRequest, response_tx: ResponseSender) -> Self {
        Self {
            request,
            response_tx,
            queue_time: Instant::now(),
            batch_time: None,
        }
    }

    /// KV-cache tokens this request may use: prompt + max_new_tokens, rounded up to whole blocks.
    pub fn reserved_tokens(&self, block_size: u32) -> u32 {
        let total = self.request.input_length + self.request.stopping_parameters.max_new_tokens;
        round_up(total, block_size)
    }

    /// Whether the client stopped listening.
    pub fn is_cancelled(&self) -> bool {
        self.response_tx.is_closed()
    }
}

/// `tokens` rounded up to a multiple of `block_size` (a block size of 0 counts as 1).
pub fn round_up(tokens: u32, block_size: u32) -> u32 {
    let block = block_size.max(1);
    tokens.div_ceil(block) * block
}

/// A new batch taken from the queue.
#[derive(Debug)]
pub struct NextBatch {
    /// The batch's entries by request id.
    pub entries: HashMap<u64, Entry>,
    /// What the shard's Prefill receives.
    pub batch: pb::Batch,
}

/// The queue's state and policy.
#[derive(Debug)]
pub struct QueueState {
    entries: VecDeque<(u64, Entry)>,
    next_request_id: u64,
    next_batch_id: u64,
    block_size: u32,
}

impl QueueState {
    pub fn new(block_size: u32) -> Self {
        Self {
            entries: VecDeque::new(),
            next_request_id: 0,
            next_batch_id: 0,
            block_size,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends an entry; returns its request id.
    pub fn append(&mut self, entry: Entry) -> u64 {
        let id = self.next_request_id;
        self.next_request_id += 1;
        self.entries.push_back((id, entry));
        id
    }

    /// Takes entries in FIFO order while the new batch's prompt tokens stay within
    /// `prefill_token_budget` and its reserved tokens within `token_budget`. Cancelled entries are
    /// dropped. Returns None when nothing fits, or when fewer than `min_size` entries fit.
    pub fn next_batch(
        &mut self,
        min_size: Option<usize>,
        prefill_token_budget: u32,
        token_budget: u32,
    ) -> Option<NextBatch> {
        self.entries.retain(|(_, entry)| !entry.is_cancelled());
        if self.entries.len() < min_size.unwrap_or(1).max(1) {
            return None;
        }
        let mut prefill_tokens: u32 = 0;
        let mut reserved_tokens: u32 = 0;
        let mut taken: Vec<(u64, Entry)> = Vec::new();
        while let Some((id, entry)) = self.entries.pop_front() {
            let prefill = prefill_tokens + entry.request.input_length;
            let reserved = reserved_tokens + entry.reserved_tokens(self.block_size);
            if prefill > prefill_token_budget || reserved > token_budget {
                self.entries.push_front((id, entry));
                break;
            }
            prefill_tokens = prefill;
            reserved_tokens = reserved;
            taken.push((id, entry));
        }
        if taken.is_empty() || taken.len() < min_size.unwrap_or(0) {
            for item in taken.into_iter().rev() {
                self.entries.push_front(item);
            }
            return None;
        }
        let now = Instant::now();
        let mut requests = Vec::with_capacity(taken.len());
        let mut entries = HashMap::with_capacity(taken.len());
        for (id, mut entry) in taken {
            entry.batch_time = Some(now);
            requests.push(to_proto_request(id, &entry.request));
            entries.insert(id, entry);
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

fn to_proto_request(id: u64, request: &ValidGenerateRequest) -> pb::Request {
    pb::Request {
        id,
        input_ids: request.input_ids.clone(),
        parameters: Some(request.parameters),
        stopping_parameters: Some(request.stopping_parameters.clone()),
        prefill_logprobs: request.decoder_input_details,
        top_n_tokens: request.top_n_tokens,
        adapter_index: request.adapter_index,
    }
}

enum Command {
    Append(Box<Entry>),
    NextBatch {
        min_size: Option<usize>,
        prefill_token_budget: u32,
        token_budget: u32,
        reply: oneshot::Sender<Option<NextBatch>>,
    },
}

/// Handle to the queue task.
#[derive(Clone, Debug)]
pub struct Queue {
    commands: mpsc::UnboundedSender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Append(_) => write!(f, "Append"),
            Self::NextBatch { .. } => write!(f, "NextBatch"),
        }
    }
}

impl Queue {
    /// Spawns the task that owns the queue state.
    pub fn spawn(block_size: u32) -> Self {
        let (commands, receiver) = mpsc::unbounded_channel();
        tokio::spawn(queue_task(QueueState::new(block_size), receiver));
        Self { commands }
    }

    /// Queues an entry (never blocks).
    pub fn append(&self, entry: Entry) {
        // The queue task lives as long as any handle; a send error means shutdown.
        let _ = self.commands.send(Command::Append(Box::new(entry)));
    }

    /// See `QueueState::next_batch`.
    pub async fn next_batch(
        &self,
        min_size: Option<usize>,
        prefill_token_budget: u32,
        token_budget: u32,
    ) -> Option<NextBatch> {
        let (reply, answer) = oneshot::channel();
        let command = Command::NextBatch {
            min_size,
            prefill_token_budget,
            token_budget,
            reply,
        };
        self.commands.send(command).ok()?;
        answer.await.ok().flatten()
    }
}

async fn queue_task(mut state: QueueState, mut commands: mpsc::UnboundedReceiver<Command>) {
    while let Some(command) = commands.recv().await {
        match command {
            Command::Append(entry) => {
                state.append(*entry);
            }
            Command::NextBatch {
                min_size,
                prefill_token_budget,
                token_budget,
                reply,
            } => {
                let next = state.next_batch(min_size, prefill_token_budget, token_budget);
                if let Err(Some(next)) = reply.send(next) {
                    // The batcher went away: put the entries back rather than lose them.
                    for (id, entry) in next.entries {
                        state.entries.push_front((id, entry));
                    }
                }
            }
        }
        metrics::gauge!("lorax_queue_size").set(state.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::valid_request;

    fn entry(
        input_length: u32,
        max_new_tokens: u32,
    ) -> (
        Entry,
        mpsc::UnboundedReceiver<Result<InferStreamResponse, InferError>>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Entry::new(valid_request(input_length, max_new_tokens), tx),
            rx,
        )
    }

    #[test]
    fn rounding_to_blocks() {
        assert_eq!(round_up(0, 16), 0);
        assert_eq!(round_up(1, 16), 16);
        assert_eq!(round_up(16, 16), 16);
        assert_eq!(round_up(17, 16), 32);
        assert_eq!(round_up(17, 0), 17);
    }

    #[tokio::test]
    async fn fifo_order_and_ids() {
        let mut state = QueueState::new(1);
        let mut receivers = Vec::new();
        for i in 0..3 {
            let (e, rx) = entry(2 + i, 3);
            receivers.push(rx);
            assert_eq!(state.append(e), i as u64);
        }
        let next = state.next_batch(None, 100, 100).unwrap();
        let ids: Vec<u64> = next.batch.requests.iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![0, 1, 2]);
        assert_eq!(next.batch.size, 3);
        assert_eq!(next.batch.max_tokens, (2 + 3) + (3 + 3) + (4 + 3));
        assert!(next.entries.values().all(|e| e.batch_time.is_some()));
        assert!(state.is_empty());
        assert!(state.next_batch(None, 100, 100).is_none());
    }

    #[tokio::test]
    async fn prefill_budget_stops_the_batch() {
        let mut state = QueueState::new(1);
        let _rx: Vec<_> = (0..3)
            .map(|_| {
                let (e, rx) = entry(10, 5);
                state.append(e);
                rx
            })
            .collect();
        let next = state.next_batch(None, 25, 1000).unwrap();
        assert_eq!(next.batch.size, 2);
        assert_eq!(state.len(), 1);
        let next = state.next_batch(None, 25, 1000).unwrap();
        assert_eq!(next.batch.requests[0].id, 2);
    }

    #[tokio::test]
    async fn token_budget_counts_blocks_and_keeps_fifo() {
        let mut state = QueueState::new(16);
        let (a, _ra) = entry(10, 10); // 20 → 32 reserved
        let (b, _rb) = entry(1, 1); // 2 → 16 reserved
        state.append(a);
        state.append(b);
        // 31 tokens of budget: the head does not fit, and the small one must not jump ahead.
        assert!(state.next_batch(None, 100, 31).is_none());
        assert_eq!(state.len(), 2);
        let next = state.next_batch(None, 100, 47).unwrap();
        assert_eq!(next.batch.size, 1);
        assert_eq!(next.batch.max_tokens, 32);
        let next = state.next_batch(None, 100, 16).unwrap();
        assert_eq!(next.batch.max_tokens, 16);
    }

    #[tokio::test]
    async fn min_size_holds_back_small_batches() {
        let mut state = QueueState::new(1);
        let (a, _ra) = entry(4, 4);
        let (b, _rb) = entry(4, 4);
        state.append(a);
        state.append(b);
        assert!(state.next_batch(Some(3), 100, 100).is_none());
        // Only one fits the budget: still fewer than min_size, nothing is taken.
        assert!(state.next_batch(Some(2), 100, 10).is_none());
        assert_eq!(state.len(), 2);
        let next = state.next_batch(Some(2), 100, 100).unwrap();
        let ids: Vec<u64> = next.batch.requests.iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![0, 1]);
    }

    #[tokio::test]
    async fn cancelled_entries_are_dropped() {
        let mut state = QueueState::new(1);
        let (a, ra) = entry(4, 4);
        let (b, _rb) = entry(4, 4);
        state.append(a);
        state.append(b);
        drop(ra);
        let next = state.next_batch(None, 100, 100).unwrap();
        assert_eq!(next.batch.size, 1);
        assert_eq!(next.batch.requests[0].id, 1);
    }

    #[tokio::test]
    async fn actor_handle() {
        let queue = Queue::spawn(1);
        let (a, _ra) = entry(3, 3);
        queue.append(a);
        let next = queue.next_batch(None, 10, 10).await.unwrap();
        assert_eq!(next.batch.size, 1);
        assert!(queue.next_batch(None, 10, 10).await.is_none());
    }
}
