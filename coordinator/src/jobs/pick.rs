//! A job's pick: a node with GPU room for it, else (when the job may run
//! anywhere) one with room on its kind's CPU fallback; the chosen node's
//! assignment counted in its hints before any routing update of the pair.

use super::dispatch::Dispatch;
use super::*;

impl JobRouter {
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
            return match self.pick_on(state, &Route::fallback(&job.kind)).await? {
                Picked::NoNodes => Ok(Picked::NoCapacity),
                picked => Ok(picked),
            };
        }
        match self.pick_on(state, &Route::gpu(&job.kind)).await? {
            Picked::NoCapacity if job.device == DeviceChoice::Any => {
                match self.pick_on(state, &Route::fallback(&job.kind)).await? {
                    // Nothing has a fallback: the GPUs' answer stands.
                    Picked::NoNodes => Ok(Picked::NoCapacity),
                    picked => Ok(picked),
                }
            }
            picked => Ok(picked),
        }
    }

    /// One `route_pick` on `route`, and the assignment counted in the
    /// chosen node's hints before any routing update of the pair is
    /// computed (the caller holds the pair's picking lock). A node held
    /// here whose hints (exact, whatever pair took its memory) say it has
    /// no room, although the pair's record in Redis did (a pick through
    /// another pair took the memory since that record was written), is
    /// passed over, and the record corrected.
    async fn pick_on(&self, state: &mut Dispatch<'_>, route: &Route) -> Result<Picked, StoreError> {
        let job = state.job;
        loop {
            let pick = self
                .store
                .route_pick(
                    job.pair,
                    route,
                    job.session.as_deref(),
                    SESSION_AFFINITY,
                    self.config.pick,
                    &state.excluded,
                )
                .await?;
            let node = match pick {
                Pick::Node(node) => node,
                Pick::NoNodes => return Ok(Picked::NoNodes),
                Pick::NoCapacity => return Ok(Picked::NoCapacity),
            };
            if self.hints.lacks_room(&node, route) {
                self.hints.due([job.pair], &node);
                state.excluded.push(node);
                continue;
            }
            let assigned = self.hints.assign(&node, route, job.pair);
            let device = if route.fallback {
                DeviceChoice::Any
            } else {
                DeviceChoice::Gpu
            };
            return Ok(Picked::Node(node, assigned, device));
        }
    }
}

/// A pick, with the chosen node's assignment counted and where the node
/// may run the job.
pub(super) enum Picked {
    Node(NodeId, Assigned, DeviceChoice),
    NoNodes,
    NoCapacity,
}
