//! A job's pick: a node with GPU room for it, else (when the job may run
//! anywhere) one with room on its kind's CPU fallback; the chosen node's
//! assignment counted in its hints before any routing update of the pair.
//! Each pick records the attempt it chose, in the same script call; a
//! job's first pick also records the job.

use futures_util::future::OptionFuture;

use super::dispatch::Dispatch;
use super::*;

impl JobRouter {
    /// Records a job (or finds it) and, while no job of its pair and kind
    /// waits for room here, picks its first node on its GPU route, in one
    /// call; the record carries its submission's mark, `opener`.
    pub(super) async fn open(
        &self,
        job: &Job,
        request: &str,
        opener: u64,
    ) -> Result<Opened, StoreError> {
        let key = (job.pair, job.kind.clone());
        // Its place in the queue, should it wait, is taken now: a job
        // submitted after this one's answer cannot get ahead of it.
        let (wakes, pick, arrival) = {
            let mut queues = lock(&self.queues);
            (queues.wakes(&key), queues.depth(&key) == 0, queues.arrive())
        };
        let route = Route::gpu(&job.kind);
        let locking = Instant::now();
        let _picking = OptionFuture::from(pick.then(|| self.hints.picking(job.pair))).await;
        let locked = locking.elapsed();
        let new = NewJob {
            id: &job.id,
            pair: job.pair,
            request,
            timeout: job.timeout,
            retention: self.config.result_ttl,
            coordinator: &self.instance,
            opener,
        };
        let mut picked = match self
            .store
            .job_open(new, (self.pick_on(job, &route, &[]), pick))
            .await?
        {
            JobStart::Exists => return Ok(Opened::Exists),
            JobStart::Conflict { picked } => {
                if let Some(node) = picked {
                    // The slot the pick took, given back by the node's
                    // entry as this instance knows it (a node held
                    // elsewhere: by its next report).
                    self.hints.due([job.pair], &node);
                }
                return Ok(Opened::Conflict);
            }
            JobStart::New(picked) => picked,
        };
        let mut first = First {
            attempt: 0,
            node: None,
            excluded: Vec::new(),
            picked: None,
            wakes,
            locked,
            arrival: Some(arrival),
        };
        while let Some(JobPick::Node(node, attempt)) = picked {
            first.attempt = attempt;
            if let Some(assigned) = self.count_pick(job.pair, &route, &node) {
                first.node = Some(node.clone());
                first.picked = Some(Picked::Node(node, assigned, DeviceChoice::Gpu));
                return Ok(Opened::New(first));
            }
            // Passed over: a pick elsewhere takes its attempt at once, or
            // the attempt is taken back: no attempt stays recorded on a
            // node that never got the job.
            first.excluded.push(node);
            first.attempt = attempt.saturating_sub(1);
            let on = self.pick_on(job, &route, &first.excluded);
            picked = self
                .store
                .job_next((job.pair, &job.id), (attempt, true), on)
                .await?;
        }
        first.picked = match picked {
            Some(JobPick::NoNodes) => Some(Picked::NoNodes),
            // With a fallback to try, the dispatch picks again.
            Some(JobPick::NoCapacity) if job.device == DeviceChoice::Gpu => {
                Some(Picked::NoCapacity)
            }
            _ => None,
        };
        Ok(Opened::New(first))
    }

    /// A node with GPU room for the job, else (when the job may run
    /// anywhere) one with room on the kind's fallback executor: the node
    /// is then told it may run the job on either. A job standing in for a
    /// head that cannot use the fallback tries the fallback only.
    pub(super) async fn pick(
        &self,
        state: &mut Dispatch<'_>,
        turn: Turn,
    ) -> Result<Picked, StoreError> {
        let started = Instant::now();
        let picked = self.pick_routes(state, turn).await;
        state.timing.pick += started.elapsed();
        picked
    }

    async fn pick_routes(
        &self,
        state: &mut Dispatch<'_>,
        turn: Turn,
    ) -> Result<Picked, StoreError> {
        let job = state.job;
        let _picking = self.hints.picking(job.pair).await;
        if turn == Turn::Fallback {
            return match self
                .pick_on_route(state, &Route::fallback(&job.kind))
                .await?
            {
                Picked::NoNodes => Ok(Picked::NoCapacity),
                picked => Ok(picked),
            };
        }
        match self.pick_on_route(state, &Route::gpu(&job.kind)).await? {
            Picked::NoCapacity if job.device == DeviceChoice::Any => {
                match self
                    .pick_on_route(state, &Route::fallback(&job.kind))
                    .await?
                {
                    // Nothing has a fallback: the GPUs' answer stands.
                    Picked::NoNodes => Ok(Picked::NoCapacity),
                    picked => Ok(picked),
                }
            }
            picked => Ok(picked),
        }
    }

