//! A real agent (simulated GPUs) against a real coordinator: registration,
//! capacity that follows the GPUs, reconnecting after a coordinator
//! restart, refusals that stop the agent, drain on shutdown, live reload,
//! and the frames a job costs.

use std::time::Duration;

use lingua_agent::agent::AgentError;
use lingua_agent::config::AgentConfig;
use lingua_coordinator::config::Config;
use lingua_shared::close::CloseCode;
use lingua_tests::fleet::Blackhole;
use lingua_tests::{TestAgent, TestCoordinator, agent_config, agent_toml, eventually, test_config};

async fn routable(conn: &redis::aio::MultiplexedConnection, node: &str) -> bool {
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg("lingua:v1:pair:{zh:en}:route:translate")
        .arg(node)
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    score.is_some()
}

async fn free_translate_slots(coordinator: &TestCoordinator, node: &str) -> Option<u64> {
    let (_, view) = coordinator.get(&format!("/v1/nodes/{node}")).await;
    view["capacity"]["free_slots"]["translate"].as_u64()
}

#[tokio::test]
async fn agent_registers_and_its_capacity_follows_the_gpus() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let agent = TestAgent::start(agent_config("agent-1", &coordinator.ws_url(), 100));
    agent.registered(1).await;
    let (_, view) = coordinator.get("/v1/nodes/agent-1").await;
    assert_eq!(view["state"], "ready");
    assert_eq!(view["gpus"][0]["memory_total_mb"], 17000);
    // (17000 - 1000 reserve) / 2000 per job = 8, also the max_concurrent.
    assert_eq!(free_translate_slots(&coordinator, "agent-1").await, Some(8));

    // Another tenant takes 9 GB: room for 3 jobs, reported without any job
    // running (heartbeat or capacity report).
    let gpus = agent.handles.simulated.clone().expect("simulated backend");
    gpus.set_external(0, 9000);
    eventually("capacity to drop to 3", || async {
        (free_translate_slots(&coordinator, "agent-1").await == Some(3)).then_some(())
    })
    .await;
    // Full: the node leaves the routing index for the kind.
    gpus.set_external(0, 15500);
    let conn = lingua_tests::connect(&redis).await;
    eventually("the full node to leave routing", || async {
        (!routable(&conn, "agent-1").await).then_some(())
    })
    .await;
    gpus.set_external(0, 0);
    eventually("room to bring it back", || async {
        routable(&conn, "agent-1").await.then_some(())
    })
    .await;
    agent.stop().await.unwrap();
    coordinator.stop().await;
}

#[tokio::test]
async fn agent_reconnects_and_re_registers_after_a_coordinator_restart() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let addr = coordinator.addr;
    let agent = TestAgent::start(agent_config("phoenix", &coordinator.ws_url(), 100));
    agent.registered(1).await;
    let (_, before) = coordinator.get("/v1/nodes/phoenix").await;
    coordinator.stop().await;
    let mut status = agent.handles.status.clone();
    status.wait_for(|s| !s.connected).await.unwrap();

    let coordinator = TestCoordinator::start_on(&redis, test_config(), None, addr).await;
    // Backoff is capped at 5 s; the harness waits up to 10 s.
    agent.registered(2).await;
    let (_, after) = coordinator.get("/v1/nodes/phoenix").await;
    assert_eq!(after["state"], "ready");
    assert!(
        after["epoch"].as_u64() > before["epoch"].as_u64(),
        "a new epoch: {before} -> {after}"
    );
    agent.stop().await.unwrap();
    coordinator.stop().await;
}

#[tokio::test]
async fn a_wrong_token_stops_the_agent_instead_of_retrying() {
    let redis = lingua_tests::redis().await;
    let config = Config {
        node_tokens: vec!["the-right-token-0123456789".into()],
        ..test_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    let mut settings = agent_config("locked-out", &coordinator.ws_url(), 100);
    settings.token = Some("the-wrong-token-0123456789".into());
    let agent = TestAgent::start(settings);
    let ended = agent.ended().await;
    assert!(
        matches!(
            ended,
            Err(AgentError::Refused {
                code: CloseCode::Unauthorized,
                ..
            })
        ),
        "{ended:?}"
    );
    coordinator.stop().await;
}

#[tokio::test]
async fn shutdown_announces_the_drain_and_closes_normally() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let agent = TestAgent::start(agent_config("leaving", &coordinator.ws_url(), 100));
    agent.registered(1).await;
    agent.stop().await.unwrap();
    eventually("the node to go offline", || async {
        let (_, view) = coordinator.get("/v1/nodes/leaving").await;
        (view["state"] == "offline").then_some(())
    })
    .await;
    coordinator.stop().await;
}

