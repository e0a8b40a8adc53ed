//! diesel `SqliteConnection` through forksafe-pool on a file database (rollback journal and
//! WAL) and on `:memory:`.
//!
//! A `harness = false` binary: the cases fork for real, one after another, and every child is
//! reaped with a deadline (a child still running then is killed and fails its case).
//!
//! SQLite has no server sessions, so each of the master's connections is marked with a TEMP
//! table (private to one connection) holding its name: the master's connections are the same
//! afterwards when their marks are, and a worker's connection is its own when it has none.

#[macro_use]
mod support;

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use diesel::r2d2::ConnectionManager;
use diesel::sql_types::{Integer, Text};
use diesel::{QueryableByName, RunQueryDsl, SqliteConnection};
use forksafe_pool::{CustomizeConnection, ForkStats, Pool};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::fork::{reap, run_child, spawn_child, ChildEnd};
use support::inspect::points_at_dev_null;
use support::runner::{child_result, expect_exit, run_cases, Check};

type SqlitePool = Pool<ConnectionManager<SqliteConnection>>;
type SqliteConn = forksafe_pool::PooledConnection<ConnectionManager<SqliteConnection>>;
/// A way for a child to end: its name, its body, how the parent must see it end.
type Ending = (&'static str, fn(&SqlitePool) -> i32, ChildEnd);

const POOL_SIZE: u32 = 4;
const WORKERS: usize = 4;
const REQUESTS: usize = 300;
/// One request in this many also writes a row and reads it back.
const WRITE_EVERY: usize = 10;
const DEADLINE: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Journal {
    Rollback,
    Wal,
}

#[derive(QueryableByName)]
struct Value {
    #[diesel(sql_type = Text)]
    value: String,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = Integer)]
    n: i32,
}

/// Every connection waits for another process's lock instead of failing at once.
#[derive(Debug)]
struct BusyTimeout;

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for BusyTimeout {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        diesel::sql_query("PRAGMA busy_timeout = 20000")
            .execute(conn)
            .map(drop)
            .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// A database file of its own for one case, removed (with its journals) when dropped.
struct Database {
    path: PathBuf,
}

impl Database {
    fn create(name: &str, journal: Journal) -> Result<Database, String> {
        let path =
            std::env::temp_dir().join(format!("forksafe-sqlite-{name}-{}.db", std::process::id()));
        let database = Database { path };
        database.remove_files();
        let mut conn = <SqliteConnection as diesel::Connection>::establish(database.url())
            .map_err(|error| format!("create {:?}: {error}", database.path))?;
        let mode = match journal {
            Journal::Rollback => "DELETE",
            Journal::Wal => "WAL",
        };
        let setup = format!(
            "PRAGMA journal_mode = {mode}; CREATE TABLE answers (worker INTEGER, request INTEGER, value TEXT NOT NULL)"
        );
        diesel::connection::SimpleConnection::batch_execute(&mut conn, &setup)
            .map_err(|error| format!("setup: {error}"))?;
        Ok(database)
    }

    fn url(&self) -> &str {
        self.path.to_str().expect("temp paths are UTF-8 here")
    }

    fn remove_files(&self) {
        for suffix in ["", "-journal", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.path.display()));
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        self.remove_files();
    }
}

fn pool(url: &str, size: u32) -> Result<SqlitePool, String> {
    Pool::builder()
        .max_size(size)
        .min_idle(Some(size))
        .connection_timeout(Duration::from_secs(10))
        .connection_customizer(Box::new(BusyTimeout))
        .build(ConnectionManager::<SqliteConnection>::new(url))
        .map_err(|error| format!("pool on {url}: {error}"))
}

fn echo(conn: &mut SqliteConn, value: &str) -> Result<String, String> {
    let row: Value = diesel::sql_query("SELECT ? AS value")
        .bind::<Text, _>(value)
        .get_result(conn)
        .map_err(|error| format!("echo {value:?}: {error}"))?;
    Ok(row.value)
}

