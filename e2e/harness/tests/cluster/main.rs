//! Tests against a real control plane (etcd, kube-apiserver,
//! kube-controller-manager) with the node stand-in running the converter.
//! One control plane is shared by every test in this binary; each test works
//! in its own namespace.
//!
//! Needs the control-plane binaries (`CKPT_K8S_BIN`, else `e2e/k8s/build.sh`
//! builds them) and the release converter (`cargo build --release -p ckpt-convert`,
//! or `CKPT_CONVERT_BIN`). A missing piece fails the test; nothing is skipped.

mod util;

mod crd;
mod gc;
mod jobs;
mod rbac;
mod readonly;
mod standin;
