//! Throughput: no-op jobs through 100 agents over the HTTP API, closed loop
//! (as fast as the clients go) and open loop at half that rate; beside it
//! the ceiling, the rate Redis alone sustains for the script calls a job
//! costs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lingua_coordinator::config::PickPolicy;
use lingua_coordinator::store::{
    JobPick, JobStart, NewJob, PickOn, Route, RouteEntry, Store, StoreError,
};
use lingua_shared::{JobId, JobKind, LangPair, NodeId};
use lingua_tests::fleet::{CoordinatorProcess, free_local_addr, host_steal, proc_sample};
use serde_json::json;
use tokio::time::Instant;

use crate::{
    BenchError, Load, Options, Percentiles, Redis, Row, SLOTS, closed_loop, core_pct, http_client,
    metric_sum, noop_fleet, open_loop, scratch, tails,
};

const AGENTS: usize = 100;

pub async fn run(options: &Options) -> Result<Vec<Row>, BenchError> {
    let redis = Redis::start(options.redis).await?;
    let dir = scratch()?;
    let config = options.coordinator_config();
    let coordinator =
        CoordinatorProcess::start(dir.path(), &redis, free_local_addr(), &config).await?;
    let agents = noop_fleet(&[coordinator.ws_url()], AGENTS).await?;
    let client = http_client(options.clients)?;
    let body = job_body(options.payload_bytes);
    let urls = [coordinator.url("/v1/jobs")];
    // Warm up connections and caches.
    closed_loop(
        &client,
        &urls,
        options.clients,
        Duration::from_secs(1),
        &body,
    )
    .await;
    let mut closed = Closed::measure(options, (&client, &coordinator, &redis), &body).await?;
    let rate = closed.load.jobs as f64 / options.window.as_secs_f64();

    let waits_before = Waits::now(&coordinator, &redis).await?;
    let open_started = Instant::now();
    let mut open = open_loop(&client, &urls[0], rate / 2.0, options.window, &body).await;
    let waits = Waits::now(&coordinator, &redis).await?.since(waits_before);
    // The window, and the answers still coming in after it.
    let open_took = open_started.elapsed();
    for agent in agents {
        let _ = agent.stop().await;
    }
    coordinator.kill().await;

    let ceiling = ceiling(&redis, options).await?;
    let mut rows = load_rows(options, (&mut closed.load, &mut open), (rate, ceiling));
    rows.extend(closed.cost_rows(options, ceiling));
    rows.push(Row::new(
        "At half load, waiting for a CPU (run queue, summed over each process's threads, per second): coordinator, Redis, bench; host CPU time stolen by the hypervisor",
        waits.show(open_took),
        "",
    ));
    rows.extend(tails::slowest(&open, 0.001, "at half load"));
    Ok(rows)
}

/// The rows of the closed loop's rate and latency, the open loop's
/// latency at half that `rate`, and the Redis-alone `ceiling`.
fn load_rows(
    options: &Options,
    (closed, open): (&mut Load, &mut Load),
    (rate, ceiling): (f64, f64),
) -> Vec<Row> {
    let closed_pct = Percentiles::of(&mut closed.latencies);
    let open_pct = Percentiles::of(&mut open.latencies);
    vec![
        Row::new(
            format!(
                "Throughput, {AGENTS} agents, {} keep-alive clients, coordinator worker threads: {}, {} (closed loop){}",
                options.clients,
                options.coordinator_workers(),
                options.redis.describe(),
                match options.payload_bytes {
                    0 => String::new(),
                    bytes => format!(", payloads of about {bytes} bytes"),
                }
            ),
            format!("{rate:.0} jobs/s ({} failed)", closed.failed),
            ">= 10,000 jobs/s",
        ),
        Row::new(
            "Latency p50 / p99 / p99.9 at that rate",
            closed_pct.show(),
            "",
        ),
        Row::new(
            format!(
                "Latency p50 / p99 / p99.9 at half that rate ({:.0} jobs/s offered, open loop)",
                rate / 2.0
            ),
            format!(
                "{} ({} jobs, {} failed)",
                open_pct.show(),
                open.jobs,
                open.failed
            ),
            "p99 < 5 ms",
        ),
        Row::new(
            "Redis-alone ceiling (route_pick recording the job, job_finish, route_update every 16 jobs)",
            format!(
                "{ceiling:.0} jobs/s; the fleet reached {:.0} %",
                rate * 100.0 / ceiling
            ),
            ">= 60 % of the ceiling",
        ),
    ]
}

