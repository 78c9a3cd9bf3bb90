//! Node registration, pools, liveness and duplicate ids, against a real
//! coordinator, real Redis and real WebSockets.

use std::time::Duration;

use lingua_shared::close::CloseCode;
use lingua_shared::protocol::{CapacityReport, Heartbeat};
use lingua_shared::{JobKind, Message};

use lingua_coordinator::node_ws::MIN_PUBLISH_INTERVAL;
use lingua_tests::{Received, TestCoordinator, TestNode, eventually, registration, test_config};
use serde_json::Value;

fn pools_of(body: &Value, node: &str) -> Vec<String> {
    let mut pairs: Vec<String> = body["pools"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|pool| pool["nodes"].as_array().unwrap().iter().any(|n| n == node))
        .map(|pool| pool["pair"].as_str().unwrap().to_owned())
        .collect();
    pairs.sort();
    pairs
}

fn node_state(body: &Value) -> String {
    body["state"].as_str().unwrap_or_default().to_owned()
}

async fn route_members(
    redis: &lingua_coordinator::private_redis::PrivateRedis,
    pair: &str,
) -> Vec<String> {
    let mut conn = lingua_tests::connect(redis).await;
    redis::cmd("ZRANGE")
        .arg(format!("lingua:v1:pair:{{{pair}}}:route:translate"))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn node_joins_one_pool_per_directed_pair_and_leaves_on_close() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let (node, ack) = TestNode::register(
        &coordinator.ws_url(),
        registration("gpu-1", &["zh", "en"], &["en", "ja"]),
    )
    .await;
    let acked: Vec<String> = ack.pairs.iter().map(ToString::to_string).collect();
    assert_eq!(acked, ["en:ja", "zh:en", "zh:ja"]);
    assert_eq!(ack.heartbeat_interval_ms, 200);
    assert!(ack.epoch >= 1);

    let (status, pools) = coordinator.get("/v1/pools").await;
    assert_eq!(status, 200);
    assert_eq!(pools_of(&pools, "gpu-1"), ["en:ja", "zh:en", "zh:ja"]);
    eventually("routing entries", || async {
        (route_members(&redis, "zh:en").await == ["gpu-1"]).then_some(())
    })
    .await;

    let (status, view) = coordinator.get("/v1/nodes/gpu-1").await;
    assert_eq!(status, 200);
    assert_eq!(node_state(&view), "ready");
    assert_eq!(view["src_langs"], serde_json::json!(["zh", "en"]));
    assert_eq!(view["pools"]["zh:en"], "1");

    node.close().await;
    eventually("the closed node to leave routing", || async {
        let (_, pools) = coordinator.get("/v1/pools").await;
        (pools_of(&pools, "gpu-1").is_empty() && route_members(&redis, "zh:en").await.is_empty())
            .then_some(())
    })
    .await;
    let (_, view) = coordinator.get("/v1/nodes/gpu-1").await;
    assert_eq!(node_state(&view), "offline");
    assert_eq!(
        view["pools"],
        serde_json::json!({}),
        "an offline node holds no pool"
    );
    coordinator.stop().await;
}

#[tokio::test]
async fn silent_node_is_closed_and_leaves_routing_after_missed_heartbeats() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let (mut node, _) = TestNode::register(
        &coordinator.ws_url(),
        registration("quiet", &["zh"], &["en"]),
    )
    .await;
    // No heartbeat is ever sent: after 3 x 200 ms the coordinator gives up.
    assert_eq!(node.closed().await, CloseCode::HeartbeatTimeout.code());
    eventually("the silent node to go offline", || async {
        let (_, view) = coordinator.get("/v1/nodes/quiet").await;
        (node_state(&view) == "offline" && route_members(&redis, "zh:en").await.is_empty())
            .then_some(())
    })
    .await;
    coordinator.stop().await;
}

