//! Plain r2d2 next to forksafe-pool on PostgreSQL: the failure forksafe-pool prevents.
//!
//! ```text
//! cargo run --example naive_vs_forksafe
//! FORKSAFE_PG_URL=postgres://user@host:5432/db cargo run --example naive_vs_forksafe
//! ```
//!
//! For each pool and each transport (TLS through libpq's default `sslmode=prefer`, and
//! `sslmode=disable`), a master builds the pool (max_size 4, min_idle 4), runs a query on
//! every connection, and forks 4 workers. Each worker runs up to 200 requests that echo a value
//! of its own (`SELECT $1`) and counts them: `ok` (its own answer), `failed` (an error),
//! `wrong` (someone else's answer). A worker still running at the deadline is killed and shown
//! as `hung`. Afterwards the master checks its own connections. Every child is reaped or
//! killed; the run is bounded in time.

use std::collections::BTreeSet;
use std::ops::DerefMut;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use diesel::pg::PgConnection;
use diesel::r2d2::ConnectionManager;
use diesel::sql_types::Text;
use diesel::{Connection, QueryableByName, RunQueryDsl};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

const WORKERS: usize = 4;
const REQUESTS: usize = 200;
const POOL_SIZE: u32 = 4;
/// How long the workers of one run get, from the fork.
const DEADLINE: Duration = Duration::from_secs(12);
/// r2d2's wait for a connection, shortened from its 30 s so a starved worker shows errors.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(3);

type Manager = ConnectionManager<PgConnection>;

#[derive(QueryableByName)]
struct Echo {
    #[diesel(sql_type = Text)]
    value: String,
}

fn echo<C>(conn: &mut C, value: &str) -> Result<String, String>
where
    C: Connection<Backend = diesel::pg::Pg> + diesel::connection::LoadConnection,
{
    diesel::sql_query("SELECT $1::text AS value")
        .bind::<Text, _>(value)
        .get_result::<Echo>(conn)
        .map(|row| row.value)
        .map_err(|error| error.to_string())
}

#[derive(QueryableByName)]
struct Backend {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pid: i32,
}

/// The server sessions behind `POOL_SIZE` connections checked out at once.
fn sessions<C: DerefMut<Target = PgConnection>>(
    get: impl Fn() -> Result<C, String>,
) -> Result<BTreeSet<i32>, String> {
    let mut conns = (0..POOL_SIZE)
        .map(|_| get())
        .collect::<Result<Vec<C>, String>>()?;
    conns
        .iter_mut()
        .map(|conn| {
            diesel::sql_query("SELECT pg_backend_pid() AS pid")
                .get_result::<Backend>(&mut **conn)
                .map(|row| row.pid)
                .map_err(|error| error.to_string())
        })
        .collect()
}

/// The two pools, seen the same way.
trait Requests: Sync {
    /// One request: check out a connection and echo `value` through it.
    fn request(&self, value: &str) -> Result<String, String>;
    /// The server sessions of the pool's connections.
    fn sessions(&self) -> Result<BTreeSet<i32>, String>;
}

impl Requests for r2d2::Pool<Manager> {
    fn request(&self, value: &str) -> Result<String, String> {
        let mut conn = self.get().map_err(|error| error.to_string())?;
        echo(&mut conn, value)
    }

    fn sessions(&self) -> Result<BTreeSet<i32>, String> {
        sessions(|| self.get().map_err(|error| error.to_string()))
    }
}

impl Requests for forksafe_pool::Pool<Manager> {
    fn request(&self, value: &str) -> Result<String, String> {
        let mut conn = self.get().map_err(|error| error.to_string())?;
        echo(&mut conn, value)
    }

    fn sessions(&self) -> Result<BTreeSet<i32>, String> {
        sessions(|| self.get().map_err(|error| error.to_string()))
    }
}

/// What one worker saw, written to its report file after every request.
#[derive(Default)]
struct Tally {
    ok: usize,
    failed: usize,
    wrong: usize,
    first_problem: String,
}

impl Tally {
    fn save(&self, path: &Path) {
        let partial = path.with_extension("partial");
        let text = format!(
            "{} {} {}\n{}",
            self.ok, self.failed, self.wrong, self.first_problem
        );
        if std::fs::write(&partial, text).is_ok() {
            let _ = std::fs::rename(&partial, path);
        }
    }

    fn load(path: &Path) -> Tally {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let (counts, problem) = text.split_once('\n').unwrap_or((&text, ""));
        let mut counts = counts.split(' ').map(|n| n.parse().unwrap_or(0));
        Tally {
            ok: counts.next().unwrap_or(0),
            failed: counts.next().unwrap_or(0),
            wrong: counts.next().unwrap_or(0),
            first_problem: problem.to_string(),
        }
    }
}

