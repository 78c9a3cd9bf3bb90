//! Scale-out: the throughput scenario's fleet (100 agents, no-op jobs,
//! keep-alive clients) behind 1, 2 and 3 coordinator processes on one
//! Redis. Agents spread evenly over the instances, clients take the
//! instances in turn, so with N instances about (N-1)/N of the assignments
//! go through another instance's inbox.

use std::time::Duration;

use lingua_tests::fleet::{CoordinatorProcess, free_local_addr, proc_sample};
use serde_json::json;

use crate::{
    BenchError, Options, Percentiles, Row, closed_loop, core_pct, http_client, noop_fleet,
    private_redis, scratch,
};

const AGENTS: usize = 100;

pub async fn run(options: &Options) -> Result<Vec<Row>, BenchError> {
    let mut rows = Vec::new();
    for instances in 1..=3 {
        rows.push(measure(instances, options).await?);
    }
    Ok(rows)
}

async fn measure(instances: usize, options: &Options) -> Result<Row, BenchError> {
    let redis = private_redis().await?;
    let dir = scratch()?;
    let mut coordinators = Vec::new();
    for _ in 0..instances {
        coordinators
            .push(CoordinatorProcess::start(dir.path(), &redis, free_local_addr(), "").await?);
    }
    let ws: Vec<String> = coordinators
        .iter()
        .map(CoordinatorProcess::ws_url)
        .collect();
    let agents = noop_fleet(&ws, AGENTS).await?;
    let client = http_client(options.clients)?;
    let urls: Vec<String> = coordinators.iter().map(|c| c.url("/v1/jobs")).collect();
    let before: Vec<_> = coordinators
        .iter()
        .map(|c| proc_sample(c.pid()).map(|s| s.cpu).unwrap_or_default())
        .collect();
    let body = json!({"kind": "translate", "src_lang": "zh", "tgt_lang": "en", "payload": {}});
    let mut load = closed_loop(&client, &urls, options.clients, options.window, &body).await;
    let cpu: Duration = coordinators
        .iter()
        .zip(before)
        .map(|(c, before)| {
            proc_sample(c.pid())
                .map(|s| s.cpu)
                .unwrap_or_default()
                .saturating_sub(before)
        })
        .sum();
    let mut forwarded = 0;
    let mut assigned = 0;
    for coordinator in &coordinators {
        assigned += crate::assignments(&client, coordinator).await?;
        forwarded += crate::metric(
            &client,
            coordinator,
            "lingua_job_assignments_forwarded_total",
        )
        .await?;
    }
    let jobs = load.jobs;
    let latency = Percentiles::of(&mut load.latencies);
    for agent in agents {
        let _ = agent.stop().await;
    }
    for coordinator in coordinators {
        coordinator.kill().await;
    }
    Ok(Row::new(
        format!(
            "Throughput with {instances} coordinator(s), {AGENTS} agents, {} clients",
            options.clients
        ),
        format!(
            "{:.0} jobs/s, p50 / p99 {} / {} ms, {:.0} % of assignments forwarded, coordinators' CPU {}",
            jobs as f64 / options.window.as_secs_f64(),
            crate::ms(latency.p50),
            crate::ms(latency.p99),
            forwarded as f64 * 100.0 / assigned.max(1) as f64,
            core_pct(cpu, options.window)
        ),
        "",
    ))
}
