//! ckpt-batch: runs a `ckpt-convert` step where an `env.toml` profile says, with
//! the parameters of a local run.
//!
//! - [`profile`]: the profiles file (`--env-file`, `CKPT_ENV_FILE`,
//!   `NEMOTRON_ENV_FILE`, `./env.toml`), `extends` chains, strict keys;
//! - [`mounts`]: the shared filesystem as this machine and the job see it, and the
//!   translation of paths (a path outside every mount is refused);
//! - [`request`]: the step and its parameters, relative paths made absolute;
//! - [`kubernetes`]: a `CheckpointConversion` for the operator, followed through
//!   its status;
//! - [`slurm`]: a batch script submitted with `sbatch`, followed with `squeue`,
//!   read back from the job directory;
//! - [`examples`]: one example profile per family.
//!
//! The converter library is not a dependency: the binary runs the local preflight
//! itself, then hands the request here. Both executors end with the converter's
//! own [`ckpt_wire::Summary`], so the binary prints the same report as a local run.
#![deny(missing_docs)]

mod error;
pub mod examples;
pub mod kubernetes;
pub mod mounts;
pub mod profile;
pub mod request;
pub mod slurm;

pub use error::{Error, Result};
pub use profile::{EnvFile, Executor, Profile};
pub use request::Request;

/// Where a submitted run stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Queued or running: one line saying how.
    Active(String),
    /// Finished: the converter's summary (a failed one carries its exit code and
    /// error).
    Finished(Box<ckpt_wire::Summary>),
}

/// How often a followed run is looked at.
const POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Looks at a run with `look` until it finishes, calling `line` whenever what it
/// says about an active run changes.
fn follow(
    mut look: impl FnMut() -> Result<Status>,
    line: &mut dyn FnMut(&str),
) -> Result<ckpt_wire::Summary> {
    let mut last = String::new();
    loop {
        match look()? {
            Status::Finished(s) => return Ok(*s),
            Status::Active(now) => {
                if now != last {
                    line(&now);
                    last = now;
                }
            }
        }
        std::thread::sleep(POLL);
    }
}
