//! Load on a fleet: jobs submitted in a closed or an open loop, their
//! latencies, and figures read from the coordinator's metrics.

use std::fmt::Write as _;
use std::time::Duration;

use lingua_tests::fleet::CoordinatorProcess;
use lingua_tools::percentile;

use crate::BenchError;

/// Latency percentiles of a sample.
pub struct Percentiles {
    /// Median.
    pub p50: Duration,
    /// 99th.
    pub p99: Duration,
    /// 99.9th.
    pub p999: Duration,
}

impl Percentiles {
    /// Of `sample` (sorted here); zeros when empty.
    pub fn of(sample: &mut [Duration]) -> Self {
        sample.sort_unstable();
        Self {
            p50: percentile(sample, 0.50),
            p99: percentile(sample, 0.99),
            p999: percentile(sample, 0.999),
        }
    }

    /// `p50 / p99 / p99.9` in ms.
    pub fn show(&self) -> String {
        let mut text = String::new();
        let _ = write!(
            text,
            "{} / {} / {} ms",
            ms(self.p50),
            ms(self.p99),
            ms(self.p999)
        );
        text
    }
}

/// A duration in ms with two decimals.
pub fn ms(duration: Duration) -> String {
    format!("{:.2}", duration.as_secs_f64() * 1000.0)
}

/// CPU time over a window as a percentage of one core.
pub fn core_pct(cpu: Duration, window: Duration) -> String {
    format!("{:.1} %", cpu.as_secs_f64() * 100.0 / window.as_secs_f64())
}

/// `lingua_job_assignments_total` from a coordinator's metrics.
pub async fn assignments(
    client: &reqwest::Client,
    coordinator: &CoordinatorProcess,
) -> Result<u64, BenchError> {
    metric(client, coordinator, "lingua_job_assignments_total").await
}

/// A counter from a coordinator's metrics.
pub async fn metric(
    client: &reqwest::Client,
    coordinator: &CoordinatorProcess,
    name: &str,
) -> Result<u64, BenchError> {
    metrics_text(client, coordinator)
        .await?
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("the coordinator's metrics lack {name}"))
}

/// The sum of every series of a family (all label values; 0 when none
/// was recorded yet) from a coordinator's metrics.
pub async fn metric_sum(
    client: &reqwest::Client,
    coordinator: &CoordinatorProcess,
    family: &str,
) -> Result<u64, BenchError> {
    Ok(metrics_text(client, coordinator)
        .await?
        .lines()
        .filter(|line| line.starts_with(family))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

async fn metrics_text(
    client: &reqwest::Client,
    coordinator: &CoordinatorProcess,
) -> Result<String, BenchError> {
    client
        .get(coordinator.url("/metrics"))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())
}

/// Jobs run by a load, their latencies, and where their time went.
#[derive(Default)]
pub struct Load {
    /// Completed.
    pub jobs: u64,
    /// Not completed.
    pub failed: u64,
    /// Of the completed ones.
    pub latencies: Vec<Duration>,
    /// Of the completed ones: the latency and the coordinator's
    /// `Server-Timing` header.
    pub timings: Vec<(Duration, String)>,
}

impl Load {
    /// Counts one job's outcome.
    fn add(&mut self, answered: Option<Answered>) {
        match answered {
            Some(answered) => {
                self.jobs += 1;
                self.latencies.push(answered.latency);
                if let Some(timing) = answered.timing {
                    self.timings.push((answered.latency, timing));
                }
            }
            None => self.failed += 1,
        }
    }

    /// Adds another load's counts.
    fn merge(&mut self, other: Load) {
        self.jobs += other.jobs;
        self.failed += other.failed;
        self.latencies.extend(other.latencies);
        self.timings.extend(other.timings);
    }
}

/// A completed job, as its client saw it.
pub struct Answered {
    /// Submission to answer.
    pub latency: Duration,
    /// The answer's `Server-Timing` header.
    pub timing: Option<String>,
}

/// One job; its latency and timing, or `None` when it did not complete.
pub async fn one_job(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> Option<Answered> {
    let started = tokio::time::Instant::now();
    let response = client.post(url).json(body).send().await.ok()?;
    let ok = response.status().is_success();
    let timing = response
        .headers()
        .get("server-timing")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let answer: serde_json::Value = response.json().await.ok()?;
    (ok && answer["status"] == "completed").then(|| Answered {
        latency: started.elapsed(),
        timing,
    })
}

/// `clients` keep-alive clients submitting `body` one job after another
/// for `window`; client `i` uses `urls[i % urls.len()]`.
pub async fn closed_loop(
    client: &reqwest::Client,
    urls: &[String],
    clients: u32,
    window: Duration,
    body: &serde_json::Value,
) -> Load {
    let end = tokio::time::Instant::now() + window;
    let tasks: Vec<_> = (0..clients as usize)
        .map(|index| {
            let (client, url, body) = (
                client.clone(),
                urls[index % urls.len()].clone(),
                body.clone(),
            );
            tokio::spawn(async move {
                let mut load = Load::default();
                while tokio::time::Instant::now() < end {
                    load.add(one_job(&client, &url, &body).await);
                }
                load
            })
        })
        .collect();
    let mut total = Load::default();
    for task in tasks {
        if let Ok(load) = task.await {
            total.merge(load);
        }
    }
    total
}

/// An HTTP client keeping up to `clients` connections alive.
pub fn http_client(clients: u32) -> Result<reqwest::Client, BenchError> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(clients as usize)
        .build()
        .map_err(|e| format!("http client: {e}"))
}

/// Offers `rate` jobs of `body` per second, each on its own task, whatever
/// the answers take (so a slow answer cannot hide behind a waiting client).
pub async fn open_loop(
    client: &reqwest::Client,
    url: &str,
    rate: f64,
    window: Duration,
    body: &serde_json::Value,
) -> Load {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let started = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    let mut offered = 0u64;
    while started.elapsed() < window {
        ticker.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        while offered < due {
            offered += 1;
            let (client, url, body, tx) =
                (client.clone(), url.to_owned(), body.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = tx.send(one_job(&client, &url, &body).await);
            });
        }
    }
    drop(tx);
    let mut load = Load::default();
    while let Some(answer) = rx.recv().await {
        load.add(answer);
    }
    load
}
