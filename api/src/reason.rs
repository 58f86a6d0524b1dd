//! Condition and event reasons: one CamelCase word each, machine-readable, as the API
//! conventions ask. Every reason the operator writes is a variant here, so a reader
//! (or the Argo CD health check) can see the whole vocabulary in one place.

use std::fmt;

/// Why a condition has its status.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    // Accepted
    /// The spec was checked; the target is this resource's.
    Accepted,
    /// No step converts the spec (the CRD's CEL rules normally stop it earlier).
    InvalidSpec,
    /// Another resource owns the target.
    TargetConflict,
    /// A claim the resource names does not exist yet.
    PvcNotFound,

    // Running
    /// The Job waits for its creation slot (the operator's `--jobs-per-second`).
    JobQueued,
    /// The Job was created; no pod runs yet.
    JobCreated,
    /// Every part of a split run completed; the final step's Job was created.
    PartsDone,
    /// The Job's pod runs.
    JobRunning,
    /// A pod of the Job failed and the Job starts another.
    Retrying,
    /// The Job cannot create its pod (missing ServiceAccount, quota, admission).
    PodCreationFailed,
    /// The scheduler cannot place the pod.
    Unschedulable,
    /// The container waits for something that will not come by itself (the kubelet's
    /// reason: `ImagePullBackOff`, `ErrImagePull`, `CreateContainerConfigError`, …).
    ContainerWaiting(String),
    /// An earlier run's Job still runs; the next one waits for it.
    PreviousJobRunning,
    /// The Job finished (Running is False).
    Completed,
    /// A deleted resource's split run left a staging directory, which was removed.
    StagingRemoved,
    /// A deleted resource's split run left a staging directory that could not be
    /// removed (`ckpt-convert clean` removes it).
    StagingNotRemoved,
    /// The Job failed (Running is False).
    JobFailed,

    // Succeeded
    /// Converted, published and (unless switched off) validated.
    ConversionSucceeded,
    /// The target already held this exact conversion's output; nothing was rewritten.
    OutputReused,

    // Failed
    /// The converter refused the input (exit code 2): a retry cannot help.
    InvalidInput,
    /// The output failed validation and was not published.
    ValidationFailed,
    /// Every attempt the Job allows failed.
    BackoffLimitExceeded,
    /// The Job ran past `activeDeadlineSeconds`.
    DeadlineExceeded,
    /// The converter failed for another reason.
    ConverterFailed,

    // Validated
    /// Every validation check passed.
    ValidationPassed,
    /// Validation was asked for, but the converter reported none.
    NoValidationReport,

    // Events only
    /// One attempt of the Job failed.
    AttemptFailed,
    /// The converter warned about something.
    ConverterWarning,
}

impl Reason {
    /// The CamelCase word.
    pub fn as_str(&self) -> &str {
        match self {
            Reason::Accepted => "Accepted",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::TargetConflict => "TargetConflict",
            Reason::PvcNotFound => "PVCNotFound",
            Reason::JobQueued => "JobQueued",
            Reason::JobCreated => "JobCreated",
            Reason::PartsDone => "PartsDone",
            Reason::StagingRemoved => "StagingRemoved",
            Reason::StagingNotRemoved => "StagingNotRemoved",
            Reason::JobRunning => "JobRunning",
            Reason::Retrying => "Retrying",
            Reason::PodCreationFailed => "PodCreationFailed",
            Reason::Unschedulable => "Unschedulable",
            Reason::ContainerWaiting(r) => r,
            Reason::PreviousJobRunning => "PreviousJobRunning",
            Reason::Completed => "Completed",
            Reason::JobFailed => "Failed",
            Reason::ConversionSucceeded => "ConversionSucceeded",
            Reason::OutputReused => "OutputReused",
            Reason::InvalidInput => "InvalidInput",
            Reason::ValidationFailed => "ValidationFailed",
            Reason::BackoffLimitExceeded => "BackoffLimitExceeded",
            Reason::DeadlineExceeded => "DeadlineExceeded",
            Reason::ConverterFailed => "ConverterFailed",
            Reason::ValidationPassed => "ValidationPassed",
            Reason::NoValidationReport => "NoValidationReport",
            Reason::AttemptFailed => "AttemptFailed",
            Reason::ConverterWarning => "ConverterWarning",
        }
    }

    /// Whether an event with this reason is a Warning: something a person should
    /// look at.
    pub fn is_warning(&self) -> bool {
        matches!(
            self,
            Reason::InvalidSpec
                | Reason::TargetConflict
                | Reason::PvcNotFound
                | Reason::PodCreationFailed
                | Reason::Unschedulable
                | Reason::ContainerWaiting(_)
                | Reason::InvalidInput
                | Reason::ValidationFailed
                | Reason::BackoffLimitExceeded
                | Reason::DeadlineExceeded
                | Reason::ConverterFailed
                | Reason::NoValidationReport
                | Reason::AttemptFailed
                | Reason::ConverterWarning
                | Reason::StagingNotRemoved
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_one_camel_case_word() {
        for r in [
            Reason::Accepted,
            Reason::PvcNotFound,
            Reason::JobFailed,
            Reason::ContainerWaiting("ImagePullBackOff".into()),
            Reason::OutputReused,
        ] {
            let s = r.as_str();
            assert!(s.chars().next().unwrap().is_ascii_uppercase(), "{s}");
            assert!(s.chars().all(|c| c.is_ascii_alphanumeric()), "{s}");
        }
    }
}
