//! The fork scenarios every server backend runs (MariaDB/MySQL and Redis): a warm master pool,
//! 4 forked workers with 300 checked requests each, a connection leased across the fork,
//! children ending every way, the master SIGKILLed under its workers, forks while master
//! threads keep connecting, bad input failing in time. What differs per backend is a
//! [`Backend`], implemented for its connection manager.
//!
//! Children report their errors over a datagram socket; every child is reaped with a deadline.

use std::collections::BTreeSet;
use std::marker::PhantomData;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use forksafe_pool::{ForkStats, ManageConnection, Pool, PooledConnection};
use nix::sys::signal::{kill, raise, Signal};
use nix::unistd::Pid;

use super::events::EventLog;
use super::fork::{fork_while_connecting, reap, spawn_child, ChildEnd};
use super::runner::{require_server, run_cases, Case, Check, NamedCase};
use super::worker_pool;

pub const DEADLINE: Duration = Duration::from_secs(30);
pub const POOL_SIZE: u32 = 4;
pub const WORKERS: usize = 4;
pub const REQUESTS: usize = 300;
/// How much later than `connection_timeout` a failing `get` or `build` may return.
pub const SLACK: Duration = Duration::from_secs(3);

/// What differs per server: a connection manager that can say which server session answered.
pub trait Backend: ManageConnection + Sized {
    /// A connection of the test's own, outside any pool, to watch the server's sessions with.
    type Observer;

    /// Whether the server has sessions that outlive a killed master (every server does; an
    /// embedded database has none, and [`observer`](Backend::observer) is never called).
    const SERVER_SESSIONS: bool = true;

    /// Whether every inherited connection's descriptors are identified and released in a child.
    /// False for a backend that may leave some open (counted as leaked): the scenarios then
    /// check that each inherited connection is either released or counted.
    const RELEASES_EVERY_CONNECTION: bool = true;

    /// How many forks `forks_while_the_master_connects` takes. A driver whose C library holds
    /// a process-global lock only for an instant of each connect wants more forks to hit it.
    const FORKS_WHILE_CONNECTING: usize = 100;

    /// How much later than `connection_timeout` a failing `get` or `build` may return in
    /// `bad_input_fails_within_connection_timeout`.
    const SLACK: Duration = SLACK;

    /// The server's URL.
    fn url() -> String;

    /// A manager for `url`.
    fn manager(url: &str) -> Result<Self, String>;

    /// Asks the server to echo `value` and say which session answered; checks the echo.
    fn echo(conn: &mut PooledConnection<Self>, value: &str) -> Result<i64, String>;

    /// One worker request (`value` is its own); returns the session that answered. Defaults to
    /// an [`echo`](Backend::echo).
    fn request(
        conn: &mut PooledConnection<Self>,
        _request: usize,
        value: &str,
    ) -> Result<i64, String> {
        Self::echo(conn, value)
    }

    /// Checks a connection of the master's warm pool (e.g. that it negotiated TLS); checked
    /// for every connection `session_ids` takes.
    fn check_warm(_conn: &mut PooledConnection<Self>) -> Check {
        Ok(())
    }

    fn observer() -> Result<Self::Observer, String>;

    /// The sessions the server has open right now, seen from the observer.
    fn live_sessions(observer: &mut Self::Observer) -> Result<BTreeSet<i64>, String>;
}

/// One manager type at a URL of its own, so the scenarios run once per transport or mode of a
/// backend whose manager type does not change with them (e.g. a TCP and a Unix socket URL).
/// `V` names the variant; `Backend` is implemented for `At<V, M>` by the test.
pub trait Variant: 'static {
    /// The URL the scenarios use for this variant.
    fn url() -> String;
}

/// `M` used at [`Variant`] `V`'s URL; every `ManageConnection` call goes to `M`.
pub struct At<V, M>(pub M, PhantomData<fn() -> V>);

impl<V, M> At<V, M> {
    pub fn new(manager: M) -> Self {
        At(manager, PhantomData)
    }
}

impl<V: 'static, M: ManageConnection> ManageConnection for At<V, M> {
    type Connection = M::Connection;
    type Error = M::Error;

    fn connect(&self) -> Result<M::Connection, M::Error> {
        self.0.connect()
    }

    fn is_valid(&self, conn: &mut M::Connection) -> Result<(), M::Error> {
        self.0.is_valid(conn)
    }

    fn has_broken(&self, conn: &mut M::Connection) -> bool {
        self.0.has_broken(conn)
    }
}

