//! `lingua-ctl`, the real binary, against a real coordinator and agent:
//! every subcommand, tables and `--json`, and its exit codes for a bad
//! token, an unknown node, bad input and a coordinator that is down.

use std::process::Stdio;

use lingua_coordinator::config::Config;
use lingua_tests::fleet::{free_local_addr, workspace_binary};
use lingua_tests::{TestAgent, TestCoordinator, agent_config, test_config};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

const ADMIN: &str = "a-ctl-admin-token";

/// What one run of `lingua-ctl` gave.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {}", self.stdout))
    }
}

/// Runs `lingua-ctl` with `args` against `url` (token from `token`, via
/// LINGUA_TOKEN), feeding `stdin`.
async fn ctl(url: &str, token: Option<&str>, args: &[&str], stdin: &str) -> Run {
    let mut command = tokio::process::Command::new(workspace_binary("lingua-ctl").unwrap());
    command
        .args(args)
        .env("LINGUA_URL", url)
        .env_remove("LINGUA_TOKEN")
        .env_remove("LINGUA_TOKEN_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(token) = token {
        command.env("LINGUA_TOKEN", token);
    }
    let mut child = command.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let output = child.wait_with_output().await.unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A coordinator with an admin token and one agent, `ctl-1`.
async fn fleet() -> (
    lingua_coordinator::private_redis::PrivateRedis,
    TestCoordinator,
    TestAgent,
) {
    let redis = lingua_tests::redis().await;
    let config = Config {
        api_tokens: vec![ADMIN.into()],
        client_tokens: vec!["a-ctl-client-token".into()],
        ..test_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    let agent = TestAgent::start(agent_config("ctl-1", &coordinator.ws_url(), 5));
    agent.registered(1).await;
    (redis, coordinator, agent)
}

const JOB: &str = r#"{"id": "ctl-job", "kind": "translate", "src_lang": "zh", "tgt_lang": "en", "payload": {"text": "ni hao"}}"#;

#[tokio::test]
async fn every_subcommand_answers_for_people_and_for_scripts() {
    let (_redis, coordinator, agent) = fleet().await;
    let url = coordinator.url("");
    let admin = Some(ADMIN);

    let nodes = ctl(&url, admin, &["nodes"], "").await;
    assert_eq!(nodes.code, 0, "{}", nodes.stderr);
    let header = nodes.stdout.lines().next().unwrap();
    assert!(
        header.starts_with("NODE") && header.contains("RUNNING"),
        "{header}"
    );
    let row = nodes.stdout.lines().nth(1).unwrap();
    assert!(
        row.starts_with("ctl-1") && row.contains("ready") && row.contains("zh:en"),
        "{row}"
    );
    let json = ctl(&url, admin, &["nodes", "--json"], "").await.json();
    assert_eq!(json["nodes"][0]["id"], "ctl-1");

    let node = ctl(&url, admin, &["node", "ctl-1"], "").await;
    assert_eq!(node.code, 0, "{}", node.stderr);
    assert!(node.stdout.contains("State:      ready"), "{}", node.stdout);
    assert!(node.stdout.contains("GPU-simulated-0"), "{}", node.stdout);

    let pools = ctl(&url, admin, &["pools"], "").await;
    assert_eq!(pools.code, 0, "{}", pools.stderr);
    assert!(
        pools.stdout.contains("zh:en") && pools.stdout.contains("translate 8"),
        "{}",
        pools.stdout
    );
    let json = ctl(&url, admin, &["--json", "pools"], "").await.json();
    assert_eq!(json["pairs"][0]["ready_nodes"], 1);

    let submitted = ctl(&url, admin, &["jobs", "submit"], JOB).await;
    assert_eq!(submitted.code, 0, "{}", submitted.stderr);
    assert!(
        submitted.stdout.contains("Status:   completed"),
        "{}",
        submitted.stdout
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.json");
    std::fs::write(&file, JOB.replace("ctl-job", "ctl-job-2")).unwrap();
    let from_file = ctl(
        &url,
        admin,
        &["jobs", "submit", "--json", file.to_str().unwrap()],
        "",
    )
    .await;
    assert_eq!(from_file.json()["status"], "completed");
    let got = ctl(&url, admin, &["jobs", "get", "ctl-job", "--json"], "").await;
    assert_eq!(got.code, 0, "{}", got.stderr);
    assert_eq!(got.json()["node_id"], "ctl-1");
    let failed = ctl(
        &url,
        admin,
        &["jobs", "submit"],
        &JOB.replace(r#""zh""#, r#""de""#)
            .replace("ctl-job", "ctl-nope"),
    )
    .await;
    assert_eq!(failed.code, 1, "a failed job is exit 1");
    assert!(
        failed.stdout.contains("no_nodes") && failed.stderr.contains("failed"),
        "{}{}",
        failed.stdout,
        failed.stderr
    );
    let failed = ctl(&url, admin, &["jobs", "get", "ctl-nope"], "").await;
    assert_eq!(failed.code, 1, "a failed job is exit 1 when read back too");
    assert!(
        failed.stdout.contains("Status:   failed"),
        "{}",
        failed.stdout
    );

    let top = ctl(&url, admin, &["top", "-n", "2"], "").await;
    assert_eq!(top.code, 0, "{}", top.stderr);
    assert_eq!(
        top.stdout.matches("Nodes: 1 ready").count(),
        2,
        "{}",
        top.stdout
    );
    assert!(top.stdout.contains("ctl-1"), "{}", top.stdout);
    let top = ctl(&url, admin, &["top", "-n", "1", "--json"], "").await;
    assert_eq!(top.json()["nodes_by_state"]["ready"], 1);

    let drain = ctl(
        &url,
        admin,
        &["drain", "ctl-1", "--wait", "--timeout", "30"],
        "",
    )
    .await;
    assert_eq!(drain.code, 0, "{}", drain.stderr);
    assert!(
        drain.stdout.contains("is draining") && drain.stdout.contains("runs no job"),
        "{}",
        drain.stdout
    );
    let view = ctl(&url, admin, &["node", "ctl-1", "--json"], "")
        .await
        .json();
    assert_eq!(view["state"], "draining");

    agent.stop().await.unwrap();
    coordinator.stop().await;
}

#[tokio::test]
async fn errors_say_what_to_do_with_documented_exit_codes() {
    let (_redis, coordinator, agent) = fleet().await;
    let url = coordinator.url("");

    let missing = ctl(&url, None, &["nodes"], "").await;
    assert_eq!(missing.code, 77, "no token");
    assert!(
        missing.stderr.contains("LINGUA_TOKEN"),
        "{}",
        missing.stderr
    );
    let wrong = ctl(&url, Some("not-the-token"), &["nodes"], "").await;
    assert_eq!(wrong.code, 77, "a wrong token");
    let client = ctl(&url, Some("a-ctl-client-token"), &["pools"], "").await;
    assert_eq!(client.code, 77, "a client token");
    assert!(client.stderr.contains("admin token"), "{}", client.stderr);

    let unknown = ctl(&url, Some(ADMIN), &["node", "nope"], "").await;
    assert_eq!(unknown.code, 1);
    assert!(
        unknown.stderr.contains("not_found: no node nope"),
        "{}",
        unknown.stderr
    );
    let unknown = ctl(&url, Some(ADMIN), &["drain", "nope"], "").await;
    assert_eq!(unknown.code, 1);
    let unknown = ctl(&url, Some(ADMIN), &["jobs", "get", "nope"], "").await;
    assert_eq!(unknown.code, 1);

    let not_json = ctl(&url, Some(ADMIN), &["jobs", "submit", "-"], "{kind").await;
    assert_eq!(not_json.code, 64);
    assert!(
        not_json.stderr.contains("stdin is not JSON"),
        "{}",
        not_json.stderr
    );
    let no_file = ctl(
        &url,
        Some(ADMIN),
        &["jobs", "submit", "/nonexistent/job.json"],
        "",
    )
    .await;
    assert_eq!(no_file.code, 64);
    for bad_id in ["../v1/pools", "..", "."] {
        let run = ctl(&url, Some(ADMIN), &["node", bad_id], "").await;
        assert_eq!(run.code, 64, "{bad_id}: {}", run.stderr);
    }
    let bad_flag = ctl(&url, Some(ADMIN), &["nodes", "--frobnicate"], "").await;
    assert_eq!(bad_flag.code, 64);
    let help = ctl(&url, None, &["drain", "--help"], "").await;
    assert_eq!(help.code, 0);
    assert!(help.stdout.contains("--wait"), "{}", help.stdout);

    agent.stop().await.unwrap();
    coordinator.stop().await;
    let down = ctl(&url, Some(ADMIN), &["nodes"], "").await;
    assert_eq!(down.code, 69, "the coordinator is down");
    assert!(
        down.stderr.contains("cannot reach the coordinator"),
        "{}",
        down.stderr
    );
    let nothing_there = format!("http://{}", free_local_addr());
    let down = ctl(&nothing_there, Some(ADMIN), &["top", "-n", "1"], "").await;
    assert_eq!(down.code, 69, "{}", down.stderr);
    let no_scheme = ctl("localhost:7700", Some(ADMIN), &["nodes"], "").await;
    assert_eq!(no_scheme.code, 64);
}
