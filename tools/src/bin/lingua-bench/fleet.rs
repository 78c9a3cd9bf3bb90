//! The fleet under a bench: a private Redis (one server or three
//! masters), scratch directories, simulated agents.

use std::sync::Arc;
use std::time::Duration;

use lingua_agent::config::AgentConfig;
use lingua_coordinator::metrics::Metrics;
use lingua_coordinator::private_redis::PrivateRedis;
use lingua_coordinator::store::Store;
use lingua_tests::cluster::RedisCluster;
use lingua_tests::fleet::{RedisCounters, redis_counters};
use lingua_tests::{RedisBackend, TestAgent};

use crate::{BenchError, RedisKind};

/// Starts a private Redis.
pub async fn private_redis() -> Result<PrivateRedis, BenchError> {
    PrivateRedis::start()
        .await
        .map_err(|e| format!("redis-server: {e}"))
}

/// A private Redis of either kind, running.
pub enum Redis {
    /// One server.
    One(Box<PrivateRedis>),
    /// Three masters.
    Cluster(RedisCluster),
}

impl Redis {
    /// Starts one of `kind`.
    pub async fn start(kind: RedisKind) -> Result<Self, BenchError> {
        Ok(match kind {
            RedisKind::One => Self::One(Box::new(private_redis().await?)),
            RedisKind::Cluster => Self::Cluster(RedisCluster::start().await?),
        })
    }

    /// A store on it, as the bench's own client.
    pub async fn connect_store(&self) -> Result<Store, BenchError> {
        let metrics = Arc::new(Metrics::default());
        match self {
            Self::One(redis) => Store::connect(&redis.url(), metrics).await,
            Self::Cluster(cluster) => Store::connect_cluster(&cluster.seeds(), None, metrics).await,
        }
        .map_err(|e| format!("redis: {e}"))
    }

    /// Reads the counters of every server, summed.
    pub async fn counters(&self) -> Result<RedisCounters, BenchError> {
        let urls = match self {
            Self::One(redis) => vec![redis.url()],
            Self::Cluster(cluster) => cluster.seeds(),
        };
        let mut sum = RedisCounters {
            waited: Some(Duration::ZERO),
            ..RedisCounters::default()
        };
        for url in urls {
            let mut conn = redis::Client::open(url)
                .map_err(|e| format!("redis: {e}"))?
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| format!("redis: {e}"))?;
            let counters = redis_counters(&mut conn)
                .await
                .map_err(|e| format!("redis: {e}"))?;
            sum.commands += counters.commands;
            sum.scripts += counters.scripts;
            sum.cpu += counters.cpu;
            sum.waited = sum.waited.zip(counters.waited).map(|(a, b)| a + b);
        }
        Ok(sum)
    }
}

impl RedisBackend for Redis {
    async fn store(&self, metrics: Arc<Metrics>) -> Store {
        match self {
            Self::One(redis) => redis.store(metrics).await,
            Self::Cluster(cluster) => cluster.store(metrics).await,
        }
    }

    fn coordinator_args(&self) -> Vec<String> {
        match self {
            Self::One(redis) => redis.coordinator_args(),
            Self::Cluster(cluster) => cluster.coordinator_args(),
        }
    }
}

/// A scratch directory.
pub fn scratch() -> Result<tempfile::TempDir, BenchError> {
    tempfile::Builder::new()
        .prefix("lingua-bench-")
        .tempdir()
        .map_err(|e| format!("temporary directory: {e}"))
}

/// A simulated agent's config: one GPU of `memory_mb`, kind `translate`
/// (`vram_mb` each, `max_concurrent` at once, jobs of `duration_ms`, the
/// GPU half busy when every slot is).
pub struct SimAgent<'a> {
    /// Node id.
    pub node_id: &'a str,
    /// Coordinator WebSocket URL.
    pub url: &'a str,
    /// Source and target language.
    pub pair: (&'a str, &'a str),
    /// GPU memory, MiB.
    pub memory_mb: u64,
    /// VRAM per job, MiB.
    pub vram_mb: u64,
    /// Most jobs at once.
    pub max_concurrent: u32,
    /// Job duration.
    pub duration_ms: u64,
    /// GPU poll interval.
    pub poll_ms: u64,
}

impl SimAgent<'_> {
    /// The config.
    pub fn config(&self) -> Result<AgentConfig, BenchError> {
        self.config_with("")
    }

    /// The config, with `tables` (TOML) after the kind's.
    pub fn config_with(&self, tables: &str) -> Result<AgentConfig, BenchError> {
        let text = format!(
            r#"
node_id = "{node_id}"
coordinator_url = "{url}"
[capabilities]
src_langs = ["{src}"]
tgt_langs = ["{tgt}"]
[gpu]
backend = "simulated"
reserve_mb = 1024
poll_interval_ms = {poll}
[gpu.simulated]
count = 1
memory_mb = {memory}
[jobs.translate]
vram_mb = {vram}
max_concurrent = {max}
[jobs.translate.simulated]
duration_ms = {duration}
utilization_pct = {utilization}
{tables}
"#,
            node_id = self.node_id,
            url = self.url,
            src = self.pair.0,
            tgt = self.pair.1,
            poll = self.poll_ms,
            memory = self.memory_mb,
            vram = self.vram_mb,
            max = self.max_concurrent,
            duration = self.duration_ms,
            // A full node at half utilisation: below the pressure threshold,
            // so that only slots and memory limit admission.
            utilization = (50 / self.max_concurrent).max(1),
        );
        AgentConfig::parse(&text).map_err(|e| format!("agent config: {e}"))
    }
}

/// Waits until every agent is connected and has registered at least
/// `times` times, or `limit` passes.
pub async fn all_registered(
    agents: &[TestAgent],
    times: u64,
    limit: Duration,
) -> Result<(), BenchError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let waiting = agents
            .iter()
            .filter(|a| {
                let status = a.handles.status.borrow();
                !(status.connected && status.registrations >= times)
            })
            .count();
        if waiting == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "{waiting} of {} agents not registered after {} s",
                agents.len(),
                limit.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Slots of each agent in the no-op fleet.
pub const SLOTS: u32 = 32;

/// `count` agents of [`SLOTS`] slots for no-op jobs, serving zh -> en,
/// registered; agent `i` lists the coordinator `urls` starting with the
/// `i % urls.len()`-th, so they spread evenly over the instances.
pub async fn noop_fleet(urls: &[String], count: usize) -> Result<Vec<TestAgent>, BenchError> {
    let mut agents = Vec::with_capacity(count);
    for index in 0..count {
        let name = format!("noop-{index:03}");
        let mut config = SimAgent {
            node_id: &name,
            url: &urls[0],
            pair: ("zh", "en"),
            memory_mb: 81_920,
            vram_mb: 100,
            max_concurrent: SLOTS,
            duration_ms: 0,
            poll_ms: 500,
        }
        .config()?;
        let mut ordered = urls.to_vec();
        ordered.rotate_left(index % urls.len());
        config.coordinator_urls = ordered;
        agents.push(TestAgent::start(config));
    }
    all_registered(&agents, 1, Duration::from_secs(30)).await?;
    Ok(agents)
}