#[tokio::test]
async fn an_admin_drain_reaches_the_arbiter() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let agent = TestAgent::start(agent_config("maint-1", &coordinator.ws_url(), 100));
    agent.registered(1).await;
    let response = reqwest::Client::new()
        .post(coordinator.url("/v1/nodes/maint-1/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let arbiter = agent.handles.arbiter.clone();
    eventually("the agent to stop admitting", || async {
        (arbiter.free_slots().values().all(|&n| n == 0)).then_some(())
    })
    .await;
    let (_, view) = coordinator.get("/v1/nodes/maint-1").await;
    assert_eq!(view["state"], "draining");
    agent.stop().await.unwrap();
    coordinator.stop().await;
}

#[tokio::test]
async fn reload_applies_limits_live() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let config = agent_config("tunable", &coordinator.ws_url(), 100);
    let agent = TestAgent::start(config.clone());
    agent.registered(1).await;
    let mut smaller = config;
    smaller
        .jobs
        .values_mut()
        .for_each(|kind| kind.max_concurrent = 2);
    smaller.node_id = lingua_shared::NodeId::new("renamed").unwrap();
    agent.reload(smaller);
    eventually("the new limit to reach the coordinator", || async {
        (free_translate_slots(&coordinator, "tunable").await == Some(2)).then_some(())
    })
    .await;
    agent.stop().await.unwrap();
    coordinator.stop().await;
}

/// Submits translate jobs `ids` without waiting for them, and waits until
/// `agent` runs them all.
async fn submitted_and_running(coordinator: &TestCoordinator, agent: &TestAgent, ids: &[&str]) {
    let client = reqwest::Client::new();
    for id in ids {
        let job =
            serde_json::json!({"id": id, "kind": "translate", "src_lang": "zh", "tgt_lang": "en"});
        let response = client
            .post(coordinator.url("/v1/jobs?wait=false"))
            .json(&job)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
    let arbiter = agent.handles.arbiter.clone();
    eventually("the jobs to run", || async {
        (arbiter.running() as usize == ids.len()).then_some(())
    })
    .await;
}

#[tokio::test]
async fn results_finished_while_disconnected_are_delivered_once_after_reconnect() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let addr = coordinator.addr;
    let agent = TestAgent::start(agent_config("outboxer", &coordinator.ws_url(), 800));
    agent.registered(1).await;
    submitted_and_running(&coordinator, &agent, &["r-0", "r-1", "r-2"]).await;

    // The coordinator goes away while they run; they finish disconnected.
    coordinator.stop().await;
    let mut status = agent.handles.status.clone();
    status
        .wait_for(|s| !s.connected && s.outbox == 3)
        .await
        .unwrap();

    let coordinator = TestCoordinator::start_on(&redis, test_config(), None, addr).await;
    agent.registered(2).await;
    status.wait_for(|s| s.outbox == 0).await.unwrap();
    for i in 0..3 {
        let (code, job) = coordinator.get(&format!("/v1/jobs/r-{i}")).await;
        assert_eq!(code, 200, "{job}");
        assert_eq!(job["status"], "completed");
        assert_eq!(job["attempts"], 1);
    }
    let applied = r#"lingua_job_results_total{outcome="applied"}"#;
    assert_eq!(coordinator.metric(None, applied).await, Some(3.0));
    let duplicates = r#"lingua_job_results_total{outcome="duplicate"}"#;
    assert_eq!(
        coordinator.metric(None, duplicates).await,
        Some(0.0),
        "each result was applied exactly once"
    );
    agent.stop().await.unwrap();
    coordinator.stop().await;
}

