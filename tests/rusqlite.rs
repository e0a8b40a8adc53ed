//! SQLite through r2d2_sqlite (`rusqlite::Connection`) on a file database, in WAL and in
//! rollback-journal mode, forked for real.
//!
//! A `harness = false` binary: the cases fork, so they run one after another in this process,
//! and every child is reaped with a deadline.
//!
//! Every shared scenario of `support/backend.rs` that does not watch server sessions runs once
//! per journal mode (`wal::`, `rollback::`). SQLite has no sessions, so a connection names
//! itself: its first echo stores a random id in a TEMP table, which only that connection sees.
//! Every connection of a pool on one file is identified (see the crate's `sqlite_files` docs),
//! so the shared scenarios expect every inherited connection released; the own cases add a
//! SIGKILLed master whose workers keep none of its descriptors, and a pool of one.

#[macro_use]
mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::OnceLock;

use forksafe_pool::{Pool, PooledConnection};
use r2d2_sqlite::rusqlite::{self, OptionalExtension};
use r2d2_sqlite::SqliteConnectionManager;
use support::backend::{self, At, Backend, Variant};
use support::inspect::points_at_dev_null;
use support::runner::{Case, Check};

/// A journal mode, with the database file its cases share (one per mode and test process;
/// children inherit the name).
trait Journal: Variant {
    const MODE: &'static str;
}

struct Wal;
struct Rollback;

fn database(mode: &str) -> String {
    static FILES: OnceLock<(String, String)> = OnceLock::new();
    let (wal, rollback) = FILES.get_or_init(|| {
        let path = |name: &str| {
            std::env::temp_dir()
                .join(format!(
                    "forksafe-rusqlite-{name}-{}.db",
                    std::process::id()
                ))
                .to_str()
                .expect("temp paths are UTF-8 here")
                .to_string()
        };
        (path("wal"), path("rollback"))
    });
    if mode == "WAL" {
        wal.clone()
    } else {
        rollback.clone()
    }
}

impl Variant for Wal {
    fn url() -> String {
        database(Self::MODE)
    }
}

impl Journal for Wal {
    const MODE: &'static str = "WAL";
}

impl Variant for Rollback {
    fn url() -> String {
        database(Self::MODE)
    }
}

impl Journal for Rollback {
    const MODE: &'static str = "DELETE";
}

/// Every connection waits for another process's lock instead of failing at once, and has the
/// answers table.
fn manager(path: &str, mode: &'static str) -> SqliteConnectionManager {
    SqliteConnectionManager::file(path).with_init(move |conn| {
        conn.busy_timeout(std::time::Duration::from_secs(20))?;
        conn.pragma_update(None, "journal_mode", mode)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS answers (worker INTEGER, request INTEGER, value TEXT NOT NULL)",
        )
    })
}

/// This connection's own id, made on first use.
fn session(conn: &rusqlite::Connection) -> rusqlite::Result<i64> {
    conn.execute_batch("CREATE TEMP TABLE IF NOT EXISTS session AS SELECT abs(random()) AS id")?;
    conn.query_row("SELECT id FROM temp.session", [], |row| row.get(0))
}

impl<J: Journal> Backend for At<J, SqliteConnectionManager> {
    type Observer = ();
    const SERVER_SESSIONS: bool = false;

    fn url() -> String {
        J::url()
    }

    fn manager(url: &str) -> Result<Self, String> {
        Ok(At::new(manager(url, J::MODE)))
    }

    fn echo(conn: &mut PooledConnection<Self>, value: &str) -> Result<i64, String> {
        let answer: String = conn
            .query_row("SELECT ?1", [value], |row| row.get(0))
            .map_err(|error| format!("echo {value:?}: {error}"))?;
        ensure!(answer == value, "asked for {value:?}, got {answer:?}");
        session(conn).map_err(|error| format!("session id: {error}"))
    }

    /// An echo; every tenth request also writes a row and reads it back.
    fn request(
        conn: &mut PooledConnection<Self>,
        request: usize,
        value: &str,
    ) -> Result<i64, String> {
        let session = Self::echo(conn, value)?;
        if request.is_multiple_of(10) {
            let worker = i64::from(std::process::id());
            conn.execute(
                "INSERT INTO answers (worker, request, value) VALUES (?1, ?2, ?3)",
                rusqlite::params![worker, request as i64, value],
            )
            .map_err(|error| format!("insert {value:?}: {error}"))?;
            let stored: Option<String> = conn
                .query_row(
                    "SELECT value FROM answers WHERE worker = ?1 AND request = ?2",
                    rusqlite::params![worker, request as i64],
                    |row| row.get(0),
                )
                .optional()
                .map_err(|error| format!("read back {value:?}: {error}"))?;
            ensure!(
                stored.as_deref() == Some(value),
                "wrote {value:?}, read back {stored:?}"
            );
        }
        Ok(session)
    }

    fn observer() -> Result<(), String> {
        Err(String::from("SQLite has no server sessions to observe"))
    }

    fn live_sessions(_: &mut ()) -> Result<BTreeSet<i64>, String> {
        Err(String::from("SQLite has no server sessions to observe"))
    }
}

