//! The vocabulary `ckpt-convert` and `ckpt-operator` share, in one small crate
//! both depend on: the steps users type ([`Step`]), the parameters each step
//! takes ([`params`]), the artifact kinds ([`ArtifactKind`]) and the
//! termination summary a run leaves for its orchestrator ([`summary`]).
//!
//! The converter parses its command line and generates its help from these
//! tables; the operator renders Job arguments from them and parses the summary
//! with the same type the converter writes. A parameter or field that one side
//! knows and the other does not cannot be written.
#![deny(missing_docs)]

pub mod kind;
pub mod params;
pub mod step;
pub mod summary;

pub use kind::ArtifactKind;
pub use params::{Param, Role, Value};
pub use step::Step;
pub use summary::Summary;
