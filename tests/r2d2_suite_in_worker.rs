//! r2d2 0.8.10's own test suite (its `src/test.rs`), run as a pre-forking server would: each
//! pool is built in this (master) process, and the rest of each test runs in a forked worker,
//! reaped with a deadline. A worker's pool must keep r2d2's contract for its own connections.
//!
//! Adapted where forking changes what a test can mean, and only there:
//! - **A worker's first use.** r2d2's `build` waited for `min_idle` connections in the master;
//!   a worker's pool starts opening its own at its first use in the worker (forking starts
//!   nothing). Tests that look at the pool before using it first touch it (`state`) and wait,
//!   without any checkout, until `min_idle` connections are idle ([`first_touch`]).
//! - **Connect budgets are per process.** The managers that connect N times and then fail would
//!   have the master spend the whole budget on `build`; here each process gets its own N.
//! - **Counts of dropped connections are the worker's.** Connections the master opened are
//!   never dropped in a worker (their sockets are the master's), so `conns_drop_on_pool_drop`
//!   counts the worker's own connections.
//! - **`events`** clears the log it inherited. **`test_initialization_failure`** is all a
//!   `build`, so it runs in the master, as in r2d2 (a `build` in a worker starts std threads:
//!   see the README's Limits).
//! - **Reaper rate.** r2d2's tests set its crate-private `reaper_rate`; this crate's hidden
//!   `reaper_rate_for_tests` does the same.
//! - `test_is_send_sync` is a compile-time check and runs as one.
//!
//! A `harness = false` binary (see `fork_core.rs`).

#[macro_use]
mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use std::{error, fmt, mem, thread};

use forksafe_pool::{CustomizeConnection, HandleEvent, ManageConnection, Pool, PooledConnection};
use r2d2::event::{AcquireEvent, CheckinEvent, CheckoutEvent, ReleaseEvent, TimeoutEvent};
use support::backend::in_child;
use support::runner::{run_cases, Case, Check};
use support::worker_pool::eventually;

#[derive(Debug)]
pub struct Error;

impl fmt::Display for Error {
    fn fmt(&self, fmt: &mut fmt::Formatter) -> fmt::Result {
        fmt.write_str("blammo")
    }
}

impl error::Error for Error {}

#[derive(Debug, PartialEq)]
struct FakeConnection(bool);

struct OkManager;

impl ManageConnection for OkManager {
    type Connection = FakeConnection;
    type Error = Error;

    fn connect(&self) -> Result<FakeConnection, Error> {
        Ok(FakeConnection(true))
    }

    fn is_valid(&self, _: &mut FakeConnection) -> Result<(), Error> {
        Ok(())
    }

    fn has_broken(&self, _: &mut FakeConnection) -> bool {
        false
    }
}

/// N successful connects per process, then failures (r2d2's counters, made per process).
struct Budget {
    initial: isize,
    /// The process the count is of, and what is left of its budget.
    left: Mutex<(u32, isize)>,
}

impl Budget {
    fn new(initial: isize) -> Budget {
        Budget {
            initial,
            left: Mutex::new((std::process::id(), initial)),
        }
    }

    fn take(&self) -> bool {
        let mut left = self.left.lock().unwrap();
        if left.0 != std::process::id() {
            *left = (std::process::id(), self.initial);
        }
        left.1 -= 1;
        left.1 >= 0
    }
}

struct NthConnectFailManager {
    n: Budget,
}

impl ManageConnection for NthConnectFailManager {
    type Connection = FakeConnection;
    type Error = Error;

    fn connect(&self) -> Result<FakeConnection, Error> {
        if self.n.take() {
            Ok(FakeConnection(true))
        } else {
            Err(Error)
        }
    }

    fn is_valid(&self, _: &mut FakeConnection) -> Result<(), Error> {
        Ok(())
    }

    fn has_broken(&self, _: &mut FakeConnection) -> bool {
        false
    }
}

