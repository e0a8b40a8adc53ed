//! The async pools (`forksafe_pool::deadpool_postgres`, `forksafe_pool::bb8_postgres`) on a
//! `forksafe_pool::Runtime`, forked for real against a real PostgreSQL (`FORKSAFE_PG_URL`,
//! default `postgres://postgres@127.0.0.1:5432/test`), plain and over TLS (postgres-openssl).
//!
//! Every scenario runs for both pools and both transports: workers answer every query with
//! their own sessions, a SIGKILLed master leaves no session behind while its workers run, a
//! worker forks again, forks while the master's runtime has queries in flight, a client checked
//! out before the fork. The control, deadpool-postgres on tokio's own runtime inherited the
//! naive way, must fail in a worker (so the scenarios are real).
//!
//! A `harness = false` binary: the cases fork, so they run one after another, and every child
//! is reaped with a deadline. Without a reachable server the binary prints why and skips,
//! unless `CI` is set: then it fails.

#[macro_use]
mod support;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forksafe_pool::deadpool_postgres::tokio_postgres::{self, NoTls};
use forksafe_pool::{bb8_postgres, deadpool_postgres, ForkStats, Runtime};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;
use support::backend::{become_subreaper, datagram_pair, receive, send, KillOnDrop};
use support::fork::{reap, run_child, spawn_child, ChildEnd};
use support::runner::{
    child_result, expect_exit, require_server, run_cases, Case, Check, NamedCase,
};

const POOL_SIZE: usize = 4;
const WORKERS: usize = 4;
const QUERIES: usize = 50;
const DEADLINE: Duration = Duration::from_secs(30);
/// How long one query may take before the scenario calls it lost.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

fn url() -> String {
    std::env::var("FORKSAFE_PG_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| String::from("postgres://postgres@127.0.0.1:5432/test"))
}

fn pg_config(sslmode: &str) -> Result<tokio_postgres::Config, String> {
    let separator = if url().contains('?') { '&' } else { '?' };
    format!("{}{separator}sslmode={sslmode}", url())
        .parse()
        .map_err(|error| format!("FORKSAFE_PG_URL: {error}"))
}

/// How the pools reach the server.
trait Transport: 'static {
    type Tls: deadpool_postgres::MakeTls;
    fn tls() -> Self::Tls;
    fn config() -> Result<tokio_postgres::Config, String>;
}

struct Plain;
impl Transport for Plain {
    type Tls = NoTls;
    fn tls() -> NoTls {
        NoTls
    }
    fn config() -> Result<tokio_postgres::Config, String> {
        pg_config("disable")
    }
}

struct Tls;
impl Transport for Tls {
    type Tls = MakeTlsConnector;
    fn tls() -> MakeTlsConnector {
        let mut builder = SslConnector::builder(SslMethod::tls()).expect("openssl");
        builder.set_verify(SslVerifyMode::NONE);
        MakeTlsConnector::new(builder.build())
    }
    fn config() -> Result<tokio_postgres::Config, String> {
        pg_config("require")
    }
}

/// What a scenario needs of a pool.
trait AsyncPool: Clone + Send + Sync + Sized + 'static {
    type Guard: Send + 'static;
    fn build(runtime: &Runtime) -> Result<Self, String>;
    fn get(&self) -> impl Future<Output = Result<Self::Guard, String>> + Send;
    fn client(guard: &Self::Guard) -> &tokio_postgres::Client;
    fn fork_stats(&self) -> ForkStats;
}

struct Deadpool<T>(deadpool_postgres::Pool, std::marker::PhantomData<fn() -> T>);

impl<T> Clone for Deadpool<T> {
    fn clone(&self) -> Self {
        Deadpool(self.0.clone(), std::marker::PhantomData)
    }
}

