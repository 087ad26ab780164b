//! oxserve: a TorchServe-compatible model server.
//!
//! Requests flow one way: `api` -> `model` registry -> `worker` queue -> `backend` -> reply, with
//! timings recorded once, where they happen, into `metrics`.

pub mod api;
pub mod backend;
pub mod config;
pub mod dashboard;
pub mod error;
pub mod grpc;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod server;
pub mod system;
pub mod tempdir;
pub mod timefmt;
pub mod worker;
pub mod workflow;
