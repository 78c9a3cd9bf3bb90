//! Executors: how a job of a kind actually runs.
//!
//! - `http`: POST the payload as JSON to a local inference service; a 2xx
//!   JSON answer is the output, anything else an executor failure. The URL
//!   may name the GPU the job was placed on (`{gpu_uuid}`, `{gpu_index}`),
//!   for one service per GPU.
//! - `command`: run a program with the payload as JSON on stdin and read
//!   JSON from stdout (the payload is written while stdout and stderr are
//!   read, so the program may write first, and as much as it likes); it
//!   runs in its own process group, which is killed when the program
//!   exits, on timeout or on cancellation. It sees only the GPU (or MIG instance) the
//!   job was placed on: `CUDA_VISIBLE_DEVICES` and `NVIDIA_VISIBLE_DEVICES`
//!   hold its UUID (CUDA numbers GPUs differently from NVML; a UUID is the
//!   same to both), `LINGUA_GPU_UUID` and `LINGUA_GPU_INDEX` say which.
//!   `LINGUA_DEVICE` is `gpu`, or `cpu` for a job placed on no GPU (a
//!   fallback executor's, or any on a node without GPUs), which sees no
//!   `CUDA_VISIBLE_DEVICES` or `NVIDIA_VISIBLE_DEVICES` at all.
//! - `simulated`: sleep for `duration_ms` while holding the kind's actual
//!   VRAM on the simulated GPU the job was placed on.
//!
//! A `command` job's process group (a simulated job's allocation, listed
//! as a process of the simulated GPU) is handed to the caller as soon as
//! it starts (`on_spawn`), so that GPU memory held by its processes can be
//! attributed to it.
//!
//! Dropping the future of [`Executor::run`] cancels the job: the HTTP
//! request is abandoned, the process group killed, the simulated memory
//! freed.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use lingua_shared::protocol::{Device, FailureCode, JobAssign, Outcome};
use lingua_shared::{JobKind, LangPair, RawJson};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Serialize;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::arbiter::Placement;
use crate::config::ExecutorConfig;
use crate::gpu::SimulatedGpus;

/// Most bytes of output read from a command or HTTP service.
const MAX_OUTPUT_BYTES: usize = 1 << 20;

/// Runs jobs of one kind.
#[derive(Debug)]
pub enum Executor {
    /// See the module docs.
    Simulated {
        /// How long a job runs.
        duration: Duration,
        /// VRAM it really holds.
        actual_vram_mb: u64,
        /// Utilisation it adds.
        utilization_pct: u8,
        /// The simulated GPUs, when the backend is simulated.
        gpus: Option<Arc<SimulatedGpus>>,
    },
    /// See the module docs.
    Http {
        /// Shared client.
        client: reqwest::Client,
        /// Service URL.
        url: String,
        /// Request timeout.
        timeout: Duration,
    },
    /// See the module docs.
    Command {
        /// Program and arguments.
        argv: Vec<String>,
        /// Time limit.
        timeout: Duration,
    },
}

fn failed(code: FailureCode, message: impl Into<String>) -> Outcome {
    Outcome::Failed {
        code,
        message: message.into(),
    }
}

impl Executor {
    /// The executor a kind's config describes.
    pub fn new(
        config: &ExecutorConfig,
        gpus: Option<Arc<SimulatedGpus>>,
        client: &reqwest::Client,
    ) -> Self {
        match config {
            ExecutorConfig::Simulated {
                duration,
                actual_vram_mb,
                utilization_pct,
            } => Executor::Simulated {
                duration: *duration,
                actual_vram_mb: *actual_vram_mb,
                utilization_pct: *utilization_pct,
                gpus,
            },
            ExecutorConfig::Http { url, timeout } => Executor::Http {
                client: client.clone(),
                url: url.clone(),
                timeout: *timeout,
            },
            ExecutorConfig::Command { argv, timeout } => Executor::Command {
                argv: argv.clone(),
                timeout: *timeout,
            },
        }
    }

