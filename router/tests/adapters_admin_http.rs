//! Adapters over HTTP, the operator's side: the management endpoints (`/adapters`, load,
//! offload, pin), the adapter label of the metrics, and an adapter larger than the memory budget.

mod common;

use common::*;
use lorax_router::testing::{AdapterBehaviour, Call};
use serde_json::json;

#[tokio::test]
async fn management_endpoints() {
    let shard = fake();
    shard.set_adapter(
        "org/missing",
        failing(tonic::Code::NotFound, "no such repo"),
    );
    let app = app(shard.clone(), 8);
    assert_eq!(get(&app, "/adapters").await.json(), json!([]));
    let a = json!({"adapter_id": "org/a", "adapter_source": "local"});
    let loaded = post(&app, "/adapters/load", a.clone()).await;
    assert_eq!(loaded.status.as_u16(), 200);
    let status = loaded.json();
    assert_eq!(status["state"], "active");
    assert_eq!(status["index"], 1);
    assert_eq!(status["adapter_source"], "local");
    assert_eq!(status["pinned"], false);
    assert_eq!(status["private"], false);
    assert!(status["memory_fraction"].as_f64().unwrap() > 0.0);
    for field in [
        "adapter_ids",
        "queued",
        "running",
        "draining",
        "last_error",
        "active_for_s",
    ] {
        assert!(status.get(field).is_some(), "{field} in {status}");
    }
    let info = get(&app, "/info").await.json();
    assert_eq!(info["adapters"][0]["adapter_id"], "org/a");

    let pinned = post(&app, "/adapters/pin", a.clone()).await.json();
    assert_eq!(pinned["pinned"], true);
    assert_error(
        &post(&app, "/adapters/unload", a.clone()).await,
        409,
        "conflict",
    );
    // One of the two slots must stay unpinned.
    let b = json!({"adapter_id": "org/b", "adapter_source": "local", "pin": true});
    assert_error(&post(&app, "/adapters/load", b).await, 409, "conflict");
    assert_eq!(
        post(&app, "/adapters/unpin", a.clone()).await.json()["pinned"],
        false
    );
    let unloaded = post(&app, "/adapters/unload", a.clone()).await;
    assert_eq!(unloaded.json()["state"], "downloaded");
    assert_eq!(get(&app, "/info").await.json()["adapters"], json!([]));
    assert!(shard.installed_adapters().is_empty());

    // Same id, other source: another adapter, not tracked.
    let hub_a = json!({"adapter_id": "org/a"});
    assert_error(
        &post(&app, "/adapters/unload", hub_a.clone()).await,
        404,
        "not_found",
    );
    assert_error(&post(&app, "/adapters/pin", hub_a).await, 404, "not_found");
    assert_error(
        &post(&app, "/adapters/load", json!({})).await,
        422,
        "validation",
    );
    assert_error(
        &post(&app, "/adapters/load", json!({"adapter_id": "test/model"})).await,
        422,
        "validation",
    );
    let missing = post(&app, "/adapters/load", json!({"adapter_id": "org/missing"})).await;
    assert_error(&missing, 422, "validation");
    assert!(missing.json()["error"]
        .as_str()
        .unwrap()
        .contains("no such repo"));
    let list = get(&app, "/adapters").await.json();
    let failed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["adapter_id"] == "org/missing")
        .unwrap();
    assert_eq!(failed["state"], "failed");
    assert!(failed["index"].is_null());
}

#[tokio::test]
async fn adapter_metrics_have_bounded_labels() {
    let shard = fake();
    shard.set_adapter("org/m_bad", failing(tonic::Code::NotFound, "gone"));
    let app = app(shard.clone(), 8);
    let ok = post(
        &app,
        "/generate",
        generate(json!({"adapter_id": "org/m_good"})),
    )
    .await;
    assert!(text_of(&ok).contains("[org/m_good]"));
    let bad = post(
        &app,
        "/generate",
        generate(json!({"adapter_id": "org/m_bad"})),
    )
    .await;
    assert_error(&bad, 422, "validation");
    let text = String::from_utf8_lossy(&get(&app, "/metrics").await.body).to_string();
    for needle in [
        "lorax_request_count{adapter=\"org/m_good\"}",
        "lorax_request_success{adapter=\"org/m_good\"}",
        "lorax_request_generated_tokens_sum{adapter=\"org/m_good\"}",
        "lorax_adapter_load_duration_bucket{adapter=\"org/m_good\"",
        "lorax_adapter_failure{code=\"NotFound\"}",
        "lorax_request_failure{adapter=\"unknown\",err=\"validation\"}",
        "lorax_adapter_queue_size{adapter=",
        "lorax_adapters_active",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    assert!(!text.contains("m_bad"), "{text}");
}

#[tokio::test]
async fn adapter_larger_than_the_whole_budget_fails_at_once() {
    let shard = fake();
    shard.set_adapter(
        "org/huge",
        AdapterBehaviour {
            memory_fraction: Some(2606.5),
            ..Default::default()
        },
    );
    let app = app(shard.clone(), 8);
    // With another adapter pinned, the huge one used to wait for room forever.
    let small = json!({"adapter_id": "org/small", "pin": true});
    assert_eq!(
        post(&app, "/adapters/load", small).await.status.as_u16(),
        200
    );
    let answer = post(
        &app,
        "/generate",
        generate(json!({"adapter_id": "org/huge"})),
    )
    .await;
    assert_error(&answer, 424, "generation");
    let message = answer.json()["error"].as_str().unwrap().to_string();
    assert!(
        message
            .contains("could not be loaded: it needs 2606.5 times the whole adapter memory budget"),
        "{message}"
    );
    let load = post(&app, "/adapters/load", json!({"adapter_id": "org/huge"})).await;
    assert_error(&load, 424, "generation");
    // Never loaded; the pinned adapter kept its slot.
    let loads_huge = shard
        .calls()
        .iter()
        .any(|c| matches!(c, Call::Load { adapter, .. } if adapter == "org/huge"));
    assert!(!loads_huge);
    assert!(shard
        .installed_adapters()
        .values()
        .any(|a| a == "org/small"));
    // The listing shows a failure, and no tracked adapter above the whole budget.
    let list = get(&app, "/adapters").await.json();
    let list = list.as_array().unwrap();
    assert!(list
        .iter()
        .all(|a| a["memory_fraction"].as_f64().unwrap_or(0.0) <= 1.0));
    let huge = list.iter().find(|a| a["adapter_id"] == "org/huge").unwrap();
    assert_eq!(huge["state"], "failed");
    assert!(huge["memory_fraction"].is_null());
    // The base model and the small adapter still serve.
    let small = post(
        &app,
        "/generate",
        generate(json!({"adapter_id": "org/small"})),
    )
    .await;
    assert!(text_of(&small).contains("[org/small]"));
}
