//! The busy policy at 150 % of the GPUs' capacity: the same fleet (10
//! nodes, 4 GPU slots each, 200 ms jobs) under the same open-loop load,
//! jobs due within 1 s, once refusing when the GPUs are full (the
//! coordinator's admission queue holds what it can serve in time) and
//! once with `busy = "fallback"`: a CPU executor per node, 6 at once,
//! twice as slow.

use std::time::Duration;

use lingua_tests::TestAgent;
use lingua_tests::fleet::{CoordinatorProcess, free_local_addr};
use serde_json::json;

use crate::{
    BenchError, Options, Percentiles, Row, SimAgent, all_registered, open_loop, private_redis,
    scratch,
};

const AGENTS: usize = 10;
const GPU_SLOTS: u32 = 4;
const JOB_MS: u64 = 200;
const LOAD: f64 = 1.5;
const DEADLINE_MS: u64 = 1000;
const FALLBACK: &str = "[jobs.translate.fallback]
max_concurrent = 6
[jobs.translate.fallback.simulated]
duration_ms = 400
";

struct Served {
    in_time: u64,
    offered: u64,
    latencies: Vec<Duration>,
}

pub async fn run(options: &Options) -> Result<Vec<Row>, BenchError> {
    let without = measure("", options.window).await?;
    let with = measure(FALLBACK, options.window).await?;
    let share = |s: &Served| s.in_time as f64 * 100.0 / s.offered.max(1) as f64;
    let mut rows = Vec::new();
    for (name, served) in [("refuse", &without), ("fallback", &with)] {
        let mut latencies = served.latencies.clone();
        let pct = Percentiles::of(&mut latencies);
        rows.push(Row::new(
            format!("Busy {name}, {AGENTS} nodes at 150 % of GPU capacity, 1 s deadline"),
            format!(
                "{:.1} % served in time ({} of {}), p99 {} ms",
                share(served),
                served.in_time,
                served.offered,
                crate::ms(pct.p99)
            ),
            "",
        ));
    }
    rows.push(Row::new(
        "Served in time, fallback / refuse",
        format!(
            "{:.2}x",
            share(&with) / share(&without).max(f64::MIN_POSITIVE)
        ),
        "> 1x",
    ));
    Ok(rows)
}

async fn measure(fallback: &str, window: Duration) -> Result<Served, BenchError> {
    let redis = private_redis().await?;
    let dir = scratch()?;
    let coordinator = CoordinatorProcess::start(dir.path(), &redis, free_local_addr(), "").await?;
    let url = coordinator.ws_url();
    let mut agents = Vec::new();
    for index in 0..AGENTS {
        let name = format!("busy-{index:02}");
        let config = SimAgent {
            node_id: &name,
            url: &url,
            pair: ("it", "es"),
            memory_mb: 81_920,
            vram_mb: 100,
            max_concurrent: GPU_SLOTS,
            duration_ms: JOB_MS,
            poll_ms: 100,
        }
        .config_with(fallback)?;
        agents.push(TestAgent::start(config));
    }
    all_registered(&agents, 1, Duration::from_secs(30)).await?;
    let client = reqwest::Client::new();
    let gpu_rate = (AGENTS as u32 * GPU_SLOTS) as f64 * 1000.0 / JOB_MS as f64;
    let body = json!({"kind": "translate", "src_lang": "it", "tgt_lang": "es", "payload": {}, "timeout_ms": DEADLINE_MS});
    let load = open_loop(
        &client,
        &coordinator.url("/v1/jobs"),
        gpu_rate * LOAD,
        window,
        &body,
    )
    .await;
    for agent in agents {
        let _ = agent.stop().await;
    }
    coordinator.kill().await;
    Ok(Served {
        in_time: load.jobs,
        offered: load.jobs + load.failed,
        latencies: load.latencies,
    })
}
