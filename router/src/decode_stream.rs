//! Decode steps answered one by one (the `DecodeStream` RPC): the shard sends each step's tokens as
//! soon as the step is done and runs the next one meanwhile, so a call of many steps costs one round
//! trip yet streams every token at once; the router asks it to stop when a request arrives or a
//! client goes away, so admission and cancellation wait for the step in progress only.

use crate::client::{GrpcClient, ShardError, StepOutput};
use crate::pb;
use async_trait::async_trait;
use futures::future::join_all;
use futures::StreamExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// A decode call whose steps arrive one at a time.
#[async_trait]
pub trait DecodeSteps: Send {
    /// The next step's output; `None` once the call has ended (its last step was sent).
    async fn next(&mut self) -> Option<Result<StepOutput, ShardError>>;
    /// What stops the call. A handle apart from the call, since a stop is sent while `next` waits
    /// (dropping that wait could lose a step the shard has run).
    fn stopper(&self) -> Stopper;
}

/// Asks a decode call to end after the step in progress; once is enough, later asks do nothing.
#[derive(Clone, Debug, Default)]
pub struct Stopper {
    stopped: Arc<AtomicBool>,
    /// The call's message senders, one per shard (none for the fake shard's calls).
    senders: Vec<mpsc::Sender<pb::DecodeRequest>>,
}

impl Stopper {
    pub fn stop(&self) {
        if !self.stopped.swap(true, Ordering::SeqCst) {
            for sender in &self.senders {
                // Any message after the first is a stop; the channel has room for it.
                let _ = sender.try_send(pb::DecodeRequest::default());
            }
        }
    }

    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }
}

/// One shard's side of a `DecodeStream` call: the sender of the caller's messages and the shard's
/// answers.
pub struct ShardStream {
    requests: mpsc::Sender<pb::DecodeRequest>,
    answers: Streaming<pb::DecodeResponse>,
}

impl ShardStream {
    /// Opens the call with its first message. The shard answers the first step before the call's
    /// headers, so this returns once that step is done.
    pub async fn open(
        mut client: GrpcClient,
        batches: Vec<pb::CachedBatch>,
        steps: u32,
    ) -> Result<Self, ShardError> {
        // Room for the first message and the stop: sending never waits.
        let (sender, receiver) = mpsc::channel(2);
        let _ = sender.try_send(pb::DecodeRequest { batches, steps });
        let answers = client
            .decode_stream(ReceiverStream::new(receiver))
            .await?
            .into_inner();
        Ok(Self {
            requests: sender,
            answers,
        })
    }

    async fn next(&mut self) -> Option<Result<StepOutput, ShardError>> {
        match self.answers.next().await? {
            Ok(r) => {
                let nanos = [r.concat_ns, r.forward_ns, r.decode_ns, r.total_ns];
                Some(Ok(StepOutput::new(r.generations, r.batch, nanos)))
            }
            Err(status) => Some(Err(status.into())),
        }
    }
}

/// A `DecodeStream` call on every shard (tensor parallelism): each step is awaited from every rank
/// and rank 0's answer used, as for the unary calls. The ranks agree among themselves on when to
/// stop, so their streams end at the same step.
pub struct ShardedSteps {
    streams: Vec<ShardStream>,
    stopper: Stopper,
}

impl ShardedSteps {
    pub fn new(streams: Vec<ShardStream>) -> Self {
        let senders = streams.iter().map(|s| s.requests.clone()).collect();
        let stopper = Stopper {
            stopped: Arc::default(),
            senders,
        };
        Self { streams, stopper }
    }
}

#[async_trait]
impl DecodeSteps for ShardedSteps {
    async fn next(&mut self) -> Option<Result<StepOutput, ShardError>> {
        let answers = join_all(self.streams.iter_mut().map(ShardStream::next)).await;
        let mut first = None;
        let mut ended = 0;
        for answer in answers {
            match answer {
                None => ended += 1,
                Some(Err(err)) => return Some(Err(err)),
                Some(Ok(output)) => {
                    first.get_or_insert(output);
                }
            }
        }
        if ended > 0 && first.is_some() {
            return Some(Err(ShardError::Rpc(
                "the shards ended a decode stream at different steps".into(),
            )));
        }
        first.map(Ok)
    }

    fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }
}
