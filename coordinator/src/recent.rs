//! What this instance saw of its jobs in the last minute, for the fleet
//! view (`GET /v1/fleet`, the dashboard): per-second counts of finished,
//! failed, refused and shed jobs, a latency histogram, and the last failed
//! jobs. Each instance publishes its [`Stats`] to Redis every second; the
//! fleet view adds every live instance's up ([`Stats::add`]), so each
//! instance shows the whole fleet.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use lingua_shared::sync::lock;
use serde::{Deserialize, Serialize};

/// The window the counts cover, in seconds.
pub const WINDOW_SECONDS: u64 = 60;
/// The window `jobs_per_second` is measured over, in seconds.
const RATE_SECONDS: u64 = 10;
/// How many failed jobs each instance keeps to show.
pub const RECENT_FAILURES: usize = 20;
/// Upper bounds of the latency buckets, in ms, up to the longest job
/// timeout (an hour); one more bucket counts what is slower than the last.
pub const LATENCY_BOUNDS_MS: [u64; 29] = [
    1, 2, 3, 5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1_000, 1_500, 2_000, 3_000,
    5_000, 10_000, 30_000, 60_000, 120_000, 300_000, 600_000, 1_800_000, 3_600_000,
];
/// The longest error message kept for a failed job, in bytes: a node's
/// error text can be as long as a frame.
const MAX_MESSAGE: usize = 256;

/// A failed job, as the dashboard lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedJob {
    /// The job id.
    pub id: String,
    /// Its language pair.
    pub pair: String,
    /// Its kind.
    pub kind: String,
    /// The error code.
    pub code: String,
    /// The error message.
    pub message: String,
    /// The node of its last attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// When it failed, in ms since the Unix epoch.
    pub at_ms: u64,
}

/// Jobs in the last [`WINDOW_SECONDS`]: one instance's, or the fleet's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Jobs that ended, completed or failed, per second over the last ten
    /// seconds.
    pub jobs_per_second: f64,
    /// Jobs that ended in the window.
    pub finished: u64,
    /// Failed jobs in the window, by error code.
    pub failed: BTreeMap<String, u64>,
    /// Assignments nodes refused in the window, by reason.
    pub refused: BTreeMap<String, u64>,
    /// Jobs answered early in the window, without a node, by reason.
    pub shed: BTreeMap<String, u64>,
    /// Jobs that ended in the window by latency, counts per bucket of
    /// [`LATENCY_BOUNDS_MS`] (and one over the last bound).
    pub latency_buckets: Vec<u64>,
    /// Jobs waiting in admission queues now.
    pub queued: u64,
    /// The last failed jobs, newest first.
    pub recent_failures: Vec<FailedJob>,
}

impl Stats {
    /// Adds `other`'s counts to these (another instance's).
    pub fn add(&mut self, other: Stats) {
        self.jobs_per_second += other.jobs_per_second;
        self.finished += other.finished;
        for (mine, theirs) in [
            (&mut self.failed, other.failed),
            (&mut self.refused, other.refused),
            (&mut self.shed, other.shed),
        ] {
            for (key, count) in theirs {
                *mine.entry(key).or_default() += count;
            }
        }
        if self.latency_buckets.len() < other.latency_buckets.len() {
            self.latency_buckets.resize(other.latency_buckets.len(), 0);
        }
        for (mine, theirs) in self.latency_buckets.iter_mut().zip(other.latency_buckets) {
            *mine += theirs;
        }
        self.queued += other.queued;
        self.recent_failures.extend(other.recent_failures);
        self.recent_failures
            .sort_by(|a, b| b.at_ms.cmp(&a.at_ms).then_with(|| a.id.cmp(&b.id)));
        self.recent_failures.truncate(RECENT_FAILURES);
    }

    /// The latency under which a share `q` (0 to 1) of the window's jobs
    /// ended, as the upper bound of its bucket in ms; `None` without jobs.
    /// Past the last bound it answers the last bound.
    pub fn latency_quantile_ms(&self, q: f64) -> Option<u64> {
        let total: u64 = self.latency_buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, count) in self.latency_buckets.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let last = LATENCY_BOUNDS_MS.len() - 1;
                return Some(LATENCY_BOUNDS_MS[bucket.min(last)]);
            }
        }
        LATENCY_BOUNDS_MS.last().copied()
    }
}

