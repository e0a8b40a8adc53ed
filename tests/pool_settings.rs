//! The building process's pool keeps r2d2's promises: `build` waits for `min_idle` connections
//! opened on the configured thread pool and fails with r2d2's error; a checkout or a broken
//! connection that leaves fewer than `min_idle` idle opens more in the background; an event
//! handler hears what r2d2 would tell it. Where it can, each test runs the same steps on a
//! plain `r2d2::Pool` and expects the same result. No fork here.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use scheduled_thread_pool::ScheduledThreadPool;
use support::events::EventCounts;
use support::scripted::ScriptedManager;

/// Connections are numbers; records the thread each was opened on, and can be told to fail
/// or to report connections broken.
#[derive(Clone, Debug, Default)]
struct RecordingManager(Arc<Records>);

#[derive(Debug, Default)]
struct Records {
    opened: AtomicU32,
    threads: Mutex<Vec<String>>,
    refuse: AtomicBool,
    broken: AtomicBool,
}

impl std::ops::Deref for RecordingManager {
    type Target = Records;

    fn deref(&self) -> &Records {
        &self.0
    }
}

impl r2d2::ManageConnection for RecordingManager {
    type Connection = u32;
    type Error = std::io::Error;

    fn connect(&self) -> Result<u32, std::io::Error> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("no server here"));
        }
        let name = std::thread::current().name().unwrap_or("").to_owned();
        self.threads.lock().unwrap().push(name);
        Ok(self.opened.fetch_add(1, Ordering::SeqCst))
    }

    fn is_valid(&self, _: &mut u32) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn has_broken(&self, _: &mut u32) -> bool {
        self.broken.load(Ordering::SeqCst)
    }
}

/// Polls `condition` for up to five seconds.
fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until every job queued on `threads` (which has `size` threads) before this call has
/// finished: one blocking job per thread can only all start once nothing else runs there.
fn quiesce(threads: &ScheduledThreadPool, size: usize) {
    let all_busy = Arc::new(std::sync::Barrier::new(size + 1));
    for _ in 0..size {
        let all_busy = Arc::clone(&all_busy);
        threads.execute(move || {
            all_busy.wait();
        });
    }
    all_busy.wait();
}

