//! The encoder endpoints end to end (router → encoder batching task → fake encoder shard):
//! `/embed`, `/v1/embeddings`, `/classify`, `/classify_batch`, their limits and refusals, the
//! generation endpoints refused on an encoder model, and concurrent requests sharing calls.

mod common;

use axum::http::StatusCode;
use axum::Router;
use base64::Engine;
use common::*;
use lorax_router::cors::CorsOptions;
use lorax_router::encoder::Encoders;
use lorax_router::health::HealthConfig;
use lorax_router::server::router;
use lorax_router::testing::{
    fake_embedding, test_encoder_tokenizer, Call, FakeShard, FAKE_EMBEDDING_DIM,
};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// An encoder app over `shard`, and the handle of its encoder batching task.
fn setup(shard: &Arc<FakeShard>, max_concurrent_requests: usize) -> (Router, Encoders) {
    let (adapters, health) = (encoder_adapter_config(), HealthConfig::default());
    let state = app_state(
        shard.clone(),
        max_concurrent_requests,
        adapters,
        exchange(),
        health,
    );
    let encoders = state.encoders.clone();
    (
        router(state, CorsOptions::default().layer().unwrap()),
        encoders,
    )
}

/// A fake encoder serving embeddings and classification, its app and its encoder handle.
fn both(gated: bool, max_concurrent_requests: usize) -> (Arc<FakeShard>, Router, Encoders) {
    let shard = Arc::new(match gated {
        true => FakeShard::gated_encoder(1000, true, true),
        false => FakeShard::encoder(1000, true, true),
    });
    let (app, encoders) = setup(&shard, max_concurrent_requests);
    (shard, app, encoders)
}

/// The token ids the router sends for `text`.
fn ids(text: &str) -> Vec<u32> {
    let encoding = test_encoder_tokenizer().encode(text, true).unwrap();
    encoding.get_ids().to_vec()
}

fn embedding_of(text: &str) -> Value {
    json!(fake_embedding(&ids(text)))
}

/// Waits until `n` inputs wait for a call (the 60 s bound only catches a test that is broken).
async fn wait_waiting(encoders: &Encoders, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while encoders.waiting() != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected {n} waiting inputs, got {}",
            encoders.waiting()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The encoder calls the shard received: (is Embed, the inputs' token counts).
fn encoder_calls(shard: &FakeShard) -> Vec<(bool, Vec<usize>)> {
    shard
        .calls()
        .into_iter()
        .filter_map(|call| match call {
            Call::Embed { inputs } => Some((true, inputs.iter().map(|i| i.1).collect())),
            Call::Classify { inputs } => Some((false, inputs.iter().map(|i| i.1).collect())),
            _ => None,
        })
        .collect()
}

fn spawn_post(app: &Router, uri: &'static str, body: Value) -> tokio::task::JoinHandle<Answer> {
    let app = app.clone();
    tokio::spawn(async move { post(&app, uri, body).await })
}

#[tokio::test]
async fn embed_answers_lorax_shape_and_the_client_body_parses() {
    let (shard, app, _) = both(false, 4);
    let text = "John lives in New York";
    // What lorax-client's `Client.embed` sends.
    let body = json!({"inputs": text, "parameters": null, "stream": false});
    let answer = post(&app, "/embed", body).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.json());
    assert_eq!(answer.json(), json!({"embeddings": embedding_of(text)}));
    assert_eq!(answer.headers["x-prompt-tokens"], "7");
    assert_eq!(answer.headers["x-model-id"], "test/model");
    // The model's own id names the base model: accepted.
    let base = json!({"inputs": text, "parameters": {"adapter_id": "test/model"}});
    assert_eq!(post(&app, "/embed", base).await.status, StatusCode::OK);
    // The generation loop never ran a step for it.
    let steps = shard.calls().into_iter().filter(|c| {
        matches!(
            c,
            Call::Prefill { .. } | Call::Decode { .. } | Call::Filter { .. }
        )
    });
    assert_eq!(steps.count(), 0);
}

#[tokio::test]
async fn openai_embeddings_float_and_base64_with_loraxs_key() {
    let (_, app, _) = both(false, 4);
    let texts = ["john lives in new york", "Zürich"];
    let body = json!({"input": texts, "model": "my-embedder", "encoding_format": "float"});
    let answer = post(&app, "/v1/embeddings", body).await.json();
    assert_eq!(answer["object"], "list");
    assert_eq!(answer["model"], "my-embedder");
    let tokens = ids(texts[0]).len() + ids(texts[1]).len();
    assert_eq!(
        answer["usage"],
        json!({"prompt_tokens": tokens, "total_tokens": tokens})
    );
    assert_eq!(answer["embeddings"], answer["data"]);
    for (i, text) in texts.iter().enumerate() {
        let item = &answer["data"][i];
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        assert_eq!(item["embedding"], embedding_of(text));
    }

    // The `openai` client's default: base64 of little-endian float32; `model` may be absent.
    let body = json!({"input": texts[1], "encoding_format": "base64", "dimensions": 4});
    let answer = post(&app, "/v1/embeddings", body).await.json();
    assert_eq!(answer["model"], "test/model");
    let encoded = answer["data"][0]["embedding"].as_str().unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, fake_embedding(&ids(texts[1])));
    assert_eq!(decoded.len(), FAKE_EMBEDDING_DIM as usize);
    assert_eq!(answer["embeddings"], answer["data"]);

    let shorter = json!({"input": "x", "dimensions": 2});
    let answer = post(&app, "/v1/embeddings", shorter).await;
    assert_error(&answer, 422, "validation");
    let message = answer.json()["error"].as_str().unwrap().to_string();
    assert!(message.contains("`dimensions` must be the model's embedding size, 4"));
    let unknown = json!({"input": "x", "encoding_format": "int8"});
    assert_error(
        &post(&app, "/v1/embeddings", unknown).await,
        422,
        "validation",
    );
}