/// The `main` of a backend's test binary: requires its server (`reachable`, see
/// [`require_server`]), makes this process a child subreaper, then runs the shared scenarios
/// and after them the backend's `own` cases.
pub fn run<B: Backend>(
    tests: &str,
    reachable: Result<(), String>,
    hint: &str,
    own: impl IntoIterator<Item = Case>,
) {
    let own = own.into_iter().map(|(name, case)| (name.to_string(), case));
    run_all(
        tests,
        reachable,
        hint,
        scenarios::<B>("").into_iter().chain(own),
    );
}

/// The `main` of a test binary that runs the scenarios for several backends (e.g. one server
/// with and without TLS): like [`run`], with the cases given whole, e.g. from [`scenarios`].
pub fn run_all(
    tests: &str,
    reachable: Result<(), String>,
    hint: &str,
    cases: impl IntoIterator<Item = NamedCase>,
) {
    require_server(tests, reachable, hint);
    become_subreaper();
    run_cases(cases);
}

/// Workers of a SIGKILLed master are reparented to this process, so it can reap them.
pub fn become_subreaper() {
    nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
}

/// The shared scenarios for backend `B`, their names prefixed with `prefix` (e.g. `"tls::"`).
/// A backend without server sessions ([`Backend::SERVER_SESSIONS`] false) skips the one that
/// watches the server's sessions.
pub fn scenarios<B: Backend>(prefix: &str) -> Vec<NamedCase> {
    let mut shared: Vec<Case> = vec![
        (
            "four_workers_get_their_own_answers",
            four_workers_get_their_own_answers::<B>,
        ),
        (
            "a_connection_leased_across_fork",
            a_connection_leased_across_fork::<B>,
        ),
        (
            "children_end_by_return_exit_and_sigkill",
            children_end_by_return_exit_and_sigkill::<B>,
        ),
        (
            "master_sigkill_leaves_no_sessions_behind",
            master_sigkill_leaves_no_sessions_behind::<B>,
        ),
        (
            "forks_while_the_master_connects",
            forks_while_the_master_connects::<B>,
        ),
        (
            "a_worker_keeps_the_whole_pool",
            a_worker_keeps_the_whole_pool::<B>,
        ),
    ];
    if !B::SERVER_SESSIONS {
        shared.retain(|(name, _)| *name != "master_sigkill_leaves_no_sessions_behind");
    }
    shared
        .into_iter()
        .map(|(name, case)| (format!("{prefix}{name}"), case))
        .collect()
}

/// A worker of a master whose pool has an event handler, `min_idle` and an idle timeout gets
/// r2d2's events, `min_idle` and the reaper in the background (see `worker_pool`), and its
/// connections answer it.
pub fn a_worker_keeps_the_whole_pool<B: Backend>() -> Check {
    let events = EventLog::default();
    let pool = worker_pool::master_pool(B::manager(&B::url())?, &events)?;
    in_child(|| {
        worker_pool::a_worker_keeps_the_whole_pool(&pool, &events)?;
        let mut conn = pool.get().map_err(|error| format!("get: {error}"))?;
        B::echo(&mut conn, "worker").map(drop)
    })
}

/// A pool like a pre-forking server's master builds: `POOL_SIZE` connections, all opened now.
pub fn warm_pool<B: Backend>() -> Result<Pool<B>, String> {
    warm_pool_at(&B::url())
}

pub fn warm_pool_at<B: Backend>(url: &str) -> Result<Pool<B>, String> {
    Pool::builder()
        .max_size(POOL_SIZE)
        .min_idle(Some(POOL_SIZE))
        .connection_timeout(Duration::from_secs(10))
        .build(B::manager(url)?)
        .map_err(|error| format!("build: {error}"))
}

