//! A private `redis-server`, owned by this process.
//!
//! With no Redis URL configured, the coordinator runs its own Redis on a
//! unix socket in a temporary directory. The server must never outlive its
//! owner, even one killed with SIGKILL, so it is started under a small shell
//! guardian whose standard input is a pipe from us: when our end closes (we
//! exited, crashed or were killed) the guardian reads end-of-file and stops
//! the server. No signal handling or `unsafe` prctl call is needed.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::process::{Child, ChildStdin, Command};
use tokio::time::Instant;

/// How long a fresh server has to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`PrivateRedis::stop`] waits for the server to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the server (`$0`, arguments `$@`) and stops it when standard input
/// reaches end-of-file; exits when the server exits, so a server that fails
/// to start is noticed at once.
///
/// An asynchronous list's standard input is /dev/null in a non-interactive
/// shell, so the pipe is handed to the watcher as fd 3.
const GUARDIAN: &str = r#"exec 3<&0
"$0" "$@" 3<&- </dev/null &
pid=$!
{ while read -r _; do :; done; kill -TERM "$pid" 2>/dev/null; } <&3 &
exec 3<&-
wait "$pid"
"#;

/// Why a private Redis could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PrivateRedisError {
    /// `redis-server` is not on PATH.
    #[error(
        "redis-server was not found on PATH; install it (Debian/Ubuntu: `apt-get install redis-server`, \
         macOS: `brew install redis`) or point to an existing Redis with --redis-url"
    )]
    NotInstalled,
    /// The temporary directory or the guardian process could not be created.
    #[error("could not start redis-server: {0}")]
    Spawn(#[source] std::io::Error),
    /// The server did not answer PING in time.
    #[error("redis-server did not become ready within {timeout:?}; its log says: {log}")]
    NotReady {
        /// How long we waited.
        timeout: Duration,
        /// The end of the server's log file.
        log: String,
    },
}

/// A running private `redis-server`. Dropping it stops the server (the
/// guardian sees its pipe close); [`PrivateRedis::stop`] also waits for it.
#[derive(Debug)]
pub struct PrivateRedis {
    guardian: Child,
    lifeline: Option<ChildStdin>,
    socket: PathBuf,
    binary: PathBuf,
    /// Arguments beyond the socket and directory (persistence, port,
    /// cluster mode), kept for [`PrivateRedis::restart`].
    args: Vec<String>,
    port: Option<u16>,
    dir: tempfile::TempDir,
}

impl PrivateRedis {
    /// Starts `redis-server` on a unix socket in a new temporary directory,
    /// without persistence, and waits until it answers PING.
    pub async fn start() -> Result<Self, PrivateRedisError> {
        let binary = locate(std::env::var_os("PATH").as_deref())?;
        Self::start_binary(&binary, false).await
    }

    /// Starts a server that is one node of a Redis Cluster, on the unix
    /// socket and also on TCP `port` of 127.0.0.1 (cluster nodes find each
    /// other over TCP; the cluster bus uses `port + 10000`). The caller
    /// forms the cluster (`redis-cli --cluster create`).
    pub async fn start_cluster_node(port: u16) -> Result<Self, PrivateRedisError> {
        let binary = locate(std::env::var_os("PATH").as_deref())?;
        let args = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
            "--cluster-node-timeout",
            "5000",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        .map(str::to_owned);
        Self::start_with(&binary, args.to_vec(), Some(port)).await
    }

    /// Like [`PrivateRedis::start`], with an append-only file synced on
    /// every write, so that [`PrivateRedis::restart`] keeps the data (the
    /// fault-injection tests restart Redis under load).
    pub async fn start_durable() -> Result<Self, PrivateRedisError> {
        let binary = locate(std::env::var_os("PATH").as_deref())?;
        Self::start_binary(&binary, true).await
    }

