//! Connecting to a coordinator and registering: the WebSocket opened
//! (each step within its time), `register` sent, its answer read.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use lingua_shared::protocol::{Capabilities, GpuInfo, Register, Secret, VersionRange};
use lingua_shared::{
    DecodeError, JobKind, MAX_FRAME_BYTES, Message, WS_READ_BUFFER_BYTES, WS_WRITE_BUFFER_BYTES,
    decode, encode,
};
use tokio::sync::watch;
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::{Ended, Link, REGISTER_TIMEOUT, Ws, capacity, closed, written};

/// A connection registered with a coordinator.
pub(super) struct Registered {
    pub(super) ws: Ws,
    /// The coordinator's heartbeat interval and protocol version.
    pub(super) agreed: (Duration, u32),
    /// The free slots registration told it of, and the changes since.
    pub(super) room: (BTreeMap<JobKind, u32>, watch::Receiver<u64>),
}

impl Link {
    fn register(&self, gpus: &[GpuInfo]) -> Register {
        Register {
            node_id: self.identity.node_id.clone(),
            token: self.identity.token.clone().map(Secret),
            protocol: VersionRange::OURS,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            instance: self.identity.instance.clone(),
            capabilities: Capabilities {
                src_langs: self.identity.src_langs.clone(),
                tgt_langs: self.identity.tgt_langs.clone(),
                kinds: self.identity.kinds.clone(),
            },
            gpus: gpus.to_vec(),
            capacity: capacity(&self.arbiter),
            draining: *self.draining.borrow(),
        }
    }

    /// Connects to `url` and registers this node there.
    pub(super) async fn connect(
        &mut self,
        url: &str,
        connector: Option<Connector>,
        gpus: &[GpuInfo],
    ) -> Result<Registered, Ended> {
        let mut ws = opened(url, connector).await?;
        // Room is counted from what registration tells: a change from
        // then on is reported once registered.
        let room_changes = self.arbiter.subscribe();
        let register = self.register(gpus);
        let told = register.capacity.free_slots.clone();
        let register = WsMessage::text(encode(&Message::Register(register)));
        written(REGISTER_TIMEOUT, ws.send(register), "register").await?;
        let answer = first_frame(&mut ws).await?;
        match answer {
            Ok(Message::RegisterAck(ack)) => {
                tracing::info!(%url, epoch = ack.epoch, pairs = ack.pairs.len(), "registered with the coordinator");
                self.status.send_modify(|s| {
                    s.connected = true;
                    s.registrations += 1;
                });
                let heartbeat = Duration::from_millis(ack.heartbeat_interval_ms.max(10));
                Ok(Registered {
                    ws,
                    agreed: (heartbeat, ack.protocol_version),
                    room: (told, room_changes),
                })
            }
            Ok(Message::Error(error)) => {
                // The close frame that follows carries the code; read it.
                let code = loop {
                    match tokio::time::timeout(REGISTER_TIMEOUT, ws.next()).await {
                        Ok(Some(Ok(WsMessage::Close(frame)))) => {
                            break frame.map_or(1005, |f| u16::from(f.code));
                        }
                        Ok(Some(Ok(_))) => {}
                        _ => break 1006,
                    }
                };
                Err(closed(code, error.message))
            }
            Ok(other) => Err(Ended::Reconnect(format!(
                "expected register_ack, got {}",
                other.type_name()
            ))),
            Err(e) => Err(Ended::Reconnect(format!(
                "bad frame while registering: {e}"
            ))),
        }
    }
}

/// A WebSocket to `url`, within [`REGISTER_TIMEOUT`]: a peer that takes
/// the connection and never completes the upgrade (a stopped process, a
/// proxy without a backend) is given up on, for the next URL.
async fn opened(url: &str, connector: Option<Connector>) -> Result<Ws, Ended> {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES))
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .write_buffer_size(WS_WRITE_BUFFER_BYTES);
    let opened = tokio::time::timeout(
        REGISTER_TIMEOUT,
        tokio_tungstenite::connect_async_tls_with_config(url, Some(config), true, connector),
    );
    let (ws, _) = opened
        .await
        .map_err(|_| {
            Ended::Reconnect(format!(
                "connect {url}: no WebSocket within {REGISTER_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| Ended::Reconnect(format!("connect {url}: {e}")))?;
    Ok(ws)
}

/// The coordinator's first data frame after `register`, decoded (or why
/// it could not be), within [`REGISTER_TIMEOUT`].
async fn first_frame(ws: &mut Ws) -> Result<Result<Message, DecodeError>, Ended> {
    let read = tokio::time::timeout(REGISTER_TIMEOUT, async {
        loop {
            match ws.next().await {
                Some(Ok(WsMessage::Text(text))) => return Ok(decode(text.as_bytes())),
                Some(Ok(WsMessage::Close(frame))) => {
                    let (code, reason) = frame.map_or((1005, String::new()), |f| {
                        (u16::from(f.code), f.reason.to_string())
                    });
                    return Err(closed(code, reason));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(Ended::Reconnect(format!("registering: {e}"))),
                None => return Err(Ended::Reconnect("closed while registering".into())),
            }
        }
    });
    read.await
        .map_err(|_| Ended::Reconnect("no register_ack in time".into()))?
}
