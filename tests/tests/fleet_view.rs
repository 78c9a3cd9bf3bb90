//! The fleet view (`GET /v1/fleet`, `GET /v1/fleet/events`) and the
//! dashboard's assets: every instance shows the whole fleet, and live
//! views share one snapshot per interval however many watch.

use std::collections::BTreeSet;

use futures_util::future::join_all;
use lingua_coordinator::config::Config;
use lingua_tests::{TestAgent, TestCoordinator, agent_config, eventually, test_config};
use serde_json::{Value, json};

const ADMIN: &str = "a-fleet-view-admin-token";

fn config() -> Config {
    Config {
        api_tokens: vec![ADMIN.into()],
        client_tokens: vec!["a-fleet-view-client-token".into()],
        ..test_config()
    }
}

async fn get(http: &reqwest::Client, url: String) -> (u16, Value) {
    let response = http.get(url).bearer_auth(ADMIN).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn submit(http: &reqwest::Client, coordinator: &TestCoordinator, body: Value) -> Value {
    let response = http
        .post(coordinator.url("/v1/jobs"))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    response.json().await.unwrap()
}

#[tokio::test]
async fn every_instance_shows_every_node_and_every_instances_jobs() {
    let redis = lingua_tests::redis().await;
    let a = TestCoordinator::start(&redis, config()).await;
    let b = TestCoordinator::start(&redis, config()).await;
    let agent = TestAgent::start(agent_config("fv-1", &a.ws_url(), 5));
    agent.registered(1).await;
    let http = reqwest::Client::new();
    for i in 0..3 {
        let job = json!({"id": format!("fv-ok-{i}"), "kind": "translate", "src_lang": "zh",
            "tgt_lang": "en", "payload": {}});
        assert_eq!(submit(&http, &a, job).await["status"], "completed");
    }
    let unserved = json!({"id": "fv-unserved", "kind": "translate", "src_lang": "de",
        "tgt_lang": "fr", "payload": {}});
    assert_eq!(
        submit(&http, &a, unserved).await["error"]["code"],
        "no_nodes"
    );

    // B dispatched nothing and holds no socket: it shows what A did.
    let fleet = eventually("B shows A's jobs", || async {
        let (status, fleet) = get(&http, b.url("/v1/fleet")).await;
        assert_eq!(status, 200, "{fleet}");
        (fleet["coordinators"] == 2 && fleet["jobs"]["finished"] == 4).then_some(fleet)
    })
    .await;
    assert_eq!(
        fleet["nodes_by_state"],
        json!({"ready": 1, "draining": 0, "offline": 0})
    );
    assert_eq!(fleet["gpus"]["total"], 1);
    assert_eq!(fleet["gpus"]["memory_total_mb"], 17000);
    assert_eq!(fleet["jobs"]["failed"], json!({"no_nodes": 1}));
    assert!(fleet["jobs"]["p50_ms"].is_u64(), "{}", fleet["jobs"]);
    let failure = &fleet["jobs"]["recent_failures"][0];
    assert_eq!(failure["id"], "fv-unserved");
    assert_eq!(failure["code"], "no_nodes");
    assert_eq!(failure["pair"], "de:fr");
    let pair = &fleet["pairs"][0];
    assert_eq!(pair["pair"], "zh:en");
    assert_eq!(pair["ready_nodes"], 1);
    assert_eq!(pair["no_capacity"], false);
    assert_eq!(pair["free_slots"]["translate"], 8);
    assert_eq!(fleet["nodes"][0]["id"], "fv-1");
    assert_eq!(fleet["nodes"][0]["capacity"]["running"], 0);

    // A drained node's pair has no capacity left.
    let drained = http
        .post(b.url("/v1/nodes/fv-1/drain"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(drained.status(), 202);
    let (_, fleet) = get(&http, b.url("/v1/fleet")).await;
    assert_eq!(fleet["nodes_by_state"]["draining"], 1);
    assert_eq!(fleet["pairs"][0]["no_capacity"], true);

    // Its pair stays listed, without capacity, once its only node is gone.
    agent.stop().await.unwrap();
    let fleet = eventually("the node to go offline", || async {
        let (_, fleet) = get(&http, b.url("/v1/fleet")).await;
        (fleet["nodes_by_state"]["offline"] == 1).then_some(fleet)
    })
    .await;
    assert_eq!(fleet["pairs"][0]["pair"], "zh:en");
    assert_eq!(fleet["pairs"][0]["no_capacity"], true);
    a.stop().await;
    b.stop().await;
}

/// Reads `count` events from one `GET /v1/fleet/events` stream.
async fn events(http: &reqwest::Client, url: String, count: usize) -> Vec<Value> {
    let mut response = http.get(url).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/event-stream",
        "server-sent events"
    );
    let (mut buffer, mut events) = (String::new(), Vec::new());
    while events.len() < count {
        let chunk = response.chunk().await.unwrap().expect("the stream goes on");
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data:")) {
                assert!(event.contains("event: fleet"), "{event}");
                events.push(serde_json::from_str(data.trim_start()).unwrap());
            }
        }
    }
    events
}

#[tokio::test]
async fn live_views_share_one_snapshot_per_interval() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, config()).await;
    let http = reqwest::Client::new();
    let url = coordinator.url("/v1/fleet/events");
    let streams = join_all((0..3).map(|_| events(&http, url.clone(), 4))).await;

    let taken: Vec<BTreeSet<u64>> = streams
        .iter()
        .map(|events| {
            events
                .iter()
                .map(|e| e["at_ms"].as_u64().unwrap())
                .collect()
        })
        .collect();
    for other in &taken[1..] {
        let shared = taken[0].intersection(other).count();
        assert!(shared >= 3, "the streams saw the same snapshots: {taken:?}");
    }
    let seen: BTreeSet<u64> = taken.iter().flatten().copied().collect();
    let snapshots = coordinator
        .metric(Some(ADMIN), "lingua_fleet_snapshots_total")
        .await
        .expect("lingua_fleet_snapshots_total is exported") as usize;
    // Each snapshot was built once, whoever watched it; one more may have
    // been built since the streams read their last.
    assert!(
        snapshots <= seen.len() + 1,
        "{snapshots} snapshots for {} distinct events",
        seen.len()
    );
    coordinator.stop().await;
}

#[tokio::test]
async fn the_dashboard_is_served_without_a_token_and_the_data_only_with_one() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, config()).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for (path, content_type) in [
        ("/ui", "text/html; charset=utf-8"),
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/app.css", "text/css; charset=utf-8"),
    ] {
        let response = http.get(coordinator.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], content_type);
        let policy = response.headers()["content-security-policy"]
            .to_str()
            .unwrap();
        assert!(policy.contains("script-src 'self'"), "{policy}");
        assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
    }
    let root = http.get(coordinator.url("/")).send().await.unwrap();
    assert_eq!(root.headers()["location"], "/ui");

    let client = http
        .get(coordinator.url("/v1/fleet"))
        .bearer_auth("a-fleet-view-client-token")
        .send()
        .await
        .unwrap();
    assert_eq!(client.status(), 403, "a client token sees no fleet");
    let (status, fleet) = get(&http, coordinator.url("/v1/fleet")).await;
    assert_eq!(status, 200);
    assert_eq!(fleet["nodes"], json!([]));
    assert_eq!(fleet["jobs"]["p99_ms"], Value::Null);
    coordinator.stop().await;
}