/// Checks out every connection of the pool at once and returns their server session ids.
pub fn session_ids<B: Backend>(pool: &Pool<B>) -> Result<BTreeSet<i64>, String> {
    let mut conns = (0..pool.max_size())
        .map(|_| pool.get_timeout(Duration::from_secs(10)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("get: {error}"))?;
    let me = std::process::id();
    let ids = conns
        .iter_mut()
        .enumerate()
        .map(|(n, conn)| {
            B::check_warm(conn)?;
            B::echo(conn, &format!("ids-{me}-{n}"))
        })
        .collect::<Result<BTreeSet<i64>, String>>()?;
    // Connections held at once are sessions of their own on a server.
    ensure!(
        !B::SERVER_SESSIONS || ids.len() == conns.len(),
        "{} connections held at once share sessions: {ids:?}",
        conns.len()
    );
    Ok(ids)
}

/// In the master after its children: the same server sessions, all working.
pub fn check_master_intact<B: Backend>(pool: &Pool<B>, before: &BTreeSet<i64>) -> Check {
    let after = session_ids(pool)?;
    ensure!(
        &after == before,
        "the master's sessions changed: {before:?} -> {after:?}"
    );
    ensure!(
        pool.fork_stats() == ForkStats::default(),
        "the master's fork stats changed: {:?}",
        pool.fork_stats()
    );
    Ok(())
}

/// In a child: `requests` checked requests, none answered by one of `foreign` sessions; returns
/// the sessions that answered.
pub fn run_requests<B: Backend>(
    pool: &Pool<B>,
    requests: usize,
    foreign: &BTreeSet<i64>,
) -> Result<BTreeSet<i64>, String> {
    let me = std::process::id();
    let mut own = BTreeSet::new();
    for request in 0..requests {
        let mut conn = pool
            .get()
            .map_err(|error| format!("request {request}: get: {error}"))?;
        let value = format!("worker-{me}-request-{request}");
        let session = B::request(&mut conn, request, &value)
            .map_err(|e| format!("request {request}: {e}"))?;
        ensure!(
            !foreign.contains(&session),
            "request {request} was answered by the master's session {session}"
        );
        own.insert(session);
    }
    Ok(own)
}

/// In a child that found `inherited` connections: every one discarded, its socket released
/// (or, for a backend that may leave some open, released or counted as leaked).
pub fn check_released<B: Backend>(pool: &Pool<B>, inherited: u64, leased: u64) -> Check {
    let stats = pool.fork_stats();
    if !B::RELEASES_EVERY_CONNECTION {
        ensure!(
            stats.forks_crossed == 1
                && stats.connections_discarded == inherited
                && stats.sockets_released + stats.connections_leaked == inherited
                && stats.leased_across_fork == leased,
            "expected {inherited} inherited connections discarded, each released or counted as leaked ({leased} leased), got {stats:?}"
        );
        return Ok(());
    }
    ensure!(
        stats.forks_crossed == 1
            && stats.connections_discarded == inherited
            && stats.sockets_released == inherited
            && stats.connections_leaked == 0
            && stats.leased_across_fork == leased,
        "expected {inherited} inherited connections discarded with their sockets released ({leased} leased), got {stats:?}"
    );
    Ok(())
}

/// Forks a child that runs `case`, and reaps it: it must exit 0 without an error, within
/// `DEADLINE`.
pub fn in_child(case: impl FnOnce() -> Check) -> Check {
    let (report, child_report) = datagram_pair()?;
    let pid = spawn_child(|| child_case(&child_report, case));
    expect_child_exit("child", pid, &report)
}

/// In a child: what the pool did with the connections it inherited.
pub fn expect_fork_stats(stats: &ForkStats, discarded: u64, released: u64, leaked: u64) -> Check {
    ensure!(
        stats.connections_discarded == discarded
            && stats.sockets_released == released
            && stats.connections_leaked == leaked,
        "expected {discarded} connections discarded, {released} sockets released, {leaked} \
         leaked: {stats:?}"
    );
    Ok(())
}

/// Runs `case` in a forked child; its error, if any, comes back over `report`.
pub fn child_case(report: &UnixDatagram, case: impl FnOnce() -> Check) -> i32 {
    match case() {
        Ok(()) => 0,
        Err(message) => {
            let _ = report.send(format!("[child {}] {message}", std::process::id()).as_bytes());
            1
        }
    }
}

/// Every message the children sent, without waiting.
fn reports(report: &UnixDatagram) -> Vec<String> {
    let _ = report.set_nonblocking(true);
    let mut buf = vec![0; 64 * 1024];
    let mut messages = Vec::new();
    while let Ok(len) = report.recv(&mut buf) {
        messages.push(String::from_utf8_lossy(&buf[..len]).into_owned());
    }
    messages
}

/// Every child ended as `expected` says for its name, and none reported an error.
pub fn expect_exits(
    children: Vec<(String, Pid, ChildEnd)>,
    expected: impl Fn(&str) -> ChildEnd,
    report: &UnixDatagram,
) -> Check {
    let wrong: Vec<String> = children
        .into_iter()
        .filter(|(name, _, end)| *end != expected(name))
        .map(|(name, pid, end)| format!("{name} ({pid}) ended {end:?}"))
        .collect();
    let messages = reports(report);
    ensure!(
        wrong.is_empty() && messages.is_empty(),
        "children: {wrong:?}; their errors: {messages:?}"
    );
    Ok(())
}

/// Reaps every child of `pids` (named "worker N") and checks they exited 0 without errors.
pub fn expect_workers_exit(pids: Vec<Pid>, report: &UnixDatagram) -> Check {
    let ends = pids
        .into_iter()
        .enumerate()
        .map(|(n, pid)| (format!("worker {n}"), pid, reap(pid, DEADLINE)))
        .collect();
    expect_exits(ends, |_| ChildEnd::Exited(0), report)
}

/// Reaps the child `pid` (named `name`) and checks it exited 0 without errors.
pub fn expect_child_exit(name: &str, pid: Pid, report: &UnixDatagram) -> Check {
    let ends = vec![(name.to_string(), pid, reap(pid, DEADLINE))];
    expect_exits(ends, |_| ChildEnd::Exited(0), report)
}

/// A socket pair: the parent's end and the children's.
pub fn datagram_pair() -> Result<(UnixDatagram, UnixDatagram), String> {
    UnixDatagram::pair().map_err(|error| error.to_string())
}

/// A pre-forking server: a warm master pool, 4 forked workers with 300 checked requests each.
pub fn four_workers_get_their_own_answers<B: Backend>() -> Check {
    let pool = warm_pool::<B>()?;
    let master = session_ids(&pool)?;
    ensure!(
        master.len() == POOL_SIZE as usize,
        "the master has {} sessions, expected {POOL_SIZE}",
        master.len()
    );
    let (report, child_report) = datagram_pair()?;
    let pids: Vec<Pid> = (0..WORKERS)
        .map(|_| {
            spawn_child(|| {
                child_case(&child_report, || {
                    let own = run_requests(&pool, REQUESTS, &master)?;
                    ensure!(
                        !own.is_empty() && own.len() <= POOL_SIZE as usize,
                        "answered by sessions {own:?}"
                    );
                    check_released(&pool, u64::from(POOL_SIZE), 0)
                })
            })
        })
        .collect();
    expect_workers_exit(pids, &report)?;
    check_master_intact(&pool, &master)
}

/// Forks taken while two master threads keep connecting and closing (each builds a pool of one
/// connection and drops it): a driver's C library may hold a process-global lock in either,
/// which a fork at that instant would leave held in the child, so forks wait for them. Every
/// child must connect and get its own answer; the master's pool keeps working.
pub fn forks_while_the_master_connects<B: Backend>() -> Check {
    let pool = warm_pool::<B>()?;
    let master = session_ids(&pool)?;
    fork_while_connecting(
        || B::manager(&B::url()),
        B::FORKS_WHILE_CONNECTING,
        DEADLINE,
        || match run_requests(&pool, 1, &master) {
            Ok(_) => 0,
            Err(message) => {
                eprintln!("fork child {}: {message}", std::process::id());
                1
            }
        },
    )?;
    check_master_intact(&pool, &master)
}

/// A connection checked out when the master forks: the child drops it (discarded, never
/// returned), works on its own connections; the master keeps using it.
pub fn a_connection_leased_across_fork<B: Backend>() -> Check {
    let pool = warm_pool::<B>()?;
    let master = session_ids(&pool)?;
    let mut leased = Some(pool.get().map_err(|error| format!("get: {error}"))?);
    let leased_session = B::echo(leased.as_mut().unwrap(), "before fork")?;
    in_child(|| {
        drop(leased.take());
        run_requests(&pool, 50, &master)?;
        check_released(&pool, u64::from(POOL_SIZE), 1)
    })?;
    let mut leased = leased.ok_or("the master lost its leased connection")?;
    for round in 0..20 {
        ensure!(
            B::echo(&mut leased, &format!("after fork {round}"))? == leased_session,
            "the leased connection changed session"
        );
    }
    drop(leased);
    check_master_intact(&pool, &master)
}

/// Children that end every way a worker ends; the master's sessions outlive them all.
pub fn children_end_by_return_exit_and_sigkill<B: Backend>() -> Check {
    // The master's only handle, so a child that takes and drops it drops the whole pool.
    let mut owned = Some(warm_pool::<B>()?);
    let master = session_ids(owned.as_ref().unwrap())?;
    let (report, child_report) = datagram_pair()?;
    let mut ends = Vec::new();
    for way in [
        "return, dropping its pool",
        "return, dropping its pool unused",
        "exit, holding a connection of a full pool",
        "SIGKILL, holding a connection",
    ] {
        let pid = spawn_child(|| {
            child_case(&child_report, || {
                let pool = owned.take().ok_or("no pool")?;
                if way != "return, dropping its pool unused" {
                    run_requests(&pool, 20, &master)?;
                }
                match way {
                    // Full first: a driver's exit handlers may crash a process whose threads
                    // are still connecting (OpenSSL's do during a TLS handshake), and a
                    // forked child's pool connects only when asked to.
                    "exit, holding a connection of a full pool" => {
                        pool.warm_up()
                            .map_err(|error| format!("warm_up: {error}"))?;
                        let _held = pool.get().map_err(|error| format!("get: {error}"))?;
                        std::process::exit(0)
                    }
                    "SIGKILL, holding a connection" => {
                        let _held = pool.get().map_err(|error| format!("get: {error}"))?;
                        let _ = raise(Signal::SIGKILL);
                        Err(String::from("still alive after SIGKILL"))
                    }
                    _ => {
                        drop(pool);
                        Ok(())
                    }
                }
            })
        });
        ends.push((way.to_string(), pid, reap(pid, DEADLINE)));
        // After each child, not only after all of them.
        let pool = owned.as_ref().ok_or("the master lost its pool")?;
        check_master_intact(pool, &master)
            .map_err(|error| format!("after a child's {way}: {error}"))?;
    }
    let expected = |way: &str| {
        if way.starts_with("SIGKILL") {
            ChildEnd::Signaled(Signal::SIGKILL)
        } else {
            ChildEnd::Exited(0)
        }
    };
    expect_exits(ends, expected, &report)
}

/// Sends one line over a datagram socket.
/// A forked process's exit code for `result`; a failure is first told to the test as
/// "error {who} {pid}: {message}" (the test reads why, not only that it failed).
fn exit_code_telling(to_test: &UnixDatagram, who: &str, result: Check) -> i32 {
    match result {
        Ok(()) => 0,
        Err(message) => {
            let _ = send(
                to_test,
                format!("error {who} {}: {message}", std::process::id()),
            );
            1
        }
    }
}

pub fn send(socket: &UnixDatagram, message: String) -> Check {
    socket
        .send(message.as_bytes())
        .map(drop)
        .map_err(|error| format!("send: {error}"))
}

pub fn receive(socket: &UnixDatagram, timeout: Duration) -> Result<String, String> {
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|error| error.to_string())?;
    let mut buf = vec![0; 64 * 1024];
    let len = socket
        .recv(&mut buf)
        .map_err(|error| format!("no message within {timeout:?}: {error}"))?;
    Ok(String::from_utf8_lossy(&buf[..len]).into_owned())
}

