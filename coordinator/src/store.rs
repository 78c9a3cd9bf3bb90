//! Everything the coordinator keeps in Redis, behind typed methods.
//!
//! State changes go through the Lua scripts in `lua/` (loaded once by SHA,
//! reloaded on NOSCRIPT by `redis::Script`); reads for the admin API are
//! plain commands. Each script call touches keys of one hash tag only.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lingua_shared::{JobId, JobKind, LangPair, NodeId};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, RedisFuture, Script, ScriptInvocation, Value};
use serde::Serialize;

use crate::config::PickPolicy;
use crate::keys::{self, InstanceKeys, NodeKeys, PairKeys};
use crate::metrics::Metrics;

/// A Redis failure, or a reply the scripts never give.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The Redis call failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A script answered something it is not written to answer.
    #[error("unexpected reply from {script}: {reply}")]
    Unexpected {
        /// The script.
        script: &'static str,
        /// The reply, for the log.
        reply: String,
    },
}

/// The Lua scripts, compiled in.
struct Scripts {
    register_node: Script,
    node_heartbeat: Script,
    node_offline: Script,
    node_drain: Script,
    pool_join: Script,
    pool_leave: Script,
    route_update: Script,
    route_pick: Script,
    job_start: Script,
    job_attempt: Script,
    job_finish: Script,
    job_expire: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            register_node: Script::new(include_str!("../../lua/register_node.lua")),
            node_heartbeat: Script::new(include_str!("../../lua/node_heartbeat.lua")),
            node_offline: Script::new(include_str!("../../lua/node_offline.lua")),
            node_drain: Script::new(include_str!("../../lua/node_drain.lua")),
            pool_join: Script::new(include_str!("../../lua/pool_join.lua")),
            pool_leave: Script::new(include_str!("../../lua/pool_leave.lua")),
            route_update: Script::new(include_str!("../../lua/route_update.lua")),
            route_pick: Script::new(include_str!("../../lua/route_pick.lua")),
            job_start: Script::new(include_str!("../../lua/job_start.lua")),
            job_attempt: Script::new(include_str!("../../lua/job_attempt.lua")),
            job_finish: Script::new(include_str!("../../lua/job_finish.lua")),
            job_expire: Script::new(include_str!("../../lua/job_expire.lua")),
        }
    }
}

/// What a node registers with: stored as given, shown by `/v1/nodes`.
#[derive(Debug, Clone)]
pub struct Registration<'a> {
    /// The node.
    pub node_id: &'a NodeId,
    /// The agent process's random instance id.
    pub instance: &'a str,
    /// The coordinator instance that holds the socket.
    pub coordinator: &'a str,
    /// `true` when the node registers while draining.
    pub draining: bool,
    /// How long the registration lives without a heartbeat.
    pub lease: Duration,
    /// How long the node's record outlives its last sign of life.
    pub retention: Duration,
    /// JSON strings of the node's fields (see `register_node.lua`).
    pub fields: serde_json::Value,
}

/// The answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterOutcome {
    /// Registered with this epoch; these were the node's pairs before.
    Registered {
        /// The new epoch.
        epoch: u64,
        /// Pairs recorded by the previous registration.
        previous_pairs: Vec<LangPair>,
        /// Kinds recorded by the previous registration.
        previous_kinds: Vec<JobKind>,
        /// An admin drained this agent process before: it stays draining.
        drained: bool,
    },
    /// Another live agent instance holds the id.
    Conflict {
        /// That agent's instance id: for the coordinator's log only, never
        /// for the refused connection (it would let it take the id over).
        holder: String,
    },
}

/// The answer to a drain request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainOutcome {
    /// The node is live and now draining.
    Draining {
        /// Its current epoch.
        epoch: u64,
        /// The coordinator instance holding its socket.
        coordinator: String,
        /// Its pairs.
        pairs: Vec<LangPair>,
        /// Its kinds.
        kinds: Vec<JobKind>,
    },
    /// The node is known but has no live lease.
    Offline,
    /// The epoch given is not the current one.
    Stale,
    /// No such node.
    Unknown,
}

