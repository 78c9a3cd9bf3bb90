//! Job routing end to end: real Redis, a real coordinator, real agents with
//! simulated GPUs, real HTTP and WebSockets. Every test runs twice: on one
//! Redis, and on a local three-master Redis Cluster.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use lingua_agent::config::{AgentConfig, ExecutorConfig};
use lingua_coordinator::auth::{ApiTokens, Tokens};
use lingua_coordinator::config::PickPolicy;
use lingua_coordinator::keys::{self, InstanceKeys, NodeKeys};
use lingua_coordinator::metrics::Metrics;
use lingua_coordinator::private_redis::PrivateRedis;
use lingua_coordinator::store::{NewJob, PickOn, Route, Store};
use lingua_shared::protocol::{
    CapacityReport, FailureCode, JobAssign, JobCancel, JobRef, JobReject, JobResult, Outcome,
    Register, RejectReason,
};
use lingua_shared::{JobId, JobKind, Message};
use lingua_tests::cluster::RedisCluster;
use lingua_tests::fleet::Blackhole;
use lingua_tests::{
    CommandStats, Received, RedisBackend, TestAgent, TestCoordinator, TestNode, agent_config,
    agent_toml, eventually, registration, test_config, translate_room,
};
use redis::AsyncCommands;
use serde_json::{Value, json};

fn translate(src: &str, tgt: &str) -> Value {
    json!({"kind": "translate", "src_lang": src, "tgt_lang": tgt, "payload": {"text": "hello"}})
}

fn with_langs(mut config: AgentConfig, src: &str, tgt: &str) -> AgentConfig {
    config.src_langs = vec![src.parse().unwrap()];
    config.tgt_langs = vec![tgt.parse().unwrap()];
    config
}

fn with_capacity(mut config: AgentConfig, max_concurrent: u32) -> AgentConfig {
    config
        .jobs
        .values_mut()
        .for_each(|kind| kind.max_concurrent = max_concurrent);
    config
}

/// A command executor that appends each job's payload to `log`, so tests
/// can count executions, then echoes it.
fn logging(mut config: AgentConfig, log: &Path, sleep_s: &str) -> AgentConfig {
    let script = format!(
        "cat >> {log}; echo >> {log}; sleep {sleep_s}; echo '{{\"ok\": true}}'",
        log = log.display()
    );
    config.jobs.values_mut().for_each(|kind| {
        kind.executor = ExecutorConfig::Command {
            argv: vec!["sh".into(), "-c".into(), script.clone()],
            timeout: Duration::from_secs(30),
        };
    });
    config
}

/// Each pick takes one from the node's free-slot hint; only the node's
/// reports give it back. With heartbeats a minute apart, short sequential
/// jobs on a 4-slot node run only if the agent reports after assignments
/// (its count returns to where it was, so a change-only report never goes).
/// On a one-slot node, a job's result (which answers for its accept) must
/// count as its answer before the report that comes with it is read, or
/// that report leaves the node full.
async fn free_slot_hints_come_back_between_heartbeats(redis: impl RedisBackend) {
    let config = lingua_coordinator::config::Config {
        heartbeat_interval: Duration::from_secs(60),
        ..test_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    for slots in [4, 1] {
        let agent = TestAgent::start(with_capacity(
            agent_config(&format!("quick-{slots}"), &coordinator.ws_url(), 0),
            slots,
        ));
        agent.registered(1).await;
        for i in 0..40 {
            let mut job = translate("zh", "en");
            job["timeout_ms"] = json!(5000);
            let (status, body) = coordinator.submit(job).await;
            assert_eq!(
                (status, &body["status"]),
                (200, &json!("completed")),
                "{slots} slots, job {i}: {body}"
            );
        }
        agent.stop().await.unwrap();
    }
    coordinator.stop().await;
}

/// Heartbeats are recorded in batches (on a Redis Cluster, spread over
/// its masters): a node heartbeating for many leases stays alive, its
/// record seen lately.
async fn recorded_heartbeats_keep_a_node_alive_for_many_leases(redis: impl RedisBackend) {
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let agents: Vec<TestAgent> = ["beat-1", "beat-2", "beat-3"]
        .iter()
        .map(|name| TestAgent::start(agent_config(name, &coordinator.ws_url(), 10)))
        .collect();
    for agent in &agents {
        agent.registered(1).await;
    }
    // test_config: a 200 ms interval and a 600 ms lease; 30 heartbeats
    // are three leases for each of the three nodes.
    eventually("thirty heartbeats", || async {
        let beats = coordinator
            .metric(None, "lingua_heartbeats_total")
            .await
            .unwrap_or(0.0);
        (beats >= 30.0).then_some(())
    })
    .await;
    for name in ["beat-1", "beat-2", "beat-3"] {
        let (_, node) = coordinator.get(&format!("/v1/nodes/{name}")).await;
        assert_eq!(node["state"], "ready", "{node}");
    }
    // Idle for three leases: their routing entries were renewed all along.
    let (_, answer) = coordinator.submit(translate("zh", "en")).await;
    assert_eq!(answer["status"], "completed", "{answer}");
    for agent in agents {
        agent.stop().await.unwrap();
    }
    coordinator.stop().await;
}

async fn jobs_run_only_on_nodes_serving_their_pair(redis: impl RedisBackend) {
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let zh_en = TestAgent::start(agent_config("zh-en", &coordinator.ws_url(), 20));
    let de_fr = TestAgent::start(with_langs(
        agent_config("de-fr", &coordinator.ws_url(), 20),
        "de",
        "fr",
    ));
    let en_zh = TestAgent::start(with_langs(
        agent_config("en-zh", &coordinator.ws_url(), 20),
        "en",
        "zh",
    ));
    for agent in [&zh_en, &de_fr, &en_zh] {
        agent.registered(1).await;
    }
    let answers = join_all((0..30).map(|_| coordinator.submit(translate("zh", "en")))).await;
    for (status, body) in answers {
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["node_id"], "zh-en", "{body}");
    }
    let (status, body) = coordinator.submit(translate("de", "fr")).await;
    assert_eq!((status, body["node_id"].as_str()), (200, Some("de-fr")));
    for agent in [zh_en, de_fr, en_zh] {
        agent.stop().await.unwrap();
    }
    coordinator.stop().await;
}

async fn a_burst_spreads_by_capacity_and_never_exceeds_an_arbiter(redis: impl RedisBackend) {
    // A burst of 300 on 14 slots: capacity reports lag behind, so nodes
    // refuse now and then; allow the retries that takes on a loaded
    // machine.
    let config = lingua_coordinator::config::Config {
        max_attempts: 8,
        ..test_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    let sizes = [("small", 2u32), ("medium", 4), ("large", 8)];
    let agents: Vec<(&str, u32, TestAgent)> = sizes
        .iter()
        .map(|&(name, max)| {
            let mut config = with_capacity(agent_config(name, &coordinator.ws_url(), 30), max);
            // GPUs big enough that max_concurrent alone limits each node.
            config.gpu.simulated.memory_mb = 200_000;
            (name, max, TestAgent::start(config))
        })
        .collect();
    for (_, _, agent) in &agents {
        agent.registered(1).await;
    }
    // Watch every arbiter while the burst runs.
    let arbiters: Vec<_> = agents
        .iter()
        .map(|(name, max, a)| (*name, *max, a.handles.arbiter.clone()))
        .collect();
    let watching = tokio_util::sync::CancellationToken::new();
    let watcher = tokio::spawn({
        let watching = watching.clone();
        async move {
            let mut peaks: HashMap<&str, u32> = HashMap::new();
            while !watching.is_cancelled() {
                for (name, _, arbiter) in &arbiters {
                    let peak = peaks.entry(name).or_default();
                    *peak = (*peak).max(arbiter.running());
                }
                tokio::task::yield_now().await;
            }
            peaks
        }
    });
    let config =
        json!({"kind": "translate", "src_lang": "zh", "tgt_lang": "en", "timeout_ms": 60000});
    let answers = join_all((0..300).map(|_| coordinator.submit(config.clone()))).await;
    watching.cancel();
    let peaks = watcher.await.unwrap();
    let mut per_node: HashMap<String, u32> = HashMap::new();
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["status"], "completed");
        *per_node
            .entry(body["node_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    for (name, max, _) in &agents {
        assert!(
            peaks[name] <= *max,
            "{name} ran {} jobs at once, its arbiter allows {max}",
            peaks[name]
        );
    }
    // Roughly in proportion to capacity (2:4:8): the largest node takes
    // more than the smallest.
    let (small, large) = (
        per_node.get("small").copied().unwrap_or(0),
        per_node.get("large").copied().unwrap_or(0),
    );
    assert!(large > small, "spread {per_node:?}");
    assert_eq!(per_node.values().sum::<u32>(), 300);
    for (_, _, agent) in agents {
        agent.stop().await.unwrap();
    }
    coordinator.stop().await;
}

async fn the_same_id_submitted_five_times_concurrently_runs_once(redis: impl RedisBackend) {
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("executions.log");
    let agent = TestAgent::start(logging(
        agent_config("once", &coordinator.ws_url(), 0),
        &log,
        "0.2",
    ));
    agent.registered(1).await;
    let mut body = translate("zh", "en");
    body["id"] = json!("utterance-42");
    let answers = join_all((0..5).map(|_| coordinator.submit(body.clone()))).await;
    for answer in &answers {
        assert_eq!(answer, &answers[0], "five identical answers");
    }
    assert_eq!(answers[0].0, 200);
    assert_eq!(answers[0].1["attempts"], 1);
    let executions = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        executions.lines().count(),
        1,
        "executed once: {executions:?}"
    );
    // Same id, different body: 409, in another pair too (its record lives
    // in another slot), and the job stays as it was.
    let mut other_pair = body.clone();
    body["payload"] = json!({"text": "something else"});
    let (status, error) = coordinator.submit(body).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (409, Some("conflict"))
    );
    other_pair["tgt_lang"] = json!("ja");
    let (status, error) = coordinator.submit(other_pair).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (409, Some("conflict")),
        "{error}"
    );
    let (status, kept) = coordinator.get("/v1/jobs/utterance-42").await;
    assert_eq!((status, &kept), (200, &answers[0].1));
    agent.stop().await.unwrap();
    coordinator.stop().await;
}

