//! Attempts on nodes another coordinator instance holds: forwarding
//! assignments and drains, and the answers coming back; room other
//! instances saw for the jobs waiting here.

use super::*;

impl JobRouter {
    /// Another instance saw room for `kinds` in `pair`: the head of each
    /// of those queues tries again.
    pub fn room_in(&self, pair: LangPair, kinds: &[JobKind]) {
        let mut queues = lock(&self.queues);
        for kind in kinds {
            queues.wake(&(pair, kind.clone()));
        }
    }

    /// Renews, for `ttl`, this instance's place among those waiting for
    /// room in each pair where jobs wait here.
    pub async fn still_waiting(&self, ttl: Duration) {
        let mut pairs: Vec<LangPair> = lock(&self.queues)
            .depths()
            .into_iter()
            .map(|((pair, _), _)| pair)
            .collect();
        pairs.sort_unstable();
        pairs.dedup();
        if pairs.is_empty() {
            return;
        }
        if let Err(err) = self
            .store
            .waiting(&pairs, &self.instance, ttl * WAITING_TTL_LEASES)
            .await
        {
            tracing::warn!(error = %err, "cannot renew this instance's waiting jobs in redis");
        }
    }

    /// Sends an assignment for a node whose socket another live instance
    /// holds through that instance's inbox. False when no live instance
    /// holds it.
    pub(super) async fn forward(&self, node: &NodeId, key: &JobRef, assign: JobAssign) -> bool {
        let holder = match self.other_holder(node).await {
            Ok(Some(holder)) => holder,
            Ok(None) => return false,
            Err(err) => {
                tracing::warn!(node_id = %node, error = %err, "cannot look up the node's coordinator");
                return false;
            }
        };
        let envelope = Envelope::Assign {
            origin: self.instance.clone(),
            node: node.clone(),
            assign,
        };
        if let Some(attempt) = lock(&self.attempts).get_mut(key) {
            attempt.holder = Some(holder.clone());
        }
        match forward::send(&self.store, &holder, &envelope).await {
            Ok(true) => {
                self.metrics.forwarded.inc();
                true
            }
            Ok(false) => {
                tracing::warn!(node_id = %node, %holder, "cannot forward the assignment: the node's coordinator instance is gone");
                false
            }
            Err(err) => {
                tracing::warn!(node_id = %node, %holder, error = %err, "cannot forward the assignment");
                false
            }
        }
    }

    /// The other live instance holding `node`'s socket, if any.
    pub(super) async fn other_holder(&self, node: &NodeId) -> Result<Option<String>, StoreError> {
        self.store.other_live_holder(node, &self.instance).await
    }

    /// Records that the node's answers to `job` (sent through `route` of
    /// `pair`) belong to `origin`.
    pub fn note_forwarded(
        &self,
        job: JobRef,
        node: &NodeId,
        (route, pair): (Route, LangPair),
        origin: &str,
    ) {
        self.hints.assigned(node, &route, pair);
        lock(&self.forwarded).insert(
            job,
            Forwarded {
                node: node.clone(),
                pair,
                route,
                origin: origin.to_owned(),
                counted: true,
            },
        );
    }

    /// Watches an attempt `origin` dispatches, which `node` accepted and
    /// runs on after it moved here: as a forwarded attempt answered, its
    /// result or the node's going away is told to `origin`. False when
    /// the node is not held here (any more).
    pub fn watch_forwarded(
        &self,
        job: JobRef,
        node: &NodeId,
        (route, pair): (Route, LangPair),
        origin: &str,
    ) -> bool {
        if self.registry.get(node).is_none() {
            return false;
        }
        let watched = Forwarded {
            node: node.clone(),
            pair,
            route,
            origin: origin.to_owned(),
            counted: false,
        };
        lock(&self.forwarded).insert(job, watched);
        true
    }

    /// Ends a forwarded assignment: uncounted from its node's hints if no
    /// answer did that already.
    pub(super) fn end_forwarded(&self, job: &JobRef) -> Option<Forwarded> {
        let ended = lock(&self.forwarded).remove(job)?;
        if ended.counted {
            self.hints.answered(&ended.node, &ended.route);
        }
        Some(ended)
    }

    /// Forgets a forwarded assignment: it could not be delivered, or the
    /// instance that sent it cancelled it.
    pub fn forget_forwarded(&self, job: &JobRef) {
        self.end_forwarded(job);
    }