impl<T: Transport> AsyncPool for Deadpool<T> {
    type Guard = deadpool_postgres::Object;
    fn build(_runtime: &Runtime) -> Result<Self, String> {
        let pool = deadpool_postgres::Pool::builder(T::config()?, T::tls())
            .max_size(POOL_SIZE)
            .wait_timeout(Some(QUERY_TIMEOUT))
            .create_timeout(Some(QUERY_TIMEOUT))
            .build()
            .map_err(|error| format!("build: {error}"))?;
        Ok(Deadpool(pool, std::marker::PhantomData))
    }
    async fn get(&self) -> Result<Self::Guard, String> {
        self.0.get().await.map_err(|error| format!("get: {error}"))
    }
    fn client(guard: &Self::Guard) -> &tokio_postgres::Client {
        guard
    }
    fn fork_stats(&self) -> ForkStats {
        self.0.fork_stats()
    }
}

type Bb8Manager<T> = bb8_postgres::PostgresConnectionManager<<T as Transport>::Tls>;

struct Bb8<T: Transport>(bb8_postgres::Pool<Bb8Manager<T>>);

impl<T: Transport> Clone for Bb8<T> {
    fn clone(&self) -> Self {
        Bb8(self.0.clone())
    }
}

impl<T: Transport> AsyncPool for Bb8<T> {
    type Guard = bb8_postgres::PooledConnection<'static, Bb8Manager<T>>;
    fn build(runtime: &Runtime) -> Result<Self, String> {
        let manager = bb8_postgres::PostgresConnectionManager::new(T::config()?, T::tls());
        let pool = runtime
            .block_on(
                bb8_postgres::Pool::builder()
                    .max_size(POOL_SIZE as u32)
                    .connection_timeout(QUERY_TIMEOUT)
                    .build(manager),
            )
            .map_err(|error| format!("build: {error}"))?;
        Ok(Bb8(pool))
    }
    async fn get(&self) -> Result<Self::Guard, String> {
        self.0
            .get_owned()
            .await
            .map_err(|error| format!("get: {error}"))
    }
    fn client(guard: &Self::Guard) -> &tokio_postgres::Client {
        guard
    }
    fn fork_stats(&self) -> ForkStats {
        self.0.fork_stats()
    }
}

/// Asks the server to echo `token` and returns the session's backend pid.
async fn echo<P: AsyncPool>(pool: &P, token: &str) -> Result<i32, String> {
    let answer = tokio::time::timeout(QUERY_TIMEOUT, async {
        let guard = pool.get().await?;
        P::client(&guard)
            .query_one("SELECT $1::text, pg_backend_pid()", &[&token])
            .await
            .map_err(|error| format!("query: {error}"))
    })
    .await
    .map_err(|_| format!("no answer to {token} within {QUERY_TIMEOUT:?}"))??;
    let echoed: String = answer.get(0);
    ensure!(
        echoed == token,
        "asked {token}, got {echoed}: another process's answer"
    );
    Ok(answer.get(1))
}

/// Checks out `POOL_SIZE` clients at once and returns their sessions.
async fn sessions<P: AsyncPool>(pool: &P) -> Result<BTreeSet<i32>, String> {
    let mut guards = Vec::new();
    for _ in 0..POOL_SIZE {
        guards.push(pool.get().await?);
    }
    let mut pids = BTreeSet::new();
    for guard in &guards {
        let row = P::client(guard)
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .map_err(|error| format!("query: {error}"))?;
        pids.insert(row.get::<_, i32>(0));
    }
    ensure!(
        pids.len() == POOL_SIZE,
        "clients held at once share sessions: {pids:?}"
    );
    Ok(pids)
}

/// A master's pool: built, then every client opened (as a server's would be by the fork).
fn warm<P: AsyncPool>() -> Result<(Runtime, P, BTreeSet<i32>), String> {
    let runtime = Runtime::new().map_err(|error| format!("runtime: {error}"))?;
    let pool = P::build(&runtime)?;
    let pids = runtime.block_on(sessions(&pool))?;
    Ok((runtime, pool, pids))
}

/// `QUERIES` echoes, none answered by one of `foreign`'s sessions.
async fn serve<P: AsyncPool>(pool: &P, foreign: &BTreeSet<i32>) -> Result<BTreeSet<i32>, String> {
    let me = std::process::id();
    let mut own = BTreeSet::new();
    for n in 0..QUERIES {
        let pid = echo(pool, &format!("{me}-{n}")).await?;
        ensure!(
            !foreign.contains(&pid),
            "process {me} was answered by session {pid} of another"
        );
        own.insert(pid);
    }
    Ok(own)
}

