//! The coordinator's configuration (packaging/coordinator.toml), parsed into a
//! raw form that rejects unknown keys, then validated into [`Config`] with
//! errors that name the field and its line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use lingua_shared::config_check::ConfigError;
use lingua_shared::config_check::{self, Checker};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

mod fields;

use fields::*;

/// The address the coordinator listens on without configuration.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7700";
/// The shortest token accepted: anything shorter is guessable.
pub const MIN_TOKEN_LEN: usize = 16;
/// The shortest node secret accepted: every node token derives from it.
pub const MIN_SECRET_LEN: usize = 32;

/// The priority of a job that names none (0-100, higher first).
pub const DEFAULT_PRIORITY: u8 = 50;

/// TLS for the listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
}

/// A validated coordinator configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where HTTP and the node WebSocket are served.
    pub listen: SocketAddr,
    /// Redis to use; `None` starts a private `redis-server`.
    pub redis_url: Option<String>,
    /// Seed nodes of a Redis Cluster (instead of `redis_url`).
    pub redis_cluster: Vec<String>,
    /// A PEM CA to trust for `rediss://`, instead of the system's roots.
    pub redis_ca_file: Option<PathBuf>,
    /// Tokens nodes may present.
    pub node_tokens: Vec<String>,
    /// The secret per-node tokens derive from (`node-token` prints them).
    pub node_secret: Option<String>,
    /// The secret replaced by `node_secret`, whose tokens register their
    /// nodes still while hosts move to the new ones.
    pub previous_node_secret: Option<String>,
    /// Admin bearer tokens for the HTTP API.
    pub api_tokens: Vec<String>,
    /// Client bearer tokens: submit jobs, read their own.
    pub client_tokens: Vec<String>,
    /// The highest priority a client token's job may name (admins name
    /// any); one naming none gets the lower of this and the default.
    pub client_max_priority: u8,
    /// Accept unauthenticated nodes on a non-loopback listener.
    pub allow_anonymous: bool,
    /// Serve the API without tokens on a non-loopback listener.
    pub allow_open_api: bool,
    /// Serve https/wss directly.
    pub tls: Option<TlsConfig>,
    /// Heartbeat interval told to agents.
    pub heartbeat_interval: Duration,
    /// Heartbeats a node may miss before it leaves routing.
    pub missed_heartbeats: u32,
    /// Most nodes in one pool.
    pub max_nodes_per_pool: u32,
    /// Job timeout when a request names none.
    pub default_job_timeout: Duration,
    /// Attempts per job that may end with the node silent, gone, or
    /// refusing a job it cannot run at all ("not now" refusals,
    /// `no_capacity` and `draining`, do not count).
    pub max_attempts: u32,
    /// How long a node has to accept or refuse an assignment.
    pub accept_timeout: Duration,
    /// How long a finished job's result stays retrievable (and its id
    /// reserved).
    pub result_ttl: Duration,
    /// How a node is chosen for a job.
    pub pick: PickPolicy,
    /// Most jobs this instance holds waiting for room, all queues together.
    pub max_queued: u32,
    /// Routing hints share each node's memory between its kinds (protocol
    /// version 2). `false` keeps per-kind counts only, the earlier model,
    /// kept to measure against (docs/BENCHMARKS.md).
    pub kinds_share_memory: bool,
    /// Most language pairs one node may serve.
    pub max_pairs_per_node: u32,
    /// How long an offline node's record stays in Redis after its last
    /// sign of life.
    pub offline_retention: Duration,
    /// Most connections (HTTP and node sockets) served at once.
    pub max_connections: u32,
    /// Time a connection has to send a request's headers; also how long
    /// an idle keep-alive connection stays open.
    pub header_read_timeout: Duration,
    /// Threads that run the coordinator's tasks; `None`: the default for
    /// the host ([`default_workers`]).
    pub worker_threads: Option<u32>,
}

/// How `route_pick` chooses among the nodes of a pair.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PickPolicy {
    /// The better of two random nodes that reported room (the default).
    #[default]
    Capacity,
    /// Any live node, room or not: the earlier system's policy, kept to
    /// measure what capacity-aware choice saves (`lingua-bench`). Never
    /// better in production.
    Random,
}