/// A submission refused because its id is another pair's job gives back
/// the slot its pick took: with reports a minute apart, ten such refusals
/// in a pair whose node has eight slots leave it room for a real job.
async fn a_refused_id_gives_back_its_pick(redis: impl RedisBackend) {
    let config = lingua_coordinator::config::Config {
        heartbeat_interval: Duration::from_secs(60),
        ..test_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    let english = TestAgent::start(agent_config("english", &coordinator.ws_url(), 0));
    let japanese = TestAgent::start(with_langs(
        agent_config("japanese", &coordinator.ws_url(), 0),
        "zh",
        "ja",
    ));
    english.registered(1).await;
    japanese.registered(1).await;
    let mut body = translate("zh", "en");
    body["id"] = json!("taken");
    let (status, answer) = coordinator.submit(body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    body["tgt_lang"] = json!("ja");
    for _ in 0..10 {
        let (status, error) = coordinator.submit(body.clone()).await;
        assert_eq!(
            (status, error["error"]["code"].as_str()),
            (409, Some("conflict")),
            "{error}"
        );
    }
    let mut fresh = translate("zh", "ja");
    fresh["timeout_ms"] = json!(5000);
    let (status, answer) = coordinator.submit(fresh).await;
    assert_eq!(
        (status, &answer["node_id"]),
        (200, &json!("japanese")),
        "{answer}"
    );
    english.stop().await.unwrap();
    japanese.stop().await.unwrap();
    coordinator.stop().await;
}

/// A job costs two script calls, one round trip each: the pick that
/// records it, and its result; the answer carries what the result
/// recorded, not read back. Five jobs one after another on an 8-slot node:
/// its free-slot hint never runs out, whenever its reports come back (an
/// attempt the node refused is one pick more).
async fn a_job_costs_one_pick_and_one_result(redis: impl RedisBackend + CommandStats) {
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let agent = TestAgent::start(agent_config("two", &coordinator.ws_url(), 0));
    agent.registered(1).await;
    let calls = |script: &'static str| {
        let coordinator = &coordinator;
        async move {
            let series =
                format!("lingua_redis_script_duration_seconds_count{{script=\"{script}\"}}");
            coordinator.metric(None, &series).await.unwrap_or(0.0)
        }
    };
    // A first job waits, if need be, for the agent's first reports.
    let (status, body) = coordinator.submit(translate("zh", "en")).await;
    assert_eq!(status, 200, "{body}");
    let (picks, finishes) = (calls("route_pick").await, calls("job_finish").await);
    let reads = redis.command_calls("hgetall").await;
    let mut attempts = 0u32;
    for i in 0..5 {
        let (status, body) = coordinator.submit(translate("zh", "en")).await;
        assert_eq!(status, 200, "job {i}: {body}");
        assert_eq!(
            (&body["status"], &body["node_id"], &body["device"]),
            (&json!("completed"), &json!("two"), &json!("gpu")),
            "{body}"
        );
        assert!(body["latency_ms"].is_u64(), "{body}");
        attempts += u32::try_from(body["attempts"].as_u64().unwrap()).unwrap();
    }
    assert_eq!(calls("route_pick").await - picks, f64::from(attempts));
    assert_eq!(calls("job_finish").await - finishes, 5.0);
    assert_eq!(
        redis.command_calls("hgetall").await,
        reads,
        "no job was read back"
    );
    agent.stop().await.unwrap();
    coordinator.stop().await;
}

async fn failures_get_their_documented_codes(redis: impl RedisBackend) {
    let coordinator = TestCoordinator::start(&redis, test_config()).await;

    // Nothing serves ja:ko.
    let (status, body) = coordinator.submit(translate("ja", "ko")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("no_nodes")),
        "{body}"
    );

    // A job that outlives its timeout is stopped (and cancelled on the node).
    let busy = TestAgent::start(with_capacity(
        agent_config("busy", &coordinator.ws_url(), 3000),
        1,
    ));
    busy.registered(1).await;

    // zh:en is served, but no node runs asr there: no_nodes at once, not a
    // wait for room that never comes.
    let asr = json!({"kind": "asr", "src_lang": "zh", "tgt_lang": "en", "timeout_ms": 30000});
    let (status, body) = coordinator.submit(asr).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("no_nodes")),
        "{body}"
    );
    assert_eq!(
        body["error"]["message"],
        "no live node serves asr jobs for zh:en"
    );

    let mut hurried = translate("zh", "en");
    hurried["timeout_ms"] = json!(100);
    hurried["id"] = json!("hurried");
    let (status, body) = coordinator.submit(hurried).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (504, Some("timeout")),
        "{body}"
    );
    let arbiter = busy.handles.arbiter.clone();
    eventually("the cancelled job to free its slot", || async {
        (arbiter.running() == 0).then_some(())
    })
    .await;

    // One slot, held by a long job: a job that cannot wait gets no_capacity.
    let mut long = translate("zh", "en");
    long["id"] = json!("long-one");
    let client = reqwest::Client::new();
    let held = client
        .post(coordinator.url("/v1/jobs?wait=false"))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 202);
    eventually("the long job to start", || async {
        (arbiter.running() == 1).then_some(())
    })
    .await;
    let mut impatient = translate("zh", "en");
    impatient["timeout_ms"] = json!(300);
    let (status, body) = coordinator.submit(impatient).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("no_capacity")),
        "{body}"
    );
    busy.stop().await.unwrap();

    // A failing executor.
    let mut failing = agent_config("broken", &coordinator.ws_url(), 0);
    failing.jobs.values_mut().for_each(|kind| {
        kind.executor = ExecutorConfig::Command {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo model exploded >&2; exit 1".into(),
            ],
            timeout: Duration::from_secs(5),
        };
    });
    let broken = TestAgent::start(failing);
    broken.registered(1).await;
    let (status, body) = coordinator.submit(translate("zh", "en")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (502, Some("executor_failed")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("model exploded"),
        "{body}"
    );

    // Results stay retrievable.
    let (status, stored) = coordinator.get("/v1/jobs/hurried").await;
    assert_eq!(
        (status, stored["error"]["code"].as_str()),
        (504, Some("timeout"))
    );
    broken.stop().await.unwrap();
    coordinator.stop().await;
}

async fn bad_requests_get_400s_and_the_service_keeps_serving(redis: impl RedisBackend) {
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let agent = TestAgent::start(agent_config("steady", &coordinator.ws_url(), 10));
    agent.registered(1).await;
    let client = reqwest::Client::new();
    let raw = |body: Vec<u8>| {
        let client = client.clone();
        let url = coordinator.url("/v1/jobs");
        async move {
            let response = client.post(url).body(body).send().await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (b"{not json".to_vec(), 400),
        (b"[]".to_vec(), 400),
        (
            br#"{"kind": 7, "src_lang": "zh", "tgt_lang": "en"}"#.to_vec(),
            400,
        ),
        (
            br#"{"kind": "translate", "src_lang": "ZH", "tgt_lang": "en"}"#.to_vec(),
            400,
        ),
        (
            br#"{"kind": "translate", "src_lang": "zh", "tgt_lang": "zh"}"#.to_vec(),
            400,
        ),
        (
            br#"{"kind": "translate", "src_lang": "zh", "tgt_lang": "en", "timeout_ms": "soon"}"#
                .to_vec(),
            400,
        ),
        (
            br#"{"kind": "translate", "src_lang": "zh", "tgt_lang": "en", "urgency": 1}"#.to_vec(),
            400,
        ),
        (
            br#"{"kind": "translate", "src_lang": "zh", "tgt_lang": "en", "priority": 101}"#
                .to_vec(),
            400,
        ),
        (
            br#"{"kind": "translate", "src_lang": "zh", "tgt_lang": "en", "priority": -1}"#
                .to_vec(),
            400,
        ),
        (
            br#"{"kind": "translate", "src_lang": "zh", "tgt_lang": "en", "tenant": ""}"#.to_vec(),
            400,
        ),
        (
            format!(
                r#"{{"kind":"translate","src_lang":"zh","tgt_lang":"en","tenant":"{}"}}"#,
                "t".repeat(65)
            )
            .into_bytes(),
            400,
        ),
        (
            br#"{"kind": "translate", "src_lang": "zh", "tgt_lang": "en", "id": "has space"}"#
                .to_vec(),
            400,
        ),
        // Payloads kept as text are still JSON a parser takes in full.
        (
            br#"{"kind": "translate", "src_lang": "zh", "tgt_lang": "en", "payload": [1e400]}"#
                .to_vec(),
            400,
        ),
        (
            br#"{"kind": "translate", "src_lang": "zh", "tgt_lang": "en", "payload": "\ud800"}"#
                .to_vec(),
            400,
        ),
        (
            format!(
                r#"{{"kind":"translate","src_lang":"zh","tgt_lang":"en","payload":"{}"}}"#,
                "x".repeat(3 << 20)
            )
            .into_bytes(),
            413,
        ),
    ];
    for (body, expected) in cases {
        let preview = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
        let (status, answer) = raw(body).await;
        assert_eq!(status, expected, "{preview}: {answer}");
        let code = if expected == 413 {
            "payload_too_large"
        } else {
            "invalid_request"
        };
        assert_eq!(answer["error"]["code"], code, "{preview}: {answer}");
    }
    let (status, _) = coordinator.get("/v1/jobs/bad%20id").await;
    assert_eq!(status, 400);
    let (status, body) = coordinator.submit(translate("zh", "en")).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("completed")),
        "still serving: {body}"
    );
    agent.stop().await.unwrap();
    coordinator.stop().await;
}

async fn the_api_token_guards_jobs(redis: impl RedisBackend) {
    let config = lingua_coordinator::config::Config {
        api_tokens: vec!["a-job-api-token-for-tests".into()],
        ..test_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    let (status, body) = coordinator.submit(translate("zh", "en")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, _) = coordinator.get("/v1/jobs/x").await;
    assert_eq!(status, 401);
    coordinator.stop().await;
}

fn agent_process(config: &str, dir: &Path, name: &str) -> tokio::process::Child {
    lingua_tests::fleet::spawn_agent(&dir.join(format!("{name}.toml")), config)
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn jobs_of_a_killed_agent_complete_elsewhere_once(redis: impl RedisBackend) {
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = |name: &str, log: &Path, sleep_s: &str| {
        let rest = format!(
            r#"[gpu]
backend = "none"
[jobs.translate]
max_concurrent = 8
executor = "command"
command = ["sh", "-c", "cat >> {log}; echo >> {log}; sleep {sleep_s}; echo '{{\"ok\": true}}'"]
timeout_ms = 30000
"#,
            log = log.display()
        );
        agent_toml(name, &coordinator.ws_url(), &rest)
    };
    let victim_log = dir.path().join("victim.log");
    let survivor_log = dir.path().join("survivor.log");
    let mut victim = agent_process(&config("victim", &victim_log, "30"), dir.path(), "victim");
    eventually("the victim to register", || async {
        (coordinator.get("/v1/nodes/victim").await.1["state"] == "ready").then_some(())
    })
    .await;
    // Every job lands on the victim, the only node, and hangs there.
    let jobs: Vec<Value> = (0..4)
        .map(|i| json!({"id": format!("job-{i}"), "kind": "translate", "src_lang": "zh", "tgt_lang": "en", "payload": i, "timeout_ms": 20000}))
        .collect();
    let running = tokio::spawn({
        let url = coordinator.url("/v1/jobs");
        let jobs = jobs.clone();
        async move {
            join_all(jobs.into_iter().map(|job| {
                let url = url.clone();
                async move {
                    let response = reqwest::Client::new()
                        .post(url)
                        .json(&job)
                        .send()
                        .await
                        .unwrap();
                    (
                        response.status().as_u16(),
                        response.json::<Value>().await.unwrap(),
                    )
                }
            }))
            .await
        }
    });
    eventually("the victim to run all four", || async {
        let started = std::fs::read_to_string(&victim_log).unwrap_or_default();
        (started.lines().count() == 4).then_some(())
    })
    .await;
    let mut survivor = agent_process(
        &config("survivor", &survivor_log, "0.1"),
        dir.path(),
        "survivor",
    );
    eventually("the survivor to register", || async {
        (coordinator.get("/v1/nodes/survivor").await.1["state"] == "ready").then_some(())
    })
    .await;
    victim.start_kill().unwrap();
    victim.wait().await.unwrap();

    let answers = running.await.unwrap();
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["status"], "completed");
        assert_eq!(body["node_id"], "survivor");
        assert_eq!(body["attempts"], 2, "{body}");
    }
    let completed = std::fs::read_to_string(&survivor_log).unwrap();
    assert_eq!(
        completed.lines().count(),
        4,
        "each job ran once on the survivor: {completed:?}"
    );
    for job in &jobs {
        let (_, stored) = coordinator
            .get(&format!("/v1/jobs/{}", job["id"].as_str().unwrap()))
            .await;
        assert_eq!(stored["status"], "completed");
    }
    survivor.start_kill().unwrap();
    survivor.wait().await.unwrap();
    coordinator.stop().await;
}

