//! Tests on a real node: the shared control plane with kube-scheduler and the
//! Node authorizer, and one node (containerd, runc, the CNI bridge plugin and a
//! kubelet) running the converter image built by `images/build.sh`, and the
//! operator installed by helm running from its own image. No node stand-in
//! runs in this test binary: every pod status here is the kubelet's.
//!
//! Needs root, the control-plane binaries with the kubelet (`e2e/k8s/build.sh`),
//! the Debian packages of the node (`apt-get install containerd runc
//! containernetworking-plugins musl-tools iproute2`; run-tests.sh installs them)
//! and what images/build.sh needs. A missing piece fails the test.

mod util;

mod deadline;
mod node;
mod operator;
mod pods;
