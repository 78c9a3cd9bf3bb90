//! Node records: registration (epochs), heartbeats, going offline,
//! draining, and the views `/v1/nodes` reads.

use super::*;

impl Store {
    /// Records a registration and returns its epoch, or the conflict.
    pub async fn register_node(
        &self,
        reg: &Registration<'_>,
    ) -> Result<RegisterOutcome, StoreError> {
        let keys = NodeKeys::new(reg.node_id);
        let mut call = Call::new(&self.scripts.register_node, 3);
        call.key(&keys.hash)
            .key(&keys.epoch)
            .key(&keys.lease)
            .arg(reg.instance)
            .arg(reg.coordinator)
            .arg(millis(reg.lease))
            .arg(if reg.draining { "draining" } else { "ready" })
            .arg(reg.fields.to_string())
            .arg(millis(reg.lease + reg.retention));
        let reply: Vec<Value> = self.invoke("register_node", &call).await?;
        let unexpected = || StoreError::Unexpected {
            script: "register_node",
            reply: format!("{reply:?}"),
        };
        match reply.as_slice() {
            [status, epoch, pairs, kinds, drained] if text(status).as_deref() == Some("ok") => {
                Ok(RegisterOutcome::Registered {
                    epoch: u64::from_redis_value_ref(epoch).map_err(|_| unexpected())?,
                    previous_pairs: json_list(pairs),
                    previous_kinds: json_list(kinds),
                    drained: i64::from_redis_value_ref(drained).map_err(|_| unexpected())? == 1,
                })
            }
            [status, holder] if text(status).as_deref() == Some("conflict") => {
                Ok(RegisterOutcome::Conflict {
                    holder: text(holder).unwrap_or_default(),
                })
            }
            _ => Err(unexpected()),
        }
    }

    /// Records a batch of heartbeats: each extends its node's lease, and
    /// its record's life by `lease` plus `retention`. The calls go out
    /// together (the connection pipelines them: about one round trip for
    /// the batch; on Redis Cluster, each to the master of its node's slot).
    /// Per heartbeat: `Some(false)` when its epoch is no longer current (or
    /// the node was marked offline since), `None` when the call failed.
    pub async fn heartbeats(
        &self,
        beats: &[((NodeId, u64), String)],
        (lease, retention): (Duration, Duration),
    ) -> Vec<Option<bool>> {
        let calls = beats.iter().map(|((node, epoch), capacity)| {
            let keys = NodeKeys::new(node);
            async move {
                let mut call = Call::new(&self.scripts.node_heartbeat, 3);
                call.key(&keys.hash)
                    .key(&keys.lease)
                    .key(&keys.epoch)
                    .arg(*epoch)
                    .arg(millis(lease))
                    .arg(capacity)
                    .arg(millis(lease + retention));
                let current: Result<i64, StoreError> = self.invoke("node_heartbeat", &call).await;
                current.ok().map(|current| current == 1)
            }
        });
        futures_util::future::join_all(calls).await
    }

    /// Marks a node offline; `false` when a newer registration exists.
    pub async fn node_offline(&self, node: &NodeId, epoch: u64) -> Result<bool, StoreError> {
        let keys = NodeKeys::new(node);
        let mut call = Call::new(&self.scripts.node_offline, 2);
        call.key(&keys.hash).key(&keys.lease).arg(epoch);
        let current: i64 = self.invoke("node_offline", &call).await?;
        Ok(current == 1)
    }

    /// Marks a node draining. `epoch` fences a node's own announcement;
    /// an admin request passes `None`.
    pub async fn drain_node(
        &self,
        node: &NodeId,
        epoch: Option<u64>,
    ) -> Result<DrainOutcome, StoreError> {
        let keys = NodeKeys::new(node);
        let mut call = Call::new(&self.scripts.node_drain, 2);
        call.key(&keys.hash)
            .key(&keys.lease)
            .arg(epoch.map(|e| e.to_string()).unwrap_or_default());
        let reply: Value = self.invoke("node_drain", &call).await?;
        let unexpected = || StoreError::Unexpected {
            script: "node_drain",
            reply: format!("{reply:?}"),
        };
        match &reply {
            Value::Nil => Ok(DrainOutcome::Unknown),
            Value::Array(items) => match items.as_slice() {
                [epoch, coordinator, pairs, kinds] => Ok(DrainOutcome::Draining {
                    epoch: u64::from_redis_value_ref(epoch).map_err(|_| unexpected())?,
                    coordinator: text(coordinator).unwrap_or_default(),
                    pairs: json_list(pairs),
                    kinds: json_list(kinds),
                }),
                _ => Err(unexpected()),
            },
            other => match text(other).as_deref() {
                Some("offline") => Ok(DrainOutcome::Offline),
                Some("stale") => Ok(DrainOutcome::Stale),
                _ => Err(unexpected()),
            },
        }
    }