/// The mark of one of the master's connections; `None` on any other connection.
fn mark(conn: &mut SqliteConn) -> Option<String> {
    diesel::sql_query("SELECT name AS value FROM temp.mark")
        .get_result::<Value>(conn)
        .ok()
        .map(|row| row.value)
}

/// Writes a row of this request and reads it back.
fn write_and_read(conn: &mut SqliteConn, worker: i32, request: i32, value: &str) -> Check {
    diesel::sql_query("INSERT INTO answers (worker, request, value) VALUES (?, ?, ?)")
        .bind::<Integer, _>(worker)
        .bind::<Integer, _>(request)
        .bind::<Text, _>(value)
        .execute(conn)
        .map_err(|error| format!("insert {value:?}: {error}"))?;
    let row: Value =
        diesel::sql_query("SELECT value FROM answers WHERE worker = ? AND request = ?")
            .bind::<Integer, _>(worker)
            .bind::<Integer, _>(request)
            .get_result(conn)
            .map_err(|error| format!("read back {value:?}: {error}"))?;
    ensure!(
        row.value == value,
        "wrote {value:?}, read back {:?}",
        row.value
    );
    Ok(())
}

/// The master's warm pool and the names of its connections.
struct Warm {
    pool: SqlitePool,
    marks: BTreeSet<String>,
}

fn warm(url: &str, size: u32) -> Result<Warm, String> {
    let pool = pool(url, size)?;
    let mut conns: Vec<SqliteConn> = (0..size)
        .map(|_| pool.get().map_err(|error| format!("warm get: {error}")))
        .collect::<Result<_, _>>()?;
    let mut marks = BTreeSet::new();
    for (index, conn) in conns.iter_mut().enumerate() {
        let name = format!("master-{index}");
        diesel::sql_query(format!("CREATE TEMP TABLE mark AS SELECT '{name}' AS name"))
            .execute(conn)
            .map_err(|error| format!("mark: {error}"))?;
        ensure!(echo(conn, &name)? == name, "master's echo failed");
        marks.insert(name);
    }
    drop(conns);
    Ok(Warm { pool, marks })
}

/// After the children: the master's connections are the same ones and work.
fn check_master_intact(warm: &Warm) -> Check {
    let size = warm.marks.len();
    let mut conns: Vec<SqliteConn> = (0..size)
        .map(|_| {
            warm.pool
                .get_timeout(Duration::from_secs(10))
                .map_err(|error| format!("master get: {error}"))
        })
        .collect::<Result<_, _>>()?;
    let mut marks = BTreeSet::new();
    for conn in &mut conns {
        let name = mark(conn).ok_or("a master connection lost its mark (it was replaced)")?;
        let value = format!("master-again-{name}");
        ensure!(
            echo(conn, &value)? == value,
            "master's echo failed on {name}"
        );
        marks.insert(name);
    }
    ensure!(
        marks == warm.marks,
        "master's connections changed: {:?} -> {marks:?}",
        warm.marks
    );
    ensure!(
        warm.pool.fork_stats() == ForkStats::default(),
        "master's fork stats changed: {:?}",
        warm.pool.fork_stats()
    );
    Ok(())
}

/// In a worker: `requests` checkouts on connections of its own, each echoing its own value;
/// every tenth also writes a row and reads it back.
fn work(pool: &SqlitePool, first: usize, requests: usize) -> Check {
    let me = std::process::id();
    for request in first..first + requests {
        let mut conn = pool
            .get()
            .map_err(|error| format!("request {request}: get: {error}"))?;
        if let Some(name) = mark(&mut conn) {
            return Err(format!(
                "request {request} got the master's connection {name}"
            ));
        }
        let value = format!("worker-{me}-request-{request}");
        let answer = echo(&mut conn, &value)?;
        ensure!(
            answer == value,
            "request {request}: asked {value:?}, got {answer:?}"
        );
        if request % WRITE_EVERY == 0 {
            write_and_read(&mut conn, me as i32, request as i32, &value)?;
        }
    }
    Ok(())
}

