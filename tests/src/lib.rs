//! Harness for the Lingua fleet's cross-process tests.
//!
//! Every test gets its own real `redis-server` on a unix socket in a
//! temporary directory (never a fixed port), started by [`redis`] and
//! stopped when the returned guard drops, also when the test panics and
//! also when the test process is killed (see
//! [`lingua_coordinator::private_redis`]). There are no mocks of Redis.
//!
//! [`TestCoordinator`] runs the real coordinator on `127.0.0.1:0`;
//! [`TestNode`] is a real WebSocket client speaking the node protocol.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod fleet;
pub mod signal;
pub mod speech;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use lingua_agent::agent::{Agent, AgentError, Control, Handles};
use lingua_agent::config::AgentConfig;
use lingua_coordinator::config::Config;
use lingua_coordinator::metrics::Metrics;
use lingua_coordinator::private_redis::{PrivateRedis, PrivateRedisError};
use lingua_coordinator::server;
use lingua_coordinator::store::Store;
use lingua_shared::protocol::{
    Capabilities, CapacityReport, Register, RegisterAck, Secret, VersionRange,
};
use lingua_shared::{JobKind, Message, NodeId, decode, encode};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// How long a harness helper waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Starts a fresh `redis-server` for one test and waits until it answers.
///
/// # Panics
/// When `redis-server` is missing or does not start, with a message that
/// says how to install it: these tests cannot run without it.
pub async fn redis() -> PrivateRedis {
    match PrivateRedis::start().await {
        Ok(redis) => redis,
        Err(err @ PrivateRedisError::NotInstalled) => panic!(
            "the integration tests need a real redis-server: {err}. \
             `bash .ci/run` installs it with apt-get."
        ),
        Err(err) => panic!("could not start redis-server for a test: {err}"),
    }
}

/// Opens a multiplexed connection to a test Redis.
///
/// # Panics
/// When the server does not accept the connection.
pub async fn connect(redis: &PrivateRedis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .expect("the private Redis URL is valid")
        .get_multiplexed_async_connection()
        .await
        .expect("the private Redis accepts connections")
}

/// Polls `check` until it returns `Some`, or panics after [`PATIENCE`]
/// naming `what`. For conditions reached through other processes, where
/// there is nothing to await directly.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A Redis the coordinator can use: one server, or a cluster.
pub trait RedisBackend {
    /// A store on it.
    fn store(&self, metrics: Arc<Metrics>) -> impl Future<Output = Store> + Send;
    /// The `lingua-coordinator` flags that point at it.
    fn coordinator_args(&self) -> Vec<String>;
}

/// What a test Redis (or Cluster) has run.
pub trait CommandStats {
    /// How many times its servers ran `command` (lowercase), scripts'
    /// calls included (`INFO commandstats`, summed over every server).
    fn command_calls(&self, command: &str) -> impl Future<Output = u64> + Send;
}

impl RedisBackend for PrivateRedis {
    async fn store(&self, metrics: Arc<Metrics>) -> Store {
        Store::connect(&self.url(), metrics)
            .await
            .expect("the test redis answers")
    }

    fn coordinator_args(&self) -> Vec<String> {
        vec!["--redis-url".into(), self.url()]
    }
}

impl CommandStats for PrivateRedis {
    async fn command_calls(&self, command: &str) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut connect(self).await)
            .await
            .expect("INFO answers");
        let prefix = format!("cmdstat_{command}:");
        info.lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .and_then(|stats| stats.split(',').find_map(|kv| kv.strip_prefix("calls=")))
            .and_then(|calls| calls.parse().ok())
            .unwrap_or(0)
    }
}

/// A coordinator running in this process on `127.0.0.1:0`.
pub struct TestCoordinator {
    /// The bound address.
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl TestCoordinator {
    /// Starts a coordinator on `redis` with `config` (its `listen` and
    /// `redis_url` are ignored).
    pub async fn start(redis: &impl RedisBackend, config: Config) -> Self {
        Self::start_tls(redis, config, None).await
    }

    /// Like [`TestCoordinator::start`], serving TLS with `acceptor`.
    pub async fn start_tls(
        redis: &impl RedisBackend,
        config: Config,
        acceptor: Option<TlsAcceptor>,
    ) -> Self {
        let any_port = "127.0.0.1:0".parse().expect("a valid address");
        Self::start_on(redis, config, acceptor, any_port).await
    }

    /// Starts a coordinator on a given address (to restart one where its
    /// agents expect it).
    pub async fn start_on(
        redis: &impl RedisBackend,
        config: Config,
        acceptor: Option<TlsAcceptor>,
        addr: SocketAddr,
    ) -> Self {
        let metrics = Arc::new(Metrics::default());
        let store = redis.store(metrics.clone()).await;
        let listener = TcpListener::bind(addr)
            .await
            .expect("bind the test coordinator's address");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server::run(
            listener,
            acceptor,
            config,
            store,
            metrics,
            shutdown.clone(),
        ));
        Self {
            addr,
            shutdown,
            task,
        }
    }

