//! The `lingua-coordinator` binary as an operator runs it: exit codes,
//! check-config, SIGTERM, and what happens to Redis state and to a private
//! redis-server when the process is killed.

#[path = "../../tests/src/signal.rs"]
mod signal;
use signal::{signal, terminate};

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use lingua_coordinator::private_redis::PrivateRedis;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const BIN: &str = env!("CARGO_BIN_EXE_lingua-coordinator");
const PATIENCE: Duration = Duration::from_secs(10);

fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

async fn run_to_end(args: &[&str], path_env: Option<&str>) -> (i32, String, String) {
    let mut command = Command::new(BIN);
    command.args(args).env("LINGUA_LOG", "warn");
    if let Some(path) = path_env {
        command.env("PATH", path);
    }
    let output = tokio::time::timeout(PATIENCE, command.output())
        .await
        .unwrap()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn usage_and_config_errors_exit_64_with_the_reason() {
    let (code, stdout, _) = run_to_end(&["--help"], None).await;
    assert_eq!(code, 0);
    assert!(
        stdout.contains("check-config") && stdout.contains("--redis-url"),
        "{stdout}"
    );
    let (code, stdout, _) = run_to_end(&["--version"], None).await;
    assert_eq!(
        (code, stdout.trim()),
        (0, concat!("lingua-coordinator ", env!("CARGO_PKG_VERSION")))
    );
    let (code, _, stderr) = run_to_end(&["--no-such-flag"], None).await;
    assert_eq!(code, 64, "{stderr}");

    let (_dir, good) = config_file("listen = \"127.0.0.1:7700\"\n[nodes]\nmissed_heartbeats = 4\n");
    let (code, stdout, _) =
        run_to_end(&["check-config", "--config", good.to_str().unwrap()], None).await;
    assert_eq!((code, stdout.trim()), (0, "config is valid"));

    let (_dir, bad) = config_file("[pools]\nmax_nodes_per_pool = 0\n");
    let (code, _, stderr) =
        run_to_end(&["check-config", "--config", bad.to_str().unwrap()], None).await;
    assert_eq!(code, 64);
    assert!(
        stderr.contains("pools.max_nodes_per_pool (line 2)"),
        "{stderr}"
    );

    let (_dir, unknown) = config_file("[pools]\nmax_node = 3\n");
    let (code, _, stderr) = run_to_end(
        &["check-config", "--config", unknown.to_str().unwrap()],
        None,
    )
    .await;
    assert_eq!(code, 64);
    assert!(
        stderr.contains("max_node") && stderr.contains("line 2"),
        "{stderr}"
    );

    let (code, _, stderr) = run_to_end(&["--listen", "0.0.0.0:7700"], None).await;
    assert_eq!(code, 64);
    assert!(stderr.contains("allow_anonymous"), "{stderr}");
}

/// check-config reads the TLS certificate and key the service would
/// load: before, it said "config is valid" for files the service could
/// not read, which then exited 64 (and systemd does not restart on 64).
/// A config that is valid but likely a mistake passes with a warning.
#[tokio::test]
async fn check_config_reads_the_tls_files_and_warns_of_client_tokens_alone() {
    let (dir, missing) = config_file(
        "[tls]\ncert_file = \"/nonexistent/coordinator.crt\"\nkey_file = \"/nonexistent/coordinator.key\"\n",
    );
    let (code, stdout, stderr) = run_to_end(
        &["check-config", "--config", missing.to_str().unwrap()],
        None,
    )
    .await;
    assert_eq!(code, 64, "{stdout}{stderr}");
    assert!(stderr.contains("/nonexistent/coordinator.crt"), "{stderr}");
    let clients = dir.path().join("clients.toml");
    std::fs::write(
        &clients,
        "[auth]\nclient_tokens = [\"a-client-token-0123\"]\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run_to_end(
        &["check-config", "--config", clients.to_str().unwrap()],
        None,
    )
    .await;
    assert_eq!((code, stdout.trim()), (0, "config is valid"), "{stderr}");
    assert!(
        stderr.contains("warning: auth.client_tokens without auth.api_tokens"),
        "{stderr}"
    );
}

#[tokio::test]
async fn missing_dependencies_exit_69_with_what_to_do() {
    let (code, _, stderr) = run_to_end(&["--listen", "127.0.0.1:0"], Some("/nonexistent")).await;
    assert_eq!(code, 69);
    assert!(
        stderr.contains("apt-get install redis-server") && stderr.contains("--redis-url"),
        "{stderr}"
    );
    let (code, _, stderr) = run_to_end(
        &[
            "--listen",
            "127.0.0.1:0",
            "--redis-url",
            "redis://127.0.0.1:1/0",
        ],
        None,
    )
    .await;
    assert_eq!(code, 69);
    assert!(stderr.contains("cannot reach Redis"), "{stderr}");
    let (code, _, stderr) = run_to_end(
        &[
            "--listen",
            "127.0.0.1:0",
            "--redis-cluster",
            "redis://127.0.0.1:1",
        ],
        None,
    )
    .await;
    assert_eq!(code, 69);
    assert!(
        stderr.contains("cannot reach Redis at the Redis Cluster of redis://127.0.0.1:1"),
        "{stderr}"
    );
    let (code, _, stderr) = run_to_end(
        &[
            "--redis-cluster",
            "redis://a:1",
            "--redis-url",
            "redis://b:1",
        ],
        None,
    )
    .await;
    assert_eq!(code, 64);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

/// A coordinator process, started and read until it serves.
struct Running {
    child: Child,
    addr: String,
    private_socket: Option<PathBuf>,
}

async fn start(args: &[&str]) -> Running {
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(args)
        .env("LINGUA_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut private_socket = None;
    let addr = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let json: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            let fields = &json["fields"];
            if let Some(socket) = fields["socket"].as_str() {
                private_socket = Some(PathBuf::from(socket));
            }
            if fields["message"] == "coordinator serving" {
                return fields["listen"].as_str().unwrap().to_owned();
            }
        }
        panic!("the coordinator exited before serving");
    })
    .await
    .expect("the coordinator starts in time");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Running {
        child,
        addr,
        private_socket,
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn registered_node(addr: &str, node_id: &str) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/node"))
        .await
        .unwrap();
    let register = serde_json::json!({
        "type": "register", "node_id": node_id, "protocol": {"min": 1, "max": 1},
        "agent_version": "test", "instance": "bin-test",
        "capabilities": {"src_langs": ["zh"], "tgt_langs": ["en"], "kinds": ["translate"]},
        "capacity": {"free_slots": {"translate": 2}}
    });
    ws.send(WsMessage::text(register.to_string()))
        .await
        .unwrap();
    let ack = ws.next().await.unwrap().unwrap();
    assert!(ack.to_text().unwrap().contains("register_ack"), "{ack:?}");
    ws
}

async fn wait_gone(socket: &std::path::Path) {
    let gone = tokio::time::timeout(PATIENCE, async {
        while tokio::net::UnixStream::connect(socket).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        gone.is_ok(),
        "the private redis-server at {} still answers",
        socket.display()
    );
}

#[tokio::test]
async fn sigterm_closes_node_sockets_with_1001_stops_private_redis_and_exits_0() {
    let mut coordinator = start(&[]).await;
    let socket = coordinator
        .private_socket
        .clone()
        .expect("a private redis was started and logged");
    let mut ws = registered_node(&coordinator.addr, "sigterm-node").await;
    signal(&coordinator.child, "-TERM");
    let close = loop {
        match tokio::time::timeout(PATIENCE, ws.next()).await.unwrap() {
            Some(Ok(WsMessage::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close, Some(1001));
    let status = tokio::time::timeout(PATIENCE, coordinator.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    wait_gone(&socket).await;
}

#[tokio::test]
async fn sigkill_never_orphans_the_private_redis() {
    let mut coordinator = start(&[]).await;
    let socket = coordinator
        .private_socket
        .clone()
        .expect("a private redis was started and logged");
    assert!(tokio::net::UnixStream::connect(&socket).await.is_ok());
    signal(&coordinator.child, "-KILL");
    coordinator.child.wait().await.unwrap();
    wait_gone(&socket).await;
}

async fn now_ms(conn: &mut redis::aio::MultiplexedConnection) -> f64 {
    let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    (seconds * 1000 + micros / 1000) as f64
}

#[tokio::test]
async fn a_node_of_a_killed_coordinator_leaves_routing_when_its_lease_runs_out() {
    let redis = PrivateRedis::start()
        .await
        .expect("redis-server is installed");
    let (_dir, config) =
        config_file("[nodes]\nheartbeat_interval_ms = 100\nmissed_heartbeats = 3\n");
    let url = redis.url();
    let mut first = start(&["--redis-url", &url, "--config", config.to_str().unwrap()]).await;
    let _ws = registered_node(&first.addr, "orphan").await;
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let route = "lingua:v1:pair:{zh:en}:route:translate";
    let routable = tokio::time::timeout(PATIENCE, async {
        loop {
            let score: Option<f64> = redis::cmd("ZSCORE")
                .arg(route)
                .arg("orphan")
                .query_async(&mut conn)
                .await
                .unwrap();
            if score.is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(routable.is_ok(), "the node became routable");

    // Nobody is left to clean up: only the leases in Redis take it out.
    signal(&first.child, "-KILL");
    first.child.wait().await.unwrap();
    let expired = tokio::time::timeout(PATIENCE, async {
        loop {
            let lease: bool = redis::cmd("EXISTS")
                .arg("lingua:v1:node:{orphan}:lease")
                .query_async(&mut conn)
                .await
                .unwrap();
            let now = now_ms(&mut conn).await;
            let score: Option<f64> = redis::cmd("ZSCORE")
                .arg(route)
                .arg("orphan")
                .query_async(&mut conn)
                .await
                .unwrap();
            if !lease && score.is_none_or(|deadline| deadline <= now) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        expired.is_ok(),
        "the node's lease and routing entry expired"
    );

    let second = start(&["--redis-url", &url]).await;
    let view: serde_json::Value = reqwest::get(format!("http://{}/v1/nodes/orphan", second.addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["state"], "offline");
    drop(second);
    redis.stop().await;
}

#[tokio::test]
async fn the_packaged_example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/coordinator.toml");
    let (code, stdout, stderr) = run_to_end(&["check-config", "--config", example], None).await;
    assert_eq!((code, stdout.trim()), (0, "config is valid"), "{stderr}");
}

#[tokio::test]
async fn tells_systemd_it_is_ready_and_feeds_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0"])
        .env("LINGUA_LOG", "warn")
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut seen = String::new();
    let all_seen = tokio::time::timeout(PATIENCE, async {
        let mut buf = vec![0u8; 4096];
        while !(seen.contains("READY=1") && seen.contains("WATCHDOG=1")) {
            let n = socket.recv(&mut buf).await.unwrap();
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    })
    .await;
    assert!(all_seen.is_ok(), "systemd notifications so far: {seen:?}");
    assert_eq!(terminate(&mut child, PATIENCE).await.code(), Some(0));
}

#[tokio::test]
async fn under_systemd_log_lines_carry_their_journal_priority_and_no_timestamp() {
    use std::os::unix::fs::MetadataExt;
    // systemd connects stderr to the journal and names that stream in
    // JOURNAL_STREAM (device:inode); here the stream is a file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stderr");
    let file = std::fs::File::create(&path).unwrap();
    let meta = file.metadata().unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--config",
            "/nonexistent/coordinator.toml",
        ])
        .env("LINGUA_LOG", "info")
        .env("JOURNAL_STREAM", &stream)
        .stderr(file.try_clone().unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(64));
    let written = std::fs::read_to_string(&path).unwrap();
    assert!(
        written.starts_with("<3>lingua-coordinator: "),
        "the error it exits with is an error to the journal: {written:?}"
    );

    let file = std::fs::File::create(&path).unwrap();
    let meta = file.metadata().unwrap();
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0"])
        .env("LINGUA_LOG", "info")
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let serving = serving_line(&path).await;
    assert!(
        serving.starts_with("<6>lingua_coordinator::server: coordinator serving"),
        "an info line, priority 6, no timestamp, no colour: {serving:?}"
    );
    signal(&child, "-TERM");
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));

    // Inherited by a process whose stderr goes elsewhere: plain lines.
    let output = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--config",
            "/nonexistent/coordinator.toml",
        ])
        .env("JOURNAL_STREAM", &stream)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("lingua-coordinator: "), "{stderr:?}");
}

/// The first line of `path` that says the coordinator serves.
async fn serving_line(path: &std::path::Path) -> String {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains("coordinator serving")) {
                return line.to_owned();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the coordinator starts in time")
}

#[tokio::test]
async fn sighup_while_connecting_to_redis_does_not_stop_it() {
    // A "Redis" that accepts the connection and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", silent.local_addr().unwrap());
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--redis-url", &url])
        .env("LINGUA_LOG", "error")
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Once it connects, it is past start-up's signal handling.
    let (_held, _) = tokio::time::timeout(PATIENCE, silent.accept())
        .await
        .unwrap()
        .unwrap();
    signal(&child, "-HUP");
    // Its Redis timeouts and retries take a while: a bound, not a measure.
    let status = tokio::time::timeout(PATIENCE * 6, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        status.code(),
        Some(69),
        "it gives up on the silent Redis, not on SIGHUP: {status:?}"
    );
}
