//! diesel `SqliteConnection`: finding the descriptor of each connection's database file.
//!
//! SQLite's own advice for a connection inherited across `fork()` (howtocorrupt §2.6) is never
//! to `sqlite3_close` it in the child — that would run its cleanup against shared state — while
//! closing its file descriptors is safe. So a forked child leaks the inherited connection
//! objects and points their database descriptors at `/dev/null`.
//!
//! Right after connecting, the connection is asked which files it has open
//! (`pragma_database_list`: `main` and anything attached). For each file, the descriptor is the
//! one descriptor of this process that refers to that file (same device and inode). A file
//! held open by *two* descriptors — a second connection of the pool, another pool, the
//! application's own connection, a descriptor SQLite keeps open for a closed connection while
//! locks are held — cannot be told apart from ours, so the connection is left unidentified
//! (`None`: its descriptors leak in a forked child and it is counted in
//! `ForkStats::connections_leaked`). In practice a pool of one connection per file is
//! identified; in a larger pool at most the connection that opened while no other was open is,
//! and since r2d2 opens `min_idle` connections on several threads at once, often none is. A
//! leaked SQLite descriptor is harmless (there is no shared stream, and POSIX locks are not
//! inherited by a child). Telling the connections of one file apart would need a record of
//! the descriptors held by every live connection of the process, dropped *before* each
//! connection closes; the descriptor table has one per pool generation only.
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
//! Releasing descriptors cannot fix memory, so `SqliteConnection` is marked for
//! `backends::fork_waits_while_checked_out`: a libc `fork()` waits (at most a second) until no
//! SQLite connection of the pool is checked out on another thread (see
//! `fork::ForkWaitingLease` and the public docs of `PooledConnection` for the limits).

use std::fs;
use std::os::fd::RawFd;
use std::os::unix::fs::MetadataExt;

use diesel::sql_types::Text;
use diesel::{QueryableByName, RunQueryDsl, SqliteConnection};
use nix::sys::stat::{fstat, SFlag};

/// One database of the connection: its schema name and file (empty for memory and temp).
#[derive(QueryableByName)]
struct Database {
    #[diesel(sql_type = Text)]
    file: String,
}

const DATABASES: &str = "SELECT file FROM pragma_database_list";

/// The database descriptors of a freshly opened `SqliteConnection`, when they can be told for
/// certain; `Some(vec![])` for a connection that has no database file.
pub(crate) fn locate(conn: &mut SqliteConnection) -> Option<Vec<RawFd>> {
    let databases: Vec<Database> = diesel::sql_query(DATABASES).load(conn).ok()?;
    let mut fds = Vec::new();
    for database in databases
        .iter()
        .filter(|database| !database.file.is_empty())
    {
        let meta = fs::metadata(&database.file).ok()?;
        fds.push(only_descriptor_of(meta.dev(), meta.ino())?);
    }
    Some(fds)
}

/// The one descriptor of this process open on the regular file `(dev, ino)`; `None` if there
/// are none or several.
fn only_descriptor_of(dev: u64, ino: u64) -> Option<RawFd> {
    let mut found = None;
    for fd in descriptors() {
        let Ok(stat) = fstat(fd) else { continue };
        let regular =
            SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG;
        if regular && stat.st_dev == dev && stat.st_ino == ino {
            if found.is_some() {
                return None;
            }
            found = Some(fd);
        }
    }
    found
}

/// This process's open descriptor numbers (including, briefly, the directory handle used to
/// list them, which is a directory and never matches a database file).
fn descriptors() -> Vec<RawFd> {
    let Ok(entries) = fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::Connection;
    use std::os::fd::AsRawFd;

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "forksafe-sqlite-unit-{}-{name}.db",
            std::process::id()
        ))
    }

    #[test]
    fn memory_databases_own_no_descriptor() {
        let mut conn = SqliteConnection::establish(":memory:").unwrap();
        assert_eq!(locate(&mut conn), Some(vec![]));
    }

    #[test]
    fn a_file_database_is_found_only_while_its_descriptor_is_the_only_one() {
        let path = temp_path("only");
        let _ = fs::remove_file(&path);
        let mut conn = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
        let fds = locate(&mut conn).expect("the only descriptor of the file");
        assert_eq!(fds.len(), 1);
        let meta = fs::metadata(&path).unwrap();
        let stat = fstat(fds[0]).unwrap();
        assert_eq!((stat.st_dev, stat.st_ino), (meta.dev(), meta.ino()));
        // A second descriptor on the same file makes it uncertain, for both connections.
        let other = fs::File::open(&path).unwrap();
        assert_eq!(locate(&mut conn), None);
        drop(other);
        let mut second = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
        assert_eq!(locate(&mut second), None);
        assert_eq!(locate(&mut conn), None);
        drop(second);
        assert_eq!(locate(&mut conn), Some(fds));
        drop(conn);
        let _ = fs::remove_file(&path);
    }

    #[test]
    fn an_unrelated_file_is_not_matched() {
        let path = temp_path("unrelated");
        let file = fs::File::create(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(
            only_descriptor_of(meta.dev(), meta.ino()),
            Some(file.as_raw_fd())
        );
        // Same inode number on a device no open file is on. (Not `ino + 1`: tests run in
        // parallel threads, and another test's temporary file may well have the next inode.)
        assert_eq!(only_descriptor_of(u64::MAX, meta.ino()), None);
        drop(file);
        assert_eq!(only_descriptor_of(meta.dev(), meta.ino()), None);
        let _ = fs::remove_file(&path);
    }
}
