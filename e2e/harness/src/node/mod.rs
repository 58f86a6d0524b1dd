//! A real node for the test control plane: containerd (with runc and the CNI
//! bridge plugin from Debian) and a kubelet built from the pinned
//! `k8s.io/kubernetes` module, with its state in a temp dir. Pods are scheduled
//! by the real kube-scheduler and run from images imported into containerd
//! from oci-archive tarballs (nothing can be pulled here), including the pod
//! sandbox's pause image, built locally from `e2e/k8s/pause/pause.c`.
//!
//! Stopping it (or dropping it, or the next start after a killed test
//! process) kills every container, unmounts everything and removes the pod
//! bridge and cgroups ([`sweep`]); nothing is left running.

pub(crate) mod config;
pub(crate) mod sweep;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::bins;
use crate::certs::NODE_NAME;
use crate::control_plane::ControlPlane;
use crate::error::{Error, Result};
use crate::process::{KEPT_FILE, ManagedProcess, log_tail, owned_tempdir_with};
use config::Layout;

/// The pause image's name in containerd (the CRI's `sandbox_image`).
pub const PAUSE_IMAGE: &str = "ckpt.local/pause:1";

/// The uid (and gid) the converter and operator images run as.
pub const IMAGE_USER: u32 = 65532;

/// Which node runs the pods of a test process: `CKPT_TEST_NODE=standin` (or
/// unset) for the [`crate::NodeStandIn`], `CKPT_TEST_NODE=real` for a
/// [`RealNode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// The harness plays the node ([`crate::NodeStandIn`]).
    StandIn,
    /// containerd and a kubelet ([`RealNode`]).
    Real,
}

impl NodeKind {
    /// Reads `CKPT_TEST_NODE`; any value other than `standin`, `real` or
    /// empty is an error, so a typo never silently picks the stand-in.
    pub fn from_env() -> Result<NodeKind> {
        match std::env::var("CKPT_TEST_NODE").as_deref() {
            Err(_) | Ok("") | Ok("standin") => Ok(NodeKind::StandIn),
            Ok("real") => Ok(NodeKind::Real),
            Ok(other) => Err(Error::Node {
                message: format!("CKPT_TEST_NODE={other:?}: expected `standin` or `real`"),
            }),
        }
    }
}

/// How to start a [`RealNode`].
#[derive(Debug, Clone)]
pub struct RealNodeOptions {
    /// oci-archive tarballs to import into containerd before the node
    /// registers (the pause image is always imported).
    pub images: Vec<PathBuf>,
    /// How long containerd and the kubelet may take to become ready.
    pub startup_timeout: Duration,
    /// Keep the temp dir (logs, configuration) after teardown; default
    /// `$CKPT_KEEP_CLUSTER == "1"`. Processes, mounts and cgroups are removed
    /// either way.
    pub keep: bool,
}

impl Default for RealNodeOptions {
    fn default() -> Self {
        RealNodeOptions {
            images: Vec::new(),
            startup_timeout: Duration::from_secs(180),
            keep: std::env::var("CKPT_KEEP_CLUSTER").is_ok_and(|v| v == "1"),
        }
    }
}

/// What a node needs from the machine, and how the test command installs it.
const DEBIAN_PACKAGES: &str = "containerd runc containernetworking-plugins musl-tools iproute2";

fn need_program(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Node {
            message: format!(
                "{name} not found in PATH; install the node's packages: apt-get install -y {DEBIAN_PACKAGES}"
            ),
        })
}

/// Checks that everything a [`RealNode`] runs is installed: containerd,
/// containerd-shim-runc-v2, ctr, runc, the CNI plugins, musl-gcc and ip; and
/// that this process is root (containerd and the kubelet need it).
pub fn check_prerequisites() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::Node {
            message: "a real node needs root (containerd, runc and the kubelet)".to_string(),
        });
    }
    for p in [
        "containerd",
        "containerd-shim-runc-v2",
        "ctr",
        "runc",
        "x86_64-linux-musl-gcc",
        "ip",
    ] {
        need_program(p)?;
    }
    for plugin in ["bridge", "host-local", "loopback"] {
        let p = Path::new("/usr/lib/cni").join(plugin);
        if !p.is_file() {
            return Err(Error::Node {
                message: format!(
                    "{} is missing; install the node's packages: apt-get install -y {DEBIAN_PACKAGES}",
                    p.display()
                ),
            });
        }
    }
    Ok(())
}

