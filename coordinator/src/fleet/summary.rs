//! The whole fleet in one answer (`GET /v1/fleet`, each dashboard event):
//! node and GPU counts, every pair's pools and free capacity, the nodes,
//! and the last minute of jobs of every live coordinator instance.

use std::collections::{BTreeMap, HashMap};

use lingua_shared::JobKind;
use serde::Serialize;

use super::views::{NodeState, NodeView, PoolView};
use crate::recent::{Stats, WINDOW_SECONDS};

/// The fleet as of `at_ms`.
#[derive(Debug, Clone, Serialize)]
pub struct Fleet {
    /// When the snapshot was taken, in ms since the Unix epoch.
    pub at_ms: u64,
    /// Coordinator instances that published their job counts lately.
    pub coordinators: usize,
    /// Nodes by state.
    pub nodes_by_state: NodeCounts,
    /// The GPUs of live nodes.
    pub gpus: GpuCounts,
    /// The last minute of jobs, all instances together.
    pub jobs: JobsView,
    /// Every language pair with a pool, sorted.
    pub pairs: Vec<PairView>,
    /// Every node, sorted by id.
    pub nodes: Vec<NodeView>,
}

/// Nodes by state.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct NodeCounts {
    /// Live and routable.
    pub ready: usize,
    /// Live, admitting nothing new.
    pub draining: usize,
    /// Without a live lease.
    pub offline: usize,
}

/// The GPUs of live nodes, from their last capacity reports.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct GpuCounts {
    /// GPUs (or MIG devices) reported.
    pub total: usize,
    /// Those reported unhealthy.
    pub unhealthy: usize,
    /// Memory in use, in MiB.
    pub memory_used_mb: u64,
    /// Memory in all, in MiB.
    pub memory_total_mb: u64,
    /// Live nodes whose GPUs admit nothing as a whole (NVML unavailable, a
    /// reading too old): their GPUs may be missing from the counts above.
    pub problem_nodes: usize,
}

/// The last minute of jobs, with latency quantiles.
#[derive(Debug, Clone, Serialize)]
pub struct JobsView {
    /// The window the counts cover.
    pub window_seconds: u64,
    /// Median latency of the jobs that ended in the window (bucket upper
    /// bound, ms).
    pub p50_ms: Option<u64>,
    /// 99th percentile latency, likewise.
    pub p99_ms: Option<u64>,
    /// The counts.
    #[serde(flatten)]
    pub stats: Stats,
}

/// One language pair (with a pool, or served by a known node, live or
/// not): its pools and what its ready nodes have free.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PairView {
    /// The pair, `src:tgt`.
    pub pair: String,
    /// Its pools and their members.
    pub pools: Vec<PoolSeats>,
    /// Members that are ready (live, not draining).
    pub ready_nodes: usize,
    /// Free slots per kind, summed over its ready members' last reports.
    pub free_slots: BTreeMap<JobKind, u32>,
    /// True when no ready member reported room for any kind: jobs for the
    /// pair queue or fail.
    pub no_capacity: bool,
}

/// One pool of a pair.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PoolSeats {
    /// The pool id within the pair.
    pub pool: String,
    /// Its members, sorted.
    pub nodes: Vec<String>,
}

impl Fleet {
    /// The fleet from what Redis holds: nodes, pools, and each live
    /// instance's recent job counts.
    pub fn new(at_ms: u64, nodes: Vec<NodeView>, pools: Vec<PoolView>, stats: Vec<Stats>) -> Self {
        let coordinators = stats.len();
        let jobs = stats.into_iter().fold(Stats::default(), |mut all, one| {
            all.add(one);
            all
        });
        Fleet {
            at_ms,
            coordinators,
            nodes_by_state: node_counts(&nodes),
            gpus: gpu_counts(&nodes),
            jobs: JobsView {
                window_seconds: WINDOW_SECONDS,
                p50_ms: jobs.latency_quantile_ms(0.5),
                p99_ms: jobs.latency_quantile_ms(0.99),
                stats: jobs,
            },
            pairs: pairs(&nodes, pools),
            nodes,
        }
    }
}

fn node_counts(nodes: &[NodeView]) -> NodeCounts {
    let mut counts = NodeCounts::default();
    for node in nodes {
        match node.state {
            NodeState::Ready => counts.ready += 1,
            NodeState::Draining => counts.draining += 1,
            NodeState::Offline => counts.offline += 1,
        }
    }
    counts
}

fn gpu_counts(nodes: &[NodeView]) -> GpuCounts {
    let mut counts = GpuCounts::default();
    let live = nodes.iter().filter(|n| n.state != NodeState::Offline);
    let reports: Vec<_> = live.filter_map(|n| n.capacity.as_ref()).collect();
    counts.problem_nodes = reports.iter().filter(|c| c.gpu_problem.is_some()).count();
    for gpu in reports.iter().flat_map(|c| &c.gpus) {
        counts.total += 1;
        counts.unhealthy += usize::from(!gpu.healthy);
        // Nodes' own figures: a wrong one must not overflow the sum.
        counts.memory_used_mb = counts.memory_used_mb.saturating_add(gpu.memory_used_mb);
        counts.memory_total_mb = counts.memory_total_mb.saturating_add(gpu.memory_total_mb);
    }
    counts
}