async fn a_mixed_burst_into_one_node_waits_for_memory_instead_of_being_refused(
    redis: impl RedisBackend,
) {
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    // One 17,000 MiB GPU, 16,000 usable: 2 asr (6,000 MiB) and 1 translate
    // (3,000 MiB) at once, or 5 translate alone.
    let rest = r#"drain_timeout_ms = 10000
[gpu]
backend = "simulated"
reserve_mb = 1000
poll_interval_ms = 20
[gpu.simulated]
count = 1
memory_mb = 17000
[jobs.asr]
vram_mb = 6000
max_concurrent = 4
[jobs.asr.simulated]
duration_ms = 300
[jobs.translate]
vram_mb = 3000
max_concurrent = 8
[jobs.translate.simulated]
duration_ms = 300
"#;
    let config = AgentConfig::parse(&agent_toml("mixed", &coordinator.ws_url(), rest)).unwrap();
    let agent = TestAgent::start(config);
    agent.registered(1).await;
    let job =
        |kind: &str| json!({"kind": kind, "src_lang": "zh", "tgt_lang": "en", "timeout_ms": 30000});
    let burst = [
        "asr",
        "translate",
        "asr",
        "translate",
        "asr",
        "translate",
        "translate",
    ];
    let answers = join_all(burst.iter().map(|&kind| coordinator.submit(job(kind)))).await;
    for (status, body) in answers {
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "completed", "{body}");
        assert_eq!(
            body["attempts"], 1,
            "no node refused it: the hints of every kind shrank as memory was assigned: {body}"
        );
    }
    agent.stop().await.unwrap();
    coordinator.stop().await;
}

