//! A real control plane on 127.0.0.1: etcd, kube-apiserver (RBAC, client
//! certificates) and kube-controller-manager running the Job, garbage-collector,
//! TTL-after-finished and namespace controllers. Flags as in
//! `e2e/k8s/NOTES.md` / `smoke.sh`. With [`ControlPlaneOptions::real_node`] it
//! is ready for a kubelet ([`crate::RealNode`]): kube-scheduler, the Node
//! authorizer, the node, volume and claim controllers.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::{authentication::v1::TokenRequest, coordination::v1::Lease};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::bins;
use crate::certs::{self, CertFiles};
use crate::error::{Error, Result};
use crate::node::NodeKind;
use crate::process::{KEPT_FILE, ManagedProcess, close_tempdir, log_tail, owned_tempdir};

/// The controllers kube-controller-manager runs by default: enough for Jobs to
/// complete or fail, owner-reference cascades, `ttlSecondsAfterFinished` and
/// namespace deletion.
pub const DEFAULT_CONTROLLERS: [&str; 4] = [
    "job-controller",
    "garbage-collector-controller",
    "ttl-after-finished-controller",
    "namespace-controller",
];

/// The controllers a control plane for a real node runs on top of
/// [`DEFAULT_CONTROLLERS`]: node lifecycle (it lifts the `not-ready` taint every
/// new Node gets, so pods can be scheduled), the PersistentVolume binder and the
/// protection controllers that let claims and volumes be deleted, and what pods
/// need for ServiceAccount tokens: the `default` account of each namespace and
/// the `kube-root-ca.crt` ConfigMap (the CA in every token volume); and the
/// Deployment and ReplicaSet controllers, so that a chart's Deployment gets pods.
pub const REAL_NODE_CONTROLLERS: [&str; 8] = [
    "node-lifecycle-controller",
    "persistentvolume-binder-controller",
    "persistentvolumeclaim-protection-controller",
    "persistentvolume-protection-controller",
    "serviceaccount-controller",
    "root-ca-certificate-publisher-controller",
    "deployment-controller",
    "replicaset-controller",
];

/// How to start a [`ControlPlane`].
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// Directory with etcd, kube-apiserver, kube-controller-manager and kubectl;
    /// `None`: [`bins::k8s_bin_dir`] (`$CKPT_K8S_BIN`, else `e2e/k8s/build.sh`).
    pub bin_dir: Option<PathBuf>,
    /// `--controllers` of kube-controller-manager; empty: do not start it.
    pub controllers: Vec<String>,
    /// Keep the temp dir (certificates, kubeconfig, logs, etcd data) after
    /// teardown. Default: `$CKPT_KEEP_CLUSTER == "1"`.
    pub keep: bool,
    /// How long each component may take to become ready.
    pub startup_timeout: Duration,
    /// How long each process gets between SIGTERM and SIGKILL at teardown.
    pub stop_grace: Duration,
    /// Extra kube-apiserver flags (`--flag=value`), appended last.
    pub extra_apiserver_args: Vec<String>,
    /// Admission plugins turned on besides the apiserver's defaults.
    pub enable_admission_plugins: Vec<String>,
    /// Write an audit log of the requests ServiceAccounts make (see
    /// [`ControlPlane::denied_requests`]).
    pub audit_service_accounts: bool,
    /// Default admission plugins turned off. Default: `ServiceAccount`, because no
    /// ServiceAccount controller runs to create the `default` accounts it requires;
    /// [`ControlPlaneOptions::cluster_like`] runs one and keeps the plugin.
    pub disable_admission_plugins: Vec<String>,
    /// Ready for a real node ([`crate::RealNode`]): also start kube-scheduler,
    /// authorize with `Node,RBAC`, run [`REAL_NODE_CONTROLLERS`] (when
    /// kube-controller-manager runs at all) and publish the CA for token volumes.
    /// Set it with [`ControlPlaneOptions::with_real_node`], which also sets the
    /// admission plugins a node needs.
    pub real_node: bool,
}

