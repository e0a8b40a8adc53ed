//! Shared by the integration tests: a fake database server and manager that record which
//! process wrote what on which connection, a fork helper that never hangs the suite, the case
//! runner of the `harness = false` binaries (`runner`) and the scenarios every server backend
//! runs (`backend`). `#[macro_use] mod support;` brings in `ensure!`.
#![allow(dead_code)]

/// Fails the enclosing check with a formatted message unless `$cond` holds.
#[allow(unused_macros)]
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

pub mod backend;
pub mod runner;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

/// One line a fake connection wrote: the writer's pid and the operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub pid: u32,
    pub op: String,
}

/// A fake server on a Unix socket. Every connection it accepts gets a number; it records every
/// line written on every connection, whichever process wrote it.
pub struct FakeServer {
    pub path: PathBuf,
    lines: Arc<Mutex<HashMap<u64, Vec<Line>>>>,
    closed: Arc<Mutex<Vec<u64>>>,
}

impl FakeServer {
    pub fn start() -> FakeServer {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "forksafe-fake-{}-{}.sock",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind fake server");
        let lines: Arc<Mutex<HashMap<u64, Vec<Line>>>> = Arc::default();
        let closed: Arc<Mutex<Vec<u64>>> = Arc::default();
        let (lines2, closed2) = (Arc::clone(&lines), Arc::clone(&closed));
        let server_pid = std::process::id();
        std::thread::spawn(move || {
            for (id, stream) in listener.incoming().enumerate() {
                // A forked child has no copy of this thread; only the test process serves.
                if std::process::id() != server_pid {
                    return;
                }
                let Ok(stream) = stream else { return };
                let (lines, closed) = (Arc::clone(&lines2), Arc::clone(&closed2));
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut writer = stream;
                    let mut buf = String::new();
                    loop {
                        buf.clear();
                        match reader.read_line(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {
                                let (pid, op) = buf.trim_end().split_once(' ').unwrap_or(("0", ""));
                                let line = Line {
                                    pid: pid.parse().unwrap_or(0),
                                    op: op.to_string(),
                                };
                                let reply = format!("{} {}\n", id, line.op);
                                lines
                                    .lock()
                                    .unwrap()
                                    .entry(id as u64)
                                    .or_default()
                                    .push(line);
                                if writer.write_all(reply.as_bytes()).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    closed.lock().unwrap().push(id as u64);
                });
            }
        });
        FakeServer {
            path,
            lines,
            closed,
        }
    }

    pub fn manager(&self) -> FakeManager {
        FakeManager {
            path: self.path.clone(),
            connects: Arc::default(),
        }
    }

    /// Every line, by connection number.
    pub fn lines(&self) -> HashMap<u64, Vec<Line>> {
        self.lines.lock().unwrap().clone()
    }

    /// Connections whose client end is closed in every process.
    pub fn closed(&self) -> Vec<u64> {
        self.closed.lock().unwrap().clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A manager whose connections talk to a [`FakeServer`].
#[derive(Clone, Debug)]
pub struct FakeManager {
    path: PathBuf,
    pub connects: Arc<AtomicU64>,
}

/// A fake connection: remembers who opened it, writes "<pid> <op>" for every operation and
/// "<pid> goodbye" when dropped, like a driver's Terminate.
#[derive(Debug)]
pub struct FakeConnection {
    pub opened_by: u32,
    pub server_id: u64,
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl FakeConnection {
    /// Sends `op` and returns the server's echo: "<connection number> <op>".
    pub fn query(&mut self, op: &str) -> std::io::Result<String> {
        writeln!(self.stream, "{} {}", std::process::id(), op)?;
        let mut reply = String::new();
        self.reader.read_line(&mut reply)?;
        Ok(reply.trim_end().to_string())
    }

    /// Sends `value` and checks the server's echo is exactly "<its connection number> <value>".
    pub fn echo(&mut self, value: &str) -> Result<(), String> {
        let reply = self
            .query(value)
            .map_err(|error| format!("query {value:?}: {error}"))?;
        ensure!(
            reply == format!("{} {value}", self.server_id),
            "asked {value}, got {reply}"
        );
        Ok(())
    }

    /// Checks `who` (say "child") got a connection of its own: opened by this process, and none
    /// of `others` (`whose`, say "the parent's").
    pub fn check_own(&self, who: &str, others: &BTreeSet<u64>, whose: &str) -> Result<(), String> {
        ensure!(
            self.opened_by == std::process::id(),
            "{who} got a connection opened by {}",
            self.opened_by
        );
        ensure!(
            !others.contains(&self.server_id),
            "{who} got {whose} connection {}",
            self.server_id
        );
        Ok(())
    }

    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

impl Drop for FakeConnection {
    fn drop(&mut self) {
        let _ = writeln!(self.stream, "{} goodbye", std::process::id());
    }
}

impl r2d2::ManageConnection for FakeManager {
    type Connection = FakeConnection;
    type Error = std::io::Error;

    fn connect(&self) -> std::io::Result<FakeConnection> {
        self.connects.fetch_add(1, Ordering::Relaxed);
        let stream = UnixStream::connect(&self.path)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let reader = BufReader::new(stream.try_clone()?);
        let mut conn = FakeConnection {
            opened_by: std::process::id(),
            server_id: u64::MAX,
            stream,
            reader,
        };
        let reply = conn.query("hello")?;
        conn.server_id = reply
            .split(' ')
            .next()
            .and_then(|id| id.parse().ok())
            .unwrap_or(u64::MAX);
        Ok(conn)
    }

    fn is_valid(&self, conn: &mut FakeConnection) -> std::io::Result<()> {
        conn.query("ping").map(drop)
    }

    fn has_broken(&self, _: &mut FakeConnection) -> bool {
        false
    }
}

/// A manager whose connections do no I/O and count themselves: [`live`](Self::live) is how
/// many exist right now in this process, so a test sees every connection a pool still holds,
/// idle, leased or parked anywhere.
#[derive(Clone, Debug, Default)]
pub struct CountingManager {
    live: Arc<AtomicU64>,
}

/// A connection of a [`CountingManager`]; dropping it closes it.
#[derive(Debug)]
pub struct CountedConnection(Arc<AtomicU64>);

impl CountingManager {
    /// Connections opened and not yet dropped.
    pub fn live(&self) -> u64 {
        self.live.load(Ordering::SeqCst)
    }

    /// Waits until no connection is open, at most `timeout`; the number still open otherwise.
    pub fn all_closed_within(&self, timeout: Duration) -> Result<(), u64> {
        let until = Instant::now() + timeout;
        loop {
            match self.live() {
                0 => return Ok(()),
                live if Instant::now() >= until => return Err(live),
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}

impl Drop for CountedConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl r2d2::ManageConnection for CountingManager {
    type Connection = CountedConnection;
    type Error = std::io::Error;

    fn connect(&self) -> std::io::Result<CountedConnection> {
        self.live.fetch_add(1, Ordering::SeqCst);
        Ok(CountedConnection(Arc::clone(&self.live)))
    }

    fn is_valid(&self, _: &mut CountedConnection) -> std::io::Result<()> {
        Ok(())
    }

    fn has_broken(&self, _: &mut CountedConnection) -> bool {
        false
    }
}

/// This process's resident set size in bytes, from `/proc/self/statm`.
pub fn resident_bytes() -> Result<u64, String> {
    let statm = std::fs::read_to_string("/proc/self/statm")
        .map_err(|error| format!("/proc/self/statm: {error}"))?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .ok_or(format!("unexpected /proc/self/statm: {statm:?}"))?;
    // SAFETY: `sysconf` only reads a system constant.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    ensure!(page_size > 0, "sysconf(_SC_PAGESIZE) failed");
    Ok(pages * page_size as u64)
}

/// A pool of fake connections whose descriptors are known to the pool.
pub fn fake_pool(manager: FakeManager, size: u32) -> forksafe_pool::Pool<FakeManager> {
    forksafe_pool::Pool::builder()
        .max_size(size)
        .min_idle(Some(size))
        .connection_timeout(Duration::from_secs(5))
        .descriptor_locator(|conn: &mut FakeConnection| Some(vec![conn.fd()]))
        .build(manager)
        .expect("fake pool")
}

/// Checks out `n` connections of a fake pool at once and returns them: their server numbers
/// and fds.
pub fn warm_connections(
    pool: &forksafe_pool::Pool<FakeManager>,
    n: u32,
) -> Result<(BTreeSet<u64>, Vec<RawFd>), String> {
    let conns: Vec<_> = (0..n)
        .map(|_| pool.get().map_err(|error| format!("warm get: {error}")))
        .collect::<Result<_, _>>()?;
    Ok((
        conns.iter().map(|conn| conn.server_id).collect(),
        conns.iter().map(|conn| conn.fd()).collect(),
    ))
}

/// Nobody but this process wrote on the connections in `ids` of `server` (each of which the
/// server has seen).
pub fn only_we_wrote_on(server: &FakeServer, ids: &BTreeSet<u64>) -> Result<(), String> {
    let me = std::process::id();
    let lines = server.lines();
    for id in ids {
        let lines = lines
            .get(id)
            .ok_or(format!("the server never saw connection {id}"))?;
        let foreign: Vec<_> = lines.iter().filter(|line| line.pid != me).collect();
        ensure!(
            foreign.is_empty(),
            "another process wrote on connection {id}: {foreign:?}"
        );
    }
    Ok(())
}

/// In a child whose pool must refuse it a connection: `get` fails at once (within 1 s) with an
/// error naming every one of `needles`.
pub fn refused_at_once<C, E>(
    get: impl FnOnce() -> Result<C, E>,
    needles: &[&str],
) -> Result<(), String>
where
    C: std::ops::Deref<Target = FakeConnection>,
    E: std::fmt::Display,
{
    let started = Instant::now();
    let error = match get() {
        Ok(conn) => {
            return Err(format!(
                "child got a connection opened by {}",
                conn.opened_by
            ))
        }
        Err(error) => error.to_string(),
    };
    ensure!(
        started.elapsed() < Duration::from_secs(1),
        "the error took {:?}",
        started.elapsed()
    );
    for needle in needles {
        ensure!(
            error.contains(needle),
            "error {error:?} does not mention {needle:?}"
        );
    }
    Ok(())
}

/// Whether `fd` is open on `/dev/null` (where a released inherited socket points).
pub fn points_at_dev_null(fd: RawFd) -> bool {
    let Ok(null) = std::fs::metadata("/dev/null") else {
        return false;
    };
    nix::sys::stat::fstat(fd)
        .is_ok_and(|stat| (stat.st_dev, stat.st_ino) == (null.dev(), null.ino()))
}

/// How a forked child ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ChildEnd {
    Exited(i32),
    Signaled(Signal),
    /// Still running at the deadline; it was killed.
    Hung,
}

/// Forks; the child runs `child` and `_exit`s with its return value (a panic is 101). The
/// parent gets the child's pid.
pub fn spawn_child(child: impl FnOnce() -> i32) -> Pid {
    // SAFETY: the child only runs test code and leaves with `_exit`, never returning into the
    // test harness.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(101);
            // SAFETY: `_exit` is async-signal-safe and ends the process at once.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => child,
    }
}

/// Waits for `pid` until `deadline`; kills it and reports [`ChildEnd::Hung`] after that.
pub fn reap(pid: Pid, deadline: Duration) -> ChildEnd {
    let until = Instant::now() + deadline;
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)).expect("waitpid") {
            WaitStatus::Exited(_, code) => return ChildEnd::Exited(code),
            WaitStatus::Signaled(_, signal, _) => return ChildEnd::Signaled(signal),
            _ if Instant::now() >= until => {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                return ChildEnd::Hung;
            }
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Forks, runs `child` there, and reaps it within `deadline`.
pub fn run_child(deadline: Duration, child: impl FnOnce() -> i32) -> ChildEnd {
    reap(spawn_child(child), deadline)
}

/// Forks `forks` children, one after another, while two master threads keep building a pool of
/// one connection with `manager` and dropping it — a connect and a close each time. Each child
/// runs `child` and exits with its result; every one must exit 0 within `deadline`, and the
/// master must have connected throughout (at least one connect per two forks).
pub fn fork_while_connecting<M: r2d2::ManageConnection>(
    manager: impl Fn() -> Result<M, String> + Send + Sync + 'static,
    forks: usize,
    deadline: Duration,
    child: impl Fn() -> i32,
) -> Result<(), String> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // One thread pool for every connector pool: a pool of its own each would start and stop
    // three threads per connect, thousands a second with a fast server.
    let shared = Arc::new(scheduled_thread_pool::ScheduledThreadPool::new(2));
    let manager = Arc::new(manager);
    let connectors: Vec<std::thread::JoinHandle<Result<u64, String>>> = (0..2)
        .map(|_| {
            let (stop, shared, manager) =
                (Arc::clone(&stop), Arc::clone(&shared), Arc::clone(&manager));
            std::thread::spawn(move || {
                let mut connects = 0;
                while !stop.load(Ordering::Relaxed) {
                    let one = forksafe_pool::Pool::builder()
                        .max_size(1)
                        .min_idle(Some(1))
                        .connection_timeout(Duration::from_secs(10))
                        .thread_pool(Arc::clone(&shared))
                        .build(manager()?)
                        .map_err(|error| format!("connector pool: {error}"))?;
                    drop(one);
                    connects += 1;
                }
                Ok(connects)
            })
        })
        .collect();
    let failures: Vec<String> = (0..forks)
        .filter_map(|fork| match run_child(deadline, &child) {
            ChildEnd::Exited(0) => None,
            end => Some(format!("fork {fork}: {end:?}")),
        })
        .collect();
    stop.store(true, Ordering::Relaxed);
    let mut connects = 0;
    for connector in connectors {
        connects += connector
            .join()
            .map_err(|_| "a connecting thread panicked".to_string())??;
    }
    ensure!(
        failures.is_empty(),
        "{} of {forks} children failed or hung: {failures:?}",
        failures.len()
    );
    // Evidence the forks raced with connects.
    ensure!(
        connects >= forks as u64 / 2,
        "only {connects} connects in the master during {forks} forks"
    );
    Ok(())
}

/// Counts the pool events r2d2 reports. Clones share the counts: a test hands one to
/// `Builder::event_handler` and reads them through another.
#[derive(Clone, Debug, Default)]
pub struct EventCounts(Arc<[AtomicU64; 4]>);

impl EventCounts {
    const ACQUIRE: usize = 0;
    const CHECKOUT: usize = 1;
    const CHECKIN: usize = 2;
    const TIMEOUT: usize = 3;

    fn count(&self, event: usize) {
        self.0[event].fetch_add(1, Ordering::SeqCst);
    }

    /// Acquires, checkouts, checkins and timeouts so far.
    pub fn seen(&self) -> [u64; 4] {
        std::array::from_fn(|event| self.0[event].load(Ordering::SeqCst))
    }

    pub fn checkouts(&self) -> u64 {
        self.seen()[Self::CHECKOUT]
    }
}

impl r2d2::HandleEvent for EventCounts {
    fn handle_acquire(&self, _: r2d2::event::AcquireEvent) {
        self.count(Self::ACQUIRE);
    }
    fn handle_checkout(&self, _: r2d2::event::CheckoutEvent) {
        self.count(Self::CHECKOUT);
    }
    fn handle_checkin(&self, _: r2d2::event::CheckinEvent) {
        self.count(Self::CHECKIN);
    }
    fn handle_timeout(&self, _: r2d2::event::TimeoutEvent) {
        self.count(Self::TIMEOUT);
    }
}

/// The message of a [`ScriptedManager`]'s panics.
pub const SCRIPTED_PANIC: &str = "the driver panicked while connecting";

/// Keeps the panic hook quiet about [`ScriptedManager`]'s panics (and only those). The default
/// hook prints a backtrace when `RUST_BACKTRACE` is set, and resolving its symbols can take
/// longer than the `connection_timeout` of a test that waits for the panicked attempt to end.
pub fn quiet_scripted_panics() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<String>().map(String::as_str) != Some(SCRIPTED_PANIC) {
                default(info);
            }
        }));
    });
}

