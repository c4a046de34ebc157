//! The gRPC client over unix sockets (no network): two in-process fake shards serve the
//! generated `LoraxService`; the router's `ShardedClient` discovers both through the first and
//! sends every batch call to each.

use lorax_router::client::{ShardClient, ShardError, ShardedClient, StepOutput, StepTimings};
use lorax_router::pb;
use lorax_router::pb::lorax_service_server::{LoraxService, LoraxServiceServer};
use lorax_router::testing::{
    valid_request, AdapterBehaviour, Call, FakeShard, FAKE_TIMINGS, REFUSED_GRAMMAR_MARKER,
};
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

fn batch(id: u64) -> pb::Batch {
    let requests: Vec<pb::Request> = (0..2)
        .map(|i| {
            let r = valid_request(3, 2);
            pb::Request {
                id: i,
                input_ids: r.input_ids,
                parameters: Some(r.parameters),
                stopping_parameters: Some(r.stopping_parameters),
                prefill_logprobs: false,
                top_n_tokens: 0,
                adapter_index: 0,
                grammar: None,
            }
        })
        .collect();
    pb::Batch {
        id,
        size: 2,
        max_tokens: 10,
        requests,
    }
}

#[tokio::test]
async fn sharded_client_reaches_every_shard_over_unix_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<_> = (0..2)
        .map(|r| dir.path().join(format!("lorax-server-{r}")))
        .collect();
    let urls: Vec<String> = paths
        .iter()
        .map(|p| format!("unix://{}", p.display()))
        .collect();
    let shards: Vec<Arc<FakeShard>> = (0..2).map(|_| Arc::new(FakeShard::new(512, 16))).collect();
    for (path, shard) in paths.iter().zip(&shards) {
        serve(path, shard.clone(), urls.clone());
    }

    let client = ShardedClient::connect_uds(paths[0].to_str().unwrap())
        .await
        .unwrap();
    assert_eq!(client.len(), 2);
    let info = client.info().await.unwrap();
    assert_eq!(info.block_size, 16);
    assert_eq!(info.eos_token_ids, vec![2]);
    client.health().await.unwrap();
    assert_eq!(client.warmup(16, 64, 32).await.unwrap(), 512);

    let prefill = client.prefill(batch(7)).await.unwrap();
    assert_eq!(prefill.generations.len(), 2);
    let prefill_timings = StepTimings {
        concat: Duration::ZERO,
        ..FAKE_TIMINGS
    };
    assert_eq!(
        prefill.timings, prefill_timings,
        "the shard's times, as sent"
    );
    let cached = prefill.batch.unwrap();
    assert_eq!(cached.request_ids, vec![0, 1]);
    let filtered = client.filter_batch(7, vec![1]).await.unwrap().unwrap();
    assert_eq!(filtered.request_ids, vec![1]);
    let decode = client.decode(vec![filtered], 3).await.unwrap();
    assert_eq!(decode.generations.len(), 1);
    assert!(decode.generations[0].generated_text.is_some());
    assert!(decode.batch.is_none());
    assert_eq!(decode.timings, FAKE_TIMINGS);
    client.clear_cache(None).await.unwrap();

    // Tensor parallel: every shard saw every call.
    for shard in &shards {
        let calls = shard.calls();
        assert!(matches!(calls[0], Call::Prefill { batch_id: 7, .. }));
        assert_eq!(
            calls[1],
            Call::Filter {
                batch_id: 7,
                request_ids: vec![1]
            }
        );
        assert!(matches!(calls[2], Call::Decode { steps: 3, .. }));
        assert_eq!(calls[3], Call::Clear { batch_id: None });
    }

    shards[1].set_healthy(false);
    assert!(
        client.health().await.is_err(),
        "any unhealthy shard fails health"
    );
    shards[1].set_fail_decode(true);
    let cached = client.prefill(batch(8)).await.unwrap().batch;
    let err = client.decode(vec![cached.unwrap()], 1).await.unwrap_err();
    assert!(err.to_string().contains("decode exploded"), "{err}");
}