    /// One `route_pick` on `route` for the job's next attempt, and the
    /// assignment counted in the chosen node's hints (the caller holds the
    /// pair's picking lock).
    async fn pick_on_route(
        &self,
        state: &mut Dispatch<'_>,
        route: &Route,
    ) -> Result<Picked, StoreError> {
        let job = state.job;
        let mut current = (state.attempt, false);
        loop {
            let on = self.pick_on(job, route, &state.excluded);
            let pick = self
                .store
                .job_next((job.pair, &job.id), current, on)
                .await?;
            let (node, attempt) = match pick {
                Some(JobPick::Node(node, attempt)) => (node, attempt),
                Some(JobPick::NoNodes) => return Ok(Picked::NoNodes),
                Some(JobPick::NoCapacity) => return Ok(Picked::NoCapacity),
                None => return Ok(Picked::Stale),
            };
            state.attempt = attempt;
            let Some(assigned) = self.count_pick(job.pair, route, &node) else {
                // Passed over: the next pick takes its attempt, or takes
                // it back.
                state.excluded.push(node);
                state.attempt = attempt.saturating_sub(1);
                current = (attempt, true);
                continue;
            };
            state.node = Some(node.clone());
            let device = if route.fallback {
                DeviceChoice::Any
            } else {
                DeviceChoice::Gpu
            };
            return Ok(Picked::Node(node, assigned, device));
        }
    }

    fn pick_on<'a>(&self, job: &'a Job, route: &'a Route, excluded: &'a [NodeId]) -> PickOn<'a> {
        PickOn {
            route,
            session: job.session.as_deref(),
            affinity: SESSION_AFFINITY,
            policy: self.config.pick,
            excluded,
        }
    }

    /// The assignment counted in the chosen node's hints, or `None`: a
    /// node held here whose hints (exact, whatever pair took its memory)
    /// say it has no room, although the pair's record in Redis did (a
    /// pick through another pair took the memory since that record was
    /// written), is passed over, and the record corrected. The attempt
    /// recorded on it stays in the job's record, never sent.
    fn count_pick(&self, pair: LangPair, route: &Route, node: &NodeId) -> Option<Assigned> {
        if self.hints.lacks_room(node, route) {
            self.hints.due([pair], node);
            return None;
        }
        Some(self.hints.assign(node, route, pair))
    }
}

/// A pick, with the chosen node's assignment counted and where the node
/// may run the job.
pub(super) enum Picked {
    Node(NodeId, Assigned, DeviceChoice),
    NoNodes,
    NoCapacity,
    /// The job ended, or another dispatcher moved it on: nothing picked.
    Stale,
}

/// A job's arrival: recorded, or found.
pub(super) enum Opened {
    /// Recorded now, with what its first pick gave.
    New(First),
    /// The same request is already known.
    Exists,
    /// The id belongs to a different request.
    Conflict,
}

/// What a job's first pick (at its arrival) gave its dispatch.
pub(super) struct First {
    /// The attempt recorded (0: still queued).
    pub(super) attempt: u32,
    /// Its node.
    pub(super) node: Option<NodeId>,
    /// A node passed over.
    pub(super) excluded: Vec<NodeId>,
    /// The pick to follow; `None`: the dispatch picks (again).
    pub(super) picked: Option<Picked>,
    /// The queue's wakes before the pick.
    pub(super) wakes: u64,
    /// How long it waited for the pair's picking lock (a routing update
    /// of the pair being written): part of its `pick` stage.
    pub(super) locked: Duration,
    /// Its place in its queue, should it wait; `None`: taken when it
    /// joins.
    pub(super) arrival: Option<u64>,
}

impl First {
    /// A dispatch taken up at `attempt` as Redis has it, by a dispatcher
    /// that made no pick of it: it picks from there.
    pub(super) fn resumed(attempt: u32) -> Self {
        Self {
            attempt,
            node: None,
            excluded: Vec::new(),
            picked: None,
            wakes: 0,
            locked: Duration::ZERO,
            arrival: None,
        }
    }
}