/// Connections are numbers; fails or panics on as many of the next connects as it is told to,
/// then connects. Clones share the script and the counts.
#[derive(Clone, Debug, Default)]
pub struct ScriptedManager(Arc<Script>);

#[derive(Debug, Default)]
pub struct Script {
    /// How many of the next connects hang for `hang_micros`, then connect.
    pub hang_next: std::sync::atomic::AtomicU32,
    /// How long a hanging connect hangs, in microseconds.
    pub hang_micros: AtomicU64,
    /// How many of the next connects (after the hanging ones) fail with "no server yet".
    pub fail_next: std::sync::atomic::AtomicU32,
    /// How many of the next connects (after the failing ones) panic.
    pub panic_next: std::sync::atomic::AtomicU32,
    /// Connects attempted, whatever their outcome.
    pub attempts: std::sync::atomic::AtomicU32,
    /// Connections opened.
    pub opened: std::sync::atomic::AtomicU32,
    /// How long each connect takes, in microseconds.
    pub connect_micros: AtomicU64,
}

impl ScriptedManager {
    /// A manager whose first `failures` connects fail.
    pub fn failing_first(failures: u32) -> ScriptedManager {
        let manager = ScriptedManager::default();
        manager.0.fail_next.store(failures, Ordering::SeqCst);
        manager
    }

