//! The coordinator's admission queue end to end: a real coordinator, Redis
//! and agent; one node with one slot whose jobs wait at a gate (a file the
//! test creates), so that jobs queue up behind the first and are let
//! through when the test says. The order jobs ran in is the order their
//! payloads reached the node's log.

use std::path::PathBuf;

use futures_util::future::join_all;
use lingua_agent::config::AgentConfig;
use lingua_coordinator::config::Config;
use lingua_coordinator::private_redis::PrivateRedis;
use lingua_tests::{CommandStats, TestAgent, TestCoordinator, agent_toml, eventually, test_config};
use serde_json::{Value, json};

/// A fleet of one node with one `translate` slot, its jobs held at a gate.
struct Gated {
    coordinator: TestCoordinator,
    agent: TestAgent,
    http: reqwest::Client,
    log: PathBuf,
    gate: PathBuf,
    _dir: tempfile::TempDir,
    redis: PrivateRedis,
}

impl Gated {
    async fn start(config: Config) -> Self {
        let redis = lingua_tests::redis().await;
        let coordinator = TestCoordinator::start(&redis, config).await;
        let dir = tempfile::tempdir().unwrap();
        let (log, gate) = (dir.path().join("ran.log"), dir.path().join("gate"));
        let rest = format!(
            r#"[gpu]
backend = "none"
[jobs.translate]
max_concurrent = 1
executor = "command"
command = ["sh", "-c", "cat >> {log}; echo >> {log}; while [ ! -e {gate} ]; do sleep 0.02; done; echo '{{\"ok\": true}}'"]
timeout_ms = 30000
"#,
            log = log.display(),
            gate = gate.display()
        );
        let config = agent_toml("gated", &coordinator.ws_url(), &rest);
        let agent = TestAgent::start(AgentConfig::parse(&config).unwrap());
        agent.registered(1).await;
        Self {
            coordinator,
            agent,
            http: reqwest::Client::new(),
            log,
            gate,
            _dir: dir,
            redis,
        }
    }

    /// Submits without waiting; the answer's status and body.
    async fn submit_later(&self, body: &Value) -> (u16, Value) {
        let url = self.coordinator.url("/v1/jobs?wait=false");
        let answer = self.http.post(url).json(body).send().await.unwrap();
        (answer.status().as_u16(), answer.json().await.unwrap())
    }

    /// Submits and waits for the answer: status, `Retry-After`, body.
    async fn submit(&self, body: &Value) -> (u16, Option<String>, Value) {
        let url = self.coordinator.url("/v1/jobs");
        let answer = self.http.post(url).json(body).send().await.unwrap();
        let retry_after = answer
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        (
            answer.status().as_u16(),
            retry_after,
            answer.json().await.unwrap(),
        )
    }

    /// Submits `blocker` and waits until it holds the node's one slot.
    async fn block(&self) {
        let (status, _) = self.submit_later(&job("blocker", json!({}))).await;
        assert_eq!(status, 202);
        eventually("the blocker to run", || async {
            (self.status("blocker").await == "running" && self.ran().len() == 1).then_some(())
        })
        .await;
    }

    async fn status(&self, id: &str) -> String {
        let (_, view) = self.coordinator.get(&format!("/v1/jobs/{id}")).await;
        view["status"].as_str().unwrap_or_default().to_owned()
    }

    /// Waits until `depth` jobs wait in the queue of `coordinator`.
    async fn queued_at(&self, coordinator: &TestCoordinator, depth: u64) {
        let line = "lingua_queue_depth{pair=\"zh:en\",kind=\"translate\"}";
        eventually(&format!("{depth} jobs in the queue"), || async {
            (self.metric_of(coordinator, line).await == Some(depth)).then_some(())
        })
        .await;
    }

    async fn queued(&self, depth: u64) {
        self.queued_at(&self.coordinator, depth).await;
    }

    async fn metric(&self, series: &str) -> Option<u64> {
        self.metric_of(&self.coordinator, series).await
    }

    /// A sample of `coordinator`'s `/metrics`, by its name and labels.
    async fn metric_of(&self, coordinator: &TestCoordinator, series: &str) -> Option<u64> {
        let value = coordinator.metric(None, series).await?;
        Some(value as u64)
    }

    /// Lets every job through, now and later.
    fn open(&self) {
        std::fs::write(&self.gate, b"").unwrap();
    }

