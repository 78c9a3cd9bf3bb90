//! `lingua-demo` runs to the end, shows the node failure, and exits 0 with
//! every job answered; bad usage exits 64.

use std::time::Duration;

const DEMO: &str = env!("CARGO_BIN_EXE_lingua-demo");

#[tokio::test]
async fn the_demo_runs_a_fleet_through_a_node_failure() {
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(DEMO)
            .args(["--agents", "3", "--jobs", "150"])
            .output(),
    )
    .await
    .expect("the demo finishes")
    .expect("the demo starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    for expected in [
        "3 agents registered",
        "killed gpu-02",
        "summary",
        "jobs submitted       150",
        "admission queue      at most",
        "every job reached a terminal state",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing from:\n{stdout}"
        );
    }
    // Not a terminal: plain progress lines, then the per-node table.
    assert!(
        stdout.contains("jobs/s") && stdout.contains("KILLED"),
        "{stdout}"
    );
    assert!(
        !stdout.contains('\u{1b}'),
        "no terminal escapes when stdout is not a TTY"
    );
}

#[tokio::test]
async fn bad_usage_exits_64() {
    let output = tokio::process::Command::new(DEMO)
        .args(["--agents", "1"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let help = tokio::process::Command::new(DEMO)
        .arg("--help")
        .output()
        .await
        .unwrap();
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("--redis-url"));
}
