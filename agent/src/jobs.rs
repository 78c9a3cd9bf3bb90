//! Jobs on this node: admission of each `job_assign`, the run itself under
//! a watchdog, cancellation, and the hand-over of results to the outbox.
//!
//! Each assignment is answered with `job_accept` or `job_reject`: at once,
//! or for a kind with `busy = "wait"` once a slot frees, or once the job
//! could no longer finish by its deadline (its kind's usual run time
//! before it) or the coordinator would stop waiting for the answer. A
//! kind with `busy = "fallback"` whose job finds no GPU room runs it on
//! the fallback executor, without a GPU, when the job allows it
//! (`device: "any"`). An admitted job holds its arbiter permit for exactly
//! as long as it runs, and its deadline is the assignment's `timeout_ms`
//! from when it arrived. A job whose processes hold more GPU memory than
//! its kind's `vram_mb` is logged (the arbiter counts it) and, with
//! `on_vram_overrun = "kill"`, stopped and failed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use lingua_shared::protocol::{
    Device, DeviceChoice, FailureCode, JobAssign, JobRef, JobReject, JobResult, Outcome,
    RejectReason,
};
use lingua_shared::{JobKind, LangPair, sync};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

mod metrics;

pub use metrics::JobMetrics;

use crate::arbiter::{Arbiter, Overrun, Permit, Refusal};
use crate::config::OverrunAction;
use crate::executor::Executor;

/// How many finished attempts are remembered to refuse duplicates.
const REMEMBERED_ATTEMPTS: usize = 4096;
/// The most of the coordinator's answer window a waiting job leaves for
/// its answer's trip back (a tenth of the window when that is less).
const ANSWER_MARGIN: Duration = Duration::from_millis(100);
/// Weight of the newest run in a kind's usual run time (1/8).
const RUN_TIME_WEIGHT: u32 = 8;

/// How a kind's jobs run: on a GPU (or on a node without GPUs), and on no
/// GPU when `busy = "fallback"` and no GPU has room.
#[derive(Debug, Clone)]
pub struct Executors {
    /// The kind's executor.
    pub primary: Arc<Executor>,
    /// Its `[jobs.<kind>.fallback]` executor.
    pub fallback: Option<Arc<Executor>>,
}

/// What jobs send towards the coordinator: answers now, results later.
#[derive(Debug)]
pub enum Outgoing {
    /// `job_accept`: sent if connected, dropped otherwise (the
    /// coordinator re-assigns an unanswered attempt); it must go by the
    /// moment given, when the coordinator set one.
    Accept(JobRef, Option<Instant>),
    /// `job_reject`: the same.
    Reject(JobReject),
    /// A finished attempt: kept in the outbox until acknowledged.
    Result(JobResult),
}

#[derive(Debug, Default)]
struct Attempts {
    running: HashMap<JobRef, CancellationToken>,
    finished: HashSet<JobRef>,
    finished_order: VecDeque<JobRef>,
}

/// The jobs of this node.
pub struct Jobs {
    arbiter: Arc<Arbiter>,
    executors: RwLock<HashMap<JobKind, Executors>>,
    /// Each kind's usual run time on its primary executor (a moving
    /// average), which a waiting job must still have before its deadline.
    run_times: Mutex<HashMap<JobKind, Duration>>,
    pairs: Vec<LangPair>,
    attempts: Mutex<Attempts>,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    metrics: Arc<JobMetrics>,
    tasks: TaskTracker,
    /// Results sent to the link so far.
    results: AtomicU64,
}

impl Jobs {
    /// Jobs admitted by `arbiter`, run by `executors`, for `pairs`; their
    /// answers go to `outgoing`, their counts to `metrics`.
    pub fn new(
        arbiter: Arc<Arbiter>,
        executors: HashMap<JobKind, Executors>,
        pairs: Vec<LangPair>,
        (outgoing, metrics): (mpsc::UnboundedSender<Outgoing>, Arc<JobMetrics>),
    ) -> Arc<Self> {
        Arc::new(Self {
            arbiter,
            executors: RwLock::new(executors),
            run_times: Mutex::default(),
            pairs,
            attempts: Mutex::default(),
            outgoing,
            metrics,
            tasks: TaskTracker::new(),
            results: AtomicU64::new(0),
        })
    }

