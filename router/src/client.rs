//! The seam between batching and the shards: the `ShardClient` trait, and its gRPC implementation
//! over unix sockets. Tensor parallelism: every shard receives every call (the same batch on every
//! rank) and the first shard's answer is used.

use crate::decode_stream::{DecodeSteps, ShardStream, ShardedSteps};
use crate::pb;
use crate::pb::lorax_service_client::LoraxServiceClient;
use crate::telemetry;
use async_trait::async_trait;
use futures::future::{join_all, try_join_all};
use hyper_util::rt::TokioIo;
use std::time::Duration;
use tokio::net::UnixStream;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint, Uri};

/// Puts the caller's trace context (`traceparent`) into every call's metadata, so the shard's
/// spans join the router's trace.
#[derive(Clone, Copy, Debug)]
pub struct TraceContext;

impl Interceptor for TraceContext {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        telemetry::inject_current(request.metadata_mut());
        Ok(request)
    }
}

/// A failed shard call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ShardError {
    #[error("cannot connect to shard: {0}")]
    Connection(String),
    #[error("shard error: {0}")]
    Rpc(String),
    /// A gRPC error status with its code (adapter failures are told apart by it).
    #[error("shard error: {message}")]
    Status { code: tonic::Code, message: String },
    #[error("shard answer is missing `{0}`")]
    MissingField(&'static str),
}

impl ShardError {
    pub fn status(code: tonic::Code, message: impl Into<String>) -> Self {
        Self::Status {
            code,
            message: message.into(),
        }
    }

    /// The gRPC code (UNAVAILABLE for connection failures, INTERNAL for the others).
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::Status { code, .. } => *code,
            Self::Connection(_) => tonic::Code::Unavailable,
            Self::Rpc(_) | Self::MissingField(_) => tonic::Code::Internal,
        }
    }

    /// The shard's own message, without the "shard error" prefix.
    pub fn message(&self) -> String {
        match self {
            Self::Status { message, .. } | Self::Rpc(message) => message.clone(),
            other => other.to_string(),
        }
    }
}

impl From<tonic::Status> for ShardError {
    fn from(status: tonic::Status) -> Self {
        Self::status(status.code(), status.message())
    }
}

/// What a shard answers once it has fetched an adapter.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DownloadedAdapter {
    /// The share of the adapter memory budget it will take once loaded.
    pub memory_fraction: f32,
    /// The adapter's own chat template, when its files have one.
    pub chat_template: Option<pb::AdapterChatTemplate>,
}

/// What a shard answers to a load: whether the adapter is installed (false only when `if_fits` was
/// asked and it does not fit the adapter memory budget), and what a download answers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadedAdapter {
    pub loaded: bool,
    pub downloaded: DownloadedAdapter,
}

/// What a prefill or decode step returns.
#[derive(Debug, Default)]
pub struct StepOutput {
    /// One generation per request.
    pub generations: Vec<pb::Generation>,
    /// The batch as cached afterwards; absent when every request finished.
    pub batch: Option<pb::CachedBatch>,
    /// Where the shard spent the call.
    pub timings: StepTimings,
}

/// Where a shard spent a prefill or decode call, as it reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTimings {
    /// Merging batches (decode only).
    pub concat: Duration,
    /// The forward pass and sampling.
    pub forward: Duration,
    /// Per-request host work: detokenization, stop checks.
    pub decode: Duration,
    /// The whole call, inside the shard.
    pub total: Duration,
}

impl StepOutput {
    /// From a Prefill or Decode answer: its generations, batch, and nanoseconds spent merging, in the
    /// forward pass, on host work and in all.
    pub(crate) fn new(
        generations: Vec<pb::Generation>,
        batch: Option<pb::CachedBatch>,
        [concat, forward, decode, total]: [u64; 4],
    ) -> Self {
        let timings = StepTimings {
            concat: Duration::from_nanos(concat),
            forward: Duration::from_nanos(forward),
            decode: Duration::from_nanos(decode),
            total: Duration::from_nanos(total),
        };
        Self {
            generations,
            batch,
            timings,
        }
    }
}

