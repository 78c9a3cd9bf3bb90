//! Everything the coordinator keeps in Redis, behind typed methods.
//!
//! State changes go through the Lua scripts in `lua/` (loaded once by SHA,
//! reloaded on NOSCRIPT by `call::Call::run`); reads for the admin API are
//! plain commands. Each script call touches keys of one hash tag only.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lingua_shared::room::Room;
use lingua_shared::{JobId, JobKind, LangPair, NodeId};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, RedisFuture, Script, TlsCertificates, Value};
use serde::Serialize;

use crate::config::PickPolicy;
pub use crate::keys::Route;
use crate::keys::{self, InstanceKeys, NodeKeys, PairKey, PairKeys};
use crate::metrics::Metrics;
use call::Call;

mod call;
mod instances;
mod jobs;
mod masters;
mod nodes;
mod pools;
mod version;

pub use jobs::{Adopted, JobPick, JobRecord, JobStart, NewJob, PickOn};

/// A Redis failure, or a reply the scripts never give.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The Redis call failed (or its reply did not come in time).
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The CA file for `rediss://` cannot be read.
    #[error("redis.ca_file {path}: {message}")]
    CaFile {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Redis is older than the coordinator needs.
    #[error("Redis {found} is too old: the coordinator needs 7.0 or later; upgrade redis-server")]
    TooOld {
        /// The version Redis names.
        found: String,
    },
    /// A script answered something it is not written to answer.
    #[error("unexpected reply from {script}: {reply}")]
    Unexpected {
        /// The script.
        script: &'static str,
        /// The reply, for the log.
        reply: String,
    },
}

impl StoreError {
    /// Whether the call may have run all the same: its reply did not come
    /// in time, or its connection dropped once it could have been sent.
    pub fn may_have_run(&self) -> bool {
        matches!(self, Self::Redis(err) if err.is_timeout()
            || (err.is_connection_dropped() && !err.is_connection_refusal()))
    }
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
    job_finish: Script,
    job_expire: Script,
    job_adopt: Script,
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
            job_finish: Script::new(include_str!("../../lua/job_finish.lua")),
            job_expire: Script::new(include_str!("../../lua/job_expire.lua")),
            job_adopt: Script::new(include_str!("../../lua/job_adopt.lua")),
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

/// How [`Store::job_finish`] went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// Recorded: this was the job's terminal state.
    Applied {
        /// Submission to now.
        latency_ms: u64,
    },
    /// Recorded, but as a failure (`timeout`, the recorded `outcome`):
    /// the node's outcome came after the job's deadline.
    Late {
        /// Submission to now.
        latency_ms: u64,
        /// The outcome recorded (the JSON of the job's `Ended`).
        outcome: String,
    },
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

/// Where a job stands: the `status` field of its hash and of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Recorded, waiting for room: no node yet.
    Queued,
    /// Dispatched, no terminal state yet.
    Running,
    /// Ended with output.
    Completed,
    /// Ended with an error.
    Failed,
}

impl JobStatus {
    /// The status as Redis and the API write it.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
        }
    }

    /// The status a hash holds, if it is one of ours.
    pub fn parse(text: &str) -> Option<Self> {
        [
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Completed,
            JobStatus::Failed,
        ]
        .into_iter()
        .find(|status| status.as_str() == text)
    }

    /// True once completed or failed.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Completed | JobStatus::Failed)
    }
}

impl PartialEq<&str> for JobStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// One node's hash as Redis holds it, and whether its lease is live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// The node id.
    pub id: NodeId,
    /// The fields of its hash (docs/REDIS_DATA_MODEL.md).
    pub fields: HashMap<String, String>,
    /// Whether its lease is live.
    pub alive: bool,
}

/// The members of one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolMembers {
    /// The language pair.
    pub pair: LangPair,
    /// The pool's id within the pair.
    pub pool: String,
    /// Its members, sorted.
    pub nodes: Vec<String>,
}

/// What [`Store::route_update`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteUpdated {
    /// Nodes no longer members of the pair (their lease ran out).
    pub missing: Vec<NodeId>,
    /// Coordinator instances with jobs waiting for room in the pair.
    pub waiting: Vec<String>,
}