/// The worker's first use of a pool, then a wait (no checkout) until `min_idle` connections
/// are idle: what r2d2's `build` did in the master.
fn first_touch<M: ManageConnection>(pool: &Pool<M>) -> Check {
    let _ = pool.state();
    let min_idle = pool.min_idle().unwrap_or(pool.max_size());
    eventually(
        "min_idle not reached in the worker",
        Duration::from_secs(5),
        || pool.state().idle_connections >= min_idle,
    )
}

/// Builds in the master, runs `test` in a forked worker.
fn worker<P>(pool: P, test: impl FnOnce(P) -> Check) -> Check {
    in_child(|| test(pool))
}

fn get<M: ManageConnection>(pool: &Pool<M>) -> Result<PooledConnection<M>, String> {
    pool.get().map_err(|error| format!("get: {error}"))
}

fn test_max_size_ok() -> Check {
    let manager = NthConnectFailManager { n: Budget::new(5) };
    let pool = Pool::builder()
        .max_size(5)
        .build(manager)
        .map_err(|e| e.to_string())?;
    worker(pool, |pool| {
        let mut conns = vec![];
        for _ in 0..5 {
            conns.push(get(&pool)?);
        }
        Ok(())
    })
}

fn test_acquire_release() -> Check {
    let pool = Pool::builder()
        .max_size(2)
        .build(OkManager)
        .map_err(|e| e.to_string())?;
    worker(pool, |pool| {
        let conn1 = get(&pool)?;
        let conn2 = get(&pool)?;
        drop(conn1);
        let conn3 = get(&pool)?;
        drop(conn2);
        drop(conn3);
        Ok(())
    })
}

fn try_get() -> Check {
    let pool = Pool::builder()
        .max_size(2)
        .build(OkManager)
        .map_err(|e| e.to_string())?;
    worker(pool, |pool| {
        first_touch(&pool)?;
        let conn1 = pool.try_get();
        let conn2 = pool.try_get();
        let conn3 = pool.try_get();

        ensure!(conn1.is_some(), "conn1");
        ensure!(conn2.is_some(), "conn2");
        ensure!(conn3.is_none(), "conn3");

        drop(conn1);

        ensure!(pool.try_get().is_some(), "after a return");
        Ok(())
    })
}

fn get_timeout() -> Check {
    let pool = Pool::builder()
        .max_size(1)
        .connection_timeout(Duration::from_millis(500))
        .build(OkManager)
        .map_err(|e| e.to_string())?;
    worker(pool, |pool| {
        let timeout = Duration::from_millis(100);
        let succeeds_immediately = pool.get_timeout(timeout);

        ensure!(succeeds_immediately.is_ok(), "immediately");

        thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            drop(succeeds_immediately);
        });

        let succeeds_delayed = pool.get_timeout(timeout);
        ensure!(succeeds_delayed.is_ok(), "delayed");

        thread::spawn(move || {
            thread::sleep(Duration::from_millis(150));
            drop(succeeds_delayed);
        });

        let fails = pool.get_timeout(timeout);
        ensure!(fails.is_err(), "did not time out");
        Ok(())
    })
}

fn test_is_send_sync() -> Check {
    fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<Pool<OkManager>>();
    Ok(())
}

fn test_issue_2_unlocked_during_is_valid() -> Check {
    struct BlockingChecker {
        first: AtomicBool,
        s: Mutex<SyncSender<()>>,
        r: Mutex<Receiver<()>>,
    }

    impl ManageConnection for BlockingChecker {
        type Connection = FakeConnection;
        type Error = Error;

        fn connect(&self) -> Result<FakeConnection, Error> {
            Ok(FakeConnection(true))
        }

        fn is_valid(&self, _: &mut FakeConnection) -> Result<(), Error> {
            if self
                .first
                .compare_exchange(true, false, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                self.s.lock().unwrap().send(()).unwrap();
                self.r.lock().unwrap().recv().unwrap();
            }
            Ok(())
        }

        fn has_broken(&self, _: &mut FakeConnection) -> bool {
            false
        }
    }

    let (s1, r1) = mpsc::sync_channel(0);
    let (s2, r2) = mpsc::sync_channel(0);

    let manager = BlockingChecker {
        first: AtomicBool::new(true),
        s: Mutex::new(s1),
        r: Mutex::new(r2),
    };

    let pool = Pool::builder()
        .test_on_check_out(true)
        .max_size(2)
        .build(manager)
        .map_err(|e| e.to_string())?;
    worker(pool, |pool| {
        let p2 = pool.clone();
        let t = thread::spawn(move || {
            p2.get().ok().unwrap();
        });

        r1.recv().unwrap();
        // get call by other task has triggered the health check
        get(&pool)?;
        s2.send(()).ok().unwrap();

        ensure!(t.join().is_ok(), "the other get panicked");
        Ok(())
    })
}

