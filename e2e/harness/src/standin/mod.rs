//! The node stand-in: no kubelet can run here, so the harness plays the node
//! for our Jobs' pods and runs their one container as a local process.
//!
//! For each new pending pod without `spec.nodeName` it:
//!
//! 1. checks it can emulate the pod faithfully ([`plan`]): exactly one
//!    container, no init containers, `restartPolicy: Never`, the configured
//!    image, `persistentVolumeClaim` and `emptyDir` volumes only, literal env
//!    values and `fieldRef`s to the pod's name, namespace, labels and annotations
//!    only, a command that maps to a local binary, and no absolute path
//!    in an argument or env value outside the volume mounts (the image's
//!    filesystem is not emulated, and such a path would hit the host's). Anything
//!    else fails the pod with reason `StandInCannotEmulate` and a message naming
//!    what, and is recorded in [`NodeStandIn::errors`];
//! 2. maps each claim to a local directory ([`StandInConfig::pvc`]). An unknown
//!    claim fails the pod with reason `PVCNotFound` (and is recorded): a real
//!    cluster would leave the pod Pending and Unschedulable forever, which a test
//!    could only notice by timing out;
//! 3. runs the process in a private mount namespace where each volumeMount is a
//!    bind mount, read-only ones remounted `MS_RDONLY` ([`sandbox`]), with
//!    `$CKPT_TERMINATION_LOG` pointing at the file that stands for
//!    `terminationMessagePath`;
//! 4. writes pod status as a kubelet does: Running with `startedAt`, then
//!    Succeeded or Failed with `containerStatuses[0].state.terminated`
//!    (`exitCode`, `reason` Completed/Error, `message` by the kubelet's rules,
//!    times) and the conditions of a finished pod. The real Job controller takes
//!    it from there. Local paths in the message are mapped back to container
//!    paths (`<root>/mounts/models/x` → `/models/x`), as a real pod would report them.
//!
//! Deleting a pod kills its process (SIGTERM, SIGKILL after the grace period,
//! at most 30 s); `activeDeadlineSeconds` does the same and fails the pod with
//! reason `DeadlineExceeded`.

pub(crate) mod plan;
pub(crate) mod sandbox;
pub(crate) mod status;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use crate::error::{Error, Result};
use plan::{Plan, REASON_START_ERROR, Refusal};
pub use plan::{REASON_CANNOT_EMULATE, REASON_PVC_NOT_FOUND};
use sandbox::{BindMount, Sandbox};
use status::Terminated;

/// How long [`NodeStandIn::start`] waits for the pod watch's initial list.
const INITIAL_LIST_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a pod status write is retried while the apiserver cannot take it.
const STATUS_RETRY_FOR: Duration = Duration::from_secs(300);

/// What the stand-in may run and where its volumes live.
#[derive(Debug, Clone)]
pub struct StandInConfig {
    /// Watch one namespace (`Some`) or all (`None`).
    pub namespace: Option<String>,
    /// The only image the stand-in emulates, e.g. `ghcr.io/ckpt/ckpt-convert:dev`.
    pub image: String,
    /// Accept any tag (or digest) of [`StandInConfig::image`]'s repository.
    pub any_tag: bool,
    /// `command[0]` → local binary; looked up by the full string, then by its
    /// file name (`/usr/local/bin/ckpt-convert` matches `ckpt-convert`).
    pub binaries: HashMap<String, PathBuf>,
    /// PersistentVolumeClaim name → local directory.
    pub pvcs: HashMap<String, PathBuf>,
    /// Claims whose storage is read-only whatever the pod asks (a read-only export,
    /// a full or write-protected volume): every mount of them is read-only, so a
    /// write fails with `EROFS` as it would on such a volume.
    pub read_only_pvcs: HashSet<String>,
    /// The image's entrypoint, used when a container sets no `command`.
    pub entrypoint: Vec<String>,
    /// Absolute paths that may pass through unchanged although no volume is
    /// mounted there (default: `/dev/null`).
    pub passthrough_paths: Vec<String>,
    /// Extra environment for every process (before the pod's own `env`).
    pub extra_env: Vec<(String, String)>,
}

