//! Fault injection: jobs flow while agents are SIGKILLed and restarted, one
//! agent's link is frozen (half-open: a proxy the test controls passes no
//! byte either way), Redis is restarted and the coordinator is SIGKILLed
//! and restarted; and, apart, while two coordinators are restarted in
//! turn (SIGTERM, as systemd does in a rolling restart), and while the
//! agents are. Every process is
//! real: `redis-server`, the `lingua-coordinator` and `lingua-agent`
//! binaries, an HTTP inference service that counts how often each job ran.
//!
//! The promise checked: every submitted job gets a terminal answer
//! (completed, or failed with a reason), the answer is the one Redis
//! keeps, a completed job really ran, and none completes twice; through
//! a rolling restart (of the coordinators or of the agents), every job
//! completes and none runs twice.
//!
//! Always on: one round of faults. `LINGUA_FAULT_SECONDS=120` repeats the
//! rounds for that long; run with `-- --nocapture` to see the tally and
//! the time each fault took to detect (docs/RELIABILITY.md).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lingua_coordinator::private_redis::PrivateRedis;
use lingua_tests::agent_toml_listing;
use lingua_tests::fleet::{
    Blackhole, CoordinatorProcess, CountingService, FAST_COORDINATOR, free_local_addr, spawn_agent,
    submit_until_answered,
};
use serde_json::{Value, json};
use tokio::process::Child;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const AGENTS: usize = 4;
const CLIENTS: usize = 6;
/// How long a client keeps resubmitting a job (same id) before it counts
/// the job as unanswered: far beyond any job's timeout.
const GIVE_UP: Duration = Duration::from_secs(60);
/// How long a fault may take to be detected before the test fails.
const DETECT_LIMIT: Duration = Duration::from_secs(20);

/// A `lingua-agent` process.
struct AgentProcess {
    name: String,
    config: PathBuf,
    text: String,
    child: Option<Child>,
}

impl AgentProcess {
    /// Starts `name`, connecting to the first of `urls` it can reach, with
    /// `slots` jobs at once run by the counting `service`.
    fn start(dir: &Path, name: &str, urls: &[&str], slots: u32, service: &str) -> Self {
        let config = dir.join(format!("{name}.toml"));
        let rest = format!(
            r#"drain_timeout_ms = 2000
[gpu]
backend = "none"
[jobs.translate]
max_concurrent = {slots}
executor = "http"
url = "http://{service}/run"
timeout_ms = 5000
"#
        );
        let mut agent = Self {
            name: name.to_owned(),
            config,
            text: agent_toml_listing(name, urls, &rest),
            child: None,
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let child = spawn_agent(&self.config, &self.text).unwrap_or_else(|e| panic!("{e}"));
        self.child = Some(child);
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }

    /// Stops it as systemd does (SIGTERM: it drains) and returns how it
    /// exited.
    async fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("it runs");
        lingua_tests::signal::terminate(&mut child, Duration::from_secs(30)).await
    }
}

/// What the fleet under test is made of.
struct Fleet {
    dir: tempfile::TempDir,
    redis: PrivateRedis,
    coordinator: Option<CoordinatorProcess>,
    addr: SocketAddr,
    agents: Vec<AgentProcess>,
    proxy: Blackhole,
    http: reqwest::Client,
}

impl Fleet {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A node's state as the coordinator shows it, when it answers.
    async fn node_state(&self, node: &str) -> Option<String> {
        let response = self
            .http
            .get(self.url(&format!("/v1/nodes/{node}")))
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .ok()?;
        let view: Value = response.json().await.ok()?;
        view["state"].as_str().map(str::to_owned)
    }

    /// `lingua_nodes_connected` on the coordinator, when it answers.
    async fn connected(&self) -> Option<u64> {
        connected(&self.http, self.addr).await
    }
}

/// `lingua_nodes_connected` on the coordinator at `addr`, when it answers.
async fn connected(http: &reqwest::Client, addr: SocketAddr) -> Option<u64> {
    let text = http
        .get(format!("http://{addr}/metrics"))
        .timeout(Duration::from_secs(1))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("lingua_nodes_connected "))
        .and_then(|v| v.trim().parse().ok())
}

