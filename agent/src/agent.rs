//! Wires an agent together from its config and runs it: GPU probe and
//! sampler, arbiter, executors, jobs, the coordinator link, live
//! reload, and the drain on shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lingua_shared::close::CloseCode;
use lingua_shared::ids::new_instance_id;
use lingua_shared::protocol::GpuInfo;
use lingua_shared::{JobKind, LangPair};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::arbiter::{Arbiter, Limits};
use crate::config::{AgentConfig, Backend};
use crate::executor::Executor;
use crate::gpu::{self, SimulatedGpus};
use crate::jobs::JobMetrics;
use crate::jobs::{Executors, Jobs};
use crate::link::{Endpoint, Identity, Link, LinkEnd, LinkStatus};

/// The longest pause between reconnection attempts.
pub const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// Why an agent stopped other than by request.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The coordinator refused this node for good (exit 64).
    #[error("the coordinator refused this node (close code {}): {reason}", code.code())]
    Refused {
        /// The close code.
        code: CloseCode,
        /// The coordinator's explanation.
        reason: String,
    },
    /// A thread could not be started (exit 70).
    #[error("cannot start the gpu sampler thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// How a running agent is told what to do.
pub struct Control {
    /// Cancelled on SIGTERM: drain, then stop.
    pub shutdown: CancellationToken,
    /// New, validated configs (SIGHUP).
    pub reload: mpsc::UnboundedReceiver<AgentConfig>,
}

/// What a running agent shows the outside (systemd status, tests).
#[derive(Debug, Clone)]
pub struct Handles {
    /// The arbiter.
    pub arbiter: Arc<Arbiter>,
    /// The link's status.
    pub status: watch::Receiver<LinkStatus>,
    /// Job counts and durations, for `/metrics`.
    pub job_metrics: Arc<JobMetrics>,
    /// The simulated GPUs, with backend `simulated`.
    pub simulated: Option<Arc<SimulatedGpus>>,
}

/// Each kind's executors; a fallback executor runs on no GPU, simulated
/// or not.
fn executors(
    config: &AgentConfig,
    simulated: Option<&Arc<SimulatedGpus>>,
    client: &reqwest::Client,
) -> HashMap<JobKind, Executors> {
    config
        .jobs
        .iter()
        .map(|(kind, cfg)| {
            let executors = Executors {
                primary: Arc::new(Executor::new(&cfg.executor, simulated.cloned(), client)),
                fallback: cfg
                    .busy
                    .fallback()
                    .map(|fallback| Arc::new(Executor::new(&fallback.executor, None, client))),
            };
            (kind.clone(), executors)
        })
        .collect()
}

/// A started agent: its handles, and the future that runs it to the end.
pub struct Agent {
    /// Handles to observe it.
    pub handles: Handles,
    config: AgentConfig,
    jobs: Arc<Jobs>,
    link: Link,
    inventory: Vec<GpuInfo>,
    draining: watch::Sender<bool>,
    source: gpu::Source,
    client: reqwest::Client,
}