impl StandInConfig {
    /// A configuration that emulates `image` (exact tag) in all namespaces.
    pub fn new(image: impl Into<String>) -> Self {
        StandInConfig {
            namespace: None,
            image: image.into(),
            any_tag: false,
            binaries: HashMap::new(),
            pvcs: HashMap::new(),
            read_only_pvcs: HashSet::new(),
            entrypoint: Vec::new(),
            passthrough_paths: vec!["/dev/null".to_string()],
            extra_env: Vec::new(),
        }
    }

    /// Watch only `namespace`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Accept any tag of the image's repository.
    pub fn any_tag(mut self, yes: bool) -> Self {
        self.any_tag = yes;
        self
    }

    /// Maps `command[0]` (or its file name) to a local binary.
    pub fn binary(mut self, command: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.binaries.insert(command.into(), path.into());
        self
    }

    /// Maps a PersistentVolumeClaim to a local directory.
    pub fn pvc(mut self, claim: impl Into<String>, dir: impl Into<PathBuf>) -> Self {
        self.pvcs.insert(claim.into(), dir.into());
        self
    }

    /// Maps a PersistentVolumeClaim to a local directory whose storage is
    /// read-only (see [`StandInConfig::read_only_pvcs`]).
    pub fn read_only_pvc(mut self, claim: impl Into<String>, dir: impl Into<PathBuf>) -> Self {
        let claim = claim.into();
        self.read_only_pvcs.insert(claim.clone());
        self.pvcs.insert(claim, dir.into());
        self
    }

    /// Adds an environment variable for every process.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra_env.push((name.into(), value.into()));
        self
    }
}

/// A pod the stand-in refused or could not start: the test should look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandInError {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// `StandInCannotEmulate`, `PVCNotFound` or `StartError`.
    pub reason: String,
    /// What exactly.
    pub message: String,
}

impl fmt::Display for StandInError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pod {}/{}: {}: {}",
            self.namespace, self.pod, self.reason, self.message
        )
    }
}

/// What the stand-in ran for one pod.
#[derive(Debug, Clone)]
pub struct Run {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's `batch.kubernetes.io/job-name` label.
    pub job: Option<String>,
    /// `command` + `args` as the pod has them (after `$(VAR)` expansion).
    pub pod_argv: Vec<String>,
    /// What ran: the local program, then the rewritten arguments.
    pub argv: Vec<String>,
    /// `(mountPath, local source, read-only)` per volumeMount.
    pub mounts: Vec<(String, PathBuf, bool)>,
    /// The process id.
    pub pid: u32,
    /// The exit code (128 + signal when killed); `None` while running.
    pub exit_code: Option<i32>,
    /// The termination message written to the pod status.
    pub termination_message: Option<String>,
    /// stdout and stderr, interleaved as written (complete once exited).
    pub output: String,
    /// `Exited`, `Deleted` or `DeadlineExceeded`; `None` while running.
    pub end: Option<String>,
}

#[derive(Default)]
struct State {
    runs: Vec<Run>,
    errors: Vec<StandInError>,
}

struct Shared {
    client: Client,
    config: StandInConfig,
    root: PathBuf,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_error(&self, pod: &Pod, reason: &str, message: &str) {
        let e = StandInError {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            pod: pod.metadata.name.clone().unwrap_or_default(),
            reason: reason.to_string(),
            message: message.to_string(),
        };
        eprintln!("ckpt-testcluster node stand-in: ERROR: {e}");
        self.lock().errors.push(e);
    }

    fn update_run(&self, ns: &str, pod: &str, f: impl FnOnce(&mut Run)) {
        if let Some(r) = self
            .lock()
            .runs
            .iter_mut()
            .rev()
            .find(|r| r.namespace == ns && r.pod == pod)
        {
            f(r);
        }
    }

