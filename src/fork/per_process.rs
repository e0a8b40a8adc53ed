//! A value per process, replaced on first use in a forked child.
#![allow(unsafe_code)]

use std::fmt;
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use super::epoch::{current_epoch, Epoch};

/// A value per process: the value of the process that made it, replaced on first use in a
/// forked child by a value that child makes.
///
/// The inherited value is never dropped and never handed out in the child: it belongs to the
/// parent's resources (sockets, threads, locks that may be frozen). It is leaked instead — it
/// is the child's copy-on-write image of the parent's memory, so leaking costs nothing.
///
/// Lock-free for readers: a load, an epoch compare. Installing takes a fork-aware lock whose
/// word holds the installer's epoch, so a lock word left by a parent thread that the fork
/// caught mid-install reads as free in the child.
pub(crate) struct PerProcess<T> {
    current: AtomicPtr<Owned<T>>,
    installing: AtomicU64,
    /// Values retired with [`PerProcess::retire`], newest first, linked through
    /// `Owned::retired_next`; freed by `Drop` (those of other processes are leaked).
    retired: AtomicPtr<Owned<T>>,
}

struct Owned<T> {
    epoch: Epoch,
    value: T,
    /// The next older retired value; only written under the install lock, before this value
    /// is linked into `PerProcess::retired`.
    retired_next: AtomicPtr<Owned<T>>,
}

// SAFETY: a `PerProcess<T>` hands out `&T` to any thread (so `T: Sync`) and may drop its `T`
// on whichever thread drops it (so `T: Send`); that is the same contract as `OnceLock<T>`.
unsafe impl<T: Send + Sync> Sync for PerProcess<T> {}
// SAFETY: as above: moving the container moves ownership of the `T` it may drop.
unsafe impl<T: Send> Send for PerProcess<T> {}

