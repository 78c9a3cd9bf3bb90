//! The routing path's commands on a Redis Cluster (script calls, and the
//! job's claim of its id), sent straight to the master that holds their
//! slot.
//!
//! redis-rs's cluster connection passes every command through a task of
//! its own and a channel before the node's connection, under a timer for
//! the whole request: on the routing path, where a job is two script
//! calls and a `SET`, that hop was most of what a job cost more on the
//! Cluster than on one Redis (docs/BENCHMARKS.md, "Straight to the slot's
//! master"). Every script keeps its keys in one slot, so a call's slot is
//! its first key's.
//!
//! The map of slots to masters comes from `CLUSTER SLOTS`. A call it
//! cannot place goes through the cluster connection, which follows
//! redirects and reconnects; so does a call that the master answered
//! without running (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`,
//! `READONLY`). Either makes the map stale, and it is read again (at most
//! once a second) in the background. A call whose connection failed once
//! it could have been sent is not sent again: its error says that it may
//! have run, as on one Redis.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo,
    RedisError, RedisResult, RetryMethod, Value,
};
use tokio::time::Instant;

use super::{REDIS_TIMEOUT, StoreError, certificates};

/// Slots in a Redis Cluster.
const SLOTS: usize = 16384;
/// The map is read again at most this often.
const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// No master serves the slot (in [`SlotMap::owner`]).
const NO_MASTER: u16 = u16::MAX;

/// The cluster's masters, by slot, and how to connect to them.
pub(super) struct Masters {
    /// A seed's connection settings (credentials, TLS), for any node.
    seed: ConnectionInfo,
    /// The CA `rediss://` nodes are trusted by, if not the system's roots.
    ca_file: Option<PathBuf>,
    /// The current map; `None` while stale.
    map: RwLock<Option<Arc<SlotMap>>>,
    /// A refresh is under way.
    refreshing: AtomicBool,
    /// The last refresh began then.
    last_refresh: Mutex<Option<Instant>>,
}

/// Which master serves each slot, and a connection to each.
struct SlotMap {
    /// Per slot, the index of its master in `masters`, or [`NO_MASTER`].
    owner: Vec<u16>,
    masters: Vec<MultiplexedConnection>,
}

impl Masters {
    /// The masters of the cluster that `seed` belongs to, mapped through
    /// `cluster`. A map that cannot be read now is read on first use.
    pub(super) async fn new(
        seed: &str,
        ca_file: Option<&Path>,
        cluster: &mut ClusterConnection,
    ) -> Result<Arc<Self>, StoreError> {
        let masters = Arc::new(Self {
            seed: seed.into_connection_info()?,
            ca_file: ca_file.map(Path::to_path_buf),
            map: RwLock::new(None),
            refreshing: AtomicBool::new(false),
            last_refresh: Mutex::new(None),
        });
        masters.refreshing.store(true, Ordering::Release);
        *masters
            .last_refresh
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        masters.refresh(cluster).await;
        Ok(masters)
    }

    /// Sends `cmd` to the master of its slot, or through `cluster` when it
    /// has none here or that master did not run it.
    pub(super) async fn send(
        self: &Arc<Self>,
        cluster: &mut ClusterConnection,
        cmd: &Cmd,
    ) -> RedisResult<Value> {
        let Some(mut master) = command_slot(cmd).and_then(|slot| self.master(slot, cluster)) else {
            return cluster.req_packed_command(cmd).await;
        };
        // A server's error comes as a value, for the caller to take out:
        // these are taken out here, to tell those that ran from those that
        // did not.
        let reply = match master.send_packed_command(cmd).await {
            Ok(Value::ServerError(err)) => Err(RedisError::from(err)),
            reply => reply,
        };
        match reply {
            Ok(value) => Ok(value),
            Err(err) if not_run_here(&err) => {
                self.stale(cluster);
                cluster.req_packed_command(cmd).await
            }
            Err(err) => {
                if !matches!(err.retry_method(), RetryMethod::NoRetry) {
                    self.stale(cluster);
                }
                Err(err)
            }
        }
    }