/// The closed loop, and what it cost.
struct Closed {
    load: Load,
    /// CPU time of the coordinator, of Redis and of the bench over it.
    cpu: (Duration, Duration, Duration),
    /// Redis script calls.
    scripts: u64,
    /// Assignments sent to nodes.
    assignments: u64,
    frames: Frames,
}

impl Closed {
    /// Runs the closed loop of `body` jobs for the window, with the
    /// counters read before and after.
    async fn measure(
        options: &Options,
        (client, coordinator, redis): (&reqwest::Client, &CoordinatorProcess, &Redis),
        body: &serde_json::Value,
    ) -> Result<Self, BenchError> {
        let urls = [coordinator.url("/v1/jobs")];
        let redis_before = redis.counters().await?;
        let cpu_before = proc_sample(coordinator.pid()).map_err(|e| e.to_string())?;
        let bench_before = proc_sample(std::process::id()).map_err(|e| e.to_string())?;
        let assignments_before = crate::assignments(client, coordinator).await?;
        let frames_before = Frames::of(client, coordinator).await?;
        let load = closed_loop(client, &urls, options.clients, options.window, body).await;
        let cpu_after = proc_sample(coordinator.pid()).map_err(|e| e.to_string())?;
        let bench_after = proc_sample(std::process::id()).map_err(|e| e.to_string())?;
        let redis_after = redis.counters().await?;
        let assignments = crate::assignments(client, coordinator).await? - assignments_before;
        let frames = Frames::of(client, coordinator).await? - frames_before;
        Ok(Self {
            load,
            cpu: (
                cpu_after.cpu.saturating_sub(cpu_before.cpu),
                redis_after.cpu.saturating_sub(redis_before.cpu),
                bench_after.cpu.saturating_sub(bench_before.cpu),
            ),
            scripts: redis_after.scripts.saturating_sub(redis_before.scripts),
            assignments,
            frames,
        })
    }

    /// The rows of what a job cost: script calls, frames, and the CPU of
    /// each process, beside the most this host's cores could run at that
    /// cost (against the `ceiling`).
    fn cost_rows(&self, options: &Options, ceiling: f64) -> Vec<Row> {
        let jobs = self.load.jobs.max(1) as f64;
        let (coordinator, redis, bench) = self.cpu;
        let per_job = |cpu: Duration| cpu.as_secs_f64() * 1e6 / jobs;
        let (cpu_per_job, redis_per_job, bench_per_job) =
            (per_job(coordinator), per_job(redis), per_job(bench));
        // What this host's cores could run if they ran nothing but these
        // three, at this run's cost per job: the most the share of the
        // ceiling can reach here.
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let all_per_job = cpu_per_job + redis_per_job + bench_per_job;
        let cores_bound = cores as f64 * 1e6 / all_per_job.max(1.0);
        vec![
            Row::new(
                "Script calls, assignments per job in the closed loop",
                format!(
                    "{:.2}, {:.3}",
                    self.scripts as f64 / jobs,
                    self.assignments as f64 / jobs
                ),
                "",
            ),
            Row::new(
                "Node socket frames per job in the closed loop: from nodes (of which job_accept), to nodes",
                self.frames.per_job(self.load.jobs),
                "",
            ),
            Row::new(
                "Coordinator CPU during the closed loop",
                format!(
                    "{}, {cpu_per_job:.0} µs per job",
                    core_pct(coordinator, options.window)
                ),
                "<= 80 µs per job",
            ),
            Row::new(
                "Redis CPU during the closed loop",
                format!(
                    "{}, {redis_per_job:.0} µs per job",
                    core_pct(redis, options.window)
                ),
                "",
            ),
            Row::new(
                format!("Bench CPU (load generator and {AGENTS} agents) during the closed loop"),
                format!(
                    "{}, {bench_per_job:.0} µs per job",
                    core_pct(bench, options.window)
                ),
                "",
            ),
            Row::new(
                format!("The three together, and the most {cores} cores run at that cost"),
                format!(
                    "{all_per_job:.0} µs per job: {cores_bound:.0} jobs/s, {:.0} % of the ceiling",
                    cores_bound * 100.0 / ceiling
                ),
                "",
            ),
        ]
    }
}