/// A running node: containerd and a kubelet registered as [`NODE_NAME`].
#[derive(Debug)]
pub struct RealNode {
    layout: Layout,
    tempdir: Mutex<Option<tempfile::TempDir>>,
    keep: bool,
    processes: Mutex<Vec<ManagedProcess>>,
}

/// Cleans up a node that failed to start, keeping its logs.
struct Boot {
    layout: Layout,
    tempdir: Option<tempfile::TempDir>,
    processes: Vec<ManagedProcess>,
}

impl Drop for Boot {
    fn drop(&mut self) {
        // Started: the RealNode owns everything now.
        let Some(t) = self.tempdir.take() else {
            return;
        };
        for p in self.processes.iter_mut().rev() {
            p.stop(Duration::from_secs(5));
        }
        let problems = sweep::sweep(&self.layout);
        {
            let _ = std::fs::write(t.path().join(KEPT_FILE), b"");
            let _ = t.keep();
            eprintln!(
                "ckpt-testcluster: the node failed to start; logs kept in {}{}",
                self.layout.dir.display(),
                if problems.is_empty() {
                    String::new()
                } else {
                    format!(" (cleanup: {})", problems.join("; "))
                }
            );
        }
    }
}

impl Boot {
    fn check_running(&mut self, doing: &str) -> Result<()> {
        for p in &mut self.processes {
            p.check_running(doing)?;
        }
        Ok(())
    }

    fn timeout(&self, what: &str, after: Duration, component: &str) -> Error {
        let log = self.layout.path(&format!("{component}.log"));
        Error::Timeout {
            what: what.to_string(),
            after,
            tail: log_tail(&log, 40),
            log,
        }
    }
}

fn run_checked(mut cmd: Command, what: &str) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            program: what.to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Node {
            message: format!(
                "{what} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ),
        });
    }
    Ok(out)
}

