//! The admission queue: jobs that found no room wait here, one queue per
//! language pair and kind, until a capacity report for that pair and kind
//! lets the head try again. Pure: the dispatchers do the IO.
//!
//! Order: priority (higher first), then a fair share between the clients
//! that submitted the jobs (the client token served least so far in this
//! queue goes first) and between the tenants each names (the same, within
//! a client: a client naming many tenants gets one client's share), then
//! arrival.
//! Only the head picks; a successful pick hands the turn to the next head
//! at once (room may be left), a failed one waits for the next report. So
//! the Redis calls waiting jobs cost are bounded by capacity reports, not by
//! a clock or by how many jobs wait. One exception: while the head may run
//! on a GPU only, the first job that may also run on its kind's CPU
//! fallback (by priority, then arrival) is woken with it and tries the
//! fallback's room alone, which the head could not use.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use lingua_shared::{JobId, JobKind, LangPair};
use tokio::sync::Notify;
use tokio::time::Instant;

/// A queue: one pair and kind.
pub type QueueKey = (LangPair, JobKind);

/// Whose fair share a job counts against: its owner (the client token that
/// submitted it; empty for admins), then its tenant within that owner.
pub type Share = (String, String);

/// How fast each queue has been served lately: the weight of the newest
/// interval in the moving average of the time between two grants.
const RATE_WEIGHT: f64 = 0.2;

/// A job waiting for room.
#[derive(Debug)]
pub struct Waiting {
    /// The job.
    pub id: JobId,
    /// Its priority (0-100).
    pub priority: u8,
    /// Whose it is, for the fair share.
    pub share: Share,
    /// Woken when it is the head and may try.
    pub turn: Arc<Notify>,
    /// When it first joined, for a job back after a node refused it: it
    /// keeps its place. `None` for a first arrival.
    pub arrival: Option<u64>,
    /// It may run on its kind's CPU fallback (`device: "any"`).
    pub fallback: bool,
}

/// What a woken job may try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Any room: it heads the queue (or nobody waits).
    Head,
    /// The fallback's room only: the head cannot use it.
    Fallback,
}

/// A waiting job and when it arrived (among all queues of this instance).
#[derive(Debug)]
struct Entry {
    waiting: Waiting,
    seq: u64,
}

#[derive(Debug, Default)]
struct Queue {
    /// Priority (higher first) -> share -> jobs in arrival order.
    levels: BTreeMap<std::cmp::Reverse<u8>, BTreeMap<Share, VecDeque<Entry>>>,
    /// Jobs served per owner, then per share, for the fair share.
    served: (HashMap<String, u64>, HashMap<Share, u64>),
    len: usize,
    /// When the last job left by a successful pick.
    last_grant: Option<Instant>,
    /// Since when jobs have been waiting without a break.
    busy_since: Option<Instant>,
    /// Moving average of the time between grants.
    interval: Option<Duration>,
    /// Moving average of how long a job takes once sent to a node.
    run_time: Option<Duration>,
}

impl Queue {
    /// The first job of the highest priority: of the owner served least,
    /// of its tenant served least, then of the share whose first job
    /// arrived first.
    fn head(&self) -> Option<&Waiting> {
        let (_, shares) = self.levels.iter().next()?;
        let (owners, tenants) = &self.served;
        shares
            .iter()
            .filter_map(|(share, jobs)| Some((share, jobs.front()?)))
            .min_by_key(|(share, first)| {
                let owner = owners.get(&share.0).copied().unwrap_or(0);
                (owner, tenants.get(*share).copied().unwrap_or(0), first.seq)
            })
            .map(|(_, first)| &first.waiting)
    }

    /// While the head may run on a GPU only: the first job (by priority,
    /// then arrival) that may run on the fallback too.
    fn fallback_stand_in(&self) -> Option<&Waiting> {
        if self.head()?.fallback {
            return None;
        }
        self.levels.values().find_map(|tenants| {
            tenants
                .values()
                .flatten()
                .filter(|entry| entry.waiting.fallback)
                .min_by_key(|entry| entry.seq)
                .map(|entry| &entry.waiting)
        })
    }

    fn remove(&mut self, id: &JobId) -> Option<Entry> {
        let mut found = None;
        for tenants in self.levels.values_mut() {
            for jobs in tenants.values_mut() {
                if let Some(at) = jobs.iter().position(|e| &e.waiting.id == id) {
                    found = jobs.remove(at);
                    break;
                }
            }
            if found.is_some() {
                break;
            }
        }
        self.levels.retain(|_, tenants| {
            tenants.retain(|_, jobs| !jobs.is_empty());
            !tenants.is_empty()
        });
        if found.is_some() {
            self.len -= 1;
        }
        if self.len == 0 {
            // Nobody competes any more: the fair share starts over, and
            // the time until the next backlog is no service time.
            self.served.0.clear();
            self.served.1.clear();
            self.busy_since = None;
        }
        found
    }