fn worker(pool: &dyn Requests, report: &Path) {
    let me = std::process::id();
    let mut tally = Tally::default();
    tally.save(report);
    for request in 0..REQUESTS {
        let value = format!("worker {me} request {request}");
        match pool.request(&value) {
            Ok(answer) if answer == value => tally.ok += 1,
            Ok(answer) => {
                tally.wrong += 1;
                if tally.first_problem.is_empty() {
                    tally.first_problem = format!("request {request} got {answer:?}");
                }
            }
            Err(error) => {
                tally.failed += 1;
                if tally.first_problem.is_empty() {
                    tally.first_problem =
                        format!("request {request}: {}", error.replace('\n', " "));
                }
            }
        }
        tally.save(report);
    }
}

/// Forks a worker; it never returns into `main`.
fn spawn_worker(pool: &dyn Requests, report: &Path) -> Pid {
    // SAFETY: the child runs only the worker loop and leaves with `_exit`, never returning
    // into code that assumes the parent's threads exist.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                worker(pool, report)
            })) {
                Ok(()) => 0,
                Err(_) => 101,
            };
            // SAFETY: `_exit` is async-signal-safe and ends the process at once, without
            // running the parent's atexit handlers or destructors in the child.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => child,
    }
}

/// Waits for `pid` until `until`; kills it then. Returns how it ended.
fn reap(pid: Pid, until: Instant) -> String {
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, 0)) => return "finished".into(),
            Ok(WaitStatus::Exited(_, code)) => return format!("exited with {code}"),
            Ok(WaitStatus::Signaled(_, signal, _)) => return format!("killed by {signal:?}"),
            Ok(_) if Instant::now() >= until => {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                return format!("HUNG (killed after {}s)", DEADLINE.as_secs());
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(5)),
            Err(error) => return format!("waitpid: {error}"),
        }
    }
}

/// One run: warm the pool, fork the workers, report each, then check the master.
fn run(title: &str, pool: &dyn Requests, dir: &Path) {
    println!("\n{title}");
    let before = match pool.sessions() {
        Ok(sessions) => sessions,
        Err(error) => {
            println!("  master could not warm its pool: {error}");
            return;
        }
    };
    let reports: Vec<PathBuf> = (0..WORKERS)
        .map(|index| dir.join(format!("worker-{index}")))
        .collect();
    let workers: Vec<Pid> = reports
        .iter()
        .map(|report| spawn_worker(pool, report))
        .collect();
    let until = Instant::now() + DEADLINE;
    for (index, (pid, report)) in workers.into_iter().zip(&reports).enumerate() {
        let end = reap(pid, until);
        let tally = Tally::load(report);
        println!(
            "  worker {index}: {:>3} ok, {:>3} failed, {:>3} wrong, {end}{}",
            tally.ok,
            tally.failed,
            tally.wrong,
            if tally.first_problem.is_empty() {
                String::new()
            } else {
                format!(" — first problem: {}", tally.first_problem)
            }
        );
        let _ = std::fs::remove_file(report);
    }
    let master: Vec<String> = (0..POOL_SIZE)
        .map(|index| {
            let value = format!("master again {index}");
            match pool.request(&value) {
                Ok(answer) if answer == value => "ok".to_string(),
                Ok(answer) => format!("wrong ({answer:?})"),
                Err(error) => format!("failed ({})", error.replace('\n', " ")),
            }
        })
        .collect();
    let same = match pool.sessions() {
        Ok(after) if after == before => "the same server sessions".to_string(),
        Ok(after) => format!(
            "{} of its {} server sessions replaced",
            before.difference(&after).count(),
            before.len()
        ),
        Err(error) => format!("cannot check its sessions: {}", error.replace('\n', " ")),
    };
    println!("  master afterwards: {}; {same}", master.join(", "));
}

fn main() {
    let base = std::env::var("FORKSAFE_PG_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
    let separator = if base.contains('?') { '&' } else { '?' };
    let transports = [
        ("TLS (sslmode=prefer)", base.clone()),
        (
            "sslmode=disable",
            format!("{base}{separator}sslmode=disable"),
        ),
    ];
    let dir =
        std::env::temp_dir().join(format!("forksafe-naive-vs-forksafe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    println!(
        "{WORKERS} workers x {REQUESTS} requests each, forked from a master whose pool holds {POOL_SIZE} warm connections; \
         deadline {}s per run, connection_timeout {}s",
        DEADLINE.as_secs(),
        CONNECTION_TIMEOUT.as_secs()
    );
    for (transport, url) in &transports {
        let naive = r2d2::Pool::builder()
            .max_size(POOL_SIZE)
            .min_idle(Some(POOL_SIZE))
            .connection_timeout(CONNECTION_TIMEOUT)
            .build(Manager::new(url.as_str()));
        match naive {
            Ok(pool) => run(&format!("plain r2d2, {transport}"), &pool, &dir),
            Err(error) => println!("\nplain r2d2, {transport}: cannot connect: {error}"),
        }
        let forksafe = forksafe_pool::Pool::builder()
            .max_size(POOL_SIZE)
            .min_idle(Some(POOL_SIZE))
            .connection_timeout(CONNECTION_TIMEOUT)
            .build(Manager::new(url.as_str()));
        match forksafe {
            Ok(pool) => {
                run(&format!("forksafe_pool, {transport}"), &pool, &dir);
            }
            Err(error) => println!("\nforksafe_pool, {transport}: cannot connect: {error}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
