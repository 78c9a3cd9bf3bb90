//! The HTTP admin API: bearer auth, node views, drain, pools, health,
//! Prometheus metrics, and JSON errors for bad requests.

use lingua_coordinator::config::Config;
use lingua_shared::Message;
use lingua_shared::protocol::Drain;
use lingua_tests::{Received, TestCoordinator, TestNode, registration, test_config};

const API_TOKEN: &str = "an-api-token-for-the-tests";

#[tokio::test]
async fn api_tokens_guard_every_route_but_healthz_and_the_node_socket() {
    let redis = lingua_tests::redis().await;
    let config = Config {
        api_tokens: vec![API_TOKEN.into()],
        ..test_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    let client = reqwest::Client::new();
    let guarded = [
        "/v1/nodes",
        "/v1/nodes/x",
        "/v1/pools",
        "/v1/fleet",
        "/v1/fleet/events",
        "/metrics",
    ];
    for path in guarded {
        let response = client.get(coordinator.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 401, "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
        let wrong = client
            .get(coordinator.url(path))
            .bearer_auth("an-api-token-for-the-testZ")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{path}");
    }
    let drain = client
        .post(coordinator.url("/v1/nodes/x/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(drain.status(), 401);
    let ok = client
        .get(coordinator.url("/v1/nodes"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(coordinator.get("/healthz").await.0, 200);
    // Nodes authenticate with node tokens, not API tokens.
    let (node, _) =
        TestNode::register(&coordinator.ws_url(), registration("n", &["zh"], &["en"])).await;
    node.close().await;
    coordinator.stop().await;
}

#[tokio::test]
async fn drain_stops_routing_and_tells_the_node() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let (mut node, _) = TestNode::register(
        &coordinator.ws_url(),
        registration("maint", &["zh"], &["en"]),
    )
    .await;
    let client = reqwest::Client::new();
    let response = client
        .post(coordinator.url("/v1/nodes/maint/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let view: serde_json::Value = response.json().await.unwrap();
    assert_eq!(view["state"], "draining");
    assert!(matches!(
        node.recv().await,
        Received::Message(Message::Drain(Drain { .. }))
    ));
    let mut conn = lingua_tests::connect(&redis).await;
    let routable: Option<f64> = redis::cmd("ZSCORE")
        .arg("lingua:v1:pair:{zh:en}:route:translate")
        .arg("maint")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(routable, None, "a draining node is not routable");
    let (_, listed) = coordinator.get("/v1/nodes").await;
    assert_eq!(listed["nodes"][0]["state"], "draining");

    let unknown = client
        .post(coordinator.url("/v1/nodes/nobody/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    node.close().await;
    lingua_tests::eventually("the node to go offline", || async {
        let (_, view) = coordinator.get("/v1/nodes/maint").await;
        (view["state"] == "offline").then_some(())
    })
    .await;
    let offline = client
        .post(coordinator.url("/v1/nodes/maint/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(offline.status(), 409);
    coordinator.stop().await;
}

#[tokio::test]
async fn bad_requests_get_json_errors_and_the_service_keeps_serving() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let (status, body) = coordinator.get("/v1/nodes/has%20space").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_request");
    let (status, body) = coordinator.get("/v1/nodes/never-seen").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    let (status, body) = coordinator.get("/no/such/route").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    let huge = reqwest::Client::new()
        .post(coordinator.url("/v1/nodes/x/drain"))
        .body(vec![b'x'; 3 << 20])
        .send()
        .await;
    assert!(huge.is_err() || huge.unwrap().status().is_client_error());
    assert_eq!(coordinator.get("/healthz").await.0, 200);
    coordinator.stop().await;
}

#[tokio::test]
async fn metrics_are_valid_prometheus_text() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let (node, _) = TestNode::register(
        &coordinator.ws_url(),
        registration("metered", &["zh", "en"], &["en"]),
    )
    .await;
    let text = reqwest::get(coordinator.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "lingua_nodes_connected 1",
        "lingua_node_registrations_total{outcome=\"ok\"} 1",
        "lingua_heartbeats_total",
        "lingua_redis_script_duration_seconds_bucket{",
        "lingua_pool_nodes{pair=\"zh:en\",pool=\"1\"} 1",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    assert!(
        !text.contains("# EOF"),
        "without an Accept header: the classic text format"
    );
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        assert!(value.parse::<f64>().is_ok(), "bad value in {line}");
        let name_end = series.find('{').unwrap_or(series.len());
        assert!(
            series[..name_end]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name in {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unclosed labels in {line}");
        }
    }
    node.close().await;
    coordinator.stop().await;
}
