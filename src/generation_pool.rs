//! What a generation checks out from: this crate's [`ProcessPool`], r2d2's pool, or nothing.
//!
//! The process that built a `Pool` with an event handler runs on r2d2, because only r2d2 can
//! make r2d2's event values; every other generation runs on `ProcessPool`. A forked child of a
//! pool built with `OnFork::Fail` has no pool at all and refuses every checkout with the
//! message it holds: that refusal is the one place the crate keeps "this pool won't connect
//! here".

use std::time::Duration;

use r2d2::ManageConnection;

use crate::connection::Checkout;
use crate::manager::ForkSafeManager;
use crate::process_pool::ProcessPool;
use crate::r2d2_compat::{r2d2_error, r2d2_state};

/// The pool of one generation.
pub(crate) enum GenerationPool<M: ManageConnection> {
    Own(ProcessPool<M>),
    R2d2(r2d2::Pool<ForkSafeManager<M>>),
    /// No pool: a forked child of a pool built with `OnFork::Fail`. Every `get` fails with this
    /// message, `try_get` finds nothing and nothing is ever open.
    Refusing(String),
}

impl<M: ManageConnection> GenerationPool<M> {
    // Inlined so the guard is built in place instead of being copied once more per checkout.
    #[inline]
    pub(crate) fn get_timeout(&self, timeout: Duration) -> Result<Checkout<M>, r2d2::Error> {
        match self {
            GenerationPool::R2d2(pool) => pool.get_timeout(timeout).map(Checkout::R2d2),
            GenerationPool::Own(pool) => pool.get_timeout(timeout).map(Checkout::Own),
            GenerationPool::Refusing(refusal) => Err(r2d2_error(refusal.clone())),
        }
    }

    pub(crate) fn try_get(&self) -> Option<Checkout<M>> {
        match self {
            GenerationPool::R2d2(pool) => pool.try_get().map(Checkout::R2d2),
            GenerationPool::Own(pool) => pool.try_get().map(Checkout::Own),
            GenerationPool::Refusing(_) => None,
        }
    }

    pub(crate) fn state(&self) -> r2d2::State {
        match self {
            GenerationPool::R2d2(pool) => pool.state(),
            GenerationPool::Own(pool) => pool.state(),
            GenerationPool::Refusing(_) => r2d2_state(0, 0),
        }
    }

    /// The error every checkout of a refusing pool fails with; `None` for a pool that connects.
    pub(crate) fn refusal(&self) -> Option<r2d2::Error> {
        match self {
            GenerationPool::Refusing(refusal) => Some(r2d2_error(refusal.clone())),
            _ => None,
        }
    }
}