/// `build` returns once `min_idle` connections are open and idle, never with one still on its
/// way into the idle list (`try_get` right after it would find none), and never opens more
/// than `min_idle`: a connection counts as open and idle in the same instant, so nothing sees
/// the pool one short and starts another. The window in which that could happen is a few
/// instructions long, so one build proves little: the same builds run `BUILDS` times, on this
/// pool and on r2d2's side by side, and each must end exactly at `min_idle`, all idle, once
/// the thread pool is quiet.
#[test]
fn build_waits_for_min_idle_connections_opened_on_the_thread_pool() {
    const BUILDS: usize = 1000;
    const THREADS: usize = 3;
    let threads = Arc::new(
        ScheduledThreadPool::builder()
            .num_threads(THREADS)
            .thread_name_pattern("settings-test-{}")
            .build(),
    );
    // (max_size, min_idle): a pool filled to `min_idle`, and one filled to `max_size`.
    let settings = [(5, Some(3)), (3, None)];
    let ours = |(max_size, min_idle): (u32, Option<u32>), manager: &RecordingManager| {
        let pool = forksafe_pool::Pool::builder()
            .max_size(max_size)
            .min_idle(min_idle)
            .thread_pool(Arc::clone(&threads))
            .build(manager.clone())
            .expect("build");
        (pool.state(), Box::new(pool) as Box<dyn std::any::Any>)
    };
    let theirs = |(max_size, min_idle): (u32, Option<u32>), manager: &RecordingManager| {
        let pool = r2d2::Pool::builder()
            .max_size(max_size)
            .min_idle(min_idle)
            .thread_pool(Arc::clone(&threads))
            .build(manager.clone())
            .expect("r2d2 build");
        (pool.state(), Box::new(pool) as Box<dyn std::any::Any>)
    };
    let mut wrong = Vec::new();
    let mut r2d2_wrong = Vec::new();
    for setting in settings {
        let wanted = setting.1.unwrap_or(setting.0);
        // All of one pool's builds, then all of the other's: interleaved, the thread pool's
        // threads meet the builds in other states and the window is hit far less often.
        for (which, wrong) in [(0, &mut wrong), (1, &mut r2d2_wrong)] {
            for build in 0..BUILDS {
                let manager = RecordingManager::default();
                // The pool stays alive until the thread pool is quiet: r2d2's connect jobs
                // give up once their pool is gone.
                let (at_return, _pool) = if which == 0 {
                    ours(setting, &manager)
                } else {
                    theirs(setting, &manager)
                };
                quiesce(&threads, THREADS);
                let opened = manager.opened.load(Ordering::SeqCst);
                if (at_return.connections, at_return.idle_connections, opened)
                    != (wanted, wanted, wanted)
                {
                    wrong.push(format!(
                        "build {build} (max_size {}, min_idle {:?}): returned with {} open, \
                         {} idle; opened {opened} in all",
                        setting.0, setting.1, at_return.connections, at_return.idle_connections
                    ));
                }
                let names = manager.threads.lock().unwrap().clone();
                assert!(
                    names.iter().all(|name| name.starts_with("settings-test-")),
                    "connections opened elsewhere than on the given thread pool: {names:?}"
                );
            }
        }
    }
    assert!(r2d2_wrong.is_empty(), "r2d2 itself strayed: {r2d2_wrong:?}");
    assert!(
        wrong.is_empty(),
        "{} of {} builds did not end with exactly min_idle connections, all idle: {:?}",
        wrong.len(),
        BUILDS * settings.len(),
        &wrong[..wrong.len().min(5)]
    );
}

#[test]
fn build_fails_with_r2d2s_error_when_nothing_connects() {
    let manager = RecordingManager::default();
    manager.refuse.store(true, Ordering::SeqCst);
    let timeout = Duration::from_millis(300);
    let ours = forksafe_pool::Pool::builder()
        .connection_timeout(timeout)
        .build(manager.clone())
        .expect_err("built without a connection");
    let theirs = r2d2::Pool::builder()
        .connection_timeout(timeout)
        .build(manager.clone())
        .expect_err("r2d2 built without a connection");
    assert_eq!(ours.to_string(), theirs.to_string());
    assert_eq!(
        ours.to_string(),
        "timed out waiting for connection: no server here"
    );
}

#[test]
fn get_after_the_server_comes_back_connects_again() {
    let manager = RecordingManager::default();
    let pool = forksafe_pool::Pool::builder()
        .max_size(1)
        .connection_timeout(Duration::from_millis(300))
        .build_unchecked(manager.clone());
    manager.refuse.store(true, Ordering::SeqCst);
    pool.release_idle();
    let error = pool.get().expect_err("connected to a refusing server");
    assert!(
        error
            .to_string()
            .starts_with("timed out waiting for connection"),
        "{error}"
    );
    manager.refuse.store(false, Ordering::SeqCst);
    pool.get_timeout(Duration::from_secs(5))
        .expect("no connection once the server is back");
}

