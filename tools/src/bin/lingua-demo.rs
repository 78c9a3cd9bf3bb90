//! `lingua-demo`: a whole Lingua fleet on one machine, for a first run.
//!
//! Starts a private Redis (or uses `--redis-url`), a coordinator and N
//! agents with simulated GPUs of different sizes over several language
//! pairs, drives a burst-and-lull speech-translation load through the HTTP
//! API, kills one agent part-way so its jobs are routed elsewhere, and
//! prints a summary. Translation has a CPU fallback (`busy = "fallback"`):
//! when the GPUs are full, translation jobs run on it, and the summary
//! counts them. Exits 0 only when every job reached a terminal state.
//!
//! `--speech` runs real speech instead (see [`speech`]).
#![forbid(unsafe_code)]

// The crate root is a file, so its module directory is named explicitly.
#[path = "lingua-demo/screen.rs"]
mod screen;
#[path = "lingua-demo/speech.rs"]
mod speech;

use screen::{Screen, Tally, summary};

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use lingua_agent::agent::{Agent, Control, Handles};
use lingua_agent::config::AgentConfig;
use lingua_coordinator::config::Config;
use lingua_coordinator::metrics::Metrics;
use lingua_coordinator::private_redis::PrivateRedis;
use lingua_coordinator::server;
use lingua_coordinator::store::Store;
use lingua_shared::process::{Exit, LogFormat, init_logging, usage_error};
use serde_json::{Value, json};
use tokio::sync::{Mutex, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;

/// A whole Lingua fleet on one machine: a private Redis, a coordinator and
/// several agents with simulated GPUs, under a burst-and-lull load, with
/// one agent killed part-way. Exits 0 when every job got a terminal answer.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Agents to start (at least 2: one is killed part-way).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(2..=64))]
    agents: u32,
    /// Jobs to submit.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    jobs: u32,
    /// Use this Redis instead of starting a private redis-server.
    #[arg(long, value_name = "URL")]
    redis_url: Option<String>,
    /// Real speech instead: espeak-ng speaks English sentences, two nodes
    /// run real ASR, translation (en -> es) and TTS (the programs of
    /// examples/speech/, Debian packages), the Spanish speech is written
    /// as WAV files.
    #[arg(long, conflicts_with_all = ["agents", "jobs"])]
    speech: bool,
    /// With --speech: utterances to send.
    #[arg(long, default_value_t = 6, requires = "speech", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    utterances: u32,
    /// With --speech: speakers talking at once, one session each.
    #[arg(long, default_value_t = 2, requires = "speech", value_parser = clap::value_parser!(u32).range(1..=64))]
    speakers: u32,
    /// With --speech: where the Spanish WAV files go.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "lingua-speech-out",
        requires = "speech"
    )]
    out: PathBuf,
    /// Keep the fleet running after the load, until Ctrl-C: look at it in
    /// the dashboard (http://ADDR/ui) or with `lingua-ctl --url http://ADDR`.
    #[arg(long, conflicts_with = "speech")]
    keep: bool,
}

/// Languages per agent, round robin: every agent serves a few directed
/// pairs, and the pairs overlap so that a killed agent's jobs have
/// somewhere else to go.
const LANGUAGES: [(&[&str], &[&str]); 3] = [
    (&["zh", "en"], &["en", "zh", "ja"]),
    (&["zh", "en", "ja"], &["en", "zh"]),
    (&["en", "de"], &["de", "en", "zh"]),
];
/// Simulated GPUs: (count, MiB) per agent, round robin.
const GPUS: [(u32, u64); 3] = [(1, 24_576), (2, 49_152), (1, 81_920)];

fn languages(index: u32) -> (&'static [&'static str], &'static [&'static str]) {
    LANGUAGES[index as usize % LANGUAGES.len()]
}

/// The pairs the load uses: those still served once the last agent is
/// killed, so every job can finish.
fn job_pairs(agents: u32) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = (0..agents - 1)
        .flat_map(|index| {
            let (src, tgt) = languages(index);
            src.iter().flat_map(move |s| {
                tgt.iter()
                    .filter(move |t| *t != s)
                    .map(move |t| (s.to_string(), t.to_string()))
            })
        })
        .collect();
    pairs.sort();
    pairs.dedup();
    pairs
}

