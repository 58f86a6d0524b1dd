//! The operator as users run it: `helm install` of the chart, the operator
//! running from its own image on the node under the chart's ServiceAccount and
//! RBAC (the apiserver enforces OwnerReferencesPermissionEnforcement), and the
//! converter image running the conversions it creates.
//!
//! The operator pod uses the host network (`hostNetwork=true`, a chart value):
//! the API server listens on 127.0.0.1 and no kube-proxy runs, so the pod is
//! told the address with KUBERNETES_SERVICE_HOST/PORT (the chart's
//! `extraEnv`). Its token and CA come from the ServiceAccount volume, as in
//! any cluster.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, GroupVersionKind, ListParams};
use kube::discovery::ApiResource;
use serde_json::Value;
use tokio::sync::OnceCell;

use crate::util::{Source, World, snapshot, wait};
use ckpt_testcluster::{ControlPlane, PORT_ATTEMPTS, free_ports};

const RELEASE: &str = "ckpt";
const SYSTEM_NS: &str = "ckpt-system";

/// What `helm install` created, once per process.
pub struct Installed {
    pub converter_service_account: String,
    /// The operator's user, `system:serviceaccount:NS:NAME`.
    pub operator_user: String,
}

static INSTALLED: OnceCell<Installed> = OnceCell::const_new();

