//! What routing is told about the nodes this instance holds: each node's
//! last report, less the assignments that report cannot have counted.
//!
//! A report reflects every assignment the node answered before sending it,
//! and none sent after. So the entry written for routing is the last
//! report less every assignment sent since that report arrived, and less
//! those unanswered when it arrived (they crossed it on the wire). With
//! the node's room (protocol version 2) those assignments also take their
//! memory, and no kind's hint exceeds what fits in the memory left: every
//! kind shrinks when any kind is sent. A kind's fallback room (`busy =
//! "fallback"`) is hinted as a route of its own, `<kind>@cpu`, and takes
//! no memory.
//!
//! Routing updates and picks of one pair exclude each other here
//! ([`Hints::picking`], [`Hints::updating`]): a pick is counted before
//! any update of its pair is computed, so an update never hands back room
//! a pick took. (Picks by other coordinator instances, for nodes held
//! here, are counted when their assignments arrive: between the two, a
//! node may be offered more than it has, and refuses.)

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lingua_shared::protocol::CapacityReport;
use lingua_shared::sync::lock;
use lingua_shared::{JobKind, LangPair, NodeId};
use tokio::sync::{Notify, OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};
use tokio::time::Instant;

use crate::store::{Route, RouteEntry};

/// The protocol version from which a node's room is used.
pub const ROOM_VERSION: u32 = 2;
/// Pair locks kept before those nobody holds are dropped.
const MAX_IDLE_PAIR_LOCKS: usize = 4096;
/// Longest report text kept to be recognised when it comes again: a
/// heartbeat is a few hundred bytes, one of eight GPUs under 2 KiB.
pub const MAX_SOURCE_BYTES: usize = 8 * 1024;

/// One held node.
#[derive(Debug)]
struct Node {
    pairs: Vec<LangPair>,
    kinds: Vec<JobKind>,
    version: u32,
    draining: Arc<AtomicBool>,
    report: CapacityReport,
    /// The JSON text `report` was read from, and the connection (epoch)
    /// that sent it, while it holds what that text says: a heartbeat of
    /// that connection with the same text need not be read again.
    source: Option<(u64, Box<str>)>,
    /// When the node last reported (any report, read or taken again).
    heard: Instant,
    /// Assignments sent and not answered yet, per route.
    unanswered: BTreeMap<Route, u32>,
    /// Assignments the last report cannot have counted, per route.
    uncounted: BTreeMap<Route, u32>,
    /// When the node's entry last began to be written, per pair (that
    /// write succeeded).
    written: Vec<(LangPair, Instant)>,
}

/// The routing hints of the nodes this instance holds.
#[derive(Debug)]
pub struct Hints {
    nodes: Mutex<HashMap<NodeId, Node>>,
    pairs: Mutex<HashMap<LangPair, Arc<RwLock<()>>>>,
    /// Whether nodes' rooms are used (`[jobs] kinds_share_memory`).
    share_memory: bool,
    /// Entries to write, per pair: nodes that reported, or were assigned
    /// a job through another pair.
    due: Mutex<HashMap<LangPair, HashSet<NodeId>>>,
    due_now: Notify,
}

impl Default for Hints {
    fn default() -> Self {
        Self::new(true)
    }
}

impl Hints {
    /// Hints that use the nodes' rooms when `share_memory`, and per-kind
    /// counts only otherwise.
    pub fn new(share_memory: bool) -> Self {
        Self {
            nodes: Mutex::default(),
            pairs: Mutex::default(),
            share_memory,
            due: Mutex::default(),
            due_now: Notify::new(),
        }
    }

    /// Starts hinting for a node that registered: its pairs and kinds,
    /// protocol version, drain flag and first report. A new connection
    /// starts from its own report: what the node answered, or never got,
    /// on an earlier one is not counted against it.
    pub fn hold(
        &self,
        node: &NodeId,
        (pairs, kinds): (Vec<LangPair>, Vec<JobKind>),
        version: u32,
        draining: Arc<AtomicBool>,
        report: CapacityReport,
    ) {
        let mut nodes = lock(&self.nodes);
        let (unanswered, uncounted) = (BTreeMap::new(), BTreeMap::new());
        let now = Instant::now();
        let written = pairs.iter().map(|&pair| (pair, now)).collect();
        let held = Node {
            written,
            heard: now,
            pairs,
            kinds,
            version,
            draining,
            report,
            source: None,
            unanswered,
            uncounted,
        };
        nodes.insert(node.clone(), held);
    }