fn empty_pair(pair: &str) -> PairView {
    PairView {
        pair: pair.to_owned(),
        pools: Vec::new(),
        ready_nodes: 0,
        free_slots: BTreeMap::new(),
        no_capacity: true,
    }
}

/// Every pair with a pool, and every pair a known node serves: a pair
/// whose every node went offline has no pool left, and must show, without
/// capacity, rather than vanish.
fn pairs(nodes: &[NodeView], pools: Vec<PoolView>) -> Vec<PairView> {
    let ready: HashMap<&str, &NodeView> = nodes
        .iter()
        .filter(|n| n.state == NodeState::Ready)
        .map(|n| (n.id.as_str(), n))
        .collect();
    let mut pairs: BTreeMap<String, PairView> = BTreeMap::new();
    for node in nodes {
        for src in &node.src_langs {
            for tgt in node.tgt_langs.iter().filter(|tgt| *tgt != src) {
                let pair = format!("{src}:{tgt}");
                pairs
                    .entry(pair.clone())
                    .or_insert_with(|| empty_pair(&pair));
            }
        }
    }
    for pool in pools {
        let pair = pairs
            .entry(pool.pair.clone())
            .or_insert_with(|| empty_pair(&pool.pair));
        for node in pool.nodes.iter().filter_map(|id| ready.get(id.as_str())) {
            pair.ready_nodes += 1;
            let free = node.capacity.iter().flat_map(|c| &c.free_slots);
            for (kind, slots) in free {
                let sum = pair.free_slots.entry(kind.clone()).or_default();
                *sum = sum.saturating_add(*slots);
            }
        }
        pair.no_capacity = pair.free_slots.values().all(|slots| *slots == 0);
        pair.pools.push(PoolSeats {
            pool: pool.pool,
            nodes: pool.nodes,
        });
    }
    pairs.into_values().collect()
}

#[cfg(test)]
mod tests {
    use lingua_shared::protocol::{CapacityReport, GpuReading};

    use super::*;

    fn node(id: &str, state: NodeState, free: u32, healthy: bool) -> NodeView {
        NodeView {
            id: id.into(),
            state,
            src_langs: vec!["en".into()],
            tgt_langs: vec!["es".into()],
            kinds: vec![JobKind::new("translate").unwrap()],
            pools: BTreeMap::new(),
            capacity: Some(CapacityReport {
                free_slots: BTreeMap::from([(JobKind::new("translate").unwrap(), free)]),
                gpus: vec![GpuReading {
                    uuid: format!("GPU-{id}"),
                    memory_total_mb: 1000,
                    memory_used_mb: 250,
                    utilization_pct: Some(10),
                    temperature_c: Some(50),
                    healthy,
                    reason: None,
                }],
                gpu_problem: None,
                room: None,
                running: Some(1),
                fallback_slots: BTreeMap::new(),
            }),
            gpus: Vec::new(),
            last_seen_ms: 0,
            epoch: 1,
            agent_version: "0.1.0".into(),
        }
    }

    fn pool(pair: &str, nodes: &[&str]) -> PoolView {
        PoolView {
            pair: pair.into(),
            pool: "0".into(),
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
        }
    }

    #[test]
    fn counts_nodes_gpus_and_free_capacity_per_pair() {
        let mut nodes = vec![
            node("a", NodeState::Ready, 2, true),
            node("b", NodeState::Draining, 5, false),
            node("c", NodeState::Offline, 7, true),
            node("d", NodeState::Ready, 0, true),
        ];
        nodes[2].src_langs = vec!["de".into()];
        let pools = vec![pool("en:es", &["a", "b"]), pool("en:fr", &["b", "d"])];
        let fleet = Fleet::new(1, nodes, pools, Vec::new());

        let expected = NodeCounts {
            ready: 2,
            draining: 1,
            offline: 1,
        };
        assert_eq!(fleet.nodes_by_state, expected);
        assert_eq!(fleet.gpus.total, 3, "the offline node's GPU is not counted");
        assert_eq!(fleet.gpus.unhealthy, 1);
        assert_eq!(fleet.gpus.memory_total_mb, 3000);

        let es = &fleet.pairs[1];
        assert_eq!((es.pair.as_str(), es.ready_nodes), ("en:es", 1));
        assert_eq!(
            es.free_slots.values().sum::<u32>(),
            2,
            "draining b adds nothing"
        );
        assert!(!es.no_capacity);
        let fr = &fleet.pairs[2];
        assert!(fr.no_capacity, "its only ready node is full");
        let pairs: Vec<&str> = fleet.pairs.iter().map(|p| p.pair.as_str()).collect();
        assert_eq!(
            pairs,
            ["de:es", "en:es", "en:fr"],
            "the offline node's pair stays"
        );
        assert!(fleet.pairs[0].no_capacity && fleet.pairs[0].pools.is_empty());
        assert_eq!(fleet.jobs.p99_ms, None);
        assert_eq!(fleet.coordinators, 0);
    }
}
