//! CORS over HTTP: the preflight and the headers of a normal answer, by default and with the
//! `--cors-*` flags.

mod common;

use axum::body::Body;
use axum::http::Request;
use common::{app_with_cors, fake, send, Answer};

/// A browser's preflight for a POST to /generate from `origin` with `headers`.
async fn preflight(app: &axum::Router, origin: &str, method: &str, headers: &str) -> Answer {
    let request = Request::builder()
        .method("OPTIONS")
        .uri("/generate")
        .header("origin", origin)
        .header("access-control-request-method", method)
        .header("access-control-request-headers", headers)
        .body(Body::empty())
        .unwrap();
    send(app, request).await
}

/// A cross-origin `GET /info` from `origin`.
async fn info_from(app: &axum::Router, origin: &str) -> Answer {
    let request = Request::builder()
        .uri("/info")
        .header("origin", origin)
        .body(Body::empty())
        .unwrap();
    send(app, request).await
}

fn header<'a>(answer: &'a Answer, name: &str) -> Option<&'a str> {
    answer.headers.get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn without_flags_any_origin_may_get_and_post_json() {
    let app = app_with_cors(fake(), &[]).unwrap();
    let answer = preflight(&app, "http://site", "POST", "content-type").await;
    assert_eq!(answer.status.as_u16(), 200);
    assert_eq!(header(&answer, "access-control-allow-origin"), Some("*"));
    assert_eq!(
        header(&answer, "access-control-allow-methods"),
        Some("GET,POST")
    );
    assert_eq!(
        header(&answer, "access-control-allow-headers"),
        Some("content-type")
    );
    assert_eq!(header(&answer, "access-control-allow-credentials"), None);
    let answer = info_from(&app, "http://site").await;
    assert_eq!(answer.status.as_u16(), 200);
    assert_eq!(header(&answer, "access-control-allow-origin"), Some("*"));
    assert_eq!(header(&answer, "access-control-expose-headers"), None);
}

#[tokio::test]
async fn the_flags_set_the_preflight_and_the_exposed_headers() {
    let flags = [
        "--cors-allow-origin",
        "http://site,http://other",
        "--cors-allow-header",
        "Authorization",
        "--cors-allow-header",
        "content-type,x-trace",
        "--cors-allow-method",
        "post",
        "--cors-expose-header",
        "x-compute-time,x-request-id",
        "--cors-allow-credentials",
    ];
    let app = app_with_cors(fake(), &flags).unwrap();
    let answer = preflight(&app, "http://other", "POST", "authorization,x-trace").await;
    assert_eq!(answer.status.as_u16(), 200);
    assert_eq!(
        header(&answer, "access-control-allow-origin"),
        Some("http://other")
    );
    assert_eq!(
        header(&answer, "access-control-allow-methods"),
        Some("POST")
    );
    assert_eq!(
        header(&answer, "access-control-allow-headers"),
        Some("authorization,content-type,x-trace")
    );
    assert_eq!(
        header(&answer, "access-control-allow-credentials"),
        Some("true")
    );
    let answer = info_from(&app, "http://site").await;
    assert_eq!(answer.status.as_u16(), 200);
    assert_eq!(
        header(&answer, "access-control-allow-origin"),
        Some("http://site")
    );
    assert_eq!(
        header(&answer, "access-control-expose-headers"),
        Some("x-compute-time,x-request-id")
    );
    assert_eq!(
        header(&answer, "access-control-allow-credentials"),
        Some("true")
    );
    // An origin not listed gets no CORS grant.
    let answer = info_from(&app, "http://elsewhere").await;
    assert_eq!(header(&answer, "access-control-allow-origin"), None);
}

#[tokio::test]
async fn unusable_flags_are_errors_not_panics() {
    let error = app_with_cors(fake(), &["--cors-allow-credentials", "true"]).unwrap_err();
    assert!(error.contains("--cors-allow-origin"), "{error}");
    let error = app_with_cors(fake(), &["--cors-allow-method", "G T"]).unwrap_err();
    assert!(error.starts_with("--cors-allow-method:"), "{error}");
}
