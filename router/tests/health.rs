//! `GET /health` answers whether the server can generate now: an idle server proves it with a
//! one-token probe (never counted as a request), a stuck decode step turns it 503 once it has run
//! longer than the bound, and it recovers once steps complete again. No assertion depends on how
//! fast the machine is: the intervals are either far longer than the test or as short as can be.

mod common;

use axum::http::StatusCode;
use common::*;
use lorax_router::health::HealthConfig;
use lorax_router::testing::{Call, FakeShard};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

const STALL: Duration = Duration::from_millis(1000);
/// Far longer than the test runs: a step proves health for the whole test, so whether a check
/// probes never depends on how fast the machine is.
const LONG: Duration = Duration::from_secs(600);
/// The smallest interval: every check whose loop is idle probes.
const ALWAYS: Duration = Duration::from_nanos(1);
/// Only stops a broken test from hanging; no assertion depends on it.
const GIVE_UP: Duration = Duration::from_secs(60);

fn health_app(shard: Arc<FakeShard>, probe_interval: Duration) -> axum::Router {
    let health = HealthConfig {
        stall_timeout: STALL,
        probe_interval,
    };
    app_with_health(shard, 4, adapter_config(), exchange(), health)
}

fn prefills(shard: &FakeShard) -> usize {
    shard
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::Prefill { .. }))
        .count()
}

/// The value of a metric line (`name{labels} value`), 0 when absent.
async fn metric(app: &axum::Router, line_start: &str) -> f64 {
    let text = String::from_utf8(get(app, "/metrics").await.body.to_vec()).unwrap();
    metric_value(&text, line_start).unwrap_or(0.0)
}

#[tokio::test]
async fn an_idle_server_probes_once_per_interval() {
    let shard = Arc::new(FakeShard::gated(1000, 1));
    let app = health_app(shard.clone(), ALWAYS);
    // Each check finds no recent step and runs one probe: a prefill of one new token.
    for n in 1..=3 {
        shard.allow_steps(1);
        assert_eq!(get(&app, "/health").await.status, StatusCode::OK);
        assert_eq!(prefills(&shard), n);
    }
}

// The only test of this binary that sends requests: the metrics recorder is global, and the
// request count checked below must see this test's requests only.
#[tokio::test]
async fn health_turns_503_when_a_step_hangs_and_probes_are_not_requests() {
    let shard = Arc::new(FakeShard::gated(1000, 1));
    let app = health_app(shard.clone(), LONG);
    let requests = "lorax_request_count{adapter=\"base\"}";

    // Idle: the first check runs one probe; the step it made proves health for the interval.
    shard.allow_steps(1);
    assert_eq!(get(&app, "/health").await.status, StatusCode::OK);
    assert_eq!(get(&app, "/health").await.status, StatusCode::OK);
    assert_eq!(prefills(&shard), 1);
    assert_eq!(metric(&app, requests).await, 0.0, "probes are not requests");

    // A request whose decode never returns.
    let request = {
        let app = app.clone();
        tokio::spawn(async move {
            post(
                &app,
                "/generate",
                json!({"inputs": "hello", "parameters": {"max_new_tokens": 3}}),
            )
            .await
        })
    };
    shard.allow_steps(1);
    let stuck_since = Instant::now();
    let answer = loop {
        let answer = get(&app, "/health").await;
        if answer.status != StatusCode::OK {
            break answer;
        }
        assert!(stuck_since.elapsed() < GIVE_UP, "never turned unhealthy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_error(&answer, 503, "healthcheck");
    let reason = answer.json()["error"].as_str().unwrap().to_string();
    assert!(reason.contains("decode step has been running"), "{reason}");
    // Not before the bound: the decode started after `stuck_since`.
    assert!(
        stuck_since.elapsed() >= STALL,
        "{:?}",
        stuck_since.elapsed()
    );

    // The shard answers again: the request finishes and health comes back.
    shard.allow_steps(100);
    let answer = request.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(get(&app, "/health").await.status, StatusCode::OK);
    assert_eq!(metric(&app, requests).await, 1.0, "only the real request");
}
