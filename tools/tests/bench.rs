//! `lingua-bench --redis cluster` measures the fleet on a real 3-master
//! Redis Cluster, Redis's figures read from every master; bad usage
//! (an unknown kind, a scenario that runs on one Redis only) exits 64.

use std::time::Duration;

const BENCH: &str = env!("CARGO_BIN_EXE_lingua-bench");

#[tokio::test]
async fn the_throughput_scenario_runs_on_a_redis_cluster() {
    let output = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(BENCH)
            .args(["--scenario", "throughput", "--seconds", "1"])
            .args(["--clients", "8", "--redis", "cluster"])
            .kill_on_drop(true)
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
    // Every job is one pick and one result (and a few routing updates
    // between), whichever master holds its pair (zh:en: the third): a
    // count read from one master would miss them, one read twice would
    // double them.
    let scripts_per_job: f64 = stdout
        .lines()
        .find_map(|line| {
            line.strip_prefix("| Script calls, assignments per job in the closed loop | ")
        })
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.trim().parse().ok())
        .unwrap_or_else(|| panic!("no script calls row in:\n{stdout}"));
    assert!((2.0..3.0).contains(&scripts_per_job), "{stdout}");
}

#[tokio::test]
async fn bad_redis_usage_exits_64() {
    let stderr = usage_error(&["--redis", "sentinel"]).await;
    assert!(
        stderr.contains("one") && stderr.contains("cluster"),
        "the error lists the kinds: {stderr}"
    );
    // The other scenarios run on one Redis only: asking for a cluster
    // there is refused, not ignored.
    let stderr = usage_error(&["--redis", "cluster", "--scenario", "pick"]).await;
    assert!(
        stderr.contains("throughput and fleet-scale scenarios only"),
        "{stderr}"
    );
}

/// Runs the bench with `args`, checks it exits 64, and returns what it
/// said on stderr.
async fn usage_error(args: &[&str]) -> String {
    let output = tokio::process::Command::new(BENCH)
        .args(args)
        .output()
        .await
        .expect("the bench starts");
    assert_eq!(output.status.code(), Some(64), "{args:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}