#[tokio::test]
async fn payloads_and_outputs_pass_through_as_written() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let register = registration("verbatim", &["zh"], &["en"]);
    let (mut node, _) = TestNode::register(&coordinator.ws_url(), register).await;
    // Spacing, key order and a number's form that a parse and a rewrite
    // would each change.
    let payload = r#"{"z": [1, "二"],  "a": {"n": 1.50}}"#;
    let body = format!(
        r#"{{"id": "verbatim-1", "kind": "translate", "src_lang": "zh", "tgt_lang": "en", "timeout_ms": 20000, "payload": {payload}}}"#
    );
    let submit = |body: String| {
        let url = coordinator.url("/v1/jobs");
        async move {
            let answer = reqwest::Client::new()
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (answer.status().as_u16(), answer.text().await.unwrap())
        }
    };
    let submitted = tokio::spawn(submit(body.clone()));
    let assign = next_assign(&mut node).await;
    assert_eq!(assign.payload.get(), payload);
    let output = r#"{"zz": 2.50,  "aa": [ ]}"#;
    node.send_raw(format!(
        r#"{{"type": "job_result", "job_id": "verbatim-1", "attempt": {}, "duration_ms": 1, "outcome": {{"status": "completed", "output": {output}}}}}"#,
        assign.attempt
    ))
    .await;
    let (status, answer) = submitted.await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer.contains(&format!(r#""output":{output}"#)),
        "{answer}"
    );
    // The same body again is the same job, answered from its record, as
    // is a read; the payload written otherwise is another body.
    let (status, again) = submit(body.clone()).await;
    assert_eq!(status, 200, "{again}");
    assert!(again.contains(&format!(r#""output":{output}"#)), "{again}");
    let read = reqwest::get(coordinator.url("/v1/jobs/verbatim-1"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(read.contains(&format!(r#""output":{output}"#)), "{read}");
    let (status, other) = submit(body.replace("1.50", "1.5")).await;
    assert_eq!(status, 409, "{other}");
    node.close().await;
    coordinator.stop().await;
}

/// The node's next `job_assign`, skipping other frames.
async fn next_assign(node: &mut TestNode) -> JobAssign {
    loop {
        match node.recv().await {
            Received::Message(Message::JobAssign(assign)) => return assign,
            Received::Message(_) => {}
            other => panic!("expected job_assign, got {other:?}"),
        }
    }
}

/// The node's next `job_cancel`, skipping other frames.
async fn next_cancel(node: &mut TestNode) -> JobCancel {
    loop {
        match node.recv().await {
            Received::Message(Message::JobCancel(cancel)) => return cancel,
            Received::Message(_) => {}
            other => panic!("expected job_cancel, got {other:?}"),
        }
    }
}

/// `body` submitted to `coordinator` in the background: its answer's
/// status and JSON.
fn submit_in_background(
    coordinator: &TestCoordinator,
    body: Value,
) -> tokio::task::JoinHandle<(u16, Value)> {
    let url = coordinator.url("/v1/jobs");
    tokio::spawn(async move {
        let answer = reqwest::Client::new()
            .post(url)
            .json(&body)
            .send()
            .await
            .unwrap();
        (
            answer.status().as_u16(),
            answer.json::<Value>().await.unwrap(),
        )
    })
}

/// A translate job `id` for zh -> en with `timeout_ms`.
fn zh_en_job(id: &str, timeout_ms: u64) -> Value {
    json!({"id": id, "kind": "translate", "src_lang": "zh", "tgt_lang": "en",
           "timeout_ms": timeout_ms})
}

/// Every message ever appended to the stream `inbox` (an instance
/// deletes those it read).
async fn entries_added(conn: &redis::aio::MultiplexedConnection, inbox: &str) -> u64 {
    let mut info: HashMap<String, redis::Value> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(inbox)
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    redis::from_redis_value(info.remove("entries-added").unwrap()).unwrap()
}

/// A raw node `name` serving zh -> en with one free translate slot,
/// registered at `url` and offered jobs; and its registration, to
/// register it again elsewhere.
async fn offering_one(redis: &PrivateRedis, url: &str, name: &str) -> (TestNode, Register) {
    let mut register = registration(name, &["zh"], &["en"]);
    register.capacity = translate_room(1);
    let (node, _) = TestNode::register(url, register.clone()).await;
    offered_translations(&lingua_tests::connect(redis).await, name).await;
    (node, register)
}

/// Waits until `node` is in the zh -> en translate routing index: jobs
/// are offered to it.
async fn offered_translations(conn: &redis::aio::MultiplexedConnection, node: &str) {
    eventually(&format!("{node} to be offered jobs"), || {
        let mut conn = conn.clone();
        async move {
            let score: Option<f64> = redis::cmd("ZSCORE")
                .arg("lingua:v1:pair:{zh:en}:route:translate")
                .arg(node)
                .query_async(&mut conn)
                .await
                .unwrap();
            score.map(|_| ())
        }
    })
    .await;
}

/// The result a node sends once it stopped `assign` for a cancel.
fn cancelled(assign: &JobAssign) -> Message {
    Message::JobResult(JobResult {
        job_id: assign.job_id.clone(),
        attempt: assign.attempt,
        outcome: Outcome::Failed {
            code: FailureCode::Cancelled,
            message: "cancelled by the coordinator".into(),
        },
        duration_ms: 1,
        device: None,
    })
}

/// A coordinator of `config` allowing one attempt that ends silent or
/// lost, a raw node `name` serving zh -> en, and a translate job submitted
/// in the background (its answer).
async fn one_attempt_and_a_raw_node(
    redis: &PrivateRedis,
    name: &str,
    config: lingua_coordinator::config::Config,
) -> (TestCoordinator, TestNode, tokio::task::JoinHandle<Value>) {
    let config = lingua_coordinator::config::Config {
        max_attempts: 1,
        ..config
    };
    let coordinator = TestCoordinator::start(redis, config).await;
    let register = registration(name, &["zh"], &["en"]);
    let (node, _) = TestNode::register(&coordinator.ws_url(), register).await;
    let url = coordinator.url("/v1/jobs");
    let submitted = tokio::spawn(async move {
        let body =
            json!({"kind": "translate", "src_lang": "zh", "tgt_lang": "en", "timeout_ms": 20000});
        let answer = reqwest::Client::new()
            .post(url)
            .json(&body)
            .send()
            .await
            .unwrap();
        answer.json::<Value>().await.unwrap()
    });
    (coordinator, node, submitted)
}

#[tokio::test]
async fn a_refusal_moves_a_job_on_without_using_up_its_attempts() {
    let redis = lingua_tests::redis().await;
    // One attempt that may end silent or lost; "not now" refusals do not count.
    let (coordinator, mut node, submitted) =
        one_attempt_and_a_raw_node(&redis, "refuser", test_config()).await;
    let first = next_assign(&mut node).await;
    refused_then_done(&mut node, &first).await;
    let answer = submitted.await.unwrap();
    assert_eq!(answer["status"], "completed", "{answer}");
    assert_eq!(answer["attempts"], 2, "{answer}");
    let refusals = r#"lingua_job_refusals_total{reason="no_capacity"}"#;
    assert_eq!(coordinator.metric(None, refusals).await, Some(1.0));
    node.close().await;
    coordinator.stop().await;
}

/// An assignment that never reaches its node (the routing index still
/// offers the node, but no live coordinator instance holds its socket)
/// moves the job on without using up an attempt. Before, it counted
/// toward `max_attempts`: with one attempt, the job failed `node_lost`
/// though another node had room.
#[tokio::test]
async fn an_assignment_that_never_reached_its_node_uses_up_no_attempt() {
    let redis = lingua_tests::redis().await;
    let holder = TestCoordinator::start(&redis, quiet_node_config()).await;
    let config = lingua_coordinator::config::Config {
        max_attempts: 1,
        ..quiet_node_config()
    };
    let origin = TestCoordinator::start(&redis, config).await;
    // The most room, on a node whose instance will be gone: picked first.
    let mut register = registration("stranded", &["zh"], &["en"]);
    register.capacity = translate_room(4);
    let (stranded, _) = TestNode::register(&holder.ws_url(), register).await;
    let mut register = registration("reachable", &["zh"], &["en"]);
    register.capacity = translate_room(1);
    let (mut reachable, _) = TestNode::register(&origin.ws_url(), register).await;
    let mut conn = lingua_tests::connect(&redis).await;
    offered_translations(&conn, "stranded").await;
    offered_translations(&conn, "reachable").await;
    // As when its instance died and its presence lapsed, before the node
    // registered again.
    let stranded_keys = NodeKeys::new(&lingua_shared::NodeId::new("stranded").unwrap());
    let () = conn
        .hset(stranded_keys.hash, "coordinator", "gone")
        .await
        .unwrap();
    let submitted = submit_in_background(&origin, zh_en_job("unreached-first", 20_000));
    let assign = next_assign(&mut reachable).await;
    assert_eq!(
        assign.attempt, 2,
        "its first attempt was the stranded node's"
    );
    accepted_then_done(&mut reachable, assign).await;
    let (status, answer) = submitted.await.unwrap();
    assert_eq!(
        (status, &answer["status"]),
        (200, &json!("completed")),
        "{answer}"
    );
    stranded.close().await;
    reachable.close().await;
    origin.stop().await;
    holder.stop().await;
}

/// The node refuses the `first` assignment (busy a moment), reports room
/// again, and completes the job's next attempt with `{"text": "hello"}`.
async fn refused_then_done(node: &mut TestNode, first: &JobAssign) {
    node.send(&Message::JobReject(JobReject {
        job_id: first.job_id.clone(),
        attempt: first.attempt,
        reason: RejectReason::NoCapacity,
        message: "translate: busy for a moment".into(),
    }))
    .await;
    // Room again: the refusal zeroed the node's hint until it reports.
    let room = CapacityReport {
        free_slots: [(first.kind.clone(), 1)].into(),
        ..CapacityReport::default()
    };
    node.send(&Message::Capacity(room)).await;
    let second = next_assign(node).await;
    assert_eq!(second.job_id, first.job_id);
    assert_eq!(second.attempt, first.attempt + 1);
    accepted_then_done(node, second).await;
}

/// Accepts `assign` and answers it completed with `{"text": "hello"}`.
async fn accepted_then_done(node: &mut TestNode, assign: JobAssign) {
    let key = JobRef {
        job_id: assign.job_id.clone(),
        attempt: assign.attempt,
    };
    node.send(&Message::JobAccept(key)).await;
    node.send(&done(&assign)).await;
}

/// The node accepts `assign`, and waits until its coordinator has read
/// the accept: once a frame sent after it is answered.
async fn accepted_and_read(node: &mut TestNode, assign: &JobAssign) {
    node.send(&Message::JobAccept(JobRef {
        job_id: assign.job_id.clone(),
        attempt: assign.attempt,
    }))
    .await;
    node.send_raw(r#"{"type":"are_you_there"}"#.into()).await;
    loop {
        if let Received::Message(Message::Error(_)) = node.recv().await {
            break;
        }
    }
}

/// The node `register` names, back with `coordinator` (its previous
/// instance stopped), sends the result of `assign`: the job completes at
/// that attempt. Returns the node.
async fn completes_through(
    coordinator: &TestCoordinator,
    register: Register,
    assign: &JobAssign,
) -> TestNode {
    let (mut node, _) = TestNode::register(&coordinator.ws_url(), register).await;
    node.send(&done(assign)).await;
    let path = format!("/v1/jobs/{}?wait_ms=10000", assign.job_id);
    let (status, view) = coordinator.get(&path).await;
    assert_eq!(
        (status, &view["status"], view["attempts"].as_u64()),
        (200, &json!("completed"), Some(u64::from(assign.attempt))),
        "{view}"
    );
    node
}

/// The result a node sends once `assign` completed.
fn done(assign: &JobAssign) -> Message {
    Message::JobResult(JobResult {
        job_id: assign.job_id.clone(),
        attempt: assign.attempt,
        outcome: Outcome::Completed {
            output: lingua_shared::RawJson::of(&json!({"text": "hello"})),
        },
        duration_ms: 1,
        device: None,
    })
}

/// A submission waiting for its answer drives the job's dispatch itself;
/// when its client goes away, the dispatch goes on without it.
#[tokio::test]
async fn a_job_whose_client_went_away_is_still_moved_on_and_finished() {
    let redis = lingua_tests::redis().await;
    // However slowly the client's leaving is noticed, the first attempt
    // is still waiting for the node's answer when it comes.
    let config = lingua_coordinator::config::Config {
        accept_timeout: Duration::from_secs(60),
        ..test_config()
    };
    let (coordinator, mut node, submitted) =
        one_attempt_and_a_raw_node(&redis, "left", config).await;
    let first = next_assign(&mut node).await;
    submitted.abort();
    // Its connection closed: open are the node's socket and the one
    // asking.
    eventually("the client's connection to close", || async {
        let open = coordinator.metric(None, "lingua_connections_open").await;
        (open == Some(2.0)).then_some(())
    })
    .await;
    // Only a dispatcher still at work moves the job on after a refusal.
    refused_then_done(&mut node, &first).await;
    let path = format!("/v1/jobs/{}?wait_ms=10000", first.job_id);
    let (status, view) = coordinator.get(&path).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "completed", "{view}");
    assert_eq!(view["output"]["text"], "hello", "{view}");
    node.close().await;
    coordinator.stop().await;
}

/// A node that repeats its accept of an assignment forwarded through
/// another instance costs the dispatching instance one message more (its
/// dispatcher moves the job on: the node answered twice), not one per
/// frame. Before, every frame was passed on to its inbox.
#[tokio::test]
async fn a_node_repeating_its_answer_to_a_forwarded_assignment_sends_one_message_more() {
    let redis = lingua_tests::redis().await;
    let holder = TestCoordinator::start(&redis, quiet_node_config()).await;
    // However slow the two inbox hops, the first accept is in time.
    let config = lingua_coordinator::config::Config {
        max_attempts: 1,
        accept_timeout: Duration::from_secs(30),
        ..quiet_node_config()
    };
    let origin = TestCoordinator::start(&redis, config).await;
    let (status, health) = origin.get("/healthz").await;
    assert_eq!(status, 200, "{health}");
    let inbox = InstanceKeys::new(health["instance"].as_str().unwrap()).inbox;
    let (mut node, _) = offering_one(&redis, &holder.ws_url(), "repeater").await;
    let conn = lingua_tests::connect(&redis).await;
    let submitted = submit_in_background(&origin, zh_en_job("repeated", 20_000));
    let assign = next_assign(&mut node).await;
    let key = JobRef {
        job_id: assign.job_id.clone(),
        attempt: assign.attempt,
    };
    for _ in 0..20 {
        node.send(&Message::JobAccept(key.clone())).await;
    }
    let (status, answer) = submitted.await.unwrap();
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "node_lost", "{answer}");
    // Its result, acknowledged once the holder read every frame before it.
    node.send(&Message::JobResult(JobResult {
        job_id: assign.job_id,
        attempt: assign.attempt,
        outcome: Outcome::Completed {
            output: lingua_shared::RawJson::of(&json!({"text": "late"})),
        },
        duration_ms: 1,
        device: None,
    }))
    .await;
    loop {
        if let Received::Message(Message::ResultAck(acked)) = node.recv().await {
            assert_eq!(acked, key);
            break;
        }
    }
    assert_eq!(
        entries_added(&conn, &inbox).await,
        2,
        "the accept, and the one repeat that moved the job on"
    );
    node.close().await;
    origin.stop().await;
    holder.stop().await;
}

/// An assignment forwarded through another instance, never answered and
/// then cancelled by the instance that sent it, no longer holds room on
/// the node: the node's next report offers its slot again.
#[tokio::test]
async fn a_forwarded_assignment_cancelled_unanswered_gives_its_room_back() {
    let redis = lingua_tests::redis().await;
    let holder = TestCoordinator::start(&redis, quiet_node_config()).await;
    let origin = TestCoordinator::start(
        &redis,
        lingua_coordinator::config::Config {
            accept_timeout: Duration::from_millis(300),
            max_attempts: 1,
            ..quiet_node_config()
        },
    )
    .await;
    let mut register = registration("silent", &["zh"], &["en"]);
    register.capacity = translate_room(1);
    let (mut node, _) = TestNode::register(&holder.ws_url(), register).await;
    let (status, unanswered) = origin.submit(zh_en_job("unanswered", 20000)).await;
    let assign = next_assign(&mut node).await;
    assert_eq!(assign.job_id.as_str(), "unanswered");
    assert_eq!(status, 503, "{unanswered}");
    assert_eq!(unanswered["error"]["code"], "no_capacity", "{unanswered}");
    assert_eq!(next_cancel(&mut node).await.job_id, assign.job_id);
    // The node never ran it: its slot is free, and it says so.
    node.send(&Message::Capacity(translate_room(1))).await;
    let submitted = submit_in_background(&origin, zh_en_job("next", 20000));
    let next = tokio::time::timeout(Duration::from_secs(15), next_assign(&mut node))
        .await
        .expect("the node's slot is offered again");
    assert_eq!(next.job_id.as_str(), "next");
    accepted_then_done(&mut node, next).await;
    let (status, answer) = submitted.await.unwrap();
    assert_eq!(
        (status, &answer["status"]),
        (200, &json!("completed")),
        "{answer}"
    );
    node.close().await;
    origin.stop().await;
    holder.stop().await;
}

/// A node that stopped a job because the coordinator cancelled it (its
/// accept was lost, and the dispatcher moved on) says so in a result:
/// that ends the attempt, not the job, which runs on the next node with
/// room.
#[tokio::test]
async fn a_cancelled_attempt_does_not_end_its_job() {
    let redis = lingua_tests::redis().await;
    let config = lingua_coordinator::config::Config {
        accept_timeout: Duration::from_millis(1000),
        ..quiet_node_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    let mut register = registration("full", &["zh"], &["en"]);
    register.capacity = translate_room(0);
    let (mut full, _) = TestNode::register(&coordinator.ws_url(), register).await;
    let mut register = registration("silent", &["zh"], &["en"]);
    register.capacity = translate_room(1);
    let (mut silent, _) = TestNode::register(&coordinator.ws_url(), register).await;
    let submitted = submit_in_background(&coordinator, zh_en_job("cancelled-once", 20000));
    // The silent node runs it (its slot taken) but its accept is lost.
    let first = next_assign(&mut silent).await;
    silent.send(&Message::Capacity(translate_room(0))).await;
    let cancel = next_cancel(&mut silent).await;
    assert_eq!(
        (&cancel.job_id, cancel.attempt),
        (&first.job_id, first.attempt)
    );
    silent.send(&cancelled(&first)).await;
    loop {
        match silent.recv().await {
            Received::Message(Message::ResultAck(acked)) if acked.job_id == first.job_id => break,
            Received::Message(_) => {}
            other => panic!("expected result_ack, got {other:?}"),
        }
    }
    // Room elsewhere: the job runs there.
    full.send(&Message::Capacity(translate_room(1))).await;
    let second = next_assign(&mut full).await;
    assert_eq!(second.job_id, first.job_id);
    accepted_then_done(&mut full, second).await;
    let (status, answer) = submitted.await.unwrap();
    assert_eq!(
        (status, &answer["status"]),
        (200, &json!("completed")),
        "{answer}"
    );
    assert_eq!(answer["node_id"], "full", "{answer}");
    silent.close().await;
    full.close().await;
    coordinator.stop().await;
}

/// A pick that ran in Redis but whose answer was lost moved the job to
/// an attempt its dispatcher never sent; the dispatcher's next pick finds
/// the job moved on. At the deadline it records the job's timeout rather
/// than answering with a job still running.
#[tokio::test]
async fn a_job_moved_on_by_a_pick_whose_answer_was_lost_ends_at_its_deadline() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, quiet_node_config()).await;
    let register = registration("refuser", &["zh"], &["en"]);
    let (mut node, _) = TestNode::register(&coordinator.ws_url(), register).await;
    let submitted = submit_in_background(&coordinator, zh_en_job("lost-pick", 3000));
    let first = next_assign(&mut node).await;
    // What the lost pick did: the job's next attempt, recorded.
    let mut conn = lingua_tests::connect(&redis).await;
    let () = redis::cmd("HSET")
        .arg("lingua:v1:pair:{zh:en}:job:lost-pick")
        .arg("attempt")
        .arg(first.attempt + 1)
        .query_async(&mut conn)
        .await
        .unwrap();
    node.send(&Message::JobReject(JobReject {
        job_id: first.job_id.clone(),
        attempt: first.attempt,
        reason: RejectReason::NoCapacity,
        message: "busy".into(),
    }))
    .await;
    let (status, answer) = submitted.await.unwrap();
    assert_eq!(status, 504, "{answer}");
    assert_eq!(answer["error"]["code"], "timeout", "{answer}");
    let (_, view) = coordinator.get("/v1/jobs/lost-pick").await;
    assert_eq!(
        view["status"], "failed",
        "recorded, not only answered: {view}"
    );
    node.close().await;
    coordinator.stop().await;
}

/// A node whose agent restarted (a new process, `instance`) and came
/// back to the same coordinator before that coordinator saw its old
/// connection die: the jobs the old process ran are gone with it, and
/// move on at once rather than at their deadline.
#[tokio::test]
async fn the_jobs_of_a_restarted_agent_move_on_when_it_registers_again() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, quiet_node_config()).await;
    let (mut old, _) = TestNode::register(
        &coordinator.ws_url(),
        registration("restarted", &["zh"], &["en"]),
    )
    .await;
    let submitted = submit_in_background(&coordinator, zh_en_job("outlived", 30000));
    let first = next_assign(&mut old).await;
    old.send(&Message::JobAccept(JobRef {
        job_id: first.job_id.clone(),
        attempt: first.attempt,
    }))
    .await;
    let (mut other, _) = TestNode::register(
        &coordinator.ws_url(),
        registration("other", &["zh"], &["en"]),
    )
    .await;
    let mut conn = lingua_tests::connect(&redis).await;
    offered_translations(&conn, "other").await;
    // The old process's lease ran out (its heartbeats stopped); the
    // coordinator has not yet missed enough of them to drop its socket.
    let () = redis::cmd("DEL")
        .arg("lingua:v1:node:{restarted}:lease")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut again = registration("restarted", &["zh"], &["en"]);
    again.instance = "a-new-process".into();
    let (new, _) = TestNode::register(&coordinator.ws_url(), again).await;
    let second = next_assign(&mut other).await;
    assert_eq!(
        (&second.job_id, second.attempt),
        (&first.job_id, first.attempt + 1)
    );
    accepted_then_done(&mut other, second).await;
    let (status, answer) = submitted.await.unwrap();
    assert_eq!(
        (status, &answer["status"]),
        (200, &json!("completed")),
        "{answer}"
    );
    assert_eq!(answer["node_id"], "other", "{answer}");
    old.close().await;
    new.close().await;
    other.close().await;
    coordinator.stop().await;
}

/// A `cancelled` result for an attempt nobody cancelled answers nothing:
/// the dispatcher still waits for an accept, and moves the job on when
/// none comes in time.
#[tokio::test]
async fn a_cancelled_result_is_not_an_accept() {
    let redis = lingua_tests::redis().await;
    let config = lingua_coordinator::config::Config {
        accept_timeout: Duration::from_millis(500),
        ..quiet_node_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    let (mut liar, _) = TestNode::register(
        &coordinator.ws_url(),
        registration("liar", &["zh"], &["en"]),
    )
    .await;
    let submitted = submit_in_background(&coordinator, zh_en_job("not-cancelled", 30000));
    let first = next_assign(&mut liar).await;
    liar.send(&cancelled(&first)).await;
    let (mut other, _) = TestNode::register(
        &coordinator.ws_url(),
        registration("other", &["zh"], &["en"]),
    )
    .await;
    let second = next_assign(&mut other).await;
    assert_eq!(
        (&second.job_id, second.attempt),
        (&first.job_id, first.attempt + 1)
    );
    accepted_then_done(&mut other, second).await;
    let (status, answer) = submitted.await.unwrap();
    assert_eq!(
        (status, &answer["status"]),
        (200, &json!("completed")),
        "{answer}"
    );
    assert_eq!(answer["node_id"], "other", "{answer}");
    liar.close().await;
    other.close().await;
    coordinator.stop().await;
}

/// A raw node sends no heartbeats: with this config the coordinator
/// closes it for that after 30 s, not 0.6 s, however slow the machine.
fn quiet_node_config() -> lingua_coordinator::config::Config {
    lingua_coordinator::config::Config {
        heartbeat_interval: Duration::from_secs(10),
        ..test_config()
    }
}

/// A test Redis reached through a proxy that the test holds.
struct Proxied(String);

impl RedisBackend for Proxied {
    async fn store(&self, metrics: Arc<Metrics>) -> Store {
        Store::connect(&self.0, metrics)
            .await
            .expect("the test redis answers through the proxy")
    }

    fn coordinator_args(&self) -> Vec<String> {
        vec!["--redis-url".into(), self.0.clone()]
    }
}

/// A coordinator on a test Redis reached through a proxy, and a raw node
/// `name` serving zh -> en registered through it.
async fn behind_a_proxy(name: &str) -> (PrivateRedis, Blackhole, TestCoordinator, TestNode) {
    let redis = lingua_tests::redis().await;
    let proxy = Blackhole::start_unix(redis.socket_path().to_owned()).await;
    let backend = Proxied(format!("redis://{}", proxy.addr));
    let coordinator = TestCoordinator::start(&backend, quiet_node_config()).await;
    let register = registration(name, &["zh"], &["en"]);
    let (node, _) = TestNode::register(&coordinator.ws_url(), register).await;
    (redis, proxy, coordinator, node)
}

/// Completes `assign` from `node`, and checks the coordinator answers its
/// job completed; then stops both.
async fn completed(mut node: TestNode, coordinator: TestCoordinator, assign: JobAssign) {
    let path = format!("/v1/jobs/{}?wait_ms=10000", assign.job_id);
    accepted_then_done(&mut node, assign).await;
    let (status, view) = coordinator.get(&path).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "completed", "{view}");
    node.close().await;
    coordinator.stop().await;
}

/// A coordinator that stops while it records a node's result finishes
/// recording it, and acknowledges it, before it closes the node's socket.
/// Before, the stop dropped the recording half done: the node sent the
/// result again elsewhere, where it was a duplicate that told the job's
/// dispatcher nothing.
#[tokio::test]
async fn a_result_being_recorded_at_the_stop_is_recorded_and_acknowledged_first() {
    let (redis, proxy, coordinator, mut node) = behind_a_proxy("finisher").await;
    // Closed as the stop begins: it has nothing to finish.
    let witness = registration("witness", &["ja"], &["en"]);
    let (mut witness, _) = TestNode::register(&coordinator.ws_url(), witness).await;
    let _submitted = submit_in_background(&coordinator, zh_en_job("finished-at-stop", 60_000));
    let assign = next_assign(&mut node).await;
    accepted_and_read(&mut node, &assign).await;
    proxy.hold();
    node.send(&done(&assign)).await;
    eventually(
        "the result's recording to be on its way to Redis",
        || async {
            let held = proxy.held();
            held.windows(16)
                .any(|w| w == b"finished-at-stop")
                .then_some(())
        },
    )
    .await;
    let stopped = tokio::spawn(coordinator.stop());
    assert_eq!(witness.closed().await, 1001, "the stop began");
    proxy.thaw();
    let (messages, code) = node.messages_until_closed().await;
    assert_eq!(code, 1001, "the stop closes the node's socket");
    let key = JobRef {
        job_id: assign.job_id.clone(),
        attempt: assign.attempt,
    };
    assert!(
        messages.contains(&Message::ResultAck(key)),
        "acknowledged before the close: {messages:?}"
    );
    stopped.await.unwrap();
    let status: String = lingua_tests::connect(&redis)
        .await
        .hget("lingua:v1:pair:{zh:en}:job:finished-at-stop", "status")
        .await
        .unwrap();
    assert_eq!(status, "completed");
}

#[tokio::test]
async fn a_job_whose_client_went_away_while_it_was_recorded_is_still_dispatched() {
    let (_redis, proxy, coordinator, mut node) = behind_a_proxy("recorder").await;
    // Redis gets the job's record (and first pick) only once the client
    // has gone.
    proxy.hold();
    let url = coordinator.url("/v1/jobs");
    let body = json!({"id": "held-1", "kind": "translate", "src_lang": "zh", "tgt_lang": "en",
        "timeout_ms": 20000});
    let submitted =
        tokio::spawn(async move { reqwest::Client::new().post(url).json(&body).send().await });
    eventually("the job's record to be on its way to Redis", || async {
        let held = proxy.held();
        held.windows(6).any(|w| w == b"held-1").then_some(())
    })
    .await;
    submitted.abort();
    eventually("the client's connection to close", || async {
        let open = coordinator.metric(None, "lingua_connections_open").await;
        (open == Some(2.0)).then_some(())
    })
    .await;
    proxy.thaw();
    // Only a dispatcher that went on without its request assigns it.
    let assign = next_assign(&mut node).await;
    assert_eq!(assign.job_id.as_str(), "held-1");
    completed(node, coordinator, assign).await;
}

/// A recording whose reply comes after the Redis timeout fails its
/// submission, but the job Redis holds after all is dispatched.
#[tokio::test]
async fn a_job_recorded_after_its_reply_timed_out_is_dispatched_all_the_same() {
    let (_redis, proxy, coordinator, mut node) = behind_a_proxy("late").await;
    // Redis gets the job's record only after the 5 s Redis timeout. The
    // client chose no id: the answer names the one it may follow.
    proxy.hold();
    let body = json!({"kind": "translate", "src_lang": "zh", "tgt_lang": "en",
        "timeout_ms": 60000});
    let (status, answer) = coordinator.submit(body).await;
    assert_eq!(status, 503, "{answer}");
    let id = answer["error"]["id"]
        .as_str()
        .expect("the job's id")
        .to_owned();
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("submit it again with id {id}"))),
        "{answer}"
    );
    proxy.thaw();
    let assign = next_assign(&mut node).await;
    assert_eq!(assign.job_id.as_str(), id);
    // Submitted again with the id it was given, the job is followed to
    // its result.
    let again = json!({"id": id, "kind": "translate", "src_lang": "zh", "tgt_lang": "en",
        "timeout_ms": 60000});
    let ((status, view), ()) = tokio::join!(
        coordinator.submit(again),
        accepted_then_done(&mut node, assign)
    );
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "completed", "{view}");
    node.close().await;
    coordinator.stop().await;
}