/// Two shards over unix sockets, and the client that reaches both.
async fn two_shards(dir: &Path) -> (Vec<Arc<FakeShard>>, ShardedClient) {
    two_fake_shards(dir, || FakeShard::new(512, 16)).await
}

async fn two_fake_shards(
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

#[tokio::test]
async fn adapter_calls_reach_every_shard_and_keep_their_status_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (shards, client) = two_shards(dir.path()).await;
    shards[1].set_adapter(
        "a",
        AdapterBehaviour {
            memory_fraction: Some(0.25),
            ..Default::default()
        },
    );
    let params = |id: &str| pb::AdapterParameters {
        adapter_ids: vec![id.into()],
        density: 1.0,
        ..Default::default()
    };
    let source = pb::AdapterSource::Local;
    let token = Some("hf_token".to_string());
    let downloaded = client
        .download_adapter(params("a"), source, token.clone())
        .await
        .unwrap();
    assert_eq!(
        downloaded.memory_fraction, 0.25,
        "the largest share of any shard"
    );
    client
        .load_adapter(params("a"), source, 3, token, false)
        .await
        .unwrap();
    for shard in &shards {
        assert_eq!(
            shard.installed_adapters().get(&3).map(String::as_str),
            Some("a")
        );
        assert_eq!(shard.tokens_seen(), vec![Some("hf_token".to_string()); 2]);
    }
    assert!(client
        .offload_adapter(params("a"), source, 3)
        .await
        .unwrap());
    assert!(!client
        .offload_adapter(params("a"), source, 3)
        .await
        .unwrap());

    shards[0].set_adapter(
        "gated",
        AdapterBehaviour {
            token: Some("right".into()),
            ..Default::default()
        },
    );
    let err = client
        .download_adapter(params("gated"), source, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("api_token is required"), "{err}");
}

#[tokio::test]
async fn a_load_that_fails_on_one_rank_is_undone_on_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let (shards, client) = two_shards(dir.path()).await;
    shards[1].set_adapter(
        "big",
        AdapterBehaviour {
            load_error: Some((
                tonic::Code::ResourceExhausted,
                "out of adapter memory".into(),
            )),
            ..Default::default()
        },
    );
    let params = pb::AdapterParameters {
        adapter_ids: vec!["big".into()],
        density: 1.0,
        ..Default::default()
    };
    let source = pb::AdapterSource::Local;
    client
        .download_adapter(params.clone(), source, None)
        .await
        .unwrap();
    let err = client
        .load_adapter(params, source, 4, None, false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(err.message().contains("out of adapter memory"), "{err}");
    for shard in &shards {
        assert!(
            shard.installed_adapters().is_empty(),
            "every rank is back to no adapter at index 4"
        );
    }
}

#[tokio::test]
async fn a_fetch_and_load_left_out_by_one_rank_is_left_out_by_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let (shards, client) = two_shards(dir.path()).await;
    let share = |fraction: f32| AdapterBehaviour {
        memory_fraction: Some(fraction),
        ..Default::default()
    };
    shards[1].set_adapter("resident", share(0.5));
    shards[1].set_adapter("new", share(0.6));
    let params = |id: &str| pb::AdapterParameters {
        adapter_ids: vec![id.into()],
        density: 1.0,
        ..Default::default()
    };
    let source = pb::AdapterSource::Local;
    let resident = client
        .load_adapter(params("resident"), source, 1, None, true)
        .await
        .unwrap();
    assert!(resident.loaded, "fetched and loaded in one call");
    assert_eq!(resident.downloaded.memory_fraction, 0.5);
    let new = client
        .load_adapter(params("new"), source, 2, None, true)
        .await
        .unwrap();
    assert!(!new.loaded, "rank 1 has no room next to `resident`");
    assert_eq!(new.downloaded.memory_fraction, 0.6, "the largest share");
    for shard in &shards {
        let installed = shard.installed_adapters();
        assert_eq!(installed.get(&1).map(String::as_str), Some("resident"));
        assert!(!installed.contains_key(&2), "no rank keeps `new`");
        assert!(shard.violations().is_empty(), "{:?}", shard.violations());
    }
}

