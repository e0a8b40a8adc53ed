//! The kit every integration test shares. `#[macro_use] mod support;` brings in `ensure!`.
//!
//! - `fork`: forked children that never hang the suite (reaped with a deadline), by libc's
//!   `fork` or the raw system call; forks while the master connects.
//! - `runner`: the case runner of the `harness = false` binaries and the servers they require.
//! - `backend`: the fork scenarios every server backend runs.
//! - `fake_server`: a fake database that records which process wrote on which connection.
//! - `no_io`: the no-I/O manager; `scripted`: a manager whose connects fail or hang on cue;
//!   `events`: event handlers that count or log; `inspect`: memory and descriptors of this process.
//! - `worker_pool`: a forked worker keeps the whole pool (events, `min_idle`, the reaper).
//! - `log_capture`: a `tracing` subscriber that keeps what was logged.
//!
//! Every test binary compiles the whole kit and uses a part of it, hence `dead_code` is allowed.
#![allow(dead_code)]

/// Fails the enclosing check with a formatted message unless `$cond` holds.
#[allow(unused_macros)]
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

pub mod backend;
pub mod events;
pub mod fake_server;
pub mod fork;
pub mod inspect;
pub mod log_capture;
pub mod no_io;
pub mod python;
pub mod runner;
pub mod scripted;
pub mod worker_pool;
