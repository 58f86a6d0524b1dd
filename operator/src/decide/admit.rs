//! Admission: may this resource run at all? Checked without reading any data: the
//! step its kinds name, who owns its target, whether its claims exist.

use std::time::Duration;

use super::{Observed, phase};
use crate::api::CheckpointConversion;
use crate::reason::Reason;
use crate::step::{self, Invocation};

/// Why a resource does not run (yet).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The `Accepted=False` reason.
    pub reason: Reason,
    /// What is wrong, naming what to fix.
    pub message: String,
    /// `Rejected` (the spec must change) or `Pending` (waiting for something).
    pub phase: &'static str,
    /// When to look again without a watch event.
    pub requeue: Option<Duration>,
}

/// How often a refused resource is looked at again without a watch event: a safety
/// net only, since the watches on claims' owners and the resources themselves
/// trigger the real re-evaluation.
const RECHECK: Duration = Duration::from_secs(300);
/// A deleted owner's pod is not watched; whether it stopped is asked this often.
const DRAIN_RECHECK: Duration = Duration::from_secs(10);
/// Claims are not watched; a missing one is looked for again this often.
const PVC_RECHECK: Duration = Duration::from_secs(30);

/// The invocation when `cr` may run, else why not.
pub fn admit(cr: &CheckpointConversion, obs: &Observed) -> Result<Invocation, Refusal> {
    let inv = step::invocation(&cr.spec).map_err(|e| Refusal {
        reason: Reason::InvalidSpec,
        message: e.0,
        phase: phase::REJECTED,
        requeue: None,
    })?;
    // A resource whose Job exists owns its target already (it was claimed before the
    // Job was created); only one about to start can lose it.
    if let Some(owner) = &obs.conflict
        && obs.job.is_none()
    {
        let target = format!("{}:{}", cr.spec.target.pvc, cr.spec.target.path);
        return Err(match &obs.conflict_running_pod {
            None => Refusal {
                reason: Reason::TargetConflict,
                message: format!(
                    "target {target} is owned by CheckpointConversion {owner}; no Job is started until {owner} is deleted"
                ),
                phase: phase::REJECTED,
                requeue: Some(RECHECK),
            },
            // The owner is gone but may still write: wait, and look again soon (a
            // pod's end wakes nothing here).
            Some(pod) => Refusal {
                reason: Reason::TargetConflict,
                message: format!(
                    "target {target} was owned by CheckpointConversion {owner}, which is deleted; waiting for its pod {pod} to stop"
                ),
                phase: phase::PENDING,
                requeue: Some(DRAIN_RECHECK),
            },
        });
    }
    if !obs.missing_pvcs.is_empty() && obs.job.is_none() {
        return Err(Refusal {
            reason: Reason::PvcNotFound,
            message: format!(
                "PersistentVolumeClaim {} not found in the namespace; waiting for it",
                obs.missing_pvcs.join(", ")
            ),
            phase: phase::PENDING,
            requeue: Some(PVC_RECHECK),
        });
    }
    Ok(inv)
}
