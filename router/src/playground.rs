//! `GET /playground`: a page to try the server from a browser (prompt, adapter, parameters,
//! streamed output, token details, OpenAI chat mode, the request as curl). Its HTML, script and
//! style are compiled into the binary and served from the router itself; the page loads nothing
//! from elsewhere (its `Content-Security-Policy` forbids it).

use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};

const HTML: &str = include_str!("playground/index.html");
const SCRIPT: &str = include_str!("playground/playground.js");
const STYLE: &str = include_str!("playground/playground.css");

/// What the page may load and talk to: this server only.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    response
}

/// `GET /playground`: the page.
pub async fn page() -> Response {
    asset("text/html; charset=utf-8", HTML)
}

/// `GET /playground/playground.js`.
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /playground/playground.css`.
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}
