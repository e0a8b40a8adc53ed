//! `Runtime`: a tokio runtime per process, so that a runtime built before `fork()` has a
//! working counterpart in every forked child.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::Duration;

use tokio::runtime::{Builder, Handle, RuntimeFlavor};
use tokio::task::JoinHandle;

use crate::fork::{current_epoch, Epoch, PerProcess};

/// How long an idle blocking-pool thread of [`Runtime::new`]'s runtime lives: in effect for
/// ever. A thread that ends takes std's thread-info lock on its way out; a fork in that instant
/// copies the lock held into the child, whose runtime then cannot start a thread
/// ([docs/how-it-works.md](https://github.com/forksafe-pool/forksafe-pool/blob/main/docs/how-it-works.md)).
/// tokio's default (10 s) would end threads all the time in an idle master.
const BLOCKING_THREADS_KEEP_ALIVE: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// A tokio runtime per process: the runtime of the process that built it, and in a forked child
/// a runtime of the child's own, built on first use there.
///
/// A tokio runtime does not survive `fork()`: the child has none of its worker or blocking
/// threads, and its I/O driver's epoll instance is the parent's own kernel object, so a child
/// that drives it (or just drops it, which deregisters every socket) changes the parent's
/// interest list. A task spawned onto it in the child never runs; a `block_on` waits for ever.
/// `Runtime` never touches the inherited runtime in the child — never drives, drops or
/// deregisters anything through it (it is leaked, like every inherited value of this crate) —
/// and builds the child's own from the same recipe the first time the child uses it.
///
/// ```
/// # fn main() -> std::io::Result<()> {
/// use forksafe_pool::Runtime;
/// use nix::sys::wait::{waitpid, WaitStatus};
/// use nix::unistd::{fork, ForkResult};
///
/// let runtime = Runtime::new()?; // in the master, at start-up
/// assert_eq!(runtime.block_on(async { 40 + 2 }), 42);
///
/// // SAFETY (for the example): the child only uses the runtime and leaves with `_exit`.
/// match unsafe { fork() }? {
///     ForkResult::Child => {
/// #       // A deadline: a hung child dies of SIGALRM, so the test fails instead of hanging.
/// #       unsafe { libc::alarm(20) };
///         // The child's own runtime: spawned tasks run, timers fire.
///         let task = runtime.spawn(async { std::process::id() });
///         let ran_here = runtime.block_on(task).unwrap() == std::process::id();
///         unsafe { libc::_exit(if ran_here { 0 } else { 1 }) };
///     }
///     ForkResult::Parent { child } => {
///         assert_eq!(waitpid(child, None)?, WaitStatus::Exited(child, 0));
///         assert_eq!(runtime.block_on(async { 1 }), 1); // the master's runtime still works
///     }
/// }
/// # Ok(())
/// # }
/// ```
///
/// `Runtime` is a cheap `Clone` (an `Arc`) and `Send + Sync`: keep it in a `static`
/// (`OnceLock<Runtime>`), in application state, or in the structs that need it.
///
/// # What to keep, what not to keep
///
/// Keep the `Runtime`, and ask it for [`handle`](Runtime::handle) where a
/// [`tokio::runtime::Handle`] is needed. A `Handle` stored *before* a fork is the parent's:
/// used in the child, what it spawns never runs. The same holds for anything that captured the
/// runtime it was made on — a `tokio::net::TcpStream`, a timer, a pool of tokio clients —
/// which is why the crate's async pools (`deadpool_postgres`,
/// `bb8_postgres`) are per process too.
///
/// # A fork inside the runtime
///
/// A program may fork from inside a runtime: a master whose `main` is `async` (under
/// `#[tokio::main]` or a `block_on`) forks its workers from a task. In the child, the forking
/// thread is still "inside" the parent's runtime as far as tokio's thread-local state knows,
/// and tokio refuses to start a runtime there ("Cannot start a runtime from within a runtime").
/// [`block_on`](Runtime::block_on) on such a thread of a forked child runs the future on that
/// thread with this process's runtime as the current one (its worker threads drive the I/O and
/// the timers), which needs a multi-thread runtime; with a current-thread one it panics and
/// says so. Everywhere else it is tokio's own `block_on`, panics included.
///
/// # Starting threads in a child
///
/// The child's runtime starts its threads with `std::thread`, which takes a process-global
/// std lock that a thread also takes when it ends. A fork in the instant a parent thread
/// starts or ends copies that lock held, and the child's runtime then cannot start. The
/// runtime [`new`](Runtime::new) builds keeps its idle blocking threads alive (tokio ends them
/// after 10 s) so that an idle master ends no thread; a master that keeps starting threads
/// while it forks still exposes its children to that lock.
pub struct Runtime {
    shared: Arc<Shared>,
}

