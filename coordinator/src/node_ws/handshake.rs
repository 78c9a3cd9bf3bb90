//! Registration: the first frame of a node connection, read -> check ->
//! record -> hold (in the registry) -> re-pool -> acknowledge. Each step either moves on or ends the
//! connection with a close code and an `error` frame saying why.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::extract::ws::WebSocket;
use futures_util::future::join_all;
use lingua_shared::close::CloseCode;
use lingua_shared::protocol::{Drain, ErrorCode, Register, RegisterAck, VersionRange};
use lingua_shared::{JobKind, LangPair, Message, NodeId, decode};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use super::NodeServices;
use super::{
    Ending, Frame, MAX_CAPABILITIES, REGISTER_TIMEOUT, Session, frame_of, send, send_error,
};
use crate::registry::{Control, LocalNode};
use crate::store::{RegisterOutcome, Registration};

/// What a checked registration serves.
struct Checked {
    version: u32,
    pairs: Vec<LangPair>,
    kinds: Vec<JobKind>,
}

/// What Redis recorded.
struct Recorded {
    epoch: u64,
    previous_pairs: Vec<LangPair>,
    previous_kinds: Vec<JobKind>,
    drained: bool,
}

/// Registers the node on `socket`; `control` becomes its inbox.
pub(super) async fn register(
    socket: &mut WebSocket,
    services: &NodeServices,
    control: mpsc::Sender<Control>,
) -> Result<Session, Ending> {
    let register = read(socket, services).await?;
    let checked = check(socket, services, &register).await?;
    let recorded = record(socket, services, &register, &checked).await?;
    // Held before re-pooling: a routing update of the previous registration
    // still in flight must find this one's pairs, not re-join the node to
    // a pair it is leaving. Its pool ids follow once joined.
    let draining = Arc::new(AtomicBool::new(register.draining || recorded.drained));
    let local = LocalNode {
        epoch: recorded.epoch,
        instance: register.instance.clone(),
        pairs: checked.pairs.clone(),
        pools: BTreeMap::new(),
        draining: draining.clone(),
        control,
    };
    if services
        .registry
        .held_by_another(&register.node_id, &register.instance)
    {
        // Another agent process, registered once the old one's lease ran
        // out: the jobs the old one ran went with it. (The same process
        // goes on with them, and reports them on its new connection.)
        // Moved on before this connection is held, so that none sent to
        // it is taken for the old process's.
        tracing::warn!(node_id = %register.node_id, "the node's agent restarted: its running jobs move on");
        services.router.node_lost(&register.node_id);
    }
    match services.registry.insert(register.node_id.clone(), local) {
        Ok(Some(old)) => {
            let _ = old.control.try_send(Control::Close(
                CloseCode::Superseded,
                "replaced by a newer connection",
            ));
        }
        Ok(None) => {}
        // A registration of the same node that overtook this one holds
        // the socket: this older one gives way.
        Err(_) => {
            return Err(Ending::new(
                CloseCode::Superseded,
                "replaced by a newer connection",
            ));
        }
    }
    let pools = match repool(services, &register.node_id, &recorded, &checked).await {
        Ok(pools) => pools,
        Err(ending) => {
            services.registry.remove(&register.node_id, recorded.epoch);
            return Err(ending);
        }
    };
    services
        .registry
        .set_pools(&register.node_id, recorded.epoch, pools);
    services.metrics.registration("ok");
    acknowledge(socket, services, register, (checked, draining), &recorded).await
}

/// Ends a registration: counts it under `outcome`, tells the node why.
async fn refuse(
    socket: &mut WebSocket,
    services: &NodeServices,
    outcome: &str,
    (code, message): (ErrorCode, String),
    ending: Ending,
) -> Ending {
    services.metrics.registration(outcome);
    let _ = send_error(socket, services, code, message).await;
    ending
}

