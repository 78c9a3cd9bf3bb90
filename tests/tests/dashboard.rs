//! The dashboard in a real headless browser (Debian's `chromium`, driven
//! through `chromedriver` by the fantoccini WebDriver client): a real
//! coordinator and two real agent processes with simulated GPUs. The test
//! logs in, checks that nodes, GPUs, pools and a failed job are shown,
//! kills an agent and watches its row turn offline without a reload, then
//! drains the other from the page. It saves a screenshot as an artifact
//! (`target/tmp/dashboard.png`).

use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use lingua_coordinator::config::Config;
use lingua_tests::fleet::{free_local_addr, spawn_agent};
use lingua_tests::{TestCoordinator, agent_toml, eventually, test_config};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

const ADMIN: &str = "a-dashboard-admin-token";
/// How long the page may take to show a change: a bound on a failing
/// test, not a measurement (one update a second, a heartbeat of 200 ms).
const PAGE_PATIENCE: Duration = Duration::from_secs(20);

/// `chromedriver` and a browser session through it.
struct Browser {
    client: Client,
    _driver: Child,
}

impl Browser {
    async fn start() -> Self {
        let addr = free_local_addr();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={}", addr.port()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect(
                "chromedriver runs: install Debian's chromium and chromium-driver (.ci/run does)",
            );
        let capabilities = json!({"goog:chromeOptions": {"args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--window-size=1280,1100",
        ]}});
        let Value::Object(capabilities) = capabilities else {
            unreachable!("a JSON object")
        };
        let url = format!("http://{addr}");
        let client = eventually("chromedriver to start a browser session", || {
            let mut builder = ClientBuilder::new(HttpConnector::new());
            builder.capabilities(capabilities.clone());
            let url = url.clone();
            async move { builder.connect(&url).await.ok() }
        })
        .await;
        Self {
            client,
            _driver: driver,
        }
    }

    async fn wait_for(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(PAGE_PATIENCE)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("the page shows {css}: {e}"))
    }

    async fn text(&self, css: &str) -> String {
        self.wait_for(css).await.text().await.unwrap()
    }

    async fn type_into(&self, css: &str, text: &str) {
        self.wait_for(css).await.send_keys(text).await.unwrap();
    }

    async fn click(&self, css: &str) {
        self.wait_for(css).await.click().await.unwrap();
    }

    /// Waits until the element with `id` shows `what`.
    async fn shows(&self, id: &str, what: &str) {
        eventually(&format!("#{id} to show {what}"), || async {
            let element = self.client.find(Locator::Id(id)).await.ok()?;
            element.text().await.ok()?.contains(what).then_some(())
        })
        .await;
    }
}

