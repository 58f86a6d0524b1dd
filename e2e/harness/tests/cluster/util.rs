//! Shared test DSL: the cluster, a namespace with a node stand-in, a generated
//! checkpoint fixture, Job builders and waits.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use kube::api::{ListParams, PostParams};
use kube::runtime::wait::await_condition;
use kube::{Api, Client};

use ckpt_testcluster::{ControlPlane, NodeStandIn, StandInConfig, converter_binary};

/// The converter image the stand-in emulates.
pub const IMAGE: &str = "ghcr.io/ckpt/ckpt-convert:dev";
/// The claim that maps to the fixture dir.
pub const CLAIM: &str = "models";
/// Where Jobs mount it.
pub const MOUNT: &str = "/models";
/// How long a test waits for what should happen: generous, because a busy
/// machine is slow, and never a reason to pass (`CKPT_TEST_DEADLINE_SECS`).
pub fn wait() -> Duration {
    ckpt_testcluster::test_deadline()
}

/// One test's world: its namespace on the shared control plane, a node
/// stand-in watching it, and a fresh checkpoint fixture mapped to claim `models`.
pub struct World {
    pub cp: &'static ControlPlane,
    pub client: Client,
    pub ns: String,
    pub standin: NodeStandIn,
    /// Holds `hf-source/` (from `ckpt-convert demo`), mapped to claim `models`.
    pub fixture: tempfile::TempDir,
}

impl World {
    /// Starts (or joins) the shared control plane and sets up the rest.
    /// `tweak` may change the stand-in configuration.
    pub async fn new(
        prefix: &str,
        tweak: impl FnOnce(StandInConfig) -> StandInConfig,
    ) -> Result<World> {
        let t0 = Instant::now();
        let cp = ControlPlane::shared().await?;
        let converter = converter_binary()?;
        let fixture = demo_fixture(&converter)?;
        let ns = cp.new_namespace(prefix).await?;
        let client = cp.client();
        let config = StandInConfig::new(IMAGE)
            .namespace(&ns)
            .binary("ckpt-convert", &converter)
            .pvc(CLAIM, fixture.path());
        let standin = NodeStandIn::start(client.clone(), tweak(config)).await?;
        eprintln!("[{prefix}] world ready in {:?}", t0.elapsed());
        Ok(World {
            cp,
            client,
            ns,
            standin,
            fixture,
        })
    }

    pub fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub async fn create_job(&self, job: Job) -> Result<String> {
        let created = self.jobs().create(&PostParams::default(), &job).await?;
        Ok(created.metadata.name.unwrap_or_default())
    }

    /// Waits until Job `name` has condition `kind` (`Complete` or `Failed`) True;
    /// fails early, with both conditions, if it reaches the other one.
    pub async fn job_reaches(&self, name: &str, kind: &str) -> Result<Job> {
        let done = |j: Option<&Job>| {
            j.and_then(|j| j.status.as_ref()?.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True"
                    })
                })
        };
        let deadline = wait();
        let job = tokio::time::timeout(deadline, await_condition(self.jobs(), name, done))
            .await
            .with_context(|| {
                format!(
                    "job {}/{name} did not finish within {deadline:?}; runs: {:#?}",
                    self.ns,
                    self.standin.runs()
                )
            })??
            .context("job deleted while waiting")?;
        let conditions = job
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        if !conditions
            .iter()
            .any(|c| c.type_ == kind && c.status == "True")
        {
            bail!(
                "job {}/{name}: expected {kind}, found conditions {conditions:#?}; runs: {:#?}",
                self.ns,
                self.standin.runs()
            );
        }
        Ok(job)
    }

    /// The pods of Job `name`.
    pub async fn pods_of(&self, job: &str) -> Result<Vec<Pod>> {
        let lp = ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}"));
        Ok(self.pods().list(&lp).await?.items)
    }

    /// The single pod of Job `name` and its terminated container state.
    pub async fn terminated(&self, job: &str) -> Result<(Pod, ContainerStateTerminated)> {
        let pods = self.pods_of(job).await?;
        let [pod] = pods.as_slice() else {
            bail!("job {job}: expected one pod, found {}", pods.len());
        };
        let term = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.terminated.clone())
            .with_context(|| {
                format!(
                    "pod of job {job} has no terminated state: {:#?}",
                    pod.status
                )
            })?;
        Ok((pod.clone(), term))
    }

    /// Waits until `cond` holds for `what`, polling `probe`.
    pub async fn eventually<F, Fut>(&self, what: &str, mut probe: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<bool>>,
    {
        let start = Instant::now();
        let deadline = wait();
        while !probe().await? {
            if start.elapsed() > deadline {
                bail!("{what}: not true after {deadline:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }
}

/// `ckpt-convert demo --dir <tmp>`: writes `<tmp>/hf-source` (and more).
pub fn demo_fixture(converter: &Path) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix("ckpt-fixture-").tempdir()?;
    let out = std::process::Command::new(converter)
        .arg("demo")
        .arg("--dir")
        .arg(dir.path())
        .output()
        .with_context(|| format!("running {} demo", converter.display()))?;
    if !out.status.success() || !dir.path().join("hf-source/config.json").is_file() {
        bail!(
            "{} demo --dir {} failed ({}): {}",
            converter.display(),
            dir.path().display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(dir)
}

/// A Job whose one pod runs `ckpt-convert ARGS…` with claim `models` at
/// `/models` (read-only unless `writable`); `backoffLimit: 0`, `restartPolicy: Never`.
pub fn converter_job(name: &str, args: &[&str], read_only: bool) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "main",
                    "image": IMAGE,
                    "command": ["/usr/local/bin/ckpt-convert"],
                    "args": args,
                    "volumeMounts": [{"name": "models", "mountPath": MOUNT, "readOnly": read_only}],
                }],
                "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": CLAIM}}],
            }},
        },
    })
}

pub fn to_job(v: serde_json::Value) -> Result<Job> {
    Ok(serde_json::from_value(v)?)
}

/// Every path under `dir`, relative and sorted.
pub fn tree(dir: &Path) -> Vec<PathBuf> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p = e.path();
                out.push(p.strip_prefix(base).unwrap_or(&p).to_path_buf());
                if p.is_dir() {
                    walk(base, &p, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}
