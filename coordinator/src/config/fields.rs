//! The configuration file as written (unknown keys rejected), and the
//! checks of single fields: tokens, durations, the listen address, Redis.

use lingua_shared::config_check::check_ca_file;

use super::*;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) listen: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) redis: RawRedis,
    #[serde(default)]
    pub(super) auth: RawAuth,
    pub(super) tls: Option<RawTls>,
    #[serde(default)]
    pub(super) nodes: RawNodes,
    #[serde(default)]
    pub(super) pools: RawPools,
    #[serde(default)]
    pub(super) jobs: RawJobs,
    #[serde(default)]
    pub(super) limits: RawLimits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedis {
    pub(super) url: Option<Spanned<String>>,
    pub(super) cluster: Option<Spanned<Vec<String>>>,
    pub(super) ca_file: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) node_tokens: Option<Spanned<Vec<String>>>,
    pub(super) node_secret: Option<Spanned<String>>,
    pub(super) previous_node_secret: Option<Spanned<String>>,
    pub(super) api_tokens: Option<Spanned<Vec<String>>>,
    pub(super) client_tokens: Option<Spanned<Vec<String>>>,
    pub(super) client_max_priority: Option<Spanned<u8>>,
    #[serde(default)]
    pub(super) allow_anonymous: bool,
    #[serde(default)]
    pub(super) allow_open_api: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert_file: PathBuf,
    pub(super) key_file: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNodes {
    pub(super) heartbeat_interval_ms: Option<Spanned<u64>>,
    pub(super) missed_heartbeats: Option<Spanned<u32>>,
    pub(super) max_pairs: Option<Spanned<u32>>,
    pub(super) offline_retention_ms: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_connections: Option<Spanned<u32>>,
    pub(super) header_read_timeout_ms: Option<Spanned<u64>>,
    pub(super) worker_threads: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPools {
    pub(super) max_nodes_per_pool: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJobs {
    pub(super) default_timeout_ms: Option<Spanned<u64>>,
    pub(super) max_attempts: Option<Spanned<u32>>,
    pub(super) accept_timeout_ms: Option<Spanned<u64>>,
    pub(super) result_ttl_ms: Option<Spanned<u64>>,
    pub(super) pick: Option<PickPolicy>,
    pub(super) max_queued: Option<Spanned<u32>>,
    pub(super) kinds_share_memory: Option<bool>,
}

pub(super) fn tokens(
    check: Checker<'_>,
    field: &str,
    value: Option<Spanned<Vec<String>>>,
) -> Result<Vec<String>, ConfigError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let span = value.span();
    let tokens = value.into_inner();
    if let Some(short) = tokens
        .iter()
        .position(|t| t.chars().count() < MIN_TOKEN_LEN)
    {
        return Err(check.invalid(
            field,
            span,
            format!(
                "token #{} is shorter than {MIN_TOKEN_LEN} characters; generate one with `openssl rand -hex 32`",
                short + 1
            ),
        ));
    }
    Ok(tokens)
}

/// A duration field given in ms, checked against `bounds` (ms); the
/// default is [`Config::default`]'s, written once there.
pub(super) fn duration(
    check: Checker<'_>,
    field: &str,
    value: Option<Spanned<u64>>,
    default: Duration,
    bounds: std::ops::RangeInclusive<u64>,
) -> Result<Duration, ConfigError> {
    let default = u64::try_from(default.as_millis()).unwrap_or(u64::MAX);
    Ok(Duration::from_millis(
        check.range(field, value, default, bounds)?,
    ))
}

pub(super) fn node_secret(
    check: Checker<'_>,
    key: &'static str,
    value: Option<Spanned<String>>,
) -> Result<Option<String>, ConfigError> {
    let Some(value) = value else {
        return Ok(None);
    };
    if value.get_ref().chars().count() < MIN_SECRET_LEN {
        return Err(check.invalid(
            key,
            value.span(),
            format!(
                "the node secret is shorter than {MIN_SECRET_LEN} characters; generate one with `openssl rand -hex 32`"
            ),
        ));
    }
    Ok(Some(value.into_inner()))
}

/// The `listen` address, or the default.
pub(super) fn listen(
    check: Checker<'_>,
    value: Option<Spanned<String>>,
    default: SocketAddr,
) -> Result<SocketAddr, ConfigError> {
    let listen = match value {
        None => default,
        Some(listen) => {
            let span = listen.span();
            match listen.get_ref().parse() {
                Ok(addr) => addr,
                Err(_) => {
                    return Err(check.invalid(
                        "listen",
                        span,
                        format!(
                            "{:?} is not an address; write it as \"127.0.0.1:7700\"",
                            listen.get_ref()
                        ),
                    ));
                }
            }
        }
    };
    Ok(listen)
}

/// `[redis]`: one Redis by URL, or a cluster by its seeds, not both.
pub(super) fn redis(
    check: Checker<'_>,
    raw: RawRedis,
) -> Result<(Option<String>, Vec<String>), ConfigError> {
    let redis_url = match raw.url {
        None => None,
        Some(url) => {
            let span = url.span();
            let url = url.into_inner();
            if let Err(message) = check_redis_url(&url) {
                return Err(check.invalid("redis.url", span, message));
            }
            Some(url)
        }
    };
    let redis_cluster = match raw.cluster {
        None => Vec::new(),
        Some(seeds) => {
            let span = seeds.span();
            let seeds = seeds.into_inner();
            if seeds.is_empty() {
                return Err(check.invalid(
                    "redis.cluster",
                    span,
                    "list at least one node of the cluster, e.g. [\"redis://10.0.0.1:6379\"]",
                ));
            }
            if redis_url.is_some() {
                return Err(check.invalid(
                    "redis.cluster",
                    span,
                    "set redis.url (one Redis) or redis.cluster (a Redis Cluster), not both",
                ));
            }
            if let Some(message) = seeds.iter().find_map(|url| check_redis_url(url).err()) {
                return Err(check.invalid("redis.cluster", span, message));
            }
            seeds
        }
    };
    Ok((redis_url, redis_cluster))
}

pub(super) fn check_redis_url(url: &str) -> Result<(), String> {
    redis::Client::open(url).map(drop).map_err(|e| {
        format!("{url:?} is not a Redis URL ({e}); use redis://HOST:PORT/DB, rediss://HOST:PORT/DB (TLS) or redis+unix:///PATH")
    })
}

/// `[redis] ca_file`: a readable PEM file of at least one certificate.
pub(super) fn redis_ca_file(
    check: Checker<'_>,
    raw: Option<Spanned<PathBuf>>,
) -> Result<Option<PathBuf>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let span = raw.span();
    let path = raw.into_inner();
    check_ca_file(&path).map_err(|message| check.invalid("redis.ca_file", span, message))?;
    Ok(Some(path))
}
