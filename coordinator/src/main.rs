//! `lingua-coordinator`: the central service of a Lingua fleet.
//!
//! Exit codes (docs/OPERATIONS.md): 0 success, 64 bad usage or invalid config, 69 a
//! dependency is unavailable at start (Redis unreachable, `redis-server`
//! missing, address in use), 70 internal error.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, Parser, Subcommand};
use lingua_coordinator::auth::node_token;
use lingua_coordinator::config::{Config, ConfigError};
use lingua_coordinator::metrics::Metrics;
use lingua_coordinator::private_redis::PrivateRedis;
use lingua_coordinator::store::{Store, StoreError};
use lingua_coordinator::tls::Certificate;
use lingua_coordinator::{server, tls};
use lingua_shared::NodeId;
use lingua_shared::docs::DocsFlag;
use lingua_shared::process::{
    Exit, LogFormat, StopSignals, block_on, generate_docs, init_logging, usage_error,
};
use lingua_shared::systemd;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// glibc's malloc took a third of the coordinator's CPU with 10,000 nodes
/// connected; mimalloc, after it, read the link inside a freed block at
/// each allocation, a cache miss on a busy core. jemalloc keeps its free
/// blocks in arrays of pointers (docs/BENCHMARKS.md, "jemalloc").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The Lingua fleet coordinator: registers GPU nodes, keeps per-language-pair
/// pools in Redis and routes jobs to nodes with room.
///
/// With no configuration it listens on 127.0.0.1:7700 and runs a private
/// redis-server on a unix socket. Log level: LINGUA_LOG (e.g. "debug").
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// TOML config file (packaging/coordinator.toml shows every key); every
    /// key is optional.
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
    #[command(flatten)]
    docs: DocsFlag,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a config file and exit: 0 when valid, 64 with the reason.
    CheckConfig,
    /// Print the token of one node, derived from `[auth] node_secret`:
    /// put it in that host's agent config (`token_file`). A token
    /// registers only the node id it was made for.
    NodeToken {
        /// The node id (the agent's `node_id`).
        node_id: String,
    },
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
    let config = match load_config(&cli) {
        Ok(config) => config,
        Err(err) => {
            lingua_shared::fatal!("lingua-coordinator: {err}");
            return Exit::Usage.into();
        }
    };
    if let Some(Command::NodeToken { node_id }) = &cli.command {
        return print_node_token(&config, node_id);
    }
    // Read here, so that check-config finds a certificate or key the
    // service could not load.
    let tls = match config.tls.as_ref().map(tls::Certificate::load).transpose() {
        Ok(tls) => tls,
        Err(err) => {
            lingua_shared::fatal!("lingua-coordinator: invalid config: {err}");
            return Exit::Usage.into();
        }
    };
    if let Some(Command::CheckConfig) = &cli.command {
        for warning in config.warnings() {
            eprintln!("warning: {warning}");
        }
        println!("config is valid");
        return ExitCode::SUCCESS;
    }
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let workers = config.workers(cores);
    let scheduler = if workers == 1 {
        "current_thread"
    } else {
        "multi_thread"
    };
    tracing::info!(worker_threads = workers, scheduler, cores, "starting");
    block_on("lingua-coordinator", Some(workers), serve(config, tls))
}

fn print_node_token(config: &Config, node_id: &str) -> ExitCode {
    let node = match NodeId::new(node_id) {
        Ok(node) => node,
        Err(err) => {
            lingua_shared::fatal!("lingua-coordinator: {err}");
            return Exit::Usage.into();
        }
    };
    let Some(secret) = &config.node_secret else {
        lingua_shared::fatal!(
            "lingua-coordinator: the config sets no auth.node_secret; add one (`openssl rand -hex 32`) to derive per-node tokens"
        );
        return Exit::Usage.into();
    };
    println!("{}", node_token(secret, &node));
    ExitCode::SUCCESS
}

