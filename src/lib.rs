#![doc = include_str!("../README.md")]
// `unsafe` only in the modules that allow it for themselves: `fork`'s files, `sys` and
// `r2d2_compat`.
#![deny(
    unsafe_code,
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks
)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

mod backends;
mod config;
mod connection;
mod descriptors;
mod fork;
mod fork_local;
mod guarded;
mod manager;
mod pool;
mod r2d2_compat;
mod stats;
mod std_pool;
mod sys;

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
