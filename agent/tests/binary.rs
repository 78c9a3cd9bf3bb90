//! The `lingua-agent` binary as an operator runs it: check-config, probe,
//! exit codes, the metrics endpoint and SIGTERM.

#[path = "../../tests/src/signal.rs"]
mod signal;
use signal::terminate;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_lingua-agent");
const PATIENCE: Duration = Duration::from_secs(10);

const CONFIG: &str = r#"
node_id = "bin-agent"
coordinator_url = "COORDINATOR"
drain_timeout_ms = 5000
METRICS
[capabilities]
src_langs = ["zh"]
tgt_langs = ["en", "ja"]
[gpu]
backend = "BACKEND"
reserve_mb = 1000
[gpu.simulated]
count = 2
memory_mb = 16000
external_used_mb = 3000
[jobs.translate]
vram_mb = 2000
max_concurrent = 4
executor = "simulated"
[jobs.asr]
vram_mb = 5000
priority = 90
max_concurrent = 8
executor = "simulated"
"#;

fn config(backend: &str, coordinator: &str, metrics: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    let text = CONFIG
        .replace("BACKEND", backend)
        .replace("COORDINATOR", coordinator)
        .replace("METRICS", metrics);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

async fn run(args: &[&str]) -> (i32, String, String) {
    let output = tokio::time::timeout(
        PATIENCE,
        Command::new(BIN)
            .args(args)
            .env("LINGUA_LOG", "warn")
            .output(),
    )
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
async fn probe_prints_the_documented_json() {
    let (_dir, path) = config("simulated", "ws://127.0.0.1:1/v1/node", "");
    let (code, stdout, stderr) = run(&["probe", "--config", path.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{stderr}");
    let doc: serde_json::Value =
        serde_json::from_str(&stdout).expect("probe prints one JSON document");
    assert_eq!(doc["backend"], "simulated");
    let gpus = doc["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 2);
    for key in [
        "index",
        "uuid",
        "name",
        "memory_total_mb",
        "memory_used_mb",
        "memory_free_mb",
        "utilization_pct",
        "healthy",
    ] {
        assert!(gpus[0].get(key).is_some(), "gpus[].{key} missing: {stdout}");
    }
    assert_eq!(gpus[0]["memory_free_mb"], 13000);
    // Per GPU (16000 - 1000 - 3000) = 12000 MiB: 6 translate jobs each
    // (capped at 4 in all), 2 asr jobs each.
    assert_eq!(doc["jobs"]["translate"]["free_slots"], 4);
    assert_eq!(doc["jobs"]["asr"]["free_slots"], 4);
}

/// The service itself keeps running without NVML (tests/nvml.rs); `probe`
/// answers at once.
#[tokio::test]
async fn probe_without_a_driver_exits_69_with_one_line() {
    let (_dir, path) = config("nvml", "ws://127.0.0.1:1/v1/node", "");
    let (code, stdout, stderr) = run(&["probe", "--config", path.to_str().unwrap()]).await;
    assert_eq!(code, 69, "{stdout}{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("NVML") && stderr.contains("backend = \"none\""),
        "{stderr}"
    );
}

#[tokio::test]
async fn config_errors_exit_64_naming_field_and_line() {
    let (code, _, stderr) = run(&["--bogus"]).await;
    assert_eq!(code, 64, "{stderr}");
    let (_dir, path) = config("cuda", "ws://127.0.0.1:1/v1/node", "");
    let (code, _, stderr) = run(&["check-config", "--config", path.to_str().unwrap()]).await;
    assert_eq!(code, 64);
    assert!(stderr.contains("gpu.backend (line 10)"), "{stderr}");
    let (_dir, path) = config("simulated", "ws://127.0.0.1:1/v1/node", "");
    let (code, stdout, _) = run(&["check-config", "--config", path.to_str().unwrap()]).await;
    assert_eq!((code, stdout.trim()), (0, "config is valid"));
    let (code, _, stderr) = run(&["check-config", "--config", "/nonexistent/agent.toml"]).await;
    assert_eq!(code, 64);
    assert!(stderr.contains("/nonexistent/agent.toml"), "{stderr}");
    let (code, stdout, _) = run(&["--help"]).await;
    assert_eq!(code, 0);
    assert!(
        stdout.contains("probe") && stdout.contains("SIGTERM"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_ca_file_that_is_not_a_ca_fails_check_config() {
    let (dir, _) = config("simulated", "wss://127.0.0.1:1/v1/node", "");
    let not_pem = dir.path().join("ca.crt");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    for (file, says) in [
        (not_pem.display().to_string(), "holds no PEM certificate"),
        (
            "/nonexistent/ca.crt".to_owned(),
            "cannot read /nonexistent/ca.crt",
        ),
    ] {
        let ca = format!("ca_file = \"{file}\"");
        let (_dir, path) = config("simulated", "wss://127.0.0.1:1/v1/node", &ca);
        let (code, _, stderr) = run(&["check-config", "--config", path.to_str().unwrap()]).await;
        assert_eq!(code, 64, "{stderr}");
        assert!(
            stderr.contains("ca_file (line 5)") && stderr.contains(says),
            "{stderr}"
        );
    }
    let (_dir, path) = config(
        "simulated",
        "wss://127.0.0.1:1/v1/node",
        "system_roots = false",
    );
    let (code, _, stderr) = run(&["check-config", "--config", path.to_str().unwrap()]).await;
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("system_roots (line 5)") && stderr.contains("needs a ca_file"),
        "{stderr}"
    );
}

#[tokio::test]
async fn generates_its_man_page_and_completions() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("docs");
    let (code, _, stderr) = run(&["--generate-docs", out.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{stderr}");
    let page = std::fs::read_to_string(out.join("lingua-agent.1")).unwrap();
    assert!(
        page.contains("check\\-config") || page.contains("check-config"),
        "{page}"
    );
    for file in ["lingua-agent.bash", "_lingua-agent", "lingua-agent.fish"] {
        assert!(out.join(file).is_file(), "{file}");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn serves_metrics_while_retrying_and_drains_on_sigterm() {
    let port = free_port();
    let metrics = format!("metrics_listen = \"127.0.0.1:{port}\"");
    // Nothing listens at the coordinator URL: the agent keeps retrying.
    let (_dir, path) = config(
        "simulated",
        &format!("ws://127.0.0.1:{}/v1/node", free_port()),
        &metrics,
    );
    let mut child = Command::new(BIN)
        .args(["--config", path.to_str().unwrap()])
        .env("LINGUA_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("serving agent metrics") {
                return;
            }
        }
    })
    .await
    .expect("the metrics endpoint comes up");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for sample in [
        "lingua_agent_connected 0",
        "lingua_agent_jobs_running 0",
        "lingua_agent_free_slots{kind=\"translate\"} 4",
        "lingua_agent_gpu_memory_used_bytes{gpu=\"1\",UUID=\"GPU-simulated-1\",model_name=\"Simulated GPU\"} 3145728000.0",
    ] {
        assert!(text.contains(sample), "{sample} missing from:\n{text}");
    }
    assert_eq!(terminate(&mut child, PATIENCE).await.code(), Some(0));
}

#[tokio::test]
async fn the_packaged_example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/agent.toml");
    let (code, stdout, stderr) = run(&["check-config", "--config", example]).await;
    assert_eq!((code, stdout.trim()), (0, "config is valid"), "{stderr}");
}

#[tokio::test]
async fn tells_systemd_it_is_ready_feeds_the_watchdog_and_reports_status() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let (_config_dir, path) = config(
        "simulated",
        &format!("ws://127.0.0.1:{}/v1/node", free_port()),
        "",
    );
    let mut child = Command::new(BIN)
        .args(["--config", path.to_str().unwrap()])
        .env("LINGUA_LOG", "warn")
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut seen = String::new();
    let all_seen = tokio::time::timeout(PATIENCE, async {
        let mut buf = vec![0u8; 4096];
        while !(seen.contains("READY=1") && seen.contains("WATCHDOG=1") && seen.contains("STATUS="))
        {
            let n = socket.recv(&mut buf).await.unwrap();
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    })
    .await;
    assert!(all_seen.is_ok(), "systemd notifications so far: {seen:?}");
    assert_eq!(terminate(&mut child, PATIENCE).await.code(), Some(0));
}
