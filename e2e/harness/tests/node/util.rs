//! One test's world on the real node: a namespace, a claim backed by a fresh
//! fixture directory, Job builders and waits.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};

use ckpt_convert::synthetic::{self, ModelShape};
use ckpt_testcluster::images::{Images, built_images, target_dir};
use ckpt_testcluster::{ControlPlane, IMAGE_USER, RealNode, chown_tree};

/// The claim every test's Jobs mount.
pub const CLAIM: &str = "models";
/// How long a test waits for what should happen: generous, because a busy
/// machine is slow, and never a reason to pass (`CKPT_TEST_DEADLINE_SECS`).
pub fn wait() -> Duration {
    ckpt_testcluster::test_deadline()
}

pub struct World {
    pub cp: &'static ControlPlane,
    pub node: &'static RealNode,
    pub client: Client,
    pub ns: String,
    pub images: Images,
    /// Backs claim `models`: `source/hf` (a demo HF checkpoint) and `target/`,
    /// both owned by the images' user.
    pub dir: tempfile::TempDir,
}

/// The source checkpoint a world's claim holds at `source/hf`.
pub enum Source {
    /// `ckpt-convert demo`'s tiny Llama (hidden 64): converts in a blink.
    Demo,
    /// A synthetic Llama of about 21 M parameters (42 MB): enough CPU work to
    /// outlast a deadline under a small CPU limit.
    Medium,
}

impl World {
    pub async fn new(prefix: &str) -> Result<World> {
        World::with_source(prefix, Source::Demo).await
    }