impl ControlPlaneOptions {
    /// Closer to a real cluster: the `ServiceAccount` admission plugin on (a pod
    /// naming a ServiceAccount that does not exist is refused, as a Job's events then
    /// say) with kube-controller-manager's ServiceAccount controller creating each
    /// namespace's `default` account, `OwnerReferencesPermissionEnforcement` on
    /// (setting `blockOwnerDeletion` needs permission to update the owner's
    /// finalizers), and the audit log of ServiceAccounts' requests. On the node
    /// stand-in, pods must then set `automountServiceAccountToken: false`: it cannot
    /// emulate the token volume the plugin would add otherwise.
    pub fn cluster_like() -> Self {
        let mut opts = ControlPlaneOptions::default();
        opts.controllers.push("serviceaccount-controller".into());
        opts.enable_admission_plugins = vec![
            "ServiceAccount".into(),
            "OwnerReferencesPermissionEnforcement".into(),
        ];
        opts.disable_admission_plugins.clear();
        opts.audit_service_accounts = true;
        opts
    }

    /// The default options made ready for a real node
    /// ([`ControlPlaneOptions::with_real_node`]).
    pub fn for_real_node() -> Self {
        ControlPlaneOptions::default().with_real_node()
    }

    /// These options made ready for a real node ([`ControlPlaneOptions::real_node`]),
    /// with the `ServiceAccount` admission plugin kept (pods get token volumes, which
    /// the kubelet fills), and `NodeRestriction` (the kubelet may only change its own
    /// Node and its pods) and `OwnerReferencesPermissionEnforcement` (changing
    /// ownerReferences needs delete on the object, `blockOwnerDeletion` needs update
    /// on the owner's finalizers, so missing operator RBAC shows) turned on, and
    /// the audit log of ServiceAccounts' requests written
    /// ([`ControlPlane::denied_requests`]).
    pub fn with_real_node(mut self) -> Self {
        self.real_node = true;
        self.audit_service_accounts = true;
        self.disable_admission_plugins
            .retain(|p| p != "ServiceAccount");
        for plugin in ["NodeRestriction", "OwnerReferencesPermissionEnforcement"] {
            if !self.enable_admission_plugins.iter().any(|p| p == plugin) {
                self.enable_admission_plugins.push(plugin.into());
            }
        }
        self
    }

    /// These options, made ready for a real node when `kind` is [`NodeKind::Real`].
    pub fn for_node(self, kind: NodeKind) -> Self {
        match kind {
            NodeKind::Real => self.with_real_node(),
            NodeKind::StandIn => self,
        }
    }
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        ControlPlaneOptions {
            bin_dir: None,
            controllers: DEFAULT_CONTROLLERS.iter().map(|s| s.to_string()).collect(),
            keep: std::env::var("CKPT_KEEP_CLUSTER").is_ok_and(|v| v == "1"),
            startup_timeout: Duration::from_secs(90),
            stop_grace: Duration::from_secs(5),
            extra_apiserver_args: Vec::new(),
            enable_admission_plugins: Vec::new(),
            disable_admission_plugins: vec!["ServiceAccount".into()],
            audit_service_accounts: false,
            real_node: false,
        }
    }
}

/// A running control plane. Dropping it (also while a test panics) stops
/// kube-controller-manager, kube-apiserver and etcd in that order (SIGTERM, then
/// SIGKILL after [`ControlPlaneOptions::stop_grace`]) and removes its temp dir
/// unless [`ControlPlaneOptions::keep`]. Children also carry
/// `PR_SET_PDEATHSIG=SIGKILL`, so none survives an aborted test process.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    tempdir: Mutex<Option<tempfile::TempDir>>,
    keep: bool,
    bin_dir: PathBuf,
    kubeconfig: PathBuf,
    config: Config,
    api_url: String,
    certs: CertFiles,
    processes: Mutex<Vec<ManagedProcess>>,
    stop_grace: Duration,
    names: AtomicU64,
    real_node: bool,
    /// From each [`ControlPlane::start_component`] of the apiserver until its
    /// `/readyz` said ok: while it starts, RBAC's caches are not yet filled and it
    /// refuses requests that its rules allow.
    starting: Mutex<Vec<(Timestamp, Timestamp)>>,
    etcd_port: u16,
    startup_timeout: Duration,
}

/// What `start` builds up; stopped (and the dir kept for its logs) if starting fails.
struct Boot {
    tempdir: Option<tempfile::TempDir>,
    dir: PathBuf,
    processes: Vec<ManagedProcess>,
    grace: Duration,
}

