//! `lingua-ctl`: the admin CLI of a Lingua fleet, over the coordinator's
//! HTTP API only (docs/OPERATIONS.md, "The admin CLI").
//!
//! Exit codes: 0 success; 1 the coordinator refused the request (unknown
//! node, a conflict) or the job failed; 64 bad usage; 69 the coordinator
//! cannot be reached or cannot reach Redis; 70 an answer this CLI does not
//! understand; 77 the token is missing, wrong or not an admin's.
#![forbid(unsafe_code)]

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser, Subcommand};
use lingua_shared::docs::DocsFlag;
use lingua_shared::process::{Exit, block_on, generate_docs, usage_error};
use reqwest::Method;
use serde_json::Value;

mod api;
mod show;
mod top;

use api::{Api, CALL_TIMEOUT, CtlError};
use lingua_shared::{JobId, NodeId};

/// Admin CLI of a Lingua fleet: nodes, drains, pools, jobs, and a live
/// view, over the coordinator's HTTP API.
///
/// Tables are for people; --json prints the API's JSON for scripts.
#[derive(Debug, Parser)]
#[command(name = "lingua-ctl", version)]
struct Cli {
    /// The coordinator's URL.
    #[arg(
        long,
        env = "LINGUA_URL",
        default_value = "http://127.0.0.1:7700",
        global = true
    )]
    url: String,
    /// A file holding an admin API token (`[auth] api_tokens`); it wins
    /// over --token and LINGUA_TOKEN.
    #[arg(long, value_name = "FILE", env = "LINGUA_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// An admin API token. Prefer LINGUA_TOKEN or --token-file: a flag is
    /// visible to other users in the process list.
    #[arg(long, env = "LINGUA_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// A PEM CA certificate to trust for an https:// URL, besides the
    /// usual roots.
    #[arg(long, value_name = "FILE", env = "LINGUA_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    docs: DocsFlag,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List every node: state, pairs, free slots, running jobs, GPUs.
    Nodes,
    /// Show one node with its GPUs.
    Node {
        /// The node id.
        id: String,
    },
    /// Stop routing jobs to a node and tell it to drain.
    Drain {
        /// The node id.
        id: String,
        /// Wait until the node runs no job (then stop its agent).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 600, value_name = "SECONDS", requires = "wait")]
        timeout: u64,
    },
    /// List language pairs: pools, ready nodes, free slots.
    Pools,
    /// Look up or submit jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// A live view of the fleet: summary and node table, every second.
    Top {
        /// Stop after this many updates (default: until interrupted).
        #[arg(short = 'n', long, value_name = "N")]
        iterations: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum JobsCommand {
    /// Show a job: status, node, attempts, output or error.
    Get {
        /// The job id.
        id: String,
    },
    /// Submit a job (the JSON body of POST /v1/jobs) and wait for its
    /// answer.
    Submit {
        /// A file holding the job's JSON; `-` or nothing reads stdin.
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
        /// Answer at once, with the job queued or running.
        #[arg(long)]
        no_wait: bool,
    },
}

fn main() -> ExitCode {
    let mut cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(&err),
    };
    if let Some(dir) = &cli.docs.generate_docs {
        return generate_docs(Cli::command(), dir);
    }
    let Some(command) = cli.command.take() else {
        let _ = Cli::command().print_help();
        return Exit::Usage.into();
    };
    block_on("lingua-ctl", None, async move {
        match run(cli, command).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("lingua-ctl: {}", show::clean(&err.to_string()));
                err.exit_code()
            }
        }
    })
}

fn token(cli: &Cli) -> Result<Option<String>, CtlError> {
    match (&cli.token_file, &cli.token) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path).map_err(|err| {
                CtlError::Usage(format!(
                    "cannot read --token-file {}: {err}",
                    path.display()
                ))
            })?;
            Ok(Some(text.trim().to_owned()))
        }
        (None, token) => Ok(token.clone()),
    }
}

async fn run(cli: Cli, command: Command) -> Result<(), CtlError> {
    let api = Api::new(&cli.url, token(&cli)?, cli.ca_file.as_deref())?;
    let json = cli.json;
    match command {
        Command::Nodes => {
            let answer = api.get("/v1/nodes").await?;
            let nodes = list(&answer, "nodes")?;
            print(json, &answer, || show::nodes(nodes));
        }
        Command::Node { id } => {
            let answer = api.get(&format!("/v1/nodes/{}", node_id(&id)?)).await?;
            print(json, &answer, || show::node(&answer));
        }
        Command::Drain { id, wait, timeout } => {
            drain(&api, &id, json, wait.then(|| Duration::from_secs(timeout))).await?;
        }
        Command::Pools => {
            let fleet = api.get("/v1/fleet").await?;
            let pairs = list(&fleet, "pairs")?;
            let answer = serde_json::json!({"pairs": pairs});
            print(json, &answer, || show::pairs_table(pairs));
        }
        Command::Jobs(JobsCommand::Get { id }) => {
            let path = format!("/v1/jobs/{}", job_id(&id)?);
            let request = api.request(Method::GET, &path).timeout(CALL_TIMEOUT);
            let answer = job(&api, request).await?;
            print(json, &answer, || show::job(&answer));
            failed(&answer)?;
        }
        Command::Jobs(JobsCommand::Submit { file, no_wait }) => {
            let body = read_job(file)?;
            let path = if no_wait {
                "/v1/jobs?wait=false"
            } else {
                "/v1/jobs"
            };
            // The coordinator answers by the job's deadline (at most an
            // hour); a minute more covers the rest.
            let limit = body["timeout_ms"].as_u64().unwrap_or(3_600_000);
            let request = api
                .request(Method::POST, path)
                .json(&body)
                .timeout(Duration::from_millis(limit.min(3_600_000)) + Duration::from_secs(60));
            let answer = job(&api, request).await?;
            print(json, &answer, || show::job(&answer));
            failed(&answer)?;
        }
        Command::Top { iterations } => top::run(&api, json, iterations).await?,
    }
    Ok(())
}

