//! `lingua-bench`: measures a real Lingua fleet on this machine and prints
//! the figures docs/BENCHMARKS.md publishes.
//!
//! Everything is real: a private `redis-server`, the `lingua-coordinator`
//! binary as a child process, agents from the agent library (many per
//! process, each a few tokio tasks, with the simulated GPU backend; the
//! footprint scenario runs the `lingua-agent` binary), HTTP clients and
//! WebSockets over loopback. Build first: `cargo build --release
//! --workspace`, then run `target/release/lingua-bench`.
#![forbid(unsafe_code)]

mod busy;
mod coordinators;
mod fleet_scale;
mod footprint;
mod mixed;
mod pick;
mod policy;
mod tails;
mod throughput;

use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use lingua_agent::config::AgentConfig;
use lingua_coordinator::config::default_workers;
use lingua_coordinator::metrics::Metrics;
use lingua_coordinator::private_redis::PrivateRedis;
use lingua_coordinator::store::Store;
use lingua_shared::process::{Exit, LogFormat, init_logging, usage_error};
use lingua_tests::cluster::RedisCluster;
use lingua_tests::fleet::{CoordinatorProcess, RedisCounters, redis_counters};
use lingua_tests::{RedisBackend, TestAgent};
use lingua_tools::percentile;

/// The load generator and its agents share the cores with what they
/// measure; glibc's malloc took about a sixth of their CPU time, and
/// jemalloc (the coordinator's allocator) takes less, leaving the rest
/// to the fleet (docs/BENCHMARKS.md, "The bench's own cost").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Measures a real Lingua fleet on this machine (private Redis, the
/// coordinator binary, simulated agents) and prints a Markdown table of
/// results beside their targets. Build with `cargo build --release
/// --workspace` first: the coordinator and agent binaries must sit next to
/// this one.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Scenarios to run (default: all).
    #[arg(long = "scenario", value_enum)]
    scenarios: Vec<Scenario>,
    /// Seconds each measurement window lasts.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// Fleet sizes for the fleet-scale scenario, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    fleet: Vec<u32>,
    /// Concurrent keep-alive HTTP clients in the throughput scenario.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    clients: u32,
    /// Size of each job's payload in the throughput scenario, in bytes
    /// (about: segments of text, as a translation request has; 0: `{}`).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=262_144))]
    payload_bytes: u32,
    /// Worker threads of the coordinator in the throughput and fleet-scale
    /// scenarios (its `limits.worker_threads`; default: the coordinator's
    /// default for this machine).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    worker_threads: Option<u32>,
    /// The Redis of the throughput and fleet-scale scenarios (only those:
    /// choose them with --scenario): one `redis-server`, or a Redis
    /// Cluster of three masters (formed with `redis-cli`, which must be
    /// installed; Redis figures are summed over the masters).
    #[arg(long, value_enum, default_value_t = RedisKind::One)]
    redis: RedisKind,
}

/// What Redis a scenario runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RedisKind {
    /// One `redis-server`.
    One,
    /// A Redis Cluster of three masters.
    Cluster,
}

impl RedisKind {
    /// How the results table names it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::One => "one Redis",
            Self::Cluster => "a 3-master Redis Cluster",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// No-op jobs through 100 agents, and the Redis-alone ceiling.
    Throughput,
    /// Many connected agents heartbeating; reconnect storm.
    FleetScale,
    /// Cost of one pick at 10 and at 10,000 nodes in a pair.
    Pick,
    /// Capacity-aware versus random choice on uneven nodes at 80 % load.
    Policy,
    /// Three kinds sharing uneven GPUs at 80 % and 120 % load: memory
    /// shared between kinds versus per-kind counts.
    Mixed,
    /// The lingua-agent process idle and under load.
    Footprint,
    /// Throughput with 1, 2 and 3 coordinators on one Redis.
    Coordinators,
    /// 150 % of the GPUs' capacity, with and without a CPU fallback.
    Busy,
}

/// Options every scenario sees.
pub struct Options {
    /// One measurement window.
    pub window: Duration,
    /// Fleet sizes.
    pub fleet: Vec<u32>,
    /// HTTP clients.
    pub clients: u32,
    /// Bytes of payload per job in the throughput scenario (about).
    pub payload_bytes: u32,
    /// `limits.worker_threads` of the throughput and fleet-scale
    /// coordinators, when given.
    pub worker_threads: Option<u32>,
    /// The Redis of the throughput and fleet-scale scenarios.
    pub redis: RedisKind,
}

impl Options {
    /// The config of the throughput and fleet-scale coordinators.
    pub fn coordinator_config(&self) -> String {
        self.worker_threads
            .map(|n| format!("[limits]\nworker_threads = {n}\n"))
            .unwrap_or_default()
    }

    /// The coordinator's worker threads in those scenarios.
    pub fn coordinator_workers(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        self.worker_threads
            .map_or_else(|| default_workers(cores), |n| n as usize)
    }
}

