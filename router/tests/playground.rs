//! `GET /playground`: the page, its script and style are served from the binary, the page names
//! only those, and every API path its script calls is a route of the router.

mod common;

use axum::http::StatusCode;
use common::*;

/// The values of every `attr="..."` attribute in `html`.
fn attribute_values<'a>(html: &'a str, attr: &str) -> Vec<&'a str> {
    let needle = format!("{attr}=\"");
    html.match_indices(&needle)
        .map(|(at, _)| {
            let rest = &html[at + needle.len()..];
            &rest[..rest.find('"').expect("closing quote")]
        })
        .collect()
}

/// The string literals the script passes to `name(` (and `path: "..."` ones for `name` = `path: `).
fn literals_after<'a>(script: &'a str, prefix: &str) -> Vec<&'a str> {
    script
        .match_indices(prefix)
        .map(|(at, _)| {
            let rest = &script[at + prefix.len()..];
            &rest[..rest.find('"').expect("closing quote")]
        })
        .collect()
}

fn content_type(answer: &Answer) -> &str {
    answer.headers["content-type"].to_str().unwrap()
}

#[tokio::test]
async fn playground_page_is_html_with_only_embedded_assets() {
    let app = app(fake(), 4);
    let page = get(&app, "/playground").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        content_type(&page).starts_with("text/html"),
        "{:?}",
        page.headers
    );
    let policy = page.headers["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("default-src 'none'") && policy.contains("connect-src 'self'"));
    let html = String::from_utf8(page.body.to_vec()).unwrap();
    assert!(html.contains("<textarea id=\"prompt\""));

    let mut assets = attribute_values(&html, "src");
    assets.extend(attribute_values(&html, "href"));
    assert_eq!(assets.len(), 2, "{assets:?}");
    for asset in assets {
        assert!(
            !asset.contains(':') && !asset.starts_with('/'),
            "{asset} is not relative to the page"
        );
        // Relative to `/playground`, whose folder is `/`.
        let answer = get(&app, &format!("/{asset}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{asset}");
        let body = String::from_utf8(answer.body.to_vec()).unwrap();
        let (want, source) = if asset.ends_with(".js") {
            (
                "text/javascript",
                include_str!("../src/playground/playground.js"),
            )
        } else {
            ("text/css", include_str!("../src/playground/playground.css"))
        };
        assert!(content_type(&answer).starts_with(want), "{asset}");
        assert_eq!(body, source);
        // Nothing fetched from elsewhere: no absolute URLs, no CSS imports or url()s.
        let mut outside = vec!["http:", "https:", "//cdn"];
        if want == "text/css" {
            outside.extend(["@import", "url("]);
        }
        for name in outside {
            assert!(!body.contains(name), "{asset} names {name}");
        }
    }
}

#[tokio::test]
async fn playground_script_calls_only_router_routes() {
    let app = app(fake(), 4);
    let script =
        String::from_utf8(get(&app, "/playground/playground.js").await.body.to_vec()).unwrap();
    let mut paths = literals_after(&script, "endpoint(\"");
    paths.extend(literals_after(&script, "path: \""));
    paths.sort();
    paths.dedup();
    assert_eq!(
        paths,
        ["adapters", "generate_stream", "info", "v1/chat/completions"]
    );
    for path in paths {
        let answer = get(&app, &format!("/{path}")).await;
        // GET routes answer; POST-only ones say 405, an unknown path 404.
        assert_ne!(answer.status, StatusCode::NOT_FOUND, "/{path}");
    }
}

#[tokio::test]
async fn playground_is_not_a_prefix_route() {
    let app = app(fake(), 4);
    assert_eq!(
        get(&app, "/playground/other.js").await.status,
        StatusCode::NOT_FOUND
    );
}
