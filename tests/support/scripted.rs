//! A manager whose connects fail, panic, hang or take time as a test scripts them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The message of a [`ScriptedManager`]'s panics.
pub const SCRIPTED_PANIC: &str = "the driver panicked while connecting";

/// Keeps the panic hook quiet about [`ScriptedManager`]'s panics (and only those). The default
/// hook prints a backtrace when `RUST_BACKTRACE` is set, and resolving its symbols can take
/// longer than the `connection_timeout` of a test that waits for the panicked attempt to end.
pub fn quiet_scripted_panics() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<String>().map(String::as_str) != Some(SCRIPTED_PANIC) {
                default(info);
            }
        }));
    });
}

/// Connections are numbers; fails or panics on as many of the next connects as it is told to,
/// then connects. Clones share the script and the counts.
#[derive(Clone, Debug, Default)]
pub struct ScriptedManager(Arc<Script>);

#[derive(Debug, Default)]
pub struct Script {
    /// How many of the next connects hang for `hang_micros`, then connect.
    pub hang_next: std::sync::atomic::AtomicU32,
    /// How long a hanging connect hangs, in microseconds.
    pub hang_micros: AtomicU64,
    /// How many of the next connects (after the hanging ones) fail with "no server yet".
    pub fail_next: std::sync::atomic::AtomicU32,
    /// How many of the next connects (after the failing ones) panic.
    pub panic_next: std::sync::atomic::AtomicU32,
    /// Connects attempted, whatever their outcome.
    pub attempts: std::sync::atomic::AtomicU32,
    /// Connections opened.
    pub opened: std::sync::atomic::AtomicU32,
    /// How long each connect takes, in microseconds.
    pub connect_micros: AtomicU64,
}

impl ScriptedManager {
    /// A manager whose first `failures` connects fail.
    pub fn failing_first(failures: u32) -> ScriptedManager {
        let manager = ScriptedManager::default();
        manager.0.fail_next.store(failures, Ordering::SeqCst);
        manager
    }

    /// A manager whose first `panics` connects panic.
    pub fn panicking_first(panics: u32) -> ScriptedManager {
        let manager = ScriptedManager::default();
        manager.0.panic_next.store(panics, Ordering::SeqCst);
        manager
    }

    /// Makes the next `count` connects hang for `time` (then connect).
    pub fn hanging_next(self, count: u32, time: Duration) -> ScriptedManager {
        self.0
            .hang_micros
            .store(time.as_micros() as u64, Ordering::SeqCst);
        self.0.hang_next.store(count, Ordering::SeqCst);
        self
    }

    /// Makes every connect take `time`.
    pub fn taking(self, time: Duration) -> ScriptedManager {
        self.0
            .connect_micros
            .store(time.as_micros() as u64, Ordering::SeqCst);
        self
    }

    pub fn script(&self) -> &Script {
        &self.0
    }

    pub fn attempts(&self) -> u32 {
        self.0.attempts.load(Ordering::SeqCst)
    }

    pub fn opened(&self) -> u32 {
        self.0.opened.load(Ordering::SeqCst)
    }

    /// Takes one from `counter` if it is above zero.
    fn take_one(counter: &std::sync::atomic::AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .is_ok()
    }
}

impl r2d2::ManageConnection for ScriptedManager {
    type Connection = u32;
    type Error = std::io::Error;

    fn connect(&self) -> std::io::Result<u32> {
        self.0.attempts.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_micros(
            self.0.connect_micros.load(Ordering::SeqCst),
        ));
        if Self::take_one(&self.0.hang_next) {
            std::thread::sleep(Duration::from_micros(
                self.0.hang_micros.load(Ordering::SeqCst),
            ));
        } else if Self::take_one(&self.0.fail_next) {
            return Err(std::io::Error::other("no server yet"));
        }
        if Self::take_one(&self.0.panic_next) {
            panic!("{SCRIPTED_PANIC}");
        }
        Ok(self.0.opened.fetch_add(1, Ordering::SeqCst))
    }

    fn is_valid(&self, _: &mut u32) -> std::io::Result<()> {
        Ok(())
    }

    fn has_broken(&self, _: &mut u32) -> bool {
        false
    }
}
