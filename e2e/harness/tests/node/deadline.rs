//! `activeDeadlineSeconds` on the real node: a conversion that cannot finish
//! in time is killed, and the Job (and through the operator, the
//! CheckpointConversion) ends Failed with reason DeadlineExceeded.
//!
//! "Cannot finish in time" without a sleep: the conversion's CPU time is
//! measured first on the host, then the pod gets a CPU limit of 10m (the
//! kernel's CFS quota: 1 ms per 100 ms) and a deadline at most a third of the
//! time that much CPU takes at that rate. The precondition is asserted, so a
//! fixture too small for it fails loudly instead of racing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kube::api::{Api, DynamicObject, GroupVersionKind};
use kube::discovery::ApiResource;
use serde_json::Value;
use tokio::sync::OnceCell;

use crate::util::{WAIT, World, converter, converter_job};
use ckpt_testcluster::ControlPlane;

/// CPU seconds of `ckpt-convert ARGS…` on the host (children's rusage).
fn cpu_seconds(args: &[String]) -> Result<f64> {
    let mut before: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut before) };
    let out = Command::new(converter()).args(args).output()?;
    ensure!(
        out.status.success(),
        "measuring run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut after: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut after) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(secs(after.ru_utime) - secs(before.ru_utime) + secs(after.ru_stime) - secs(before.ru_stime))
}

/// The deadline for a conversion of the world's demo source under a 10m CPU
/// limit, after checking that it cannot finish within it.
fn deadline_for(w: &World) -> Result<i64> {
    let scratch = tempfile::Builder::new().prefix("ckpt-measure-").tempdir()?;
    let cpu = cpu_seconds(&[
        "run".into(),
        "convert/hf_to_megatron".into(),
        format!("hf_model_id={}", w.path("source/hf").display()),
        format!("megatron_path={}", scratch.path().join("out").display()),
    ])?;
    // At 1% of a CPU the conversion needs cpu * 100 seconds of wall time.
    let throttled = cpu * 100.0;
    let deadline = (throttled / 3.0).floor().min(20.0) as i64;
    ensure!(
        deadline >= 2,
        "the demo conversion needs only {cpu:.3} s of CPU ({throttled:.1} s at 10m): too little to outlast any deadline safely"
    );
    eprintln!("conversion CPU {cpu:.3} s, {throttled:.0} s at 10m; deadline {deadline} s");
    Ok(deadline)
}

#[tokio::test]
async fn active_deadline_kills_a_slow_conversion_pod() -> Result<()> {
    let w = World::new("deadline-job").await?;
    let deadline = deadline_for(&w)?;
    let mut job = converter_job(
            "slow",
            &w.images.converter.reference,
            &[
                "run",
                "convert/hf_to_megatron",
                "hf_model_id=/models/source/hf",
                "megatron_path=/models/target/megatron",
            ],
            false,
            serde_json::json!({"activeDeadlineSeconds": deadline}),
        );
    job["spec"]["template"]["spec"]["containers"][0]["resources"] =
        serde_json::json!({"limits": {"cpu": "10m"}});
    let name = w.create_job(job).await?;
    let job = w.job_reaches(&name, "Failed").await?;
    let failed = job
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Failed")
        .context("Failed condition")?;
    assert_eq!(failed.reason.as_deref(), Some("DeadlineExceeded"), "{failed:#?}");
    // The Job controller deletes the pod; the kubelet kills the container.
    w.eventually("the slow pod is gone", || async {
        Ok(w.pods_of(&name).await?.is_empty())
    })
    .await?;
    // Killed before publishing: no target that looks complete.
    assert!(!w.path("target/megatron/latest_checkpointed_iteration.txt").exists());
    Ok(())
}

const RELEASE: &str = "ckpt";
const SYSTEM_NS: &str = "ckpt-system";

/// What the chart installed, once per process: the operator's ServiceAccount,
/// its container arguments and the converter's ServiceAccount.
struct Chart {
    service_account: String,
    args: Vec<String>,
    converter_service_account: String,
}

static CHART: OnceCell<Chart> = OnceCell::const_new();