fn agent_config(index: u32, url: &str) -> AgentConfig {
    let (src, tgt) = languages(index);
    let (count, memory) = GPUS[index as usize % GPUS.len()];
    let list = |codes: &[&str]| {
        codes
            .iter()
            .map(|c| format!("{c:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = format!(
        r#"
node_id = "gpu-{index:02}"
coordinator_url = "{url}"
drain_timeout_ms = 5000
[capabilities]
src_langs = [{src}]
tgt_langs = [{tgt}]
[gpu]
backend = "simulated"
reserve_mb = 2048
poll_interval_ms = 100
[gpu.simulated]
count = {count}
memory_mb = {memory}
[jobs.asr]
vram_mb = 6000
priority = 90
max_concurrent = 8
queue_wait_ms = 100
[jobs.asr.simulated]
duration_ms = 180
utilization_pct = 12
[jobs.translate]
vram_mb = 3000
priority = 60
max_concurrent = 12
[jobs.translate.simulated]
duration_ms = 90
utilization_pct = 6
[jobs.translate.fallback]
max_concurrent = 4
[jobs.translate.fallback.simulated]
duration_ms = 250
[jobs.tts]
vram_mb = 4000
priority = 50
max_concurrent = 8
[jobs.tts.simulated]
duration_ms = 140
utilization_pct = 8
"#,
        src = list(src),
        tgt = list(tgt)
    );
    AgentConfig::parse(&text).expect("the demo's agent config is valid")
}

/// An agent on its own thread and runtime, so that killing it drops every
/// task it has, like a killed process.
struct DemoAgent {
    name: String,
    handles: Handles,
    kill: Option<oneshot::Sender<()>>,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DemoAgent {
    fn start(config: AgentConfig) -> std::io::Result<Self> {
        let name = config.node_id.to_string();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let agent = Agent::start(config).map_err(|e| std::io::Error::other(e.to_string()))?;
        let handles = agent.handles.clone();
        let (kill, killed) = oneshot::channel::<()>();
        let shutdown = CancellationToken::new();
        let control = Control {
            shutdown: shutdown.clone(),
            reload: tokio::sync::mpsc::unbounded_channel().1,
        };
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                runtime.block_on(async {
                    tokio::select! {
                        _ = agent.run(control) => {}
                        _ = killed => {}
                    }
                });
                runtime.shutdown_background();
            })?;
        Ok(Self {
            name,
            handles,
            kill: Some(kill),
            shutdown,
            thread: Some(thread),
        })
    }

    fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
    }

    fn alive(&self) -> bool {
        self.kill.is_some()
    }

    fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(&err),
    };
    if std::env::var_os("LINGUA_LOG").is_some() {
        init_logging(LogFormat::Text, "info");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("lingua-demo: cannot start the async runtime: {err}");
            return Exit::Internal.into();
        }
    };
    runtime.block_on(demo(cli))
}

async fn demo(cli: Cli) -> ExitCode {
    if cli.speech
        && let Err(err) = lingua_tests::speech::check_packages()
    {
        eprintln!("lingua-demo --speech: {err}");
        return Exit::Unavailable.into();
    }
    let (url, private) = match &cli.redis_url {
        Some(url) => (url.clone(), None),
        None => match PrivateRedis::start().await {
            Ok(redis) => (redis.url(), Some(redis)),
            Err(err) => {
                eprintln!("lingua-demo: {err}");
                return Exit::Unavailable.into();
            }
        },
    };
    let metrics = Arc::new(Metrics::default());
    let store = match Store::connect(&url, metrics.clone()).await {
        Ok(store) => store,
        Err(err) => {
            eprintln!("lingua-demo: cannot reach Redis at {url}: {err}");
            return Exit::Unavailable.into();
        }
    };
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("lingua-demo: cannot listen on 127.0.0.1: {err}");
            return Exit::Unavailable.into();
        }
    };
    let addr: SocketAddr = listener
        .local_addr()
        .expect("a bound listener has an address");
    let config = Config {
        heartbeat_interval: Duration::from_millis(500),
        missed_heartbeats: 3,
        max_attempts: 6,
        ..Config::default()
    };
    let stop = CancellationToken::new();
    let coordinator = tokio::spawn(server::run(
        listener,
        None,
        config,
        store,
        metrics.clone(),
        stop.clone(),
    ));
    println!(
        "lingua-demo: coordinator on http://{addr}, dashboard http://{addr}/ui (Redis: {})",
        if private.is_some() {
            "private redis-server"
        } else {
            url.as_str()
        }
    );

    let outcome = if cli.speech {
        speech::run(addr, cli.utterances, cli.speakers, &cli.out).await
    } else {
        simulated(&cli, addr, &metrics).await
    };
    stop.cancel();
    let _ = coordinator.await;
    if let Some(redis) = private {
        redis.stop().await;
    }
    outcome
}