    /// Stops hinting for a node whose connection ended.
    pub fn forget(&self, node: &NodeId) {
        lock(&self.nodes).remove(node);
    }

    /// A new report from `node`: it counts every assignment answered
    /// before it. A kind whose fallback the node no longer reports (a
    /// reload took it away) keeps a fallback route with no room, so that
    /// the next update takes the node out of it.
    pub fn report(&self, node: &NodeId, report: CapacityReport) {
        self.report_read(node, report, None);
    }

    /// A new report from `node`'s connection of `epoch`, read from the
    /// JSON `text`, as [`Hints::report`]: the same text again from that
    /// connection can be taken by [`Hints::report_again`] (a text over
    /// [`MAX_SOURCE_BYTES`] is not kept, and is read every time).
    pub fn report_from(&self, (node, epoch): (&NodeId, u64), report: CapacityReport, text: &str) {
        let source = (text.len() <= MAX_SOURCE_BYTES).then(|| (epoch, text.into()));
        self.report_read(node, report, source);
    }

    fn report_read(
        &self,
        node: &NodeId,
        mut report: CapacityReport,
        source: Option<(u64, Box<str>)>,
    ) {
        if let Some(held) = lock(&self.nodes).get_mut(node) {
            for kind in held.report.fallback_slots.keys() {
                report.fallback_slots.entry(kind.clone()).or_insert(0);
            }
            held.uncounted = held.unanswered.clone();
            held.report = report;
            held.source = source;
            held.heard = Instant::now();
        }
    }

    /// `node`'s connection of `epoch` reports again with the JSON
    /// `text`: when it is the text the report held was read from, sent
    /// by that connection, and says nothing the report does not (nothing
    /// changed it since), that report is taken anew, as [`Hints::report`]
    /// would take it, and this is true. False when the text must be read.
    pub fn report_again(&self, (node, epoch): (&NodeId, u64), text: &str) -> bool {
        let mut nodes = lock(&self.nodes);
        let Some(held) = nodes.get_mut(node) else {
            return false;
        };
        if held
            .source
            .as_ref()
            .is_none_or(|(from, source)| *from != epoch || **source != *text)
        {
            return false;
        }
        held.uncounted = held.unanswered.clone();
        held.heard = Instant::now();
        true
    }

    /// True when `report` differs from `node`'s last one in what routing
    /// and operators act on: its slots, fallback slots, memory, or jobs
    /// running (a node not held here: true).
    pub fn changes(&self, node: &NodeId, report: &CapacityReport) -> bool {
        let nodes = lock(&self.nodes);
        let Some(held) = nodes.get(node).map(|held| &held.report) else {
            return true;
        };
        let fallback_changed = report
            .fallback_slots
            .iter()
            .any(|(kind, free)| held.fallback_slots.get(kind) != Some(free))
            || held
                .fallback_slots
                .iter()
                .any(|(kind, free)| report.fallback_slots.get(kind).unwrap_or(&0) != free);
        held.free_slots != report.free_slots
            || fallback_changed
            || held.room != report.room
            || held.running != report.running
    }

    /// True when every assignment to `node` was answered (or the node is
    /// not held here).
    pub fn settled(&self, node: &NodeId) -> bool {
        lock(&self.nodes)
            .get(node)
            .is_none_or(|held| held.unanswered.values().all(|&count| count == 0))
    }

    /// `node` refused a job sent through `route` for want of room: none
    /// there until it reports again.
    pub fn full(&self, node: &NodeId, route: &Route) {
        if let Some(held) = lock(&self.nodes).get_mut(node) {
            held.source = None;
            let slots = if route.fallback {
                &mut held.report.fallback_slots
            } else {
                &mut held.report.free_slots
            };
            if let Some(free) = slots.get_mut(&route.kind) {
                *free = 0;
            }
        }
    }