/// One failed connect right after `build_unchecked` (or `release_idle`) does not fail
/// `warm_up`: like `build`, it tries again after the pool's back-off until `min_idle` is met.
/// `build` and r2d2's `build` meet the same failure side by side. Each connect takes 50 ms, so
/// `warm_up` starts while the failing one is still in flight.
#[test]
fn warm_up_keeps_trying_after_a_failed_connect_like_build() {
    let timeout = Duration::from_secs(3);
    let connect_time = Duration::from_millis(50);
    let builder = || {
        forksafe_pool::Pool::builder()
            .max_size(2)
            .min_idle(Some(2))
            .connection_timeout(timeout)
    };
    let theirs = r2d2::Pool::builder()
        .max_size(2)
        .min_idle(Some(2))
        .connection_timeout(timeout)
        .build(ScriptedManager::failing_first(1).taking(connect_time));
    assert!(theirs.is_ok(), "r2d2's build gave up: {:?}", theirs.err());
    let built = builder().build(ScriptedManager::failing_first(1).taking(connect_time));
    assert!(built.is_ok(), "build gave up: {:?}", built.err());

    let manager = ScriptedManager::failing_first(1).taking(connect_time);
    let pool = builder().build_unchecked(manager.clone());
    let started = Instant::now();
    pool.warm_up()
        .expect("warm_up after build_unchecked gave up after one failed connect");
    assert!(started.elapsed() < timeout, "{:?}", started.elapsed());
    assert_eq!(pool.state().connections, 2);

    manager.script().fail_next.store(1, Ordering::SeqCst);
    pool.release_idle();
    let started = Instant::now();
    pool.warm_up()
        .expect("warm_up after release_idle gave up after one failed connect");
    assert!(started.elapsed() < timeout, "{:?}", started.elapsed());
    assert_eq!(pool.state().connections, 2);
    assert_eq!(manager.attempts(), 6, "two fills of two, one failure each");
}

/// A pool whose first connects fail fills itself in the background, without a `get`: a pool
/// used only through `try_get` recovers, as r2d2's does.
#[test]
fn failed_connects_are_retried_in_the_background_like_r2d2() {
    /// From the build to the first connection `try_get` hands out, and to `min_idle`.
    fn first_try_get_after(
        try_get: &dyn Fn() -> bool,
        connections: &dyn Fn() -> u32,
        what: &str,
    ) -> (Duration, Duration) {
        let started = Instant::now();
        eventually(&format!("{what}: try_get hands out a connection"), try_get);
        let first = started.elapsed();
        eventually(&format!("{what}: min_idle reached"), || connections() == 2);
        (first, started.elapsed())
    }
    let timeout = Duration::from_secs(2);
    let ours = forksafe_pool::Pool::builder()
        .max_size(2)
        .connection_timeout(timeout)
        .build_unchecked(ScriptedManager::failing_first(3));
    let ours_took = first_try_get_after(
        &|| ours.try_get().is_some(),
        &|| ours.state().connections,
        "ours",
    );
    let theirs = r2d2::Pool::builder()
        .max_size(2)
        .connection_timeout(timeout)
        .build_unchecked(ScriptedManager::failing_first(3));
    let theirs_took = first_try_get_after(
        &|| theirs.try_get().is_some(),
        &|| theirs.state().connections,
        "r2d2",
    );
    eprintln!(
        "after 3 failed connects, first connection / max_size 2 reached: ours {:?} / {:?}, \
         r2d2 {:?} / {:?}",
        ours_took.0, ours_took.1, theirs_took.0, theirs_took.1
    );
}

/// A `get` whose own attempt failed tries again once the back-off has passed, even while
/// another attempt hangs (a server that never answers): it does not wait for the hung one to
/// end, which here would be after its timeout.
#[test]
fn get_retries_after_the_back_off_while_another_connect_hangs() {
    let timeout = Duration::from_millis(1500);
    let hang = Duration::from_secs(4);
    // The first connect (the background one, for `min_idle`) hangs; the next fails.
    let manager = ScriptedManager::failing_first(1).hanging_next(1, hang);
    let pool = forksafe_pool::Pool::builder()
        .max_size(2)
        .min_idle(Some(1))
        .connection_timeout(timeout)
        .build_unchecked(manager.clone());
    eventually("the background connect starts", || manager.attempts() == 1);
    let started = Instant::now();
    let conn = pool.get();
    assert!(
        conn.is_ok(),
        "get waited for the hung connect: {:?} after {:?}",
        conn.err(),
        started.elapsed()
    );
    assert_eq!(
        manager.attempts(),
        3,
        "the hung one, the failed one, the retry"
    );
}

