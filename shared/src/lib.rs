//! The vocabulary shared by the Lingua fleet coordinator and its agents.
//!
//! - [`lang`]: validated language codes and directed language pairs.
//! - [`ids`]: validated node ids, job ids and job kinds; process instance
//!   ids.
//! - [`protocol`]: every message of the node <-> coordinator WebSocket
//!   protocol (version [`protocol::PROTOCOL_VERSION`]), one serde enum tagged
//!   by `type`.
//! - [`codec`]: decoding frames into messages with typed errors and a frame
//!   size limit, and encoding them back.
//! - [`close`]: the WebSocket close codes both sides use.
//! - [`config_check`]: reading and validating TOML configuration files.
//! - [`process`]: exit codes, logging, the runtime and the stop signals,
//!   the same in every binary.
//! - [`docs`]: man pages and shell completions from each binary's CLI.
//! - [`systemd`]: readiness, status, watchdog and stopping notifications.
//! - [`journal`]: log lines for the systemd journal (priorities, spans).
//! - [`metrics`]: `process_*` metrics and the exposition format of both
//!   binaries' `/metrics`.
//! - [`sync`]: lock helpers that tolerate a poisoned lock.
//! - [`room`]: a node's room for new jobs, memory every kind shares.
//! - [`bounded`]: the most entries a capacity report's lists may hold.
//!
//! docs/PROTOCOL.md describes the protocol for people; this crate is its
//! executable form.
#![forbid(unsafe_code)]

pub mod bounded;
pub mod close;
pub mod codec;
pub mod config_check;
pub mod docs;
pub mod ids;
pub mod journal;
pub mod lang;
pub mod metrics;
pub mod process;
pub mod protocol;
pub mod raw;
pub mod room;
pub mod sync;
pub mod systemd;

pub use codec::{
    DecodeError, MAX_FRAME_BYTES, MAX_REQUEST_BODY_BYTES, WS_READ_BUFFER_BYTES,
    WS_WRITE_BUFFER_BYTES, decode, encode, encoded_len, split_heartbeat,
};
pub use ids::{IdError, JobId, JobKind, NodeId};
pub use lang::{LangCode, LangError, LangPair};
pub use protocol::{Message, PROTOCOL_VERSION};
pub use raw::RawJson;
