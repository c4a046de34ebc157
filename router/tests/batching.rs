//! The queue + continuous-batching loop against the in-memory fake shard.

use lorax_router::api::{FinishReason, Token};
use lorax_router::batcher::{spawn_batcher, BatcherConfig};
use lorax_router::client::ShardClient;
use lorax_router::entry::{Delivery, Entry, GeneratedText, InferStreamResponse};
use lorax_router::errors::InferError;
use lorax_router::exchange::ExchangeConfig;
use lorax_router::queue::{Queue, QueueConfig};
use lorax_router::testing::{test_health, valid_request, Call, FakeShard, EOS_ID, STOP_WORD_ID};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

type Receiver = mpsc::UnboundedReceiver<Result<InferStreamResponse, InferError>>;

struct Harness {
    shard: Arc<FakeShard>,
    queue: Queue,
    notify: Arc<Notify>,
}

fn config(total: u32, prefill: u32, max_waiting_tokens: usize, ratio: f32) -> BatcherConfig {
    BatcherConfig {
        max_batch_prefill_tokens: prefill,
        max_batch_total_tokens: total,
        max_waiting_tokens,
        decode_steps_per_call: 1,
        waiting_served_ratio: ratio,
        block_size: 1,
        chunked_prefill: false,
        prefix_caching: false,
        eager_prefill: true,
    }
}

/// `config` with up to `steps` decode steps a call.
fn steps_a_call(steps: u32, config: BatcherConfig) -> BatcherConfig {
    BatcherConfig {
        decode_steps_per_call: steps,
        ..config
    }
}

fn start(shard: FakeShard, config: BatcherConfig) -> Harness {
    let shard = Arc::new(shard);
    let notify = Arc::new(Notify::new());
    let client: Arc<dyn ShardClient> = shard.clone();
    let queue_config = QueueConfig {
        block_size: config.block_size,
        chunked_prefill: config.chunked_prefill,
        prefix_caching: config.prefix_caching,
        exchange: ExchangeConfig {
            max_active_adapters: 2,
            cycle_time: Duration::from_secs(2),
        },
    };
    let queue = Queue::spawn(client.clone(), queue_config, notify.clone());
    spawn_batcher(client, queue.clone(), notify.clone(), config, test_health());
    Harness {
        shard,
        queue,
        notify,
    }
}

impl Harness {
    fn submit_ids(&self, input_ids: Vec<u32>, max_new_tokens: u32) -> Receiver {
        self.submit_delivered(input_ids, max_new_tokens, Delivery::EveryStep)
    }

    fn submit_delivered(
        &self,
        input_ids: Vec<u32>,
        max_new_tokens: u32,
        delivery: Delivery,
    ) -> Receiver {
        let mut request = valid_request(input_ids.len() as u32, max_new_tokens);
        request.input_ids = input_ids;
        let (tx, rx) = mpsc::unbounded_channel();
        self.queue.append(Entry::new(request, tx, delivery));
        self.notify.notify_one();
        rx
    }

    fn submit(&self, input_length: u32, max_new_tokens: u32) -> Receiver {
        self.submit_ids(vec![4; input_length as usize], max_new_tokens)
    }

    /// The fake shard saw no call the router must never make.
    fn assert_no_violations(&self) {
        let violations = self.shard.violations();
        assert!(violations.is_empty(), "{violations:?}");
    }
}

