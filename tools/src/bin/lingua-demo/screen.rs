//! The demo's live view: a bar, the coordinator's counters and one line
//! per node, redrawn in place on a terminal; the tally of answers, and
//! the summary at the end.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lingua_coordinator::metrics::Metrics;
use lingua_shared::process::Exit;
use lingua_tools::percentile;
use serde_json::Value;
use tokio::sync::Mutex;

use crate::DemoAgent;

/// What became of the jobs so far.
#[derive(Default)]
pub(crate) struct Tally {
    latencies_ms: Vec<u64>,
    completed: usize,
    /// Completed on a CPU fallback executor.
    on_cpu: usize,
    failed: BTreeMap<String, usize>,
    rerouted: usize,
    unanswered: usize,
    examples: Vec<String>,
}

impl Tally {
    /// Counts a job's answer (`None`: it got none).
    pub(crate) fn add(&mut self, answer: Option<Value>) {
        match answer {
            Some(job) if job["status"] == "completed" => {
                self.completed += 1;
                if job["device"] == "cpu" {
                    self.on_cpu += 1;
                }
                self.latencies_ms
                    .push(job["latency_ms"].as_u64().unwrap_or(0));
                if job["attempts"].as_u64().unwrap_or(1) > 1 {
                    self.rerouted += 1;
                }
            }
            Some(job) if job["status"] == "failed" => {
                let code = job["error"]["code"]
                    .as_str()
                    .unwrap_or("unknown")
                    .to_owned();
                *self.failed.entry(code).or_default() += 1;
                if self.examples.len() < 3 {
                    self.examples.push(
                        job["error"]["message"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    );
                }
            }
            _ => self.unanswered += 1,
        }
    }
}

fn bar(done: usize, total: usize, width: usize) -> String {
    let filled = (done * width)
        .checked_div(total)
        .unwrap_or(width)
        .min(width);
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// The sum of every series of `family` in the coordinator's metrics.
pub(crate) fn counter(metrics: &Metrics, family: &str) -> u64 {
    // Read through the Prometheus text so the demo shows exactly what an
    // operator would scrape.
    let text = metrics.render();
    text.lines()
        .filter(|line| line.starts_with(family))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

struct View<'a> {
    started: Instant,
    total: usize,
    done: usize,
    tally: &'a Tally,
    agents: &'a [DemoAgent],
    metrics: &'a Metrics,
    killed: Option<&'a str>,
}

fn render(view: &View<'_>) -> Vec<String> {
    let elapsed = view.started.elapsed().as_secs_f64().max(0.001);
    let mut sorted = view.tally.latencies_ms.clone();
    sorted.sort_unstable();
    let failed: usize = view.tally.failed.values().sum();
    let assignments = counter(view.metrics, "lingua_job_assignments_total");
    let mut lines = vec![
        format!(
            "{} {}/{}  {:.0} jobs/s  p50 {} ms  p99 {} ms  failed {}",
            bar(view.done, view.total, 20),
            view.done,
            view.total,
            view.done as f64 / elapsed,
            percentile(&sorted, 0.50),
            percentile(&sorted, 0.99),
            failed
        ),
        format!(
            "queued {}  shed {}  sent {}  refused {}  retried {}{}",
            counter(view.metrics, "lingua_queue_depth"),
            counter(view.metrics, "lingua_jobs_shed_total"),
            assignments,
            counter(view.metrics, "lingua_job_refusals_total"),
            view.tally.rerouted,
            view.killed
                .map(|k| format!("  ({k} was killed)"))
                .unwrap_or_default()
        ),
        format!(
            "{:<8} {:<8} {:>7} {:>18} {:>22}",
            "node", "state", "running", "free asr/mt/tts", "VRAM in use (MiB)"
        ),
    ];
    for agent in view.agents {
        let free = agent.handles.arbiter.free_slots();
        let slots = ["asr", "translate", "tts"]
            .iter()
            .map(|k| {
                free.iter()
                    .find(|(kind, _)| kind.as_str() == *k)
                    .map_or(0, |(_, n)| *n)
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join("/");
        let gpus = agent.handles.arbiter.gpus();
        let used: u64 = gpus.iter().map(|g| g.memory_used_mb).sum();
        let total: u64 = gpus.iter().map(|g| g.memory_total_mb).sum();
        let state = if !agent.alive() {
            "KILLED"
        } else if agent.handles.status.borrow().connected {
            "ready"
        } else {
            "offline"
        };
        let running = if agent.alive() {
            agent.handles.arbiter.running()
        } else {
            0
        };
        lines.push(format!(
            "{:<8} {:<8} {:>7} {:>18} {:>10} / {:<9}",
            agent.name, state, running, slots, used, total
        ));
    }
    lines
}

/// The live progress: redrawn in place on a terminal, one line per
/// refresh otherwise.
pub(crate) struct Screen {
    pub(crate) tty: bool,
    /// The most jobs seen waiting in the admission queue.
    pub(crate) peak_queued: u64,
    pub(crate) printed: usize,
    pub(crate) started: Instant,
    pub(crate) total: usize,
    pub(crate) done: Arc<AtomicUsize>,
    pub(crate) tally: Arc<Mutex<Tally>>,
}

impl Screen {
    pub(crate) async fn draw(
        &mut self,
        agents: &[DemoAgent],
        metrics: &Metrics,
        killed: Option<&str>,
        full: bool,
    ) {
        let tally = self.tally.lock().await;
        self.peak_queued = self.peak_queued.max(counter(metrics, "lingua_queue_depth"));
        let lines = render(&View {
            started: self.started,
            total: self.total,
            done: self.done.load(Ordering::Relaxed),
            tally: &tally,
            agents,
            metrics,
            killed,
        });
        let mut out = std::io::stdout().lock();
        if self.tty {
            if self.printed > 0 {
                let _ = write!(out, "\x1b[{}A", self.printed);
            }
            // A line that wraps would throw the redraw off: cut each to
            // the terminal's width.
            let width = terminal_size::terminal_size().map_or(80, |(w, _)| usize::from(w.0));
            for line in &lines {
                let cut: String = line.chars().take(width.saturating_sub(1)).collect();
                let _ = writeln!(out, "\x1b[2K{cut}");
            }
            self.printed = lines.len();
        } else if full {
            for line in &lines {
                let _ = writeln!(out, "{line}");
            }
        } else {
            let _ = writeln!(out, "{}", lines[0]);
        }
        let _ = out.flush();
    }

    /// Forget what was drawn (a message was printed below it).
    pub(crate) fn detach(&mut self) {
        self.printed = 0;
    }
}

/// Prints what became of the `total` jobs, and exits 0 only when each
/// reached a terminal state; `run` is how long they took, the most that
/// waited in the queue at once and the node killed, if any.
pub(crate) fn summary(
    total: usize,
    tally: &Tally,
    metrics: &Metrics,
    (took, peak_queued, killed): (Duration, u64, Option<&str>),
) -> ExitCode {
    let elapsed = took.as_secs_f64();
    let mut sorted = tally.latencies_ms.clone();
    sorted.sort_unstable();
    let failed: usize = tally.failed.values().sum();
    let assignments = counter(metrics, "lingua_job_assignments_total");
    println!();
    println!("summary");
    println!("  jobs submitted       {total}");
    println!("  completed            {}", tally.completed);
    println!(
        "  failed               {failed}{}",
        if tally.failed.is_empty() {
            String::new()
        } else {
            format!(" {:?}", tally.failed)
        }
    );
    for example in &tally.examples {
        println!("    e.g. {example}");
    }
    println!("  without an answer    {}", tally.unanswered);
    println!(
        "  cpu fallback         {} translate jobs ran on it while no GPU had room",
        tally.on_cpu
    );
    println!(
        "  throughput           {:.0} jobs/s over {elapsed:.1} s",
        total as f64 / elapsed
    );
    println!(
        "  latency              p50 {} ms, p99 {} ms",
        percentile(&sorted, 0.50),
        percentile(&sorted, 0.99)
    );
    let refusals = counter(metrics, "lingua_job_refusals_total");
    println!(
        "  assignments          {assignments}: {refusals} refused by nodes ({:.3} per job), {} beyond one per job in all",
        refusals as f64 / total.max(1) as f64,
        assignments.saturating_sub(total as u64)
    );
    println!(
        "  admission queue      at most {} jobs waiting for room; {} answered early (no room in time)",
        peak_queued,
        counter(metrics, "lingua_jobs_shed_total")
    );
    if let Some(killed) = killed {
        println!(
            "  node failure         {killed} killed part-way; its jobs were retried on other nodes ({} jobs completed after more than one attempt)",
            tally.rerouted
        );
    }
    if tally.unanswered == 0 && tally.completed + failed == total {
        println!("every job reached a terminal state");
        ExitCode::SUCCESS
    } else {
        println!(
            "{} jobs got no terminal answer",
            total - tally.completed - failed
        );
        Exit::Internal.into()
    }
}
