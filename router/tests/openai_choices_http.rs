//! The OpenAI surface beyond one plain choice, over the fake shard: `n` choices (whole and
//! streamed, their seeds), log-probabilities in OpenAI's formats, `stream_options`,
//! `response_format`, the penalties and other accepted fields, the `model` placeholders, and the
//! 422s that name their field (wrong types included).

mod common;

use axum::http::StatusCode;
use common::*;
use lorax_router::pb;
use lorax_router::testing::REFUSED_GRAMMAR_MARKER;
use serde_json::{json, Value};

/// OpenAI's SSE chunks (`data: {json}`), and whether `data: [DONE]` closed them.
fn openai_chunks(answer: &Answer) -> (Vec<Value>, bool) {
    let text = String::from_utf8(answer.body.to_vec()).unwrap();
    let mut done = false;
    let mut chunks = Vec::new();
    for event in text.split("\n\n").filter(|e| !e.is_empty()) {
        let data = event.strip_prefix("data: ").unwrap();
        assert!(!done, "nothing after [DONE]: {text}");
        if data == "[DONE]" {
            done = true;
        } else {
            chunks.push(serde_json::from_str(data).unwrap());
        }
    }
    (chunks, done)
}

fn messages() -> Value {
    json!([{"role": "user", "content": "hello world"}])
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"messages": messages(), "max_tokens": 3});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn error_of(answer: &Answer) -> String {
    answer.json()["error"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn n_choices_are_separate_sequences_with_consecutive_seeds() {
    let shard = fake();
    let app = app(shard.clone(), 4);
    let body = post(
        &app,
        "/v1/chat/completions",
        chat(json!({"n": 2, "temperature": 0.7, "seed": 40})),
    )
    .await
    .json();
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        assert_eq!(choice["finish_reason"], "length");
        assert_eq!(choice["message"]["role"], "assistant");
    }
    assert_ne!(
        choices[0]["message"]["content"],
        choices[1]["message"]["content"]
    );
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9})
    );
    let mut seeds: Vec<u64> = shard
        .prefilled_requests()
        .iter()
        .map(|r| r.parameters.unwrap().seed)
        .collect();
    seeds.sort();
    assert_eq!(seeds, vec![40, 41]);
    // Without a seed, each sampled choice draws its own.
    post(
        &app,
        "/v1/completions",
        json!({"prompt": "hello", "n": 2, "temperature": 0.5, "max_tokens": 1}),
    )
    .await;
    let requests = shard.prefilled_requests();
    let drawn: Vec<u64> = requests[2..]
        .iter()
        .map(|r| r.parameters.unwrap().seed)
        .collect();
    assert_eq!(drawn.len(), 2);
    assert_ne!(drawn[0], drawn[1]);
}

#[tokio::test]
async fn n_is_bounded_by_max_best_of_and_excludes_best_of() {
    let shard = fake();
    let app = app(shard.clone(), 4);
    for (uri, body) in [
        ("/v1/chat/completions", chat(json!({"n": 3}))),
        (
            "/v1/completions",
            json!({"prompt": "hello", "n": 3, "stream": true}),
        ),
    ] {
        let answer = post(&app, uri, body).await;
        assert_error(&answer, 422, "validation");
        assert_eq!(
            error_of(&answer),
            "Input validation error: `n` must be between 1 and 2. Given: 3"
        );
    }
    let zero = post(&app, "/v1/chat/completions", chat(json!({"n": 0}))).await;
    assert!(error_of(&zero).contains("`n` must be between 1 and 2. Given: 0"));
    let both = post(
        &app,
        "/v1/completions",
        json!({"prompt": "hello", "n": 2, "best_of": 2, "temperature": 0.5}),
    )
    .await;
    assert_error(&both, 422, "validation");
    assert!(error_of(&both).contains("`n` > 1 cannot be combined with `best_of` > 1"));
    assert!(shard.prefilled_requests().is_empty());
}

