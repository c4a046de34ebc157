//! Unit tests of the queue: FIFO admission and token budgets, then admission across adapters.

use super::*;
use crate::adapter::{AdapterKey, AdapterSource};
use crate::api::AdapterState;
use crate::client::ShardError;
use crate::entry::{Delivery, InferStreamResponse};
use crate::testing::{valid_request, FakeShard};
use crate::validation::ValidGenerateRequest;

fn config(block_size: u32) -> QueueConfig {
    QueueConfig {
        block_size,
        chunked_prefill: false,
        prefix_caching: false,
        exchange: ExchangeConfig {
            max_active_adapters: 2,
            cycle_time: Duration::from_secs(2),
        },
    }
}

fn entry(
    input_length: u32,
    max_new_tokens: u32,
) -> (
    Entry,
    mpsc::UnboundedReceiver<Result<InferStreamResponse, InferError>>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Entry::new(
            valid_request(input_length, max_new_tokens),
            tx,
            Delivery::EveryStep,
        ),
        rx,
    )
}

#[tokio::test]
async fn a_health_probe_goes_before_waiting_requests() {
    let mut state = QueueState::new(config(1));
    let (first, _rx1) = entry(4, 2);
    let (second, _rx2) = entry(4, 2);
    state.append(first);
    state.append(second);
    let (tx, _probe_rx) = mpsc::unbounded_channel();
    let probe = state.append(Entry::probe(valid_request(1, 1), tx));
    // Room for the probe and one request: the probe, then the oldest request.
    let next = state.next_batch(None, 5, 100).unwrap();
    let ids: Vec<u64> = next.batch.requests.iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![probe, 0]);
    let rest = state.next_batch(None, 100, 100).unwrap();
    assert_eq!(rest.batch.requests[0].id, 1);
}