    /// How many wait ahead of a job of `priority` joining now (jobs of
    /// higher or equal priority; the fair share is ignored).
    fn ahead_of(&self, priority: u8) -> usize {
        self.levels
            .range(..=std::cmp::Reverse(priority))
            .flat_map(|(_, tenants)| tenants.values())
            .map(VecDeque::len)
            .sum()
    }
}

/// `newest` folded into a moving average.
fn average(average: Option<Duration>, newest: Duration) -> Duration {
    match average {
        Some(average) => average.mul_f64(1.0 - RATE_WEIGHT) + newest.mul_f64(RATE_WEIGHT),
        None => newest,
    }
}

/// Why a job could not join a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// This instance holds `max_queued` jobs already.
    Full,
    /// At the rate this queue is served, the job would not finish before
    /// its deadline: its turn comes after `wait`, and a job of its kind
    /// takes about `run` once sent.
    TooLate {
        /// The expected wait.
        wait: Duration,
        /// The expected run time.
        run: Duration,
    },
}

/// Every queue of this instance.
#[derive(Debug)]
pub struct Queues {
    queues: HashMap<QueueKey, Queue>,
    /// Capacity reports seen per pair and kind (a job that found no room
    /// compares before and after joining: a report in between must not be
    /// lost on it).
    wakes: HashMap<QueueKey, u64>,
    total: usize,
    max: usize,
    arrivals: u64,
}

impl Queues {
    /// Queues holding at most `max` jobs in all.
    pub fn new(max: usize) -> Self {
        Self {
            queues: HashMap::new(),
            wakes: HashMap::new(),
            total: 0,
            max,
            arrivals: 0,
        }
    }

    /// Jobs waiting in `key`'s queue.
    pub fn depth(&self, key: &QueueKey) -> usize {
        self.queues.get(key).map_or(0, |q| q.len)
    }

    /// Jobs waiting in all.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Whether the cap is reached.
    pub fn full(&self) -> bool {
        self.total >= self.max
    }

    /// A job of `key` ran for `took`, from its assignment to its result.
    pub fn ran(&mut self, key: &QueueKey, took: Duration) {
        let queue = self.queues.entry(key.clone()).or_default();
        queue.run_time = Some(average(queue.run_time, took));
    }

    /// How long a job of `key` takes once sent, lately.
    pub fn run_time(&self, key: &QueueKey) -> Option<Duration> {
        self.queues.get(key)?.run_time
    }

    /// How long a job of `priority` joining `key` now can expect to wait,
    /// at the rate the queue has been served; `None` before the queue has
    /// a rate, or when nobody waits ahead.
    pub fn expected_wait(&self, key: &QueueKey, priority: u8) -> Option<Duration> {
        let queue = self.queues.get(key)?;
        let ahead = queue.ahead_of(priority);
        let interval = queue.interval?;
        (ahead > 0).then(|| interval * u32::try_from(ahead + 1).unwrap_or(u32::MAX))
    }

    /// The next arrival number: a job's place in its queue, should it
    /// wait, among jobs of the same priority and tenant.
    pub fn arrive(&mut self) -> u64 {
        self.arrivals += 1;
        self.arrivals
    }

    /// Adds a job that must wait, unless the cap is reached or the queue
    /// cannot serve it before `deadline` (at `now`).
    /// Returns its arrival number (give it back as `arrival` if it joins
    /// again).
    pub fn join(
        &mut self,
        key: &QueueKey,
        waiting: Waiting,
        now: Instant,
        deadline: Instant,
    ) -> Result<u64, Shed> {
        if self.full() {
            return Err(Shed::Full);
        }
        let wait = self.expected_wait(key, waiting.priority);
        let run = self.run_time(key);
        if (wait.is_some() || run.is_some())
            && now + wait.unwrap_or_default() + run.unwrap_or_default() > deadline
        {
            return Err(Shed::TooLate {
                wait: wait.unwrap_or_default(),
                run: run.unwrap_or_default(),
            });
        }
        let seq = waiting.arrival.unwrap_or_else(|| self.arrive());
        let queue = self.queues.entry(key.clone()).or_default();
        queue.busy_since.get_or_insert(now);
        let jobs = queue
            .levels
            .entry(std::cmp::Reverse(waiting.priority))
            .or_default()
            .entry(waiting.share.clone())
            .or_default();
        let at = jobs.partition_point(|e| e.seq < seq);
        jobs.insert(at, Entry { waiting, seq });
        queue.len += 1;
        self.total += 1;
        Ok(seq)
    }