/// An agent process with one simulated GPU of `memory_mb`.
fn agent(dir: &std::path::Path, id: &str, ws: &str, memory_mb: u64) -> Child {
    let rest = format!(
        "[gpu]\nbackend = \"simulated\"\n[gpu.simulated]\ncount = 1\nmemory_mb = {memory_mb}\n\
         [jobs.translate]\nvram_mb = 2000\nmax_concurrent = 4\n\
         [jobs.translate.simulated]\nduration_ms = 5\n"
    );
    spawn_agent(&dir.join(format!("{id}.toml")), &agent_toml(id, ws, &rest))
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn admin_get(http: &reqwest::Client, url: String) -> Value {
    let response = http.get(url).bearer_auth(ADMIN).send().await.unwrap();
    response.json().await.unwrap_or(Value::Null)
}

#[tokio::test]
async fn the_dashboard_shows_the_fleet_live_and_drains_a_node() {
    let redis = lingua_tests::redis().await;
    let config = Config {
        api_tokens: vec![ADMIN.into()],
        ..test_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    let dir = tempfile::tempdir().unwrap();
    let _keep = agent(dir.path(), "dash-a", &coordinator.ws_url(), 24_576);
    let mut victim = agent(dir.path(), "dash-b", &coordinator.ws_url(), 81_920);
    let http = reqwest::Client::new();
    eventually("both agents to register", || async {
        let nodes = admin_get(&http, coordinator.url("/v1/nodes")).await;
        let ready = nodes["nodes"]
            .as_array()?
            .iter()
            .filter(|n| n["state"] == "ready")
            .count();
        (ready == 2).then_some(())
    })
    .await;
    let unserved = json!({"id": "dash-unserved", "kind": "translate", "src_lang": "de",
        "tgt_lang": "fr", "payload": {}});
    let response = http
        .post(coordinator.url("/v1/jobs"))
        .bearer_auth(ADMIN)
        .json(&unserved)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        503,
        "a job nobody serves fails: no_nodes"
    );

    let browser = Browser::start().await;
    let page = &browser.client;
    page.goto(&coordinator.url("/ui")).await.unwrap();

    // The login form; a wrong token is refused with a message.
    browser
        .type_into("#login:not([hidden]) #token", "wrong")
        .await;
    browser.click("#login-form button").await;
    browser.shows("login-error", "refused").await;
    browser.type_into("#token", ADMIN).await;
    browser.click("#login-form button").await;

    // Nodes, their GPUs, the pools and the failed job.
    browser
        .wait_for(r#"tr[data-node="dash-a"][data-state="ready"]"#)
        .await;
    browser
        .wait_for(r#"tr[data-node="dash-b"][data-state="ready"]"#)
        .await;
    let gpus = page
        .find_all(Locator::Css("#nodes [data-gpu]"))
        .await
        .unwrap();
    assert_eq!(gpus.len(), 2, "one simulated GPU per node");
    let b_gpu = browser.text(r#"tr[data-node="dash-b"] [data-gpu]"#).await;
    assert!(
        b_gpu.contains("80 GiB") && b_gpu.contains("healthy"),
        "{b_gpu}"
    );
    let pair = browser.text(r#"#pairs tr[data-pair="zh:en"]"#).await;
    assert!(pair.contains("dash-a") && pair.contains("dash-b"), "{pair}");
    let failure = browser
        .text(r#"#failures tr[data-job="dash-unserved"]"#)
        .await;
    assert!(failure.contains("no_nodes"), "{failure}");
    let summary = browser.text("#summary").await;
    assert!(summary.contains("2 ready"), "{summary}");
    let screenshot = page.screenshot().await.unwrap();
    let artifact = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&artifact, &screenshot).unwrap();
    println!("dashboard screenshot: {}", artifact.display());

    // A job looked up by id.
    browser.type_into("#job-id", "dash-unserved").await;
    browser.click("#job-form button").await;
    browser.shows("job", "\"no_nodes\"").await;

    // On a phone's width nothing but the tables' own boxes scrolls sideways.
    page.set_window_size(390, 844).await.unwrap();
    let fits = page
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(fits, json!(true), "the page fits a phone's width");
    page.set_window_size(1280, 1100).await.unwrap();

    // A killed agent turns offline on the same page, without a reload.
    page.execute("window.sameDocument = true;", vec![])
        .await
        .unwrap();
    victim.kill().await.unwrap();
    browser
        .wait_for(r#"tr[data-node="dash-b"][data-state="offline"]"#)
        .await;
    let same = page
        .execute("return window.sameDocument === true;", vec![])
        .await
        .unwrap();
    assert_eq!(same, json!(true), "the page was not reloaded");

    // Drain from the page: a click asks, a second confirms.
    browser.click(r#"button[data-drain="dash-a"]"#).await;
    browser.click(r#"button.danger[data-drain="dash-a"]"#).await;
    eventually("the coordinator to report dash-a draining", || async {
        let node = admin_get(&http, coordinator.url("/v1/nodes/dash-a")).await;
        (node["state"] == "draining").then_some(())
    })
    .await;
    browser
        .wait_for(r#"tr[data-node="dash-a"][data-state="draining"]"#)
        .await;
    browser.shows("notice", "dash-a is draining").await;

    browser.client.close().await.unwrap();
    coordinator.stop().await;
}
