//! What every test of this binary shares: the control plane, the CRD, a namespace
//! with its own release of the chart, the operator binary as that release deploys it,
//! the node stand-in, fixtures, and waiting for observable state.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ckpt_operator::api::CheckpointConversion;
use ckpt_testcluster::{
    ControlPlane, ControlPlaneOptions, IMAGE_USER, NodeKind, NodeStandIn, RealNode, StandInConfig,
    chown_tree, converter_binary,
};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::sync::OnceCell;

/// The release every test installs into its namespace (its fullname is the same, so
/// the operator's ServiceAccount and Lease are `ckpt-operator` there).
pub const RELEASE: &str = "ckpt-operator";
/// The converter image the chart names (the stand-in accepts any tag of it).
pub const CONVERTER_IMAGE: &str = "ghcr.io/ckpt-dev/ckpt-convert";
pub const CRD_NAME: &str = "checkpointconversions.ckpt.dev";
/// The release that installs the CRD once, as a user's first `helm install` does.
pub const CRD_RELEASE: &str = "ckpt-crds";
pub const CRD_NAMESPACE: &str = "ckpt-crds";

pub use ckpt_testcluster::test_deadline as deadline;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

/// The shared control plane; with `CKPT_TEST_NODE=real`, ready for the shared real
/// node (see [`Env::start_node`]).
pub async fn cp() -> &'static ControlPlane {
    ControlPlane::shared_with(ControlPlaneOptions::cluster_like)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Which node this test process runs pods on (`CKPT_TEST_NODE`).
pub fn node_kind() -> NodeKind {
    NodeKind::from_env().unwrap_or_else(|e| panic!("{e}"))
}

/// Waits for something observable, failing with `what` and `state()` once
/// [`deadline`] has passed.
pub struct Waiting {
    what: String,
    started: Instant,
    limit: Duration,
}

impl Waiting {
    pub fn new(what: impl Into<String>) -> Self {
        Waiting {
            what: what.into(),
            started: Instant::now(),
            limit: deadline(),
        }
    }

    /// Waits for something a claim under test says happens within `limit` (for
    /// example "within seconds"): failing past it is the point of the test.
    pub fn within(what: impl Into<String>, limit: Duration) -> Self {
        Waiting {
            what: what.into(),
            started: Instant::now(),
            limit,
        }
    }