#[tokio::test]
async fn heartbeats_keep_a_node_alive_and_capacity_drives_routing() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let (mut node, _) = TestNode::register(
        &coordinator.ws_url(),
        registration("busy", &["zh"], &["en"]),
    )
    .await;
    let kind = JobKind::new("translate").unwrap();
    let full = CapacityReport {
        free_slots: [(kind.clone(), 0)].into(),
        ..CapacityReport::default()
    };
    // Beat for longer than a lease (600 ms) while full: alive, not routable.
    for seq in 0..8 {
        node.send(&Message::Heartbeat(Heartbeat {
            seq,
            capacity: full.clone(),
        }))
        .await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (_, view) = coordinator.get("/v1/nodes/busy").await;
    assert_eq!(node_state(&view), "ready");
    assert_eq!(view["capacity"]["free_slots"]["translate"], 0);
    assert!(route_members(&redis, "zh:en").await.is_empty());

    node.send(&Message::Capacity(CapacityReport {
        free_slots: [(kind, 2)].into(),
        ..CapacityReport::default()
    }))
    .await;
    eventually("room to make the node routable", || async {
        (route_members(&redis, "zh:en").await == ["busy"]).then_some(())
    })
    .await;
    coordinator.stop().await;
}

/// The free-slot hint of node `steady` in `zh:en`.
async fn free_hint(redis: &lingua_coordinator::private_redis::PrivateRedis) -> Option<u32> {
    let mut conn = lingua_tests::connect(redis).await;
    redis::cmd("HGET")
        .arg("lingua:v1:pair:{zh:en}:free:translate")
        .arg("steady")
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// A heartbeat that says nothing new costs routing nothing: only a change
/// of room (or half the routing lease spent) sends a routing update. A
/// mark written into the node's routing hint shows whether an update came.
#[tokio::test]
async fn a_heartbeat_updates_routing_only_when_the_room_changed() {
    let redis = lingua_tests::redis().await;
    let config = lingua_coordinator::config::Config {
        heartbeat_interval: Duration::from_secs(60),
        ..test_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    let (mut node, _) = TestNode::register(
        &coordinator.ws_url(),
        registration("steady", &["zh"], &["en"]),
    )
    .await;
    let kind = JobKind::new("translate").unwrap();
    let mut seq = 0;
    let mut beat = |free: u32| {
        seq += 1;
        Message::Heartbeat(Heartbeat {
            seq,
            capacity: CapacityReport {
                free_slots: [(kind.clone(), free)].into(),
                ..CapacityReport::default()
            },
        })
    };
    let hint = "lingua:v1:pair:{zh:en}:free:translate";
    let mut conn = lingua_tests::connect(&redis).await;
    // The first report's update may be written twice (the registration's
    // and its own); once a second change is seen, none is pending.
    for free in [2, 1] {
        node.send(&beat(free)).await;
        eventually("the heartbeat's room in routing", || async {
            (free_hint(&redis).await == Some(free)).then_some(())
        })
        .await;
    }
    let () = redis::cmd("HSET")
        .arg(hint)
        .arg("steady")
        .arg(9)
        .query_async(&mut conn)
        .await
        .unwrap();
    for read in 3..=7u32 {
        node.send(&beat(1)).await;
        eventually("the heartbeat to be read", || async {
            let beats = coordinator.metric(None, "lingua_heartbeats_total").await?;
            (beats >= f64::from(read)).then_some(())
        })
        .await;
    }
    // Any update would rewrite the mark within MIN_PUBLISH_INTERVAL and a
    // flush; none may come in ten times that.
    let rewritten = tokio::time::timeout(MIN_PUBLISH_INTERVAL * 10, async {
        while free_hint(&redis).await == Some(9) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        rewritten.is_err(),
        "unchanged heartbeats updated routing: {:?}",
        free_hint(&redis).await
    );
    node.send(&beat(3)).await;
    eventually("the changed room in routing", || async {
        (free_hint(&redis).await == Some(3)).then_some(())
    })
    .await;
    coordinator.stop().await;
}

#[tokio::test]
async fn reconnect_of_the_same_agent_supersedes_its_stale_socket() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let register = registration("gpu-2", &["zh"], &["en"]);
    let (mut old, first) = TestNode::register(&coordinator.ws_url(), register.clone()).await;
    let (new, second) = TestNode::register(&coordinator.ws_url(), register).await;
    assert!(
        second.epoch > first.epoch,
        "epochs grow: {} then {}",
        first.epoch,
        second.epoch
    );
    assert_eq!(old.closed().await, CloseCode::Superseded.code());
    // The old socket's cleanup must not take the live node out.
    let (_, view) = coordinator.get("/v1/nodes/gpu-2").await;
    assert_eq!(node_state(&view), "ready");
    assert_eq!(view["epoch"], second.epoch);
    let (_, pools) = coordinator.get("/v1/pools").await;
    assert_eq!(pools_of(&pools, "gpu-2"), ["zh:en"]);
    new.close().await;
    coordinator.stop().await;
}

#[tokio::test]
async fn a_second_live_agent_with_the_same_id_is_refused_and_told_why() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let (holder, _) = TestNode::register(
        &coordinator.ws_url(),
        registration("twin", &["zh"], &["en"]),
    )
    .await;
    let mut impostor_reg = registration("twin", &["en"], &["ja"]);
    impostor_reg.instance = "another-host".into();
    let mut impostor = TestNode::connect(&coordinator.ws_url()).await;
    impostor.send(&Message::Register(impostor_reg)).await;
    let refusal = match impostor.recv().await {
        Received::Message(Message::Error(error)) => error.message,
        other => panic!("expected an error frame, got {other:?}"),
    };
    assert!(refusal.contains("node_id"), "{refusal}");
    assert_eq!(impostor.closed().await, CloseCode::NodeIdConflict.code());
    assert!(
        !CloseCode::NodeIdConflict.is_fatal(),
        "the loser retries with backoff: a stale holder's lease runs out, and a squatter must not keep the real agent down"
    );
    let holder_instance = registration("twin", &["zh"], &["en"]).instance;
    assert!(
        !refusal.contains(&holder_instance),
        "the refusal does not disclose the holder's instance id: {refusal}"
    );
    // The holder is untouched.
    let (_, view) = coordinator.get("/v1/nodes/twin").await;
    assert_eq!(node_state(&view), "ready");
    assert_eq!(view["src_langs"], serde_json::json!(["zh"]));
    holder.close().await;
    coordinator.stop().await;
}

#[tokio::test]
async fn changed_languages_move_the_node_between_pools() {
    let redis = lingua_tests::redis().await;
    // These raw nodes send no heartbeats: a long interval keeps the new
    // registration alive while the test looks (with the 600 ms lease of
    // `test_config` a slow machine could see it dropped first).
    let config = lingua_coordinator::config::Config {
        heartbeat_interval: std::time::Duration::from_secs(60),
        ..test_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    let (mut old, _) = TestNode::register(
        &coordinator.ws_url(),
        registration("mover", &["zh"], &["en"]),
    )
    .await;
    // Same agent, restarted with other languages, before the old socket
    // closed: the old socket's cleanup is fenced off, so the new
    // registration itself must leave the old pools.
    let (node, ack) = TestNode::register(
        &coordinator.ws_url(),
        registration("mover", &["de"], &["fr"]),
    )
    .await;
    assert_eq!(ack.pairs.len(), 1);
    assert_eq!(old.closed().await, CloseCode::Superseded.code());
    eventually("the node to be only in de:fr", || async {
        let (_, pools) = coordinator.get("/v1/pools").await;
        (pools_of(&pools, "mover") == ["de:fr"]).then_some(())
    })
    .await;
    node.close().await;
    coordinator.stop().await;
}

#[tokio::test]
async fn shutdown_closes_node_sockets_with_going_away() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let (mut node, _) = TestNode::register(
        &coordinator.ws_url(),
        registration("leaver", &["zh"], &["en"]),
    )
    .await;
    let stopping = tokio::spawn(coordinator.stop());
    assert_eq!(node.closed().await, CloseCode::GoingAway.code());
    stopping.await.unwrap();
}
