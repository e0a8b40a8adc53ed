//! The idle connections of a `ProcessPool`, taken and given back without its lock.
//!
//! One slot per connection the pool may have open (`max_size`), each an atomic pointer to a
//! boxed connection or null. Each open connection owns one slot number for its whole life (the
//! pool hands the numbers out and takes them back under its lock), so a slot is only ever
//! filled by the one connection that owns it, and only while that connection is not in it:
//! `put` is a plain exchange that never finds the slot full, and nothing can be put into a slot
//! between a taker's read and its exchange. Taking is an exchange with null: whoever's
//! exchange returns the pointer owns the box. There is no list to corrupt and no node that can
//! come back at the same address while someone still reads it (the ABA problem of lock-free
//! stacks), so no memory reclamation scheme is needed.
//!
//! Every access is sequentially consistent: the pool pairs a slot access with a read of one of
//! its own atomics (waiters, the release count, whether it is full) in the order "write mine,
//! then read theirs" on both sides, so that of two threads racing, at least one sees the other.
//!
//! Slots are a cache line each, so that threads returning different connections do not
//! contend for one line.
#![allow(unsafe_code)]

use std::fmt;
use std::ptr;

use crate::sync::{AtomicPtr, Ordering};

pub(crate) struct IdleSlots<T> {
    slots: Box<[Slot<T>]>,
}

#[repr(align(64))]
struct Slot<T>(AtomicPtr<T>);

// SAFETY: the slots own the boxes they point to; a box moves to whichever thread takes it, so
// sharing the slots between threads needs only `T: Send`.
unsafe impl<T: Send> Sync for IdleSlots<T> {}
// SAFETY: as above: moving the slots moves ownership of the boxes they hold.
unsafe impl<T: Send> Send for IdleSlots<T> {}

impl<T> IdleSlots<T> {
    /// `count` empty slots, numbered from 0.
    pub(crate) fn new(count: usize) -> Self {
        IdleSlots {
            slots: (0..count)
                .map(|_| Slot(AtomicPtr::new(ptr::null_mut())))
                .collect(),
        }
    }

    /// Puts `value` into `slot`, which its owner left empty when it took the value out.
    pub(crate) fn put(&self, slot: usize, value: Box<T>) {
        let displaced = self.slots[slot]
            .0
            .swap(Box::into_raw(value), Ordering::SeqCst);
        debug_assert!(displaced.is_null(), "slot {slot} was filled by another");
        if !displaced.is_null() {
            // SAFETY: a non-null slot pointer came from `Box::into_raw` and the exchange made
            // this thread its only owner.
            drop(unsafe { Box::from_raw(displaced) });
        }
    }

    /// Takes what `slot` holds, if anything.
    pub(crate) fn take(&self, slot: usize) -> Option<Box<T>> {
        let taken = self.slots[slot].0.swap(ptr::null_mut(), Ordering::SeqCst);
        // SAFETY: non-null slot pointers come from `Box::into_raw` in `put`, and the exchange
        // made this thread its only owner.
        (!taken.is_null()).then(|| unsafe { Box::from_raw(taken) })
    }

    /// Takes the value of the lowest-numbered full slot, if any: the connections used most
    /// recently stay in use and the others idle, so that an idle timeout can close them, as
    /// with r2d2's last-in-first-out idle list.
    pub(crate) fn take_any(&self) -> Option<Box<T>> {
        (0..self.slots.len()).find_map(|slot| {
            // A plain read first: only a full slot is worth an exchange.
            if self.slots[slot].0.load(Ordering::SeqCst).is_null() {
                None
            } else {
                self.take(slot)
            }
        })
    }

    /// How many slots hold a value at the moment each is read.
    pub(crate) fn count(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| !slot.0.load(Ordering::SeqCst).is_null())
            .count()
    }

    /// Whether some slot holds a value.
    pub(crate) fn any(&self) -> bool {
        self.slots
            .iter()
            .any(|slot| !slot.0.load(Ordering::SeqCst).is_null())
    }

    /// Takes every value there is, in slot order.
    pub(crate) fn take_all(&self) -> Vec<Box<T>> {
        (0..self.slots.len())
            .filter_map(|slot| self.take(slot))
            .collect()
    }
}

impl<T> Drop for IdleSlots<T> {
    fn drop(&mut self) {
        drop(self.take_all());
    }
}

impl<T> fmt::Debug for IdleSlots<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdleSlots")
            .field("slots", &self.slots.len())
            .field("full", &self.count())
            .finish()
    }
}

#[cfg(all(test, not(forksafe_loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    #[test]
    fn takes_lowest_first_and_each_value_once() {
        let slots = IdleSlots::new(4);
        slots.put(2, Box::new(20));
        slots.put(1, Box::new(10));
        assert_eq!(slots.count(), 2);
        assert_eq!(slots.take_any().map(|value| *value), Some(10));
        assert_eq!(slots.take(1), None);
        assert_eq!(slots.take(2).map(|value| *value), Some(20));
        assert!(!slots.any());
        assert_eq!(slots.take_any(), None);
    }

    #[test]
    fn racing_takers_and_owners_never_lose_nor_duplicate_a_value() {
        // Each of 4 values lives in its own slot; 8 threads take any value, check they alone
        // hold it, and put it back into its slot, 20 000 times each.
        static HELD: [AtomicUsize; 4] = [const { AtomicUsize::new(0) }; 4];
        let slots = Arc::new(IdleSlots::new(4));
        for slot in 0..4 {
            slots.put(slot, Box::new(slot));
        }
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let slots = Arc::clone(&slots);
                std::thread::spawn(move || {
                    let mut taken = 0;
                    while taken < 20_000 {
                        let Some(value) = slots.take_any() else {
                            std::thread::yield_now();
                            continue;
                        };
                        assert_eq!(HELD[*value].fetch_add(1, Ordering::SeqCst), 0);
                        HELD[*value].fetch_sub(1, Ordering::SeqCst);
                        slots.put(*value, value);
                        taken += 1;
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("no value held twice");
        }
        let mut values: Vec<usize> = slots.take_all().into_iter().map(|value| *value).collect();
        values.sort_unstable();
        assert_eq!(values, vec![0, 1, 2, 3]);
    }

    #[test]
    fn dropping_the_slots_drops_what_they_hold() {
        let value = Arc::new(());
        let slots = IdleSlots::new(2);
        slots.put(1, Box::new(Arc::clone(&value)));
        drop(slots);
        assert_eq!(Arc::strong_count(&value), 1);
    }
}
