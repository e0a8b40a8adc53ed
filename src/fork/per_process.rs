//! A value per process, replaced on first use in a forked child.
#![allow(unsafe_code)]

use crate::sync::{self, fence, AtomicBool, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::fmt;
use std::ops::Deref;
use std::ptr::{self, NonNull};

use super::epoch::{current_epoch, Epoch};
use super::grace::{Drained, ReaderCounts, BOTH_DRAINED};
use super::install_lock::InstallLock;

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
///
/// # Retiring
///
/// One made with [`new_retirable`](Self::new_retirable) can take the value of the process that
/// made it out of service ([`retire`](Self::retire)) and free it once no thread uses it any
/// more. Only that process's values are retirable, and only they are read through
/// [`read`](Self::read) with a count (see `grace`): a read enters a reader counter, so that a
/// retired value is freed after every read that could have seen it has ended. Reads elsewhere
/// — every value of one made with [`new`](Self::new) or [`empty`](Self::empty), every value of
/// a forked child — count nothing and stay a load and a compare. A child never frees, counts or
/// looks at the counters and retired values it inherits: parent threads that do not exist in
/// the child may have been in the middle of a read; those values are leaked like any
/// inherited one.
///
/// Who frees a retired value: whoever finds both counters drained while holding the install
/// lock — the end of a counted read while retired values wait (it only tries the lock, never
/// waits for it), and `Drop`. So a retired value is freed soon after the last read that could
/// have seen it ends: by the end of a later read (of two, while reads keep one counter busy),
/// or with the container. A counter cannot tell which value a read saw, so a read in flight
/// holds back everything retired meanwhile: callers keep counted reads short (the pool holds a
/// clone of r2d2's pool, not the generation, while it waits for a connection).
///
/// Why counters: a reader must be known to the reclaimer before it loads the pointer, or the
/// value could be freed between the load and the first use. An `Arc` per value would need the
/// same (its count is in the value it protects); hazard pointers would need a slot per thread.
/// Two shared counters cost a read two atomic read-modify-writes, paid only where a value can
/// be retired.
pub(crate) struct PerProcess<T> {
    /// The calling process's value when it is not retirable, or one inherited from a parent;
    /// freed only by `Drop`, so borrowed without counting.
    current: AtomicPtr<Owned<T>>,
    /// The value of the process `retirable_in`, which only counted reads borrow.
    counted: AtomicPtr<Owned<T>>,
    /// The process whose values can be retired; `None` for a container that never retires.
    retirable_in: Option<Epoch>,
    readers: ReaderCounts,
    installing: AtomicU64,
    /// Retired values not freed yet, newest first, linked through `Owned::retired_next`; only
    /// touched under the install lock, and only in the process `retirable_in`.
    retired: AtomicPtr<Owned<T>>,
    /// How many values `retired` holds: the end of a read looks here before trying to free.
    waiting: AtomicUsize,
    /// Set by a read that ended while retired values wait; the thread holding the install lock
    /// then looks at the counters again before it leaves (see `end_read`).
    look_again: AtomicBool,
}

struct Owned<T> {
    epoch: Epoch,
    value: T,
    /// The next older retired value; only written under the install lock, before this value
    /// is linked into `PerProcess::retired`.
    retired_next: AtomicPtr<Owned<T>>,
    /// Which reader counters were seen drained since this value was unpublished (under the
    /// install lock); freed when both were.
    drained: AtomicU8,
}

// SAFETY: a `PerProcess<T>` hands out `&T` to any thread (so `T: Sync`) and may drop its `T`
// on whichever thread drops it or ends the last read of a retired value (so `T: Send`); that
// is the same contract as `OnceLock<T>`.
unsafe impl<T: Send + Sync> Sync for PerProcess<T> {}
// SAFETY: as above: moving the container moves ownership of the `T` it may drop.
unsafe impl<T: Send> Send for PerProcess<T> {}

/// A borrow of a [`PerProcess`] value, counted when the value can be retired (see the type
/// docs); the value stays allocated until this is dropped.
pub(crate) struct Read<'a, T> {
    /// A raw pointer, not a reference: once the count is given back the value may be freed
    /// while this struct is still being dropped.
    owned: NonNull<Owned<T>>,
    /// The container and the reader counter this read entered, for a counted read.
    counted: Option<(&'a PerProcess<T>, usize)>,
}

impl<T> PerProcess<T> {
    crate::sync::const_fn_unless_loom! {
        /// Holds nothing yet: the first `get_or_try_init` in each process makes that process's
        /// value. `const`, so it can live in a `static`.
        pub(crate) fn empty() -> Self {
            PerProcess::with(ptr::null_mut(), ptr::null_mut(), None)
        }
    }

    /// Holds `value`, owned by the calling process.
    pub(crate) fn new(value: T) -> Self {
        PerProcess::with(Owned::boxed(value), ptr::null_mut(), None)
    }

    /// Holds `value`, owned by the calling process, whose values can be retired and are read
    /// with [`read`](Self::read).
    pub(crate) fn new_retirable(value: T) -> Self {
        PerProcess::with(ptr::null_mut(), Owned::boxed(value), Some(current_epoch()))
    }

    crate::sync::const_fn_unless_loom! {
        fn with(
            current: *mut Owned<T>,
            counted: *mut Owned<T>,
            retirable_in: Option<Epoch>,
        ) -> Self {
            PerProcess {
                current: AtomicPtr::new(current),
                counted: AtomicPtr::new(counted),
                retirable_in,
                readers: ReaderCounts::new(),
                installing: AtomicU64::new(0),
                retired: AtomicPtr::new(ptr::null_mut()),
                waiting: AtomicUsize::new(0),
                look_again: AtomicBool::new(false),
            }
        }
    }

    /// The calling process's value, if it has one and it cannot be retired; see
    /// [`read`](Self::read) for one made with `new_retirable`.
    #[inline]
    pub(crate) fn get(&self) -> Option<&T> {
        self.get_with_epoch().map(|(value, _)| value)
    }

    /// Like [`get`](Self::get), with the calling process's epoch, saving callers a second check.
    /// The hot path: a load and a compare.
    #[inline]
    pub(crate) fn get_with_epoch(&self) -> Option<(&T, Epoch)> {
        let owned = self.current.load(Ordering::Acquire);
        // SAFETY: `current` is null or points at an `Owned<T>` from `Box::into_raw`, published
        // with `Release`. A value published there is freed only by `Drop` (which has
        // `&mut self`); a replaced one is leaked. So the pointee outlives this borrow of `self`.
        let owned = unsafe { owned.as_ref() }?;
        (owned.epoch == current_epoch()).then_some((&owned.value, owned.epoch))
    }

    /// The calling process's value, if it has one, counted if it can be retired.
    pub(crate) fn read(&self) -> Option<Read<'_, T>> {
        if let Some(owned) = self.own_uncounted() {
            return Some(Read::uncounted(owned));
        }
        if self.retirable_in != Some(current_epoch()) {
            return None;
        }
        let counter = self.readers.enter();
        match NonNull::new(self.counted.load(Ordering::SeqCst)) {
            Some(owned) => Some(Read::counted(owned, self, counter)),
            None => {
                self.end_read(counter);
                None
            }
        }
    }

    /// The latest value the calling process found, even if a parent made it: only for reading
    /// what must be let go of (a table of atomics); never for using the parent's resources.
    /// Never a value the calling process could retire.
    pub(crate) fn get_even_inherited(&self) -> Option<&T> {
        // SAFETY: as in `get_with_epoch`: what `current` points at lives as long as `self`.
        if let Some(owned) = unsafe { self.current.load(Ordering::Acquire).as_ref() } {
            return Some(&owned.value);
        }
        if self.retirable_in == Some(current_epoch()) {
            return None;
        }
        // SAFETY: outside the process `retirable_in`, nothing frees what `counted` points at
        // (only that process retires, reclaims and, in `Drop`, frees it), so it lives as long
        // as `self`.
        unsafe { self.counted.load(Ordering::Acquire).as_ref() }.map(|owned| &owned.value)
    }

    /// The calling process's value, made with `init` if it has none. `init` is given the value
    /// inherited from the parent, if any, to let go of what it holds.
    ///
    /// # Panics
    ///
    /// In the process whose values can be retired: use
    /// [`read_or_try_init`](Self::read_or_try_init) there.
    pub(crate) fn get_or_try_init<E>(
        &self,
        init: impl FnOnce(Option<&T>) -> Result<T, E>,
    ) -> Result<&T, E> {
        if let Some(value) = self.get() {
            return Ok(value);
        }
        let read = self.install(init)?;
        assert!(
            read.counted.is_none(),
            "a retirable value is borrowed through `read`"
        );
        // SAFETY: an uncounted read is of a value published in `current`, which only `Drop`
        // frees, so it outlives the borrow of `self`.
        Ok(unsafe { &read.owned.as_ref().value })
    }

    /// Like [`get_or_try_init`](Self::get_or_try_init), for a container that may retire.
    pub(crate) fn read_or_try_init<E>(
        &self,
        init: impl FnOnce(Option<&T>) -> Result<T, E>,
    ) -> Result<Read<'_, T>, E> {
        match self.read() {
            Some(read) => Ok(read),
            None => self.install(init),
        }
    }

    #[cold]
    fn install<E>(&self, init: impl FnOnce(Option<&T>) -> Result<T, E>) -> Result<Read<'_, T>, E> {
        let here = current_epoch();
        let _lock = InstallLock::acquire(&self.installing, here);
        if self.retirable_in == Some(here) {
            // Nothing else publishes or retires while we hold the lock.
            let counter = self.readers.enter();
            if let Some(owned) = NonNull::new(self.counted.load(Ordering::SeqCst)) {
                return Ok(Read::counted(owned, self, counter));
            }
            self.readers.exit(counter);
            // A retired value is not inherited: it is this process's own, already let go of.
            let fresh = Owned::boxed(init(None)?);
            // Entered before publishing, as any read that may see the value must be.
            let counter = self.readers.enter();
            self.counted.store(fresh, Ordering::SeqCst);
            // SAFETY: `fresh` came from `Box::into_raw` just now.
            let owned = unsafe { NonNull::new_unchecked(fresh) };
            return Ok(Read::counted(owned, self, counter));
        }
        // Another thread of this process may have installed while we waited.
        if let Some(owned) = self.own_uncounted() {
            return Ok(Read::uncounted(owned));
        }
        let fresh = Owned::boxed(init(self.get_even_inherited())?);
        // The previous value (inherited, or none) is leaked on purpose: see the type docs.
        self.current.store(fresh, Ordering::Release);
        // SAFETY: `fresh` came from `Box::into_raw` just now.
        Ok(Read::uncounted(unsafe { NonNull::new_unchecked(fresh) }))
    }

    /// Takes the calling process's value out of service: `read` returns `None` until the next
    /// `read_or_try_init` makes a new one (which is given no inherited value). The retired value
    /// is returned as a read, and freed once that and every other read of it has ended. `None`
    /// if the calling process has no value or its values cannot be retired.
    pub(crate) fn retire(&self) -> Option<Read<'_, T>> {
        let here = current_epoch();
        if self.retirable_in != Some(here) {
            return None;
        }
        let _lock = InstallLock::acquire(&self.installing, here);
        // The retirer's own read is entered before the value is unpublished, like any other.
        let counter = self.readers.enter();
        let Some(owned) = NonNull::new(self.counted.load(Ordering::SeqCst)) else {
            self.readers.exit(counter);
            return None;
        };
        self.counted.store(ptr::null_mut(), Ordering::SeqCst);
        // SAFETY: `owned` was published until now, so it is allocated; its list fields are
        // only written under the install lock, which we hold.
        let value = unsafe { owned.as_ref() };
        value
            .retired_next
            .store(self.retired.load(Ordering::Relaxed), Ordering::Relaxed);
        self.retired.store(owned.as_ptr(), Ordering::Relaxed);
        self.waiting.fetch_add(1, Ordering::SeqCst);
        Some(Read::counted(owned, self, counter))
    }

    /// This process's value in `current`.
    fn own_uncounted(&self) -> Option<NonNull<Owned<T>>> {
        let owned = NonNull::new(self.current.load(Ordering::Acquire))?;
        // SAFETY: as in `get_with_epoch`.
        (unsafe { owned.as_ref() }.epoch == current_epoch()).then_some(owned)
    }

    /// Ends a counted read; if retired values wait, frees those no read can see any more.
    ///
    /// Only one thread looks at a time (the install lock, tried, never waited for). A read
    /// that ends while another thread looks asks it to look once more (`look_again`): the
    /// looker may have seen this read's counter busy, and nobody else might look for a long
    /// time. "Ask, then try the lock" on one side and "unlock, then check for asks" on the
    /// other (all sequentially consistent) leave no read unseen: either the looker's next
    /// check sees the ask, or the asker's try finds the lock free and looks itself.
    fn end_read(&self, counter: usize) {
        self.readers.exit(counter);
        // "Leave the counter, then read `waiting`", against a looker's "`waiting` raised, then
        // read the counters" (`unlink_unreachable`): a read that ends after a looker saw its
        // counter busy sees that something waits.
        sync::seq_cst_pairing();
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        // A read carried across `fork()` by the forking thread ends in the child: its counters
        // and retired values are the parent's, so it frees nothing.
        let here = current_epoch();
        if self.retirable_in != Some(here) {
            return;
        }
        self.look_again.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        while let Some(lock) = InstallLock::try_acquire(&self.installing, here) {
            self.look_again.store(false, Ordering::SeqCst);
            let freed = self.unlink_unreachable();
            drop(lock);
            // Dropped outside the lock: a value's drop may take time (a pool closing
            // connections).
            let mut next = freed;
            while let Some(owned) = NonNull::new(next) {
                // SAFETY: `unlink_unreachable` took these out of the list, which held each
                // once; both reader counters were seen drained after each was unpublished, so
                // no read of them is alive (see `grace`), and nothing else points at them.
                let owned = unsafe { Box::from_raw(owned.as_ptr()) };
                next = owned.retired_next.load(Ordering::Relaxed);
                drop(owned);
            }
            // "Unlock, then check for asks", against the asker's "ask, then try the lock".
            fence(Ordering::SeqCst);
            if !self.look_again.load(Ordering::SeqCst) || self.waiting.load(Ordering::SeqCst) == 0 {
                return;
            }
        }
    }

    /// Under the install lock: looks at the reader counters once, and takes out of the retired
    /// list, as a list of their own, the values no read can see any more.
    fn unlink_unreachable(&self) -> *mut Owned<T> {
        // Counts read after `waiting` was raised (by `retire`, under the same lock), against a
        // read's "leave the counter, then read `waiting`" (see `end_read`).
        sync::seq_cst_pairing();
        let drained: Drained = self.readers.drained();
        if drained == 0 {
            return ptr::null_mut();
        }
        let mut freed = ptr::null_mut();
        let mut link = &self.retired;
        loop {
            let current = link.load(Ordering::Relaxed);
            // SAFETY: the list holds values from `Box::into_raw`, unlinked (and then freed)
            // only here, under the install lock, which we hold.
            let Some(owned) = (unsafe { current.as_ref() }) else {
                break;
            };
            let seen = owned.drained.load(Ordering::Relaxed) | drained;
            owned.drained.store(seen, Ordering::Relaxed);
            if seen == BOTH_DRAINED {
                link.store(
                    owned.retired_next.load(Ordering::Relaxed),
                    Ordering::Relaxed,
                );
                owned.retired_next.store(freed, Ordering::Relaxed);
                freed = current;
                self.waiting.fetch_sub(1, Ordering::SeqCst);
            } else {
                link = &owned.retired_next;
            }
        }
        freed
    }
}