    /// Starts the server binary given, durable or not.
    pub async fn start_binary(binary: &Path, durable: bool) -> Result<Self, PrivateRedisError> {
        let persistence: &[&str] = if durable {
            &[
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ]
        } else {
            &["--save", "", "--appendonly", "no"]
        };
        let mut args = vec!["--port".to_owned(), "0".to_owned()];
        args.extend(persistence.iter().map(|a| (*a).to_owned()));
        Self::start_with(binary, args, None).await
    }

    async fn start_with(
        binary: &Path,
        args: Vec<String>,
        port: Option<u16>,
    ) -> Result<Self, PrivateRedisError> {
        let dir = tempfile::Builder::new()
            .prefix("lingua-redis-")
            .tempdir()
            .map_err(PrivateRedisError::Spawn)?;
        let socket = dir.path().join("redis.sock");
        let mut guardian = spawn(binary, dir.path(), &socket, &args)?;
        let lifeline = guardian.stdin.take();
        let mut redis = Self {
            guardian,
            lifeline,
            socket,
            binary: binary.to_owned(),
            args,
            port,
            dir,
        };
        if let Err(err) = redis.wait_ready().await {
            redis.stop().await;
            return Err(err);
        }
        Ok(redis)
    }

    /// The URL clients use: `redis+unix:///…/redis.sock`.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }

    /// The server's unix socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// `redis://127.0.0.1:PORT` for a cluster node (see
    /// [`PrivateRedis::start_cluster_node`]).
    pub fn tcp_url(&self) -> Option<String> {
        self.port.map(|port| format!("redis://127.0.0.1:{port}"))
    }

    /// Stops the server and waits (bounded) for it to exit.
    pub async fn stop(mut self) {
        self.halt().await;
    }

    /// Stops the server (SIGTERM: a durable one syncs its file) and starts
    /// it again on the same socket and directory. A server that is not
    /// durable comes back empty.
    pub async fn restart(&mut self) -> Result<(), PrivateRedisError> {
        self.halt().await;
        self.guardian = spawn(&self.binary, self.dir.path(), &self.socket, &self.args)?;
        self.lifeline = self.guardian.stdin.take();
        self.wait_ready().await
    }

    async fn halt(&mut self) {
        self.lifeline.take();
        if tokio::time::timeout(STOP_TIMEOUT, self.guardian.wait())
            .await
            .is_err()
        {
            let _ = self.guardian.kill().await;
        }
    }

    async fn wait_ready(&mut self) -> Result<(), PrivateRedisError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut pause = Duration::from_millis(5);
        loop {
            if ping(&self.socket).await {
                return Ok(());
            }
            let exited = matches!(self.guardian.try_wait(), Ok(Some(_)));
            if exited || Instant::now() >= deadline {
                return Err(PrivateRedisError::NotReady {
                    timeout: START_TIMEOUT,
                    log: log_tail(&self.dir.path().join("redis.log")),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }
}

/// Starts the guardian running the server on `socket`, files in `dir`.
fn spawn(
    binary: &Path,
    dir: &Path,
    socket: &Path,
    args: &[String],
) -> Result<Child, PrivateRedisError> {
    Command::new("sh")
        .arg("-c")
        .arg(GUARDIAN)
        .arg(binary)
        .arg("--unixsocket")
        .arg(socket)
        .args(["--unixsocketperm", "700"])
        .args(args)
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(PrivateRedisError::Spawn)
}

/// True when a server on `socket` answers PING with PONG.
async fn ping(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket).await else {
        return false;
    };
    if stream.write_all(b"*1\r\n$4\r\nPING\r\n").await.is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut reply)).await,
        Ok(Ok(_))
    ) && &reply == b"+PONG\r\n"
}

/// Finds `redis-server` in the directories of a PATH-style list.
pub fn locate(path: Option<&OsStr>) -> Result<PathBuf, PrivateRedisError> {
    path.into_iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| candidate.is_file())
        .ok_or(PrivateRedisError::NotInstalled)
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        return "(no log written)".to_owned();
    }
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}
