//! `lingua-agent`: the per-GPU-host service of a Lingua fleet.
//!
//! Exit codes (docs/OPERATIONS.md): 0 success, 64 bad usage, invalid
//! config, or a refusal by the coordinator that retrying cannot fix (bad
//! token, no common protocol version), 69 a dependency is
//! unavailable (`probe` without NVML; the service itself keeps running
//! with zero slots and retries), 70 internal error.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use lingua_agent::agent::{Agent, AgentError, Control, Handles};
use lingua_agent::arbiter::{Arbiter, Limits};
use lingua_agent::config::{AgentConfig, DEFAULT_CONFIG_PATH};
use lingua_agent::{gpu, metrics};
use lingua_shared::docs::DocsFlag;
use lingua_shared::process::{
    Exit, LogFormat, StopSignals, block_on, generate_docs, init_logging, usage_error,
};
use lingua_shared::systemd;
use serde_json::json;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// The Lingua fleet GPU node agent: decides from GPU readings how many jobs
/// of each kind this host can run, runs them, and reports its capacity to
/// the coordinator.
///
/// Runs as a systemd service (Type=notify). SIGTERM drains (no new jobs,
/// running ones finish, results are delivered) and exits; SIGHUP reloads
/// the config file. Log level: LINGUA_LOG (e.g. "debug").
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// TOML config file (packaging/agent.toml shows every key).
    #[arg(long, global = true, value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(flatten)]
    docs: DocsFlag,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print GPU readings and what the arbiter would admit now, as JSON.
    Probe,
    /// Validate the config file and exit: 0 when valid, 64 with the reason.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(&err),
    };
    if let Some(dir) = &cli.docs.generate_docs {
        return generate_docs(Cli::command(), dir);
    }
    init_logging(cli.log_format, "info");
    let config = match AgentConfig::load(&cli.config) {
        Ok(config) => config,
        Err(err) => {
            lingua_shared::fatal!("lingua-agent: {err}");
            return Exit::Usage.into();
        }
    };
    match cli.command {
        Some(Command::CheckConfig) => {
            println!("config is valid");
            ExitCode::SUCCESS
        }
        Some(Command::Probe) => probe(&config),
        None => block_on("lingua-agent", None, serve(config, cli.config)),
    }
}

fn probe(config: &AgentConfig) -> ExitCode {
    let mut source = gpu::open(&config.gpu, None);
    let readings = match source.read_once() {
        Ok(readings) => readings,
        Err(err) => {
            lingua_shared::fatal!("lingua-agent: {err}");
            return Exit::Unavailable.into();
        }
    };
    let arbiter = Arbiter::new(Limits::from_config(config));
    arbiter.update(readings.clone(), Instant::now());
    let free = arbiter.free_slots();
    let gpus: Vec<serde_json::Value> = readings
        .iter()
        .map(|g| {
            json!({
                "index": g.index,
                "uuid": g.uuid,
                "name": g.name,
                "memory_total_mb": g.memory_total_mb,
                "memory_used_mb": g.memory_used_mb,
                "memory_free_mb": g.memory_total_mb.saturating_sub(g.memory_used_mb),
                "utilization_pct": g.utilization_pct,
                "temperature_c": g.temperature_c,
                "healthy": g.healthy,
                "reason": g.reason,
                "mig_parent_uuid": g.parent_uuid,
            })
        })
        .collect();
    let jobs: BTreeMap<String, serde_json::Value> = config
        .jobs
        .iter()
        .map(|(kind, settings)| {
            (
                kind.to_string(),
                json!({
                    "free_slots": free.get(kind).copied().unwrap_or(0),
                    "vram_mb": settings.vram_mb,
                    "max_concurrent": settings.max_concurrent,
                    "priority": settings.priority,
                }),
            )
        })
        .collect();
    let document = json!({
        "backend": source.backend().name(),
        "reserve_mb": config.gpu.reserve_mb,
        "under_pressure": arbiter.under_pressure(),
        "hot_gpus": arbiter.hot_gpus(),
        "gpus": gpus,
        "jobs": jobs,
    });
    println!("{document:#}");
    ExitCode::SUCCESS
}

