//! Regression tests for the defects an outside security review found
//! (docs/SECURITY.md lists each promise with its test): oversized jobs,
//! forged results, node id takeover, connection exhaustion, nodes that stop
//! reading, the API's roles, Redis growth, expired leases, drains that did
//! not survive a reconnect.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lingua_coordinator::auth::node_token;
use lingua_coordinator::config::Config;
use lingua_shared::close::CloseCode;
use lingua_shared::protocol::{CapacityReport, ErrorCode, Heartbeat, JobRef, JobResult, Outcome};
use lingua_shared::{JobKind, MAX_FRAME_BYTES, Message, NodeId, encode};
use lingua_tests::fleet::{free_local_addr, workspace_binary};
use lingua_tests::{
    PATIENCE, Received, TestAgent, TestCoordinator, TestNode, agent_config, eventually,
    registration, test_config, translate_room, with_token,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

const ADMIN: &str = "an-admin-token-for-the-tests";
const CLIENT_A: &str = "client-token-a-for-the-tests";
const CLIENT_B: &str = "client-token-b-for-the-tests";

/// Raw nodes in these tests send no heartbeats: a long interval keeps them
/// registered while the test looks.
fn quiet_config() -> Config {
    Config {
        heartbeat_interval: Duration::from_secs(10),
        ..test_config()
    }
}

fn job(id: &str, text: &str) -> Value {
    json!({"id": id, "kind": "translate", "src_lang": "zh", "tgt_lang": "en",
           "payload": {"text": text}, "timeout_ms": 20000})
}

async fn metrics(coordinator: &TestCoordinator) -> String {
    reqwest::get(coordinator.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one series in Prometheus text, 0 when absent.
fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_job_too_large_for_one_frame_is_refused_at_submit_and_no_node_drops() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let agent = TestAgent::start(agent_config("big", &coordinator.ws_url(), 20));
    agent.registered(1).await;
    let (_, before) = coordinator.get("/v1/nodes/big").await;
    let client = reqwest::Client::new();
    // 1.5 MB: under the old 2 MiB body limit, over the 1 MiB frame limit.
    // Then a body just under the limit, whose assignment frame is over it.
    for size in [1_500_000, MAX_FRAME_BYTES - 100] {
        let response = client
            .post(coordinator.url("/v1/jobs"))
            .json(&job(&format!("big-{size}"), &"x".repeat(size)))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 413, "{size} bytes");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "payload_too_large");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(&MAX_FRAME_BYTES.to_string()), "{message}");
    }
    // The node kept its link (same registration) and still serves.
    let answer: Value = client
        .post(coordinator.url("/v1/jobs"))
        .json(&job("small", "你好"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["status"], "completed", "{answer}");
    assert_eq!(answer["attempts"], 1);
    let (_, after) = coordinator.get("/v1/nodes/big").await;
    assert_eq!(after["epoch"], before["epoch"]);
    agent.stop().await.unwrap();
    coordinator.stop().await;
}