/// The first data frame, which must be a `register` within
/// [`REGISTER_TIMEOUT`].
async fn read(socket: &mut WebSocket, services: &NodeServices) -> Result<Register, Ending> {
    let deadline = Instant::now() + REGISTER_TIMEOUT;
    let frame = loop {
        let received = tokio::select! {
            received = socket.recv() => received,
            () = sleep_until(deadline) => return Err(Ending::new(CloseCode::RegistrationRequired, "no register within 5 s")),
            () = services.shutdown.cancelled() => return Err(Ending::new(CloseCode::GoingAway, "coordinator shutting down")),
        };
        if let Frame::Data(frame) = frame_of(received)? {
            break frame;
        }
    };
    match decode(&frame) {
        Ok(Message::Register(register)) => Ok(register),
        Ok(other) => {
            let why = (
                ErrorCode::UnexpectedMessage,
                format!("expected register, got {}", other.type_name()),
            );
            let ending = Ending::new(
                CloseCode::RegistrationRequired,
                "first frame must be register",
            );
            Err(refuse(socket, services, "invalid", why, ending).await)
        }
        Err(err) => {
            let code = if err.code() == ErrorCode::FrameTooLarge {
                CloseCode::TooLarge
            } else {
                CloseCode::RegistrationRequired
            };
            let ending = Ending::new(code, "first frame must be a valid register");
            Err(refuse(
                socket,
                services,
                "invalid",
                (err.code(), err.to_string()),
                ending,
            )
            .await)
        }
    }
}

/// Credentials, protocol version and the coordinator's limits.
async fn check(
    socket: &mut WebSocket,
    services: &NodeServices,
    register: &Register,
) -> Result<Checked, Ending> {
    let token = register.token.as_ref().map(|t| t.0.as_str());
    if !services.credentials.allows(&register.node_id, token) {
        let why = (
            ErrorCode::Unauthorized,
            format!(
                "missing or wrong node token for node id {}: a per-node token registers only its own node id",
                register.node_id
            ),
        );
        let ending = Ending::new(CloseCode::Unauthorized, "missing or wrong node token");
        return Err(refuse(socket, services, "unauthorized", why, ending).await);
    }
    let Some(version) = VersionRange::OURS.negotiate(register.protocol) else {
        let why = (
            ErrorCode::UnsupportedVersion,
            format!(
                "no common protocol version: node speaks {}..={}, coordinator {}..={}",
                register.protocol.min,
                register.protocol.max,
                VersionRange::OURS.min,
                VersionRange::OURS.max
            ),
        );
        let ending = Ending::new(CloseCode::UnsupportedVersion, "no common protocol version");
        return Err(refuse(socket, services, "unsupported_version", why, ending).await);
    };
    let caps = &register.capabilities;
    if caps.src_langs.len() > MAX_CAPABILITIES
        || caps.tgt_langs.len() > MAX_CAPABILITIES
        || caps.kinds.len() > MAX_CAPABILITIES
    {
        let why = (
            ErrorCode::InvalidMessage,
            format!("at most {MAX_CAPABILITIES} source languages, target languages and kinds each"),
        );
        let ending = Ending::new(CloseCode::RegistrationRequired, "too many capabilities");
        return Err(refuse(socket, services, "invalid", why, ending).await);
    }
    let pairs = caps.pairs();
    let max_pairs = services.config.max_pairs_per_node as usize;
    if pairs.len() > max_pairs {
        let why = (
            ErrorCode::InvalidMessage,
            format!(
                "{} language pairs ({} source x {} target languages) exceed this coordinator's limit of {max_pairs} \
                 (nodes.max_pairs); serve fewer languages per node",
                pairs.len(),
                caps.src_langs.len(),
                caps.tgt_langs.len()
            ),
        );
        let ending = Ending::new(CloseCode::RegistrationRequired, "too many language pairs");
        return Err(refuse(socket, services, "invalid", why, ending).await);
    }
    let mut kinds = caps.kinds.clone();
    kinds.sort_unstable();
    kinds.dedup();
    Ok(Checked {
        version,
        pairs,
        kinds,
    })
}

