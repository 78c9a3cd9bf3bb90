//! The Lingua fleet coordinator: registers GPU nodes, places them in
//! per-language-pair pools through Redis scripts and routes jobs to nodes
//! that reported room. Redis is its only state.
//!
//! - [`config`]: the TOML configuration and its validation.
//! - [`server`]: wiring; `run(listener, …, shutdown)`.
//! - [`node_ws`]: the node WebSocket endpoint.
//! - [`http`]: the HTTP API (jobs, nodes and pools, health, metrics).
//! - [`drain`]: an admin drain, start to end.
//! - [`fleet`]: the whole fleet for operators: summary, live snapshots.
//! - [`auth`]: node credentials and API tokens with roles.
//! - [`jobs`]: job routing: dispatch, retries, failover, results.
//! - [`forward`]: several instances on one Redis: the messages between them.
//! - [`inbox`]: this instance's presence and inbox loops.
//! - [`state`]: the HTTP router's state and each handler's substate.
//! - [`listener`]: the accept loop: connection cap, timeouts, drain.
//! - [`store`], [`keys`]: everything kept in Redis, and the key names.
//! - [`hints`]: what routing is told about the nodes held here.
//! - [`queue`]: the admission queue, per pair and kind.
//! - [`route_batch`]: routing updates batched per language pair.
//! - [`heartbeats`]: heartbeats recorded in Redis in batches.
//! - [`registry`]: node sockets held by this instance.
//! - [`metrics`]: Prometheus metrics.
//! - [`recent`]: the last minute of jobs, for the fleet view.
//! - [`tls`]: TLS on the listener.
//! - [`private_redis`]: the `redis-server` the coordinator starts and owns
//!   when no Redis URL is configured (also what the test harness uses).
#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
pub mod drain;
pub mod fleet;
pub mod forward;
pub mod heartbeats;
pub mod hints;
pub mod http;
pub mod inbox;
pub mod jobs;
pub mod keys;
pub mod listener;
pub mod metrics;
pub mod node_ws;
pub mod private_redis;
pub mod queue;
pub mod recent;
pub mod registry;
pub mod route_batch;
pub mod server;
pub mod state;
pub mod store;
pub mod tls;
