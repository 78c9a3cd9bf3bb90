//! Fleet scale: 1,000 to 10,000 connected agents heartbeating at the
//! default interval against one coordinator; its CPU and memory, Redis's
//! load; then the coordinator is SIGKILLed and restarted on the same
//! address, and every agent must register again (reconnect storm, the
//! agents' backoff jittered).

use std::time::Duration;

use futures_util::future::join_all;
use lingua_tests::TestAgent;
use lingua_tests::fleet::{CoordinatorProcess, free_local_addr, proc_sample};
use tokio::time::Instant;

use crate::{BenchError, Options, Redis, Row, SimAgent, all_registered, core_pct, scratch};

const LANGUAGES: [&str; 20] = [
    "en", "zh", "ja", "ko", "de", "fr", "es", "it", "pt", "ru", "ar", "hi", "tr", "nl", "pl", "sv",
    "vi", "th", "id", "uk",
];

/// Agent `index` serves one of 380 directed pairs.
fn pair(index: usize) -> (&'static str, &'static str) {
    let src = index % LANGUAGES.len();
    let step = 1 + (index / LANGUAGES.len()) % (LANGUAGES.len() - 1);
    (LANGUAGES[src], LANGUAGES[(src + step) % LANGUAGES.len()])
}

/// Starts agents until there are `size`, each connecting to `url`.
fn grow(agents: &mut Vec<TestAgent>, size: usize, url: &str) -> Result<(), BenchError> {
    while agents.len() < size {
        let name = format!("fleet-{:05}", agents.len());
        let config = SimAgent {
            node_id: &name,
            url,
            pair: pair(agents.len()),
            memory_mb: 24_576,
            vram_mb: 2_000,
            max_concurrent: 8,
            duration_ms: 100,
            poll_ms: 1_000,
        }
        .config()?;
        agents.push(TestAgent::start(config));
    }
    Ok(())
}

/// What `size` idle agents connected cost over the window: the
/// coordinator's CPU and memory, Redis's commands and CPU, the agents'.
async fn idle_rows(
    options: &Options,
    size: u32,
    coordinator: &CoordinatorProcess,
    redis: &Redis,
) -> Result<Vec<Row>, BenchError> {
    let (coordinator_before, bench_before) = (
        proc_sample(coordinator.pid()).map_err(|e| e.to_string())?,
        proc_sample(std::process::id()).map_err(|e| e.to_string())?,
    );
    let redis_before = redis.counters().await?;
    tokio::time::sleep(options.window).await;
    let (coordinator_after, bench_after) = (
        proc_sample(coordinator.pid()).map_err(|e| e.to_string())?,
        proc_sample(std::process::id()).map_err(|e| e.to_string())?,
    );
    let redis_after = redis.counters().await?;
    let seconds = options.window.as_secs_f64();
    Ok(vec![
        Row::new(
            format!(
                "{size} agents connected: coordinator CPU, RSS (worker threads: {}; {})",
                options.coordinator_workers(),
                options.redis.describe()
            ),
            format!(
                "{}, {:.0} MB",
                core_pct(
                    coordinator_after.cpu.saturating_sub(coordinator_before.cpu),
                    options.window
                ),
                coordinator_after.rss_kib as f64 / 1024.0
            ),
            if size == 10_000 {
                "< 15 % of a core, < 300 MB"
            } else {
                ""
            },
        ),
        Row::new(
            format!("{size} agents connected: Redis commands/s, CPU; agents' process CPU"),
            format!(
                "{:.0}/s, {}; {}",
                redis_after.commands.saturating_sub(redis_before.commands) as f64 / seconds,
                core_pct(
                    redis_after.cpu.saturating_sub(redis_before.cpu),
                    options.window
                ),
                core_pct(
                    bench_after.cpu.saturating_sub(bench_before.cpu),
                    options.window
                ),
            ),
            "",
        ),
    ])
}

pub async fn run(options: &Options) -> Result<Vec<Row>, BenchError> {
    let redis = Redis::start(options.redis).await?;
    let dir = scratch()?;
    let addr = free_local_addr();
    let config = options.coordinator_config();
    let mut coordinator = CoordinatorProcess::start(dir.path(), &redis, addr, &config).await?;
    let url = coordinator.ws_url();
    let mut sizes = options.fleet.clone();
    sizes.sort_unstable();
    let mut agents: Vec<TestAgent> = Vec::new();
    let mut rows = Vec::new();
    for size in sizes {
        grow(&mut agents, size as usize, &url)?;
        all_registered(&agents, 1, Duration::from_secs(180)).await?;
        // Let the registrations' own traffic pass: measure the steady state.
        tokio::time::sleep(Duration::from_secs(3)).await;
        rows.extend(idle_rows(options, size, &coordinator, &redis).await?);
    }
    let killed = Instant::now();
    coordinator.kill().await;
    coordinator = CoordinatorProcess::start(dir.path(), &redis, addr, &config).await?;
    let restarted = killed.elapsed();
    all_registered(&agents, 2, Duration::from_secs(180)).await?;
    rows.push(Row::new(
        format!(
            "Reconnect storm: {} agents registered again after SIGKILL + restart",
            agents.len()
        ),
        format!(
            "{:.1} s (coordinator healthy again after {:.1} s)",
            killed.elapsed().as_secs_f64(),
            restarted.as_secs_f64()
        ),
        "< 30 s",
    ));
    join_all(agents.into_iter().map(TestAgent::stop)).await;
    coordinator.kill().await;
    Ok(rows)
}