/// The background retries end with the pool, and with a generation `release_idle` retired.
#[test]
fn background_retries_stop_when_the_pool_is_dropped_or_released() {
    // Back-off at most 100 ms: a pool still retrying would try several times per `settle`.
    let timeout = Duration::from_millis(200);
    let settle = Duration::from_millis(600);
    for release in [false, true] {
        let manager = ScriptedManager::failing_first(u32::MAX);
        let pool = forksafe_pool::Pool::builder()
            .max_size(1)
            .connection_timeout(timeout)
            .build_unchecked(manager.clone());
        eventually("the background retries", || manager.attempts() >= 3);
        if release {
            pool.release_idle();
        } else {
            drop(pool);
        }
        // An attempt already handed to the thread pool may still run in this time.
        std::thread::sleep(settle);
        let attempts = manager.attempts();
        std::thread::sleep(settle);
        assert_eq!(
            manager.attempts(),
            attempts,
            "retried after the pool was {}",
            if release { "released" } else { "dropped" }
        );
    }
}

/// A connect that panics on the thread pool gives its slot back and names the panic in the
/// error of the `get` that waited for it; r2d2 loses the slot for good and times out saying
/// nothing.
#[test]
fn a_connect_that_panics_is_reported_and_frees_its_slot() {
    support::scripted::quiet_scripted_panics();
    let timeout = Duration::from_millis(500);
    let manager = ScriptedManager::panicking_first(u32::MAX);
    let pool = forksafe_pool::Pool::builder()
        .max_size(1)
        .min_idle(Some(0))
        .connection_timeout(timeout)
        .build_unchecked(manager.clone());
    let error = pool
        .get()
        .expect_err("a connect that panics gave a connection");
    assert!(
        error
            .to_string()
            .starts_with("timed out waiting for connection: "),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("the driver panicked while connecting"),
        "the error does not name the panic: {error}"
    );
    manager.script().panic_next.store(0, Ordering::SeqCst);
    pool.get_timeout(Duration::from_secs(5))
        .expect("the slot of the panicked connect was never freed");

    let theirs_manager = ScriptedManager::panicking_first(1);
    let theirs = r2d2::Pool::builder()
        .max_size(1)
        .min_idle(Some(0))
        .connection_timeout(timeout)
        .build_unchecked(theirs_manager.clone());
    let error = theirs.get().expect_err("r2d2 connected through a panic");
    assert_eq!(error.to_string(), "timed out waiting for connection");
    assert!(
        theirs.get().is_err() && theirs_manager.attempts() == 1,
        "r2d2 freed the slot of a panicked connect: the docs of `Pool` say it does not"
    );
}

/// Checking out below `min_idle`, and closing broken connections, make the pool open more
/// in the background; the same steps on r2d2 end with the same counts.
#[test]
fn min_idle_is_kept_up_in_the_background_like_r2d2() {
    fn steps(
        get: &dyn Fn() -> Box<dyn std::any::Any>,
        state: &dyn Fn() -> r2d2::State,
        manager: &RecordingManager,
    ) -> Vec<(u32, u32)> {
        let mut seen = vec![(state().connections, state().idle_connections)];
        let held = get();
        eventually("a connection opened to keep one idle", || {
            state().idle_connections == 1
        });
        seen.push((state().connections, state().idle_connections));
        manager.broken.store(true, Ordering::SeqCst);
        drop(held);
        manager.broken.store(false, Ordering::SeqCst);
        eventually("the broken connection closed", || state().connections == 1);
        seen.push((state().connections, state().idle_connections));
        seen
    }
    let ours_manager = RecordingManager::default();
    let ours = forksafe_pool::Pool::builder()
        .max_size(4)
        .min_idle(Some(1))
        .build(ours_manager.clone())
        .expect("build");
    let theirs_manager = RecordingManager::default();
    let theirs = r2d2::Pool::builder()
        .max_size(4)
        .min_idle(Some(1))
        .build(theirs_manager.clone())
        .expect("r2d2 build");
    let ours_seen = steps(
        &|| Box::new(ours.get().expect("get")),
        &|| ours.state(),
        &ours_manager,
    );
    let theirs_seen = steps(
        &|| Box::new(theirs.get().expect("r2d2 get")),
        &|| theirs.state(),
        &theirs_manager,
    );
    assert_eq!(ours_seen, theirs_seen);
    assert_eq!(ours_seen, vec![(1, 1), (2, 1), (1, 1)]);
}

