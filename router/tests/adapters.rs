//! Adapter scheduling end to end through the queue task and the batching loop, against the fake
//! shard (which refuses a Prefill whose adapter index is not loaded and records an offload of an
//! adapter still in use): exchange with few slots, fairness, failures, slow downloads, pinning.

use lorax_router::adapter::{AdapterKey, AdapterRequest, AdapterSource};
use lorax_router::api::AdapterState;
use lorax_router::batcher::{spawn_batcher, BatcherConfig};
use lorax_router::client::ShardClient;
use lorax_router::entry::{Delivery, Entry, GeneratedText, InferStreamResponse};
use lorax_router::errors::AdapterCommandError;
use lorax_router::errors::{AdapterErrorKind, InferError};
use lorax_router::exchange::ExchangeConfig;
use lorax_router::queue::{Queue, QueueConfig};
use lorax_router::testing::{test_health, valid_request, AdapterBehaviour, Call, FakeShard};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify, Semaphore};

type Receiver = mpsc::UnboundedReceiver<Result<InferStreamResponse, InferError>>;

struct Harness {
    shard: Arc<FakeShard>,
    queue: Queue,
    notify: Arc<Notify>,
}

fn start(capacity: u32, max_active_adapters: usize, cycle_time: Duration) -> Harness {
    let shard = Arc::new(FakeShard::new(capacity, 1));
    shard.set_step_delay(Duration::from_millis(1));
    let config = BatcherConfig {
        max_batch_prefill_tokens: 1000,
        max_batch_total_tokens: capacity,
        max_waiting_tokens: 1,
        decode_steps_per_call: 1,
        waiting_served_ratio: 0.0,
        block_size: 1,
        chunked_prefill: false,
        prefix_caching: false,
        eager_prefill: true,
    };
    let queue_config = QueueConfig {
        block_size: 1,
        chunked_prefill: false,
        prefix_caching: false,
        exchange: ExchangeConfig {
            max_active_adapters,
            cycle_time,
        },
    };
    let notify = Arc::new(Notify::new());
    let client: Arc<dyn ShardClient> = shard.clone();
    let queue = Queue::spawn(client.clone(), queue_config, notify.clone());
    spawn_batcher(client, queue.clone(), notify.clone(), config, test_health());
    Harness {
        shard,
        queue,
        notify,
    }
}

/// A hub adapter when `id` names one (`owner/name`), else a local directory.
fn adapter(id: &str) -> AdapterRequest {
    let source = match id.contains('/') {
        true => AdapterSource::Hub,
        false => AdapterSource::Local,
    };
    AdapterRequest::new(AdapterKey::single(id, source), None)
}

impl Harness {
    /// Queues a request of `input_length` tokens for `adapter` (None: base model).
    fn submit(&self, adapter_id: Option<&str>, input_length: u32, max_new_tokens: u32) -> Receiver {
        let mut request = valid_request(input_length, max_new_tokens);
        request.adapter = adapter_id.map(adapter);
        let (tx, rx) = mpsc::unbounded_channel();
        self.queue
            .append(Entry::new(request, tx, Delivery::EveryStep));
        self.notify.notify_one();
        rx
    }

    /// Fetches of the adapter: downloads, and loads that fetch it first.
    fn downloads_of(&self, name: &str) -> usize {
        self.shard
            .calls()
            .iter()
            .filter(|c| match c {
                Call::Download { adapter } | Call::FetchAndLoad { adapter, .. } => adapter == name,
                _ => false,
            })
            .count()
    }

    fn assert_no_violations(&self) {
        assert!(
            self.shard.violations().is_empty(),
            "{:?}",
            self.shard.violations()
        );
    }
}