fn expect_rebuilt(stats: ForkStats, forks: u64, discarded: u64) -> Check {
    ensure!(
        stats.forks_crossed == forks
            && stats.connections_discarded == discarded
            && stats.sockets_released == discarded
            && stats.connections_leaked == 0,
        "fork stats {stats:?}: expected {forks} fork(s), {discarded} connections discarded and their sockets released"
    );
    Ok(())
}

fn workers_answer_every_query<P: AsyncPool>() -> Check {
    let (runtime, pool, master) = warm::<P>()?;
    let workers: Vec<Pid> = (0..WORKERS)
        .map(|_| {
            spawn_child(|| {
                child_result(runtime.block_on(async {
                    serve(&pool, &master).await?;
                    expect_rebuilt(pool.fork_stats(), 1, POOL_SIZE as u64)
                }))
            })
        })
        .collect();
    for (n, pid) in workers.into_iter().enumerate() {
        expect_exit(&format!("worker {n}"), reap(pid, DEADLINE), 0)?;
    }
    let after = runtime.block_on(sessions(&pool))?;
    ensure!(
        after == master,
        "the master's sessions changed: {master:?} -> {after:?}"
    );
    ensure!(
        pool.fork_stats() == ForkStats::default(),
        "the master saw a fork"
    );
    Ok(())
}

fn a_worker_forks_again<P: AsyncPool>() -> Check {
    let (runtime, pool, master) = warm::<P>()?;
    let end = run_child(DEADLINE, || {
        child_result((|| {
            let own = runtime.block_on(sessions(&pool))?;
            let foreign: BTreeSet<i32> = master.union(&own).copied().collect();
            let grandchild = run_child(DEADLINE, || {
                child_result(runtime.block_on(async {
                    serve(&pool, &foreign).await?;
                    expect_rebuilt(pool.fork_stats(), 2, 2 * POOL_SIZE as u64)
                }))
            });
            expect_exit("the grandchild", grandchild, 0)?;
            let again = runtime.block_on(sessions(&pool))?;
            ensure!(
                again == own,
                "the worker's sessions changed: {own:?} -> {again:?}"
            );
            Ok(())
        })())
    });
    expect_exit("the worker", end, 0)
}

fn forks_while_the_runtime_is_busy<P: AsyncPool>() -> Check {
    let (runtime, pool, master) = warm::<P>()?;
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..2 * POOL_SIZE)
        .map(|task| {
            let (pool, stop, answered) = (pool.clone(), stop.clone(), answered.clone());
            runtime.spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    echo(&pool, &format!("master-{task}-{n}")).await?;
                    answered.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    let mut counts = Vec::new();
    for child in 0..10 {
        let before = answered.load(Ordering::Relaxed);
        let end = run_child(DEADLINE, || {
            child_result(runtime.block_on(async {
                serve(&pool, &master).await?;
                expect_rebuilt(pool.fork_stats(), 1, POOL_SIZE as u64)
            }))
        });
        expect_exit(&format!("child {child}"), end, 0)?;
        counts.push(answered.load(Ordering::Relaxed) - before);
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        runtime
            .block_on(async { tokio::time::timeout(DEADLINE, task).await })
            .map_err(|_| String::from("a master task never ended"))?
            .map_err(|error| format!("a master task: {error}"))??;
    }
    // Queries were in flight at every fork: the master answered some while each child ran.
    ensure!(
        counts.iter().all(|&n| n > 0),
        "the master's queries per child's lifetime: {counts:?}"
    );
    Ok(())
}

fn a_client_checked_out_before_the_fork<P: AsyncPool>() -> Check {
    let (runtime, pool, master) = warm::<P>()?;
    // Taken out of its place in the child only: the master keeps it.
    let mut held = Some(runtime.block_on(pool.get())?);
    let end = run_child(DEADLINE, || {
        child_result((|| {
            let guard = held.take().ok_or("no guard")?;
            // The panic is expected: keep its report out of the test's output.
            std::panic::set_hook(Box::new(|_| {}));
            let used = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                P::client(&guard).is_closed()
            }));
            let message = used
                .err()
                .and_then(|panic| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            ensure!(
                message.contains("checked out before fork()"),
                "using the parent's client in the child: expected the documented panic, got {message:?}"
            );
            drop(guard);
            runtime.block_on(serve(&pool, &master))?;
            let stats = pool.fork_stats();
            ensure!(stats.leased_across_fork == 1, "fork stats {stats:?}");
            expect_rebuilt(stats, 1, POOL_SIZE as u64)
        })())
    });
    expect_exit("the child", end, 0)?;
    let guard = held.ok_or("the master lost its guard")?;
    runtime.block_on(async {
        P::client(&guard)
            .query_one("SELECT 1", &[])
            .await
            .map_err(|error| format!("the master's client after the fork: {error}"))
    })?;
    Ok(())
}