async fn serve(config: AgentConfig, path: PathBuf) -> ExitCode {
    let caught = match install_signals() {
        Ok(caught) => caught,
        Err(err) => {
            lingua_shared::fatal!("lingua-agent: cannot install signal handlers: {err}");
            return Exit::Internal.into();
        }
    };
    tracing::info!(node_id = %config.node_id, coordinators = ?config.coordinator_urls, backend = config.gpu.backend.name(), "agent starting");
    let agent_metrics_addr = config.metrics_listen;
    // Every line the agent logs names its node (a job's lines add the job).
    let span = tracing::info_span!("agent", node_id = %config.node_id);
    let agent = match Agent::start(config) {
        Ok(agent) => agent,
        Err(err) => {
            lingua_shared::fatal!("lingua-agent: {err}");
            return exit_for(&err);
        }
    };
    let shutdown = CancellationToken::new();
    if let Some(addr) = agent_metrics_addr {
        match metrics::serve(addr, agent.handles.clone(), shutdown.clone()).await {
            Ok(server) => {
                tokio::spawn(server);
            }
            Err(err) => {
                lingua_shared::fatal!("lingua-agent: cannot serve metrics on {addr}: {err}");
                return Exit::Unavailable.into();
            }
        }
    }
    let (reload_tx, reload) = mpsc::unbounded_channel();
    tokio::spawn(signals(caught, shutdown.clone(), reload_tx, path));
    tokio::spawn(systemd(agent.handles.clone(), shutdown.clone()));
    match agent
        .run(Control { shutdown, reload })
        .instrument(span)
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            lingua_shared::fatal!("lingua-agent: {err}");
            exit_for(&err)
        }
    }
}

fn exit_for(err: &AgentError) -> ExitCode {
    match err {
        AgentError::Refused { .. } => Exit::Usage.into(),
        AgentError::Thread(_) => Exit::Internal.into(),
    }
}

/// The stop signals and SIGHUP, caught from the moment this is created (a
/// signal that arrives during start-up is not lost, nor fatal).
struct Signals {
    stop: StopSignals,
    hup: Signal,
}

fn install_signals() -> std::io::Result<Signals> {
    Ok(Signals {
        stop: StopSignals::install()?,
        hup: signal(SignalKind::hangup())?,
    })
}

async fn signals(
    Signals { mut stop, mut hup }: Signals,
    shutdown: CancellationToken,
    reload: mpsc::UnboundedSender<AgentConfig>,
    path: PathBuf,
) {
    loop {
        tokio::select! {
            name = stop.stopped() => { tracing::info!("{name}: draining"); break; }
            _ = hup.recv() => match AgentConfig::load(&path) {
                Ok(config) => {
                    systemd::reloading();
                    let _ = reload.send(config);
                    systemd::reloaded();
                }
                Err(err) => {
                    tracing::error!(error = %err, "SIGHUP: config not reloaded; keeping the running one");
                }
            },
        }
    }
    systemd::stopping();
    shutdown.cancel();
}

/// Tells systemd we are ready (registered or retrying), keeps its watchdog
/// fed while the GPU sampler makes progress (a stuck sampler lets systemd
/// restart the agent), and mirrors the link state into STATUS=.
async fn systemd(handles: Handles, shutdown: CancellationToken) {
    systemd::ready("connecting to the coordinator");
    let watchdog = systemd::watchdog_interval();
    let mut status = handles.status.clone();
    let mut feed = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = feed.tick(), if watchdog.is_some() => {
                if handles.arbiter.fresh() {
                    systemd::watchdog();
                } else {
                    tracing::error!("gpu readings are stale: not feeding the systemd watchdog");
                }
            }
            Ok(()) = status.changed() => {
                let s = status.borrow().clone();
                let mut line = format!(
                    "{}; {} running; {} results awaiting acknowledgement",
                    if s.connected { "connected" } else { "reconnecting" },
                    handles.arbiter.running(),
                    s.outbox
                );
                if let Some(problem) = handles.arbiter.health() {
                    line.push_str("; ");
                    line.push_str(&problem);
                }
                systemd::status(&line);
            }
        }
    }
}
