//! The busy policy end to end: a real coordinator and the real agent
//! binary, whose `asr` kind has one GPU slot and a CPU fallback. With the
//! GPU slot taken a job runs on the fallback executor (told `cpu`, shown
//! no GPU) and its answer says so; a job that requires a GPU never runs
//! there; with GPU room free no job takes the fallback.

use std::path::Path;
use std::process::Stdio;

use lingua_tests::fleet::workspace_binary;
use lingua_tests::{TestCoordinator, agent_toml, eventually, test_config};
use serde_json::{Value, json};

/// The GPU executor waits for `gate` to exist, so that a test decides how
/// long the one GPU slot stays taken; the fallback notes each run in
/// `runs`. Both print where they ran and which GPU they saw.
fn config(url: &str, dir: &Path) -> String {
    let (gate, runs) = (dir.join("gate"), dir.join("runs"));
    let report =
        r#"printf '{"device": "%s", "cuda": "%s"}' "$LINGUA_DEVICE" "$CUDA_VISIBLE_DEVICES""#;
    let gpu = format!(
        "while [ ! -e {gate} ]; do sleep 0.02; done; {report}",
        gate = gate.display()
    );
    let cpu = format!("echo run >> {runs}; {report}", runs = runs.display());
    let rest = format!(
        r#"[gpu]
backend = "simulated"
poll_interval_ms = 20
[gpu.simulated]
count = 1
memory_mb = 24000
[jobs.asr]
vram_mb = 8000
max_concurrent = 1
executor = "command"
command = ["sh", "-c", {gpu:?}]
load_time_ms = 0
busy = "fallback"
[jobs.asr.fallback]
max_concurrent = 1
executor = "command"
command = ["sh", "-c", {cpu:?}]
"#
    );
    agent_toml("busy-1", url, &rest)
}

async fn submit(http: &reqwest::Client, coordinator: &TestCoordinator, job: Value) -> Value {
    http.post(coordinator.url("/v1/jobs"))
        .json(&job)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn job(id: &str) -> Value {
    json!({"id": id, "kind": "asr", "src_lang": "zh", "tgt_lang": "en", "timeout_ms": 20000})
}

fn fallback_runs(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("runs")).map_or(0, |runs| runs.lines().count())
}

#[tokio::test]
async fn a_full_gpu_sends_jobs_that_allow_it_to_the_cpu_fallback() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config(&coordinator.ws_url(), dir.path())).unwrap();
    // A GPU the agent's own environment names must not reach a job that
    // runs on no GPU.
    let _agent = tokio::process::Command::new(workspace_binary("lingua-agent").unwrap())
        .arg("--config")
        .arg(&path)
        .env("LINGUA_LOG", "error")
        .env("CUDA_VISIBLE_DEVICES", "GPU-inherited")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let fallback_room = |node: &Value| node["capacity"]["fallback_slots"]["asr"].as_u64();
    eventually("the node reports its fallback room", || async {
        let (_, node) = coordinator.get("/v1/nodes/busy-1").await;
        (fallback_room(&node) == Some(1)).then_some(())
    })
    .await;
    let http = reqwest::Client::new();

    // The GPU slot is taken until the gate opens.
    let holder = tokio::spawn({
        let (http, url) = (http.clone(), coordinator.url("/v1/jobs"));
        async move {
            let answer = http.post(url).json(&job("on-gpu")).send().await.unwrap();
            answer.json::<Value>().await.unwrap()
        }
    });
    eventually("the gpu job runs", || async {
        let (_, node) = coordinator.get("/v1/nodes/busy-1").await;
        (node["capacity"]["free_slots"]["asr"] == 0 && node["capacity"]["running"] == 1)
            .then_some(())
    })
    .await;

    let on_cpu = submit(&http, &coordinator, job("on-cpu")).await;
    assert_eq!(on_cpu["status"], "completed", "{on_cpu}");
    assert_eq!(on_cpu["device"], "cpu", "{on_cpu}");
    assert_eq!(
        on_cpu["output"],
        json!({"device": "cpu", "cuda": ""}),
        "the fallback executor ran it, told cpu and shown no GPU"
    );
    assert_eq!(fallback_runs(dir.path()), 1);

    let mut gpu_only = job("gpu-only");
    gpu_only["device"] = json!("gpu");
    gpu_only["timeout_ms"] = json!(1500);
    let refused = submit(&http, &coordinator, gpu_only).await;
    assert_eq!(refused["status"], "failed", "{refused}");
    assert_eq!(refused["error"]["code"], "no_capacity", "{refused}");
    assert_eq!(refused.get("device"), None, "{refused}");
    assert_eq!(
        fallback_runs(dir.path()),
        1,
        "a gpu-only job never runs there"
    );

    std::fs::write(dir.path().join("gate"), "").unwrap();
    let held = holder.await.unwrap();
    assert_eq!(held["device"], "gpu", "{held}");
    assert_eq!(held["output"]["device"], "gpu", "{held}");
    assert_eq!(
        held["output"]["cuda"], "GPU-simulated-0",
        "the GPU job sees its GPU, not the agent's"
    );

    // GPU room again: the next job takes it, not the idle fallback.
    eventually("the gpu slot is free again", || async {
        let (_, node) = coordinator.get("/v1/nodes/busy-1").await;
        (node["capacity"]["free_slots"]["asr"] == 1).then_some(())
    })
    .await;
    let next = submit(&http, &coordinator, job("gpu-again")).await;
    assert_eq!(next["device"], "gpu", "{next}");
    assert_eq!(fallback_runs(dir.path()), 1);

    let bad = http
        .post(coordinator.url("/v1/jobs"))
        .json(&json!({"kind": "asr", "src_lang": "zh", "tgt_lang": "en", "device": "tpu"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let text = bad.text().await.unwrap();
    assert!(text.contains(r#"device must be \"gpu\""#), "{text}");
}