/// What a worker's pool did with the inherited connections: every one discarded and its
/// database descriptor released.
fn check_child_stats(pool: &SqlitePool, size: u64, leased: u64) -> Check {
    let stats = pool.fork_stats();
    ensure!(stats.forks_crossed == 1, "forks_crossed: {stats:?}");
    ensure!(
        stats.connections_discarded == size,
        "connections_discarded: {stats:?}"
    );
    ensure!(
        stats.leased_across_fork == leased,
        "leased_across_fork: {stats:?}"
    );
    ensure!(
        stats.sockets_released == size && stats.connections_leaked == 0,
        "not every inherited descriptor released: {stats:?}"
    );
    Ok(())
}

/// A pre-forking server on a file database: a warm master forks 4 workers, each runs 300
/// requests (30 of them writes) that must all get their own answers; the master keeps its
/// connections, and every worker's rows are in the file.
fn workers_get_answers_of_their_own(journal: Journal) -> Check {
    let database = Database::create(&format!("scenario-{journal:?}"), journal)?;
    let warm = warm(database.url(), POOL_SIZE)?;
    let workers: Vec<Pid> = (0..WORKERS)
        .map(|_| {
            spawn_child(|| {
                child_result((|| {
                    work(&warm.pool, 0, 1)?;
                    check_child_stats(&warm.pool, POOL_SIZE as u64, 0)?;
                    work(&warm.pool, 1, REQUESTS - 1)
                })())
            })
        })
        .collect();
    for (index, worker) in workers.into_iter().enumerate() {
        expect_exit(&format!("worker {index}"), reap(worker, DEADLINE), 0)?;
    }
    check_master_intact(&warm)?;
    let mut conn = warm
        .pool
        .get()
        .map_err(|error| format!("master get: {error}"))?;
    let rows: Count = diesel::sql_query("SELECT count(*) AS n FROM answers")
        .get_result(&mut conn)
        .map_err(|error| format!("count: {error}"))?;
    let expected = WORKERS * REQUESTS.div_ceil(WRITE_EVERY);
    ensure!(
        rows.n as usize == expected,
        "{} rows in the file, expected {expected}",
        rows.n
    );
    Ok(())
}