impl<T> PerProcess<T> {
    /// Holds nothing yet: the first `get_or_try_init` in each process makes that process's
    /// value. `const`, so it can live in a `static`.
    pub(crate) const fn empty() -> Self {
        PerProcess {
            current: AtomicPtr::new(ptr::null_mut()),
            installing: AtomicU64::new(0),
            retired: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Holds `value`, owned by the calling process.
    pub(crate) fn new(value: T) -> Self {
        PerProcess {
            current: AtomicPtr::new(Owned::boxed(value)),
            installing: AtomicU64::new(0),
            retired: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// The calling process's value, if it has one.
    #[inline]
    pub(crate) fn get(&self) -> Option<&T> {
        self.get_with_epoch().map(|(value, _)| value)
    }

    /// Like [`get`](Self::get), with the calling process's epoch, saving callers a second check.
    #[inline]
    pub(crate) fn get_with_epoch(&self) -> Option<(&T, Epoch)> {
        let owned = self.load()?;
        (owned.epoch == current_epoch()).then_some((&owned.value, owned.epoch))
    }

    /// The value as the calling process found it, even if a parent made it: only for reading
    /// what must be let go of (a table of atomics); never for using the parent's resources.
    pub(crate) fn get_even_inherited(&self) -> Option<&T> {
        self.load().map(|owned| &owned.value)
    }

    /// The calling process's value, made with `init` if it has none. `init` is given the value
    /// inherited from the parent, if any, to let go of what it holds.
    pub(crate) fn get_or_try_init<E>(
        &self,
        init: impl FnOnce(Option<&T>) -> Result<T, E>,
    ) -> Result<&T, E> {
        if let Some(value) = self.get() {
            return Ok(value);
        }
        self.install(init)
    }

    #[cold]
    fn install<E>(&self, init: impl FnOnce(Option<&T>) -> Result<T, E>) -> Result<&T, E> {
        let here = current_epoch();
        let _lock = InstallLock::acquire(&self.installing, here);
        // Another thread of this process may have installed while we waited.
        if let Some(value) = self.get() {
            return Ok(value);
        }
        let inherited = self.load().map(|owned| &owned.value);
        let fresh = Owned::boxed(init(inherited)?);
        // The previous value (inherited, or none) is leaked on purpose: see the type docs.
        self.current.store(fresh, Ordering::Release);
        // SAFETY: `fresh` came from `Box::into_raw` just now and is only freed by `Drop`,
        // which needs `&mut self`, so it outlives the returned borrow of `self`.
        Ok(unsafe { &(*fresh).value })
    }

    /// Takes the calling process's value out of service: `get` returns `None` until the next
    /// `get_or_try_init` makes a new one (which is given no inherited value). The retired value
    /// stays allocated, and is returned, because other threads may still hold borrows of it;
    /// it is dropped with the `PerProcess`. `None` if the calling process has no value.
    pub(crate) fn retire(&self) -> Option<&T> {
        let here = current_epoch();
        let _lock = InstallLock::acquire(&self.installing, here);
        let owned = self.current.load(Ordering::Acquire);
        // SAFETY: as in `load`: null, or a published `Owned<T>` that only `Drop` frees.
        let value = unsafe { owned.as_ref() }?;
        if value.epoch != here {
            return None;
        }
        // Linked before it is unpublished, under the install lock (the only writer of the
        // list), so `Drop` always finds it.
        value
            .retired_next
            .store(self.retired.load(Ordering::Acquire), Ordering::Release);
        self.retired.store(owned, Ordering::Release);
        self.current.store(ptr::null_mut(), Ordering::Release);
        Some(&value.value)
    }

    fn load(&self) -> Option<&Owned<T>> {
        let owned = self.current.load(Ordering::Acquire);
        // SAFETY: `current` is null or points at an `Owned<T>` from `Box::into_raw`, published
        // with `Release`. A published value is freed only by `Drop` (which has `&mut self`);
        // a replaced one is leaked. So the pointee outlives this borrow of `self`.
        unsafe { owned.as_ref() }
    }
}

impl<T> Owned<T> {
    fn boxed(value: T) -> *mut Owned<T> {
        Box::into_raw(Box::new(Owned {
            epoch: current_epoch(),
            value,
            retired_next: AtomicPtr::new(ptr::null_mut()),
        }))
    }
}

impl<T> Drop for PerProcess<T> {
    /// Drops the values only in the process that made them; inherited ones are leaked.
    fn drop(&mut self) {
        let here = current_epoch();
        let mut next = *self.retired.get_mut();
        while !next.is_null() {
            // SAFETY: every retired pointer came from `Box::into_raw` and was linked exactly
            // once; `&mut self` proves no borrow handed out by `get` or `retire` is alive.
            let owned = unsafe { Box::from_raw(next) };
            next = owned.retired_next.load(Ordering::Acquire);
            if owned.epoch != here {
                std::mem::forget(owned);
            }
        }
        let owned = *self.current.get_mut();
        if owned.is_null() {
            return;
        }
        // SAFETY: non-null `current` came from `Box::into_raw`; `&mut self` proves no borrow
        // handed out by `get` is alive, and nothing else frees it.
        let owned = unsafe { Box::from_raw(owned) };
        if owned.epoch != here {
            std::mem::forget(owned);
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for PerProcess<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.get() {
            Some(value) => f.debug_tuple("PerProcess").field(value).finish(),
            None => f.write_str("PerProcess(<none in this process>)"),
        }
    }
}

/// The fork-aware lock behind [`PerProcess::install`]: the word holds the holder's epoch.
struct InstallLock<'a>(&'a AtomicU64);

impl<'a> InstallLock<'a> {
    fn acquire(word: &'a AtomicU64, here: Epoch) -> Self {
        let mut waits = 0u32;
        loop {
            let holder = word.load(Ordering::Acquire);
            // 0 is free; another epoch's value was left by a thread that does not exist here.
            if holder != here.get()
                && word
                    .compare_exchange(holder, here.get(), Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return InstallLock(word);
            }
            // A thread of this process is installing. A pool generation installs without
            // connecting, so the wait is short; a `ForkLocal` or `GuardedPool` initialiser may
            // connect, so a longer wait sleeps instead of spinning.
            waits = waits.saturating_add(1);
            if waits < 100 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
    }
}

impl Drop for InstallLock<'_> {
    /// Also runs if `init` panicked, so a failed install does not block the process.
    fn drop(&mut self) {
        self.0.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retired_values_stay_valid_and_are_dropped_with_the_container() {
        use std::sync::atomic::AtomicUsize;
        static DROPS: AtomicUsize = AtomicUsize::new(0);
        struct Counted(u32);
        impl Drop for Counted {
            fn drop(&mut self) {
                DROPS.fetch_add(1, Ordering::SeqCst);
            }
        }
        let slot = PerProcess::new(Counted(1));
        let retired = slot.retire().expect("a value to retire");
        assert!(slot.get().is_none());
        assert!(slot.retire().is_none(), "nothing left to retire");
        let fresh = slot.get_or_try_init(|inherited| {
            assert!(inherited.is_none(), "a retired value is not inherited");
            Ok::<_, ()>(Counted(2))
        });
        assert_eq!(fresh.map(|value| value.0), Ok(2));
        assert_eq!(retired.0, 1, "still readable after its replacement");
        assert!(slot.retire().is_some());
        assert_eq!(DROPS.load(Ordering::SeqCst), 0);
        drop(slot);
        assert_eq!(DROPS.load(Ordering::SeqCst), 2);
    }
}
