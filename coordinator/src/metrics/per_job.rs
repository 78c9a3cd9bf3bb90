//! The series every job touches, resolved when the metrics are made.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::series::Series;
use super::{
    FrameLabel, HistogramFamily, JobLabel, ResultLabel, ScriptLabel, StageLabel, help, register,
    script_histogram, stage_histogram,
};

/// The stages of a job's dispatch, in order.
pub const STAGES: [&str; 7] = [
    "start", "queue", "pick", "record", "accept", "run", "answer",
];
/// The coordinator's scripts (`lua/`).
const SCRIPTS: [&str; 11] = [
    "register_node",
    "node_heartbeat",
    "node_offline",
    "node_drain",
    "pool_join",
    "pool_leave",
    "route_update",
    "route_pick",
    "job_finish",
    "job_expire",
    "job_adopt",
];
/// The frames a registered node may send; those sent to a node (the
/// registration's answer last: it comes once per connection).
const FRAMES_IN: [&str; 7] = [
    "heartbeat",
    "capacity",
    "drain",
    "error",
    "job_accept",
    "job_reject",
    "job_result",
];
const FRAMES_OUT: [&str; 6] = [
    "job_assign",
    "result_ack",
    "job_cancel",
    "drain",
    "error",
    "register_ack",
];
/// How a node's result was taken.
const RESULT_OUTCOMES: [&str; 5] = ["applied", "late", "duplicate", "stale", "foreign"];

/// The series every job counts, resolved at start.
pub(super) struct PerJob {
    /// Frames on node sockets, by type: from nodes, to nodes.
    pub(super) frames: (Series<FrameLabel, Counter>, Series<FrameLabel, Counter>),
    /// Redis script call latency.
    pub(super) script_seconds: Series<ScriptLabel, Histogram>,
    /// Jobs dispatched by this instance that reached a terminal state.
    pub(super) jobs: Series<JobLabel, Counter>,
    /// Node results by how they were taken.
    pub(super) results: Series<ResultLabel, Counter>,
    /// Where the time of jobs dispatched here went, by stage.
    pub(super) stage_seconds: Series<StageLabel, Histogram>,
}

impl PerJob {
    pub(super) fn new(r: &mut Registry) -> Self {
        let frames = register(r, "node_frames", help::FRAMES, Family::default());
        Self {
            frames: (
                Series::new(
                    frames.clone(),
                    |r#type| FrameLabel {
                        direction: "in",
                        r#type,
                    },
                    &FRAMES_IN,
                ),
                Series::new(
                    frames,
                    |r#type| FrameLabel {
                        direction: "out",
                        r#type,
                    },
                    &FRAMES_OUT,
                ),
            ),
            script_seconds: Series::new(
                register(
                    r,
                    "redis_script_duration_seconds",
                    help::SCRIPT_SECONDS,
                    HistogramFamily::new_with_constructor(script_histogram as fn() -> Histogram),
                ),
                |script| ScriptLabel { script },
                &SCRIPTS,
            ),
            jobs: Series::new(
                register(r, "jobs", help::JOBS, Family::default()),
                |status| JobLabel { status },
                &["completed"],
            ),
            results: Series::new(
                register(r, "job_results", help::RESULTS, Family::default()),
                |outcome| ResultLabel { outcome },
                &RESULT_OUTCOMES,
            ),
            stage_seconds: Series::new(
                register(
                    r,
                    "job_stage_seconds",
                    help::STAGE_SECONDS,
                    HistogramFamily::new_with_constructor(stage_histogram as fn() -> Histogram),
                ),
                |stage| StageLabel { stage },
                &STAGES,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lingua_shared::protocol::Message;

    #[test]
    fn the_known_values_are_the_scripts_and_frame_types_there_are() {
        let lua = concat!(env!("CARGO_MANIFEST_DIR"), "/../lua");
        let mut scripts: Vec<String> = std::fs::read_dir(lua)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter_map(|name| name.strip_suffix(".lua").map(str::to_owned))
            .collect();
        scripts.sort();
        let mut known = SCRIPTS.to_vec();
        known.sort_unstable();
        assert_eq!(scripts, known);
        for frame in FRAMES_IN.iter().chain(&FRAMES_OUT) {
            assert!(Message::TYPES.contains(frame), "{frame}");
        }
    }
}