    /// The payloads the node ran, in order.
    fn ran(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|line| !line.is_empty())
            .map(|line| {
                serde_json::from_str::<Value>(line).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    /// Waits until every job of `ids` completed.
    async fn completed(&self, ids: &[&str]) {
        for id in ids {
            let (_, view) = self
                .coordinator
                .get(&format!("/v1/jobs/{id}?wait_ms=20000"))
                .await;
            assert_eq!(view["status"], "completed", "{view}");
        }
    }

    async fn stop(self) {
        self.open();
        self.agent.stop().await.unwrap();
        self.coordinator.stop().await;
    }
}

/// A translate job `id` whose payload names it, with `extra` fields.
fn job(id: &str, extra: Value) -> Value {
    let mut body = json!({"id": id, "kind": "translate", "src_lang": "zh", "tgt_lang": "en", "payload": {"id": id}});
    for (field, value) in extra.as_object().unwrap() {
        body[field] = value.clone();
    }
    body
}

#[tokio::test]
async fn a_job_is_accepted_at_once_shown_queued_and_served_by_priority() {
    let fleet = Gated::start(test_config()).await;
    fleet.block().await;
    let (status, body) = fleet
        .submit_later(&job("low", json!({"priority": 10})))
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (202, Some("queued")),
        "{body}"
    );
    let (status, _) = fleet
        .submit_later(&job("high", json!({"priority": 90})))
        .await;
    assert_eq!(status, 202);
    fleet.queued(2).await;
    assert_eq!(fleet.status("low").await, "queued");
    assert_eq!(fleet.status("high").await, "queued");
    fleet.open();
    fleet.completed(&["blocker", "low", "high"]).await;
    assert_eq!(fleet.ran(), ["blocker", "high", "low"]);
    fleet.stop().await;
}

#[tokio::test]
async fn a_flooding_tenant_shares_the_node_with_another() {
    let fleet = Gated::start(test_config()).await;
    fleet.block().await;
    let flood = ["a1", "a2", "a3", "a4"].map(|id| job(id, json!({"tenant": "flood"})));
    let quiet = ["b1", "b2"].map(|id| job(id, json!({"tenant": "quiet"})));
    for body in flood.iter().chain(&quiet) {
        assert_eq!(fleet.submit_later(body).await.0, 202);
    }
    fleet.queued(6).await;
    fleet.open();
    fleet.completed(&["a1", "a2", "a3", "a4", "b1", "b2"]).await;
    assert_eq!(fleet.ran(), ["blocker", "a1", "b1", "a2", "b2", "a3", "a4"]);
    fleet.stop().await;
}

#[tokio::test]
async fn a_job_that_finds_no_room_by_its_deadline_is_told_when_to_retry() {
    let fleet = Gated::start(test_config()).await;
    fleet.block().await;
    let (status, retry_after, body) = fleet
        .submit(&job("hurried", json!({"timeout_ms": 300})))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("no_capacity")),
        "{body}"
    );
    assert_eq!(
        body["error"]["message"],
        "no node had room for a translate job for zh:en in time to finish within 300 ms"
    );
    let seconds: u64 = retry_after.expect("a Retry-After header").parse().unwrap();
    assert!(seconds >= 1);
    assert_eq!(
        fleet
            .metric("lingua_jobs_shed_total{reason=\"deadline\"}")
            .await,
        Some(1)
    );
    assert_eq!(fleet.ran(), ["blocker"], "it never reached the node");
    fleet.stop().await;
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after_without_recording_the_job() {
    let config = Config {
        max_queued: 2,
        ..test_config()
    };
    let fleet = Gated::start(config).await;
    fleet.block().await;
    for id in ["q1", "q2"] {
        assert_eq!(fleet.submit_later(&job(id, json!({}))).await.0, 202);
    }
    fleet.queued(2).await;
    let (status, retry_after, body) = fleet.submit(&job("q3", json!({}))).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("queue_full")),
        "{body}"
    );
    assert!(retry_after.is_some(), "{body}");
    let (status, _) = fleet.coordinator.get("/v1/jobs/q3").await;
    assert_eq!(
        status, 404,
        "refused before it was recorded: it may be submitted again"
    );
    fleet.open();
    fleet.completed(&["q1", "q2"]).await;
    fleet.stop().await;
}

#[tokio::test]
async fn waiting_jobs_cost_redis_nothing_until_capacity_changes_and_a_resubmitted_id_no_pick() {
    let fleet = Gated::start(test_config()).await;
    let picks = "lingua_redis_script_duration_seconds_count{script=\"route_pick\"}";
    fleet.block().await;
    for id in ["w1", "w2", "w3"] {
        assert_eq!(fleet.submit_later(&job(id, json!({}))).await.0, 202);
    }
    fleet.queued(3).await;
    let before = fleet.metric(picks).await.unwrap();
    let beats = fleet.metric("lingua_heartbeats_total").await.unwrap();
    // Five heartbeats of the full node: routing updated five times, no room.
    eventually("five more heartbeats", || async {
        (fleet.metric("lingua_heartbeats_total").await.unwrap() >= beats + 5).then_some(())
    })
    .await;
    assert_eq!(
        fleet.metric(picks).await.unwrap(),
        before,
        "no pick while nothing changed"
    );
    fleet.open();
    fleet.completed(&["w1", "w2", "w3"]).await;
    let before = fleet.redis.command_calls("zrandmember").await;
    assert!(before >= 3, "each job's pick drew samples: {before}");
    let resubmitted = job("w1", json!({}));
    let again = join_all((0..3).map(|_| fleet.submit(&resubmitted))).await;
    for (status, _, body) in again {
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("completed")),
            "{body}"
        );
    }
    assert_eq!(
        fleet.redis.command_calls("zrandmember").await,
        before,
        "a finished id costs no pick: its route_pick finds it recorded"
    );
    assert_eq!(fleet.ran().len(), 4, "and runs no more");
    fleet.stop().await;
}

#[tokio::test]
async fn a_job_waiting_on_another_coordinator_is_told_of_room_seen_here() {
    let fleet = Gated::start(test_config()).await;
    let other = TestCoordinator::start(&fleet.redis, test_config()).await;
    fleet.block().await;
    let url = other.url("/v1/jobs?wait=false");
    let answer = fleet
        .http
        .post(url)
        .json(&job("elsewhere", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 202);
    fleet.queued_at(&other, 1).await;
    // The node is held here; the room it reports reaches the other
    // instance only through its inbox.
    fleet.open();
    let (_, view) = other.get("/v1/jobs/elsewhere?wait_ms=20000").await;
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(fleet.ran(), ["blocker", "elsewhere"]);
    other.stop().await;
    fleet.stop().await;
}
