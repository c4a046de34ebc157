//! Adapters over HTTP: request parameters (`adapter_id`, `adapter_source`, `api_token`,
//! `merged_adapters`, OpenAI's `model`), the status of each kind of adapter failure, `/info`, and
//! that a request's token never leaks. The management endpoints: `adapters_admin_http.rs`.

mod common;

use common::*;
use lorax_router::adapter::AdapterConfig;
use lorax_router::testing::{AdapterBehaviour, Call, FakeShard};
use serde_json::{json, Value};
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

#[tokio::test]
async fn each_kind_of_adapter_failure_has_its_status() {
    let shard = fake();
    shard.set_adapter(
        "org/private",
        AdapterBehaviour {
            token: Some("hf_right".into()),
            ..Default::default()
        },
    );
    use tonic::Code;
    let cases = [
        ("org/missing", Code::NotFound, 422, "validation"),
        ("org/corrupt", Code::InvalidArgument, 422, "validation"),
        ("org/offline", Code::Unavailable, 424, "generation"),
        ("org/huge", Code::ResourceExhausted, 424, "generation"),
    ];
    for (id, code, ..) in cases {
        shard.set_adapter(id, failing(code, &format!("{id}: reason {code:?}")));
    }
    let app = app(shard.clone(), 8);
    for (id, code, status, error_type) in cases {
        for uri in ["/generate", "/generate_stream"] {
            let answer = post(&app, uri, generate(json!({"adapter_id": id}))).await;
            assert_error(&answer, status, error_type);
            let message = answer.json()["error"].as_str().unwrap().to_string();
            assert!(message.contains(&format!("reason {code:?}")), "{message}");
        }
    }
    let private =
        |token: Option<&str>| generate(json!({"adapter_id": "org/private", "api_token": token}));
    assert_error(
        &post(&app, "/generate", private(None)).await,
        401,
        "unauthorized",
    );
    assert_error(
        &post(&app, "/generate", private(Some("hf_wrong"))).await,
        403,
        "forbidden",
    );
    let ok = post(&app, "/generate", private(Some("hf_right"))).await;
    assert!(text_of(&ok).contains("[org/private]"));
    // The base model kept working throughout.
    let base = post(&app, "/generate", generate(json!({}))).await;
    assert!(!text_of(&base).contains('['));
}

/// A writer collecting log output.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// Everything every test of this binary logged so far. The subscriber is the process's
    /// global one, installed once: a thread-local one misses what tasks log on other threads,
    /// and races with tracing's per-callsite interest cache when tests run in parallel.
    fn captured() -> &'static Logs {
        static LOGS: OnceLock<Logs> = OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = Logs::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
            logs
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).to_string()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn tokens_make_distinct_adapters_and_never_leak() {
    let logs = Logs::captured();

    let shard = fake();
    shard.set_adapter(
        "org/gated",
        AdapterBehaviour {
            token: Some("hf_SECRET_A".into()),
            ..Default::default()
        },
    );
    let app = app(shard.clone(), 8);
    let mut bodies = String::new();
    for token in ["hf_SECRET_A", "hf_SECRET_B"] {
        let public = generate(json!({"adapter_id": "org/public", "api_token": token}));
        let answer = post(&app, "/generate", public).await;
        assert!(text_of(&answer).contains("[org/public]"));
        let gated = generate(json!({"adapter_id": "org/gated", "api_token": token}));
        bodies.push_str(&String::from_utf8_lossy(
            &post(&app, "/generate", gated).await.body,
        ));
    }
    let listed = get(&app, "/adapters").await;
    let list = listed.json();
    let public: Vec<&Value> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["adapter_id"] == "org/public")
        .collect();
    assert_eq!(public.len(), 2, "{list}");
    assert!(public.iter().all(|a| a["private"] == true));
    assert_ne!(public[0]["index"], public[1]["index"]);
    // The tokens reached the shard...
    let seen = shard.tokens_seen();
    assert!(seen.contains(&Some("hf_SECRET_A".into())));
    assert!(seen.contains(&Some("hf_SECRET_B".into())));
    // ... and nothing else.
    let metrics = String::from_utf8_lossy(&get(&app, "/metrics").await.body).to_string();
    let info = String::from_utf8_lossy(&get(&app, "/info").await.body).to_string();
    // The failure is logged before the request's error is sent, so it is there already.
    let logged = logs.text();
    assert!(
        logged.contains("org/gated"),
        "the failure was logged: {logged}"
    );
    for text in [&metrics, &info, &logged, &bodies, &list.to_string()] {
        assert!(!text.contains("SECRET"), "token leaked: {text}");
    }
}