    /// Runs one job placed on `gpu` (none: it runs on the `cpu` device);
    /// a `command` job's process group (a simulated job's allocation group)
    /// is passed to `on_spawn` once it has started.
    pub async fn run(
        &self,
        job: &JobAssign,
        (gpu, device): (Option<&Placement>, Device),
        on_spawn: &(dyn Fn(u32) + Sync),
    ) -> Outcome {
        match self {
            Executor::Simulated {
                duration,
                actual_vram_mb,
                utilization_pct,
                gpus,
            } => {
                let _held = match (gpus, gpu) {
                    (Some(gpus), Some(gpu)) => {
                        let held = gpus.allocate(gpu.index, *actual_vram_mb, *utilization_pct);
                        on_spawn(held.group());
                        Some(held)
                    }
                    _ => None,
                };
                // A zero-length job ends now, not at the timer's next tick
                // (up to a millisecond later).
                if !duration.is_zero() {
                    tokio::time::sleep(*duration).await;
                }
                Outcome::Completed {
                    output: RawJson::of(&Simulated {
                        kind: &job.kind,
                        pair: job.pair,
                        payload: &job.payload,
                        simulated: true,
                    }),
                }
            }
            Executor::Http {
                client,
                url,
                timeout,
            } => http(client, &gpu_url(url, gpu), *timeout, &job.payload).await,
            Executor::Command { argv, timeout } => {
                command(argv, *timeout, &job.payload, (gpu, device), on_spawn).await
            }
        }
    }
}

/// The URL for a job placed on `gpu`: `{gpu_uuid}` and `{gpu_index}`
/// replaced (by nothing on a node without GPUs).
fn gpu_url(template: &str, gpu: Option<&Placement>) -> String {
    let (uuid, index) = gpu.map_or((String::new(), String::new()), |g| {
        (g.uuid.clone(), g.index.to_string())
    });
    template
        .replace("{gpu_uuid}", &uuid)
        .replace("{gpu_index}", &index)
}

/// A simulated job's output: what it was asked to do.
#[derive(Serialize)]
struct Simulated<'a> {
    kind: &'a JobKind,
    pair: LangPair,
    payload: &'a RawJson,
    simulated: bool,
}

async fn http(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
    payload: &RawJson,
) -> Outcome {
    let response = match client.post(url).timeout(timeout).json(payload).send().await {
        Ok(response) => response,
        Err(err) if err.is_timeout() => {
            return failed(
                FailureCode::Timeout,
                format!("http executor: no answer from {url} within {timeout:?}"),
            );
        }
        Err(err) => {
            return failed(
                FailureCode::ExecutorFailed,
                format!("http executor: {url}: {err}"),
            );
        }
    };
    let status = response.status();
    let body = match limited_body(response).await {
        Ok(body) => body,
        Err(err) if err.is_timeout() => {
            return failed(
                FailureCode::Timeout,
                format!("http executor: {url} answered too slowly"),
            );
        }
        Err(err) => {
            return failed(
                FailureCode::ExecutorFailed,
                format!("http executor: reading the answer: {err}"),
            );
        }
    };
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        return failed(
            FailureCode::ExecutorFailed,
            format!("http executor: {url} answered {status}: {text}"),
        );
    }
    json_output(&body, "http executor: the answer")
}

/// An answer's body, read up to one byte past `MAX_OUTPUT_BYTES`: a
/// longer one is refused without holding the rest of it.
async fn limited_body(mut response: reqwest::Response) -> reqwest::Result<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = MAX_OUTPUT_BYTES + 1 - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() > MAX_OUTPUT_BYTES {
            break;
        }
    }
    Ok(body)
}

/// The output of an executor: JSON of at most 1 MiB.
fn json_output(bytes: &[u8], what: &str) -> Outcome {
    if bytes.len() > MAX_OUTPUT_BYTES {
        return failed(
            FailureCode::ExecutorFailed,
            format!("{what} is larger than 1 MiB"),
        );
    }
    match serde_json::from_slice(bytes) {
        Ok(output) => Outcome::Completed { output },
        Err(err) => failed(
            FailureCode::ExecutorFailed,
            format!("{what} is not JSON: {err}"),
        ),
    }
}

