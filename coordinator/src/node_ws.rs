//! The node WebSocket endpoint, `/v1/node`: one task per socket.
//!
//! A connection must register first (token, protocol version, node id
//! rules), then sends heartbeats and capacity reports. docs/PROTOCOL.md has
//! the state machine and the close codes used here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket};
use axum::extract::{ConnectInfo, Extension, State, WebSocketUpgrade};
use axum::response::Response;
use futures_util::SinkExt;
use lingua_shared::close::CloseCode;
use lingua_shared::protocol::{Drain, ErrorCode, ErrorFrame, JobRef};
use lingua_shared::{MAX_FRAME_BYTES, Message, decode, encode};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};

mod frames;
mod handshake;
mod results;
mod session;

use results::Results;
use session::Session;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::NodeCredentials;
use crate::config::Config;
use crate::heartbeats::HeartbeatBatcher;
use crate::hints::Hints;
use crate::jobs::JobRouter;
use crate::listener::{ConnectionPermit, PeerAddr};
use crate::metrics::{Direction, Metrics};
use crate::registry::{Control, Registry};
use crate::route_batch::RouteBatcher;
use crate::store::Store;

/// Time a new socket has to send `register`.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// Bad frames tolerated on one connection before it is closed with 1008.
pub const MAX_BAD_FRAMES: u32 = 10;
/// Most languages on either side, and most kinds, one node may declare.
pub const MAX_CAPABILITIES: usize = 32;
/// Messages queued for one node socket before further ones are refused
/// (assignments carry up to one frame each: 256 MiB at most).
pub const CONTROL_QUEUE: usize = 256;
/// Longest text from a node that goes into a log line.
const MAX_LOGGED_CHARS: usize = 512;
/// Most queued frames written to one node socket with one flush.
const MAX_WRITE_BATCH: usize = 64;
/// Shortest time between two routing updates from one connection: more
/// frequent capacity reports are coalesced, the latest one wins.
pub const MIN_PUBLISH_INTERVAL: Duration = Duration::from_millis(25);

/// What node sockets use: every service a registration, a report or an
/// answer touches.
pub struct NodeServices {
    /// The validated configuration.
    pub config: Config,
    /// What nodes present to register.
    pub credentials: NodeCredentials,
    /// Redis.
    pub store: Store,
    /// Node sockets held here.
    pub registry: Arc<Registry>,
    /// Pending routing updates.
    pub batcher: Arc<RouteBatcher>,
    /// Heartbeats waiting to be recorded in Redis.
    pub heartbeats: Arc<HeartbeatBatcher>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Job routing: answers, refusals and re-dispatch of lost attempts.
    pub router: Arc<JobRouter>,
    /// What routing is told about the nodes held here.
    pub hints: Arc<Hints>,
    /// This coordinator instance's random id.
    pub instance: String,
    /// Cancelled when the coordinator shuts down.
    pub shutdown: CancellationToken,
    /// Node connection tasks, awaited on shutdown.
    pub tasks: TaskTracker,
}

/// Upgrades `/v1/node` requests.
pub async fn upgrade(
    State(services): State<Arc<NodeServices>>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    Extension(permit): Extension<ConnectionPermit>,
    ws: WebSocketUpgrade,
) -> Response {
    ws.max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .read_buffer_size(lingua_shared::WS_READ_BUFFER_BYTES)
        .write_buffer_size(lingua_shared::WS_WRITE_BUFFER_BYTES)
        .on_upgrade(move |socket| {
            let tasks = services.tasks.clone();
            tasks.track_future(async move {
                // The socket counts against the connection cap while it lives.
                let _permit = permit;
                serve(socket, services, peer).await;
            })
        })
}

/// Why a connection ended, for the close frame and the log.
struct Ending {
    code: CloseCode,
    reason: &'static str,
}

impl Ending {
    fn new(code: CloseCode, reason: &'static str) -> Self {
        Self { code, reason }
    }
}

