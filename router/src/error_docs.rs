//! The error answers of the OpenAPI document, each with the `ErrorResponse` body: the sets the
//! handlers' `#[utoipa::path]` annotations name, so every operation documents the statuses it
//! really returns (see `errors` for where each comes from).

use std::collections::BTreeMap;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::{ContentBuilder, Ref, RefOr};
use utoipa::IntoResponses;

fn error(description: &str) -> RefOr<Response> {
    let content = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("ErrorResponse")))
        .build();
    ResponseBuilder::new()
        .description(description)
        .content("application/json", content)
        .build()
        .into()
}

fn map(statuses: &[(&str, &str)]) -> BTreeMap<String, RefOr<Response>> {
    statuses
        .iter()
        .map(|(status, description)| (status.to_string(), error(description)))
        .collect()
}

/// What any JSON body can be refused with (axum's rejections, answered as JSON).
const BODY: [(&str, &str); 4] = [
    ("400", "Malformed JSON"),
    ("413", "Body too large"),
    ("415", "Content type is not application/json"),
    (
        "422",
        "Input validation error (bad parameters, too long input, unknown or invalid adapter)",
    ),
];

/// What a request naming an adapter can fail with beyond its body.
const ADAPTER: [(&str, &str); 3] = [
    ("401", "Private adapter: api_token missing or invalid"),
    ("403", "Private adapter: the api_token has no access"),
    (
        "424",
        "Generation error (a shard failed, an adapter source is unreachable, ...)",
    ),
];

const OVERLOADED: (&str, &str) = ("429", "Model is overloaded (max_concurrent_requests)");

/// Errors of an operation that only reads its body (`/tokenize`).
pub struct BodyErrors;

impl IntoResponses for BodyErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        map(&BODY)
    }
}

/// Errors of a generation (native and OpenAI).
pub struct GenerationErrors;

impl IntoResponses for GenerationErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut all = map(&BODY);
        all.extend(map(&ADAPTER));
        all.extend(map(&[OVERLOADED]));
        all
    }
}

/// Errors of the encoder endpoints (`/embed`, `/v1/embeddings`, `/classify*`): no adapter is
/// fetched for them, so never 401/403.
pub struct EncoderErrors;

impl IntoResponses for EncoderErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut all = map(&BODY);
        all.extend(map(&[
            (
                "422",
                "Input validation error (empty or too long input, empty or too long list, an \
                 adapter named, the model does not serve this task)",
            ),
            ("424", "Inference error (a shard failed)"),
            OVERLOADED,
        ]));
        all
    }
}

/// Errors of the adapter management commands (never 429: they are not generation requests).
pub struct AdapterErrors;

impl IntoResponses for AdapterErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut all = map(&BODY);
        all.extend(map(&ADAPTER));
        all.extend(map(&[
            ("404", "The adapter is not tracked"),
            (
                "409",
                "Not possible in the adapter's state (in use, loading, pinned, pin limit)",
            ),
        ]));
        all
    }
}

/// `GET /health` and its aliases when the server cannot generate now.
pub struct Unhealthy;

impl IntoResponses for Unhealthy {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        map(&[("503", "Unhealthy (the reason is in `error`)")])
    }
}