#[tokio::test]
async fn streamed_choices_interleave_with_their_index() {
    let app = app(fake(), 4);
    let answer = post(
        &app,
        "/v1/chat/completions",
        chat(json!({"n": 2, "stream": true})),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let (chunks, done) = openai_chunks(&answer);
    assert!(done);
    assert_eq!(chunks.len(), 6);
    for index in 0..2 {
        let own: Vec<&Value> = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == index)
            .collect();
        assert_eq!(own.len(), 3, "choice {index}");
        assert_eq!(own[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(own[1]["choices"][0]["delta"].get("role").is_none());
        assert_eq!(own[2]["choices"][0]["finish_reason"], "length");
        assert!(own[0]["choices"][0]["finish_reason"].is_null());
    }
    // Without include_usage, the stream's very last chunk carries the usage of both choices.
    let last = chunks.last().unwrap();
    assert_eq!(
        last["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9})
    );
    assert_eq!(chunks.iter().filter(|c| !c["usage"].is_null()).count(), 1);
    // Completions stream their n choices the same way.
    let answer = post(
        &app,
        "/v1/completions",
        json!({"prompt": "hello", "n": 2, "stream": true, "max_tokens": 2}),
    )
    .await;
    let (chunks, done) = openai_chunks(&answer);
    assert!(done);
    let indexes: Vec<u64> = chunks
        .iter()
        .map(|c| c["choices"][0]["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes.iter().filter(|i| **i == 1).count(), 2);
}

#[tokio::test]
async fn include_usage_sends_a_last_chunk_without_choices() {
    let app = app(fake(), 4);
    let options = json!({"stream": true, "stream_options": {"include_usage": true}});
    let answer = post(&app, "/v1/chat/completions", chat(options.clone())).await;
    let (chunks, done) = openai_chunks(&answer);
    assert!(done);
    assert_eq!(chunks.len(), 4);
    assert!(chunks[..3].iter().all(|c| c["usage"].is_null()));
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[3]["choices"], json!([]));
    assert_eq!(chunks[3]["object"], "chat.completion.chunk");
    assert_eq!(chunks[3]["id"], chunks[0]["id"]);
    assert_eq!(
        chunks[3]["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6})
    );
    let mut completion = json!({"prompt": "hello", "max_tokens": 2, "n": 2});
    completion["stream"] = json!(true);
    completion["stream_options"] = json!({"include_usage": true});
    let (chunks, _) = openai_chunks(&post(&app, "/v1/completions", completion).await);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 4);
    // include_usage false: as without stream_options.
    let answer = post(
        &app,
        "/v1/chat/completions",
        chat(json!({"stream": true, "stream_options": {"include_usage": false}})),
    )
    .await;
    let (chunks, _) = openai_chunks(&answer);
    assert_eq!(chunks.len(), 3);
    assert_eq!(chunks[2]["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn chat_logprobs_in_openai_format() {
    let shard = fake();
    let app = app(shard.clone(), 4);
    let body = post(
        &app,
        "/v1/chat/completions",
        chat(json!({"logprobs": true, "top_logprobs": 2})),
    )
    .await
    .json();
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 3);
    let text: String = content
        .iter()
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    assert_eq!(body["choices"][0]["message"]["content"], text);
    let first = &content[0];
    let token = first["token"].as_str().unwrap();
    assert_eq!(first["logprob"], -0.5);
    assert_eq!(first["bytes"], json!(token.as_bytes()));
    assert_eq!(first["top_logprobs"].as_array().unwrap().len(), 2);
    assert_eq!(
        first["top_logprobs"][0],
        json!({"token": "alt0", "logprob": -0.5, "bytes": b"alt0".to_vec()})
    );
    assert_eq!(shard.prefilled_requests()[0].top_n_tokens, 2);
    // Without top_logprobs: the tokens, no alternatives; without logprobs: null.
    let body = post(
        &app,
        "/v1/chat/completions",
        chat(json!({"logprobs": true})),
    )
    .await
    .json();
    assert_eq!(
        body["choices"][0]["logprobs"]["content"][0]["top_logprobs"],
        json!([])
    );
    let body = post(&app, "/v1/chat/completions", chat(json!({})))
        .await
        .json();
    assert!(body["choices"][0]["logprobs"].is_null());
    // Streamed: each chunk has its token's entry.
    let answer = post(
        &app,
        "/v1/chat/completions",
        chat(json!({"logprobs": true, "top_logprobs": 1, "stream": true})),
    )
    .await;
    let (chunks, _) = openai_chunks(&answer);
    for chunk in &chunks {
        let entries = chunk["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0]["token"], chunk["choices"][0]["delta"]["content"]);
        assert_eq!(entries[0]["top_logprobs"].as_array().unwrap().len(), 1);
    }
    // Limits.
    for (extra, says) in [
        (
            json!({"logprobs": true, "top_logprobs": 11}),
            "`top_logprobs` must be between 0 and 10. Given: 11",
        ),
        (
            json!({"top_logprobs": 2}),
            "`top_logprobs` needs `logprobs: true`",
        ),
    ] {
        let answer = post(&app, "/v1/chat/completions", chat(extra)).await;
        assert_error(&answer, 422, "validation");
        assert!(error_of(&answer).contains(says));
    }
    let answer = post(
        &app,
        "/v1/chat/completions",
        chat(json!({"logprobs": true, "top_logprobs": 10})),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test]
async fn completion_logprobs_fill_top_logprobs() {
    let app = app(fake(), 4);
    let body = post(
        &app,
        "/v1/completions",
        json!({"prompt": "hello", "max_tokens": 2, "logprobs": 2}),
    )
    .await
    .json();
    let logprobs = &body["choices"][0]["logprobs"];
    assert_eq!(
        logprobs["top_logprobs"],
        json!([{"alt0": -0.5, "alt1": -1.5}, {"alt0": -0.5, "alt1": -1.5}])
    );
    let first_len = logprobs["tokens"][0].as_str().unwrap().len();
    assert_eq!(logprobs["text_offset"], json!([0, first_len]));
    let answer = post(
        &app,
        "/v1/completions",
        json!({"prompt": "hello", "max_tokens": 2, "logprobs": 2, "stream": true}),
    )
    .await;
    let (chunks, _) = openai_chunks(&answer);
    assert_eq!(
        chunks[1]["choices"][0]["logprobs"]["text_offset"],
        json!([first_len])
    );
    let answer = post(
        &app,
        "/v1/completions",
        json!({"prompt": "hello", "logprobs": 11}),
    )
    .await;
    assert_error(&answer, 422, "validation");
    assert!(error_of(&answer).contains("`logprobs` must be between 0 and 10. Given: 11"));
}

#[tokio::test]
async fn wrong_types_and_ranges_name_their_field() {
    let app = app(fake(), 4);
    let completion = |extra: Value| {
        let mut body = json!({"prompt": "hello", "max_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    for (field, value, says) in [
        (
            "presence_penalty",
            json!("0.5"),
            "invalid type: string \"0.5\", expected f32",
        ),
        (
            "presence_penalty",
            json!(true),
            "invalid type: boolean `true`, expected f32",
        ),
        (
            "frequency_penalty",
            json!(2.5),
            "must be between -2.0 and 2.0. Given: 2.5",
        ),
        (
            "presence_penalty",
            json!(-2.01),
            "must be between -2.0 and 2.0",
        ),
        ("n", json!("2"), "expected u32"),
        ("stream_options", json!(true), "stream_options"),
        ("stop", json!(5), "stop"),
        ("seed", json!(-1), "expected u64"),
        (
            "logit_bias",
            json!({"5": 10}),
            "`logit_bias` is not supported yet",
        ),
    ] {
        let extra = json!({ field: value });
        for (uri, body) in [
            ("/v1/chat/completions", chat(extra.clone())),
            ("/v1/completions", completion(extra.clone())),
        ] {
            let answer = post(&app, uri, body).await;
            assert_error(&answer, 422, "validation");
            let error = error_of(&answer);
            assert!(error.contains(field), "{uri} {field}: {error}");
            assert!(error.contains(says), "{uri} {field}: {error}");
        }
    }
    // Accepted as OpenAI sends them.
    let accepted = json!({"seed": 7, "stop": ["x", "y"], "user": "someone", "logit_bias": null,
        "frequency_penalty": 0.1, "presence_penalty": 0.2, "n": 1, "stream": false,
        "stream_options": null, "top_p": 1.0});
    for (uri, body) in [
        ("/v1/chat/completions", chat(accepted.clone())),
        ("/v1/completions", completion(accepted.clone())),
    ] {
        let answer = post(&app, uri, body).await;
        assert_eq!(answer.status, StatusCode::OK, "{uri}: {:?}", answer.body);
    }
}

#[tokio::test]
async fn model_placeholders_mean_the_base_model() {
    let app = app(fake(), 4);
    for model in ["", "dummy", "tgi", "test/model"] {
        let answer = post(&app, "/v1/chat/completions", chat(json!({"model": model}))).await;
        assert_eq!(answer.status, StatusCode::OK, "{model}");
        let body = answer.json();
        let text = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(!text.contains('['), "{model}: an adapter ran: {text}");
        assert_eq!(body["model"], "test/model");
    }
    let adapter = post(
        &app,
        "/v1/completions",
        json!({"model": "org/a", "prompt": "hello", "max_tokens": 1}),
    )
    .await
    .json();
    assert!(adapter["choices"][0]["text"]
        .as_str()
        .unwrap()
        .contains("[org/a]"));
    assert_eq!(adapter["model"], "org/a");
}

#[tokio::test]
async fn response_format_reaches_the_shard_and_refusals_name_the_field() {
    let shard = fake();
    let app = app(shard.clone(), 4);
    let schema =
        json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]});
    for format in [
        json!({"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": true}}),
        json!({"type": "json_object", "schema": schema}),
    ] {
        let answer = post(
            &app,
            "/v1/chat/completions",
            chat(json!({"response_format": format, "n": 2})),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    let answer = post(
        &app,
        "/v1/chat/completions",
        chat(json!({"response_format": {"type": "text"}})),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let grammars: Vec<Option<pb::Grammar>> = shard
        .prefilled_requests()
        .into_iter()
        .map(|r| r.grammar)
        .collect();
    let expected = Some(pb::Grammar {
        r#type: pb::GrammarType::Json as i32,
        value: schema.to_string(),
    });
    assert_eq!(
        grammars,
        vec![
            expected.clone(),
            expected.clone(),
            expected.clone(),
            expected,
            None
        ]
    );
    assert_eq!(shard.violations(), Vec::<String>::new());

    let nested = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "patternProperties": {}}}});
    let answer = post(
        &app,
        "/v1/chat/completions",
        chat(json!({"response_format": nested})),
    )
    .await;
    assert_error(&answer, 422, "validation");
    let error = error_of(&answer);
    assert!(
        error.contains("`response_format.json_schema.schema`"),
        "{error}"
    );
    assert!(error.contains("`/patternProperties`"), "{error}");
    // A grammar the shard refuses fails the whole request, streamed or not, before any batch.
    let refused = json!({"type": "json_object", "schema": {"type": "string", "title": REFUSED_GRAMMAR_MARKER}});
    let before = shard.prefilled_requests().len();
    for stream in [false, true] {
        let answer = post(
            &app,
            "/v1/chat/completions",
            chat(json!({"response_format": refused, "n": 2, "stream": stream})),
        )
        .await;
        assert_error(&answer, 422, "validation");
        assert!(error_of(&answer).contains("the grammar cannot be compiled"));
    }
    assert_eq!(shard.prefilled_requests().len(), before);
}
