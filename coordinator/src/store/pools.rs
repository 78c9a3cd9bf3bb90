//! Pools and routing per language pair: joining and leaving pools,
//! routing updates, the pick, and the view `/v1/pools` reads.

use super::*;

impl Store {
    /// Places a node in a pool of `pair` (idempotent) and returns the pool;
    /// it serves `kinds` there from now (no room yet: its routing entry
    /// says how much).
    pub async fn pool_join(
        &self,
        pair: LangPair,
        node: &NodeId,
        kinds: &[JobKind],
        max_nodes_per_pool: u32,
        lease: Duration,
    ) -> Result<String, StoreError> {
        let keys = PairKeys::new(pair);
        let mut call = Call::new(&self.scripts.pool_join, 5 + kinds.len());
        call.key(keys.members())
            .key(keys.pools())
            .key(keys.room())
            .key(keys.next_pool())
            .key(keys.leases());
        for kind in kinds {
            call.key(keys.served(&Route::gpu(kind)));
        }
        call.arg(node.as_str())
            .arg(max_nodes_per_pool)
            .arg(millis(lease));
        self.invoke("pool_join", &call).await
    }

    /// Takes a node out of `pair`: pool seat, lease and routing entries of
    /// `kinds` (GPU and fallback). Returns whether it was a member.
    pub async fn pool_leave(
        &self,
        pair: LangPair,
        node: &NodeId,
        kinds: &[JobKind],
    ) -> Result<bool, StoreError> {
        self.leave(pair, node, kinds, "").await
    }

    /// Takes `node` out of `pair` as [`Self::pool_leave`] does, but leaves
    /// it counted as serving its kinds until its lease deadline: its
    /// coordinator instance is stopping, and it is moving to another. Until
    /// it registers there, the pair's jobs wait for room instead of failing
    /// `no_nodes`.
    pub async fn pool_leave_moving(
        &self,
        pair: LangPair,
        node: &NodeId,
        kinds: &[JobKind],
    ) -> Result<bool, StoreError> {
        self.leave(pair, node, kinds, "moving").await
    }

    async fn leave(
        &self,
        pair: LangPair,
        node: &NodeId,
        kinds: &[JobKind],
        how: &str,
    ) -> Result<bool, StoreError> {
        let keys = PairKeys::new(pair);
        let routes: Vec<Route> = kinds
            .iter()
            .flat_map(|kind| [Route::gpu(kind), Route::fallback(kind)])
            .collect();
        let mut call = Call::new(&self.scripts.pool_leave, 6 + 3 * routes.len());
        call.key(keys.members())
            .key(keys.pools())
            .key(keys.room())
            .key(keys.leases())
            .key(keys.next_pool());
        for route in &routes {
            call.key(keys.route(route));
        }
        for route in &routes {
            call.key(keys.free(route));
        }
        for route in &routes {
            call.key(keys.served(route));
        }
        call.key(keys.memory());
        call.arg(node.as_str()).arg(routes.len()).arg(how);
        let was_member: i64 = self.invoke("pool_leave", &call).await?;
        Ok(was_member == 1)
    }

    /// Renews leases and routing entries of several nodes in one pair, in
    /// one call.
    pub async fn route_update(
        &self,
        pair: LangPair,
        entries: &[RouteEntry],
        lease: Duration,
    ) -> Result<RouteUpdated, StoreError> {
        let keys = PairKeys::new(pair);
        let mut routes: Vec<&Route> = entries.iter().flat_map(|e| e.free.keys()).collect();
        routes.sort_unstable();
        routes.dedup();
        let mut call = Call::new(&self.scripts.route_update, 3 + 3 * routes.len());
        call.key(keys.leases()).key(keys.memory());
        for route in &routes {
            call.key(keys.route(route));
        }
        for route in &routes {
            call.key(keys.free(route));
        }
        for route in &routes {
            call.key(keys.served(route));
        }
        call.key(keys.waiting());
        call.arg(millis(lease)).arg(routes.len());
        for entry in entries {
            let room = entry.room.as_ref().map_or_else(String::new, |room| {
                serde_json::to_string(room).unwrap_or_default()
            });
            call.arg(entry.node.as_str()).arg(room);
            for route in &routes {
                let free = entry.free.get(*route).map_or(-1, |&n| i64::from(n));
                call.arg(free);
            }
        }
        let (missing, waiting): (Vec<String>, Vec<String>) =
            self.invoke("route_update", &call).await?;
        Ok(RouteUpdated {
            missing: missing
                .into_iter()
                .filter_map(|id| NodeId::new(id).ok())
                .collect(),
            waiting,
        })
    }

