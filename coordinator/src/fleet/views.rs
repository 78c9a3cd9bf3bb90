//! The fleet's nodes and pools as the admin API shows them, built from
//! what Redis holds.

use std::collections::{BTreeMap, HashMap};

use lingua_shared::JobKind;
use lingua_shared::protocol::{CapacityReport, GpuInfo};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::store::{NodeRecord, PoolMembers};

/// Where a node stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Registered, live, routable.
    Ready,
    /// Live, admits nothing new.
    Draining,
    /// No live lease.
    Offline,
}

/// One node as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    /// The node id.
    pub id: String,
    /// Where it stands.
    pub state: NodeState,
    /// Languages it recognises.
    pub src_langs: Vec<String>,
    /// Languages it produces.
    pub tgt_langs: Vec<String>,
    /// Job kinds it runs.
    pub kinds: Vec<JobKind>,
    /// The pool it holds in each of its pairs (none while offline).
    pub pools: BTreeMap<String, String>,
    /// Its last reported capacity.
    pub capacity: Option<CapacityReport>,
    /// Its GPUs.
    pub gpus: Vec<GpuInfo>,
    /// When it was last heard from, in ms since the Unix epoch.
    pub last_seen_ms: u64,
    /// Its current registration epoch.
    pub epoch: u64,
    /// The agent's version.
    pub agent_version: String,
}

impl From<NodeRecord> for NodeView {
    fn from(record: NodeRecord) -> Self {
        let NodeRecord {
            id,
            mut fields,
            alive,
        } = record;
        let state = match fields.get("state").map(String::as_str) {
            Some("draining") if alive => NodeState::Draining,
            Some("ready") if alive => NodeState::Ready,
            _ => NodeState::Offline,
        };
        let number = |name: &str| fields.get(name).and_then(|v| v.parse().ok()).unwrap_or(0);
        let (last_seen_ms, epoch) = (number("last_seen_ms"), number("epoch"));
        // An offline node holds no pool seat (pool_leave ran, or its pair
        // leases expired): do not show the last ones it had.
        let pools = if state == NodeState::Offline {
            BTreeMap::new()
        } else {
            stored(&mut fields, "pools").unwrap_or_default()
        };
        NodeView {
            id: id.to_string(),
            state,
            src_langs: stored(&mut fields, "src_langs").unwrap_or_default(),
            tgt_langs: stored(&mut fields, "tgt_langs").unwrap_or_default(),
            kinds: stored(&mut fields, "kinds").unwrap_or_default(),
            pools,
            capacity: stored(&mut fields, "capacity"),
            gpus: stored(&mut fields, "gpus").unwrap_or_default(),
            last_seen_ms,
            epoch,
            agent_version: fields.remove("agent_version").unwrap_or_default(),
        }
    }
}

/// A JSON field of a node's hash, if present and well formed.
fn stored<T: DeserializeOwned>(fields: &mut HashMap<String, String>, name: &str) -> Option<T> {
    fields
        .remove(name)
        .and_then(|text| serde_json::from_str(&text).ok())
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

impl From<PoolMembers> for PoolView {
    fn from(members: PoolMembers) -> Self {
        PoolView {
            pair: members.pair.to_string(),
            pool: members.pool,
            nodes: members.nodes,
        }
    }
}
