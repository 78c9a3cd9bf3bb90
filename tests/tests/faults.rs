//! Fault injection: jobs flow while agents are SIGKILLed and restarted, one
//! agent's link is frozen (half-open: a proxy the test controls passes no
//! byte either way), Redis is restarted and the coordinator is SIGKILLed
//! and restarted. Every process is real: `redis-server`, the
//! `lingua-coordinator` and `lingua-agent` binaries, an HTTP inference
//! service that counts how often each job ran.
//!
//! The promise checked: every submitted job gets a terminal answer
//! (completed, or failed with a reason), the answer is the one Redis
//! keeps, a completed job really ran, and none completes twice.
//!
//! Always on: one round of faults. `LINGUA_FAULT_SECONDS=120` repeats the
//! rounds for that long; run with `-- --nocapture` to see the tally and
//! the time each fault took to detect (docs/RELIABILITY.md).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lingua_coordinator::private_redis::PrivateRedis;
use lingua_tests::agent_toml;
use lingua_tests::fleet::{
    Blackhole, CoordinatorProcess, CountingService, FAST_COORDINATOR, free_local_addr, spawn_agent,
    submit_until_answered,
};
use serde_json::{Value, json};
use tokio::process::Child;
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
    fn start(dir: &Path, name: &str, url: &str, service: &str) -> Self {
        let config = dir.join(format!("{name}.toml"));
        let rest = format!(
            r#"drain_timeout_ms = 2000
[gpu]
backend = "none"
[jobs.translate]
max_concurrent = 4
executor = "http"
url = "http://{service}/run"
timeout_ms = 5000
"#
        );
        let mut agent = Self {
            name: name.to_owned(),
            config,
            text: agent_toml(name, url, &rest),
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
}

/// What the fleet under test is made of.
struct Fleet {
    dir: tempfile::TempDir,
    redis: PrivateRedis,
    coordinator: Option<CoordinatorProcess>,
    addr: std::net::SocketAddr,
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
        let text = self
            .http
            .get(self.url("/metrics"))
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
    async fn until<F, Fut>(&self, what: &str, mut check: F) -> Duration
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
}

/// Submits job `id` until it gets a terminal answer.
async fn drive(http: &reqwest::Client, url: &str, id: &str) -> Option<Value> {
    let job = json!({
        "id": id, "kind": "translate", "src_lang": "zh", "tgt_lang": "en",
        "payload": {"job": id, "sleep_ms": 30}, "timeout_ms": 8000,
    });
    submit_until_answered(http, &[url.to_owned()], &job, GIVE_UP).await
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
    let mut agents: Vec<AgentProcess> = (0..AGENTS)
        .map(|i| {
            AgentProcess::start(
                dir.path(),
                &format!("steady-{i}"),
                &coordinator.ws_url(),
                &service_addr,
            )
        })
        .collect();
    agents.push(AgentProcess::start(
        dir.path(),
        "behind-proxy",
        &format!("ws://{}/v1/node", proxy.addr),
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
    fleet
        .until("every agent to connect", || async {
            fleet.connected().await == Some(everyone)
        })
        .await;

    // Load: clients submit jobs one after another until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let jobs_url = fleet.url("/v1/jobs");
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (http, url, stop) = (fleet.http.clone(), jobs_url.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut answers: Vec<(String, Option<Value>)> = Vec::new();
                let mut serial = 0;
                while !stop.load(Ordering::Relaxed) {
                    serial += 1;
                    let id = format!("fault-{client}-{serial}");
                    let answer = drive(&http, &url, &id).await;
                    answers.push((id, answer));
                }
                answers
            })
        })
        .collect();

    let mut detected: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let until = Instant::now() + rounds_for();
    let mut round = 0usize;
    loop {
        round += 1;
        // An agent SIGKILLed: its socket closes, it leaves routing.
        let victim = round % AGENTS;
        fleet.agents[victim].kill().await;
        let name = fleet.agents[victim].name.clone();
        let took = fleet
            .until("a killed agent to go offline", || async {
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
        let took = fleet
            .until("the frozen agent to go offline", || async {
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
        let took = fleet
            .until("every agent back after the Redis restart", || async {
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
        fleet
            .until("every agent back after the coordinator restart", || async {
                fleet.connected().await == Some(everyone)
            })
            .await;
        detected
            .entry("coordinator SIGKILLed: all agents back")
            .or_default()
            .push(killed.elapsed());
        if Instant::now() >= until {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);

    let mut answers = Vec::new();
    for client in clients {
        answers.extend(client.await.unwrap());
    }
    let runs = service.runs();
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let mut unanswered = Vec::new();
    let mut ran_twice = 0;
    for (id, answer) in &answers {
        let Some(answer) = answer else {
            unanswered.push(id.clone());
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
        *tally.entry(outcome).or_default() += 1;
        let stored: Value = fleet
            .http
            .get(fleet.url(&format!("/v1/jobs/{id}")))
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
        let executions = runs.get(id).copied().unwrap_or(0);
        if answer["status"] == "completed" {
            assert!(executions >= 1, "{id} completed without running");
        }
        if executions > 1 {
            ran_twice += 1;
        }
    }
    println!(
        "fault injection: {round} round(s), {} jobs submitted, {} answered, {tally:?}, \
         {ran_twice} ran more than once (their first node was lost), \
         {} without an answer",
        answers.len(),
        answers.len() - unanswered.len(),
        unanswered.len()
    );
    for (fault, times) in &detected {
        let worst = times.iter().max().copied().unwrap_or_default();
        println!("  {fault}: worst {worst:?} of {}", times.len());
    }
    assert!(
        unanswered.is_empty(),
        "jobs without a terminal answer: {unanswered:?}"
    );
    assert!(
        tally.get("completed").copied().unwrap_or(0) > 0,
        "jobs completed under faults: {tally:?}"
    );
    for agent in &mut fleet.agents {
        agent.kill().await;
    }
    if let Some(coordinator) = fleet.coordinator.take() {
        coordinator.kill().await;
    }
    fleet.redis.stop().await;
}
