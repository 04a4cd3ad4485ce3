//! The composition roots, one per process and in one style: each reads its parts from
//! the configuration, starts the tasks beside them and binds its listener in `spawn`
//! (port 0: the system picks one, and `Running` says which), and `serve`/`run` waits
//! for the task. Tests start a dashboard or a gateway in-process through `spawn`.
//!
//! - `serve`: the dashboard (`tokentally serve`), with `state` for router tests;
//! - `gateway`: the gateway (`tokentally gateway`);
//! - `ingest`: the Kafka → ClickHouse consumer (`tokentally ingest`).

pub mod gateway;
pub mod ingest;
pub mod serve;

use std::net::SocketAddr;

use crate::config::Config;
use crate::shutdown::Shutdown;

pub use serve::{first_admin, serve, spawn, state};

/// A server running in this process (tests' `spawn_app`): its address and the task that
/// serves until its shutdown.
pub struct Running {
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// `tokentally run`: migrate, then ingest and serve in one process; either half failing
/// (e.g. the dashboard port is taken) stops the process.
pub async fn run(cfg: &Config, shutdown: Shutdown) -> anyhow::Result<()> {
    tokio::try_join!(ingest::run(cfg, shutdown.clone()), serve(cfg, shutdown)).map(|_| ())
}