#[tokio::test]
async fn fifo_order_and_ids() {
    let mut state = QueueState::new(config(1));
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
    let mut state = QueueState::new(config(1));
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
async fn with_prefix_caching_a_prefix_shared_within_the_batch_counts_once() {
    let (mut cached, mut plain) = (
        QueueState::new(QueueConfig {
            prefix_caching: true,
            ..config(4)
        }),
        QueueState::new(config(4)),
    );
    let mut receivers = Vec::new();
    for state in [&mut cached, &mut plain] {
        // Four prompts of 16 shared tokens and 2 of their own, then one of logprobs.
        for i in 0..5u32 {
            let ids: Vec<u32> = (0..16).chain([100 + i, 200 + i]).collect();
            let mut request = ValidGenerateRequest::greedy(ids, 2);
            request.decoder_input_details = i == 4;
            let (tx, rx) = mpsc::unbounded_channel();
            state.append(Entry::new(request, tx, Delivery::EveryStep));
            receivers.push(rx);
        }
    }
    // Shared: 18 + 3 x 2 = 24 tokens for the first four (the fifth computes its 18 in full).
    let next = cached.next_batch(None, 24, 1000).unwrap();
    assert_eq!(next.batch.size, 4);
    assert_eq!(cached.next_batch(None, 24, 1000).unwrap().batch.size, 1);
    // Without prefix caching each prompt counts whole.
    assert_eq!(plain.next_batch(None, 24, 1000).unwrap().batch.size, 1);
}

#[tokio::test]
async fn with_chunked_prefill_a_long_prompt_counts_as_the_whole_budget() {
    let mut state = QueueState::new(QueueConfig {
        chunked_prefill: true,
        ..config(1)
    });
    let lengths = [50, 8, 30, 2];
    let _rx: Vec<_> = lengths
        .iter()
        .map(|&n| {
            let (e, rx) = entry(n, 5);
            state.append(e);
            rx
        })
        .collect();
    let batch = |state: &mut QueueState| {
        let next = state.next_batch(None, 20, 1000).unwrap();
        next.batch
            .requests
            .iter()
            .map(|r| r.id)
            .collect::<Vec<u64>>()
    };
    // 50 tokens count as 20: alone in its prefill; then 8 + min(30, 20) > 20: the 8 alone; then
    // 20 + 2 > 20: the 30 alone, and the 2.
    assert_eq!(batch(&mut state), vec![0]);
    assert_eq!(batch(&mut state), vec![1]);
    assert_eq!(batch(&mut state), vec![2]);
    assert_eq!(batch(&mut state), vec![3]);
    // Without chunked prefill a prompt over the budget is never admitted (the router refuses
    // such limits at start-up).
    let mut whole = QueueState::new(config(1));
    let (e, _rx) = entry(50, 5);
    whole.append(e);
    assert!(whole.next_batch(None, 20, 1000).is_none());
}

#[tokio::test]
async fn token_budget_counts_blocks_and_keeps_fifo() {
    let mut state = QueueState::new(config(16));
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
    let mut state = QueueState::new(config(1));
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
    let mut state = QueueState::new(config(1));
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
    let shard = Arc::new(FakeShard::new(100, 1));
    let queue = Queue::spawn(shard, config(1), Arc::new(Notify::new()));
    let (a, _ra) = entry(3, 3);
    queue.append(a);
    let next = queue
        .next_batch(None, 10, 10, HashMap::new())
        .await
        .unwrap();
    assert_eq!(next.batch.size, 1);
    assert!(queue
        .next_batch(None, 10, 10, HashMap::new())
        .await
        .is_none());
}

type Rx = mpsc::UnboundedReceiver<Result<InferStreamResponse, InferError>>;

fn adapter(id: &str) -> AdapterRequest {
    AdapterRequest::new(AdapterKey::single(id, AdapterSource::Local), None)
}

fn adapter_entry(id: &str) -> (Entry, Rx) {
    let (mut e, rx) = entry(2, 2);
    e.request.adapter = Some(adapter(id));
    (e, rx)
}

/// Completes every action of `schedule` successfully; returns what was done.
fn run_actions(state: &mut QueueState) -> Vec<String> {
    let actions = state.adapters().schedule(Instant::now());
    let mut done = Vec::new();
    for action in actions {
        let (request, index, outcome, name) = match action {
            Action::Download(r, i) => (r, i, Outcome::Downloaded(Ok((0.1, Ok(None)))), "download"),
            Action::Load(r, i) => (r, i, Outcome::Loaded(Ok(())), "load"),
            Action::FetchAndLoad(r, i) => {
                let outcome = Outcome::FetchedAndLoaded(Ok((true, (0.1, Ok(None)))));
                (r, i, outcome, "fetch-and-load")
            }
            Action::Offload(r, i) => (r, i, Outcome::Offloaded(Ok(true)), "offload"),
        };
        done.push(format!("{name} {} @{index}", request.key.describe()));
        let result = ActionResult {
            index,
            key: request.key,
            outcome,
        };
        state.adapters().complete(result, Instant::now());
    }
    done
}

fn batch_of(next: &NextBatch) -> Vec<(u64, u32)> {
    let mut ids: Vec<(u64, u32)> = next
        .batch
        .requests
        .iter()
        .map(|r| (r.id, r.adapter_index))
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn adapter_requests_wait_for_their_adapter_then_go_oldest_first() {
    let mut state = QueueState::new(config(1));
    let (a0, _r0) = adapter_entry("a");
    let (b1, _r1) = entry(2, 2);
    let (a2, _r2) = adapter_entry("a");
    state.append(a0);
    state.append(b1);
    state.append(a2);
    // Only the base request can run while "a" is fetched and loaded (one call: a slot is free).
    let next = state.next_batch(None, 100, 100).unwrap();
    assert_eq!(batch_of(&next), vec![(1, 0)]);
    assert_eq!(run_actions(&mut state), vec!["fetch-and-load a @1"]);
    let next = state.next_batch(None, 100, 100).unwrap();
    assert_eq!(batch_of(&next), vec![(0, 1), (2, 1)]);
    let status = state.adapters().list(Instant::now());
    assert_eq!(status[0].state, AdapterState::Active);
    assert_eq!(status[0].running, 2);
}

/// Completes one action of adapter `id` among `actions` with `outcome`.
fn complete(state: &mut QueueState, actions: &[Action], id: &str, outcome: Outcome) {
    let (request, index) = actions
        .iter()
        .find_map(|a| match a {
            Action::Download(r, i) | Action::Load(r, i) | Action::FetchAndLoad(r, i)
                if r.key.describe() == id =>
            {
                Some((r, *i))
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no action for {id} in {actions:?}"));
    let result = ActionResult {
        index,
        key: request.key.clone(),
        outcome,
    };
    state.adapters().complete(result, Instant::now());
}

#[tokio::test]
async fn a_failed_fetch_fails_only_its_requests_and_is_retried_later() {
    let mut state = QueueState::new(config(1));
    let (a, mut ra) = adapter_entry("missing");
    let (b, _rb) = adapter_entry("good");
    state.append(a);
    state.append(b);
    let actions = state.adapters().schedule(Instant::now());
    assert!(
        actions
            .iter()
            .all(|a| matches!(a, Action::FetchAndLoad(..))),
        "{actions:?}"
    );
    let missing = ShardError::status(tonic::Code::NotFound, "no adapter at /x/missing");
    let fetched = Outcome::FetchedAndLoaded(Ok((true, (0.1, Ok(None)))));
    complete(
        &mut state,
        &actions,
        "missing",
        Outcome::FetchedAndLoaded(Err(missing)),
    );
    complete(&mut state, &actions, "good", fetched);
    match ra.try_recv().unwrap() {
        Err(InferError::Adapter(kind, message)) => {
            assert_eq!(kind, crate::errors::AdapterErrorKind::Invalid);
            assert!(message.contains("no adapter at /x/missing"), "{message}");
            assert!(
                message.contains("`missing` (local) could not be downloaded"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    let list = state.adapters().list(Instant::now());
    let states: Vec<(String, AdapterState, Option<u32>)> = list
        .iter()
        .map(|s| (s.adapter_id.clone(), s.state, s.index))
        .collect();
    assert_eq!(
        states,
        vec![
            ("good".into(), AdapterState::Active, Some(2)),
            ("missing".into(), AdapterState::Failed, None),
        ]
    );
    assert!(run_actions(&mut state).is_empty());
    // A later request retries (and reuses the freed index).
    let (again, _r) = adapter_entry("missing");
    state.append(again);
    assert_eq!(run_actions(&mut state), vec!["fetch-and-load missing @1"]);
    let status = state.adapters().list(Instant::now());
    assert!(status[0].last_error.is_some());
}

#[tokio::test]
async fn a_new_adapter_without_a_free_slot_or_room_is_downloaded_then_waits() {
    let mut state = QueueState::new(config(1));
    let (a, _ra) = adapter_entry("a");
    state.append(a);
    let actions = state.adapters().schedule(Instant::now());
    let big = Outcome::FetchedAndLoaded(Ok((true, (0.7, Ok(None)))));
    complete(&mut state, &actions, "a", big);
    assert_eq!(
        batch_of(&state.next_batch(None, 100, 100).unwrap()),
        vec![(0, 1)]
    );
    state.set_running(&HashMap::new());
    // A slot is free: "b" is fetched and loaded at once, but the shard finds it does not fit.
    let (b, _rb) = adapter_entry("b");
    state.append(b);
    let actions = state.adapters().schedule(Instant::now());
    let left_out = Outcome::FetchedAndLoaded(Ok((false, (0.6, Ok(None)))));
    complete(&mut state, &actions, "b", left_out);
    let list = state.adapters().list(Instant::now());
    assert_eq!(list[1].state, AdapterState::Downloaded);
    assert_eq!(list[1].memory_fraction, Some(0.6));
    // It waits as a downloaded adapter would: the idle "a" makes room.
    assert_eq!(run_actions(&mut state), vec!["offload a @1"]);
    assert_eq!(run_actions(&mut state), vec!["load b @2"]);
    // "a" (0.7) now waits for room next to "b" (0.6). A slot is free, but a newer adapter is
    // only downloaded: it queues behind the waiting one.
    let (a, _ra) = adapter_entry("a");
    state.append(a);
    assert!(run_actions(&mut state).is_empty());
    let (c, _rc) = adapter_entry("c");
    state.append(c);
    assert_eq!(run_actions(&mut state), vec!["download c @3"]);
}

#[tokio::test]
async fn full_slots_rotate_after_the_cycle_time_without_touching_running_requests() {
    let mut state = QueueState::new(QueueConfig {
        block_size: 1,
        chunked_prefill: false,
        prefix_caching: false,
        exchange: ExchangeConfig {
            max_active_adapters: 1,
            cycle_time: Duration::ZERO,
        },
    });
    let (a, _ra) = adapter_entry("a");
    let (a2, _ra2) = adapter_entry("a");
    state.append(a);
    run_actions(&mut state);
    run_actions(&mut state);
    let first = state.next_batch(None, 100, 100).unwrap();
    assert_eq!(batch_of(&first), vec![(0, 1)]);
    state.append(a2);
    let (b, _rb) = adapter_entry("b");
    state.append(b);
    // "b" is fetched; "a" (cycle over, "b" waiting) drains: its queued request must wait.
    assert_eq!(run_actions(&mut state), vec!["download b @2"]);
    assert!(run_actions(&mut state).is_empty());
    assert!(state.next_batch(None, 100, 100).is_none());
    // Its running request finishes: "a" is offloaded, "b" loaded, then "a" again.
    state.set_running(&HashMap::new());
    assert_eq!(run_actions(&mut state), vec!["offload a @1"]);
    assert_eq!(run_actions(&mut state), vec!["load b @2"]);
    let next = state.next_batch(None, 100, 100).unwrap();
    assert_eq!(batch_of(&next), vec![(2, 2)]);
    state.set_running(&HashMap::from([(2, 1)]));
    assert!(run_actions(&mut state).is_empty());
    state.set_running(&HashMap::new());
    assert_eq!(run_actions(&mut state), vec!["offload b @2"]);
    assert_eq!(run_actions(&mut state), vec!["load a @1"]);
    let next = state.next_batch(None, 100, 100).unwrap();
    assert_eq!(batch_of(&next), vec![(1, 1)]);
}

fn hub_entry(id: &str) -> (Entry, Rx) {
    let (mut e, rx) = entry(2, 2);
    e.request.adapter = Some(AdapterRequest::new(
        AdapterKey::single(id, AdapterSource::Hub),
        None,
    ));
    (e, rx)
}

#[tokio::test]
async fn loads_wait_while_an_adapter_of_unknown_size_is_fetched_and_loaded() {
    let mut state = QueueState::new(config(1));
    let (a, _ra) = adapter_entry("a");
    let (b, _rb) = hub_entry("org/b");
    state.append(a);
    state.append(b);
    let actions = state.adapters().schedule(Instant::now());
    let names: Vec<String> = actions.iter().map(|a| format!("{a:?}")).collect();
    assert!(
        names[0].starts_with("FetchAndLoad") && names[1].starts_with("Download"),
        "{names:?}"
    );
    // "org/b" is downloaded and a slot is free, but "a"'s size is not known yet: no load.
    complete(
        &mut state,
        &actions,
        "org/b",
        Outcome::Downloaded(Ok((0.3, Ok(None)))),
    );
    assert!(state.adapters().schedule(Instant::now()).is_empty());
    let fetched = Outcome::FetchedAndLoaded(Ok((true, (0.5, Ok(None)))));
    complete(&mut state, &actions, "a", fetched);
    assert_eq!(run_actions(&mut state), vec!["load org/b @2"]);
}