/// How long each process was ready to run but waited for a CPU, and how
/// much of the host's CPU time the hypervisor took: whether a load's
/// tails are this host's contention, not a stage of the coordinator.
#[derive(Clone, Copy)]
struct Waits {
    /// `None` where the kernel keeps no `schedstat`.
    coordinator: Option<Duration>,
    redis: Option<Duration>,
    bench: Option<Duration>,
    /// Host ticks stolen, and all host ticks.
    steal: (u64, u64),
}

impl Waits {
    async fn now(coordinator: &CoordinatorProcess, redis: &Redis) -> Result<Self, BenchError> {
        Ok(Self {
            coordinator: proc_sample(coordinator.pid())
                .map_err(|e| e.to_string())?
                .waited,
            redis: redis.counters().await?.waited,
            bench: proc_sample(std::process::id())
                .map_err(|e| e.to_string())?
                .waited,
            steal: host_steal().map_err(|e| format!("/proc/stat: {e}"))?,
        })
    }

    fn since(self, before: Self) -> Self {
        let since = |after: Option<Duration>, before: Option<Duration>| {
            after.zip(before).map(|(a, b)| a.saturating_sub(b))
        };
        Self {
            coordinator: since(self.coordinator, before.coordinator),
            redis: since(self.redis, before.redis),
            bench: since(self.bench, before.bench),
            steal: (
                self.steal.0.saturating_sub(before.steal.0),
                self.steal.1.saturating_sub(before.steal.1),
            ),
        }
    }

    /// Per second of `took`; each process's wait summed over its threads.
    fn show(self, took: Duration) -> String {
        let per_second = |waited: Option<Duration>| {
            waited.map_or("unknown".to_owned(), |waited| {
                format!("{:.1}", waited.as_secs_f64() * 1000.0 / took.as_secs_f64())
            })
        };
        format!(
            "{}, {}, {} ms; {:.1} %",
            per_second(self.coordinator),
            per_second(self.redis),
            per_second(self.bench),
            self.steal.0 as f64 * 100.0 / self.steal.1.max(1) as f64
        )
    }
}

/// Frames counted on the coordinator's node sockets.
#[derive(Clone, Copy)]
struct Frames {
    from_nodes: u64,
    accepts: u64,
    to_nodes: u64,
}

impl Frames {
    async fn of(
        client: &reqwest::Client,
        coordinator: &CoordinatorProcess,
    ) -> Result<Self, BenchError> {
        const FAMILY: &str = "lingua_node_frames_total";
        Ok(Self {
            from_nodes: metric_sum(client, coordinator, &format!("{FAMILY}{{direction=\"in\""))
                .await?,
            accepts: metric_sum(
                client,
                coordinator,
                &format!("{FAMILY}{{direction=\"in\",type=\"job_accept\"}}"),
            )
            .await?,
            to_nodes: metric_sum(client, coordinator, &format!("{FAMILY}{{direction=\"out\""))
                .await?,
        })
    }

    fn per_job(self, jobs: u64) -> String {
        let per_job = |count: u64| count as f64 / jobs.max(1) as f64;
        format!(
            "{:.2} ({:.2}), {:.2}",
            per_job(self.from_nodes),
            per_job(self.accepts),
            per_job(self.to_nodes)
        )
    }
}

impl std::ops::Sub for Frames {
    type Output = Self;

    fn sub(self, before: Self) -> Self {
        Self {
            from_nodes: self.from_nodes.saturating_sub(before.from_nodes),
            accepts: self.accepts.saturating_sub(before.accepts),
            to_nodes: self.to_nodes.saturating_sub(before.to_nodes),
        }
    }
}

/// A translate job whose payload is about `bytes` long: segments of
/// text, as a translation request has (`{}` for 0).
fn job_body(bytes: u32) -> serde_json::Value {
    const TEXT: &str = "Lorem ipsum dolor sit amet, consectetur adipiscing";
    let segments: Vec<_> = (0..bytes.div_ceil(64))
        .map(|id| json!({"id": id, "text": TEXT}))
        .collect();
    let payload = if segments.is_empty() {
        json!({})
    } else {
        json!({ "segments": segments })
    };
    json!({"kind": "translate", "src_lang": "zh", "tgt_lang": "en", "payload": payload})
}

