//! Several coordinators on one Redis (and on a Redis Cluster): three
//! `lingua-coordinator` processes, agents spread across them, clients
//! hitting any instance. Jobs for a node held by another instance go
//! through that instance's inbox; when an instance dies its agents move to
//! the others and every job still gets a terminal answer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use lingua_tests::cluster::RedisCluster;
use lingua_tests::fleet::{
    CoordinatorProcess, FAST_COORDINATOR, free_local_addr, submit_until_answered,
};
use lingua_tests::{RedisBackend, TestAgent, agent_config, eventually};
use serde_json::{Value, json};

const INSTANCES: usize = 3;
const AGENTS: usize = 6;

struct Deployment {
    _dir: tempfile::TempDir,
    instances: Vec<Option<CoordinatorProcess>>,
    agents: Vec<TestAgent>,
    http: reqwest::Client,
}

impl Deployment {
    /// Three coordinators on `redis`; agent `i` lists every instance,
    /// starting with instance `i % 3`, so each instance holds two.
    async fn start(redis: &impl RedisBackend) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut instances = Vec::new();
        for _ in 0..INSTANCES {
            let process =
                CoordinatorProcess::start(dir.path(), redis, free_local_addr(), FAST_COORDINATOR)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
            instances.push(Some(process));
        }
        let ws: Vec<String> = instances
            .iter()
            .flatten()
            .map(CoordinatorProcess::ws_url)
            .collect();
        let agents: Vec<TestAgent> = (0..AGENTS)
            .map(|i| {
                let mut config = agent_config(&format!("spread-{i}"), &ws[0], 40);
                let mut urls = ws.clone();
                urls.rotate_left(i % INSTANCES);
                config.coordinator_urls = urls;
                TestAgent::start(config)
            })
            .collect();
        for agent in &agents {
            agent.registered(1).await;
        }
        Self {
            _dir: dir,
            instances,
            agents,
            http: reqwest::Client::new(),
        }
    }

    fn live(&self) -> impl Iterator<Item = &CoordinatorProcess> {
        self.instances.iter().flatten()
    }

    fn jobs_urls(&self) -> Vec<String> {
        self.live().map(|c| c.url("/v1/jobs")).collect()
    }

    /// A counter or gauge summed over the live instances.
    async fn metric(&self, name: &str) -> u64 {
        let mut total = 0;
        for instance in self.live() {
            let Ok(response) = self.http.get(instance.url("/metrics")).send().await else {
                continue;
            };
            let text = response.text().await.unwrap_or_default();
            total += text
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0) as u64;
        }
        total
    }

    async fn stop(mut self) {
        for agent in self.agents.drain(..) {
            agent.stop().await.unwrap();
        }
        for instance in self.instances.iter_mut().filter_map(Option::take) {
            instance.kill().await;
        }
    }
}

fn job(id: &str) -> Value {
    json!({"id": id, "kind": "translate", "src_lang": "zh", "tgt_lang": "en",
           "payload": {"text": id}, "timeout_ms": 8000})
}