#[tokio::test]
async fn a_node_cannot_record_the_result_of_a_job_assigned_to_another() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, quiet_config()).await;
    let ws = coordinator.ws_url();
    let (mut real, _) = TestNode::register(&ws, registration("real", &["zh"], &["en"])).await;
    let (mut forger, _) = TestNode::register(&ws, registration("forger", &["ja"], &["en"])).await;
    let submit = tokio::spawn({
        let url = coordinator.url("/v1/jobs");
        async move {
            reqwest::Client::new()
                .post(url)
                .json(&job("victim", "你好"))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    });
    let assign = match real.recv().await {
        Received::Message(Message::JobAssign(assign)) => assign,
        other => panic!("expected job_assign, got {other:?}"),
    };
    let attempt = JobRef {
        job_id: assign.job_id.clone(),
        attempt: assign.attempt,
    };
    real.send(&Message::JobAccept(attempt.clone())).await;
    let result = |text: &str| {
        Message::JobResult(JobResult {
            job_id: attempt.job_id.clone(),
            attempt: attempt.attempt,
            outcome: Outcome::Completed {
                output: lingua_shared::RawJson::of(&json!({"text": text})),
            },
            duration_ms: 1,
            device: None,
        })
    };
    forger.send(&result("forged")).await;
    match forger.recv().await {
        Received::Message(Message::Error(error)) => {
            assert_eq!(error.code, ErrorCode::NotAssigned, "{}", error.message);
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    // Acknowledged too, so that an agent drops it from its outbox rather
    // than send it again after every reconnection.
    assert_eq!(
        forger.recv().await,
        Received::Message(Message::ResultAck(attempt.clone()))
    );
    real.send(&result("real")).await;
    assert_eq!(
        real.recv().await,
        Received::Message(Message::ResultAck(attempt))
    );
    let answer = submit.await.unwrap();
    assert_eq!(answer["output"]["text"], "real", "{answer}");
    assert_eq!(answer["node_id"], "real");
    let text = metrics(&coordinator).await;
    assert_eq!(
        series(&text, "lingua_job_results_total{outcome=\"foreign\"}"),
        1.0
    );
    real.close().await;
    forger.close().await;
    coordinator.stop().await;
}

#[tokio::test]
async fn a_node_token_registers_only_its_own_node_id() {
    let redis = lingua_tests::redis().await;
    let secret = "a-coordinator-secret-0123456789abcdef";
    let config = Config {
        node_secret: Some(secret.into()),
        ..quiet_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    let ws = coordinator.ws_url();
    let token_a = node_token(secret, &NodeId::new("gpu-a").unwrap());
    let (a, _) = TestNode::register(
        &ws,
        with_token(registration("gpu-a", &["zh"], &["en"]), &token_a),
    )
    .await;
    for (node, token) in [("gpu-b", Some(token_a.as_str())), ("gpu-a", None)] {
        let mut register = registration(node, &["zh"], &["en"]);
        if let Some(token) = token {
            register = with_token(register, token);
        }
        let mut impostor = TestNode::connect(&ws).await;
        impostor.send(&Message::Register(register)).await;
        match impostor.recv().await {
            Received::Message(Message::Error(error)) => {
                assert_eq!(error.code, ErrorCode::Unauthorized);
            }
            other => panic!("expected an error frame, got {other:?}"),
        }
        assert_eq!(impostor.closed().await, CloseCode::Unauthorized.code());
    }
    a.close().await;
    coordinator.stop().await;
}

#[tokio::test]
async fn node_token_prints_the_token_that_registers_that_node() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.toml");
    let secret = "a-coordinator-secret-0123456789abcdef";
    std::fs::write(&path, format!("[auth]\nnode_secret = \"{secret}\"\n")).unwrap();
    let binary = workspace_binary("lingua-coordinator").unwrap();
    let output = Command::new(&binary)
        .args(["node-token", "--config", path.to_str().unwrap(), "gpu-a"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        node_token(secret, &NodeId::new("gpu-a").unwrap())
    );
    std::fs::write(&path, "").unwrap();
    let output = Command::new(&binary)
        .args(["node-token", "--config", path.to_str().unwrap(), "gpu-a"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("node_secret"));
}

#[tokio::test]
async fn an_agent_refused_for_a_node_id_conflict_retries_until_the_id_is_free() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, quiet_config()).await;
    let (squatter, _) = TestNode::register(
        &coordinator.ws_url(),
        registration("twin", &["zh"], &["en"]),
    )
    .await;
    let agent = TestAgent::start(agent_config("twin", &coordinator.ws_url(), 20));
    eventually("the agent to be refused once", || async {
        let text = metrics(&coordinator).await;
        (series(
            &text,
            "lingua_node_registrations_total{outcome=\"conflict\"}",
        ) >= 1.0)
            .then_some(())
    })
    .await;
    squatter.close().await;
    agent.registered(1).await;
    let (_, view) = coordinator.get("/v1/nodes/twin").await;
    assert_eq!(view["state"], "ready");
    agent.stop().await.unwrap();
    coordinator.stop().await;
}

/// Starts the coordinator binary with at most 128 open files, on a free
/// port; returns the child, its address and its log file.
async fn coordinator_with_few_files(
    dir: &std::path::Path,
    redis: &lingua_coordinator::private_redis::PrivateRedis,
    config: &str,
) -> (
    tokio::process::Child,
    std::net::SocketAddr,
    std::path::PathBuf,
) {
    let addr = free_local_addr();
    let path = dir.join("coordinator.toml");
    std::fs::write(&path, config).unwrap();
    let log = dir.join("coordinator.log");
    let binary = workspace_binary("lingua-coordinator").unwrap();
    let script = format!(
        "ulimit -n 128 && exec '{}' --config '{}' --listen {addr} --redis-url '{}'",
        binary.display(),
        path.display(),
        redis.url()
    );
    let child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .env("LINGUA_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (child, addr, log)
}

async fn healthz(client: &reqwest::Client, addr: std::net::SocketAddr) -> Option<()> {
    let response = client
        .get(format!("http://{addr}/healthz"))
        .timeout(Duration::from_millis(500))
        .send()
        .await
        .ok()?;
    response.status().is_success().then_some(())
}

#[tokio::test]
async fn idle_and_half_sent_connections_cannot_exhaust_the_coordinator() {
    let redis = lingua_tests::redis().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr, log) = coordinator_with_few_files(
        dir.path(),
        &redis,
        "[limits]\nheader_read_timeout_ms = 300\n",
    )
    .await;
    let client = reqwest::Client::new();
    eventually("the coordinator to serve", || healthz(&client, addr)).await;
    // More idle sockets than the process may open files, and some that
    // send half a request and stop.
    let mut held = Vec::new();
    for i in 0..160 {
        let mut socket = tokio::time::timeout(PATIENCE, TcpStream::connect(addr))
            .await
            .expect("the kernel accepts the connection")
            .unwrap();
        if i % 10 == 0 {
            socket
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        held.push(socket);
    }
    eventually("/healthz through the idle sockets", || {
        healthz(&client, addr)
    })
    .await;
    let ws = format!("ws://{addr}/v1/node");
    let (node, _) = TestNode::register(&ws, registration("late", &["zh"], &["en"])).await;
    node.close().await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("connection cap reached"), "{text}");
    drop(held);
    child.kill().await.unwrap();
}

/// A client text frame: masked, as RFC 6455 requires of clients, with an
/// all-zero key (so the payload goes out as it is).
fn client_frame(text: &str) -> Vec<u8> {
    let payload = text.as_bytes();
    let mut frame = vec![0x81];
    match payload.len() {
        len @ 0..126 => frame.push(0x80 | len as u8),
        len @ 126..65536 => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0; 4]);
    frame.extend_from_slice(payload);
    frame
}

// Several threads: parsing the large bodies below must not hold up the
// node's heartbeats, or the node would leave for missing them instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_stops_reading_leaves_routing_within_its_lease() {
    let redis = lingua_tests::redis().await;
    let config = Config {
        heartbeat_interval: Duration::from_millis(1000),
        ..test_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    // A WebSocket spoken by hand over TCP, so that the test decides when
    // the node stops reading: after its register_ack, never again.
    let mut socket = TcpStream::connect(coordinator.addr).await.unwrap();
    socket
        .write_all(
            b"GET /v1/node HTTP/1.1\r\nHost: lingua\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    // Room for every assignment below, so that they are all sent to it.
    let kind = JobKind::new("translate").unwrap();
    let mut register = registration("wedged", &["zh"], &["en"]);
    register.capacity.free_slots.insert(kind.clone(), 64);
    socket
        .write_all(&client_frame(&encode(&Message::Register(register))))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("register_ack") {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(PATIENCE, socket.read(&mut chunk))
            .await
            .expect("the coordinator answers")
            .unwrap();
        assert!(
            n > 0,
            "closed before register_ack: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&chunk[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 101"));
    // The node keeps sending heartbeats (until its socket is closed) but
    // never reads again.
    let (reader, mut writer) = socket.into_split();
    let sent = Arc::new(AtomicU64::new(0));
    let beats = sent.clone();
    let beating = tokio::spawn(async move {
        for seq in 0.. {
            let heartbeat = Message::Heartbeat(Heartbeat {
                seq,
                capacity: CapacityReport {
                    free_slots: [(kind.clone(), 64)].into(),
                    ..CapacityReport::default()
                },
            });
            if writer
                .write_all(&client_frame(&encode(&heartbeat)))
                .await
                .is_err()
            {
                return;
            }
            beats.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // Large assignments fill the socket's buffers.
    let client = reqwest::Client::new();
    let big = "x".repeat(900_000);
    let submits: Vec<_> = (0..24)
        .map(|i| {
            let (client, url, body) = (
                client.clone(),
                coordinator.url("/v1/jobs"),
                job(&format!("fill-{i}"), &big),
            );
            tokio::spawn(async move { client.post(url).json(&body).send().await })
        })
        .collect();
    // Its lease alone would make it look offline; the coordinator must
    // also let go of the socket it cannot write to.
    eventually("the wedged node's connection to end", || async {
        let (_, view) = coordinator.get("/v1/nodes/wedged").await;
        let connected = series(&metrics(&coordinator).await, "lingua_nodes_connected");
        (view["state"] == "offline" && connected == 0.0).then_some(())
    })
    .await;
    // It sent a heartbeat every 100 ms up to the end (its writes stop only
    // once the coordinator closes the socket, which may have happened by
    // now): it was let go for not reading, not for falling silent.
    let sent = sent.load(Ordering::SeqCst);
    assert!(sent > 10, "the node kept sending heartbeats: {sent}");
    beating.abort();
    drop(reader);
    for submit in submits {
        let answer = submit.await.unwrap().unwrap();
        assert_eq!(answer.status(), 503, "no other node serves the pair");
    }
    coordinator.stop().await;
}

/// A client token's job may name a priority up to `[auth]
/// client_max_priority` (by default 50, the priority of a job naming
/// none), and one naming none gets the lower of the two; an admin's job
/// names any. Before, a client token could put its jobs ahead of everyone
/// else's.
#[tokio::test]
async fn a_client_tokens_jobs_name_at_most_its_priority_ceiling() {
    let redis = lingua_tests::redis().await;
    let config = Config {
        api_tokens: vec![ADMIN.into()],
        client_tokens: vec![CLIENT_A.into()],
        ..test_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    let submit = |token, id, priority: Option<u8>| {
        let mut body = job(id, "你好");
        if let Some(priority) = priority {
            body["priority"] = json!(priority);
        }
        submit_to(&coordinator, token, body)
    };
    let (status, refused) = submit(CLIENT_A, "urgent", Some(51)).await;
    assert_eq!(status, 400, "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("client_max_priority"), "{message}");
    for (token, id, priority) in [
        (CLIENT_A, "at-the-ceiling", Some(50)),
        (CLIENT_A, "unnamed", None),
        (ADMIN, "admins-name-any", Some(100)),
    ] {
        let (status, taken) = submit(token, id, priority).await;
        assert_eq!(status, 202, "{id}: {taken}");
    }
    coordinator.stop().await;

    // A lower ceiling: a client's job naming none waits at it, behind an
    // admin's of a higher priority that came later; its record keeps the
    // request as it was sent.
    let config = Config {
        api_tokens: vec![ADMIN.into()],
        client_tokens: vec![CLIENT_A.into()],
        client_max_priority: 10,
        ..test_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    let mut register = registration("full", &["zh"], &["en"]);
    register.capacity = translate_room(0);
    let (mut node, _) = TestNode::register(&coordinator.ws_url(), register).await;
    let mut urgent = job("urgent", "你好");
    urgent["priority"] = json!(20);
    for (token, body) in [(CLIENT_A, job("background", "你好")), (ADMIN, urgent)] {
        let (status, queued) = submit_to(&coordinator, token, body).await;
        assert_eq!(
            (status, &queued["status"]),
            (202, &json!("queued")),
            "{queued}"
        );
    }
    node.send(&Message::Capacity(translate_room(1))).await;
    let first = loop {
        if let Received::Message(Message::JobAssign(assign)) = node.recv().await {
            break assign;
        }
    };
    assert_eq!(first.job_id.as_str(), "urgent");
    let mut conn = lingua_tests::connect(&redis).await;
    let request: String = redis::cmd("HGET")
        .arg("lingua:v1:pair:{zh:en}:job:background")
        .arg("request")
        .query_async(&mut conn)
        .await
        .unwrap();
    let request: Value = serde_json::from_str(&request).unwrap();
    assert_eq!(request.get("priority"), None, "{request}");
    node.close().await;
    coordinator.stop().await;
}

/// `body` submitted to `coordinator` with `token`, without waiting: the
/// answer's status and JSON.
async fn submit_to(coordinator: &TestCoordinator, token: &str, body: Value) -> (u16, Value) {
    let answer = reqwest::Client::new()
        .post(coordinator.url("/v1/jobs?wait=false"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    (
        answer.status().as_u16(),
        answer.json::<Value>().await.unwrap(),
    )
}

#[tokio::test]
async fn client_tokens_submit_and_read_their_own_jobs_and_admin_tokens_do_everything() {
    let redis = lingua_tests::redis().await;
    let config = Config {
        api_tokens: vec![ADMIN.into()],
        client_tokens: vec![CLIENT_A.into(), CLIENT_B.into()],
        ..test_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    let agent = TestAgent::start(agent_config("n", &coordinator.ws_url(), 20));
    agent.registered(1).await;
    let client = reqwest::Client::new();
    let submitted = client
        .post(coordinator.url("/v1/jobs"))
        .bearer_auth(CLIENT_A)
        .json(&job("mine", "你好"))
        .send()
        .await
        .unwrap();
    assert_eq!(submitted.status(), 200);
    let read = |token: &'static str, scheme: &'static str| {
        let (client, url) = (client.clone(), coordinator.url("/v1/jobs/mine"));
        async move {
            client
                .get(url)
                .header("Authorization", format!("{scheme} {token}"))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(read(CLIENT_A, "Bearer").await, 200);
    assert_eq!(
        read(CLIENT_A, "bearer").await,
        200,
        "the scheme is case-insensitive"
    );
    assert_eq!(read(CLIENT_B, "Bearer").await, 404, "another client's job");
    assert_eq!(read(ADMIN, "BEARER").await, 200);
    // Another client reusing the id does not get the first one's job.
    let reused = client
        .post(coordinator.url("/v1/jobs"))
        .bearer_auth(CLIENT_B)
        .json(&job("mine", "你好"))
        .send()
        .await
        .unwrap();
    assert_eq!(reused.status(), 409);
    for (method, path) in [
        ("GET", "/v1/nodes"),
        ("GET", "/v1/pools"),
        ("GET", "/metrics"),
        ("POST", "/v1/nodes/n/drain"),
    ] {
        let request = |token: &str| {
            client
                .request(method.parse().unwrap(), coordinator.url(path))
                .bearer_auth(token)
                .send()
        };
        let response = request(CLIENT_A).await.unwrap();
        assert_eq!(response.status(), 403, "{method} {path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "forbidden");
        if method == "GET" {
            assert_eq!(request(ADMIN).await.unwrap().status(), 200, "{path}");
        }
    }
    let (_, node) = coordinator.get("/v1/nodes/n").await;
    assert_eq!(node["error"]["code"], "unauthorized");
    agent.stop().await.unwrap();
    coordinator.stop().await;
}

#[tokio::test]
async fn off_loopback_the_coordinator_refuses_to_start_with_an_open_api() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.toml");
    let nodes = "[auth]\nnode_secret = \"0123456789abcdef0123456789abcdef\"\n";
    std::fs::write(&path, nodes).unwrap();
    let binary = workspace_binary("lingua-coordinator").unwrap();
    let port = free_local_addr().port();
    let output = Command::new(&binary)
        .args(["--config", path.to_str().unwrap()])
        .args(["--listen", &format!("0.0.0.0:{port}")])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("auth.api_tokens") && stderr.contains("allow_open_api"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_node_may_serve_at_most_max_pairs_language_pairs() {
    let redis = lingua_tests::redis().await;
    let config = Config {
        max_pairs_per_node: 64,
        ..quiet_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    let langs = ["en", "zh", "ja", "es", "fr", "de", "it", "ko", "ru"];
    let mut node = TestNode::connect(&coordinator.ws_url()).await;
    node.send(&Message::Register(registration("wide", &langs, &langs)))
        .await;
    match node.recv().await {
        Received::Message(Message::Error(error)) => {
            assert!(
                error.message.contains("72 language pairs")
                    && error.message.contains("nodes.max_pairs"),
                "{}",
                error.message
            );
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    assert_eq!(node.closed().await, CloseCode::RegistrationRequired.code());
    let (status, _) = coordinator.get("/v1/nodes/wide").await;
    assert_eq!(status, 404, "nothing was recorded");
    coordinator.stop().await;
}

/// Calls Redis has served for `command` (from INFO commandstats).
async fn calls(conn: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:")))
        .and_then(|stats| stats.split(',').find_map(|kv| kv.strip_prefix("calls=")))
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn metrics_scrapes_cost_redis_nothing_and_fast_frames_are_coalesced() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, quiet_config()).await;
    let mut conn = lingua_tests::connect(&redis).await;
    let langs = ["en", "zh", "ja", "es"];
    let (mut node, _) =
        TestNode::register(&coordinator.ws_url(), registration("busy", &langs, &langs)).await;
    let reads = calls(&mut conn, "hgetall").await + calls(&mut conn, "smembers").await;
    for _ in 0..5 {
        let text = metrics(&coordinator).await;
        assert_eq!(
            series(&text, "lingua_pool_nodes{pair=\"zh:en\",pool=\"1\"}"),
            1.0
        );
    }
    let after = calls(&mut conn, "hgetall").await + calls(&mut conn, "smembers").await;
    assert_eq!(after, reads, "a scrape reads nothing from Redis");

    let count = |text: &str, script: &str| {
        series(
            text,
            &format!("lingua_redis_script_duration_seconds_count{{script=\"{script}\"}}"),
        )
    };
    let before = metrics(&coordinator).await;
    let started = std::time::Instant::now();
    let kind = JobKind::new("translate").unwrap();
    // A steady stream, faster than one report per interval: a burst the
    // batcher would coalesce anyway.
    for seq in 0..150u64 {
        let capacity = CapacityReport {
            free_slots: [(kind.clone(), (seq % 4) as u32)].into(),
            ..CapacityReport::default()
        };
        node.send(&Message::Heartbeat(Heartbeat {
            seq,
            capacity: capacity.clone(),
        }))
        .await;
        node.send(&Message::Capacity(capacity)).await;
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    // The last report is published at most one interval after it arrived.
    let last = CapacityReport {
        free_slots: [(kind, 3)].into(),
        ..CapacityReport::default()
    };
    node.send(&Message::Capacity(last)).await;
    eventually("the last report to reach routing", || {
        let mut conn = conn.clone();
        async move {
            let free: Option<u32> = redis::cmd("HGET")
                .arg("lingua:v1:pair:{zh:en}:free:translate")
                .arg("busy")
                .query_async(&mut conn)
                .await
                .unwrap();
            (free == Some(3)).then_some(())
        }
    })
    .await;
    let elapsed = started.elapsed();
    let after = metrics(&coordinator).await;
    let heartbeats = count(&after, "node_heartbeat") - count(&before, "node_heartbeat");
    assert!(
        heartbeats <= 1.0,
        "150 heartbeats within one interval cost {heartbeats} script calls"
    );
    // Every publication updates each of the node's 12 pairs once; at most
    // one publication per 25 ms, plus the final one.
    let updates = count(&after, "route_update") - count(&before, "route_update");
    let windows = (elapsed.as_millis() / 25 + 2) as f64;
    assert!(
        updates <= windows * 12.0,
        "300 frames in {elapsed:?} cost {updates} route updates"
    );
    node.close().await;
    coordinator.stop().await;
}

#[tokio::test]
async fn an_admin_drain_survives_a_coordinator_restart() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let addr = coordinator.addr;
    let agent = TestAgent::start(agent_config("kept", &coordinator.ws_url(), 20));
    agent.registered(1).await;
    let drained = reqwest::Client::new()
        .post(coordinator.url("/v1/nodes/kept/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(drained.status(), 202);
    coordinator.stop().await;
    let coordinator = TestCoordinator::start_on(&redis, test_config(), None, addr).await;
    agent.registered(2).await;
    let (_, view) = coordinator.get("/v1/nodes/kept").await;
    assert_eq!(view["state"], "draining", "{view}");
    let (_, pools) = coordinator.get("/v1/pools").await;
    let answer: Value = reqwest::Client::new()
        .post(coordinator.url("/v1/jobs"))
        .json(&job("after-restart", "你好"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["status"], "failed", "{answer} {pools}");
    agent.stop().await.unwrap();
    coordinator.stop().await;
}

#[tokio::test]
async fn node_sockets_count_against_the_connection_cap_and_slow_bodies_time_out() {
    let redis = lingua_tests::redis().await;
    let config = Config {
        max_connections: 17,
        header_read_timeout: Duration::from_millis(300),
        ..quiet_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    let mut nodes = Vec::new();
    for i in 0..16 {
        let (node, _) = TestNode::register(
            &coordinator.ws_url(),
            registration(&format!("capped-{i}"), &["zh"], &["en"]),
        )
        .await;
        nodes.push(node);
    }
    // The scrape's own connection is the seventeenth place.
    let text = metrics(&coordinator).await;
    assert_eq!(series(&text, "lingua_connections_open"), 17.0, "{text}");
    for node in nodes {
        node.close().await;
    }
    eventually("the node sockets to give their places back", || async {
        let text = metrics(&coordinator).await;
        (series(&text, "lingua_connections_open") == 1.0).then_some(())
    })
    .await;
    // A body sent slower than the header timeout ends the request.
    let mut socket = TcpStream::connect(coordinator.addr).await.unwrap();
    socket
        .write_all(
            b"POST /v1/jobs HTTP/1.1\r\nHost: lingua\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"kind\":",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, socket.read_to_end(&mut answer))
        .await
        .expect("the coordinator answers a stalled body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    coordinator.stop().await;
}