fn helm(cp: &ControlPlane, args: &[String]) -> Result<String> {
    let home = tempfile::Builder::new().prefix("ckpt-helm-").tempdir()?;
    let out = std::process::Command::new(cp.bin_dir().join("helm"))
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

async fn operator_pods(cp: &ControlPlane) -> Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(cp.client(), SYSTEM_NS);
    let lp = ListParams::default().labels(&format!("app.kubernetes.io/instance={RELEASE}"));
    Ok(pods.list(&lp).await?.items)
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The chart installed with one operator replica from the operator image, and
/// that replica Ready (its readiness probe answers once it reconciles).
pub async fn installed(w: &World) -> Result<&'static Installed> {
    let cp = w.cp;
    let image = w.images.operator.reference.clone();
    let converter = w.images.converter.reference.clone();
    INSTALLED
        .get_or_try_init(|| async move {
            let chart = ckpt_testcluster::workspace_root().join("charts/ckpt-operator");
            let api_port = cp
                .api_url()
                .rsplit(':')
                .next()
                .context("apiserver port")?
                .to_owned();
            let mut metrics_port = free_port()?;
            let (repo, tag) = image.rsplit_once(':').context("operator image tag")?;
            let (crepo, ctag) = converter.rsplit_once(':').context("converter image tag")?;
            let env = serde_json::json!([
                {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                {"name": "KUBERNETES_SERVICE_PORT", "value": api_port},
            ]);
            helm(
                cp,
                &[
                    "install".into(),
                    RELEASE.into(),
                    chart.display().to_string(),
                    "--namespace".into(),
                    SYSTEM_NS.into(),
                    "--create-namespace".into(),
                    "--set".into(),
                    format!("image.repository={repo},image.tag={tag}"),
                    "--set".into(),
                    format!("converter.image.repository={crepo},converter.image.tag={ctag}"),
                    "--set".into(),
                    "hostNetwork=true".into(),
                    // Each test has its own namespace; the release watches them all.
                    "--set".into(),
                    "clusterWide=true".into(),
                    "--set".into(),
                    format!("metrics.port={metrics_port}"),
                    "--set-json".into(),
                    format!("extraEnv={env}"),
                    "--wait=false".into(),
                ],
            )?;
            let deployments: Api<Deployment> = Api::namespaced(cp.client(), SYSTEM_NS);
            let lp = ListParams::default().labels(&format!("app.kubernetes.io/instance={RELEASE}"));
            let deployment = deployments
                .list(&lp)
                .await?
                .items
                .pop()
                .context("the chart's Deployment")?;
            let pod_spec = deployment
                .spec
                .and_then(|s| s.template.spec)
                .context("the Deployment's pod template")?;
            let operator_user = format!(
                "system:serviceaccount:{SYSTEM_NS}:{}",
                pod_spec
                    .service_account_name
                    .as_deref()
                    .context("the chart names the operator's ServiceAccount")?
            );
            let args = pod_spec
                .containers
                .into_iter()
                .next()
                .and_then(|c| c.args)
                .unwrap_or_default();
            let converter_service_account = args
                .iter()
                .find_map(|a| a.strip_prefix("--job-service-account="))
                .context("the chart passes --job-service-account")?
                .to_owned();
            let start = Instant::now();
            let deadline = wait();
            let mut attempts = 1;
            loop {
                let pods = operator_pods(cp).await?;
                if pods.iter().any(pod_ready) {
                    break;
                }
                // The host network's port was free when chosen, but anything on this
                // machine may take it before the operator binds it: as for the control
                // plane's ports, a clash is seen (the operator's own error) and the
                // release moved to a fresh port, a bounded number of times.
                if port_taken(&operator_log(w), metrics_port) {
                    ensure!(
                        attempts < PORT_ATTEMPTS,
                        "the operator could not bind its metrics port {attempts} times"
                    );
                    attempts += 1;
                    metrics_port = free_port()?;
                    helm(
                        cp,
                        &[
                            "upgrade".into(),
                            RELEASE.into(),
                            chart.display().to_string(),
                            "--namespace".into(),
                            SYSTEM_NS.into(),
                            "--reuse-values".into(),
                            "--set".into(),
                            format!("metrics.port={metrics_port}"),
                        ],
                    )?;
                }
                if start.elapsed() > deadline {
                    bail!(
                        "the operator pod is not Ready after {deadline:?}: {:#?}\nkubelet log:\n{}",
                        pods.iter().map(|p| &p.status).collect::<Vec<_>>(),
                        w.node.log_tail("kubelet", 30)
                    );
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Ok::<_, anyhow::Error>(Installed {
                converter_service_account,
                operator_user,
            })
        })
        .await
}

/// A port free now (the operator binds it later, on the host network).
fn free_port() -> Result<u16> {
    let [port] = free_ports::<1>()?;
    Ok(port)
}

/// Whether the operator's `log` says it could not bind its metrics `port` because
/// something else holds it.
fn port_taken(log: &str, port: u16) -> bool {
    // `Error: binding ADDR`, then its cause on a later line (anyhow's report):
    // EADDRINUSE reads "Address in use" from musl (the image's libc) and "Address
    // already in use" from glibc.
    let addr = format!("binding 0.0.0.0:{port}");
    let lines: Vec<&str> = log.lines().collect();
    lines.iter().enumerate().any(|(i, l)| {
        l.trim_end().ends_with(&addr)
            && lines[i + 1..]
                .iter()
                .take(4)
                .any(|l| l.contains("in use (os error"))
    })
}

/// The operator's log, read from the node (the kubelet's server is not
/// reachable from the API server here, so `kubectl logs` is not).
fn operator_log(w: &World) -> String {
    let dir = w.node.dir().join("pod-logs");
    let mut out = String::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{SYSTEM_NS}_"))
            {
                let c = e.path().join("operator");
                if let Ok(files) = std::fs::read_dir(&c) {
                    for f in files.flatten() {
                        out.push_str(&std::fs::read_to_string(f.path()).unwrap_or_default());
                    }
                }
            }
        }
    }
    out
}

fn conversions(w: &World) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("ckpt.dev", "v1alpha1", "CheckpointConversion");
    Api::namespaced_with(w.client.clone(), &w.ns, &ApiResource::from_gvk(&gvk))
}

async fn create(w: &World, name: &str, job: Value) -> Result<()> {
    create_at(w, name, "target/megatron", job).await
}

/// Like [`create`], writing to `target` on the claim (one target per resource:
/// a second resource for a target waits for the first).
async fn create_at(w: &World, name: &str, target: &str, job: Value) -> Result<()> {
    let installed = installed(w).await?;
    let out =
        w.cp.kubectl([
            "create",
            "serviceaccount",
            &installed.converter_service_account,
            "-n",
            &w.ns,
        ])
        .await?;
    // One account per namespace, for all its resources.
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() || stderr.contains("already exists"),
        "{stderr}"
    );
    let cr: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "ckpt.dev/v1alpha1",
        "kind": "CheckpointConversion",
        "metadata": {"name": name, "namespace": w.ns},
        "spec": {
            "source": {"kind": "checkpoint_hf", "pvc": "models", "path": "source/hf"},
            "target": {"kind": "checkpoint_megatron", "pvc": "models", "path": target},
            "job": job,
        },
    }))?;
    conversions(w).create(&Default::default(), &cr).await?;
    Ok(())
}