#[tokio::test]
async fn merged_adapters_are_checked_and_run_as_one_adapter() {
    let shard = fake();
    let app = app(shard.clone(), 8);
    let bad = [
        json!({"merged_adapters": {"ids": []}}),
        json!({"merged_adapters": {"ids": ["a", "b"], "weights": [1.0]}}),
        json!({"merged_adapters": {"ids": ["a"], "merge_strategy": "average"}}),
        json!({"merged_adapters": {"ids": ["a"], "density": 0.0}}),
        json!({"merged_adapters": {"ids": ["a"], "density": 1.5}}),
        json!({"merged_adapters": {"ids": ["a"], "majority_sign_method": "max"}}),
        json!({"merged_adapters": {"ids": ["a"]}, "adapter_id": "b"}),
        json!({"merged_adapters": {"ids": "a"}}),
    ];
    for adapter in bad {
        let answer = post(&app, "/generate", generate(adapter.clone())).await;
        assert_error(&answer, 422, "validation");
    }
    let merged = json!({"merged_adapters": {"ids": ["a", "b"], "weights": [0.7, 0.3],
        "merge_strategy": "ties", "density": 0.5, "majority_sign_method": null}});
    let answer = post(&app, "/generate", generate(merged)).await;
    assert!(text_of(&answer).contains("[a+b]"));
    assert!(shard.calls().contains(&Call::Download {
        adapter: "a+b".into()
    }));
    let list = get(&app, "/adapters").await.json();
    assert_eq!(
        list[0]["merged_adapters"],
        json!({"ids": ["a", "b"], "weights": [0.7, 0.3], "merge_strategy": "ties",
               "density": 0.5, "majority_sign_method": "total"})
    );
    assert_eq!(list[0]["adapter_id"], "a+b");
}

#[tokio::test]
async fn default_adapter_base_model_and_openai_model_names() {
    let shard = fake();
    let adapters = AdapterConfig {
        default_adapter_id: Some("org/default".into()),
        ..adapter_config()
    };
    let app = app_with(shard.clone(), 8, adapters, exchange());
    let default = post(&app, "/generate", generate(json!({}))).await;
    assert!(text_of(&default).contains("[org/default]"));
    let base = post(
        &app,
        "/generate",
        generate(json!({"adapter_id": "test/model"})),
    )
    .await;
    assert!(!text_of(&base).contains('['));
    let named = post(&app, "/generate", generate(json!({"adapter_id": "org/x"}))).await;
    assert!(text_of(&named).contains("[org/x]"));
    for (model, expected) in [
        ("", Some("org/default")),
        ("test/model", None),
        ("org/y", Some("org/y")),
    ] {
        let body = json!({"model": model, "prompt": "hello", "max_tokens": 2});
        let answer = post(&app, "/v1/completions", body).await;
        assert_eq!(answer.status.as_u16(), 200);
        let text = answer.json()["choices"][0]["text"]
            .as_str()
            .unwrap()
            .to_string();
        match expected {
            Some(name) => assert!(text.contains(&format!("[{name}]")), "{text}"),
            None => assert!(!text.contains('['), "{text}"),
        }
    }
}

