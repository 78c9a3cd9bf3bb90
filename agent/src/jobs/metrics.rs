//! Job counts, durations and refusals, kept as jobs end and are refused
//! (shared by every scrape of the agent's `/metrics`).

use lingua_shared::JobKind;
use lingua_shared::protocol::Device;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels: a job kind, how its job ended (`completed`, or the failure
/// code), and where it ran (`gpu`, or `cpu`: a fallback executor or a node
/// without GPUs).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    kind: String,
    outcome: String,
    device: String,
}

/// Labels: a job kind and why a job of it was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    kind: String,
    reason: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 5 ms .. ~160 s
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

/// Job counts and durations, kept as jobs end (shared by every scrape).
#[derive(Debug)]
pub struct JobMetrics {
    jobs: Family<OutcomeLabels, Counter>,
    seconds: HistogramFamily<OutcomeLabels>,
    refusals: Family<ReasonLabels, Counter>,
}

impl Default for JobMetrics {
    fn default() -> Self {
        Self {
            jobs: Family::default(),
            seconds: HistogramFamily::new_with_constructor(duration_histogram),
            refusals: Family::default(),
        }
    }
}

impl JobMetrics {
    /// A job of `kind` ran on `device` for `seconds` and ended with
    /// `outcome` (`completed`, or its failure code).
    pub fn ended(&self, kind: &JobKind, (outcome, device): (&str, Device), seconds: f64) {
        let labels = OutcomeLabels {
            kind: kind.to_string(),
            outcome: outcome.to_owned(),
            device: device.name().to_owned(),
        };
        self.jobs.get_or_create(&labels).inc();
        self.seconds.get_or_create(&labels).observe(seconds);
    }

    /// Every refusal reason of every kind in `kinds` starts at 0, so that
    /// their series exist (and `rate()` over them works) before the first.
    pub(crate) fn known_reasons(&self, kinds: impl Iterator<Item = JobKind>) {
        let reasons = [
            "no_capacity",
            "draining",
            "unknown_kind",
            "unsupported_pair",
            "duplicate",
        ];
        for kind in kinds {
            for reason in reasons {
                self.refusals
                    .get_or_create(&ReasonLabels {
                        kind: kind.to_string(),
                        reason: reason.to_owned(),
                    })
                    .inc_by(0);
            }
        }
    }

    /// Registers the job counts, durations and refusals in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "jobs",
            "Jobs run, by kind and outcome (completed, or the failure code)",
            self.jobs.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "Time jobs ran, admission to result, by kind and outcome",
            self.seconds.clone(),
        );
        registry.register(
            "refusals",
            "Jobs refused, by kind and reason",
            self.refusals.clone(),
        );
    }

    /// A job of `kind` was refused for `reason`.
    pub fn refused(&self, kind: &str, reason: &str) {
        self.refusals
            .get_or_create(&ReasonLabels {
                kind: kind.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }
}