    /// Counts an assignment sent to `node` through `route` of `pair`
    /// (picked here, or forwarded by another instance), unanswered until
    /// `answered`. The node's entries in its other pairs are due: the
    /// memory it took is gone there too.
    pub fn assigned(&self, node: &NodeId, route: &Route, pair: LangPair) {
        let mut nodes = lock(&self.nodes);
        let Some(held) = nodes.get_mut(node) else {
            return;
        };
        *held.unanswered.entry(route.clone()).or_default() += 1;
        *held.uncounted.entry(route.clone()).or_default() += 1;
        let others: Vec<LangPair> = held.pairs.iter().copied().filter(|p| *p != pair).collect();
        drop(nodes);
        if !others.is_empty() {
            self.due(others, node);
        }
    }

    /// `node`'s entries in `pairs` are due for writing.
    pub fn due(&self, pairs: impl IntoIterator<Item = LangPair>, node: &NodeId) {
        let mut due = lock(&self.due);
        for pair in pairs {
            due.entry(pair).or_default().insert(node.clone());
        }
        drop(due);
        self.due_now.notify_one();
    }

    /// Waits until some entries are due.
    pub async fn wait_due(&self) {
        self.due_now.notified().await;
    }

    /// The entries due, per pair (they are no longer due).
    pub fn take_due(&self) -> HashMap<LangPair, HashSet<NodeId>> {
        std::mem::take(&mut *lock(&self.due))
    }

    /// The node answered (or never will answer) an assignment sent
    /// through `route`.
    pub fn answered(&self, node: &NodeId, route: &Route) {
        if let Some(held) = lock(&self.nodes).get_mut(node)
            && let Some(count) = held.unanswered.get_mut(route)
        {
            *count = count.saturating_sub(1);
        }
    }

    /// Whether `node`, held here, has no room on `route` now (a node not
    /// held here: no opinion).
    pub fn lacks_room(&self, node: &NodeId, route: &Route) -> bool {
        self.entry(node)
            .is_some_and(|entry| entry.free.get(route).copied().unwrap_or(0) == 0)
    }

    /// The routing entry of `node` now; none when it is not held here.
    pub fn entry(&self, node: &NodeId) -> Option<RouteEntry> {
        let nodes = lock(&self.nodes);
        Some(self.entry_of(node, nodes.get(node)?))
    }