#[tokio::test]
async fn classify_groups_entities_with_character_offsets_and_the_inputs_words() {
    let (_, app, _) = both(false, 4);
    // [CLS] john ##ny lives in sao paulo and zurich . [SEP]; the fake labels [CLS]/[SEP]
    // B-MISC (dropped: special tokens), john B-PER, ##ny I-PER, sao B-LOC, paulo I-LOC, zurich
    // B-LOC, the rest O. Scores: 0.5 + (id % 10) * 0.05.
    let text = "Johnny lives in São Paulo and Zürich.";
    let body = json!({"inputs": text, "parameters": null, "stream": false});
    let answer = post(&app, "/classify", body).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.json());
    let found = answer.json();
    let expected = [
        ("PER", "Johnny", 0, 6, (0.75 + 0.8) / 2.0),
        ("LOC", "São Paulo", 16, 25, (0.6 + 0.65) / 2.0),
        ("LOC", "Zürich", 30, 36, 0.55),
    ];
    assert_eq!(found.as_array().unwrap().len(), expected.len(), "{found}");
    for (entity, (group, word, start, end, score)) in found.as_array().unwrap().iter().zip(expected)
    {
        assert_eq!(entity["entity_group"], group);
        assert_eq!(entity["word"], word);
        assert_eq!(
            (entity["start"].as_u64(), entity["end"].as_u64()),
            (Some(start), Some(end))
        );
        assert!(
            (entity["score"].as_f64().unwrap() - score).abs() < 1e-6,
            "{entity}"
        );
        // The word is the input's characters from start to end.
        let chars: String = text
            .chars()
            .skip(start as usize)
            .take((end - start) as usize)
            .collect();
        assert_eq!(entity["word"], chars);
    }

    let texts = [text, "the new york acme", "and the"];
    let body = json!({"inputs": texts, "parameters": null, "stream": false});
    let batch = post(&app, "/classify_batch", body).await;
    assert_eq!(batch.status, StatusCode::OK);
    let batch = batch.json();
    assert_eq!(batch.as_array().unwrap().len(), 3);
    for (i, text) in texts.iter().enumerate() {
        let alone = post(&app, "/classify", json!({"inputs": text}))
            .await
            .json();
        assert_eq!(batch[i], alone, "{text}");
    }
    assert_eq!(batch[1][0]["word"], "new york");
    assert_eq!(batch[1][1]["entity_group"], "ORG");
    assert_eq!(batch[2], json!([]));
}