/// One line of the results table.
pub struct Row {
    /// Scenario and figure.
    pub figure: String,
    /// Measured value, formatted.
    pub value: String,
    /// The target, or "".
    pub target: &'static str,
}

impl Row {
    /// A row.
    pub fn new(figure: impl Into<String>, value: impl Into<String>, target: &'static str) -> Self {
        Self {
            figure: figure.into(),
            value: value.into(),
            target,
        }
    }
}

/// Why a scenario could not run.
pub type BenchError = String;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(&err),
    };
    // Thousands of agents: their info lines would bury the table.
    init_logging(LogFormat::Text, "warn");
    let scenarios = if cli.scenarios.is_empty() {
        Scenario::value_variants().to_vec()
    } else {
        cli.scenarios.clone()
    };
    if cli.redis == RedisKind::Cluster
        && let Some(other) = scenarios
            .iter()
            .find(|s| !matches!(s, Scenario::Throughput | Scenario::FleetScale))
            .and_then(ValueEnum::to_possible_value)
    {
        eprintln!(
            "lingua-bench: --redis cluster applies to the throughput and fleet-scale scenarios only, not {} (with no --scenario, every scenario runs): add --scenario throughput, --scenario fleet-scale or both",
            other.get_name()
        );
        return Exit::Usage.into();
    }
    if cli.fleet.iter().any(|&n| n == 0 || n > 20_000) {
        eprintln!("lingua-bench: --fleet sizes must be between 1 and 20000");
        return Exit::Usage.into();
    }
    let options = Options {
        window: Duration::from_secs(cli.seconds),
        fleet: cli.fleet,
        clients: cli.clients,
        payload_bytes: cli.payload_bytes,
        worker_threads: cli.worker_threads,
        redis: cli.redis,
    };
    raise_open_files_limit();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("lingua-bench: cannot start the async runtime: {err}");
            return Exit::Internal.into();
        }
    };
    let mut failed = false;
    println!("| Figure | Measured | Target |\n|---|---|---|");
    for scenario in scenarios {
        let outcome = runtime.block_on(async {
            match scenario {
                Scenario::Throughput => throughput::run(&options).await,
                Scenario::FleetScale => fleet_scale::run(&options).await,
                Scenario::Pick => pick::run(&options).await,
                Scenario::Policy => policy::run(&options).await,
                Scenario::Mixed => mixed::run(&options).await,
                Scenario::Footprint => footprint::run(&options).await,
                Scenario::Coordinators => coordinators::run(&options).await,
                Scenario::Busy => busy::run(&options).await,
            }
        });
        match outcome {
            Ok(rows) => {
                for row in rows {
                    println!("| {} | {} | {} |", row.figure, row.value, row.target);
                }
            }
            Err(err) => {
                eprintln!("lingua-bench: {scenario:?} failed: {err}");
                failed = true;
            }
        }
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    if failed {
        Exit::Unavailable.into()
    } else {
        ExitCode::SUCCESS
    }
}

/// Thousands of sockets need more than the usual 1,024 descriptors; the
/// coordinator child inherits the raised limit.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && let Err(err) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        eprintln!("lingua-bench: cannot raise the open-files limit: {err}");
    }
}

/// Starts a private Redis.
pub async fn private_redis() -> Result<PrivateRedis, BenchError> {
    PrivateRedis::start()
        .await
        .map_err(|e| format!("redis-server: {e}"))
}

/// A private Redis of either kind, running.
pub enum Redis {
    /// One server.
    One(Box<PrivateRedis>),
    /// Three masters.
    Cluster(RedisCluster),
}

impl Redis {
    /// Starts one of `kind`.
    pub async fn start(kind: RedisKind) -> Result<Self, BenchError> {
        Ok(match kind {
            RedisKind::One => Self::One(Box::new(private_redis().await?)),
            RedisKind::Cluster => Self::Cluster(RedisCluster::start().await?),
        })
    }

    /// A store on it, as the bench's own client.
    pub async fn connect_store(&self) -> Result<Store, BenchError> {
        let metrics = Arc::new(Metrics::default());
        match self {
            Self::One(redis) => Store::connect(&redis.url(), metrics).await,
            Self::Cluster(cluster) => Store::connect_cluster(&cluster.seeds(), None, metrics).await,
        }
        .map_err(|e| format!("redis: {e}"))
    }

    /// Reads the counters of every server, summed.
    pub async fn counters(&self) -> Result<RedisCounters, BenchError> {
        let urls = match self {
            Self::One(redis) => vec![redis.url()],
            Self::Cluster(cluster) => cluster.seeds(),
        };
        let mut sum = RedisCounters {
            waited: Some(Duration::ZERO),
            ..RedisCounters::default()
        };
        for url in urls {
            let mut conn = redis::Client::open(url)
                .map_err(|e| format!("redis: {e}"))?
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| format!("redis: {e}"))?;
            let counters = redis_counters(&mut conn)
                .await
                .map_err(|e| format!("redis: {e}"))?;
            sum.commands += counters.commands;
            sum.scripts += counters.scripts;
            sum.cpu += counters.cpu;
            sum.waited = sum.waited.zip(counters.waited).map(|(a, b)| a + b);
        }
        Ok(sum)
    }
}