    pub async fn with_source(prefix: &str, source: Source) -> Result<World> {
        let t0 = Instant::now();
        let node = RealNode::shared().await?;
        let cp = ControlPlane::shared_for_real_node().await?;
        let images = built_images()?;
        let client = cp.client();
        let ns = cp.new_namespace(prefix).await?;
        let dir = tempfile::Builder::new().prefix("ckpt-claim-").tempdir()?;
        match source {
            Source::Demo => demo_checkpoint(&dir.path().join("source/hf"))?,
            Source::Medium => {
                let shape = ModelShape {
                    layers: 4,
                    hidden: 512,
                    intermediate: 1536,
                    heads: 8,
                    kv_heads: 4,
                    head_dim: 64,
                    vocab: 8192,
                    ..ModelShape::tiny_llama()
                };
                synthetic::write_hf(&dir.path().join("source/hf"), &shape, 7, 1 << 30)?;
            }
        }
        std::fs::create_dir_all(dir.path().join("target"))?;
        // Only the mount may stop the converter from writing the source.
        chown_tree(dir.path(), IMAGE_USER)?;
        node.bind_claim(&client, &ns, CLAIM, dir.path()).await?;
        eprintln!("[{prefix}] world ready in {:?}", t0.elapsed());
        Ok(World {
            cp,
            node,
            client,
            ns,
            images,
            dir,
        })
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub async fn create_job(&self, job: serde_json::Value) -> Result<String> {
        let job: Job = serde_json::from_value(job)?;
        let created = self.jobs().create(&PostParams::default(), &job).await?;
        Ok(created.metadata.name.unwrap_or_default())
    }

    /// What to show when a wait fails: the Job's pods and the node's logs.
    pub async fn diagnostics(&self, job: &str) -> String {
        let pods = self.pods_of(job).await.unwrap_or_default();
        let statuses: Vec<_> = pods.iter().map(|p| &p.status).collect();
        format!(
            "pods: {statuses:#?}\nkubelet log:\n{}\ncontainerd log:\n{}",
            self.node.log_tail("kubelet", 30),
            self.node.log_tail("containerd", 15)
        )
    }

    /// Waits until Job `name` has condition `kind` (`Complete` or `Failed`)
    /// True; fails early if it reaches the other.
    pub async fn job_reaches(&self, name: &str, kind: &str) -> Result<Job> {
        let start = Instant::now();
        let deadline = wait();
        loop {
            let job = self.jobs().get(name).await?;
            let conditions = job
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default();
            let done: Vec<_> = conditions
                .iter()
                .filter(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
                .collect();
            if let Some(c) = done.first() {
                if c.type_ != kind {
                    bail!(
                        "job {}/{name}: expected {kind}, found {conditions:#?}\n{}",
                        self.ns,
                        self.diagnostics(name).await
                    );
                }
                return Ok(job);
            }
            if start.elapsed() > deadline {
                bail!(
                    "job {}/{name} did not finish within {deadline:?}\n{}",
                    self.ns,
                    self.diagnostics(name).await
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn pods_of(&self, job: &str) -> Result<Vec<Pod>> {
        let lp = ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}"));
        Ok(self.pods().list(&lp).await?.items)
    }

    /// The single pod of Job `job` and its container's terminated state.
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

    /// Waits until the converter of Job `job`, started from the test image
    /// (`images.converter_failpoints`), has staged its first piece and paused:
    /// it wrote its pid to `/tmp/ckpt-pause` (an emptyDir named `tmp`).
    pub async fn paused(&self, job: &str) -> Result<()> {
        let start = Instant::now();
        let deadline = wait();
        loop {
            for pod in self.pods_of(job).await? {
                let uid = pod.metadata.uid.unwrap_or_default();
                if self
                    .node
                    .empty_dir(&uid, "tmp")
                    .join("ckpt-pause")
                    .is_file()
                {
                    return Ok(());
                }
            }
            if start.elapsed() > deadline {
                bail!(
                    "job {job}: the converter did not pause within {deadline:?}\n{}",
                    self.diagnostics(job).await
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Lowers the running Job's `activeDeadlineSeconds` (a mutable field) to
    /// 1 s, already past: the Job controller fails it with DeadlineExceeded and
    /// deletes its pod.
    pub async fn deadline_already_past(&self, job: &str) -> Result<()> {
        let patch = serde_json::json!({"spec": {"activeDeadlineSeconds": 1}});
        self.jobs()
            .patch(job, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        Ok(())
    }

    /// Paths under `target/` whose name marks a run's work in progress
    /// (`.NAME.ckpt-staging-ID` and the marker inside it).
    pub fn staging_under_target(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if entry
                    .file_name()
                    .to_string_lossy()
                    .contains(".ckpt-staging")
                {
                    found.push(path.clone());
                }
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&path, found);
                }
            }
        }
        let mut found = Vec::new();
        walk(&self.path("target"), &mut found);
        found
    }

    /// Polls `probe` until it is true.
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
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(())
    }
}

/// The static converter the image holds (it runs on the host too).
pub fn converter() -> PathBuf {
    target_dir()
        .join(format!(
            "{}-unknown-linux-musl/release",
            std::env::consts::ARCH
        ))
        .join("ckpt-convert")
}

/// `ckpt-convert demo` into a scratch dir, keeping its HF source at `dest`.
pub fn demo_checkpoint(dest: &Path) -> Result<()> {
    let scratch = tempfile::Builder::new().prefix("ckpt-demo-").tempdir()?;
    let out = Command::new(converter())
        .arg("demo")
        .arg("--dir")
        .arg(scratch.path())
        .output()?;
    if !out.status.success() {
        bail!(
            "ckpt-convert demo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::create_dir_all(dest.parent().context("parent")?)?;
    std::fs::rename(scratch.path().join("hf-source"), dest)?;
    Ok(())
}

/// Every path under `dir` with its contents, sorted.
pub fn snapshot(dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            let rel = p.strip_prefix(dir)?.to_path_buf();
            if p.is_dir() {
                out.push((rel, Vec::new()));
                stack.push(p);
            } else {
                out.push((rel, std::fs::read(&p)?));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A Job running the converter image with `args`, claim `models` mounted at
/// `/models` (read-only when `read_only`), as the operator runs it: non-root,
/// read-only root filesystem, no privilege escalation, backoffLimit 0.
pub fn converter_job(
    name: &str,
    image: &str,
    args: &[&str],
    read_only: bool,
    extra_spec: serde_json::Value,
) -> serde_json::Value {
    let mut job = serde_json::json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": false,
                "securityContext": {"runAsNonRoot": true},
                "containers": [{
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "args": args,
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                    "securityContext": {
                        "readOnlyRootFilesystem": true,
                        "allowPrivilegeEscalation": false,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": read_only}],
                }],
                "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": CLAIM}}],
            }},
        },
    });
    if let (Some(spec), Some(extra)) = (job["spec"].as_object_mut(), extra_spec.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    job
}
