//! One attempt on one node: the assignment sent (or forwarded), the
//! node's answer followed until the result, a refusal, a silence or the
//! node's loss; cancelling it.

use super::*;

impl JobRouter {
    /// Sends attempt `attempt` of `job` to `node` and follows it.
    pub(super) async fn try_node(
        &self,
        job: &Job,
        (node, device): (&NodeId, DeviceChoice),
        (attempt, deadline): (u32, Instant),
        assigned: Assigned,
        timing: &mut Timing,
    ) -> Tried {
        let key = JobRef {
            job_id: job.id.clone(),
            attempt,
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let assign = JobAssign {
            job_id: job.id.clone(),
            attempt,
            kind: job.kind.clone(),
            pair: job.pair,
            session_id: job.session.clone(),
            payload: job.payload.clone(),
            timeout_ms: u64::try_from(remaining.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            device,
            answer_within_ms: Some(
                u64::try_from(self.config.accept_timeout.min(remaining).as_millis())
                    .unwrap_or(u64::MAX),
            ),
        };
        let (tx, mut events) = mpsc::unbounded_channel();
        lock(&self.attempts).insert(
            key.clone(),
            Attempt {
                node: node.clone(),
                pair: job.pair,
                route: route_of(&assign),
                events: tx,
                assigned: Some(assigned),
                holder: None,
                moving_since: None,
                moved: false,
            },
        );
        self.metrics.assignments.inc();
        let sending = Instant::now();
        let undelivered = if self.registry.get(node).is_some() {
            let assign = Message::JobAssign(assign);
            // Held here, but its socket is closing or not reading (its
            // send queue is full): that counts, as a silence does.
            (!self.registry.send(node, Control::Send(Box::new(assign)))).then(|| {
                let message = format!(
                    "node {node} is not taking frames: its connection is closing or stalled"
                );
                Tried::Move(JobErrorCode::NodeLost, message)
            })
        } else if self.forward(node, &key, assign).await {
            None
        } else {
            // Never reached (no live instance holds it, or its holder's
            // inbox could not be written): no attempt used up.
            let message = format!("node {node} could not be reached through any live coordinator");
            Some(Tried::Skip(JobErrorCode::NodeLost, message))
        };
        // Forwarding through another instance is part of reaching the node.
        timing.accept += sending.elapsed();
        let outcome = match undelivered {
            None => {
                self.follow(node, &key, &mut events, (deadline, timing))
                    .await
            }
            Some(tried) => tried,
        };
        lock(&self.attempts).remove(&key);
        outcome
    }

    pub(super) async fn follow(
        &self,
        node: &NodeId,
        key: &JobRef,
        events: &mut mpsc::UnboundedReceiver<AttemptEvent>,
        (deadline, timing): (Instant, &mut Timing),
    ) -> Tried {
        let sent = Instant::now();
        let accept_by = (sent + self.config.accept_timeout).min(deadline);
        let first = tokio::time::timeout_at(accept_by, events.recv()).await;
        let answered = Instant::now();
        timing.accept += answered.saturating_duration_since(sent);
        if let Some(attempt) = lock(&self.attempts).get_mut(key) {
            // Not answered in time (or answered): no longer counted.
            attempt.assigned = None;
        }
        let (accepted, accept_due) = match first {
            Ok(Some(AttemptEvent::Accepted)) => (true, false),
            // Its accept, posted apart, may come after the news.
            Ok(Some(AttemptEvent::Moving)) => (true, true),
            Ok(Some(AttemptEvent::Finished(view))) => {
                timing.result_at = Some(answered);
                return Tried::Finished(view);
            }
            Ok(Some(AttemptEvent::Rejected(reason, message))) => {
                return self.refused((node, key), reason, &message);
            }
            Ok(Some(AttemptEvent::NodeLost) | None) if !self.shutdown.is_cancelled() => {
                return Tried::Move(JobErrorCode::NodeLost, format!("node {node} went away"));
            }
            // Its socket closed by this instance's stop, or by the stop of
            // the instance holding it (which withdrew it): no failure.
            Ok(Some(AttemptEvent::NodeLost | AttemptEvent::Withdrawn) | None) => {
                let message = format!("node {node} went away as its coordinator stopped");
                return Tried::Skip(JobErrorCode::NodeLost, message);
            }
            Err(_) => (false, false),
        };
        if !accepted {
            self.cancel(node, key, "not accepted in time");
            if Instant::now() >= deadline {
                return Tried::TimedOut;
            }
            return Tried::Move(
                JobErrorCode::NoCapacity,
                format!("{node} did not answer the assignment in time"),
            );
        }
        // Stopping, the job is left to run on its node first: the loss of
        // its socket, which the stop closes, must not move it on.
        let ended = tokio::select! {
            biased;
            () = self.shutdown.cancelled() => return Tried::Stopped,
            ended = Self::outcome(events, deadline, accept_due) => ended,
        };
        let now = Instant::now();
        timing.run += now.saturating_duration_since(answered);
        match ended {
            Ok(Some(AttemptEvent::Finished(view))) => {
                timing.result_at = Some(now);
                Tried::Finished(view)
            }
            Ok(Some(AttemptEvent::NodeLost | AttemptEvent::Withdrawn) | None) => Tried::Move(
                JobErrorCode::NodeLost,
                format!("node {node} went away while running the job"),
            ),
            Ok(Some(
                AttemptEvent::Accepted | AttemptEvent::Rejected(..) | AttemptEvent::Moving,
            )) => Tried::Move(
                JobErrorCode::NodeLost,
                format!("node {node} answered the assignment twice"),
            ),
            Err(_) => {
                self.cancel(node, key, "job timeout");
                Tried::TimedOut
            }
        }
    }

    /// The event that ends an accepted attempt, or its deadline. A node
    /// moving to another instance (its holder stopped) runs the job on,
    /// and its result is recorded wherever it goes: that news ends
    /// nothing, nor does the accept it may have overtaken (`accept_due`).
    async fn outcome(
        events: &mut mpsc::UnboundedReceiver<AttemptEvent>,
        deadline: Instant,
        mut accept_due: bool,
    ) -> Result<Option<AttemptEvent>, tokio::time::error::Elapsed> {
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(AttemptEvent::Moving)) => {}
                Ok(Some(AttemptEvent::Accepted)) if accept_due => accept_due = false,
                ended => return ended,
            }
        }
    }

    /// `node` refused attempt `key` for `reason`: "not now" moves the job
    /// on for free; a node that cannot run it at all (kind, pair) uses up
    /// an attempt.
    fn refused(
        &self,
        (node, key): (&NodeId, &JobRef),
        reason: RejectReason,
        message: &str,
    ) -> Tried {
        let name = serde_json::to_value(reason).ok();
        self.metrics
            .refused(name.as_ref().and_then(Value::as_str).unwrap_or("other"));
        tracing::debug!(job_id = %key.job_id, attempt = key.attempt, node_id = %node, ?reason, "node refused the job");
        let message = format!("{node} refused: {message}");
        match reason {
            RejectReason::NoCapacity | RejectReason::Draining => {
                Tried::Skip(JobErrorCode::NoCapacity, message)
            }
            _ => Tried::Move(JobErrorCode::NoCapacity, message),
        }
    }

    pub(super) fn cancel(&self, node: &NodeId, key: &JobRef, reason: &str) {
        let cancel = Message::JobCancel(JobCancel {
            job_id: key.job_id.clone(),
            attempt: key.attempt,
            reason: reason.into(),
        });
        if self
            .registry
            .send(node, Control::Send(Box::new(cancel.clone())))
        {
            return;
        }
        let holder = lock(&self.attempts).get(key).and_then(|a| a.holder.clone());
        if let (Some(holder), Message::JobCancel(cancel)) = (holder, cancel) {
            let envelope = Envelope::Cancel {
                node: node.clone(),
                cancel,
            };
            forward::post(&self.store, &self.tasks, holder, envelope);
        }
    }
}