    /// `ws://…/v1/node`
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/node", self.addr)
    }

    /// `http://…{path}`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// POSTs `body` to `/v1/jobs` and returns status and JSON answer.
    pub async fn submit(&self, body: serde_json::Value) -> (u16, serde_json::Value) {
        let response = reqwest::Client::new()
            .post(self.url("/v1/jobs"))
            .json(&body)
            .send()
            .await
            .expect("the coordinator answers HTTP");
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    /// GETs `path` and returns status and JSON body.
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let response = reqwest::get(self.url(path))
            .await
            .expect("the coordinator answers HTTP");
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    /// A sample of `/metrics` by its name and labels (as written, e.g.
    /// `lingua_jobs_total{status="completed"}`), asked with `token` when
    /// given; `None` when the series is absent.
    pub async fn metric(&self, token: Option<&str>, series: &str) -> Option<f64> {
        let request = reqwest::Client::new().get(self.url("/metrics"));
        let request = match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let text = request
            .send()
            .await
            .expect("the coordinator answers HTTP")
            .text()
            .await
            .expect("/metrics is text");
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    }

    /// Shuts down gracefully and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("the coordinator task does not panic")
            .expect("the coordinator stops cleanly");
    }
}

/// A configuration for tests: defaults with a fast heartbeat.
pub fn test_config() -> Config {
    Config {
        heartbeat_interval: Duration::from_millis(200),
        missed_heartbeats: 3,
        ..Config::default()
    }
}

/// A registration for `node_id` serving `src` -> `tgt` with kind `translate`.
pub fn registration(node_id: &str, src: &[&str], tgt: &[&str]) -> Register {
    let langs = |codes: &[&str]| {
        codes
            .iter()
            .map(|c| c.parse().expect("valid test language"))
            .collect()
    };
    let kind = JobKind::new("translate").expect("valid kind");
    Register {
        node_id: NodeId::new(node_id).expect("valid test node id"),
        token: None,
        protocol: VersionRange::OURS,
        agent_version: "test".into(),
        instance: format!("instance-of-{node_id}"),
        capabilities: Capabilities {
            src_langs: langs(src),
            tgt_langs: langs(tgt),
            kinds: vec![kind.clone()],
        },
        gpus: Vec::new(),
        capacity: CapacityReport {
            free_slots: [(kind, 4)].into(),
            ..CapacityReport::default()
        },
        draining: false,
    }
}

/// A capacity report of `free` translate slots.
pub fn translate_room(free: u32) -> CapacityReport {
    CapacityReport {
        free_slots: [(JobKind::new("translate").expect("valid kind"), free)].into(),
        ..CapacityReport::default()
    }
}

/// Sets the token of a registration.
pub fn with_token(mut register: Register, token: &str) -> Register {
    register.token = Some(Secret(token.into()));
    register
}

/// The TOML of a test agent `node_id` connecting to `url` and serving
/// zh -> en; `rest` is the rest of it: top-level keys first (a drain
/// timeout), then `[gpu]` and `[jobs.*]` tables.
pub fn agent_toml(node_id: &str, url: &str, rest: &str) -> String {
    agent_toml_listing(node_id, &[url], rest)
}