#[tokio::test]
async fn a_long_poll_for_another_instances_job_ends_when_its_coordinator_stops() {
    let redis = lingua_tests::redis().await;
    let dispatching = TestCoordinator::start(&redis, quiet_node_config()).await;
    let asked = TestCoordinator::start(&redis, quiet_node_config()).await;
    let register = registration("slow", &["zh"], &["en"]);
    let (mut node, _) = TestNode::register(&dispatching.ws_url(), register).await;
    let body = json!({"id": "polled-1", "kind": "translate", "src_lang": "zh", "tgt_lang": "en",
        "timeout_ms": 60000});
    let accepted = reqwest::Client::new()
        .post(dispatching.url("/v1/jobs?wait=false"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    // Running, with no result to come while the poll waits.
    let assign = next_assign(&mut node).await;
    let key = JobRef {
        job_id: assign.job_id,
        attempt: assign.attempt,
    };
    node.send(&Message::JobAccept(key)).await;
    let before = redis.command_calls("hgetall").await;
    let url = asked.url("/v1/jobs/polled-1?wait_ms=60000");
    let polled = tokio::spawn(async move {
        let answer = reqwest::get(url).await.unwrap();
        (
            answer.status().as_u16(),
            answer.json::<Value>().await.unwrap(),
        )
    });
    eventually("the other instance to poll Redis for the job", || async {
        (redis.command_calls("hgetall").await >= before + 3).then_some(())
    })
    .await;
    // Before, the poll went on through the shutdown, holding the HTTP
    // drain; the job runs on meanwhile.
    asked.stop().await;
    let (status, view) = polled.await.unwrap();
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["status"], "running", "{view}");
    node.close().await;
    dispatching.stop().await;
}

/// A coordinator that stops while jobs wait for room there (one refused
/// by its node, one recorded queued behind it) hands them to another
/// instance, which dispatches them once the node has room: before, they
/// waited in Redis for nobody until their deadline.
#[tokio::test]
async fn a_stopping_coordinator_hands_its_waiting_jobs_to_another() {
    let redis = lingua_tests::redis().await;
    let stopping = TestCoordinator::start(&redis, quiet_node_config()).await;
    let staying = TestCoordinator::start(&redis, quiet_node_config()).await;
    let mut register = registration("full", &["zh"], &["en"]);
    register.capacity = translate_room(1);
    let (mut node, _) = TestNode::register(&staying.ws_url(), register).await;
    let submit = |id: &str| {
        let (url, body) = (stopping.url("/v1/jobs?wait=false"), zh_en_job(id, 60_000));
        async move {
            let answer = reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 202);
        }
    };
    let depth = |instance: &TestCoordinator, jobs: f64| {
        let series = r#"lingua_queue_depth{pair="zh:en",kind="translate"}"#;
        let metrics = instance.url("/metrics");
        async move {
            eventually(&format!("{jobs} jobs waiting for room"), || {
                let metrics = metrics.clone();
                async move {
                    let text = reqwest::get(metrics).await.ok()?.text().await.ok()?;
                    text.lines()
                        .any(|line| line == format!("{series} {jobs}"))
                        .then_some(())
                }
            })
            .await;
        }
    };
    // One refused by the node whenever it is sent, until it waits for
    // room (a refusal leaves the node none once its entry is rewritten);
    // one recorded queued behind it. The first is sent once the node's
    // room is in its routing entry.
    offered_translations(&lingua_tests::connect(&redis).await, "full").await;
    submit("refused").await;
    let waiting = depth(&stopping, 1.0);
    tokio::pin!(waiting);
    loop {
        tokio::select! {
            () = &mut waiting => break,
            assign = next_assign(&mut node) => {
                node.send(&Message::JobReject(JobReject {
                    job_id: assign.job_id,
                    attempt: assign.attempt,
                    reason: RejectReason::NoCapacity,
                    message: "translate: busy".into(),
                }))
                .await;
            }
        }
    }
    submit("queued").await;
    depth(&stopping, 2.0).await;
    let mut stood = HashMap::new();
    for id in ["refused", "queued"] {
        let (_, view) = stopping.get(&format!("/v1/jobs/{id}")).await;
        stood.insert(id.to_owned(), view["attempts"].as_u64().unwrap());
    }
    assert_eq!(stood["queued"], 0, "recorded queued: {stood:?}");
    stopping.stop().await;
    eventually("the other instance to take both jobs over", || async {
        let adopted = staying.metric(None, "lingua_jobs_adopted_total").await;
        (adopted == Some(2.0)).then_some(())
    })
    .await;
    node.send(&Message::Capacity(translate_room(2))).await;
    for _ in 0..2 {
        let assign = next_assign(&mut node).await;
        let at = stood[assign.job_id.as_str()];
        assert_eq!(
            u64::from(assign.attempt),
            at + 1,
            "{} goes on from the attempt it stood at",
            assign.job_id
        );
        accepted_then_done(&mut node, assign).await;
    }
    for id in ["refused", "queued"] {
        let (status, view) = staying.get(&format!("/v1/jobs/{id}?wait_ms=10000")).await;
        assert_eq!(status, 200, "{view}");
        assert_eq!(view["status"], "completed", "{view}");
    }
    node.close().await;
    staying.stop().await;
}