/// The answer to a pick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pick {
    /// This node.
    Node(NodeId),
    /// Live nodes serve the pair and kind, none reported room.
    NoCapacity,
    /// No live node serves the pair and kind.
    NoNodes,
}

/// The answer to [`Store::job_start`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobStart {
    /// Created, attempt 1 recorded.
    New,
    /// The same request is already known.
    Exists,
    /// The id belongs to a different request.
    Conflict,
}

/// How [`Store::job_finish`] went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// Recorded: this was the job's terminal state.
    Applied,
    /// The job had already ended.
    Duplicate,
    /// The attempt was superseded.
    Stale,
    /// The current attempt belongs to another node: the reporter has no
    /// say in this job.
    Foreign {
        /// The node the attempt was assigned to.
        assigned: String,
    },
}

/// One job as Redis holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// `running`, `completed` or `failed`.
    pub status: String,
    /// The current (or last) attempt.
    pub attempt: u32,
    /// The node of the current (or last) attempt.
    pub node: Option<String>,
    /// The terminal outcome (output, or error), as stored.
    pub outcome: Option<serde_json::Value>,
    /// Submission to terminal state, ms.
    pub latency_ms: Option<u64>,
    /// When the job times out, ms since the epoch (Redis's clock).
    pub deadline_ms: Option<u64>,
    /// The canonical request JSON.
    pub request: String,
}

/// One node as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    /// The node id.
    pub id: String,
    /// `ready`, `draining` or `offline`.
    pub state: String,
    /// Languages it recognises.
    pub src_langs: serde_json::Value,
    /// Languages it produces.
    pub tgt_langs: serde_json::Value,
    /// Job kinds it runs.
    pub kinds: serde_json::Value,
    /// The pool it holds in each of its pairs.
    pub pools: serde_json::Value,
    /// Its last reported capacity.
    pub capacity: serde_json::Value,
    /// Its GPUs.
    pub gpus: serde_json::Value,
    /// When it was last heard from, in ms since the Unix epoch.
    pub last_seen_ms: u64,
    /// Its current registration epoch.
    pub epoch: u64,
    /// The agent's version.
    pub agent_version: String,
}

/// One pool as the admin API shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PoolView {
    /// The language pair.
    pub pair: String,
    /// The pool's id within the pair.
    pub pool: String,
    /// Its members, sorted.
    pub nodes: Vec<String>,
}

/// One node's routing entry in one pair, for [`Store::route_update`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    /// The node.
    pub node: NodeId,
    /// Free slots per kind; kinds absent here are not served.
    pub free: BTreeMap<JobKind, u32>,
}

/// A connection to one Redis or to a Redis Cluster: both reconnect by
/// themselves, and both multiplex concurrent requests.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// How long connecting, or one reply, may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// The coordinator's handle on Redis. Cheap to clone.
///
/// Every script keeps its keys in one hash slot, and no pipeline spans
/// slots, so the same code runs on one Redis and on Redis Cluster.
#[derive(Clone)]
pub struct Store {
    conn: Conn,
    target: Arc<Target>,
    scripts: Arc<Scripts>,
    metrics: Arc<Metrics>,
}

/// Where a store connects, kept to open a dedicated connection.
enum Target {
    Single(String),
    Cluster(Vec<String>),
}

/// The consumer group every instance reads its own inbox with.
const INBOX_GROUP: &str = "lingua";
/// Inbox entries kept at most (older ones are trimmed).
const INBOX_MAX: u32 = 100_000;

impl Store {
    /// Connects to Redis at `url` and checks that it answers.
    pub async fn connect(url: &str, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Self::checked(Conn::Single(conn), Target::Single(url.to_owned()), metrics).await
    }

