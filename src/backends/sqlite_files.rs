//! SQLite, whatever the client (diesel's `SqliteConnection`, `rusqlite::Connection`): finding
//! the descriptors of a connection's database files.
//!
//! SQLite's own advice for a connection inherited across `fork()` (howtocorrupt §2.6) is never
//! to `sqlite3_close` it in the child — that would run its cleanup against shared state — while
//! closing its file descriptors is safe. So a forked child leaks the inherited connection
//! objects and points their database descriptors at `/dev/null`.
//!
//! Right after connecting, the connection is asked which files it has open
//! (`pragma_database_list`: `main` and anything attached). For each file, the descriptor is
//! the one the connect window saw appear on that file during the connect
//! (`CreatedSockets::file_descriptor`: SQLite opens a descriptor of its own for every
//! connection, and the pool's connects take turns, so each sees only its own appear), or else
//! [`locate::file`](crate::locate::file): the one descriptor of this process on that file. So
//! every connection of a pool on one file is identified, as long as nothing but that pool has
//! the file open. What is left unidentified (`None`: its descriptors leak in a forked child and
//! it is counted in `ForkStats::connections_leaked`): a file that another pool or the
//! application's own connection also has open, or on which SQLite handed the connect a
//! descriptor it kept from a closed connection (it does while other connections hold locks),
//! since a descriptor of the file that appeared then could be another thread's. A leaked SQLite
//! descriptor is harmless (there is no shared stream, and POSIX locks are not inherited by a
//! child); it only keeps the file open as long as the child lives.
//!
//! Files that are deliberately never recorded:
//! - `-shm` (WAL index): SQLite's Unix VFS shares one descriptor per database among all
//!   connections of a process, and a child's *new* connections reuse the inherited one for
//!   their WAL locks. Pointing it at `/dev/null` would silently drop their locking.
//! - `-wal` and `-journal`: opened later than connect time (at the first read or write
//!   transaction), so they are not open when the connection is located.
//!
//! Releasing a database descriptor has one side effect to know: closing (or replacing) any
//! descriptor of a file drops *all* of this process's POSIX locks on that file. A child holds
//! no locks after the fork (they are not inherited), and the pool releases the inherited
//! descriptors when it is rebuilt, before its own new connections open the file, so the pool's
//! own connections never lose a lock. A child that opens the same database through *another*
//! pool or connection first, and holds a transaction open while this pool's first `get()` runs,
//! would lose that transaction's locks: make the first `get()` of every pool right after the
//! fork (or before any other use of the same file). `:memory:` and temporary databases own no
//! descriptor at connect time and are reported as owning none.
//!
//! Descriptors are not the only per-process state: the Unix VFS keeps one lock record per
//! database file per process (`unixInodeInfo`; in WAL mode also the `-shm` node's locks),
//! shared by every connection of the process, which a fork copies as it is. Copied while
//! another thread writes, it makes the child's new connections meet locks nobody holds.
//! Releasing descriptors cannot fix memory, so both SQLite connection types are marked for
//! `backends::fork_waits_while_checked_out`: a libc `fork()` waits (at most a second) until no
//! SQLite connection of the pool is checked out on another thread (see
//! `fork::ForkWaitingLease` and the public docs of `PooledConnection` for the limits).
//!
//! Why not ask SQLite for the descriptor: its public API has no call that names a Unix
//! descriptor. `sqlite3_file_control(db, "main", SQLITE_FCNTL_FILE_POINTER, &p)` hands back the
//! `sqlite3_file*`, whose only public member is its method table; the descriptor is a field of
//! the Unix VFS's private `unixFile` struct, at an offset that is no part of any interface and
//! changes with compile options. (The one descriptor-naming file control,
//! `SQLITE_FCNTL_WIN32_GET_HANDLE`, is Windows-only.) A VFS shim that wraps `unix` and watches its
//! `open` calls through `xSetSystemCall` would see every descriptor SQLite opens — but that
//! replaces a process-global hook shared by every SQLite user of the process, which a pool
//! library must not do. Hence the connect window, which only looks.

use std::os::fd::RawFd;
use std::os::unix::fs::MetadataExt;

use crate::connect_window::CreatedSockets;
use crate::locate;

/// The descriptors of a freshly opened connection's database files (`files` as
/// `pragma_database_list` names them; empty for memory and temporary databases), when each
/// can be told for certain; `Some(vec![])` for a connection that has no database file.
/// `created` is what the connect window saw (`None` outside a connect).
pub(crate) fn database_descriptors<S: AsRef<str>>(
    files: impl IntoIterator<Item = S>,
    created: Option<&CreatedSockets>,
) -> Option<Vec<RawFd>> {
    files
        .into_iter()
        .filter(|file| !file.as_ref().is_empty())
        .map(|file| {
            let meta = std::fs::metadata(file.as_ref()).ok()?;
            created
                .and_then(|created| created.file_descriptor(meta.dev(), meta.ino()))
                .or_else(|| locate::file(file.as_ref()))
        })
        .collect()
}

/// Lists a connection's database files: `main` and anything attached.
pub(crate) const DATABASE_FILES: &str = "SELECT file FROM pragma_database_list";
