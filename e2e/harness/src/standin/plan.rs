//! From a Pod to what the stand-in will run: a pure translation that either
//! produces a [`Plan`] or refuses with a reason, and never guesses.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};

use super::StandInConfig;

/// Pod failure reason when the stand-in cannot emulate something the pod asks for.
pub const REASON_CANNOT_EMULATE: &str = "StandInCannotEmulate";
/// Pod failure reason when a PersistentVolumeClaim has no local directory.
pub const REASON_PVC_NOT_FOUND: &str = "PVCNotFound";
/// Container termination reason when the process could not be started.
pub const REASON_START_ERROR: &str = "StartError";

/// The kubelet's default `terminationMessagePath`.
pub(crate) const DEFAULT_TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";

/// Why a pod is not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) reason: &'static str,
    pub(crate) message: String,
}

fn cannot(message: String) -> Refusal {
    Refusal {
        reason: REASON_CANNOT_EMULATE,
        message,
    }
}

/// One volumeMount, resolved to a local source and a bind-mount target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountPlan {
    /// `mountPath` in the container, without a trailing slash.
    pub(crate) mount_path: String,
    /// The local file or directory that backs it (subPath applied).
    pub(crate) source: PathBuf,
    /// Where the process sees it: `<run dir>/../mounts/<mountPath>`, one path for
    /// every pod that mounts something at `mountPath` (each pod binds its own
    /// volume there in its private mount namespace), as a kubelet gives every
    /// container its mounts at their paths: the parts of a split conversion and
    /// its final step see their sources under one path, and so record one.
    pub(crate) target: PathBuf,
    pub(crate) read_only: bool,
    /// The volume itself is read-only (a read-only claim), not only this mount:
    /// then a missing subPath cannot be created.
    pub(crate) volume_read_only: bool,
    /// `emptyDir` volumes are created fresh under the run dir.
    pub(crate) empty_dir: bool,
}

/// Everything needed to start the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) container: String,
    pub(crate) image: String,
    /// `command` + `args` from the pod after `$(VAR)` expansion.
    pub(crate) pod_argv: Vec<String>,
    /// The local program (mapped from `command[0]`).
    pub(crate) program: PathBuf,
    /// Arguments after the program, paths rewritten to the bind-mount targets.
    pub(crate) args: Vec<String>,
    /// The whole environment of the process.
    pub(crate) env: Vec<(String, String)>,
    pub(crate) working_dir: PathBuf,
    pub(crate) mounts: Vec<MountPlan>,
    /// The container's `terminationMessagePath`.
    pub(crate) termination_path: String,
    /// The local file standing in for it.
    pub(crate) termination_log: PathBuf,
    pub(crate) fallback_to_logs: bool,
    pub(crate) active_deadline: Option<Duration>,
    pub(crate) grace: Duration,
}

impl Plan {
    /// Maps local paths in `text` back to the container's (bind-mount targets
    /// to `mountPath`s, the termination-log stand-in to `terminationMessagePath`),
    /// so a termination message reads as it would from a real pod.
    pub(crate) fn to_container_paths(&self, text: &str) -> String {
        let mut pairs: Vec<(String, &str)> = self
            .mounts
            .iter()
            .map(|m| (m.target.display().to_string(), m.mount_path.as_str()))
            .collect();
        pairs.push((
            self.termination_log.display().to_string(),
            &self.termination_path,
        ));
        // Longest first: mounts/data must not eat the prefix of mounts/data-2.
        pairs.sort_by_key(|(local, _)| std::cmp::Reverse(local.len()));
        let mut out = text.to_string();
        for (local, container) in pairs {
            out = out.replace(&local, container);
        }
        out
    }
}

/// The repository part of an image reference: no `@digest`, no `:tag`.
pub(crate) fn repository(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match (image.rfind(':'), image.rfind('/')) {
        (Some(colon), slash) if slash.is_none_or(|s| colon > s) => &image[..colon],
        _ => image,
    }
}