async fn three_coordinators_share_one_fleet(redis: impl RedisBackend) {
    let fleet = Deployment::start(&redis).await;
    eventually("every instance to hold its two agents", || async {
        (fleet.metric("lingua_nodes_connected").await == AGENTS as u64).then_some(())
    })
    .await;
    // Every instance sees the whole fleet: the state is in Redis.
    for instance in fleet.live() {
        let nodes: Value = fleet
            .http
            .get(instance.url("/v1/nodes"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ready = nodes["nodes"]
            .as_array()
            .map_or(0, |n| n.iter().filter(|n| n["state"] == "ready").count());
        assert_eq!(ready, AGENTS, "{nodes}");
    }
    // Jobs to every instance in turn, most for nodes another instance holds.
    let urls = fleet.jobs_urls();
    let answers = join_all((0..90).map(|i| {
        let http = fleet.http.clone();
        let url = vec![urls[i % urls.len()].clone()];
        async move {
            submit_until_answered(
                &http,
                &url,
                &job(&format!("across-{i}")),
                Duration::from_secs(30),
            )
            .await
        }
    }))
    .await;
    let mut by_node: BTreeMap<String, usize> = BTreeMap::new();
    for answer in &answers {
        let answer = answer.as_ref().expect("every job gets an answer");
        assert_eq!(answer["status"], "completed", "{answer}");
        *by_node
            .entry(answer["node_id"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    assert!(
        by_node.len() > INSTANCES,
        "jobs ran across the fleet: {by_node:?}"
    );
    assert!(
        fleet.metric("lingua_job_assignments_forwarded_total").await > 0,
        "some assignments went through another instance"
    );
    // A drain asked of an instance that does not hold the node reaches the
    // node through the one that does.
    let first = fleet.live().next().expect("instances run");
    let drained = fleet
        .http
        .post(first.url("/v1/nodes/spread-1/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(drained.status(), 202);
    let arbiter = &fleet.agents[1].handles.arbiter;
    eventually(
        "the node to hear of its drain (it admits nothing)",
        || async {
            arbiter
                .free_slots()
                .values()
                .all(|&free| free == 0)
                .then_some(())
        },
    )
    .await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_coordinators_share_one_fleet_on_one_redis() {
    three_coordinators_share_one_fleet(lingua_tests::redis().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_coordinators_share_one_fleet_on_a_redis_cluster() {
    three_coordinators_share_one_fleet(RedisCluster::start().await.expect("a test Redis Cluster"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_coordinator_loses_no_job_and_its_agents_move() {
    let redis = lingua_tests::redis().await;
    let mut fleet = Deployment::start(&redis).await;
    let stop = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicUsize::new(0));
    let urls = fleet.jobs_urls();
    let clients: Vec<_> = (0..4)
        .map(|client| {
            let (http, urls) = (fleet.http.clone(), urls.clone());
            let (stop, completed) = (Arc::clone(&stop), Arc::clone(&completed));
            tokio::spawn(async move {
                let mut answers = Vec::new();
                let mut serial = 0;
                while !stop.load(Ordering::Relaxed) {
                    serial += 1;
                    let id = format!("kill-{client}-{serial}");
                    let answer =
                        submit_until_answered(&http, &urls, &job(&id), Duration::from_secs(60))
                            .await;
                    if answer.as_ref().is_some_and(|a| a["status"] == "completed") {
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                    answers.push((id, answer));
                }
                answers
            })
        })
        .collect();
    eventually("jobs to flow", || async {
        (completed.load(Ordering::Relaxed) >= 20).then_some(())
    })
    .await;
    let conn = lingua_tests::connect(&redis).await;
    let instances = || {
        let mut conn = conn.clone();
        async move {
            redis::cmd("ZCARD")
                .arg("lingua:v1:coordinators")
                .query_async::<u64>(&mut conn)
                .await
                .unwrap()
        }
    };
    assert_eq!(instances().await, INSTANCES as u64);
    if let Some(victim) = fleet.instances[0].take() {
        victim.kill().await;
    }
    eventually(
        "the killed instance's agents to move to the others",
        || async { (fleet.metric("lingua_nodes_connected").await == AGENTS as u64).then_some(()) },
    )
    .await;
    eventually("the dead instance to be reaped", || async {
        (instances().await == (INSTANCES - 1) as u64).then_some(())
    })
    .await;
    let after_kill = completed.load(Ordering::Relaxed);
    eventually("jobs to keep flowing", || async {
        (completed.load(Ordering::Relaxed) >= after_kill + 20).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for client in clients {
        for (id, answer) in client.await.unwrap() {
            let answer = answer.unwrap_or_else(|| panic!("{id} got no terminal answer"));
            let outcome = match answer["error"]["code"].as_str() {
                Some(code) => format!("failed: {code}"),
                None => answer["status"].as_str().unwrap_or("?").to_owned(),
            };
            *tally.entry(outcome).or_default() += 1;
        }
    }
    println!("jobs through a coordinator kill: {tally:?}");
    assert!(
        tally.get("completed").copied().unwrap_or(0) >= 40,
        "{tally:?}"
    );
    fleet.stop().await;
}
