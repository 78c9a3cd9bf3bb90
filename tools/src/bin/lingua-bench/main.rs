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
mod fleet;
mod fleet_scale;
mod footprint;
mod load;
mod mixed;
mod pick;
mod policy;
mod tails;
mod throughput;

pub use fleet::{Redis, SLOTS, SimAgent, all_registered, noop_fleet, private_redis, scratch};
pub use load::{
    Answered, Load, Percentiles, assignments, closed_loop, core_pct, http_client, metric,
    metric_sum, ms, one_job, open_loop,
};

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use lingua_coordinator::config::default_workers;
use lingua_shared::process::{Exit, LogFormat, init_logging, usage_error};

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
