//! The link to the coordinator: one WebSocket, re-established with
//! jittered exponential backoff (backon; capped) whenever it drops.
//!
//! Each connection registers (idempotently: the same `instance` replaces a
//! stale socket), then sends heartbeats with capacity, capacity reports on
//! changes that matter, answers to assignments and job results. Results
//! wait in an outbox until the coordinator acknowledges them, and are sent
//! again after every reconnect. After two heartbeat intervals without a
//! frame from the coordinator a ping goes with the heartbeat; a
//! connection that has not answered it within an interval is taken as
//! half-open and replaced. Close codes that retrying cannot fix (bad token, no common
//! version, node id held by another host) end the link for good.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use lingua_shared::close::CloseCode;
use lingua_shared::protocol::{
    CapacityReport, Drain, FailureCode, GpuInfo, GpuReading, JobRef, JobResult, Outcome,
};
use lingua_shared::{JobKind, LangCode, MAX_FRAME_BYTES, Message, NodeId, encoded_len};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

mod batch;
mod connection;
mod registration;
mod tls;

use batch::Batch;
use connection::Connection;
use registration::Registered;
use tls::connector;

use crate::arbiter::Arbiter;
use crate::gpu::GpuSnapshot;
use crate::jobs::{Jobs, Outgoing};

/// Time the coordinator has to answer `register`.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Who this node is, as told at registration.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The node id.
    pub node_id: NodeId,
    /// The node token.
    pub token: Option<String>,
    /// Random per agent process.
    pub instance: String,
    /// Languages recognised.
    pub src_langs: Vec<LangCode>,
    /// Languages produced.
    pub tgt_langs: Vec<LangCode>,
    /// Kinds served.
    pub kinds: Vec<JobKind>,
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `ws://…/v1/node` or `wss://…/v1/node`, one per coordinator
    /// instance: each reconnection tries the next.
    pub urls: Vec<String>,
    /// A CA to trust instead of the public roots, for `wss://`.
    pub ca_file: Option<PathBuf>,
    /// Whether the system's roots are trusted besides `ca_file`.
    pub system_roots: bool,
    /// The longest wait between reconnection attempts.
    pub backoff_cap: Duration,
}

/// Why the link ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEnd {
    /// Shut down as asked.
    Shutdown,
    /// The coordinator refused the node for a reason retrying cannot fix.
    Fatal {
        /// The close code.
        code: CloseCode,
        /// The coordinator's explanation.
        reason: String,
    },
}

/// What the link reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStatus {
    /// Registered on a live connection.
    pub connected: bool,
    /// Results waiting for acknowledgement.
    pub outbox: usize,
    /// Registrations so far.
    pub registrations: u64,
    /// Results taken from the jobs so far (into the outbox, until
    /// acknowledged): a drain waits until it has every result the jobs
    /// reported ([`crate::jobs::Jobs::results_reported`]).
    pub results_taken: u64,
}

/// Everything the link works with.
pub struct Link {
    /// Who we are.
    pub identity: Identity,
    /// Where to connect.
    pub endpoint: Endpoint,
    /// The arbiter (capacity).
    pub arbiter: Arc<Arbiter>,
    /// The jobs (assignments, cancels).
    pub jobs: Arc<Jobs>,
    /// Answers and results from the jobs.
    pub outgoing: mpsc::UnboundedReceiver<Outgoing>,
    /// True once the node is draining.
    pub draining: watch::Receiver<bool>,
    /// Published status.
    pub status: watch::Sender<LinkStatus>,
}

/// Converts the arbiter's view into a capacity report.
pub fn capacity(arbiter: &Arbiter) -> CapacityReport {
    CapacityReport {
        free_slots: arbiter.free_slots(),
        gpus: arbiter.gpus().iter().map(reading).collect(),
        gpu_problem: arbiter.health(),
        room: arbiter.room(),
        running: Some(arbiter.running()),
        fallback_slots: arbiter.fallback_slots(),
    }
}

fn reading(gpu: &GpuSnapshot) -> GpuReading {
    GpuReading {
        uuid: gpu.uuid.clone(),
        memory_total_mb: gpu.memory_total_mb,
        memory_used_mb: gpu.memory_used_mb,
        utilization_pct: gpu.utilization_pct,
        temperature_c: gpu.temperature_c,
        healthy: gpu.healthy,
        reason: gpu.reason.clone(),
    }
}

