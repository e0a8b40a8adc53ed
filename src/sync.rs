//! The synchronisation primitives of the code that hands values between threads without a
//! lock (the process pool, `fork::per_process`, `fork::grace`): std's, or loom's when the crate
//! is built with `--cfg forksafe_loom` to model-check that code (`scripts/loom`, run by CI).
//!
//! Only the primitives whose interleavings matter come from here: atomics, fences, `Mutex`,
//! `Condvar`, yielding and the clock. `Arc` stays std's (it hands nothing over that the models
//! need to see), and so does everything outside those modules.
//!
//! Loom runs each model's threads one at a time and explores every order of their operations on
//! these primitives, up to a bound of preemptions. It models `SeqCst` loads and stores only as
//! acquire and release (loom#180), so every pairing in which each side writes its own atomic and
//! then reads the other's is written with a `fence(SeqCst)` between the two: correct on real
//! hardware too, and modelled faithfully. Its `Condvar::wait_timeout` ignores the duration (a
//! wait ends only when notified), so a lost wake-up shows as a deadlock, and time comes from
//! [`now`], a clock the models move by hand.

#[cfg(not(forksafe_loom))]
pub(crate) use std::sync::atomic::{
    fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
#[cfg(not(forksafe_loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

#[cfg(forksafe_loom)]
pub(crate) use loom::sync::atomic::{
    fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
#[cfg(forksafe_loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};

/// Between two sequentially consistent accesses of a pairing in which each side writes its own
/// atomic and then reads the other's ("write mine, read theirs", so that of two racing threads
/// at least one sees the other). At run time it is nothing: sequentially consistent accesses
/// fall in one total order consistent with each thread's program order, which is all such a
/// pairing needs (and on x86 the write is a locked instruction, a full barrier). Under loom,
/// which models `SeqCst` accesses as acquire/release only, it is a `fence(SeqCst)`, so that the
/// models check the pairing as it runs. Only for accesses that are themselves `SeqCst`.
#[inline(always)]
pub(crate) fn seq_cst_pairing() {
    #[cfg(forksafe_loom)]
    fence(Ordering::SeqCst);
}

/// The current time: `Instant::now()`, or the models' clock.
#[cfg(not(forksafe_loom))]
#[inline]
pub(crate) fn now() -> std::time::Instant {
    std::time::Instant::now()
}

/// Gives up the core (`sched_yield`); under loom, lets the other threads of a model run.
#[cfg(not(forksafe_loom))]
#[inline]
pub(crate) fn yield_now() {
    std::thread::yield_now();
}

/// A pause inside a busy wait.
#[cfg(not(forksafe_loom))]
#[inline]
pub(crate) fn spin_loop() {
    std::hint::spin_loop();
}

#[cfg(forksafe_loom)]
pub(crate) use loom::hint::spin_loop;
#[cfg(forksafe_loom)]
pub(crate) use loom::thread::yield_now;
#[cfg(forksafe_loom)]
pub(crate) use model_clock::now;

/// The models' clock: a fixed start plus a count of nanoseconds that only a model moves
/// ([`model_clock::advance`]), so that every run of a model sees the same times.
#[cfg(forksafe_loom)]
pub(crate) mod model_clock {
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    use loom::sync::atomic::{AtomicU64, Ordering};

    loom::lazy_static! {
        static ref ELAPSED_NANOS: AtomicU64 = AtomicU64::new(0);
    }

    fn start() -> Instant {
        static START: OnceLock<Instant> = OnceLock::new();
        *START.get_or_init(Instant::now)
    }

    pub(crate) fn now() -> Instant {
        start() + Duration::from_nanos(ELAPSED_NANOS.load(Ordering::SeqCst))
    }

    /// Moves the clock forward by `by`.
    pub(crate) fn advance(by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).expect("a model's time fits in u64 nanoseconds");
        ELAPSED_NANOS.fetch_add(nanos, Ordering::SeqCst);
    }
}

/// Declares a `const fn`, except under loom, whose atomics cannot be made in a constant: the
/// containers the models check (`PerProcess`, the reader counts) can live in statics.
macro_rules! const_fn_unless_loom {
    ($(#[$attr:meta])* $vis:vis fn $($rest:tt)*) => {
        #[cfg(not(forksafe_loom))]
        $(#[$attr])* $vis const fn $($rest)*
        #[cfg(forksafe_loom)]
        $(#[$attr])* $vis fn $($rest)*
    };
}
pub(crate) use const_fn_unless_loom;
