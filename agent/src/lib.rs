//! The Lingua fleet GPU node agent: owns the slot arbiter of one GPU host
//! and links it to the coordinator.
//!
//! - [`config`]: the TOML configuration.
//! - [`agent`]: wiring and the run loop (reload, drain).
//! - [`arbiter`]: the slot arbiter.
//! - [`executor`]: http, command and simulated executors.
//! - [`jobs`]: admission, running, watchdog and cancellation of jobs.
//! - [`metrics`]: the agent's Prometheus endpoint.
//! - [`link`]: the coordinator link (reconnect, outbox).
//! - [`gpu`]: GPU probes (NVML, simulated, none) and the sampler thread.
#![forbid(unsafe_code)]

pub mod agent;
pub mod arbiter;
pub mod config;
pub mod executor;
pub mod gpu;
pub mod jobs;
pub mod link;
pub mod metrics;
