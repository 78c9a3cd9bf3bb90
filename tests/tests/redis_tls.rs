//! Redis over TLS (`rediss://`, `[redis] ca_file`): a local `redis-server`
//! that speaks only TLS, with a certificate the test generates, carries a
//! whole job, and so does a three-master Redis Cluster over TLS; the
//! coordinator binary starts on it; a bad `ca_file` fails `check-config`;
//! a certificate nobody vouched for is refused at start.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use lingua_coordinator::metrics::Metrics;
use lingua_coordinator::store::Store;
use lingua_tests::fleet::{CoordinatorProcess, free_local_addr, workspace_binary};
use lingua_tests::{RedisBackend, TestAgent, TestCoordinator, agent_config, test_config};
use serde_json::json;
use tokio::process::{Child, Command};

/// A certificate for 127.0.0.1 and its key, written under `dir`.
fn certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert, key) = (dir.join("redis.crt"), dir.join("redis.key"));
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// A `redis-server` on TLS `port` only (no plain port), with `extra` flags.
fn tls_server(dir: &Path, (cert, key): (&Path, &Path), port: u16, extra: &[&str]) -> Child {
    Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--tls-auth-clients", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--tls-cert-file")
        .arg(cert)
        .arg("--tls-key-file")
        .arg(key)
        .arg("--tls-ca-cert-file")
        .arg(cert)
        .args(extra)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server runs (.ci/run installs it)")
}

/// A `redis-server` listening on TLS only, and the CA that vouches for it.
struct TlsRedis {
    url: String,
    ca_file: PathBuf,
    _server: Child,
    _dir: tempfile::TempDir,
}

impl TlsRedis {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = certificate(dir.path());
        let addr = free_local_addr();
        let server = tls_server(dir.path(), (&cert, &key), addr.port(), &[]);
        let redis = Self {
            url: format!("rediss://127.0.0.1:{}", addr.port()),
            ca_file: cert,
            _server: server,
            _dir: dir,
        };
        let metrics = Arc::new(Metrics::default());
        lingua_tests::eventually("the TLS redis-server to answer", || {
            let metrics = metrics.clone();
            async {
                Store::connect_tls(&redis.url, Some(&redis.ca_file), metrics)
                    .await
                    .ok()
            }
        })
        .await;
        redis
    }
}

impl RedisBackend for TlsRedis {
    async fn store(&self, metrics: Arc<Metrics>) -> Store {
        Store::connect_tls(&self.url, Some(&self.ca_file), metrics)
            .await
            .expect("the TLS redis answers")
    }

    fn coordinator_args(&self) -> Vec<String> {
        vec!["--redis-url".into(), self.url.clone()]
    }
}

/// A coordinator on `redis` runs `jobs` jobs on a node, all completed.
async fn jobs_complete_on(redis: &impl RedisBackend, node: &str, jobs: usize) {
    let coordinator = TestCoordinator::start(redis, test_config()).await;
    let agent = TestAgent::start(agent_config(node, &coordinator.ws_url(), 5));
    agent.registered(1).await;
    for i in 0..jobs {
        let job = json!({"id": format!("{node}-{i}"), "kind": "translate",
            "src_lang": "zh", "tgt_lang": "en", "payload": {}});
        let answer: serde_json::Value = reqwest::Client::new()
            .post(coordinator.url("/v1/jobs"))
            .json(&job)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["status"], "completed", "{answer}");
        assert_eq!(answer["node_id"], node);
    }
    agent.stop().await.unwrap();
    coordinator.stop().await;
}

#[tokio::test]
async fn a_job_goes_through_a_coordinator_on_redis_over_tls() {
    jobs_complete_on(&TlsRedis::start().await, "tls-redis-1", 1).await;
}

async fn run(args: &[&str]) -> (i32, String) {
    let output = Command::new(workspace_binary("lingua-coordinator").unwrap())
        .args(args)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code().unwrap_or(-1), stderr)
}