async fn serve(mut socket: WebSocket, services: Arc<NodeServices>, peer: SocketAddr) {
    let (control_tx, mut control_rx) = mpsc::channel(CONTROL_QUEUE);
    let mut session = match handshake::register(&mut socket, &services, control_tx).await {
        Ok(session) => session,
        Err(ending) => {
            tracing::info!(%peer, code = ending.code.code(), reason = ending.reason, "node refused");
            close(&mut socket, ending).await;
            return;
        }
    };
    services.metrics.nodes_connected.inc();
    tracing::info!(%peer, node_id = %session.node, epoch = session.epoch, pairs = session.pairs.len(), "node registered");
    session.publish(&services);

    let ending = run(&mut socket, &services, &mut session, &mut control_rx).await;
    tracing::info!(node_id = %session.node, epoch = session.epoch, code = ending.code.code(), reason = ending.reason, "node connection closing");
    close(&mut socket, ending).await;
    services.metrics.nodes_connected.dec();
    session.leave(&services).await;
}

async fn close(socket: &mut WebSocket, ending: Ending) {
    let frame = CloseFrame {
        code: ending.code.code(),
        reason: ending.reason.into(),
    };
    let _ = timeout(
        Duration::from_secs(1),
        socket.send(WsMessage::Close(Some(frame))),
    )
    .await;
}

/// Sends one frame, and whatever was buffered before it.
async fn send(
    socket: &mut WebSocket,
    services: &NodeServices,
    message: &Message,
) -> Result<(), Ending> {
    feed(socket, services, message).await?;
    within_lease(services, socket.flush()).await
}

/// Writes one frame to the socket's buffer, sent with the next flush (or
/// at once when the buffer fills).
async fn feed(
    socket: &mut WebSocket,
    services: &NodeServices,
    message: &Message,
) -> Result<(), Ending> {
    services.metrics.frame(Direction::Out, message.type_name());
    within_lease(
        services,
        socket.feed(WsMessage::Text(encode(message).into())),
    )
    .await
}

/// A write that the node does not take within one lease ends its
/// connection: a node that is not reading leaves routing instead of
/// holding a socket (and its jobs) while the heartbeat deadline cannot
/// fire.
async fn within_lease(
    services: &NodeServices,
    write: impl Future<Output = Result<(), axum::Error>>,
) -> Result<(), Ending> {
    match timeout(services.config.lease(), write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Ending::new(CloseCode::Normal, "send failed")),
        Err(_) => Err(Ending::new(
            CloseCode::PolicyViolation,
            "send timed out: the node is not reading",
        )),
    }
}