    /// The entries of `nodes` in `pair` were written, in a write begun
    /// `at`: their leases there run from then at the earliest.
    pub fn wrote<'a>(
        &self,
        pair: LangPair,
        nodes: impl IntoIterator<Item = &'a NodeId>,
        at: Instant,
    ) {
        let mut held = lock(&self.nodes);
        for node in nodes {
            if let Some(written) = held
                .get_mut(node)
                .and_then(|held| held.written.iter_mut().find(|(p, _)| *p == pair))
            {
                written.1 = written.1.max(at);
            }
        }
    }

    /// The entries written `age` ago or longer, per pair, of the nodes
    /// that reported since: those of a node heard from go on, as its
    /// heartbeats renewed them before; a node gone silent is not kept in
    /// routing by them.
    pub fn stale(&self, age: Duration) -> HashMap<LangPair, HashSet<NodeId>> {
        let mut stale: HashMap<LangPair, HashSet<NodeId>> = HashMap::new();
        let now = Instant::now();
        let nodes = lock(&self.nodes);
        for (node, held) in nodes.iter() {
            for (pair, at) in &held.written {
                if now.duration_since(*at) >= age && held.heard > *at {
                    stale.entry(*pair).or_default().insert(node.clone());
                }
            }
        }
        stale
    }

    fn entry_of(&self, node: &NodeId, held: &Node) -> RouteEntry {
        let fallbacks = held
            .kinds
            .iter()
            .filter(|kind| held.report.fallback_slots.contains_key(*kind));
        if held.draining.load(Ordering::SeqCst) {
            let routes = held.kinds.iter().map(Route::gpu);
            return RouteEntry {
                node: node.clone(),
                free: routes
                    .chain(fallbacks.map(Route::fallback))
                    .map(|route| (route, 0))
                    .collect(),
                room: None,
            };
        }
        let mut room = held
            .report
            .room
            .clone()
            .filter(|_| self.share_memory && held.version >= ROOM_VERSION);
        let sent = |route: &Route| held.uncounted.get(route).copied().unwrap_or(0);
        let mut free = BTreeMap::new();
        for kind in &held.kinds {
            let route = Route::gpu(kind);
            if let Some(room) = room.as_mut() {
                for _ in 0..sent(&route) {
                    room.take(kind);
                }
            }
            let reported = held.report.free_slots.get(kind).copied().unwrap_or(0);
            free.insert(route.clone(), reported.saturating_sub(sent(&route)));
        }
        if let Some(room) = &room {
            for (route, slots) in &mut free {
                *slots = room.hint(&route.kind, *slots);
            }
        }
        for kind in fallbacks {
            let route = Route::fallback(kind);
            let reported = held.report.fallback_slots[kind];
            free.insert(route.clone(), reported.saturating_sub(sent(&route)));
        }
        RouteEntry {
            node: node.clone(),
            free,
            room,
        }
    }

    /// Counts an assignment picked here until the returned guard drops
    /// (at its answer, or when it is not sent after all).
    pub fn assign(self: &Arc<Self>, node: &NodeId, route: &Route, pair: LangPair) -> Assigned {
        self.assigned(node, route, pair);
        Assigned {
            hints: Arc::clone(self),
            node: node.clone(),
            route: route.clone(),
        }
    }

    fn pair_lock(&self, pair: LangPair) -> Arc<RwLock<()>> {
        let mut pairs = lock(&self.pairs);
        if pairs.len() >= MAX_IDLE_PAIR_LOCKS {
            // Jobs name any pair: keep only the locks in use.
            pairs.retain(|_, held| Arc::strong_count(held) > 1);
        }
        Arc::clone(pairs.entry(pair).or_default())
    }

    /// Held while a pick of `pair` runs and its assignment is counted:
    /// no update of the pair is computed meanwhile.
    pub async fn picking(&self, pair: LangPair) -> OwnedRwLockReadGuard<()> {
        self.pair_lock(pair).read_owned().await
    }

    /// Held while an update of `pair` is computed and written.
    pub async fn updating(&self, pair: LangPair) -> OwnedRwLockWriteGuard<()> {
        self.pair_lock(pair).write_owned().await
    }
}

/// An assignment counted as unanswered until dropped.
#[derive(Debug)]
pub struct Assigned {
    hints: Arc<Hints>,
    node: NodeId,
    route: Route,
}

impl Drop for Assigned {
    fn drop(&mut self) {
        self.hints.answered(&self.node, &self.route);
    }
}

#[cfg(test)]
mod tests {
    use lingua_shared::room::Room;

    use super::*;

    fn kind(name: &str) -> JobKind {
        JobKind::new(name).unwrap()
    }

    fn pair(text: &str) -> LangPair {
        text.parse().unwrap()
    }

    fn node() -> NodeId {
        NodeId::new("n1").unwrap()
    }

    /// One 16,000 MiB GPU: 2 asr (6,000 MiB) or 5 translate (3,000 MiB).
    fn report() -> CapacityReport {
        CapacityReport {
            free_slots: [(kind("asr"), 2), (kind("translate"), 5)].into(),
            room: Some(Room {
                devices_mb: vec![16_000],
                vram_mb: [(kind("asr"), 6000), (kind("translate"), 3000)].into(),
            }),
            ..CapacityReport::default()
        }
    }

    fn hints(version: u32) -> Hints {
        let hints = Hints::default();
        let kinds = vec![kind("asr"), kind("translate")];
        hints.hold(
            &node(),
            (vec![pair("zh:en")], kinds),
            version,
            Arc::default(),
            report(),
        );
        hints
    }

    fn free(hints: &Hints, name: &str) -> u32 {
        hints.entry(&node()).unwrap().free[&Route::gpu(&kind(name))]
    }

    #[test]
    fn an_assignment_shrinks_every_kind_of_a_node_that_reports_its_room() {
        let hints = hints(ROOM_VERSION);
        hints.assigned(&node(), &Route::gpu(&kind("asr")), pair("zh:en"));
        assert_eq!(free(&hints, "asr"), 1);
        assert_eq!(free(&hints, "translate"), 3, "10,000 MiB left");
        let room = hints.entry(&node()).unwrap().room.unwrap();
        assert_eq!(room.devices_mb, [10_000]);
    }

