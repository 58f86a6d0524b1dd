//! What can go wrong between a command line and a finished remote run, with the
//! exit code each one means (0 success, 1 a conversion that failed, 2 a bad
//! invocation or a refusal before anything ran).

use std::path::PathBuf;

/// An error of a profile, a submission or a remote run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No env.toml where it was looked for.
    #[error("no profiles file: {looked} (give --env-file FILE, or set CKPT_ENV_FILE)")]
    NoEnvFile {
        /// Where it was looked for, and why there.
        looked: String,
    },
    /// The env.toml could not be read or is not TOML.
    #[error("{}: {why}", path.display())]
    EnvFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A profile (or one it extends) is wrong: an unknown or missing key, a value of
    /// the wrong type, a cycle.
    #[error("{}: profile {profile}: {why}", file.display())]
    Profile {
        /// The file.
        file: PathBuf,
        /// The profile the problem is in (the one that sets the key).
        profile: String,
        /// What is wrong, naming the key.
        why: String,
    },
    /// A parameter the executor cannot pass on as given (a path outside every
    /// mount, a setting the resource has no field for).
    #[error("{param}={value}: {why}")]
    Param {
        /// The parameter (or option) as typed.
        param: String,
        /// Its value.
        value: String,
        /// What is wrong, and what would work.
        why: String,
    },
    /// No usable kubeconfig.
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    /// The cluster or the scheduler refused the submission, or could not be reached.
    #[error("{0}")]
    Submit(String),
    /// The run's state could not be read.
    #[error("{0}")]
    Follow(String),
    /// The run finished and failed; `exit_code` is the converter's (2: it refused the
    /// input, 1: anything else).
    #[error("{name}: {message}")]
    Failed {
        /// The job or resource.
        name: String,
        /// The converter's exit code, or 1 when it did not report one.
        exit_code: i32,
        /// The converter's error, or what the scheduler or operator said.
        message: String,
    },
}

impl Error {
    /// The process exit code this error means.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Failed { exit_code, .. } => u8::try_from(*exit_code)
                .ok()
                .filter(|c| *c != 0)
                .unwrap_or(1),
            Error::Follow(_) => 1,
            _ => 2,
        }
    }
}

/// A result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