/// The calls the router makes on the model. Implemented over gRPC by `ShardedClient`, and by a
/// fake in tests.
#[async_trait]
pub trait ShardClient: Send + Sync + 'static {
    async fn info(&self) -> Result<pb::InfoResponse, ShardError>;
    async fn health(&self) -> Result<(), ShardError>;
    /// Sizes the KV cache; returns the tokens it can hold (`max_batch_total_tokens`).
    async fn warmup(
        &self,
        max_input_length: u32,
        max_prefill_tokens: u32,
        max_total_tokens: u32,
    ) -> Result<u32, ShardError>;
    async fn prefill(&self, batch: pb::Batch) -> Result<StepOutput, ShardError>;
    /// Up to `steps` decode steps in one call (see `DecodeRequest.steps`).
    async fn decode(
        &self,
        batches: Vec<pb::CachedBatch>,
        steps: u32,
    ) -> Result<StepOutput, ShardError>;
    /// Up to `steps` decode steps, answered one by one (see `DecodeStream` in the proto).
    async fn decode_stream<'a>(
        &'a self,
        batches: Vec<pb::CachedBatch>,
        steps: u32,
    ) -> Result<Box<dyn DecodeSteps + 'a>, ShardError>;
    /// Keeps only `request_ids` of the cached batch.
    async fn filter_batch(
        &self,
        batch_id: u64,
        request_ids: Vec<u64>,
    ) -> Result<Option<pb::CachedBatch>, ShardError>;
    /// Drops one cached batch, or all of them.
    async fn clear_cache(&self, batch_id: Option<u64>) -> Result<(), ShardError>;
    /// Fetches and validates an adapter (off the shard's request path).
    async fn download_adapter(
        &self,
        parameters: pb::AdapterParameters,
        source: pb::AdapterSource,
        api_token: Option<String>,
    ) -> Result<DownloadedAdapter, ShardError>;
    /// Installs an adapter under `index` (between decode steps), fetching it first when the shard
    /// has not. With `if_fits`, an adapter that does not fit the memory budget is left out
    /// (`loaded: false`) rather than refused.
    async fn load_adapter(
        &self,
        parameters: pb::AdapterParameters,
        source: pb::AdapterSource,
        index: u32,
        api_token: Option<String>,
        if_fits: bool,
    ) -> Result<LoadedAdapter, ShardError>;
    /// Removes the adapter at `index` from the device; false when nothing was there.
    async fn offload_adapter(
        &self,
        parameters: pb::AdapterParameters,
        source: pb::AdapterSource,
        index: u32,
    ) -> Result<bool, ShardError>;
    /// Compiles a constrained-decoding grammar into the shard's cache (before its request is
    /// queued); INVALID_ARGUMENT with the reason when it cannot be compiled.
    async fn compile_grammar(&self, grammar: pb::Grammar) -> Result<(), ShardError>;
    /// One pooled vector per input, in the inputs' order (encoder models; FAILED_PRECONDITION
    /// when the model serves no embeddings).
    async fn embed(&self, inputs: Vec<pb::EncoderInput>) -> Result<Vec<pb::Embedding>, ShardError>;
    /// One label and score per token of every input, in the inputs' order (FAILED_PRECONDITION
    /// when the model has no token-classification head).
    async fn classify(
        &self,
        inputs: Vec<pb::EncoderInput>,
    ) -> Result<Vec<pb::ClassifyPredictionList>, ShardError>;
}

/// The generated gRPC client, with the trace context in every call's metadata.
pub type GrpcClient = LoraxServiceClient<InterceptedService<Channel, TraceContext>>;

/// One shard's gRPC client over its unix socket.
#[derive(Clone, Debug)]
pub struct Shard {
    client: GrpcClient,
}

/// Largest gRPC message accepted (prefill answers with prompt log-probabilities can be big).
const MAX_MESSAGE_SIZE: usize = 256 * 1024 * 1024;

