//! The Lingua fleet GPU node agent: owns the slot arbiter of one GPU host
//! and links it to the coordinator.
#![forbid(unsafe_code)]