/// One node's routing entry in one pair, for [`Store::route_update`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    /// The node.
    pub node: NodeId,
    /// Free slots per route (a kind's GPU room, and its fallback room
    /// where it has one); routes absent here are not served.
    pub free: BTreeMap<Route, u32>,
    /// Its room, when it reports one: picks then shrink every kind's
    /// hint, not only the picked kind's.
    pub room: Option<Room>,
}

/// A connection to one Redis or to a Redis Cluster: both reconnect by
/// themselves, and both multiplex concurrent requests. On the Cluster,
/// script calls and one-key writes go straight to their slot's master.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection, Arc<masters::Masters>),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn, masters) => Box::pin(masters.send(conn, cmd)),
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
            Self::Cluster(conn, _) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn, _) => conn.get_db(),
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

/// Where a store connects (and the CA it trusts for `rediss://`), kept to
/// open a dedicated connection.
enum Target {
    Single(String, Option<PathBuf>),
    Cluster(Vec<String>, Option<PathBuf>),
}

/// The CA of `ca_file` as redis-rs takes it (none: the system's roots).
fn certificates(ca_file: Option<&Path>) -> Result<TlsCertificates, StoreError> {
    let root_cert = ca_file
        .map(|path| {
            std::fs::read(path).map_err(|e| StoreError::CaFile {
                path: path.display().to_string(),
                message: format!("cannot read it ({e})"),
            })
        })
        .transpose()?;
    Ok(TlsCertificates {
        client_tls: None,
        root_cert,
    })
}

/// The consumer group every instance reads its own inbox with.
const INBOX_GROUP: &str = "lingua";
/// Inbox entries kept at most (older ones are trimmed).
const INBOX_MAX: u32 = 100_000;

impl Store {
    /// Connects to Redis at `url` and checks that it answers.
    pub async fn connect(url: &str, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        Self::connect_tls(url, None, metrics).await
    }

    /// Connects to Redis at `url`, trusting `ca_file` (instead of the
    /// system's roots) for `rediss://`, and checks that it answers.
    pub async fn connect_tls(
        url: &str,
        ca_file: Option<&Path>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let client = match ca_file {
            Some(_) => redis::Client::build_with_tls(url, certificates(ca_file)?)?,
            None => redis::Client::open(url)?,
        };
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client, config).await?;
        let target = Target::Single(url.to_owned(), ca_file.map(Path::to_path_buf));
        Self::checked(Conn::Single(conn), target, metrics).await
    }

    /// Connects to the Redis Cluster that `seeds` (URLs of some of its
    /// nodes) belong to, and checks that it answers.
    /// With `ca_file`, `rediss://` nodes are trusted by it instead of the
    /// system's roots.
    pub async fn connect_cluster(
        seeds: &[String],
        ca_file: Option<&Path>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let mut builder = ClusterClientBuilder::new(seeds.iter().map(String::as_str))
            .connection_timeout(REDIS_TIMEOUT)
            .response_timeout(REDIS_TIMEOUT)
            .retries(2);
        if ca_file.is_some() {
            builder = builder.certs(certificates(ca_file)?);
        }
        let conn = builder.build()?.get_async_connection().await?;
        let seed = seeds.first().map_or("", String::as_str);
        let masters = masters::Masters::new(seed, ca_file, metrics.clone())?;
        let target = Target::Cluster(seeds.to_vec(), ca_file.map(Path::to_path_buf));
        Self::checked(Conn::Cluster(conn, masters), target, metrics).await
    }

    /// A store on a connection of its own, for blocking reads that must
    /// not hold up everyone else's commands.
    pub async fn dedicated(&self) -> Result<Self, StoreError> {
        match &*self.target {
            Target::Single(url, ca) => {
                Self::connect_tls(url, ca.as_deref(), self.metrics.clone()).await
            }
            Target::Cluster(seeds, ca) => {
                Self::connect_cluster(seeds, ca.as_deref(), self.metrics.clone()).await
            }
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
        call: &Call<'_>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        let started = Instant::now();
        let reply = call.run(&mut conn).await;
        self.metrics.observe_script(name, started.elapsed());
        Ok(reply?)
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn text(value: &Value) -> Option<String> {
    String::from_redis_value_ref(value).ok()
}

fn json_list<T: serde::de::DeserializeOwned>(value: &Value) -> Vec<T> {
    text(value)
        .and_then(|json| serde_json::from_str(&json).ok())
        .unwrap_or_default()
}

/// Milliseconds since the Unix epoch by this host's clock.
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