fn parse_ids(words: &[&str]) -> BTreeSet<i64> {
    words.iter().filter_map(|word| word.parse().ok()).collect()
}

fn join(ids: &BTreeSet<i64>) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(" ")
}

/// Kills, then reaps, every process it holds unless told they are done with.
pub struct KillOnDrop(pub Vec<Pid>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = reap(pid, Duration::from_secs(5));
        }
    }
}

/// The master (a forked child of this test) warms its pool and forks 2 workers that use their
/// own pools and stay alive; the master is SIGKILLed. Its sessions must be gone within 2 s —
/// the workers released their copies of its sockets — while the workers' sessions keep working.
/// (The test process must be a child subreaper, to reap the orphaned workers.)
pub fn master_sigkill_leaves_no_sessions_behind<B: Backend>() -> Check {
    let (to_test, from_master) = datagram_pair()?;
    let (go_sender, go_receiver) = datagram_pair()?;
    let master_pid = spawn_child(|| {
        let run = || -> Check {
            let pool = warm_pool::<B>()?;
            let ids = session_ids(&pool)?;
            send(&to_test, format!("master {}", join(&ids)))?;
            for _ in 0..2 {
                let (pool, ids, to_test, go) = (&pool, &ids, &to_test, &go_receiver);
                spawn_child(move || {
                    let run = || -> Check {
                        let own = session_ids(pool)?;
                        ensure!(
                            own.is_disjoint(ids),
                            "a worker got the master's sessions: {own:?}"
                        );
                        send(
                            to_test,
                            format!("worker {} {}", std::process::id(), join(&own)),
                        )?;
                        receive(go, DEADLINE)?;
                        let answered = run_requests(pool, 50, ids)?;
                        ensure!(
                            answered.is_subset(&own),
                            "worker sessions changed: {own:?} -> {answered:?}"
                        );
                        // Checked last, so the master's sessions are checked on the server first.
                        check_released(pool, u64::from(POOL_SIZE), 0)?;
                        send(to_test, format!("done {}", std::process::id()))
                    };
                    exit_code_telling(to_test, "worker", run())
                });
            }
            // Stay alive with the pool until killed (bounded, so a broken test leaves nothing).
            std::thread::sleep(DEADLINE * 2);
            Err(String::from("the master was never killed"))
        };
        exit_code_telling(&to_test, "master", run())
    });
    let mut cleanup = KillOnDrop(vec![master_pid]);
    let mut master_ids = BTreeSet::new();
    let mut workers = Vec::new();
    while master_ids.is_empty() || workers.len() < 2 {
        let message = receive(&from_master, DEADLINE)?;
        let words: Vec<&str> = message.split_whitespace().collect();
        match words.as_slice() {
            ["master", ids @ ..] => master_ids = parse_ids(ids),
            ["worker", pid, ids @ ..] => {
                let pid = Pid::from_raw(
                    pid.parse()
                        .map_err(|_| format!("bad message {message:?}"))?,
                );
                cleanup.0.push(pid);
                workers.push((pid, parse_ids(ids)));
            }
            _ => return Err(message),
        }
    }
    ensure!(
        master_ids.len() == POOL_SIZE as usize,
        "the master reported sessions {master_ids:?}"
    );
    let mut observer = B::observer()?;
    let live = B::live_sessions(&mut observer)?;
    ensure!(
        master_ids.is_subset(&live),
        "the master's sessions {master_ids:?} are not all live: {live:?}"
    );

    kill(master_pid, Signal::SIGKILL).map_err(|error| format!("kill master: {error}"))?;
    let killed_at = Instant::now();
    let end = reap(master_pid, DEADLINE);
    ensure!(
        end == ChildEnd::Signaled(Signal::SIGKILL),
        "the master ended {end:?}"
    );
    cleanup.0.retain(|&pid| pid != master_pid);
    let mut left = master_ids.clone();
    while !left.is_empty() && killed_at.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
        left = B::live_sessions(&mut observer)?
            .intersection(&master_ids)
            .copied()
            .collect();
    }
    ensure!(
        left.is_empty(),
        "2 s after the master's SIGKILL its sessions {left:?} are still open"
    );
    let live = B::live_sessions(&mut observer)?;
    for (pid, own) in &workers {
        ensure!(
            own.is_subset(&live),
            "worker {pid}'s sessions {own:?} are gone: {live:?}"
        );
    }

    for _ in &workers {
        send(&go_sender, String::from("go"))?;
    }
    let mut done = 0;
    while done < workers.len() {
        let message = receive(&from_master, DEADLINE)?;
        ensure!(message.starts_with("done "), "{message}");
        done += 1;
    }
    let mut worker_ids = BTreeSet::new();
    for (pid, own) in std::mem::take(&mut workers) {
        cleanup.0.retain(|&p| p != pid);
        let end = reap(pid, DEADLINE);
        ensure!(end == ChildEnd::Exited(0), "worker {pid} ended {end:?}");
        worker_ids.extend(own);
    }
    let exited_at = Instant::now();
    let mut left = worker_ids.clone();
    while !left.is_empty() && exited_at.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
        left = B::live_sessions(&mut observer)?
            .intersection(&worker_ids)
            .copied()
            .collect();
    }
    ensure!(
        left.is_empty(),
        "2 s after the workers exited their sessions {left:?} are still open"
    );
    Ok(())
}