/// Polls `check` until it holds; returns how long that took.
async fn until<F, Fut>(what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < DETECT_LIMIT,
            "{what} not within {DETECT_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

/// Every job a client submitted, with its terminal answer if it got one.
type Answers = Vec<(String, Option<Value>)>;

/// `clients` clients, each submitting jobs one after another (each to
/// the next of `jobs_urls` that answers, until it gets a terminal answer;
/// the payload makes the service take `run_ms`) until `stop` is set.
fn load(
    http: &reqwest::Client,
    jobs_urls: &[String],
    clients: usize,
    run_ms: u64,
    stop: &Arc<AtomicBool>,
) -> Vec<JoinHandle<Answers>> {
    (0..clients)
        .map(|client| {
            let (http, urls, stop) = (http.clone(), jobs_urls.to_vec(), Arc::clone(stop));
            tokio::spawn(async move {
                let mut answers = Answers::new();
                let mut serial = 0;
                while !stop.load(Ordering::Relaxed) {
                    serial += 1;
                    let id = format!("fault-{client}-{serial}");
                    let job = json!({
                        "id": id, "kind": "translate", "src_lang": "zh", "tgt_lang": "en",
                        "payload": {"job": id, "sleep_ms": run_ms}, "timeout_ms": 8000,
                    });
                    let answer = submit_until_answered(&http, &urls, &job, GIVE_UP).await;
                    answers.push((id, answer));
                }
                answers
            })
        })
        .collect()
}

/// What became of the jobs a load submitted.
struct Verdict {
    /// Answers by outcome: `completed`, or `failed: <code>`.
    tally: BTreeMap<String, usize>,
    /// Jobs without a terminal answer.
    unanswered: Vec<String>,
    /// Jobs the service ran more than once.
    ran_twice: Vec<String>,
    submitted: usize,
}

impl Verdict {
    /// Stops the load, collects its answers and checks each: its answer
    /// is the one terminal state Redis keeps (read from `jobs_url`'s
    /// instance), and a completed job ran.
    async fn of(
        clients: Vec<JoinHandle<Answers>>,
        stop: &AtomicBool,
        http: &reqwest::Client,
        jobs_url: &str,
        service: &CountingService,
    ) -> Self {
        stop.store(true, Ordering::Relaxed);
        let mut answers = Answers::new();
        for client in clients {
            answers.extend(client.await.unwrap());
        }
        let runs = service.runs();
        let mut verdict = Self {
            tally: BTreeMap::new(),
            unanswered: Vec::new(),
            ran_twice: Vec::new(),
            submitted: answers.len(),
        };
        for (id, answer) in answers {
            let Some(answer) = answer else {
                verdict.unanswered.push(id);
                continue;
            };
            let outcome = if answer["status"] == "completed" {
                "completed".to_owned()
            } else {
                format!(
                    "failed: {}",
                    answer["error"]["code"].as_str().unwrap_or("?")
                )
            };
            *verdict.tally.entry(outcome).or_default() += 1;
            let stored: Value = http
                .get(format!("{jobs_url}/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(
                (&stored["status"], &stored["attempts"]),
                (&answer["status"], &answer["attempts"]),
                "{id}: the answer is the one terminal state Redis keeps"
            );
            let executions = runs.get(&id).copied().unwrap_or(0);
            if answer["status"] == "completed" {
                assert!(executions >= 1, "{id} completed without running");
            }
            if executions > 1 {
                verdict.ran_twice.push(id);
            }
        }
        verdict
    }

    /// Every job got a terminal answer, completed, and ran once.
    fn every_job_completed_once(&self) {
        assert!(
            self.unanswered.is_empty(),
            "jobs without a terminal answer: {:?}",
            self.unanswered
        );
        assert_eq!(
            self.tally.keys().collect::<Vec<_>>(),
            ["completed"],
            "every job completes: {:?}",
            self.tally
        );
        assert!(
            self.ran_twice.is_empty(),
            "jobs run more than once: {:?}",
            self.ran_twice
        );
    }

    fn print(&self, what: &str) {
        println!(
            "{what}: {} jobs submitted, {} answered, {:?}, {} ran more than once, \
             {} without an answer",
            self.submitted,
            self.submitted - self.unanswered.len(),
            self.tally,
            self.ran_twice.len(),
            self.unanswered.len()
        );
    }
}

fn rounds_for() -> Duration {
    std::env::var("LINGUA_FAULT_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::ZERO, Duration::from_secs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_faults_every_job_gets_one_terminal_answer_and_none_completes_twice() {
    let redis = PrivateRedis::start_durable()
        .await
        .unwrap_or_else(|e| panic!("the fault test needs redis-server: {e}"));
    let service = CountingService::start().await;
    let dir = tempfile::tempdir().unwrap();
    let addr = free_local_addr();
    let coordinator = CoordinatorProcess::start(dir.path(), &redis, addr, FAST_COORDINATOR)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let proxy = Blackhole::start(addr).await;
    let service_addr = service.addr.to_string();
    let ws_url = coordinator.ws_url();
    let mut agents: Vec<AgentProcess> = (0..AGENTS)
        .map(|i| {
            let name = format!("steady-{i}");
            AgentProcess::start(dir.path(), &name, &[&ws_url], 4, &service_addr)
        })
        .collect();
    let proxied = format!("ws://{}/v1/node", proxy.addr);
    agents.push(AgentProcess::start(
        dir.path(),
        "behind-proxy",
        &[&proxied],
        4,
        &service_addr,
    ));
    let mut fleet = Fleet {
        dir,
        redis,
        coordinator: Some(coordinator),
        addr,
        agents,
        proxy,
        http: reqwest::Client::new(),
    };
    let everyone = fleet.agents.len() as u64;
    until("every agent to connect", || async {
        fleet.connected().await == Some(everyone)
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(&fleet.http, &[fleet.url("/v1/jobs")], CLIENTS, 30, &stop);

    let mut detected: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let until_time = Instant::now() + rounds_for();
    let mut round = 0usize;
    loop {
        round += 1;
        // An agent SIGKILLed: its socket closes, it leaves routing.
        let victim = round % AGENTS;
        fleet.agents[victim].kill().await;
        let name = fleet.agents[victim].name.clone();
        let took = until("a killed agent to go offline", || async {
            fleet.node_state(&name).await.as_deref() == Some("offline")
        })
        .await;
        detected
            .entry("agent SIGKILLed: offline")
            .or_default()
            .push(took);
        fleet.agents[victim].spawn();

        // A frozen link: nothing passes, nothing closes.
        fleet.proxy.freeze();
        let took = until("the frozen agent to go offline", || async {
            fleet.node_state("behind-proxy").await.as_deref() == Some("offline")
        })
        .await;
        detected
            .entry("link frozen: offline")
            .or_default()
            .push(took);
        fleet.proxy.thaw();

        // Redis restarted under load.
        let restarted = Instant::now();
        fleet.redis.restart().await.unwrap();
        let took = until("every agent back after the Redis restart", || async {
            fleet.connected().await == Some(everyone)
                && fleet.node_state("behind-proxy").await.as_deref() == Some("ready")
        })
        .await;
        detected
            .entry("Redis restarted: all agents ready")
            .or_default()
            .push(restarted.elapsed().max(took));

        // The coordinator SIGKILLed and started again where it was.
        let killed = Instant::now();
        if let Some(coordinator) = fleet.coordinator.take() {
            coordinator.kill().await;
        }
        fleet.coordinator = Some(
            CoordinatorProcess::start(fleet.dir.path(), &fleet.redis, fleet.addr, FAST_COORDINATOR)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
        until("every agent back after the coordinator restart", || async {
            fleet.connected().await == Some(everyone)
        })
        .await;
        detected
            .entry("coordinator SIGKILLed: all agents back")
            .or_default()
            .push(killed.elapsed());
        if Instant::now() >= until_time {
            break;
        }
    }

    let verdict = Verdict::of(
        clients,
        &stop,
        &fleet.http,
        &fleet.url("/v1/jobs"),
        &service,
    )
    .await;
    verdict.print(&format!("fault injection, {round} round(s)"));
    println!("  (a job runs more than once when its first node was lost)");
    for (fault, times) in &detected {
        let worst = times.iter().max().copied().unwrap_or_default();
        println!("  {fault}: worst {worst:?} of {}", times.len());
    }
    assert!(
        verdict.unanswered.is_empty(),
        "jobs without a terminal answer: {:?}",
        verdict.unanswered
    );
    assert!(
        verdict.tally.get("completed").copied().unwrap_or(0) > 0,
        "jobs completed under faults: {:?}",
        verdict.tally
    );
    for agent in &mut fleet.agents {
        agent.kill().await;
    }
    if let Some(coordinator) = fleet.coordinator.take() {
        coordinator.kill().await;
    }
    fleet.redis.stop().await;
}

/// A rolling restart: two coordinators under load, each in turn stopped
/// (SIGTERM) and started again on its address while its nodes move to the
/// other. There are fewer slots than clients, so each stop leaves jobs
/// running, jobs waiting for room and requests waiting for answers: it
/// hands over what it holds, its nodes keep running what they accepted,
/// and every job completes, none run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_completes_every_job_once() {
    let redis = PrivateRedis::start()
        .await
        .unwrap_or_else(|e| panic!("the fault test needs redis-server: {e}"));
    let service = CountingService::start().await;
    let service_addr = service.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let addrs = [free_local_addr(), free_local_addr()];
    let mut coordinators = Vec::new();
    for addr in addrs {
        let started = CoordinatorProcess::start(dir.path(), &redis, addr, FAST_COORDINATOR).await;
        coordinators.push(Some(started.unwrap_or_else(|e| panic!("{e}"))));
    }
    let ws = addrs.map(|addr| format!("ws://{addr}/v1/node"));
    let mut agents: Vec<AgentProcess> = (0..AGENTS)
        .map(|i| {
            let (first, second) = (&ws[i % 2], &ws[(i + 1) % 2]);
            let name = format!("rolling-{i}");
            AgentProcess::start(dir.path(), &name, &[first, second], 1, &service_addr)
        })
        .collect();
    let http = reqwest::Client::new();
    let on_both = || async {
        let (a, b) = (
            connected(&http, addrs[0]).await,
            connected(&http, addrs[1]).await,
        );
        a.unwrap_or(0) + b.unwrap_or(0) == AGENTS as u64
    };
    until("every agent to connect", on_both).await;

    let stop = Arc::new(AtomicBool::new(false));
    let jobs_urls = addrs.map(|addr| format!("http://{addr}/v1/jobs"));
    let clients = load(&http, &jobs_urls, AGENTS * 2, 150, &stop);

    let until_time = Instant::now() + rounds_for();
    let mut restarts = 0usize;
    loop {
        for (which, addr) in addrs.iter().enumerate() {
            let other = addrs[1 - which];
            // Under load: jobs running and waiting on both instances.
            let before = service.runs().len();
            until("jobs to run", || async {
                service.runs().len() > before + AGENTS
            })
            .await;
            let stopped = coordinators[which].take().expect("it runs");
            let status = stopped.terminate().await;
            assert!(status.success(), "a stop exits 0, not {status}");
            until("every agent on the other instance", || async {
                connected(&http, other).await == Some(AGENTS as u64)
            })
            .await;
            let started = CoordinatorProcess::start(dir.path(), &redis, *addr, FAST_COORDINATOR);
            coordinators[which] = Some(started.await.unwrap_or_else(|e| panic!("{e}")));
            restarts += 1;
        }
        if Instant::now() >= until_time {
            break;
        }
    }

    let verdict = Verdict::of(clients, &stop, &http, &jobs_urls[0], &service).await;
    verdict.print(&format!("rolling restart, {restarts} restarts"));
    verdict.every_job_completed_once();
    for agent in &mut agents {
        agent.kill().await;
    }
    for coordinator in coordinators.into_iter().flatten() {
        coordinator.kill().await;
    }
    redis.stop().await;
}

/// A rolling restart of the agents: each in turn stopped (SIGTERM: it
/// drains, finishing what it runs) and started again, under load. Every
/// job completes, none runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_the_agents_under_load_completes_every_job_once() {
    let redis = PrivateRedis::start()
        .await
        .unwrap_or_else(|e| panic!("the fault test needs redis-server: {e}"));
    let service = CountingService::start().await;
    let service_addr = service.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let addr = free_local_addr();
    let coordinator = CoordinatorProcess::start(dir.path(), &redis, addr, FAST_COORDINATOR)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ws = coordinator.ws_url();
    let mut agents: Vec<AgentProcess> = (0..AGENTS)
        .map(|i| {
            let name = format!("upgraded-{i}");
            AgentProcess::start(dir.path(), &name, &[&ws], 1, &service_addr)
        })
        .collect();
    let http = reqwest::Client::new();
    let everyone = AGENTS as u64;
    until("every agent to connect", || async {
        connected(&http, addr).await == Some(everyone)
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let jobs_url = coordinator.url("/v1/jobs");
    let clients = load(
        &http,
        std::slice::from_ref(&jobs_url),
        AGENTS * 2,
        150,
        &stop,
    );
    let until_time = Instant::now() + rounds_for();
    let mut restarts = 0usize;
    loop {
        for agent in &mut agents {
            let before = service.runs().len();
            until("jobs to run", || async {
                service.runs().len() > before + AGENTS
            })
            .await;
            let status = agent.terminate().await;
            assert!(status.success(), "a drain exits 0, not {status}");
            agent.spawn();
            until("every agent connected again", || async {
                connected(&http, addr).await == Some(everyone)
            })
            .await;
            restarts += 1;
        }
        if Instant::now() >= until_time {
            break;
        }
    }
    let verdict = Verdict::of(clients, &stop, &http, &jobs_url, &service).await;
    verdict.print(&format!("agents restarted one by one, {restarts} restarts"));
    verdict.every_job_completed_once();
    for agent in &mut agents {
        agent.kill().await;
    }
    coordinator.kill().await;
    redis.stop().await;
}
