//! Loom models of `PerProcess` retirement (see `crate::sync` and `process_pool::models` for how
//! they run): a value retired while two threads read it is freed by whichever read ends last,
//! and never while a read can still see it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use loom::thread;

use super::PerProcess;

/// A value that says when it is dropped.
struct Traced(Arc<AtomicBool>);

impl Drop for Traced {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn models_a_retired_value_is_freed_by_the_last_read_and_not_before() {
    loom::model(|| {
        let freed = Arc::new(AtomicBool::new(false));
        let container = Arc::new(PerProcess::new_retirable(Traced(Arc::clone(&freed))));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (container, freed) = (Arc::clone(&container), Arc::clone(&freed));
                thread::spawn(move || {
                    if let Some(read) = container.read() {
                        assert!(!freed.load(Ordering::SeqCst), "read a freed value");
                        assert!(!read.0.load(Ordering::SeqCst));
                    }
                })
            })
            .collect();
        if let Some(retired) = container.retire() {
            assert!(
                !freed.load(Ordering::SeqCst),
                "freed while the retirer reads it"
            );
            drop(retired);
        }
        for reader in readers {
            reader.join().unwrap();
        }
        assert!(
            freed.load(Ordering::SeqCst),
            "every read ended, and the retired value is still allocated"
        );
    });
}
