//! Agent footprint: the `lingua-agent` binary, idle and then running
//! simulated jobs as fast as its slots allow.

use std::time::Duration;

use lingua_tests::fleet::{CoordinatorProcess, free_local_addr, proc_sample, spawn_agent};
use serde_json::json;
use tokio::time::Instant;

use crate::{BenchError, Options, Percentiles, Row, closed_loop, core_pct, private_redis, scratch};

const SLOTS: u32 = 16;

/// Waits until the agent shows `ready` on the coordinator, for up to
/// 10 s.
async fn ready(
    client: &reqwest::Client,
    coordinator: &CoordinatorProcess,
) -> Result<(), BenchError> {
    let node_url = coordinator.url("/v1/nodes/footprint");
    let ready = Instant::now() + Duration::from_secs(10);
    loop {
        let state = match client.get(&node_url).send().await {
            Ok(response) => response.json::<serde_json::Value>().await.ok(),
            Err(_) => None,
        };
        if state.is_some_and(|s| s["state"] == "ready") {
            return Ok(());
        }
        if Instant::now() >= ready {
            return Err("lingua-agent did not register within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn run(options: &Options) -> Result<Vec<Row>, BenchError> {
    let redis = private_redis().await?;
    let dir = scratch()?;
    let coordinator = CoordinatorProcess::start(dir.path(), &redis, free_local_addr(), "").await?;
    let config = dir.path().join("agent.toml");
    let text = format!(
        r#"
node_id = "footprint"
coordinator_url = "{url}"
[capabilities]
src_langs = ["ja"]
tgt_langs = ["ko"]
[gpu]
backend = "simulated"
[gpu.simulated]
count = 1
memory_mb = 81920
[jobs.translate]
vram_mb = 2000
max_concurrent = {SLOTS}
[jobs.translate.simulated]
duration_ms = 20
utilization_pct = 3
"#,
        url = coordinator.ws_url()
    );
    let mut agent = spawn_agent(&config, &text)?;
    let pid = agent.id().ok_or("lingua-agent exited at once")?;
    let client = reqwest::Client::new();
    ready(&client, &coordinator).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_before = proc_sample(pid).map_err(|e| e.to_string())?;
    tokio::time::sleep(options.window).await;
    let idle_after = proc_sample(pid).map_err(|e| e.to_string())?;

    let jobs_url = [coordinator.url("/v1/jobs")];
    let body = json!({"kind": "translate", "src_lang": "ja", "tgt_lang": "ko", "payload": {}});
    let load_before = proc_sample(pid).map_err(|e| e.to_string())?;
    let mut load = closed_loop(&client, &jobs_url, SLOTS, options.window, &body).await;
    let completed = load.jobs;
    let latency = Percentiles::of(&mut load.latencies);
    let load_after = proc_sample(pid).map_err(|e| e.to_string())?;
    let _ = agent.kill().await;
    coordinator.kill().await;
    Ok(vec![
        Row::new(
            "lingua-agent idle (connected, heartbeating)",
            format!(
                "{}, {:.1} MB RSS",
                core_pct(
                    idle_after.cpu.saturating_sub(idle_before.cpu),
                    options.window
                ),
                idle_after.rss_kib as f64 / 1024.0
            ),
            "nearly free",
        ),
        Row::new(
            format!("lingua-agent under load ({SLOTS} slots of 20 ms jobs)"),
            format!(
                "{}, {:.1} MB RSS, {:.0} jobs/s, latency {}",
                core_pct(
                    load_after.cpu.saturating_sub(load_before.cpu),
                    options.window
                ),
                load_after.rss_kib as f64 / 1024.0,
                completed as f64 / options.window.as_secs_f64(),
                latency.show()
            ),
            "",
        ),
    ])
}