impl Shard {
    /// Connects to `path` (a socket path, or a `unix://` URL).
    pub async fn connect_uds(path: &str) -> Result<Self, ShardError> {
        let path = path.strip_prefix("unix://").unwrap_or(path).to_string();
        // The URI is required by tonic but unused: the connector always dials the socket.
        let channel =
            Endpoint::from_static("http://[::]:50051")
                .connect_timeout(Duration::from_secs(10))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .map_err(|e| ShardError::Connection(format!("{e:?}")))?;
        let client = LoraxServiceClient::with_interceptor(channel, TraceContext)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        Ok(Self { client })
    }

    /// The `unix://` URLs of every shard of the model, rank order.
    pub async fn service_discovery(&self) -> Result<Vec<String>, ShardError> {
        let response = self
            .client
            .clone()
            .service_discovery(pb::ServiceDiscoveryRequest {})
            .await?;
        Ok(response.into_inner().urls)
    }

    async fn info(&self) -> Result<pb::InfoResponse, ShardError> {
        Ok(self
            .client
            .clone()
            .info(pb::InfoRequest {})
            .await?
            .into_inner())
    }

    async fn health(&self) -> Result<(), ShardError> {
        self.client.clone().health(pb::HealthRequest {}).await?;
        Ok(())
    }

    async fn warmup(&self, request: pb::WarmupRequest) -> Result<u32, ShardError> {
        let response = self.client.clone().warmup(request).await?.into_inner();
        Ok(response.max_supported_total_tokens)
    }

    async fn prefill(&self, batch: pb::Batch) -> Result<StepOutput, ShardError> {
        let request = pb::PrefillRequest { batch: Some(batch) };
        let r = self.client.clone().prefill(request).await?.into_inner();
        let nanos = [0, r.forward_ns, r.decode_ns, r.total_ns];
        Ok(StepOutput::new(r.generations, r.batch, nanos))
    }

    async fn decode(
        &self,
        batches: Vec<pb::CachedBatch>,
        steps: u32,
    ) -> Result<StepOutput, ShardError> {
        let request = pb::DecodeRequest { batches, steps };
        let r = self.client.clone().decode(request).await?.into_inner();
        let nanos = [r.concat_ns, r.forward_ns, r.decode_ns, r.total_ns];
        Ok(StepOutput::new(r.generations, r.batch, nanos))
    }

    async fn filter_batch(
        &self,
        batch_id: u64,
        request_ids: Vec<u64>,
    ) -> Result<Option<pb::CachedBatch>, ShardError> {
        let request = pb::FilterBatchRequest {
            batch_id,
            request_ids,
        };
        let response = self
            .client
            .clone()
            .filter_batch(request)
            .await?
            .into_inner();
        Ok(response.batch)
    }

    async fn clear_cache(&self, id: Option<u64>) -> Result<(), ShardError> {
        self.client
            .clone()
            .clear_cache(pb::ClearCacheRequest { id })
            .await?;
        Ok(())
    }

    async fn download_adapter(
        &self,
        request: pb::DownloadAdapterRequest,
    ) -> Result<DownloadedAdapter, ShardError> {
        let response = self.client.clone().download_adapter(request).await?;
        let response = response.into_inner();
        if !response.downloaded {
            return Err(ShardError::status(
                tonic::Code::Internal,
                "the shard did not download the adapter",
            ));
        }
        Ok(DownloadedAdapter {
            memory_fraction: response.memory_fraction,
            chat_template: response.chat_template,
        })
    }

    async fn load_adapter(
        &self,
        request: pb::LoadAdapterRequest,
    ) -> Result<LoadedAdapter, ShardError> {
        let if_fits = request.if_fits;
        let response = self.client.clone().load_adapter(request).await?;
        let response = response.into_inner();
        if !response.loaded && !if_fits {
            return Err(ShardError::status(
                tonic::Code::Internal,
                "the shard did not load the adapter",
            ));
        }
        Ok(LoadedAdapter {
            loaded: response.loaded,
            downloaded: DownloadedAdapter {
                memory_fraction: response.memory_fraction,
                chat_template: response.chat_template,
            },
        })
    }

    async fn offload_adapter(
        &self,
        request: pb::OffloadAdapterRequest,
    ) -> Result<bool, ShardError> {
        let response = self.client.clone().offload_adapter(request).await?;
        Ok(response.into_inner().offloaded)
    }