impl Agent {
    /// Opens the probe, takes a first reading and builds every part. GPUs
    /// that cannot be read (NVML unavailable) do not stop the agent: it
    /// connects with zero slots, says why, and the sampler retries.
    pub fn start(config: AgentConfig) -> Result<Self, AgentError> {
        let simulated = (config.gpu.backend == Backend::Simulated)
            .then(|| SimulatedGpus::new(&config.gpu.simulated));
        let mut source = gpu::open(&config.gpu, simulated.clone());
        let arbiter = Arbiter::new(Limits::from_config(&config));
        let inventory = match source.read_once() {
            Ok(first) => {
                let inventory = first
                    .iter()
                    .map(|g| GpuInfo {
                        index: g.index,
                        uuid: g.uuid.clone(),
                        name: g.name.clone(),
                        memory_total_mb: g.memory_total_mb,
                    })
                    .collect();
                arbiter.update(first, Instant::now());
                inventory
            }
            Err(err) => {
                tracing::error!(error = %err, "gpus unavailable: connecting with zero slots; retrying in the background");
                arbiter.update_unavailable(err.to_string(), Instant::now());
                Vec::new()
            }
        };
        let client = reqwest::Client::new();
        let (outgoing_tx, outgoing) = mpsc::unbounded_channel();
        let pairs = LangPair::all_from(&config.src_langs, &config.tgt_langs);
        let job_metrics = Arc::new(JobMetrics::default());
        let jobs = Jobs::new(
            Arc::clone(&arbiter),
            executors(&config, simulated.as_ref(), &client),
            pairs,
            (outgoing_tx, Arc::clone(&job_metrics)),
        );
        let (draining, draining_rx) = watch::channel(false);
        let (status, status_rx) = watch::channel(LinkStatus::default());
        let link = Link {
            identity: Identity {
                node_id: config.node_id.clone(),
                token: config.token.clone(),
                instance: new_instance_id(),
                src_langs: config.src_langs.clone(),
                tgt_langs: config.tgt_langs.clone(),
                kinds: config.kinds(),
            },
            endpoint: Endpoint {
                urls: config.coordinator_urls.clone(),
                ca_file: config.ca_file.clone(),
                system_roots: config.system_roots,
                backoff_cap: BACKOFF_CAP,
            },
            arbiter: Arc::clone(&arbiter),
            jobs: Arc::clone(&jobs),
            outgoing,
            draining: draining_rx,
            status,
        };
        Ok(Self {
            handles: Handles {
                arbiter,
                status: status_rx,
                job_metrics,
                simulated,
            },
            config,
            jobs,
            link,
            inventory,
            draining,
            source,
            client,
        })
    }

    /// Runs until `control.shutdown` (then drains: no new jobs, running
    /// ones finish and their results are delivered, bounded by
    /// `drain_timeout_ms`) or until the coordinator refuses the node.
    pub async fn run(self, mut control: Control) -> Result<(), AgentError> {
        let Agent {
            handles,
            mut config,
            jobs,
            link,
            inventory,
            draining,
            source,
            client,
        } = self;
        let sampler = {
            let arbiter = Arc::clone(&handles.arbiter);
            gpu::spawn_sampler(source, config.gpu.poll_interval, move |reading, taken| {
                arbiter.publish(reading, taken)
            })?
        };
        let stop_link = CancellationToken::new();
        // The link (and the jobs it starts) log within the caller's span,
        // which names the node.
        let mut link_task = tokio::spawn(link.run(inventory, stop_link.clone()).in_current_span());
        let refused = loop {
            tokio::select! {
                () = control.shutdown.cancelled() => break None,
                Some(new) = control.reload.recv() => {
                    config = apply_reload(&config, &new, &handles, &jobs, &client);
                }
                ended = &mut link_task => {
                    break match ended {
                        Ok(LinkEnd::Fatal { code, reason }) => Some(AgentError::Refused { code, reason }),
                        Ok(LinkEnd::Shutdown) | Err(_) => None,
                    };
                }
            }
        };
        if let Some(error) = refused {
            drop(sampler);
            return Err(error);
        }
        tracing::info!(
            running = handles.arbiter.running(),
            timeout_ms = config.drain_timeout.as_millis() as u64,
            "draining"
        );
        handles.arbiter.set_draining(true);
        let _ = draining.send(true);
        let deadline = Instant::now() + config.drain_timeout;
        let mut status = handles.status.clone();
        let drained = tokio::time::timeout_at(deadline, async {
            jobs.wait_idle().await;
            // Every result the jobs reported, taken by the link (it may
            // not have read the last ones yet) and acknowledged.
            let reported = jobs.results_reported();
            let _ = status
                .wait_for(|s| s.results_taken >= reported && s.outbox == 0)
                .await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                running = handles.arbiter.running(),
                outbox = handles.status.borrow().outbox,
                "drain timeout: stopping with work unfinished"
            );
        }
        stop_link.cancel();
        let _ = link_task.await;
        drop(sampler);
        tracing::info!("agent stopped");
        Ok(())
    }
}

