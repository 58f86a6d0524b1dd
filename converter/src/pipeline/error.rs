//! The library's error, composed from each stage's, and the exit code it maps to.

use crate::execute::ExecuteError;
use crate::formats::FormatError;
use crate::lora::LoraError;
use crate::models::ModelError;
use crate::pipeline::preflight::PreflightError;
use crate::plan::PlanError;
use crate::publish::PublishError;

/// Any failure of a step.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Refused before any work (exit 2).
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    /// A source could not be read (exit 2: nothing was written, retrying won't help).
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The plan could not be built (exit 2).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The model's configuration or a parallel size was refused (exit 2).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// An adapter was refused: a variant that cannot be merged faithfully, or a
    /// base it does not belong to (exit 2).
    #[error(transparent)]
    Lora(#[from] LoraError),
    /// Writing failed (exit 1).
    #[error(transparent)]
    Execute(#[from] ExecuteError),
    /// Publishing failed (exit 1).
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// A split run's parts do not add up to the plan (exit 1; exit 2 for a part
    /// written for another plan).
    #[error(transparent)]
    Split(#[from] crate::pipeline::split::SplitError),
    /// Validation found a problem (exit 1).
    #[error("validation failed: {0}")]
    Validation(#[from] ValidationError),
}

/// Why validation failed or could not run (exit 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// Checks of a staged output failed; nothing was published.
    #[error("{} of {total} checks failed, nothing published: {}", failures.len(), failures.join("; "))]
    ChecksFailed {
        /// The output that was not published.
        output: std::path::PathBuf,
        /// Checks run.
        total: usize,
        /// What each failed check found.
        failures: Vec<String>,
    },
    /// The output could not be read as a model for a forward pass.
    #[error("{}: {why}", path.display())]
    Unreadable {
        /// The output.
        path: std::path::PathBuf,
        /// What could not be read.
        why: String,
    },
    /// Generation or the logits dump could not run.
    #[error("{}: {what}: {why}", path.display())]
    Forward {
        /// The output, or the file written.
        path: std::path::PathBuf,
        /// `generation`, `logits dump`.
        what: &'static str,
        /// Why.
        why: String,
    },
}

impl Error {
    /// 2 for refusals before any output was written, 1 for failures after.
    pub fn exit_code(&self) -> i32 {
        match self {
            // The source moved under the run: a failure, not a refusal.
            Error::Format(crate::formats::FormatError::Changed { .. }) => 1,
            // Nothing could be written where the output was asked for.
            Error::Publish(crate::publish::PublishError::NotWritable { .. }) => 2,
            Error::Preflight(_)
            | Error::Format(_)
            | Error::Plan(_)
            | Error::Model(_)
            | Error::Lora(_) => 2,
            // A part written with other parameters: run it again with these.
            Error::Split(crate::pipeline::split::SplitError::OtherPlan { .. }) => 2,
            Error::Execute(_) | Error::Publish(_) | Error::Split(_) | Error::Validation(_) => 1,
        }
    }
}

impl From<crate::models::Error> for Error {
    fn from(e: crate::models::Error) -> Self {
        match e {
            crate::models::Error::Model(m) => Error::Model(m),
            crate::models::Error::Plan(p) => Error::Plan(p),
        }
    }
}
