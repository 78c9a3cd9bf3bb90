//! Pieces for whole-fleet runs (`lingua-bench`, the fault-injection test):
//! the real binaries as child processes, a proxy that can blackhole a
//! link, a counting inference service, and readings from `/proc` and
//! Redis `INFO`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lingua_shared::sync::lock;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::RedisBackend;

/// A binary of this workspace, built beside the running executable (which
/// is `target/<profile>/` for binaries, `target/<profile>/deps/` for tests).
///
/// # Errors
/// When it is not built, with the command that builds it.
pub fn workspace_binary(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("no path to this executable: {e}"))?;
    let mut dir = exe.parent();
    while let Some(candidate) = dir {
        let binary = candidate.join(name);
        if binary.is_file() {
            return Ok(binary);
        }
        if candidate.file_name().is_some_and(|n| n == "target") {
            break;
        }
        dir = candidate.parent();
    }
    Err(format!(
        "{name} is not built next to {}: run `cargo build --release --workspace` (or without --release, to match)",
        exe.display()
    ))
}

/// The log filter of the binaries these tests start: errors only, unless
/// `LINGUA_TEST_LOG` says otherwise (`LINGUA_TEST_LOG=info` shows what
/// each coordinator and agent did, on stderr, to follow a failing run).
fn child_log() -> String {
    std::env::var("LINGUA_TEST_LOG").unwrap_or_else(|_| "error".into())
}

/// Writes `config` (agent TOML) to `path` and starts the real
/// `lingua-agent` binary on it: errors only on stderr (see
/// [`child_log`]), killed on drop.
///
/// # Errors
/// When the binary is missing, the file cannot be written or the process
/// cannot start.
pub fn spawn_agent(path: &Path, config: &str) -> Result<Child, String> {
    std::fs::write(path, config).map_err(|e| format!("write {}: {e}", path.display()))?;
    Command::new(workspace_binary("lingua-agent")?)
        .arg("--config")
        .arg(path)
        .env("LINGUA_LOG", child_log())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("start lingua-agent: {e}"))
}

/// A coordinator config for fleet tests: fast heartbeats (a silent node
/// leaves after 600 ms), a 1 s accept timeout, five attempts per job.
pub const FAST_COORDINATOR: &str = "
[nodes]
heartbeat_interval_ms = 200
missed_heartbeats = 3
[jobs]
max_attempts = 5
accept_timeout_ms = 1000
";

/// A free local TCP address (bound and released: a process started next
/// binds it; the small race is acceptable for benchmarks and tests).
///
/// # Panics
/// When no local port can be bound.
pub fn free_local_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a local port");
    listener
        .local_addr()
        .expect("a bound listener has an address")
}

/// The real `lingua-coordinator` binary, running as a child process.
pub struct CoordinatorProcess {
    child: Child,
    /// Where it serves.
    pub addr: SocketAddr,
}

impl CoordinatorProcess {
    /// Starts the coordinator on `addr` with `config` (TOML text, written
    /// under `dir`), using `redis`, and waits until `/healthz` answers 200.
    ///
    /// # Errors
    /// When the binary is missing or it does not become healthy.
    pub async fn start(
        dir: &Path,
        redis: &impl RedisBackend,
        addr: SocketAddr,
        config: &str,
    ) -> Result<Self, String> {
        let binary = workspace_binary("lingua-coordinator")?;
        let path = dir.join(format!("coordinator-{}.toml", addr.port()));
        std::fs::write(&path, config).map_err(|e| format!("write {}: {e}", path.display()))?;
        let child = Command::new(binary)
            .arg("--config")
            .arg(&path)
            .arg("--listen")
            .arg(addr.to_string())
            .args(redis.coordinator_args())
            .env("LINGUA_LOG", child_log())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("start lingua-coordinator: {e}"))?;
        let mut process = Self { child, addr };
        process.healthy().await?;
        Ok(process)
    }

    async fn healthy(&mut self) -> Result<(), String> {
        let url = format!("http://{}/healthz", self.addr);
        let client = reqwest::Client::new();
        for _ in 0..1000 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("lingua-coordinator exited at start: {status}"));
            }
            if let Ok(response) = client.get(&url).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err("lingua-coordinator did not become healthy within 10 s".into())
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// `ws://…/v1/node`
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/node", self.addr)
    }

    /// `http://…{path}`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// SIGKILLs it and reaps it.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// Stops it as systemd does (SIGTERM) and returns how it exited.
    ///
    /// # Panics
    /// When it has not exited 30 s after the signal (its stop is bounded
    /// by about 20 s).
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        crate::signal::terminate(&mut self.child, Duration::from_secs(30)).await
    }
}

/// CPU time, time spent waiting for a CPU, and resident memory of a
/// process, from `/proc`.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    /// User plus system CPU time so far.
    pub cpu: Duration,
    /// Time its threads were ready to run but waited for a CPU so far
    /// (the run queue; threads that ended are not counted); `None` on a
    /// kernel that keeps no `schedstat`.
    pub waited: Option<Duration>,
    /// Resident set size, KiB.
    pub rss_kib: u64,
}

