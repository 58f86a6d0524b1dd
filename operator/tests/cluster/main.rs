//! The operator against a real control plane, in one test binary that starts one
//! control plane and shares it: etcd, kube-apiserver (RBAC, the `ServiceAccount` and
//! `OwnerReferencesPermissionEnforcement` admission plugins) and
//! kube-controller-manager (Jobs, garbage collection, ServiceAccounts).
//!
//! Each test works in its own namespace with its own helm release of the chart (its
//! default, namespaced install: a Role there and nowhere else), so its operators
//! watch only that namespace and elect their leader through their own Lease. The
//! operator binary runs with the arguments the release's Deployment gives it and a
//! token of the release's ServiceAccount. With `CKPT_TEST_NODE=real`, which is how
//! `run-tests.sh` runs this binary, the shared real node (kubelet, containerd, runc)
//! runs the Jobs' pods from the converter image, the claims bound to hostPath
//! volumes; without it the node stand-in runs the real converter for them.
//!
//! A test named `…_on_the_stand_in` needs the stand-in and fails saying why on the
//! real node: it writes pod status as only a scheduler or kubelet would (eviction,
//! node loss, unstartable pods, termination messages), stops the converter process,
//! mounts a claim's storage read-only, restarts etcd or the apiserver under a node,
//! or runs 200 conversions on 2 cores. `run-tests.sh` runs those on the stand-in
//! and every other test on the real node; `…_on_the_real_node` is the reverse.
//! Nothing waits on a log line or a fixed sleep: tests wait for observable state
//! (conditions, Jobs, Leases, events) with a generous deadline
//! ([`support::deadline`]).
//!
//! Needs the control-plane binaries and helm (`CKPT_K8S_BIN`, else
//! `e2e/k8s/build.sh` builds them), the release converter (`CKPT_CONVERT_BIN`, else
//! `cargo build --release -p ckpt-convert`) and Go for the Argo CD engine. A missing
//! piece fails the test with how to get it; nothing is skipped.

mod support;

mod chart;
mod contract;
mod conversions;
mod faults;
mod gitops;
mod leader;
mod load;
mod params;
mod pods;
mod profiles;
mod split;
