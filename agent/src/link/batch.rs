//! What one connection owes the coordinator, gathered so that frames ready
//! together go out in one write: answers to assignments, results, and the
//! capacity report routing needs.
//!
//! - An accept waits up to [`ACCEPT_DELAY`] for its job's result: a job
//!   that ends at once is answered by its result alone (the result tells
//!   the coordinator the node took the job). It goes sooner with any
//!   other frame. Only with coordinators of protocol 3 or later: older
//!   ones count an assignment as answered by its accept alone.
//! - A capacity change waits up to [`CAPACITY_DEBOUNCE`], so that bursts
//!   go out as one report, and rides with any frame sent before then. A
//!   kind going from full to having room (or back), as the coordinator
//!   sees it, is reported at once.

use std::collections::BTreeMap;
use std::time::Duration;

use lingua_shared::protocol::{CapacityReport, JobRef};
use lingua_shared::{JobKind, Message};
use tokio::time::Instant;

use super::capacity;
use crate::arbiter::Arbiter;

/// How long an accept may wait for its job's result to ride with.
pub(super) const ACCEPT_DELAY: Duration = Duration::from_millis(5);
/// How long a capacity change may wait for more changes.
pub(super) const CAPACITY_DEBOUNCE: Duration = Duration::from_millis(10);

/// Frames due on one connection.
#[derive(Default)]
pub(super) struct Batch {
    /// The coordinator takes a result as the answer to its assignment
    /// (protocol 3): accepts are held for their results.
    results_answer: bool,
    /// Accepts not sent yet, and the moment the first must go.
    accepts: Vec<JobRef>,
    accepts_by: Option<Instant>,
    /// Frames to send with the next write.
    frames: Vec<Message>,
    /// Heartbeats and capacity reports, sent after the other frames: a
    /// report counts the jobs whose answers and results precede it, so
    /// it must not overtake them.
    reports: Vec<Message>,
}

impl Batch {
    /// A batch whose accepts wait for their results when `results_answer`
    /// (else they go with the next write).
    pub(super) fn new(results_answer: bool) -> Self {
        Self {
            results_answer,
            ..Self::default()
        }
    }

    /// An accept, held back for a while, but not past `by` (the moment
    /// the coordinator's wait for it ends, less a margin).
    pub(super) fn accept(&mut self, key: JobRef, by: Option<Instant>) {
        let hold = if self.results_answer {
            Instant::now() + ACCEPT_DELAY
        } else {
            Instant::now()
        };
        let until = by.map_or(hold, |by| by.min(hold));
        self.accepts_by = Some(self.accepts_by.map_or(until, |due| due.min(until)));
        self.accepts.push(key);
    }

    /// A frame that goes with the next write; a result answers for its
    /// accept if that is still held.
    pub(super) fn push(&mut self, message: Message) {
        match &message {
            Message::Heartbeat(_) | Message::Capacity(_) => return self.reports.push(message),
            Message::JobResult(result) if self.results_answer => {
                self.accepts
                    .retain(|key| key.job_id != result.job_id || key.attempt != result.attempt);
                if self.accepts.is_empty() {
                    self.accepts_by = None;
                }
            }
            _ => {}
        }
        self.frames.push(message);
    }

    /// When held accepts must go.
    pub(super) fn accepts_by(&self) -> Option<Instant> {
        self.accepts_by
    }

    /// True when held accepts are due, or any frame is ready.
    pub(super) fn due(&self, now: Instant) -> bool {
        !self.frames.is_empty()
            || !self.reports.is_empty()
            || self.accepts_by.is_some_and(|by| by <= now)
    }

    /// The frames of one write, in order: accepts, then results and the
    /// rest, then reports (`report` last).
    pub(super) fn take(&mut self, report: Option<CapacityReport>) -> Vec<Message> {
        self.accepts_by = None;
        let mut frames: Vec<Message> = self.accepts.drain(..).map(Message::JobAccept).collect();
        frames.append(&mut self.frames);
        frames.append(&mut self.reports);
        frames.extend(report.map(Message::Capacity));
        frames
    }
}