fn load_config(cli: &Cli) -> Result<Config, ConfigError> {
    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => match &cli.command {
            Some(Command::CheckConfig) => {
                return Err(ConfigError::Parse(
                    "check-config needs --config FILE".into(),
                ));
            }
            Some(Command::NodeToken { .. }) => {
                return Err(ConfigError::Parse(
                    "node-token needs --config FILE (the file with auth.node_secret)".into(),
                ));
            }
            None => Config::default(),
        },
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

async fn serve(mut config: Config, tls: Option<Arc<Certificate>>) -> ExitCode {
    // SIGHUP too, at once: its default action would stop the coordinator
    // while it connects to Redis.
    let caught = match StopSignals::install().and_then(|c| Ok((c, signal(SignalKind::hangup())?))) {
        Ok(caught) => caught,
        Err(err) => {
            lingua_shared::fatal!("lingua-coordinator: cannot install signal handlers: {err}");
            return Exit::Internal.into();
        }
    };
    warn_about_open_access(&config);
    config.max_connections = raise_open_files_limit(config.max_connections);
    let metrics = Arc::new(Metrics::default());
    let (connected, url, private) = match open_redis(&config, metrics.clone()).await {
        Ok(opened) => opened,
        Err(exit) => return exit,
    };
    let exit = match connected {
        Err(err) => {
            lingua_shared::fatal!("lingua-coordinator: cannot reach Redis at {url}: {err}");
            Exit::Unavailable.into()
        }
        Ok(store) => match store.require_version().await {
            Err(err) => {
                lingua_shared::fatal!("lingua-coordinator: {url}: {err}");
                Exit::Unavailable.into()
            }
            Ok(()) => {
                if private.is_none() {
                    tracing::info!(redis = %url, "using redis");
                }
                listen_and_serve(config, tls, store, metrics, caught).await
            }
        },
    };
    if let Some(redis) = private {
        redis.stop().await;
    }
    tracing::info!("coordinator stopped");
    exit
}

/// Logs what anyone may do without credentials.
fn warn_about_open_access(config: &Config) {
    if !config.nodes_need_token() {
        tracing::warn!(listen = %config.listen, "no node credentials configured: accepting unauthenticated nodes");
    }
    if config.api_is_open() {
        if config.listen.ip().is_loopback() {
            tracing::warn!(listen = %config.listen, "no API tokens configured: anyone on this host may use the admin API");
        } else {
            tracing::error!(listen = %config.listen, "auth.allow_open_api = true: ANYONE who can reach this address may drain nodes and read every job");
        }
    }
}

/// Connects to the configured Redis, or to a Cluster, or starts a private
/// `redis-server` when none is configured: the connection (or why not),
/// what it reached for the log, and the private server to stop at exit.
async fn open_redis(
    config: &Config,
    metrics: Arc<Metrics>,
) -> Result<(Result<Store, StoreError>, String, Option<PrivateRedis>), ExitCode> {
    if !config.redis_cluster.is_empty() {
        let seeds = config.redis_cluster.join(",");
        let ca = config.redis_ca_file.as_deref();
        let store = Store::connect_cluster(&config.redis_cluster, ca, metrics).await;
        return Ok((store, format!("the Redis Cluster of {seeds}"), None));
    }
    let (url, private) = match &config.redis_url {
        Some(url) => (url.clone(), None),
        None => match PrivateRedis::start().await {
            Ok(redis) => {
                tracing::info!(socket = %redis.socket_path().display(), "using a private redis-server; its data is lost on exit");
                (redis.url(), Some(redis))
            }
            Err(err) => {
                lingua_shared::fatal!("lingua-coordinator: {err}");
                return Err(Exit::Unavailable.into());
            }
        },
    };
    let ca = config.redis_ca_file.as_deref();
    Ok((Store::connect_tls(&url, ca, metrics).await, url, private))
}

/// Reloads the TLS certificate on each SIGHUP (`systemctl reload`), caught
/// from the start (`hangups`): the rest of the configuration needs a
/// restart, which loses nothing.
async fn reload_on_hangup(mut hangups: Signal, certificate: Option<Arc<Certificate>>) {
    while hangups.recv().await.is_some() {
        match certificate.as_ref().map(|c| c.reload()) {
            Some(Ok(())) => {
                tracing::info!("SIGHUP: TLS certificate reloaded; new connections use it")
            }
            Some(Err(err)) => {
                tracing::error!(error = %err, "SIGHUP: TLS certificate not reloaded; keeping the one in use");
            }
            None => tracing::info!(
                "SIGHUP: nothing to reload (only [tls] certificates are; restart for other changes, which loses nothing)"
            ),
        }
    }
}

/// Binds the listener and serves until a stop signal.
async fn listen_and_serve(
    config: Config,
    certificate: Option<Arc<Certificate>>,
    store: Store,
    metrics: Arc<Metrics>,
    (caught, hangups): (StopSignals, Signal),
) -> ExitCode {
    let tls = match certificate.as_ref().map(|c| c.acceptor()).transpose() {
        Ok(tls) => tls,
        Err(err) => {
            lingua_shared::fatal!("lingua-coordinator: cannot set up TLS: {err}");
            return Exit::Internal.into();
        }
    };
    let listener = match TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(err) => {
            lingua_shared::fatal!(
                "lingua-coordinator: cannot listen on {}: {err}",
                config.listen
            );
            return Exit::Unavailable.into();
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(caught, shutdown.clone()));
    tokio::spawn(reload_on_hangup(hangups, certificate));
    tokio::spawn(systemd(shutdown.clone()));
    match server::run(listener, tls, config, store, metrics, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            lingua_shared::fatal!("lingua-coordinator: server failed: {err}");
            Exit::Internal.into()
        }
    }
}

/// Raises the soft limit on open files to the hard limit: each connection
/// holds one, and the default soft limit (1024) is far below the 10,000
/// nodes one coordinator can hold. Returns the connection cap that fits
/// the limit: when even the hard limit is below `max_connections`, the
/// cap shrinks (and says so), so that running out of descriptors cannot
/// stop the coordinator from accepting its own health checks.
fn raise_open_files_limit(max_connections: u32) -> u32 {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return max_connections;
    };
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    // Redis connections, the private redis-server's socket, TLS files;
    // and the sockets in TLS handshake, which the cap does not count yet.
    const RESERVED: u64 = 64 + tls::MAX_HANDSHAKES as u64;
    if limit >= u64::from(max_connections) + RESERVED {
        return max_connections;
    }
    let cap = u32::try_from(limit.saturating_sub(RESERVED).max(16)).unwrap_or(max_connections);
    tracing::warn!(
        open_files = limit,
        max_connections,
        cap,
        "the open-files limit is below limits.max_connections: serving at most `cap` connections; raise LimitNOFILE (the shipped unit sets 65536)"
    );
    cap
}

/// Tells systemd the coordinator serves (READY=1) and feeds its watchdog;
/// no-ops outside systemd.
async fn systemd(shutdown: CancellationToken) {
    systemd::ready("serving");
    let Some(period) = systemd::watchdog_interval() else {
        return;
    };
    let mut feed = tokio::time::interval(period);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                systemd::stopping();
                return;
            }
            _ = feed.tick() => {
                systemd::watchdog();
            }
        }
    }
}

async fn stop_on_signal(mut signals: StopSignals, shutdown: CancellationToken) {
    let name = signals.stopped().await;
    tracing::info!("{name}: shutting down");
    shutdown.cancel();
}