/// How much of a command's stderr is kept: its end, which a failure
/// quotes (200 characters of it).
const STDERR_KEPT: usize = 4096;

/// Which bytes of a pipe [`drained`] keeps.
#[derive(Clone, Copy)]
enum Keep {
    First,
    Last,
}

/// Reads `pipe` to its end, keeping `most` bytes of it: a program that
/// writes more than is kept is read on, never left blocked on a full pipe.
async fn drained(pipe: Option<impl AsyncRead + Unpin>, most: usize, keep: Keep) -> Vec<u8> {
    let mut kept = Vec::new();
    let Some(mut pipe) = pipe else {
        return kept;
    };
    let mut buffer = [0u8; 8192];
    while let Ok(read @ 1..) = pipe.read(&mut buffer).await {
        let bytes = &buffer[..read];
        match keep {
            Keep::First => {
                let room = most.saturating_sub(kept.len());
                kept.extend_from_slice(&bytes[..read.min(room)]);
            }
            Keep::Last => {
                kept.extend_from_slice(bytes);
                if kept.len() > 2 * most {
                    kept.drain(..kept.len() - most);
                }
            }
        }
    }
    if let Keep::Last = keep
        && kept.len() > most
    {
        kept.drain(..kept.len() - most);
    }
    kept
}

/// Kills a process group when dropped (timeout, cancellation, or the end of
/// a normal run, to reap anything the command left behind).
struct GroupKiller(Option<Pid>);

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if let Some(group) = self.0 {
            let _ = killpg(group, Signal::SIGKILL);
        }
    }
}

async fn command(
    argv: &[String],
    timeout: Duration,
    payload: &RawJson,
    placed: (Option<&Placement>, Device),
    on_spawn: &(dyn Fn(u32) + Sync),
) -> Outcome {
    let mut child = match spawned(argv, placed) {
        Ok(child) => child,
        Err(failure) => return failure,
    };
    // The child leads its own process group: the group's id is its PID.
    let group = child.id();
    if let Some(group) = group {
        on_spawn(group);
    }
    let group = group
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let _group = GroupKiller(group);
    // On one line, as the payload was when it was written out again: JSON
    // strings hold no raw line breaks, so each is whitespace between
    // tokens (a program may read one line).
    let input = payload.get().replace(['\n', '\r'], " ");
    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    // The payload is written while the output is read: a program may
    // write before it has read all its input, and as much as it likes.
    let run = async {
        let write = async {
            if let Some(mut stdin) = stdin {
                // A program that exits without reading its input is judged
                // by its exit status and output, not by the broken pipe.
                let _ = stdin.write_all(input.as_bytes()).await;
            }
        };
        let exited = async {
            let status = child.wait().await;
            // The job is over when its program is: what it left behind in
            // its group, which may hold the pipes open, goes too.
            if let Some(group) = group {
                let _ = killpg(group, Signal::SIGKILL);
            }
            status
        };
        let ((), out, err, status) = tokio::join!(
            write,
            drained(stdout, MAX_OUTPUT_BYTES + 1, Keep::First),
            drained(stderr, STDERR_KEPT, Keep::Last),
            exited,
        );
        (status, out, err)
    };
    match tokio::time::timeout(timeout, run).await {
        Ok((status, out, err)) => exited(&argv[0], status, &out, &err),
        Err(_) => failed(
            FailureCode::Timeout,
            format!(
                "command executor: {} ran over {timeout:?} and was killed",
                argv[0]
            ),
        ),
    }
}

/// `argv` started in a process group of its own, its standard streams
/// piped, told its device and GPU (the only one it sees), or the failure
/// that it could not start.
fn spawned(argv: &[String], (gpu, device): (Option<&Placement>, Device)) -> Result<Child, Outcome> {
    let mut process = Command::new(&argv[0]);
    process.env("LINGUA_DEVICE", device.name());
    match gpu {
        Some(gpu) => process
            .env("CUDA_VISIBLE_DEVICES", &gpu.uuid)
            .env("NVIDIA_VISIBLE_DEVICES", &gpu.uuid)
            .env("LINGUA_GPU_UUID", &gpu.uuid)
            .env("LINGUA_GPU_INDEX", gpu.index.to_string()),
        None => process
            .env_remove("CUDA_VISIBLE_DEVICES")
            .env_remove("NVIDIA_VISIBLE_DEVICES"),
    };
    process
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| {
            failed(
                FailureCode::ExecutorFailed,
                format!("command executor: cannot start {}: {err}", argv[0]),
            )
        })
}

