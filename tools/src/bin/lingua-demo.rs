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
#[path = "lingua-demo/speech.rs"]
mod speech;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
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
use lingua_tools::percentile;
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

#[derive(Default)]
struct Tally {
    latencies_ms: Vec<u64>,
    completed: usize,
    /// Completed on a CPU fallback executor.
    on_cpu: usize,
    failed: BTreeMap<String, usize>,
    rerouted: usize,
    unanswered: usize,
    examples: Vec<String>,
}

fn bar(done: usize, total: usize, width: usize) -> String {
    let filled = (done * width)
        .checked_div(total)
        .unwrap_or(width)
        .min(width);
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

fn counter(metrics: &Metrics, family: &str) -> u64 {
    // Read through the Prometheus text so the demo shows exactly what an
    // operator would scrape.
    let text = metrics.render();
    text.lines()
        .filter(|line| line.starts_with(family))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

struct View<'a> {
    started: Instant,
    total: usize,
    done: usize,
    tally: &'a Tally,
    agents: &'a [DemoAgent],
    metrics: &'a Metrics,
    killed: Option<&'a str>,
}

fn render(view: &View<'_>) -> Vec<String> {
    let elapsed = view.started.elapsed().as_secs_f64().max(0.001);
    let mut sorted = view.tally.latencies_ms.clone();
    sorted.sort_unstable();
    let failed: usize = view.tally.failed.values().sum();
    let assignments = counter(view.metrics, "lingua_job_assignments_total");
    let mut lines = vec![
        format!(
            "{} {}/{}  {:.0} jobs/s  p50 {} ms  p99 {} ms  failed {}",
            bar(view.done, view.total, 20),
            view.done,
            view.total,
            view.done as f64 / elapsed,
            percentile(&sorted, 0.50),
            percentile(&sorted, 0.99),
            failed
        ),
        format!(
            "queued {}  shed {}  sent {}  refused {}  retried {}{}",
            counter(view.metrics, "lingua_queue_depth"),
            counter(view.metrics, "lingua_jobs_shed_total"),
            assignments,
            counter(view.metrics, "lingua_job_refusals_total"),
            view.tally.rerouted,
            view.killed
                .map(|k| format!("  ({k} was killed)"))
                .unwrap_or_default()
        ),
        format!(
            "{:<8} {:<8} {:>7} {:>18} {:>22}",
            "node", "state", "running", "free asr/mt/tts", "VRAM in use (MiB)"
        ),
    ];
    for agent in view.agents {
        let free = agent.handles.arbiter.free_slots();
        let slots = ["asr", "translate", "tts"]
            .iter()
            .map(|k| {
                free.iter()
                    .find(|(kind, _)| kind.as_str() == *k)
                    .map_or(0, |(_, n)| *n)
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join("/");
        let gpus = agent.handles.arbiter.gpus();
        let used: u64 = gpus.iter().map(|g| g.memory_used_mb).sum();
        let total: u64 = gpus.iter().map(|g| g.memory_total_mb).sum();
        let state = if !agent.alive() {
            "KILLED"
        } else if agent.handles.status.borrow().connected {
            "ready"
        } else {
            "offline"
        };
        let running = if agent.alive() {
            agent.handles.arbiter.running()
        } else {
            0
        };
        lines.push(format!(
            "{:<8} {:<8} {:>7} {:>18} {:>10} / {:<9}",
            agent.name, state, running, slots, used, total
        ));
    }
    lines
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
    let kinds = ["asr", "translate", "tts"];
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
            let victim = agents.len() - 1;
            screen.draw(agents, metrics, killed.as_deref(), true).await;
            agents[victim].kill();
            killed = Some(agents[victim].name.clone());
            println!(
                "lingua-demo: killed {} (its running jobs move to other nodes)",
                agents[victim].name
            );
            screen.detach();
        }
        let permit = clients
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (src, tgt) = &pairs[i % pairs.len()];
        let body = json!({
            "id": format!("demo-{i}"),
            "kind": kinds[i % kinds.len()],
            "src_lang": src,
            "tgt_lang": tgt,
            "session_id": format!("session-{}", i % 40),
            "payload": {"utterance": i},
            "timeout_ms": 20000,
        });
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
            let mut tally = tally.lock().await;
            match answer {
                Some(job) if job["status"] == "completed" => {
                    tally.completed += 1;
                    if job["device"] == "cpu" {
                        tally.on_cpu += 1;
                    }
                    tally
                        .latencies_ms
                        .push(job["latency_ms"].as_u64().unwrap_or(0));
                    if job["attempts"].as_u64().unwrap_or(1) > 1 {
                        tally.rerouted += 1;
                    }
                }
                Some(job) if job["status"] == "failed" => {
                    let code = job["error"]["code"]
                        .as_str()
                        .unwrap_or("unknown")
                        .to_owned();
                    *tally.failed.entry(code).or_default() += 1;
                    if tally.examples.len() < 3 {
                        tally.examples.push(
                            job["error"]["message"]
                                .as_str()
                                .unwrap_or_default()
                                .to_owned(),
                        );
                    }
                }
                _ => tally.unanswered += 1,
            }
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
    let elapsed = started.elapsed().as_secs_f64();
    let mut sorted = tally.latencies_ms.clone();
    sorted.sort_unstable();
    let failed: usize = tally.failed.values().sum();
    let assignments = counter(metrics, "lingua_job_assignments_total");
    println!();
    println!("summary");
    println!("  jobs submitted       {total}");
    println!("  completed            {}", tally.completed);
    println!(
        "  failed               {failed}{}",
        if tally.failed.is_empty() {
            String::new()
        } else {
            format!(" {:?}", tally.failed)
        }
    );
    for example in &tally.examples {
        println!("    e.g. {example}");
    }
    println!("  without an answer    {}", tally.unanswered);
    println!(
        "  cpu fallback         {} translate jobs ran on it while no GPU had room",
        tally.on_cpu
    );
    println!(
        "  throughput           {:.0} jobs/s over {elapsed:.1} s",
        total as f64 / elapsed
    );
    println!(
        "  latency              p50 {} ms, p99 {} ms",
        percentile(&sorted, 0.50),
        percentile(&sorted, 0.99)
    );
    let refusals = counter(metrics, "lingua_job_refusals_total");
    println!(
        "  assignments          {assignments}: {refusals} refused by nodes ({:.3} per job), {} beyond one per job in all",
        refusals as f64 / total.max(1) as f64,
        assignments.saturating_sub(total as u64)
    );
    println!(
        "  admission queue      at most {} jobs waiting for room; {} answered early (no room in time)",
        screen.peak_queued,
        counter(metrics, "lingua_jobs_shed_total")
    );
    if let Some(killed) = &killed {
        println!(
            "  node failure         {killed} killed part-way; its jobs were retried on other nodes ({} jobs completed after more than one attempt)",
            tally.rerouted
        );
    }
    if tally.unanswered == 0 && tally.completed + failed == total {
        println!("every job reached a terminal state");
        ExitCode::SUCCESS
    } else {
        println!(
            "{} jobs got no terminal answer",
            total - tally.completed - failed
        );
        Exit::Internal.into()
    }
}

/// The live progress: redrawn in place on a terminal, one line per
/// refresh otherwise.
struct Screen {
    tty: bool,
    /// The most jobs seen waiting in the admission queue.
    peak_queued: u64,
    printed: usize,
    started: Instant,
    total: usize,
    done: Arc<AtomicUsize>,
    tally: Arc<Mutex<Tally>>,
}

impl Screen {
    async fn draw(
        &mut self,
        agents: &[DemoAgent],
        metrics: &Metrics,
        killed: Option<&str>,
        full: bool,
    ) {
        let tally = self.tally.lock().await;
        self.peak_queued = self.peak_queued.max(counter(metrics, "lingua_queue_depth"));
        let lines = render(&View {
            started: self.started,
            total: self.total,
            done: self.done.load(Ordering::Relaxed),
            tally: &tally,
            agents,
            metrics,
            killed,
        });
        let mut out = std::io::stdout().lock();
        if self.tty {
            if self.printed > 0 {
                let _ = write!(out, "\x1b[{}A", self.printed);
            }
            // A line that wraps would throw the redraw off: cut each to
            // the terminal's width.
            let width = terminal_size::terminal_size().map_or(80, |(w, _)| usize::from(w.0));
            for line in &lines {
                let cut: String = line.chars().take(width.saturating_sub(1)).collect();
                let _ = writeln!(out, "\x1b[2K{cut}");
            }
            self.printed = lines.len();
        } else if full {
            for line in &lines {
                let _ = writeln!(out, "{line}");
            }
        } else {
            let _ = writeln!(out, "{}", lines[0]);
        }
        let _ = out.flush();
    }

    /// Forget what was drawn (a message was printed below it).
    fn detach(&mut self) {
        self.printed = 0;
    }
}