    /// A manager whose first `panics` connects panic.
    pub fn panicking_first(panics: u32) -> ScriptedManager {
        let manager = ScriptedManager::default();
        manager.0.panic_next.store(panics, Ordering::SeqCst);
        manager
    }

    /// Makes the next `count` connects hang for `time` (then connect).
    pub fn hanging_next(self, count: u32, time: Duration) -> ScriptedManager {
        self.0
            .hang_micros
            .store(time.as_micros() as u64, Ordering::SeqCst);
        self.0.hang_next.store(count, Ordering::SeqCst);
        self
    }

    /// Makes every connect take `time`.
    pub fn taking(self, time: Duration) -> ScriptedManager {
        self.0
            .connect_micros
            .store(time.as_micros() as u64, Ordering::SeqCst);
        self
    }

    pub fn script(&self) -> &Script {
        &self.0
    }

    pub fn attempts(&self) -> u32 {
        self.0.attempts.load(Ordering::SeqCst)
    }

    pub fn opened(&self) -> u32 {
        self.0.opened.load(Ordering::SeqCst)
    }

    /// Takes one from `counter` if it is above zero.
    fn take_one(counter: &std::sync::atomic::AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .is_ok()
    }
}

impl r2d2::ManageConnection for ScriptedManager {
    type Connection = u32;
    type Error = std::io::Error;

    fn connect(&self) -> std::io::Result<u32> {
        self.0.attempts.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_micros(
            self.0.connect_micros.load(Ordering::SeqCst),
        ));
        if Self::take_one(&self.0.hang_next) {
            std::thread::sleep(Duration::from_micros(
                self.0.hang_micros.load(Ordering::SeqCst),
            ));
        } else if Self::take_one(&self.0.fail_next) {
            return Err(std::io::Error::other("no server yet"));
        }
        if Self::take_one(&self.0.panic_next) {
            panic!("{SCRIPTED_PANIC}");
        }
        Ok(self.0.opened.fetch_add(1, Ordering::SeqCst))
    }

    fn is_valid(&self, _: &mut u32) -> std::io::Result<()> {
        Ok(())
    }

    fn has_broken(&self, _: &mut u32) -> bool {
        false
    }
}