/// A pool of one connection: its database descriptor is the only one on the file, so it is
/// identified, and a child points it at `/dev/null` before opening the file itself.
fn the_only_descriptor_is_released(journal: Journal) -> Check {
    let database = Database::create(&format!("single-{journal:?}"), journal)?;
    let warm = warm(database.url(), 1)?;
    let fds = descriptors_of(&database.path);
    ensure!(
        fds.len() == 1,
        "expected one descriptor on the database, found {fds:?}"
    );
    let fd = fds[0];
    let end = run_child(DEADLINE, || {
        child_result((|| {
            work(&warm.pool, 0, 20)?;
            let stats = warm.pool.fork_stats();
            ensure!(
                stats.sockets_released == 1 && stats.connections_leaked == 0,
                "stats: {stats:?}"
            );
            ensure!(
                points_at_dev_null(fd),
                "the inherited database descriptor {fd} was not released"
            );
            ensure!(
                !descriptors_of(&database.path).contains(&fd),
                "the inherited descriptor still refers to the file"
            );
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;
    ensure!(
        descriptors_of(&database.path) == vec![fd],
        "the parent's descriptor changed"
    );
    check_master_intact(&warm)
}

/// A pool of 4 on one file, under a SIGKILLed master: its workers keep none of the master's 4
/// descriptors of the file open, only their own connections' (every connection of the pool is
/// identified, not just one that was alone on its file).
fn master_sigkill_leaves_workers_no_inherited_descriptor(journal: Journal) -> Check {
    let database = Database::create(&format!("sigkill-{journal:?}"), journal)?;
    support::backend::master_sigkill_leaves_workers_no_inherited_file(
        &database.path,
        || pool(database.url(), POOL_SIZE),
        |conn| {
            let value = format!("worker-{}", std::process::id());
            ensure!(echo(conn, &value)? == value, "worker's echo failed");
            ensure!(mark(conn).is_none(), "a worker got the master's connection");
            Ok(())
        },
    )
}

/// A connection checked out across the fork: the child drops it and uses the pool; the master
/// goes on using it.
fn a_connection_leased_across_fork() -> Check {
    let database = Database::create("leased", Journal::Wal)?;
    let warm = warm(database.url(), POOL_SIZE)?;
    let leased = warm.pool.get().map_err(|error| format!("lease: {error}"))?;
    // The child takes the guard out of its copy of this slot; the parent's copy keeps it.
    let mut slot = Some(leased);
    let end = run_child(DEADLINE, || {
        child_result((|| {
            drop(slot.take());
            work(&warm.pool, 0, 50)?;
            check_child_stats(&warm.pool, POOL_SIZE as u64, 1)
        })())
    });
    expect_exit("child", end, 0)?;
    let mut leased = slot.ok_or("the parent lost its leased connection")?;
    ensure!(
        mark(&mut leased).is_some(),
        "the leased connection lost its mark"
    );
    write_and_read(&mut leased, 0, 0, "parent-after-child")?;
    drop(leased);
    check_master_intact(&warm)
}

/// Children that end by returning, by `exit` and by SIGKILL — the last two while holding a
/// connection, the SIGKILLed one inside a write transaction: the master is untouched and can
/// still write.
fn children_that_end_every_way() -> Check {
    let database = Database::create("endings", Journal::Wal)?;
    let warm = warm(database.url(), POOL_SIZE)?;
    let endings: [Ending; 3] = [
        (
            "return",
            |pool| child_result(work(pool, 0, 20)),
            ChildEnd::Exited(0),
        ),
        (
            "exit",
            |pool| {
                let code = child_result(work(pool, 0, 20));
                let _held = pool.get();
                std::process::exit(code)
            },
            ChildEnd::Exited(0),
        ),
        (
            "SIGKILL",
            |pool| {
                if work(pool, 0, 20).is_ok() {
                    if let Ok(mut held) = pool.get() {
                        let _ = diesel::sql_query("BEGIN IMMEDIATE").execute(&mut held);
                        let _ = diesel::sql_query(
                            "INSERT INTO answers VALUES (0, -1, 'never committed')",
                        )
                        .execute(&mut held);
                        let _ = kill(Pid::this(), Signal::SIGKILL);
                    }
                }
                1
            },
            ChildEnd::Signaled(Signal::SIGKILL),
        ),
    ];
    for (index, (name, ending, expected)) in endings.into_iter().enumerate() {
        let end = run_child(DEADLINE, || ending(&warm.pool));
        ensure!(
            end == expected,
            "child ending by {name}: {end:?}, expected {expected:?}"
        );
        check_master_intact(&warm)
            .map_err(|error| format!("after a child ended by {name}: {error}"))?;
        let mut conn = warm
            .pool
            .get()
            .map_err(|error| format!("master get: {error}"))?;
        write_and_read(&mut conn, 1, index as i32, &format!("master-after-{name}"))?;
    }
    Ok(())
}

/// `:memory:` connections own no descriptor: discarded in a child, neither released nor leaks.
fn memory_databases_are_not_leaks() -> Check {
    let warm = warm(":memory:", 2)?;
    let end = run_child(DEADLINE, || {
        child_result((|| {
            work_memory(&warm.pool)?;
            let stats = warm.pool.fork_stats();
            ensure!(
                stats.connections_discarded == 2,
                "connections_discarded: {stats:?}"
            );
            ensure!(
                stats.sockets_released == 0 && stats.connections_leaked == 0,
                "stats: {stats:?}"
            );
            Ok(())
        })())
    });
    expect_exit("child", end, 0)?;
    check_master_intact(&warm)
}

fn work_memory(pool: &SqlitePool) -> Check {
    for request in 0..50 {
        let mut conn = pool.get().map_err(|error| format!("get: {error}"))?;
        ensure!(mark(&mut conn).is_none(), "got the master's connection");
        let value = format!("memory-{request}");
        ensure!(echo(&mut conn, &value)? == value, "echo failed");
    }
    Ok(())
}

/// This process's descriptors open on `path`'s file.
fn descriptors_of(path: &Path) -> Vec<RawFd> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut fds: Vec<RawFd> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| {
            nix::sys::stat::fstat(fd)
                .is_ok_and(|stat| (stat.st_dev, stat.st_ino) == (meta.dev(), meta.ino()))
        })
        .collect();
    fds.sort_unstable();
    fds
}

// SQLite's Unix VFS keeps one lock record per database file per process, shared by all of the
// process's connections. A fork while another thread is inside a write copies that record
// mid-write, and the child's *new* connections join it: they meet locks nobody holds.

const WRITERS: i32 = 2;
const FORKS_WHILE_WRITING: usize = 20;
/// `answers.worker` of the master's writer threads are `0..WRITERS`; a child's is this plus
/// its number.
const CHILD_WORKER: i32 = 1000;
/// How long a statement waits for another connection's lock: writers hold theirs for
/// milliseconds, so a statement that waits this long met a lock nobody will release.
const BUSY_TIMEOUT_MS: u32 = 5000;

/// A pool whose connections wait `busy_ms` for another connection's lock.
fn pool_waiting(url: &str, size: u32, busy_ms: u32) -> Result<SqlitePool, String> {
    #[derive(Debug)]
    struct Busy(u32);
    impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for Busy {
        fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
            diesel::sql_query(format!("PRAGMA busy_timeout = {}", self.0))
                .execute(conn)
                .map(drop)
                .map_err(diesel::r2d2::Error::QueryError)
        }
    }
    Pool::builder()
        .max_size(size)
        .min_idle(Some(size))
        .connection_timeout(Duration::from_secs(10))
        .connection_customizer(Box::new(Busy(busy_ms)))
        .build(ConnectionManager::<SqliteConnection>::new(url))
        .map_err(|error| format!("pool on {url}: {error}"))
}

fn insert(pool: &SqlitePool, worker: i32, request: i32) -> Check {
    let mut conn = pool.get().map_err(|error| format!("get: {error}"))?;
    diesel::sql_query("INSERT INTO answers (worker, request, value) VALUES (?, ?, 'w')")
        .bind::<Integer, _>(worker)
        .bind::<Integer, _>(request)
        .execute(&mut conn)
        .map(drop)
        .map_err(|error| format!("insert {worker}/{request}: {error}"))
}

fn rows_of(pool: &SqlitePool, worker: i32) -> Result<i32, String> {
    let mut conn = pool.get().map_err(|error| format!("get: {error}"))?;
    diesel::sql_query("SELECT COUNT(*) AS n FROM answers WHERE worker = ?")
        .bind::<Integer, _>(worker)
        .get_result::<Count>(&mut conn)
        .map(|count| count.n)
        .map_err(|error| format!("count rows of {worker}: {error}"))
}

/// In a child forked while the master's threads wrote: waits until the master has joined them
/// (its end of `start` closes), then writes and reads back through the pool it inherited
/// (rebuilt here on first use).
fn child_writes_after_the_master(
    pool: &SqlitePool,
    start: std::os::fd::OwnedFd,
    child: i32,
) -> Check {
    let mut byte = [0u8; 1];
    // End of file once every write end is closed: the master's, after it joined its writers.
    let _ = nix::unistd::read(start.as_raw_fd(), &mut byte);
    let worker = CHILD_WORKER + child;
    insert(pool, worker, 0)?;
    ensure!(
        rows_of(pool, worker)? == 1,
        "child {child}: its row is missing"
    );
    Ok(())
}

fn forks_while_threads_write(journal: Journal) -> Check {
    let database = Database::create(&format!("writes-{journal:?}"), journal)?;
    // Statements wait for another connection's lock up to the child's limit: the master's
    // writers wait for each other, the children for each other.
    let pool = pool_waiting(database.url(), 4, BUSY_TIMEOUT_MS)?;
    let (start_read, start_write) =
        nix::unistd::pipe().map_err(|error| format!("pipe: {error}"))?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|worker| {
            let pool = pool.clone();
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || -> Result<i32, String> {
                let mut written = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    insert(&pool, worker, written)?;
                    written += 1;
                }
                Ok(written)
            })
        })
        .collect();
    let mut children = Vec::new();
    for child in 0..FORKS_WHILE_WRITING {
        std::thread::sleep(Duration::from_millis(3));
        let child_pool = pool.clone();
        let start = start_read
            .try_clone()
            .map_err(|error| format!("dup: {error}"))?;
        let start_write = start_write.as_raw_fd();
        children.push(spawn_child(move || {
            // Only the master may hold the write end open, or `start` never reaches its end.
            let _ = nix::unistd::close(start_write);
            child_result(child_writes_after_the_master(
                &child_pool,
                start,
                child as i32,
            ))
        }));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut written = Vec::new();
    for writer in writers {
        written.push(
            writer
                .join()
                .map_err(|_| "a writer thread panicked".to_string())?,
        );
    }
    drop(start_write);
    let ends: Vec<ChildEnd> = children
        .into_iter()
        .map(|child| reap(child, DEADLINE))
        .collect();
    let failed = ends
        .iter()
        .filter(|end| !matches!(end, ChildEnd::Exited(0) | ChildEnd::Hung))
        .count();
    let hung = ends.iter().filter(|end| **end == ChildEnd::Hung).count();
    ensure!(
        failed == 0 && hung == 0,
        "of {FORKS_WHILE_WRITING} children forked while the master wrote, {failed} failed and {hung} hung: {ends:?}"
    );
    for (worker, written) in written.into_iter().enumerate() {
        let written = written?;
        ensure!(written > 0, "writer {worker} wrote nothing");
        let stored = rows_of(&pool, worker as i32)?;
        ensure!(
            stored == written,
            "writer {worker} wrote {written} rows, the database has {stored}"
        );
    }
    for child in 0..FORKS_WHILE_WRITING as i32 {
        ensure!(
            rows_of(&pool, CHILD_WORKER + child)? == 1,
            "child {child}'s row is missing"
        );
    }
    Ok(())
}