type WalManager = At<Wal, SqliteConnectionManager>;
type RollbackManager = At<Rollback, SqliteConnectionManager>;

/// A pool of one connection per file: its database descriptor is the only one on the file, so
/// it is identified, and a forked child points it at `/dev/null` before working on its own.
fn the_only_descriptor_is_released<J: Journal>() -> Check {
    let path = format!("{}-only.db", J::url());
    let pool = Pool::builder()
        .max_size(1)
        .build(manager(&path, J::MODE))
        .map_err(|error| format!("build: {error}"))?;
    let fd = {
        let conn = pool.get().map_err(|error| format!("get: {error}"))?;
        let fds = forksafe_pool::locate::file(&path);
        drop(conn);
        fds.ok_or("the pool's connection is not the only descriptor on its file")?
    };
    backend::in_child(|| {
        let conn = pool.get().map_err(|error| format!("get: {error}"))?;
        let value = format!("child-{}", std::process::id());
        echo_plain(&conn, &value)?;
        backend::expect_fork_stats(&pool.fork_stats(), 1, 1, 0)?;
        ensure!(
            points_at_dev_null(fd),
            "the inherited descriptor {fd} still refers to the database"
        );
        Ok(())
    })?;
    // The master's connection is untouched: it still writes and reads its file.
    let conn = pool.get().map_err(|error| format!("master get: {error}"))?;
    conn.execute(
        "INSERT INTO answers (worker, request, value) VALUES (0, 0, 'master after fork')",
        [],
    )
    .map_err(|error| format!("master insert: {error}"))?;
    let count: i64 = conn
        .query_row(
            "SELECT count(*) FROM answers WHERE value = 'master after fork'",
            [],
            |row| row.get(0),
        )
        .map_err(|error| format!("master query: {error}"))?;
    ensure!(count == 1, "the master's row: {count} found");
    ensure!(
        forksafe_pool::locate::file(&path) == Some(fd),
        "the master's descriptor changed"
    );
    drop(conn);
    remove_database(&path);
    Ok(())
}

/// A pool of 4 on one file, under a SIGKILLed master: its workers keep none of the master's 4
/// descriptors of the file open, only their own connections' (every connection of the pool is
/// identified, not just one that was alone on its file).
fn master_sigkill_leaves_workers_no_inherited_descriptor<J: Journal>() -> Check {
    let path = format!("{}-sigkill.db", J::url());
    remove_database(&path);
    let result = backend::master_sigkill_leaves_workers_no_inherited_file(
        std::path::Path::new(&path),
        || backend::warm_pool_at::<At<J, SqliteConnectionManager>>(&path),
        |conn| At::<J, SqliteConnectionManager>::echo(conn, "worker").map(drop),
    );
    remove_database(&path);
    result
}

/// An echo on a connection of a pool that is not a `Backend` (the pool of one above).
fn echo_plain(conn: &rusqlite::Connection, value: &str) -> Check {
    let answer: String = conn
        .query_row("SELECT ?1", [value], |row| row.get(0))
        .map_err(|error| format!("echo {value:?}: {error}"))?;
    ensure!(answer == value, "asked for {value:?}, got {answer:?}");
    Ok(())
}

/// A database that cannot be opened gives SQLite's error within the timeout, in the building
/// process and in a forked child.
fn bad_input_gives_the_drivers_error_in_time() -> Check {
    backend::bad_input_fails_within_connection_timeout::<RollbackManager>(|_| {
        vec![(
            "a directory that does not exist",
            String::from("/nonexistent/forksafe/database.db"),
            "unable to open database file",
        )]
    })
}

fn remove_database(path: &str) {
    for suffix in ["", "-journal", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{path}{suffix}"));
    }
}

fn main() {
    let files: Vec<PathBuf> = [Wal::url(), Rollback::url()]
        .into_iter()
        .map(PathBuf::from)
        .collect();
    for file in &files {
        remove_database(file.to_str().expect("UTF-8"));
    }
    let own: [Case; 5] = [
        (
            "wal::master_sigkill_leaves_workers_no_inherited_descriptor",
            master_sigkill_leaves_workers_no_inherited_descriptor::<Wal>,
        ),
        (
            "rollback::master_sigkill_leaves_workers_no_inherited_descriptor",
            master_sigkill_leaves_workers_no_inherited_descriptor::<Rollback>,
        ),
        (
            "wal::the_only_descriptor_is_released",
            the_only_descriptor_is_released::<Wal>,
        ),
        (
            "rollback::the_only_descriptor_is_released",
            the_only_descriptor_is_released::<Rollback>,
        ),
        (
            "bad_input_gives_the_drivers_error_in_time",
            bad_input_gives_the_drivers_error_in_time,
        ),
    ];
    let cases = backend::scenarios::<WalManager>("wal::")
        .into_iter()
        .chain(backend::scenarios::<RollbackManager>("rollback::"))
        .chain(own.map(|(name, case)| (name.to_string(), case)));
    // SQLite needs no server: nothing to require.
    backend::run_all("SQLite (rusqlite)", Ok(()), "", cases);
    for file in &files {
        remove_database(file.to_str().expect("UTF-8"));
    }
}
