//! Jobs on this node: admission of each `job_assign`, the run itself under
//! a watchdog, cancellation, and the hand-over of results to the outbox.
//!
//! Each assignment is answered at once with `job_accept` or `job_reject`
//! (after at most the kind's `queue_wait_ms`). An admitted job holds its
//! arbiter permit for exactly as long as it runs. A job whose processes
//! hold more GPU memory than its kind's `vram_mb` is logged (the arbiter
//! counts it) and, with `on_vram_overrun = "kill"`, stopped and failed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use lingua_shared::protocol::{
    FailureCode, JobAssign, JobRef, JobReject, JobResult, Outcome, RejectReason,
};
use lingua_shared::{JobKind, LangPair, sync};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::arbiter::{Arbiter, Overrun, Refusal};
use crate::config::OverrunAction;
use crate::executor::Executor;
use crate::metrics::JobMetrics;

/// How many finished attempts are remembered to refuse duplicates.
const REMEMBERED_ATTEMPTS: usize = 4096;

/// What jobs send towards the coordinator: answers now, results later.
#[derive(Debug)]
pub enum Outgoing {
    /// `job_accept`: sent if connected, dropped otherwise (the
    /// coordinator re-assigns an unanswered attempt).
    Accept(JobRef),
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
    executors: RwLock<HashMap<JobKind, Arc<Executor>>>,
    pairs: Vec<LangPair>,
    attempts: Mutex<Attempts>,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    metrics: Arc<JobMetrics>,
    tasks: TaskTracker,
}

impl Jobs {
    /// Jobs admitted by `arbiter`, run by `executors`, for `pairs`; their
    /// answers go to `outgoing`, their counts to `metrics`.
    pub fn new(
        arbiter: Arc<Arbiter>,
        executors: HashMap<JobKind, Arc<Executor>>,
        pairs: Vec<LangPair>,
        (outgoing, metrics): (mpsc::UnboundedSender<Outgoing>, Arc<JobMetrics>),
    ) -> Arc<Self> {
        Arc::new(Self {
            arbiter,
            executors: RwLock::new(executors),
            pairs,
            attempts: Mutex::default(),
            outgoing,
            metrics,
            tasks: TaskTracker::new(),
        })
    }

    /// Replaces the executors (SIGHUP). Running jobs finish on the old ones.
    pub fn set_executors(&self, executors: HashMap<JobKind, Arc<Executor>>) {
        *sync::write(&self.executors) = executors;
    }

