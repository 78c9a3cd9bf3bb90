//! `lingua-coordinator`: the central service of a Lingua fleet.
//!
//! Exit codes (SPEC.md): 0 success, 64 bad usage or invalid config, 69 a
//! dependency is unavailable at start (Redis unreachable, `redis-server`
//! missing, address in use), 70 internal error.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use lingua_coordinator::config::{Config, ConfigError};
use lingua_coordinator::metrics::Metrics;
use lingua_coordinator::private_redis::PrivateRedis;
use lingua_coordinator::store::Store;
use lingua_coordinator::{server, tls};
use lingua_shared::process::{Exit, LogFormat, init_logging, usage_error};
use sd_notify::NotifyState;
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// glibc's malloc took a third of the coordinator's CPU with 10,000 nodes
/// connected (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Lingua fleet coordinator: registers GPU nodes, keeps per-language-pair
/// pools in Redis and routes jobs to nodes with room.
///
/// With no configuration it listens on 127.0.0.1:7700 and runs a private
/// redis-server on a unix socket. Log level: LINGUA_LOG (e.g. "debug").
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// TOML config file (see SPEC.md); every key is optional.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to serve HTTP and the node WebSocket on (overrides `listen`).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Redis to use, e.g. redis://127.0.0.1:6379/0 (overrides `[redis] url`).
    #[arg(long, value_name = "URL", conflicts_with = "redis_cluster")]
    redis_url: Option<String>,
    /// A Redis Cluster to use, by some of its nodes: URL,URL,… (overrides
    /// `[redis] cluster`).
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    redis_cluster: Vec<String>,
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a config file and exit: 0 when valid, 64 with the reason.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(&err),
    };
    init_logging(cli.log_format, "info");
    let config = match load_config(&cli) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("lingua-coordinator: {err}");
            return Exit::Usage.into();
        }
    };
    if matches!(cli.command, Some(Command::CheckConfig)) {
        println!("config is valid");
        return ExitCode::SUCCESS;
    }
    let tls = match config.tls.as_ref().map(tls::acceptor).transpose() {
        Ok(tls) => tls,
        Err(err) => {
            eprintln!("lingua-coordinator: invalid config: {err}");
            return Exit::Usage.into();
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("lingua-coordinator: cannot start the async runtime: {err}");
            return Exit::Internal.into();
        }
    };
    runtime.block_on(serve(config, tls))
}

fn load_config(cli: &Cli) -> Result<Config, ConfigError> {
    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None if matches!(cli.command, Some(Command::CheckConfig)) => {
            return Err(ConfigError::Parse(
                "check-config needs --config FILE".into(),
            ));
        }
        None => Config::default(),
    };
    if let Some(listen) = &cli.listen {
        config.listen = listen.parse().map_err(|_| {
            ConfigError::invalid(
                "--listen",
                format!("{listen:?} is not an address; write it as 127.0.0.1:7700"),
            )
        })?;
    }
    if let Some(url) = &cli.redis_url {
        config.redis_url = Some(url.clone());
        config.redis_cluster.clear();
    }
    if !cli.redis_cluster.is_empty() {
        config.redis_cluster.clone_from(&cli.redis_cluster);
        config.redis_url = None;
    }
    config.check_security()?;
    Ok(config)
}

async fn serve(config: Config, tls: Option<TlsAcceptor>) -> ExitCode {
    let caught = match install_signals() {
        Ok(caught) => caught,
        Err(err) => {
            eprintln!("lingua-coordinator: cannot install signal handlers: {err}");
            return Exit::Internal.into();
        }
    };
    if config.node_tokens.is_empty() {
        tracing::warn!(listen = %config.listen, "no node tokens configured: accepting unauthenticated nodes");
    }
    let metrics = Arc::new(Metrics::default());
    let (connected, url, private) = if config.redis_cluster.is_empty() {
        let (url, private) = match &config.redis_url {
            Some(url) => (url.clone(), None),
            None => match PrivateRedis::start().await {
                Ok(redis) => {
                    tracing::info!(socket = %redis.socket_path().display(), "using a private redis-server; its data is lost on exit");
                    (redis.url(), Some(redis))
                }
                Err(err) => {
                    eprintln!("lingua-coordinator: {err}");
                    return Exit::Unavailable.into();
                }
            },
        };
        (Store::connect(&url, metrics.clone()).await, url, private)
    } else {
        let seeds = config.redis_cluster.join(",");
        (
            Store::connect_cluster(&config.redis_cluster, metrics.clone()).await,
            format!("the Redis Cluster of {seeds}"),
            None,
        )
    };
    let exit = match connected {
        Err(err) => {
            eprintln!("lingua-coordinator: cannot reach Redis at {url}: {err}");
            Exit::Unavailable.into()
        }
        Ok(store) => {
            if private.is_none() {
                tracing::info!(redis = %url, "using redis");
            }
            match TcpListener::bind(config.listen).await {
                Err(err) => {
                    eprintln!(
                        "lingua-coordinator: cannot listen on {}: {err}",
                        config.listen
                    );
                    Exit::Unavailable.into()
                }
                Ok(listener) => {
                    let shutdown = CancellationToken::new();
                    tokio::spawn(stop_on_signal(caught, shutdown.clone()));
                    tokio::spawn(systemd(shutdown.clone()));
                    match server::run(listener, tls, config, store, metrics, shutdown).await {
                        Ok(()) => ExitCode::SUCCESS,
                        Err(err) => {
                            eprintln!("lingua-coordinator: server failed: {err}");
                            Exit::Internal.into()
                        }
                    }
                }
            }
        }
    };
    if let Some(redis) = private {
        redis.stop().await;
    }
    tracing::info!("coordinator stopped");
    exit
}

/// Tells systemd the coordinator serves (READY=1) and feeds its watchdog;
/// no-ops outside systemd.
async fn systemd(shutdown: CancellationToken) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut feed = tokio::time::interval(period / 2);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                let _ = sd_notify::notify(&[NotifyState::Stopping]);
                return;
            }
            _ = feed.tick() => {
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            }
        }
    }
}

/// SIGTERM and SIGINT, caught from the moment this is created (a signal
/// that arrives during start-up still shuts down gracefully).
struct Signals {
    term: Signal,
    int: Signal,
}

fn install_signals() -> std::io::Result<Signals> {
    Ok(Signals {
        term: signal(SignalKind::terminate())?,
        int: signal(SignalKind::interrupt())?,
    })
}

async fn stop_on_signal(Signals { mut term, mut int }: Signals, shutdown: CancellationToken) {
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}