/// A job still queued whose coordinator instance died (it could hand
/// nothing over) is taken over by an instance that reads it, and
/// dispatched: one queued from its arrival, and one whose attempt ended
/// and whose next pick found no room. Before, they waited for nobody until
/// their deadline.
#[tokio::test]
async fn a_queued_job_of_a_dead_coordinator_is_taken_over_by_its_reader() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, quiet_node_config()).await;
    let register = registration("idle", &["zh"], &["en"]);
    let (mut node, _) = TestNode::register(&coordinator.ws_url(), register).await;
    offered_translations(&lingua_tests::connect(&redis).await, "idle").await;
    // Recorded by an instance that is gone, as its records stay.
    let store = Store::connect(&redis.url(), Arc::new(Metrics::default()))
        .await
        .unwrap();
    let route = Route::gpu(&JobKind::new("translate").unwrap());
    let idle = [lingua_shared::NodeId::new("idle").unwrap()];
    let on = |excluded| PickOn {
        route: &route,
        session: None,
        affinity: Duration::ZERO,
        policy: PickPolicy::Capacity,
        excluded,
    };
    let ids = [
        JobId::new("abandoned").unwrap(),
        JobId::new("moved-on").unwrap(),
    ];
    for (id, pick) in ids.iter().zip([false, true]) {
        let recorded = NewJob {
            id,
            pair: "zh:en".parse().unwrap(),
            request: r#"{"kind":"translate","pair":"zh:en","payload":null,"session_id":null,"timeout_ms":60000}"#,
            timeout: Duration::from_secs(60),
            retention: Duration::from_secs(60),
            coordinator: "died",
            opener: 1,
        };
        store.job_open(recorded, (on(&[]), pick)).await.unwrap();
    }
    // Its first attempt ended without a result; no other node had room.
    let pair = "zh:en".parse().unwrap();
    let next = store
        .job_next((pair, &ids[1]), (1, false), on(&idle))
        .await
        .unwrap();
    assert_eq!(next, Some(lingua_coordinator::store::JobPick::NoCapacity));
    let polls: Vec<_> = ids
        .iter()
        .map(|id| {
            let url = coordinator.url(&format!("/v1/jobs/{id}?wait_ms=30000"));
            tokio::spawn(async move {
                let answer = reqwest::get(url).await.unwrap();
                answer.json::<Value>().await.unwrap()
            })
        })
        .collect();
    let mut attempts = HashMap::new();
    for _ in 0..2 {
        let assign = tokio::time::timeout(lingua_tests::PATIENCE, next_assign(&mut node))
            .await
            .expect("the jobs are taken over and sent to the node");
        attempts.insert(assign.job_id.to_string(), assign.attempt);
        accepted_then_done(&mut node, assign).await;
    }
    assert_eq!(
        attempts,
        HashMap::from([("abandoned".into(), 1), ("moved-on".into(), 2)])
    );
    for poll in polls {
        let view = poll.await.unwrap();
        assert_eq!(view["status"], "completed", "{view}");
    }
    let adopted = coordinator.metric(None, "lingua_jobs_adopted_total").await;
    assert_eq!(adopted, Some(2.0));
    node.close().await;
    coordinator.stop().await;
}

/// Records job `id` of `request` (zh -> en translate) with `timeout` as a
/// coordinator instance that died ("died") left it: waiting for room.
async fn left_queued_by_the_dead(
    redis: &PrivateRedis,
    (id, request): (&str, &str),
    timeout: Duration,
) {
    let store = Store::connect(&redis.url(), Arc::new(Metrics::default()))
        .await
        .unwrap();
    let route = Route::gpu(&JobKind::new("translate").unwrap());
    let on = PickOn {
        route: &route,
        session: None,
        affinity: Duration::ZERO,
        policy: PickPolicy::Capacity,
        excluded: &[],
    };
    let recorded = NewJob {
        id: &JobId::new(id).unwrap(),
        pair: "zh:en".parse().unwrap(),
        request,
        timeout,
        retention: Duration::from_secs(60),
        coordinator: "died",
        opener: 1,
    };
    store.job_open(recorded, (on, false)).await.unwrap();
}

/// A job taken over ends at the deadline its record holds (its node is
/// given the time left to it), and its failure names the timeout its
/// client gave: before, it named the time that was left at the takeover.
#[tokio::test]
async fn a_job_taken_over_keeps_its_deadline_and_fails_naming_its_own_timeout() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, quiet_node_config()).await;
    let (mut node, _) = offering_one(&redis, &coordinator.ws_url(), "silent").await;
    let mut conn = lingua_tests::connect(&redis).await;
    let request =
        r#"{"kind":"translate","pair":"zh:en","payload":null,"session_id":null,"timeout_ms":1500}"#;
    left_queued_by_the_dead(&redis, ("short", request), Duration::from_millis(1_500)).await;
    // Half a second of it gone already.
    let job = "lingua:v1:pair:{zh:en}:job:short";
    let deadline: u64 = conn.hget(job, "deadline_ms").await.unwrap();
    let () = conn.hset(job, "deadline_ms", deadline - 500).await.unwrap();
    // Read, it is taken over and sent to the node, which says nothing.
    let poll = coordinator.url("/v1/jobs/short?wait_ms=30000");
    let polled = tokio::spawn(async move {
        let answer = reqwest::get(poll).await.unwrap();
        answer.json::<Value>().await.unwrap()
    });
    let assign = next_assign(&mut node).await;
    assert!(assign.timeout_ms <= 1_000, "{} ms left", assign.timeout_ms);
    let view = polled.await.unwrap();
    assert_eq!(view["status"], "failed", "{view}");
    assert_eq!(view["error"]["code"], "timeout", "{view}");
    let message = view["error"]["message"].as_str().unwrap();
    assert!(message.contains("within 1500 ms"), "{message}");
    node.close().await;
    coordinator.stop().await;
}

/// A coordinator that stops while one of its attempts waits for the
/// node's answer (the node on another instance) follows it through the
/// stop: the node's refusal, after the stop began, moves the job on, and
/// the job, with no attempt in flight, is handed to the other instance,
/// which completes it. Before, the stop dropped the dispatch, and the
/// refused job waited for nobody until its deadline.
#[tokio::test]
async fn an_attempt_refused_after_its_coordinator_began_to_stop_is_handed_over() {
    let redis = lingua_tests::redis().await;
    let config = lingua_coordinator::config::Config {
        accept_timeout: Duration::from_secs(30),
        ..quiet_node_config()
    };
    let stopping = TestCoordinator::start(&redis, config).await;
    let staying = TestCoordinator::start(&redis, quiet_node_config()).await;
    let (status, health) = stopping.get("/healthz").await;
    assert_eq!(status, 200, "{health}");
    let instance = health["instance"].as_str().unwrap().to_owned();
    let (mut node, _) = offering_one(&redis, &staying.ws_url(), "refuser").await;
    let conn = lingua_tests::connect(&redis).await;
    let submitted = submit_in_background(&stopping, zh_en_job("refused-late", 60_000));
    let first = next_assign(&mut node).await;
    let stopped = tokio::spawn(stopping.stop());
    eventually("the coordinator to say it is stopping", || {
        let (mut conn, instance) = (conn.clone(), instance.clone());
        async move {
            // 0 while it stops; gone once it stopped.
            let score: Option<f64> = conn.zscore(keys::ALL_INSTANCES, &instance).await.unwrap();
            score.is_none_or(|score| score == 0.0).then_some(())
        }
    })
    .await;
    refused_then_done(&mut node, &first).await;
    stopped.await.unwrap();
    let (status, view) = staying.get("/v1/jobs/refused-late?wait_ms=10000").await;
    assert_eq!(
        (status, &view["status"]),
        (200, &json!("completed")),
        "{view}"
    );
    assert_eq!(view["attempts"], 2, "{view}");
    assert_eq!(
        staying.metric(None, "lingua_jobs_adopted_total").await,
        Some(1.0)
    );
    // Its submission was answered with the job as it stood.
    let (status, answer) = submitted.await.unwrap();
    assert_eq!(status, 200, "{answer}");
    node.close().await;
    staying.stop().await;
}

/// A coordinator that stops while a node it holds has not answered an
/// assignment cancels it and closes that node's socket: the job, with no
/// attempt in flight, is handed to the other instance (the node's loss to
/// the stop uses up no attempt, though one is all it has), which sends it
/// to the node once the node registered there: the only node of the pair,
/// which serves it still while it moves (before, the job failed
/// `no_nodes` in that moment). Before, the stop dropped
/// the dispatch and the job waited for nobody until its deadline; and,
/// before the cancel, the node could run the first attempt as well. An
/// attempt the node accepted is not cancelled: it runs on, and its result
/// is recorded through the other instance.
#[tokio::test]
async fn a_job_sent_to_a_node_of_a_stopping_coordinator_is_handed_over() {
    let redis = lingua_tests::redis().await;
    let config = lingua_coordinator::config::Config {
        accept_timeout: Duration::from_secs(30),
        max_attempts: 1,
        ..quiet_node_config()
    };
    let stopping = TestCoordinator::start(&redis, config).await;
    let staying = TestCoordinator::start(&redis, quiet_node_config()).await;
    let mut register = registration("moving", &["zh"], &["en"]);
    register.capacity = translate_room(2);
    let (mut node, _) = TestNode::register(&stopping.ws_url(), register.clone()).await;
    let conn = lingua_tests::connect(&redis).await;
    offered_translations(&conn, "moving").await;
    let submitted = submit_in_background(&stopping, zh_en_job("moved", 60_000));
    let first = next_assign(&mut node).await;
    assert_eq!(first.attempt, 1);
    let _kept = submit_in_background(&stopping, zh_en_job("kept", 60_000));
    let kept = next_assign(&mut node).await;
    assert_eq!(kept.job_id.as_str(), "kept");
    accepted_and_read(&mut node, &kept).await;
    let stopped = tokio::spawn(stopping.stop());
    let (messages, code) = node.messages_until_closed().await;
    assert_eq!(code, 1001, "the stop closes the node's socket");
    assert_eq!(
        cancelled_attempts(&messages),
        [("moved".to_owned(), 1)],
        "the unanswered attempt, and only that one, is cancelled before the close: {messages:?}"
    );
    stopped.await.unwrap();
    let (_, answer) = submitted.await.unwrap();
    assert_ne!(answer["status"], "failed", "{answer}");
    let mut node = completes_through(&staying, register, &kept).await;
    let assign = next_assign(&mut node).await;
    // Its next attempt (one more if a pick chose the node before it left
    // the routing index: unreachable, that one moved on for free).
    assert_eq!(assign.job_id.as_str(), "moved");
    assert!(assign.attempt > first.attempt, "attempt {}", assign.attempt);
    accepted_then_done(&mut node, assign).await;
    let (status, view) = staying.get("/v1/jobs/moved?wait_ms=10000").await;
    assert_eq!(
        (status, &view["status"]),
        (200, &json!("completed")),
        "{view}"
    );
    node.close().await;
    staying.stop().await;
}