    /// Sleeps a little, or panics with the state when the deadline has passed.
    pub async fn tick(&self, state: impl FnOnce() -> String) {
        if self.started.elapsed() > self.limit {
            panic!(
                "{} did not happen within {:?}; state:\n{}",
                self.what,
                self.limit,
                state()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A command's outcome.
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn expect_ok(self, what: &str) -> String {
        assert!(
            self.ok,
            "{what} failed:\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self.stdout
    }

    pub fn expect_err(self, what: &str) -> String {
        assert!(
            !self.ok,
            "{what} should have failed; stdout:\n{}",
            self.stdout
        );
        self.stderr
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs `program args` with `stdin`, helm's state in a private directory.
pub async fn run(program: &Path, args: &[&str], stdin: &str) -> Run {
    let helm_home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cluster-helm-home");
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env("HELM_CACHE_HOME", helm_home.join("cache"))
        .env("HELM_CONFIG_HOME", helm_home.join("config"))
        .env("HELM_DATA_HOME", helm_home.join("data"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    let mut input = child.stdin.take().expect("piped");
    let data = stdin.as_bytes().to_vec();
    let writer = tokio::spawn(async move {
        let _ = input.write_all(&data).await;
    });
    let out = child.wait_with_output().await.expect("wait");
    let _ = writer.await;
    out.into()
}

/// The directory with helm, kubectl and the control plane.
pub fn bin_dir() -> PathBuf {
    ckpt_testcluster::k8s_bin_dir().unwrap_or_else(|e| panic!("{e}"))
}

/// helm without a cluster (template, lint).
pub async fn helm_local(args: &[&str]) -> Run {
    run(&bin_dir().join("helm"), args, "").await
}

/// helm against the shared control plane.
pub async fn helm(args: &[&str]) -> Run {
    helm_on(cp().await, args).await
}

/// helm against `cp`.
pub async fn helm_on(cp: &ControlPlane, args: &[&str]) -> Run {
    let kubeconfig = format!("--kubeconfig={}", cp.kubeconfig_path().display());
    let mut all = vec![kubeconfig.as_str()];
    all.extend_from_slice(args);
    run(&cp.bin_dir().join("helm"), &all, "").await
}

/// kubectl as the cluster admin of the shared control plane.
pub async fn kubectl(args: &[&str], stdin: &str) -> Run {
    kubectl_on(cp().await, args, stdin).await
}

/// kubectl as the cluster admin of `cp`.
pub async fn kubectl_on(cp: &ControlPlane, args: &[&str], stdin: &str) -> Run {
    cp.kubectl_with_stdin(args, stdin)
        .await
        .unwrap_or_else(|e| panic!("kubectl: {e}"))
        .into()
}

pub fn chart_dir() -> String {
    root().join("charts/ckpt-operator").display().to_string()
}

/// The CRD, installed once by a release of the chart ([`CRD_RELEASE`], with its
/// default values) and established; every test's own release leaves the CRD to it.
pub async fn crd_installed() {
    static DONE: OnceCell<()> = OnceCell::const_new();
    DONE.get_or_init(|| async { install_crd(cp().await).await })
        .await;
}

/// Installs the CRD release into `cp` and waits until the CRD is established.
pub async fn install_crd(cp: &ControlPlane) {
    let chart = chart_dir();
    helm_on(
        cp,
        &[
            "install",
            CRD_RELEASE,
            &chart,
            "-n",
            CRD_NAMESPACE,
            "--create-namespace",
            "--set",
            "replicaCount=0",
        ],
    )
    .await
    .expect_ok("helm install of the CRD release");
    let crds: Api<CustomResourceDefinition> = Api::all(cp.client());
    tokio::time::timeout(
        deadline(),
        await_condition(crds, CRD_NAME, conditions::is_crd_established()),
    )
    .await
    .expect("the CRD is established")
    .expect("watching the CRD");
}

/// A control plane of one test's own, for faults that would disturb every other
/// test (restarting the apiserver, stopping etcd): started like the shared one,
/// with the CRD installed, and stopped when dropped.
pub struct PrivateControlPlane(&'static ControlPlane);

impl PrivateControlPlane {
    pub async fn start() -> PrivateControlPlane {
        let cp = ControlPlane::start(ControlPlaneOptions::cluster_like())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // Leaked so that environments can borrow it like the shared one; its
        // processes and files go when it is dropped.
        let cp: &'static ControlPlane = Box::leak(Box::new(cp));
        install_crd(cp).await;
        PrivateControlPlane(cp)
    }

    pub fn get(&self) -> &'static ControlPlane {
        self.0
    }
}

impl Drop for PrivateControlPlane {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// A namespace with the fixtures on its claims, a node stand-in, and the operator
/// (replica `prefix`) running: what most conversion tests start from.
pub async fn converting(prefix: &str) -> (Env, Operator) {
    let mut env = Env::new(prefix).await;
    fixtures(&env);
    env.start_node().await;
    let op = Operator::start(&env, prefix).await;
    (env, op)
}

/// True once condition Succeeded is True.
pub fn succeeded(cr: &CheckpointConversion) -> bool {
    condition_status(cr, "Succeeded").as_deref() == Some("True")
}

/// True once conditions Succeeded and Validated are True.
pub fn validated(cr: &CheckpointConversion) -> bool {
    succeeded(cr) && condition_status(cr, "Validated").as_deref() == Some("True")
}

/// True once the run finished, either way.
pub fn finished(cr: &CheckpointConversion) -> bool {
    matches!(phase(cr), Some("Succeeded" | "Failed"))
}

/// A test's namespace with its own release of the chart, its claims (local
/// directories) and, once started, a node: the stand-in, or with
/// `CKPT_TEST_NODE=real` the shared real node.
pub struct Env {
    /// The control plane it lives in (the shared one, or a test's own).
    pub cp: &'static ControlPlane,
    pub ns: String,
    pub dir: tempfile::TempDir,
    pub standin: Option<NodeStandIn>,
    /// On the real node: the claims are bound to hostPath volumes.
    bound: bool,
}

impl Env {
    /// A namespace `PREFIX-N` with the chart installed into it with its defaults
    /// (watching that namespace only).
    pub async fn new(prefix: &str) -> Env {
        Env::with_values(prefix, &[]).await
    }

    /// Like [`Env::new`], with extra `--set` values for the release.
    pub async fn with_values(prefix: &str, sets: &[&str]) -> Env {
        crd_installed().await;
        Env::on(cp().await, prefix, sets).await
    }

    /// Like [`Env::with_values`], in `cp` (whose CRD is installed).
    pub async fn on(cp: &'static ControlPlane, prefix: &str, sets: &[&str]) -> Env {
        let ns = cp.new_namespace(prefix).await.expect("namespace");
        let chart = chart_dir();
        let mut args = vec![
            "install",
            RELEASE,
            chart.as_str(),
            "-n",
            ns.as_str(),
            "--set",
            "crds.install=false",
            "--set",
            "replicaCount=0",
        ];
        // `$NS` in a value stands for the test's namespace.
        let sets: Vec<String> = sets.iter().map(|s| s.replace("$NS", &ns)).collect();
        for s in &sets {
            args.extend(["--set", s.as_str()]);
        }
        helm_on(cp, &args)
            .await
            .expect_ok("helm install into the test namespace");
        let dir = tempfile::tempdir().unwrap();
        let env = Env {
            cp,
            ns,
            dir,
            standin: None,
            bound: false,
        };
        env.create_claims(&env.ns, &["lustre-shared", "models"])
            .await;
        env
    }

    /// PersistentVolumeClaims `claims` in `ns`, each backed by a directory of its
    /// own name under this test's directory.
    pub async fn create_claims(&self, ns: &str, claims: &[&str]) {
        for claim in claims {
            std::fs::create_dir_all(self.claim(claim)).unwrap();
            let pvc = format!(
                r#"{{"apiVersion":"v1","kind":"PersistentVolumeClaim","metadata":{{"name":"{claim}","namespace":"{ns}"}},"spec":{{"accessModes":["ReadWriteMany"],"resources":{{"requests":{{"storage":"1Gi"}}}}}}}}"#
            );
            self.kubectl(&["apply", "-f", "-"], &pvc)
                .await
                .expect_ok("creating a claim");
        }
    }

    pub fn claim(&self, claim: &str) -> PathBuf {
        self.dir.path().join(claim)
    }

    /// kubectl as the admin of this environment's control plane.
    pub async fn kubectl(&self, args: &[&str], stdin: &str) -> Run {
        kubectl_on(self.cp, args, stdin).await
    }

    /// The stand-in for this namespace, mapping the two claims.
    pub fn node_config(&self) -> StandInConfig {
        StandInConfig::new(CONVERTER_IMAGE)
            .any_tag(true)
            .namespace(&self.ns)
            .binary(
                "ckpt-convert",
                converter_binary().unwrap_or_else(|e| panic!("{e}")),
            )
            .pvc("lustre-shared", self.claim("lustre-shared"))
            .pvc("models", self.claim("models"))
    }

    /// Starts the node that runs this namespace's pods: the stand-in, or with
    /// `CKPT_TEST_NODE=real` the shared real node, running the chart's converter
    /// image with the claims bound to hostPath volumes.
    pub async fn start_node(&mut self) {
        if node_kind() == NodeKind::Real {
            self.bind_claims_to_real_node().await;
            return;
        }
        let cfg = self.node_config();
        self.start_node_with(cfg).await;
    }

    /// Starts a stand-in configured by `cfg`: for what only the stand-in can do (a
    /// claim whose storage is read-only, say).
    pub async fn start_node_with(&mut self, cfg: StandInConfig) {
        self.needs_standin("configures the node stand-in");
        self.standin = Some(
            NodeStandIn::start(self.cp.client(), cfg)
                .await
                .expect("node stand-in"),
        );
    }

    /// Fails a test that only the stand-in can run when `CKPT_TEST_NODE=real`:
    /// `what` says why.
    pub fn needs_standin(&self, what: &str) {
        assert!(
            node_kind() == NodeKind::StandIn,
            "this test {what}, which needs the node stand-in: run it without CKPT_TEST_NODE=real"
        );
    }

    /// Fails a test that only a real node can run unless `CKPT_TEST_NODE=real`:
    /// `what` says why.
    pub fn needs_real_node(what: &str) {
        assert!(
            node_kind() == NodeKind::Real,
            "this test {what}, which needs the real node: run it with CKPT_TEST_NODE=real"
        );
    }

    async fn bind_claims_to_real_node(&mut self) {
        let node = RealNode::shared().await.unwrap_or_else(|e| panic!("{e}"));
        let client = self.cp.client();
        // The kubelet creates a missing subPath directory as root and hostPath
        // volumes ignore fsGroup: the targets' parent must exist and belong to the
        // converter's user, as on such a volume in production.
        std::fs::create_dir_all(self.claim("lustre-shared").join("output/convert")).unwrap();
        for claim in ["lustre-shared", "models"] {
            chown_tree(&self.claim(claim), IMAGE_USER).expect("chown");
            if !self.bound {
                node.bind_claim(&client, &self.ns, claim, &self.claim(claim))
                    .await
                    .unwrap_or_else(|e| panic!("binding claim {claim}: {e}"));
            }
        }
        self.bound = true;
    }

    /// What the stand-in ran (only the stand-in records argv and output).
    pub fn runs(&self) -> Vec<ckpt_testcluster::Run> {
        self.needs_standin("reads what the node stand-in ran");
        self.standin.as_ref().map(|s| s.runs()).unwrap_or_default()
    }

    /// How many pods ran: the stand-in's runs, or on the real node the pods of the
    /// namespace that started a container.
    pub async fn pods_run(&self) -> usize {
        if let Some(s) = &self.standin {
            return s.runs().len();
        }
        let api: Api<Pod> = Api::namespaced(self.cp.client(), &self.ns);
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .is_some_and(|cs| {
                        cs.iter().any(|c| {
                            c.state
                                .as_ref()
                                .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
                        })
                    })
            })
            .count()
    }

    /// An example, moved into this test's namespace. On the real node its 8-CPU
    /// request becomes 1: the node has 2, and the scheduler means it.
    pub fn example(&self, file: &str) -> String {
        let text = std::fs::read_to_string(root().join("examples").join(file))
            .unwrap()
            .replace("namespace: training", &format!("namespace: {}", self.ns));
        if node_kind() == NodeKind::Real {
            text.replace("cpu: \"8\"", "cpu: \"1\"")
        } else {
            text
        }
    }

    /// `kubectl apply` of an example, moved into this test's namespace.
    pub async fn apply_example(&self, file: &str) -> Run {
        self.kubectl(&["apply", "-f", "-"], &self.example(file))
            .await
    }

    /// Applies an example, which must be accepted by the apiserver.
    pub async fn apply_ok(&self, file: &str) {
        self.apply_example(file).await.expect_ok(file);
    }

    /// Server-side apply of `yaml` as field manager `manager`, as GitOps tools do.
    pub async fn apply_server_side(&self, yaml: &str, manager: &str) -> Run {
        let manager = format!("--field-manager={manager}");
        self.kubectl(
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                &manager,
                "-f",
                "-",
            ],
            yaml,
        )
        .await
    }

    pub async fn api(&self) -> Api<CheckpointConversion> {
        Api::namespaced(self.cp.client(), &self.ns)
    }

    pub async fn get(&self, name: &str) -> CheckpointConversion {
        self.api().await.get(name).await.expect("resource")
    }

    /// Waits until `done` holds for resource `name`, checking that `operators` stay up.
    pub async fn wait_for(
        &self,
        name: &str,
        what: &str,
        operators: &mut [&mut Operator],
        done: impl Fn(&CheckpointConversion) -> bool,
    ) -> CheckpointConversion {
        let waiting = Waiting::new(format!("{name}: {what}"));
        loop {
            for op in operators.iter_mut() {
                op.assert_running();
            }
            let cr = self.get(name).await;
            if done(&cr) {
                return cr;
            }
            let runs = self.standin.as_ref().map(|s| s.runs());
            waiting
                .tick(|| {
                    format!(
                        "status: {:#?}\nstand-in runs: {runs:#?}\noperator logs:\n{}",
                        cr.status,
                        operators
                            .iter()
                            .map(|o| o.log())
                            .collect::<Vec<_>>()
                            .join("\n---\n")
                    )
                })
                .await;
        }
    }

    /// Waits until condition `type_` of `name` has `status`.
    pub async fn wait_condition(
        &self,
        name: &str,
        type_: &str,
        status: &str,
        op: &mut Operator,
    ) -> CheckpointConversion {
        self.wait_for(name, &format!("{type_}={status}"), &mut [op], |cr| {
            condition_status(cr, type_).as_deref() == Some(status)
        })
        .await
    }

    pub async fn jobs(&self) -> Vec<Job> {
        let api: Api<Job> = Api::namespaced(self.cp.client(), &self.ns);
        api.list(&ListParams::default()).await.unwrap().items
    }

    /// The events about resource `name` (events.k8s.io), oldest first.
    pub async fn events_of(&self, name: &str) -> Vec<Event> {
        let api: Api<Event> = Api::namespaced(self.cp.client(), &self.ns);
        let mut list: Vec<Event> = api
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                    && e.regarding.as_ref().and_then(|r| r.kind.as_deref())
                        == Some("CheckpointConversion")
            })
            .collect();
        list.sort_by_key(|e| e.metadata.creation_timestamp.clone());
        list
    }

    /// The holder of this release's leader Lease.
    pub async fn lease_holder(&self) -> Option<String> {
        let api: Api<Lease> = Api::namespaced(self.cp.client(), &self.ns);
        api.get_opt(RELEASE)
            .await
            .unwrap()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .filter(|h| !h.is_empty())
    }

    /// Waits until this release's Lease is held by `who`.
    pub async fn wait_lease_held_by(&self, who: &str, operators: &mut [&mut Operator]) {
        let waiting = Waiting::new(format!("Lease {}/{RELEASE} held by {who}", self.ns));
        loop {
            for op in operators.iter_mut() {
                op.assert_running();
            }
            let holder = self.lease_holder().await;
            if holder.as_deref() == Some(who) {
                return;
            }
            waiting.tick(|| format!("holder: {holder:?}")).await;
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(s) = &self.standin
            && !std::thread::panicking()
        {
            let errors = s.take_errors();
            assert!(
                errors.is_empty(),
                "the node stand-in could not emulate: {errors:#?}"
            );
        }
    }
}

pub fn condition_status(cr: &CheckpointConversion, type_: &str) -> Option<String> {
    cr.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .map(|c| c.status.clone())
}

/// (status, reason, message) of condition `type_`.
pub fn condition(cr: &CheckpointConversion, type_: &str) -> (String, String, String) {
    let c = cr
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {:#?}", cr.status));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

pub fn phase(cr: &CheckpointConversion) -> Option<&str> {
    cr.status.as_ref().and_then(|s| s.phase.as_deref())
}

/// The operator binary, running as its release's ServiceAccount with the arguments
/// and environment the release's Deployment gives it.
pub struct Operator {
    child: Child,
    log: PathBuf,
    user: String,
    cp: &'static ControlPlane,
    /// Denials a test causes on purpose (`VERB RESOURCE` prefixes).
    expected_denials: Vec<String>,
}

/// Leader-election timing for tests: the leader renews every 15 s and has 45 s for
/// each renewal, which a loaded machine does not miss; a standby takes over at most
/// a minute after the leader stops.
const TEST_LEASE_ARGS: [&str; 2] = [
    "--lease-duration-seconds=60",
    "--lease-renew-grace-seconds=45",
];

impl Operator {
    /// Starts replica `identity` (its pod name) of `env`'s release.
    pub async fn start(env: &Env, identity: &str) -> Operator {
        Operator::start_with(env, identity, &[]).await
    }

    /// Like [`Operator::start`], with `extra` arguments appended.
    pub async fn start_with(env: &Env, identity: &str, extra: &[&str]) -> Operator {
        let cp = env.cp;
        let out = env
            .kubectl(
                &["get", "deployment", RELEASE, "-n", &env.ns, "-o", "json"],
                "",
            )
            .await
            .expect_ok("reading the release's Deployment");
        let deployment: Value = serde_json::from_str(&out).expect("deployment JSON");
        let pod = &deployment["spec"]["template"]["spec"];
        let account = pod["serviceAccountName"]
            .as_str()
            .expect("serviceAccountName");
        let args: Vec<String> = pod["containers"][0]["args"]
            .as_array()
            .expect("operator args")
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            // Any free port: the kernel picks it when the operator binds.
            .map(|a| {
                if a.starts_with("--metrics-addr=") {
                    "--metrics-addr=127.0.0.1:0".to_owned()
                } else {
                    a
                }
            })
            .filter(|a| {
                !a.starts_with("--lease-duration-seconds=")
                    && !a.starts_with("--lease-renew-grace-seconds=")
            })
            // Human-readable logs in the test's log file.
            .filter(|a| a != "--log-json")
            .chain(TEST_LEASE_ARGS.iter().map(|a| (*a).to_owned()))
            // A flag in `extra` replaces the Deployment's.
            .filter(|a| {
                let flag = a.split('=').next().unwrap_or(a);
                !extra.iter().any(|e| e.split('=').next() == Some(flag))
            })
            .chain(extra.iter().map(|a| (*a).to_owned()))
            .collect();
        let kubeconfig = cp
            .kubeconfig_for_service_account(&env.ns, account)
            .await
            .expect("service account kubeconfig");
        let log = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("operator-{}-{identity}.log", env.ns));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ckpt-operator"))
            .args(&args)
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAMESPACE", &env.ns)
            .env("POD_NAME", identity)
            .env("LOG_LEVEL", "info,ckpt_operator=debug")
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start ckpt-operator");
        Operator {
            child,
            log,
            user: format!("system:serviceaccount:{}:{account}", env.ns),
            cp,
            expected_denials: Vec::new(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The TCP port the operator listens on (started with
    /// `--metrics-addr=127.0.0.1:0`, the kernel picks it), once it does: read
    /// from the kernel's socket table, not from the operator's log.
    pub fn listening_port(&self) -> Option<u16> {
        let pid = self.pid();
        let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()?
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter_map(|target| {
                let t = target.to_string_lossy();
                Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
            })
            .collect();
        // /proc/PID/net/tcp: "sl local_address rem_address st … uid timeout inode";
        // st 0A is LISTEN, the address is hex "IP:PORT".
        let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
        table.lines().skip(1).find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
            if *state != "0A" || !inodes.iter().any(|i| i == inode) {
                return None;
            }
            u16::from_str_radix(local.rsplit(':').next()?, 16).ok()
        })
    }

    /// The log, for failure messages only: nothing is decided by reading it.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the operator exited ({status}):\n{}", self.log());
        }
    }

    /// Denials of requests starting with `what` (`"patch checkpointconversions/status"`)
    /// are the test's doing, not missing RBAC.
    pub fn expect_denied(&mut self, what: &str) {
        self.expected_denials.push(what.to_owned());
    }

    /// SIGKILL: no chance to release the Lease or finish a reconcile.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as a pod deletion would; waits for it to exit.
    pub fn stop(mut self) {
        // SAFETY: signals a child this test started and still owns.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let waiting = deadline();
        let started = Instant::now();
        while started.elapsed() < waiting {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "the operator exited {status} on SIGTERM:\n{}",
                    self.log()
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("the operator did not stop on SIGTERM:\n{}", self.log());
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            return;
        }
        // Any request the apiserver refused is a missing RBAC rule in the chart. The
        // apiserver's audit log says so, whatever the operator logged.
        let denied: Vec<String> = self
            .cp
            .denied_requests(&self.user)
            .expect("the audit log")
            .into_iter()
            .filter(|d| !self.expected_denials.iter().any(|e| d.starts_with(e)))
            .collect();
        assert!(
            denied.is_empty(),
            "the apiserver denied {} requests (chart RBAC):\n{}",
            self.user,
            denied.join("\n")
        );
    }
}

/// Runs the converter locally to make fixtures.
pub fn convert(args: &[String]) {
    let out = Command::new(converter_binary().unwrap_or_else(|e| panic!("{e}")))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fixture conversion {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The models claim holds `hf/Llama-3.2-3B` (a small synthetic Llama); the shared
/// claim holds the SFT output `output/sft/megatron_bridge/iter_0000100`.
pub fn fixtures(env: &Env) {
    fixtures_in(env.dir.path());
}

/// [`fixtures`] in claim directories under `dir` (`dir/models`, `dir/lustre-shared`).
pub fn fixtures_in(dir: &Path) {
    let scratch = dir.join("scratch");
    let out = Command::new(converter_binary().unwrap_or_else(|e| panic!("{e}")))
        .arg("demo")
        .arg("--dir")
        .arg(&scratch)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let base = dir.join("models/hf/Llama-3.2-3B");
    std::fs::create_dir_all(base.parent().unwrap()).unwrap();
    std::fs::rename(scratch.join("hf-source"), &base).unwrap();
    let sft = dir.join("lustre-shared/output/sft/megatron_bridge/iter_0000100");
    convert(&[
        "run".into(),
        "convert/hf_to_megatron".into(),
        format!("hf_model_id={}", base.display()),
        format!("megatron_path={}", sft.display()),
    ]);
}

/// Every file under `dir` with a digest of its bytes: what a conversion published,
/// compared by content rather than by time stamps.
pub fn contents(dir: &Path) -> std::collections::BTreeMap<PathBuf, u64> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                let digest = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
                });
                out.insert(path.strip_prefix(dir).unwrap().to_path_buf(), digest);
            }
        }
    }
    out
}

/// A deterministic pseudo-random f32 in [-0.05, 0.05).
fn noise(i: usize, salt: u64) -> f32 {
    let mut x =
        (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xD1B5_4A32_D192_ED03);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
}

/// Writes f32 tensors `(name, shape)` with pseudo-random values as one safetensors file.
fn write_tensors(path: &Path, tensors: &[(String, Vec<usize>)]) {
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n: usize = shape.iter().product();
            let bytes = (0..n)
                .flat_map(|i| noise(i, k as u64 + 1).to_le_bytes())
                .collect();
            (name.clone(), bytes, shape.clone())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, b, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    let meta = std::collections::HashMap::from([("format".to_owned(), "pt".to_owned())]);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
}

/// The adapters the two merge examples read: a PEFT adapter on q/v of the demo Llama
/// (4 layers, hidden 64, 4 heads in 2 groups of head dim 16, FFN 128) at
/// `output/peft/adapter`, and a Megatron-Bridge adapter checkpoint on linear_qkv and
/// linear_fc2 at `output/sft-lora/iter_0000200`, with the Megatron base the example
/// names at `output/convert/llama3b-megatron/iter_0000000`.
pub fn lora_fixtures(env: &Env) {
    lora_fixtures_in(env.dir.path());
}

/// [`lora_fixtures`] in claim directories under `dir`.
pub fn lora_fixtures_in(dir: &Path) {
    lora_adapters_in(dir);
    let base = dir.join("models/hf/Llama-3.2-3B");
    convert(&[
        "run".into(),
        "convert/hf_to_megatron".into(),
        format!("hf_model_id={}", base.display()),
        format!(
            "megatron_path={}",
            dir.join("lustre-shared/output/convert/llama3b-megatron")
                .display()
        ),
    ]);
}

/// The two adapters of [`lora_fixtures`], without the Megatron base (which
/// examples/hf-to-megatron.yaml writes).
pub fn lora_adapters(env: &Env) {
    lora_adapters_in(env.dir.path());
}

fn lora_adapters_in(dir: &Path) {
    let lustre = dir.join("lustre-shared");
    let peft = lustre.join("output/peft/adapter");
    std::fs::create_dir_all(&peft).unwrap();
    std::fs::write(
        peft.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": false, "use_rslora": false, "use_dora": false, "init_lora_weights": true}"#,
    )
    .unwrap();
    let mut tensors = Vec::new();
    for l in 0..4 {
        for (m, out) in [("q_proj", 64), ("v_proj", 32)] {
            let p = format!("base_model.model.model.layers.{l}.self_attn.{m}");
            tensors.push((format!("{p}.lora_A.weight"), vec![4, 64]));
            tensors.push((format!("{p}.lora_B.weight"), vec![out, 4]));
        }
    }
    write_tensors(&peft.join("adapter_model.safetensors"), &tensors);

    let flat = dir.join("scratch/bridge-adapter");
    let k = "decoder.layers.";
    write_tensors(
        &flat.join("model.safetensors"),
        &[
            (
                format!("{k}self_attention.linear_qkv.adapter.linear_in.weight"),
                vec![4, 4, 64],
            ),
            (
                format!("{k}self_attention.linear_qkv.adapter.linear_out.weight"),
                vec![4, 128, 4],
            ),
            (
                format!("{k}mlp.linear_fc2.adapter.linear_in.weight"),
                vec![4, 4, 128],
            ),
            (
                format!("{k}mlp.linear_fc2.adapter.linear_out.weight"),
                vec![4, 64, 4],
            ),
        ],
    );
    let it = lustre.join("output/sft-lora/iter_0000200");
    convert(&[
        "run".into(),
        "convert/hf_to_megatron".into(),
        format!("hf_model_id={}", flat.display()),
        format!("megatron_path={}", it.display()),
        "mapping=identity".into(),
        "dtype=float32".into(),
    ]);
    std::fs::write(
        it.join("run_config.yaml"),
        "model:\n  num_layers: 4\npeft:\n  _target_: megatron.bridge.peft.lora.LoRA\n  dim: 4\n  alpha: 8\n  dropout: 0.0\n  target_modules:\n  - linear_qkv\n  - linear_fc2\n",
    )
    .unwrap();
}

/// Every tensor of an HF directory: name → raw bytes.
pub fn tensors_of(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in st.tensors() {
                out.insert(name, view.data().to_vec());
            }
        }
    }
    out
}