/// Reads a request's stream to its end (10 s at most).
async fn finish(mut rx: Receiver) -> Result<GeneratedText, InferError> {
    let read = async {
        while let Some(message) = rx.recv().await {
            if let InferStreamResponse::End(end) = message? {
                return Ok(end.generated_text);
            }
        }
        Err(InferError::IncompleteGeneration)
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("request did not finish")
}

/// Asserts every token of `text` was generated with adapter `name`.
fn assert_generated_with(text: &str, name: &str) {
    let suffix = format!("[{name}]");
    let tokens: Vec<&str> = text.split(' ').filter(|t| !t.is_empty()).collect();
    assert!(!tokens.is_empty());
    for token in tokens {
        assert!(token.ends_with(&suffix), "{text} not all from {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_adapters_share_two_slots_and_every_request_runs_with_its_own() {
    let h = start(10_000, 2, Duration::from_millis(20));
    let mut receivers = Vec::new();
    for i in 0..42u32 {
        let name = (i % 7 != 6).then(|| format!("a{}", i % 7));
        let rx = h.submit(name.as_deref(), 2 + i % 3, 2 + i % 5);
        receivers.push((name, rx));
    }
    for (name, rx) in receivers {
        let generated = finish(rx).await.unwrap();
        match name {
            Some(name) => assert_generated_with(&generated.text, &name),
            None => assert!(!generated.text.contains('['), "{}", generated.text),
        }
    }
    h.assert_no_violations();
    assert!(h.shard.max_installed_adapters() <= 2);
    for record in h.shard.prefills() {
        assert_eq!(record.adapter.is_some(), record.adapter_index != 0);
    }
    // Each adapter was downloaded once (prefetch) however often it was exchanged.
    for i in 0..6 {
        assert_eq!(h.downloads_of(&format!("a{i}")), 1);
    }
    let offloads = h
        .shard
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::Offload { .. }))
        .count();
    assert!(offloads >= 4, "{offloads} offloads");
}

/// Six 32-token requests of "a" (two fit the KV budget at once) and, once "a" runs, one small
/// request of "b", with a single adapter slot: where "b" is prefilled among "a"'s requests.
async fn position_of_b(cycle_time: Duration) -> usize {
    let h = start(70, 1, cycle_time);
    let a: Vec<Receiver> = (0..6).map(|_| h.submit(Some("a"), 2, 30)).collect();
    for _ in 0..5000 {
        if !h.shard.prefills().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let b = h.submit(Some("b"), 1, 5);
    assert_generated_with(&finish(b).await.unwrap().text, "b");
    for rx in a {
        assert_generated_with(&finish(rx).await.unwrap().text, "a");
    }
    h.assert_no_violations();
    let prefills = h.shard.prefills();
    assert_eq!(prefills.len(), 7);
    prefills
        .iter()
        .position(|r| r.adapter.as_deref() == Some("b"))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_adapter_gives_up_its_slot_after_the_cycle_time() {
    // "a" has held its slot long enough: it drains (its two running requests finish, its four
    // queued ones wait) and "b" runs next.
    assert_eq!(position_of_b(Duration::ZERO).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_adapter_keeps_its_slot_within_the_cycle_time() {
    // Within its cycle "a" keeps serving its queue; "b" gets the slot once "a" is idle.
    assert_eq!(position_of_b(Duration::from_secs(30)).await, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_adapter_fails_only_its_requests_and_is_retried_later() {
    let h = start(10_000, 2, Duration::from_millis(20));
    let missing = AdapterBehaviour {
        error: Some((tonic::Code::NotFound, "no adapter at /nowhere/bad".into())),
        ..Default::default()
    };
    h.shard.set_adapter("bad", missing);
    let bad: Vec<Receiver> = (0..2).map(|_| h.submit(Some("bad"), 2, 4)).collect();
    let good: Vec<Receiver> = (0..2).map(|_| h.submit(Some("good"), 2, 4)).collect();
    let base: Vec<Receiver> = (0..2).map(|_| h.submit(None, 2, 4)).collect();
    for rx in bad {
        match finish(rx).await {
            Err(InferError::Adapter(AdapterErrorKind::Invalid, message)) => {
                assert!(message.contains("no adapter at /nowhere/bad"), "{message}");
                assert!(message.contains("`bad`"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
    for rx in good {
        assert_generated_with(&finish(rx).await.unwrap().text, "good");
    }
    for rx in base {
        finish(rx).await.unwrap();
    }
    let listed = h.queue.adapters().await;
    let failed = listed.iter().find(|a| a.adapter_id == "bad").unwrap();
    assert_eq!(failed.state, AdapterState::Failed);
    assert!(failed.last_error.as_ref().unwrap().contains("/nowhere/bad"));
    // Fixed: a later request downloads it again.
    h.shard.set_adapter("bad", AdapterBehaviour::default());
    let again = h.submit(Some("bad"), 2, 3);
    assert_generated_with(&finish(again).await.unwrap().text, "bad");
    assert_eq!(h.downloads_of("bad"), 2);
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_download_does_not_stop_other_requests() {
    let h = start(10_000, 2, Duration::from_millis(20));
    let gate = Arc::new(Semaphore::new(0));
    let slow_source = AdapterBehaviour {
        download_gate: Some(gate.clone()),
        ..Default::default()
    };
    // From the hub: downloaded without taking a slot (a local adapter would be read and loaded
    // in one call).
    h.shard.set_adapter("org/slow", slow_source);
    let mut slow = h.submit(Some("org/slow"), 2, 3);
    let base = h.submit(None, 2, 20);
    let fast = h.submit(Some("fast"), 2, 20);
    finish(base).await.unwrap();
    assert_generated_with(&finish(fast).await.unwrap().text, "fast");
    // Both ran to the end (19 decode steps each) while "slow" was still downloading.
    let decodes = h
        .shard
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::Decode { .. }))
        .count();
    assert!(decodes >= 19, "{decodes}");
    assert!(slow.try_recv().is_err(), "nothing for the slow adapter yet");
    let listed = h.queue.adapters().await;
    let state = listed.iter().find(|a| a.adapter_id == "org/slow").unwrap();
    assert_eq!(state.state, AdapterState::Downloading);
    assert_eq!(state.queued, 1);
    gate.add_permits(1);
    assert_generated_with(&finish(slow).await.unwrap().text, "org/slow");
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_adapter_is_never_offloaded() {
    let h = start(10_000, 2, Duration::ZERO);
    let status = h.queue.load_adapter(adapter("p"), true).await.unwrap();
    assert_eq!(status.state, AdapterState::Active);
    assert!(status.pinned);
    // With two slots one adapter may be pinned; a second pin is refused.
    let second = h.queue.load_adapter(adapter("q"), true).await;
    assert!(matches!(second, Err(AdapterCommandError::Conflict(_))));
    let mut receivers = Vec::new();
    for i in 0..20 {
        let name = if i % 4 == 0 {
            "p".to_string()
        } else {
            format!("x{}", i % 4)
        };
        receivers.push((name.clone(), h.submit(Some(&name), 2, 3)));
    }
    for (name, rx) in receivers {
        assert_generated_with(&finish(rx).await.unwrap().text, &name);
    }
    let offloaded_p = h
        .shard
        .calls()
        .iter()
        .any(|c| matches!(c, Call::Offload { adapter, .. } if adapter == "p"));
    assert!(!offloaded_p);
    assert!(h.shard.installed_adapters().values().any(|a| a == "p"));
    h.assert_no_violations();
    // Unpinned and idle, it can be unloaded.
    let key = adapter("p").key;
    let unload = h.queue.unload_adapter(key.clone()).await;
    assert!(matches!(unload, Err(AdapterCommandError::Conflict(_))));
    h.queue.pin_adapter(key.clone(), false).await.unwrap();
    let status = h.queue.unload_adapter(key).await.unwrap();
    assert_eq!(status.state, AdapterState::Downloaded);
    assert!(!h.shard.installed_adapters().values().any(|a| a == "p"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_in_use_is_not_unloaded() {
    let h = start(10_000, 2, Duration::from_secs(30));
    h.shard.set_step_delay(Duration::from_millis(5));
    let rx = h.submit(Some("busy"), 2, 200);
    for _ in 0..5000 {
        if !h.shard.prefills().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let key = adapter("busy").key;
    match h.queue.unload_adapter(key.clone()).await {
        Err(AdapterCommandError::Conflict(message)) => assert!(message.contains("in use")),
        other => panic!("{other:?}"),
    }
    drop(rx);
    // Once its (cancelled) request left the batch, the adapter can go.
    let mut status = None;
    for _ in 0..200 {
        if let Ok(s) = h.queue.unload_adapter(key.clone()).await {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status.unwrap().state, AdapterState::Downloaded);
    let missing = h.queue.unload_adapter(adapter("never").key).await;
    assert!(matches!(missing, Err(AdapterCommandError::NotFound(_))));
    h.assert_no_violations();
}
