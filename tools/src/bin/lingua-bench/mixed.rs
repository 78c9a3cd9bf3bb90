//! Kinds that share memory: three kinds (asr 6,000 MiB, translate 3,000,
//! tts 4,000) on uneven simulated GPUs, offered open-loop at 80 % and 120 %
//! of what the fleet's usable VRAM can hold, once with routing hints that
//! share each node's memory between its kinds (the default) and once with
//! per-kind counts only (`[jobs] kinds_share_memory = false`, the earlier
//! model). Each job's timeout is twice its kind's run time: a real-time
//! budget. Per run: node refusals per job, p50/p99 of completed jobs, VRAM
//! in use as a share of usable VRAM (sampled every 100 ms), and jobs
//! answered early without a node (shed: `no_capacity`).

use std::time::Duration;

use lingua_agent::config::AgentConfig;
use lingua_tests::TestAgent;
use lingua_tests::fleet::{CoordinatorProcess, free_local_addr};
use serde_json::{Value, json};

use crate::{BenchError, Percentiles, Row, all_registered, private_redis, scratch};

/// Simulated GPUs per agent, round robin: (count, MiB each).
const GPUS: [(u64, u64); 3] = [(1, 24_576), (2, 49_152), (1, 81_920)];
const AGENTS: usize = 6;
const RESERVE_MB: u64 = 2048;
/// (kind, VRAM MiB, run time ms), offered in equal numbers.
const KINDS: [(&str, u64, u64); 3] = [
    ("asr", 6000, 900),
    ("translate", 3000, 450),
    ("tts", 4000, 700),
];
/// The real-time budget of a job: twice its kind's run time (an answer
/// later than that counts as failed).
const BUDGET: u64 = 2;
/// How often agents read their GPUs: memory a finished job frees is seen
/// at the next reading.
const POLL_MS: u64 = 25;

/// What one run measured.
struct Outcome {
    offered: u64,
    /// Latencies of completed jobs, per kind (in `KINDS` order).
    completed: [Vec<Duration>; 3],
    shed: u64,
    other_failures: u64,
    refusals: u64,
    fill: f64,
}

pub async fn run(options: &crate::Options) -> Result<Vec<Row>, BenchError> {
    let mut rows = Vec::new();
    for load in [0.8, 1.2] {
        for (model, shared) in [("shared memory", true), ("per-kind counts", false)] {
            let outcome = measure(shared, load, options.window).await?;
            rows.push(row(model, load, &outcome));
        }
    }
    Ok(rows)
}

fn row(model: &str, load: f64, outcome: &Outcome) -> Row {
    let mut latencies: Vec<Duration> = outcome.completed.concat();
    let pct = Percentiles::of(&mut latencies);
    // The worst kind's p99 over its run time: under 2 means served jobs
    // answered within twice their run time.
    let worst = KINDS
        .iter()
        .zip(&outcome.completed)
        .map(|((_, _, run_ms), latencies)| {
            let mut latencies = latencies.clone();
            Percentiles::of(&mut latencies).p99.as_secs_f64() * 1000.0 / *run_ms as f64
        })
        .fold(0.0, f64::max);
    let offered = outcome.offered.max(1) as f64;
    let target = match (model, load) {
        ("shared memory", 0.8) => "refusals/job < 0.02",
        ("shared memory", _) => ">= 90 % VRAM; excess shed early; p99 < 2x run time",
        _ => "",
    };
    Row::new(
        format!("Mixed kinds, {model}, {:.0} % load", load * 100.0),
        format!(
            "{:.3} refusals/job, p50 {} ms, p99 {} ms (worst kind's p99 {:.2}x its run time), VRAM {:.0} % of usable, {} shed and {} other failures of {} jobs",
            outcome.refusals as f64 / offered,
            crate::ms(pct.p50),
            crate::ms(pct.p99),
            worst,
            outcome.fill * 100.0,
            outcome.shed,
            outcome.other_failures,
            outcome.offered
        ),
        target,
    )
}

/// The agent config of agent `index`: its GPUs, the three kinds bound by
/// memory alone (no pressure, generous `max_concurrent`).
fn agent_config(index: usize, url: &str) -> Result<AgentConfig, BenchError> {
    let (count, memory) = GPUS[index % GPUS.len()];
    let mut text = format!(
        r#"node_id = "mixed-{index:02}"
coordinator_url = "{url}"
[capabilities]
src_langs = ["zh"]
tgt_langs = ["en"]
[gpu]
backend = "simulated"
reserve_mb = {RESERVE_MB}
poll_interval_ms = {POLL_MS}
[gpu.simulated]
count = {count}
memory_mb = {memory}
"#
    );
    for (kind, vram, run_ms) in KINDS {
        text.push_str(&format!(
            "[jobs.{kind}]\nvram_mb = {vram}\nmax_concurrent = 64\n[jobs.{kind}.simulated]\nduration_ms = {run_ms}\nutilization_pct = 0\n"
        ));
    }
    AgentConfig::parse(&text).map_err(|e| format!("mixed agent config: {e}"))
}

