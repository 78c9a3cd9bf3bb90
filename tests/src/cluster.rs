//! A real local Redis Cluster for tests and the bench: three masters,
//! each a private `redis-server` (stopped with its owner, like every
//! harness server) with `--cluster-enabled yes` on a free TCP port, joined
//! with `redis-cli --cluster create`.

use std::sync::Arc;
use std::time::Duration;

use lingua_coordinator::metrics::Metrics;
use lingua_coordinator::private_redis::PrivateRedis;
use lingua_coordinator::store::Store;

use crate::{CommandStats, PATIENCE, RedisBackend};

/// Masters in a test cluster.
const MASTERS: usize = 3;

/// A running three-master Redis Cluster.
pub struct RedisCluster {
    nodes: Vec<PrivateRedis>,
}

impl RedisCluster {
    /// Starts the servers, forms the cluster and waits until every node
    /// reports `cluster_state:ok`.
    ///
    /// # Errors
    /// When `redis-server` or `redis-cli` is missing, or the cluster does
    /// not form.
    pub async fn start() -> Result<Self, String> {
        let mut nodes = Vec::with_capacity(MASTERS);
        for port in cluster_ports(MASTERS) {
            nodes.push(
                PrivateRedis::start_cluster_node(port)
                    .await
                    .map_err(|e| format!("a cluster node of redis-server: {e}"))?,
            );
        }
        let cluster = Self { nodes };
        let addresses: Vec<String> = cluster
            .seeds()
            .iter()
            .map(|url| url.trim_start_matches("redis://").to_owned())
            .collect();
        let created = tokio::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .await
            .map_err(|e| {
                format!(
                    "redis-cli, which forms the cluster, did not start ({e}): install it \
                     (Debian: apt-get install redis-tools)"
                )
            })?;
        if !created.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&created.stdout),
                String::from_utf8_lossy(&created.stderr)
            ));
        }
        cluster.wait_ok().await?;
        Ok(cluster)
    }

    /// `redis://127.0.0.1:PORT` of every master.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter_map(PrivateRedis::tcp_url)
            .collect()
    }

    async fn wait_ok(&self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        for node in &self.nodes {
            let mut conn = redis::Client::open(node.url())
                .map_err(|e| format!("a cluster node's URL: {e}"))?
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| format!("a cluster node does not answer: {e}"))?;
            loop {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!(
                        "the cluster did not reach cluster_state:ok: {info}"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }
}

impl RedisBackend for RedisCluster {
    async fn store(&self, metrics: Arc<Metrics>) -> Store {
        Store::connect_cluster(&self.seeds(), None, metrics)
            .await
            .expect("the test cluster answers")
    }

    fn coordinator_args(&self) -> Vec<String> {
        vec!["--redis-cluster".into(), self.seeds().join(",")]
    }
}

impl CommandStats for RedisCluster {
    async fn command_calls(&self, command: &str) -> u64 {
        let mut calls = 0;
        for node in &self.nodes {
            calls += node.command_calls(command).await;
        }
        calls
    }
}

/// `count` free TCP ports whose cluster bus ports (+10000) are free too.
pub fn cluster_ports(count: usize) -> Vec<u16> {
    let mut ports = Vec::with_capacity(count);
    while ports.len() < count {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a local port");
        let port = listener
            .local_addr()
            .expect("a bound listener has an address")
            .port();
        let bus_free = port
            .checked_add(10_000)
            .is_some_and(|bus| std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok());
        if bus_free && !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports
}
