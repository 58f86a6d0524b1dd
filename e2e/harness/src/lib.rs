//! A real Kubernetes control plane for tests, without a cluster or downloads:
//! etcd, kube-apiserver and kube-controller-manager built from Go modules
//! (`e2e/k8s/build.sh`), and one of two nodes for our Jobs' pods:
//!
//! * [`RealNode`]: containerd, runc and a kubelet (v1.37.2, from the same
//!   module), with kube-scheduler in the control plane
//!   ([`ControlPlaneOptions::for_real_node`]). Pods run the converter image
//!   built by `images/build.sh` ([`images`]), imported into containerd;
//!   claims are hostPath volumes ([`RealNode::bind_claim`]). Needs root and
//!   Debian's containerd, runc and CNI plugins.
//! * [`NodeStandIn`]: the harness plays the node and runs the pod's command
//!   as a local process (no image, no kubelet), for machines without those.
//!
//! A test process picks one: `CKPT_TEST_NODE=real` makes
//! [`ControlPlane::shared`] and [`ControlPlane::shared_with`] start for a real
//! node ([`NodeKind`]); a test that needs the real node asks for
//! [`RealNode::shared`] directly.
//!
//! It also starts a real single-node Slurm ([`Slurm`], Debian's slurm-wlm and munge
//! with a configuration of its own) for the CLI's Slurm executor.
//!
//! ```no_run
//! # async fn demo() -> ckpt_testcluster::Result<()> {
//! use ckpt_testcluster::{ControlPlane, NodeStandIn, StandInConfig, converter_binary};
//!
//! let cp = ControlPlane::shared().await?; // one per test binary, stopped at exit
//! let ns = cp.new_namespace("my-test").await?;
//! let standin = NodeStandIn::start(
//!     cp.client(),
//!     StandInConfig::new("ghcr.io/ckpt/ckpt-convert:dev")
//!         .namespace(&ns)
//!         .binary("ckpt-convert", converter_binary()?)
//!         .pvc("models", "/tmp/models"),
//! )
//! .await?;
//! // … create a Job in `ns`; the Job controller creates its pod, the stand-in
//! // runs it, the Job becomes Complete or Failed …
//! assert!(standin.take_errors().is_empty());
//! # Ok(()) }
//! ```
//!
//! On a real node:
//!
//! ```no_run
//! # async fn demo(dir: &std::path::Path) -> ckpt_testcluster::Result<()> {
//! use ckpt_testcluster::{ControlPlane, RealNode};
//!
//! let node = RealNode::shared().await?; // control plane + node, images imported
//! let cp = ControlPlane::shared_for_real_node().await?;
//! let ns = cp.new_namespace("my-test").await?;
//! node.bind_claim(&cp.client(), &ns, "models", dir).await?; // hostPath volume
//! // … create a Job running ghcr.io/ckpt-dev/ckpt-convert:0.1.0 in `ns` …
//! # Ok(()) }
//! ```
//!
//! # Design notes
//!
//! * **Sharing.** [`ControlPlane::shared`] starts one control plane per test
//!   process (about 3–5 s with cached binaries on 2 cores, 1 s to stop). Its
//!   processes are spawned from a dedicated thread, because
//!   `PR_SET_PDEATHSIG` fires when the forking *thread* exits and each test's
//!   thread ends with the test. It is stopped by an `atexit` hook (normal exit
//!   or a failed test); on abort or SIGKILL the parent-death signal kills it and
//!   the next start removes the orphaned temp dir (`owner.pid` names a dead pid).
//! * **Read-only mounts** are enforced by the kernel as on a node: the pod's
//!   process runs in a private mount namespace (plus a user namespace when the
//!   harness is not root) with each volume bind-mounted and read-only ones
//!   remounted `MS_RDONLY`, so writes fail with `EROFS`, for root too. The
//!   process keeps the harness's uid; `runAsUser`/`fsGroup` are not emulated.
//! * **Paths.** Pods name container paths (`/models/x`); the stand-in rewrites
//!   arguments and env values that are, or end in (`key=/models/x`), a path
//!   under a mountPath, and refuses any other absolute path, which would hit
//!   the host's filesystem instead of the image's. Termination messages are
//!   mapped back to container paths.
//!
//! Environment: `CKPT_K8S_BIN` (control-plane binaries; else `build.sh` runs),
//! `CKPT_CONVERT_BIN` (the converter; else `<target dir>/release/ckpt-convert`),
//! `CKPT_KEEP_CLUSTER=1` (keep temp dirs and logs), `CKPT_TEST_NODE`
//! (`standin` or `real`).

#![deny(missing_docs)]

mod bins;
mod certs;
mod control_plane;
mod error;
mod fixtures;
pub mod images;
mod node;
mod process;
mod slurm;
mod standin;

pub use bins::{K8S_BINARIES, argocd_health_binary, converter_binary, k8s_bin_dir, workspace_root};
pub use certs::NODE_NAME;
pub use control_plane::{
    ControlPlane, ControlPlaneOptions, DEFAULT_CONTROLLERS, PORT_ATTEMPTS, REAL_NODE_CONTROLLERS,
    free_ports,
};
pub use error::{Error, Result};
pub use fixtures::{poison_values, take_read_back_note, without_run_times};

/// How long a test waits for something that should happen: generous, because a
/// busy machine is slow, and never a reason to pass. `CKPT_TEST_DEADLINE_SECS`
/// sets it (default 600).
pub fn test_deadline() -> std::time::Duration {
    let secs = std::env::var("CKPT_TEST_DEADLINE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    std::time::Duration::from_secs(secs)
}
pub use node::{
    IMAGE_USER, NodeKind, PAUSE_IMAGE, RealNode, RealNodeOptions, check_prerequisites, chown_tree,
};
pub use slurm::{NODE as SLURM_NODE, SLURM_PROGRAMS, Slurm};
pub use standin::status::{
    MAX_LOG_FALLBACK_BYTES, MAX_LOG_FALLBACK_LINES, MAX_TERMINATION_MESSAGE,
};
pub use standin::{
    NodeStandIn, REASON_CANNOT_EMULATE, REASON_PVC_NOT_FOUND, Run, StandInConfig, StandInError,
};
