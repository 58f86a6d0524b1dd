//! ckpt-operator: reconciles `CheckpointConversion` resources into Jobs that run
//! the converter on PVC-mounted checkpoints.
//!
//! The reconcile shell ([`controller`]) is thin; what to do is decided by pure
//! functions tested without a server: [`view`] reads the Jobs and pods it observes,
//! [`step`] renders the converter invocation, [`job`] builds the Job, [`decide`]
//! turns observations into status, events and the Job to create. The operator never opens a checkpoint: it knows the
//! converter only through the vocabulary both share ([`ckpt_wire`]: steps, their
//! parameter tables, artifact kinds, the termination summary), which [`step`]
//! renders into Job arguments and [`summary`] reads into status.
#![deny(missing_docs)]

/// The resource (the `ckpt-api` crate, shared with `ckpt-convert`'s Kubernetes executor).
pub use ckpt_api as api;
/// Condition and event reasons (from `ckpt-api`).
pub use ckpt_api::reason;

pub mod claim;
pub mod conditions;
pub mod controller;
pub mod decide;
#[cfg(test)]
mod fixtures;
pub mod http;
pub mod job;
pub mod metrics;
pub mod pace;
pub mod step;
pub mod summary;
pub mod view;
