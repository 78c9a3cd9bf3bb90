//! Prometheus metrics of the coordinator, served at `/metrics`.
//! docs/OPERATIONS.md says what each means and which alerts to set.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

use lingua_shared::metrics::ProcessCollector;

use crate::recent::{FailedJob, Recent};

mod per_job;
mod series;

use per_job::PerJob;
pub use per_job::STAGES;

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
    pub script: &'static str,
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
    /// `applied`, `duplicate`, `stale` or `foreign`.
    pub outcome: &'static str,
}

/// Label: a job's terminal status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabel {
    /// `completed`, or the error code.
    pub status: &'static str,
}

/// Label: a pool.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    /// The language pair.
    pub pair: String,
    /// The pool id within the pair.
    pub pool: String,
}

/// Label: an admission queue.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    /// The language pair.
    pub pair: String,
    /// The job kind.
    pub kind: String,
}

/// Label: a job kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The kind.
    pub kind: String,
}

/// Label: a stage of a job's dispatch (`start`, `queue`, `pick`,
/// `record`, `accept`, `run`, `answer`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    /// The stage.
    pub stage: &'static str,
}

/// Label: a frame on a node socket.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrameLabel {
    /// `in` (from the node) or `out` (to the node).
    pub direction: &'static str,
    /// The frame's `type`.
    pub r#type: &'static str,
}

/// Which way a frame went on a node socket.
#[derive(Clone, Copy, Debug)]
pub enum Direction {
    /// From the node.
    In,
    /// To the node.
    Out,
}

/// Label: this build's version.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    /// The crate version.
    pub version: String,
}

/// Label: why a job was answered early, or a node refused one.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The reason.
    pub reason: String,
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
    /// Members per pool, refreshed at each scrape.
    pub pool_nodes: Family<PoolLabel, Gauge>,
    /// What every job counts.
    per_job: PerJob,
    /// Assignments sent to nodes (every attempt).
    pub assignments: Counter,
    /// Assignments forwarded to the instance holding the node's socket.
    pub forwarded: Counter,
    /// Jobs with no attempt in flight taken over from another instance.
    pub adopted: Counter,
    /// Jobs waiting in the admission queue, per pair and kind.
    pub queue_depth: Family<QueueLabel, Gauge>,
    /// How long jobs waited in the admission queue before a node had room.
    pub queue_wait: HistogramFamily<QueueLabel>,
    /// Jobs answered early, without a node: `queue_full`, `too_late` (the
    /// queue could not serve them before their deadline), `deadline`.
    pub shed: Family<ReasonLabel, Counter>,
    /// Assignments nodes refused, by the node's reason.
    pub refusals: Family<ReasonLabel, Counter>,
    /// Fleet snapshots built for dashboards and `lingua-ctl top`.
    pub fleet_snapshots: Counter,
    /// Redis Cluster slot maps read (for sending commands straight to
    /// their slot's master).
    pub cluster_slot_maps: Counter,
    /// 1 while Redis answered this instance's last call.
    pub redis_up: Gauge,
    /// Jobs dispatched here, submission to answer, by kind.
    pub job_seconds: HistogramFamily<KindLabel>,
    /// The last minute of jobs, for the fleet view.
    pub recent: Recent,
}

fn wait_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn job_histogram() -> Histogram {
    // 1 ms .. ~70 min: the longest job timeout is an hour.
    Histogram::new(exponential_buckets(0.001, 2.0, 23))
}

fn script_histogram() -> Histogram {
    // 50 µs .. ~0.8 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 15))
}

fn stage_histogram() -> Histogram {
    // 50 µs .. ~52 s: a stage can be a whole job's run.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 21))
}

