//! One registered connection to the coordinator: what it owes the
//! coordinator (gathered in a [`Batch`], written together), and whether
//! the coordinator is still there (heartbeats, and a ping after two quiet
//! intervals).

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use lingua_shared::protocol::{
    Drain, ErrorFrame, Heartbeat, JobRef, JobResult, RESULT_ANSWERS_VERSION,
};
use lingua_shared::{JobKind, Message, decode, encode};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};

use super::batch::{Batch, Reported};
use super::{Ended, LinkEnd, Ws, closed, written};
use crate::arbiter::Arbiter;

/// A registered connection and what it has to send.
pub(super) struct Connection {
    ws: Ws,
    /// The coordinator's heartbeat interval.
    heartbeat: Duration,
    /// How long one write may take. A write the coordinator does not take
    /// within three intervals (its lease, by default: it has given this
    /// node up by then) ends the link: blocked on it, the agent would not
    /// reach the ping that finds a half-open connection.
    write_limit: Duration,
    /// Frames due.
    pub(super) batch: Batch,
    /// What the coordinator was last told of this node's room.
    pub(super) reported: Reported,
    /// The last heartbeat's number.
    seq: u64,
    /// When the coordinator was last heard from.
    last_heard: Instant,
    /// When a ping went out that nothing has answered yet.
    ping_sent: Option<Instant>,
}

impl Connection {
    /// A connection registered with a coordinator of protocol `version`,
    /// whose heartbeat interval is `heartbeat`, told of `told` free slots.
    pub(super) fn new(
        ws: Ws,
        (heartbeat, version): (Duration, u32),
        told: BTreeMap<JobKind, u32>,
    ) -> Self {
        Self {
            ws,
            heartbeat,
            write_limit: heartbeat * 3,
            // An older coordinator counts an assignment as answered only
            // by its accept: every accept goes.
            batch: Batch::new(version >= RESULT_ANSWERS_VERSION),
            reported: Reported::new(told),
            seq: 0,
            last_heard: Instant::now(),
            ping_sent: None,
        }
    }

    /// Sends what a new connection owes first: every result not yet
    /// acknowledged, and the drain if the agent is draining. Each frame
    /// within the write limit: a large outbox takes what it takes.
    pub(super) async fn resend(
        &mut self,
        outbox: &BTreeMap<JobRef, JobResult>,
        draining: bool,
    ) -> Result<(), Ended> {
        let mut first = outbox
            .values()
            .cloned()
            .map(Message::JobResult)
            .collect::<Vec<_>>();
        if draining {
            first.push(Message::Drain(Drain {
                reason: "agent shutting down".into(),
            }));
        }
        for message in first {
            let frame = WsMessage::text(encode(&message));
            written(self.write_limit, self.ws.send(frame), message.type_name()).await?;
        }
        // Nothing is read meanwhile: quiet is counted from here.
        self.last_heard = Instant::now();
        Ok(())
    }

    /// The next frame from the coordinator.
    pub(super) async fn next(&mut self) -> Option<Result<WsMessage, WsError>> {
        self.ws.next().await
    }

    /// A frame came from the coordinator: the message in it, if any, or
    /// how the connection ended. A frame that cannot be read is answered
    /// with an error, and the link stays up (as the coordinator does with
    /// ours).
    pub(super) fn received(
        &mut self,
        frame: Option<Result<WsMessage, WsError>>,
    ) -> Result<Option<Message>, Ended> {
        self.last_heard = Instant::now();
        self.ping_sent = None;
        match frame {
            Some(Ok(WsMessage::Text(text))) => match decode(text.as_bytes()) {
                Ok(message) => {
                    if let Message::JobAssign(assign) = &message {
                        self.reported.assigned(&assign.kind);
                    }
                    Ok(Some(message))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bad frame from the coordinator");
                    self.batch.push(Message::Error(ErrorFrame {
                        code: e.code(),
                        message: e.to_string(),
                    }));
                    Ok(None)
                }
            },
            Some(Ok(WsMessage::Close(frame))) => {
                let (code, reason) = frame.map_or((1005, String::new()), |f| {
                    (u16::from(f.code), f.reason.to_string())
                });
                Err(closed(code, reason))
            }
            Some(Ok(_)) => Ok(None),
            Some(Err(e)) => Err(Ended::Reconnect(format!("connection error: {e}"))),
            None => Err(Ended::Reconnect("connection closed".into())),
        }
    }

    /// A heartbeat interval passed: a heartbeat is due, with a ping after
    /// two quiet intervals (every third heartbeat of an idle link, whose
    /// last frame heard is the answer to the ping before). A ping not
    /// answered within an interval ends the link, so one that does not
    /// answer is replaced three to five intervals after the last frame
    /// heard. (An agent stalled for over an interval after a ping may
    /// find the tick before the answer, and reconnect: ticks missed while
    /// it stalled come at once, before any answer could.)
    pub(super) async fn tick(&mut self, arbiter: &Arbiter) -> Result<(), Ended> {
        if self
            .ping_sent
            .is_some_and(|at| at.elapsed() >= self.heartbeat)
        {
            return Err(Ended::Reconnect("no answer from the coordinator to a ping within a heartbeat interval (half-open connection)".into()));
        }
        self.seq += 1;
        let capacity = self.reported.report(arbiter);
        self.batch.push(Message::Heartbeat(Heartbeat {
            seq: self.seq,
            capacity,
        }));
        if self.ping_sent.is_none() && self.last_heard.elapsed() >= self.heartbeat * 2 {
            let ping = self.ws.feed(WsMessage::Ping(Vec::new().into()));
            written(self.write_limit, ping, "ping").await?;
            self.ping_sent = Some(Instant::now());
        }
        Ok(())
    }

    /// The node's room changed: reported now if the coordinator must know
    /// at once, else after the debounce.
    pub(super) fn room_changed(&mut self, arbiter: &Arbiter) {
        if let Some(report) = self.reported.changed(arbiter) {
            self.batch.push(Message::Capacity(report));
        }
    }

    /// The debounce of a change of room ran out: the change is reported.
    pub(super) fn debounced(&mut self, arbiter: &Arbiter) {
        if let Some(report) = self.reported.pending(arbiter) {
            self.batch.push(Message::Capacity(report));
        }
    }

    /// Writes the frames due, if any, with one flush.
    pub(super) async fn flush(&mut self, arbiter: &Arbiter) -> Result<(), Ended> {
        if !self.batch.due(Instant::now()) {
            return Ok(());
        }
        let frames = self.batch.take(self.reported.pending(arbiter));
        written(self.write_limit, send_all(&mut self.ws, frames), "frames").await
    }

    /// The agent stops: the coordinator is told, with a normal close.
    pub(super) async fn close(mut self) -> Ended {
        let close = self.ws.close(Some(CloseFrame {
            code: WsCloseCode::Normal,
            reason: "agent stopped".into(),
        }));
        let _ = written(self.write_limit, close, "close").await;
        Ended::Done(LinkEnd::Shutdown)
    }
}

/// Writes `frames` and flushes once: one write for all of them.
async fn send_all(ws: &mut Ws, frames: Vec<Message>) -> Result<(), WsError> {
    for message in frames {
        ws.feed(WsMessage::text(encode(&message))).await?;
    }
    ws.flush().await
}