/// Prints the JSON, or what `human` makes of it.
fn print(json: bool, answer: &Value, human: impl FnOnce() -> String) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(answer).unwrap_or_default()
        );
    } else {
        print!("{}", show::clean(&human()));
    }
}

fn list<'a>(answer: &'a Value, field: &str) -> Result<&'a [Value], CtlError> {
    answer[field].as_array().map(Vec::as_slice).ok_or_else(|| {
        CtlError::Internal(format!("the coordinator's answer has no `{field}` list"))
    })
}

/// A node id as the coordinator accepts it (one URL path segment).
fn node_id(id: &str) -> Result<NodeId, CtlError> {
    NodeId::new(id).map_err(|err| CtlError::Usage(err.to_string()))
}

/// A job id as the coordinator accepts it (one URL path segment).
fn job_id(id: &str) -> Result<JobId, CtlError> {
    JobId::new(id).map_err(|err| CtlError::Usage(err.to_string()))
}

/// A job that failed is exit code 1.
fn failed(job: &Value) -> Result<(), CtlError> {
    if job["status"] == "failed" {
        return Err(CtlError::Refused(format!(
            "job {} failed: {}: {}",
            show::text(&job["id"]),
            show::text(&job["error"]["code"]),
            show::text(&job["error"]["message"])
        )));
    }
    Ok(())
}

fn read_job(file: Option<PathBuf>) -> Result<Value, CtlError> {
    let (text, from) = match file.filter(|path| path.as_os_str() != "-") {
        Some(path) => (
            std::fs::read_to_string(&path)
                .map_err(|err| CtlError::Usage(format!("cannot read {}: {err}", path.display())))?,
            path.display().to_string(),
        ),
        None => {
            if std::io::stdin().is_terminal() {
                eprintln!("lingua-ctl: reading the job's JSON from stdin (end with Ctrl-D)");
            }
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|err| CtlError::Usage(format!("cannot read stdin: {err}")))?;
            (text, "stdin".to_owned())
        }
    };
    serde_json::from_str(&text).map_err(|err| {
        CtlError::Usage(format!(
            "{from} is not JSON ({err}); a job looks like {{\"kind\": \"translate\", \"src_lang\": \"en\", \"tgt_lang\": \"es\", \"payload\": {{}}}}"
        ))
    })
}

/// Sends a job request: the job, also when it failed (a failed job is
/// answered with its error's status and its view).
async fn job(api: &Api, request: reqwest::RequestBuilder) -> Result<Value, CtlError> {
    match api.exchange(request).await? {
        (status, job) if status.is_success() || job["status"].is_string() => Ok(job),
        (status, body) => Err(api::api_error(status, &body)),
    }
}

/// How often `drain --wait` reads the node.
const DRAIN_POLL: Duration = Duration::from_secs(1);

/// Drains node `id`; with `wait`, then waits (up to it) until the node
/// runs no job: two reports in a row made after the drain show none, or
/// the node is offline.
async fn drain(api: &Api, id: &str, json: bool, wait: Option<Duration>) -> Result<(), CtlError> {
    let path = format!("/v1/nodes/{}", node_id(id)?);
    let drain = api.request(Method::POST, &format!("{path}/drain"));
    let drained = api.send(drain.timeout(CALL_TIMEOUT)).await?;
    let Some(limit) = wait else {
        print(json, &drained, || {
            format!("node {id} is draining: it gets no new jobs\n")
        });
        return Ok(());
    };
    if !json {
        println!("node {id} is draining: it gets no new jobs; waiting until it runs none");
    }
    let mut since = drained["last_seen_ms"].as_u64().unwrap_or(0);
    let (deadline, mut idle) = (Instant::now() + limit, 0);
    loop {
        let node = api.get(&path).await?;
        let running = node["capacity"]["running"].as_u64();
        let seen = node["last_seen_ms"].as_u64().unwrap_or(0);
        // Only a report newer than the last one read counts, idle or not.
        if seen > since {
            since = seen;
            idle = if running == Some(0) { idle + 1 } else { 0 };
        }
        if node["state"] == "offline" || idle >= 2 {
            print(json, &node, || {
                format!("node {id} runs no job: stop its agent now (systemctl stop lingua-agent)\n")
            });
            return Ok(());
        }
        if Instant::now() >= deadline {
            let left = running.map_or_else(
                || "jobs (its agent does not report how many: check lingua_agent_jobs_running on it)".into(),
                |n| format!("{n} jobs"),
            );
            return Err(CtlError::Refused(format!(
                "node {id} still runs {left} after {}s; wait longer with --timeout",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}
