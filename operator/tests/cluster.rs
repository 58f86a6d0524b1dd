//! The operator end to end on a real control plane: the chart installed with helm
//! (RBAC on), the operator binary running as the chart's ServiceAccount with the
//! chart's arguments, the node stand-in running the real converter on real fixture
//! checkpoints, and the examples applied as users apply them.
//!
//! Each test has its own namespace, claims and stand-in; the control plane and the
//! chart are shared by the test binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ckpt_operator::api::CheckpointConversion;
use ckpt_testcluster::{ControlPlane, NodeStandIn, StandInConfig, converter_binary};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::Value;
use tokio::sync::OnceCell;

const RELEASE: &str = "ckpt";
const SYSTEM_NS: &str = "ckpt-system";
const CONVERTER_IMAGE: &str = "ghcr.io/ckpt-dev/ckpt-convert";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

/// What the chart installed: the operator's ServiceAccount, its container args.
struct Chart {
    service_account: String,
    args: Vec<String>,
    converter_service_account: String,
}

static CHART: OnceCell<Chart> = OnceCell::const_new();

async fn cp() -> &'static ControlPlane {
    ControlPlane::shared().await.expect("control plane")
}

fn helm(cp: &ControlPlane, args: &[&str]) -> String {
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cluster-helm-home");
    let out = Command::new(cp.bin_dir().join("helm"))
        .args(args)
        .arg("--kubeconfig")
        .arg(cp.kubeconfig_path())
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn kubectl(cp: &ControlPlane, args: &[&str]) -> std::process::Output {
    cp.kubectl(args.iter().copied()).await.expect("run kubectl")
}

/// Installs the chart once (no operator pods: the test runs the binary itself).
async fn chart() -> &'static Chart {
    CHART
        .get_or_init(|| async {
            let cp = cp().await;
            let chart = root().join("charts/ckpt-operator");
            helm(
                cp,
                &[
                    "install",
                    RELEASE,
                    chart.to_str().unwrap(),
                    "--namespace",
                    SYSTEM_NS,
                    "--create-namespace",
                    "--set",
                    "replicaCount=0",
                    "--wait=false",
                ],
            );
            let out = kubectl(
                cp,
                &[
                    "get",
                    "deployment",
                    "-n",
                    SYSTEM_NS,
                    "-l",
                    &format!("app.kubernetes.io/instance={RELEASE}"),
                    "-o",
                    "json",
                ],
            )
            .await;
            let list: Value = serde_json::from_slice(&out.stdout).expect("deployment JSON");
            let pod = &list["items"][0]["spec"]["template"]["spec"];
            let args: Vec<String> = pod["containers"][0]["args"]
                .as_array()
                .expect("operator args")
                .iter()
                .map(|a| a.as_str().unwrap().to_owned())
                .collect();
            let converter_service_account = args
                .iter()
                .find_map(|a| a.strip_prefix("--job-service-account=").map(str::to_owned))
                .expect("the chart passes --job-service-account");
            Chart {
                service_account: pod["serviceAccountName"]
                    .as_str()
                    .expect("serviceAccountName")
                    .to_owned(),
                args,
                converter_service_account,
            }
        })
        .await
}

/// The operator binary, running as the chart's ServiceAccount with the chart's arguments.
struct Operator {
    child: Child,
    log: PathBuf,
}

impl Operator {
    async fn start(tag: &str) -> Operator {
        let cp = cp().await;
        let chart = chart().await;
        let kubeconfig = cp
            .kubeconfig_for_service_account(SYSTEM_NS, &chart.service_account)
            .await
            .expect("service account kubeconfig");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let args: Vec<String> = chart
            .args
            .iter()
            .map(|a| {
                if a.starts_with("--metrics-addr=") {
                    format!("--metrics-addr=127.0.0.1:{port}")
                } else {
                    a.clone()
                }
            })
            // Human-readable logs in the test's log file.
            .filter(|a| a != "--log-json")
            .collect();
        let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("operator-{tag}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ckpt-operator"))
            .args(&args)
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAMESPACE", SYSTEM_NS)
            .env("POD_NAME", format!("operator-{tag}"))
            .env("LOG_LEVEL", "info,ckpt_operator=debug")
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start ckpt-operator");
        Operator { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log if the process has exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the operator exited ({status}):\n{}", self.log());
        }
    }

    /// SIGTERM, as a pod deletion would.
    fn stop(mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
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
        // Any denied API call is a missing RBAC rule in the chart.
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        if !std::thread::panicking() {
            assert!(
                !log.contains("is forbidden"),
                "the operator was denied an API call (chart RBAC):\n{log}"
            );
        }
    }
}

