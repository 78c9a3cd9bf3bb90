//! `lingua-bench --redis cluster` measures the fleet on a real 3-master
//! Redis Cluster, Redis's figures read from every master; bad usage exits
//! 64.

use std::time::Duration;

const BENCH: &str = env!("CARGO_BIN_EXE_lingua-bench");

#[tokio::test]
async fn the_throughput_scenario_runs_on_a_redis_cluster() {
    let output = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(BENCH)
            .args(["--scenario", "throughput", "--seconds", "1"])
            .args(["--clients", "8", "--redis", "cluster"])
            .output(),
    )
    .await
    .expect("the bench finishes")
    .expect("the bench starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("a 3-master Redis Cluster (closed loop)"),
        "{stdout}"
    );
    // Every job is one pick and one result, whichever master holds its
    // pair: a count read from one master only would miss them.
    let scripts_per_job: f64 = stdout
        .lines()
        .find_map(|line| {
            line.strip_prefix("| Script calls, assignments per job in the closed loop | ")
        })
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.trim().parse().ok())
        .unwrap_or_else(|| panic!("no script calls row in:\n{stdout}"));
    assert!(scripts_per_job >= 2.0, "{stdout}");
}

#[tokio::test]
async fn an_unknown_redis_kind_exits_64() {
    let output = tokio::process::Command::new(BENCH)
        .args(["--redis", "sentinel"])
        .output()
        .await
        .expect("the bench starts");
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("one") && stderr.contains("cluster"),
        "the error lists the kinds: {stderr}"
    );
}
