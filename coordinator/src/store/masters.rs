//! Script calls and one-key writes on a Redis Cluster (the job's claim of
//! its id, a node's index entries), sent straight to the master that holds
//! their slot.
//!
//! redis-rs's cluster connection passes every command through a task of
//! its own and a channel before the node's connection, under a timer for
//! the whole request: on the routing path, where a job is two script
//! calls and a `SET`, that hop was most of what a job cost more on the
//! Cluster than on one Redis (docs/BENCHMARKS.md, "Straight to the slot's
//! master"). With thousands of requests in flight at once, as when every
//! node registers again after a restart, its task took nearly half the
//! coordinator's CPU ("The reconnect storm, explained; waiting for a
//! CPU"). Every script keeps its keys in one slot, so a call's slot is
//! its first key's.
//!
//! The map of slots to masters comes from `CLUSTER SLOTS`, read on first
//! use and again, in the background and at most once a second, when a
//! master answers `MOVED` or `READONLY` (the slot has a new master) or a
//! connection to a master fails. A call the map cannot place goes through
//! the cluster connection, which follows redirects and reconnects; so does
//! a call that a master answered without running it (`MOVED`, `ASK`,
//! `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`, `LOADING`, `READONLY`). A
//! script call whose connection failed once it could have been sent is
//! not sent again: its error says that it may have run, as on one Redis;
//! the one-key writes, which leave the same state however often they run,
//! are sent again, through the cluster connection.

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
use crate::metrics::Metrics;

/// Slots in a Redis Cluster.
const SLOTS: usize = 16384;
/// The map is read again at most this often.
const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// No master serves the slot here (in [`SlotMap::owner`]).
const NO_MASTER: u16 = u16::MAX;

/// A master's address: host and port, as `CLUSTER SLOTS` gives them.
type Address = (String, u16);

/// The cluster's masters, by slot, and how to connect to them.
pub(super) struct Masters {
    /// A seed's connection settings (credentials, TLS), for any node.
    seed: ConnectionInfo,
    /// The CA `rediss://` nodes are trusted by, if not the system's roots.
    ca_file: Option<PathBuf>,
    /// The current map; `None` before the first read and once a
    /// connection in it failed.
    map: RwLock<Option<Arc<SlotMap>>>,
    /// A read of the map is under way.
    refreshing: AtomicBool,
    /// The last read began then.
    last_refresh: Mutex<Option<Instant>>,
    /// The last read failed (it was logged as a warning; the next
    /// failures are not, until one succeeds).
    failing: AtomicBool,
    /// Counts the maps read.
    metrics: Arc<Metrics>,
}

/// Which master serves each slot, and a connection to each.
struct SlotMap {
    /// Per slot, the index of its master in `masters`, or [`NO_MASTER`].
    owner: Vec<u16>,
    masters: Vec<(Address, MultiplexedConnection)>,
}

impl Masters {
    /// The masters of the cluster that `seed` belongs to; they are mapped
    /// on first use (a store that never sends a command they take never
    /// maps them).
    pub(super) fn new(
        seed: &str,
        ca_file: Option<&Path>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, StoreError> {
        Ok(Arc::new(Self {
            seed: seed.into_connection_info()?,
            ca_file: ca_file.map(Path::to_path_buf),
            map: RwLock::new(None),
            refreshing: AtomicBool::new(false),
            last_refresh: Mutex::new(None),
            failing: AtomicBool::new(false),
            metrics,
        }))
    }

    /// Sends `cmd` to the master of its slot, or through `cluster` when it
    /// has none here or that master did not run it.
    pub(super) async fn send(
        self: &Arc<Self>,
        cluster: &mut ClusterConnection,
        cmd: &Cmd,
    ) -> RedisResult<Value> {
        let Some(mut master) = command_slot(cmd).and_then(|slot| self.master(slot, cluster)) else {
            return through_cluster(cluster, cmd).await;
        };
        // A server's error comes as a value, for the caller to take out:
        // it is taken out here, to tell the errors of calls that ran from
        // those of calls that did not.
        let reply = match master.send_packed_command(cmd).await {
            Ok(Value::ServerError(err)) => Err(RedisError::from(err)),
            reply => reply,
        };
        let Err(err) = reply else {
            return reply;
        };
        match err.retry_method() {
            // The call's own error (a script's, or NOSCRIPT): the caller's,
            // as from any connection.
            RetryMethod::NoRetry => Err(err),
            // Not run: the slot has another master now.
            RetryMethod::MovedRedirect | RetryMethod::RefreshSlotsAndRetry => {
                self.refresh_soon(cluster);
                through_cluster(cluster, cmd).await
            }
            // Not run: the slot is moving, or the cluster cannot serve it
            // yet; the map stands.
            RetryMethod::AskRedirect | RetryMethod::WaitAndRetry => {
                through_cluster(cluster, cmd).await
            }
            // The connection failed: the call may have run; running a
            // one-key write again changes nothing, a script call may.
            _ => {
                *self.map.write().unwrap_or_else(|e| e.into_inner()) = None;
                self.refresh_soon(cluster);
                if named(cmd, &ONE_KEY_WRITES) {
                    through_cluster(cluster, cmd).await
                } else {
                    Err(err)
                }
            }
        }
    }

    /// The connection to the master of `slot`; `None` when the slot has
    /// no master here, or there is no map yet (its read is then started).
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
        map.masters
            .get(usize::from(index))
            .map(|(_, conn)| conn.clone())
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

    /// Reads the map; on failure the one in use stays (or there is none,
    /// and every call goes through the cluster connection).
    async fn refresh(&self, cluster: &mut ClusterConnection) {
        match self.read(cluster).await {
            Ok(map) => {
                *self.map.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(map));
                self.metrics.cluster_slot_maps.inc();
                if self.failing.swap(false, Ordering::AcqRel) {
                    tracing::info!("the Redis Cluster's slots are mapped again");
                }
            }
            Err(err) if self.failing.swap(true, Ordering::AcqRel) => {
                tracing::debug!(error = %err, "cannot map the Redis Cluster's slots");
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot map the Redis Cluster's slots; script calls and one-key writes go through the cluster connection until they are");
            }
        }
        self.refreshing.store(false, Ordering::Release);
    }