/// Kubernetes' `$(VAR)` expansion: `$$` is a literal `$`, `$(NAME)` is
/// replaced when NAME is defined and left as written otherwise.
pub(crate) fn expand(input: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(close) = inner.find(')')
        {
            let name = &inner[..close];
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn under(path: &str, prefix: &str) -> Option<String> {
    if path == prefix {
        Some(String::new())
    } else {
        path.strip_prefix(prefix)
            .filter(|rest| rest.starts_with('/'))
            .map(str::to_string)
    }
}

/// Maps container paths to local ones.
struct PathMap<'a> {
    mounts: &'a [MountPlan],
    termination_path: &'a str,
    termination_log: &'a Path,
    passthrough: &'a [String],
}

impl PathMap<'_> {
    /// Rewrites one absolute container path; `Err` if it lies outside every
    /// mount (the image's filesystem is not emulated).
    fn path(&self, p: &str) -> Result<String, ()> {
        if p == self.termination_path {
            return Ok(self.termination_log.display().to_string());
        }
        let best = self
            .mounts
            .iter()
            .filter_map(|m| under(p, &m.mount_path).map(|rest| (m, rest)))
            .max_by_key(|(m, _)| m.mount_path.len());
        if let Some((m, rest)) = best {
            return Ok(format!("{}{rest}", m.target.display()));
        }
        if self.passthrough.iter().any(|a| under(p, a).is_some()) {
            return Ok(p.to_string());
        }
        Err(())
    }

    /// Rewrites `VALUE`, `KEY=VALUE` or `--flag=VALUE` when VALUE is an
    /// absolute path.
    fn value(&self, v: &str, what: &str) -> Result<String, Refusal> {
        let refuse = |p: &str| {
            cannot(format!(
                "{what} {v:?} names {p}, which is outside every volume mount (the image's filesystem is not emulated; mounts: {})",
                self.mounts
                    .iter()
                    .map(|m| m.mount_path.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        };
        if v.starts_with('/') {
            return self.path(v).map_err(|()| refuse(v));
        }
        if let Some((key, val)) = v.split_once('=')
            && val.starts_with('/')
        {
            return self
                .path(val)
                .map(|p| format!("{key}={p}"))
                .map_err(|()| refuse(val));
        }
        Ok(v.to_string())
    }
}

fn check_relative(sub: &str) -> bool {
    let p = Path::new(sub);
    !p.is_absolute() && p.components().all(|c| matches!(c, Component::Normal(_)))
}

fn volume_kinds(v: &k8s_openapi::api::core::v1::Volume) -> Vec<String> {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::Object(map)) => {
            map.keys().filter(|k| *k != "name").cloned().collect()
        }
        _ => vec!["<unreadable>".to_string()],
    }
}

fn container_of(pod: &Pod) -> Result<&Container, Refusal> {
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| cannot("the pod has no spec".to_string()))?;
    if let Some(inits) = spec.init_containers.as_ref().filter(|i| !i.is_empty()) {
        return Err(cannot(format!(
            "init containers are not supported (found {})",
            inits
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    match spec.containers.as_slice() {
        [one] => Ok(one),
        many => Err(cannot(format!(
            "expected exactly one container, found {} ({})",
            many.len(),
            many.iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Translates `pod` into a plan under `run_dir`, or says why it cannot.
/// The value of a pod field an env `fieldRef` names, as the kubelet resolves it
/// (a missing label or annotation is the empty string); `None` for a field the
/// stand-in does not know.
fn pod_field(pod: &Pod, path: &str) -> Option<String> {
    let meta = &pod.metadata;
    let keyed = |prefix: &str| {
        path.strip_prefix(prefix)?
            .strip_suffix("']")
            .map(str::to_owned)
    };
    match path {
        "metadata.name" => Some(meta.name.clone().unwrap_or_default()),
        "metadata.namespace" => Some(meta.namespace.clone().unwrap_or_default()),
        _ => {
            if let Some(k) = keyed("metadata.labels['") {
                Some(
                    meta.labels
                        .as_ref()
                        .and_then(|l| l.get(&k))
                        .cloned()
                        .unwrap_or_default(),
                )
            } else {
                let k = keyed("metadata.annotations['")?;
                Some(
                    meta.annotations
                        .as_ref()
                        .and_then(|a| a.get(&k))
                        .cloned()
                        .unwrap_or_default(),
                )
            }
        }
    }
}

pub(crate) fn plan(pod: &Pod, config: &StandInConfig, run_dir: &Path) -> Result<Plan, Refusal> {
    let container = container_of(pod)?;
    let spec = pod.spec.as_ref().expect("container_of checked the spec");
    let restart = spec.restart_policy.as_deref().unwrap_or("Always");
    if restart != "Never" {
        return Err(cannot(format!(
            "restartPolicy {restart} is not supported (only Never: the stand-in does not restart containers)"
        )));
    }

    // Image.
    let image = container.image.clone().unwrap_or_default();
    let matches = if config.any_tag {
        repository(&image) == repository(&config.image)
    } else {
        image == config.image
    };
    if !matches {
        return Err(cannot(format!(
            "container {:?} uses image {image:?}, but the stand-in can only emulate {:?}{}",
            container.name,
            config.image,
            if config.any_tag { " (any tag)" } else { "" }
        )));
    }
    if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err(cannot(format!(
            "container {:?}: envFrom is not supported",
            container.name
        )));
    }
    if container
        .volume_devices
        .as_ref()
        .is_some_and(|d| !d.is_empty())
    {
        return Err(cannot(format!(
            "container {:?}: volumeDevices are not supported",
            container.name
        )));
    }

    // Volumes.
    enum Source {
        Dir(PathBuf, bool),
        Empty,
    }
    let mut volumes: HashMap<&str, Source> = HashMap::new();
    for v in spec.volumes.iter().flatten() {
        if let Some(pvc) = &v.persistent_volume_claim {
            let Some(dir) = config.pvcs.get(&pvc.claim_name) else {
                return Err(Refusal {
                    reason: REASON_PVC_NOT_FOUND,
                    message: format!(
                        "volume {:?}: persistentvolumeclaim {:?} not found (the stand-in knows: {})",
                        v.name,
                        pvc.claim_name,
                        {
                            let mut known: Vec<&str> =
                                config.pvcs.keys().map(String::as_str).collect();
                            known.sort_unstable();
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        }
                    ),
                });
            };
            if !dir.is_dir() {
                return Err(cannot(format!(
                    "volume {:?}: claim {:?} maps to {}, which is not a directory",
                    v.name,
                    pvc.claim_name,
                    dir.display()
                )));
            }
            volumes.insert(
                &v.name,
                Source::Dir(
                    dir.clone(),
                    pvc.read_only.unwrap_or(false)
                        || config.read_only_pvcs.contains(&pvc.claim_name),
                ),
            );
        } else if v.empty_dir.is_some() {
            volumes.insert(&v.name, Source::Empty);
        } else {
            return Err(cannot(format!(
                "volume {:?} is of type {}; only persistentVolumeClaim and emptyDir are supported",
                v.name,
                volume_kinds(v).join(", ")
            )));
        }
    }

    // Mounts.
    let mounts_root = run_dir.parent().unwrap_or(run_dir).join("mounts");
    let mut mounts = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        if m.sub_path_expr.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(cannot(format!(
                "volumeMount {:?}: subPathExpr is not supported",
                m.mount_path
            )));
        }
        let mount_path = m.mount_path.trim_end_matches('/').to_string();
        if mount_path.is_empty() || !mount_path.starts_with('/') {
            return Err(cannot(format!(
                "volumeMount {:?}: mountPath must be an absolute path other than /",
                m.mount_path
            )));
        }
        let (base, ro_source, empty_dir) = match volumes.get(m.name.as_str()) {
            Some(Source::Dir(d, ro)) => (d.clone(), *ro, false),
            Some(Source::Empty) => (run_dir.join("volumes").join(&m.name), false, true),
            None => {
                return Err(cannot(format!(
                    "volumeMount {:?} names volume {:?}, which the pod does not define",
                    m.mount_path, m.name
                )));
            }
        };
        let source = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) if check_relative(sub) => base.join(sub),
            Some(sub) => {
                return Err(cannot(format!(
                    "volumeMount {:?}: subPath {sub:?} must be a relative path without '..'",
                    m.mount_path
                )));
            }
            None => base,
        };
        let target = mounts_root.join(mount_path.trim_start_matches('/'));
        mounts.push(MountPlan {
            mount_path,
            source,
            target,
            read_only: m.read_only.unwrap_or(false) || ro_source,
            volume_read_only: ro_source,
            empty_dir,
        });
    }

    let termination_path = container
        .termination_message_path
        .clone()
        .unwrap_or_else(|| DEFAULT_TERMINATION_MESSAGE_PATH.to_string());
    let termination_log = run_dir.join("termination-log");
    let map = PathMap {
        mounts: &mounts,
        termination_path: &termination_path,
        termination_log: &termination_log,
        passthrough: &config.passthrough_paths,
    };

    // Environment: literal values, each expanded against those before it, and
    // the pod's own fields (the Job controller gives each pod of an Indexed Job
    // its index that way).
    let mut vars: HashMap<String, String> = HashMap::new();
    let mut env: Vec<(String, String)> = Vec::new();
    for e in container.env.iter().flatten() {
        let literal = match &e.value_from {
            None => expand(e.value.as_deref().unwrap_or(""), &vars),
            Some(from) => match from.field_ref.as_ref().filter(|_| {
                from.config_map_key_ref.is_none()
                    && from.secret_key_ref.is_none()
                    && from.resource_field_ref.is_none()
            }) {
                Some(f) => pod_field(pod, &f.field_path).ok_or_else(|| {
                    cannot(format!(
                        "env {:?}: fieldRef {:?} is not supported (metadata.name, metadata.namespace, metadata.labels['K'] and metadata.annotations['K'] are)",
                        e.name, f.field_path
                    ))
                })?,
                None => {
                    return Err(cannot(format!(
                        "env {:?}: valueFrom other than a fieldRef is not supported",
                        e.name
                    )));
                }
            },
        };
        // Expansion sees container paths; only the process's copy is rewritten.
        let expanded = literal;
        let value = map.value(&expanded, &format!("env {}", e.name))?;
        vars.insert(e.name.clone(), expanded);
        env.retain(|(k, _)| k != &e.name);
        env.push((e.name.clone(), value));
    }
    let mut full_env: Vec<(String, String)> = vec![
        (
            "PATH".to_string(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        ),
        (
            "HOSTNAME".to_string(),
            pod.metadata.name.clone().unwrap_or_default(),
        ),
        (
            "HOME".to_string(),
            run_dir.join("home").display().to_string(),
        ),
        (
            "CKPT_TERMINATION_LOG".to_string(),
            termination_log.display().to_string(),
        ),
    ];
    full_env.extend(config.extra_env.iter().cloned());
    for (k, v) in env {
        full_env.retain(|(fk, _)| fk != &k);
        full_env.push((k, v));
    }

    // Command and arguments.
    let mut pod_argv: Vec<String> = match container.command.as_ref().filter(|c| !c.is_empty()) {
        Some(c) => c.clone(),
        None if !config.entrypoint.is_empty() => config.entrypoint.clone(),
        None => {
            return Err(cannot(format!(
                "container {:?} sets no command and the image's entrypoint is unknown (StandInConfig::entrypoint)",
                container.name
            )));
        }
    };
    pod_argv.extend(container.args.iter().flatten().cloned());
    let pod_argv: Vec<String> = pod_argv.iter().map(|a| expand(a, &vars)).collect();
    let cmd0 = &pod_argv[0];
    let program = config
        .binaries
        .get(cmd0)
        .or_else(|| {
            let file = Path::new(cmd0).file_name()?.to_str()?;
            config.binaries.get(file)
        })
        .cloned()
        .ok_or_else(|| {
            let mut known: Vec<&str> = config.binaries.keys().map(String::as_str).collect();
            known.sort_unstable();
            cannot(format!(
                "container {:?}: command {cmd0:?} maps to no local binary (known: {})",
                container.name,
                known.join(", ")
            ))
        })?;
    let args = pod_argv[1..]
        .iter()
        .map(|a| map.value(a, "argument"))
        .collect::<Result<Vec<_>, _>>()?;

    let working_dir = match container.working_dir.as_deref().filter(|w| !w.is_empty()) {
        Some(w) => PathBuf::from(map.path(w).map_err(|()| {
            cannot(format!(
                "workingDir {w:?} is outside every volume mount (the image's filesystem is not emulated)"
            ))
        })?),
        None => run_dir.join("root"),
    };

    Ok(Plan {
        container: container.name.clone(),
        image,
        pod_argv,
        program,
        args,
        env: full_env,
        working_dir,
        mounts,
        termination_path,
        termination_log,
        fallback_to_logs: container.termination_message_policy.as_deref()
            == Some("FallbackToLogsOnError"),
        active_deadline: spec
            .active_deadline_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs),
        grace: Duration::from_secs(
            spec.termination_grace_period_seconds
                .and_then(|s| u64::try_from(s).ok())
                .unwrap_or(30)
                .min(30),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: serde_json::Value) -> Pod {
        serde_json::from_value(yaml).expect("test pod parses")
    }

    fn config() -> StandInConfig {
        StandInConfig::new("ghcr.io/ckpt/ckpt-convert:dev")
            .binary("ckpt-convert", "/opt/bin/ckpt-convert")
            .pvc("models", std::env::temp_dir())
    }

    fn job_pod(container: serde_json::Value, volumes: serde_json::Value) -> Pod {
        pod(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"restartPolicy": "Never", "containers": [container], "volumes": volumes}
        }))
    }

    #[test]
    fn repository_strips_tag_and_digest() {
        assert_eq!(
            repository("ghcr.io/ckpt/ckpt-convert:dev"),
            "ghcr.io/ckpt/ckpt-convert"
        );
        assert_eq!(repository("localhost:5000/x"), "localhost:5000/x");
        assert_eq!(
            repository("localhost:5000/x:1@sha256:ab"),
            "localhost:5000/x"
        );
        assert_eq!(repository("busybox"), "busybox");
    }

    #[test]
    fn expansion_follows_kubernetes() {
        let vars = HashMap::from([("A".to_string(), "1".to_string())]);
        assert_eq!(expand("x$(A)y", &vars), "x1y");
        assert_eq!(expand("$(B)", &vars), "$(B)");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("a$b$", &vars), "a$b$");
    }

    /// The Job controller gives each pod of an Indexed Job its index as an env
    /// `fieldRef` to its label; arguments name it as `$(JOB_COMPLETION_INDEX)`.
    #[test]
    fn the_pods_own_fields_reach_env_and_arguments() {
        let mut p = job_pod(
            serde_json::json!({
                "name": "main", "image": "ghcr.io/ckpt/ckpt-convert:dev",
                "command": ["/usr/local/bin/ckpt-convert"],
                "args": ["run", "part=$(JOB_COMPLETION_INDEX)", "pod=$(NAME)"],
                "env": [
                    {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-completion-index']"}}},
                    {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "NONE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['absent']"}}},
                ],
            }),
            serde_json::json!([]),
        );
        p.metadata.labels = Some(
            [(
                "batch.kubernetes.io/job-completion-index".to_owned(),
                "2".to_owned(),
            )]
            .into(),
        );
        let plan = plan(&p, &config(), Path::new("/run/x")).unwrap();
        assert_eq!(plan.args, ["run", "part=2", "pod=p"]);
        assert!(
            plan.env
                .contains(&("JOB_COMPLETION_INDEX".into(), "2".into()))
        );
        assert!(plan.env.contains(&("NONE".into(), String::new())));
        // A field the stand-in does not know, or a Secret, is refused by name.
        for from in [
            serde_json::json!({"fieldRef": {"fieldPath": "status.podIP"}}),
            serde_json::json!({"secretKeyRef": {"name": "s", "key": "k"}}),
        ] {
            let mut q = p.clone();
            q.spec.as_mut().unwrap().containers[0].env = Some(vec![
                serde_json::from_value(serde_json::json!({"name": "X", "valueFrom": from}))
                    .unwrap(),
            ]);
            let err = super::plan(&q, &config(), Path::new("/run/x")).unwrap_err();
            assert_eq!(err.reason, REASON_CANNOT_EMULATE);
            assert!(err.message.contains("env \"X\""), "{}", err.message);
        }
    }

    #[test]
    fn paths_under_mounts_are_rewritten_and_others_refused() {
        let run = Path::new("/run/x");
        let p = job_pod(
            serde_json::json!({
                "name": "main", "image": "ghcr.io/ckpt/ckpt-convert:dev",
                "command": ["/usr/local/bin/ckpt-convert"],
                "args": ["run", "hf_model_id=/data/src", "--out=/data/src/../o", "/scratch", "/data-other"],
                "env": [{"name": "A", "value": "/data"}, {"name": "B", "value": "$(A)/x"}],
                "volumeMounts": [
                    {"name": "m", "mountPath": "/data/", "readOnly": true},
                    {"name": "s", "mountPath": "/scratch"},
                ]
            }),
            serde_json::json!([
                {"name": "m", "persistentVolumeClaim": {"claimName": "models"}},
                {"name": "s", "emptyDir": {}},
            ]),
        );
        let err = plan(&p, &config(), run).unwrap_err();
        assert_eq!(err.reason, REASON_CANNOT_EMULATE);
        assert!(err.message.contains("/data-other"), "{}", err.message);

        let mut p = p;
        p.spec.as_mut().unwrap().containers[0]
            .args
            .as_mut()
            .unwrap()
            .pop();
        let plan = plan(&p, &config(), run).unwrap();
        assert_eq!(plan.program, PathBuf::from("/opt/bin/ckpt-convert"));
        assert_eq!(
            plan.args,
            [
                "run",
                "hf_model_id=/run/mounts/data/src",
                "--out=/run/mounts/data/src/../o",
                "/run/mounts/scratch"
            ]
        );
        assert!(plan.mounts[0].read_only && !plan.mounts[1].read_only);
        assert!(plan.mounts[1].empty_dir);
        assert!(
            plan.env
                .contains(&("B".to_string(), "/run/mounts/data/x".to_string()))
        );
        assert!(plan.env.contains(&(
            "CKPT_TERMINATION_LOG".to_string(),
            "/run/x/termination-log".to_string()
        )));
        assert_eq!(
            plan.to_container_paths("/run/mounts/data/src: no; /run/mounts/scratch ok"),
            "/data/src: no; /scratch ok"
        );
    }

    #[test]
    fn unsupported_things_are_refused_by_name() {
        let base = serde_json::json!({"name": "main", "image": "ghcr.io/ckpt/ckpt-convert:dev", "command": ["ckpt-convert"]});
        let refuse = |container: serde_json::Value, volumes: serde_json::Value| {
            plan(&job_pod(container, volumes), &config(), Path::new("/r")).unwrap_err()
        };
        let mut c = base.clone();
        c["image"] = "busybox:1".into();
        assert!(
            refuse(c, serde_json::json!([]))
                .message
                .contains("\"busybox:1\"")
        );
        let e = refuse(
            base.clone(),
            serde_json::json!([{"name": "c", "configMap": {"name": "x"}}]),
        );
        assert!(e.message.contains("configMap"), "{}", e.message);
        let mut c = base.clone();
        c["env"] = serde_json::json!([{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}]);
        assert!(
            refuse(c, serde_json::json!([]))
                .message
                .contains("valueFrom")
        );
        let e = refuse(
            base.clone(),
            serde_json::json!([{"name": "v", "persistentVolumeClaim": {"claimName": "nope"}}]),
        );
        assert_eq!(e.reason, REASON_PVC_NOT_FOUND);
        let mut c = base;
        c["command"] = serde_json::json!(["python"]);
        assert!(
            refuse(c, serde_json::json!([]))
                .message
                .contains("\"python\"")
        );
    }
}