    /// Connects to the Redis Cluster that `seeds` (URLs of some of its
    /// nodes) belong to, and checks that it answers.
    pub async fn connect_cluster(
        seeds: &[String],
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let client = ClusterClientBuilder::new(seeds.iter().map(String::as_str))
            .connection_timeout(REDIS_TIMEOUT)
            .response_timeout(REDIS_TIMEOUT)
            .retries(2)
            .build()?;
        let conn = client.get_async_connection().await?;
        Self::checked(
            Conn::Cluster(conn),
            Target::Cluster(seeds.to_vec()),
            metrics,
        )
        .await
    }

    /// A store on a connection of its own, for blocking reads that must
    /// not hold up everyone else's commands.
    pub async fn dedicated(&self) -> Result<Self, StoreError> {
        match &*self.target {
            Target::Single(url) => Self::connect(url, self.metrics.clone()).await,
            Target::Cluster(seeds) => Self::connect_cluster(seeds, self.metrics.clone()).await,
        }
    }

    async fn checked(
        conn: Conn,
        target: Target,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let store = Self {
            conn,
            target: Arc::new(target),
            scripts: Arc::new(Scripts::new()),
            metrics,
        };
        store.ping().await?;
        Ok(store)
    }

    /// PING.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING").query_async::<()>(&mut conn).await?;
        Ok(())
    }

    async fn invoke<T: FromRedisValue>(
        &self,
        name: &'static str,
        invocation: ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        let started = Instant::now();
        let reply = invocation.invoke_async(&mut conn).await;
        self.metrics.observe_script(name, started.elapsed());
        Ok(reply?)
    }

    /// Records a registration and returns its epoch, or the conflict.
    pub async fn register_node(
        &self,
        reg: &Registration<'_>,
    ) -> Result<RegisterOutcome, StoreError> {
        let keys = NodeKeys::new(reg.node_id);
        let mut invocation = self.scripts.register_node.prepare_invoke();
        invocation
            .key(&keys.hash)
            .key(&keys.epoch)
            .key(&keys.lease)
            .arg(reg.instance)
            .arg(reg.coordinator)
            .arg(millis(reg.lease))
            .arg(if reg.draining { "draining" } else { "ready" })
            .arg(reg.fields.to_string())
            .arg(millis(reg.lease + reg.retention));
        let reply: Vec<Value> = self.invoke("register_node", invocation).await?;
        let unexpected = || StoreError::Unexpected {
            script: "register_node",
            reply: format!("{reply:?}"),
        };
        match reply.as_slice() {
            [status, epoch, pairs, kinds, drained] if text(status).as_deref() == Some("ok") => {
                Ok(RegisterOutcome::Registered {
                    epoch: u64::from_redis_value(epoch.clone()).map_err(|_| unexpected())?,
                    previous_pairs: json_list(pairs),
                    previous_kinds: json_list(kinds),
                    drained: i64::from_redis_value(drained.clone()).map_err(|_| unexpected())? == 1,
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

    /// Extends a node's lease, and its record's life by `lease` plus
    /// `retention`; `false` when `epoch` is no longer current.
    pub async fn heartbeat(
        &self,
        node: &NodeId,
        epoch: u64,
        (lease, retention): (Duration, Duration),
        capacity: &str,
    ) -> Result<bool, StoreError> {
        let keys = NodeKeys::new(node);
        let mut invocation = self.scripts.node_heartbeat.prepare_invoke();
        invocation
            .key(&keys.hash)
            .key(&keys.lease)
            .key(&keys.epoch)
            .arg(epoch)
            .arg(millis(lease))
            .arg(capacity)
            .arg(millis(lease + retention));
        let current: i64 = self.invoke("node_heartbeat", invocation).await?;
        Ok(current == 1)
    }

    /// Marks a node offline; `false` when a newer registration exists.
    pub async fn node_offline(&self, node: &NodeId, epoch: u64) -> Result<bool, StoreError> {
        let keys = NodeKeys::new(node);
        let mut invocation = self.scripts.node_offline.prepare_invoke();
        invocation.key(&keys.hash).key(&keys.lease).arg(epoch);
        let current: i64 = self.invoke("node_offline", invocation).await?;
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
        let mut invocation = self.scripts.node_drain.prepare_invoke();
        invocation
            .key(&keys.hash)
            .key(&keys.lease)
            .arg(epoch.map(|e| e.to_string()).unwrap_or_default());
        let reply: Value = self.invoke("node_drain", invocation).await?;
        let unexpected = || StoreError::Unexpected {
            script: "node_drain",
            reply: format!("{reply:?}"),
        };
        match &reply {
            Value::Nil => Ok(DrainOutcome::Unknown),
            Value::Array(items) => match items.as_slice() {
                [epoch, coordinator, pairs, kinds] => Ok(DrainOutcome::Draining {
                    epoch: u64::from_redis_value(epoch.clone()).map_err(|_| unexpected())?,
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

    /// Places a node in a pool of `pair` (idempotent) and returns the pool.
    pub async fn pool_join(
        &self,
        pair: LangPair,
        node: &NodeId,
        max_nodes_per_pool: u32,
        lease: Duration,
    ) -> Result<String, StoreError> {
        let keys = PairKeys::new(pair);
        let mut invocation = self.scripts.pool_join.prepare_invoke();
        invocation
            .key(&keys.members)
            .key(&keys.pools)
            .key(&keys.room)
            .key(&keys.next_pool)
            .key(&keys.leases)
            .arg(node.as_str())
            .arg(max_nodes_per_pool)
            .arg(millis(lease));
        self.invoke("pool_join", invocation).await
    }

    /// Takes a node out of `pair`: pool seat, lease and routing entries of
    /// `kinds`. Returns whether it was a member.
    pub async fn pool_leave(
        &self,
        pair: LangPair,
        node: &NodeId,
        kinds: &[JobKind],
    ) -> Result<bool, StoreError> {
        let keys = PairKeys::new(pair);
        let mut invocation = self.scripts.pool_leave.prepare_invoke();
        invocation
            .key(&keys.members)
            .key(&keys.pools)
            .key(&keys.room)
            .key(&keys.leases)
            .key(&keys.next_pool);
        for kind in kinds {
            invocation.key(keys.route(kind));
        }
        for kind in kinds {
            invocation.key(keys.free(kind));
        }
        invocation.arg(node.as_str()).arg(kinds.len());
        let was_member: i64 = self.invoke("pool_leave", invocation).await?;
        Ok(was_member == 1)
    }

    /// Renews leases and routing entries of several nodes in one pair, in
    /// one call. Returns the nodes that are no longer members of the pair.
    pub async fn route_update(
        &self,
        pair: LangPair,
        entries: &[RouteEntry],
        lease: Duration,
    ) -> Result<Vec<NodeId>, StoreError> {
        let keys = PairKeys::new(pair);
        let mut kinds: Vec<&JobKind> = entries.iter().flat_map(|e| e.free.keys()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        let mut invocation = self.scripts.route_update.prepare_invoke();
        invocation.key(&keys.leases);
        for kind in &kinds {
            invocation.key(keys.route(kind));
        }
        for kind in &kinds {
            invocation.key(keys.free(kind));
        }
        invocation.arg(millis(lease)).arg(kinds.len());
        for entry in entries {
            invocation.arg(entry.node.as_str());
            for kind in &kinds {
                let free = entry.free.get(*kind).map_or(-1, |&n| i64::from(n));
                invocation.arg(free);
            }
        }
        let missing: Vec<String> = self.invoke("route_update", invocation).await?;
        Ok(missing
            .into_iter()
            .filter_map(|id| NodeId::new(id).ok())
            .collect())
    }

    /// Chooses a node for a job attempt (one script call).
    pub async fn route_pick(
        &self,
        pair: LangPair,
        kind: &JobKind,
        session: Option<&str>,
        affinity: Duration,
        policy: PickPolicy,
        excluded: &[NodeId],
    ) -> Result<Pick, StoreError> {
        let keys = PairKeys::new(pair);
        let mut invocation = self.scripts.route_pick.prepare_invoke();
        invocation
            .key(keys.route(kind))
            .key(keys.free(kind))
            .key(&keys.leases)
            .key(keys.session(session.unwrap_or("")))
            .arg(if session.is_some() { "1" } else { "0" })
            .arg(millis(affinity))
            .arg(policy.as_str());
        for node in excluded {
            invocation.arg(node.as_str());
        }
        let reply: Vec<String> = self.invoke("route_pick", invocation).await?;
        match reply.as_slice() {
            [status, node] if status == "ok" => {
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

    /// Creates a job with its first attempt on `node` (`None`: a job that
    /// fails before reaching any node), or finds it.
    pub async fn job_start(
        &self,
        id: &JobId,
        request: &str,
        node: Option<&NodeId>,
        timeout: Duration,
        lifetime: Duration,
        coordinator: &str,
    ) -> Result<JobStart, StoreError> {
        let mut invocation = self.scripts.job_start.prepare_invoke();
        invocation
            .key(keys::job(id))
            .arg(request)
            .arg(node.map_or("", NodeId::as_str))
            .arg(millis(lifetime))
            .arg(coordinator)
            .arg(millis(timeout));
        let reply: Vec<Value> = self.invoke("job_start", invocation).await?;
        match reply.first().and_then(text).as_deref() {
            Some("new") => Ok(JobStart::New),
            Some("exists") => Ok(JobStart::Exists),
            Some("conflict") => Ok(JobStart::Conflict),
            _ => Err(StoreError::Unexpected {
                script: "job_start",
                reply: format!("{reply:?}"),
            }),
        }
    }

    /// Moves a running job from attempt `current` to a new one on `node`.
    /// Returns the new attempt, or `None` when the job ended or moved on.
    pub async fn job_attempt(
        &self,
        id: &JobId,
        current: u32,
        node: &NodeId,
    ) -> Result<Option<u32>, StoreError> {
        let mut invocation = self.scripts.job_attempt.prepare_invoke();
        invocation
            .key(keys::job(id))
            .arg(current)
            .arg(node.as_str());
        let attempt: u32 = self.invoke("job_attempt", invocation).await?;
        Ok((attempt > 0).then_some(attempt))
    }

    /// Records the terminal state produced by `attempt`.
    pub async fn job_finish(
        &self,
        id: &JobId,
        (reporter, attempt): (Option<&NodeId>, u32),
        completed: bool,
        outcome: &serde_json::Value,
        retention: Duration,
    ) -> Result<Finish, StoreError> {
        let mut invocation = self.scripts.job_finish.prepare_invoke();
        invocation
            .key(keys::job(id))
            .arg(attempt)
            .arg(if completed { "completed" } else { "failed" })
            .arg(outcome.to_string())
            .arg(millis(retention))
            .arg(reporter.map_or("", NodeId::as_str));
        let reply: Value = self.invoke("job_finish", invocation).await?;
        let unexpected = || StoreError::Unexpected {
            script: "job_finish",
            reply: format!("{reply:?}"),
        };
        if let Value::Array(items) = &reply {
            return match items.as_slice() {
                [status, assigned] if text(status).as_deref() == Some("foreign") => {
                    Ok(Finish::Foreign {
                        assigned: text(assigned).unwrap_or_default(),
                    })
                }
                _ => Err(unexpected()),
            };
        }
        match text(&reply).as_deref() {
            Some("applied") => Ok(Finish::Applied),
            Some("duplicate") => Ok(Finish::Duplicate),
            Some("stale") => Ok(Finish::Stale),
            _ => Err(unexpected()),
        }
    }

    /// Records a job still running past its deadline plus `grace` as
    /// failed with `outcome`: its dispatcher and its result are gone.
    pub async fn job_expire(
        &self,
        id: &JobId,
        grace: Duration,
        outcome: &serde_json::Value,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        let mut invocation = self.scripts.job_expire.prepare_invoke();
        invocation
            .key(keys::job(id))
            .arg(millis(grace))
            .arg(outcome.to_string())
            .arg(millis(retention));
        let reply: String = self.invoke("job_expire", invocation).await?;
        match reply.as_str() {
            "expired" => Ok(true),
            "running" | "ended" | "missing" => Ok(false),
            _ => Err(StoreError::Unexpected {
                script: "job_expire",
                reply,
            }),
        }
    }

    /// Announces (or renews) coordinator `instance`, serving on `listen`,
    /// for `ttl`.
    pub async fn instance_alive(
        &self,
        instance: &str,
        listen: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let keys = InstanceKeys::new(instance);
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(&keys.presence)
            .arg(listen)
            .arg("PX")
            .arg(millis(ttl))
            .query_async::<()>(&mut conn)
            .await?;
        redis::cmd("ZADD")
            .arg(keys::ALL_INSTANCES)
            .arg(wall_clock_ms() + millis(ttl))
            .arg(instance)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Whether coordinator `instance` is alive.
    pub async fn instance_present(&self, instance: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("EXISTS")
            .arg(InstanceKeys::new(instance).presence)
            .query_async(&mut conn)
            .await?)
    }

    /// Removes an instance: its presence, its inbox, its index entry.
    pub async fn instance_gone(&self, instance: &str) -> Result<(), StoreError> {
        let keys = InstanceKeys::new(instance);
        let mut conn = self.conn.clone();
        redis::cmd("DEL")
            .arg(&keys.presence)
            .arg(&keys.inbox)
            .query_async::<()>(&mut conn)
            .await?;
        redis::cmd("ZREM")
            .arg(keys::ALL_INSTANCES)
            .arg(instance)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Cleans up after instances whose presence ran out (they died
    /// without saying so): returns their ids.
    pub async fn reap_instances(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        let overdue: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(keys::ALL_INSTANCES)
            .arg("-inf")
            .arg(wall_clock_ms())
            .arg("LIMIT")
            .arg(0)
            .arg(100)
            .query_async(&mut conn)
            .await?;
        let mut reaped = Vec::new();
        for instance in overdue {
            if !self.instance_present(&instance).await? {
                self.instance_gone(&instance).await?;
                reaped.push(instance);
            }
        }
        Ok(reaped)
    }

    /// The instance holding `node`'s socket, as last registered.
    pub async fn node_holder(&self, node: &NodeId) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("HGET")
            .arg(NodeKeys::new(node).hash)
            .arg("coordinator")
            .query_async(&mut conn)
            .await?)
    }

    /// The instance dispatching job `id`.
    pub async fn job_dispatcher(&self, id: &JobId) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("HGET")
            .arg(keys::job(id))
            .arg("coordinator")
            .query_async(&mut conn)
            .await?)
    }

    /// Creates `instance`'s inbox and its consumer group, if missing.
    pub async fn inbox_open(&self, instance: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(InstanceKeys::new(instance).inbox)
            .arg(INBOX_GROUP)
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Err(err) if err.code() == Some("BUSYGROUP") => Ok(()),
            other => Ok(other?),
        }
    }

    /// Appends `message` to `instance`'s inbox.
    pub async fn inbox_push(&self, instance: &str, message: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        // NOMKSTREAM: a message for an instance that is gone (its inbox
        // reaped) is dropped rather than recreating the inbox forever.
        redis::cmd("XADD")
            .arg(InstanceKeys::new(instance).inbox)
            .arg("NOMKSTREAM")
            .arg("MAXLEN")
            .arg("~")
            .arg(INBOX_MAX)
            .arg("*")
            .arg("m")
            .arg(message)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Waits up to `block` for messages in `instance`'s inbox; returns
    /// their ids and texts. Read them on a [`Store::dedicated`] store.
    pub async fn inbox_read(
        &self,
        instance: &str,
        block: Duration,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut conn = self.conn.clone();
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(INBOX_GROUP)
            .arg(instance)
            .arg("COUNT")
            .arg(256)
            .arg("BLOCK")
            .arg(millis(block))
            .arg("STREAMS")
            .arg(InstanceKeys::new(instance).inbox)
            .arg(">")
            .query_async(&mut conn)
            .await?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(|entry| {
                let text = entry.get::<String>("m").unwrap_or_default();
                (entry.id, text)
            })
            .collect())
    }

    /// Acknowledges and deletes inbox entries.
    pub async fn inbox_ack(&self, instance: &str, ids: &[String]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let inbox = InstanceKeys::new(instance).inbox;
        let mut conn = self.conn.clone();
        redis::pipe()
            .cmd("XACK")
            .arg(&inbox)
            .arg(INBOX_GROUP)
            .arg(ids)
            .ignore()
            .cmd("XDEL")
            .arg(&inbox)
            .arg(ids)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// A job, if Redis still holds it.
    pub async fn job(&self, id: &JobId) -> Result<Option<JobRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let mut fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(keys::job(id))
            .query_async(&mut conn)
            .await?;
        let Some(status) = fields.remove("status") else {
            return Ok(None);
        };
        Ok(Some(JobRecord {
            status,
            attempt: fields
                .get("attempt")
                .and_then(|a| a.parse().ok())
                .unwrap_or(0),
            node: fields.remove("node"),
            outcome: fields
                .get("outcome")
                .and_then(|o| serde_json::from_str(o).ok()),
            latency_ms: fields.get("latency_ms").and_then(|l| l.parse().ok()),
            deadline_ms: fields.get("deadline_ms").and_then(|d| d.parse().ok()),
            request: fields.remove("request").unwrap_or_default(),
        }))
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
    pub async fn node(&self, node: &NodeId) -> Result<Option<NodeView>, StoreError> {
        let keys = NodeKeys::new(node);
        let mut conn = self.conn.clone();
        let (fields, alive): (HashMap<String, String>, bool) = redis::pipe()
            .hgetall(&keys.hash)
            .exists(&keys.lease)
            .query_async(&mut conn)
            .await?;
        Ok((!fields.is_empty()).then(|| node_view(node.as_str(), fields, alive)))
    }

    /// Every node that ever registered, sorted by id.
    pub async fn nodes(&self) -> Result<Vec<NodeView>, StoreError> {
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
                    views.push(node_view(id.as_str(), fields, alive));
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
    async fn prune(&self, index: &str, gone: &[&str]) -> Result<(), StoreError> {
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

    /// Every non-empty pool, sorted by pair then pool id.
    pub async fn pools(&self) -> Result<Vec<PoolView>, StoreError> {
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
                let key = PairKeys::new(*pair).members;
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
                PoolView {
                    pair: pair.to_string(),
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

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn text(value: &Value) -> Option<String> {
    String::from_redis_value(value.clone()).ok()
}

fn json_list<T: serde::de::DeserializeOwned>(value: &Value) -> Vec<T> {
    text(value)
        .and_then(|json| serde_json::from_str(&json).ok())
        .unwrap_or_default()
}

fn node_view(id: &str, mut fields: HashMap<String, String>, alive: bool) -> NodeView {
    let mut json = |name: &str| {
        fields
            .remove(name)
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or(serde_json::Value::Null)
    };
    let src_langs = json("src_langs");
    let tgt_langs = json("tgt_langs");
    let kinds = json("kinds");
    let pools = json("pools");
    let capacity = json("capacity");
    let gpus = json("gpus");
    let number = |fields: &HashMap<String, String>, name: &str| {
        fields.get(name).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let state = match fields.get("state").map(String::as_str) {
        Some("draining") if alive => "draining",
        Some("ready") if alive => "ready",
        _ => "offline",
    };
    // An offline node holds no pool seat (pool_leave ran, or its pair
    // leases expired): do not show the last ones it had.
    let pools = if state == "offline" {
        serde_json::json!({})
    } else {
        pools
    };
    NodeView {
        id: id.to_owned(),
        state: state.to_owned(),
        src_langs,
        tgt_langs,
        kinds,
        pools,
        capacity,
        gpus,
        last_seen_ms: number(&fields, "last_seen_ms"),
        epoch: number(&fields, "epoch"),
        agent_version: fields.remove("agent_version").unwrap_or_default(),
    }
}

/// Milliseconds since the Unix epoch by this host's clock.
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
