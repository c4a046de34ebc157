//! The gRPC client over unix sockets (no network): two in-process fake shards serve the
//! generated `LoraxService`; the router's `ShardedClient` discovers both through the first and
//! sends every batch call to each.

mod grpc_fake;

use grpc_fake::{two_fake_shards, two_shards};
use lorax_router::client::{ShardClient, ShardedClient, StepTimings};
use lorax_router::pb;
use lorax_router::testing::{
    fake_embedding, fake_token_class, valid_request, AdapterBehaviour, Call, FakeShard,
    FAKE_TIMINGS, REFUSED_ENCODER_TOKEN, REFUSED_GRAMMAR_MARKER,
};
use std::time::Duration;

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
    let (shards, client) = two_shards(dir.path()).await;
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
async fn encoder_calls_reach_every_shard_and_rank_0_answers() {
    let dir = tempfile::tempdir().unwrap();
    let encoder = || FakeShard::encoder(512, true, true);
    let (shards, client) = two_fake_shards(dir.path(), encoder).await;
    let info = client.info().await.unwrap();
    assert!(!info.supports_generation && info.supports_embeddings && info.supports_classification);
    assert_eq!(info.embedding_dim, 4);
    let inputs = vec![
        pb::EncoderInput {
            id: 0,
            input_ids: vec![2, 5, 3],
        },
        pb::EncoderInput {
            id: 1,
            input_ids: vec![2, 9, 10, 3],
        },
    ];
    let embeddings = client.embed(inputs.clone()).await.unwrap();
    assert_eq!(embeddings.len(), 2);
    assert_eq!(embeddings[1].request_id, 1);
    assert_eq!(embeddings[1].values, fake_embedding(&[2, 9, 10, 3]));
    let classes = client.classify(inputs.clone()).await.unwrap();
    assert_eq!(classes[0].predictions, ["B-MISC", "B-PER", "B-MISC"]);
    assert_eq!(classes[0].scores[1], fake_token_class(5).1);
    for shard in &shards {
        let calls = shard.calls();
        assert_eq!(
            calls,
            [
                Call::Embed {
                    inputs: vec![(0, 3), (1, 4)]
                },
                Call::Classify {
                    inputs: vec![(0, 3), (1, 4)]
                },
            ]
        );
    }
    // Refusals keep their code over gRPC: INVALID_ARGUMENT for an input, FAILED_PRECONDITION
    // for a generation step on an encoder.
    let refused = pb::EncoderInput {
        id: 0,
        input_ids: vec![2, REFUSED_ENCODER_TOKEN, 3],
    };
    let err = client.embed(vec![refused]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let err = client.prefill(batch(1)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
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