#[tokio::test]
async fn architectures_without_adapters_refuse_them() {
    let adapters = AdapterConfig {
        supports_adapters: false,
        architecture: "GPT2LMHeadModel".into(),
        ..adapter_config()
    };
    let app = app_with(fake(), 8, adapters, exchange());
    let answer = post(&app, "/generate", generate(json!({"adapter_id": "org/a"}))).await;
    assert_error(&answer, 422, "validation");
    assert!(answer.json()["error"]
        .as_str()
        .unwrap()
        .contains("architecture GPT2LMHeadModel does not support dynamic adapter loading"));
    let load = post(&app, "/adapters/load", json!({"adapter_id": "org/a"})).await;
    assert_error(&load, 422, "validation");
    assert_eq!(
        post(&app, "/generate", generate(json!({}))).await.status,
        200
    );
}

#[tokio::test]
async fn stream_and_openai_chat_with_an_adapter() {
    let shard: Arc<FakeShard> = fake();
    let app = app(shard, 8);
    let answer = post(
        &app,
        "/generate_stream",
        generate(json!({"adapter_id": "org/s"})),
    )
    .await;
    let events = answer.events();
    assert!(events.last().unwrap()["generated_text"]
        .as_str()
        .unwrap()
        .contains("[org/s]"));
    let chat = json!({"model": "org/c", "messages": [{"role": "user", "content": "hello"}],
                      "max_tokens": 2});
    let answer = post(&app, "/v1/chat/completions", chat).await;
    assert_eq!(answer.status.as_u16(), 200);
    let content = answer.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(content.contains("[org/c]"), "{content}");
}

/// A POST with an `Authorization` header.
fn post_with_auth(
    uri: &str,
    body: Value,
    authorization: &str,
) -> axum::http::Request<axum::body::Body> {
    let mut req = request("POST", uri, Some("application/json"), body.to_string());
    req.headers_mut()
        .insert("authorization", authorization.parse().unwrap());
    req
}

#[tokio::test]
async fn authorization_bearer_is_the_default_api_token() {
    let shard = fake();
    shard.set_adapter(
        "org/private",
        AdapterBehaviour {
            token: Some("hf_right".into()),
            ..Default::default()
        },
    );
    let app = app(shard.clone(), 8);
    let body = generate(json!({"adapter_id": "org/private"}));
    for uri in ["/generate", "/generate_stream", "/"] {
        for auth in ["Bearer hf_right", "bearer  hf_right "] {
            let answer = send(&app, post_with_auth(uri, body.clone(), auth)).await;
            assert_eq!(answer.status.as_u16(), 200, "{uri} {auth}");
        }
    }
    // `api_token` in the body wins over the header.
    let explicit = generate(json!({"adapter_id": "org/private", "api_token": "hf_wrong"}));
    let answer = send(
        &app,
        post_with_auth("/generate", explicit, "Bearer hf_right"),
    )
    .await;
    assert_error(&answer, 403, "forbidden");
    // An empty `api_token` counts as given: the header is not used (the server's token is).
    let empty = generate(json!({"adapter_id": "org/private", "api_token": ""}));
    let answer = send(&app, post_with_auth("/generate", empty, "Bearer hf_right")).await;
    assert_error(&answer, 401, "unauthorized");
    // Other schemes, or no header: no token.
    let answer = send(
        &app,
        post_with_auth("/generate", body.clone(), "Basic aGk6dGhlcmU="),
    )
    .await;
    assert_error(&answer, 401, "unauthorized");
    assert_error(&post(&app, "/generate", body).await, 401, "unauthorized");

    // The OpenAI routes too (OpenAI clients always send the header).
    let completion = json!({"model": "org/private", "prompt": "hello", "max_tokens": 2});
    let messages = json!([{"role": "user", "content": "hello"}]);
    let chat = json!({"model": "org/private", "messages": messages, "max_tokens": 2});
    for (uri, body) in [
        ("/v1/completions", completion),
        ("/v1/chat/completions", chat),
    ] {
        let answer = send(&app, post_with_auth(uri, body.clone(), "Bearer hf_right")).await;
        assert_eq!(answer.status.as_u16(), 200, "{uri}");
        assert_error(&post(&app, uri, body).await, 401, "unauthorized");
    }

    // The management endpoints find the private adapter by the header's token as well.
    let adapter = json!({"adapter_id": "org/private"});
    let pinned = send(
        &app,
        post_with_auth("/adapters/pin", adapter.clone(), "Bearer hf_right"),
    )
    .await;
    assert_eq!(pinned.status.as_u16(), 200);
    assert_eq!(pinned.json()["private"], true);
    assert_error(
        &post(&app, "/adapters/pin", adapter).await,
        404,
        "not_found",
    );
    // Only the token itself reached the shard.
    let seen = shard.tokens_seen();
    assert!(seen.iter().any(|t| t.as_deref() == Some("hf_right")));
    assert!(seen
        .iter()
        .flatten()
        .all(|t| t == "hf_right" || t == "hf_wrong"));
}

