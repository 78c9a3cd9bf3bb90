//! The node sockets this coordinator instance holds, by node id.
//!
//! Redis says which registration of a node is current (its epoch); this map
//! only routes control messages to the task that owns a socket.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use lingua_shared::close::CloseCode;
use lingua_shared::sync::lock;
use lingua_shared::{LangPair, Message, NodeId};
use tokio::sync::mpsc;

/// An instruction to a connection task.
#[derive(Debug)]
pub enum Control {
    /// Send this message to the node.
    Send(Box<Message>),
    /// Close the socket with this code and reason.
    Close(CloseCode, &'static str),
    /// The node was put in draining state: stop routing to it and tell it.
    Drain(String),
}

/// What the registry knows of a held socket.
#[derive(Debug, Clone)]
pub struct LocalNode {
    /// The registration's epoch.
    pub epoch: u64,
    /// The agent process that registered (its `instance`).
    pub instance: String,
    /// The node's pairs, from the moment its registration is held.
    pub pairs: Vec<LangPair>,
    /// The pool it holds in each pair, once joined.
    pub pools: BTreeMap<LangPair, String>,
    /// Set once the node is draining; the connection task reads it before
    /// every routing update, so a drain holds even when the inbox is full.
    pub draining: Arc<AtomicBool>,
    /// The connection task's inbox, bounded: a node that stops reading
    /// fills it, and further messages are refused rather than queued
    /// without end.
    pub control: mpsc::Sender<Control>,
}

/// The sockets held by this instance.
#[derive(Debug, Default)]
pub struct Registry {
    nodes: Mutex<HashMap<NodeId, LocalNode>>,
}

impl Registry {
    /// Records a new registration; returns the one it replaces, if any,
    /// or gives `local` back when a registration of a newer epoch is held
    /// (two registrations of one node that finished out of order).
    pub fn insert(&self, node: NodeId, local: LocalNode) -> Result<Option<LocalNode>, LocalNode> {
        let mut nodes = self.lock();
        if nodes
            .get(&node)
            .is_some_and(|held| held.epoch > local.epoch)
        {
            return Err(local);
        }
        Ok(nodes.insert(node, local))
    }

    /// Forgets a registration unless a newer one replaced it. Returns
    /// whether it was removed.
    pub fn remove(&self, node: &NodeId, epoch: u64) -> bool {
        let mut nodes = self.lock();
        if nodes.get(node).is_some_and(|n| n.epoch == epoch) {
            nodes.remove(node);
            return true;
        }
        false
    }

    /// The current registration of `node` on this instance.
    pub fn get(&self, node: &NodeId) -> Option<LocalNode> {
        self.lock().get(node).cloned()
    }

    /// Records the pools registration `epoch` of `node` joined (unless a
    /// newer registration replaced it meanwhile).
    pub fn set_pools(&self, node: &NodeId, epoch: u64, pools: BTreeMap<LangPair, String>) {
        if let Some(held) = self.lock().get_mut(node).filter(|n| n.epoch == epoch) {
            held.pools = pools;
        }
    }

    /// True when `epoch` is `node`'s registration held here: answers from
    /// any other connection (a superseded one) do not count.
    pub fn is_current(&self, node: &NodeId, epoch: u64) -> bool {
        self.lock().get(node).is_some_and(|n| n.epoch == epoch)
    }

    /// Whether `node` is held here by an agent process other than
    /// `instance`.
    pub fn held_by_another(&self, node: &NodeId, instance: &str) -> bool {
        self.lock()
            .get(node)
            .is_some_and(|n| n.instance != instance)
    }

    /// Nodes held here per pair and pool: what `/metrics` reports, at no
    /// Redis cost however many keys Redis holds.
    pub fn pool_sizes(&self) -> BTreeMap<(LangPair, String), i64> {
        let mut sizes = BTreeMap::new();
        for node in self.lock().values() {
            for (pair, pool) in &node.pools {
                *sizes.entry((*pair, pool.clone())).or_default() += 1;
            }
        }
        sizes
    }

    /// Marks `node` draining and asks its connection task to tell it.
    /// Returns whether this instance holds its socket.
    pub fn drain(&self, node: &NodeId, reason: String) -> bool {
        let held = self
            .lock()
            .get(node)
            .map(|n| n.draining.store(true, Ordering::SeqCst))
            .is_some();
        if held {
            // Even when its queue is full (the node is not reading), the
            // flag keeps the node out of routing.
            self.send(node, Control::Drain(reason));
        }
        held
    }

    /// Sends a control message to the task holding `node`. Returns whether
    /// one was there to receive it, with room in its queue.
    pub fn send(&self, node: &NodeId, control: Control) -> bool {
        let sent = self.lock().get(node).map(|n| n.control.try_send(control));
        match sent {
            Some(Ok(())) => true,
            Some(Err(mpsc::error::TrySendError::Full(_))) => {
                tracing::warn!(node_id = %node, "node's send queue is full: it is not reading");
                false
            }
            Some(Err(mpsc::error::TrySendError::Closed(_))) | None => false,
        }
    }

    /// Sends a control message to `node`'s connection of `epoch`, and to
    /// no newer one. Returns whether it was delivered.
    pub fn send_to(&self, node: &NodeId, epoch: u64, control: Control) -> bool {
        let nodes = self.lock();
        nodes
            .get(node)
            .filter(|n| n.epoch == epoch)
            .is_some_and(|n| n.control.try_send(control).is_ok())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, LocalNode>> {
        // A panic while holding this lock cannot leave the map half-written
        // (every operation is a single map call), so a poisoned lock is safe
        // to keep using.
        lock(&self.nodes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(epoch: u64) -> (LocalNode, mpsc::Receiver<Control>) {
        let (control, inbox) = mpsc::channel(1);
        let node = LocalNode {
            epoch,
            instance: String::new(),
            pairs: Vec::new(),
            pools: BTreeMap::new(),
            draining: Arc::new(AtomicBool::new(false)),
            control,
        };
        (node, inbox)
    }

    #[test]
    fn a_registration_that_finished_late_never_replaces_a_newer_one() {
        let registry = Registry::default();
        let id = NodeId::new("n").unwrap();
        let (newer, _newer_inbox) = local(2);
        assert!(matches!(registry.insert(id.clone(), newer), Ok(None)));
        let (older, _older_inbox) = local(1);
        assert!(matches!(registry.insert(id.clone(), older), Err(l) if l.epoch == 1));
        assert!(registry.is_current(&id, 2));
        let (newest, _newest_inbox) = local(3);
        assert!(matches!(registry.insert(id.clone(), newest), Ok(Some(l)) if l.epoch == 2));
        assert!(!registry.remove(&id, 2), "a stale epoch removes nothing");
        assert!(registry.remove(&id, 3));
    }

    #[test]
    fn a_drain_holds_when_the_nodes_queue_is_full() {
        let registry = Registry::default();
        let id = NodeId::new("n").unwrap();
        let (node, _inbox) = local(1);
        let draining = node.draining.clone();
        registry.insert(id.clone(), node).unwrap();
        assert!(registry.send(&id, Control::Drain("fill".into())));
        assert!(
            !registry.send(&id, Control::Drain("full".into())),
            "queue of one is full"
        );
        assert!(registry.drain(&id, "admin".into()));
        assert!(draining.load(Ordering::SeqCst));
        assert!(!registry.drain(&NodeId::new("elsewhere").unwrap(), "admin".into()));
    }
}