#[tokio::test]
async fn concurrent_requests_share_calls_and_each_gets_its_own_answer() {
    let (shard, app, encoders) = both(true, 16);
    // The first request's call waits at the gate; the others arrive meanwhile.
    let first = spawn_post(&app, "/embed", json!({"inputs": "john"}));
    shard.wait_at_gate().await;
    let texts = ["new york", "john lives in zurich", "sao paulo and acme"];
    let others: Vec<_> = texts
        .iter()
        .map(|t| spawn_post(&app, "/embed", json!({"inputs": t})))
        .collect();
    let classified = spawn_post(&app, "/classify", json!({"inputs": "john lives in york"}));
    wait_waiting(&encoders, 4).await;
    shard.allow_steps(3);
    assert_eq!(
        first.await.unwrap().json()["embeddings"],
        embedding_of("john")
    );
    for (text, answer) in texts.iter().zip(others) {
        assert_eq!(
            answer.await.unwrap().json()["embeddings"],
            embedding_of(text)
        );
    }
    let entities = classified.await.unwrap().json();
    assert_eq!(entities[0]["word"], "john");
    // One call for the first, one for the three embeddings that waited together (in arrival
    // order), one for the classification (another RPC).
    let calls = encoder_calls(&shard);
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!(calls[0], (true, vec![3]));
    let mut shared = calls[1].1.clone();
    shared.sort();
    assert_eq!((calls[1].0, shared), (true, vec![4, 6, 6]));
    assert_eq!(calls[2], (false, vec![6]));
}

#[tokio::test]
async fn a_call_holds_at_most_the_prefill_budget_of_tokens() {
    let (shard, app, encoders) = both(true, 16);
    let blocker = spawn_post(&app, "/embed", json!({"inputs": "john"}));
    shard.wait_at_gate().await;
    // Ten inputs of 12 tokens (10 words, [CLS], [SEP]): 120 > the budget of 100.
    let text = "john lives in new york and the john lives in";
    assert_eq!(ids(text).len(), 12);
    let batch = spawn_post(&app, "/classify_batch", json!({"inputs": vec![text; 10]}));
    wait_waiting(&encoders, 10).await;
    shard.allow_steps(3);
    assert_eq!(blocker.await.unwrap().status, StatusCode::OK);
    let answer = batch.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json().as_array().unwrap().len(), 10);
    let calls = encoder_calls(&shard);
    assert_eq!(calls[1], (false, vec![12; 8]));
    assert_eq!(calls[2], (false, vec![12; 2]));
}

#[tokio::test]
async fn an_input_the_model_refuses_fails_alone() {
    let (shard, app, encoders) = both(true, 16);
    let blocker = spawn_post(&app, "/embed", json!({"inputs": "john"}));
    shard.wait_at_gate().await;
    // "fox" makes the fake refuse the whole call (INVALID_ARGUMENT).
    let bad = spawn_post(&app, "/embed", json!({"inputs": "the fox"}));
    wait_waiting(&encoders, 1).await;
    let good = spawn_post(&app, "/embed", json!({"inputs": "new york"}));
    wait_waiting(&encoders, 2).await;
    shard.allow_steps(4);
    assert_eq!(blocker.await.unwrap().status, StatusCode::OK);
    let bad = bad.await.unwrap();
    assert_error(&bad, 422, "validation");
    assert!(bad.json()["error"]
        .as_str()
        .unwrap()
        .contains("the model refused the input"));
    let good = good.await.unwrap();
    assert_eq!(good.status, StatusCode::OK, "{:?}", good.json());
    assert_eq!(good.json()["embeddings"], embedding_of("new york"));
    // The shared call failed; each of its inputs went again alone.
    let calls: Vec<Vec<usize>> = encoder_calls(&shard).into_iter().map(|c| c.1).collect();
    assert_eq!(calls, [vec![3], vec![4, 4], vec![4], vec![4]]);
}

