//! Both binaries' `/metrics` as Prometheus tooling reads them:
//! `promtool check metrics` passes on the live endpoints of a real
//! coordinator and a real agent that ran jobs, OpenMetrics is served to a
//! scraper that asks for it, and the coordinator's metrics stay served,
//! saying so, while Redis is down.

use std::process::Stdio;

use lingua_tests::fleet::{free_local_addr, spawn_agent};
use lingua_tests::{TestCoordinator, agent_toml, eventually, test_config};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// `promtool check metrics` on `text`: its exit code and what it said.
async fn promtool(text: &str) -> (i32, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs: install Debian's prometheus package (.ci/run does)");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    let said = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), said)
}

/// The metric names (`lingua_…`, `process_…`) in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for (start, _) in text
        .match_indices("lingua_")
        .chain(text.match_indices("process_"))
    {
        let name: String = text[start..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        names.insert(name.trim_end_matches('_').to_owned());
    }
    names
}

async fn scrape(http: &reqwest::Client, url: &str) -> (String, String) {
    let response = http.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    (content_type, response.text().await.unwrap())
}

#[tokio::test]
async fn promtool_accepts_both_live_endpoints() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let metrics_addr = free_local_addr();
    let rest = format!(
        "metrics_listen = \"{metrics_addr}\"\n[gpu]\nbackend = \"simulated\"\n\
         [gpu.simulated]\ncount = 2\nmemory_mb = 16000\n\
         [jobs.translate]\nvram_mb = 2000\nmax_concurrent = 4\n\
         [jobs.translate.simulated]\nduration_ms = 200\n"
    );
    let config = agent_toml("prom-1", &coordinator.ws_url(), &rest);
    let _agent = spawn_agent(&dir.path().join("agent.toml"), &config).unwrap();
    let http = reqwest::Client::new();
    eventually("the agent to register", || async {
        let (_, nodes) = coordinator.get("/v1/nodes").await;
        (nodes["nodes"][0]["state"] == "ready").then_some(())
    })
    .await;
    // Eight at once for four slots: four wait in the admission queue.
    let answers = futures_util::future::join_all((0..8).map(|i| {
        let job = json!({"id": format!("prom-{i}"), "kind": "translate", "src_lang": "zh",
            "tgt_lang": "en", "payload": {}});
        let request = http.post(coordinator.url("/v1/jobs")).json(&job).send();
        async move {
            let response = request.await.unwrap();
            let timing = response.headers()["server-timing"]
                .to_str()
                .unwrap()
                .to_owned();
            (response.json::<serde_json::Value>().await.unwrap(), timing)
        }
    }))
    .await;
    for (answer, timing) in answers {
        assert_eq!(answer["status"], "completed", "{answer}");
        // Where its time went, stage by stage; the 200 ms run among them.
        let stages: Vec<(&str, f64)> = timing
            .split(", ")
            .map(|stage| {
                let (name, ms) = stage.split_once(";dur=").unwrap();
                (name, ms.parse().unwrap())
            })
            .collect();
        let names: Vec<&str> = stages.iter().map(|(name, _)| *name).collect();
        assert_eq!(
            names,
            [
                "start", "queue", "pick", "record", "accept", "run", "answer"
            ],
            "{timing}"
        );
        // The agent may hold its accept a few ms for the result: the
        // 200 ms lie in accept and run together.
        assert!(stages[4].1 + stages[5].1 >= 200.0, "{timing}");
    }

    let agent_url = format!("http://{metrics_addr}/metrics");
    for url in [coordinator.url("/metrics"), agent_url.clone()] {
        let (content_type, text) = scrape(&http, &url).await;
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        let (code, said) = promtool(&text).await;
        assert_eq!((code, said.as_str()), (0, ""), "{url}:\n{text}");
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(text.contains("process_cpu_seconds_total "), "{text}");
    }
    let (_, agent) = scrape(&http, &agent_url).await;
    for series in [
        r#"lingua_agent_jobs_total{kind="translate",outcome="completed",device="gpu"} 8"#,
        r#"lingua_agent_job_duration_seconds_count{kind="translate",outcome="completed",device="gpu"} 8"#,
        r#"lingua_agent_build_info{version=""#,
        r#"lingua_agent_gpu_temperature_celsius{gpu="1",UUID="GPU-simulated-1",model_name="Simulated GPU"}"#,
        r#"lingua_agent_gpu_memory_total_bytes{gpu="0",UUID="GPU-simulated-0",model_name="Simulated GPU"} 16777216000"#,
    ] {
        assert!(agent.contains(series), "{series} missing from:\n{agent}");
    }
    let (_, coordinator_text) = scrape(&http, &coordinator.url("/metrics")).await;
    for series in [
        r#"lingua_job_duration_seconds_count{kind="translate"} 8"#,
        r#"lingua_job_stage_seconds_count{stage="run"} 8"#,
        r#"lingua_job_stage_seconds_count{stage="start"} 8"#,
        "lingua_redis_up 1",
        r#"lingua_build_info{version=""#,
    ] {
        assert!(
            coordinator_text.contains(series),
            "{series} missing from:\n{coordinator_text}"
        );
    }

    // Every series the shipped alert rules and dashboard use is exported.
    let both = format!("{agent}{coordinator_text}");
    let monitoring = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/monitoring");
    for file in ["alerts.yml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(format!("{monitoring}/{file}")).unwrap();
        for name in metric_names(&text) {
            let family = name.strip_suffix("_bucket").unwrap_or(&name);
            assert!(
                both.contains(family),
                "{file} uses {name}, which neither binary exports"
            );
        }
    }

    let openmetrics = http
        .get(coordinator.url("/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )
        .send()
        .await
        .unwrap();
    let content_type = openmetrics.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(openmetrics.text().await.unwrap().ends_with("# EOF\n"));
    coordinator.stop().await;
}

#[tokio::test]
async fn metrics_are_served_while_redis_is_down_and_say_so() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    eventually("redis to be seen up", || async {
        (coordinator.metric(None, "lingua_redis_up").await == Some(1.0)).then_some(())
    })
    .await;
    redis.stop().await;
    eventually("redis to be seen down", || async {
        (coordinator.metric(None, "lingua_redis_up").await == Some(0.0)).then_some(())
    })
    .await;
    let text = reqwest::get(coordinator.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("lingua_nodes_connected 0"),
        "the rest is served:\n{text}"
    );
    coordinator.stop().await;
}

#[tokio::test]
async fn kinds_that_no_node_serves_add_no_series() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    for n in 0..3 {
        let (_, answer) = coordinator
            .submit(json!({"kind": format!("made-up-{n}"), "src_lang": "zh", "tgt_lang": "en", "payload": {}}))
            .await;
        assert_eq!(answer["error"]["code"], "no_nodes", "{answer}");
    }
    // Counted, but a client's kinds do not become series: any number of
    // them would otherwise grow `/metrics` without bound.
    assert_eq!(
        coordinator
            .metric(None, r#"lingua_jobs_total{status="no_nodes"}"#)
            .await,
        Some(3.0)
    );
    let (_, text) = scrape(&reqwest::Client::new(), &coordinator.url("/metrics")).await;
    assert!(!text.contains("made-up"), "{text}");
    coordinator.stop().await;
}
