//! Connect threads that are ending, which `exit` waits for too.
//!
//! A forked child's pool connects on threads of its own, one per attempt, that end once the
//! attempt is over (`sys::spawn_detached`). A thread's end runs its thread-specific data
//! destructors after its last line of code: libkrb5's (libpq's GSSAPI probe leaves some on every
//! thread that connected over TCP) and OpenSSL's take those libraries' global locks, which
//! `exit`'s cleanup destroys (measured: SIGABRT on `k5_mutex_lock`'s assertion under
//! `__nptl_deallocate_tsd`, the main thread in `exit`). No driver section can cover code that
//! runs after the thread's function returned. So each such thread records itself in a slot
//! as its last act ([`connect_thread_ends`]), and the `atexit` handler waits until the threads
//! in the slots are gone ([`wait_until_gone`]): the kernel reports a thread gone only once all of
//! its end has run. A thread that finds an exit under way does not end at all (nobody joins it,
//! and the process is ending). A thread that finds every slot taken ends unrecorded.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::epoch::{current_epoch, Epoch};

/// More than a forked child's pools have connect threads at once in practice.
const SLOTS: usize = 64;

/// One word per ending thread: [`PARKED`], the low 31 bits of its process's epoch, its thread
/// id; 0 when never used. A slot of another epoch (a parent's), or whose thread is gone, is
/// free. Thread ids are reused only after the kernel wraps around its id space; a slot whose
/// id came to name another thread of this process makes `exit` wait for that one, boundedly.
static ENDING: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];

/// Set in a slot whose thread found an exit under way and will not end.
const PARKED: u64 = 1 << 63;

const TID_BITS: u32 = 32;
const EPOCH_MASK: u64 = (1 << 31) - 1;

fn tag(epoch: Epoch) -> u64 {
    (epoch.get() & EPOCH_MASK) << TID_BITS
}

fn tid_of(word: u64) -> u32 {
    word as u32
}

fn epoch_tag_of(word: u64) -> u64 {
    word & (EPOCH_MASK << TID_BITS)
}

/// The last thing a pool's own connect thread does before it ends (see the module docs).
pub(crate) fn connect_thread_ends() {
    let here = current_epoch();
    let word = tag(here) | u64::from(this_thread());
    let claimed = ENDING.iter().find(|slot| {
        let seen = slot.load(Ordering::SeqCst);
        let free = seen == 0 || epoch_tag_of(seen) != tag(here) || !alive(tid_of(seen));
        free && slot
            .compare_exchange(seen, word, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    });
    // Seen by an exit handler that raised its count before this slot was written, or this
    // load sees its raise: either the handler waits for this thread, or it does not end.
    if super::driver_section::exit_pending(here) {
        if let Some(slot) = claimed {
            slot.fetch_or(PARKED, Ordering::SeqCst);
        }
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// For the `atexit` handler: waits until every connect thread of this process that recorded
/// itself as ending is gone or parked, at most until `deadline`.
pub(super) fn wait_until_gone(deadline: Instant) {
    let here = tag(current_epoch());
    let me = this_thread();
    for slot in &ENDING {
        loop {
            let word = slot.load(Ordering::SeqCst);
            let waited_for = word != 0
                && word & PARKED == 0
                && epoch_tag_of(word) == here
                && tid_of(word) != me
                && alive(tid_of(word));
            if !waited_for || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// The kernel's id of the calling thread.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn this_thread() -> u32 {
    // SAFETY: `gettid` takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as u32 }
}

/// Whether thread `tid` of this process still exists (has not finished ending).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn alive(tid: u32) -> bool {
    // SAFETY: signal 0 sends nothing; the kernel only checks that thread `tid` of this process
    // exists.
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid as libc::pid_t, 0) == 0 }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn this_thread() -> u32 {
    0
}

/// Without thread ids to ask about, nothing is waited for.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn alive(_tid: u32) -> bool {
    false
}