impl PickPolicy {
    /// The name `route_pick` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Capacity => "capacity",
            Self::Random => "random",
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN
                .parse()
                .expect("the default listen address parses"),
            redis_url: None,
            redis_cluster: Vec::new(),
            redis_ca_file: None,
            node_tokens: Vec::new(),
            node_secret: None,
            previous_node_secret: None,
            api_tokens: Vec::new(),
            client_tokens: Vec::new(),
            client_max_priority: DEFAULT_PRIORITY,
            allow_anonymous: false,
            allow_open_api: false,
            tls: None,
            heartbeat_interval: Duration::from_millis(2000),
            missed_heartbeats: 3,
            max_nodes_per_pool: 100,
            default_job_timeout: Duration::from_millis(30_000),
            max_attempts: 3,
            accept_timeout: Duration::from_millis(2_000),
            result_ttl: Duration::from_millis(300_000),
            pick: PickPolicy::Capacity,
            max_queued: 10_000,
            kinds_share_memory: true,
            max_pairs_per_node: 64,
            offline_retention: Duration::from_millis(86_400_000),
            max_connections: 16_384,
            header_read_timeout: Duration::from_millis(10_000),
            worker_threads: None,
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&config_check::read(path)?)
    }

    /// Parses and validates TOML text.
    pub fn parse(source: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = config_check::parse(source)?;
        let check = Checker::new(source);
        let defaults = Config::default();
        let listen = listen(check, raw.listen, defaults.listen)?;
        let redis_ca_file = redis_ca_file(check, raw.redis.ca_file.clone())?;
        let (redis_url, redis_cluster) = redis(check, raw.redis)?;
        let config = Config {
            listen,
            redis_url,
            redis_cluster,
            redis_ca_file,
            node_tokens: tokens(check, "auth.node_tokens", raw.auth.node_tokens)?,
            node_secret: node_secret(check, "auth.node_secret", raw.auth.node_secret)?,
            previous_node_secret: node_secret(
                check,
                "auth.previous_node_secret",
                raw.auth.previous_node_secret,
            )?,
            api_tokens: tokens(check, "auth.api_tokens", raw.auth.api_tokens)?,
            client_tokens: tokens(check, "auth.client_tokens", raw.auth.client_tokens)?,
            client_max_priority: check.range(
                "auth.client_max_priority",
                raw.auth.client_max_priority,
                defaults.client_max_priority,
                0..=100,
            )?,
            allow_anonymous: raw.auth.allow_anonymous,
            allow_open_api: raw.auth.allow_open_api,
            tls: raw.tls.map(|tls| TlsConfig {
                cert_file: tls.cert_file,
                key_file: tls.key_file,
            }),
            max_nodes_per_pool: check.range(
                "pools.max_nodes_per_pool",
                raw.pools.max_nodes_per_pool,
                defaults.max_nodes_per_pool,
                1..=1_000_000,
            )?,
            ..defaults
        }
        .with_nodes(check, raw.nodes)?
        .with_jobs(check, raw.jobs)?
        .with_limits(check, raw.limits)?;
        Ok(config)
    }

    /// `[nodes]` over `self`'s values.
    fn with_nodes(self, check: Checker<'_>, raw: RawNodes) -> Result<Self, ConfigError> {
        Ok(Self {
            heartbeat_interval: duration(
                check,
                "nodes.heartbeat_interval_ms",
                raw.heartbeat_interval_ms,
                self.heartbeat_interval,
                50..=600_000,
            )?,
            missed_heartbeats: check.range(
                "nodes.missed_heartbeats",
                raw.missed_heartbeats,
                self.missed_heartbeats,
                1..=100,
            )?,
            max_pairs_per_node: check.range(
                "nodes.max_pairs",
                raw.max_pairs,
                self.max_pairs_per_node,
                1..=1024,
            )?,
            offline_retention: duration(
                check,
                "nodes.offline_retention_ms",
                raw.offline_retention_ms,
                self.offline_retention,
                60_000..=31_536_000_000,
            )?,
            ..self
        })
    }

    /// `[jobs]` over `self`'s values.
    fn with_jobs(self, check: Checker<'_>, raw: RawJobs) -> Result<Self, ConfigError> {
        Ok(Self {
            default_job_timeout: duration(
                check,
                "jobs.default_timeout_ms",
                raw.default_timeout_ms,
                self.default_job_timeout,
                1..=3_600_000,
            )?,
            max_attempts: check.range(
                "jobs.max_attempts",
                raw.max_attempts,
                self.max_attempts,
                1..=100,
            )?,
            accept_timeout: duration(
                check,
                "jobs.accept_timeout_ms",
                raw.accept_timeout_ms,
                self.accept_timeout,
                10..=600_000,
            )?,
            result_ttl: duration(
                check,
                "jobs.result_ttl_ms",
                raw.result_ttl_ms,
                self.result_ttl,
                1_000..=604_800_000,
            )?,
            pick: raw.pick.unwrap_or_default(),
            max_queued: check.range(
                "jobs.max_queued",
                raw.max_queued,
                self.max_queued,
                1..=1_000_000,
            )?,
            kinds_share_memory: raw.kinds_share_memory.unwrap_or(self.kinds_share_memory),
            ..self
        })
    }

    /// `[limits]` over `self`'s values.
    fn with_limits(self, check: Checker<'_>, raw: RawLimits) -> Result<Self, ConfigError> {
        Ok(Self {
            max_connections: check.range(
                "limits.max_connections",
                raw.max_connections,
                self.max_connections,
                16..=1_000_000,
            )?,
            header_read_timeout: duration(
                check,
                "limits.header_read_timeout_ms",
                raw.header_read_timeout_ms,
                self.header_read_timeout,
                100..=600_000,
            )?,
            worker_threads: match raw.worker_threads {
                None => self.worker_threads,
                given => Some(check.range("limits.worker_threads", given, 1, 1..=1_024)?),
            },
            ..self
        })
    }

    /// Threads to run the coordinator's tasks on a host with `cores`
    /// cores: `limits.worker_threads`, or the default for the host.
    pub fn workers(&self, cores: usize) -> usize {
        self.worker_threads
            .map_or_else(|| default_workers(cores), |n| n as usize)
    }

    /// Checks the rules that span fields and command-line overrides: run it
    /// after applying `--listen`, `--redis-url` and `--redis-cluster`.
    pub fn check_security(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.redis_url {
            check_redis_url(url).map_err(|message| ConfigError::invalid("redis.url", message))?;
        }
        if self.redis_url.is_some() && !self.redis_cluster.is_empty() {
            return Err(ConfigError::invalid(
                "redis.cluster",
                "set a Redis URL or a Redis Cluster, not both (--redis-url and --redis-cluster override the file)",
            ));
        }
        for url in &self.redis_cluster {
            check_redis_url(url)
                .map_err(|message| ConfigError::invalid("redis.cluster", message))?;
        }
        let tls = |url: &String| url.starts_with("rediss://");
        let uses_tls = self.redis_url.iter().chain(&self.redis_cluster).any(tls);
        if self.redis_ca_file.is_some() && !uses_tls {
            return Err(ConfigError::invalid(
                "redis.ca_file",
                "a CA for Redis needs a rediss:// URL (redis.url or redis.cluster)",
            ));
        }
        if self.previous_node_secret.is_some() && self.node_secret.is_none() {
            return Err(ConfigError::invalid(
                "auth.previous_node_secret",
                "a previous node secret is for moving to a new one: set auth.node_secret to the new secret",
            ));
        }
        let public = !self.listen.ip().is_loopback();
        if public && !self.nodes_need_token() && !self.allow_anonymous {
            return Err(ConfigError::invalid(
                "auth.node_secret",
                format!(
                    "listening on {} (not loopback) without node credentials would let anyone register a node; \
                     set auth.node_secret (per-node tokens, see `lingua-coordinator node-token --help`) or \
                     auth.node_tokens, or set auth.allow_anonymous = true to accept that",
                    self.listen
                ),
            ));
        }
        if public && self.api_is_open() && !self.allow_open_api {
            return Err(ConfigError::invalid(
                "auth.api_tokens",
                format!(
                    "listening on {} (not loopback) without API tokens would let anyone drain nodes and read jobs; \
                     set auth.api_tokens (admins) and auth.client_tokens (job clients), \
                     or set auth.allow_open_api = true to accept that",
                    self.listen
                ),
            ));
        }
        Ok(())
    }

    /// What this config allows that is likely a mistake, said at start and
    /// by check-config.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.api_tokens.is_empty() && !self.client_tokens.is_empty() {
            warnings.push(
                "auth.client_tokens without auth.api_tokens: no caller is an admin, so /metrics, \
                 the dashboard, /v1/nodes and drains answer 401 or 403 to everyone; \
                 set auth.api_tokens for operators and Prometheus"
                    .to_owned(),
            );
        }
        warnings
    }

    /// True when the HTTP API needs no token.
    pub fn api_is_open(&self) -> bool {
        self.api_tokens.is_empty() && self.client_tokens.is_empty()
    }

    /// How long a node may stay silent before it leaves routing.
    pub fn lease(&self) -> Duration {
        self.heartbeat_interval * self.missed_heartbeats
    }

    /// True when nodes must present a token.
    pub fn nodes_need_token(&self) -> bool {
        !self.node_tokens.is_empty() || self.node_secret.is_some()
    }
}