impl Drop for Boot {
    fn drop(&mut self) {
        for p in self.processes.iter_mut().rev() {
            p.stop(self.grace);
        }
        if let Some(t) = self.tempdir.take() {
            let _ = std::fs::write(t.path().join(KEPT_FILE), b"");
            let _ = t.keep();
            eprintln!(
                "ckpt-testcluster: control plane failed to start; logs kept in {}",
                self.dir.display()
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
        let log = self.dir.join(format!("{component}.log"));
        Error::Timeout {
            what: what.to_string(),
            after,
            tail: log_tail(&log, 30),
            log,
        }
    }
}

/// The audit log, in the control plane's directory.
const AUDIT_LOG: &str = "audit.log";
/// Every request of a ServiceAccount, without bodies; nothing else.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: [\"system:serviceaccounts\"]
  - level: None
";

/// How many times [`ControlPlane::start`] picks new ports after a clash.
pub const PORT_ATTEMPTS: usize = 5;

/// `N` different ports of 127.0.0.1 that are free now (a caller that binds them
/// later must handle a clash).
pub fn free_ports<const N: usize>() -> Result<[u16; N]> {
    // Hold all listeners until every port is chosen, so the N ports differ.
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for port in &mut ports {
        let l =
            std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("127.0.0.1:0", e))?;
        *port = l
            .local_addr()
            .map_err(|e| Error::io("127.0.0.1:0", e))?
            .port();
        listeners.push(l);
    }
    Ok(ports)
}

async fn etcd_healthy(port: u16) -> bool {
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        Some(body.contains("\"health\":\"true\""))
    };
    tokio::time::timeout(Duration::from_secs(2), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Waits until `component` (kube-controller-manager or kube-scheduler) holds
/// its leader Lease in kube-system: the sign that it is up and working.
async fn wait_for_lease(
    client: &Client,
    component: &str,
    boot: &mut Boot,
    timeout: Duration,
) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    let started = Instant::now();
    loop {
        if let Ok(Some(lease)) = leases.get_opt(component).await
            && lease
                .spec
                .and_then(|s| s.holder_identity)
                .is_some_and(|h| !h.is_empty())
        {
            return Ok(());
        }
        boot.check_running(&format!("waiting for the {component} leader lease"))?;
        if started.elapsed() > timeout {
            return Err(boot.timeout(
                &format!("{component} to hold lease kube-system/{component}"),
                timeout,
                component,
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

pub(crate) fn kubeconfig_text(
    server: &str,
    ca: &Path,
    user: &str,
    user_fields: &[(&str, String)],
) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: ckpt-testcluster\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: {user}\n  user:\n",
        yaml_str(server),
        yaml_str(&ca.display().to_string()),
    );
    for (k, v) in user_fields {
        text.push_str(&format!("    {k}: {}\n", yaml_str(v)));
    }
    text.push_str(&format!(
        "contexts:\n- name: ckpt-testcluster\n  context:\n    cluster: ckpt-testcluster\n    user: {user}\ncurrent-context: ckpt-testcluster\n"
    ));
    text
}

async fn config_from_kubeconfig(path: &Path, text: &str) -> Result<Config> {
    let err = |message: String| Error::Kubeconfig {
        path: path.to_path_buf(),
        message,
    };
    let kc = Kubeconfig::from_yaml(text).map_err(|e| err(e.to_string()))?;
    Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| err(e.to_string()))
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager with fresh
    /// certificates, ports and temp dir, and waits until the apiserver is ready
    /// (`/readyz`, the `default` namespace exists) and kube-controller-manager
    /// holds its leader lease. Takes about 15 s on 2 cores once the binaries exist.
    ///
    /// Ports are chosen by binding port 0 and releasing it, since etcd and
    /// kube-apiserver must be told theirs; another process may take one in between.
    /// A component that then exits because its address is in use is started again
    /// on fresh ports (up to [`PORT_ATTEMPTS`] times), any other failure is returned.
    pub async fn start(opts: ControlPlaneOptions) -> Result<ControlPlane> {
        let mut attempt = 1;
        loop {
            match Self::start_once(&opts).await {
                Err(e) if e.address_in_use() && attempt < PORT_ATTEMPTS => {
                    eprintln!(
                        "ckpt-testcluster: a port was taken before its component bound it (attempt {attempt}); starting again on new ports: {e}"
                    );
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_once(opts: &ControlPlaneOptions) -> Result<ControlPlane> {
        let bin_dir = match opts.bin_dir.clone() {
            Some(dir) => dir,
            None => tokio::task::spawn_blocking(bins::k8s_bin_dir)
                .await
                .map_err(|e| Error::Binaries {
                    message: format!("locating binaries panicked: {e}"),
                })??,
        };
        let tempdir = owned_tempdir("ckpt-testcluster-")?;
        let dir = tempdir.path().to_path_buf();
        let mut boot = Boot {
            tempdir: Some(tempdir),
            dir: dir.clone(),
            processes: Vec::new(),
            grace: opts.stop_grace,
        };
        let timeout = opts.startup_timeout;
        let certs = certs::write_all(&dir)?;
        let [etcd_port, peer_port, api_port, scheduler_port] = free_ports::<4>()?;
        let bin = |name: &str| bin_dir.join(name);
        let s = |p: &Path| p.display().to_string();

        // etcd
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_args = vec![
            "--name=testcluster".to_string(),
            format!("--data-dir={}", s(&dir.join("etcd"))),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=testcluster={peer_url}"),
            "--unsafe-no-fsync=true".to_string(),
            "--log-level=warn".to_string(),
        ];
        boot.processes.push(ManagedProcess::spawn(
            "etcd",
            &bin("etcd"),
            &etcd_args,
            dir.join("etcd.log"),
        )?);
        let started = Instant::now();
        while !etcd_healthy(etcd_port).await {
            boot.check_running("waiting for etcd /health")?;
            if started.elapsed() > timeout {
                return Err(boot.timeout(&format!("etcd {etcd_url}/health"), timeout, "etcd"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // kube-apiserver
        let mut api_args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".to_string(),
            "--advertise-address=127.0.0.1".to_string(),
            format!("--secure-port={api_port}"),
            // 127.0.0.1 is refused as advertise address by the other reconcilers.
            "--endpoint-reconciler-type=none".to_string(),
            format!("--tls-cert-file={}", s(&certs.serving_cert)),
            format!("--tls-private-key-file={}", s(&certs.serving_key)),
            format!("--client-ca-file={}", s(&certs.ca_cert)),
            if opts.real_node {
                "--authorization-mode=Node,RBAC".to_string()
            } else {
                "--authorization-mode=RBAC".to_string()
            },
            "--service-account-issuer=https://kubernetes.default.svc".to_string(),
            format!("--service-account-key-file={}", s(&certs.sa_pub)),
            format!("--service-account-signing-key-file={}", s(&certs.sa_key)),
            "--service-cluster-ip-range=10.0.0.0/24".to_string(),
            "--allow-privileged=true".to_string(),
            format!("--cert-dir={}", s(&dir.join("apiserver-certs"))),
        ];
        for (flag, plugins) in [
            ("enable", &opts.enable_admission_plugins),
            ("disable", &opts.disable_admission_plugins),
        ] {
            if !plugins.is_empty() {
                api_args.push(format!("--{flag}-admission-plugins={}", plugins.join(",")));
            }
        }
        if opts.audit_service_accounts {
            let policy = dir.join("audit-policy.yaml");
            std::fs::write(&policy, AUDIT_POLICY).map_err(|e| Error::io(&policy, e))?;
            api_args.extend([
                format!("--audit-policy-file={}", s(&policy)),
                format!("--audit-log-path={}", s(&dir.join(AUDIT_LOG))),
                // Written while the request is handled, not batched later.
                "--audit-log-mode=blocking".to_string(),
                "--audit-log-format=json".to_string(),
            ]);
        }
        api_args.extend(opts.extra_apiserver_args.iter().cloned());
        boot.processes.push(ManagedProcess::spawn(
            "kube-apiserver",
            &bin("kube-apiserver"),
            &api_args,
            dir.join("kube-apiserver.log"),
        )?);
        let api_url = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = dir.join("kubeconfig");
        let text = kubeconfig_text(
            &api_url,
            &certs.ca_cert,
            "admin",
            &[
                ("client-certificate", s(&certs.admin_cert)),
                ("client-key", s(&certs.admin_key)),
            ],
        );
        std::fs::write(&kubeconfig, &text).map_err(|e| Error::io(&kubeconfig, e))?;
        let config = config_from_kubeconfig(&kubeconfig, &text).await?;
        let client = Client::try_from(config.clone()).map_err(|e| Error::Kubeconfig {
            path: kubeconfig.clone(),
            message: e.to_string(),
        })?;
        let started = Instant::now();
        loop {
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("a static request builds");
            if let Ok(body) = client.request_text(req).await
                && body.trim() == "ok"
            {
                break;
            }
            boot.check_running("waiting for kube-apiserver /readyz")?;
            if started.elapsed() > timeout {
                return Err(boot.timeout("kube-apiserver /readyz", timeout, "kube-apiserver"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let namespaces: Api<Namespace> = Api::all(client.clone());
        while !matches!(namespaces.get_opt("default").await, Ok(Some(_))) {
            boot.check_running("waiting for the default namespace")?;
            if started.elapsed() > timeout {
                return Err(boot.timeout("the default namespace", timeout, "kube-apiserver"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // kube-controller-manager
        if !opts.controllers.is_empty() {
            let mut controllers = opts.controllers.clone();
            if opts.real_node {
                for c in REAL_NODE_CONTROLLERS {
                    if !controllers.iter().any(|have| have == c) {
                        controllers.push(c.to_string());
                    }
                }
            }
            let mut kcm_args = vec![
                format!("--kubeconfig={}", s(&kubeconfig)),
                format!("--controllers={}", controllers.join(",")),
                // Leader election on: the lease is how we know it is up. Renewals
                // may fail for 45 s (an apiserver restart, a brief etcd outage in
                // the fault tests) before it gives up leading and exits.
                "--leader-elect=true".to_string(),
                "--leader-elect-lease-duration=60s".to_string(),
                "--leader-elect-renew-deadline=45s".to_string(),
                "--use-service-account-credentials=false".to_string(),
                "--secure-port=0".to_string(),
            ];
            if opts.real_node {
                // What root-ca-certificate-publisher-controller publishes.
                kcm_args.push(format!("--root-ca-file={}", s(&certs.ca_cert)));
            }
            boot.processes.push(ManagedProcess::spawn(
                "kube-controller-manager",
                &bin("kube-controller-manager"),
                &kcm_args,
                dir.join("kube-controller-manager.log"),
            )?);
            wait_for_lease(&client, "kube-controller-manager", &mut boot, timeout).await?;
        }

        if opts.real_node {
            let scheduler_args = vec![
                format!("--kubeconfig={}", s(&kubeconfig)),
                format!("--authentication-kubeconfig={}", s(&kubeconfig)),
                format!("--authorization-kubeconfig={}", s(&kubeconfig)),
                "--bind-address=127.0.0.1".to_string(),
                format!("--secure-port={scheduler_port}"),
                // As for kube-controller-manager: the lease says it is up.
                "--leader-elect=true".to_string(),
                "--leader-elect-lease-duration=60s".to_string(),
                "--leader-elect-renew-deadline=45s".to_string(),
            ];
            boot.processes.push(ManagedProcess::spawn(
                "kube-scheduler",
                &bin("kube-scheduler"),
                &scheduler_args,
                dir.join("kube-scheduler.log"),
            )?);
            wait_for_lease(&client, "kube-scheduler", &mut boot, timeout).await?;
        }

        let tempdir = boot.tempdir.take();
        let processes = std::mem::take(&mut boot.processes);
        Ok(ControlPlane {
            dir,
            tempdir: Mutex::new(tempdir),
            keep: opts.keep,
            bin_dir,
            kubeconfig,
            config,
            api_url,
            certs,
            processes: Mutex::new(processes),
            stop_grace: opts.stop_grace,
            names: AtomicU64::new(0),
            real_node: opts.real_node,
            starting: Mutex::new(Vec::new()),
            etcd_port,
            startup_timeout: opts.startup_timeout,
        })
    }

    /// The control plane shared by every test in this process, started by the
    /// first caller with default options, or with
    /// [`ControlPlaneOptions::for_real_node`] when `CKPT_TEST_NODE=real` (see
    /// [`crate::NodeKind`]). It is stopped when the process exits
    /// normally (an `atexit` hook; `Drop` never runs for statics) and killed by
    /// the parent-death signal otherwise. Give each test its own namespace
    /// ([`ControlPlane::new_namespace`]). If starting fails, every caller gets
    /// the same error without trying again.
    pub async fn shared() -> Result<&'static ControlPlane> {
        Self::shared_with(ControlPlaneOptions::default).await
    }

    /// Like [`ControlPlane::shared`], started with `options()` by the first caller
    /// (a test binary should always pass the same options; later callers' are not
    /// used), made ready for a real node when `CKPT_TEST_NODE=real`.
    pub async fn shared_with(
        options: impl FnOnce() -> ControlPlaneOptions,
    ) -> Result<&'static ControlPlane> {
        let kind = crate::NodeKind::from_env()?;
        Self::shared_for(options, kind).await
    }

    /// The shared control plane (default options), ready for the shared
    /// [`crate::RealNode`] whatever `CKPT_TEST_NODE` says. Fails if this process
    /// already started the shared control plane without it.
    pub async fn shared_for_real_node() -> Result<&'static ControlPlane> {
        Self::shared_for(ControlPlaneOptions::default, NodeKind::Real).await
    }

    async fn shared_for(
        options: impl FnOnce() -> ControlPlaneOptions,
        kind: NodeKind,
    ) -> Result<&'static ControlPlane> {
        let result = SHARED
            .get_or_init(|| async {
                let opts = options().for_node(kind);
                let result = ControlPlane::start(opts).await.map_err(|e| e.to_string());
                if result.is_ok() {
                    // SAFETY: registers a plain extern "C" function without captures.
                    unsafe {
                        libc::atexit(stop_shared_at_exit);
                    }
                }
                result
            })
            .await;
        let cp = result.as_ref().map_err(|e| Error::Shared(e.clone()))?;
        if kind == NodeKind::Real && !cp.real_node {
            return Err(Error::Shared(
                "it was started without a real node (ControlPlane::shared without CKPT_TEST_NODE=real) before a test asked for one; a test binary uses either the stand-in or the real node".to_string(),
            ));
        }
        Ok(cp)
    }

    /// Whether it was started for a real node ([`ControlPlaneOptions::real_node`]).
    pub fn is_for_real_node(&self) -> bool {
        self.real_node
    }

    /// The certificate and key the kubelet of [`crate::RealNode`] authenticates with.
    pub(crate) fn node_credentials(&self) -> (&Path, &Path) {
        (&self.certs.node_cert, &self.certs.node_key)
    }

    /// A new admin client (user `admin`, group `system:masters`) on the
    /// caller's tokio runtime.
    pub fn client(&self) -> Client {
        Client::try_from(self.config.clone())
            .expect("the admin client configuration was already used successfully at start")
    }

    /// The admin client configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The admin kubeconfig file (for kubectl, helm, or a binary under test).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The apiserver URL, `https://127.0.0.1:PORT`.
    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    /// The directory with the control-plane binaries (also has helm).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The temp dir: certificates, kubeconfigs, `<component>.log`, etcd data.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate the apiserver's serving certificate chains to.
    pub fn ca_cert_path(&self) -> &Path {
        &self.certs.ca_cert
    }

    /// `(component, pid)` of the running processes, in start order.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.processes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|p| (p.name.clone(), p.pid()))
            .collect()
    }

    /// Stops `component` (`etcd`, `kube-apiserver`, …) as a crash or an outage
    /// would, leaving the others running: SIGTERM, then SIGKILL after
    /// [`ControlPlaneOptions::stop_grace`]. [`ControlPlane::start_component`]
    /// brings it back.
    ///
    /// # Errors
    /// When no such component runs here.
    pub fn stop_component(&self, component: &str) -> Result<()> {
        let mut processes = self.processes.lock().unwrap_or_else(|p| p.into_inner());
        let p = processes
            .iter_mut()
            .find(|p| p.name == component)
            .ok_or_else(|| unknown_component(component))?;
        p.stop(self.stop_grace);
        Ok(())
    }

    /// Starts a component stopped by [`ControlPlane::stop_component`] again, with
    /// its arguments (same ports, same etcd data), and waits until the control
    /// plane serves: etcd healthy, then the apiserver's `/readyz` (which checks
    /// etcd too).
    ///
    /// # Errors
    /// When no such component runs here, it cannot be started, or the control
    /// plane is not ready within [`ControlPlaneOptions::startup_timeout`].
    pub async fn start_component(&self, component: &str) -> Result<()> {
        let respawned = Timestamp::now();
        {
            let mut processes = self.processes.lock().unwrap_or_else(|p| p.into_inner());
            processes
                .iter_mut()
                .find(|p| p.name == component)
                .ok_or_else(|| unknown_component(component))?
                .respawn()?;
        }
        let started = Instant::now();
        let timeout = |what: &str, component: &str| Error::Timeout {
            what: what.to_string(),
            after: started.elapsed(),
            log: self.dir.join(format!("{component}.log")),
            tail: self.log_tail(component, 30),
        };
        while !etcd_healthy(self.etcd_port).await {
            if started.elapsed() > self.startup_timeout {
                return Err(timeout("etcd /health", "etcd"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let client = self.client();
        loop {
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("a static request builds");
            if let Ok(body) = client.request_text(req).await
                && body.trim() == "ok"
            {
                if component == "kube-apiserver" {
                    self.starting
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((respawned, Timestamp::now()));
                }
                return Ok(());
            }
            if started.elapsed() > self.startup_timeout {
                return Err(timeout("kube-apiserver /readyz", "kube-apiserver"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The requests of `user` (`system:serviceaccount:NS:NAME`) that the apiserver
    /// refused with 403, as `VERB RESOURCE NAMESPACE/NAME: MESSAGE` lines, from its
    /// audit log: what RBAC denied, whatever the client logged. Requests received
    /// while a restarted apiserver was not yet ready are left out: until its RBAC
    /// caches are filled it refuses what its rules allow, and clients retry. Needs
    /// [`ControlPlaneOptions::audit_service_accounts`].
    ///
    /// # Errors
    /// When the audit log cannot be read (not enabled, or an I/O error).
    pub fn denied_requests(&self, user: &str) -> Result<Vec<String>> {
        let path = self.dir.join(AUDIT_LOG);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let starting = self
            .starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["user"]["username"] == user && e["responseStatus"]["code"] == 403)
            .filter(|e| {
                let received =
                    serde_json::from_value::<MicroTime>(e["requestReceivedTimestamp"].clone()).ok();
                !received.is_some_and(|t| starting.iter().any(|(a, b)| (*a..=*b).contains(&t.0)))
            })
            .map(|e| {
                let o = &e["objectRef"];
                format!(
                    "{} {}{} {}/{}: {}",
                    e["verb"].as_str().unwrap_or("?"),
                    o["resource"].as_str().unwrap_or("?"),
                    o["subresource"]
                        .as_str()
                        .map(|s| format!("/{s}"))
                        .unwrap_or_default(),
                    o["namespace"].as_str().unwrap_or("-"),
                    o["name"].as_str().unwrap_or("-"),
                    e["responseStatus"]["message"].as_str().unwrap_or("")
                )
            })
            .collect())
    }

    /// The last `lines` lines of `etcd`, `kube-apiserver` or
    /// `kube-controller-manager`'s log.
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        log_tail(&self.dir.join(format!("{component}.log")), lines)
    }

    /// Runs `kubectl --kubeconfig <admin> ARGS…` and returns its output
    /// (whatever the exit status).
    pub async fn kubectl<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.kubectl_with_stdin(args, "").await
    }

    /// Like [`ControlPlane::kubectl`], with `stdin` fed to the process (for
    /// `apply -f -`).
    pub async fn kubectl_with_stdin<I, S>(&self, args: I, stdin: &str) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let program = self.bin_dir.join("kubectl");
        let mut child = tokio::process::Command::new(&program)
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| Error::Spawn {
                program: program.display().to_string(),
                source,
            })?;
        let mut input = child.stdin.take().expect("stdin was piped");
        let data = stdin.as_bytes().to_vec();
        let writer = tokio::spawn(async move {
            let _ = input.write_all(&data).await;
        });
        let output = child
            .wait_with_output()
            .await
            .map_err(|source| Error::Spawn {
                program: program.display().to_string(),
                source,
            })?;
        let _ = writer.await;
        Ok(output)
    }

    /// Creates a namespace named `PREFIX-N` (N counts up in this process) and
    /// returns its name.
    pub async fn new_namespace(&self, prefix: &str) -> Result<String> {
        let name = format!("{prefix}-{}", self.names.fetch_add(1, Ordering::Relaxed));
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(self.client())
            .create(&PostParams::default(), &ns)
            .await
            .map_err(|e| Error::kube(format!("creating namespace {name}"), e))?;
        if self.real_node {
            // Pods are refused until the ServiceAccount controller has made the
            // namespace's `default` account; wait here rather than in every Job.
            let sas: Api<ServiceAccount> = Api::namespaced(self.client(), &name);
            let started = Instant::now();
            while !matches!(sas.get_opt("default").await, Ok(Some(_))) {
                if started.elapsed() > Duration::from_secs(120) {
                    return Err(Error::Timeout {
                        what: format!("serviceaccount {name}/default"),
                        after: started.elapsed(),
                        log: self.dir.join("kube-controller-manager.log"),
                        tail: self.log_tail("kube-controller-manager", 30),
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(name)
    }

    /// Writes a kubeconfig that authenticates as ServiceAccount `ns/name` with a
    /// one-hour token from the TokenRequest API, creating the ServiceAccount if
    /// it does not exist. Its permissions are exactly what RBAC grants it.
    pub async fn kubeconfig_for_service_account(&self, ns: &str, name: &str) -> Result<PathBuf> {
        let sas: Api<ServiceAccount> = Api::namespaced(self.client(), ns);
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        match sas.create(&PostParams::default(), &sa).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => {
                return Err(Error::kube(
                    format!("creating serviceaccount {ns}/{name}"),
                    e,
                ));
            }
        }
        let request = TokenRequest {
            spec: k8s_openapi::api::authentication::v1::TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let token = sas
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .map_err(|e| {
                Error::kube(
                    format!("requesting a token for serviceaccount {ns}/{name}"),
                    e,
                )
            })?
            .status
            .map(|s| s.token)
            .unwrap_or_default();
        let path = self.dir.join(format!("kubeconfig-sa-{ns}-{name}"));
        let text = kubeconfig_text(
            &self.api_url,
            &self.certs.ca_cert,
            &format!("system:serviceaccount:{ns}:{name}"),
            &[("token", token)],
        );
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    }

    /// A client that authenticates as ServiceAccount `ns/name` (see
    /// [`ControlPlane::kubeconfig_for_service_account`]).
    pub async fn client_for_service_account(&self, ns: &str, name: &str) -> Result<Client> {
        let path = self.kubeconfig_for_service_account(ns, name).await?;
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let config = config_from_kubeconfig(&path, &text).await?;
        Client::try_from(config).map_err(|e| Error::Kubeconfig {
            path,
            message: e.to_string(),
        })
    }

    /// Stops kube-controller-manager, kube-apiserver, then etcd (the apiserver
    /// hangs in shutdown if etcd is already gone), and removes the temp dir
    /// unless asked to keep it. Idempotent; `Drop` calls it.
    pub fn stop(&self) {
        let mut processes =
            std::mem::take(&mut *self.processes.lock().unwrap_or_else(|p| p.into_inner()));
        while let Some(mut p) = processes.pop() {
            let (took, killed) = p.stop(self.stop_grace);
            if std::env::var_os("CKPT_TESTCLUSTER_VERBOSE").is_some() {
                eprintln!("ckpt-testcluster: stopped {} in {took:?}", p.name);
            }
            if killed {
                eprintln!(
                    "ckpt-testcluster: {} (pid {}) ignored SIGTERM for {took:?}; killed",
                    p.name,
                    p.pid()
                );
            }
        }
        if let Some(t) = self
            .tempdir
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            close_tempdir(t, self.keep);
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

fn unknown_component(component: &str) -> Error {
    Error::Spawn {
        program: component.to_string(),
        source: std::io::Error::other("no such component runs in this control plane"),
    }
}

static SHARED: tokio::sync::OnceCell<std::result::Result<ControlPlane, String>> =
    tokio::sync::OnceCell::const_new();

extern "C" fn stop_shared_at_exit() {
    if let Some(Ok(cp)) = SHARED.get() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cp.stop()));
    }
}
