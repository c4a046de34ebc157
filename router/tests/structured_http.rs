//! Constrained decoding and the OpenAI penalties over the native API, end to end with the fake
//! shard: which grammar reaches the shard for each form of `grammar` and `response_format`, that
//! every grammar is compiled on the shard before its request is queued (the fake records a
//! violation otherwise), and the 422s (router checks and shard refusals) and 424s.

mod common;

use axum::http::StatusCode;
use common::*;
use lorax_router::pb;
use lorax_router::testing::{Call, FakeShard, FAILING_GRAMMAR_MARKER, REFUSED_GRAMMAR_MARKER};
use serde_json::{json, Value};

async fn generate(app: &axum::Router, parameters: Value) -> Answer {
    let mut parameters = parameters;
    parameters["max_new_tokens"] = json!(2);
    post(
        app,
        "/generate",
        json!({"inputs": "hello", "parameters": parameters}),
    )
    .await
}

fn grammar(kind: pb::GrammarType, value: &str) -> Option<pb::Grammar> {
    Some(pb::Grammar {
        r#type: kind as i32,
        value: value.into(),
    })
}

fn compiles(shard: &FakeShard) -> Vec<pb::Grammar> {
    shard
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::CompileGrammar { grammar } => Some(grammar),
            _ => None,
        })
        .collect()
}

fn error_of(answer: &Answer) -> String {
    answer.json()["error"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn every_form_reaches_the_shard_compiled_before_its_prefill() {
    let shard = fake();
    let app = app(shard.clone(), 4);
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let schema_text = schema.to_string();
    let cases = [
        (
            json!({"response_format": {"type": "json_object", "schema": schema}}),
            grammar(pb::GrammarType::Json, &schema_text),
        ),
        (
            json!({"response_format": {"type": "json_object"}}),
            grammar(pb::GrammarType::Json, r#"{"type":"object"}"#),
        ),
        (
            json!({"response_format": {"type": "json_schema", "schema": schema_text}}),
            grammar(pb::GrammarType::Json, &schema_text),
        ),
        (
            json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "a", "schema": schema, "strict": true}}}),
            grammar(pb::GrammarType::Json, &schema_text),
        ),
        (
            json!({"grammar": {"type": "json", "value": schema}}),
            grammar(pb::GrammarType::Json, &schema_text),
        ),
        (
            json!({"grammar": {"type": "regex", "value": "[a-z]+"}}),
            grammar(pb::GrammarType::Regex, "[a-z]+"),
        ),
        (json!({"response_format": {"type": "text"}}), None),
        (json!({"response_format": null, "grammar": null}), None),
    ];
    for (i, (parameters, expected)) in cases.into_iter().enumerate() {
        let answer = generate(&app, parameters.clone()).await;
        assert_eq!(answer.status, StatusCode::OK, "{parameters}");
        let requests = shard.prefilled_requests();
        assert_eq!(requests.len(), i + 1);
        assert_eq!(requests[i].grammar, expected, "{parameters}");
    }
    // One compilation per constrained request; none for the unconstrained ones.
    assert_eq!(compiles(&shard).len(), 6);
    assert_eq!(shard.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn the_shard_gets_the_members_in_the_order_the_client_wrote_them() {
    let shard = fake();
    let app = app(shard.clone(), 4);
    let schema = r#"{"type": "object", "properties": {"zeta": {"type": "string"}, "alpha": {"type": "integer"}}}"#;
    let expected =
        r#"{"type":"object","properties":{"zeta":{"type":"string"},"alpha":{"type":"integer"}}}"#;
    // The schema as an object, and as a JSON string.
    for schema in [schema.to_string(), serde_json::to_string(schema).unwrap()] {
        let body = format!(
            r#"{{"inputs": "hello", "parameters": {{"max_new_tokens": 1,
            "response_format": {{"type": "json_object", "schema": {schema}}}}}}}"#
        );
        let answer = send(
            &app,
            request("POST", "/generate", Some("application/json"), body),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{schema}");
        let grammar = shard.prefilled_requests().pop().unwrap().grammar.unwrap();
        assert_eq!(grammar.value, expected);
    }
}

