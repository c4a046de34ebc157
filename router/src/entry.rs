//! A request in flight: its queue `Entry` and the messages its stream receives, made from the
//! shard's generations. A leaf shared by the queue, the batcher and the HTTP side.

use crate::api::{AlternativeToken, FinishReason, PrefillToken, Token};
use crate::errors::InferError;
use crate::pb;
use crate::validation::ValidGenerateRequest;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Span;

/// What the batcher sends to a request, in order: at most one `Prefill`, then one message per
/// generated token, the last being `End`.
#[derive(Debug, Clone)]
pub enum InferStreamResponse {
    /// Prompt tokens with log-probabilities (when `decoder_input_details`).
    Prefill(Vec<PrefillToken>),
    /// A generated token.
    Intermediate {
        token: Token,
        top_tokens: Vec<Token>,
    },
    /// The last generated token and the final text.
    End(Finished),
}

/// The last message of a request's stream.
#[derive(Debug, Clone)]
pub struct Finished {
    pub token: Token,
    pub top_tokens: Vec<Token>,
    pub generated_text: GeneratedText,
    /// When the request was queued.
    pub queued: Instant,
    /// When it was put in a batch.
    pub start: Instant,
}

/// The end of a request, from the shard's `GeneratedText`.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedText {
    pub text: String,
    pub generated_tokens: u32,
    pub finish_reason: FinishReason,
    pub seed: Option<u64>,
}

impl From<pb::GeneratedText> for GeneratedText {
    fn from(g: pb::GeneratedText) -> Self {
        Self {
            text: g.text,
            generated_tokens: g.generated_tokens,
            finish_reason: FinishReason::from_proto(g.finish_reason),
            seed: g.seed,
        }
    }
}

/// Where a request's generations go; closed when the client went away.
pub type ResponseSender = mpsc::UnboundedSender<Result<InferStreamResponse, InferError>>;

/// When a request's messages reach its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Each message as its step ends (streaming answers).
    EveryStep,
    /// All at once when the request ends: for answers read only whole. Waking the reader once
    /// instead of after every step keeps the batching loop's turn between two steps short (on a
    /// busy CPU each wake-up was a thread hand-off in the runtime; bench/RESULTS.md, session 17).
    AtEnd,
}

/// The request's client stopped listening.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientGone;

/// A request waiting for, or running in, a batch.
#[derive(Debug)]
pub struct Entry {
    pub request: ValidGenerateRequest,
    pub response_tx: ResponseSender,
    pub delivery: Delivery,
    /// Messages held back until the end (`Delivery::AtEnd`).
    pub held: Vec<InferStreamResponse>,
    /// When it entered the queue.
    pub queue_time: Instant,
    /// When it was put in a batch.
    pub batch_time: Option<Instant>,
    /// Its adapter's index at the shard, given when it is put in a batch (0: base model).
    pub adapter_index: u32,
    /// A health probe: goes into a batch before every waiting request.
    pub priority: bool,
    /// The request's span (the batch steps that serve it link to it).
    pub span: Span,
    /// Open while the request waits for a batch.
    pub queue_span: Span,
    /// Tokens speculative decode steps gave it beyond one per step.
    pub skipped_tokens: u32,
}

impl Entry {
    pub fn new(
        request: ValidGenerateRequest,
        response_tx: ResponseSender,
        delivery: Delivery,
    ) -> Self {
        Self {
            request,
            response_tx,
            delivery,
            held: Vec::new(),
            queue_time: Instant::now(),
            batch_time: None,
            adapter_index: 0,
            priority: false,
            span: Span::current(),
            queue_span: tracing::info_span!("queue"),
            skipped_tokens: 0,
        }
    }

    /// A health probe's entry (see `health`).
    pub fn probe(request: ValidGenerateRequest, response_tx: ResponseSender) -> Self {
        // Probes are not requests: no spans (they would each start a trace).
        Self {
            priority: true,
            span: Span::none(),
            queue_span: Span::none(),
            ..Self::new(request, response_tx, Delivery::AtEnd)
        }
    }

    /// KV-cache tokens this request may use: prompt + max_new_tokens, rounded up to whole blocks.
    pub fn reserved_tokens(&self, block_size: u32) -> u32 {
        let total = self.request.input_length + self.request.stopping_parameters.max_new_tokens;
        round_up(total, block_size)
    }

    /// The entry joins a batch: its wait in the queue ends.
    pub fn admitted(&mut self, now: Instant) {
        self.batch_time = Some(now);
        self.queue_span = Span::none();
    }

    /// Whether the client stopped listening.
    pub fn is_cancelled(&self) -> bool {
        self.response_tx.is_closed()
    }

    /// Hands `message` to the request's stream, or holds it until the end (see `Delivery`).
    pub fn deliver(&mut self, message: InferStreamResponse) -> Result<(), ClientGone> {
        let end = matches!(message, InferStreamResponse::End(_));
        if self.delivery == Delivery::AtEnd && !end {
            self.held.push(message);
            return if self.is_cancelled() {
                Err(ClientGone)
            } else {
                Ok(())
            };
        }
        for held in self.held.drain(..) {
            self.response_tx.send(Ok(held)).map_err(|_| ClientGone)?;
        }
        self.response_tx.send(Ok(message)).map_err(|_| ClientGone)
    }
}

/// `tokens` rounded up to a multiple of `block_size` (a block size of 0 counts as 1).
pub fn round_up(tokens: u32, block_size: u32) -> u32 {
    let block = block_size.max(1);
    tokens.div_ceil(block) * block
}