    async fn compile_grammar(&self, grammar: pb::Grammar) -> Result<(), ShardError> {
        let request = pb::CompileGrammarRequest {
            grammar: Some(grammar),
        };
        self.client.clone().compile_grammar(request).await?;
        Ok(())
    }

    async fn embed(&self, inputs: Vec<pb::EncoderInput>) -> Result<Vec<pb::Embedding>, ShardError> {
        let request = pb::EmbedRequest { inputs };
        let response = self.client.clone().embed(request).await?.into_inner();
        Ok(response.embeddings)
    }

    async fn classify(
        &self,
        inputs: Vec<pb::EncoderInput>,
    ) -> Result<Vec<pb::ClassifyPredictionList>, ShardError> {
        let request = pb::ClassifyRequest { inputs };
        let response = self.client.clone().classify(request).await?.into_inner();
        Ok(response.classify_prediction_lists)
    }
}

/// All shards of one model; every call goes to every shard.
///
/// The ranks of a tensor-parallel model run each step together (their collectives wait for one
/// another), so a call ends as soon as any rank fails: a rank that died must not leave the call
/// waiting for the others, which wait for it.
#[derive(Clone, Debug)]
pub struct ShardedClient {
    shards: Vec<Shard>,
}

impl ShardedClient {
    pub fn new(shards: Vec<Shard>) -> Self {
        Self { shards }
    }

    /// Connects to the master shard, asks it for every shard's socket, connects to each.
    pub async fn connect_uds(master_path: &str) -> Result<Self, ShardError> {
        let master = Shard::connect_uds(master_path).await?;
        let urls = master.service_discovery().await?;
        if urls.is_empty() {
            return Ok(Self::new(vec![master]));
        }
        let mut shards = Vec::with_capacity(urls.len());
        for url in &urls {
            shards.push(Shard::connect_uds(url).await?);
        }
        Ok(Self::new(shards))
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// Every shard's answer, in rank order; the first error as soon as any shard fails.
    async fn every<'a, T, F, Fut>(&'a self, call: F) -> Result<Vec<T>, ShardError>
    where
        F: Fn(&'a Shard) -> Fut,
        Fut: std::future::Future<Output = Result<T, ShardError>>,
    {
        if self.shards.is_empty() {
            return Err(ShardError::Connection("no shard".into()));
        }
        try_join_all(self.shards.iter().map(call)).await
    }

    /// Rank 0's answer, once every shard has answered.
    async fn first<'a, T, F, Fut>(&'a self, call: F) -> Result<T, ShardError>
    where
        F: Fn(&'a Shard) -> Fut,
        Fut: std::future::Future<Output = Result<T, ShardError>>,
    {
        Ok(self.every(call).await?.swap_remove(0))
    }
}

#[async_trait]
impl ShardClient for ShardedClient {
    async fn info(&self) -> Result<pb::InfoResponse, ShardError> {
        self.first(|s| s.info()).await
    }

    async fn health(&self) -> Result<(), ShardError> {
        self.first(|s| s.health()).await
    }

    /// The smallest capacity of all shards (they should agree).
    async fn warmup(
        &self,
        max_input_length: u32,
        max_prefill_tokens: u32,
        max_total_tokens: u32,
    ) -> Result<u32, ShardError> {
        let request = pb::WarmupRequest {
            max_input_length,
            max_prefill_tokens,
            max_total_tokens,
        };
        let capacities = self.every(|s| s.warmup(request)).await?;
        Ok(capacities.into_iter().min().unwrap_or_default())
    }

    async fn prefill(&self, batch: pb::Batch) -> Result<StepOutput, ShardError> {
        self.first(|s| s.prefill(batch.clone())).await
    }

    async fn decode(
        &self,
        batches: Vec<pb::CachedBatch>,
        steps: u32,
    ) -> Result<StepOutput, ShardError> {
        self.first(|s| s.decode(batches.clone(), steps)).await
    }