fn config_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn the_binary_trusts_ca_file_and_refuses_what_it_cannot_check() {
    let redis = TlsRedis::start().await;
    let dir = tempfile::tempdir().unwrap();
    let trusted = format!("[redis]\nca_file = \"{}\"\n", redis.ca_file.display());
    let config = config_file(dir.path(), "trusted.toml", &trusted);
    let process = CoordinatorProcess::start(dir.path(), &redis, free_local_addr(), &trusted)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let health = reqwest::get(process.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    process.kill().await;

    // Without the CA: the system's roots do not vouch for the test's
    // certificate, and the coordinator says so at start.
    let (code, stderr) = run(&["--listen", "127.0.0.1:0", "--redis-url", &redis.url]).await;
    assert_eq!(code, 69, "{stderr}");
    assert!(stderr.contains("cannot reach Redis"), "{stderr}");

    // A CA file that is not one fails check-config, naming the key.
    let not_pem = dir.path().join("not-a-ca.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let bad = config_file(
        dir.path(),
        "bad.toml",
        &format!(
            "[redis]\nurl = \"{}\"\nca_file = \"{}\"\n",
            redis.url,
            not_pem.display()
        ),
    );
    let (code, stderr) = run(&["check-config", "--config", &bad]).await;
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("redis.ca_file") && stderr.contains("no PEM certificate"),
        "{stderr}"
    );
    let missing = config_file(
        dir.path(),
        "missing.toml",
        "[redis]\nurl = \"rediss://127.0.0.1:1\"\nca_file = \"/nonexistent/ca.pem\"\n",
    );
    let (code, stderr) = run(&["check-config", "--config", &missing]).await;
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("cannot read /nonexistent/ca.pem"),
        "{stderr}"
    );
    let (code, stderr) = run(&[
        "--redis-url",
        "redis://127.0.0.1:1",
        "check-config",
        "--config",
        &config,
    ])
    .await;
    assert_eq!(code, 64, "a CA for a plain redis:// URL: {stderr}");
    assert!(stderr.contains("rediss://"), "{stderr}");
}

/// Three TLS-only masters, joined into a cluster over TLS.
struct TlsCluster {
    seeds: Vec<String>,
    ca_file: PathBuf,
    _servers: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl TlsCluster {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = certificate(dir.path());
        let ports = lingua_tests::cluster::cluster_ports(3);
        let servers = ports
            .iter()
            .map(|port| {
                let config = format!("nodes-{port}.conf");
                let extra = [
                    "--cluster-enabled",
                    "yes",
                    "--tls-cluster",
                    "yes",
                    "--cluster-config-file",
                    &config,
                ];
                tls_server(dir.path(), (&cert, &key), *port, &extra)
            })
            .collect();
        let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        lingua_tests::eventually("the TLS cluster to form", || async {
            let created = Command::new("redis-cli")
                .args(["--tls", "--cacert"])
                .arg(&cert)
                .args(["--cluster", "create"])
                .args(&addresses)
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .output()
                .await
                .expect("redis-cli runs (installed with redis-server)");
            created.status.success().then_some(())
        })
        .await;
        let cluster = Self {
            seeds: ports
                .iter()
                .map(|p| format!("rediss://127.0.0.1:{p}"))
                .collect(),
            ca_file: cert,
            _servers: servers,
            _dir: dir,
        };
        let metrics = Arc::new(Metrics::default());
        lingua_tests::eventually("the TLS cluster to take a script", || {
            let metrics = metrics.clone();
            async {
                let store = Store::connect_cluster(&cluster.seeds, Some(&cluster.ca_file), metrics)
                    .await
                    .ok()?;
                // A write in every slot range: the cluster serves them all.
                for node in ["a", "b", "c", "d", "e", "f"] {
                    let id = lingua_shared::NodeId::new(node).unwrap();
                    store.node(&id).await.ok()?;
                }
                Some(())
            }
        })
        .await;
        cluster
    }
}

impl RedisBackend for TlsCluster {
    async fn store(&self, metrics: Arc<Metrics>) -> Store {
        Store::connect_cluster(&self.seeds, Some(&self.ca_file), metrics)
            .await
            .expect("the TLS cluster answers")
    }

    fn coordinator_args(&self) -> Vec<String> {
        vec!["--redis-cluster".into(), self.seeds.join(",")]
    }
}

#[tokio::test]
async fn jobs_go_through_a_coordinator_on_a_redis_cluster_over_tls() {
    jobs_complete_on(&TlsCluster::start().await, "tls-cluster-1", 4).await;
}
