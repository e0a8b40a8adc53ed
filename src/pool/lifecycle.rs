//! The hooks a pre-forking server may call around its forks: `warm_up` after a fork (or after
//! `build_unchecked`), `release_idle` before one.

use std::time::{Duration, Instant};

use r2d2::ManageConnection;

use super::Pool;
use crate::error_kind::WARM_UP_SHORT;
use crate::generation_pool::GenerationPool;
use crate::r2d2_compat::r2d2_error;

impl<M: ManageConnection> Pool<M> {
    /// Waits until this process's pool holds its `min_idle` connections (all `max_size` when
    /// `min_idle` is `None`), at most `connection_timeout` — rebuilding it first in a forked
    /// child. Call it in a worker right after `fork()` (uWSGI's `@postfork`, a gunicorn
    /// `post_fork` hook) so the first request does not pay for connecting; or in the master
    /// after [`Builder::build_unchecked`](crate::Builder::build_unchecked).
    ///
    /// ```
    /// use diesel::r2d2::ConnectionManager;
    /// use diesel::SqliteConnection;
    ///
    /// let pool = forksafe_pool::Pool::builder()
    ///     .max_size(3)
    ///     .min_idle(Some(2))
    ///     .build_unchecked(ConnectionManager::<SqliteConnection>::new(":memory:"));
    /// pool.warm_up()?;
    /// assert!(pool.state().connections >= 2);
    /// # Ok::<(), forksafe_pool::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// r2d2's "timed out waiting for connection" error, with the last connection error, when
    /// the connections could not be opened in time; with [`OnFork::Fail`](crate::OnFork::Fail),
    /// in a forked child, the error `get` returns there.
    pub fn warm_up(&self) -> Result<(), r2d2::Error> {
        let generation = self.generation();
        if let Some(refusal) = generation.pool.refusal() {
            return Err(refusal);
        }
        let config = &self.shared.config;
        let wanted = config.settings.min_idle_or_max_size();
        let timeout = config.settings.connection_timeout;
        let deadline = Instant::now() + timeout;
        let opened_too_few = |opened: u32| {
            r2d2_error(format!(
                "{WARM_UP_SHORT} {opened} of {wanted} connections within {timeout:?}"
            ))
        };
        if let GenerationPool::Own(pool) = &generation.pool {
            // r2d2's own error carries the last connection error; without one (connects still
            // running at the deadline), say how far the pool got.
            return pool
                .warm_up(deadline)
                .map_err(|(last_error, opened)| match last_error {
                    Some(error) => r2d2_error(error),
                    None => opened_too_few(opened),
                });
        }
        // r2d2's pool keeps trying on its own worker threads. The wait holds r2d2's pool, not
        // the generation (see `checkout_elsewhere`).
        let GenerationPool::R2d2(pool) = &generation.pool else {
            unreachable!("a generation is this crate's pool, r2d2's or a refusing one");
        };
        let pool = pool.clone();
        drop(generation);
        while pool.state().connections < wanted {
            if Instant::now() >= deadline {
                let opened = pool.state().connections;
                return Err(match pool.get_timeout(Duration::from_nanos(1)) {
                    Err(error) => error,
                    Ok(_) => opened_too_few(opened),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Closes this process's idle connections now, and every checked-out one when it is
    /// returned; the pool opens new ones only when it is next used. Call it in a master right
    /// before forking workers (Unicorn's `before_fork`): the children then inherit no
    /// connection at all, so there is nothing for them to discard, and the master's database
    /// sessions end now instead of lingering as long as some child holds a copy of their
    /// sockets. Returns how many idle connections were closed.
    ///
    /// ```
    /// use diesel::r2d2::ConnectionManager;
    /// use diesel::SqliteConnection;
    ///
    /// let pool = forksafe_pool::Pool::builder()
    ///     .max_size(2)
    ///     .build(ConnectionManager::<SqliteConnection>::new(":memory:"))?;
    /// assert_eq!(pool.release_idle(), 2);
    /// // ... fork the workers here ...
    /// assert!(pool.get().is_ok(), "the master can still use it: it reconnects on demand");
    /// # Ok::<(), forksafe_pool::Error>(())
    /// ```
    ///
    /// How: the pool tells connections apart by the `release_idle` call they were opened
    /// after. Every connection opened, or still being opened, before this call is closed when
    /// it is returned or when its connect finishes — never pooled — so once the work in flight
    /// has ended the released connections are all closed; each close runs inside a driver
    /// section, so a concurrent `fork()` waits for it. Until the pool is next used (`get`,
    /// `try_get`, `warm_up`) nothing is opened in the background, so a released pool stays
    /// empty; a `get` already waiting goes on waiting, for a new connection. The pool stays the
    /// same object: a call leaves no memory and no background job behind, and old and new
    /// connections together stay within `max_size`. In a forked child of a pool built with
    /// [`OnFork::Fail`](crate::OnFork::Fail) it does nothing and returns 0.
    ///
    /// A pool with an event handler runs on r2d2 in the process that built it, and r2d2
    /// reopens `min_idle` connections as soon as any are closed. There this process's r2d2 pool
    /// (its *generation*) is retired instead, and the next use builds a new one. A retired
    /// generation opens no connection and closes every connection that comes back to it or
    /// whose connect ends after the call, and a job on its thread pool closes what r2d2 parks
    /// in its idle list until none of its connections is open. A forked child releases what
    /// every retired generation still holds. The generation is freed once no thread is still
    /// inside a call that reached it (a `get` waiting on it holds only r2d2's pool, which lives
    /// as long as that wait and the connections it hands out), and r2d2's pool is dropped with
    /// its last connection. Without a [`thread_pool`](crate::Builder::thread_pool) of yours, each
    /// generation runs on three threads of its own, as r2d2 would give it, which end with its
    /// r2d2 pool, and with them r2d2's jobs for it (its reaper, its retries of the reconnects
    /// the retired generation refuses). So nothing of a retired generation outlives its
    /// connections, and `release_idle` may be called as often as needed; each call costs the
    /// next use a new r2d2 pool and three new threads. With a thread pool of yours, r2d2
    /// leaves its reaper job on it for each retired generation, as dropping any `r2d2::Pool`
    /// does: a job every 30 seconds that finds its pool gone, about half a kilobyte each (5 MiB
    /// after 10 000 calls), so there call it before forking rather than in a loop. A thread
    /// that was waiting in `get` on a retired generation waits out its timeout and then tries
    /// the new one.
    pub fn release_idle(&self) -> u32 {
        let Some(generation) = self.shared.generation.read() else {
            return 0;
        };
        let closed = match &generation.pool {
            GenerationPool::Own(pool) => pool.release_idle(),
            GenerationPool::R2d2(_) => {
                drop(generation);
                self.retire_r2d2_generation()
            }
            GenerationPool::Refusing(_) => return 0,
        };
        tracing::debug!(
            pid = std::process::id(),
            closed,
            "forksafe-pool: idle connections released; the pool reconnects on next use"
        );
        closed
    }

    /// `release_idle` for a pool on r2d2, which would open `min_idle` connections again at
    /// once: its generation is retired and the next use builds another.
    pub(super) fn retire_r2d2_generation(&self) -> u32 {
        match self.shared.generation.retire() {
            Some(retired) => retired.retire(),
            None => 0,
        }
    }
}