    /// The connection to the master of `slot`; `None` while the map is
    /// stale (a refresh is then started) or the slot has no master.
    fn master(
        self: &Arc<Self>,
        slot: u16,
        cluster: &ClusterConnection,
    ) -> Option<MultiplexedConnection> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(map) = map else {
            self.refresh_soon(cluster);
            return None;
        };
        let index = *map.owner.get(usize::from(slot))?;
        map.masters.get(usize::from(index)).cloned()
    }

    /// Drops the map and reads it again.
    fn stale(self: &Arc<Self>, cluster: &ClusterConnection) {
        *self.map.write().unwrap_or_else(|e| e.into_inner()) = None;
        self.refresh_soon(cluster);
    }

    /// Reads the map again in the background, unless a read is under way
    /// or began less than [`REFRESH_EVERY`] ago.
    fn refresh_soon(self: &Arc<Self>, cluster: &ClusterConnection) {
        {
            let mut last = self.last_refresh.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|at| at.elapsed() < REFRESH_EVERY)
                || self.refreshing.swap(true, Ordering::AcqRel)
            {
                return;
            }
            *last = Some(Instant::now());
        }
        let masters = self.clone();
        let mut cluster = cluster.clone();
        tokio::spawn(async move { masters.refresh(&mut cluster).await });
    }

    /// Reads the map and connects to every master in it; on failure the
    /// map stays stale and every call goes through the cluster connection.
    async fn refresh(&self, cluster: &mut ClusterConnection) {
        match self.read(cluster).await {
            Ok(map) => *self.map.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(map)),
            Err(err) => {
                tracing::warn!(error = %err, "cannot map the Redis Cluster's slots; script calls go through the cluster connection")
            }
        }
        self.refreshing.store(false, Ordering::Release);
    }

    async fn read(&self, cluster: &mut ClusterConnection) -> Result<SlotMap, StoreError> {
        let reply: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(cluster)
            .await?;
        let ranges = slot_ranges(&reply).ok_or_else(|| StoreError::Unexpected {
            script: "CLUSTER SLOTS",
            reply: format!("{reply:?}"),
        })?;
        let mut owner = vec![NO_MASTER; SLOTS];
        let mut addresses: Vec<(String, u16)> = Vec::new();
        for SlotRange { start, end, master } in ranges {
            let index = match addresses.iter().position(|known| *known == master) {
                Some(index) => index,
                None => {
                    addresses.push(master);
                    addresses.len() - 1
                }
            };
            let index = u16::try_from(index).unwrap_or(NO_MASTER);
            for slot in owner.iter_mut().take(end + 1).skip(start) {
                *slot = index;
            }
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT));
        let mut masters = Vec::with_capacity(addresses.len());
        for (host, port) in addresses {
            let info = self
                .seed
                .clone()
                .set_addr(node_addr(self.seed.addr(), host, port));
            let client = match &self.ca_file {
                Some(ca) => Client::build_with_tls(info, certificates(Some(ca))?)?,
                None => Client::open(info)?,
            };
            masters.push(
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?,
            );
        }
        Ok(SlotMap { owner, masters })
    }
}

/// Whether the master answered `err` without running the command: it is
/// not the slot's master (now), or the cluster cannot serve it yet.
fn not_run_here(err: &RedisError) -> bool {
    matches!(
        err.retry_method(),
        RetryMethod::MovedRedirect
            | RetryMethod::AskRedirect
            | RetryMethod::WaitAndRetry
            | RetryMethod::RefreshSlotsAndRetry
    ) || err.is_connection_refusal()
}

/// A node's address, reached the way the seed is (TLS or not).
fn node_addr(seed: &ConnectionAddr, host: String, port: u16) -> ConnectionAddr {
    match seed {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host,
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host, port),
    }
}

/// The slot of a command sent straight to a master: a script call's
/// (its first key's) or a `SET`'s (the job's claim in the index of job
/// pairs, sent beside the pick). `None` for anything else: those go
/// through the cluster connection.
fn command_slot(cmd: &Cmd) -> Option<u16> {
    let mut args = cmd.args_iter().map(|arg| match arg {
        redis::Arg::Simple(bytes) => Some(bytes),
        _ => None,
    });
    let name = args.next()??;
    if name.eq_ignore_ascii_case(b"SET") {
        return Some(key_slot(args.next()??));
    }
    if !name.eq_ignore_ascii_case(b"EVALSHA") {
        return None;
    }
    let _sha = args.next()??;
    let keys = args.next()??;
    if keys == b"0" {
        return None;
    }
    Some(key_slot(args.next()??))
}