fn helm(cp: &ControlPlane, args: &[&str]) -> Result<String> {
    let home = tempfile::Builder::new().prefix("ckpt-helm-").tempdir()?;
    let out = Command::new(cp.bin_dir().join("helm"))
        .args(args)
        .arg("--kubeconfig")
        .arg(cp.kubeconfig_path())
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()?;
    ensure!(
        out.status.success(),
        "helm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `helm install` with no operator replicas: the test runs the operator binary
/// (the one in the image) as the chart's ServiceAccount with the chart's args.
async fn chart(cp: &'static ControlPlane) -> Result<&'static Chart> {
    CHART
        .get_or_try_init(|| async {
            let chart = ckpt_testcluster::workspace_root().join("charts/ckpt-operator");
            helm(
                cp,
                &[
                    "install",
                    RELEASE,
                    &chart.display().to_string(),
                    "--namespace",
                    SYSTEM_NS,
                    "--create-namespace",
                    "--set",
                    "replicaCount=0",
                    "--wait=false",
                ],
            )?;
            let out = cp
                .kubectl([
                    "get",
                    "deployment",
                    "-n",
                    SYSTEM_NS,
                    "-l",
                    &format!("app.kubernetes.io/instance={RELEASE}"),
                    "-o",
                    "json",
                ])
                .await?;
            let list: Value = serde_json::from_slice(&out.stdout)?;
            let pod = &list["items"][0]["spec"]["template"]["spec"];
            let args: Vec<String> = pod["containers"][0]["args"]
                .as_array()
                .context("operator args")?
                .iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect();
            let converter_service_account = args
                .iter()
                .find_map(|a| a.strip_prefix("--job-service-account=").map(str::to_owned))
                .context("the chart passes --job-service-account")?;
            Ok::<_, anyhow::Error>(Chart {
                service_account: pod["serviceAccountName"]
                    .as_str()
                    .context("serviceAccountName")?
                    .to_owned(),
                args,
                converter_service_account,
            })
        })
        .await
}

/// The operator binary from the image, as a host process.
struct Operator {
    child: Child,
    log: PathBuf,
}

impl Operator {
    async fn start(cp: &'static ControlPlane, chart: &Chart, dir: &Path) -> Result<Operator> {
        let kubeconfig = cp
            .kubeconfig_for_service_account(SYSTEM_NS, &chart.service_account)
            .await?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
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
            .filter(|a| a != "--log-json")
            .collect();
        let binary = converter().with_file_name("ckpt-operator");
        let log = dir.join("operator.log");
        let file = std::fs::File::create(&log)?;
        let child = Command::new(&binary)
            .args(&args)
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAMESPACE", SYSTEM_NS)
            .env("POD_NAME", "operator-deadline")
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Operator { child, log })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn active_deadline_fails_the_checkpoint_conversion_with_the_reason() -> Result<()> {
    let w = World::new("deadline-cr").await?;
    let deadline = deadline_for(&w)?;
    let chart = chart(w.cp).await?;
    let out = w
        .cp
        .kubectl([
            "create",
            "serviceaccount",
            &chart.converter_service_account,
            "-n",
            &w.ns,
        ])
        .await?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut op = Operator::start(w.cp, chart, w.dir.path()).await?;

    let gvk = GroupVersionKind::gvk("ckpt.dev", "v1alpha1", "CheckpointConversion");
    let api: Api<DynamicObject> =
        Api::namespaced_with(w.client.clone(), &w.ns, &ApiResource::from_gvk(&gvk));
    let cr: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "ckpt.dev/v1alpha1",
        "kind": "CheckpointConversion",
        "metadata": {"name": "slow", "namespace": w.ns},
        "spec": {
            "source": {"kind": "checkpoint_hf", "pvc": "models", "path": "source/hf"},
            "target": {"kind": "checkpoint_megatron", "pvc": "models", "path": "target/megatron"},
            "job": {
                "activeDeadlineSeconds": deadline,
                "resources": {"limits": {"cpu": "10m"}},
            },
        },
    }))?;
    api.create(&Default::default(), &cr).await?;

    let start = Instant::now();
    loop {
        if let Some(status) = op.child.try_wait()? {
            bail!("the operator exited ({status}):\n{}", op.log());
        }
        let cr = api.get("slow").await?;
        let failed = cr.data["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Failed" && c["status"] == "True")
            .cloned();
        if let Some(c) = failed {
            assert_eq!(c["reason"], "DeadlineExceeded", "{c:#}");
            let succeeded = cr.data["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Succeeded" && c["status"] == "True");
            assert!(!succeeded, "{:#}", cr.data["status"]);
            break;
        }
        if start.elapsed() > WAIT + Duration::from_secs(deadline as u64) {
            bail!(
                "the resource never failed; status: {:#}\noperator log:\n{}",
                cr.data["status"],
                op.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let log = op.log();
    assert!(
        !log.contains("is forbidden"),
        "the operator was denied an API call (chart RBAC):\n{log}"
    );
    Ok(())
}
