//! What nodes say about their assignments: accepts, refusals, results
//! (fenced by node and attempt), and a node's connection ending.

use super::*;

impl JobRouter {
    /// A node's connection of `epoch` accepted or refused an assignment.
    /// Returns the attempt's route when the attempt is known here and the
    /// connection is the node's current one.
    pub fn answer(
        &self,
        (node, epoch): (&NodeId, u64),
        key: &JobRef,
        refusal: Option<(RejectReason, String)>,
    ) -> Option<Route> {
        if !self.registry.is_current(node, epoch) {
            return None;
        }
        if let Some(attempt) = lock(&self.attempts)
            .get_mut(key)
            .filter(|a| &a.node == node)
        {
            // The node's next report counts this answer: uncounted now,
            // before that report is read.
            attempt.assigned = None;
            let _ = attempt.events.send(match refusal {
                None => AttemptEvent::Accepted,
                Some((reason, message)) => AttemptEvent::Rejected(reason, message),
            });
            return Some(attempt.route.clone());
        }
        let mut forwarded = lock(&self.forwarded);
        let entry = forwarded.get_mut(key).filter(|f| &f.node == node)?;
        let first = std::mem::take(&mut entry.counted);
        if first {
            self.hints.answered(node, &entry.route);
        }
        let (route, origin) = (entry.route.clone(), entry.origin.clone());
        // An accepted attempt waits here for its result (or the node's
        // loss). A refusal ends it, and so does a second answer, which its
        // dispatcher takes as the node's fault: a node that repeats itself
        // costs the dispatching instance one message more, not one a frame.
        if refusal.is_some() || !first {
            forwarded.remove(key);
        }
        let answer = match refusal {
            None => RemoteAnswer::Accepted,
            Some((reason, message)) => RemoteAnswer::Rejected { reason, message },
        };
        drop(forwarded);
        self.tell_later(origin, key.clone(), answer);
        Some(route)
    }

    /// A node's connection of `epoch` sent a result: when the assignment
    /// is still unanswered (a job that ends at once may have no accept),
    /// the result answers it as an accept would, now: uncounted before the
    /// report that may come with it is read, and its dispatcher no longer
    /// waiting for an answer while the result is recorded (by
    /// [`Self::result`], after). A cancelled attempt was over before its
    /// result: that answers nothing.
    pub fn result_arrived(&self, (node, epoch): (&NodeId, u64), key: &JobRef, outcome: &Outcome) {
        if is_cancelled(outcome) || !self.registry.is_current(node, epoch) {
            return;
        }
        if let Some(attempt) = lock(&self.attempts)
            .get_mut(key)
            .filter(|a| &a.node == node)
        {
            if attempt.assigned.take().is_some() {
                let _ = attempt.events.send(AttemptEvent::Accepted);
            }
            return;
        }
        let mut forwarded = lock(&self.forwarded);
        let Some(entry) = forwarded.get_mut(key).filter(|f| &f.node == node) else {
            return;
        };
        if std::mem::take(&mut entry.counted) {
            self.hints.answered(node, &entry.route);
            let origin = entry.origin.clone();
            drop(forwarded);
            self.tell_later(origin, key.clone(), RemoteAnswer::Accepted);
        }
    }

    /// A node reported a result: record it (fenced by node and attempt),
    /// wake the dispatcher, and say whether the node may drop it from its
    /// outbox.
    pub async fn result(&self, node: &NodeId, result: JobResult) -> Result<Taken, StoreError> {
        let key = JobRef {
            job_id: result.job_id,
            attempt: result.attempt,
        };
        if is_cancelled(&result.outcome) {
            // Only a dispatcher cancels an attempt, once it has given up
            // on it: it moved the job on, or records the job's timeout
            // itself, and its cancel ended any forwarding. The node's word
            // that it stopped ends nothing (whichever node says it).
            self.metrics.result("stale");
            return Ok(Taken::Acknowledged);
        }
        let completed = matches!(result.outcome, Outcome::Completed { .. });
        let ended = Ended::reported(result.outcome, result.device);
        let Some(pair) = self.pair_of(&key).await? else {
            // No record names the job: long gone.
            self.metrics.result("stale");
            return Ok(Taken::Acknowledged);
        };
        let finish = self
            .store
            .job_finish(
                (pair, &key.job_id),
                (Some(node), key.attempt),
                completed,
                &ended.recorded(),
                self.config.result_ttl,
            )
            .await?;
        tracing::debug!(job_id = %key.job_id, attempt = key.attempt, node_id = %node, ?finish, "job result");
        self.metrics.result(match &finish {
            Finish::Applied { .. } => "applied",
            Finish::Late { .. } => "late",
            Finish::Duplicate => "duplicate",
            Finish::Stale => "stale",
            Finish::Foreign { .. } => "foreign",
        });
        if let Finish::Foreign { assigned } = finish {
            tracing::warn!(node_id = %node, assigned_node = %assigned, job_id = %key.job_id, attempt = key.attempt, "result refused: the attempt is assigned to another node");
            return Ok(Taken::Foreign);
        }
        // Whatever became of it, a forwarded attempt ends with its result.
        let forwarded = self.end_forwarded(&key);
        if matches!(finish, Finish::Late { .. }) {
            tracing::warn!(node_id = %node, job_id = %key.job_id, attempt = key.attempt, "a result came after its job's deadline: recorded as failed, timeout");
        }
        let Some((status, ended, latency_ms)) = recorded(finish, completed, ended) else {
            return Ok(Taken::Acknowledged);
        };
        if let Some(attempt) = lock(&self.attempts).get(&key) {
            let view = JobView::ended(
                &key.job_id,
                (status, ended),
                (Some(node.to_string()), key.attempt),
                latency_ms,
            );
            let _ = attempt
                .events
                .send(AttemptEvent::Finished(Some(Box::new(view))));
            return Ok(Taken::Acknowledged);
        }
        // Dispatched elsewhere (forwarded here, or its node moved to this
        // instance since): its dispatcher is waiting.
        let origin = match forwarded {
            Some(forwarded) => Some(forwarded.origin),
            None => self.store.job_dispatcher((pair, &key.job_id)).await?,
        };
        if let Some(origin) = origin.filter(|o| o != &self.instance) {
            self.tell_later(origin, key, RemoteAnswer::Finished);
        }
        Ok(Taken::Acknowledged)
    }

