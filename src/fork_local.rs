//! `ForkLocal<T>`: any value a process must not share with its forked children — a client
//! with a socket, a random generator's state, a cache of prepared statements — built lazily,
//! once per process, on the same fork detection the pool uses.

use std::convert::Infallible;
use std::fmt;

use crate::fork::PerProcess;

/// A value built lazily, once per process: a forked child that asks for it builds its own.
///
/// `ForkLocal::new(init)` stores the initialiser; [`get`](ForkLocal::get) returns the calling
/// process's value, building it with `init` on first use. In a process forked after the value
/// was built, the first `get` calls `init` again and every later `get` in that child returns
/// the child's own value. The value the child inherited is never dropped, never handed out and
/// never touched there: it belongs to the parent (its sockets, threads and locks are the
/// parent's, or exist only in the parent). Fork detection is the crate's one detector, shared
/// with [`Pool`](crate::Pool): one load and one compare on the hot path.
///
/// ```
/// use forksafe_pool::ForkLocal;
///
/// // Anything that must not cross fork(): here, a value that records who built it.
/// static SESSION: ForkLocal<(u32, u64)> =
///     ForkLocal::new(|| (std::process::id(), rand_seed()));
/// # fn rand_seed() -> u64 { 42 }
///
/// let (built_by, _seed) = *SESSION.get();
/// assert_eq!(built_by, std::process::id());
/// // Built once: every later call in this process returns the same value.
/// assert!(std::ptr::eq(SESSION.get(), SESSION.get()));
/// ```
///
/// In a `static`, the initialiser is a `fn() -> T` (a closure that captures nothing is one),
/// which is what the default type parameter `F` is. A `ForkLocal` made at run time may capture
/// what it needs, such as a URL; its type then names the closure, so a struct field is easiest
/// written with a boxed one, `ForkLocal<T, Box<dyn Fn() -> T + Send + Sync>>`.
///
/// # Fallible initialisers
///
/// [`try_new`](ForkLocal::try_new) takes an initialiser returning `Result<T, E>`, and
/// [`get_or_try`](ForkLocal::get_or_try) hands back the initialiser's own error, unchanged, so
/// `?` converts it as usual. Nothing is stored on error: the next call tries again.
///
/// # References taken before a fork
///
/// A `&T` obtained in the parent and still held in the child (a local variable that lives
/// across `fork()`) keeps pointing at the **parent's** value. That value is leaked in the
/// child — never freed or dropped there, even after the child builds its own value or drops
/// the `ForkLocal` — so the reference stays valid memory and reading plain data through it is
/// defined. But whatever it refers to is the parent's: a socket shared with the parent, a
/// thread that does not exist in the child, a lock that may be frozen. Do not use it in the
/// child; call `get` again for the child's own value. (Copies made before the fork, like the
/// pid above, are plain data and fine.)
///
/// # Threads, panics, re-entrance
///
/// `ForkLocal<T>` is `Sync` when `T` is `Send + Sync`, like `OnceLock<T>`. When several threads
/// of one process ask for the value at once, one runs `init` and the others wait for it; a
/// fork that catches a parent thread inside `init` does not make the child wait (the lock word
/// records which process holds it). If `init` panics, the panic reaches the caller and nothing
/// is stored. `init` must not call `get` on the same `ForkLocal`: it would wait for itself
/// forever.
///
/// The value made in a process is dropped when the `ForkLocal` is dropped in that process (a
/// `static` never is).
pub struct ForkLocal<T, F = fn() -> T> {
    values: PerProcess<T>,
    init: F,
}

impl<T, F> ForkLocal<T, F> {
    crate::sync::const_fn_unless_loom! {
        /// A value that each process builds with `init` the first time it asks for it.
        ///
        /// `const`, so it can initialise a `static`:
        ///
        /// ```
        /// use std::sync::atomic::{AtomicU64, Ordering};
        /// use forksafe_pool::ForkLocal;
        ///
        /// /// A per-process counter: a forked worker starts from zero, not from the master's count.
        /// static REQUESTS: ForkLocal<AtomicU64> = ForkLocal::new(|| AtomicU64::new(0));
        ///
        /// REQUESTS.get().fetch_add(1, Ordering::Relaxed);
        /// assert_eq!(REQUESTS.get().load(Ordering::Relaxed), 1);
        /// ```
        pub fn new(init: F) -> Self
        where
            F: Fn() -> T,
        {
            ForkLocal {
                values: PerProcess::empty(),
                init,
            }
        }
    }