impl<T> Owned<T> {
    fn boxed(value: T) -> *mut Owned<T> {
        Box::into_raw(Box::new(Owned {
            epoch: current_epoch(),
            value,
            retired_next: AtomicPtr::new(ptr::null_mut()),
            drained: AtomicU8::new(0),
        }))
    }
}

impl<'a, T> Read<'a, T> {
    fn uncounted(owned: NonNull<Owned<T>>) -> Self {
        Read {
            owned,
            counted: None,
        }
    }

    fn counted(owned: NonNull<Owned<T>>, container: &'a PerProcess<T>, counter: usize) -> Self {
        Read {
            owned,
            counted: Some((container, counter)),
        }
    }

    /// The epoch of the process that made the value: the calling process's.
    pub(crate) fn epoch(&self) -> Epoch {
        // SAFETY: see `deref`.
        unsafe { self.owned.as_ref() }.epoch
    }
}

impl<T> Deref for Read<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: an uncounted read is of a value only `Drop` of the container frees, and the
        // container outlives `'a`; a counted one holds a reader count, so the value is not
        // freed before this read is dropped (see `grace`).
        unsafe { &self.owned.as_ref().value }
    }
}

impl<T> Drop for Read<'_, T> {
    fn drop(&mut self) {
        if let Some((container, counter)) = self.counted {
            container.end_read(counter);
        }
    }
}