    /// Replaces the executors (SIGHUP). Running jobs finish on the old ones.
    pub fn set_executors(&self, executors: HashMap<JobKind, Executors>) {
        *sync::write(&self.executors) = executors;
    }

    fn attempts(&self) -> std::sync::MutexGuard<'_, Attempts> {
        // Single map operations only: a poisoned lock holds consistent data.
        sync::lock(&self.attempts)
    }

    /// Handles one assignment: answers it and, when admitted, runs it in
    /// the background. The attempt is known (to [`Jobs::cancel`]) before
    /// the next frame is read.
    pub fn assign(self: &Arc<Self>, job: JobAssign) {
        let received = Instant::now();
        let key = JobRef {
            job_id: job.job_id.clone(),
            attempt: job.attempt,
        };
        if !self.pairs.contains(&job.pair) {
            return self.reject(
                &job,
                RejectReason::UnsupportedPair,
                format!("this node does not serve {}", job.pair),
            );
        }
        let executors = sync::read(&self.executors).get(&job.kind).cloned();
        let Some(executors) = executors else {
            return self.reject(
                &job,
                RejectReason::UnknownKind,
                format!("this node does not run {} jobs", job.kind),
            );
        };
        let cancel = CancellationToken::new();
        {
            let mut attempts = self.attempts();
            if attempts.running.contains_key(&key) || attempts.finished.contains(&key) {
                drop(attempts);
                return self.reject(
                    &job,
                    RejectReason::Duplicate,
                    "this attempt already ran here".into(),
                );
            }
            attempts.running.insert(key.clone(), cancel.clone());
        }
        let this = Arc::clone(self);
        // Every line logged for the job carries its id and attempt (the
        // coordinator's lines carry the same, to follow a job across both).
        let span = tracing::info_span!("job", job_id = %job.job_id, attempt = job.attempt);
        self.tasks.spawn(
            async move {
                this.admit_and_run(job, (key, cancel), (executors, received))
                    .await;
            }
            .instrument(span),
        );
    }

    fn reject(&self, job: &JobAssign, reason: RejectReason, message: String) {
        tracing::debug!(job_id = %job.job_id, attempt = job.attempt, ?reason, %message, "job refused");
        let name = serde_json::to_value(reason).ok();
        let name = name
            .as_ref()
            .and_then(serde_json::Value::as_str)
            .unwrap_or("other");
        // A kind this node does not run is the coordinator's word: counted
        // as `other`, or each new name would make a series for good.
        let runs = sync::read(&self.executors).contains_key(&job.kind);
        let kind = if runs { job.kind.as_str() } else { "other" };
        self.metrics.refused(kind, name);
        let _ = self.outgoing.send(Outgoing::Reject(JobReject {
            job_id: job.job_id.clone(),
            attempt: job.attempt,
            reason,
            message,
        }));
    }

    /// The last moment a job received at `received` may wait for a slot:
    /// while it can still run its kind's usual time before its deadline,
    /// and answer before the coordinator stops waiting for the answer.
    fn wait_until(&self, job: &JobAssign, received: Instant) -> Instant {
        let run = sync::lock(&self.run_times)
            .get(&job.kind)
            .copied()
            .unwrap_or_default();
        let deadline = later(received, job.timeout_ms);
        let until = deadline.checked_sub(run).unwrap_or(received);
        answer_by(job, received).map_or(until, |by| until.min(by))
    }

    /// A slot for `job`: on a GPU (waiting up to `until` for a kind with
    /// `busy = "wait"`), else on its kind's fallback executor when it has
    /// one and the job allows it.
    async fn admit(
        &self,
        job: &JobAssign,
        until: Instant,
        fallback: bool,
    ) -> Result<Permit, Refusal> {
        match self.arbiter.admit(&job.kind, until).await {
            Ok(permit) => Ok(permit),
            Err(refusal @ (Refusal::UnknownKind(_) | Refusal::Draining)) => Err(refusal),
            Err(_) if fallback && job.device == DeviceChoice::Any => {
                self.arbiter.try_fallback(&job.kind)
            }
            Err(refusal) => Err(refusal),
        }
    }

    /// Counts a run of `kind` on its primary executor in its usual time.
    fn ran(&self, kind: &JobKind, took: Duration) {
        let mut run_times = sync::lock(&self.run_times);
        let usual = run_times.entry(kind.clone()).or_insert(took);
        *usual = (*usual * (RUN_TIME_WEIGHT - 1) + took) / RUN_TIME_WEIGHT;
    }

    /// Admits and runs an attempt [`Jobs::assign`] registered as `key`,
    /// stopped by `cancel`.
    async fn admit_and_run(
        self: Arc<Self>,
        job: JobAssign,
        (key, cancel): (JobRef, CancellationToken),
        (executors, received): (Executors, Instant),
    ) {
        let Some(permit) = self
            .admitted(&job, (&key, &cancel), (&executors, received))
            .await
        else {
            return;
        };
        let _ = self
            .outgoing
            .send(Outgoing::Accept(key.clone(), answer_by(&job, received)));
        let started = Instant::now();
        let on_fallback = permit.is_fallback();
        let (executor, device) = match &executors.fallback {
            Some(fallback) if on_fallback => (fallback, Device::Cpu),
            _ if permit.placement().is_some() => (&executors.primary, Device::Gpu),
            _ => (&executors.primary, Device::Cpu),
        };
        let deadline = later(received, job.timeout_ms);
        let outcome = watched(&job, (executor, device), &permit, (&cancel, deadline)).await;
        drop(permit);
        self.ended(key);
        let ran = started.elapsed();
        if matches!(outcome, Outcome::Completed { .. }) && !on_fallback {
            self.ran(&job.kind, ran);
        }
        let ended = match &outcome {
            Outcome::Completed { .. } => "completed".to_owned(),
            Outcome::Failed { code, .. } => serde_json::to_value(code)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| "other".into()),
        };
        self.metrics
            .ended(&job.kind, (&ended, device), ran.as_secs_f64());
        self.results.fetch_add(1, Ordering::SeqCst);
        let _ = self.outgoing.send(Outgoing::Result(JobResult {
            job_id: job.job_id,
            attempt: job.attempt,
            outcome,
            duration_ms: u64::try_from(ran.as_millis()).unwrap_or(u64::MAX),
            device: Some(device),
        }));
    }

    /// A slot for attempt `key` of `job`, or none: cancelled while it
    /// waited (a cancel, the coordinator giving up on the attempt, ends
    /// the wait: the job leaves the arbiter's queue and any room held for
    /// it), or refused, which the coordinator is told.
    async fn admitted(
        &self,
        job: &JobAssign,
        (key, cancel): (&JobRef, &CancellationToken),
        (executors, received): (&Executors, Instant),
    ) -> Option<Permit> {
        let until = self.wait_until(job, received);
        let admitted = tokio::select! {
            biased;
            () = cancel.cancelled() => None,
            admitted = self.admit(job, until, executors.fallback.is_some()) => Some(admitted),
        };
        let refusal = match admitted {
            Some(Ok(permit)) => return Some(permit),
            None => None,
            Some(Err(refusal)) => Some(refusal),
        };
        self.attempts().running.remove(key);
        let Some(refusal) = refusal else {
            tracing::debug!(job_id = %job.job_id, attempt = job.attempt, "cancelled while waiting for a slot");
            return None;
        };
        let reason = match refusal {
            Refusal::UnknownKind(_) => RejectReason::UnknownKind,
            Refusal::Draining => RejectReason::Draining,
            Refusal::Concurrency { .. }
            | Refusal::Pressure { .. }
            | Refusal::Memory { .. }
            | Refusal::Unavailable(_)
            | Refusal::Stale { .. }
            | Refusal::Fallback { .. } => RejectReason::NoCapacity,
        };
        self.reject(job, reason, refusal.to_string());
        None
    }

    /// Attempt `key` ended: it is remembered as run (a repeated
    /// assignment of it is refused) among the last ones.
    fn ended(&self, key: JobRef) {
        let mut attempts = self.attempts();
        attempts.running.remove(&key);
        attempts.finished.insert(key.clone());
        attempts.finished_order.push_back(key);
        while attempts.finished_order.len() > REMEMBERED_ATTEMPTS {
            if let Some(old) = attempts.finished_order.pop_front() {
                attempts.finished.remove(&old);
            }
        }
    }

    /// Results reported to the link so far: a drain is over once the link
    /// has taken each of them ([`crate::link::LinkStatus::results_taken`])
    /// and the coordinator acknowledged it.
    pub fn results_reported(&self) -> u64 {
        self.results.load(Ordering::SeqCst)
    }

    /// Waits until every job task has ended (after draining).
    pub async fn wait_idle(&self) {
        self.tasks.close();
        self.tasks.wait().await;
        self.tasks.reopen();
    }

    /// Stops a running attempt; its slot frees and a `cancelled` result is
    /// reported. Unknown attempts are ignored.
    pub fn cancel(&self, job: &JobRef) {
        if let Some(token) = self.attempts().running.get(job) {
            token.cancel();
        }
    }
}