impl RealNode {
    /// Starts containerd and the kubelet for `cp` (which must have been
    /// started with [`crate::ControlPlaneOptions::real_node`]), imports the
    /// pause image and `opts.images`, and waits until the Node is `Ready`.
    /// About 10–20 s on 2 cores once everything is built.
    pub async fn start(cp: &ControlPlane, opts: RealNodeOptions) -> Result<RealNode> {
        if !cp.is_for_real_node() {
            return Err(Error::Node {
                message: "the control plane was started without ControlPlaneOptions::real_node (no scheduler, no Node authorizer)".to_string(),
            });
        }
        check_prerequisites()?;
        let bin_dir = cp.bin_dir().to_path_buf();
        let kubelet = bin_dir.join("kubelet");
        if !kubelet.is_file() {
            return Err(Error::Binaries {
                message: format!(
                    "{} is missing: the control-plane binaries predate the real node; rebuild with e2e/k8s/build.sh",
                    kubelet.display()
                ),
            });
        }
        let tempdir = owned_tempdir_with("ckpt-node-", |dir| {
            sweep::sweep(&Layout::new(dir));
        })?;
        let layout = Layout::new(tempdir.path());
        let mut boot = Boot {
            layout: layout.clone(),
            tempdir: Some(tempdir),
            processes: Vec::new(),
        };
        let timeout = opts.startup_timeout;
        let l = &layout;
        for d in [
            "containerd",
            "cni/net.d",
            "cni/ipam",
            "kubelet",
            "pod-logs",
            "images",
        ] {
            let p = l.path(d);
            std::fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        }
        let write = |rel: &str, text: &str| -> Result<PathBuf> {
            let p = l.path(rel);
            std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
            Ok(p)
        };

        // The pause image: a static binary from e2e/k8s/pause, no registry.
        let pause = build_pause_image(&l.path("images"))?;

        // containerd.
        write("cni/net.d/10-ckpt.conflist", &config::cni_conflist(l))?;
        let ctd_config = write(
            "containerd/config.toml",
            &config::containerd_toml(l, PAUSE_IMAGE),
        )?;
        boot.processes.push(ManagedProcess::spawn(
            "containerd",
            &need_program("containerd")?,
            &[format!("--config={}", ctd_config.display())],
            l.path("containerd.log"),
        )?);
        let started = Instant::now();
        while !ctr(l, &["version"]).is_ok_and(|o| o.status.success()) {
            boot.check_running("waiting for containerd's socket")?;
            if started.elapsed() > timeout {
                return Err(boot.timeout(
                    "containerd to answer `ctr version`",
                    timeout,
                    "containerd",
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for archive in std::iter::once(&pause).chain(opts.images.iter()) {
            import(l, archive)?;
        }

        // The kubelet.
        for mount in sweep::cgroup_v1_mounts() {
            // The kubelet checks that its cgroupRoot exists in every hierarchy.
            let d = mount.join(l.cgroup_root.trim_start_matches('/'));
            std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        }
        sweep::save_sysctls(l).map_err(|e| Error::io(l.path(sweep::SYSCTLS_FILE), e))?;
        let kubelet_config = write(
            "kubelet/config.yaml",
            &config::kubelet_yaml(l, cp.ca_cert_path()),
        )?;
        let (node_cert, node_key) = cp.node_credentials();
        let kubeconfig = write(
            "kubelet/kubeconfig",
            &crate::control_plane::kubeconfig_text(
                cp.api_url(),
                cp.ca_cert_path(),
                &format!("system:node:{NODE_NAME}"),
                &[
                    ("client-certificate", node_cert.display().to_string()),
                    ("client-key", node_key.display().to_string()),
                ],
            ),
        )?;
        boot.processes.push(ManagedProcess::spawn(
            "kubelet",
            &kubelet,
            &[
                format!("--config={}", kubelet_config.display()),
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--root-dir={}", l.path("kubelet/root").display()),
                format!("--cert-dir={}", l.path("kubelet/pki").display()),
                format!("--hostname-override={NODE_NAME}"),
                "--v=2".to_string(),
            ],
            l.path("kubelet.log"),
        )?);
        let nodes: Api<Node> = Api::all(cp.client());
        let started = Instant::now();
        loop {
            if let Ok(Some(node)) = nodes.get_opt(NODE_NAME).await
                && node_ready(&node)
            {
                break;
            }
            boot.check_running("waiting for the node to be Ready")?;
            if started.elapsed() > timeout {
                return Err(boot.timeout(
                    &format!("Node {NODE_NAME} to be Ready"),
                    timeout,
                    "kubelet",
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let tempdir = boot.tempdir.take();
        let processes = std::mem::take(&mut boot.processes);
        Ok(RealNode {
            layout: layout.clone(),
            tempdir: Mutex::new(tempdir),
            keep: opts.keep,
            processes: Mutex::new(processes),
        })
    }

    /// The node shared by every test in this process, on
    /// [`ControlPlane::shared_for_real_node`], with the converter and operator
    /// images imported ([`crate::images::built_images`]). Stopped at exit,
    /// before the control plane.
    pub async fn shared() -> Result<&'static RealNode> {
        static SHARED_NODE: tokio::sync::OnceCell<std::result::Result<RealNode, String>> =
            tokio::sync::OnceCell::const_new();
        extern "C" fn stop_at_exit() {
            if let Some(Ok(node)) = SHARED_NODE.get() {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| node.stop()));
            }
        }
        let cp = ControlPlane::shared_for_real_node().await?;
        let result = SHARED_NODE
            .get_or_init(|| async {
                let images = match tokio::task::spawn_blocking(crate::images::built_images).await {
                    Ok(Ok(images)) => images,
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(e) => return Err(format!("building the images panicked: {e}")),
                };
                let opts = RealNodeOptions {
                    images: vec![
                        images.converter.archive,
                        images.operator.archive,
                        images.converter_failpoints.archive,
                    ],
                    ..Default::default()
                };
                let result = RealNode::start(cp, opts).await.map_err(|e| e.to_string());
                if result.is_ok() {
                    // Registered after the control plane's hook, so it runs
                    // first: the kubelet stops while the apiserver is up.
                    // SAFETY: a plain extern "C" function without captures.
                    unsafe {
                        libc::atexit(stop_at_exit);
                    }
                }
                result
            })
            .await;
        result.as_ref().map_err(|e| Error::Node {
            message: format!("the shared node failed to start: {e}"),
        })
    }

    /// The Node's name ([`NODE_NAME`]).
    pub fn name(&self) -> &str {
        NODE_NAME
    }

    /// The temp dir: configuration, `containerd.log`, `kubelet.log`, state.
    pub fn dir(&self) -> &Path {
        &self.layout.dir
    }

    /// Where the kubelet keeps emptyDir `volume` of the pod with `uid`: a test
    /// reads what a container wrote there without exec'ing into it.
    pub fn empty_dir(&self, pod_uid: &str, volume: &str) -> PathBuf {
        self.layout
            .path("kubelet/root/pods")
            .join(pod_uid)
            .join("volumes/kubernetes.io~empty-dir")
            .join(volume)
    }

    /// The kubelet's `cgroupRoot`, e.g. `/ckpt-node-AbCd12`.
    pub fn cgroup_root(&self) -> &str {
        &self.layout.cgroup_root
    }

    /// The Linux bridge of the pod network.
    pub fn bridge(&self) -> &str {
        &self.layout.bridge
    }

    /// `(component, pid)` of containerd and the kubelet.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.processes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|p| (p.name.clone(), p.pid()))
            .collect()
    }

    /// The last `lines` lines of `containerd` or `kubelet`'s log.
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        log_tail(&self.layout.path(&format!("{component}.log")), lines)
    }

    /// Imports an oci-archive tarball into containerd's `k8s.io` namespace,
    /// where the kubelet finds its images.
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        import(&self.layout, archive)
    }

    /// Runs `ctr --address <socket> -n k8s.io ARGS…` (for tests and debugging).
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        ctr(&self.layout, args)
    }

    /// Backs claim `ns/claim` with directory `dir` of this machine: creates
    /// the claim if it does not exist (no storage class, 1Gi, every access
    /// mode), a hostPath PersistentVolume reserved for it, and waits until the
    /// PersistentVolume controller has bound them. Pods then get `dir` mounted
    /// by the kubelet, read-only where their volumeMount says so. The
    /// converter runs as uid 65532: give it the directories it writes
    /// ([`chown_tree`]).
    pub async fn bind_claim(
        &self,
        client: &Client,
        ns: &str,
        claim: &str,
        dir: &Path,
    ) -> Result<()> {
        bind_claim(client, ns, claim, dir).await
    }

    /// Stops the kubelet, kills every container of the node, stops containerd
    /// and removes the node's mounts, bridge, cgroups and (unless kept) temp
    /// dir. Idempotent; `Drop` calls it. The Node object stays in the API.
    pub fn stop(&self) {
        let mut processes =
            std::mem::take(&mut *self.processes.lock().unwrap_or_else(|p| p.into_inner()));
        // The kubelet first, so that it restarts nothing; containers next
        // (sweep), while containerd still handles their exits; then containerd.
        if let Some(mut kubelet) = processes.pop() {
            kubelet.stop(Duration::from_secs(10));
        }
        for pid in sweep::cgroup_pids(&self.layout) {
            crate::process::signal(pid, libc::SIGKILL);
        }
        while let Some(mut p) = processes.pop() {
            p.stop(Duration::from_secs(10));
        }
        let problems = sweep::sweep(&self.layout);
        if !problems.is_empty() {
            eprintln!(
                "ckpt-testcluster: node cleanup left: {}",
                problems.join("; ")
            );
        }
        if let Some(t) = self
            .tempdir
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            if self.keep {
                let _ = std::fs::write(t.path().join(KEPT_FILE), b"");
                let path = t.keep();
                eprintln!("ckpt-testcluster: kept {}", path.display());
            } else if let Err(e) = t.close() {
                eprintln!(
                    "ckpt-testcluster: removing {}: {e}",
                    self.layout.dir.display()
                );
            }
        }
    }