type Case = (String, Box<dyn Fn() -> Check>);

fn main() {
    let mut cases: Vec<Case> = Vec::new();
    for journal in [Journal::Rollback, Journal::Wal] {
        let name = format!("{journal:?}").to_lowercase();
        cases.push((
            format!("workers_get_answers_of_their_own_{name}"),
            Box::new(move || workers_get_answers_of_their_own(journal)),
        ));
        cases.push((
            format!("the_only_descriptor_is_released_{name}"),
            Box::new(move || the_only_descriptor_is_released(journal)),
        ));
        cases.push((
            format!("master_sigkill_leaves_workers_no_inherited_descriptor_{name}"),
            Box::new(move || master_sigkill_leaves_workers_no_inherited_descriptor(journal)),
        ));
        cases.push((
            format!("forks_while_threads_write_{name}"),
            Box::new(move || forks_while_threads_write(journal)),
        ));
    }
    cases.push((
        "a_connection_leased_across_fork".into(),
        Box::new(a_connection_leased_across_fork),
    ));
    cases.push((
        "children_that_end_every_way".into(),
        Box::new(children_that_end_every_way),
    ));
    cases.push((
        "memory_databases_are_not_leaks".into(),
        Box::new(memory_databases_are_not_leaks),
    ));
    // Workers of a SIGKILLed master are reparented to this process, which reaps them.
    support::backend::become_subreaper();
    run_cases(cases);
}