/// How a connection ended.
enum Ended {
    Reconnect(String),
    Done(LinkEnd),
}

impl Link {
    /// Runs until shutdown or a fatal refusal.
    pub async fn run(mut self, gpus: Vec<GpuInfo>, shutdown: CancellationToken) -> LinkEnd {
        let backoff = ExponentialBuilder::new()
            .with_jitter()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(self.endpoint.backoff_cap)
            .without_max_times();
        let mut delays = backoff.build();
        let mut outbox: BTreeMap<JobRef, JobResult> = BTreeMap::new();
        let mut turn = 0usize;
        loop {
            // After a failure or a lost link, the next coordinator: the one
            // just tried may be the one that went away.
            let url = self.endpoint.urls[turn % self.endpoint.urls.len()].clone();
            turn = turn.wrapping_add(1);
            // Built for each attempt: a ca_file that became unusable fails
            // the attempt (and is logged), never falls back to other roots.
            let attempt = match connector(&self.endpoint) {
                Err(message) => Err(Ended::Reconnect(format!("cannot use ca_file: {message}"))),
                Ok(connector) => tokio::select! {
                    attempt = self.connect(&url, connector, &gpus) => attempt,
                    () = shutdown.cancelled() => return LinkEnd::Shutdown,
                },
            };
            let why = match attempt {
                Ok(registered) => {
                    delays = backoff.build();
                    match self.session(registered, &mut outbox, &shutdown).await {
                        Ended::Done(end) => return end,
                        Ended::Reconnect(why) => why,
                    }
                }
                Err(Ended::Done(end)) => return end,
                Err(Ended::Reconnect(why)) => why,
            };
            self.status.send_modify(|s| s.connected = false);
            let delay = delays.next().unwrap_or(self.endpoint.backoff_cap);
            tracing::warn!(reason = %why, retry_in_ms = delay.as_millis() as u64, "coordinator link down");
            let resume = Instant::now() + delay;
            // Keep collecting results while waiting; answers to assignments
            // are moot once the socket is gone.
            loop {
                tokio::select! {
                    () = sleep_until(resume) => break,
                    () = shutdown.cancelled() => return LinkEnd::Shutdown,
                    Some(out) = self.outgoing.recv() => {
                        if let Outgoing::Result(result) = out {
                            self.keep(&mut outbox, result);
                        }
                    }
                }
            }
        }
    }

    /// Runs one registered connection until it ends: what the jobs say
    /// and the node's room go out in batches, with a heartbeat every
    /// interval; what the coordinator sends is handled as it comes.
    async fn session(
        &mut self,
        registered: Registered,
        outbox: &mut BTreeMap<JobRef, JobResult>,
        shutdown: &CancellationToken,
    ) -> Ended {
        let Registered {
            ws,
            agreed,
            room: (told, mut room_changes),
        } = registered;
        let mut connection = Connection::new(ws, agreed, told);
        let draining = *self.draining.borrow();
        if let Err(ended) = connection.resend(outbox, draining).await {
            return ended;
        }
        let heartbeat = agreed.0;
        let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        loop {
            let never = Instant::now() + Duration::from_secs(3600);
            let debounced = connection.reported.debounce().unwrap_or(never);
            let accepts_due = connection.batch.accepts_by().unwrap_or(never);
            let done = tokio::select! {
                frame = connection.next() => match connection.received(frame) {
                    Ok(message) => {
                        if let Some(message) = message {
                            self.handle(message, outbox);
                        }
                        Ok(())
                    }
                    Err(ended) => Err(ended),
                },
                Some(out) = self.outgoing.recv() => {
                    self.take(out, &mut connection.batch, outbox);
                    Ok(())
                }
                _ = ticker.tick() => connection.tick(&self.arbiter).await,
                Ok(()) = room_changes.changed() => {
                    connection.room_changed(&self.arbiter);
                    Ok(())
                }
                () = sleep_until(debounced) => {
                    connection.debounced(&self.arbiter);
                    Ok(())
                }
                () = sleep_until(accepts_due) => Ok(()),
                Ok(()) = self.draining.changed() => {
                    if *self.draining.borrow() {
                        connection.batch.push(Message::Drain(Drain { reason: "agent shutting down".into() }));
                    }
                    Ok(())
                }
                () = shutdown.cancelled() => return connection.close().await,
            };
            if let Err(ended) = done {
                return ended;
            }
            // Whatever else is ready goes in the same write, a change of
            // slots not seen yet included.
            while let Ok(out) = self.outgoing.try_recv() {
                self.take(out, &mut connection.batch, outbox);
            }
            if room_changes.has_changed().unwrap_or(false) {
                room_changes.borrow_and_update();
                connection.room_changed(&self.arbiter);
            }
            if let Err(ended) = connection.flush(&self.arbiter).await {
                return ended;
            }
        }
    }