/// Usable VRAM of the whole fleet, MiB.
fn usable_mb() -> u64 {
    (0..AGENTS)
        .map(|index| {
            let (count, memory) = GPUS[index % GPUS.len()];
            count * (memory - RESERVE_MB)
        })
        .sum()
}

/// Jobs per second the fleet's usable VRAM holds, kinds in equal numbers.
fn capacity_per_s() -> f64 {
    let mib_s: f64 = KINDS
        .iter()
        .map(|(_, vram, run_ms)| (*vram * *run_ms) as f64 / 1000.0)
        .sum::<f64>()
        / KINDS.len() as f64;
    usable_mb() as f64 / mib_s
}

async fn measure(shared: bool, load: f64, window: Duration) -> Result<Outcome, BenchError> {
    let redis = private_redis().await?;
    let dir = scratch()?;
    let config = format!("[jobs]\nkinds_share_memory = {shared}\nmax_attempts = 10\n");
    let coordinator =
        CoordinatorProcess::start(dir.path(), &redis, free_local_addr(), &config).await?;
    let url = coordinator.ws_url();
    let agents = (0..AGENTS)
        .map(|index| agent_config(index, &url).map(TestAgent::start))
        .collect::<Result<Vec<_>, _>>()?;
    all_registered(&agents, 1, Duration::from_secs(30)).await?;
    let client = reqwest::Client::new();
    let jobs_url = coordinator.url("/v1/jobs");
    let rate = capacity_per_s() * load;
    let (answers, fill) = tokio::join!(
        offer(&client, &jobs_url, rate, window),
        sample_fill(&agents, window)
    );
    let mut outcome = Outcome {
        offered: answers.len() as u64,
        completed: Default::default(),
        shed: 0,
        other_failures: 0,
        refusals: crate::metric_sum(&client, &coordinator, "lingua_job_refusals_total").await?,
        fill,
    };
    for answer in answers {
        match answer {
            Answer::Completed(kind, latency) => outcome.completed[kind].push(latency),
            Answer::Failed(code) if code == "no_capacity" => outcome.shed += 1,
            Answer::Failed(_) => outcome.other_failures += 1,
        }
    }
    for agent in agents {
        let _ = agent.stop().await;
    }
    coordinator.kill().await;
    Ok(outcome)
}

enum Answer {
    /// Of the kind at this index of `KINDS`, after this long.
    Completed(usize, Duration),
    Failed(String),
}

/// Offers `rate` jobs per second for `window`, kinds in turn, each on its
/// own task whatever the answers take; every answer.
async fn offer(client: &reqwest::Client, url: &str, rate: f64, window: Duration) -> Vec<Answer> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let started = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    let mut offered = 0usize;
    while started.elapsed() < window {
        ticker.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate) as usize;
        while offered < due {
            let index = offered % KINDS.len();
            let (kind, _, run_ms) = KINDS[index];
            offered += 1;
            let body = json!({"kind": kind, "src_lang": "zh", "tgt_lang": "en", "timeout_ms": BUDGET * run_ms});
            let (client, url, tx) = (client.clone(), url.to_owned(), tx.clone());
            tokio::spawn(async move {
                let _ = tx.send(one(&client, &url, &body, index).await);
            });
        }
    }
    drop(tx);
    let mut answers = Vec::with_capacity(offered);
    while let Some(answer) = rx.recv().await {
        answers.push(answer);
    }
    answers
}

async fn one(client: &reqwest::Client, url: &str, body: &Value, kind: usize) -> Answer {
    let started = tokio::time::Instant::now();
    let Ok(response) = client.post(url).json(body).send().await else {
        return Answer::Failed("unreachable".into());
    };
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    if answer["status"] == "completed" {
        Answer::Completed(kind, started.elapsed())
    } else {
        let code = answer["error"]["code"].as_str().unwrap_or("unknown");
        Answer::Failed(code.to_owned())
    }
}

/// VRAM in use over the fleet's usable VRAM, averaged over samples every
/// 100 ms in the second half of `window` (once the load has built up).
async fn sample_fill(agents: &[TestAgent], window: Duration) -> f64 {
    tokio::time::sleep(window / 2).await;
    let end = tokio::time::Instant::now() + window / 2;
    let mut samples = Vec::new();
    while tokio::time::Instant::now() < end {
        let used: u64 = agents
            .iter()
            .flat_map(|agent| agent.handles.arbiter.gpus())
            .map(|gpu| gpu.memory_used_mb)
            .sum();
        samples.push(used as f64 / usable_mb() as f64);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    samples.iter().sum::<f64>() / samples.len().max(1) as f64
}