/// One second's counts.
#[derive(Debug, Clone, Default)]
struct Second {
    at: u64,
    finished: u64,
    failed: BTreeMap<String, u64>,
    refused: BTreeMap<String, u64>,
    shed: BTreeMap<String, u64>,
    latency: [u64; LATENCY_BOUNDS_MS.len() + 1],
}

#[derive(Debug, Default)]
struct Inner {
    seconds: VecDeque<Second>,
    failures: VecDeque<FailedJob>,
}

impl Inner {
    /// The counts of second `at` (Unix seconds), dropping those older than
    /// the window.
    fn second(&mut self, at: u64) -> &mut Second {
        while self
            .seconds
            .front()
            .is_some_and(|s| s.at + WINDOW_SECONDS <= at)
        {
            self.seconds.pop_front();
        }
        if self.seconds.back().is_none_or(|s| s.at < at) {
            self.seconds.push_back(Second {
                at,
                ..Second::default()
            });
        }
        // A clock stepping back counts into the newest second.
        self.seconds.back_mut().expect("pushed above")
    }
}

/// This instance's recent jobs (cheap to record: one short lock).
#[derive(Debug, Default)]
pub struct Recent {
    inner: Mutex<Inner>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Recent {
    /// A job ended after `latency_ms`; `failure` when it failed.
    pub fn ended(&self, latency_ms: u64, failure: Option<FailedJob>) {
        self.ended_at(now_ms(), latency_ms, failure);
    }

    fn ended_at(&self, at_ms: u64, latency_ms: u64, failure: Option<FailedJob>) {
        let mut inner = lock(&self.inner);
        let second = inner.second(at_ms / 1000);
        second.finished += 1;
        let bucket = LATENCY_BOUNDS_MS.partition_point(|bound| *bound < latency_ms);
        second.latency[bucket] += 1;
        if let Some(mut failure) = failure {
            *second.failed.entry(failure.code.clone()).or_default() += 1;
            if failure.message.len() > MAX_MESSAGE {
                let cut = (0..=MAX_MESSAGE)
                    .rev()
                    .find(|i| failure.message.is_char_boundary(*i))
                    .unwrap_or(0);
                failure.message.truncate(cut);
                failure.message.push('…');
            }
            inner.failures.push_front(failure);
            inner.failures.truncate(RECENT_FAILURES);
        }
    }

    /// A node refused an assignment for `reason`.
    pub fn refused(&self, reason: &str) {
        self.count_at(now_ms(), reason, |s| &mut s.refused);
    }

    /// A job was answered early for `reason`.
    pub fn shed(&self, reason: &str) {
        self.count_at(now_ms(), reason, |s| &mut s.shed);
    }

    fn count_at(
        &self,
        at_ms: u64,
        reason: &str,
        counts: impl FnOnce(&mut Second) -> &mut BTreeMap<String, u64>,
    ) {
        let mut inner = lock(&self.inner);
        *counts(inner.second(at_ms / 1000))
            .entry(reason.to_owned())
            .or_default() += 1;
    }

    /// The window's counts as of now, with `queued` jobs waiting.
    pub fn stats(&self, queued: u64) -> Stats {
        self.stats_at(now_ms(), queued)
    }

    fn stats_at(&self, at_ms: u64, queued: u64) -> Stats {
        let now = at_ms / 1000;
        let inner = lock(&self.inner);
        let mut stats = Stats {
            latency_buckets: vec![0; LATENCY_BOUNDS_MS.len() + 1],
            queued,
            recent_failures: inner.failures.iter().cloned().collect(),
            ..Stats::default()
        };
        let mut rate_count = 0;
        for second in inner.seconds.iter().filter(|s| s.at + WINDOW_SECONDS > now) {
            stats.finished += second.finished;
            if second.at + RATE_SECONDS > now {
                rate_count += second.finished;
            }
            for (mine, theirs) in [
                (&mut stats.failed, &second.failed),
                (&mut stats.refused, &second.refused),
                (&mut stats.shed, &second.shed),
            ] {
                for (key, count) in theirs {
                    *mine.entry(key.clone()).or_default() += count;
                }
            }
            for (mine, theirs) in stats.latency_buckets.iter_mut().zip(second.latency) {
                *mine += theirs;
            }
        }
        stats.jobs_per_second = rate_count as f64 / RATE_SECONDS as f64;
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(id: &str, code: &str, at_ms: u64) -> FailedJob {
        FailedJob {
            id: id.into(),
            pair: "en-es".into(),
            kind: "translate".into(),
            code: code.into(),
            message: "it failed".into(),
            node_id: Some("n1".into()),
            at_ms,
        }
    }

    #[test]
    fn counts_cover_the_last_minute_and_the_rate_the_last_ten_seconds() {
        let recent = Recent::default();
        let start = 1_000_000_000;
        recent.ended_at(start, 4, None);
        recent.ended_at(start + 55_000, 40, None);
        recent.ended_at(start + 58_000, 40, Some(failure("j", "timeout", 1)));
        recent.count_at(start + 58_500, "full", |s| &mut s.refused);

        let stats = recent.stats_at(start + 59_000, 3);
        assert_eq!(stats.finished, 3);
        assert_eq!(stats.jobs_per_second, 0.2, "two jobs in the last 10 s");
        assert_eq!(stats.failed, BTreeMap::from([("timeout".into(), 1)]));
        assert_eq!(stats.refused, BTreeMap::from([("full".into(), 1)]));
        assert_eq!(stats.queued, 3);
        assert_eq!(stats.recent_failures.len(), 1);

        let later = recent.stats_at(start + 61_000, 0);
        assert_eq!(later.finished, 2, "the first job left the window");
        recent.ended_at(start + 200_000, 4, None);
        let much_later = recent.stats_at(start + 200_000, 0);
        assert_eq!(much_later.finished, 1);
        assert!(much_later.failed.is_empty());
        assert_eq!(
            much_later.recent_failures.len(),
            1,
            "failed jobs stay listed"
        );
    }

    #[test]
    fn long_messages_are_cut_at_a_character() {
        let recent = Recent::default();
        let mut long = failure("j", "executor_failed", 1);
        long.message = "é".repeat(1000);
        recent.ended_at(1_000, 5, Some(long));
        let kept = &recent.stats_at(1_000, 0).recent_failures[0].message;
        assert!(kept.len() <= MAX_MESSAGE + '…'.len_utf8(), "{}", kept.len());
        assert!(kept.ends_with('…'));
    }

    #[test]
    fn quantiles_answer_bucket_bounds() {
        let recent = Recent::default();
        let at = 5_000_000;
        for _ in 0..98 {
            recent.ended_at(at, 8, None);
        }
        recent.ended_at(at, 400, None);
        recent.ended_at(at, 9_999_999, None);
        let stats = recent.stats_at(at, 0);
        assert_eq!(stats.latency_quantile_ms(0.5), Some(10));
        assert_eq!(stats.latency_quantile_ms(0.99), Some(500));
        assert_eq!(stats.latency_quantile_ms(1.0), Some(3_600_000));
        assert_eq!(Stats::default().latency_quantile_ms(0.5), None);
    }

    #[test]
    fn instances_add_up() {
        let a = Recent::default();
        let b = Recent::default();
        a.ended_at(1_000, 8, Some(failure("a", "timeout", 1_000)));
        b.ended_at(2_000, 8, Some(failure("b", "no_capacity", 2_000)));
        b.count_at(2_000, "queue_full", |s| &mut s.shed);
        let mut fleet = a.stats_at(2_000, 1);
        fleet.add(b.stats_at(2_000, 2));
        assert_eq!(fleet.finished, 2);
        assert_eq!(fleet.queued, 3);
        assert_eq!(fleet.failed.values().sum::<u64>(), 2);
        assert_eq!(fleet.shed, BTreeMap::from([("queue_full".into(), 1)]));
        let ids: Vec<_> = fleet.recent_failures.iter().map(|f| &f.id[..]).collect();
        assert_eq!(ids, ["b", "a"], "newest first");
        assert_eq!(fleet.latency_quantile_ms(0.5), Some(10));
    }
}