/// Jobs per second Redis sustains when a job is nothing but its Redis
/// calls (the pick that records it with the claim of its id beside it,
/// then its result), issued by `clients` concurrent tasks over one
/// multiplexed connection, as the coordinator issues them, with records
/// of the jobs' size.
async fn ceiling(redis: &Redis, options: &Options) -> Result<f64, BenchError> {
    let (clients, window) = (options.clients, options.window);
    let store = redis.connect_store().await?;
    let pair: LangPair = "ko:ja".parse().map_err(|e| format!("{e}"))?;
    let kind = JobKind::new("translate").map_err(|e| e.to_string())?;
    let lease = Duration::from_secs(60);
    let nodes: Vec<NodeId> = (0..AGENTS)
        .map(|i| NodeId::new(format!("ceiling-{i:03}")).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    for node in &nodes {
        store
            .pool_join(pair, node, &[], 100, lease)
            .await
            .map_err(|e| e.to_string())?;
    }
    store
        .route_update(pair, &with_room(nodes.iter().cloned(), &kind), lease)
        .await
        .map_err(|e| e.to_string())?;
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + window;
    // A request and an output the size of the jobs' (a simulated job's
    // output holds its payload).
    let body = job_body(options.payload_bytes);
    let request = body.to_string();
    let outcome = json!({"output": {"payload": body["payload"]}}).to_string();
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let job = CeilingJob {
                pair,
                kind: kind.clone(),
                request: request.clone(),
                outcome: outcome.clone(),
                lease,
            };
            let (store, nodes, done) = (store.clone(), nodes.clone(), Arc::clone(&done));
            tokio::spawn(async move { job.run(&store, (client, end), &nodes, &done).await })
        })
        .collect();
    for task in tasks {
        task.await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("redis: {e}"))?;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / window.as_secs_f64())
}

/// What one client of the ceiling's measurement sends: jobs of `kind`
/// for `pair` with this `request` and `outcome`.
struct CeilingJob {
    pair: LangPair,
    kind: JobKind,
    request: String,
    outcome: String,
    lease: Duration,
}

impl CeilingJob {
    /// Client `client` picks and finishes jobs until `end`, counting them
    /// in `done`, and gives `nodes` their room back as the coordinator
    /// would (every 16 jobs, or when none is left).
    async fn run(
        &self,
        store: &Store,
        (client, end): (u32, Instant),
        nodes: &[NodeId],
        done: &AtomicU64,
    ) -> Result<(), StoreError> {
        let (pair, lease) = (self.pair, self.lease);
        let mut picked = Vec::new();
        let mut serial = 0u64;
        let route = Route::gpu(&self.kind);
        let on = PickOn {
            route: &route,
            session: None,
            affinity: Duration::ZERO,
            policy: PickPolicy::Capacity,
            excluded: &[],
        };
        while Instant::now() < end {
            serial += 1;
            let id = JobId::new(format!("ceiling-{client}-{serial}")).expect("a valid job id");
            let job = NewJob {
                id: &id,
                pair,
                request: &self.request,
                timeout: lease,
                retention: lease,
                coordinator: "bench",
                opener: serial,
            };
            let (node, attempt) = match store.job_open(job, (on, true)).await? {
                JobStart::New(Some(JobPick::Node(node, attempt))) => (node, attempt),
                _ => {
                    let entries = with_room(nodes.iter().cloned(), &self.kind);
                    store.route_update(pair, &entries, lease).await?;
                    continue;
                }
            };
            store
                .job_finish(
                    (pair, &id),
                    (Some(&node), attempt),
                    true,
                    &self.outcome,
                    lease,
                )
                .await?;
            picked.push(node);
            if picked.len() == 16 {
                let entries = with_room(picked.drain(..), &self.kind);
                store.route_update(pair, &entries, lease).await?;
            }
            done.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Routing entries that give every node all its slots of `kind` back.
pub fn with_room(nodes: impl Iterator<Item = NodeId>, kind: &JobKind) -> Vec<RouteEntry> {
    nodes
        .map(|node| RouteEntry {
            node,
            free: BTreeMap::from([(Route::gpu(kind), SLOTS)]),
            room: None,
        })
        .collect()
}