/// Reads a request's stream to its end.
async fn finish(mut rx: Receiver) -> Result<(Vec<Token>, GeneratedText), InferError> {
    let read = async {
        let mut tokens = Vec::new();
        while let Some(message) = rx.recv().await {
            match message? {
                InferStreamResponse::Prefill(_) => {}
                InferStreamResponse::Intermediate { token, .. } => tokens.push(token),
                InferStreamResponse::End(end) => {
                    tokens.push(end.token);
                    return Ok((tokens, end.generated_text));
                }
            }
        }
        Err(InferError::IncompleteGeneration)
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("request did not finish")
}

/// Reads each request's stream to its end and checks it got the fake shard's tokens for request `id`
/// (id * 100 + 1, + 2, ...), as many as its length.
async fn finish_numbered(
    receivers: Vec<Receiver>,
    lengths: &[u32],
) -> Vec<(Vec<Token>, GeneratedText)> {
    let mut out = Vec::new();
    for (id, (rx, &n)) in receivers.into_iter().zip(lengths).enumerate() {
        let (tokens, generated) = finish(rx).await.unwrap();
        let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
        let expected: Vec<u32> = (1..=n).map(|k| id as u32 * 100 + k).collect();
        assert_eq!(ids, expected);
        assert_eq!(generated.generated_tokens, n);
        out.push((tokens, generated));
    }
    out
}

fn request_ids(call: &Call) -> Vec<u64> {
    match call {
        Call::Prefill { request_ids, .. }
        | Call::Decode { request_ids, .. }
        | Call::Filter { request_ids, .. } => request_ids.clone(),
        _ => vec![],
    }
}

#[tokio::test]
async fn requests_read_whole_get_every_token_in_order_beside_streamed_ones() {
    let h = start(FakeShard::new(1000, 1), config(1000, 100, 20, 1.2));
    let lengths = [6u32, 2, 4];
    let deliveries = [Delivery::AtEnd, Delivery::EveryStep, Delivery::AtEnd];
    let receivers: Vec<Receiver> = lengths
        .iter()
        .zip(deliveries)
        .map(|(&n, delivery)| h.submit_delivered(vec![4; 3], n, delivery))
        .collect();
    finish_numbered(receivers, &lengths).await;
    h.assert_no_violations();
    assert!(h.shard.cached_requests().is_empty());
}

#[tokio::test]
async fn generations_reach_their_requests_and_finished_ones_are_filtered() {
    let h = start(FakeShard::new(1000, 1), config(1000, 100, 20, 1.2));
    let lengths = [2u32, 3, 5];
    let receivers: Vec<Receiver> = lengths.iter().map(|&n| h.submit(3, n)).collect();
    for (tokens, generated) in finish_numbered(receivers, &lengths).await {
        assert_eq!(generated.finish_reason, FinishReason::Length);
        let text: String = tokens.iter().map(|t| t.text.clone()).collect();
        assert_eq!(generated.text, text);
    }
    let calls = h.shard.calls();
    assert_eq!(
        calls[0],
        Call::Prefill {
            batch_id: 0,
            request_ids: vec![0, 1, 2],
            prefill_tokens: 9
        }
    );
    assert!(calls.contains(&Call::Filter {
        batch_id: 0,
        request_ids: vec![1, 2]
    }));
    assert!(calls.contains(&Call::Filter {
        batch_id: 0,
        request_ids: vec![2]
    }));
    h.assert_no_violations();
    assert!(h.shard.cached_requests().is_empty());
}

#[tokio::test]
async fn eos_token_is_reported_as_special() {
    let h = start(FakeShard::new(1000, 1), config(1000, 100, 20, 1.2));
    let rx = h.submit_ids(vec![1, STOP_WORD_ID], 10);
    let (tokens, generated) = finish(rx).await.unwrap();
    assert_eq!(tokens.len(), 2);
    assert_eq!(tokens[1].id, EOS_ID);
    assert!(tokens[1].special);
    assert_eq!(generated.finish_reason, FinishReason::EndOfSequenceToken);
    assert_eq!(generated.generated_tokens, 2);
    assert_eq!(generated.text, " r0t1");
}

#[tokio::test]
async fn cancelled_request_is_filtered_out_at_once() {
    let h = start(FakeShard::gated(1000, 1), config(1000, 100, 20, 1.2));
    let rx0 = h.submit(3, 50);
    let rx1 = h.submit(3, 5);
    h.shard.allow_steps(1);
    h.shard.wait_calls(1).await;
    drop(rx0);
    h.shard.allow_steps(1);
    // Within one step the cancelled request is filtered out of the cached batch.
    let filter = Call::Filter {
        batch_id: 0,
        request_ids: vec![1],
    };
    for _ in 0..5000 {
        if h.shard.calls().contains(&filter) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(h.shard.calls().contains(&filter), "{:?}", h.shard.calls());
    assert_eq!(h.shard.cached_requests(), vec![1]);
    h.shard.allow_steps(100);
    finish(rx1).await.unwrap();
    let calls = h.shard.calls();
    let at = calls.iter().position(|c| c == &filter).unwrap();
    for call in &calls[at..] {
        assert!(!request_ids(call).contains(&0), "{call:?}");
    }
    h.assert_no_violations();
}

#[tokio::test]
async fn request_cancelled_while_waiting_is_never_prefilled() {
    // Room for one request at a time: the second waits in the queue.
    let h = start(FakeShard::gated(20, 1), config(20, 100, 1, 0.0));
    let rx0 = h.submit(5, 10);
    let rx1 = h.submit(5, 10);
    let rx2 = h.submit(5, 10);
    h.shard.allow_steps(1);
    h.shard.wait_calls(1).await;
    drop(rx1);
    h.shard.allow_steps(1000);
    finish(rx0).await.unwrap();
    finish(rx2).await.unwrap();
    for call in h.shard.calls() {
        assert!(!request_ids(&call).contains(&1), "{call:?}");
    }
}

#[tokio::test]
async fn token_budgets_are_never_exceeded() {
    let capacity = 64;
    let mut cfg = config(capacity, 32, 3, 1.2);
    cfg.block_size = 4;
    let h = start(FakeShard::new(capacity, 4), cfg);
    let receivers: Vec<(Receiver, u32)> = (0..24u32)
        .map(|i| {
            let input = 1 + (i * 5) % 12;
            let new = 1 + (i * 7) % 20;
            (h.submit(input, new), new)
        })
        .collect();
    for (rx, new) in receivers {
        let (tokens, _) = finish(rx).await.unwrap();
        assert_eq!(tokens.len() as u32, new);
    }
    h.assert_no_violations();
    assert!(h.shard.max_reserved() <= capacity);
    assert!(h.shard.max_reserved() > capacity / 2, "batching happened");
    for call in h.shard.calls() {
        if let Call::Prefill { prefill_tokens, .. } = call {
            assert!(prefill_tokens <= 32);
        }
    }
}

#[tokio::test]
async fn waiting_served_ratio_holds_back_a_small_waiting_group() {
    let h = start(FakeShard::gated(10_000, 1), config(10_000, 1000, 100, 1.2));
    let _running: Vec<Receiver> = (0..4).map(|_| h.submit(2, 50)).collect();
    h.shard.allow_steps(1);
    h.shard.wait_calls(1).await;
    // 2 waiting < floor(4 * 1.2): they must not join.
    let _first: Vec<Receiver> = (0..2).map(|_| h.submit(2, 50)).collect();
    h.shard.allow_steps(3);
    h.shard.wait_calls(4).await;
    for call in &h.shard.calls()[1..4] {
        assert!(matches!(call, Call::Decode { batch_ids, .. } if batch_ids == &vec![0]));
    }
    // 4 waiting >= 4: they join, prefilled together, then concatenated into the running batch.
    let _second: Vec<Receiver> = (0..2).map(|_| h.submit(2, 50)).collect();
    h.shard.allow_steps(3);
    h.shard.wait_calls(7).await;
    let calls = h.shard.calls();
    assert_eq!(
        calls[5],
        Call::Prefill {
            batch_id: 1,
            request_ids: vec![4, 5, 6, 7],
            prefill_tokens: 8
        }
    );
    assert!(matches!(&calls[6], Call::Decode { batch_ids, .. } if batch_ids == &vec![0, 1]));
}

#[tokio::test]
async fn max_waiting_tokens_forces_a_prefill() {
    let h = start(FakeShard::gated(10_000, 1), config(10_000, 1000, 3, 1.2));
    let _running: Vec<Receiver> = (0..4).map(|_| h.submit(2, 50)).collect();
    h.shard.allow_steps(1);
    h.shard.wait_calls(1).await;
    let _waiting = h.submit(2, 50);
    h.shard.allow_steps(4);
    h.shard.wait_calls(5).await;
    let calls = h.shard.calls();
    assert!(matches!(calls[1], Call::Decode { .. }));
    assert!(matches!(calls[2], Call::Decode { .. }));
    // After 3 tokens (prefill + 2 decodes) the lone waiting request is prefilled.
    assert_eq!(
        calls[3],
        Call::Prefill {
            batch_id: 1,
            request_ids: vec![4],
            prefill_tokens: 2
        }
    );
    assert!(matches!(&calls[4], Call::Decode { batch_ids, .. } if batch_ids == &vec![0, 1]));
}

#[tokio::test]
async fn shard_failures_fail_their_requests_only() {
    let h = start(FakeShard::new(1000, 1), config(1000, 100, 20, 1.2));
    h.shard.set_fail_decode(true);
    let a = h.submit(2, 5);
    let b = h.submit(2, 5);
    for rx in [a, b] {
        match finish(rx).await {
            Err(InferError::Generation(message)) => assert!(message.contains("decode exploded")),
            other => panic!("{other:?}"),
        }
    }
    assert!(h.shard.calls().contains(&Call::Clear { batch_id: Some(0) }));
    assert!(h.shard.cached_requests().is_empty());

    h.shard.set_fail_decode(false);
    h.shard.set_fail_prefill(true);
    assert!(matches!(
        finish(h.submit(2, 5)).await,
        Err(InferError::Generation(_))
    ));
    h.shard.set_fail_prefill(false);
    let (tokens, _) = finish(h.submit(2, 5)).await.unwrap();
    assert_eq!(tokens.len(), 5);
}

/// The request ids of each call of a kind, in order.
fn requests_of(calls: &[Call], kind: fn(&Call) -> bool) -> Vec<Vec<u64>> {
    calls.iter().filter(|c| kind(c)).map(request_ids).collect()
}

fn decode_steps(calls: &[Call]) -> Vec<u32> {
    calls
        .iter()
        .filter_map(|c| match c {
            Call::Decode { steps, .. } => Some(*steps),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn several_decode_steps_a_call_only_while_no_request_waits() {
    // Four requests take the whole token budget (4 x (2 + 10)); a fifth waits for them to finish.
    let h = start(
        FakeShard::gated(48, 1),
        steps_a_call(4, config(48, 1000, 20, 1.2)),
    );
    let receivers: Vec<Receiver> = (0..5).map(|_| h.submit(2, 10)).collect();
    h.shard.allow_steps(100);
    finish_numbered(receivers, &[10; 5]).await;
    let calls = h.shard.calls();
    // One step a call while the fifth waits; then 4 a call, the last ending when its batch does.
    let mut expected = vec![1; 9];
    expected.extend([4, 4, 4]);
    assert_eq!(decode_steps(&calls), expected);
    let prefills = requests_of(&calls, |c| matches!(c, Call::Prefill { .. }));
    assert_eq!(prefills, vec![vec![0, 1, 2, 3], vec![4]]);
    h.assert_no_violations();
}

#[tokio::test]
async fn requests_finishing_inside_a_call_get_every_token_and_leave_the_batch() {
    let h = start(
        FakeShard::new(1000, 1),
        steps_a_call(4, config(1000, 100, 20, 1.2)),
    );
    let lengths = [6u32, 2, 9, 1];
    let receivers: Vec<Receiver> = lengths.iter().map(|&n| h.submit(3, n)).collect();
    finish_numbered(receivers, &lengths).await;
    let calls = h.shard.calls();
    assert_eq!(decode_steps(&calls), vec![4, 4]);
    // Each call's finished requests are filtered out before the next (the fake keeps them).
    let decoded = requests_of(&calls, |c| matches!(c, Call::Decode { .. }));
    assert_eq!(decoded, vec![vec![0, 1, 2], vec![0, 2]]);
    h.assert_no_violations();
}

/// The next token of a request's stream, within a second (panics otherwise).
async fn next_token(rx: &mut Receiver) -> u32 {
    let message = tokio::time::timeout(Duration::from_secs(1), rx.recv())
        .await
        .expect("no token came")
        .expect("the stream ended")
        .unwrap();
    match message {
        InferStreamResponse::Intermediate { token, .. } => token.id,
        InferStreamResponse::End(end) => end.token.id,
        InferStreamResponse::Prefill(_) => panic!("prompt tokens were not asked for"),
    }
}

#[tokio::test]
async fn a_request_arriving_during_a_call_of_several_steps_joins_after_the_step_in_progress() {
    let h = start(
        FakeShard::gated(1000, 1),
        steps_a_call(8, config(1000, 100, 20, 0.0)),
    );
    let mut first = h.submit(2, 30);
    h.shard.allow_steps(2);
    assert_eq!(next_token(&mut first).await, 1);
    assert_eq!(
        next_token(&mut first).await,
        2,
        "a step's token, the call still open"
    );
    h.shard.wait_at_gate().await;
    let mut second = h.submit(2, 3);
    h.shard.wait_for_stream_stop().await; // the batcher saw the arrival
    h.shard.allow_steps(1);
    assert_eq!(
        next_token(&mut first).await,
        3,
        "the step in progress still runs"
    );
    h.shard.wait_at_gate().await;
    h.shard.allow_steps(1);
    assert_eq!(
        next_token(&mut second).await,
        101,
        "then the new request's prefill"
    );
    assert!(first.try_recv().is_err(), "before any further step");
    h.shard.allow_steps(100);
    assert_eq!(finish(first).await.unwrap().1.generated_tokens, 30);
    assert_eq!(finish(second).await.unwrap().1.generated_tokens, 3);
    let calls = h.shard.calls();
    assert!(
        matches!(calls[1], Call::Decode { steps: 8, .. }),
        "{calls:?}"
    );
    assert_eq!(request_ids(&calls[2]), vec![1], "{calls:?}");
    h.assert_no_violations();
}

#[tokio::test]
async fn a_client_leaving_during_a_call_of_several_steps_is_filtered_out_after_that_step() {
    // Whether it reads a stream (its send fails) or waits for the whole answer (its channel closed).
    for delivery in [Delivery::EveryStep, Delivery::AtEnd] {
        client_leaving_during_a_call(delivery).await;
    }
}

async fn client_leaving_during_a_call(delivery: Delivery) {
    let h = start(
        FakeShard::gated(1000, 1),
        steps_a_call(8, config(1000, 100, 20, 0.0)),
    );
    let mut kept = h.submit(2, 30);
    let leaving = h.submit_delivered(vec![4; 2], 30, delivery);
    h.shard.allow_steps(2);
    assert_eq!(next_token(&mut kept).await, 1);
    assert_eq!(next_token(&mut kept).await, 2);
    h.shard.wait_at_gate().await;
    drop(leaving);
    h.shard.allow_steps(1);
    assert_eq!(next_token(&mut kept).await, 3);
    h.shard.wait_at_gate().await;
    let calls = h.shard.calls();
    let n = calls.len();
    assert!(
        matches!(&calls[n - 2], Call::Filter { request_ids, .. } if request_ids == &[0]),
        "{calls:?}"
    );
    assert!(
        matches!(&calls[n - 1], Call::Decode { steps: 8, request_ids, .. } if request_ids == &[0]),
        "{calls:?}"
    );
    h.shard.allow_steps(100);
    assert_eq!(finish(kept).await.unwrap().1.generated_tokens, 30);
    h.assert_no_violations();
}

/// A request decoding alone, then five arriving while its decode step runs, with room to prefill
/// two at a time and KV room for four of them; returns every call once all are done.
async fn five_arrive_while_one_decodes(eager_prefill: bool) -> Vec<Call> {
    // Each request reserves 2 + 20 tokens: the first and four more fit in 110.
    let cfg = BatcherConfig {
        eager_prefill,
        ..config(110, 4, 20, 0.0)
    };
    let h = start(FakeShard::gated(110, 1), cfg);
    let mut receivers = vec![h.submit(2, 20)];
    h.shard.allow_steps(1);
    h.shard.wait_calls(2).await; // its prefill, and the decode call waiting at the gate
    h.shard.wait_at_gate().await;
    receivers.extend((0..5).map(|_| h.submit(2, 20)));
    h.shard.allow_steps(1000);
    finish_numbered(receivers, &[20; 6]).await;
    h.assert_no_violations();
    assert!(h.shard.max_reserved() <= 110);
    h.shard.calls()
}

/// The calls before the third Decode.
fn first_calls(calls: &[Call]) -> Vec<Call> {
    let third = calls
        .iter()
        .enumerate()
        .filter(|(_, c)| matches!(c, Call::Decode { .. }))
        .nth(2)
        .map(|(at, _)| at)
        .unwrap();
    calls[..third].to_vec()
}

fn prefill_of(batch_id: u64, request_ids: Vec<u64>) -> Call {
    let prefill_tokens = 2 * request_ids.len() as u32;
    Call::Prefill {
        batch_id,
        request_ids,
        prefill_tokens,
    }
}

fn decode_of(batch_ids: Vec<u64>, request_ids: Vec<u64>) -> Call {
    Call::Decode {
        batch_ids,
        request_ids,
        steps: 1,
    }
}

#[tokio::test]
async fn eager_prefill_prefills_every_batch_that_fits_before_the_next_decode() {
    let calls = five_arrive_while_one_decodes(true).await;
    // Two prefills of at most 4 prompt tokens take the four that fit in the token budget; the
    // fifth waits for a request to finish.
    assert_eq!(
        first_calls(&calls),
        vec![
            prefill_of(0, vec![0]),
            decode_of(vec![0], vec![0]),
            prefill_of(1, vec![1, 2]),
            prefill_of(2, vec![3, 4]),
            decode_of(vec![0, 1, 2], vec![0, 1, 2, 3, 4]),
        ]
    );
    let prefills = requests_of(&calls, |c| matches!(c, Call::Prefill { .. }));
    assert_eq!(prefills.last().unwrap(), &vec![5]);
}

#[tokio::test]
async fn without_eager_prefill_one_prefill_runs_between_two_decode_steps() {
    let calls = five_arrive_while_one_decodes(false).await;
    assert_eq!(
        first_calls(&calls),
        vec![
            prefill_of(0, vec![0]),
            decode_of(vec![0], vec![0]),
            prefill_of(1, vec![1, 2]),
            decode_of(vec![0, 1], vec![0, 1, 2]),
            prefill_of(2, vec![3, 4]),
        ]
    );
    let prefills = requests_of(&calls, |c| matches!(c, Call::Prefill { .. }));
    assert_eq!(prefills.last().unwrap(), &vec![5]);
}
