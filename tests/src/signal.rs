//! Signalling a spawned binary as systemd and operators do. Shared by the
//! agent's and the coordinator's binary tests (included by path: they
//! cannot depend on this crate) and by this harness.

use std::process::ExitStatus;
use std::time::Duration;

use tokio::process::Child;

/// Sends signal `name` (`-TERM`, `-KILL`, ...) to `child`.
pub fn signal(child: &Child, name: &str) {
    let pid = child.id().expect("the process runs").to_string();
    let sent = std::process::Command::new("kill")
        .args([name, &pid])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "kill {name} {pid} failed");
}

/// Sends SIGTERM to `child` and returns its exit status, waiting at most
/// `patience`.
pub async fn terminate(child: &mut Child, patience: Duration) -> ExitStatus {
    signal(child, "-TERM");
    tokio::time::timeout(patience, child.wait())
        .await
        .expect("the process exits in time after SIGTERM")
        .expect("waiting on the process")
}