    /// Queues what the jobs have to say; a result also waits in the
    /// outbox until acknowledged.
    fn take(&self, out: Outgoing, batch: &mut Batch, outbox: &mut BTreeMap<JobRef, JobResult>) {
        match out {
            Outgoing::Accept(key, by) => batch.accept(key, by),
            Outgoing::Reject(reject) => batch.push(Message::JobReject(reject)),
            Outgoing::Result(result) => {
                let result = self.keep(outbox, result);
                batch.push(Message::JobResult(result));
            }
        }
    }

    /// Keeps a result in the outbox until it is acknowledged, as it will be
    /// sent: within one frame.
    fn keep(&self, outbox: &mut BTreeMap<JobRef, JobResult>, result: JobResult) -> JobResult {
        let result = within_frame(result);
        outbox.insert(
            JobRef {
                job_id: result.job_id.clone(),
                attempt: result.attempt,
            },
            result.clone(),
        );
        self.status.send_modify(|s| {
            s.outbox = outbox.len();
            s.results_taken += 1;
        });
        result
    }

    fn handle(&mut self, message: Message, outbox: &mut BTreeMap<JobRef, JobResult>) {
        match message {
            Message::JobAssign(job) => self.jobs.assign(job),
            Message::JobCancel(cancel) => {
                tracing::info!(job_id = %cancel.job_id, attempt = cancel.attempt, reason = %cancel.reason, "job cancelled by the coordinator");
                self.jobs.cancel(&JobRef {
                    job_id: cancel.job_id,
                    attempt: cancel.attempt,
                });
            }
            Message::ResultAck(ack) => {
                outbox.remove(&ack);
                self.status.send_modify(|s| s.outbox = outbox.len());
            }
            Message::Drain(drain) => {
                tracing::info!(reason = %drain.reason, "coordinator asked this node to drain");
                self.arbiter.set_draining(true);
            }
            Message::Error(error) => {
                tracing::warn!(code = ?error.code, message = %error.message, "coordinator reported an error");
            }
            other => tracing::warn!(
                message = other.type_name(),
                "unexpected message from the coordinator"
            ),
        }
    }
}

/// A result whose frame would exceed the frame limit becomes a failure
/// that says so: sent as it is, it would end the link instead.
fn within_frame(result: JobResult) -> JobResult {
    // `"type":"job_result",` and braces around the result's own fields.
    const ENVELOPE: usize = 64;
    let len = encoded_len(&result) + ENVELOPE;
    if len <= MAX_FRAME_BYTES {
        return result;
    }
    tracing::warn!(job_id = %result.job_id, bytes = len, "job output too large for one frame");
    JobResult {
        outcome: Outcome::Failed {
            code: FailureCode::ExecutorFailed,
            message: format!(
                "the job's output makes a {len}-byte result, over the {MAX_FRAME_BYTES}-byte frame limit"
            ),
        },
        ..result
    }
}

/// `write`, given up on (for a reconnection) when it fails or the
/// coordinator does not take it within `limit`.
async fn written(
    limit: Duration,
    write: impl Future<Output = Result<(), WsError>>,
    what: &str,
) -> Result<(), Ended> {
    match tokio::time::timeout(limit, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Ended::Reconnect(format!("send {what}: {e}"))),
        Err(_) => Err(Ended::Reconnect(format!(
            "send {what}: the coordinator took nothing for {limit:?}"
        ))),
    }
}

fn closed(code: u16, reason: String) -> Ended {
    match CloseCode::from_code(code) {
        Some(code) if code.is_fatal() => {
            tracing::error!(code = code.code(), %reason, "coordinator refused this node; not retrying");
            Ended::Done(LinkEnd::Fatal { code, reason })
        }
        Some(CloseCode::NodeIdConflict) => {
            tracing::error!(%reason, "another live agent holds this node id: check that every host has its own node_id; retrying");
            Ended::Reconnect(format!("closed by the coordinator with 4005: {reason}"))
        }
        _ => Ended::Reconnect(format!("closed by the coordinator with {code}: {reason}")),
    }
}