    /// Sends `answer` about `job` to instance `origin`'s inbox, in the
    /// background.
    pub fn tell_later(&self, origin: String, job: JobRef, answer: RemoteAnswer) {
        forward::post(
            &self.store,
            &self.tasks,
            origin,
            Envelope::Answer { job, answer },
        );
    }

    /// Another instance answered about an attempt dispatched here.
    pub fn remote_answer(&self, job: &JobRef, answer: RemoteAnswer) {
        if let Some(attempt) = lock(&self.attempts).get_mut(job) {
            if answer == RemoteAnswer::Moving {
                // No longer held by the instance that stopped: its going
                // away moves nothing on; the node's coming back is watched
                // instead ([`Self::check_holders`]).
                attempt.holder = None;
                attempt.moving_since = Some(Instant::now());
                attempt.moved = true;
            }
            let _ = attempt.events.send(match answer {
                RemoteAnswer::Accepted => AttemptEvent::Accepted,
                RemoteAnswer::Rejected { reason, message } => {
                    AttemptEvent::Rejected(reason, message)
                }
                RemoteAnswer::Finished => AttemptEvent::Finished(None),
                RemoteAnswer::Lost => AttemptEvent::NodeLost,
                RemoteAnswer::Withdrawn => AttemptEvent::Withdrawn,
                RemoteAnswer::Moving => AttemptEvent::Moving,
            });
        }
    }

    /// Attempts forwarded to an instance whose presence expired move on:
    /// the node will register elsewhere, and its answers would never come.
    /// So do those whose node, moving from a holder that stopped, has not
    /// registered with a live instance a lease later.
    pub async fn check_holders(&self) {
        self.check_moving().await;
        let holders: Vec<String> = {
            let attempts = lock(&self.attempts);
            let mut holders: Vec<String> =
                attempts.values().filter_map(|a| a.holder.clone()).collect();
            holders.sort_unstable();
            holders.dedup();
            holders
        };
        for holder in holders {
            if self.store.instance_present(&holder).await.unwrap_or(true) {
                continue;
            }
            tracing::warn!(%holder, "a coordinator instance holding nodes of jobs dispatched here went away");
            for attempt in lock(&self.attempts).values_mut() {
                if attempt.holder.as_deref() != Some(holder.as_str()) {
                    continue;
                }
                if attempt.moved {
                    // Its holder since it moved is gone: the node moves on
                    // with the job, and is watched again.
                    attempt.holder = None;
                    attempt.moving_since = Some(Instant::now());
                } else {
                    let _ = attempt.events.send(AttemptEvent::NodeLost);
                }
            }
        }
    }

    /// Attempts whose node moves to another instance: once it registered
    /// with a live one, that one is its holder; not there a lease after
    /// the news, the node is taken as lost.
    async fn check_moving(&self) {
        let lease = self.config.lease();
        let overdue: Vec<(JobRef, NodeId)> = lock(&self.attempts)
            .iter()
            .filter(|(_, a)| a.moving_since.is_some_and(|at| at.elapsed() >= lease))
            .map(|(key, a)| (key.clone(), a.node.clone()))
            .collect();
        for (key, node) in overdue {
            // Where it is back: here, at another live instance, or nowhere
            // (`None`: Redis did not say, so asked again next time).
            let back = if self.registry.get(&node).is_some() {
                Some(Some(self.instance.clone()))
            } else {
                self.other_holder(&node).await.ok()
            };
            let Some(back) = back else { continue };
            let mut attempts = lock(&self.attempts);
            let Some(attempt) = attempts.get_mut(&key) else {
                continue;
            };
            attempt.moving_since = None;
            match back {
                Some(holder) if holder == self.instance => {}
                Some(holder) => {
                    // Told of the attempt, so that the node's going away
                    // from there is told here.
                    let watch = Envelope::Watch {
                        origin: self.instance.clone(),
                        node: node.clone(),
                        job: key.clone(),
                        pair: attempt.pair,
                        kind: attempt.route.kind.clone(),
                        fallback: attempt.route.fallback,
                    };
                    forward::post(&self.store, &self.tasks, holder.clone(), watch);
                    attempt.holder = Some(holder);
                }
                None => {
                    tracing::warn!(node_id = %node, job_id = %key.job_id, "a node that moved from a stopped coordinator instance did not come back within a lease");
                    let _ = attempt.events.send(AttemptEvent::NodeLost);
                }
            }
        }
    }
}