    /// Reads `CLUSTER SLOTS` and connects to each master in it, keeping
    /// the connections of the map in use to masters still there. A master
    /// that cannot be reached now is left out (its slots go through the
    /// cluster connection until the next read).
    async fn read(&self, cluster: &mut ClusterConnection) -> Result<SlotMap, StoreError> {
        let reply: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(cluster)
            .await?;
        let ranges = slot_ranges(&reply).ok_or_else(|| StoreError::Unexpected {
            script: "CLUSTER SLOTS",
            reply: format!("{reply:?}"),
        })?;
        let current = self.map.read().unwrap_or_else(|e| e.into_inner()).clone();
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT));
        let mut owner = vec![NO_MASTER; SLOTS];
        let mut masters: Vec<(Address, MultiplexedConnection)> = Vec::new();
        for SlotRange { start, end, master } in ranges {
            let index = match masters.iter().position(|(known, _)| *known == master) {
                Some(index) => index,
                None => {
                    let kept = current.as_ref().and_then(|map| {
                        map.masters
                            .iter()
                            .find(|(known, _)| *known == master)
                            .map(|(_, conn)| conn.clone())
                    });
                    let conn = match kept {
                        Some(conn) => conn,
                        None => match self.connect(&master, &config).await {
                            Ok(conn) => conn,
                            Err(err) => {
                                tracing::debug!(host = %master.0, port = master.1, error = %err, "cannot connect to a Redis Cluster master");
                                continue;
                            }
                        },
                    };
                    masters.push((master, conn));
                    masters.len() - 1
                }
            };
            let index = u16::try_from(index).unwrap_or(NO_MASTER);
            for slot in owner.iter_mut().take(end + 1).skip(start) {
                *slot = index;
            }
        }
        Ok(SlotMap { owner, masters })
    }

    /// A new connection to the master at `address`.
    async fn connect(
        &self,
        (host, port): &Address,
        config: &AsyncConnectionConfig,
    ) -> Result<MultiplexedConnection, StoreError> {
        let info = self
            .seed
            .clone()
            .set_addr(node_addr(self.seed.addr(), host.clone(), *port));
        let client = match &self.ca_file {
            Some(ca) => Client::build_with_tls(info, certificates(Some(ca))?)?,
            None => Client::open(info)?,
        };
        Ok(client
            .get_multiplexed_async_connection_with_config(config)
            .await?)
    }
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

/// Times a call is sent through the cluster connection, at most, while
/// its answers say that it did not run.
const CLUSTER_TRIES: usize = 4;

/// `cmd` through the cluster connection, sent again while the answer
/// says it did not run (`MOVED`, `ASK`, `TRYAGAIN`, ...): that connection
/// follows redirects itself, but within a budget of tries that a
/// reconnection after dropped connections can spend before the redirect
/// it then meets.
async fn through_cluster(cluster: &mut ClusterConnection, cmd: &Cmd) -> RedisResult<Value> {
    let mut tries = 1;
    loop {
        let reply = cluster.req_packed_command(cmd).await;
        let not_run = reply.as_ref().is_err_and(|err| {
            matches!(
                err.retry_method(),
                RetryMethod::MovedRedirect
                    | RetryMethod::AskRedirect
                    | RetryMethod::WaitAndRetry
                    | RetryMethod::RefreshSlotsAndRetry
            )
        });
        if !not_run || tries == CLUSTER_TRIES {
            return reply;
        }
        tries += 1;
    }
}