/// Worker threads without `limits.worker_threads`: one on a host of two
/// cores or fewer (the main thread itself, see
/// [`lingua_shared::process::block_on`]), two on a larger one. A job is
/// a few short tasks that hand off to each other, and each thread that
/// the load does not keep busy costs CPU per job in wakeups and stealing:
/// on 2 cores, one worker beside the main thread spent 0.9 times the CPU
/// per job of two at the same throughput (20 alternating pairs), 4
/// workers about 1.15 times and 16 about 1.5 times, and the main thread
/// alone 0.82 times what one worker beside it did (11 pairs); with one
/// worker per core, a 16-core machine spent about twice the 2-core
/// figure (docs/BENCHMARKS.md). Two on larger hosts until one is
/// measured there. At about 80 µs a job, one busy worker would serve
/// some 12,000 jobs/s, near one Redis's ceiling (11,600-16,200 jobs/s
/// measured on 16 cores): more load takes more instances.
pub fn default_workers(cores: usize) -> usize {
    if cores <= 2 { 1 } else { 2 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_gives_the_spec_defaults() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.listen, "127.0.0.1:7700".parse().unwrap());
        assert_eq!(config.redis_url, None);
        assert_eq!(config.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(config.lease(), Duration::from_secs(6));
        assert_eq!(config.max_nodes_per_pool, 100);
        assert_eq!(config.max_attempts, 3);
        config.check_security().unwrap();
    }

    #[test]
    fn full_spec_example_parses() {
        let config = Config::parse(
            r#"
listen = "0.0.0.0:7700"
[redis]
url = "redis://127.0.0.1:6379/0"
[auth]
node_tokens = ["long-random-secret"]
api_tokens  = ["another-secret-xyz"]
[tls]
cert_file = "/etc/lingua/coordinator.crt"
key_file  = "/etc/lingua/coordinator.key"
[nodes]
heartbeat_interval_ms = 2000
missed_heartbeats = 3
[pools]
max_nodes_per_pool = 100
[jobs]
default_timeout_ms = 30000
max_attempts = 3
"#,
        )
        .unwrap();
        assert!(config.nodes_need_token());
        assert!(config.tls.is_some());
        config.check_security().unwrap();
    }

    #[test]
    fn a_cluster_is_listed_by_its_seed_nodes_instead_of_a_url() {
        let config = Config::parse(
            "[redis]\ncluster = [\"redis://10.0.0.1:6379\", \"redis://10.0.0.2:6379\"]\n",
        )
        .unwrap();
        assert_eq!(config.redis_cluster.len(), 2);
        assert_eq!(config.redis_url, None);
        for (text, says) in [
            ("[redis]\ncluster = []\n", "at least one node"),
            (
                "[redis]\nurl = \"redis://a:1\"\ncluster = [\"redis://b:1\"]\n",
                "not both",
            ),
            ("[redis]\ncluster = [\"http://b\"]\n", "not a Redis URL"),
        ] {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(
                err.contains("redis.cluster") && err.contains(says),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn kinds_share_memory_unless_the_earlier_model_is_asked_for() {
        assert!(Config::parse("").unwrap().kinds_share_memory);
        let earlier = Config::parse("[jobs]\nkinds_share_memory = false\n").unwrap();
        assert!(!earlier.kinds_share_memory);
        let err = Config::parse("[jobs]\nkinds_share_memory = \"no\"\n").unwrap_err();
        assert!(err.to_string().contains("kinds_share_memory"), "{err}");
    }

    #[test]
    fn the_pick_policy_is_capacity_unless_random_is_asked_for() {
        assert_eq!(Config::parse("").unwrap().pick, PickPolicy::Capacity);
        let random = Config::parse("[jobs]\npick = \"random\"\n").unwrap();
        assert_eq!(random.pick, PickPolicy::Random);
        let err = Config::parse("[jobs]\npick = \"fastest\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("`capacity` or `random`"), "{err}");
    }

    #[test]
    fn worker_threads_default_to_one_on_small_hosts_and_two_on_others() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.worker_threads, None);
        let defaults: Vec<usize> = [1, 2, 3, 4, 16, 128]
            .into_iter()
            .map(|cores| config.workers(cores))
            .collect();
        assert_eq!(defaults, [1, 1, 2, 2, 2, 2]);
        let four = Config::parse("[limits]\nworker_threads = 4\n").unwrap();
        assert_eq!((four.workers(2), four.workers(64)), (4, 4));
        for text in ["worker_threads = 0", "worker_threads = 5000"] {
            let err = Config::parse(&format!("[limits]\n{text}\n")).unwrap_err();
            assert!(
                err.to_string().contains("limits.worker_threads (line 2)"),
                "{err}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_line() {
        let err =
            Config::parse("listen = \"127.0.0.1:1\"\n[nodes]\nheartbeat_ms = 5\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("heartbeat_ms") && text.contains("line 3"),
            "{text}"
        );
    }

    #[test]
    fn out_of_range_values_name_field_and_line() {
        let err = Config::parse("\n[nodes]\nmissed_heartbeats = 0\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("nodes.missed_heartbeats") && text.contains("line 3"),
            "{text}"
        );
        assert!(matches!(err, ConfigError::Invalid { line: Some(3), .. }));
        let err = Config::parse("[auth]\nclient_max_priority = 101\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("auth.client_max_priority (line 2)"), "{text}");
        let config = Config::parse("[auth]\nclient_max_priority = 100\n").unwrap();
        assert_eq!(config.client_max_priority, 100);
        assert_eq!(Config::default().client_max_priority, DEFAULT_PRIORITY);
    }

    #[test]
    fn bad_values_are_explained() {
        let err = Config::parse("listen = \"localhost\"").unwrap_err();
        assert!(err.to_string().contains("listen (line 1)"), "{err}");
        let err = Config::parse("[redis]\nurl = \"http://x\"").unwrap_err();
        assert!(err.to_string().contains("redis.url (line 2)"), "{err}");
        let err = Config::parse("[auth]\nnode_tokens = [\"short\"]").unwrap_err();
        assert!(err.to_string().contains("openssl rand"), "{err}");
        let err = Config::parse("[nodes]\nheartbeat_interval_ms = \"fast\"").unwrap_err();
        assert!(matches!(err, ConfigError::Parse(_)), "{err}");
    }

    #[test]
    fn anonymous_nodes_off_loopback_need_an_explicit_yes() {
        let config = Config::parse("listen = \"0.0.0.0:7700\"").unwrap();
        let err = config.check_security().unwrap_err();
        assert!(err.to_string().contains("allow_anonymous"), "{err}");
        let config = Config::parse(
            "listen = \"0.0.0.0:7700\"\n[auth]\nallow_anonymous = true\napi_tokens = [\"an-admin-token-0123\"]",
        )
        .unwrap();
        config.check_security().unwrap();
    }

    #[test]
    fn a_previous_node_secret_goes_with_a_new_one_and_is_as_long() {
        let both = "[auth]\nnode_secret = \"0123456789abcdef0123456789abcdef\"\nprevious_node_secret = \"fedcba9876543210fedcba9876543210\"\n";
        let config = Config::parse(both).unwrap();
        config.check_security().unwrap();
        assert!(config.previous_node_secret.is_some());
        let alone =
            Config::parse("[auth]\nprevious_node_secret = \"fedcba9876543210fedcba9876543210\"\n")
                .unwrap();
        let err = alone.check_security().unwrap_err().to_string();
        assert!(
            err.contains("auth.previous_node_secret") && err.contains("auth.node_secret"),
            "{err}"
        );
        let short = "[auth]\nnode_secret = \"0123456789abcdef0123456789abcdef\"\nprevious_node_secret = \"short\"\n";
        let err = Config::parse(short).unwrap_err().to_string();
        assert!(err.contains("auth.previous_node_secret (line 3)"), "{err}");
    }

    #[test]
    fn an_open_api_off_loopback_needs_an_explicit_yes() {
        let nodes = "listen = \"0.0.0.0:7700\"\n[auth]\nnode_secret = \"0123456789abcdef0123456789abcdef\"\n";
        let err = Config::parse(nodes).unwrap().check_security().unwrap_err();
        assert!(
            err.to_string().contains("auth.api_tokens")
                && err.to_string().contains("allow_open_api"),
            "{err}"
        );
        for extra in [
            "api_tokens = [\"an-admin-token-0123\"]",
            "client_tokens = [\"a-client-token-0123\"]",
            "allow_open_api = true",
        ] {
            let config = Config::parse(&format!("{nodes}{extra}\n")).unwrap();
            config.check_security().unwrap();
        }
        let err = Config::parse("[auth]\nnode_secret = \"short\"").unwrap_err();
        assert!(
            err.to_string().contains("auth.node_secret (line 2)"),
            "{err}"
        );
        let loopback = Config::parse("").unwrap();
        assert!(loopback.api_is_open());
        loopback.check_security().unwrap();
    }
}