/// The run of `job` by `executor` on `permit`'s room, watched: stopped by
/// `cancel` or at `deadline` (the watchdog), and told (once) when its
/// processes hold more GPU memory than its kind declares.
async fn watched(
    job: &JobAssign,
    (executor, device): (&Executor, Device),
    permit: &Permit,
    (cancel, deadline): (&CancellationToken, Instant),
) -> Outcome {
    let on_spawn = |group| permit.watch_process_group(group);
    let run = executor.run(job, (permit.placement(), device), &on_spawn);
    let overrun = permit.overrun();
    tokio::pin!(run, overrun);
    let mut overrun_told = false;
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break Outcome::Failed { code: FailureCode::Cancelled, message: "cancelled by the coordinator".into() },
            outcome = &mut run => break outcome,
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(job_id = %job.job_id, attempt = job.attempt, timeout_ms = job.timeout_ms, "watchdog: job overran its deadline and was stopped");
                break Outcome::Failed { code: FailureCode::Timeout, message: format!("the job was not done {} ms after it arrived, its deadline, and was stopped", job.timeout_ms) };
            }
            overrun = &mut overrun, if !overrun_told => {
                overrun_told = true;
                if let Some(failed) = vram_overrun(job, overrun) {
                    break failed;
                }
            }
        }
    }
}

