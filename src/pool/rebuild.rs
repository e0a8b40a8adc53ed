//! The pool of the calling process: the current generation, or, in a forked child (and after
//! `release_idle` on r2d2), a new one built from the saved configuration, after letting go of
//! what the inherited one holds.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use r2d2::ManageConnection;

use super::Pool;
use crate::config::{Config, OnFork};
use crate::descriptors::DescriptorTable;
use crate::error_kind::CROSSED_FORK_ON_FORK_FAIL;
use crate::fork::{current_epoch, Read};
use crate::generation::{Generation, GenerationParts, Site};

impl<M: ManageConnection> Pool<M> {
    /// This process's generation, rebuilding it first if the pool came across a fork or
    /// `release_idle` retired it. Keep it briefly: a retired generation is freed only once
    /// every such borrow of it has ended.
    #[inline]
    pub(super) fn generation(&self) -> Read<'_, Generation<M>> {
        match self.shared.generation.read() {
            Some(found) => found,
            None => self.rebuild(),
        }
    }

    #[cold]
    #[inline(never)]
    pub(super) fn rebuild(&self) -> Read<'_, Generation<M>> {
        let shared = &*self.shared;
        let rebuilt = shared.generation.read_or_try_init(|inherited| {
            let here = current_epoch();
            // False after `release_idle` in this same process: then nothing crossed a fork.
            let crossed_fork = shared
                .latest_generation_in
                .swap(here.get(), Ordering::AcqRel)
                != here.get();
            // A parent that released its pool before forking left no generation; what its
            // retired generations still held is in the building process's table.
            let inherited_descriptors = inherited
                .map(|inherited| &inherited.descriptors)
                .or(crossed_fork.then_some(&shared.building_descriptors));
            if let Some(inherited) = inherited_descriptors {
                let discarded = inherited.release_inherited();
                shared.counters.record_rebuild(discarded);
                tracing::info!(
                    pid = std::process::id(),
                    connections = discarded.connections,
                    sockets_released = discarded.sockets_released,
                    leaked = discarded.connections_unidentified,
                    "forksafe-pool: discarded inherited connections after fork"
                );
                if discarded.connections_unidentified > 0 {
                    // Once per pool and process: the next generation of this process inherits
                    // nothing.
                    warn_if_no_backend::<M>(&shared.config, discarded.connections_unidentified);
                }
            }
            let site = if here == shared.built_in {
                Site::BuildingProcess {
                    wait_for_min_idle: false,
                }
            } else if shared.config.on_fork == OnFork::Fail {
                Site::RefusingChild {
                    refusal: format!(
                        "{CROSSED_FORK_ON_FORK_FAIL} into process {} and was built with \
                         OnFork::Fail, so it is not rebuilt there; build the pool after fork(), or \
                         use OnFork::Rebuild",
                        std::process::id()
                    ),
                }
            } else {
                Site::ForkedChild
            };
            let descriptors = if here == shared.built_in {
                Arc::clone(&shared.building_descriptors)
            } else {
                DescriptorTable::new(
                    shared.config.settings.max_size,
                    Arc::clone(&shared.counters),
                )
            };
            let generation = Generation::build(GenerationParts {
                config: &shared.config,
                manager: Arc::clone(&shared.manager),
                descriptors,
                site,
                rebuilt_after_fork_in: crossed_fork.then(std::process::id),
            });
            tracing::debug!(
                pid = std::process::id(),
                "forksafe-pool: fork detected, pool rebuilt"
            );
            generation
        });
        match rebuilt {
            Ok(generation) => generation,
            Err(_) => unreachable!("building without waiting cannot fail"),
        }
    }
}

/// Says loudly, in a child that left `leaked` inherited connections open, when no backend
/// knows their type (a missing feature, another major version of the driver) and no
/// `descriptor_locator` was given: every worker then keeps the master's sessions open.
pub(super) fn warn_if_no_backend<M: ManageConnection>(config: &Config<M>, leaked: u64) {
    let connection = std::any::TypeId::of::<M::Connection>();
    if config.descriptor_locator.is_some() || crate::backends::knows(connection) {
        return;
    }
    let type_name = std::any::type_name::<M::Connection>();
    let remedy = match crate::backends::feature_for(type_name) {
        Some(feature) => format!(
            "enable forksafe-pool's feature \"{feature}\" (for this major version of the driver), \
             or see Builder::descriptor_locator"
        ),
        None => "no backend knows this type; see Builder::descriptor_locator".to_string(),
    };
    tracing::warn!(
        pid = std::process::id(),
        connection_type = type_name,
        leaked,
        "forksafe-pool: {leaked} inherited connections of type {type_name} cannot be released in \
         this process and stay open (ForkStats::connections_leaked): {remedy}"
    );
}