#[test]
fn an_event_handler_hears_every_acquire_checkout_checkin_and_timeout() {
    let events = EventCounts::default();
    let pool = forksafe_pool::Pool::builder()
        .max_size(2)
        .event_handler(Box::new(events.clone()))
        .build(RecordingManager::default())
        .expect("build");
    let first = pool.get().expect("get");
    let second = pool.get().expect("get");
    assert!(pool.get_timeout(Duration::from_millis(10)).is_err());
    drop((first, second));
    assert_eq!(
        events.seen(),
        [2, 2, 2, 1],
        "acquires, checkouts, checkins, timeouts"
    );
}

/// A connection that counts itself among the live ones until dropped.
#[derive(Debug)]
struct Live(Arc<AtomicU32>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Connects in a millisecond, fails every third connect, and reports every fifth returned
/// connection broken.
#[derive(Clone, Debug, Default)]
struct FlakyManager {
    live: Arc<AtomicU32>,
    connects: Arc<AtomicU32>,
    returns: Arc<AtomicU32>,
}

impl r2d2::ManageConnection for FlakyManager {
    type Connection = Live;
    type Error = std::io::Error;

    fn connect(&self) -> Result<Live, std::io::Error> {
        std::thread::sleep(Duration::from_millis(1));
        if self.connects.fetch_add(1, Ordering::SeqCst) % 3 == 2 {
            return Err(std::io::Error::other("flaky server"));
        }
        self.live.fetch_add(1, Ordering::SeqCst);
        Ok(Live(Arc::clone(&self.live)))
    }

    fn is_valid(&self, _: &mut Live) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn has_broken(&self, _: &mut Live) -> bool {
        self.returns.fetch_add(1, Ordering::SeqCst) % 5 == 4
    }
}

/// Eight threads fight over two connections while connects fail and returns break: nothing
/// hangs, the pool never holds more than `max_size`, every connection it counts is alive and
/// every one it closed is gone, and it serves again once things calm down.
#[test]
fn a_small_flaky_pool_under_contention_keeps_its_counts() {
    let manager = FlakyManager::default();
    let pool = forksafe_pool::Pool::builder()
        .max_size(2)
        .min_idle(Some(1))
        .connection_timeout(Duration::from_secs(2))
        .build_unchecked(manager.clone());
    let (done, finished) = std::sync::mpsc::channel();
    for _ in 0..8 {
        let pool = pool.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let (mut served, mut timed_out) = (0, 0);
            for _ in 0..300 {
                match pool.get_timeout(Duration::from_millis(50)) {
                    Ok(conn) => {
                        served += 1;
                        std::hint::black_box(&*conn);
                    }
                    Err(_) => timed_out += 1,
                }
                let state = pool.state();
                assert!(state.connections <= 2, "{state:?}");
            }
            done.send((served, timed_out)).expect("report");
        });
    }
    let mut served = 0;
    for _ in 0..8 {
        let (ok, _) = finished
            .recv_timeout(Duration::from_secs(60))
            .expect("a thread hung in get_timeout");
        served += ok;
    }
    eprintln!("served {served} of 2400");
    assert!(served > 0, "nothing was ever served");
    // Quiet now: what the pool counts open is exactly what is alive, once attempts settle.
    eventually("the pool's count matches the live connections", || {
        pool.state().connections == manager.live.load(Ordering::SeqCst)
    });
    drop(
        pool.get_timeout(Duration::from_secs(5))
            .expect("no connection afterwards"),
    );
    drop(pool);
    eventually("every connection closed with the pool", || {
        manager.live.load(Ordering::SeqCst) == 0
    });
}
