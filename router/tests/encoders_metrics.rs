//! Encoder requests are counted like generations: `lorax_request_count`, `_success` and
//! `_failure` of the base model, the request histograms, and their own (inputs per request,
//! entities per input, inputs per shard call). The only test of this binary: the recorder is
//! global, and the counts checked must be this test's alone.

mod common;

use axum::http::StatusCode;
use common::*;
use lorax_router::testing::FakeShard;
use serde_json::json;
use std::sync::Arc;

#[tokio::test]
async fn encoder_requests_are_counted() {
    let shard = Arc::new(FakeShard::encoder(1000, true, true));
    let app = encoder_app(shard, 4);
    let embed = post(&app, "/embed", json!({"inputs": "john"})).await;
    assert_eq!(embed.status, StatusCode::OK);
    let batch = json!({"inputs": ["john lives in new york", "acme"]});
    assert_eq!(
        post(&app, "/classify_batch", batch).await.status,
        StatusCode::OK
    );
    let empty = post(&app, "/v1/embeddings", json!({"input": []})).await;
    assert_error(&empty, 422, "validation");
    let generate = post(&app, "/generate", json!({"inputs": "john"})).await;
    assert_error(&generate, 422, "validation");

    let text = String::from_utf8(get(&app, "/metrics").await.body.to_vec()).unwrap();
    let value = |line: &str| metric_value(&text, line).unwrap_or_else(|| panic!("{line}\n{text}"));
    assert_eq!(value(r#"lorax_request_count{adapter="base"}"#), 4.0);
    assert_eq!(value(r#"lorax_request_success{adapter="base"}"#), 2.0);
    let failed = r#"lorax_request_failure{adapter="base",err="validation"}"#;
    assert_eq!(value(failed), 2.0);
    assert_eq!(value("lorax_request_input_count_count"), 2.0);
    assert_eq!(value("lorax_request_input_count_sum"), 3.0);
    // [CLS] john [SEP] + [CLS] john lives in new york [SEP] + [CLS] acme [SEP]
    assert_eq!(
        value(r#"lorax_request_input_length_sum{adapter="base"}"#),
        3.0 + 7.0 + 3.0
    );
    // Entities: PER + LOC in the first classified input, ORG in the second.
    assert_eq!(value("lorax_request_classify_output_count_sum"), 3.0);
    assert_eq!(
        value(r#"lorax_batch_inference_success{method="embed"}"#),
        1.0
    );
    assert_eq!(
        value(r#"lorax_batch_inference_success{method="classify"}"#),
        1.0
    );
    assert_eq!(
        value(r#"lorax_encoder_call_inputs_sum{method="classify"}"#),
        2.0
    );
    assert_eq!(value("lorax_encoder_queue_size"), 0.0);
    // Histograms with buckets, not summaries.
    assert_eq!(value(r#"lorax_request_input_count_bucket{le="2"}"#), 2.0);
    assert_eq!(value(r#"lorax_request_input_count_bucket{le="1"}"#), 1.0);
    assert!(metric_value(
        &text,
        r#"lorax_request_generated_tokens_count{adapter="base"}"#
    )
    .is_none());
}