/// [`agent_toml`] for an agent listing several coordinators, in the
/// order it tries them.
pub fn agent_toml_listing(node_id: &str, urls: &[&str], rest: &str) -> String {
    let urls = urls
        .iter()
        .map(|url| format!("{url:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"node_id = "{node_id}"
coordinator_url = [{urls}]
{rest}
[capabilities]
src_langs = ["zh"]
tgt_langs = ["en"]
"#
    )
}

/// An agent config for tests: simulated GPUs, one kind `translate`
/// (2,000 MiB, 8 at once, jobs of `duration_ms`), connecting to `url`.
pub fn agent_config(node_id: &str, url: &str, duration_ms: u64) -> AgentConfig {
    let rest = format!(
        r#"drain_timeout_ms = 10000
[gpu]
backend = "simulated"
reserve_mb = 1000
poll_interval_ms = 20
[gpu.simulated]
count = 1
memory_mb = 17000
[jobs.translate]
vram_mb = 2000
max_concurrent = 8
[jobs.translate.simulated]
duration_ms = {duration_ms}
"#
    );
    AgentConfig::parse(&agent_toml(node_id, url, &rest)).expect("the test agent config is valid")
}

/// An agent running in this process.
pub struct TestAgent {
    /// Its handles (arbiter, link status, simulated GPUs).
    pub handles: Handles,
    shutdown: CancellationToken,
    reload: tokio::sync::mpsc::UnboundedSender<AgentConfig>,
    task: JoinHandle<Result<(), AgentError>>,
}

impl TestAgent {
    /// Starts an agent with `config`.
    pub fn start(config: AgentConfig) -> Self {
        let agent = Agent::start(config).expect("the test agent starts");
        let handles = agent.handles.clone();
        let shutdown = CancellationToken::new();
        let (reload, reload_rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(agent.run(Control {
            shutdown: shutdown.clone(),
            reload: reload_rx,
        }));
        Self {
            handles,
            shutdown,
            reload,
            task,
        }
    }

    /// Waits until the agent has registered `count` times in all.
    pub async fn registered(&self, count: u64) {
        let mut status = self.handles.status.clone();
        tokio::time::timeout(
            PATIENCE,
            status.wait_for(|s| s.connected && s.registrations >= count),
        )
        .await
        .expect("the agent registers in time")
        .expect("the agent is running");
    }

    /// Sends a new config, as SIGHUP does.
    pub fn reload(&self, config: AgentConfig) {
        self.reload.send(config).expect("the agent is running");
    }

    /// Drains and stops the agent; returns how it ended.
    pub async fn stop(self) -> Result<(), AgentError> {
        self.shutdown.cancel();
        self.task.await.expect("the agent task does not panic")
    }

    /// Waits for the agent to end on its own.
    pub async fn ended(self) -> Result<(), AgentError> {
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the agent ends in time")
            .expect("the agent task does not panic")
    }
}

/// What a [`TestNode`] received.
// Unboxed so that tests can match nested patterns; it lives only briefly.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq)]
pub enum Received {
    /// A protocol message.
    Message(Message),
    /// A close frame with this code.
    Close(u16),
    /// The connection ended without a close frame.
    End,
}

/// A raw node connection: a real WebSocket client.
pub struct TestNode {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl TestNode {
    /// Opens the WebSocket.
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket upgrade");
        Self { ws }
    }

    /// Connects and registers; returns the node and its acknowledgement.
    ///
    /// # Panics
    /// When the coordinator answers anything but `register_ack`.
    pub async fn register(url: &str, register: Register) -> (Self, RegisterAck) {
        let mut node = Self::connect(url).await;
        node.send(&Message::Register(register)).await;
        match node.recv().await {
            Received::Message(Message::RegisterAck(ack)) => (node, ack),
            other => panic!("expected register_ack, got {other:?}"),
        }
    }

    /// Sends a message.
    pub async fn send(&mut self, message: &Message) {
        self.send_raw(encode(message)).await;
    }

    /// Sends a raw text frame.
    pub async fn send_raw(&mut self, text: String) {
        self.ws
            .send(WsMessage::text(text))
            .await
            .expect("send frame");
    }

    /// Sends a raw frame, tolerating a connection the peer already closed.
    pub async fn try_send_raw(&mut self, text: String) -> bool {
        self.ws.send(WsMessage::text(text)).await.is_ok()
    }

    /// The next message or close, skipping pings.
    pub async fn recv(&mut self) -> Received {
        let next = tokio::time::timeout(PATIENCE, async {
            loop {
                match self.ws.next().await {
                    None | Some(Err(_)) => return Received::End,
                    Some(Ok(WsMessage::Text(text))) => {
                        return Received::Message(
                            decode(text.as_bytes()).expect("coordinator frames decode"),
                        );
                    }
                    Some(Ok(WsMessage::Close(frame))) => {
                        return Received::Close(frame.map_or(1005, |f| f.code.into()));
                    }
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        next.expect("the coordinator answers in time")
    }

    /// Reads until the connection closes; returns the close code.
    pub async fn closed(&mut self) -> u16 {
        self.messages_until_closed().await.1
    }

    /// Reads until the connection closes; returns the messages read on
    /// the way and the close code (1006: no close frame).
    pub async fn messages_until_closed(&mut self) -> (Vec<Message>, u16) {
        let mut messages = Vec::new();
        loop {
            match self.recv().await {
                Received::Close(code) => return (messages, code),
                Received::End => return (messages, 1006),
                Received::Message(message) => messages.push(message),
            }
        }
    }

    /// Closes the connection normally.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        while let Some(Ok(_)) = self.ws.next().await {}
    }
}