/// The server's client sessions now.
fn live_sessions() -> Result<BTreeSet<i32>, String> {
    let mut observer =
        r2d2_postgres::postgres::Client::connect(&url(), r2d2_postgres::postgres::NoTls)
            .map_err(|error| format!("observer: {error}"))?;
    let rows = observer
        .query(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'",
            &[],
        )
        .map_err(|error| format!("pg_stat_activity: {error}"))?;
    Ok(rows.iter().map(|row| row.get::<_, i32>(0)).collect())
}

fn words(ids: &BTreeSet<i32>) -> String {
    ids.iter().map(i32::to_string).collect::<Vec<_>>().join(" ")
}

fn parse(words: &[&str]) -> BTreeSet<i32> {
    words.iter().filter_map(|word| word.parse().ok()).collect()
}

/// The master is SIGKILLed while its workers run: its sessions must end at once (no worker
/// keeps a copy of its sockets), the workers' must not.
fn a_killed_masters_sessions_end<P: AsyncPool>() -> Check {
    let (to_test, from_master) = datagram_pair()?;
    let (go_sender, go) = datagram_pair()?;
    let master_pid = spawn_child(|| {
        let run = || -> Check {
            let (runtime, pool, master) = warm::<P>()?;
            send(&to_test, format!("master {}", words(&master)))?;
            for _ in 0..2 {
                let (runtime, pool, to_test, go) = (&runtime, &pool, &to_test, &go);
                spawn_child(move || {
                    child_result(runtime.block_on(async {
                        let own = sessions(pool).await?;
                        send(
                            to_test,
                            format!("worker {} {}", std::process::id(), words(&own)),
                        )?;
                        receive(go, DEADLINE)?;
                        serve(pool, &BTreeSet::new()).await?;
                        send(to_test, format!("done {}", std::process::id()))
                    }))
                });
            }
            std::thread::sleep(DEADLINE * 2);
            Err(String::from("the master was never killed"))
        };
        child_result(run())
    });
    let mut cleanup = KillOnDrop(vec![master_pid]);
    let (mut master, mut workers) = (BTreeSet::new(), Vec::new());
    while master.is_empty() || workers.len() < 2 {
        let message = receive(&from_master, DEADLINE)?;
        match message.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["master", ids @ ..] => master = parse(ids),
            ["worker", pid, ids @ ..] => {
                let pid = Pid::from_raw(pid.parse().map_err(|_| message.clone())?);
                workers.push((pid, parse(ids)));
            }
            _ => return Err(message),
        }
    }
    ensure!(
        master.is_subset(&live_sessions()?),
        "the master's sessions are not live"
    );
    kill(master_pid, Signal::SIGKILL).map_err(|error| format!("kill: {error}"))?;
    let end = reap(master_pid, DEADLINE);
    ensure!(
        end == ChildEnd::Signaled(Signal::SIGKILL),
        "the master ended {end:?}"
    );
    // The workers are this process's children now (it is their subreaper).
    cleanup.0 = workers.iter().map(|(pid, _)| *pid).collect();
    let killed = Instant::now();
    let mut left = master.clone();
    while !left.is_empty() && killed.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
        left = live_sessions()?.intersection(&master).copied().collect();
    }
    ensure!(
        left.is_empty(),
        "2 s after the master's SIGKILL its sessions {left:?} live on"
    );
    let live = live_sessions()?;
    for (pid, own) in &workers {
        ensure!(
            own.is_subset(&live),
            "worker {pid}'s sessions {own:?} are gone"
        );
        send(&go_sender, String::from("go"))?;
    }
    for (pid, _) in workers {
        let message = receive(&from_master, DEADLINE)?;
        ensure!(message.starts_with("done "), "{message}");
        cleanup.0.retain(|&p| p != pid);
        expect_exit(&format!("worker {pid}"), reap(pid, DEADLINE), 0)?;
    }
    Ok(())
}

