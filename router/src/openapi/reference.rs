//! `docs/reference/openapi.json` is the generated document, pretty-printed: these tests fail
//! when it differs (regenerate with `LORAX_UPDATE_DOCS=1 cargo test` in router/), and check
//! what the document must say beyond what the types give by themselves.

use super::{docs_html, document};
use crate::validation::MAX_TOP_N_TOKENS;
use serde_json::{json, Value};
use std::path::PathBuf;

fn reference_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/reference/openapi.json")
}

fn generated() -> Value {
    document()
}

#[test]
fn reference_document_is_current() {
    let expected = serde_json::to_string_pretty(&generated()).unwrap() + "\n";
    let committed = std::fs::read_to_string(reference_path()).unwrap_or_default();
    if committed != expected {
        if std::env::var_os("LORAX_UPDATE_DOCS").is_some() {
            std::fs::write(reference_path(), expected).unwrap();
        } else {
            panic!(
                "docs/reference/openapi.json is out of date with the router's types; \
                 run `LORAX_UPDATE_DOCS=1 cargo test` in router/"
            );
        }
    }
}

#[test]
fn every_route_is_documented_with_its_errors() {
    let doc = generated();
    let paths = doc["paths"].as_object().unwrap();
    let routes = [
        ("/", "get"),
        ("/", "post"),
        ("/generate", "post"),
        ("/generate_stream", "post"),
        ("/health", "get"),
        ("/ping", "get"),
        ("/info", "get"),
        ("/metrics", "get"),
        ("/tokenize", "post"),
        ("/v1/completions", "post"),
        ("/v1/chat/completions", "post"),
        ("/v1/models", "get"),
        ("/v1/embeddings", "post"),
        ("/embed", "post"),
        ("/classify", "post"),
        ("/classify_batch", "post"),
        ("/adapters", "get"),
        ("/adapters/load", "post"),
        ("/adapters/unload", "post"),
        ("/adapters/pin", "post"),
        ("/adapters/unpin", "post"),
    ];
    for (path, method) in routes {
        assert!(paths[path][method].is_object(), "{method} {path}");
    }
    let statuses = |path: &str| -> Vec<String> {
        let responses = paths[path]["post"]["responses"].as_object().unwrap();
        responses.keys().cloned().collect()
    };
    for path in ["/generate", "/generate_stream", "/", "/v1/chat/completions"] {
        assert_eq!(
            statuses(path),
            ["200", "400", "401", "403", "413", "415", "422", "424", "429"],
            "{path}"
        );
    }
    for path in ["/embed", "/v1/embeddings", "/classify", "/classify_batch"] {
        assert_eq!(
            statuses(path),
            ["200", "400", "413", "415", "422", "424", "429"],
            "{path}"
        );
    }
    assert_eq!(
        statuses("/adapters/load"),
        ["200", "400", "401", "403", "404", "409", "413", "415", "422", "424"]
    );
    let stream = &paths["/generate_stream"]["post"]["responses"]["200"]["content"];
    let data = &stream["text/event-stream"]["schema"]["properties"]["data"];
    assert_eq!(
        data["contentSchema"]["anyOf"][0]["$ref"],
        "#/components/schemas/StreamResponse"
    );
}

#[test]
fn constraints_follow_validation() {
    let doc = generated();
    let schemas = &doc["components"]["schemas"];
    let parameters = &schemas["GenerateParameters"]["allOf"][1]["properties"];
    assert_eq!(
        parameters["top_n_tokens"]["maximum"],
        json!(MAX_TOP_N_TOKENS)
    );
    assert_eq!(parameters["max_new_tokens"]["minimum"], json!(1));
    assert_eq!(parameters["top_p"]["exclusiveMinimum"].as_f64(), Some(0.0));
    assert_eq!(parameters["details"]["default"], json!(true));
    let merged = &schemas["MergedAdapters"];
    let density = &merged["properties"]["density"];
    assert_eq!(density["exclusiveMinimum"].as_f64(), Some(0.0));
    assert_eq!(density["maximum"].as_f64(), Some(1.0));
    assert_eq!(merged["required"], json!(["ids"]));
}

#[test]
fn docs_page_lists_every_operation() {
    let page = docs_html(&generated());
    assert!(page.contains("<code>/generate_stream</code>"));
    assert!(page.contains("<code>/adapters/pin</code>"));
    assert!(page.contains("/api-doc/openapi.json"));
}