    /// What `id` may try now: any room when it heads `key`'s queue (or
    /// the queue is empty: nobody to wait behind), the fallback's room
    /// when it stands in for a head that cannot use it; nothing otherwise.
    pub fn turn(&self, key: &QueueKey, id: &JobId) -> Option<Turn> {
        let Some(queue) = self.queues.get(key) else {
            return Some(Turn::Head);
        };
        match queue.head() {
            None => Some(Turn::Head),
            Some(head) if &head.id == id => Some(Turn::Head),
            Some(_) => queue
                .fallback_stand_in()
                .is_some_and(|stand_in| &stand_in.id == id)
                .then_some(Turn::Fallback),
        }
    }

    /// A capacity report for `key`: the head may try, and so may the job
    /// standing in for it on the fallback.
    pub fn wake(&mut self, key: &QueueKey) {
        match self.wakes.get_mut(key) {
            Some(wakes) => *wakes += 1,
            None => {
                self.wakes.insert(key.clone(), 1);
            }
        }
        if let Some(queue) = self.queues.get(key) {
            for waiting in [queue.head(), queue.fallback_stand_in()]
                .into_iter()
                .flatten()
            {
                waiting.turn.notify_one();
            }
        }
    }

    /// Capacity reports seen for `key` so far.
    pub fn wakes(&self, key: &QueueKey) -> u64 {
        self.wakes.get(key).copied().unwrap_or(0)
    }

    /// `id` left `key`'s queue without room (its deadline, a failure, its
    /// task ended); the next head is woken if it became the head.
    pub fn leave(&mut self, key: &QueueKey, id: &JobId) {
        let Some(queue) = self.queues.get_mut(key) else {
            return;
        };
        let was_head = queue.head().is_some_and(|head| &head.id == id);
        if queue.remove(id).is_some() {
            self.total -= 1;
        }
        if was_head {
            self.wake(key);
        }
        self.drop_if_idle(key);
    }

    /// `id` found room: it leaves the queue (if it was in it), its share
    /// (and its owner) counts one more served, and the next head tries at
    /// once: room may be left.
    pub fn granted(&mut self, key: &QueueKey, id: &JobId, share: &Share, now: Instant) {
        let queue = self.queues.entry(key.clone()).or_default();
        let busy_since = queue.busy_since;
        if queue.remove(id).is_some() {
            self.total -= 1;
            // Service time counts only while jobs wait: an idle queue's
            // gaps between grants say nothing of its rate.
            if let Some(busy) = busy_since {
                let from = queue.last_grant.map_or(busy, |last| last.max(busy));
                let newest = now.saturating_duration_since(from);
                queue.interval = Some(average(queue.interval, newest));
            }
        }
        let (owners, shares) = &mut queue.served;
        match owners.get_mut(&share.0) {
            Some(served) => *served += 1,
            None => {
                owners.insert(share.0.clone(), 1);
            }
        }
        match shares.get_mut(share) {
            Some(served) => *served += 1,
            None => {
                shares.insert(share.clone(), 1);
            }
        }
        queue.last_grant = Some(now);
        self.wake(key);
        self.drop_if_idle(key);
    }

    /// A queue that never served a job and has nobody waiting is dropped
    /// (one that served keeps its rate: a few numbers per pair and kind).
    fn drop_if_idle(&mut self, key: &QueueKey) {
        if self
            .queues
            .get(key)
            .is_some_and(|q| q.len == 0 && q.last_grant.is_none())
        {
            self.queues.remove(key);
        }
    }