    /// What of this node is still on the machine: processes in its cgroups or
    /// started for it, mounts under its dir, its bridge, its cgroups. Empty
    /// after [`RealNode::stop`]; for tests of the cleanup.
    pub fn leftovers(&self) -> Vec<String> {
        leftovers(&self.layout)
    }

    /// [`RealNode::leftovers`] for a node dir that may be gone already.
    pub fn leftovers_of(dir: &Path) -> Vec<String> {
        leftovers(&Layout::new(dir))
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        self.stop();
    }
}

fn leftovers(l: &Layout) -> Vec<String> {
    let mut out = Vec::new();
    let mut pids = sweep::cgroup_pids(l);
    pids.extend(sweep::processes_mentioning(&l.dir));
    if !pids.is_empty() {
        out.push(format!("processes {pids:?}"));
    }
    let mounts = sweep::mounts_under(&l.dir);
    if !mounts.is_empty() {
        out.push(format!("mounts {mounts:?}"));
    }
    if sweep::bridge_exists(l) {
        out.push(format!("bridge {}", l.bridge));
    }
    let cgroups = sweep::cgroup_dirs(l);
    if !cgroups.is_empty() {
        out.push(format!("cgroups {cgroups:?}"));
    }
    out
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn ctr(l: &Layout, args: &[&str]) -> Result<Output> {
    let program = need_program("ctr")?;
    Command::new(&program)
        .arg(format!("--address={}", l.socket().display()))
        .args(["--namespace", "k8s.io"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            program: program.display().to_string(),
            source,
        })
}

fn import(l: &Layout, archive: &Path) -> Result<()> {
    let out = ctr(l, &["images", "import", &archive.display().to_string()])?;
    if !out.status.success() {
        return Err(Error::Node {
            message: format!(
                "ctr images import {}: {}",
                archive.display(),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(())
}

/// Builds the pause image into `out` with `e2e/k8s/pause/build.sh`; returns
/// the oci-archive.
fn build_pause_image(out: &Path) -> Result<PathBuf> {
    let script = bins::workspace_root().join("e2e/k8s/pause/build.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script).arg(out).arg(PAUSE_IMAGE);
    run_checked(cmd, &script.display().to_string())?;
    let archive = out.join("pause.tar");
    if !archive.is_file() {
        return Err(Error::Node {
            message: format!("{} wrote no {}", script.display(), archive.display()),
        });
    }
    Ok(archive)
}

async fn bind_claim(client: &Client, ns: &str, claim: &str, dir: &Path) -> Result<()> {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    if pvcs
        .get_opt(claim)
        .await
        .map_err(|e| Error::kube(format!("reading claim {ns}/{claim}"), e))?
        .is_none()
    {
        let pvc: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
            "metadata": {"name": claim, "namespace": ns},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }))
        .expect("a valid claim");
        pvcs.create(&PostParams::default(), &pvc)
            .await
            .map_err(|e| Error::kube(format!("creating claim {ns}/{claim}"), e))?;
    }
    let name = format!("{ns}-{claim}");
    let pv = PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        ..serde_json::from_value(serde_json::json!({
            "spec": {
                "capacity": {"storage": "1Ti"},
                "accessModes": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "volumeMode": "Filesystem",
                "hostPath": {"path": dir.display().to_string(), "type": "Directory"},
                "claimRef": {"namespace": ns, "name": claim},
            },
        }))
        .expect("a valid volume")
    };
    pvs.create(&PostParams::default(), &pv)
        .await
        .map_err(|e| Error::kube(format!("creating volume {name}"), e))?;
    let started = Instant::now();
    let timeout = Duration::from_secs(120);
    loop {
        let phase = pvcs
            .get(claim)
            .await
            .map_err(|e| Error::kube(format!("reading claim {ns}/{claim}"), e))?
            .status
            .and_then(|s| s.phase);
        if phase.as_deref() == Some("Bound") {
            return Ok(());
        }
        if started.elapsed() > timeout {
            return Err(Error::Node {
                message: format!(
                    "claim {ns}/{claim} not Bound to volume {name} after {timeout:?} (phase {phase:?}); is persistentvolume-binder-controller running?"
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `chown -R uid:uid dir`: hostPath volumes keep the host's owners, and the
/// images run as [`IMAGE_USER`], so a directory they write must be theirs.
pub fn chown_tree(dir: &Path, uid: u32) -> Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        std::os::unix::fs::lchown(&p, Some(uid), Some(uid)).map_err(|e| Error::io(&p, e))?;
        if p.is_dir() && !p.is_symlink() {
            for e in std::fs::read_dir(&p).map_err(|e| Error::io(&p, e))? {
                stack.push(e.map_err(|e| Error::io(&p, e))?.path());
            }
        }
    }
    Ok(())
}
