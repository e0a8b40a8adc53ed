//! One async pool per process.

use std::convert::Infallible;
use std::sync::Arc;

use super::Leased;
use crate::descriptors::DescriptorTable;
use crate::fork::{Epoch, PerProcess};
use crate::stats::{Counters, ForkStats};

/// The pool library's pool of the calling process, built from `build` the first time a forked
/// child asks for it. `build` is given the generation's descriptor table, which the pool's
/// connects record their sockets in.
pub(crate) struct PoolPerProcess<P> {
    generations: PerProcess<Generation<P>>,
    counters: Arc<Counters>,
    max_size: u32,
    build: BuildPool<P>,
}

/// Builds a process's pool, whose connects record their sockets in the table it is given.
type BuildPool<P> = Box<dyn Fn(&Arc<DescriptorTable>) -> P + Send + Sync>;

struct Generation<P> {
    pool: P,
    descriptors: Arc<DescriptorTable>,
}

impl<P> PoolPerProcess<P> {
    /// This process's pool is `first`, which records its sockets in `descriptors` (made with
    /// [`descriptor_table`](Self::descriptor_table)); a forked child's is made by `build`.
    pub(crate) fn new(
        first: P,
        descriptors: Arc<DescriptorTable>,
        counters: Arc<Counters>,
        max_size: u32,
        build: impl Fn(&Arc<DescriptorTable>) -> P + Send + Sync + 'static,
    ) -> Self {
        PoolPerProcess {
            generations: PerProcess::new(Generation {
                pool: first,
                descriptors,
            }),
            counters,
            max_size,
            build: Box::new(build),
        }
    }

    /// A descriptor table for a pool of `max_size` connections.
    pub(crate) fn descriptor_table(
        max_size: u32,
        counters: &Arc<Counters>,
    ) -> Arc<DescriptorTable> {
        DescriptorTable::new(max_size, Arc::clone(counters))
    }

    /// The calling process's pool and epoch. In a forked child, the first call releases the
    /// inherited pool's sockets and builds the child's own pool (`build` may need a runtime
    /// context: the libraries start their background tasks on the current runtime).
    #[inline]
    pub(crate) fn current(&self) -> (&P, Epoch) {
        match self.generations.get_with_epoch() {
            Some((generation, epoch)) => (&generation.pool, epoch),
            None => self.build_here(),
        }
    }

    #[cold]
    #[inline(never)]
    fn build_here(&self) -> (&P, Epoch) {
        let built = self.generations.get_or_try_init(|inherited| {
            if let Some(inherited) = inherited {
                // Only atomics and `dup3`: nothing of the parent's pool is touched.
                let discarded = inherited.descriptors.release_inherited();
                self.counters.record_rebuild(discarded);
            }
            let descriptors = Self::descriptor_table(self.max_size, &self.counters);
            let pool = (self.build)(&descriptors);
            Ok::<_, Infallible>(Generation { pool, descriptors })
        });
        let generation = match built {
            Ok(generation) => generation,
            Err(never) => match never {},
        };
        let epoch = crate::fork::current_epoch();
        (&generation.pool, epoch)
    }

    /// `conn`, checked out of this pool in the process of `epoch`, in the guard that keeps it
    /// out of the parent's pool in a forked child.
    pub(crate) fn lease<C>(&self, conn: C, epoch: Epoch) -> Leased<C> {
        Leased::new(conn, epoch, Arc::clone(&self.counters))
    }

    pub(crate) fn fork_stats(&self) -> ForkStats {
        self.counters.snapshot()
    }
}