/// `ms` after `at`, or (for a figure beyond the clock's reach) a year
/// after it: what a peer sends never overflows the clock.
fn later(at: Instant, ms: u64) -> Instant {
    at.checked_add(Duration::from_millis(ms))
        .unwrap_or_else(|| at + Duration::from_secs(365 * 24 * 3600))
}

/// Reports a job whose processes hold more GPU memory than its kind
/// declares; with `on_vram_overrun = "kill"`, the failure that stops it
/// (dropping the run kills its process group).
fn vram_overrun(job: &JobAssign, overrun: Overrun) -> Option<Outcome> {
    tracing::warn!(
        job_id = %job.job_id,
        attempt = job.attempt,
        kind = %job.kind,
        declared_mb = overrun.declared_mb,
        used_mb = overrun.used_mb,
        action = overrun.action.name(),
        "job holds more gpu memory than its kind's vram_mb: raise vram_mb, or the job crowds out others"
    );
    (overrun.action == OverrunAction::Kill).then(|| Outcome::Failed {
        code: FailureCode::ExecutorFailed,
        message: format!(
            "the job's processes held {} MiB of GPU memory, over the {} MiB its kind declares (vram_mb); killed because on_vram_overrun = \"kill\"",
            overrun.used_mb, overrun.declared_mb
        ),
    })
}