/// The registration in Redis: a new epoch, or a conflict with another
/// live agent holding the id.
async fn record(
    socket: &mut WebSocket,
    services: &NodeServices,
    register: &Register,
    checked: &Checked,
) -> Result<Recorded, Ending> {
    let caps = &register.capabilities;
    let fields = serde_json::json!({
        "src_langs": serde_json::to_string(&caps.src_langs).unwrap_or_default(),
        "tgt_langs": serde_json::to_string(&caps.tgt_langs).unwrap_or_default(),
        "kinds": serde_json::to_string(&checked.kinds).unwrap_or_default(),
        "pairs": serde_json::to_string(&checked.pairs).unwrap_or_default(),
        "gpus": serde_json::to_string(&register.gpus).unwrap_or_default(),
        "capacity": serde_json::to_string(&register.capacity).unwrap_or_default(),
        "agent_version": register.agent_version.chars().take(64).collect::<String>(),
    });
    let outcome = services
        .store
        .register_node(&Registration {
            node_id: &register.node_id,
            instance: &register.instance,
            coordinator: &services.instance,
            draining: register.draining,
            lease: services.config.lease(),
            retention: services.config.offline_retention,
            fields,
        })
        .await
        .map_err(|err| {
            tracing::error!(node_id = %register.node_id, error = %err, "registration failed in redis");
            Ending::new(CloseCode::Internal, "redis unavailable")
        })?;
    match outcome {
        RegisterOutcome::Registered {
            epoch,
            previous_pairs,
            previous_kinds,
            drained,
        } => Ok(Recorded {
            epoch,
            previous_pairs,
            previous_kinds,
            drained,
        }),
        RegisterOutcome::Conflict { holder } => {
            // The holder's instance id stays in this log: sent back, it
            // would let the caller take the node id over.
            tracing::warn!(node_id = %register.node_id, holder = %holder, instance = %register.instance, "node id already held by another live agent");
            let why = (
                ErrorCode::NodeIdConflict,
                format!(
                    "node id {} is held by another live agent; give each host its own node_id",
                    register.node_id
                ),
            );
            let ending = Ending::new(
                CloseCode::NodeIdConflict,
                "node id held by another live agent",
            );
            Err(refuse(socket, services, "conflict", why, ending).await)
        }
    }
}

/// Leaves the pools of the previous registration when the node's pairs or
/// kinds changed (nothing stale stays routable), joins one pool per pair,
/// and indexes the node. Returns the pool of each pair.
async fn repool(
    services: &NodeServices,
    node: &NodeId,
    recorded: &Recorded,
    checked: &Checked,
) -> Result<BTreeMap<LangPair, String>, Ending> {
    if recorded.previous_pairs != checked.pairs || recorded.previous_kinds != checked.kinds {
        let leaves = recorded.previous_pairs.iter().map(|&pair| {
            services
                .store
                .pool_leave(pair, node, &recorded.previous_kinds)
        });
        for result in join_all(leaves).await {
            if let Err(err) = result {
                tracing::warn!(node_id = %node, error = %err, "leaving an old pool failed");
            }
        }
    }
    let lease = services.config.lease();
    let joins = checked.pairs.iter().map(|&pair| async move {
        let joined = services
            .store
            .pool_join(
                pair,
                node,
                &checked.kinds,
                services.config.max_nodes_per_pool,
                lease,
            )
            .await;
        (pair, joined)
    });
    let mut pools = BTreeMap::new();
    for (pair, joined) in join_all(joins).await {
        match joined {
            Ok(pool) => {
                pools.insert(pair, pool);
            }
            Err(err) => {
                tracing::error!(node_id = %node, %pair, error = %err, "joining pool failed");
                return Err(Ending::new(CloseCode::Internal, "redis unavailable"));
            }
        }
    }
    if let Err(err) = services.store.index_node(node, &pools).await {
        tracing::warn!(node_id = %node, error = %err, "indexing node failed");
    }
    Ok(pools)
}

/// Sends `register_ack`, then `drain` when an admin drained this agent
/// process before it reconnected.
async fn acknowledge(
    socket: &mut WebSocket,
    services: &NodeServices,
    register: Register,
    (checked, draining): (Checked, Arc<AtomicBool>),
    recorded: &Recorded,
) -> Result<Session, Ending> {
    let ack = Message::RegisterAck(RegisterAck {
        protocol_version: checked.version,
        epoch: recorded.epoch,
        heartbeat_interval_ms: u64::try_from(services.config.heartbeat_interval.as_millis())
            .unwrap_or(u64::MAX),
        pairs: checked.pairs.clone(),
    });
    services.hints.hold(
        &register.node_id,
        (checked.pairs.clone(), checked.kinds.clone()),
        checked.version,
        draining.clone(),
        register.capacity,
    );
    let session = Session {
        node: register.node_id,
        epoch: recorded.epoch,
        pairs: checked.pairs,
        kinds: checked.kinds,
        draining,
        published: Instant::now(),
        publish_pending: false,
        recorded: None,
        record_due: false,
        capacity: None,
    };
    let mut sent = send(socket, services, &ack).await;
    if sent.is_ok() && recorded.drained && !register.draining {
        let drain = Message::Drain(Drain {
            reason: "drain requested by an admin".into(),
        });
        sent = send(socket, services, &drain).await;
    }
    if let Err(ending) = sent {
        session.leave(services).await;
        return Err(ending);
    }
    Ok(session)
}