/// Waits until condition `type_` is True and returns the resource's status.
async fn wait_condition(w: &World, name: &str, type_: &str, within: Duration) -> Result<Value> {
    wait_status(w, name, within, |status| {
        status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == type_ && c["status"] == "True")
    })
    .await
}

/// Waits until `done` holds for resource `name`'s status and returns the status.
async fn wait_status(
    w: &World,
    name: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let start = Instant::now();
    loop {
        let status = conversions(w).get(name).await?.data["status"].clone();
        if done(&status) {
            return Ok(status);
        }
        if start.elapsed() > within {
            bail!(
                "{name}: status not as expected within {within:?}: {status:#}\noperator log:\n{}\n{}",
                operator_log(w),
                w.diagnostics(status["jobName"].as_str().unwrap_or_default())
                    .await
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

/// Any request of the operator that the apiserver refused is a missing RBAC
/// rule in the chart: its audit log says so, whatever the operator logged.
fn assert_no_denials(w: &World) {
    let user = &INSTALLED
        .get()
        .expect("the chart is installed")
        .operator_user;
    let denied =
        w.cp.denied_requests(user)
            .expect("the apiserver's audit log");
    assert!(
        denied.is_empty(),
        "the apiserver denied {user} (chart RBAC):\n{}\noperator log:\n{}",
        denied.join("\n"),
        operator_log(w)
    );
}

#[tokio::test]
async fn the_operator_from_its_image_converts_through_the_converter_image() -> Result<()> {
    let w = World::new("operator").await?;
    create(&w, "hf-to-megatron", serde_json::json!({})).await?;
    let status = wait_condition(&w, "hf-to-megatron", "Succeeded", wait()).await?;
    assert_eq!(
        condition(&status, "Validated")["status"],
        "True",
        "{status:#}"
    );
    assert!(
        w.path("target/megatron/latest_checkpointed_iteration.txt")
            .is_file(),
        "{status:#}"
    );
    // The operator's pod is the one the kubelet runs from the operator image.
    let pods = operator_pods(w.cp).await?;
    let pod = pods
        .iter()
        .find(|p| pod_ready(p))
        .context("a Ready operator pod")?;
    let c = &pod
        .status
        .as_ref()
        .context("status")?
        .container_statuses
        .as_ref()
        .context("statuses")?[0];
    assert_eq!(c.image, w.images.operator.reference);
    assert!(w.images.operator.is_image_id(&c.image_id), "{c:#?}");
    assert_no_denials(&w);
    Ok(())
}

/// The deadline set in `spec.job` reaches the Job; when it passes mid-write
/// (the test image pauses the converter after its first staged piece, then the
/// test lowers the running Job's deadline below the time spent, so no clock
/// is raced) the resource ends Failed with the Job's reason, nothing is
/// published and the staging is removed.
#[tokio::test]
async fn active_deadline_fails_the_checkpoint_conversion_with_the_reason() -> Result<()> {
    let w = World::with_source("deadline-cr", Source::Medium).await?;
    create(
        &w,
        "slow",
        serde_json::json!({
            "image": w.images.converter_failpoints.reference,
            "activeDeadlineSeconds": 3600,
        }),
    )
    .await?;
    let job = job_of(&w, "slow").await?;
    let created = w.jobs().get(&job).await?;
    assert_eq!(
        created
            .spec
            .as_ref()
            .and_then(|s| s.active_deadline_seconds),
        Some(3600)
    );
    w.paused(&job).await?;
    ensure!(
        !w.staging_under_target().is_empty(),
        "paused, yet nothing is staged under target/"
    );
    w.deadline_already_past(&job).await?;
    let status = wait_condition(&w, "slow", "Failed", wait()).await?;
    let failed = condition(&status, "Failed");
    assert_eq!(failed["reason"], "DeadlineExceeded", "{status:#}");
    assert_ne!(
        condition(&status, "Succeeded")["status"],
        "True",
        "{status:#}"
    );
    w.eventually("the slow pod is gone", || async {
        Ok(w.pods_of(&job).await?.is_empty())
    })
    .await?;
    assert_eq!(w.staging_under_target(), Vec::<std::path::PathBuf>::new());
    assert!(!w.path("target/megatron").exists());
    assert_no_denials(&w);
    Ok(())
}

/// A resource deleted while its Job writes (the test image pauses the converter
/// after its first staged piece): the garbage collector takes the Job and its
/// pod, the kubelet stops the converter (PID 1 in its container) with SIGTERM,
/// the converter removes its staging, nothing is published and the source is
/// unchanged. The stand-in's twin in operator/tests/cluster/faults.rs stops the
/// converter as an ordinary process; this is what a kubelet does.
#[tokio::test]
async fn deleting_a_resource_mid_write_stops_its_pod_and_cleans_staging() -> Result<()> {
    let w = World::with_source("delete-cr", Source::Medium).await?;
    let source = snapshot(&w.path("source/hf"))?;
    create(
        &w,
        "deleted",
        serde_json::json!({"image": w.images.converter_failpoints.reference}),
    )
    .await?;
    let job = job_of(&w, "deleted").await?;
    w.paused(&job).await?;
    ensure!(
        !w.staging_under_target().is_empty(),
        "paused, yet nothing is staged under target/"
    );
    conversions(&w)
        .delete("deleted", &Default::default())
        .await?;
    w.eventually("the resource, its Job and its pod are gone", || async {
        Ok(conversions(&w).get_opt("deleted").await?.is_none()
            && w.jobs().get_opt(&job).await?.is_none()
            && w.pods_of(&job).await?.is_empty())
    })
    .await?;
    // The pod went by a graceful deletion, so its converter was told to stop,
    // not killed: what it staged is removed.
    assert_eq!(w.staging_under_target(), Vec::<std::path::PathBuf>::new());
    assert!(
        !w.path("target/megatron").exists(),
        "something was published"
    );
    assert!(
        snapshot(&w.path("source/hf"))? == source,
        "the source changed"
    );
    assert_no_denials(&w);
    Ok(())
}

/// The Job a resource's status names, once it exists (status names the Job
/// before it is created: a Job waits for its creation slot).
async fn job_of(w: &World, name: &str) -> Result<String> {
    let start = Instant::now();
    let deadline = wait();
    loop {
        let cr = conversions(w).get(name).await?;
        if let Some(job) = cr.data["status"]["jobName"].as_str()
            && w.jobs().get_opt(job).await?.is_some()
        {
            return Ok(job.to_owned());
        }
        ensure!(
            start.elapsed() < deadline,
            "{name}: no Job after {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What the scheduler and the kubelet really say when a conversion's pod cannot
/// start reaches the resource's status while it waits (the stand-in's twin in
/// operator/tests/cluster/pods.rs writes those words itself): a request no node
/// can hold reads `Unschedulable` with the scheduler's message, and an image
/// that cannot be pulled (nothing outside this machine is reachable) reads the
/// kubelet's pull error; both stay Pending, neither fails.
#[tokio::test]
async fn pods_that_cannot_start_report_the_schedulers_and_kubelets_words() -> Result<()> {
    let w = World::new("cannot-start").await?;
    create(
        &w,
        "too-big",
        serde_json::json!({"resources": {"requests": {"cpu": "64"}}}),
    )
    .await?;
    let status = wait_status(&w, "too-big", wait(), |s| s["reason"] == "Unschedulable").await?;
    assert_eq!(status["phase"], "Pending", "{status:#}");
    let message = status["message"].as_str().unwrap_or_default();
    assert!(message.contains("Insufficient cpu"), "{status:#}");

    let (repo, _) = w
        .images
        .converter
        .reference
        .rsplit_once(':')
        .context("converter image tag")?;
    let missing = format!("{repo}:not-on-this-node");
    create_at(
        &w,
        "no-image",
        "target/other",
        serde_json::json!({"image": missing}),
    )
    .await?;
    let status = wait_status(&w, "no-image", wait(), |s| {
        s["reason"] == "ErrImagePull" || s["reason"] == "ImagePullBackOff"
    })
    .await?;
    assert_eq!(status["phase"], "Pending", "{status:#}");
    let message = status["message"].as_str().unwrap_or_default();
    assert!(message.contains(&missing), "{status:#}");
    assert_no_denials(&w);
    // Their pods would wait (and retry the pull) until the node stops.
    for name in ["too-big", "no-image"] {
        conversions(&w).delete(name, &Default::default()).await?;
    }
    Ok(())
}