struct Shared {
    runtimes: PerProcess<tokio::runtime::Runtime>,
    recipe: Box<dyn Fn() -> Builder + Send + Sync>,
    /// The process that built the first runtime: a runtime context found on a thread of a
    /// descendant may be inherited.
    built_in: Epoch,
}

impl Runtime {
    /// A multi-thread runtime with every driver this build of tokio has (I/O, time), built now
    /// in this process; a forked child builds its own the same way on first use.
    ///
    /// # Errors
    ///
    /// If tokio cannot build the runtime (it could not start its threads).
    pub fn new() -> io::Result<Runtime> {
        Runtime::with_builder(|| {
            let mut builder = Builder::new_multi_thread();
            builder
                .enable_all()
                .thread_keep_alive(BLOCKING_THREADS_KEEP_ALIVE);
            builder
        })
    }

    /// A runtime built now from the builder `recipe` returns; each forked child calls `recipe`
    /// again for its own runtime.
    ///
    /// ```
    /// use forksafe_pool::Runtime;
    ///
    /// let runtime = Runtime::with_builder(|| {
    ///     let mut builder = tokio::runtime::Builder::new_multi_thread();
    ///     builder.worker_threads(2).enable_all();
    ///     builder
    /// })?;
    /// assert_eq!(runtime.block_on(async { "ready" }), "ready");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// If the runtime cannot be built.
    pub fn with_builder(
        recipe: impl Fn() -> Builder + Send + Sync + 'static,
    ) -> io::Result<Runtime> {
        let first = recipe().build()?;
        Ok(Runtime {
            shared: Arc::new(Shared {
                runtimes: PerProcess::new(first),
                recipe: Box::new(recipe),
                built_in: current_epoch(),
            }),
        })
    }

    /// This process's runtime, built here first if this is a forked child.
    ///
    /// # Panics
    ///
    /// In a forked child whose runtime cannot be built (tokio could not start its threads).
    fn current(&self) -> &tokio::runtime::Runtime {
        if let Some(runtime) = self.shared.runtimes.get() {
            return runtime;
        }
        self.build_here()
    }

    #[cold]
    #[inline(never)]
    fn build_here(&self) -> &tokio::runtime::Runtime {
        // The inherited runtime is never looked at: see the type docs.
        match self
            .shared
            .runtimes
            .get_or_try_init(|_inherited| (self.shared.recipe)().build())
        {
            Ok(runtime) => runtime,
            Err(error) => panic!(
                "forksafe-pool: the tokio runtime of process {} could not be built: {error}",
                std::process::id()
            ),
        }
    }

    /// This process's runtime handle. Ask again after a fork: a handle kept from before it is
    /// the parent's.
    ///
    /// # Panics
    ///
    /// As [`block_on`](Runtime::block_on), if this process's runtime cannot be built.
    pub fn handle(&self) -> &Handle {
        self.current().handle()
    }

    /// Spawns `future` on this process's runtime.
    ///
    /// # Panics
    ///
    /// As [`block_on`](Runtime::block_on), if this process's runtime cannot be built.
    pub fn spawn<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.current().spawn(future)
    }

    /// Runs `future` to completion on this process's runtime, as tokio's `Runtime::block_on`.
    ///
    /// # Panics
    ///
    /// As tokio's `block_on` (called from inside a runtime of this process, say). In a forked
    /// child: if its runtime cannot be built (tokio could not start its threads), or if this
    /// is the thread that forked from inside the parent's runtime and the runtime is a
    /// current-thread one (see [A fork inside the runtime](Runtime#a-fork-inside-the-runtime)).
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        let runtime = self.current();
        if self.in_inherited_context() {
            assert!(
                runtime.handle().runtime_flavor() == RuntimeFlavor::MultiThread,
                "forksafe-pool: this thread forked from inside a tokio runtime, so a \
                 current-thread runtime cannot run here in the child; build the Runtime \
                 multi-threaded"
            );
            let _current = runtime.enter();
            return park_on(future);
        }
        runtime.block_on(future)
    }

    /// True on the thread of a forked child that was inside a runtime context when the fork
    /// copied it: tokio's thread-local state still says so, and only that thread of the child
    /// existed at the fork.
    fn in_inherited_context(&self) -> bool {
        current_epoch() != self.shared.built_in
            && crate::sys::thread_existed_at_fork()
            && Handle::try_current().is_ok()
    }
}

impl Clone for Runtime {
    fn clone(&self) -> Self {
        Runtime {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field(
                "this_process_has_one",
                &self.shared.runtimes.get().is_some(),
            )
            .finish_non_exhaustive()
    }
}

/// Polls `future` on the calling thread, parking it between polls: for a thread that must not
/// enter a runtime (tokio would refuse) while a multi-thread runtime's workers drive the I/O
/// and the timers the future waits on.
fn park_on<F: Future>(future: F) -> F::Output {
    struct Unpark(Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut context = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        thread::park();
    }
}
