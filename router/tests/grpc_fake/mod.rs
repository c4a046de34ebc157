//! The fake shards the gRPC tests reach over unix sockets: the generated `LoraxService` served in
//! process over a `FakeShard`, which records every call and answers as configured.

#![allow(dead_code)]

use lorax_router::client::{ShardClient, ShardError, ShardedClient, StepOutput};
use lorax_router::pb;
use lorax_router::pb::lorax_service_server::{LoraxService, LoraxServiceServer};
use lorax_router::testing::{Call, FakeShard};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};

struct Service {
    shard: Arc<FakeShard>,
    urls: Vec<String>,
}

fn status(err: ShardError) -> Status {
    Status::new(err.code(), err.message())
}

fn decode_response(step: StepOutput) -> pb::DecodeResponse {
    pb::DecodeResponse {
        generations: step.generations,
        batch: step.batch,
        concat_ns: nanos(step.timings.concat),
        forward_ns: nanos(step.timings.forward),
        decode_ns: nanos(step.timings.decode),
        total_ns: nanos(step.timings.total),
    }
}

#[tonic::async_trait]
impl LoraxService for Service {
    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        Ok(Response::new(self.shard.info().await.map_err(status)?))
    }

    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        self.shard.health().await.map_err(status)?;
        Ok(Response::new(pb::HealthResponse {}))
    }

    async fn service_discovery(
        &self,
        _: Request<pb::ServiceDiscoveryRequest>,
    ) -> Result<Response<pb::ServiceDiscoveryResponse>, Status> {
        Ok(Response::new(pb::ServiceDiscoveryResponse {
            urls: self.urls.clone(),
        }))
    }

    async fn warmup(
        &self,
        r: Request<pb::WarmupRequest>,
    ) -> Result<Response<pb::WarmupResponse>, Status> {
        let r = r.into_inner();
        let tokens = self
            .shard
            .warmup(r.max_input_length, r.max_prefill_tokens, r.max_total_tokens)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::WarmupResponse {
            max_supported_total_tokens: tokens,
        }))
    }

    async fn prefill(
        &self,
        r: Request<pb::PrefillRequest>,
    ) -> Result<Response<pb::PrefillResponse>, Status> {
        let batch = r
            .into_inner()
            .batch
            .ok_or_else(|| Status::invalid_argument("no batch"))?;
        let step = self.shard.prefill(batch).await.map_err(status)?;
        Ok(Response::new(pb::PrefillResponse {
            generations: step.generations,
            batch: step.batch,
            forward_ns: nanos(step.timings.forward),
            decode_ns: nanos(step.timings.decode),
            total_ns: nanos(step.timings.total),
        }))
    }

    async fn decode(
        &self,
        r: Request<pb::DecodeRequest>,
    ) -> Result<Response<pb::DecodeResponse>, Status> {
        let r = r.into_inner();
        let step = self
            .shard
            .decode(r.batches, r.steps)
            .await
            .map_err(status)?;
        Ok(Response::new(decode_response(step)))
    }

    type DecodeStreamStream = ReceiverStream<Result<pb::DecodeResponse, Status>>;

    /// The fake shard's steps, sent one by one; a second message stops the call after the step
    /// in progress, as the real shard does.
    async fn decode_stream(
        &self,
        r: Request<tonic::Streaming<pb::DecodeRequest>>,
    ) -> Result<Response<Self::DecodeStreamStream>, Status> {
        let mut messages = r.into_inner();
        let first = messages
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no first message"))?;
        let (answers, receiver) = mpsc::channel(4);
        let shard = self.shard.clone();
        tokio::spawn(async move {
            let mut call = shard
                .decode_stream(first.batches, first.steps)
                .await
                .unwrap();
            let stopper = call.stopper();
            let stopped_shard = shard.clone();
            tokio::spawn(async move {
                if let Ok(Some(_)) = messages.message().await {
                    stopper.stop();
                    stopped_shard.record(Call::StopStream);
                }
            });
            while let Some(step) = call.next().await {
                let answer = step.map(decode_response).map_err(status);
                if answers.send(answer).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn filter_batch(
        &self,
        r: Request<pb::FilterBatchRequest>,
    ) -> Result<Response<pb::FilterBatchResponse>, Status> {
        let r = r.into_inner();
        let batch = self
            .shard
            .filter_batch(r.batch_id, r.request_ids)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::FilterBatchResponse { batch }))
    }

    async fn clear_cache(
        &self,
        r: Request<pb::ClearCacheRequest>,
    ) -> Result<Response<pb::ClearCacheResponse>, Status> {
        self.shard
            .clear_cache(r.into_inner().id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ClearCacheResponse {}))
    }

    async fn download_adapter(
        &self,
        r: Request<pb::DownloadAdapterRequest>,
    ) -> Result<Response<pb::DownloadAdapterResponse>, Status> {
        let r = r.into_inner();
        let source = r.adapter_source();
        let parameters = r.adapter_parameters.unwrap_or_default();
        let downloaded = self
            .shard
            .download_adapter(parameters, source, r.api_token)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DownloadAdapterResponse {
            downloaded: true,
            memory_fraction: downloaded.memory_fraction,
            chat_template: downloaded.chat_template,
        }))
    }

    async fn load_adapter(
        &self,
        r: Request<pb::LoadAdapterRequest>,
    ) -> Result<Response<pb::LoadAdapterResponse>, Status> {
        let r = r.into_inner();
        let source = r.adapter_source();
        let parameters = r.adapter_parameters.unwrap_or_default();
        let answer = self
            .shard
            .load_adapter(parameters, source, r.adapter_index, r.api_token, r.if_fits)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::LoadAdapterResponse {
            loaded: answer.loaded,
            memory_fraction: answer.downloaded.memory_fraction,
            chat_template: answer.downloaded.chat_template,
        }))
    }

    async fn offload_adapter(
        &self,
        r: Request<pb::OffloadAdapterRequest>,
    ) -> Result<Response<pb::OffloadAdapterResponse>, Status> {
        let r = r.into_inner();
        let source = r.adapter_source();
        let parameters = r.adapter_parameters.unwrap_or_default();
        let offloaded = self
            .shard
            .offload_adapter(parameters, source, r.adapter_index)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::OffloadAdapterResponse { offloaded }))
    }

    async fn compile_grammar(
        &self,
        r: Request<pb::CompileGrammarRequest>,
    ) -> Result<Response<pb::CompileGrammarResponse>, Status> {
        let grammar = r.into_inner().grammar.unwrap_or_default();
        self.shard.compile_grammar(grammar).await.map_err(status)?;
        Ok(Response::new(pb::CompileGrammarResponse {}))
    }

    async fn embed(
        &self,
        r: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let inputs = r.into_inner().inputs;
        let embeddings = self.shard.embed(inputs).await.map_err(status)?;
        Ok(Response::new(pb::EmbedResponse { embeddings }))
    }

    async fn classify(
        &self,
        r: Request<pb::ClassifyRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        let inputs = r.into_inner().inputs;
        let classify_prediction_lists = self.shard.classify(inputs).await.map_err(status)?;
        Ok(Response::new(pb::ClassifyResponse {
            classify_prediction_lists,
        }))
    }
}

fn serve(path: &Path, shard: Arc<FakeShard>, urls: Vec<String>) {
    let listener = UnixListener::bind(path).unwrap();
    let service = LoraxServiceServer::new(Service { shard, urls });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
}

/// Two shards over unix sockets, and the client that reaches both.
pub async fn two_shards(dir: &Path) -> (Vec<Arc<FakeShard>>, ShardedClient) {
    two_fake_shards(dir, || FakeShard::new(512, 16)).await
}

pub async fn two_fake_shards(
    dir: &Path,
    fake: impl Fn() -> FakeShard,
) -> (Vec<Arc<FakeShard>>, ShardedClient) {
    let paths: Vec<_> = (0..2)
        .map(|r| dir.join(format!("lorax-server-{r}")))
        .collect();
    let urls: Vec<String> = paths
        .iter()
        .map(|p| format!("unix://{}", p.display()))
        .collect();
    let shards: Vec<Arc<FakeShard>> = (0..2).map(|_| Arc::new(fake())).collect();
    for (path, shard) in paths.iter().zip(&shards) {
        serve(path, shard.clone(), urls.clone());
    }
    let client = ShardedClient::connect_uds(paths[0].to_str().unwrap())
        .await
        .unwrap();
    (shards, client)
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos() as u64
}