/// The token ids of the first prefilled request since `seen` prefills.
fn prompt_ids(shard: &FakeShard, seen: usize) -> Vec<u32> {
    shard.prefilled_requests()[seen].input_ids.clone()
}

#[tokio::test]
async fn an_adapter_with_its_own_chat_template_is_rendered_with_it() {
    let shard = fake();
    // "hello hello </s>" where the base template makes "<s>hello ".
    let own =
        "{% for m in messages %}{{ m['content'] }} {{ m['content'] }} {% endfor %}{{ eos_token }}";
    shard.set_adapter(
        "org/templated",
        AdapterBehaviour {
            chat_template: Some(own.into()),
            ..Default::default()
        },
    );
    shard.set_adapter(
        "org/broken",
        AdapterBehaviour {
            chat_template: Some("{% for %}".into()),
            ..Default::default()
        },
    );
    shard.set_adapter(
        "org/missing",
        failing(tonic::Code::NotFound, "no such repo"),
    );
    let app = app(shard.clone(), 8);
    let messages = json!([{"role": "user", "content": "hello"}]);
    let chat = |model: &str| json!({"model": model, "messages": messages, "max_tokens": 1});
    let cases = [
        ("org/templated", vec![4, 4, 2]),
        ("org/plain", vec![1, 4]),
        ("", vec![1, 4]),
    ];
    for (model, ids) in cases {
        let seen = shard.prefilled_requests().len();
        let answer = post(&app, "/v1/chat/completions", chat(model)).await;
        assert_eq!(answer.status.as_u16(), 200, "{model}");
        assert_eq!(prompt_ids(&shard, seen), ids, "{model}");
    }
    // The native endpoints' `apply_chat_template` too, streamed or not.
    for uri in ["/generate", "/generate_stream"] {
        let seen = shard.prefilled_requests().len();
        let body = json!({"inputs": messages.to_string(), "parameters": {
            "apply_chat_template": true, "max_new_tokens": 1, "adapter_id": "org/templated"}});
        assert_eq!(post(&app, uri, body).await.status.as_u16(), 200, "{uri}");
        assert_eq!(prompt_ids(&shard, seen), vec![4, 4, 2], "{uri}");
    }
    // A template that does not compile is the request's error, not the base template's prompt.
    let broken = post(&app, "/v1/chat/completions", chat("org/broken")).await;
    assert_error(&broken, 422, "validation");
    let message = broken.json()["error"].as_str().unwrap().to_string();
    assert!(
        message.contains("adapter `org/broken` ships a chat template that cannot be used"),
        "{message}"
    );
    // An adapter that cannot be downloaded fails as its generate request would.
    let missing = post(&app, "/v1/chat/completions", chat("org/missing")).await;
    assert_error(&missing, 422, "validation");
    assert!(missing.json()["error"]
        .as_str()
        .unwrap()
        .contains("no such repo"));
    // Its adapter's generation still works without a chat template.
    let plain = post(
        &app,
        "/generate",
        generate(json!({"adapter_id": "org/broken"})),
    )
    .await;
    assert!(!text_of(&plain).is_empty());
}