impl RedisBackend for Redis {
    async fn store(&self, metrics: Arc<Metrics>) -> Store {
        match self {
            Self::One(redis) => redis.store(metrics).await,
            Self::Cluster(cluster) => cluster.store(metrics).await,
        }
    }

    fn coordinator_args(&self) -> Vec<String> {
        match self {
            Self::One(redis) => redis.coordinator_args(),
            Self::Cluster(cluster) => cluster.coordinator_args(),
        }
    }
}

/// A scratch directory.
pub fn scratch() -> Result<tempfile::TempDir, BenchError> {
    tempfile::Builder::new()
        .prefix("lingua-bench-")
        .tempdir()
        .map_err(|e| format!("temporary directory: {e}"))
}

/// A simulated agent's config: one GPU of `memory_mb`, kind `translate`
/// (`vram_mb` each, `max_concurrent` at once, jobs of `duration_ms`, the
/// GPU half busy when every slot is).
pub struct SimAgent<'a> {
    /// Node id.
    pub node_id: &'a str,
    /// Coordinator WebSocket URL.
    pub url: &'a str,
    /// Source and target language.
    pub pair: (&'a str, &'a str),
    /// GPU memory, MiB.
    pub memory_mb: u64,
    /// VRAM per job, MiB.
    pub vram_mb: u64,
    /// Most jobs at once.
    pub max_concurrent: u32,
    /// Job duration.
    pub duration_ms: u64,
    /// GPU poll interval.
    pub poll_ms: u64,
}

impl SimAgent<'_> {
    /// The config.
    pub fn config(&self) -> Result<AgentConfig, BenchError> {
        self.config_with("")
    }

    /// The config, with `tables` (TOML) after the kind's.
    pub fn config_with(&self, tables: &str) -> Result<AgentConfig, BenchError> {
        let text = format!(
            r#"
node_id = "{node_id}"
coordinator_url = "{url}"
[capabilities]
src_langs = ["{src}"]
tgt_langs = ["{tgt}"]
[gpu]
backend = "simulated"
reserve_mb = 1024
poll_interval_ms = {poll}
[gpu.simulated]
count = 1
memory_mb = {memory}
[jobs.translate]
vram_mb = {vram}
max_concurrent = {max}
[jobs.translate.simulated]
duration_ms = {duration}
utilization_pct = {utilization}
{tables}
"#,
            node_id = self.node_id,
            url = self.url,
            src = self.pair.0,
            tgt = self.pair.1,
            poll = self.poll_ms,
            memory = self.memory_mb,
            vram = self.vram_mb,
            max = self.max_concurrent,
            duration = self.duration_ms,
            // A full node at half utilisation: below the pressure threshold,
            // so that only slots and memory limit admission.
            utilization = (50 / self.max_concurrent).max(1),
        );
        AgentConfig::parse(&text).map_err(|e| format!("agent config: {e}"))
    }
}

/// Waits until every agent is connected and has registered at least
/// `times` times, or `limit` passes.
pub async fn all_registered(
    agents: &[TestAgent],
    times: u64,
    limit: Duration,
) -> Result<(), BenchError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let waiting = agents
            .iter()
            .filter(|a| {
                let status = a.handles.status.borrow();
                !(status.connected && status.registrations >= times)
            })
            .count();
        if waiting == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "{waiting} of {} agents not registered after {} s",
                agents.len(),
                limit.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

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

/// Slots of each agent in the no-op fleet.
pub const SLOTS: u32 = 32;

/// `count` agents of [`SLOTS`] slots for no-op jobs, serving zh -> en,
/// registered; agent `i` lists the coordinator `urls` starting with the
/// `i % urls.len()`-th, so they spread evenly over the instances.
pub async fn noop_fleet(urls: &[String], count: usize) -> Result<Vec<TestAgent>, BenchError> {
    let mut agents = Vec::with_capacity(count);
    for index in 0..count {
        let name = format!("noop-{index:03}");
        let mut config = SimAgent {
            node_id: &name,
            url: &urls[0],
            pair: ("zh", "en"),
            memory_mb: 81_920,
            vram_mb: 100,
            max_concurrent: SLOTS,
            duration_ms: 0,
            poll_ms: 500,
        }
        .config()?;
        let mut ordered = urls.to_vec();
        ordered.rotate_left(index % urls.len());
        config.coordinator_urls = ordered;
        agents.push(TestAgent::start(config));
    }
    all_registered(&agents, 1, Duration::from_secs(30)).await?;
    Ok(agents)
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