    /// Writes pod status as the kubelet's status manager does: a strategic merge
    /// (conditions others set, such as the eviction's `DisruptionTarget`, stay),
    /// retried while the apiserver cannot take it (restarting, its etcd away) for
    /// up to [`STATUS_RETRY_FOR`]. A pod that is gone needs no status.
    async fn patch_status(&self, ns: &str, name: &str, body: &serde_json::Value) {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(200);
        loop {
            match api
                .patch_status(name, &PatchParams::default(), &Patch::Strategic(body))
                .await
            {
                Ok(_) => return,
                Err(kube::Error::Api(s)) if s.code == 404 => return,
                Err(kube::Error::Api(s)) if s.code < 500 && s.code != 429 => {
                    eprintln!(
                        "ckpt-testcluster node stand-in: patching status of pod {ns}/{name}: {s}"
                    );
                    return;
                }
                Err(e) if started.elapsed() > STATUS_RETRY_FOR => {
                    eprintln!(
                        "ckpt-testcluster node stand-in: gave up patching status of pod {ns}/{name} after {:?}: {e}",
                        started.elapsed()
                    );
                    return;
                }
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// The running stand-in. Dropping it stops watching and kills every process it
/// started; it **panics on drop** (unless already panicking) if it recorded
/// errors that nobody collected with [`NodeStandIn::take_errors`], so an
/// emulation failure cannot go unnoticed.
pub struct NodeStandIn {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    _root: tempfile::TempDir,
}

impl fmt::Debug for NodeStandIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeStandIn")
            .field("namespace", &self.shared.config.namespace)
            .field("root", &self.shared.root)
            .finish()
    }
}

impl NodeStandIn {
    /// Checks that read-only mounts can be enforced here, starts watching pods
    /// and returns once the initial list has been seen.
    pub async fn start(client: Client, config: StandInConfig) -> Result<NodeStandIn> {
        let root = crate::process::owned_tempdir("ckpt-standin-")?;
        sandbox::probe(root.path())
            .await
            .map_err(|message| Error::Sandbox { message })?;
        let shared = Arc::new(Shared {
            client,
            config,
            root: root.path().to_path_buf(),
            state: Mutex::new(State::default()),
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(watch_pods(shared.clone(), ready_tx));
        // A bound for a broken apiserver, not a pace: a loaded machine lists slowly.
        match tokio::time::timeout(INITIAL_LIST_TIMEOUT, ready_rx).await {
            Ok(Ok(())) => {}
            _ => {
                task.abort();
                return Err(Error::Sandbox {
                    message: format!(
                        "the pod watch did not deliver its initial list within {INITIAL_LIST_TIMEOUT:?}"
                    ),
                });
            }
        }
        Ok(NodeStandIn {
            shared,
            task,
            _root: root,
        })
    }

    /// Every run so far (running ones have `exit_code: None`).
    pub fn runs(&self) -> Vec<Run> {
        self.shared.lock().runs.clone()
    }

    /// The runs of Job `job`'s pods.
    pub fn runs_of_job(&self, job: &str) -> Vec<Run> {
        self.runs()
            .into_iter()
            .filter(|r| r.job.as_deref() == Some(job))
            .collect()
    }

    /// The errors recorded so far (they stay recorded).
    pub fn errors(&self) -> Vec<StandInError> {
        self.shared.lock().errors.clone()
    }

    /// Takes the recorded errors, acknowledging them (see the drop panic).
    pub fn take_errors(&self) -> Vec<StandInError> {
        std::mem::take(&mut self.shared.lock().errors)
    }

    /// The directory under which each pod gets its run dir.
    pub fn root(&self) -> &Path {
        &self.shared.root
    }
}

impl Drop for NodeStandIn {
    fn drop(&mut self) {
        self.task.abort();
        let errors = self.take_errors();
        if !errors.is_empty() && !std::thread::panicking() {
            let list: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
            panic!(
                "the node stand-in recorded errors nobody took (NodeStandIn::take_errors):\n{}",
                list.join("\n")
            );
        }
    }
}

async fn watch_pods(shared: Arc<Shared>, ready: oneshot::Sender<()>) {
    let api: Api<Pod> = match &shared.config.namespace {
        Some(ns) => Api::namespaced(shared.client.clone(), ns),
        None => Api::all(shared.client.clone()),
    };
    let mut ready = Some(ready);
    let mut handled: HashSet<String> = HashSet::new();
    let mut cancels: HashMap<String, watch::Sender<bool>> = HashMap::new();
    let mut tasks = JoinSet::new();
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        while tasks.try_join_next().is_some() {}
        let pod = match event {
            Ok(watcher::Event::InitDone) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
                continue;
            }
            Ok(watcher::Event::Init) => continue,
            Ok(watcher::Event::Delete(pod)) => {
                if let Some(c) = pod.metadata.uid.as_ref().and_then(|u| cancels.remove(u)) {
                    let _ = c.send(true);
                }
                continue;
            }
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => pod,
            Err(e) => {
                eprintln!("ckpt-testcluster node stand-in: watching pods: {e}");
                continue;
            }
        };
        let Some(uid) = pod.metadata.uid.clone() else {
            continue;
        };
        if pod.metadata.deletion_timestamp.is_some() {
            if let Some(c) = cancels.remove(&uid) {
                let _ = c.send(true);
            }
            continue;
        }
        let unscheduled = pod
            .spec
            .as_ref()
            .is_some_and(|s| s.node_name.as_deref().unwrap_or("").is_empty());
        let pending = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_none_or(|p| p == "Pending");
        if !unscheduled || !pending || !handled.insert(uid.clone()) {
            continue;
        }
        let (tx, rx) = watch::channel(false);
        cancels.insert(uid, tx);
        tasks.spawn(run_pod(shared.clone(), pod, rx));
    }
}

/// How the wait for the process ended.
enum End {
    Exited(std::process::ExitStatus),
    Deleted(std::process::ExitStatus),
    Deadline(std::process::ExitStatus),
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(128)
}

async fn stop_child(
    child: &mut tokio::process::Child,
    grace: Duration,
) -> std::process::ExitStatus {
    if let Some(pid) = child.id() {
        crate::process::signal(pid, libc::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(Ok(s)) => s,
        _ => {
            let _ = child.start_kill();
            child.wait().await.unwrap_or_else(|_| {
                use std::os::unix::process::ExitStatusExt;
                std::process::ExitStatus::from_raw(libc::SIGKILL)
            })
        }
    }
}

fn prepare_dirs(plan: &Plan, run_dir: &Path) -> std::io::Result<()> {
    for d in ["home", "root", "volumes"] {
        std::fs::create_dir_all(run_dir.join(d))?;
    }
    std::fs::write(&plan.termination_log, b"")?;
    for m in &plan.mounts {
        if !m.source.exists() {
            if m.volume_read_only && !m.empty_dir {
                // Never write into a read-only volume. A read-only mount of a
                // writable one gets its subPath created, as the kubelet does.
                return Err(std::io::Error::other(format!(
                    "volumeMount {}: {} does not exist and the volume is read-only",
                    m.mount_path,
                    m.source.display()
                )));
            }
            // The kubelet creates missing subPath directories too.
            std::fs::create_dir_all(&m.source)?;
        }
        if m.source.is_dir() {
            std::fs::create_dir_all(&m.target)?;
        } else {
            std::fs::write(&m.target, b"")?;
        }
    }
    Ok(())
}

async fn run_pod(shared: Arc<Shared>, pod: Pod, mut cancel: watch::Receiver<bool>) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let run_dir = shared
        .root
        .join(format!("{ns}.{name}.{}", &uid[..uid.len().min(8)]));
    let container = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
        .unwrap_or_default();
    let fail = |reason: &'static str, message: String| {
        let shared = shared.clone();
        let (ns, name, pod, container) = (ns.clone(), name.clone(), pod.clone(), container.clone());
        async move {
            shared.record_error(&pod, reason, &message);
            let at = status::now();
            let body = status::terminated(&Terminated {
                container: &container.0,
                image: &container.1,
                container_id: None,
                exit_code: 128,
                reason,
                message: &message,
                started: &at,
                finished: &at,
                pod_reason: Some((reason, &message)),
            });
            shared.patch_status(&ns, &name, &body).await;
        }
    };

    let plan = match plan::plan(&pod, &shared.config, &run_dir) {
        Ok(p) => p,
        Err(Refusal { reason, message }) => return fail(reason, message).await,
    };
    if let Err(e) = prepare_dirs(&plan, &run_dir) {
        return fail(
            REASON_START_ERROR,
            format!("preparing {}: {e}", run_dir.display()),
        )
        .await;
    }
    let mounts: Vec<BindMount> = plan
        .mounts
        .iter()
        .map(|m| BindMount {
            source: m.source.clone(),
            target: m.target.clone(),
            read_only: m.read_only,
        })
        .collect();
    let sandbox = match Sandbox::new(&mounts) {
        Ok(s) => s,
        Err(e) => return fail(REASON_START_ERROR, format!("preparing bind mounts: {e}")).await,
    };
    let log_path = run_dir.join("log");
    let log = match std::fs::File::create(&log_path).and_then(|f| Ok((f.try_clone()?, f))) {
        Ok(pair) => pair,
        Err(e) => return fail(REASON_START_ERROR, format!("{}: {e}", log_path.display())).await,
    };
    let mut cmd = tokio::process::Command::new(&plan.program);
    cmd.args(&plan.args)
        .env_clear()
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&plan.working_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.0))
        .stderr(Stdio::from(log.1))
        .kill_on_drop(true);
    // SAFETY: Sandbox::enter only makes async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || sandbox.enter());
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return fail(
                REASON_START_ERROR,
                format!(
                    "starting {} (bind mounts, then exec): {e}",
                    plan.program.display()
                ),
            )
            .await;
        }
    };
    let started = status::now();
    let pid = child.id().unwrap_or(0);
    let container_id = format!("standin://{pid}");
    let mut argv = vec![plan.program.display().to_string()];
    argv.extend(plan.args.iter().cloned());
    shared.lock().runs.push(Run {
        namespace: ns.clone(),
        pod: name.clone(),
        job: pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("batch.kubernetes.io/job-name").cloned()),
        pod_argv: plan.pod_argv.clone(),
        argv,
        mounts: plan
            .mounts
            .iter()
            .map(|m| (m.mount_path.clone(), m.source.clone(), m.read_only))
            .collect(),
        pid,
        exit_code: None,
        termination_message: None,
        output: String::new(),
        end: None,
    });
    shared
        .patch_status(
            &ns,
            &name,
            &status::running(&plan.container, &plan.image, pid, &started),
        )
        .await;

    let deadline = async {
        match plan.active_deadline {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let end = tokio::select! {
        s = child.wait() => match s {
            Ok(s) => End::Exited(s),
            Err(e) => return fail(REASON_START_ERROR, format!("waiting for the process: {e}")).await,
        },
        () = async {
            if cancel.wait_for(|deleted| *deleted).await.is_err() {
                std::future::pending::<()>().await;
            }
        } => End::Deleted(stop_child(&mut child, plan.grace).await),
        () = deadline => End::Deadline(stop_child(&mut child, plan.grace).await),
    };
    let finished = status::now();
    let (exit_status, end_name, pod_reason) = match end {
        End::Exited(s) => (s, "Exited", None),
        End::Deleted(s) => (s, "Deleted", None),
        End::Deadline(s) => (
            s,
            "DeadlineExceeded",
            Some((
                "DeadlineExceeded",
                "Pod was active on the node longer than the specified deadline",
            )),
        ),
    };
    let code = exit_code(exit_status);
    let output = std::fs::read(&log_path).unwrap_or_default();
    let file = std::fs::read(&plan.termination_log).ok();
    // The process saw local paths; the status shows the container's, as a real pod would.
    let message = plan.to_container_paths(&status::termination_message(
        file.as_deref(),
        &output,
        code,
        plan.fallback_to_logs,
    ));
    let message = status::tail_str(message.as_bytes(), status::MAX_TERMINATION_MESSAGE);
    shared.update_run(&ns, &name, |r| {
        r.exit_code = Some(code);
        r.termination_message = Some(message.clone());
        r.output = String::from_utf8_lossy(&output).into_owned();
        r.end = Some(end_name.to_string());
    });
    let body = status::terminated(&Terminated {
        container: &plan.container,
        image: &plan.image,
        container_id: Some(container_id),
        exit_code: code,
        reason: if code == 0 { "Completed" } else { "Error" },
        message: &message,
        started: &started,
        finished: &finished,
        pod_reason,
    });
    shared.patch_status(&ns, &name, &body).await;
}