/// The simulated fleet under load, with one agent killed part-way.
async fn simulated(cli: &Cli, addr: SocketAddr, metrics: &Metrics) -> ExitCode {
    let ws = format!("ws://{addr}/v1/node");
    let mut agents = Vec::new();
    for index in 0..cli.agents {
        match DemoAgent::start(agent_config(index, &ws)) {
            Ok(agent) => agents.push(agent),
            Err(err) => {
                eprintln!("lingua-demo: cannot start agent {index}: {err}");
                return Exit::Internal.into();
            }
        }
    }
    let connected = tokio::time::timeout(Duration::from_secs(15), async {
        for agent in &agents {
            let mut status = agent.handles.status.clone();
            let _ = status.wait_for(|s| s.connected).await;
        }
    })
    .await;
    if connected.is_err() {
        eprintln!("lingua-demo: the agents did not register within 15 s");
        return Exit::Internal.into();
    }
    println!(
        "lingua-demo: {} agents registered; submitting {} jobs (burst, lull, burst)",
        agents.len(),
        cli.jobs
    );

    let outcome = run_load(cli, addr, &mut agents, metrics).await;
    if cli.keep {
        println!(
            "lingua-demo: the fleet keeps running until Ctrl-C: dashboard http://{addr}/ui, or `lingua-ctl --url http://{addr} top`"
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    for agent in agents {
        agent.stop();
    }
    outcome
}

/// Job `i` of the load: the kinds in turn, over the `pairs` the agents
/// serve, in one of 40 sessions.
fn job(i: usize, pairs: &[(String, String)]) -> Value {
    let kinds = ["asr", "translate", "tts"];
    let (src, tgt) = &pairs[i % pairs.len()];
    json!({
        "id": format!("demo-{i}"),
        "kind": kinds[i % kinds.len()],
        "src_lang": src,
        "tgt_lang": tgt,
        "session_id": format!("session-{}", i % 40),
        "payload": {"utterance": i},
        "timeout_ms": 20000,
    })
}

/// Kills the last agent, says so, and returns its name.
fn kill_last(agents: &mut [DemoAgent]) -> String {
    let victim = agents.len() - 1;
    agents[victim].kill();
    let name = agents[victim].name.clone();
    println!("lingua-demo: killed {name} (its running jobs move to other nodes)");
    name
}

async fn run_load(
    cli: &Cli,
    addr: SocketAddr,
    agents: &mut [DemoAgent],
    metrics: &Metrics,
) -> ExitCode {
    let total = cli.jobs as usize;
    let client = reqwest::Client::new();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut screen = Screen {
        tty: std::io::stdout().is_terminal(),
        peak_queued: 0,
        printed: 0,
        started,
        total,
        done: done.clone(),
        tally: tally.clone(),
    };
    // Burst, lull, burst: many clients, then few, then many again.
    let clients = Arc::new(Semaphore::new(96));
    let mut submitted = Vec::with_capacity(total);
    let pairs = job_pairs(cli.agents);
    let mut killed: Option<String> = None;
    let mut last_draw = Instant::now();
    for i in 0..total {
        let phase = i * 10 / total.max(1);
        if phase == 4 || phase == 5 {
            // The lull: a trickle.
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
        if killed.is_none() && i >= total * 2 / 5 {
            screen.draw(agents, metrics, None, true).await;
            killed = Some(kill_last(agents));
            screen.detach();
        }
        let permit = clients
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let body = job(i, &pairs);
        let client = client.clone();
        let url = format!("http://{addr}/v1/jobs");
        let tally = tally.clone();
        let done = done.clone();
        submitted.push(tokio::spawn(async move {
            let answer = client.post(url).json(&body).send().await;
            let answer: Option<Value> = match answer {
                Ok(response) => response.json().await.ok(),
                Err(_) => None,
            };
            tally.lock().await.add(answer);
            drop(permit);
            done.fetch_add(1, Ordering::Relaxed);
        }));
        if last_draw.elapsed() >= Duration::from_millis(250) {
            screen.draw(agents, metrics, killed.as_deref(), false).await;
            last_draw = Instant::now();
        }
    }
    while done.load(Ordering::Relaxed) < total {
        screen.draw(agents, metrics, killed.as_deref(), false).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for task in submitted {
        let _ = task.await;
    }
    screen.draw(agents, metrics, killed.as_deref(), true).await;
    let tally = tally.lock().await;
    let run = (started.elapsed(), screen.peak_queued, killed.as_deref());
    summary(total, &tally, metrics, run)
}