/// The control: tokio's runtime and deadpool-postgres's pool on `manager`, built and warmed in
/// the master and inherited, serve nothing in a worker.
fn naive_runtime_and_pool_fail_in_a_worker(
    manager: Result<::deadpool_postgres::Manager, String>,
) -> Check {
    let runtime = tokio::runtime::Runtime::new().map_err(|error| format!("runtime: {error}"))?;
    let pool = ::deadpool_postgres::Pool::builder(manager?)
        .max_size(POOL_SIZE)
        .build()
        .map_err(|error| format!("build: {error}"))?;
    runtime.block_on(async {
        let client = pool.get().await.map_err(|error| format!("get: {error}"))?;
        client
            .query_one("SELECT 1", &[])
            .await
            .map_err(|error| format!("query: {error}"))
    })?;
    let end = run_child(QUERY_TIMEOUT * 2, || {
        let answered = runtime.block_on(async {
            let client = pool.get().await.ok()?;
            client.query_one("SELECT 1", &[]).await.ok()
        });
        if answered.is_some() {
            0
        } else {
            1
        }
    });
    ensure!(
        end != ChildEnd::Exited(0),
        "a worker answered on the inherited runtime and pool; the control expects it to fail"
    );
    Ok(())
}

fn naive_plain() -> Check {
    naive_runtime_and_pool_fail_in_a_worker(
        Plain::config().map(|config| ::deadpool_postgres::Manager::new(config, NoTls)),
    )
}

fn naive_tls() -> Check {
    naive_runtime_and_pool_fail_in_a_worker(
        Tls::config().map(|config| ::deadpool_postgres::Manager::new(config, Tls::tls())),
    )
}

/// Children per variant in [`exit_while_connects_run`].
const EXITS: usize = 20;

/// A process that calls `exit` while its runtime's threads are in the middle of queries and
/// connects (TLS ones over `tls::`), as a worker ended by `max_requests` does: no child may hang
/// (`exit` waits for polls in progress, and polls that would start during it wait) or die of a
/// signal. With the driver sections removed, no child died either (0 of 160, over both pools): rust-openssl
/// initialises OpenSSL without its `atexit` cleanup, which is what kills such processes
/// elsewhere; the sections matter when another library in the process (libpq) registered it.
fn exit_while_connects_run<P: AsyncPool>() -> Check {
    let mut ends = Vec::new();
    for _ in 0..EXITS {
        let pid = spawn_child(|| {
            let Ok(runtime) = Runtime::new() else {
                return 2;
            };
            let Ok(pool) = P::build(&runtime) else {
                return 3;
            };
            runtime.block_on(async {
                let connects: Vec<_> = (0..2 * POOL_SIZE)
                    .map(|task| {
                        let pool = pool.clone();
                        tokio::spawn(async move {
                            for n in 0.. {
                                if echo(&pool, &format!("{task}-{n}")).await.is_err() {
                                    break;
                                }
                            }
                        })
                    })
                    .collect();
                tokio::time::sleep(Duration::from_millis(30)).await;
                drop(connects);
            });
            // SAFETY: `exit` runs the atexit handlers on purpose: that is what is tested.
            unsafe { libc::exit(0) }
        });
        ends.push(reap(pid, DEADLINE));
    }
    let bad: Vec<_> = ends
        .iter()
        .filter(|end| **end != ChildEnd::Exited(0))
        .collect();
    ensure!(
        bad.is_empty(),
        "of {EXITS} children that exited while connecting: {bad:?}"
    );
    Ok(())
}