/// An accept on its way when the stop begins is read before anything is
/// cancelled: the job runs on where it started, and completes at that
/// attempt. Before, the stop cancelled every attempt it had not read an
/// answer to at once, so a node that had just started a job stopped it,
/// and the job ran again from the start at its next attempt (found by
/// the rolling restart in tests/tests/faults.rs: one or two jobs of
/// about 25 ran twice at each stop).
#[tokio::test]
async fn an_accept_crossing_the_stop_is_read_before_anything_is_cancelled() {
    let redis = lingua_tests::redis().await;
    let config = lingua_coordinator::config::Config {
        accept_timeout: Duration::from_secs(30),
        ..quiet_node_config()
    };
    let stopping = TestCoordinator::start(&redis, config).await;
    let staying = TestCoordinator::start(&redis, quiet_node_config()).await;
    let (mut node, register) = offering_one(&redis, &stopping.ws_url(), "crossing").await;
    let witness = registration("witness", &["ja"], &["en"]);
    let (mut witness, _) = TestNode::register(&stopping.ws_url(), witness).await;
    let _submitted = submit_in_background(&stopping, zh_en_job("started", 60_000));
    let assign = next_assign(&mut node).await;
    let stopped = tokio::spawn(stopping.stop());
    assert_eq!(witness.closed().await, 1001, "the stop began");
    node.send(&Message::JobAccept(JobRef {
        job_id: assign.job_id.clone(),
        attempt: assign.attempt,
    }))
    .await;
    let (messages, code) = node.messages_until_closed().await;
    assert_eq!(code, 1001, "the stop closes the node's socket");
    assert_eq!(
        cancelled_attempts(&messages),
        [],
        "the accepted attempt runs on: {messages:?}"
    );
    stopped.await.unwrap();
    let node = completes_through(&staying, register, &assign).await;
    node.close().await;
    staying.stop().await;
}