/// Commands sent straight to a master when they come alone: each has
/// one key, its first argument. `SET` claims a job's id beside its pick;
/// `SADD` and `HSET` index a node as it registers, 10,000 at once in a
/// reconnect storm: sent straight, the restarted coordinator spent less
/// than half the CPU it spent with them on the cluster connection
/// (docs/BENCHMARKS.md, "The reconnect storm, explained; waiting for a
/// CPU").
///
/// Each leaves the same state however often it runs, so each is sent
/// again, through the cluster connection, when its master's connection
/// fails (as that connection itself would do): a node's index entries
/// stay whole through a failover, and so does a job's claim of its id.
/// That claim (`SET NX GET`) run twice finds the second time the job's
/// own pair, which it takes as its own (`Store::settle_claim`).
const ONE_KEY_WRITES: [&[u8]; 3] = [b"SET", b"SADD", b"HSET"];

/// True when `cmd` is one of `names` (in any case).
fn named(cmd: &Cmd, names: &[&[u8]]) -> bool {
    match cmd.args_iter().next() {
        Some(redis::Arg::Simple(name)) => {
            names.iter().any(|known| name.eq_ignore_ascii_case(known))
        }
        _ => false,
    }
}

/// The slot of a command sent straight to a master: a script call's
/// (its first key's) or a write's of [`ONE_KEY_WRITES`]. `None` for
/// anything else: those go through the cluster connection.
fn command_slot(cmd: &Cmd) -> Option<u16> {
    let mut args = cmd.args_iter().map(|arg| match arg {
        redis::Arg::Simple(bytes) => Some(bytes),
        _ => None,
    });
    let name = args.next()??;
    if named(cmd, &ONE_KEY_WRITES) {
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

/// Slots `start..=end`, served by the master at `master`.
#[derive(Debug, PartialEq, Eq)]
struct SlotRange {
    start: usize,
    end: usize,
    master: Address,
}

/// The slot ranges of a `CLUSTER SLOTS` reply whose master's address is
/// known (a range without one goes through the cluster connection);
/// `None` if the reply is not one.
fn slot_ranges(reply: &Value) -> Option<Vec<SlotRange>> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    if ranges.len() > SLOTS {
        return None;
    }
    Some(ranges.iter().filter_map(slot_range).collect())
}

/// One range of a `CLUSTER SLOTS` reply: first slot, last slot, then the
/// master as host, port and more.
fn slot_range(range: &Value) -> Option<SlotRange> {
    let Value::Array(range) = range else {
        return None;
    };
    let [Value::Int(start), Value::Int(end), Value::Array(master), ..] = range.as_slice() else {
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
    fn only_script_calls_with_keys_and_one_key_writes_have_a_slot() {
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
        let mut index = redis::cmd("sadd");
        index.arg("lingua:v1:nodes").arg("gpu-1");
        assert_eq!(command_slot(&index), Some(key_slot(b"lingua:v1:nodes")));
        let mut pools = redis::cmd("HSET");
        pools.arg("lingua:v1:node:{gpu-1}").arg("pools").arg("{}");
        assert_eq!(command_slot(&pools), Some(key_slot(b"gpu-1")));
        let mut read = redis::cmd("SMEMBERS");
        read.arg("lingua:v1:nodes");
        assert_eq!(command_slot(&read), None);
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
        // A range without a master's address is left out, the others stay.
        for bad in [
            range(0, 16384, "127.0.0.1", 7000),
            range(5, 4, "127.0.0.1", 7000),
            range(0, 10, "?", 7000),
            range(0, 10, "", 7000),
            range(0, 10, "127.0.0.1", 70000),
            Value::Array(vec![Value::Int(0)]),
            Value::Array(vec![
                Value::Int(0),
                Value::Int(10),
                Value::Array(vec![Value::Nil, Value::Int(7000)]),
            ]),
        ] {
            let reply = Value::Array(vec![bad, range(11, 20, "127.0.0.1", 7001)]);
            assert_eq!(
                slot_ranges(&reply),
                Some(vec![SlotRange {
                    start: 11,
                    end: 20,
                    master: ("127.0.0.1".to_owned(), 7001)
                }]),
                "{reply:?}"
            );
        }
        assert_eq!(slot_ranges(&Value::Nil), None);
        assert_eq!(
            slot_ranges(&Value::Array(vec![Value::Nil; SLOTS + 1])),
            None
        );
    }
}