    fn attempts(&self) -> std::sync::MutexGuard<'_, Attempts> {
        // Single map operations only: a poisoned lock holds consistent data.
        sync::lock(&self.attempts)
    }

    /// Handles one assignment: answers it and, when admitted, runs it in
    /// the background.
    pub fn assign(self: &Arc<Self>, job: JobAssign) {
        let this = Arc::clone(self);
        // Every line logged for the job carries its id and attempt (the
        // coordinator's lines carry the same, to follow a job across both).
        let span = tracing::info_span!("job", job_id = %job.job_id, attempt = job.attempt);
        self.tasks
            .spawn(async move { this.admit_and_run(job).await }.instrument(span));
    }

    fn reject(&self, job: &JobAssign, reason: RejectReason, message: String) {
        tracing::debug!(job_id = %job.job_id, attempt = job.attempt, ?reason, %message, "job refused");
        let name = serde_json::to_value(reason).ok();
        let name = name
            .as_ref()
            .and_then(serde_json::Value::as_str)
            .unwrap_or("other");
        self.metrics.refused(&job.kind, name);
        let _ = self.outgoing.send(Outgoing::Reject(JobReject {
            job_id: job.job_id.clone(),
            attempt: job.attempt,
            reason,
            message,
        }));
    }

    async fn admit_and_run(self: Arc<Self>, job: JobAssign) {
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
        let executor = sync::read(&self.executors).get(&job.kind).cloned();
        let Some(executor) = executor else {
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
        // A cancel (the coordinator gave up on the attempt) ends the wait:
        // the job leaves the arbiter's queue and any room held for it.
        let admitted = tokio::select! {
            biased;
            () = cancel.cancelled() => None,
            admitted = self.arbiter.admit(&job.kind) => Some(admitted),
        };
        let permit = match admitted {
            None => {
                self.attempts().running.remove(&key);
                tracing::debug!(job_id = %job.job_id, attempt = job.attempt, "cancelled while waiting for a slot");
                return;
            }
            Some(Ok(permit)) => permit,
            Some(Err(refusal)) => {
                self.attempts().running.remove(&key);
                let reason = match refusal {
                    Refusal::UnknownKind(_) => RejectReason::UnknownKind,
                    Refusal::Draining => RejectReason::Draining,
                    Refusal::Concurrency { .. }
                    | Refusal::Pressure { .. }
                    | Refusal::Memory { .. }
                    | Refusal::Unavailable(_)
                    | Refusal::Stale { .. } => RejectReason::NoCapacity,
                };
                return self.reject(&job, reason, refusal.to_string());
            }
        };
        let _ = self.outgoing.send(Outgoing::Accept(key.clone()));
        let started = Instant::now();
        let deadline = started + Duration::from_millis(job.timeout_ms);
        let outcome = {
            let on_spawn = |group| permit.watch_process_group(group);
            let run = executor.run(&job, permit.placement(), &on_spawn);
            let overrun = permit.overrun();
            tokio::pin!(run, overrun);
            let mut overrun_told = false;
            loop {
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => break Outcome::Failed { code: FailureCode::Cancelled, message: "cancelled by the coordinator".into() },
                    outcome = &mut run => break outcome,
                    () = tokio::time::sleep_until(deadline) => {
                        tracing::warn!(job_id = %job.job_id, attempt = job.attempt, timeout_ms = job.timeout_ms, "watchdog: job overran its timeout and was stopped");
                        break Outcome::Failed { code: FailureCode::Timeout, message: format!("the job ran over its timeout of {} ms and was stopped", job.timeout_ms) };
                    }
                    overrun = &mut overrun, if !overrun_told => {
                        overrun_told = true;
                        if let Some(failed) = vram_overrun(&job, overrun) {
                            break failed;
                        }
                    }
                }
            }
        };
        drop(permit);
        {
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
        let ran = started.elapsed();
        let ended = match &outcome {
            Outcome::Completed { .. } => "completed".to_owned(),
            Outcome::Failed { code, .. } => serde_json::to_value(code)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| "other".into()),
        };
        self.metrics.ended(&job.kind, &ended, ran.as_secs_f64());
        let _ = self.outgoing.send(Outgoing::Result(JobResult {
            job_id: job.job_id,
            attempt: job.attempt,
            outcome,
            duration_ms: u64::try_from(ran.as_millis()).unwrap_or(u64::MAX),
        }));
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use lingua_shared::JobId;
    use serde_json::json;

    use super::*;
    use crate::arbiter::{KindLimits, Limits};
    use crate::config::Pressure;

    fn kind() -> JobKind {
        JobKind::new("mt").unwrap()
    }

    fn setup(
        max: u32,
        duration_ms: u64,
        wait_ms: u64,
    ) -> (Arc<Jobs>, Arc<Arbiter>, mpsc::UnboundedReceiver<Outgoing>) {
        let arbiter = Arbiter::new(Limits {
            uses_gpus: false,
            reserve_mb: 0,
            pressure: Pressure {
                enter_pct: 90,
                exit_pct: 80,
                min_priority: 0,
            },
            settle: Duration::ZERO,
            stale_after: Duration::from_secs(2),
            kinds: BTreeMap::from([(
                kind(),
                KindLimits {
                    vram_mb: 0,
                    priority: 50,
                    max_concurrent: max,
                    queue_wait: Duration::from_millis(wait_ms),
                    load_time: Duration::ZERO,
                    on_overrun: OverrunAction::Warn,
                },
            )]),
        });
        let executor = Executor::Simulated {
            duration: Duration::from_millis(duration_ms),
            actual_vram_mb: 0,
            utilization_pct: 0,
            gpus: None,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let jobs = Jobs::new(
            arbiter.clone(),
            HashMap::from([(kind(), Arc::new(executor))]),
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
            payload: json!({}),
            timeout_ms,
        }
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<Outgoing>) -> Outgoing {
        rx.recv().await.expect("an answer or result")
    }

    #[tokio::test(start_paused = true)]
    async fn accepted_jobs_run_and_report_then_free_their_slot() {
        let (jobs, arbiter, mut rx) = setup(1, 100, 0);
        jobs.assign(assign("a", 1000));
        assert!(matches!(next(&mut rx).await, Outgoing::Accept(_)));
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
        assert!(matches!(next(&mut rx).await, Outgoing::Accept(_)));
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
    async fn the_watchdog_stops_jobs_that_overrun_their_timeout() {
        let (jobs, arbiter, mut rx) = setup(1, 60_000, 0);
        jobs.assign(assign("slow", 500));
        assert!(matches!(next(&mut rx).await, Outgoing::Accept(_)));
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
        assert!(matches!(next(&mut rx).await, Outgoing::Accept(_)));
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

    #[tokio::test(start_paused = true)]
    async fn duplicates_unknown_kinds_and_pairs_are_refused() {
        let (jobs, _arbiter, mut rx) = setup(4, 10, 0);
        jobs.assign(assign("d", 1000));
        assert!(matches!(next(&mut rx).await, Outgoing::Accept(_)));
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
}