async fn send_error(
    socket: &mut WebSocket,
    services: &NodeServices,
    code: ErrorCode,
    message: String,
) -> Result<(), Ending> {
    let name = serde_json::to_value(code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    services.metrics.frame_rejected(&name);
    send(
        socket,
        services,
        &Message::Error(ErrorFrame { code, message }),
    )
    .await
}

/// The payload of a data frame, or why the connection ends.
enum Frame {
    Data(Bytes),
    Skip,
}

fn frame_of(received: Option<Result<WsMessage, axum::Error>>) -> Result<Frame, Ending> {
    match received {
        None => Err(Ending::new(CloseCode::Normal, "node went away")),
        Some(Err(err)) => {
            let text = err.to_string();
            if text.contains("too long") || text.contains("too big") {
                Err(Ending::new(CloseCode::TooLarge, "frame exceeds 1 MiB"))
            } else {
                Err(Ending::new(CloseCode::Normal, "connection error"))
            }
        }
        Some(Ok(WsMessage::Text(text))) => Ok(Frame::Data(text.into())),
        Some(Ok(WsMessage::Binary(bytes))) => Ok(Frame::Data(bytes)),
        Some(Ok(WsMessage::Close(_))) => Err(Ending::new(CloseCode::Normal, "node closed")),
        Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => Ok(Frame::Skip),
    }
}

async fn run(
    socket: &mut WebSocket,
    services: &NodeServices,
    session: &mut Session,
    control: &mut mpsc::Receiver<Control>,
) -> Ending {
    let lease = services.config.lease();
    let mut bad_frames = BadFrames(0);
    let mut results = Results::default();
    let mut silent_at = Instant::now() + lease;
    // One timer for the connection's deadlines, and one wait for shutdown,
    // made once and moved: each new timer or wait takes a shared lock.
    let timer = sleep_until(silent_at);
    let token = services.shutdown.child_token();
    let shutdown = token.cancelled();
    tokio::pin!(timer, shutdown);
    loop {
        let acks_at = results.flush_at();
        let publish_at = session
            .publish_pending
            .then(|| session.published + MIN_PUBLISH_INTERVAL);
        let next = [acks_at, publish_at]
            .into_iter()
            .flatten()
            .fold(silent_at, Instant::min);
        if timer.deadline() != next {
            timer.as_mut().reset(next);
        }
        let received = tokio::select! {
            received = socket.recv(), if results.has_room() => received,
            Some(recorded) = results.recorded(), if results.recording() => {
                let answered = results.answer(socket, services, &session.node, recorded).await;
                if let Err(ending) = answered.and_then(|handled| bad_frames.count(&handled)) {
                    return ending;
                }
                continue;
            }
            instruction = control.recv() => {
                if let Err(ending) = instruct(socket, services, session, (instruction, control)).await {
                    return ending;
                }
                results.sent();
                continue;
            }
            () = &mut timer => {
                let now = Instant::now();
                if silent_at <= now {
                    return Ending::new(CloseCode::HeartbeatTimeout, "missed heartbeats");
                }
                if acks_at.is_some_and(|at| at <= now)
                    && let Err(ending) = results.flush(socket, services).await
                {
                    return ending;
                }
                if publish_at.is_some_and(|at| at <= now) {
                    session.publish(services);
                }
                continue;
            }
            () = &mut shutdown => {
                let connection = (session, control, &mut bad_frames);
                return frames::stopping(socket, services, connection, &mut results).await;
            }
        };
        let frame = match frame_of(received) {
            Ok(Frame::Data(frame)) => frame,
            Ok(Frame::Skip) => continue,
            Err(ending) => return ending,
        };
        match take(socket, services, session, &frame, &mut results).await {
            Ok(Handled::Alive) => silent_at = Instant::now() + lease,
            Ok(handled) => {
                if let Err(ending) = bad_frames.count(&handled) {
                    return ending;
                }
            }
            Err(ending) => return ending,
        }
    }
}

/// Takes in a data frame from the node: a heartbeat read in part when
/// its capacity is the one held, any other frame decoded and handled.
async fn take<'a>(
    socket: &mut WebSocket,
    services: &'a NodeServices,
    session: &mut Session,
    frame: &[u8],
    results: &mut Results<'a>,
) -> Result<Handled, Ending> {
    if let Some(handled) = frames::heartbeat_frame(services, session, frame) {
        return Ok(handled);
    }
    match decode(frame) {
        Ok(message) => {
            services.metrics.frame(Direction::In, message.type_name());
            handle(socket, services, session, message, results).await
        }
        Err(err) => {
            send_error(socket, services, err.code(), err.to_string())
                .await
                .map_err(|_| Ending::new(CloseCode::Normal, "send failed"))?;
            Ok(Handled::Bad)
        }
    }
}

/// Bad frames from one connection so far: too many end it.
struct BadFrames(u32);

impl BadFrames {
    fn count(&mut self, handled: &Handled) -> Result<(), Ending> {
        if matches!(handled, Handled::Bad) {
            self.0 += 1;
            if self.0 >= MAX_BAD_FRAMES {
                return Err(Ending::new(
                    CloseCode::PolicyViolation,
                    "too many bad frames",
                ));
            }
        }
        Ok(())
    }
}

