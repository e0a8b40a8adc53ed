//! The settings the command line gives: a demo run's, read by every part that runs or reports
//! it, and one server's.

use std::time::Duration;

use crate::app::{Database, Mode, StateMemory};
use crate::cpus::Cpus;

/// How the driver runs every mode.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub database: Database,
    pub workers: usize,
    pub table_mib: usize,
    pub state_memory: StateMemory,
    pub pool_size: u32,
    pub requests: u64,
    pub clients: usize,
    pub request_timeout: Duration,
    pub load_time_limit: Duration,
    pub hang_after: Duration,
    /// Where the servers' standard error goes too, if anywhere.
    pub server_log: Option<std::path::PathBuf>,
    /// Where the servers run, apart from the load generator; `None`: anywhere.
    pub cpus: Option<Cpus>,
}

#[cfg(test)]
impl RunConfig {
    /// The demo's defaults, on a database no test connects to.
    pub fn for_tests() -> RunConfig {
        RunConfig {
            database: Database::Postgres(String::from("postgres://127.0.0.1/demo")),
            workers: 4,
            table_mib: 256,
            state_memory: StateMemory::Heap,
            pool_size: 2,
            requests: 4000,
            clients: 8,
            request_timeout: Duration::from_secs(2),
            load_time_limit: Duration::from_secs(10),
            hang_after: Duration::from_secs(2),
            server_log: None,
            cpus: None,
        }
    }
}

/// What `prefork_demo serve` is told.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub mode: Mode,
    pub database: Database,
    pub workers: usize,
    pub table_mib: usize,
    pub state_memory: StateMemory,
    pub pool_size: u32,
    pub port: u16,
}
