//! Redis key names. Every key is built here, never inside a script.
//!
//! Keys carry a hash tag so that each script's keys share one Redis Cluster
//! slot: node keys are tagged by node id (`{gpu-01}`), pair keys by the pair
//! (`{zh:en}`). The two global indexes (all nodes, all pairs) are only read
//! and written by plain commands. docs/REDIS_DATA_MODEL.md lists them all.

use std::fmt;
use std::io::Write;

use lingua_shared::{JobId, JobKind, LangPair, NodeId};
use redis::{RedisWrite, ToRedisArgs};

const PREFIX: &str = "lingua:v1";

/// Global SET of every node id ever registered (for `/v1/nodes`).
pub const ALL_NODES: &str = "lingua:v1:nodes";
/// Global SET of every pair that ever had a member (for `/v1/pools`).
pub const ALL_PAIRS: &str = "lingua:v1:pairs";
/// Global ZSET coordinator instance -> presence deadline in ms (to find
/// instances that died without cleaning up).
pub const ALL_INSTANCES: &str = "lingua:v1:coordinators";

/// The keys of one coordinator instance, tagged `{<instance id>}`.
#[derive(Debug, Clone)]
pub struct InstanceKeys {
    /// STRING with a TTL: present while the instance is alive; its value
    /// is the instance's listen address.
    pub presence: String,
    /// STREAM of messages for this instance from the others: assignments
    /// for nodes whose socket it holds, answers for jobs it dispatches.
    pub inbox: String,
    /// STRING with a TTL: the instance's last minute of jobs (JSON of
    /// `recent::Stats`), rewritten every second, for the fleet view.
    pub stats: String,
}

impl InstanceKeys {
    /// The keys of `instance`.
    pub fn new(instance: &str) -> Self {
        let presence = format!("{PREFIX}:coordinator:{{{instance}}}");
        Self {
            inbox: format!("{presence}:inbox"),
            stats: format!("{presence}:stats"),
            presence,
        }
    }
}

/// The keys of one node, all tagged `{<node id>}`.
#[derive(Debug, Clone)]
pub struct NodeKeys {
    /// HASH: registration, state, epoch, owner, capacity.
    pub hash: String,
    /// STRING counter: the last epoch given out. It expires with the hash,
    /// `offline_retention_ms` after the node's last sign of life, when no
    /// connection of an older epoch can be left.
    pub epoch: String,
    /// STRING with a TTL of one lease: present while the node is alive.
    pub lease: String,
}

impl NodeKeys {
    /// The keys of `node`.
    pub fn new(node: &NodeId) -> Self {
        let hash = format!("{PREFIX}:node:{{{node}}}");
        Self {
            epoch: format!("{hash}:epoch"),
            lease: format!("{hash}:lease"),
            hash,
        }
    }
}

/// The keys of one language pair, all tagged `{<src:tgt>}`. Each is a
/// [`PairKey`]: written into the Redis command that uses it, never built
/// as a `String` first (a dozen allocations per job, docs/BENCHMARKS.md).
#[derive(Debug, Clone, Copy)]
pub struct PairKeys {
    pair: LangPair,
}

/// One routing list of a pair: the nodes with room for a kind on their
/// GPUs, or (`fallback`) on the kind's fallback executors, which take no
/// GPU memory. Its name in keys is the kind, or `<kind>@cpu` for the
/// fallback (a kind cannot contain `@`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    /// The kind.
    pub kind: JobKind,
    /// True for the fallback's room.
    pub fallback: bool,
}

impl Route {
    /// The GPU room of `kind`.
    pub fn gpu(kind: &JobKind) -> Self {
        Self {
            kind: kind.clone(),
            fallback: false,
        }
    }

    /// The fallback room of `kind`.
    pub fn fallback(kind: &JobKind) -> Self {
        Self {
            kind: kind.clone(),
            fallback: true,
        }
    }
}

impl Route {
    /// Hands `put` each piece of the route's name, in order.
    fn pieces(&self, put: &mut dyn FnMut(&str)) {
        put(self.kind.as_str());
        if self.fallback {
            put("@cpu");
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_pieces(f, |put| self.pieces(put))
    }
}

impl ToRedisArgs for Route {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        write_arg(out, |put| self.pieces(put));
    }
}

/// Writes the pieces that `pieces` hands out to a formatter.
fn write_pieces(
    f: &mut fmt::Formatter<'_>,
    pieces: impl FnOnce(&mut dyn FnMut(&str)),
) -> fmt::Result {
    let mut written = Ok(());
    pieces(&mut |piece| {
        if written.is_ok() {
            written = f.write_str(piece);
        }
    });
    written
}

/// Writes the pieces that `pieces` hands out as one argument of a Redis
/// command, straight into its buffer: no `fmt` machinery, no `String`
/// (keys are written a dozen times per job).
fn write_arg<W: ?Sized + RedisWrite>(out: &mut W, pieces: impl FnOnce(&mut dyn FnMut(&str))) {
    let mut arg = out.writer_for_next_arg();
    // A command's buffer is a `Vec`: a write into it cannot fail.
    pieces(&mut |piece| arg.write_all(piece.as_bytes()).unwrap_or(()));
}

/// A key of a pair: `lingua:v1:pair:{<src:tgt>}:<name>[:<part>]`.
#[derive(Debug, Clone, Copy)]
pub struct PairKey<'a> {
    pair: LangPair,
    name: &'static str,
    part: Part<'a>,
}

