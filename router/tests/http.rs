//! The HTTP API end to end (router → infer → batcher → fake shard), without a network: requests
//! are sent to the axum app in-process.

mod common;

use axum::http::StatusCode;
use common::*;
use futures::StreamExt;
use lorax_router::testing::{Call, FakeShard, FAKE_TIMINGS};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

#[tokio::test]
async fn generate_answers_with_details() {
    let app = app(fake(), 4);
    let answer = post(
        &app,
        "/generate",
        json!({"inputs": "hello world", "parameters": {"max_new_tokens": 3}}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let body = answer.json();
    let details = &body["details"];
    assert_eq!(details["finish_reason"], "length");
    assert_eq!(details["prompt_tokens"], 3);
    assert_eq!(details["generated_tokens"], 3);
    assert_eq!(details["prefill"], json!([]));
    let tokens = details["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 3);
    assert_eq!(tokens[0]["special"], false);
    assert_eq!(tokens[0]["skipped"], false);
    let text: String = tokens.iter().map(|t| t["text"].as_str().unwrap()).collect();
    assert_eq!(body["generated_text"], text);
    assert_eq!(answer.headers["x-prompt-tokens"], "3");
    assert_eq!(answer.headers["x-generated-tokens"], "3");

    let answer = post(
        &app,
        "/generate",
        json!({"inputs": "hello", "parameters": {"details": false}}),
    )
    .await;
    let body = answer.json();
    assert!(body.get("details").is_none());
    // max_new_tokens defaults to max_total_tokens - prompt tokens
    assert_eq!(
        answer.headers["x-generated-tokens"],
        (32 - 2).to_string().as_str()
    );
}

#[tokio::test]
async fn eos_full_text_prefill_and_alternatives() {
    let app = app(fake(), 4);
    let body = post(
        &app,
        "/generate",
        json!({"inputs": "hello stop", "parameters": {"max_new_tokens": 10}}),
    )
    .await
    .json();
    let details = &body["details"];
    assert_eq!(details["finish_reason"], "eos_token");
    assert_eq!(details["generated_tokens"], 2);
    assert_eq!(details["tokens"][1]["special"], true);
    assert!(!body["generated_text"].as_str().unwrap().contains("</s>"));

    let params = json!({"max_new_tokens": 2, "return_full_text": true, "decoder_input_details": true, "top_n_tokens": 2});
    let body = post(
        &app,
        "/generate",
        json!({"inputs": "hello world", "parameters": params}),
    )
    .await
    .json();
    assert!(body["generated_text"]
        .as_str()
        .unwrap()
        .starts_with("hello world "));
    let prefill = body["details"]["prefill"].as_array().unwrap();
    assert_eq!(prefill.len(), 3);
    assert!(prefill[0]["logprob"].is_null());
    assert_eq!(prefill[1]["logprob"], -1.0);
    let token = &body["details"]["tokens"][0];
    assert_eq!(token["alternative_tokens"].as_array().unwrap().len(), 2);
    assert_eq!(body["details"]["top_tokens"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn compat_endpoint_returns_a_list_or_a_stream() {
    let app = app(fake(), 4);
    let answer = post(
        &app,
        "/",
        json!({"inputs": "hello", "parameters": {"max_new_tokens": 2}, "stream": false}),
    )
    .await;
    let body = answer.json();
    assert_eq!(body.as_array().unwrap().len(), 1);
    assert_eq!(body[0]["details"]["generated_tokens"], 2);

    let answer = post(
        &app,
        "/",
        json!({"inputs": "hello", "parameters": {"max_new_tokens": 2}, "stream": true}),
    )
    .await;
    assert_eq!(answer.headers["content-type"], "text/event-stream");
    assert_eq!(answer.events().len(), 2);
}

#[tokio::test]
async fn generate_stream_sends_token_events_then_the_text() {
    let app = app(fake(), 4);
    let answer = post(
        &app,
        "/generate_stream",
        json!({"inputs": "hello world", "parameters": {"max_new_tokens": 4}}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let events = answer.events();
    assert_eq!(events.len(), 4);
    for event in &events[..3] {
        assert!(event["generated_text"].is_null());
        assert!(event["details"].is_null());
        assert_eq!(event["token"]["special"], false);
    }
    let last = &events[3];
    let text: String = events
        .iter()
        .map(|e| e["token"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(last["generated_text"], text);
    assert_eq!(last["details"]["finish_reason"], "length");
    assert_eq!(last["details"]["prompt_tokens"], 3);
    assert_eq!(last["details"]["generated_tokens"], 4);
}

#[tokio::test]
async fn best_of_returns_the_best_and_the_others() {
    let app = app(fake(), 4);
    let params = json!({"max_new_tokens": 3, "best_of": 2, "do_sample": true});
    let body = post(
        &app,
        "/generate",
        json!({"inputs": "hello", "parameters": params}),
    )
    .await
    .json();
    let others = body["details"]["best_of_sequences"].as_array().unwrap();
    assert_eq!(others.len(), 1);
    let sum = |tokens: &Value| -> f64 {
        tokens
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["logprob"].as_f64().unwrap())
            .sum()
    };
    assert!(sum(&body["details"]["tokens"]) >= sum(&others[0]["tokens"]));

    let no_sampling = json!({"inputs": "hello", "parameters": {"best_of": 2}});
    assert_error(
        &post(&app, "/generate", no_sampling).await,
        422,
        "validation",
    );
    let too_many = json!({"inputs": "hello", "parameters": {"best_of": 3, "do_sample": true}});
    assert_error(&post(&app, "/generate", too_many).await, 422, "validation");
    let streamed = json!({"inputs": "hello", "parameters": {"best_of": 2, "do_sample": true}});
    assert_error(
        &post(&app, "/generate_stream", streamed).await,
        422,
        "validation",
    );
}

#[tokio::test]
async fn malformed_requests_answer_json_errors() {
    let app = app(fake(), 4);
    let syntax = send(
        &app,
        request(
            "POST",
            "/generate",
            Some("application/json"),
            "{\"inputs\": ",
        ),
    )
    .await;
    assert_error(&syntax, 400, "bad_request");
    let content_type = send(&app, request("POST", "/generate", Some("text/plain"), "{}")).await;
    assert_error(&content_type, 415, "unsupported_media_type");
    let huge = format!("{{\"inputs\": \"{}\"}}", "a ".repeat(2 * 1024 * 1024));
    let too_large = send(
        &app,
        request("POST", "/generate", Some("application/json"), huge),
    )
    .await;
    assert_error(&too_large, 413, "payload_too_large");
    assert_error(
        &post(&app, "/generate", json!({"parameters": {}})).await,
        422,
        "validation",
    );
    assert_error(
        &post(&app, "/generate", json!({"inputs": 3})).await,
        422,
        "validation",
    );
    assert_error(&get(&app, "/nowhere").await, 404, "not_found");
    assert_error(&get(&app, "/generate").await, 405, "method_not_allowed");
    // A good request still works afterwards.
    assert_eq!(
        post(&app, "/generate", json!({"inputs": "hello"}))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn wrong_types_name_their_field_even_when_flattened() {
    let app = app(fake(), 4);
    for (parameters, says) in [
        (
            json!({"adapter_id": 5}),
            "parameters: adapter_id: invalid type: integer `5`",
        ),
        (
            json!({"api_token": []}),
            "parameters: api_token: invalid type: sequence",
        ),
        (
            json!({"merged_adapters": {"ids": "a"}}),
            "parameters: merged_adapters.ids: invalid type: string",
        ),
        (
            json!({"temperature": "hot"}),
            "parameters.temperature: invalid type",
        ),
    ] {
        let answer = post(
            &app,
            "/generate",
            json!({"inputs": "hello", "parameters": parameters}),
        )
        .await;
        assert_error(&answer, 422, "validation");
        let error = answer.json()["error"].as_str().unwrap().to_string();
        assert!(error.contains(says), "{parameters}: {error}");
    }
}

#[tokio::test]
async fn validation_errors_are_422() {
    let app = app(fake(), 4);
    let cases = [
        json!({"inputs": ""}),
        json!({"inputs": "a b c d a b c d a b c d a b c d"}),
        json!({"inputs": "hello", "parameters": {"max_new_tokens": 31}}),
        json!({"inputs": "hello", "parameters": {"max_new_tokens": 0}}),
        json!({"inputs": "hello", "parameters": {"temperature": 0.0}}),
        json!({"inputs": "hello", "parameters": {"top_p": 1.5}}),
        json!({"inputs": "hello", "parameters": {"top_k": 0}}),
        json!({"inputs": "hello", "parameters": {"typical_p": 0.0}}),
        json!({"inputs": "hello", "parameters": {"repetition_penalty": 0.0}}),
        json!({"inputs": "hello", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}),
        json!({"inputs": "hello", "parameters": {"truncate": 17}}),
        json!({"inputs": "hello", "parameters": {"adapter_id": "a", "adapter_source": "pbase"}}),
        json!({"inputs": "hello", "parameters": {"merged_adapters": {"ids": []}}}),
    ];
    for case in cases {
        for uri in ["/generate", "/generate_stream", "/"] {
            let answer = post(&app, uri, case.clone()).await;
            assert_error(&answer, 422, "validation");
        }
    }
}

#[tokio::test]
async fn over_max_concurrent_requests_is_429() {
    let shard = Arc::new(FakeShard::gated(1000, 1));
    let app = app(shard.clone(), 1);
    let first = {
        let app = app.clone();
        tokio::spawn(async move {
            post(
                &app,
                "/generate",
                json!({"inputs": "hello", "parameters": {"max_new_tokens": 2}}),
            )
            .await
        })
    };
    // The first request holds its permit while its prefill waits at the gate.
    shard.wait_at_gate().await;
    let second = post(&app, "/generate", json!({"inputs": "hello"})).await;
    assert_error(&second, 429, "overloaded");
    shard.allow_steps(100);
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    let third = post(
        &app,
        "/generate",
        json!({"inputs": "hello", "parameters": {"max_new_tokens": 2}}),
    )
    .await;
    assert_eq!(third.status, StatusCode::OK);
}

#[tokio::test]
async fn shard_failures_are_424_and_stream_error_events() {
    let shard = fake();
    let app = app(shard.clone(), 4);
    shard.set_fail_prefill(true);
    let answer = post(&app, "/generate", json!({"inputs": "hello"})).await;
    assert_error(&answer, 424, "generation");
    // Before the first token, a stream fails with a plain 424 too.
    let answer = post(&app, "/generate_stream", json!({"inputs": "hello"})).await;
    assert_error(&answer, 424, "generation");
    shard.set_fail_prefill(false);

    shard.set_fail_decode(true);
    let answer = post(
        &app,
        "/generate_stream",
        json!({"inputs": "hello", "parameters": {"max_new_tokens": 5}}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let events = answer.events();
    assert_eq!(events.len(), 2);
    assert!(events[0]["token"].is_object());
    assert_eq!(events[1]["error_type"], "generation");
    shard.set_fail_decode(false);

    assert_eq!(get(&app, "/health").await.status, StatusCode::OK);
    let ok = post(
        &app,
        "/generate",
        json!({"inputs": "hello", "parameters": {"max_new_tokens": 2}}),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
}

#[tokio::test]
async fn dropped_stream_frees_its_request() {
    let shard = Arc::new(FakeShard::gated(1000, 1));
    let app = app(shard.clone(), 4);
    let req = request(
        "POST",
        "/generate_stream",
        Some("application/json"),
        json!({"inputs": "hello", "parameters": {"max_new_tokens": 20}}).to_string(),
    );
    // The answer starts once the first token is there.
    shard.allow_steps(1);
    let response = tokio::time::timeout(Duration::from_secs(10), app.clone().oneshot(req))
        .await
        .expect("answer in time")
        .unwrap();
    let mut body = response.into_body().into_data_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data:{"));
    drop(body);
    shard.allow_steps(100);
    for _ in 0..5000 {
        if shard.cached_requests().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(shard.cached_requests().is_empty());
    let decodes = shard
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::Decode { .. }))
        .count();
    assert!(decodes <= 1, "{:?}", shard.calls());
}

#[tokio::test]
async fn health_info_metrics_tokenize_docs() {
    let shard = fake();
    let app = app(shard.clone(), 4);
    assert_eq!(get(&app, "/health").await.status, StatusCode::OK);

    let info = get(&app, "/info").await.json();
    assert_eq!(info["model_id"], "test/model");
    assert_eq!(info["model_dtype"], "float32");
    assert_eq!(info["max_input_length"], 16);
    assert_eq!(info["max_total_tokens"], 32);
    assert_eq!(info["max_batch_total_tokens"], 1000);
    assert_eq!(info["max_concurrent_requests"], 4);
    assert_eq!(info["version"], lorax_router::VERSION);

    post(
        &app,
        "/generate",
        json!({"inputs": "hello", "parameters": {"max_new_tokens": 2}}),
    )
    .await;
    let metrics = get(&app, "/metrics").await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(
        text.contains("lorax_request_count{adapter=\"base\"}"),
        "{text}"
    );
    assert!(text.contains("lorax_request_success"));
    assert!(text.contains("lorax_queue_size"));
    assert!(text.contains("lorax_request_duration_bucket"));
    // The shard's own timings, as it reports them (the fake the same for every step, so the means
    // are exact whatever other tests of this binary run meanwhile).
    let timings = FAKE_TIMINGS;
    for (name, method, value) in [
        ("forward", "prefill", timings.forward),
        ("forward", "decode", timings.forward),
        ("decode", "decode", timings.decode),
        ("concat", "decode", timings.concat),
    ] {
        let series = format!("lorax_batch_{name}_duration");
        let value_of = |line: String| metric_value(&text, &line).expect(&line);
        let mean = value_of(format!("{series}_sum{{method=\"{method}\"}}"))
            / value_of(format!("{series}_count{{method=\"{method}\"}}"));
        assert!(
            (mean - value.as_secs_f64()).abs() < 1e-9,
            "{series}: {mean}"
        );
    }
    for series in ["filter", "rpc_overhead"] {
        let count = format!("lorax_batch_{series}_duration_count{{method=\"decode\"}}");
        assert!(
            metric_value(&text, &count).is_some_and(|n| n >= 1.0),
            "{count}"
        );
    }

    let tokens = post(&app, "/tokenize", json!({"inputs": "hello world"}))
        .await
        .json();
    assert_eq!(
        tokens,
        json!([
            {"id": 1, "text": "<s>", "start": 0, "stop": 0},
            {"id": 4, "text": "hello", "start": 0, "stop": 5},
            {"id": 5, "text": "world", "start": 6, "stop": 11},
        ])
    );

    let docs = get(&app, "/docs").await;
    assert_eq!(docs.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&docs.body).contains("/generate_stream"));
    let spec = get(&app, "/api-doc/openapi.json").await.json();
    assert!(spec["paths"]["/generate"]["post"].is_object());
    assert!(spec["paths"]["/adapters/load"]["post"]["responses"]["409"].is_object());
}

#[tokio::test]
async fn warpers_sample_without_do_sample() {
    let app = app(fake(), 4);
    let seed = |answer: &Answer| answer.json()["details"]["seed"].clone();
    let with = |extra: Value| {
        let mut parameters = json!({"max_new_tokens": 2, "seed": 7});
        for (k, v) in extra.as_object().unwrap() {
            parameters[k] = v.clone();
        }
        json!({"inputs": "hello", "parameters": parameters})
    };
    // The fake shard reports the seed only of requests that sample.
    let sampling = [
        json!({"temperature": 0.5}),
        json!({"temperature": 1.5}),
        json!({"top_k": 3}),
        json!({"top_p": 0.9}),
        json!({"typical_p": 0.5}),
        json!({"do_sample": true}),
    ];
    for extra in sampling {
        let answer = post(&app, "/generate", with(extra.clone())).await;
        assert_eq!(seed(&answer), json!(7), "{extra}");
    }
    let greedy = [
        json!({}),
        json!({"temperature": 1.0, "top_p": 1.0, "typical_p": 1.0}),
        json!({"do_sample": false, "repetition_penalty": 1.2}),
    ];
    for extra in greedy {
        let answer = post(&app, "/generate", with(extra.clone())).await;
        assert!(seed(&answer).is_null(), "{extra}");
    }
    let streamed = post(&app, "/generate_stream", with(json!({"top_k": 2}))).await;
    let events = streamed.events();
    assert_eq!(events.last().unwrap()["details"]["seed"], 7);
    // best_of with only a warper samples, each sequence with its own seed.
    let best_of = json!({"inputs": "hello", "parameters": {"max_new_tokens": 2, "best_of": 2, "temperature": 0.8}});
    let body = post(&app, "/generate", best_of).await.json();
    assert!(body["details"]["seed"].is_u64(), "{body}");
    assert!(
        body["details"]["best_of_sequences"][0]["seed"].is_u64(),
        "{body}"
    );
}

#[tokio::test]
async fn watermark_requests_are_served() {
    let shard = fake();
    let app = app(shard.clone(), 4);
    for on in [true, false] {
        let body = json!({"inputs": "hello", "parameters": {"watermark": on, "max_new_tokens": 1}});
        assert_eq!(post(&app, "/generate", body).await.status, StatusCode::OK);
    }
    let prefills = shard
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::Prefill { .. }))
        .count();
    assert_eq!(prefills, 2);
}

#[tokio::test]
async fn get_root_and_ping_are_health_checks() {
    let shard = fake();
    let app = app(shard.clone(), 4);
    for uri in ["/", "/ping", "/health"] {
        let answer = get(&app, uri).await;
        assert_eq!(answer.status, StatusCode::OK, "{uri}");
        assert!(answer.body.is_empty());
    }
    // A server whose shard fails every step cannot generate: each check's probe fails.
    let failing = fake();
    failing.set_fail_prefill(true);
    let unhealthy = common::app(failing, 4);
    for uri in ["/", "/ping", "/health"] {
        assert_error(&get(&unhealthy, uri).await, 503, "healthcheck");
    }
    // `POST /` still generates; `POST /ping` is not a route.
    let answer = post(
        &app,
        "/",
        json!({"inputs": "hello", "parameters": {"max_new_tokens": 1}}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.json().is_array());
    assert_error(
        &post(&app, "/ping", json!({})).await,
        405,
        "method_not_allowed",
    );
}

#[tokio::test]
async fn length_limits_are_inclusive_and_say_at_most() {
    let app = app(fake(), 4);
    // <s> + 15 words: exactly max_input_length (16), with max_new_tokens up to 32 - 16.
    let words = |n: usize| vec!["a"; n].join(" ");
    let ok = post(
        &app,
        "/generate",
        json!({"inputs": words(15), "parameters": {"max_new_tokens": 16}}),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.json()["details"]["prompt_tokens"], 16);
    let too_long = post(&app, "/generate", json!({"inputs": words(16)})).await;
    assert_error(&too_long, 422, "validation");
    assert_eq!(
        too_long.json()["error"],
        "Input validation error: `inputs` must have at most 16 tokens. Given: 17"
    );
    let truncated = post(
        &app,
        "/generate",
        json!({"inputs": words(20), "parameters": {"truncate": 16, "max_new_tokens": 1}}),
    )
    .await;
    assert_eq!(truncated.json()["details"]["prompt_tokens"], 16);
    let truncate = post(
        &app,
        "/generate",
        json!({"inputs": "hello", "parameters": {"truncate": 17}}),
    )
    .await;
    assert_eq!(
        truncate.json()["error"],
        "Input validation error: `truncate` must be strictly positive and at most 16. Given: 17"
    );
}