impl<T> Drop for PerProcess<T> {
    /// Drops the values only in the process that made them; inherited ones are leaked.
    fn drop(&mut self) {
        let here = current_epoch();
        if self.retirable_in == Some(here) {
            // `&mut self` proves that no read is alive, so every retired value can go. (In
            // another process the list may have been caught mid-update by the fork, and its
            // values are the parent's: it is not even walked.)
            // (Loads rather than `get_mut`: `&mut self` already excludes every other access,
            // and loom's atomics, which the models use, have no `get_mut`.)
            let mut next = self.retired.load(Ordering::Relaxed);
            while let Some(owned) = NonNull::new(next) {
                // SAFETY: every retired pointer came from `Box::into_raw` and is linked once.
                let owned = unsafe { Box::from_raw(owned.as_ptr()) };
                next = owned.retired_next.load(Ordering::Relaxed);
            }
        }
        for slot in [&self.current, &self.counted] {
            let Some(owned) = NonNull::new(slot.load(Ordering::Relaxed)) else {
                continue;
            };
            // SAFETY: a published pointer came from `Box::into_raw`; `&mut self` proves no
            // read of it is alive, and nothing else frees it.
            let owned = unsafe { Box::from_raw(owned.as_ptr()) };
            if owned.epoch != here {
                std::mem::forget(owned);
            }
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for PerProcess<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.read() {
            Some(value) => f.debug_tuple("PerProcess").field(&*value).finish(),
            None => f.write_str("PerProcess(<none in this process>)"),
        }
    }
}

#[cfg(all(test, not(forksafe_loom)))]
mod tests;
