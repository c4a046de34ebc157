//! The OpenAI-compatible endpoints over the fake shard: completions, chat completions with the
//! chat template, their streams, ids and errors, and what a chat message may hold.

mod common;

use axum::http::StatusCode;
use common::*;
use serde_json::{json, Value};

/// OpenAI's SSE chunks (`data: {json}`), and whether `data: [DONE]` closed them.
fn openai_chunks(answer: &Answer) -> (Vec<Value>, bool) {
    let text = String::from_utf8(answer.body.to_vec()).unwrap();
    let mut done = false;
    let mut chunks = Vec::new();
    for event in text.split("\n\n").filter(|e| !e.is_empty()) {
        let data = event.strip_prefix("data: ").unwrap();
        if data == "[DONE]" {
            done = true;
        } else {
            chunks.push(serde_json::from_str(data).unwrap());
        }
    }
    (chunks, done)
}

#[tokio::test]
async fn openai_completions() {
    let app = app(fake(), 4);
    let body = post(&app, "/v1/completions", json!({"model": "test/model", "prompt": "hello world", "max_tokens": 3, "temperature": 0, "logprobs": 1})).await.json();
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(
        body["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6})
    );
    let text = body["choices"][0]["text"].as_str().unwrap().to_string();

    let answer = post(
        &app,
        "/v1/completions",
        json!({"model": "", "prompt": ["hello world"], "max_tokens": 3, "stream": true}),
    )
    .await;
    let (chunks, done) = openai_chunks(&answer);
    assert!(done);
    assert_eq!(chunks.len(), 3);
    let streamed: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed.len(), text.len());
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "length");
    assert!(chunks[0]["choices"][0]["finish_reason"].is_null());

    let echo = post(
        &app,
        "/v1/completions",
        json!({"prompt": "hello", "max_tokens": 1, "echo": true}),
    )
    .await
    .json();
    assert!(echo["choices"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("hello"));
    let adapter = post(
        &app,
        "/v1/completions",
        json!({"model": "org/adapter", "prompt": "hello", "max_tokens": 2}),
    )
    .await;
    assert_eq!(adapter.status, StatusCode::OK);
    let text = adapter.json()["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.contains("[org/adapter]"), "{text}");
    let n = post(&app, "/v1/completions", json!({"prompt": "hello", "n": 3})).await;
    assert_error(&n, 422, "validation");
    assert!(n.json()["error"]
        .as_str()
        .unwrap()
        .contains("`n` must be between 1 and 2"));
    let models = get(&app, "/v1/models").await.json();
    assert_eq!(models["data"][0]["id"], "test/model");
}

#[tokio::test]
async fn openai_chat_completions_use_the_chat_template() {
    let app = app(fake(), 4);
    let messages = json!([{"role": "user", "content": "hello world"}]);
    let body = post(
        &app,
        "/v1/chat/completions",
        json!({"model": "test/model", "messages": messages, "max_tokens": 2}),
    )
    .await
    .json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    // "<s>hello world " from the template: its <s> is not doubled by the tokenizer.
    assert_eq!(body["usage"]["prompt_tokens"], 3);

    let answer = post(
        &app,
        "/v1/chat/completions",
        json!({"messages": messages, "max_tokens": 2, "stream": true}),
    )
    .await;
    let (chunks, done) = openai_chunks(&answer);
    assert!(done);
    assert_eq!(chunks.len(), 2);
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks[1]["choices"][0]["delta"].get("role").is_none());
    assert_eq!(chunks[1]["usage"]["completion_tokens"], 2);

    // The native endpoints accept `apply_chat_template` with `inputs` holding the messages.
    let inputs = json!([{"role": "user", "content": "hello"}]).to_string();
    let params = json!({"apply_chat_template": true, "max_new_tokens": 1});
    let body = post(
        &app,
        "/generate",
        json!({"inputs": inputs, "parameters": params}),
    )
    .await
    .json();
    assert_eq!(body["details"]["prompt_tokens"], 2);
    let bad = post(
        &app,
        "/generate",
        json!({"inputs": "not json", "parameters": params}),
    )
    .await;
    assert_error(&bad, 422, "validation");
}