/// The outcome of `program`, which exited with `status` after writing
/// `out` (kept from the start) and `err` (kept from the end): its output,
/// or why it failed, with the end of what it said on stderr.
fn exited(
    program: &str,
    status: std::io::Result<std::process::ExitStatus>,
    out: &[u8],
    err: &[u8],
) -> Outcome {
    let status = match status {
        Ok(status) => status,
        Err(e) => {
            return failed(
                FailureCode::ExecutorFailed,
                format!("command executor: waiting for {program}: {e}"),
            );
        }
    };
    if !status.success() {
        let stderr = String::from_utf8_lossy(err);
        let tail: String = stderr
            .trim()
            .chars()
            .rev()
            .take(200)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return failed(
            FailureCode::ExecutorFailed,
            format!("command executor: {program} {status}: {tail}"),
        );
    }
    json_output(out, "command executor: stdout")
}

#[cfg(test)]
mod tests {
    use lingua_shared::protocol::DeviceChoice;
    use lingua_shared::{JobId, JobKind};

    use serde_json::{Value, json};

    use super::*;

    /// A completed job's output, parsed (an executor's text keeps its own
    /// spacing and key order).
    fn output(outcome: Outcome) -> Value {
        match outcome {
            Outcome::Completed { output } => serde_json::from_str(output.get()).unwrap(),
            failed => panic!("not completed: {failed:?}"),
        }
    }

    fn job(payload: Value) -> JobAssign {
        JobAssign {
            job_id: JobId::new("j1").unwrap(),
            attempt: 1,
            kind: JobKind::new("mt").unwrap(),
            pair: "zh:en".parse().unwrap(),
            session_id: None,
            payload: RawJson::of(&payload),
            timeout_ms: 1000,
            device: DeviceChoice::Any,
            answer_within_ms: None,
        }
    }

