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
use support::EventCounts;

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

#[test]
fn build_waits_for_min_idle_connections_opened_on_the_thread_pool() {
    let manager = RecordingManager::default();
    let threads = Arc::new(
        ScheduledThreadPool::builder()
            .num_threads(2)
            .thread_name_pattern("settings-test-{}")
            .build(),
    );
    let pool = forksafe_pool::Pool::builder()
        .max_size(5)
        .min_idle(Some(3))
        .thread_pool(threads)
        .build(manager.clone())
        .expect("build");
    assert_eq!(
        pool.state().connections,
        3,
        "build returned before min_idle"
    );
    let names = manager.threads.lock().unwrap().clone();
    assert!(
        names.iter().all(|name| name.starts_with("settings-test-")),
        "connections opened elsewhere than on the given thread pool: {names:?}"
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
