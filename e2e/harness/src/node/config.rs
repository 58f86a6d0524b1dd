//! The configuration files of the test node: containerd's, the CNI network's
//! and the kubelet's. Each setting that differs from a stock node says why; the
//! machine facts behind them are in `e2e/k8s/NOTES.md` ("A real node").

use std::path::Path;

/// Where one node keeps everything; all under its temp dir.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub(crate) dir: std::path::PathBuf,
    /// The Linux bridge of the pod network (unique on the machine).
    pub(crate) bridge: String,
    /// The kubelet's `cgroupRoot` (unique on the machine).
    pub(crate) cgroup_root: String,
}

impl Layout {
    pub(crate) fn new(dir: &Path) -> Layout {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // FNV-1a: bridge names have at most 15 bytes, temp dir names more.
        let mut h: u32 = 0x811c_9dc5;
        for b in name.bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        Layout {
            dir: dir.to_path_buf(),
            bridge: format!("ckpt{h:08x}"),
            cgroup_root: format!("/{name}"),
        }
    }

    pub(crate) fn path(&self, rel: &str) -> std::path::PathBuf {
        self.dir.join(rel)
    }

    pub(crate) fn socket(&self) -> std::path::PathBuf {
        self.path("containerd/containerd.sock")
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn toml_str(v: &str) -> String {
    serde_json::to_string(v).expect("a string serializes")
}

/// containerd 1.6 (config version 2) with the CRI plugin.
pub(crate) fn containerd_toml(l: &Layout, sandbox_image: &str) -> String {
    let q = |rel: &str| toml_str(&s(&l.path(rel)));
    format!(
        r#"version = 2
root = {root}
state = {state}
# At or above containerd's own score: without CAP_SYS_RESOURCE nothing here may
# lower an oom_score_adj.
oom_score = 0
# Plugins this node does not use, and that would touch the host outside the
# node's directory.
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = {sock}
[ttrpc]
  address = {ttrpc}
[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = {opt}

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = {pause}
  # Clamp pods' oom_score_adj to containerd's own instead of failing to lower it.
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  # Network namespaces are bind-mounted under the node's state dir, not /run/netns.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # cgroupfs, as the kubelet (cgroup v1 here).
        SystemdCgroup = false
        BinaryName = "runc"
        Root = {runc_root}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = {cni_conf}
    max_conf_num = 1
"#,
        root = q("containerd/root"),
        state = q("containerd/state"),
        sock = toml_str(&s(&l.socket())),
        ttrpc = toml_str(&format!("{}.ttrpc", s(&l.socket()))),
        opt = q("containerd/opt"),
        pause = toml_str(sandbox_image),
        runc_root = q("containerd/runc"),
        cni_conf = q("cni/net.d"),
    )
}

/// A bridge with no address on the host and no gateway or NAT: pods get an
/// address and can reach each other, but nothing outside this machine (the
/// converter needs no network; nothing routes this subnet anywhere).
pub(crate) fn cni_conflist(l: &Layout) -> String {
    serde_json::to_string_pretty(&serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "ckpt-node",
        "plugins": [{
            "type": "bridge",
            "bridge": l.bridge,
            "isGateway": false,
            "isDefaultGateway": false,
            "ipMasq": false,
            "hairpinMode": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "10.244.0.0/24"}]],
                "dataDir": s(&l.path("cni/ipam")),
            },
        }],
    }))
    .expect("JSON serializes")
}

/// The kubelet's KubeletConfiguration.
pub(crate) fn kubelet_yaml(l: &Layout, ca: &Path) -> String {
    let j = |v: &str| toml_str(v);
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroups are v1 on this machine (a v2 mount holds only hugetlb).
failCgroupV1: false
cgroupDriver: cgroupfs
# Its own subtree, so that several nodes on one machine do not meet and the
# harness can find (and kill) every container of this node.
cgroupRoot: {cgroup_root}
containerRuntimeEndpoint: {endpoint}
failSwapOn: false
# Root here lacks CAP_SYS_RESOURCE: no limit above the current ones, no
# negative oom_score_adj.
oomScoreAdj: 0
maxOpenFiles: 20000
# No port at all: nothing here calls the kubelet's server (logs are read from
# podLogsDir, readiness from the Node's status), and a port picked in advance
# could be taken by another process before the kubelet binds it.
enableServer: false
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: false
  x509:
    clientCAFile: {ca}
authorization:
  mode: AlwaysAllow
podLogsDir: {logs}
resolvConf: ""
# Images come from archives, not registries: a collected image could not be
# pulled again. Evict only when the machine is really out of room.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "50Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
  imagefs.inodesFree: "1%"
serializeImagePulls: false
"#,
        cgroup_root = j(&l.cgroup_root),
        endpoint = j(&format!("unix://{}", s(&l.socket()))),
        ca = j(&s(ca)),
        logs = j(&s(&l.path("pod-logs"))),
    )
}