/// The last moment the answer to `job`, received at `received`, may go:
/// the coordinator's window, less a margin for the way back.
fn answer_by(job: &JobAssign, received: Instant) -> Option<Instant> {
    job.answer_within_ms.map(|ms| {
        let margin = (Duration::from_millis(ms) / 10).min(ANSWER_MARGIN);
        later(received, ms).checked_sub(margin).unwrap_or(received)
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use lingua_shared::JobId;
    use serde_json::json;

    use super::*;
    use crate::arbiter::{KindLimits, Limits};
    use crate::config::Pressure;
    use crate::gpu::GpuSnapshot;

    fn kind() -> JobKind {
        JobKind::new("mt").unwrap()
    }

    fn setup(
        max: u32,
        duration_ms: u64,
        wait_ms: u64,
    ) -> (Arc<Jobs>, Arc<Arbiter>, mpsc::UnboundedReceiver<Outgoing>) {
        setup_busy(max, duration_ms, Duration::from_millis(wait_ms), None)
    }

    /// Jobs of one kind on one GPU, at most `max` at once there (and each
    /// taking `duration_ms`), with a `wait`, and a `fallback` executor of
    /// (most at once, duration in ms).
    fn setup_busy(
        max: u32,
        duration_ms: u64,
        wait: Duration,
        fallback: Option<(u32, u64)>,
    ) -> (Arc<Jobs>, Arc<Arbiter>, mpsc::UnboundedReceiver<Outgoing>) {
        let arbiter = Arbiter::new(Limits {
            uses_gpus: true,
            reserve_mb: 0,
            pressure: Pressure {
                enter_pct: 90,
                exit_pct: 80,
                min_priority: 0,
            },
            settle: Duration::ZERO,
            stale_after: Duration::from_secs(3600),
            kinds: BTreeMap::from([(
                kind(),
                KindLimits {
                    vram_mb: 1000,
                    priority: 50,
                    max_concurrent: max,
                    queue_wait: wait,
                    fallback: fallback.map(|(most, _)| most),
                    load_time: Duration::ZERO,
                    on_overrun: OverrunAction::Warn,
                },
            )]),
        });
        arbiter.update(
            vec![GpuSnapshot {
                index: 0,
                uuid: "GPU-0".into(),
                name: "test".into(),
                memory_total_mb: 100_000,
                memory_used_mb: 0,
                utilization_pct: Some(0),
                temperature_c: None,
                healthy: true,
                reason: None,
                parent_uuid: None,
                processes: None,
            }],
            Instant::now(),
        );
        let simulated = |ms| {
            Arc::new(Executor::Simulated {
                duration: Duration::from_millis(ms),
                actual_vram_mb: 0,
                utilization_pct: 0,
                gpus: None,
            })
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let jobs = Jobs::new(
            arbiter.clone(),
            HashMap::from([(
                kind(),
                Executors {
                    primary: simulated(duration_ms),
                    fallback: fallback.map(|(_, ms)| simulated(ms)),
                },
            )]),
            vec!["zh:en".parse().unwrap()],
            (tx, Arc::default()),
        );
        (jobs, arbiter, rx)
    }

    fn assign(id: &str, timeout_ms: u64) -> JobAssign {
        JobAssign {
            job_id: JobId::new(id).unwrap(),
            attempt: 1,
            kind: kind(),
            pair: "zh:en".parse().unwrap(),
            session_id: None,
            payload: lingua_shared::RawJson::of(&json!({})),
            timeout_ms,
            device: DeviceChoice::Any,
            answer_within_ms: None,
        }
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<Outgoing>) -> Outgoing {
        rx.recv().await.expect("an answer or result")
    }

    #[tokio::test(start_paused = true)]
    async fn accepted_jobs_run_and_report_then_free_their_slot() {
        let (jobs, arbiter, mut rx) = setup(1, 100, 0);
        jobs.assign(assign("a", 1000));
        assert!(matches!(next(&mut rx).await, Outgoing::Accept(..)));
        assert_eq!(arbiter.free_slots()[&kind()], 0);
        jobs.assign(assign("b", 1000));
        let Outgoing::Reject(reject) = next(&mut rx).await else {
            panic!("full")
        };
        assert_eq!(reject.reason, RejectReason::NoCapacity);
        let Outgoing::Result(result) = next(&mut rx).await else {
            panic!("result")
        };
        assert!(matches!(result.outcome, Outcome::Completed { .. }));
        assert_eq!(result.duration_ms, 100);
        assert_eq!(arbiter.free_slots()[&kind()], 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_ends_a_wait_for_a_slot_and_runs_nothing() {
        let (jobs, arbiter, mut rx) = setup(1, 1000, 60_000);
        jobs.assign(assign("running", 5000));
        assert!(matches!(next(&mut rx).await, Outgoing::Accept(..)));
        jobs.assign(assign("waiting", 5000));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(arbiter.waiting()[&kind()], 1, "it waits for the slot");
        jobs.cancel(&JobRef {
            job_id: JobId::new("waiting").unwrap(),
            attempt: 1,
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(arbiter.waiting()[&kind()], 0, "it left the queue");
        let Outgoing::Result(result) = next(&mut rx).await else {
            panic!("the running job's result")
        };
        assert_eq!(result.job_id.as_str(), "running");
        // Paused time: well past when the cancelled job would have ended.
        tokio::time::advance(Duration::from_secs(2)).await;
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err(), "the cancelled job never ran");
        assert_eq!(arbiter.running(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_read_right_behind_its_assignment_runs_nothing() {
        let (jobs, arbiter, mut rx) = setup(1, 1000, 0);
        // One frame after the other, before the job's task has run.
        jobs.assign(assign("cancelled", 5000));
        jobs.cancel(&JobRef {
            job_id: JobId::new("cancelled").unwrap(),
            attempt: 1,
        });
        jobs.assign(assign("next", 5000));
        let Outgoing::Accept(accepted, _) = next(&mut rx).await else {
            panic!("the next job takes the one slot")
        };
        assert_eq!(accepted.job_id.as_str(), "next");
        let Outgoing::Result(result) = next(&mut rx).await else {
            panic!("the next job's result")
        };
        assert_eq!(result.job_id.as_str(), "next");
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err(), "the cancelled job never ran");
        assert_eq!(arbiter.running(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_stops_jobs_that_overrun_their_timeout() {
        let (jobs, arbiter, mut rx) = setup(1, 60_000, 0);
        jobs.assign(assign("slow", 500));
        assert!(matches!(next(&mut rx).await, Outgoing::Accept(..)));
        let Outgoing::Result(result) = next(&mut rx).await else {
            panic!("result")
        };
        assert!(matches!(
            result.outcome,
            Outcome::Failed {
                code: FailureCode::Timeout,
                ..
            }
        ));
        assert_eq!(result.duration_ms, 500);
        assert_eq!(arbiter.running(), 0, "the permit was dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_stops_the_job_and_frees_the_slot() {
        let (jobs, arbiter, mut rx) = setup(1, 60_000, 0);
        jobs.assign(assign("c", 120_000));
        assert!(matches!(next(&mut rx).await, Outgoing::Accept(..)));
        jobs.cancel(&JobRef {
            job_id: JobId::new("c").unwrap(),
            attempt: 1,
        });
        let Outgoing::Result(result) = next(&mut rx).await else {
            panic!("result")
        };
        assert!(matches!(
            result.outcome,
            Outcome::Failed {
                code: FailureCode::Cancelled,
                ..
            }
        ));
        assert_eq!(arbiter.running(), 0);
    }

    /// Refusals of kinds this node does not run are counted as kind
    /// `other`: a coordinator naming a new kind per job would otherwise
    /// make a metric series of each, for good.
    #[tokio::test(start_paused = true)]
    async fn refusals_of_kinds_this_node_does_not_run_are_counted_as_other() {
        let (jobs, _arbiter, mut rx) = setup(4, 10, 0);
        for (i, name) in ["made-up-1", "made-up-2", "made-up-3"]
            .into_iter()
            .enumerate()
        {
            let mut job = assign(&format!("u{i}"), 1000);
            job.kind = JobKind::new(name).unwrap();
            jobs.assign(job);
            assert!(matches!(next(&mut rx).await, Outgoing::Reject(_)));
        }
        let mut registry = prometheus_client::registry::Registry::default();
        jobs.metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(!text.contains("made-up"), "{text}");
        assert!(
            text.contains(r#"refusals_total{kind="other",reason="unknown_kind"} 3"#),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn duplicates_unknown_kinds_and_pairs_are_refused() {
        let (jobs, _arbiter, mut rx) = setup(4, 10, 0);
        jobs.assign(assign("d", 1000));
        assert!(matches!(next(&mut rx).await, Outgoing::Accept(..)));
        assert!(matches!(next(&mut rx).await, Outgoing::Result(_)));
        jobs.assign(assign("d", 1000));
        let Outgoing::Reject(reject) = next(&mut rx).await else {
            panic!()
        };
        assert_eq!(reject.reason, RejectReason::Duplicate);
        let mut other = assign("e", 1000);
        other.pair = "ja:en".parse().unwrap();
        jobs.assign(other);
        let Outgoing::Reject(reject) = next(&mut rx).await else {
            panic!()
        };
        assert_eq!(reject.reason, RejectReason::UnsupportedPair);
        let mut unknown = assign("f", 1000);
        unknown.kind = JobKind::new("tts").unwrap();
        jobs.assign(unknown);
        let Outgoing::Reject(reject) = next(&mut rx).await else {
            panic!()
        };
        assert_eq!(reject.reason, RejectReason::UnknownKind);
    }

    async fn result(rx: &mut mpsc::UnboundedReceiver<Outgoing>) -> JobResult {
        match next(rx).await {
            Outgoing::Result(result) => result,
            other => panic!("a result, not {other:?}"),
        }
    }

    async fn refusal(rx: &mut mpsc::UnboundedReceiver<Outgoing>) -> JobReject {
        match next(rx).await {
            Outgoing::Reject(reject) => reject,
            other => panic!("a refusal, not {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_fallback_kind_runs_on_its_fallback_executor_once_the_gpu_is_full() {
        let (jobs, arbiter, mut rx) = setup_busy(1, 100, Duration::ZERO, Some((1, 300)));
        assert_eq!(arbiter.fallback_slots()[&kind()], 1);
        jobs.assign(assign("gpu", 1000));
        assert!(matches!(next(&mut rx).await, Outgoing::Accept(..)));
        jobs.assign(assign("cpu", 1000));
        assert!(matches!(next(&mut rx).await, Outgoing::Accept(..)));
        assert_eq!(arbiter.fallback_slots()[&kind()], 0);
        assert_eq!(arbiter.running(), 2);
        jobs.assign(assign("none", 1000));
        let refused = refusal(&mut rx).await;
        assert_eq!(refused.reason, RejectReason::NoCapacity);
        assert!(
            refused.message.contains("fallback slots"),
            "{}",
            refused.message
        );
        let first = result(&mut rx).await;
        assert_eq!(
            (first.job_id.as_str(), first.device, first.duration_ms),
            ("gpu", Some(Device::Gpu), 100)
        );
        let second = result(&mut rx).await;
        assert_eq!(
            (second.job_id.as_str(), second.device, second.duration_ms),
            ("cpu", Some(Device::Cpu), 300),
            "the fallback executor ran it"
        );
        assert_eq!(
            arbiter.fallback_slots()[&kind()],
            1,
            "its slot is free again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn with_gpu_room_no_job_takes_the_fallback() {
        let (jobs, arbiter, mut rx) = setup_busy(2, 100, Duration::ZERO, Some((1, 300)));
        jobs.assign(assign("a", 1000));
        jobs.assign(assign("b", 1000));
        assert!(matches!(next(&mut rx).await, Outgoing::Accept(..)));
        assert!(matches!(next(&mut rx).await, Outgoing::Accept(..)));
        assert_eq!(arbiter.fallback_slots()[&kind()], 1);
        for _ in 0..2 {
            assert_eq!(result(&mut rx).await.device, Some(Device::Gpu));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_that_requires_a_gpu_never_runs_on_the_fallback() {
        let (jobs, arbiter, mut rx) = setup_busy(1, 100, Duration::ZERO, Some((1, 300)));
        jobs.assign(assign("a", 1000));
        assert!(matches!(next(&mut rx).await, Outgoing::Accept(..)));
        let mut gpu_only = assign("b", 1000);
        gpu_only.device = DeviceChoice::Gpu;
        jobs.assign(gpu_only);
        let refused = refusal(&mut rx).await;
        assert_eq!(refused.reason, RejectReason::NoCapacity);
        assert_eq!(arbiter.fallback_slots()[&kind()], 1, "left unused");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refuse_kind_is_refused_at_once() {
        let (jobs, _arbiter, mut rx) = setup_busy(1, 100, Duration::ZERO, None);
        jobs.assign(assign("a", 1000));
        assert!(matches!(next(&mut rx).await, Outgoing::Accept(..)));
        let sent = Instant::now();
        jobs.assign(assign("b", 1000));
        assert_eq!(refusal(&mut rx).await.reason, RejectReason::NoCapacity);
        assert_eq!(sent.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_kind_runs_when_a_slot_frees_before_its_deadline() {
        let (jobs, _arbiter, mut rx) = setup_busy(1, 400, Duration::MAX, None);
        let start = Instant::now();
        jobs.assign(assign("a", 1000));
        assert!(matches!(next(&mut rx).await, Outgoing::Accept(..)));
        jobs.assign(assign("b", 1000));
        assert!(matches!(next(&mut rx).await, Outgoing::Result(_)));
        assert!(matches!(next(&mut rx).await, Outgoing::Accept(..)));
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(400),
            "as a's slot freed"
        );
        let done = result(&mut rx).await;
        assert_eq!(
            (done.job_id.as_str(), done.device),
            ("b", Some(Device::Gpu))
        );
        assert!(matches!(done.outcome, Outcome::Completed { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_kind_is_answered_early_when_it_could_not_finish_in_time() {
        let (jobs, _arbiter, mut rx) = setup_busy(1, 400, Duration::MAX, None);
        // One run teaches the node that the kind takes 400 ms.
        jobs.assign(assign("first", 5000));
        assert!(matches!(next(&mut rx).await, Outgoing::Accept(..)));
        assert!(matches!(next(&mut rx).await, Outgoing::Result(_)));
        jobs.assign(assign("running", 5000));
        assert!(matches!(next(&mut rx).await, Outgoing::Accept(..)));
        // Its slot frees in 400 ms; with 600 ms left it could start then
        // but not finish: refused once 200 ms remain (the usual 400 ms).
        let sent = Instant::now();
        jobs.assign(assign("late", 600));
        let refused = refusal(&mut rx).await;
        assert_eq!(refused.job_id.as_str(), "late");
        assert_eq!(sent.elapsed(), Duration::from_millis(200));
        // The coordinator waits 100 ms for an answer: answered before then.
        let mut hurried = assign("hurried", 5000);
        hurried.answer_within_ms = Some(100);
        let sent = Instant::now();
        jobs.assign(hurried);
        let refused = refusal(&mut rx).await;
        assert_eq!(refused.job_id.as_str(), "hurried");
        assert_eq!(sent.elapsed(), Duration::from_millis(90));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_beyond_the_clock_neither_panics_nor_ends_the_job() {
        let (jobs, _arbiter, mut rx) = setup_busy(1, 100, Duration::MAX, None);
        let mut far = assign("far", u64::MAX);
        far.answer_within_ms = Some(u64::MAX);
        jobs.assign(far);
        assert!(matches!(next(&mut rx).await, Outgoing::Accept(..)));
        let done = result(&mut rx).await;
        assert!(
            matches!(done.outcome, Outcome::Completed { .. }),
            "{done:?}"
        );
    }
}