    /// Adds a node and its pairs to the global indexes, and records the
    /// pools it holds on its node hash. Plain commands: these keys are
    /// read only by the admin API.
    pub async fn index_node(
        &self,
        node: &NodeId,
        pools: &BTreeMap<LangPair, String>,
    ) -> Result<(), StoreError> {
        // Three keys in three slots: three commands, sent together.
        let (mut a, mut b, mut c) = (self.conn.clone(), self.conn.clone(), self.conn.clone());
        let pools_json: BTreeMap<String, &String> =
            pools.iter().map(|(p, id)| (p.to_string(), id)).collect();
        let pairs: Vec<String> = pools.keys().map(LangPair::to_string).collect();
        let mut add_node = redis::cmd("SADD");
        add_node.arg(keys::ALL_NODES).arg(node.as_str());
        let mut add_pairs = redis::cmd("SADD");
        add_pairs.arg(keys::ALL_PAIRS).arg(&pairs);
        let mut set_pools = redis::cmd("HSET");
        set_pools
            .arg(NodeKeys::new(node).hash)
            .arg("pools")
            .arg(serde_json::to_string(&pools_json).expect("a map of strings serialises"));
        let (nodes, pairs, hash) = tokio::join!(
            add_node.query_async::<()>(&mut a),
            async {
                if pairs.is_empty() {
                    return Ok(());
                }
                add_pairs.query_async::<()>(&mut b).await
            },
            set_pools.query_async::<()>(&mut c),
        );
        nodes?;
        pairs?;
        hash?;
        Ok(())
    }

    /// One node, if it ever registered.
    pub async fn node(&self, node: &NodeId) -> Result<Option<NodeRecord>, StoreError> {
        let keys = NodeKeys::new(node);
        let mut conn = self.conn.clone();
        let (fields, alive): (HashMap<String, String>, bool) = redis::pipe()
            .hgetall(&keys.hash)
            .exists(&keys.lease)
            .query_async(&mut conn)
            .await?;
        Ok((!fields.is_empty()).then(|| NodeRecord {
            id: node.clone(),
            fields,
            alive,
        }))
    }

    /// Every node that ever registered, sorted by id.
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let mut ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(keys::ALL_NODES)
            .query_async(&mut conn)
            .await?;
        ids.sort_unstable();
        let ids: Vec<NodeId> = ids
            .into_iter()
            .filter_map(|id| NodeId::new(id).ok())
            .collect();
        let mut views = Vec::with_capacity(ids.len());
        let mut gone = Vec::new();
        // One node's keys share a slot; different nodes' do not. Requests
        // for a chunk of nodes go out together (the connection pipelines
        // them), each in its own slot.
        for chunk in ids.chunks(500) {
            let replies = futures_util::future::try_join_all(chunk.iter().map(|node| {
                let keys = NodeKeys::new(node);
                let mut conn = self.conn.clone();
                async move {
                    redis::pipe()
                        .hgetall(&keys.hash)
                        .exists(&keys.lease)
                        .query_async::<(HashMap<String, String>, bool)>(&mut conn)
                        .await
                }
            }))
            .await?;
            for (id, (fields, alive)) in chunk.iter().zip(replies) {
                if fields.is_empty() {
                    gone.push(id.as_str());
                } else {
                    views.push(NodeRecord {
                        id: id.clone(),
                        fields,
                        alive,
                    });
                }
            }
        }
        self.prune(keys::ALL_NODES, &gone).await?;
        Ok(views)
    }

    /// Removes from an index set the members whose records are gone
    /// (expired nodes, pairs nobody serves). A member re-added between the
    /// read and this call is missing from the index until its next
    /// registration; the routing keys themselves are not touched.
    pub(super) async fn prune(&self, index: &str, gone: &[&str]) -> Result<(), StoreError> {
        if gone.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        redis::cmd("SREM")
            .arg(index)
            .arg(gone)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }
}