/// Carries out what the rest of the coordinator asked of this connection:
/// `first`, and what else is queued (up to [`MAX_WRITE_BATCH`]), with one
/// write.
async fn instruct(
    socket: &mut WebSocket,
    services: &NodeServices,
    session: &mut Session,
    (first, control): (Option<Control>, &mut mpsc::Receiver<Control>),
) -> Result<(), Ending> {
    let Some(first) = first else {
        return Err(Ending::new(CloseCode::Internal, "control channel closed"));
    };
    for instruction in queued(first, control, MAX_WRITE_BATCH) {
        match instruction {
            Control::Send(message) => feed(socket, services, &message).await?,
            Control::Close(code, reason) => return Err(Ending::new(code, reason)),
            Control::Drain(reason) => {
                session.draining.store(true, Ordering::SeqCst);
                session.publish(services);
                feed(socket, services, &Message::Drain(Drain { reason })).await?;
            }
        }
    }
    within_lease(services, socket.flush()).await
}

/// `first` and what is queued behind it, `most` in all at most; the rest
/// stays queued.
fn queued(first: Control, control: &mut mpsc::Receiver<Control>, most: usize) -> Vec<Control> {
    let mut batch = vec![first];
    while batch.len() < most
        && let Ok(more) = control.try_recv()
    {
        batch.push(more);
    }
    batch
}

enum Handled {
    Fine,
    Alive,
    Bad,
}

async fn handle<'a>(
    socket: &mut WebSocket,
    services: &'a NodeServices,
    session: &mut Session,
    message: Message,
    results: &mut Results<'a>,
) -> Result<Handled, Ending> {
    match message {
        Message::Heartbeat(heartbeat) => {
            let text = serde_json::to_string(&heartbeat.capacity).unwrap_or_default();
            let report = Some(heartbeat.capacity);
            Ok(frames::heartbeat(services, session, &text, report))
        }
        Message::Capacity(capacity) => {
            session.record_due |= services.hints.changes(&session.node, &capacity);
            session.reported(services, capacity);
            session.publish_soon(services);
            Ok(Handled::Fine)
        }
        Message::Drain(drain) => Ok(frames::drain(services, session, drain).await),
        Message::Error(error) => {
            let message: String = error.message.chars().take(MAX_LOGGED_CHARS).collect();
            tracing::warn!(node_id = %session.node, code = ?error.code, %message, "node reported an error");
            // Counted like a bad frame: a node has no reason to send many.
            Ok(Handled::Bad)
        }
        Message::JobAccept(accept) => {
            services
                .router
                .answer((&session.node, session.epoch), &accept, None);
            Ok(Handled::Fine)
        }
        Message::JobReject(reject) => Ok(frames::reject(services, session, reject)),
        Message::JobResult(result) => {
            let key = JobRef {
                job_id: result.job_id.clone(),
                attempt: result.attempt,
            };
            services
                .router
                .result_arrived((&session.node, session.epoch), &key, &result.outcome);
            results.record(&services.router, &session.node, (key, result));
            Ok(Handled::Fine)
        }
        other @ (Message::Register(_)
        | Message::RegisterAck(_)
        | Message::JobAssign(_)
        | Message::ResultAck(_)
        | Message::JobCancel(_)) => {
            let text = format!(
                "{} is not allowed from a registered node",
                other.type_name()
            );
            send_error(socket, services, ErrorCode::UnexpectedMessage, text).await?;
            Ok(Handled::Bad)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(reason: &str) -> Control {
        Control::Drain(reason.to_owned())
    }

    fn reasons(batch: Vec<Control>) -> Vec<String> {
        batch
            .into_iter()
            .map(|control| match control {
                Control::Drain(reason) => reason,
                _ => unreachable!("only drains were queued"),
            })
            .collect()
    }

    #[test]
    fn a_batch_takes_what_is_queued_up_to_its_size_and_loses_nothing() {
        let (tx, mut rx) = mpsc::channel(8);
        for i in 1..=4 {
            tx.try_send(drain(&i.to_string())).unwrap();
        }
        assert_eq!(reasons(queued(drain("0"), &mut rx, 3)), ["0", "1", "2"]);
        let next = rx.try_recv().unwrap();
        assert_eq!(reasons(queued(next, &mut rx, 3)), ["3", "4"]);
    }
}