/// Reads `/proc/<pid>/stat`, `/proc/<pid>/status` and each thread's
/// `/proc/<pid>/task/<tid>/schedstat`.
///
/// # Errors
/// When the process is gone or `/proc` is not Linux's.
pub fn proc_sample(pid: u32) -> std::io::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: utime and stime are fields 14 and 15 of the whole line.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| std::io::Error::other("unexpected /proc stat format"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .unwrap_or(100);
    let cpu_ms = (ticks(11) + ticks(12)) * 1000 / ticks_per_second;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(ProcSample {
        cpu: Duration::from_millis(cpu_ms),
        waited: run_queue_wait(pid)?,
        rss_kib,
    })
}

/// The run-queue wait of every thread of `pid`: the second field of each
/// thread's `schedstat`, in nanoseconds; `None` when no thread has one (a
/// kernel built without it).
fn run_queue_wait(pid: u32) -> std::io::Result<Option<Duration>> {
    let mut waited = None;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread may end between the listing and the read.
        let Ok(schedstat) = std::fs::read_to_string(task?.path().join("schedstat")) else {
            continue;
        };
        let ns = schedstat
            .split_whitespace()
            .nth(1)
            .and_then(|ns| ns.parse::<u64>().ok())
            .unwrap_or(0);
        waited = Some(waited.unwrap_or(0) + ns);
    }
    Ok(waited.map(Duration::from_nanos))
}

/// The host's CPU time so far, and how much of it the hypervisor gave to
/// other guests (`steal`), from the `cpu` line of `/proc/stat`, in clock
/// ticks.
///
/// # Errors
/// When `/proc/stat` cannot be read or has no `cpu` line.
pub fn host_steal() -> std::io::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let ticks: Vec<u64> = stat
        .lines()
        .find_map(|line| line.strip_prefix("cpu "))
        .ok_or_else(|| std::io::Error::other("no cpu line in /proc/stat"))?
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice;
    // guest time is already counted in user time.
    let total = ticks.iter().take(8).sum();
    Ok((ticks.get(7).copied().unwrap_or(0), total))
}

/// Counters from Redis `INFO`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RedisCounters {
    /// Commands processed so far (a script call is one).
    pub commands: u64,
    /// Script calls so far (EVALSHA and EVAL).
    pub scripts: u64,
    /// CPU time of the server so far.
    pub cpu: Duration,
    /// Time its threads waited for a CPU so far; `None` unless the process
    /// `INFO` names is a `redis-server` on this host that keeps a
    /// `schedstat` (a server in another host or container names a process
    /// id of its own namespace).
    pub waited: Option<Duration>,
}

/// Reads [`RedisCounters`].
///
/// # Errors
/// When Redis does not answer.
pub async fn redis_counters(
    conn: &mut redis::aio::MultiplexedConnection,
) -> redis::RedisResult<RedisCounters> {
    let info: String = redis::cmd("INFO").arg("all").query_async(conn).await?;
    let field = |name: &str| -> Option<&str> {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
    };
    let number = |name: &str| field(name).and_then(|v| v.trim().parse::<f64>().ok());
    let calls = |name: &str| {
        field(name)
            .and_then(|v| v.split(',').find_map(|kv| kv.strip_prefix("calls=")))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let cpu = number("used_cpu_user").unwrap_or(0.0) + number("used_cpu_sys").unwrap_or(0.0);
    Ok(RedisCounters {
        commands: number("total_commands_processed").unwrap_or(0.0) as u64,
        scripts: calls("cmdstat_evalsha") + calls("cmdstat_eval"),
        cpu: Duration::from_secs_f64(cpu),
        waited: number("process_id")
            .map(|pid| pid as u32)
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.trim_end() == "redis-server")
            })
            .and_then(|pid| proc_sample(pid).ok())
            .and_then(|sample| sample.waited),
    })
}

/// A TCP proxy the harness controls: forwards to its upstream until
/// frozen; frozen, it keeps every connection open and accepts new ones but
/// passes no byte either way (a half-open link, as a dead switch or a hung
/// host leaves it).
pub struct Blackhole {
    /// Where clients connect.
    pub addr: SocketAddr,
    link: watch::Sender<Link>,
    held: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

/// What a [`Blackhole`] does with the bytes sent to it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Passes them on.
    Open,
    /// Takes none in.
    Frozen,
    /// Takes them in (what a peer sends is not stuck in its own buffers)
    /// and keeps them until the thaw.
    Holding,
}

/// Where a [`Blackhole`] forwards.
enum Upstream {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// Either kind of upstream connection.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Stream for S {}

impl Upstream {
    async fn connect(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(match self {
            Self::Tcp(addr) => Box::new(TcpStream::connect(addr).await?),
            Self::Unix(path) => Box::new(UnixStream::connect(path).await?),
        })
    }
}

impl Blackhole {
    /// Starts a proxy to `upstream` on a free local port.
    ///
    /// # Panics
    /// When no local port can be bound.
    pub async fn start(upstream: SocketAddr) -> Self {
        Self::to(Upstream::Tcp(upstream)).await
    }

