//! A node's results, recorded while its socket is read on (a result never
//! waits behind another's Redis call), and their acknowledgements, which
//! go out with the next frame sent to the node, or within
//! [`ACK_DELAY`]: the agent only needs them to empty its outbox.

use std::future::Future;
use std::pin::Pin;

use axum::extract::ws::WebSocket;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use lingua_shared::close::CloseCode;
use lingua_shared::protocol::{ErrorCode, JobRef, JobResult};
use lingua_shared::{Message, NodeId};
use tokio::time::Instant;

use super::{Ending, Handled, NodeServices, feed, send_error, within_lease};
use crate::jobs::{JobRouter, Taken};
use crate::store::StoreError;

/// Results of one connection being recorded at once, at most: past this,
/// its socket is not read until one is done.
pub(super) const MAX_RECORDING: usize = 16;
/// How long an acknowledgement may wait for a frame to ride with.
pub(super) const ACK_DELAY: std::time::Duration = std::time::Duration::from_millis(50);

type Recording<'a> = Pin<Box<dyn Future<Output = (JobRef, Result<Taken, StoreError>)> + Send + 'a>>;

/// One connection's results in flight, and its acknowledgements not yet
/// sent.
#[derive(Default)]
pub(super) struct Results<'a> {
    recording: FuturesUnordered<Recording<'a>>,
    /// Acknowledgements written to the socket's buffer, unsent: the
    /// moment they must go at the latest.
    unsent_until: Option<Instant>,
}

impl<'a> Results<'a> {
    /// Starts recording `result`, reported by `node`.
    pub(super) fn record(
        &mut self,
        router: &'a JobRouter,
        node: &NodeId,
        (key, result): (JobRef, JobResult),
    ) {
        let node = node.clone();
        self.recording.push(Box::pin(async move {
            (key, router.result(&node, result).await)
        }));
    }

    /// True while another result may be taken in.
    pub(super) fn has_room(&self) -> bool {
        self.recording.len() < MAX_RECORDING
    }

    /// True while some result is being recorded.
    pub(super) fn recording(&self) -> bool {
        !self.recording.is_empty()
    }

    /// The next result recorded (pending while none is in flight).
    pub(super) async fn recorded(&mut self) -> Option<(JobRef, Result<Taken, StoreError>)> {
        self.recording.next().await
    }

    /// When unsent acknowledgements must go.
    pub(super) fn flush_at(&self) -> Option<Instant> {
        self.unsent_until
    }

    /// A frame went out: the acknowledgements buffered before it with it.
    pub(super) fn sent(&mut self) {
        self.unsent_until = None;
    }

    /// Sends the acknowledgements buffered, on their own.
    pub(super) async fn flush(
        &mut self,
        socket: &mut WebSocket,
        services: &NodeServices,
    ) -> Result<(), Ending> {
        self.sent();
        within_lease(services, socket.flush()).await
    }

    /// Answers a recorded result: its acknowledgement buffered (the node
    /// may forget it), or an error when the attempt is another node's; a
    /// Redis failure ends the connection (unacknowledged, the result stays
    /// in the agent's outbox and comes back after it reconnects).
    pub(super) async fn answer(
        &mut self,
        socket: &mut WebSocket,
        services: &NodeServices,
        node: &NodeId,
        (key, taken): (JobRef, Result<Taken, StoreError>),
    ) -> Result<Handled, Ending> {
        match taken {
            Ok(Taken::Acknowledged) => {}
            Ok(Taken::Foreign) => {
                let text = format!(
                    "job {} attempt {} is not assigned to node {node}: result refused",
                    key.job_id, key.attempt
                );
                send_error(socket, services, ErrorCode::NotAssigned, text).await?;
                self.sent();
                // Acknowledged too: never to be recorded, it would otherwise
                // stay in the agent's outbox, sent again after every
                // reconnection.
                let ack = Message::ResultAck(key);
                feed(socket, services, &ack).await?;
                self.unsent_until
                    .get_or_insert_with(|| Instant::now() + ACK_DELAY);
                return Ok(Handled::Bad);
            }
            Err(err) => {
                tracing::error!(node_id = %node, job_id = %key.job_id, error = %err, "recording a result failed");
                return Err(Ending::new(CloseCode::Internal, "redis unavailable"));
            }
        }
        let ack = Message::ResultAck(key);
        feed(socket, services, &ack).await?;
        self.unsent_until
            .get_or_insert_with(|| Instant::now() + ACK_DELAY);
        Ok(Handled::Fine)
    }
}