/// The cluster slot of a key, honouring `{hash tags}`.
pub(super) fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % SLOTS as u16
}

/// Slots `start..=end`, served by the master at `master` (host, port).
#[derive(Debug, PartialEq, Eq)]
struct SlotRange {
    start: usize,
    end: usize,
    master: (String, u16),
}

/// The slot ranges of a `CLUSTER SLOTS` reply; `None` if it is not one.
fn slot_ranges(reply: &Value) -> Option<Vec<SlotRange>> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    ranges
        .iter()
        .map(|range| {
            let Value::Array(range) = range else {
                return None;
            };
            let [Value::Int(start), Value::Int(end), Value::Array(master), ..] = range.as_slice()
            else {
                return None;
            };
            let [host, Value::Int(port), ..] = master.as_slice() else {
                return None;
            };
            let host = match host {
                Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok()?,
                Value::SimpleString(text) => text.clone(),
                _ => return None,
            };
            let start = usize::try_from(*start).ok()?;
            let end = usize::try_from(*end).ok()?;
            if host.is_empty() || host == "?" || start > end || end >= SLOTS {
                return None;
            }
            Some(SlotRange {
                start,
                end,
                master: (host, u16::try_from(*port).ok()?),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slot_matches_redis_reference_values() {
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // An empty tag is no tag: the whole key counts.
        assert_eq!(
            key_slot(b"foo{}{bar}"),
            crc16::State::<crc16::XMODEM>::calculate(b"foo{}{bar}") % 16384
        );
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
    }

    #[test]
    fn only_script_calls_with_keys_and_sets_have_a_slot() {
        let mut call = redis::cmd("EVALSHA");
        call.arg("abc")
            .arg(2)
            .arg("{zh:en}:a")
            .arg("{zh:en}:b")
            .arg("x");
        assert_eq!(command_slot(&call), Some(key_slot(b"zh:en")));
        let mut keyless = redis::cmd("EVALSHA");
        keyless.arg("abc").arg(0).arg("x");
        assert_eq!(command_slot(&keyless), None);
        let mut set = redis::cmd("SET");
        set.arg("lingua:v1:job:{j1}:pair").arg("zh:en").arg("NX");
        assert_eq!(command_slot(&set), Some(key_slot(b"j1")));
        let mut del = redis::cmd("DEL");
        del.arg("a").arg("b");
        assert_eq!(command_slot(&del), None);
        assert_eq!(command_slot(&redis::cmd("PING")), None);
        assert_eq!(command_slot(&redis::cmd("EVALSHA")), None);
    }

    #[test]
    fn cluster_slots_replies_are_read_or_refused() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let range = |start, end, host: &str, port| {
            Value::Array(vec![
                Value::Int(start),
                Value::Int(end),
                Value::Array(vec![bulk(host), Value::Int(port), bulk("id")]),
            ])
        };
        let reply = Value::Array(vec![
            range(0, 8191, "127.0.0.1", 7000),
            range(8192, 16383, "127.0.0.1", 7001),
        ]);
        assert_eq!(
            slot_ranges(&reply),
            Some(vec![
                SlotRange {
                    start: 0,
                    end: 8191,
                    master: ("127.0.0.1".to_owned(), 7000)
                },
                SlotRange {
                    start: 8192,
                    end: 16383,
                    master: ("127.0.0.1".to_owned(), 7001)
                },
            ])
        );
        for bad in [
            Value::Nil,
            Value::Array(vec![range(0, 16384, "127.0.0.1", 7000)]),
            Value::Array(vec![range(5, 4, "127.0.0.1", 7000)]),
            Value::Array(vec![range(0, 10, "?", 7000)]),
            Value::Array(vec![range(0, 10, "127.0.0.1", 70000)]),
            Value::Array(vec![Value::Array(vec![Value::Int(0)])]),
        ] {
            assert_eq!(slot_ranges(&bad), None, "{bad:?}");
        }
    }
}