/// bb8's `connection_timeout` in [`bad_input_fails_clearly`].
const BB8_GIVES_UP: Duration = Duration::from_secs(2);

/// A port on which nothing listens, and a Unix-socket host: each `get` fails with a clear error
/// well within the pool's timeout, in the master and in a forked child.
fn bad_input_fails_clearly() -> Check {
    let refused: tokio_postgres::Config = "host=127.0.0.1 port=1 user=postgres"
        .parse()
        .map_err(|error| format!("{error}"))?;
    let unix: tokio_postgres::Config = "host=/var/run/postgresql user=postgres"
        .parse()
        .map_err(|error| format!("{error}"))?;
    let runtime = Runtime::new().map_err(|error| format!("runtime: {error}"))?;
    let deadpools = [(&refused, "refused"), (&unix, "TCP only")].map(|(config, says)| {
        let pool = deadpool_postgres::Pool::builder(config.clone(), NoTls)
            .max_size(1)
            .create_timeout(Some(QUERY_TIMEOUT))
            .build();
        (pool, says)
    });
    let manager = |config: &tokio_postgres::Config| {
        bb8_postgres::PostgresConnectionManager::new(config.clone(), NoTls)
    };
    let sink = ErrorLog::default();
    let bb8s = [(&refused, "refused"), (&unix, "TCP only")].map(|(config, says)| {
        let pool = runtime.block_on(
            bb8_postgres::Pool::builder()
                .max_size(1)
                .connection_timeout(BB8_GIVES_UP)
                .error_sink(Box::new(sink.clone()))
                .build(manager(config)),
        );
        (pool, says)
    });
    let check = || -> Check {
        for (pool, says) in &deadpools {
            let pool = pool.as_ref().map_err(|error| format!("build: {error}"))?;
            let started = Instant::now();
            let error = match runtime.block_on(pool.get()) {
                Ok(_) => return Err(String::from("a deadpool get succeeded")),
                Err(error) => format!("{error}: {:?}", std::error::Error::source(&error)),
            };
            ensure!(
                error.contains(says) && started.elapsed() < QUERY_TIMEOUT,
                "deadpool: {error:?} after {:?}, expected {says:?} at once",
                started.elapsed()
            );
        }
        for (pool, says) in &bb8s {
            // bb8's `build` opens no connection without `min_idle`, so it succeeds. A `get`
            // times out after `connection_timeout`, and the connect's errors go to the error
            // sink (bb8's own way).
            let pool = pool.as_ref().map_err(|error| format!("build: {error}"))?;
            let started = Instant::now();
            let error = match runtime.block_on(pool.get()) {
                Ok(_) => return Err(String::from("a bb8 get succeeded")),
                Err(error) => error,
            };
            let took = started.elapsed();
            ensure!(
                matches!(error, bb8_postgres::RunError::TimedOut)
                    && took < BB8_GIVES_UP + Duration::from_secs(2),
                "bb8: {error:?} after {took:?}"
            );
            let logged = sink.take();
            ensure!(
                logged.iter().any(|error| error.contains(says)),
                "bb8's error sink got {logged:?}, expected {says:?}"
            );
        }
        Ok(())
    };
    check()?;
    expect_exit(
        "the child",
        run_child(DEADLINE, || child_result(check())),
        0,
    )
}