/// What the coordinator was last told of this node's room.
pub(super) struct Reported {
    /// Free slots per kind in the last report.
    last_sent: BTreeMap<JobKind, u32>,
    /// Assignments received per kind since the last report: the
    /// coordinator took one off its hint of our free slots for each.
    spent: BTreeMap<JobKind, u32>,
    /// When a change not yet reported must go.
    debounce: Option<Instant>,
}

impl Reported {
    /// The coordinator was last told of `told` free slots (at
    /// registration).
    pub(super) fn new(told: BTreeMap<JobKind, u32>) -> Self {
        Self {
            last_sent: told,
            spent: BTreeMap::new(),
            debounce: None,
        }
    }

    /// When the pending change must be reported.
    pub(super) fn debounce(&self) -> Option<Instant> {
        self.debounce
    }

    /// An assignment arrived: even if our count ends where it was, the
    /// coordinator's hint is now lower, so report soon.
    pub(super) fn assigned(&mut self, kind: &JobKind) {
        *self.spent.entry(kind.clone()).or_default() += 1;
        self.start_debounce();
    }

    /// The arbiter's slots changed: a report now when a kind flipped
    /// between full and having room against the coordinator's hint (our
    /// last report, less what it assigned since), else a report soon.
    pub(super) fn changed(&mut self, arbiter: &Arbiter) -> Option<CapacityReport> {
        let now = arbiter.free_slots();
        let flipped = now.iter().any(|(kind, &free)| {
            let hint = self
                .last_sent
                .get(kind)
                .copied()
                .unwrap_or(0)
                .saturating_sub(self.spent.get(kind).copied().unwrap_or(0));
            (free == 0) != (hint == 0)
        });
        if flipped {
            return Some(self.report(arbiter));
        }
        if now != self.last_sent {
            self.start_debounce();
        }
        None
    }

    /// The report a pending change owes, if any (at its debounce, or to
    /// ride with other frames).
    pub(super) fn pending(&mut self, arbiter: &Arbiter) -> Option<CapacityReport> {
        self.debounce?;
        let owed = arbiter.free_slots() != self.last_sent || !self.spent.is_empty();
        let report = self.report(arbiter);
        owed.then_some(report)
    }

    /// A report, taken as sent (heartbeats carry one too).
    pub(super) fn report(&mut self, arbiter: &Arbiter) -> CapacityReport {
        let report = capacity(arbiter);
        self.last_sent.clone_from(&report.free_slots);
        self.spent.clear();
        self.debounce = None;
        report
    }

    fn start_debounce(&mut self) {
        self.debounce
            .get_or_insert_with(|| Instant::now() + CAPACITY_DEBOUNCE);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use lingua_shared::JobId;
    use lingua_shared::protocol::{JobResult, Outcome};

    use super::*;
    use crate::arbiter::tests::{gpu, kind, limits};

    fn key(id: &str, attempt: u32) -> JobRef {
        JobRef {
            job_id: JobId::new(id).unwrap(),
            attempt,
        }
    }

    fn result(id: &str, attempt: u32) -> Message {
        Message::JobResult(JobResult {
            job_id: JobId::new(id).unwrap(),
            attempt,
            outcome: Outcome::Completed {
                output: lingua_shared::RawJson::of(&serde_json::json!({})),
            },
            duration_ms: 0,
            device: None,
        })
    }

    fn types(frames: &[Message]) -> Vec<&'static str> {
        frames.iter().map(Message::type_name).collect()
    }