/// Bad configuration fails fast with r2d2's error and the cause, never hangs: in the process
/// that built the pool, and in a forked child that rebuilds it. Each case is what is wrong, the
/// URL, and what the error must say; `cases` makes them given the port of a server that never
/// answers.
pub fn bad_input_fails_within_connection_timeout<B: Backend>(
    cases: impl FnOnce(u16) -> Vec<(&'static str, String, &'static str)>,
) -> Check {
    // Completes TCP handshakes (the kernel does) but never answers: connects block.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").map_err(|error| error.to_string())?;
    let silent_port = silent
        .local_addr()
        .map_err(|error| error.to_string())?
        .port();
    // Long enough for a first connection attempt to fail even on a loaded machine (r2d2 names the
    // cause only when an attempt has failed by then); a hang would still show.
    let timeout = Duration::from_millis(1500);
    for (what, url, cause) in cases(silent_port) {
        let builder = || Pool::builder().max_size(2).connection_timeout(timeout);
        let started = Instant::now();
        let error = match builder().build(B::manager(&url)?) {
            Ok(_) => return Err(format!("{what}: build succeeded")),
            Err(error) => error.to_string(),
        };
        ensure!(
            started.elapsed() < timeout + B::SLACK,
            "{what}: build took {:?}",
            started.elapsed()
        );
        ensure!(
            error.contains(cause),
            "{what}: build error {error:?} does not say {cause:?}"
        );

        let pool = builder().build_unchecked(B::manager(&url)?);
        let started = Instant::now();
        let error = pool
            .get()
            .err()
            .ok_or(format!("{what}: get succeeded"))?
            .to_string();
        ensure!(
            started.elapsed() < timeout + B::SLACK,
            "{what}: get took {:?}",
            started.elapsed()
        );
        ensure!(
            error.contains("timed out waiting for connection") && error.contains(cause),
            "{what}: get error {error:?} is not r2d2's or does not say {cause:?}"
        );

        let (report, child_report) = datagram_pair()?;
        let pid = spawn_child(|| {
            child_case(&child_report, || {
                let started = Instant::now();
                let error = pool.get().err().ok_or("get succeeded")?.to_string();
                ensure!(
                    started.elapsed() < timeout + B::SLACK,
                    "get took {:?}",
                    started.elapsed()
                );
                ensure!(
                    error.contains("timed out waiting for connection")
                        && error.contains(cause)
                        && error.contains("rebuilt after fork()"),
                    "get error {error:?} does not say {cause:?} and that the pool was rebuilt after fork()"
                );
                Ok(())
            })
        });
        expect_child_exit(what, pid, &report)?;
    }
    Ok(())
}