fn test_drop_on_broken() -> Check {
    static DROPPED: AtomicBool = AtomicBool::new(false);
    DROPPED.store(false, Ordering::SeqCst);

    struct Connection;

    impl Drop for Connection {
        fn drop(&mut self) {
            DROPPED.store(true, Ordering::SeqCst);
        }
    }

    struct Handler;

    impl ManageConnection for Handler {
        type Connection = Connection;
        type Error = Error;

        fn connect(&self) -> Result<Connection, Error> {
            Ok(Connection)
        }

        fn is_valid(&self, _: &mut Connection) -> Result<(), Error> {
            Ok(())
        }

        fn has_broken(&self, _: &mut Connection) -> bool {
            true
        }
    }

    let pool = Pool::new(Handler).map_err(|e| e.to_string())?;
    worker(pool, |pool| {
        drop(get(&pool)?);

        ensure!(DROPPED.load(Ordering::SeqCst), "not dropped");
        Ok(())
    })
}

/// All `build`, so it runs in the master: a `build` in a worker starts std threads (the
/// building process's thread pool), which a worker of a master whose threads start or end
/// while it forks may be unable to do (README, Limits).
fn test_initialization_failure() -> Check {
    let manager = NthConnectFailManager { n: Budget::new(0) };
    let err = Pool::builder()
        .connection_timeout(Duration::from_secs(1))
        .build(manager)
        .err()
        .ok_or("built")?;
    ensure!(err.to_string().contains("blammo"), "{err}");
    Ok(())
}

fn test_lazy_initialization_failure() -> Check {
    let manager = NthConnectFailManager { n: Budget::new(0) };
    let pool = Pool::builder()
        .connection_timeout(Duration::from_secs(1))
        .build_unchecked(manager);
    worker(pool, |pool| {
        let err = pool.get().err().ok_or("got a connection")?;
        ensure!(err.to_string().contains("blammo"), "{err}");
        Ok(())
    })
}

fn test_get_global_timeout() -> Check {
    let pool = Pool::builder()
        .max_size(1)
        .connection_timeout(Duration::from_secs(1))
        .build(OkManager)
        .map_err(|e| e.to_string())?;
    worker(pool, |pool| {
        let _c = get(&pool)?;
        let started_waiting = Instant::now();
        ensure!(pool.get().is_err(), "a second connection");
        // Elapsed time won't be *exactly* 1 second, but it will certainly be
        // less than 2 seconds
        ensure!(
            started_waiting.elapsed().as_secs() == 1,
            "{:?}",
            started_waiting.elapsed()
        );
        Ok(())
    })
}

fn test_connection_customizer() -> Check {
    static RELEASED: AtomicBool = AtomicBool::new(false);
    RELEASED.store(false, Ordering::SeqCst);

    static DROPPED: AtomicBool = AtomicBool::new(false);
    DROPPED.store(false, Ordering::SeqCst);

    struct Connection(i32);

    impl Drop for Connection {
        fn drop(&mut self) {
            DROPPED.store(true, Ordering::SeqCst);
        }
    }

    struct Handler;

    impl ManageConnection for Handler {
        type Connection = Connection;
        type Error = Error;

        fn connect(&self) -> Result<Connection, Error> {
            Ok(Connection(0))
        }

        fn is_valid(&self, _: &mut Connection) -> Result<(), Error> {
            Ok(())
        }

        fn has_broken(&self, _: &mut Connection) -> bool {
            true
        }
    }

    #[derive(Debug)]
    struct Customizer;

    impl CustomizeConnection<Connection, Error> for Customizer {
        fn on_acquire(&self, conn: &mut Connection) -> Result<(), Error> {
            if !DROPPED.load(Ordering::SeqCst) {
                Err(Error)
            } else {
                conn.0 = 1;
                Ok(())
            }
        }

        fn on_release(&self, _: Connection) {
            RELEASED.store(true, Ordering::SeqCst);
        }
    }

    let pool = Pool::builder()
        .connection_customizer(Box::new(Customizer))
        .build(Handler)
        .map_err(|e| e.to_string())?;
    worker(pool, |pool| {
        {
            let conn = get(&pool)?;
            ensure!(1 == conn.0, "not customized");
            ensure!(!RELEASED.load(Ordering::SeqCst), "released");
            ensure!(DROPPED.load(Ordering::SeqCst), "not dropped");
        }
        ensure!(RELEASED.load(Ordering::SeqCst), "not released");
        Ok(())
    })
}

