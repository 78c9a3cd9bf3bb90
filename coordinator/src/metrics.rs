//! Prometheus metrics of the coordinator, served at `/metrics`.
//! docs/OPERATIONS.md says what each means and which alerts to set.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label: the outcome of a registration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `ok`, `unauthorized`, `unsupported_version`, `conflict`, `invalid`.
    pub outcome: String,
}

/// Label: a Redis script.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScriptLabel {
    /// The script's file name without `.lua`.
    pub script: String,
}

/// Label: a protocol error code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The `error` frame code sent back.
    pub code: String,
}

/// Label: how a node's result was taken.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `applied`, `duplicate` or `stale`.
    pub outcome: String,
}

/// Label: a job's terminal status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabel {
    /// `completed`, or the error code.
    pub status: String,
}

/// Label: a pool.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    /// The language pair.
    pub pair: String,
    /// The pool id within the pair.
    pub pool: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric the coordinator exports.
pub struct Metrics {
    registry: Registry,
    /// Node sockets held by this instance, registered.
    pub nodes_connected: Gauge,
    /// Connections holding a place under the connection cap.
    pub connections_open: Gauge,
    /// Registrations by outcome.
    pub registrations: Family<OutcomeLabel, Counter>,
    /// Heartbeats received.
    pub heartbeats: Counter,
    /// Frames answered with an `error` frame, by code.
    pub frames_rejected: Family<CodeLabel, Counter>,
    /// Redis script call latency.
    pub script_seconds: HistogramFamily<ScriptLabel>,
    /// Members per pool, refreshed at each scrape.
    pub pool_nodes: Family<PoolLabel, Gauge>,
    /// Jobs dispatched by this instance that reached a terminal state.
    pub jobs: Family<JobLabel, Counter>,
    /// Node results by how they were taken.
    pub results: Family<ResultLabel, Counter>,
    /// Assignments sent to nodes (every attempt).
    pub assignments: Counter,
    /// Assignments forwarded to the instance holding the node's socket.
    pub forwarded: Counter,
}

fn script_histogram() -> Histogram {
    // 50 µs .. ~0.8 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 15))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("lingua");
        let nodes_connected = Gauge::default();
        let connections_open = Gauge::default();
        let registrations = Family::default();
        let heartbeats = Counter::default();
        let frames_rejected = Family::default();
        let script_seconds =
            HistogramFamily::new_with_constructor(script_histogram as fn() -> Histogram);
        let pool_nodes = Family::default();
        let jobs = Family::default();
        let results = Family::default();
        let assignments = Counter::default();
        let forwarded = Counter::default();
        registry.register(
            "jobs",
            "Jobs dispatched here that ended, by status or error code",
            jobs.clone(),
        );
        registry.register(
            "job_results",
            "Node results: applied, duplicate (already ended), stale (superseded attempt) or foreign (assigned to another node: refused)",
            results.clone(),
        );
        registry.register(
            "job_assignments",
            "Assignments sent to nodes (one per attempt)",
            assignments.clone(),
        );
        registry.register(
            "job_assignments_forwarded",
            "Assignments sent through the inbox of the instance holding the node's socket",
            forwarded.clone(),
        );
        registry.register(
            "nodes_connected",
            "Node sockets held by this coordinator instance",
            nodes_connected.clone(),
        );
        registry.register(
            "connections_open",
            "Connections (HTTP and node sockets) holding a place under limits.max_connections",
            connections_open.clone(),
        );
        registry.register(
            "node_registrations",
            "Node registrations by outcome",
            registrations.clone(),
        );
        registry.register("heartbeats", "Heartbeats received", heartbeats.clone());
        registry.register(
            "frames_rejected",
            "Node frames answered with an error frame, by code",
            frames_rejected.clone(),
        );
        registry.register(
            "redis_script_duration_seconds",
            "Latency of Redis script calls",
            script_seconds.clone(),
        );
        registry.register(
            "pool_nodes",
            "Nodes per pool held by this instance (refreshed at each scrape)",
            pool_nodes.clone(),
        );
        Self {
            registry,
            nodes_connected,
            connections_open,
            registrations,
            heartbeats,
            frames_rejected,
            script_seconds,
            pool_nodes,
            jobs,
            results,
            assignments,
            forwarded,
        }
    }
}

impl Metrics {
    /// Records one script call's latency.
    pub fn observe_script(&self, script: &str, elapsed: Duration) {
        self.script_seconds
            .get_or_create(&ScriptLabel {
                script: script.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one registration outcome.
    pub fn registration(&self, outcome: &str) {
        self.registrations
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Counts one rejected frame.
    pub fn frame_rejected(&self, code: &str) {
        self.frames_rejected
            .get_or_create(&CodeLabel {
                code: code.to_owned(),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
