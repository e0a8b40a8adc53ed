//! A forked child's first `get()` — which rebuilds the pool in the child and waits for its
//! first connection — against opening one plain connection in a forked child. Target: the
//! first checkout costs at most 1.5 × a plain connection.
//!
//! Every iteration forks for real: the parent holds a warm pool (its connections open), forks,
//! and the child times the one operation and reports the duration through a pipe, then
//! `_exit`s. The fork itself and the reaping are not timed; criterion's `iter_custom` gets the
//! sum of the children's durations. A child that does not report within 10 s is killed (its
//! `alarm`) and the benchmark panics, so a hang is never measured as a number.
//!
//! Databases: an SQLite file in a temporary directory always; PostgreSQL as well when
//! `DATABASE_URL` is set (`DATABASE_URL=postgres://postgres@127.0.0.1:5432/test`).
//!
//! `cargo bench --bench first_checkout_after_fork`

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::r2d2::{ConnectionManager, R2D2Connection};
use diesel::sqlite::SqliteConnection;
use diesel::Connection;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

/// The pools' size, as in the demo's workers.
const POOL_SIZE: u32 = 2;

/// Forks; the child runs `timed` and sends back how long it took. Returns that duration.
fn in_child(timed: impl FnOnce() -> Duration) -> Duration {
    let (mut reader, writer) = nix::unistd::pipe()
        .map(|(r, w)| (std::fs::File::from(r), w))
        .expect("pipe");
    // SAFETY: the child runs `timed`, writes to the pipe and `_exit`s: it never returns into
    // criterion. The benchmark is single-threaded apart from the pools' own threads, which
    // the child does not use (that is what is being measured).
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            drop(reader);
            nix::unistd::alarm::set(10);
            let took = timed();
            let mut writer = std::fs::File::from(writer);
            let code = match writer.write_all(&(took.as_nanos() as u64).to_le_bytes()) {
                Ok(()) => 0,
                Err(_) => 1,
            };
            // SAFETY: `_exit` has no preconditions; it skips the parent's atexit handlers.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(writer);
            let (done, watched) = std::sync::mpsc::channel::<()>();
            let watchdog = std::thread::spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    watched.recv_timeout(Duration::from_secs(8))
                {
                    // About to be killed by its alarm: show where it is stuck.
                    let _ = std::process::Command::new("gdb")
                        .args([
                            "-p",
                            &child.to_string(),
                            "-batch",
                            "-ex",
                            "thread apply all bt",
                        ])
                        .status();
                }
            });
            let mut nanos = [0_u8; 8];
            let reported = reader.read_exact(&mut nanos);
            let _ = done.send(());
            let _ = watchdog.join();
            let status = waitpid(child, None).expect("waitpid");
            assert!(
                reported.is_ok() && matches!(status, WaitStatus::Exited(_, 0)),
                "the child failed or hung: {status:?}"
            );
            Duration::from_nanos(u64::from_le_bytes(nanos))
        }
    }
}

fn sum_in_children(iters: u64, mut timed: impl FnMut() -> Duration) -> Duration {
    (0..iters).map(|_| in_child(&mut timed)).sum()
}

/// Benchmarks one database: plain connection, forksafe first checkout, and (for context) a
/// new r2d2 pool built in the child, the lazy way.
fn bench_database<C>(c: &mut Criterion, name: &str, url: &str)
where
    C: Connection + R2D2Connection + 'static,
{
    let forksafe = forksafe_pool::Pool::builder()
        .max_size(POOL_SIZE)
        .build(ConnectionManager::<C>::new(url))
        .expect("forksafe pool");
    forksafe
        .get()
        .expect("warm")
        .batch_execute("SELECT 1")
        .expect("query");

    let mut group = c.benchmark_group(format!("first_checkout_after_fork/{name}"));
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    group.bench_function("plain_connection", |b| {
        b.iter_custom(|iters| {
            sum_in_children(iters, || {
                let start = Instant::now();
                let conn = C::establish(url).expect("connect");
                let took = start.elapsed();
                std::mem::forget(conn);
                took
            })
        })
    });
    group.bench_function("forksafe_first_get", |b| {
        b.iter_custom(|iters| {
            sum_in_children(iters, || {
                let start = Instant::now();
                let conn = forksafe.get().expect("first checkout in the child");
                let took = start.elapsed();
                // Not timed: the connection works and is the child's own.
                let mut conn = conn;
                conn.batch_execute("SELECT 1").expect("query in the child");
                std::mem::forget(conn);
                took
            })
        })
    });
    group.bench_function("plain_connection_on_new_thread", |b| {
        b.iter_custom(|iters| {
            sum_in_children(iters, || {
                let start = Instant::now();
                let owned = url.to_owned();
                let conn = std::thread::spawn(move || C::establish(&owned).expect("connect"))
                    .join()
                    .expect("thread");
                let took = start.elapsed();
                std::mem::forget(conn);
                took
            })
        })
    });
    let single = forksafe_pool::Pool::builder()
        .max_size(POOL_SIZE)
        .min_idle(Some(1))
        .build(ConnectionManager::<C>::new(url))
        .expect("forksafe pool");
    group.bench_function("forksafe_first_get_min_idle_1", |b| {
        b.iter_custom(|iters| {
            sum_in_children(iters, || {
                let start = Instant::now();
                let conn = single.get().expect("first checkout in the child");
                let took = start.elapsed();
                std::mem::forget(conn);
                took
            })
        })
    });
    group.finish();
}

fn first_checkout_after_fork(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("bench.db").display().to_string();
    SqliteConnection::establish(&path)
        .expect("sqlite")
        .batch_execute(
            "PRAGMA journal_mode = WAL; CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY)",
        )
        .expect("prepare sqlite");
    bench_database::<SqliteConnection>(c, "sqlite_file", &path);
    match std::env::var("DATABASE_URL") {
        Ok(url) if url.starts_with("postgres") => {
            bench_database::<PgConnection>(c, "postgres", &url)
        }
        _ => eprintln!("DATABASE_URL is not a postgres:// URL: PostgreSQL skipped"),
    }
}

criterion_group!(benches, first_checkout_after_fork);

fn main() {
    // `FIRST_GET_PROFILE=<sqlite path or postgres URL>`: one fork and one first checkout, nothing
    // else, for `strace -f -ttt` or `valgrind`; prints the duration.
    if let Ok(target) = std::env::var("FIRST_GET_PROFILE") {
        fn once<C: Connection + R2D2Connection + 'static>(url: &str) {
            let pool = forksafe_pool::Pool::builder()
                .max_size(POOL_SIZE)
                .build(ConnectionManager::<C>::new(url))
                .expect("forksafe pool");
            let took = in_child(|| {
                let start = Instant::now();
                let conn = pool.get().expect("first checkout in the child");
                let took = start.elapsed();
                std::mem::forget(conn);
                took
            });
            println!("first get() in the child: {took:?}");
        }
        if target.starts_with("postgres") {
            once::<PgConnection>(&target);
        } else {
            once::<SqliteConnection>(&target);
        }
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