    /// Starts a proxy to the unix socket at `upstream` (a test Redis) on a
    /// free local port.
    ///
    /// # Panics
    /// When no local port can be bound.
    pub async fn start_unix(upstream: PathBuf) -> Self {
        Self::to(Upstream::Unix(upstream)).await
    }

    async fn to(upstream: Upstream) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let (link, _) = watch::channel(Link::Open);
        let held = Arc::new(Mutex::new(Vec::new()));
        let switch = link.clone();
        let holding = Arc::clone(&held);
        let upstream = Arc::new(upstream);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let link = switch.subscribe();
                let (held, upstream) = (Arc::clone(&holding), Arc::clone(&upstream));
                tokio::spawn(async move {
                    if let Ok(server) = upstream.connect().await {
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = tokio::io::split(server);
                        tokio::select! {
                            () = pump(client_read, server_write, link.clone(), Arc::clone(&held)) => {}
                            () = pump(server_read, client_write, link, held) => {}
                        }
                    }
                });
            }
        });
        Self {
            addr,
            link,
            held,
            task,
        }
    }

    /// Stops passing bytes, without closing anything.
    pub fn freeze(&self) {
        self.link.send_replace(Link::Frozen);
    }

    /// Stops passing bytes on but takes them in, for [`Blackhole::held`]
    /// to show (a peer whose requests go out and get no answer).
    pub fn hold(&self) {
        lock(&self.held).clear();
        self.link.send_replace(Link::Holding);
    }

    /// The bytes taken in, either way, since [`Blackhole::hold`].
    pub fn held(&self) -> Vec<u8> {
        lock(&self.held).clone()
    }

    /// Passes bytes again.
    pub fn thaw(&self) {
        self.link.send_replace(Link::Open);
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut link: watch::Receiver<Link>,
    held: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    // Bytes read while holding, or just before a freeze: passed on at the
    // thaw.
    let mut pending = Vec::new();
    loop {
        let now = *link.borrow_and_update();
        if now == Link::Open && !pending.is_empty() {
            if to.write_all(&pending).await.is_err() {
                return;
            }
            pending.clear();
        }
        if now == Link::Frozen {
            if link.changed().await.is_err() {
                return;
            }
            continue;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = link.changed() => match changed {
                Ok(()) => continue,
                Err(_) => return,
            },
        };
        let now = *link.borrow();
        match now {
            Link::Open => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Link::Holding => {
                lock(&held).extend_from_slice(&buf[..n]);
                pending.extend_from_slice(&buf[..n]);
            }
            Link::Frozen => pending.extend_from_slice(&buf[..n]),
        }
    }
}

/// An inference service over HTTP that counts how often each job ran: the
/// payload names the job (`{"job": id, "sleep_ms": n}`), the service sleeps
/// that long and answers `{"ok": true}`.
pub struct CountingService {
    /// Where it serves (POST any path).
    pub addr: SocketAddr,
    runs: Arc<Mutex<HashMap<String, u32>>>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingService {
    /// Starts it on a free local port.
    ///
    /// # Panics
    /// When no local port can be bound.
    pub async fn start() -> Self {
        let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let app = axum::Router::new().fallback({
            let runs = Arc::clone(&runs);
            move |axum::Json(payload): axum::Json<serde_json::Value>| {
                let runs = Arc::clone(&runs);
                async move {
                    let job = payload["job"].as_str().unwrap_or_default().to_owned();
                    *lock(&runs).entry(job).or_default() += 1;
                    let sleep = payload["sleep_ms"].as_u64().unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(sleep)).await;
                    axum::Json(serde_json::json!({"ok": true}))
                }
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the counting service");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, runs, task }
    }

    /// Runs per job id so far.
    pub fn runs(&self) -> HashMap<String, u32> {
        lock(&self.runs).clone()
    }
}

impl Drop for CountingService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Submits `job` (which names its id) until some coordinator gives a
/// terminal answer, the way a client recovers from a lost connection or a
/// 5xx: the same id again (ids are idempotent), to the next of `jobs_urls`
/// (`http://…/v1/jobs` of each instance). `None` after `give_up`.
pub async fn submit_until_answered(
    http: &reqwest::Client,
    jobs_urls: &[String],
    job: &serde_json::Value,
    give_up: Duration,
) -> Option<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + give_up;
    let mut turn = rand::random::<u32>() as usize;
    while tokio::time::Instant::now() < deadline {
        let url = &jobs_urls[turn % jobs_urls.len()];
        turn = turn.wrapping_add(1);
        if let Ok(response) = http.post(url).json(job).send().await
            && let Ok(view) = response.json::<serde_json::Value>().await
            && (view["status"] == "completed" || view["status"] == "failed")
        {
            return Some(view);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}