/// A test's namespace, claims and node stand-in.
struct Env {
    ns: String,
    dir: tempfile::TempDir,
    standin: Option<NodeStandIn>,
}

impl Env {
    async fn new(prefix: &str) -> Env {
        let cp = cp().await;
        chart().await;
        let ns = cp.new_namespace(prefix).await.expect("namespace");
        let dir = tempfile::tempdir().unwrap();
        for claim in ["lustre-shared", "models"] {
            std::fs::create_dir_all(dir.path().join(claim)).unwrap();
            let pvc = format!(
                r#"{{"apiVersion":"v1","kind":"PersistentVolumeClaim","metadata":{{"name":"{claim}","namespace":"{ns}"}},"spec":{{"accessModes":["ReadWriteMany"],"resources":{{"requests":{{"storage":"1Gi"}}}}}}}}"#
            );
            let out = cp
                .kubectl_with_stdin(["apply", "-f", "-"], &pvc)
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Pods can only use ServiceAccounts of their own namespace.
        let out = kubectl(
            cp,
            &[
                "create",
                "serviceaccount",
                &chart().await.converter_service_account,
                "-n",
                &ns,
            ],
        )
        .await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Env {
            ns,
            dir,
            standin: None,
        }
    }

    fn claim(&self, claim: &str) -> PathBuf {
        self.dir.path().join(claim)
    }

    async fn start_node(&mut self) {
        let cp = cp().await;
        let cfg = StandInConfig::new(CONVERTER_IMAGE)
            .any_tag(true)
            .namespace(&self.ns)
            .binary(
                "ckpt-convert",
                converter_binary().expect("converter binary"),
            )
            .pvc("lustre-shared", self.claim("lustre-shared"))
            .pvc("models", self.claim("models"));
        self.standin = Some(
            NodeStandIn::start(cp.client(), cfg)
                .await
                .expect("node stand-in"),
        );
    }

    /// `kubectl apply` of an example, moved into this test's namespace.
    async fn apply_example(&self, file: &str) -> std::process::Output {
        let text = std::fs::read_to_string(root().join("examples").join(file)).unwrap();
        let text = text.replace("namespace: training", &format!("namespace: {}", self.ns));
        cp().await
            .kubectl_with_stdin(["apply", "-f", "-"], &text)
            .await
            .unwrap()
    }

    async fn client(&self) -> Client {
        cp().await.client()
    }

    async fn get(&self, name: &str) -> CheckpointConversion {
        let api: Api<CheckpointConversion> = Api::namespaced(self.client().await, &self.ns);
        api.get(name).await.expect("resource")
    }

    /// Waits until condition `type_` of `name` has `status`.
    async fn wait_condition(
        &self,
        name: &str,
        type_: &str,
        status: &str,
        op: &mut Operator,
    ) -> CheckpointConversion {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            op.assert_running();
            let cr = self.get(name).await;
            let found = cr
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
                .map(|c| c.status.clone());
            if found.as_deref() == Some(status) {
                return cr;
            }
            if Instant::now() > deadline {
                let runs = self
                    .standin
                    .as_ref()
                    .map(|s| format!("{:#?}", s.runs()))
                    .unwrap_or_default();
                panic!(
                    "{name}: {type_} never became {status}; status: {:#?}\nstand-in runs: {runs}\noperator log:\n{}",
                    cr.status,
                    op.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn jobs(&self) -> Vec<Job> {
        let api: Api<Job> = Api::namespaced(self.client().await, &self.ns);
        api.list(&ListParams::default()).await.unwrap().items
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

/// Runs the converter locally to make fixtures.
fn convert(args: &[String]) {
    let out = Command::new(converter_binary().unwrap())
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
fn fixtures(env: &Env) {
    let scratch = env.dir.path().join("scratch");
    let out = Command::new(converter_binary().unwrap())
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
    let base = env.claim("models").join("hf/Llama-3.2-3B");
    std::fs::create_dir_all(base.parent().unwrap()).unwrap();
    std::fs::rename(scratch.join("hf-source"), &base).unwrap();
    let sft = env
        .claim("lustre-shared")
        .join("output/sft/megatron_bridge/iter_0000100");
    convert(&[
        "run".into(),
        "convert/hf_to_megatron".into(),
        format!("hf_model_id={}", base.display()),
        format!("megatron_path={}", sft.display()),
    ]);
}

fn condition(cr: &CheckpointConversion, type_: &str) -> (String, String, String) {
    let c = cr
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .unwrap_or_else(|| panic!("no {type_} condition"));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

#[tokio::test]
async fn examples_convert_and_validate_through_the_operator() {
    let mut env = Env::new("examples").await;
    fixtures(&env);
    env.start_node().await;
    let mut op = Operator::start("examples").await;
    for (file, name) in [
        ("megatron-to-hf.yaml", "sft-to-hf"),
        ("hf-to-megatron.yaml", "llama3b-to-megatron"),
    ] {
        let out = env.apply_example(file).await;
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cr = env.wait_condition(name, "Succeeded", "True", &mut op).await;
        let cr = if condition(&cr, "Validated").0 == "True" {
            cr
        } else {
            env.wait_condition(name, "Validated", "True", &mut op).await
        };
        let st = cr.status.clone().unwrap();
        assert_eq!(st.observed_generation, Some(1));
        assert_eq!(st.phase.as_deref(), Some("Succeeded"));
        let summary = st.summary.expect("summary in status");
        assert!(
            summary.tensors.unwrap() > 0 && summary.bytes.unwrap() > 0,
            "{summary:?}"
        );
        assert!(
            summary.checks_passed.unwrap() > 0 && summary.checks_failed == Some(0),
            "{summary:?}"
        );
        assert!(summary.output_digest.is_some());
        assert_eq!(condition(&cr, "Accepted").0, "True");
        assert_eq!(condition(&cr, "Running").0, "False");
        assert!(st.start_time.is_some() && st.completion_time.is_some());
        let report = env
            .claim("lustre-shared")
            .join(summary.report_path.expect("report path"));
        assert!(report.is_file(), "{} is not on the claim", report.display());
    }
    // The outputs are where the examples say, and the sources are untouched.
    assert!(
        env.claim("lustre-shared")
            .join("output/convert/sft-hf/config.json")
            .is_file()
    );
    assert!(
        env.claim("lustre-shared")
            .join("output/convert/llama3b-megatron/iter_0000000/.metadata")
            .is_file()
    );
    let runs = env.standin.as_ref().unwrap().runs();
    assert_eq!(runs.len(), 2, "one pod per conversion: {runs:#?}");
    // Events mark the transitions.
    let out = kubectl(cp().await, &["get", "events", "-n", &env.ns, "-o", "json"]).await;
    let events: Value = serde_json::from_slice(&out.stdout).unwrap();
    let reasons: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .collect();
    for r in [
        "Accepted",
        "JobCreated",
        "ConversionSucceeded",
        "ValidationPassed",
    ] {
        assert!(reasons.contains(&r), "no {r} event: {reasons:?}");
    }
    // kubectl get shows the printer columns.
    let out = kubectl(cp().await, &["get", "checkpointconversions", "-n", &env.ns]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("STEP") && table.contains("PHASE") && table.contains("VALIDATED"),
        "{table}"
    );
    assert!(
        table.contains("convert/megatron_to_hf") && table.contains("Succeeded"),
        "{table}"
    );
    op.stop();
}

#[tokio::test]
async fn a_corrupt_source_fails_at_once_with_the_converter_message() {
    let mut env = Env::new("corrupt").await;
    fixtures(&env);
    // Truncate one .distcp file of the SFT checkpoint.
    let distcp = env
        .claim("lustre-shared")
        .join("output/sft/megatron_bridge/iter_0000100/__0_1.distcp");
    let len = std::fs::metadata(&distcp).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&distcp)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    env.start_node().await;
    let mut op = Operator::start("corrupt").await;
    let out = env.apply_example("megatron-to-hf.yaml").await;
    assert!(out.status.success());
    let cr = env
        .wait_condition("sft-to-hf", "Failed", "True", &mut op)
        .await;
    let (_, reason, message) = condition(&cr, "Failed");
    assert_eq!(reason, "InvalidInput");
    assert!(
        message.contains("__0_1.distcp") && message.contains("runs past the end"),
        "{message}"
    );
    assert_eq!(condition(&cr, "Validated").0, "False");
    assert_eq!(cr.status.as_ref().unwrap().phase.as_deref(), Some("Failed"));
    // Exit code 2 is not retried: one pod, Job failed by its podFailurePolicy.
    let jobs = env.jobs().await;
    assert_eq!(jobs.len(), 1);
    let st = jobs[0].status.clone().unwrap();
    assert_eq!(st.failed, Some(1));
    assert_eq!(env.standin.as_ref().unwrap().runs().len(), 1);
    assert!(
        !env.claim("lustre-shared")
            .join("output/convert/sft-hf")
            .exists(),
        "a failed conversion published output"
    );
    op.stop();
}

#[tokio::test]
async fn the_apiserver_refuses_invalid_and_changed_resources_with_our_messages() {
    let env = Env::new("cel").await;
    let out = env.apply_example("illegal-target-inside-source.yaml").await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("target.path must not equal, be inside, or contain source.path"),
        "{err}"
    );
    let out = env.apply_example("megatron-to-hf.yaml").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cp = cp().await;
    let patch = |p: &'static str| {
        let ns = env.ns.clone();
        async move {
            kubectl(
                cp,
                &[
                    "patch",
                    "checkpointconversion",
                    "sft-to-hf",
                    "-n",
                    &ns,
                    "--type=merge",
                    "-p",
                    p,
                ],
            )
            .await
        }
    };
    let out = patch(r#"{"spec":{"target":{"path":"output/convert/other"}}}"#).await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("target is immutable"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = patch(r#"{"spec":{"dtype":"float32"}}"#).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("dtype is immutable"));
    let out = patch(r#"{"spec":{"parallelism":{"tp":0}}}"#).await;
    assert!(!out.status.success(), "tp=0 was accepted");
    let out = patch(r#"{"spec":{"lora":{"backend":"hf_peft"}}}"#).await;
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("lora is only valid with a checkpoint_lora source")
    );
    // Job knobs may change.
    let out = patch(r#"{"spec":{"job":{"backoffLimit":3}}}"#).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_second_resource_for_the_same_target_is_refused() {
    let mut env = Env::new("conflict").await;
    fixtures(&env);
    env.start_node().await;
    let mut op = Operator::start("conflict").await;
    assert!(
        env.apply_example("megatron-to-hf.yaml")
            .await
            .status
            .success()
    );
    env.wait_condition("sft-to-hf", "Accepted", "True", &mut op)
        .await;
    // Same target, created later.
    let text = std::fs::read_to_string(root().join("examples/megatron-to-hf.yaml"))
        .unwrap()
        .replace("namespace: training", &format!("namespace: {}", env.ns))
        .replace("name: sft-to-hf", "name: sft-to-hf-again");
    let out = cp()
        .await
        .kubectl_with_stdin(["apply", "-f", "-"], &text)
        .await
        .unwrap();
    assert!(out.status.success());
    let cr = env
        .wait_condition("sft-to-hf-again", "Accepted", "False", &mut op)
        .await;
    assert_eq!(condition(&cr, "Accepted").1, "TargetConflict");
    assert!(condition(&cr, "Accepted").2.contains("sft-to-hf"));
    env.wait_condition("sft-to-hf", "Succeeded", "True", &mut op)
        .await;
    let jobs: Vec<String> = env
        .jobs()
        .await
        .iter()
        .map(|j| j.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(jobs, vec!["sft-to-hf-g1"]);
    op.stop();
}

#[tokio::test]
async fn a_restarted_operator_makes_no_second_job_and_picks_up_the_result() {
    let mut env = Env::new("restart").await;
    fixtures(&env);
    let mut op = Operator::start("restart-1").await;
    assert!(
        env.apply_example("megatron-to-hf.yaml")
            .await
            .status
            .success()
    );
    // No node yet: the Job's pod waits, as on a busy cluster.
    env.wait_condition("sft-to-hf", "Running", "True", &mut op)
        .await;
    assert_eq!(env.jobs().await.len(), 1);
    op.stop();
    let mut op = Operator::start("restart-2").await;
    env.start_node().await;
    let cr = env
        .wait_condition("sft-to-hf", "Succeeded", "True", &mut op)
        .await;
    let jobs = env.jobs().await;
    assert_eq!(jobs.len(), 1, "a second Job was created");
    assert_eq!(cr.status.unwrap().job_name.as_deref(), Some("sft-to-hf-g1"));
    assert_eq!(env.standin.as_ref().unwrap().runs().len(), 1);
    op.stop();
}

#[tokio::test]
async fn deleting_the_resource_removes_its_job_and_pods_but_keeps_the_output() {
    let mut env = Env::new("delete").await;
    fixtures(&env);
    env.start_node().await;
    let mut op = Operator::start("delete").await;
    assert!(
        env.apply_example("megatron-to-hf.yaml")
            .await
            .status
            .success()
    );
    env.wait_condition("sft-to-hf", "Succeeded", "True", &mut op)
        .await;
    let client = env.client().await;
    let api: Api<CheckpointConversion> = Api::namespaced(client.clone(), &env.ns);
    api.delete("sft-to-hf", &DeleteParams::background())
        .await
        .unwrap();
    let jobs: Api<Job> = Api::namespaced(client.clone(), &env.ns);
    let pods: Api<Pod> = Api::namespaced(client, &env.ns);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = jobs.list(&ListParams::default()).await.unwrap().items.len();
        let p = pods.list(&ListParams::default()).await.unwrap().items.len();
        if j == 0 && p == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "garbage collection left {j} Jobs and {p} pods"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        env.claim("lustre-shared")
            .join("output/convert/sft-hf/config.json")
            .is_file(),
        "the output was removed"
    );
    op.stop();
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
fn lora_fixtures(env: &Env) {
    let lustre = env.claim("lustre-shared");
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

    let base = env.claim("models").join("hf/Llama-3.2-3B");
    convert(&[
        "run".into(),
        "convert/hf_to_megatron".into(),
        format!("hf_model_id={}", base.display()),
        format!(
            "megatron_path={}",
            lustre.join("output/convert/llama3b-megatron").display()
        ),
    ]);
    let flat = env.dir.path().join("scratch/bridge-adapter");
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

#[tokio::test]
async fn lora_merge_examples_succeed_for_both_backends() {
    let mut env = Env::new("lora").await;
    fixtures(&env);
    lora_fixtures(&env);
    env.start_node().await;
    let mut op = Operator::start("lora").await;
    for (file, name, outputs) in [
        (
            "merge-lora-hf-peft.yaml",
            "peft-merge",
            vec!["output/convert/peft-merged-hf/config.json"],
        ),
        (
            "merge-lora-megatron-bridge.yaml",
            "sft-lora-merge",
            vec![
                "output/convert/sft-lora-merged-hf/config.json",
                "output/convert/sft-lora-merged-megatron/iter_0000000/.metadata",
            ],
        ),
    ] {
        let out = env.apply_example(file).await;
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cr = env.wait_condition(name, "Succeeded", "True", &mut op).await;
        let cr = if condition(&cr, "Validated").0 == "True" {
            cr
        } else {
            env.wait_condition(name, "Validated", "True", &mut op).await
        };
        let st = cr.status.unwrap();
        assert_eq!(st.step.as_deref(), Some("convert/merge_lora"));
        let summary = st.summary.expect("summary");
        assert!(
            summary.tensors.unwrap() > 0 && summary.checks_failed == Some(0),
            "{summary:?}"
        );
        for rel in outputs {
            assert!(
                env.claim("lustre-shared").join(rel).is_file(),
                "{rel} was not written"
            );
        }
    }
    // The merge changed the adapted weights and nothing else.
    let base = tensors_of(&env.claim("models").join("hf/Llama-3.2-3B"));
    let merged = tensors_of(
        &env.claim("lustre-shared")
            .join("output/convert/peft-merged-hf"),
    );
    assert_eq!(
        base.keys().collect::<Vec<_>>(),
        merged.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &base {
        let adapted = name.contains("q_proj") || name.contains("v_proj");
        assert_eq!(
            &merged[name] != bytes,
            adapted,
            "{name}: changed={}",
            &merged[name] != bytes
        );
    }
    op.stop();
}

/// Every tensor of an HF directory: name → raw bytes.
fn tensors_of(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
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

#[tokio::test]
async fn two_replicas_share_one_lease_and_one_of_them_reconciles() {
    let mut env = Env::new("replicas").await;
    fixtures(&env);
    env.start_node().await;
    let mut first = Operator::start("replica-a").await;
    let mut second = Operator::start("replica-b").await;
    assert!(
        env.apply_example("megatron-to-hf.yaml")
            .await
            .status
            .success()
    );
    env.wait_condition("sft-to-hf", "Succeeded", "True", &mut first)
        .await;
    second.assert_running();
    let leaders = [&first, &second]
        .iter()
        .filter(|o| o.log().contains("leading"))
        .count();
    assert_eq!(
        leaders,
        1,
        "exactly one replica leads:\n--- a\n{}\n--- b\n{}",
        first.log(),
        second.log()
    );
    assert_eq!(env.jobs().await.len(), 1);
    assert_eq!(env.standin.as_ref().unwrap().runs().len(), 1);
    first.stop();
    second.stop();
}