    fn command_executor(script: &str, timeout_ms: u64) -> Executor {
        Executor::Command {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    #[test]
    fn a_zero_length_simulated_job_needs_no_timer() {
        // Without the runtime's timer, a sleep would panic: the job ends
        // at once instead of at the timer's next tick.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let executor = Executor::Simulated {
            duration: Duration::ZERO,
            actual_vram_mb: 0,
            utilization_pct: 0,
            gpus: None,
        };
        let outcome = runtime.block_on(executor.run(&job(json!({})), (None, Device::Gpu), &|_| ()));
        assert!(matches!(outcome, Outcome::Completed { .. }), "{outcome:?}");
    }

    #[tokio::test]
    async fn command_reads_stdin_and_returns_json() {
        let executor = command_executor(r#"read -r line; printf '{"got": %s}' "$line""#, 5000);
        let outcome = executor
            .run(&job(json!({"text": "你好"})), (None, Device::Cpu), &|_| ())
            .await;
        assert_eq!(output(outcome), json!({"got": {"text": "你好"}}));
    }

    #[tokio::test]
    async fn a_command_reads_a_payload_written_over_lines_on_one_line() {
        let executor = command_executor(r#"read -r line; printf '{"got": %s}' "$line""#, 5000);
        let mut assign = job(json!(null));
        assign.payload =
            serde_json::from_str("{\r\n  \"text\": \"a b\",\n  \"n\": 1.50\n}").unwrap();
        let outcome = executor.run(&assign, (None, Device::Cpu), &|_| ()).await;
        let Outcome::Completed { output } = outcome else {
            panic!("completes: {outcome:?}")
        };
        assert_eq!(
            output.get(),
            r#"{"got": {    "text": "a b",   "n": 1.50 }}"#
        );
    }

    #[tokio::test]
    async fn a_command_sees_only_the_gpu_it_was_placed_on() {
        let executor = command_executor(
            r#"printf '{"cuda": "%s", "nvidia": "%s", "uuid": "%s", "index": "%s", "device": "%s"}' "$CUDA_VISIBLE_DEVICES" "$NVIDIA_VISIBLE_DEVICES" "$LINGUA_GPU_UUID" "$LINGUA_GPU_INDEX" "$LINGUA_DEVICE""#,
            5000,
        );
        let gpu = Placement {
            index: 3,
            uuid: "GPU-8e6a3b7e-0000-4000-8000-000000000003".into(),
        };
        let outcome = executor
            .run(&job(json!(1)), (Some(&gpu), Device::Gpu), &|_| ())
            .await;
        let uuid = "GPU-8e6a3b7e-0000-4000-8000-000000000003";
        assert_eq!(
            output(outcome),
            json!({"cuda": uuid, "nvidia": uuid, "uuid": uuid, "index": "3", "device": "gpu"})
        );
        let outcome = executor
            .run(&job(json!(1)), (None, Device::Cpu), &|_| ())
            .await;
        assert_eq!(
            output(outcome),
            json!({"cuda": "", "nvidia": "", "uuid": "", "index": "", "device": "cpu"})
        );
    }

    #[tokio::test]
    async fn a_command_reports_its_process_group_when_it_starts() {
        // `$$` is the shell's PID, which leads the job's process group.
        let executor = command_executor("printf '%s' $$", 5000);
        let group = std::sync::Mutex::new(None);
        let outcome = executor
            .run(&job(json!(1)), (None, Device::Cpu), &|g| {
                *group.lock().unwrap() = Some(g);
            })
            .await;
        let Outcome::Completed { output } = outcome else {
            panic!("completes: {outcome:?}")
        };
        let reported = *group.lock().unwrap();
        assert!(reported.is_some());
        assert_eq!(output.get().parse::<u64>().ok(), reported.map(u64::from));
    }

    #[tokio::test]
    async fn an_http_job_reaches_the_service_of_its_gpu() {
        let base = inference_service().await;
        let executor = http_executor(format!("{base}/gpu/{{gpu_index}}/{{gpu_uuid}}"), 5000);
        let gpu = Placement {
            index: 1,
            uuid: "MIG-5c1d".into(),
        };
        let outcome = executor
            .run(&job(json!({"t": 1})), (Some(&gpu), Device::Gpu), &|_| ())
            .await;
        assert_eq!(
            output(outcome),
            json!({"index": "1", "uuid": "MIG-5c1d", "body": {"t": 1}})
        );
    }

    #[tokio::test]
    async fn command_failures_are_executor_failures() {
        let outcome = command_executor("echo boom >&2; exit 3", 5000)
            .run(&job(json!(1)), (None, Device::Cpu), &|_| ())
            .await;
        let Outcome::Failed { code, message } = outcome else {
            panic!("should fail")
        };
        assert_eq!(code, FailureCode::ExecutorFailed);
        assert!(
            message.contains("boom") && message.contains('3'),
            "{message}"
        );
        let outcome = command_executor("echo not-json", 5000)
            .run(&job(json!(1)), (None, Device::Cpu), &|_| ())
            .await;
        assert!(matches!(
            outcome,
            Outcome::Failed {
                code: FailureCode::ExecutorFailed,
                ..
            }
        ));
        let missing = Executor::Command {
            argv: vec!["/nonexistent/bin".into()],
            timeout: Duration::from_secs(1),
        };
        let outcome = missing
            .run(&job(json!(1)), (None, Device::Cpu), &|_| ())
            .await;
        assert!(
            matches!(outcome, Outcome::Failed { code: FailureCode::ExecutorFailed, message } if message.contains("cannot start"))
        );
    }

    /// A program may write much to stderr before it reads its input, and
    /// its input may be large: neither side waits for the other. Its
    /// failure quotes the end of its stderr. Before, the agent wrote the
    /// whole payload before reading anything, and read 64 KiB of stderr
    /// at most: such jobs ran into their timeout.
    #[tokio::test]
    async fn a_command_may_write_much_to_stderr_before_reading_a_large_payload() {
        let payload = json!({"text": "x".repeat(256 * 1024)});
        let script =
            r#"yes progress | head -c 300000 >&2; wc -c | tr -d ' ' | sed 's/.*/{"read": &}/'"#;
        let outcome = command_executor(script, 20_000)
            .run(&job(payload.clone()), (None, Device::Cpu), &|_| ())
            .await;
        let written = serde_json::to_string(&payload).unwrap().len();
        assert_eq!(output(outcome), json!({"read": written}));
        let script = "yes progress | head -c 300000 >&2; echo 'the last line' >&2; exit 2";
        let outcome = command_executor(script, 20_000)
            .run(&job(json!(1)), (None, Device::Cpu), &|_| ())
            .await;
        let Outcome::Failed { code, message } = outcome else {
            panic!("fails: {outcome:?}")
        };
        assert_eq!(code, FailureCode::ExecutorFailed, "{message}");
        assert!(message.ends_with("the last line"), "{message}");
    }

    /// Output past 1 MiB fails the job, saying so, however much more the
    /// program writes. Before, the agent stopped reading at 1 MiB and the
    /// program, blocked on the full pipe, ran into the job's timeout.
    #[tokio::test]
    async fn a_command_whose_output_passes_1_mib_fails_saying_so() {
        let outcome = command_executor("yes aaaa | head -c 3000000", 20_000)
            .run(&job(json!(1)), (None, Device::Cpu), &|_| ())
            .await;
        let Outcome::Failed { code, message } = outcome else {
            panic!("fails: {outcome:?}")
        };
        assert_eq!(code, FailureCode::ExecutorFailed, "{message}");
        assert!(message.contains("larger than 1 MiB"), "{message}");
    }

    /// A job is done when its program exits, even though something it
    /// started still holds its output open: that is stopped with it.
    /// Before, the agent read until every holder closed the pipe, and the
    /// job ran into its timeout.
    #[tokio::test]
    async fn a_command_is_done_when_its_program_exits_whatever_it_left_running() {
        let outcome = command_executor(r#"sleep 60 & echo '{"done": true}'"#, 20_000)
            .run(&job(json!(1)), (None, Device::Cpu), &|_| ())
            .await;
        assert_eq!(output(outcome), json!({"done": true}));
    }

    #[tokio::test]
    async fn command_timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("grandchild.pid");
        // The command starts a grandchild that would outlive a plain kill.
        let script = format!("sleep 30 & echo $! > {}; wait", marker.display());
        let outcome = command_executor(&script, 300)
            .run(&job(json!(1)), (None, Device::Cpu), &|_| ())
            .await;
        assert!(
            matches!(
                outcome,
                Outcome::Failed {
                    code: FailureCode::Timeout,
                    ..
                }
            ),
            "{outcome:?}"
        );
        let pid: i32 = std::fs::read_to_string(&marker)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The group was sent SIGKILL before `run` returned; wait for the
        // kernel to finish tearing the process down.
        let gone = tokio::time::timeout(Duration::from_secs(10), async {
            while nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok() && !is_zombie(pid) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(gone.is_ok(), "grandchild {pid} survived the timeout");
    }

    fn is_zombie(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                stat.rsplit(')')
                    .next()
                    .is_some_and(|rest| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    }

    /// A local inference service: `/echo` answers the payload, `/fail`
    /// answers 500, `/slow` never answers, `/text` answers plain text,
    /// `/endless` answers a body that never ends,
    /// `/gpu/{index}/{uuid}` answers which GPU's route it was.
    async fn inference_service() -> String {
        use axum::Json;
        use axum::extract::Path;
        use axum::http::StatusCode;
        use axum::routing::post;
        let app = axum::Router::new()
            .route(
                "/gpu/{index}/{uuid}",
                post(
                    |Path((index, uuid)): Path<(String, String)>, Json(body): Json<Value>| async move {
                        Json(json!({"index": index, "uuid": uuid, "body": body}))
                    },
                ),
            )
            .route(
                "/echo",
                post(|Json(body): Json<Value>| async move { Json(json!({"echo": body})) }),
            )
            .route(
                "/fail",
                post(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "model crashed") }),
            )
            .route("/slow", post(std::future::pending::<&'static str>))
            .route("/text", post(|| async { "not json" }))
            .route(
                "/endless",
                post(|| async {
                    let chunk = axum::body::Bytes::from_static(&[b' '; 64 * 1024]);
                    let spaces = futures_util::stream::repeat_with(move || {
                        Ok::<_, std::io::Error>(chunk.clone())
                    });
                    axum::body::Body::from_stream(spaces)
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    fn http_executor(url: String, timeout_ms: u64) -> Executor {
        Executor::Http {
            client: reqwest::Client::new(),
            url,
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    #[tokio::test]
    async fn http_posts_the_payload_and_maps_failures() {
        let base = inference_service().await;
        let outcome = http_executor(format!("{base}/echo"), 5000)
            .run(&job(json!({"text": "hi"})), (None, Device::Cpu), &|_| ())
            .await;
        assert_eq!(output(outcome), json!({"echo": {"text": "hi"}}));
        let outcome = http_executor(format!("{base}/fail"), 5000)
            .run(&job(json!(1)), (None, Device::Cpu), &|_| ())
            .await;
        assert!(
            matches!(&outcome, Outcome::Failed { code: FailureCode::ExecutorFailed, message } if message.contains("500") && message.contains("model crashed")),
            "{outcome:?}"
        );
        let outcome = http_executor(format!("{base}/text"), 5000)
            .run(&job(json!(1)), (None, Device::Cpu), &|_| ())
            .await;
        assert!(matches!(
            outcome,
            Outcome::Failed {
                code: FailureCode::ExecutorFailed,
                ..
            }
        ));
        // An answer that never ends is refused at 1 MiB, not read whole.
        let outcome = http_executor(format!("{base}/endless"), 3000)
            .run(&job(json!(1)), (None, Device::Cpu), &|_| ())
            .await;
        assert!(
            matches!(&outcome, Outcome::Failed { code: FailureCode::ExecutorFailed, message } if message.contains("larger than 1 MiB")),
            "{outcome:?}"
        );
        let outcome = http_executor(format!("{base}/slow"), 200)
            .run(&job(json!(1)), (None, Device::Cpu), &|_| ())
            .await;
        assert!(
            matches!(
                outcome,
                Outcome::Failed {
                    code: FailureCode::Timeout,
                    ..
                }
            ),
            "{outcome:?}"
        );
        let closed = format!(
            "http://127.0.0.1:{}/x",
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        );
        let outcome = http_executor(closed, 1000)
            .run(&job(json!(1)), (None, Device::Cpu), &|_| ())
            .await;
        assert!(
            matches!(
                outcome,
                Outcome::Failed {
                    code: FailureCode::ExecutorFailed,
                    ..
                }
            ),
            "{outcome:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn simulated_jobs_hold_their_memory_while_running() {
        let gpus = SimulatedGpus::new(&crate::config::SimulatedGpus {
            count: 1,
            memory_mb: 1000,
            external_used_mb: 0,
        });
        let executor = Executor::Simulated {
            duration: Duration::from_millis(150),
            actual_vram_mb: 300,
            utilization_pct: 20,
            gpus: Some(gpus.clone()),
        };
        let job = job(json!({"x": 1}));
        let gpu = Placement {
            index: 0,
            uuid: "GPU-simulated-0".into(),
        };
        let running = executor.run(&job, (Some(&gpu), Device::Gpu), &|_| ());
        tokio::pin!(running);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), running.as_mut())
                .await
                .is_err()
        );
        assert_eq!(gpus.snapshot()[0].memory_used_mb, 300);
        let Outcome::Completed { output } = running.await else {
            panic!("completes")
        };
        let output: Value = serde_json::from_str(output.get()).unwrap();
        assert_eq!(output["payload"], json!({"x": 1}));
        assert_eq!(gpus.snapshot()[0].memory_used_mb, 0);
    }
}
