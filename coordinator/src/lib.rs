//! The Lingua fleet coordinator: registers GPU nodes, places them in
//! per-language-pair pools through Redis scripts and routes jobs to nodes
//! that reported room. Redis is its only state.
//!
//! - [`private_redis`]: the `redis-server` the coordinator starts and owns
//!   when no Redis URL is configured (also what the test harness uses).
#![forbid(unsafe_code)]

pub mod private_redis;