    crate::sync::const_fn_unless_loom! {
        /// A value that each process builds with the fallible `init` the first time it asks for it
        /// through [`get_or_try`](ForkLocal::get_or_try).
        ///
        /// ```
        /// use forksafe_pool::ForkLocal;
        ///
        /// let url = String::from("postgres://localhost/app");
        /// let parsed = ForkLocal::try_new(move || url.parse::<std::net::SocketAddr>());
        /// // A URL is not a socket address: the initialiser's own error comes back, nothing is
        /// // stored, and the next call would try again.
        /// assert!(parsed.get_or_try().is_err());
        /// ```
        pub fn try_new<E>(init: F) -> Self
        where
            F: Fn() -> Result<T, E>,
        {
            ForkLocal {
                values: PerProcess::empty(),
                init,
            }
        }
    }

    /// The calling process's value, built with the initialiser on the first call in this
    /// process (including the first call in a forked child).
    ///
    /// ```
    /// use forksafe_pool::ForkLocal;
    ///
    /// let greeting = ForkLocal::new(|| format!("hello from {}", std::process::id()));
    /// assert_eq!(*greeting.get(), format!("hello from {}", std::process::id()));
    /// ```
    ///
    /// # Panics
    ///
    /// If the initialiser panics; nothing is stored then, and the next call tries again.
    #[inline]
    pub fn get(&self) -> &T
    where
        F: Fn() -> T,
    {
        match self
            .values
            .get_or_try_init(|_inherited| Ok::<T, Infallible>((self.init)()))
        {
            Ok(value) => value,
            Err(never) => match never {},
        }
    }

    /// The calling process's value, built with the fallible initialiser on the first call in
    /// this process that succeeds.
    ///
    /// ```
    /// use forksafe_pool::ForkLocal;
    ///
    /// let config = ForkLocal::try_new(|| "4".parse::<u32>());
    /// assert_eq!(config.get_or_try(), Ok(&4));
    /// ```
    ///
    /// # Errors
    ///
    /// The initialiser's own error, unchanged. Nothing is stored, so the next call runs the
    /// initialiser again.
    #[inline]
    pub fn get_or_try<E>(&self) -> Result<&T, E>
    where
        F: Fn() -> Result<T, E>,
    {
        self.values.get_or_try_init(|_inherited| (self.init)())
    }

    /// The calling process's value if it has built one, without building it.
    ///
    /// ```
    /// use forksafe_pool::ForkLocal;
    ///
    /// let lazy = ForkLocal::new(|| 7);
    /// assert_eq!(lazy.get_if_built(), None);
    /// lazy.get();
    /// assert_eq!(lazy.get_if_built(), Some(&7));
    /// ```
    #[inline]
    pub fn get_if_built(&self) -> Option<&T> {
        self.values.get()
    }
}

impl<T: fmt::Debug, F> fmt::Debug for ForkLocal<T, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.values.get() {
            Some(value) => f.debug_tuple("ForkLocal").field(value).finish(),
            None => f.write_str("ForkLocal(<not built in this process>)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn builds_once_even_when_threads_race() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let local = Arc::new(ForkLocal::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(5));
            String::from("value")
        }));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let local = Arc::clone(&local);
                std::thread::spawn(move || local.get() as *const String as usize)
            })
            .collect();
        let addresses: Vec<usize> = threads
            .into_iter()
            .map(|thread| thread.join().unwrap())
            .collect();
        assert!(addresses.windows(2).all(|pair| pair[0] == pair[1]));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_failed_initialiser_stores_nothing_and_is_retried() {
        let attempts = AtomicUsize::new(0);
        let local = ForkLocal::try_new(|| match attempts.fetch_add(1, Ordering::SeqCst) {
            0 => Err("first attempt fails"),
            n => Ok(n),
        });
        assert_eq!(local.get_or_try(), Err("first attempt fails"));
        assert_eq!(local.get_if_built(), None);
        assert_eq!(local.get_or_try(), Ok(&1));
        assert_eq!(local.get_or_try(), Ok(&1));
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_panicking_initialiser_does_not_block_the_next_call() {
        let first = AtomicUsize::new(0);
        let local = ForkLocal::new(|| {
            assert!(
                first.fetch_add(1, Ordering::SeqCst) > 0,
                "first call panics"
            );
            5
        });
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| *local.get()));
        assert!(caught.is_err());
        assert_eq!(*local.get(), 5);
    }

    #[test]
    fn is_sync_and_send() {
        fn assert_sync_send<S: Sync + Send>() {}
        assert_sync_send::<ForkLocal<String>>();
        assert_sync_send::<ForkLocal<String, Box<dyn Fn() -> String + Send + Sync>>>();
    }
}