/// A result too large for one frame, finished while the link was down,
/// goes out as a failure that says so once the link is back. Before, it
/// went out as it was: the coordinator closed the link (frame too large),
/// and the agent sent it again after each reconnection, for good.
#[tokio::test]
async fn a_result_too_large_for_a_frame_finished_while_disconnected_fails_saying_so() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let addr = coordinator.addr;
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    // A JSON string of 1,048,562 bytes: within the output limit (1 MiB),
    // over the frame limit once in a result. Written once `go` exists.
    let script = format!(
        r#"while [ ! -e {} ]; do sleep 0.02; done; printf "\""; head -c 1048560 /dev/zero | tr "\000" a; printf "\"""#,
        go.display()
    );
    let rest = format!(
        r#"[gpu]
backend = "simulated"
[jobs.translate]
vram_mb = 1000
executor = "command"
command = ["sh", "-c", '{script}']
"#
    );
    let config = AgentConfig::parse(&agent_toml("large", &coordinator.ws_url(), &rest)).unwrap();
    let agent = TestAgent::start(config);
    agent.registered(1).await;
    submitted_and_running(&coordinator, &agent, &["large"]).await;
    coordinator.stop().await;
    let mut status = agent.handles.status.clone();
    status.wait_for(|s| !s.connected).await.unwrap();
    std::fs::write(&go, "").unwrap();
    status.wait_for(|s| s.outbox == 1).await.unwrap();
    let coordinator = TestCoordinator::start_on(&redis, test_config(), None, addr).await;
    agent.registered(2).await;
    let delivered =
        tokio::time::timeout(Duration::from_secs(30), status.wait_for(|s| s.outbox == 0));
    assert!(delivered.await.is_ok(), "the result was never taken");
    let (code, job) = coordinator.get("/v1/jobs/large?wait_ms=10000").await;
    assert_eq!(code, 502, "{job}");
    assert_eq!(job["status"], "failed", "{job}");
    let message = job["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("frame limit"), "{job}");
    agent.stop().await.unwrap();
    coordinator.stop().await;
}

/// A coordinator URL whose peer takes the connection and never completes
/// the WebSocket upgrade is given up on, for the next URL. Before, the
/// agent waited on it for good.
#[tokio::test]
async fn a_coordinator_that_never_answers_the_upgrade_is_passed_over() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("ws://{}/v1/node", silent.local_addr().unwrap());
    // Takes connections in and says nothing.
    let taker = tokio::spawn(async move {
        let mut taken = Vec::new();
        while let Ok((connection, _)) = silent.accept().await {
            taken.push(connection);
        }
    });
    let mut config = agent_config("patient", &silent_url, 100);
    config.coordinator_urls.push(coordinator.ws_url());
    let agent = TestAgent::start(config);
    let mut status = agent.handles.status.clone();
    let registered =
        tokio::time::timeout(Duration::from_secs(60), status.wait_for(|s| s.connected));
    assert!(
        registered.await.is_ok(),
        "never registered with the second coordinator"
    );
    taker.abort();
    agent.stop().await.unwrap();
    coordinator.stop().await;
}

/// A change of room while the agent waits for its registration to be
/// acknowledged is reported once it is: the coordinator's view starts
/// from what the registration said. Before, the agent took its room when
/// the connection began as what the coordinator knew, and said nothing of
/// the change until its next heartbeat (an interval later: here, a
/// minute).
#[tokio::test]
async fn a_change_of_room_during_registration_is_reported_once_registered() {
    use futures_util::{SinkExt, StreamExt};
    use lingua_shared::protocol::RegisterAck;
    use lingua_shared::{Message, decode, encode};
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/v1/node", listener.local_addr().unwrap());
    let config = agent_config("registering", &url, 100);
    let agent = TestAgent::start(config.clone());
    let (stream, _) = listener.accept().await.unwrap();
    let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
    let frame = ws.next().await.unwrap().unwrap();
    let Ok(Message::Register(register)) = decode(frame.to_text().unwrap().as_bytes()) else {
        panic!("expected register, got {frame:?}");
    };
    assert_eq!(register.capacity.free_slots.values().sum::<u32>(), 8);
    // Fewer slots before the acknowledgement comes.
    let mut smaller = config;
    smaller
        .jobs
        .values_mut()
        .for_each(|kind| kind.max_concurrent = 2);
    agent.reload(smaller);
    eventually("the agent to take the new limit", || async {
        let free = agent.handles.arbiter.free_slots();
        (free.values().sum::<u32>() == 2).then_some(())
    })
    .await;
    let ack = Message::RegisterAck(RegisterAck {
        protocol_version: register.protocol.max,
        epoch: 1,
        heartbeat_interval_ms: 60_000,
        pairs: vec!["zh:en".parse().unwrap()],
    });
    ws.send(WsMessage::text(encode(&ack))).await.unwrap();
    let reported = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let frame = ws.next().await.unwrap().unwrap();
            if let Ok(Message::Capacity(report)) = decode(frame.to_text().unwrap().as_bytes()) {
                return report;
            }
        }
    })
    .await
    .expect("a capacity report long before the first heartbeat");
    assert_eq!(reported.free_slots.values().sum::<u32>(), 2);
    agent.stop().await.unwrap();
}