/// The API's token from a shard generation (alternatives attached when asked for). An
/// alternative the request's sampling rules out (top-k, top-p, typical-p: log-probability -inf)
/// is left out: it is no alternative, and JSON has no -inf (serde writes null, which clients
/// and the documented schema refuse).
pub fn token_from_generation(g: &pb::Generation) -> (Token, Vec<Token>) {
    let mut top_tokens = g
        .top_tokens
        .as_ref()
        .map(tokens_from_proto)
        .unwrap_or_default();
    top_tokens.retain(|t| t.logprob.is_finite());
    let alternative_tokens = (!top_tokens.is_empty()).then(|| {
        top_tokens
            .iter()
            .map(|t| AlternativeToken {
                id: t.id,
                text: t.text.clone(),
                logprob: t.logprob,
            })
            .collect()
    });
    let token = Token {
        id: g.token_id,
        text: g.token_text.clone(),
        logprob: g.token_logprob,
        special: g.token_is_special,
        alternative_tokens,
        skipped: g.skipped,
    };
    (token, top_tokens)
}

/// A proto token list as API tokens.
pub fn tokens_from_proto(tokens: &pb::Tokens) -> Vec<Token> {
    (0..tokens.ids.len())
        .map(|i| Token {
            id: tokens.ids[i],
            text: tokens.texts.get(i).cloned().unwrap_or_default(),
            logprob: tokens.logprobs.get(i).copied().unwrap_or(f32::NAN),
            special: tokens.is_special.get(i).copied().unwrap_or(false),
            alternative_tokens: None,
            skipped: false,
        })
        .collect()
}

/// A proto token list as prompt tokens (NaN log-probabilities become null).
pub fn prefill_from_proto(tokens: &pb::Tokens) -> Vec<PrefillToken> {
    (0..tokens.ids.len())
        .map(|i| PrefillToken {
            id: tokens.ids[i],
            text: tokens.texts.get(i).cloned().unwrap_or_default(),
            logprob: tokens.logprobs.get(i).copied().filter(|l| l.is_finite()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternatives_that_cannot_be_sampled_are_left_out() {
        let generation = pb::Generation {
            token_id: 5,
            token_logprob: -0.1,
            top_tokens: Some(pb::Tokens {
                ids: vec![5, 6, 7],
                logprobs: vec![-0.1, f32::NEG_INFINITY, f32::NAN],
                texts: vec!["a".into(), "b".into(), "c".into()],
                is_special: vec![false; 3],
            }),
            ..Default::default()
        };
        let (token, top_tokens) = token_from_generation(&generation);
        assert_eq!(top_tokens.len(), 1);
        let alternatives = token.alternative_tokens.unwrap();
        assert_eq!(alternatives.len(), 1);
        assert_eq!(alternatives[0].id, 5);
        let json = serde_json::to_string(&top_tokens).unwrap();
        assert!(!json.contains("null"), "{json}");
    }

    fn token(id: u32) -> Token {
        let generation = pb::Generation {
            token_id: id,
            ..Default::default()
        };
        token_from_generation(&generation).0
    }

    fn end(id: u32) -> InferStreamResponse {
        let now = Instant::now();
        InferStreamResponse::End(Finished {
            token: token(id),
            top_tokens: vec![],
            generated_text: GeneratedText {
                text: String::new(),
                generated_tokens: 3,
                finish_reason: FinishReason::Length,
                seed: None,
            },
            queued: now,
            start: now,
        })
    }

    fn step(id: u32) -> InferStreamResponse {
        InferStreamResponse::Intermediate {
            token: token(id),
            top_tokens: vec![],
        }
    }

    fn ids(rx: &mut mpsc::UnboundedReceiver<Result<InferStreamResponse, InferError>>) -> Vec<u32> {
        let mut out = vec![];
        while let Ok(message) = rx.try_recv() {
            out.push(match message.unwrap() {
                InferStreamResponse::Intermediate { token, .. } => token.id,
                InferStreamResponse::End(end) => end.token.id,
                InferStreamResponse::Prefill(_) => 0,
            });
        }
        out
    }

    #[test]
    fn a_request_read_whole_gets_its_messages_at_the_end_in_order() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut entry = Entry::new(crate::testing::valid_request(4, 3), tx, Delivery::AtEnd);
        entry.deliver(InferStreamResponse::Prefill(vec![])).unwrap();
        entry.deliver(step(7)).unwrap();
        entry.deliver(step(8)).unwrap();
        assert!(
            ids(&mut rx).is_empty(),
            "nothing reaches the stream before the end"
        );
        entry.deliver(end(9)).unwrap();
        assert_eq!(ids(&mut rx), vec![0, 7, 8, 9]);
        assert!(entry.held.is_empty());
    }

    #[test]
    fn a_streamed_request_gets_each_message_at_once() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut entry = Entry::new(crate::testing::valid_request(4, 3), tx, Delivery::EveryStep);
        entry.deliver(step(7)).unwrap();
        assert_eq!(ids(&mut rx), vec![7]);
        entry.deliver(end(8)).unwrap();
        assert_eq!(ids(&mut rx), vec![8]);
    }

    #[test]
    fn a_held_request_whose_client_left_is_reported_at_its_next_step() {
        for delivery in [Delivery::AtEnd, Delivery::EveryStep] {
            let (tx, rx) = mpsc::unbounded_channel();
            let mut entry = Entry::new(crate::testing::valid_request(4, 3), tx, delivery);
            entry.deliver(step(7)).unwrap();
            drop(rx);
            assert!(entry.deliver(step(8)).is_err(), "{delivery:?}");
        }
    }

    #[test]
    fn rounding_to_blocks() {
        assert_eq!(round_up(0, 16), 0);
        assert_eq!(round_up(1, 16), 16);
        assert_eq!(round_up(16, 16), 16);
        assert_eq!(round_up(17, 16), 32);
        assert_eq!(round_up(17, 0), 17);
    }
}