    fn arbiter(max_concurrent: u32) -> Arc<Arbiter> {
        let arbiter = Arbiter::new(limits(&[("mt", 100, 50, max_concurrent, 0)]));
        arbiter.update(vec![gpu(0, 0)], Instant::now());
        arbiter
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_is_owed_until_reported_once() {
        let arbiter = arbiter(4);
        let mt = kind("mt");
        let mut reported = Reported::new(arbiter.free_slots());
        assert!(reported.pending(&arbiter).is_none(), "nothing changed");
        reported.assigned(&mt);
        let permit = arbiter.try_admit(&mt).unwrap();
        assert!(
            reported.changed(&arbiter).is_none(),
            "3 of 4 free is no flip"
        );
        assert!(reported.debounce().is_some());
        let report = reported.pending(&arbiter).expect("the change is owed");
        assert_eq!(report.free_slots[&mt], 3);
        assert!(reported.pending(&arbiter).is_none(), "reported once");
        drop(permit);
        assert!(reported.changed(&arbiter).is_none());
        let report = reported.pending(&arbiter).expect("the slot freed is owed");
        assert_eq!(report.free_slots[&mt], 4);
    }

    #[tokio::test(start_paused = true)]
    async fn an_assignment_alone_is_owed_a_report() {
        let arbiter = arbiter(4);
        let mut reported = Reported::new(arbiter.free_slots());
        reported.assigned(&kind("mt"));
        assert!(
            reported.pending(&arbiter).is_some(),
            "the coordinator took a slot off its hint: same count, still owed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn full_is_reported_at_once() {
        let arbiter = arbiter(1);
        let mt = kind("mt");
        let mut reported = Reported::new(arbiter.free_slots());
        let _permit = arbiter.try_admit(&mt).unwrap();
        let report = reported.changed(&arbiter).expect("full is a flip");
        assert_eq!(report.free_slots[&mt], 0);
        assert!(reported.debounce().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn reports_never_overtake_the_results_they_count() {
        let arbiter = arbiter(1);
        let mut batch = Batch::new(true);
        batch.accept(key("a", 1), None);
        batch.push(Message::Capacity(capacity(&arbiter)));
        batch.push(result("a", 1));
        assert_eq!(types(&batch.take(None)), ["job_result", "capacity"]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_accept_is_not_held_past_the_coordinators_wait() {
        let mut batch = Batch::new(true);
        let by = Instant::now() + ACCEPT_DELAY / 5;
        batch.accept(key("a", 1), Some(Instant::now() + ACCEPT_DELAY * 2));
        batch.accept(key("b", 1), Some(by));
        assert_eq!(batch.accepts_by(), Some(by));
        tokio::time::advance(ACCEPT_DELAY / 5).await;
        assert!(batch.due(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn an_older_coordinator_gets_every_accept_at_once() {
        let mut batch = Batch::new(false);
        batch.accept(key("a", 1), None);
        assert!(batch.due(Instant::now()), "not held");
        batch.push(result("a", 1));
        assert_eq!(types(&batch.take(None)), ["job_accept", "job_result"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_result_answers_for_its_held_accept() {
        let mut batch = Batch::new(true);
        batch.accept(key("a", 1), None);
        assert!(!batch.due(Instant::now()), "an accept alone waits");
        batch.push(result("a", 1));
        assert_eq!(batch.accepts_by(), None);
        assert_eq!(types(&batch.take(None)), ["job_result"]);
    }

    #[tokio::test(start_paused = true)]
    async fn held_accepts_go_when_due_or_with_another_frame() {
        let mut batch = Batch::new(true);
        batch.accept(key("a", 1), None);
        batch.accept(key("b", 1), None);
        tokio::time::advance(ACCEPT_DELAY).await;
        assert!(batch.due(Instant::now()));
        batch.push(result("a", 2));
        assert_eq!(
            types(&batch.take(None)),
            ["job_accept", "job_accept", "job_result"],
            "another attempt's result does not answer for this one"
        );
        assert!(!batch.due(Instant::now()));
        assert!(batch.take(None).is_empty());
    }
}
