#![doc = include_str!("../README.md")]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

mod backends;
mod config;
mod connection;
mod descriptors;
#[cfg(feature = "diesel")]
mod diesel;
mod fork;
mod fork_local;
mod guarded;
pub mod locate;
mod manager;
mod pool;
mod stats;
mod std_pool;

pub use crate::config::{Builder, OnFork};
pub use crate::connection::PooledConnection;
pub use crate::fork::{fork_detection, ForkDetection};
pub use crate::fork_local::ForkLocal;
pub use crate::guarded::GuardedPool;
pub use crate::pool::Pool;
pub use crate::stats::ForkStats;
pub use r2d2::{
    CustomizeConnection, Error, HandleError, HandleEvent, LoggingErrorHandler, ManageConnection,
    NopConnectionCustomizer, NopErrorHandler, NopEventHandler, State,
};
