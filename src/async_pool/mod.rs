//! What the async pools (`deadpool_postgres`,
//! `bb8_postgres`) share: one pool per process, the guard that keeps a
//! connection checked out before a fork out of the parent's pool, the driver sections around
//! the connection's I/O, and the connect that records the connection's socket.
//!
//! The pool libraries themselves run unchanged in each process. What makes them safe across a
//! fork is what surrounds them:
//! - [`PoolPerProcess`] keeps the library's pool of the process that built it, and in a forked
//!   child builds one of the child's own on first use. The inherited pool is never touched:
//!   its connections are driven by tasks of the parent's runtime, which do not run in the
//!   child, and its locks may have been copied held.
//! - [`Leased`] wraps a checked-out connection: dropped in a child, it is forgotten rather than
//!   returned to the parent's pool, and used there it panics, as the sync pool's guard does.
//! - [`postgres_connect`] opens the TCP socket itself and hands it to tokio-postgres, so the
//!   socket's descriptor is known exactly (a concurrent connect on another task cannot be
//!   mistaken for it) and recorded in the generation's descriptor table, which a child
//!   releases when it builds its own pool.
//! - [`InDriverSections`] makes every poll of a connect and of a connection's task a driver
//!   section, so that a libc `fork()` (and `exit`) waits for them: OpenSSL's state is never
//!   copied into a child mid-handshake, nor freed by the exit-time cleanup under a runtime
//!   thread that is using it.

mod driver_polls;
mod leased;
mod per_process;
pub(crate) mod postgres_connect;

pub(crate) use driver_polls::InDriverSections;
pub(crate) use leased::Leased;
pub(crate) use per_process::PoolPerProcess;
