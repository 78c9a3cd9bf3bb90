//! Capacity-aware versus random choice: the same uneven fleet (nodes of 2,
//! 4, 8 and 16 slots) under the same open-loop load, 80 % of its slots,
//! once with `[jobs] pick = "capacity"` and once with `"random"` (the
//! earlier system's policy). A refusal is an assignment beyond a job's
//! first: the node said no and the job moved on.

use std::time::Duration;

use lingua_tests::TestAgent;
use lingua_tests::fleet::{CoordinatorProcess, free_local_addr};
use serde_json::json;

use crate::{
    BenchError, Options, Percentiles, Row, SimAgent, all_registered, open_loop, private_redis,
    scratch,
};

const AGENTS: usize = 20;
const SLOTS: [u32; 4] = [2, 4, 8, 16];
const JOB_MS: u64 = 200;
const LOAD: f64 = 0.8;

struct Outcome {
    jobs: u64,
    failed: u64,
    refusals: u64,
    latencies: Vec<Duration>,
}

pub async fn run(options: &Options) -> Result<Vec<Row>, BenchError> {
    let capacity = measure("capacity", options.window).await?;
    let random = measure("random", options.window).await?;
    let per_job = |o: &Outcome| o.refusals as f64 / (o.jobs + o.failed).max(1) as f64;
    let mut rows = Vec::new();
    for (name, outcome) in [("capacity-aware", &capacity), ("random", &random)] {
        let mut latencies = outcome.latencies.clone();
        let pct = Percentiles::of(&mut latencies);
        rows.push(Row::new(
            format!("Choice {name}, {AGENTS} uneven nodes at 80 % load"),
            format!(
                "{:.3} refusals/job, p99 {} ms, {} of {} jobs failed",
                per_job(outcome),
                crate::ms(pct.p99),
                outcome.failed,
                outcome.jobs + outcome.failed
            ),
            "",
        ));
    }
    rows.push(Row::new(
        "Refusals, random / capacity-aware",
        if capacity.refusals == 0 {
            format!("{} / 0 (none with capacity-aware choice)", random.refusals)
        } else {
            format!("{:.1}x", per_job(&random) / per_job(&capacity))
        },
        ">= 5x",
    ));
    Ok(rows)
}

async fn measure(policy: &str, window: Duration) -> Result<Outcome, BenchError> {
    let redis = private_redis().await?;
    let dir = scratch()?;
    let coordinator = CoordinatorProcess::start(
        dir.path(),
        &redis,
        free_local_addr(),
        &format!("[jobs]\npick = \"{policy}\"\n"),
    )
    .await?;
    let url = coordinator.ws_url();
    let mut agents = Vec::new();
    let mut slots = 0;
    for index in 0..AGENTS {
        let name = format!("uneven-{index:02}");
        let max_concurrent = SLOTS[index % SLOTS.len()];
        slots += max_concurrent;
        let config = SimAgent {
            node_id: &name,
            url: &url,
            pair: ("it", "es"),
            memory_mb: 81_920,
            vram_mb: 100,
            max_concurrent,
            duration_ms: JOB_MS,
            poll_ms: 100,
        }
        .config()?;
        agents.push(TestAgent::start(config));
    }
    all_registered(&agents, 1, Duration::from_secs(30)).await?;
    let client = reqwest::Client::new();
    let assignments_before = crate::assignments(&client, &coordinator).await?;
    let rate = f64::from(slots) * LOAD * 1000.0 / JOB_MS as f64;
    let body = json!({"kind": "translate", "src_lang": "it", "tgt_lang": "es", "payload": {}, "timeout_ms": 10000});
    let load = open_loop(&client, &coordinator.url("/v1/jobs"), rate, window, &body).await;
    let mut outcome = Outcome {
        jobs: load.jobs,
        failed: load.failed,
        refusals: 0,
        latencies: load.latencies,
    };
    let sent = crate::assignments(&client, &coordinator).await? - assignments_before;
    outcome.refusals = sent.saturating_sub(outcome.jobs + outcome.failed);
    for agent in agents {
        let _ = agent.stop().await;
    }
    coordinator.kill().await;
    Ok(outcome)
}