/// An agent that drains (SIGTERM) while it runs a job stops only once
/// the job's result is delivered. Before, the drain looked at the outbox
/// as the job ended, before the link had taken the result in: it found
/// it empty, the agent stopped without sending the result, and the job
/// ran again elsewhere (or, with one attempt, failed `node_lost`). Found
/// by the agents' rolling restart in tests/tests/faults.rs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_finished_as_the_agent_drains_is_delivered_before_it_stops() {
    let redis = lingua_tests::redis().await;
    let config = Config {
        max_attempts: 1,
        ..test_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    for round in 0..5 {
        let name = format!("draining-{round}");
        let agent = TestAgent::start(agent_config(&name, &coordinator.ws_url(), 200));
        agent.registered(1).await;
        let id = format!("last-{round}");
        submitted_and_running(&coordinator, &agent, &[&id]).await;
        agent.stop().await.unwrap();
        let (_, view) = coordinator
            .get(&format!("/v1/jobs/{id}?wait_ms=10000"))
            .await;
        assert_eq!(view["status"], "completed", "round {round}: {view}");
    }
    coordinator.stop().await;
}

#[tokio::test]
async fn an_idle_link_stays_up_on_pongs_and_heartbeats_alone() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let agent = TestAgent::start(agent_config("quiet-link", &coordinator.ws_url(), 100));
    agent.registered(1).await;
    // Nothing but heartbeats and pings for ten heartbeat intervals (a
    // ping goes after two silent ones, and an unanswered one
    // ends the link): no reconnect, and the coordinator keeps the node
    // alive.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let status = agent.handles.status.borrow().clone();
    assert!(status.connected && status.registrations == 1, "{status:?}");
    let (_, view) = coordinator.get("/v1/nodes/quiet-link").await;
    assert_eq!(view["state"], "ready");
    agent.stop().await.unwrap();
    coordinator.stop().await;
}

#[tokio::test]
async fn a_link_that_passes_no_byte_is_replaced() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let proxy = Blackhole::start(coordinator.addr).await;
    let url = format!("ws://{}/v1/node", proxy.addr);
    let agent = TestAgent::start(agent_config("frozen-link", &url, 100));
    agent.registered(1).await;
    // Nothing closes; the coordinator answers no ping.
    proxy.freeze();
    eventually("the agent to give up the silent link", || async {
        (!agent.handles.status.borrow().connected).then_some(())
    })
    .await;
    proxy.thaw();
    agent.registered(2).await;
    agent.stop().await.unwrap();
    coordinator.stop().await;
}

#[tokio::test]
async fn a_job_that_ends_at_once_is_answered_by_its_result_alone() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let agent = TestAgent::start(agent_config("fast-jobs", &coordinator.ws_url(), 0));
    agent.registered(1).await;
    const JOBS: u32 = 20;
    for i in 0..JOBS {
        let (_, answer) = coordinator
            .submit(
                serde_json::json!({"id": format!("fast-{i}"), "kind": "translate",
                "src_lang": "zh", "tgt_lang": "en", "payload": {}}),
            )
            .await;
        assert_eq!(answer["status"], "completed", "{answer}");
    }
    let frames = |kind: &'static str| {
        let coordinator = &coordinator;
        async move {
            let series = format!("lingua_node_frames_total{{direction=\"in\",type=\"{kind}\"}}");
            coordinator.metric(None, &series).await.unwrap_or(0.0)
        }
    };
    assert_eq!(frames("job_result").await, f64::from(JOBS));
    // An accept waits a few ms for its job's result, which answers for it:
    // jobs that end at once need no accept frame (before, one per job).
    let accepts = frames("job_accept").await;
    assert!(
        accepts < f64::from(JOBS),
        "{accepts} accepts for {JOBS} jobs"
    );
    agent.stop().await.unwrap();
    coordinator.stop().await;
}