/// The `n`th pod (0-based, by creation) of Job `job`, once it exists.
pub async fn nth_pod(env: &Env, job: &str, n: usize) -> Pod {
    let pods: Api<Pod> = Api::namespaced(env.cp.client(), &env.ns);
    let waiting = Waiting::new(format!("pod {n} of Job {job}"));
    loop {
        let mut list = pods
            .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}")))
            .await
            .unwrap()
            .items;
        list.sort_by_key(|p| p.metadata.creation_timestamp.clone());
        if let Some(p) = list.get(n) {
            return p.clone();
        }
        waiting.tick(|| format!("{} pods", list.len())).await;
    }
}

/// Writes pod status as the scheduler or kubelet would: only where no node runs
/// the pods (the stand-in is not started, and no real node exists).
pub async fn set_pod_status(env: &Env, pod: &Pod, status: Value) {
    env.needs_standin("writes pod status as a scheduler and kubelet would");
    let pods: Api<Pod> = Api::namespaced(env.cp.client(), &env.ns);
    pods.patch_status(
        pod.metadata.name.as_deref().unwrap(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await
    .expect("pod status");
}

pub fn now() -> Value {
    serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).unwrap()
}

pub fn running() -> Value {
    json!({
        "phase": "Running",
        "conditions": [{"type": "PodScheduled", "status": "True"}],
        "containerStatuses": [{"name": "convert", "image": "ghcr.io/ckpt-dev/ckpt-convert:0.1.0",
            "imageID": "", "ready": true, "restartCount": 0, "started": true,
            "state": {"running": {"startedAt": now()}}}]
    })
}

pub fn terminated(code: i32, message: &str) -> Value {
    json!({
        "phase": if code == 0 { "Succeeded" } else { "Failed" },
        "containerStatuses": [{"name": "convert", "image": "ghcr.io/ckpt-dev/ckpt-convert:0.1.0",
            "imageID": "", "ready": false, "restartCount": 0, "started": false,
            "state": {"terminated": {"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
                "message": message, "startedAt": now(), "finishedAt": now()}}}]
    })
}

/// A converter whose runs wait at gates: its pods run (the node reports them
/// Running) but convert nothing until the test opens their gate, so a fault can
/// be placed while Jobs run. Which gate a run waits for is a shell snippet's
/// choice from its arguments (`$g`; none when empty; the gates' directory is
/// `$GATES`).
pub struct Gate {
    dir: tempfile::TempDir,
}

impl Gate {
    fn with(choose: &str) -> Gate {
        let dir = tempfile::tempdir().unwrap();
        let converter = converter_binary().unwrap_or_else(|e| panic!("{e}"));
        let script = format!(
            "#!/bin/sh\nGATES='{}'\n{choose}\nif [ -n \"$g\" ]; then while [ ! -e \"$GATES/$g\" ]; do /bin/sleep 0.05; done; fi\nexec '{}' \"$@\"\n",
            dir.path().display(),
            converter.display()
        );
        let path = dir.path().join("ckpt-convert");
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        Gate { dir }
    }

    /// Every run waits at gate `open`.
    pub fn all() -> Gate {
        Gate::with("g=open")
    }

    /// A split run's part `part=I` waits at gate `open-I`; other runs go at once.
    /// A part asked to pause ([`Gate::pause_mid_write`]) pauses after its first
    /// piece is written, once (the converter's `failpoints` pause).
    pub fn parts() -> Gate {
        Gate::with(concat!(
            "g=; i=; for a in \"$@\"; do case \"$a\" in part=*) i=${a#part=}; g=open-$i ;; esac; done\n",
            "if [ -n \"$i\" ] && [ -e \"$GATES/pause-$i\" ] && [ ! -e \"$GATES/paused-$i\" ]; then\n",
            "  export CKPT_CONVERT_PAUSE_AT=pieces:1 CKPT_CONVERT_PAUSE_FILE=\"$GATES/paused-$i\"\n",
            "fi"
        ))
    }

    /// Part `part`'s next run pauses after writing its first piece.
    pub fn pause_mid_write(&self, part: usize) {
        std::fs::write(self.dir.path().join(format!("pause-{part}")), b"").unwrap();
    }

    /// The process id of part `part`'s run paused mid-write, once it is.
    pub fn paused(&self, part: usize) -> Option<i32> {
        std::fs::read_to_string(self.dir.path().join(format!("paused-{part}")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Starts the node stand-in of `env`, running pods through the gates.
    pub async fn node(&self, env: &mut Env) {
        let cfg = env
            .node_config()
            .binary("ckpt-convert", self.dir.path().join("ckpt-convert"));
        env.start_node_with(cfg).await;
    }

    /// Opens gate `name`.
    pub fn open(&self, name: &str) {
        std::fs::write(self.dir.path().join(name), b"").unwrap();
    }
}