/// The help text of each metric, as `/metrics` shows it.
mod help {
    pub const NODES_CONNECTED: &str = "Node sockets held by this coordinator instance";
    pub const CONNECTIONS_OPEN: &str =
        "Connections (HTTP and node sockets) holding a place under limits.max_connections";
    pub const REGISTRATIONS: &str = "Node registrations by outcome";
    pub const HEARTBEATS: &str = "Heartbeats received";
    pub const FRAMES_REJECTED: &str = "Node frames answered with an error frame, by code";
    pub const FRAMES: &str = "Frames on node sockets, by direction (in: from the node, once registered; out: to it) and type";
    pub const SCRIPT_SECONDS: &str = "Latency of Redis script calls";
    pub const STAGE_SECONDS: &str = "Where the time of jobs dispatched here went, by stage: start (recording the job, with its first pick), queue (waiting for room), pick (choosing a node for a later attempt), record (recording a failure decided here), accept (assignment to the node's answer), run (accept to result), answer (result to answer)";
    pub const POOL_NODES: &str = "Nodes per pool held by this instance (refreshed at each scrape)";
    pub const JOBS: &str = "Jobs dispatched here that ended, by status or error code";
    pub const RESULTS: &str = "Node results: applied, late (after the job's deadline: recorded as failed, timeout), duplicate (already ended), stale (superseded attempt, or one the coordinator cancelled) or foreign (assigned to another node: refused)";
    pub const ASSIGNMENTS: &str = "Assignments sent to nodes (one per attempt)";
    pub const ADOPTED: &str = "Jobs with no attempt in flight taken over from another coordinator instance (it stopped, or died with them queued) and dispatched by this one";
    pub const FORWARDED: &str =
        "Assignments sent through the inbox of the instance holding the node's socket";
    pub const QUEUE_DEPTH: &str =
        "Jobs waiting in this instance's admission queue, per pair and kind";
    pub const QUEUE_WAIT: &str =
        "Time jobs waited in the admission queue until a node had room, per pair and kind";
    pub const SHED: &str = "Jobs the admission queue turned away: queue_full (max_queued reached: answered queue_full unrecorded, or failed no_capacity once recorded), too_late (the queue could not serve them before their deadline), deadline (it passed while queued); the last two fail no_capacity";
    pub const REFUSALS: &str = "Assignments nodes refused, by the node's reason";
    pub const BUILD_INFO: &str = "Always 1; its label says the coordinator's version";
    pub const REDIS_UP: &str =
        "1 while this instance's last Redis call (at least one a second) succeeded";
    pub const JOB_SECONDS: &str =
        "Jobs dispatched here, submission to answer, by kind (not those no live node served)";
    pub const CLUSTER_SLOT_MAPS: &str = "Redis Cluster slot maps read, for sending script calls straight to their slot's master: on first use, then after MOVED, READONLY or a failed connection to a master";
    pub const FLEET_SNAPSHOTS: &str = "Fleet snapshots built for live views (one per second while any dashboard or lingua-ctl top watches, however many)";
}

impl Default for Metrics {
    fn default() -> Self {
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let r = root.sub_registry_with_prefix("lingua");
        let (redis_up, job_seconds) = health(r);
        Self {
            redis_up,
            job_seconds,
            nodes_connected: register(
                r,
                "nodes_connected",
                help::NODES_CONNECTED,
                Gauge::default(),
            ),
            connections_open: register(
                r,
                "connections_open",
                help::CONNECTIONS_OPEN,
                Gauge::default(),
            ),
            registrations: register(
                r,
                "node_registrations",
                help::REGISTRATIONS,
                Family::default(),
            ),
            heartbeats: register(r, "heartbeats", help::HEARTBEATS, Counter::default()),
            frames_rejected: register(
                r,
                "frames_rejected",
                help::FRAMES_REJECTED,
                Family::default(),
            ),
            per_job: PerJob::new(r),
            pool_nodes: register(r, "pool_nodes", help::POOL_NODES, Family::default()),
            assignments: register(r, "job_assignments", help::ASSIGNMENTS, Counter::default()),
            forwarded: register(
                r,
                "job_assignments_forwarded",
                help::FORWARDED,
                Counter::default(),
            ),
            adopted: register(r, "jobs_adopted", help::ADOPTED, Counter::default()),
            queue_depth: register(r, "queue_depth", help::QUEUE_DEPTH, Family::default()),
            queue_wait: register(
                r,
                "queue_wait_seconds",
                help::QUEUE_WAIT,
                HistogramFamily::new_with_constructor(wait_histogram as fn() -> Histogram),
            ),
            shed: register(r, "jobs_shed", help::SHED, Family::default()),
            refusals: register(r, "job_refusals", help::REFUSALS, Family::default()),
            cluster_slot_maps: register(
                r,
                "redis_cluster_slot_maps",
                help::CLUSTER_SLOT_MAPS,
                Counter::default(),
            ),
            fleet_snapshots: register(
                r,
                "fleet_snapshots",
                help::FLEET_SNAPSHOTS,
                Counter::default(),
            ),
            recent: Recent::default(),
            registry: root,
        }
        .with_known_reasons()
    }
}