    async fn decode_stream<'a>(
        &'a self,
        batches: Vec<pb::CachedBatch>,
        steps: u32,
    ) -> Result<Box<dyn DecodeSteps + 'a>, ShardError> {
        let streams = self
            .every(|s| ShardStream::open(s.client.clone(), batches.clone(), steps))
            .await?;
        Ok(Box::new(ShardedSteps::new(streams)))
    }

    async fn filter_batch(
        &self,
        batch_id: u64,
        request_ids: Vec<u64>,
    ) -> Result<Option<pb::CachedBatch>, ShardError> {
        self.first(|s| s.filter_batch(batch_id, request_ids.clone()))
            .await
    }

    async fn clear_cache(&self, batch_id: Option<u64>) -> Result<(), ShardError> {
        self.first(|s| s.clear_cache(batch_id)).await
    }

    /// The largest share any shard reports; the chat template of the first shard (every shard
    /// reads the same files).
    async fn download_adapter(
        &self,
        parameters: pb::AdapterParameters,
        source: pb::AdapterSource,
        api_token: Option<String>,
    ) -> Result<DownloadedAdapter, ShardError> {
        let request = pb::DownloadAdapterRequest {
            adapter_parameters: Some(parameters),
            adapter_source: source as i32,
            api_token,
        };
        let answers = self.every(|s| s.download_adapter(request.clone())).await?;
        let mut answers = answers.into_iter();
        let mut combined = answers.next().unwrap_or_default();
        for answer in answers {
            combined.memory_fraction = combined.memory_fraction.max(answer.memory_fraction);
        }
        Ok(combined)
    }

    /// Every shard loads its slice. Where some shard fails (or leaves it out), the adapter is
    /// offloaded from every shard again, so that no rank keeps an adapter the others lack. The
    /// largest share any shard reports; rank 0's chat template.
    async fn load_adapter(
        &self,
        parameters: pb::AdapterParameters,
        source: pb::AdapterSource,
        index: u32,
        api_token: Option<String>,
        if_fits: bool,
    ) -> Result<LoadedAdapter, ShardError> {
        let request = pb::LoadAdapterRequest {
            adapter_parameters: Some(parameters.clone()),
            adapter_source: source as i32,
            adapter_index: index,
            api_token,
            if_fits,
        };
        let results = join_all(self.shards.iter().map(|s| s.load_adapter(request.clone()))).await;
        let answers: Result<Vec<LoadedAdapter>, ShardError> = results.into_iter().collect();
        let combined = answers.map(|answers| {
            let mut answers = answers.into_iter();
            let mut combined = answers.next().unwrap_or_default();
            for answer in answers {
                combined.loaded &= answer.loaded;
                let share = &mut combined.downloaded.memory_fraction;
                *share = share.max(answer.downloaded.memory_fraction);
            }
            combined
        });
        let complete = matches!(&combined, Ok(answer) if answer.loaded);
        if !complete && self.shards.len() > 1 {
            let _ = self.offload_adapter(parameters, source, index).await;
        }
        combined
    }

    async fn offload_adapter(
        &self,
        parameters: pb::AdapterParameters,
        source: pb::AdapterSource,
        index: u32,
    ) -> Result<bool, ShardError> {
        let request = pb::OffloadAdapterRequest {
            adapter_parameters: Some(parameters),
            adapter_source: source as i32,
            adapter_index: index,
        };
        self.first(|s| s.offload_adapter(request.clone())).await
    }

    /// Every shard compiles it (each rank constrains its own copy of the batch); any refusal
    /// fails the call.
    async fn compile_grammar(&self, grammar: pb::Grammar) -> Result<(), ShardError> {
        self.first(|s| s.compile_grammar(grammar.clone())).await
    }

    /// Every rank runs the forward (its collectives need the others); rank 0 answers.
    async fn embed(&self, inputs: Vec<pb::EncoderInput>) -> Result<Vec<pb::Embedding>, ShardError> {
        self.first(|s| s.embed(inputs.clone())).await
    }

    /// Every rank runs the forward (its collectives need the others); rank 0 answers.
    async fn classify(
        &self,
        inputs: Vec<pb::EncoderInput>,
    ) -> Result<Vec<pb::ClassifyPredictionList>, ShardError> {
        self.first(|s| s.classify(inputs.clone())).await
    }
}
