//! Malformed input against a live coordinator process: random and mutated
//! frames on the node WebSocket, random requests on the HTTP API. Nothing
//! may crash (no panic in its log), hang (every answer within a deadline)
//! or stop it serving.
//!
//! Always on with a few thousand inputs; `LINGUA_FUZZ_FRAMES=100000` (and
//! `LINGUA_FUZZ_REQUESTS`) run the long version.

#[path = "../../tests/src/signal.rs"]
mod signal;
use signal::terminate;

use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use lingua_coordinator::private_redis::PrivateRedis;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const BIN: &str = env!("CARGO_BIN_EXE_lingua-coordinator");
const DEADLINE: Duration = Duration::from_secs(10);

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const VALID: [&str; 6] = [
    r#"{"type":"register","node_id":"fuzz-node","protocol":{"min":1,"max":1},"agent_version":"x","instance":"i","capabilities":{"src_langs":["zh"],"tgt_langs":["en"],"kinds":["asr"]},"capacity":{"free_slots":{"asr":1}}}"#,
    r#"{"type":"heartbeat","seq":1,"capacity":{"free_slots":{"asr":2},"gpus":[]}}"#,
    r#"{"type":"capacity","free_slots":{"asr":0}}"#,
    r#"{"type":"job_result","job_id":"j","attempt":1,"outcome":{"status":"completed","output":{}},"duration_ms":1}"#,
    r#"{"type":"job_reject","job_id":"j","attempt":1,"reason":"no_capacity"}"#,
    r#"{"type":"drain","reason":"x"}"#,
];

/// A random input: raw bytes, a mutated valid frame, or odd JSON.
fn frame(rng: &mut StdRng) -> Vec<u8> {
    match rng.random_range(0..4) {
        0 => (0..rng.random_range(0..300))
            .map(|_| rng.random())
            .collect(),
        1 | 2 => {
            let mut bytes = VALID[rng.random_range(0..VALID.len())].as_bytes().to_vec();
            for _ in 0..rng.random_range(1..6) {
                let at = rng.random_range(0..bytes.len());
                match rng.random_range(0..3) {
                    0 => bytes[at] = rng.random(),
                    1 => {
                        bytes.remove(at);
                    }
                    _ => bytes.insert(at, b"{}[]\":,0-e\\"[rng.random_range(0..11)]),
                }
            }
            bytes
        }
        _ => {
            let odd = [
                "null",
                "[]",
                "{}",
                r#"{"type":null}"#,
                r#"{"type":"job_accept","job_id":"","attempt":-1}"#,
                r#"{"type":"register","node_id":"a","protocol":{"min":4294967295,"max":0}}"#,
                r#"{"type":"capacity","free_slots":{"asr":99999999999999999999}}"#,
            ];
            odd[rng.random_range(0..odd.len())].as_bytes().to_vec()
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(addr: &str, rng: &mut StdRng) -> Ws {
    let (mut ws, _) = tokio::time::timeout(
        DEADLINE,
        tokio_tungstenite::connect_async(format!("ws://{addr}/v1/node")),
    )
    .await
    .expect("the coordinator accepts connections in time")
    .expect("the upgrade succeeds");
    // Half the connections register first, so frames also hit the
    // registered state.
    if rng.random_bool(0.5) {
        ws.send(WsMessage::text(VALID[0]))
            .await
            .expect("send register");
    }
    ws
}

#[tokio::test]
async fn random_frames_and_requests_never_crash_hang_or_stop_the_coordinator() {
    let redis = PrivateRedis::start()
        .await
        .expect("redis-server is installed");
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--redis-url",
            &redis.url(),
        ])
        .env("LINGUA_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(DEADLINE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let json: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if json["fields"]["message"] == "coordinator serving" {
                return json["fields"]["listen"].as_str().unwrap().to_owned();
            }
        }
        panic!("the coordinator exited before serving");
    })
    .await
    .expect("the coordinator starts");
    let log = tokio::spawn(async move {
        let mut panics = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("panicked") {
                panics.push(line);
            }
        }
        panics
    });

    let mut rng = StdRng::seed_from_u64(0x11_46_7A);
    let frames = count("LINGUA_FUZZ_FRAMES", 3000);
    let mut ws = open(&addr, &mut rng).await;
    let mut closed_by_server = 0;
    for _ in 0..frames {
        let bytes = frame(&mut rng);
        let message = match String::from_utf8(bytes) {
            Ok(text) => WsMessage::text(text),
            Err(err) => WsMessage::binary(err.into_bytes()),
        };
        let sent = tokio::time::timeout(DEADLINE, ws.send(message))
            .await
            .expect("no hang on send");
        // Drain whatever the coordinator answered (error frames, close).
        let mut gone = sent.is_err();
        while !gone {
            match tokio::time::timeout(Duration::ZERO, ws.next()).await {
                Ok(Some(Ok(WsMessage::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => gone = true,
                Ok(Some(Ok(_))) => {}
                Err(_) => break,
            }
        }
        if gone {
            closed_by_server += 1;
            ws = open(&addr, &mut rng).await;
        }
    }
    assert!(closed_by_server > 0, "abuse closes connections");

    let client = reqwest::Client::builder()
        .timeout(DEADLINE)
        .build()
        .unwrap();
    let paths = [
        "/v1/jobs",
        "/v1/jobs/x",
        "/v1/nodes",
        "/v1/nodes/%00",
        "/v1/pools",
        "/metrics",
        "/healthz",
        "/v1/nodes/a/drain",
        "/%ff%fe",
        "/v1/jobs?wait=maybe",
        "/v1/jobs/x?wait_ms=-1",
    ];
    for _ in 0..count("LINGUA_FUZZ_REQUESTS", 600) {
        let path = paths[rng.random_range(0..paths.len())];
        let body: Vec<u8> = if rng.random_bool(0.5) {
            frame(&mut rng)
        } else {
            let mut job =
                br#"{"kind":"asr","src_lang":"zh","tgt_lang":"en","timeout_ms":50}"#.to_vec();
            let at = rng.random_range(0..job.len());
            job[at] = rng.random();
            job
        };
        let request = if rng.random_bool(0.6) {
            client.post(format!("http://{addr}{path}")).body(body)
        } else {
            client.get(format!("http://{addr}{path}"))
        };
        let response = request
            .send()
            .await
            .expect("the coordinator answers every request in time");
        let status = response.status();
        assert!(
            status.as_u16() < 500 || status.as_u16() == 503 || status.as_u16() == 504,
            "{path}: {status}"
        );
    }

    // Still serving: health, the admin API, and a real registration.
    assert_eq!(
        client
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client
            .get(format!("http://{addr}/v1/nodes"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/node"))
        .await
        .unwrap();
    ws.send(WsMessage::text(VALID[0].replace("fuzz-node", "survivor")))
        .await
        .unwrap();
    let ack = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(ack.to_text().unwrap().contains("register_ack"), "{ack:?}");

    let status = terminate(&mut child, DEADLINE).await;
    assert_eq!(status.code(), Some(0), "clean exit after the abuse");
    let panics = log.await.unwrap();
    assert!(panics.is_empty(), "the coordinator panicked: {panics:?}");
    redis.stop().await;
}