/// The descriptor numbers of process `pid` open on the file at `path` (its `/proc/PID/fd`
/// links that lead to the file's device and inode).
pub fn file_links(pid: u32, path: &std::path::Path) -> Result<BTreeSet<i32>, String> {
    use std::os::unix::fs::MetadataExt;
    let file = std::fs::metadata(path).map_err(|error| format!("{path:?}: {error}"))?;
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|error| format!("{dir}: {error}"))?;
    Ok(entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let target = std::fs::metadata(entry.path()).ok()?;
            ((target.dev(), target.ino()) == (file.dev(), file.ino()))
                .then(|| entry.file_name().to_str()?.parse().ok())?
        })
        .collect())
}

/// An embedded database's file under a SIGKILLed master: the master (a forked child of this
/// test) builds a warm pool of `POOL_SIZE` connections on `path` with `build`, and forks 2
/// workers that each run `work` on a connection of their own and stay alive; the master is
/// SIGKILLed. Then, seen from here through `/proc/PID/fd`, no worker has the file open under
/// any of the master's descriptor numbers (every inherited descriptor was released), and each
/// worker's descriptors of the file are exactly those it reported as its own. (The test
/// process must be a child subreaper, to reap the orphaned workers.)
pub fn master_sigkill_leaves_workers_no_inherited_file<M: ManageConnection>(
    path: &std::path::Path,
    build: impl FnOnce() -> Result<Pool<M>, String>,
    work: fn(&mut PooledConnection<M>) -> Check,
) -> Check {
    let (to_test, from_master) = datagram_pair()?;
    let (go_sender, go_receiver) = datagram_pair()?;
    let numbers =
        |set: &BTreeSet<i32>| set.iter().map(i32::to_string).collect::<Vec<_>>().join(" ");
    let master_pid = spawn_child(|| {
        let run = || -> Check {
            let pool = build()?;
            let held = (0..POOL_SIZE)
                .map(|_| pool.get_timeout(Duration::from_secs(10)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| format!("master get: {error}"))?;
            drop(held);
            let own = file_links(std::process::id(), path)?;
            send(&to_test, format!("master {}", numbers(&own)))?;
            for _ in 0..2 {
                let (pool, to_test, go) = (&pool, &to_test, &go_receiver);
                spawn_child(move || {
                    let run = || -> Check {
                        // The worker's pool keeps `min_idle` in the background from its first
                        // use: once it is reached, no descriptor of the file appears any more.
                        pool.warm_up()
                            .map_err(|error| format!("warm_up: {error}"))?;
                        let mut conn = pool.get().map_err(|error| format!("get: {error}"))?;
                        work(&mut conn)?;
                        let own = file_links(std::process::id(), path)?;
                        send(
                            to_test,
                            format!("worker {} {}", std::process::id(), numbers(&own)),
                        )?;
                        receive(go, DEADLINE)?;
                        work(&mut conn)
                    };
                    exit_code_telling(to_test, "worker", run())
                });
            }
            // Stay alive with the pool until killed (bounded, so a broken test leaves nothing).
            std::thread::sleep(DEADLINE * 2);
            Err(String::from("the master was never killed"))
        };
        exit_code_telling(&to_test, "master", run())
    });
    let mut cleanup = KillOnDrop(vec![master_pid]);
    let parse = |words: &[&str]| -> BTreeSet<i32> {
        words.iter().filter_map(|word| word.parse().ok()).collect()
    };
    let mut master_fds = None;
    let mut workers = Vec::new();
    while master_fds.is_none() || workers.len() < 2 {
        let message = receive(&from_master, DEADLINE)?;
        let words: Vec<&str> = message.split_whitespace().collect();
        match words.as_slice() {
            ["master", fds @ ..] => master_fds = Some(parse(fds)),
            ["worker", pid, fds @ ..] => {
                let pid: i32 = pid
                    .parse()
                    .map_err(|_| format!("bad message {message:?}"))?;
                cleanup.0.push(Pid::from_raw(pid));
                workers.push((pid, parse(fds)));
            }
            _ => return Err(message),
        }
    }
    let master_fds = master_fds.unwrap_or_default();
    ensure!(
        master_fds.len() == POOL_SIZE as usize,
        "the master's pool of {POOL_SIZE} has descriptors {master_fds:?} on the file"
    );

    kill(master_pid, Signal::SIGKILL).map_err(|error| format!("kill master: {error}"))?;
    let end = reap(master_pid, DEADLINE);
    ensure!(
        end == ChildEnd::Signaled(Signal::SIGKILL),
        "the master ended {end:?}"
    );
    cleanup.0.retain(|&pid| pid != master_pid);
    for (pid, own) in &workers {
        let links = file_links(*pid as u32, path)?;
        let inherited: BTreeSet<i32> = links.intersection(&master_fds).copied().collect();
        ensure!(
            inherited.is_empty(),
            "worker {pid} keeps the master's descriptors {inherited:?} of the file open \
             (its links to the file: {links:?}; the master's were {master_fds:?})"
        );
        ensure!(
            links == *own,
            "worker {pid}'s descriptors of the file are {links:?}, its own are {own:?}"
        );
    }

    for _ in &workers {
        send(&go_sender, String::from("go"))?;
    }
    for (pid, _) in std::mem::take(&mut workers) {
        let pid = Pid::from_raw(pid);
        cleanup.0.retain(|&p| p != pid);
        let end = reap(pid, DEADLINE);
        ensure!(end == ChildEnd::Exited(0), "worker {pid} ended {end:?}");
    }
    let _ = from_master.set_nonblocking(true);
    let mut buf = [0; 4096];
    if let Ok(len) = from_master.recv(&mut buf) {
        return Err(String::from_utf8_lossy(&buf[..len]).into_owned());
    }
    Ok(())
}
