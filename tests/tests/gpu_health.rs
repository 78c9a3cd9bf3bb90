//! GPU health reaches the coordinator: a real agent reading its GPUs
//! through NVML (the fake `libnvidia-ml.so.1` of `agent/tests/fake_nvml`,
//! compiled here) against a real coordinator. A GPU with uncorrectable ECC
//! errors, and one that raises a critical Xid while the agent runs, show
//! their reason in `GET /v1/nodes/{id}` (`capacity.gpus[].reason`).

use std::path::{Path, PathBuf};

use lingua_agent::config::AgentConfig;
use lingua_tests::{TestAgent, TestCoordinator, agent_toml, eventually, test_config};

/// The fake NVML library, compiled into `dir` with its state file next to
/// it ("<library>.state", re-read on every call).
fn fake_nvml(dir: &Path, state: &str) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/fake_nvml/fake_nvml.c");
    let lib = dir.join("libnvidia-ml.so.1");
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = std::process::Command::new(&compiler)
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-o"])
        .arg(&lib)
        .arg(&source)
        .args(["-lpthread", "-ldl"])
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {compiler:?}: {e}"));
    assert!(status.success(), "the fake NVML library does not compile");
    set_state(&lib, state);
    lib
}

/// Replaces the fake's state atomically.
fn set_state(lib: &Path, state: &str) {
    let tmp = lib.with_extension("tmp");
    std::fs::write(&tmp, state).unwrap();
    std::fs::rename(&tmp, lib.with_extension("1.state")).unwrap();
}

const GPUS: &str = "init code=0\n\
    gpu uuid=GPU-0000-ecc total=24576 used=0 ecc=2\n\
    gpu uuid=GPU-0001-xid total=24576 used=0\n";

fn agent_config(url: &str, lib: &Path) -> AgentConfig {
    let rest = format!(
        r#"drain_timeout_ms = 10000
[gpu]
backend = "nvml"
reserve_mb = 1000
poll_interval_ms = 20
[gpu.nvml]
library_path = {:?}
[jobs.translate]
vram_mb = 2000
max_concurrent = 32
executor = "simulated"
"#,
        lib.display().to_string()
    );
    AgentConfig::parse(&agent_toml("gpu-health", url, &rest))
        .expect("the test agent config is valid")
}

/// The node's GPU readings as the coordinator shows them.
async fn reported_gpus(coordinator: &TestCoordinator) -> Vec<serde_json::Value> {
    let (_, view) = coordinator.get("/v1/nodes/gpu-health").await;
    view["capacity"]["gpus"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn gpu_health_reasons_reach_the_coordinator() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let lib = fake_nvml(dir.path(), GPUS);
    let agent = TestAgent::start(agent_config(&coordinator.ws_url(), &lib));
    agent.registered(1).await;
    let gpus = eventually("both readings at the coordinator", || async {
        let gpus = reported_gpus(&coordinator).await;
        (gpus.len() == 2).then_some(gpus)
    })
    .await;
    assert_eq!(gpus[0]["uuid"], "GPU-0000-ecc");
    assert_eq!(gpus[0]["healthy"], false);
    let reason = gpus[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("2 uncorrectable"), "{gpus:?}");
    assert_eq!(gpus[1]["healthy"], true);
    assert!(gpus[1].get("reason").is_none(), "{gpus:?}");
    // (24,576 - 1,000) / 2,000 on the healthy GPU only.
    let (_, view) = coordinator.get("/v1/nodes/gpu-health").await;
    assert_eq!(view["capacity"]["free_slots"]["translate"], 11);

    // A critical Xid on the other GPU while the agent runs.
    set_state(&lib, &format!("{GPUS}xid gpu=1 value=79\n"));
    let gpus = eventually("the xid reason at the coordinator", || async {
        let gpus = reported_gpus(&coordinator).await;
        (gpus.get(1).and_then(|g| g.get("reason")).is_some()).then_some(gpus)
    })
    .await;
    assert_eq!(gpus[1]["uuid"], "GPU-0001-xid");
    assert_eq!(gpus[1]["healthy"], false);
    assert_eq!(gpus[1]["reason"], "critical Xid 79");
    eventually("zero slots at the coordinator", || async {
        let (_, view) = coordinator.get("/v1/nodes/gpu-health").await;
        (view["capacity"]["free_slots"]["translate"] == 0).then_some(())
    })
    .await;
    agent.stop().await.unwrap();
    coordinator.stop().await;
}