/// What follows a pair key's name.
#[derive(Debug, Clone, Copy)]
enum Part<'a> {
    None,
    Route(&'a Route),
    Text(&'a str),
}

impl PairKey<'_> {
    /// Hands `put` each piece of the key's text, in order.
    fn pieces(&self, put: &mut dyn FnMut(&str)) {
        put(PREFIX);
        put(":pair:{");
        put(self.pair.src.as_str());
        put(":");
        put(self.pair.tgt.as_str());
        put("}:");
        put(self.name);
        match self.part {
            Part::None => {}
            Part::Route(route) => {
                put(":");
                route.pieces(put);
            }
            Part::Text(text) => {
                put(":");
                put(text);
            }
        }
    }
}

impl fmt::Display for PairKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_pieces(f, |put| self.pieces(put))
    }
}

impl ToRedisArgs for PairKey<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        write_arg(out, |put| self.pieces(put));
    }
}

impl PairKeys {
    /// The keys of `pair`.
    pub fn new(pair: LangPair) -> Self {
        Self { pair }
    }

    fn key<'a>(&self, name: &'static str, part: Part<'a>) -> PairKey<'a> {
        PairKey {
            pair: self.pair,
            name,
            part,
        }
    }

    /// HASH node -> pool id.
    pub fn members(&self) -> PairKey<'static> {
        self.key("members", Part::None)
    }

    /// ZSET pool id -> number of members (non-empty pools).
    pub fn pools(&self) -> PairKey<'static> {
        self.key("pools", Part::None)
    }

    /// ZSET pool id -> number of members, only pools with room.
    pub fn room(&self) -> PairKey<'static> {
        self.key("room", Part::None)
    }

    /// STRING counter for new pool ids.
    pub fn next_pool(&self) -> PairKey<'static> {
        self.key("next_pool", Part::None)
    }

    /// ZSET node -> lease deadline in ms.
    pub fn leases(&self) -> PairKey<'static> {
        self.key("leases", Part::None)
    }

    /// ZSET node -> lease deadline: nodes with free slots on `route`.
    pub fn route<'a>(&self, route: &'a Route) -> PairKey<'a> {
        self.key("route", Part::Route(route))
    }

    /// HASH node -> free slots on `route`.
    pub fn free<'a>(&self, route: &'a Route) -> PairKey<'a> {
        self.key("free", Part::Route(route))
    }

    /// ZSET node -> lease deadline: nodes that serve `route`, room or not.
    pub fn served<'a>(&self, route: &'a Route) -> PairKey<'a> {
        self.key("served", Part::Route(route))
    }

    /// ZSET instance -> deadline (ms): coordinator instances with jobs
    /// waiting for room in the pair, to be told when a routing update
    /// shows some.
    pub fn waiting(&self) -> PairKey<'static> {
        self.key("waiting", Part::None)
    }

    /// HASH node -> its room (JSON of `lingua_shared::room::Room`), for
    /// nodes that report one: every kind's hint shrinks when any kind is
    /// assigned there.
    pub fn memory(&self) -> PairKey<'static> {
        self.key("memory", Part::None)
    }

    /// STRING: the node that served `session` last (empty session: a key
    /// nobody writes).
    pub fn session<'a>(&self, session: &'a str) -> PairKey<'a> {
        self.key("session", Part::Text(session))
    }

    /// HASH: job `id` of the pair, in the pair's slot so that the pick
    /// that chooses its node records its attempt.
    pub fn job<'a>(&self, id: &'a JobId) -> PairKey<'a> {
        self.key("job", Part::Text(id.as_str()))
    }
}

/// STRING, tagged `{<job id>}`: the pair of job `id` (its hash is in the
/// pair's slot).
pub fn job_pair(id: &JobId) -> String {
    format!("{PREFIX}:job:{{{id}}}:pair")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_their_hash_tag() {
        let node = NodeKeys::new(&NodeId::new("gpu-01").unwrap());
        assert_eq!(node.hash, "lingua:v1:node:{gpu-01}");
        assert_eq!(node.lease, "lingua:v1:node:{gpu-01}:lease");
        let pair = PairKeys::new("zh:en".parse().unwrap());
        let asr = JobKind::new("asr").unwrap();
        assert_eq!(
            pair.route(&Route::gpu(&asr)).to_string(),
            "lingua:v1:pair:{zh:en}:route:asr"
        );
        assert_eq!(
            pair.free(&Route::fallback(&asr)).to_string(),
            "lingua:v1:pair:{zh:en}:free:asr@cpu"
        );
        assert_eq!(pair.members().to_string(), "lingua:v1:pair:{zh:en}:members");
        let id = JobId::new("sess-9:utt-3").unwrap();
        assert_eq!(
            pair.job(&id).to_string(),
            "lingua:v1:pair:{zh:en}:job:sess-9:utt-3"
        );
        assert_eq!(
            pair.session("s-1").to_string(),
            "lingua:v1:pair:{zh:en}:session:s-1"
        );
        let mut cmd = redis::cmd("GET");
        cmd.arg(pair.leases());
        assert_eq!(
            cmd.get_packed_command(),
            b"*2\r\n$3\r\nGET\r\n$29\r\nlingua:v1:pair:{zh:en}:leases\r\n"
        );
        // Written into the command piece by piece, each key is still one
        // argument, the same text as its `Display`.
        let fallback = Route::fallback(&asr);
        let mut cmd = redis::cmd("MGET");
        cmd.arg(pair.free(&fallback))
            .arg(pair.job(&id))
            .arg(&fallback);
        let written = String::from_utf8(cmd.get_packed_command()).unwrap();
        let expected = [
            "MGET".to_owned(),
            pair.free(&fallback).to_string(),
            pair.job(&id).to_string(),
            "asr@cpu".to_owned(),
        ]
        .map(|arg| format!("${}\r\n{arg}\r\n", arg.len()))
        .concat();
        assert_eq!(written, format!("*4\r\n{expected}"));
    }
}