#[tokio::test]
async fn grammars_compile_on_every_shard_and_refusals_keep_their_code() {
    let dir = tempfile::tempdir().unwrap();
    let (shards, client) = two_shards(dir.path()).await;
    let grammar = |value: &str| pb::Grammar {
        r#type: pb::GrammarType::Regex as i32,
        value: value.into(),
    };
    client.compile_grammar(grammar("[0-9]+")).await.unwrap();
    for shard in &shards {
        assert_eq!(
            shard.calls(),
            vec![Call::CompileGrammar {
                grammar: grammar("[0-9]+")
            }]
        );
    }
    let err = client
        .compile_grammar(grammar(REFUSED_GRAMMAR_MARKER))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("cannot compile the grammar"),
        "{err}"
    );
    // Every shard got it, even though the first refused.
    assert!(shards.iter().all(|s| s.calls().len() == 2));
}

#[tokio::test]
async fn decode_streams_answer_step_by_step_on_every_shard_and_stop_together() {
    let dir = tempfile::tempdir().unwrap();
    let (shards, client) = two_fake_shards(dir.path(), || FakeShard::gated(512, 16)).await;
    let allow = |n| shards.iter().for_each(|s| s.allow_steps(n));
    let mut prefill = batch(7);
    prefill.requests[0].stopping_parameters = Some(valid_request(0, 100).stopping_parameters);
    allow(1);
    let cached = client.prefill(prefill).await.unwrap().batch.unwrap();

    // Request 1 ends at its second token; the call after its three steps.
    allow(3);
    let mut call = client.decode_stream(vec![cached], 3).await.unwrap();
    let mut per_step = Vec::new();
    let mut last = None;
    while let Some(step) = call.next().await {
        let step = step.unwrap();
        assert_eq!(step.timings, FAKE_TIMINGS, "the shard's times, as sent");
        per_step.push(
            step.generations
                .iter()
                .map(|g| g.request_id)
                .collect::<Vec<_>>(),
        );
        last = step.batch;
    }
    assert_eq!(per_step, vec![vec![0, 1], vec![0], vec![0]]);
    drop(call);

    // A stop while the second step waits: that step still arrives, then both streams end.
    let kept = client
        .filter_batch(last.unwrap().id, vec![0])
        .await
        .unwrap();
    allow(1);
    let mut call = client.decode_stream(vec![kept.unwrap()], 32).await.unwrap();
    call.next().await.unwrap().unwrap();
    call.stopper().stop();
    while !shards.iter().all(|s| s.calls().contains(&Call::StopStream)) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    allow(32);
    let mut after_stop = Vec::new();
    while let Some(step) = call.next().await {
        after_stop.push(step.unwrap());
    }
    assert_eq!(after_stop.len(), 1, "the step in progress, then the end");
    assert!(after_stop[0].batch.is_some(), "request 0 still runs");
    for shard in &shards {
        let steps: Vec<u32> = shard
            .calls()
            .iter()
            .filter_map(|c| match c {
                Call::Decode { steps, .. } => Some(*steps),
                _ => None,
            })
            .collect();
        assert_eq!(steps, vec![3, 32], "one call a stream");
        assert!(shard.violations().is_empty(), "{:?}", shard.violations());
    }
    drop(call);

    shards[1].set_fail_decode(true);
    allow(2);
    let cached = client.prefill(batch(8)).await.unwrap().batch.unwrap();
    let mut call = client.decode_stream(vec![cached], 4).await.unwrap();
    let err = call.next().await.unwrap().unwrap_err();
    assert!(err.to_string().contains("decode exploded"), "{err}");
}

#[tokio::test]
async fn connecting_to_a_missing_socket_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nothing-here");
    let err = ShardedClient::connect_uds(path.to_str().unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot connect"), "{err}");
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos() as u64
}
