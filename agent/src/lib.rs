//! The Lingua fleet GPU node agent: owns the slot arbiter of one GPU host
//! and links it to the coordinator.
//!
//! - [`config`]: the TOML configuration.
//! - [`arbiter`]: the slot arbiter.
//! - [`gpu`]: GPU probes (simulated, none) and the sampler thread.
//! - [`nvml`]: the NVML probe.
#![forbid(unsafe_code)]

pub mod arbiter;
pub mod config;
pub mod gpu;
pub mod nvml;