/// deadpool's `Object::take` and bb8's `dedicated_connection`: connections taken out of the
/// pool work in the process that took them; a client checked out before a fork cannot be taken
/// in the child.
fn taken_and_dedicated_connections() -> Check {
    let runtime = Runtime::new().map_err(|error| format!("runtime: {error}"))?;
    let deadpool = Deadpool::<Plain>::build(&runtime)?.0;
    let bb8 = Bb8::<Plain>::build(&runtime)?.0;
    let mut held = Some(
        runtime
            .block_on(deadpool.get())
            .map_err(|e| e.to_string())?,
    );
    let end = run_child(DEADLINE, || {
        child_result((|| {
            std::panic::set_hook(Box::new(|_| {}));
            let inherited = held.take().ok_or("no guard")?;
            let taken = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                deadpool_postgres::Object::take(inherited)
            }));
            ensure!(taken.is_err(), "the child took the parent's client");
            Ok(())
        })())
    });
    expect_exit("the child", end, 0)?;
    let taken = deadpool_postgres::Object::take(held.ok_or("the master lost its guard")?);
    runtime.block_on(async {
        taken
            .query_one("SELECT 1", &[])
            .await
            .map_err(|error| format!("the taken client: {error}"))?;
        ensure!(
            deadpool.status().size == 0,
            "the taken client is still counted: {:?}",
            deadpool.status()
        );
        let dedicated = bb8
            .dedicated_connection()
            .await
            .map_err(|error| format!("dedicated_connection: {error}"))?;
        dedicated
            .query_one("SELECT 1", &[])
            .await
            .map_err(|error| format!("the dedicated connection: {error}"))?;
        Ok(())
    })
}

/// A bb8 error sink that keeps what it was given, with each error's source.
#[derive(Clone, Debug, Default)]
struct ErrorLog(Arc<std::sync::Mutex<Vec<String>>>);

impl ErrorLog {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|poison| poison.into_inner()))
    }
}

impl bb8_postgres::ErrorSink<tokio_postgres::Error> for ErrorLog {
    fn sink(&self, error: tokio_postgres::Error) {
        let text = format!("{error}: {:?}", std::error::Error::source(&error));
        self.0
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .push(text);
    }
    fn boxed_clone(&self) -> Box<dyn bb8_postgres::ErrorSink<tokio_postgres::Error>> {
        Box::new(self.clone())
    }
}

fn cases_for<P: AsyncPool>(prefix: &str) -> Vec<NamedCase> {
    let cases: [Case; 6] = [
        (
            "workers_answer_every_query",
            workers_answer_every_query::<P>,
        ),
        (
            "a_killed_masters_sessions_end",
            a_killed_masters_sessions_end::<P>,
        ),
        ("a_worker_forks_again", a_worker_forks_again::<P>),
        (
            "forks_while_the_runtime_is_busy",
            forks_while_the_runtime_is_busy::<P>,
        ),
        (
            "a_client_checked_out_before_the_fork",
            a_client_checked_out_before_the_fork::<P>,
        ),
        ("exit_while_connects_run", exit_while_connects_run::<P>),
    ];
    cases
        .into_iter()
        .map(|(name, case)| (format!("{prefix}{name}"), case))
        .collect()
}

fn main() {
    let reachable =
        r2d2_postgres::postgres::Client::connect(&url(), r2d2_postgres::postgres::NoTls)
            .map(drop)
            .map_err(|error| format!("PostgreSQL at {}: {error}", url()));
    require_server("async pool", reachable, "set FORKSAFE_PG_URL");
    become_subreaper();
    let mut cases = Vec::new();
    cases.extend(cases_for::<Deadpool<Plain>>("deadpool::plain::"));
    cases.extend(cases_for::<Deadpool<Tls>>("deadpool::tls::"));
    cases.extend(cases_for::<Bb8<Plain>>("bb8::plain::"));
    cases.extend(cases_for::<Bb8<Tls>>("bb8::tls::"));
    let controls: [Case; 4] = [
        (
            "taken_and_dedicated_connections",
            taken_and_dedicated_connections,
        ),
        ("bad_input_fails_clearly", bad_input_fails_clearly),
        (
            "naive::plain::runtime_and_pool_fail_in_a_worker",
            naive_plain,
        ),
        ("naive::tls::runtime_and_pool_fail_in_a_worker", naive_tls),
    ];
    cases.extend(
        controls
            .into_iter()
            .map(|(name, case)| (name.to_string(), case)),
    );
    run_cases(cases);
}