impl Metrics {
    /// Every shed reason and node refusal reason starts at 0, so that
    /// their series exist (and `rate()` over them works) before the first.
    fn with_known_reasons(self) -> Self {
        for reason in ["queue_full", "too_late", "deadline"] {
            self.shed
                .get_or_create(&ReasonLabel {
                    reason: reason.to_owned(),
                })
                .inc_by(0);
        }
        let refusals = [
            "no_capacity",
            "draining",
            "unknown_kind",
            "unsupported_pair",
            "duplicate",
        ];
        for reason in refusals {
            self.refusals
                .get_or_create(&ReasonLabel {
                    reason: reason.to_owned(),
                })
                .inc_by(0);
        }
        self
    }
}

/// Registers what says whether this instance is healthy and how long its
/// jobs take: `lingua_build_info{version}` (always 1), `lingua_redis_up`
/// and `lingua_job_duration_seconds{kind}`.
fn health(r: &mut Registry) -> (Gauge, HistogramFamily<KindLabel>) {
    let build: Family<VersionLabel, Gauge> =
        register(r, "build_info", help::BUILD_INFO, Family::default());
    build
        .get_or_create(&VersionLabel {
            version: env!("CARGO_PKG_VERSION").to_owned(),
        })
        .set(1);
    let redis_up = register(r, "redis_up", help::REDIS_UP, Gauge::default());
    let job_seconds = register(
        r,
        "job_duration_seconds",
        help::JOB_SECONDS,
        HistogramFamily::new_with_constructor(job_histogram as fn() -> Histogram),
    );
    (redis_up, job_seconds)
}

/// Registers `metric` under `name` and returns it (a handle to the same
/// values).
fn register<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    /// Records one script call's latency.
    pub fn observe_script(&self, script: &'static str, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        self.per_job
            .script_seconds
            .with(script, |series| series.observe(seconds));
    }

    /// Records how long one job spent in one `stage` of its dispatch.
    pub fn stage(&self, stage: &'static str, took: Duration) {
        let seconds = took.as_secs_f64();
        self.per_job
            .stage_seconds
            .with(stage, |series| series.observe(seconds));
    }

    /// Counts one registration outcome.
    pub fn registration(&self, outcome: &str) {
        self.registrations
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Counts one frame on a node socket.
    pub fn frame(&self, direction: Direction, message_type: &'static str) {
        let (from_nodes, to_nodes) = &self.per_job.frames;
        let frames = match direction {
            Direction::In => from_nodes,
            Direction::Out => to_nodes,
        };
        frames.with(message_type, |series| {
            series.inc();
        });
    }

    /// Counts one rejected frame.
    pub fn frame_rejected(&self, code: &str) {
        self.frames_rejected
            .get_or_create(&CodeLabel {
                code: code.to_owned(),
            })
            .inc();
    }

    /// Counts a job that ended (`status`: `completed` or its error code)
    /// after `latency_ms`, with its failure when it failed; its latency
    /// goes into the histogram of its `kind`, given only for a kind some
    /// node served (any other is only a client's word, and a series for
    /// each would grow `/metrics` without bound).
    pub fn job_ended(
        &self,
        (kind, status): (Option<&str>, &'static str),
        latency_ms: u64,
        failure: Option<FailedJob>,
    ) {
        self.per_job.jobs.with(status, |series| {
            series.inc();
        });
        if let Some(kind) = kind {
            self.job_seconds
                .get_or_create(&KindLabel {
                    kind: kind.to_owned(),
                })
                .observe(latency_ms as f64 / 1000.0);
        }
        self.recent.ended(latency_ms, failure);
    }

    /// Counts a node's result by how it was taken: `outcome` is one of
    /// `applied`, `duplicate`, `stale`, `foreign`.
    pub fn result(&self, outcome: &'static str) {
        self.per_job.results.with(outcome, |series| {
            series.inc();
        });
    }

    /// Counts a job answered early, for `reason`.
    pub fn shed(&self, reason: &str) {
        self.recent.shed(reason);
        self.shed
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts a node's refusal, for `reason`.
    pub fn refused(&self, reason: &str) {
        self.recent.refused(reason);
        self.refusals
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
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