/// A dispatcher that gives up on an attempt while its coordinator waits
/// for the node's answers at the stop (the node did not answer in time)
/// has its cancel written before the close. Before, what the rest of the
/// coordinator asked of a connection once its stop began was never
/// written: the node, not told, could still accept and run the attempt
/// beside the job's next one, on the instance that took it over.
#[tokio::test]
async fn a_cancel_sent_while_the_stop_waits_for_answers_reaches_the_node() {
    let redis = lingua_tests::redis().await;
    let config = lingua_coordinator::config::Config {
        accept_timeout: Duration::from_millis(300),
        ..quiet_node_config()
    };
    let stopping = TestCoordinator::start(&redis, config).await;
    let staying = TestCoordinator::start(&redis, quiet_node_config()).await;
    let (mut node, _) = offering_one(&redis, &stopping.ws_url(), "slow-to-answer").await;
    let _submitted = submit_in_background(&stopping, zh_en_job("unanswered", 60_000));
    let assign = next_assign(&mut node).await;
    let stopped = tokio::spawn(stopping.stop());
    let (messages, code) = node.messages_until_closed().await;
    assert_eq!(code, 1001, "the stop closes the node's socket");
    let cancels: Vec<(String, u32, String)> = messages
        .iter()
        .filter_map(|message| match message {
            Message::JobCancel(cancel) => Some((
                cancel.job_id.to_string(),
                cancel.attempt,
                cancel.reason.clone(),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        cancels,
        [(
            "unanswered".to_owned(),
            assign.attempt,
            "not accepted in time".to_owned()
        )],
        "{messages:?}"
    );
    stopped.await.unwrap();
    staying.stop().await;
}

/// An assignment another instance forwards to a stopping one goes
/// elsewhere: the stopping instance answers `withdrawn` (no attempt used
/// up) rather than giving it to a node about to move. Before, it was
/// written to the node while the stop waited for the node's answers.
#[tokio::test]
async fn an_assignment_forwarded_to_a_stopping_instance_goes_elsewhere() {
    let redis = lingua_tests::redis().await;
    let config = lingua_coordinator::config::Config {
        accept_timeout: Duration::from_secs(30),
        ..quiet_node_config()
    };
    let stopping = TestCoordinator::start(&redis, config).await;
    let config = lingua_coordinator::config::Config {
        max_attempts: 1,
        ..quiet_node_config()
    };
    let staying = TestCoordinator::start(&redis, config).await;
    let mut register = registration("moving", &["zh"], &["en"]);
    register.capacity = translate_room(2);
    let (mut node, _) = TestNode::register(&stopping.ws_url(), register.clone()).await;
    offered_translations(&lingua_tests::connect(&redis).await, "moving").await;
    let witness = registration("witness", &["ja"], &["en"]);
    let (mut witness, _) = TestNode::register(&stopping.ws_url(), witness).await;
    // Unanswered: the stop waits for the node's answer.
    let _held = submit_in_background(&stopping, zh_en_job("held", 60_000));
    next_assign(&mut node).await;
    let stopped = tokio::spawn(stopping.stop());
    assert_eq!(witness.closed().await, 1001, "the stop began");
    let submitted = submit_in_background(&staying, zh_en_job("elsewhere", 60_000));
    let (messages, code) = node.messages_until_closed().await;
    assert_eq!(code, 1001, "the stop closes the node's socket");
    assert!(
        !messages
            .iter()
            .any(|m| matches!(m, Message::JobAssign(a) if a.job_id.as_str() == "elsewhere")),
        "no new work for a node on the move: {messages:?}"
    );
    stopped.await.unwrap();
    let (mut node, _) = TestNode::register(&staying.ws_url(), register).await;
    loop {
        let assign = next_assign(&mut node).await;
        let last = assign.job_id.as_str() == "elsewhere";
        accepted_then_done(&mut node, assign).await;
        if last {
            break;
        }
    }
    let (status, answer) = submitted.await.unwrap();
    assert_eq!(
        (status, &answer["status"]),
        (200, &json!("completed")),
        "{answer}"
    );
    node.close().await;
    staying.stop().await;
}

/// An instance that stops while a node it holds runs a job another
/// instance dispatched (forwarded, accepted) leaves it running: the
/// dispatcher keeps waiting, and the node's result, recorded wherever it
/// reconnects, completes the job at that attempt. Before, the dispatcher
/// took the holder's stop for the node's loss and moved the job on: with
/// one attempt, it failed `node_lost` while the node ran it to the end.
#[tokio::test]
async fn a_forwarded_job_runs_on_through_its_holders_stop() {
    let redis = lingua_tests::redis().await;
    let holder = TestCoordinator::start(&redis, quiet_node_config()).await;
    let config = lingua_coordinator::config::Config {
        max_attempts: 1,
        ..quiet_node_config()
    };
    let origin = TestCoordinator::start(&redis, config).await;
    let (mut node, register) = offering_one(&redis, &holder.ws_url(), "running-on").await;
    let submitted = submit_in_background(&origin, zh_en_job("runs-on", 60_000));
    let assign = next_assign(&mut node).await;
    accepted_and_read(&mut node, &assign).await;
    let stopped = tokio::spawn(holder.stop());
    let (messages, code) = node.messages_until_closed().await;
    assert_eq!(code, 1001, "the stop closes the node's socket");
    assert_eq!(cancelled_attempts(&messages), [], "{messages:?}");
    stopped.await.unwrap();
    let (mut node, _) = TestNode::register(&origin.ws_url(), register).await;
    node.send(&done(&assign)).await;
    let (status, answer) = submitted.await.unwrap();
    assert_eq!(
        (status, &answer["status"], answer["attempts"].as_u64()),
        (200, &json!("completed"), Some(1)),
        "{answer}"
    );
    node.close().await;
    origin.stop().await;
}

/// A job whose node, accepted and moving from a stopped holder, never
/// comes back moves on a lease later, to a node with room, rather than
/// waiting for nobody until its deadline.
#[tokio::test]
async fn a_forwarded_job_whose_node_does_not_come_back_moves_on() {
    let redis = lingua_tests::redis().await;
    let holder = TestCoordinator::start(&redis, quiet_node_config()).await;
    let config = lingua_coordinator::config::Config {
        heartbeat_interval: Duration::from_millis(200),
        max_attempts: 2,
        ..test_config()
    };
    let origin = TestCoordinator::start(&redis, config).await;
    let (mut node, _) = offering_one(&redis, &holder.ws_url(), "gone-for-good").await;
    let submitted = submit_in_background(&origin, zh_en_job("left-behind", 60_000));
    let assign = next_assign(&mut node).await;
    accepted_and_read(&mut node, &assign).await;
    // Room elsewhere, for the next attempt.
    let agent = TestAgent::start(agent_config("takes-over", &origin.ws_url(), 50));
    agent.registered(1).await;
    holder.stop().await;
    drop(node);
    let answered = tokio::time::timeout(Duration::from_secs(30), submitted);
    let (status, answer) = answered
        .await
        .expect("moved on before its deadline")
        .unwrap();
    assert_eq!(
        (
            status,
            &answer["status"],
            &answer["node_id"],
            answer["attempts"].as_u64()
        ),
        (200, &json!("completed"), &json!("takes-over"), Some(2)),
        "{answer}"
    );
    agent.stop().await.unwrap();
    origin.stop().await;
}

/// A job whose node, accepted and moving from a stopped holder, came back
/// to another instance and went away from there moves on: that instance,
/// told of the attempt, says so. Before, it knew nothing of the attempt,
/// said nothing, and the job waited for nobody until its deadline.
#[tokio::test]
async fn a_forwarded_job_whose_node_moved_and_then_went_away_moves_on() {
    let redis = lingua_tests::redis().await;
    let holder = TestCoordinator::start(&redis, quiet_node_config()).await;
    let next_holder = TestCoordinator::start(&redis, quiet_node_config()).await;
    let (status, health) = next_holder.get("/healthz").await;
    assert_eq!(status, 200, "{health}");
    let next_inbox = InstanceKeys::new(health["instance"].as_str().unwrap()).inbox;
    // Its lease (1.5 s) is how long the node has to come back elsewhere.
    let config = lingua_coordinator::config::Config {
        heartbeat_interval: Duration::from_millis(500),
        max_attempts: 2,
        ..test_config()
    };
    let origin = TestCoordinator::start(&redis, config).await;
    let (mut node, register) = offering_one(&redis, &holder.ws_url(), "moves-twice").await;
    let conn = lingua_tests::connect(&redis).await;
    let submitted = submit_in_background(&origin, zh_en_job("moved-then-gone", 60_000));
    let assign = next_assign(&mut node).await;
    accepted_and_read(&mut node, &assign).await;
    let agent = TestAgent::start(agent_config("takes-over-later", &origin.ws_url(), 50));
    agent.registered(1).await;
    let stopped = tokio::spawn(holder.stop());
    assert_eq!(node.closed().await, 1001);
    let (node, _) = TestNode::register(&next_holder.ws_url(), register).await;
    stopped.await.unwrap();
    eventually(
        "the instance it came back to to be told of the attempt",
        || async { (entries_added(&conn, &next_inbox).await >= 1).then_some(()) },
    )
    .await;
    node.close().await;
    let answered = tokio::time::timeout(Duration::from_secs(30), submitted);
    let (status, answer) = answered
        .await
        .expect("moved on before its deadline")
        .unwrap();
    assert_eq!(
        (status, &answer["status"], &answer["node_id"]),
        (200, &json!("completed"), &json!("takes-over-later")),
        "{answer}"
    );
    agent.stop().await.unwrap();
    origin.stop().await;
    next_holder.stop().await;
}

/// An assignment forwarded to an instance that does not hold the node
/// (its record names an instance it has left) never reached the node:
/// it uses up no attempt, and the job runs on the next node with room.
/// Before, that instance answered `lost`, which counted: with one
/// attempt, the job failed `node_lost`.
#[tokio::test]
async fn an_assignment_its_holder_could_not_deliver_uses_up_no_attempt() {
    let redis = lingua_tests::redis().await;
    let config = lingua_coordinator::config::Config {
        max_attempts: 1,
        ..quiet_node_config()
    };
    let origin = TestCoordinator::start(&redis, config).await;
    let holder = TestCoordinator::start(&redis, quiet_node_config()).await;
    let stale = TestCoordinator::start(&redis, quiet_node_config()).await;
    let (status, health) = stale.get("/healthz").await;
    assert_eq!(status, 200, "{health}");
    let stale_instance = health["instance"].as_str().unwrap().to_owned();
    let stale_inbox = InstanceKeys::new(&stale_instance).inbox;
    let mut register = registration("misplaced", &["zh"], &["en"]);
    register.capacity = translate_room(1);
    let (node, _) = TestNode::register(&holder.ws_url(), register).await;
    let mut register = registration("later", &["zh"], &["en"]);
    register.capacity = translate_room(0);
    let (mut later, _) = TestNode::register(&origin.ws_url(), register).await;
    let conn = lingua_tests::connect(&redis).await;
    offered_translations(&conn, "misplaced").await;
    // Its record names an instance that does not hold it.
    let () = redis::cmd("HSET")
        .arg(NodeKeys::new(&lingua_shared::NodeId::new("misplaced").unwrap()).hash)
        .arg("coordinator")
        .arg(&stale_instance)
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    let submitted = submit_in_background(&origin, zh_en_job("undelivered", 20_000));
    eventually("the assignment to reach the instance named", || async {
        (entries_added(&conn, &stale_inbox).await >= 1).then_some(())
    })
    .await;
    later.send(&Message::Capacity(translate_room(1))).await;
    let assign = next_assign(&mut later).await;
    assert_eq!(assign.job_id.as_str(), "undelivered");
    accepted_then_done(&mut later, assign).await;
    let (status, answer) = submitted.await.unwrap();
    assert_eq!(
        (status, &answer["status"], &answer["node_id"]),
        (200, &json!("completed"), &json!("later")),
        "{answer}"
    );
    node.close().await;
    later.close().await;
    for coordinator in [origin, holder, stale] {
        coordinator.stop().await;
    }
}

/// A coordinator stopping with no other instance to hand its jobs to
/// leaves an attempt its node has not answered to the node: no cancel
/// goes before the close, and the node's result, sent once it is back,
/// completes the job. Cancelled, it would have waited for nobody until
/// its deadline.
#[tokio::test]
async fn a_lone_stopping_coordinator_leaves_an_unanswered_attempt_to_its_node() {
    let redis = lingua_tests::redis().await;
    let config = lingua_coordinator::config::Config {
        accept_timeout: Duration::from_secs(30),
        ..quiet_node_config()
    };
    let coordinator = TestCoordinator::start(&redis, config.clone()).await;
    let addr = coordinator.addr;
    let (mut node, register) = offering_one(&redis, &coordinator.ws_url(), "alone").await;
    let _submitted = submit_in_background(&coordinator, zh_en_job("left-to-run", 60_000));
    let assign = next_assign(&mut node).await;
    let stopped = tokio::spawn(coordinator.stop());
    let (messages, code) = node.messages_until_closed().await;
    assert_eq!(code, 1001, "the stop closes the node's socket");
    assert_eq!(cancelled_attempts(&messages), [], "{messages:?}");
    stopped.await.unwrap();
    let coordinator = TestCoordinator::start_on(&redis, config, None, addr).await;
    let node = completes_through(&coordinator, register, &assign).await;
    node.close().await;
    coordinator.stop().await;
}

/// The attempts a list of messages cancels.
fn cancelled_attempts(messages: &[Message]) -> Vec<(String, u32)> {
    messages
        .iter()
        .filter_map(|message| match message {
            Message::JobCancel(cancel) => Some((cancel.job_id.to_string(), cancel.attempt)),
            _ => None,
        })
        .collect()
}

/// An instance that stops while a node it holds has not answered an
/// assignment forwarded to it by another instance cancels the assignment
/// before it closes the node's socket, and the dispatching instance moves
/// the job on without counting the attempt (one is all it has). Before,
/// the node kept the attempt across its reconnection and could run it
/// beside the job's next attempt; and the holder's stop used up an
/// attempt: with one, the job failed `node_lost`.
#[tokio::test]
async fn a_stopping_instance_cancels_an_unanswered_forwarded_assignment_before_closing() {
    let redis = lingua_tests::redis().await;
    let holder = TestCoordinator::start(&redis, quiet_node_config()).await;
    let config = lingua_coordinator::config::Config {
        accept_timeout: Duration::from_secs(30),
        max_attempts: 1,
        ..quiet_node_config()
    };
    let origin = TestCoordinator::start(&redis, config).await;
    let (mut node, register) = offering_one(&redis, &holder.ws_url(), "forwarded-to").await;
    let submitted = submit_in_background(&origin, zh_en_job("forwarded", 60_000));
    let first = next_assign(&mut node).await;
    let stopped = tokio::spawn(holder.stop());
    let (messages, code) = node.messages_until_closed().await;
    assert_eq!(code, 1001, "the stop closes the node's socket");
    assert_eq!(
        cancelled_attempts(&messages),
        [("forwarded".to_owned(), first.attempt)],
        "the unanswered attempt is cancelled before the close: {messages:?}"
    );
    stopped.await.unwrap();
    let (mut node, _) = TestNode::register(&origin.ws_url(), register).await;
    let assign = next_assign(&mut node).await;
    assert_eq!(assign.job_id.as_str(), "forwarded");
    assert!(assign.attempt > first.attempt, "attempt {}", assign.attempt);
    accepted_then_done(&mut node, assign).await;
    let (status, answer) = submitted.await.unwrap();
    assert_eq!(
        (status, &answer["status"]),
        (200, &json!("completed")),
        "{answer}"
    );
    node.close().await;
    origin.stop().await;
}

/// A job still queued whose coordinator instance died is asked to be
/// taken over once, however often it is read, and never by a reader who
/// may not see it (who sees nothing). Before, every read asked again, and
/// another client's read asked too.
#[tokio::test]
async fn an_abandoned_job_is_asked_for_once_and_only_by_a_reader_who_may_see_it() {
    const ADMIN: &str = "the-admin-of-the-abandoned-job";
    const OWNER: &str = "the-owner-of-the-abandoned-job";
    const OTHER: &str = "a-client-who-may-not-see-it";
    let redis = lingua_tests::redis().await;
    let config = lingua_coordinator::config::Config {
        api_tokens: vec![ADMIN.into()],
        client_tokens: vec![OWNER.into(), OTHER.into()],
        ..quiet_node_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    // A node without room: the job, once taken over, waits for room.
    let mut register = registration("full", &["zh"], &["en"]);
    register.capacity = translate_room(0);
    let (node, _) = TestNode::register(&coordinator.ws_url(), register).await;
    let conn = lingua_tests::connect(&redis).await;
    let instance = eventually("the coordinator to announce itself", || {
        let mut conn = conn.clone();
        async move {
            let instances: Vec<String> = conn.zrange(keys::ALL_INSTANCES, 0, -1).await.unwrap();
            instances.into_iter().next()
        }
    })
    .await;
    let inbox = InstanceKeys::new(&instance).inbox;
    let asked = || entries_added(&conn, &inbox);
    // Recorded by an instance that is gone, waiting for room, for OWNER.
    let tokens = ApiTokens {
        admin: Tokens::new(&[]),
        client: Tokens::new(&[OWNER.into()]),
    };
    let owner = tokens
        .caller(Some(&format!("Bearer {OWNER}")))
        .unwrap()
        .owner;
    let request = format!(
        r#"{{"kind":"translate","owner":"{owner}","pair":"zh:en","payload":null,"session_id":null,"timeout_ms":60000}}"#
    );
    left_queued_by_the_dead(&redis, ("abandoned", &request), Duration::from_secs(60)).await;
    let client = reqwest::Client::new();
    let read = |token: &'static str| {
        let request = client
            .get(coordinator.url("/v1/jobs/abandoned"))
            .bearer_auth(token);
        async move {
            let answer = request.send().await.unwrap();
            (
                answer.status().as_u16(),
                answer.json::<Value>().await.unwrap(),
            )
        }
    };
    assert_eq!(read(OTHER).await.0, 404, "another client's job");
    assert_eq!(asked().await, 0, "another client's read asks nothing");
    let reads = join_all((0..16).map(|_| read(OWNER))).await;
    assert!(reads.iter().all(|(status, _)| *status == 200), "{reads:?}");
    eventually("the job to be taken over", || async {
        let adopted = coordinator
            .metric(Some(ADMIN), "lingua_jobs_adopted_total")
            .await;
        (adopted == Some(1.0)).then_some(())
    })
    .await;
    let (status, view) = read(OWNER).await;
    assert_eq!((status, &view["status"]), (200, &json!("queued")), "{view}");
    assert_eq!(asked().await, 1, "seventeen reads ask once");
    node.close().await;
    coordinator.stop().await;
}

#[tokio::test]
async fn a_node_that_cannot_run_a_job_at_all_uses_up_an_attempt() {
    let redis = lingua_tests::redis().await;
    let (coordinator, mut node, submitted) =
        one_attempt_and_a_raw_node(&redis, "misfit", test_config()).await;
    let assign = next_assign(&mut node).await;
    node.send(&Message::JobReject(JobReject {
        job_id: assign.job_id,
        attempt: assign.attempt,
        reason: RejectReason::UnsupportedPair,
        message: "zh:en is not configured here".into(),
    }))
    .await;
    let answer = submitted.await.unwrap();
    assert_eq!(answer["status"], "failed", "{answer}");
    assert_eq!(answer["attempts"], 1, "{answer}");
    assert_eq!(
        answer["error"]["message"],
        "misfit refused: zh:en is not configured here"
    );
    node.close().await;
    coordinator.stop().await;
}

/// Runs each test on one Redis (module `single`) and on a Redis Cluster
/// (module `cluster`).
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod single {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(lingua_tests::redis().await).await;
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(super::RedisCluster::start().await.expect("a test Redis Cluster")).await;
                }
            )*
        }
    };
}

on_both_backends!(
    free_slot_hints_come_back_between_heartbeats,
    recorded_heartbeats_keep_a_node_alive_for_many_leases,
    jobs_run_only_on_nodes_serving_their_pair,
    a_burst_spreads_by_capacity_and_never_exceeds_an_arbiter,
    a_mixed_burst_into_one_node_waits_for_memory_instead_of_being_refused,
    the_same_id_submitted_five_times_concurrently_runs_once,
    a_job_costs_one_pick_and_one_result,
    a_refused_id_gives_back_its_pick,
    failures_get_their_documented_codes,
    bad_requests_get_400s_and_the_service_keeps_serving,
    the_api_token_guards_jobs,
    jobs_of_a_killed_agent_complete_elsewhere_once
);
