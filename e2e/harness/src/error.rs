//! The harness's one error type.

use std::path::PathBuf;
use std::time::Duration;

/// What went wrong while starting, using or stopping a test control plane or
/// the node stand-in. Messages say where, then what, then the tail of
/// the log that explains it when a process is involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The control-plane binaries could not be found or built.
    #[error("control-plane binaries: {message}")]
    Binaries {
        /// What was tried and what failed.
        message: String,
    },
    /// The converter binary under test was not found.
    #[error(
        "ckpt-convert binary not found: tried {tried}; run `cargo build --release -p ckpt-convert` (or set CKPT_CONVERT_BIN)"
    )]
    ConverterBinary {
        /// The candidate paths, comma separated.
        tried: String,
    },
    /// A file or directory operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A process could not be started.
    #[error("starting {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A control-plane process exited while it should be running.
    #[error("{component} exited ({status}) while {doing}; last lines of {}:\n{tail}", log.display())]
    Exited {
        /// `etcd`, `kube-apiserver` or `kube-controller-manager`.
        component: String,
        /// Its exit status.
        status: String,
        /// What the harness was waiting for.
        doing: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of that log.
        tail: String,
    },
    /// Something did not become ready in time.
    #[error("timed out after {after:?} waiting for {what}; last lines of {}:\n{tail}", log.display())]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long the harness waited.
        after: Duration,
        /// The log file of the component that should have made it happen.
        log: PathBuf,
        /// The last lines of that log.
        tail: String,
    },
    /// Generating certificates or keys failed.
    #[error("generating {what}: {source}")]
    Certificate {
        /// Which certificate or key.
        what: String,
        /// The underlying error.
        source: rcgen::Error,
    },
    /// A Kubernetes API call failed.
    #[error("{context}: {source}")]
    Kube {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        source: kube::Error,
    },
    /// The kubeconfig could not be read or turned into a client configuration.
    #[error("kubeconfig {}: {message}", path.display())]
    Kubeconfig {
        /// The kubeconfig file (or the one it was derived from).
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The node stand-in cannot enforce read-only mounts on this machine.
    #[error("node stand-in: cannot run pods with read-only mounts here: {message}")]
    Sandbox {
        /// What failed and what to do about it.
        message: String,
    },
    /// The real node could not be set up or used.
    #[error("real node: {message}")]
    Node {
        /// What failed and what to do about it.
        message: String,
    },
    /// Building the container images failed.
    #[error("images: {message}")]
    Images {
        /// What failed.
        message: String,
    },
    /// The shared control plane failed to start earlier in this process.
    #[error("the shared control plane failed to start: {0}")]
    Shared(String),
}

impl Error {
    /// A component exited because its address was taken.
    pub fn address_in_use(&self) -> bool {
        matches!(self, Error::Exited { tail, .. } if tail.to_ascii_lowercase().contains("address already in use"))
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn kube(context: impl Into<String>, source: kube::Error) -> Self {
        Error::Kube {
            context: context.into(),
            source,
        }
    }
}

/// The harness's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