    #[test]
    fn without_room_only_the_assigned_kind_shrinks() {
        let hints = hints(1);
        hints.assigned(&node(), &Route::gpu(&kind("asr")), pair("zh:en"));
        assert_eq!(free(&hints, "asr"), 1);
        assert_eq!(free(&hints, "translate"), 5);
        assert_eq!(hints.entry(&node()).unwrap().room, None);
    }

    #[test]
    fn an_assignment_counts_until_a_report_that_follows_its_answer() {
        let hints = hints(ROOM_VERSION);
        hints.assigned(&node(), &Route::gpu(&kind("asr")), pair("zh:en"));
        // Answered, but the last report came before: still not counted
        // there.
        hints.answered(&node(), &Route::gpu(&kind("asr")));
        assert_eq!(free(&hints, "asr"), 1);
        // A report after the answer counts it.
        let mut later = report();
        later.free_slots.insert(kind("asr"), 1);
        later.room.as_mut().unwrap().devices_mb = vec![10_000];
        hints.report(&node(), later);
        assert_eq!(free(&hints, "asr"), 1);
        assert_eq!(free(&hints, "translate"), 3);
    }

    #[test]
    fn a_report_crossing_an_unanswered_assignment_still_counts_it_out() {
        let hints = hints(ROOM_VERSION);
        hints.assigned(&node(), &Route::gpu(&kind("translate")), pair("zh:en"));
        hints.report(&node(), report());
        assert_eq!(free(&hints, "translate"), 4);
        hints.answered(&node(), &Route::gpu(&kind("translate")));
        hints.report(&node(), report());
        assert_eq!(free(&hints, "translate"), 5);
    }

    #[test]
    fn the_same_text_again_counts_as_a_report_until_something_changes_the_one_held() {
        let hints = hints(ROOM_VERSION);
        let asr = Route::gpu(&kind("asr"));
        let text = serde_json::to_string(&report()).unwrap();
        let this = (&node(), 1);
        assert!(
            !hints.report_again(this, &text),
            "not read from any text yet"
        );
        hints.report_from(this, report(), &text);
        // Answered before the text came again: counted, as by a report.
        hints.assigned(&node(), &asr, pair("zh:en"));
        hints.answered(&node(), &asr);
        assert_eq!(free(&hints, "asr"), 1);
        assert!(hints.report_again(this, &text));
        assert_eq!(free(&hints, "asr"), 2);
        assert!(!hints.report_again(this, &text.replace('5', "4")));
        assert!(
            !hints.report_again((&node(), 2), &text),
            "another connection of the node"
        );
        // A refusal for want of room changes the report held: the text
        // no longer says what it holds.
        hints.full(&node(), &asr);
        assert!(!hints.report_again(this, &text));
        hints.report_from(this, report(), &text);
        hints.report(&node(), report());
        assert!(
            !hints.report_again(this, &text),
            "a report read from no text"
        );
        let padded = format!("{}{}", " ".repeat(MAX_SOURCE_BYTES), text);
        hints.report_from(this, report(), &padded);
        assert!(!hints.report_again(this, &padded), "too long to keep");
        let other = NodeId::new("other").unwrap();
        assert!(!hints.report_again((&other, 1), &text));
    }

    #[tokio::test(start_paused = true)]
    async fn entries_are_stale_an_age_after_their_write_while_their_node_reports() {
        let hints = Hints::default();
        let (zh_en, zh_ja) = (pair("zh:en"), pair("zh:ja"));
        hints.hold(
            &node(),
            (vec![zh_en, zh_ja], vec![kind("asr")]),
            ROOM_VERSION,
            Arc::default(),
            report(),
        );
        let age = Duration::from_secs(3);
        tokio::time::advance(Duration::from_secs(2)).await;
        hints.wrote(zh_en, [&node()], Instant::now());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(hints.stale(age).is_empty(), "not heard since held");
        hints.report(&node(), report());
        let stale = hints.stale(age);
        assert_eq!(stale.keys().collect::<Vec<_>>(), [&zh_ja]);
        assert!(stale[&zh_ja].contains(&node()));
        hints.wrote(zh_ja, [&node()], Instant::now());
        assert!(hints.stale(age).is_empty());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(hints.stale(age).keys().collect::<Vec<_>>(), [&zh_en]);
        hints.wrote(zh_en, [&node()], Instant::now());
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(
            hints.stale(age).is_empty(),
            "silent since both were written"
        );
        let text = serde_json::to_string(&report()).unwrap();
        hints.report_from((&node(), 1), report(), &text);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(hints.report_again((&node(), 1), &text));
        assert_eq!(hints.stale(age).len(), 2, "heard again: both pairs are due");
        hints.forget(&node());
        assert!(hints.stale(Duration::ZERO).is_empty(), "a node not held");
    }