/// r2d2's `Handler(AtomicIsize)` of the timeout tests: `n` connections per process.
struct BudgetHandler(Budget, &'static AtomicUsize);

struct Counted(&'static AtomicUsize);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl ManageConnection for BudgetHandler {
    type Connection = Counted;
    type Error = Error;

    fn connect(&self) -> Result<Counted, Error> {
        if self.0.take() {
            Ok(Counted(self.1))
        } else {
            Err(Error)
        }
    }

    fn is_valid(&self, _: &mut Counted) -> Result<(), Error> {
        Ok(())
    }

    fn has_broken(&self, _: &mut Counted) -> bool {
        false
    }
}

fn test_idle_timeout() -> Check {
    static DROPPED: AtomicUsize = AtomicUsize::new(0);

    let pool = Pool::builder()
        .max_size(5)
        .idle_timeout(Some(Duration::from_secs(1)))
        .reaper_rate_for_tests(Duration::from_secs(1))
        .build(BudgetHandler(Budget::new(5), &DROPPED))
        .map_err(|e| e.to_string())?;
    worker(pool, |pool| {
        DROPPED.store(0, Ordering::SeqCst);
        first_touch(&pool)?;
        let conn = get(&pool)?;
        thread::sleep(Duration::from_secs(2));
        ensure!(4 == DROPPED.load(Ordering::SeqCst), "{DROPPED:?}");
        drop(conn);
        ensure!(4 == DROPPED.load(Ordering::SeqCst), "{DROPPED:?}");
        Ok(())
    })
}

fn idle_timeout_partial_use() -> Check {
    static DROPPED: AtomicUsize = AtomicUsize::new(0);

    let pool = Pool::builder()
        .max_size(5)
        .idle_timeout(Some(Duration::from_secs(1)))
        .reaper_rate_for_tests(Duration::from_secs(1))
        .build(BudgetHandler(Budget::new(5), &DROPPED))
        .map_err(|e| e.to_string())?;
    worker(pool, |pool| {
        DROPPED.store(0, Ordering::SeqCst);
        first_touch(&pool)?;
        for _ in 0..8 {
            thread::sleep(Duration::from_millis(250));
            get(&pool)?;
        }
        ensure!(4 == DROPPED.load(Ordering::SeqCst), "{DROPPED:?}");
        ensure!(1 == pool.state().connections, "{:?}", pool.state());
        Ok(())
    })
}

fn test_max_lifetime() -> Check {
    static DROPPED: AtomicUsize = AtomicUsize::new(0);

    let pool = Pool::builder()
        .max_size(5)
        .max_lifetime(Some(Duration::from_secs(1)))
        .connection_timeout(Duration::from_secs(1))
        .reaper_rate_for_tests(Duration::from_secs(1))
        .build(BudgetHandler(Budget::new(5), &DROPPED))
        .map_err(|e| e.to_string())?;
    worker(pool, |pool| {
        DROPPED.store(0, Ordering::SeqCst);
        first_touch(&pool)?;
        let conn = get(&pool)?;
        thread::sleep(Duration::from_secs(2));
        ensure!(4 == DROPPED.load(Ordering::SeqCst), "{DROPPED:?}");
        drop(conn);
        thread::sleep(Duration::from_secs(2));
        ensure!(5 == DROPPED.load(Ordering::SeqCst), "{DROPPED:?}");
        ensure!(pool.get().is_err(), "a connection past the budget");
        Ok(())
    })
}

fn min_idle() -> Check {
    let pool = Pool::builder()
        .max_size(5)
        .min_idle(Some(2))
        .build(OkManager)
        .map_err(|e| e.to_string())?;
    worker(pool, |pool| {
        first_touch(&pool)?;
        thread::sleep(Duration::from_secs(1));
        ensure!(2 == pool.state().idle_connections, "{:?}", pool.state());
        ensure!(2 == pool.state().connections, "{:?}", pool.state());
        let conns = (0..3).map(|_| get(&pool)).collect::<Result<Vec<_>, _>>()?;
        thread::sleep(Duration::from_secs(1));
        ensure!(2 == pool.state().idle_connections, "{:?}", pool.state());
        ensure!(5 == pool.state().connections, "{:?}", pool.state());
        mem::drop(conns);
        ensure!(5 == pool.state().idle_connections, "{:?}", pool.state());
        ensure!(5 == pool.state().connections, "{:?}", pool.state());
        Ok(())
    })
}

fn conns_drop_on_pool_drop() -> Check {
    static DROPPED: AtomicUsize = AtomicUsize::new(0);

    struct Connection;

    impl Drop for Connection {
        fn drop(&mut self) {
            DROPPED.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Handler;

    impl ManageConnection for Handler {
        type Connection = Connection;
        type Error = Error;

        fn connect(&self) -> Result<Connection, Error> {
            Ok(Connection)
        }

        fn is_valid(&self, _: &mut Connection) -> Result<(), Error> {
            Ok(())
        }

        fn has_broken(&self, _: &mut Connection) -> bool {
            false
        }
    }

    let pool = Pool::builder()
        .max_lifetime(Some(Duration::from_secs(10)))
        .max_size(10)
        .build(Handler)
        .map_err(|e| e.to_string())?;
    worker(pool, |pool| {
        DROPPED.store(0, Ordering::SeqCst);
        first_touch(&pool)?;
        drop(pool);
        for _ in 0..10 {
            if DROPPED.load(Ordering::SeqCst) == 10 {
                return Ok(());
            }
            thread::sleep(Duration::from_secs(1));
        }
        Err(format!(
            "timed out waiting for connections to drop: {DROPPED:?}"
        ))
    })
}

fn events() -> Check {
    #[derive(Debug)]
    enum Event {
        Acquire(AcquireEvent),
        Release(ReleaseEvent),
        Checkout(CheckoutEvent),
        Checkin(CheckinEvent),
        Timeout(TimeoutEvent),
    }

    #[derive(Debug)]
    struct TestEventHandler(Arc<Mutex<Vec<Event>>>);

    impl HandleEvent for TestEventHandler {
        fn handle_acquire(&self, event: AcquireEvent) {
            self.0.lock().unwrap().push(Event::Acquire(event));
        }

        fn handle_release(&self, event: ReleaseEvent) {
            self.0.lock().unwrap().push(Event::Release(event));
        }

        fn handle_checkout(&self, event: CheckoutEvent) {
            self.0.lock().unwrap().push(Event::Checkout(event));
        }

        fn handle_timeout(&self, event: TimeoutEvent) {
            self.0.lock().unwrap().push(Event::Timeout(event));
        }

        fn handle_checkin(&self, event: CheckinEvent) {
            self.0.lock().unwrap().push(Event::Checkin(event));
        }
    }

    struct TestConnection;

    struct TestConnectionManager;

    impl ManageConnection for TestConnectionManager {
        type Connection = TestConnection;
        type Error = Error;

        fn connect(&self) -> Result<TestConnection, Error> {
            Ok(TestConnection)
        }

        fn is_valid(&self, _: &mut TestConnection) -> Result<(), Error> {
            Ok(())
        }

        fn has_broken(&self, _: &mut TestConnection) -> bool {
            true
        }
    }

    let events = Arc::new(Mutex::new(vec![]));

    let pool = Pool::builder()
        .max_size(1)
        .connection_timeout(Duration::from_millis(250))
        .event_handler(Box::new(TestEventHandler(events.clone())))
        .build(TestConnectionManager)
        .map_err(|e| e.to_string())?;
    worker(pool, |pool| {
        events.lock().unwrap().clear();
        let creation = Instant::now();
        first_touch(&pool)?;

        let start = Instant::now();
        let conn = get(&pool)?;
        let checkout = start.elapsed();

        ensure!(
            pool.get_timeout(Duration::from_millis(123)).is_err(),
            "a second connection"
        );

        drop(conn);
        let checkin = start.elapsed();
        let release = creation.elapsed();

        let _conn2 = get(&pool)?;

        let events = events.lock().unwrap();
        ensure!(events.len() >= 7, "{events:?}");

        let id = match events[0] {
            Event::Acquire(ref event) => event.connection_id(),
            _ => return Err(format!("{events:?}")),
        };

        match events[1] {
            Event::Checkout(ref event) => {
                ensure!(event.connection_id() == id, "{events:?}");
                ensure!(event.duration() <= checkout, "{events:?}");
            }
            _ => return Err(format!("{events:?}")),
        }

        match events[2] {
            Event::Timeout(ref event) => {
                ensure!(event.timeout() == Duration::from_millis(123), "{events:?}")
            }
            _ => return Err(format!("{events:?}")),
        }

        match events[3] {
            Event::Checkin(ref event) => {
                ensure!(event.connection_id() == id, "{events:?}");
                ensure!(event.duration() <= checkin, "{events:?}");
            }
            _ => return Err(format!("{events:?}")),
        }

        match events[4] {
            Event::Release(ref event) => {
                ensure!(event.connection_id() == id, "{events:?}");
                ensure!(event.age() <= release, "{events:?}");
            }
            _ => return Err(format!("{events:?}")),
        }

        let id2 = match events[5] {
            Event::Acquire(ref event) => event.connection_id(),
            _ => return Err(format!("{events:?}")),
        };
        ensure!(id < id2, "{events:?}");

        match events[6] {
            Event::Checkout(ref event) => ensure!(event.connection_id() == id2, "{events:?}"),
            _ => return Err(format!("{events:?}")),
        }
        Ok(())
    })
}

fn extensions() -> Check {
    let pool = Pool::builder()
        .max_size(2)
        .build(OkManager)
        .map_err(|e| e.to_string())?;
    worker(pool, |pool| {
        let mut conn1 = get(&pool)?;
        let mut conn2 = get(&pool)?;

        PooledConnection::extensions_mut(&mut conn1).insert(1);
        PooledConnection::extensions_mut(&mut conn2).insert(2);

        drop(conn1);

        let conn = get(&pool)?;
        ensure!(
            PooledConnection::extensions(&conn).get::<i32>() == Some(&1),
            "extensions lost"
        );
        Ok(())
    })
}

fn main() {
    let cases: Vec<Case> = vec![
        ("test_max_size_ok", test_max_size_ok),
        ("test_acquire_release", test_acquire_release),
        ("try_get", try_get),
        ("get_timeout", get_timeout),
        ("test_is_send_sync", test_is_send_sync),
        (
            "test_issue_2_unlocked_during_is_valid",
            test_issue_2_unlocked_during_is_valid,
        ),
        ("test_drop_on_broken", test_drop_on_broken),
        ("test_initialization_failure", test_initialization_failure),
        (
            "test_lazy_initialization_failure",
            test_lazy_initialization_failure,
        ),
        ("test_get_global_timeout", test_get_global_timeout),
        ("test_connection_customizer", test_connection_customizer),
        ("test_idle_timeout", test_idle_timeout),
        ("idle_timeout_partial_use", idle_timeout_partial_use),
        ("test_max_lifetime", test_max_lifetime),
        ("min_idle", min_idle),
        ("conns_drop_on_pool_drop", conns_drop_on_pool_drop),
        ("events", events),
        ("extensions", extensions),
    ];
    run_cases(cases);
}