    /// The pairs and kinds with jobs waiting, and how many.
    pub fn depths(&self) -> Vec<(QueueKey, usize)> {
        self.queues
            .iter()
            .filter(|(_, q)| q.len > 0)
            .map(|(key, q)| (key.clone(), q.len))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> QueueKey {
        ("zh:en".parse().unwrap(), JobKind::new("asr").unwrap())
    }

    /// An admin's job's share: tenant `tenant`.
    fn share(tenant: &str) -> Share {
        (String::new(), tenant.into())
    }

    fn waiting(id: &str, priority: u8, tenant: &str) -> Waiting {
        Waiting {
            id: JobId::new(id).unwrap(),
            priority,
            share: share(tenant),
            turn: Arc::new(Notify::new()),
            arrival: None,
            fallback: true,
        }
    }

    fn head(queues: &Queues) -> String {
        let queue = &queues.queues[&key()];
        queue.head().unwrap().id.to_string()
    }

    /// Serves the whole queue, one grant at a time; the order served.
    fn drain(queues: &mut Queues, now: Instant) -> Vec<String> {
        let mut order = Vec::new();
        while queues.depth(&key()) > 0 {
            let first = queues.queues[&key()].head().unwrap();
            let (id, share) = (first.id.clone(), first.share.clone());
            queues.granted(&key(), &id, &share, now);
            order.push(id.to_string());
        }
        order
    }

    #[test]
    fn higher_priority_first_then_arrival() {
        let mut queues = Queues::new(100);
        let (now, deadline) = (Instant::now(), Instant::now() + Duration::from_secs(60));
        for (id, priority) in [("low-1", 10), ("high-1", 90), ("low-2", 10), ("high-2", 90)] {
            queues
                .join(&key(), waiting(id, priority, "t"), now, deadline)
                .unwrap();
        }
        assert_eq!(head(&queues), "high-1");
        assert_eq!(
            drain(&mut queues, now),
            ["high-1", "high-2", "low-1", "low-2"]
        );
        assert_eq!(queues.total(), 0);
    }

    #[test]
    fn a_job_back_from_a_refusal_keeps_its_place() {
        let mut queues = Queues::new(100);
        let (now, deadline) = (Instant::now(), Instant::now() + Duration::from_secs(60));
        let first = queues
            .join(&key(), waiting("a", 50, "t"), now, deadline)
            .unwrap();
        queues
            .join(&key(), waiting("b", 50, "t"), now, deadline)
            .unwrap();
        queues.granted(&key(), &JobId::new("a").unwrap(), &share("t"), now);
        assert_eq!(head(&queues), "b");
        // The node refused "a": it joins again where it was.
        let back = Waiting {
            arrival: Some(first),
            ..waiting("a", 50, "t")
        };
        queues.join(&key(), back, now, deadline).unwrap();
        assert_eq!(drain(&mut queues, now), ["a", "b"]);
    }

    /// A client naming a tenant per job gets one client's share: owners
    /// take turns first, then the tenants within each.
    #[test]
    fn a_client_spreading_its_jobs_over_tenants_gets_one_clients_share() {
        let mut queues = Queues::new(100);
        let (now, deadline) = (Instant::now(), Instant::now() + Duration::from_secs(60));
        for i in 1..=4 {
            let spread = Waiting {
                share: ("spreader".into(), format!("tenant-{i}")),
                ..waiting(&format!("s{i}"), 50, "")
            };
            queues.join(&key(), spread, now, deadline).unwrap();
        }
        for i in 1..=2 {
            let plain = Waiting {
                share: ("plain".into(), "plain".into()),
                ..waiting(&format!("p{i}"), 50, "")
            };
            queues.join(&key(), plain, now, deadline).unwrap();
        }
        assert_eq!(
            drain(&mut queues, now),
            ["s1", "p1", "s2", "p2", "s3", "s4"]
        );
    }

    #[test]
    fn a_flooding_tenant_shares_turns_with_the_others() {
        let mut queues = Queues::new(100);
        let (now, deadline) = (Instant::now(), Instant::now() + Duration::from_secs(60));
        for i in 1..=4 {
            let id = format!("a{i}");
            queues
                .join(&key(), waiting(&id, 50, "flood"), now, deadline)
                .unwrap();
        }
        for i in 1..=2 {
            let id = format!("b{i}");
            queues
                .join(&key(), waiting(&id, 50, "quiet"), now, deadline)
                .unwrap();
        }
        assert_eq!(
            drain(&mut queues, now),
            ["a1", "b1", "a2", "b2", "a3", "a4"]
        );
    }

    #[test]
    fn the_cap_and_the_service_rate_shed_what_cannot_be_served() {
        let mut queues = Queues::new(3);
        let now = Instant::now();
        let far = now + Duration::from_secs(60);
        // An idle hour says nothing of the rate.
        queues.granted(&key(), &JobId::new("early").unwrap(), &share("t"), now);
        let now = now + Duration::from_secs(3600);
        // A backlog served one job every 100 ms.
        for id in ["s1", "s2", "s3"] {
            queues.join(&key(), waiting(id, 50, "t"), now, far).unwrap();
        }
        for (step, id) in ["s1", "s2", "s3"].into_iter().enumerate() {
            let at = now + Duration::from_millis(100 * (step as u64 + 1));
            queues.granted(&key(), &JobId::new(id).unwrap(), &share("t"), at);
        }
        let later = now + Duration::from_millis(400);
        let far = later + Duration::from_secs(60);
        queues
            .join(&key(), waiting("w1", 50, "t"), later, far)
            .unwrap();
        queues
            .join(&key(), waiting("w2", 50, "t"), later, far)
            .unwrap();
        // Once its kind is known to take 200 ms, 150 ms is too little even
        // with nobody ahead.
        let mut timed = Queues::new(3);
        timed.ran(&key(), Duration::from_millis(200));
        let short = waiting("w6", 90, "t");
        let shed = timed.join(&key(), short, later, later + Duration::from_millis(150));
        let run = Duration::from_millis(200);
        assert_eq!(
            shed,
            Err(Shed::TooLate {
                wait: Duration::ZERO,
                run
            })
        );
        // Two ahead: about 300 ms to its turn, and it has 250 ms.
        let hurried = waiting("w3", 50, "t");
        let shed = queues.join(&key(), hurried, later, later + Duration::from_millis(250));
        assert_eq!(
            shed,
            Err(Shed::TooLate {
                wait: Duration::from_millis(300),
                run: Duration::ZERO,
            })
        );
        // A higher priority has nobody ahead: it joins.
        let urgent = waiting("w4", 90, "t");
        queues
            .join(&key(), urgent, later, later + Duration::from_millis(250))
            .unwrap();
        let one_more = queues.join(&key(), waiting("w5", 50, "t"), later, far);
        assert_eq!(one_more, Err(Shed::Full));
        assert_eq!(queues.depth(&key()), 3);
    }

    #[test]
    fn a_report_wakes_the_head_only_and_leaving_passes_the_turn_on() {
        let mut queues = Queues::new(10);
        let (now, deadline) = (Instant::now(), Instant::now() + Duration::from_secs(60));
        let (first, second) = (waiting("first", 50, "t"), waiting("second", 50, "t"));
        let (first_turn, second_turn) = (first.turn.clone(), second.turn.clone());
        queues.join(&key(), first, now, deadline).unwrap();
        queues.join(&key(), second, now, deadline).unwrap();
        let before = queues.wakes(&key());
        queues.wake(&key());
        assert_eq!(queues.wakes(&key()), before + 1);
        let woken = |turn: &Arc<Notify>| {
            let notified = turn.notified();
            tokio::pin!(notified);
            notified.as_mut().enable()
        };
        assert!(woken(&first_turn));
        assert!(!woken(&second_turn), "not its turn");
        assert_eq!(
            queues.turn(&key(), &JobId::new("first").unwrap()),
            Some(Turn::Head)
        );
        queues.leave(&key(), &JobId::new("first").unwrap());
        assert!(woken(&second_turn), "the head left: its turn");
        assert_eq!(
            queues.turn(&key(), &JobId::new("second").unwrap()),
            Some(Turn::Head)
        );
    }

    #[test]
    fn a_head_that_cannot_use_the_fallback_does_not_keep_it_from_the_others() {
        let mut queues = Queues::new(100);
        let now = Instant::now();
        let deadline = now + Duration::from_secs(60);
        let gpu_only = Waiting {
            fallback: false,
            ..waiting("gpu-only", 90, "t")
        };
        let gpu_only_turn = Arc::clone(&gpu_only.turn);
        queues.join(&key(), gpu_only, now, deadline).unwrap();
        let behind = waiting("behind", 50, "t");
        let last = waiting("last", 50, "t");
        let (behind_turn, last_turn) = (Arc::clone(&behind.turn), Arc::clone(&last.turn));
        queues.join(&key(), behind, now, deadline).unwrap();
        queues.join(&key(), last, now, deadline).unwrap();
        queues.wake(&key());
        let woken = |turn: &Arc<Notify>| {
            let notified = turn.notified();
            tokio::pin!(notified);
            notified.as_mut().enable()
        };
        assert!(woken(&gpu_only_turn));
        assert!(woken(&behind_turn), "it stands in on the fallback");
        assert!(!woken(&last_turn));
        let id = |name: &str| JobId::new(name).unwrap();
        assert_eq!(queues.turn(&key(), &id("gpu-only")), Some(Turn::Head));
        assert_eq!(queues.turn(&key(), &id("behind")), Some(Turn::Fallback));
        assert_eq!(queues.turn(&key(), &id("last")), None);
        queues.granted(&key(), &id("behind"), &share("t"), now);
        assert_eq!(queues.turn(&key(), &id("last")), Some(Turn::Fallback));
        queues.leave(&key(), &id("gpu-only"));
        assert_eq!(
            queues.turn(&key(), &id("last")),
            Some(Turn::Head),
            "a head that may use the fallback needs no stand-in"
        );
    }
}