    /// The pair of an attempt's job: known here while it is dispatched or
    /// forwarded here, else from Redis's index.
    async fn pair_of(&self, key: &JobRef) -> Result<Option<LangPair>, StoreError> {
        if let Some(attempt) = lock(&self.attempts).get(key) {
            return Ok(Some(attempt.pair));
        }
        if let Some(forwarded) = lock(&self.forwarded).get(key) {
            return Ok(Some(forwarded.pair));
        }
        self.store.job_pair(&key.job_id).await
    }

    /// The attempts sent to `node` through this instance that it has not
    /// answered yet, as its socket task reads them (in frame order with
    /// its answers): those dispatched here, and those forwarded here.
    pub fn unanswered(&self, node: &NodeId) -> (Vec<JobRef>, Vec<JobRef>) {
        let local = lock(&self.attempts)
            .iter()
            .filter(|(_, a)| &a.node == node && a.assigned.is_some())
            .map(|(key, _)| key.clone())
            .collect();
        let forwarded = lock(&self.forwarded)
            .iter()
            .filter(|(_, f)| &f.node == node && f.counted)
            .map(|(key, _)| key.clone())
            .collect();
        (local, forwarded)
    }

    /// A node's connection ended: its running attempts move elsewhere.
    pub fn node_lost(&self, node: &NodeId) {
        for attempt in lock(&self.attempts).values() {
            if &attempt.node == node {
                let _ = attempt.events.send(AttemptEvent::NodeLost);
            }
        }
        // When this instance's stop closed the node's socket: unanswered,
        // cancelled on the way out (`node_ws`'s stop), so withdrawn;
        // accepted, left to run while the node moves.
        let stopping = self.shutdown.is_cancelled();
        let lost: Vec<(JobRef, String, RemoteAnswer)> = {
            let mut forwarded = lock(&self.forwarded);
            let keys: Vec<JobRef> = forwarded
                .iter()
                .filter(|(_, f)| &f.node == node)
                .map(|(key, _)| key.clone())
                .collect();
            keys.into_iter()
                .filter_map(|key| {
                    let ended = forwarded.remove(&key)?;
                    if ended.counted {
                        self.hints.answered(node, &ended.route);
                    }
                    let answer = match (stopping, ended.counted) {
                        (true, true) => RemoteAnswer::Withdrawn,
                        (true, false) => RemoteAnswer::Moving,
                        (false, _) => RemoteAnswer::Lost,
                    };
                    Some((key, ended.origin, answer))
                })
                .collect()
        };
        for (key, origin, answer) in lost {
            self.tell_later(origin, key, answer);
        }
    }
}

/// Whether a node's outcome says the coordinator cancelled it.
fn is_cancelled(outcome: &Outcome) -> bool {
    matches!(
        outcome,
        Outcome::Failed {
            code: FailureCode::Cancelled,
            ..
        }
    )
}

/// What a node's result recorded, as its answer shows it: none when it
/// recorded nothing (a duplicate, stale or foreign result).
fn recorded(finish: Finish, completed: bool, ended: Ended) -> Option<(JobStatus, Ended, u64)> {
    match finish {
        Finish::Applied { latency_ms } if completed => {
            Some((JobStatus::Completed, ended, latency_ms))
        }
        Finish::Applied { latency_ms } => Some((JobStatus::Failed, ended, latency_ms)),
        Finish::Late {
            latency_ms,
            outcome,
        } => {
            // What the script recorded: JSON of an `Ended`.
            let ended = serde_json::from_str(&outcome).unwrap_or_default();
            Some((JobStatus::Failed, ended, latency_ms))
        }
        Finish::Duplicate | Finish::Stale | Finish::Foreign { .. } => None,
    }
}