    #[test]
    fn an_assignment_through_one_pair_makes_the_nodes_other_pairs_due() {
        let hints = Hints::default();
        let pairs = vec![pair("zh:en"), pair("zh:ja"), pair("en:zh")];
        hints.hold(
            &node(),
            (pairs, vec![kind("asr")]),
            ROOM_VERSION,
            Arc::default(),
            report(),
        );
        assert!(hints.take_due().is_empty());
        hints.assigned(&node(), &Route::gpu(&kind("asr")), pair("zh:ja"));
        let due = hints.take_due();
        let mut due_pairs: Vec<String> = due.keys().map(ToString::to_string).collect();
        due_pairs.sort();
        assert_eq!(due_pairs, ["en:zh", "zh:en"]);
        assert!(due.values().all(|nodes| nodes.contains(&node())));
        assert!(hints.take_due().is_empty(), "taken once");
    }

    #[test]
    fn a_draining_node_and_a_full_kind_get_no_room() {
        let hints = hints(ROOM_VERSION);
        hints.full(&node(), &Route::gpu(&kind("translate")));
        assert_eq!(free(&hints, "translate"), 0);
        assert_eq!(free(&hints, "asr"), 2);
        let draining = Arc::new(AtomicBool::new(true));
        let kinds = vec![kind("asr")];
        hints.hold(
            &node(),
            (vec![pair("zh:en")], kinds),
            ROOM_VERSION,
            draining,
            report(),
        );
        assert_eq!(free(&hints, "asr"), 0);
        hints.forget(&node());
        assert_eq!(hints.entry(&node()), None);
    }

    #[test]
    fn a_fallback_is_a_route_of_its_own_that_takes_no_memory() {
        let hints = Hints::default();
        let mut with_fallback = report();
        with_fallback.fallback_slots = [(kind("asr"), 2)].into();
        let kinds = vec![kind("asr"), kind("translate")];
        let draining = Arc::new(AtomicBool::new(false));
        hints.hold(
            &node(),
            (vec![pair("zh:en")], kinds),
            ROOM_VERSION,
            Arc::clone(&draining),
            with_fallback,
        );
        let cpu = Route::fallback(&kind("asr"));
        let entry = hints.entry(&node()).unwrap();
        assert_eq!(entry.free[&cpu], 2);
        assert!(
            !entry
                .free
                .contains_key(&Route::fallback(&kind("translate"))),
            "translate has no fallback"
        );
        hints.assigned(&node(), &cpu, pair("zh:en"));
        let entry = hints.entry(&node()).unwrap();
        assert_eq!(entry.free[&cpu], 1);
        assert_eq!(
            entry.free[&Route::gpu(&kind("asr"))],
            2,
            "the GPUs keep their room"
        );
        assert_eq!(entry.room.unwrap().devices_mb, [16_000]);
        hints.full(&node(), &cpu);
        assert!(hints.lacks_room(&node(), &cpu));
        hints.report(&node(), report());
        assert_eq!(
            hints.entry(&node()).unwrap().free.get(&cpu),
            Some(&0),
            "a fallback no longer reported is taken out of routing"
        );
        assert!(!hints.lacks_room(&node(), &Route::gpu(&kind("asr"))));
        draining.store(true, Ordering::SeqCst);
        let entry = hints.entry(&node()).unwrap();
        assert_eq!(
            entry.free.values().copied().collect::<Vec<_>>(),
            [0, 0, 0],
            "draining: no room on any route, the fallback's included"
        );
    }
}