    /// Records that `instance` has jobs waiting for room in each of
    /// `pairs`, for `ttl` (renewed while they wait).
    pub async fn waiting(
        &self,
        pairs: &[LangPair],
        instance: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let until = wall_clock_ms() + millis(ttl);
        futures_util::future::try_join_all(pairs.iter().map(|pair| {
            let mut conn = self.conn.clone();
            let key = PairKeys::new(*pair).waiting();
            async move {
                redis::cmd("ZADD")
                    .arg(key)
                    .arg(until)
                    .arg(instance)
                    .query_async::<()>(&mut conn)
                    .await
            }
        }))
        .await?;
        Ok(())
    }

    /// Chooses a node for a job attempt (one script call).
    pub async fn route_pick(
        &self,
        pair: LangPair,
        route: &Route,
        session: Option<&str>,
        affinity: Duration,
        policy: PickPolicy,
        excluded: &[NodeId],
    ) -> Result<Pick, StoreError> {
        let on = PickOn {
            route,
            session,
            affinity,
            policy,
            excluded,
        };
        let call = self.pick_call(&PairKeys::new(pair), &on, None);
        let reply: Vec<String> = self.invoke("route_pick", &call).await?;
        match reply.as_slice() {
            [status, node, _] if status == "ok" => {
                Ok(NodeId::new(node.as_str()).map_or(Pick::NoCapacity, Pick::Node))
            }
            [status] if status == "no_capacity" => Ok(Pick::NoCapacity),
            [status] if status == "no_nodes" => Ok(Pick::NoNodes),
            _ => Err(StoreError::Unexpected {
                script: "route_pick",
                reply: format!("{reply:?}"),
            }),
        }
    }

    /// Every non-empty pool, sorted by pair then pool id.
    pub async fn pools(&self) -> Result<Vec<PoolMembers>, StoreError> {
        let mut conn = self.conn.clone();
        let pairs: Vec<String> = redis::cmd("SMEMBERS")
            .arg(keys::ALL_PAIRS)
            .query_async(&mut conn)
            .await?;
        let mut pairs: Vec<LangPair> = pairs.iter().filter_map(|p| p.parse().ok()).collect();
        pairs.sort_unstable();
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let members: Vec<HashMap<String, String>> =
            futures_util::future::try_join_all(pairs.iter().map(|pair| {
                let mut conn = self.conn.clone();
                let key = PairKeys::new(*pair).members();
                async move { redis::cmd("HGETALL").arg(key).query_async(&mut conn).await }
            }))
            .await?;
        let mut views = Vec::new();
        let mut gone = Vec::new();
        for (pair, members) in pairs.iter().zip(members) {
            if members.is_empty() {
                gone.push(pair.to_string());
                continue;
            }
            let mut pools: BTreeMap<(usize, String), Vec<String>> = BTreeMap::new();
            for (node, pool) in members {
                pools.entry((pool.len(), pool)).or_default().push(node);
            }
            views.extend(pools.into_iter().map(|((_, pool), mut nodes)| {
                nodes.sort_unstable();
                PoolMembers {
                    pair: *pair,
                    pool,
                    nodes,
                }
            }));
        }
        let gone: Vec<&str> = gone.iter().map(String::as_str).collect();
        self.prune(keys::ALL_PAIRS, &gone).await?;
        Ok(views)
    }
}