#[tokio::test]
async fn limits_are_422_with_the_numbers() {
    let (_, app, _) = both(false, 4);
    for (uri, body) in [
        ("/embed", json!({"inputs": ""})),
        ("/classify", json!({"inputs": ""})),
        ("/v1/embeddings", json!({"input": ""})),
        ("/v1/embeddings", json!({"input": ["john", ""]})),
        ("/classify_batch", json!({"inputs": ["john", ""]})),
    ] {
        let answer = post(&app, uri, body.clone()).await;
        assert_error(&answer, 422, "validation");
        assert!(
            answer.json()["error"]
                .as_str()
                .unwrap()
                .contains("cannot be empty"),
            "{body}"
        );
    }
    let second_empty = post(&app, "/classify_batch", json!({"inputs": ["john", ""]})).await;
    assert!(second_empty.json()["error"]
        .as_str()
        .unwrap()
        .contains("`inputs[1]`"));

    // 11 words + [CLS] + [SEP] = 13 tokens: over the model's 12 positions (--max-input-length
    // is 16 in these tests): refused, never truncated.
    let long = "john lives in new york and the john lives in york";
    assert_eq!(ids(long).len(), 13);
    for (uri, body) in [
        ("/embed", json!({"inputs": long})),
        ("/classify", json!({"inputs": long})),
        ("/v1/embeddings", json!({"input": [long]})),
    ] {
        let answer = post(&app, uri, body).await;
        assert_error(&answer, 422, "validation");
        let message = answer.json()["error"].as_str().unwrap().to_string();
        assert!(
            message.contains("at most 12 tokens") && message.contains("Given: 13"),
            "{message}"
        );
    }
    let twelve = "john lives in new york and the john lives in";
    assert_eq!(
        post(&app, "/embed", json!({"inputs": twelve})).await.status,
        StatusCode::OK
    );

    for (uri, body) in [
        ("/v1/embeddings", json!({"input": []})),
        ("/classify_batch", json!({"inputs": []})),
    ] {
        let answer = post(&app, uri, body).await;
        assert_error(&answer, 422, "validation");
        assert!(answer.json()["error"]
            .as_str()
            .unwrap()
            .contains("at least one input"));
    }
    // More inputs than --max-concurrent-requests (4) could never be admitted.
    let five = json!({"inputs": vec!["john"; 5]});
    let answer = post(&app, "/classify_batch", five).await;
    assert_error(&answer, 422, "validation");
    let message = answer.json()["error"].as_str().unwrap().to_string();
    assert!(
        message.contains("at most 4 inputs") && message.contains("Given: 5"),
        "{message}"
    );
    let answer = post(&app, "/v1/embeddings", json!({"input": vec!["john"; 5]})).await;
    assert_error(&answer, 422, "validation");
    assert_eq!(
        post(&app, "/v1/embeddings", json!({"input": vec!["john"; 4]}))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn each_input_takes_a_concurrency_permit() {
    let (shard, app, encoders) = both(true, 4);
    // Two inputs hold two of the four permits while their call waits at the gate.
    let held = spawn_post(&app, "/classify_batch", json!({"inputs": ["john", "york"]}));
    shard.wait_at_gate().await;
    let three = post(&app, "/v1/embeddings", json!({"input": ["a", "b", "c"]})).await;
    assert_error(&three, 429, "overloaded");
    let two = spawn_post(&app, "/v1/embeddings", json!({"input": ["john", "new"]}));
    wait_waiting(&encoders, 2).await;
    shard.allow_steps(2);
    assert_eq!(held.await.unwrap().status, StatusCode::OK);
    assert_eq!(two.await.unwrap().status, StatusCode::OK);
}

#[tokio::test]
async fn adapters_are_refused_as_for_generation() {
    let (_, app, _) = both(false, 4);
    for (uri, body) in [
        (
            "/embed",
            json!({"inputs": "john", "parameters": {"adapter_id": "org/lora"}}),
        ),
        (
            "/classify",
            json!({"inputs": "john", "parameters": {"adapter_id": "org/lora"}}),
        ),
        (
            "/v1/embeddings",
            json!({"input": "john", "parameters": {"merged_adapters": {"ids": ["a"]}}}),
        ),
    ] {
        let answer = post(&app, uri, body).await;
        assert_error(&answer, 422, "validation");
        let message = answer.json()["error"].as_str().unwrap().to_string();
        assert!(
            message.contains("BertModel does not support dynamic adapter loading"),
            "{message}"
        );
    }
    // `model` names no adapter on /v1/embeddings (OpenAI clients must send one).
    let named = json!({"input": "john", "model": "org/lora"});
    assert_eq!(
        post(&app, "/v1/embeddings", named).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_task_the_model_does_not_serve_is_422() {
    let embedder = Arc::new(FakeShard::encoder(1000, true, false));
    let (app, _) = setup(&embedder, 4);
    for (uri, body) in [
        ("/classify", json!({"inputs": "john"})),
        ("/classify_batch", json!({"inputs": ["john"]})),
    ] {
        let answer = post(&app, uri, body).await;
        assert_error(&answer, 422, "validation");
        let message = answer.json()["error"].as_str().unwrap().to_string();
        assert!(
            message.contains("does not serve token classification"),
            "{message}"
        );
        assert!(message.contains("`/embed`"), "{message}");
    }
    let tagger = Arc::new(FakeShard::encoder(1000, false, true));
    let (app, _) = setup(&tagger, 4);
    for (uri, body) in [
        ("/embed", json!({"inputs": "john"})),
        ("/v1/embeddings", json!({"input": "john", "dimensions": 3})),
    ] {
        let answer = post(&app, uri, body).await;
        assert_error(&answer, 422, "validation");
        let message = answer.json()["error"].as_str().unwrap().to_string();
        assert!(
            message.contains("this model does not serve embeddings"),
            "{message}"
        );
        assert!(message.contains("`/classify`"), "{message}");
    }
    assert!(encoder_calls(&embedder).is_empty() && encoder_calls(&tagger).is_empty());
    // A generating model serves neither.
    let generating = app_with(fake(), 4, adapter_config(), exchange());
    let answer = post(&generating, "/embed", json!({"inputs": "hello"})).await;
    assert_error(&answer, 422, "validation");
    let message = answer.json()["error"].as_str().unwrap().to_string();
    assert!(message.contains("`/generate`"), "{message}");
    let answer = post(&generating, "/classify", json!({"inputs": "hello"})).await;
    assert_error(&answer, 422, "validation");
}

#[tokio::test]
async fn generation_endpoints_are_refused_on_an_encoder_naming_its_endpoints() {
    let (shard, app, _) = both(false, 4);
    let prompt = json!({"inputs": "john", "parameters": {"max_new_tokens": 2}});
    let messages = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    for (uri, body) in [
        ("/generate", prompt.clone()),
        ("/generate_stream", prompt.clone()),
        ("/", prompt),
        ("/v1/completions", json!({"model": "m", "prompt": "john"})),
        ("/v1/chat/completions", messages),
    ] {
        let answer = post(&app, uri, body).await;
        assert_error(&answer, 422, "validation");
        let message = answer.json()["error"].as_str().unwrap().to_string();
        assert!(message.starts_with("Input validation error: this model does not generate text"));
        assert!(
            message.contains("`/embed`") && message.contains("`/classify`"),
            "{message}"
        );
    }
    assert!(shard.calls().is_empty(), "{:?}", shard.calls());
}

#[tokio::test]
async fn info_reports_what_the_model_serves() {
    let (_, app, _) = both(false, 4);
    let info = get(&app, "/info").await.json();
    assert_eq!(info["supports_generation"], false);
    assert_eq!(info["supports_embeddings"], true);
    assert_eq!(info["supports_classification"], true);
    assert_eq!(info["embedding_dim"], FAKE_EMBEDDING_DIM);
    assert_eq!(info["supports_adapters"], false);
    assert_eq!(info["max_input_length"], 16);
    let generating = get(&app_with(fake(), 4, adapter_config(), exchange()), "/info").await;
    let info = generating.json();
    assert_eq!(info["supports_generation"], true);
    assert_eq!(info["supports_embeddings"], false);
    assert_eq!(info["embedding_dim"], 0);
}

#[tokio::test]
async fn health_of_an_encoder_is_the_shards_never_a_generation() {
    let (shard, app, _) = both(false, 4);
    assert_eq!(get(&app, "/health").await.status, StatusCode::OK);
    // A fresh server (no recent call) whose shard fails its health check.
    let sick = Arc::new(FakeShard::encoder(1000, true, false));
    sick.set_healthy(false);
    let (sick_app, _) = setup(&sick, 4);
    let answer = get(&sick_app, "/health").await;
    assert_error(&answer, 503, "healthcheck");
    assert!(answer.json()["error"]
        .as_str()
        .unwrap()
        .contains("health check failed"));
    for s in [&shard, &sick] {
        assert!(s.calls().is_empty(), "no generation probe: {:?}", s.calls());
    }
}
