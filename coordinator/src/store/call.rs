//! One script call, built straight into the `EVALSHA` command that carries
//! it. `redis::ScriptInvocation` holds each key and argument in a buffer
//! of its own and copies them all into the command when it is sent: about
//! twenty allocations per job on the routing path (docs/BENCHMARKS.md,
//! "Allocations per job").

use redis::{Cmd, ErrorKind, RedisError, Script, ServerErrorKind, ToRedisArgs};

/// A script call under construction: its keys first, then its arguments.
pub(super) struct Call<'a> {
    script: &'a Script,
    cmd: Cmd,
    keys_left: usize,
}

impl<'a> Call<'a> {
    /// A call of `script` with `keys` keys, to be given before any
    /// argument.
    pub(super) fn new(script: &'a Script, keys: usize) -> Self {
        let mut cmd = Cmd::with_capacity(keys + 12, 512);
        cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys);
        Self {
            script,
            cmd,
            keys_left: keys,
        }
    }

    /// Adds the next key.
    pub(super) fn key(&mut self, key: impl ToRedisArgs) -> &mut Self {
        debug_assert!(self.keys_left > 0, "more keys than the call declared");
        self.keys_left = self.keys_left.saturating_sub(1);
        self.cmd.arg(key);
        self
    }

    /// Adds the next argument, once every key is in.
    pub(super) fn arg(&mut self, arg: impl ToRedisArgs) -> &mut Self {
        debug_assert_eq!(self.keys_left, 0, "an argument before the last key");
        self.cmd.arg(arg);
        self
    }

    /// Runs the call on `conn`. A Redis that lost its scripts (restarted,
    /// failed over, `SCRIPT FLUSH`) answers `NOSCRIPT`: the script is
    /// loaded and the call made once more.
    pub(super) async fn run<T: redis::FromRedisValue>(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> Result<T, RedisError> {
        debug_assert_eq!(self.keys_left, 0, "fewer keys than the call declared");
        match self.cmd.query_async(conn).await {
            Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.script.load_async(conn).await?;
                self.cmd.query_async(conn).await
            }
            reply => reply,
        }
    }
}