#[tokio::test]
async fn openai_ids_and_stream_errors() {
    let shard = fake();
    let app = app(shard.clone(), 4);
    let messages = json!([{"role": "user", "content": "hello"}]);
    let chat = json!({"messages": messages, "max_tokens": 2});
    let completion = json!({"prompt": "hello", "max_tokens": 2});
    let id = |v: &Value| v["id"].as_str().unwrap().to_string();
    let body = post(&app, "/v1/chat/completions", chat.clone())
        .await
        .json();
    assert!(id(&body).starts_with("chatcmpl-"), "{body}");
    let body = post(&app, "/v1/completions", completion.clone())
        .await
        .json();
    assert!(id(&body).starts_with("cmpl-"), "{body}");
    let mut stream_chat = chat.clone();
    stream_chat["stream"] = json!(true);
    let (chunks, _) = openai_chunks(&post(&app, "/v1/chat/completions", stream_chat.clone()).await);
    assert!(chunks.iter().all(|c| id(c).starts_with("chatcmpl-")));
    let mut stream_completion = completion.clone();
    stream_completion["stream"] = json!(true);
    let (chunks, _) =
        openai_chunks(&post(&app, "/v1/completions", stream_completion.clone()).await);
    assert!(chunks.iter().all(|c| id(c).starts_with("cmpl-")));

    // A failure after the first token: one last `data: {error}` event, framed like the chunks.
    shard.set_fail_decode(true);
    for (uri, body) in [
        ("/v1/chat/completions", stream_chat),
        ("/v1/completions", stream_completion),
    ] {
        let answer = post(&app, uri, body).await;
        assert_eq!(answer.status, StatusCode::OK);
        let text = String::from_utf8(answer.body.to_vec()).unwrap();
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 2, "{text}");
        assert!(events.iter().all(|e| e.starts_with("data: {")), "{text}");
        let (chunks, done) = openai_chunks(&answer);
        assert!(!done, "{text}");
        assert_eq!(chunks[1]["error_type"], "generation");
    }
    // The native stream keeps LoRAX's `data:{json}` for its error event too.
    let answer = post(
        &app,
        "/generate_stream",
        json!({"inputs": "hello", "parameters": {"max_new_tokens": 5}}),
    )
    .await;
    assert_eq!(answer.events().last().unwrap()["error_type"], "generation");
}

#[tokio::test]
async fn chat_content_must_be_text_or_text_parts() {
    let app = app(fake(), 4);
    let chat = |content: Value| json!({"model": "", "max_tokens": 2, "messages": [{"role": "user", "content": content}]});
    for (content, says) in [
        (json!(42), "not a number"),
        (json!({"text": "hi"}), "not an object"),
        (json!(true), "not a boolean"),
        (json!([{"type": "text", "text": 1}]), "`content[0]`"),
        (json!(["hello"]), "got a string"),
        (
            json!([{"type": "image_url", "image_url": {"url": "x"}}]),
            "type `image_url`",
        ),
    ] {
        let answer = post(&app, "/v1/chat/completions", chat(content.clone())).await;
        assert_error(&answer, 422, "validation");
        let error = answer.json()["error"].as_str().unwrap().to_string();
        assert!(error.contains("messages[0].content"), "{content}: {error}");
        assert!(error.contains(says), "{content}: {error}");
    }
    // The same refusal when a native request renders messages with the chat template.
    let native = json!({"inputs": r#"[{"role": "user", "content": 7}]"#,
        "parameters": {"apply_chat_template": true, "max_new_tokens": 2}});
    let answer = post(&app, "/generate", native).await;
    assert_error(&answer, 422, "validation");
    assert!(answer.json()["error"]
        .as_str()
        .unwrap()
        .contains("not a number"));
    // Strings, null and lists of text parts are valid.
    for content in [
        json!("hello"),
        Value::Null,
        json!([{"type": "text", "text": "hello"}, {"type": "text", "text": " world"}]),
    ] {
        let answer = post(&app, "/v1/chat/completions", chat(content.clone())).await;
        assert_eq!(answer.status, StatusCode::OK, "{content}");
    }
}
