//! Jobs with no attempt in flight, taken over by another instance: each
//! job a stopping coordinator is left with and no node runs (it waits for
//! room, its attempt was refused or lost, or its pick chose a node it was
//! never sent to) is handed to another live instance through its inbox,
//! which adopts it in Redis (`job_adopt`: only from the instance that gave
//! it up, at the attempt it stood at) and dispatches it from there, with
//! the time it has left. A job still `queued` whose instance died is
//! handed over by the instance that reads it, to itself
//! (`JobRouter::record`).

use super::pick::First;
use super::submit::Registered;
use super::*;
use tracing::Instrument;

/// The longest pause before a failing takeover is tried again (pauses
/// double from 50 ms: six tries more, over about 3 s).
const ADOPT_LAST_PAUSE: Duration = Duration::from_millis(1_600);

impl JobRouter {
    /// This instance is stopping while `job` has no attempt in flight here
    /// (it waits for room, an attempt ended without a result, or a pick
    /// chose a node that was not sent it) at `attempt`: another live
    /// instance is asked to take it over. Its dispatch here sends nothing
    /// more: it ends with what this returns.
    pub(super) fn hand_over(&self, job: &Job, attempt: u32) -> SubmitError {
        self.pass_on(self.instance.clone(), (job.pair, job.id.clone(), attempt));
        SubmitError::Stopping
    }

    /// Whether, stopping, this instance has another live one to hand its
    /// jobs to (asked of Redis at the first need, once). It says it is
    /// stopping first: of two instances stopping together, the second to
    /// ask sees the first stopping, and neither counts on the other unless
    /// the first asked before the second said so. A Redis error answers
    /// no for this once, and is not kept.
    pub async fn hands_over(&self) -> bool {
        let asked = self.successor.get_or_try_init(|| async {
            if let Err(err) = self.store.instance_leaving(&self.instance).await {
                tracing::warn!(error = %err, "cannot say this instance is stopping");
            }
            let live = self.store.other_live_instances(&self.instance).await?;
            Ok::<bool, StoreError>(!live.is_empty())
        });
        asked.await.copied().unwrap_or(false)
    }

    /// Asks another live instance that is not stopping to take over the
    /// job that instance `from` dispatched: the first whose inbox takes
    /// the message.
    pub(super) fn pass_on(&self, from: String, (pair, job_id, attempt): (LangPair, JobId, u32)) {
        let (store, me) = (self.store.clone(), self.instance.clone());
        self.tasks.spawn(async move {
            let instances = match store.other_live_instances(&me).await {
                Ok(instances) => instances,
                Err(err) => {
                    tracing::warn!(%job_id, error = %err, "cannot look for a coordinator instance to take a job over: it ends at its deadline");
                    return;
                }
            };
            let envelope = Envelope::Adopt {
                from,
                pair,
                job_id: job_id.clone(),
                attempt,
            };
            for to in instances {
                match forward::send(&store, &to, &envelope).await {
                    Ok(true) => {
                        tracing::info!(%job_id, instance = %to, "a job with no attempt in flight handed over to another coordinator instance");
                        return;
                    }
                    Ok(false) => {}
                    Err(err) => {
                        tracing::warn!(%job_id, instance = %to, error = %err, "cannot hand a job over to this instance");
                    }
                }
            }
            tracing::warn!(%job_id, "no other coordinator instance took a job over: it is taken over when read once this one is gone, if it was queued, or ends at its deadline");
        });
    }

    /// Takes over the dispatch of `job_id` of `pair`, which instance
    /// `from` held with no attempt in flight at `attempt` (it stopped, or
    /// died with the job queued), in a task of its own. Stopping too, it
    /// passes the job on.
    pub fn adopt(self: &Arc<Self>, from: String, pair: LangPair, (job_id, attempt): (JobId, u32)) {
        if self.shutdown.is_cancelled() {
            self.pass_on(from, (pair, job_id, attempt));
            return;
        }
        let span = tracing::info_span!("job", %job_id);
        let this = Arc::clone(self);
        self.tasks.spawn(
            async move { this.take_over(&from, pair, (job_id, attempt)).await }.instrument(span),
        );
    }

    /// Once Redis says the job was `from`'s, at `attempt`, and has not
    /// ended, it is this instance's: dispatched from that attempt until its
    /// deadline (no node runs it). A submission of the
    /// id here waits on it from then on.
    async fn take_over(
        self: Arc<Self>,
        from: &str,
        pair: LangPair,
        (job_id, attempt): (JobId, u32),
    ) {
        let opener = self.openers.fetch_add(1, Ordering::Relaxed);
        // Sent again while Redis fails: the same call, once it ran, answers
        // as it did.
        let mut pause = Duration::from_millis(50);
        let adopted = loop {
            match self
                .store
                .job_adopt((pair, &job_id), (from, &self.instance), (opener, attempt))
                .await
            {
                Ok(Some(adopted)) => break adopted,
                Ok(None) => {
                    tracing::debug!(%from, "a job handed over had ended, moved on, or was taken already");
                    return;
                }
                Err(err) if pause <= ADOPT_LAST_PAUSE && !self.shutdown.is_cancelled() => {
                    tracing::warn!(%from, error = %err, "taking over a job handed over failed; trying again");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(err) => {
                    tracing::warn!(%from, error = %err, "cannot take over a job handed over: it ends at its deadline, unless read again once Redis answers");
                    self.adoption_failed(&(job_id, from.to_owned(), attempt));
                    return;
                }
            }
        };
        if self.shutdown.is_cancelled() {
            // Stopping since: handed on, from here.
            self.pass_on(self.instance.clone(), (pair, job_id, attempt));
            return;
        }
        let mut job = match Job::from_canonical(job_id, &adopted.request) {
            Ok(job) => job,
            Err(err) => {
                tracing::error!(%from, error = %err, "a job taken over has a request that cannot be read: it ends at its deadline");
                return;
            }
        };
        job.deadline = Some(Instant::now() + remaining(adopted.deadline_ms, job.timeout));
        job.cap_priority(self.config.client_max_priority);
        let (waiter, fresh) = self.waiter(&job.id, &adopted.request);
        let registered = fresh.then(|| Registered {
            router: Arc::clone(&self),
            id: job.id.clone(),
            waiter,
        });
        self.metrics.adopted.inc();
        tracing::info!(%from, attempt, "took over a job from a coordinator instance that stopped or died");
        let _registered = registered;
        self.follow_job(job, Some(First::resumed(attempt)), Duration::ZERO)
            .await;
    }
}
