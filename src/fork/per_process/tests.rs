use super::*;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// A value that counts its drops in `drops`.
struct Counted {
    number: u32,
    drops: Arc<AtomicUsize>,
}

impl Counted {
    fn new(number: u32, drops: &Arc<AtomicUsize>) -> Counted {
        Counted {
            number,
            drops: Arc::clone(drops),
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn a_retired_value_is_freed_when_its_last_read_ends() {
    let drops = Arc::new(AtomicUsize::new(0));
    let slot = PerProcess::new_retirable(Counted::new(1, &drops));
    assert!(
        slot.get().is_none(),
        "a retirable value is only read with a count"
    );
    let reading = slot.read().expect("the value");
    let retired = slot.retire().expect("a value to retire");
    assert!(slot.read().is_none());
    assert!(slot.retire().is_none(), "nothing left to retire");
    let fresh = slot.read_or_try_init(|inherited| {
        assert!(inherited.is_none(), "a retired value is not inherited");
        Ok::<_, ()>(Counted::new(2, &drops))
    });
    assert_eq!(fresh.map(|value| value.number), Ok(2));
    assert_eq!(retired.number, 1, "still readable after its replacement");
    drop(retired);
    assert_eq!(drops.load(Ordering::SeqCst), 0, "a read of it is alive");
    assert_eq!(reading.number, 1);
    drop(reading);
    assert_eq!(drops.load(Ordering::SeqCst), 1, "freed by its last read");
    // With no read alive, the retirer's own read frees it.
    drop(slot.retire());
    assert_eq!(drops.load(Ordering::SeqCst), 2);
    let third = slot.read_or_try_init(|_| Ok::<_, ()>(Counted::new(3, &drops)));
    drop(third);
    drop(slot);
    assert_eq!(
        drops.load(Ordering::SeqCst),
        3,
        "the container frees the rest"
    );
}

#[test]
fn values_retired_during_a_read_wait_for_it_then_go() {
    let drops = Arc::new(AtomicUsize::new(0));
    let slot = PerProcess::new_retirable(Counted::new(0, &drops));
    let long = slot.read().expect("the value");
    for number in 1..=100 {
        drop(slot.retire());
        drop(slot.read_or_try_init(|_| Ok::<_, ()>(Counted::new(number, &drops))));
    }
    // A read's counter cannot say which value it saw: every value retired while it is in
    // flight waits for it (which is why the pool keeps its reads short).
    assert_eq!(drops.load(Ordering::SeqCst), 0);
    assert_eq!(long.number, 0);
    drop(long);
    assert_eq!(
        drops.load(Ordering::SeqCst),
        100,
        "freed by the end of the read"
    );
    drop(slot);
    assert_eq!(drops.load(Ordering::SeqCst), 101);
}

#[test]
fn readers_never_see_a_freed_value_while_another_thread_retires() {
    struct Checked {
        alive: AtomicBool,
        drops: Arc<AtomicUsize>,
    }
    impl Drop for Checked {
        fn drop(&mut self) {
            self.alive.store(false, Ordering::SeqCst);
            self.drops.fetch_add(1, Ordering::SeqCst);
        }
    }
    let drops = Arc::new(AtomicUsize::new(0));
    let make = || Checked {
        alive: AtomicBool::new(true),
        drops: Arc::clone(&drops),
    };
    let slot = PerProcess::new_retirable(make());
    let stop = AtomicBool::new(false);
    let made = AtomicUsize::new(1);
    std::thread::scope(|scope| {
        for _ in 0..3 {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let read = slot.read_or_try_init(|_| {
                        made.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, ()>(make())
                    });
                    let read = read.expect("infallible");
                    for _ in 0..10 {
                        assert!(read.alive.load(Ordering::SeqCst), "read a freed value");
                    }
                }
            });
        }
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while made.load(Ordering::SeqCst) < 500 && std::time::Instant::now() < until {
            drop(slot.retire());
            std::thread::yield_now();
        }
        stop.store(true, Ordering::Relaxed);
    });
    drop(slot.read());
    let made = made.load(Ordering::SeqCst);
    let freed = drops.load(Ordering::SeqCst);
    assert!(made >= 500, "only {made} values made");
    // The last read freed every retired value; only the current one is left.
    assert!(made - freed <= 1, "{freed} of {made} values freed");
    drop(slot);
    assert_eq!(drops.load(Ordering::SeqCst), made);
}

#[test]
fn values_of_a_container_that_never_retires_are_read_without_a_count() {
    let slot = PerProcess::new(7);
    let read = slot.read().expect("the value");
    assert!(read.counted.is_none());
    assert_eq!(*read, 7);
    assert_eq!(slot.get(), Some(&7));
    assert!(
        slot.retire().is_none(),
        "only a retirable container retires"
    );
}