/// `old` with what of `new` can change live: the settings of the kinds
/// already served, reserve, pressure, drain timeout. `None` when `new`
/// names another GPU backend: its kinds were checked against that
/// backend (a kind without `executor` is simulated on simulated GPUs
/// only), not against the one this agent runs until a restart.
fn live_config(old: &AgentConfig, new: &AgentConfig) -> Option<AgentConfig> {
    if old.gpu.backend != new.gpu.backend {
        return None;
    }
    let mut live = old.clone();
    for (kind, settings) in &mut live.jobs {
        if let Some(updated) = new.jobs.get(kind) {
            *settings = updated.clone();
        }
    }
    live.gpu.reserve_mb = new.gpu.reserve_mb;
    live.gpu.pressure = new.gpu.pressure;
    live.gpu.stale_after = new.gpu.stale_after;
    live.drain_timeout = new.drain_timeout;
    Some(live)
}

/// Applies what can change live (job limits and executors of the kinds
/// already served, reserve, pressure, stale time, drain timeout) and returns the config
/// now in force; everything else waits for a restart, and says so.
fn apply_reload(
    old: &AgentConfig,
    new: &AgentConfig,
    handles: &Handles,
    jobs: &Jobs,
    client: &reqwest::Client,
) -> AgentConfig {
    let restart_needed: Vec<&str> = [
        ("node_id", old.node_id != new.node_id),
        (
            "coordinator_url",
            old.coordinator_urls != new.coordinator_urls,
        ),
        ("token", old.token != new.token),
        ("ca_file", old.ca_file != new.ca_file),
        ("system_roots", old.system_roots != new.system_roots),
        ("metrics_listen", old.metrics_listen != new.metrics_listen),
        (
            "capabilities",
            old.src_langs != new.src_langs || old.tgt_langs != new.tgt_langs,
        ),
        ("gpu.backend", old.gpu.backend != new.gpu.backend),
        ("gpu.simulated", old.gpu.simulated != new.gpu.simulated),
        ("gpu.devices", old.gpu.devices != new.gpu.devices),
        ("gpu.nvml", old.gpu.nvml != new.gpu.nvml),
        (
            "gpu.poll_interval_ms",
            old.gpu.poll_interval != new.gpu.poll_interval,
        ),
        ("the set of [jobs] kinds", old.kinds() != new.kinds()),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect();
    if !restart_needed.is_empty() {
        tracing::warn!(changed = ?restart_needed, "these settings apply only after a restart; keeping the old values until then");
    }
    let Some(live) = live_config(old, new) else {
        tracing::warn!(
            "gpu.backend changed: the new [jobs] tables were checked against a backend this agent does not run; nothing applied until a restart"
        );
        return old.clone();
    };
    handles.arbiter.reconfigure(Limits::from_config(&live));
    jobs.set_executors(executors(&live, handles.simulated.as_ref(), client));
    tracing::info!(
        "config reloaded: job limits, executors, reserve, pressure, stale time and drain timeout applied"
    );
    live
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ExecutorConfig;

    const REAL: &str = r#"
[capabilities]
src_langs = ["zh"]
tgt_langs = ["en"]
[gpu]
backend = "nvml"
[jobs.translate]
vram_mb = 2000
max_concurrent = 8
executor = "http"
url = "http://127.0.0.1:8001/translate"
"#;

    #[test]
    fn a_reload_applies_kind_settings_only_on_the_backend_it_was_checked_against() {
        let old = AgentConfig::parse(REAL).unwrap();
        let translate = JobKind::new("translate").unwrap();
        let tuned =
            AgentConfig::parse(&REAL.replace("max_concurrent = 8", "max_concurrent = 2")).unwrap();
        let live = live_config(&old, &tuned).unwrap();
        assert_eq!(live.jobs[&translate].max_concurrent, 2);
        // On simulated GPUs a kind may leave its executor out (simulated):
        // a real node must not take that in before it restarts.
        let simulated = AgentConfig::parse(
            &REAL
                .replace("backend = \"nvml\"", "backend = \"simulated\"")
                .replace(
                    "executor = \"http\"\nurl = \"http://127.0.0.1:8001/translate\"\n",
                    "",
                ),
        )
        .unwrap();
        assert!(matches!(
            simulated.jobs[&translate].executor,
            ExecutorConfig::Simulated { .. }
        ));
        assert!(live_config(&old, &simulated).is_none());
    }
}