#[tokio::test]
async fn streams_and_best_of_compile_before_queueing_too() {
    let shard = fake();
    let app = app(shard.clone(), 4);
    let regex = json!({"grammar": {"type": "regex", "value": "[0-9]+"}});
    let answer = post(
        &app,
        "/generate_stream",
        json!({"inputs": "hello", "parameters": {"max_new_tokens": 2, "grammar": regex["grammar"]}}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.events().last().unwrap()["generated_text"].is_string());
    let best_of = json!({"best_of": 2, "do_sample": true, "grammar": regex["grammar"]});
    let answer = generate(&app, best_of).await;
    assert_eq!(answer.status, StatusCode::OK);
    // Each sequence of best_of is validated (and compiled) on its own.
    assert_eq!(compiles(&shard).len(), 3);
    let requests = shard.prefilled_requests();
    assert_eq!(requests.len(), 3);
    assert!(requests
        .iter()
        .all(|r| r.grammar == grammar(pb::GrammarType::Regex, "[0-9]+")));
    // Every CompileGrammar came before the Prefill of its request.
    let calls = shard.calls();
    let first_prefill = calls
        .iter()
        .position(|c| matches!(c, Call::Prefill { .. }))
        .unwrap();
    assert!(matches!(calls[0], Call::CompileGrammar { .. }));
    assert!(first_prefill > 0);
    assert_eq!(shard.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn shard_refusals_are_422_and_shard_failures_424_before_any_batch() {
    let shard = fake();
    let app = app(shard.clone(), 4);
    let refused = json!({"grammar": {"type": "regex", "value": REFUSED_GRAMMAR_MARKER}});
    let answer = generate(&app, refused).await;
    assert_error(&answer, 422, "validation");
    let error = error_of(&answer);
    assert!(
        error.contains("the grammar cannot be compiled: cannot compile the grammar"),
        "{error}"
    );
    // In a schema too, and on the stream endpoint.
    let schema = json!({"type": "string", "description": REFUSED_GRAMMAR_MARKER});
    let answer = post(
        &app,
        "/generate_stream",
        json!({"inputs": "hello", "parameters": {"response_format": {"type": "json_object", "schema": schema}}}),
    )
    .await;
    assert_error(&answer, 422, "validation");
    let failing = json!({"grammar": {"type": "regex", "value": FAILING_GRAMMAR_MARKER}});
    let answer = generate(&app, failing).await;
    assert_error(&answer, 424, "generation");
    assert!(error_of(&answer).contains("grammar worker died"));
    // None of them reached a batch.
    assert!(shard.prefilled_requests().is_empty());
    assert_eq!(compiles(&shard).len(), 3);
    // The server keeps serving.
    assert_eq!(generate(&app, json!({})).await.status, StatusCode::OK);
}

#[tokio::test]
async fn router_refusals_name_the_field_and_never_reach_the_shard() {
    let shard = fake();
    let app = app(shard.clone(), 4);
    let big = "x".repeat(70_000);
    let cases = [
        (
            json!({"response_format": {"type": "json_object", "schema": {"allOf": [{"type": "string"}]}}}),
            vec![
                "`response_format.schema`",
                "`allOf` at `/allOf`",
                "supported keywords",
            ],
        ),
        (
            json!({"grammar": {"type": "json", "value": {"properties": {"a": {"format": "phone"}}}}}),
            vec![
                "`grammar.value`",
                "`/properties/a/format`",
                "supported formats",
            ],
        ),
        (
            json!({"response_format": {"type": "json_object", "schema": {"$ref": "https://x.org/s.json"}}}),
            vec![
                "`response_format.schema`",
                "`$ref` at `/$ref` must be local",
            ],
        ),
        (
            json!({"response_format": {"type": "json_object", "schema": {"type": "strin"}}}),
            vec!["not a valid JSON Schema", "`/type`"],
        ),
        (
            json!({"response_format": {"type": "json_object", "schema": {"description": big}}}),
            vec!["`response_format.schema` must be at most 65536 bytes"],
        ),
        (
            json!({"grammar": {"type": "regex", "value": big}}),
            vec!["`grammar.value` must be at most 65536 bytes"],
        ),
        (
            json!({"grammar": {"type": "regex", "value": ""}}),
            vec!["`grammar.value` must be a non-empty regex"],
        ),
        (
            json!({"response_format": {"type": "xml"}}),
            vec!["`response_format.type` must be one of text, json_object, json_schema"],
        ),
        (
            json!({"grammar": {"type": "ebnf", "value": "x"}}),
            vec!["`grammar.type` must be one of json, json_object, regex"],
        ),
        (
            json!({"response_format": {"type": "json_schema"}}),
            vec!["needs `schema`"],
        ),
        (
            json!({"grammar": {"type": "regex", "value": "a"}, "response_format": {"type": "json_object"}}),
            vec!["`grammar` and `response_format` cannot both be set"],
        ),
    ];
    for (parameters, says) in cases {
        let answer = generate(&app, parameters.clone()).await;
        assert_error(&answer, 422, "validation");
        let error = error_of(&answer);
        for part in says {
            assert!(error.contains(part), "{part} not in {error}");
        }
    }
    assert!(compiles(&shard).is_empty());
    assert!(shard.prefilled_requests().is_empty());
}

#[tokio::test]
async fn penalties_reach_the_shard_and_are_bounded() {
    let shard = fake();
    let app = app(shard.clone(), 4);
    let answer = generate(
        &app,
        json!({"frequency_penalty": 0.5, "presence_penalty": -2.0}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let parameters = shard.prefilled_requests()[0].parameters.unwrap();
    assert_eq!(parameters.frequency_penalty, 0.5);
    assert_eq!(parameters.presence_penalty, -2.0);
    assert!(!parameters.do_sample);
    for (field, value, says) in [
        (
            "frequency_penalty",
            json!(2.5),
            "must be between -2.0 and 2.0. Given: 2.5",
        ),
        (
            "presence_penalty",
            json!(-3),
            "must be between -2.0 and 2.0. Given: -3",
        ),
        (
            "presence_penalty",
            json!("0.5"),
            "invalid type: string \"0.5\"",
        ),
        (
            "frequency_penalty",
            json!(true),
            "invalid type: boolean `true`",
        ),
    ] {
        let answer = generate(&app, json!({ field: value })).await;
        assert_error(&answer, 422, "validation");
        let error = error_of(&answer);
        assert!(error.contains(field), "{field}: {error}");
        assert!(error.contains(says), "{field}: {error}");
    }
}

#[tokio::test]
async fn lorax_client_payload_with_null_response_format_works() {
    let app = app(fake(), 4);
    let body = json!({"inputs": "hello", "parameters": {"adapter_id": null,
        "adapter_source": null, "merged_adapters": null, "api_token": null, "do_sample": false,
        "max_new_tokens": 2, "ignore_eos_token": false, "repetition_penalty": null,
        "return_full_text": false, "stop": [], "seed": null, "temperature": null, "top_k": null,
        "top_p": null, "truncate": null, "typical_p": null, "best_of": null, "watermark": false,
        "details": true, "decoder_input_details": false, "return_k_alternatives": null,
        "response_format": null}, "stream": false});
    let answer = post(&app, "/", body).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()[0]["details"]["generated_tokens"], 2);
}
