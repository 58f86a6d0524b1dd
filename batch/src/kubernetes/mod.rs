//! The Kubernetes executor: a `CheckpointConversion` created through the user's
//! kubeconfig, for the operator to run; its conditions followed; the converter's
//! summary read back from its status. Lepton and DGX Cloud are Kubernetes clusters,
//! so their profiles use this executor with their claim and resources.
//!
//! The command line stays synchronous: each call runs the client on a
//! current-thread runtime of its own.

pub mod manifest;

use std::path::Path;

use ckpt_api::{CheckpointConversion, phase, reason::Reason};
use ckpt_wire::Summary;
use ckpt_wire::summary::{SUCCEEDED, VERSION};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::Status;
use crate::error::{Error, Result};
use crate::mounts::{self, Mount};
use crate::profile;

/// A connection to the cluster a profile names.
pub struct Cluster {
    rt: tokio::runtime::Runtime,
    client: kube::Client,
    namespace: String,
}

/// What a submission did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// The resource was created.
    Created,
    /// The same conversion was already submitted under this name; nothing changed.
    Existing,
    /// The same conversion had failed; `spec.retry` was raised to run it again.
    Retried,
}

fn read_kubeconfig(k: &profile::Kubernetes) -> Result<Option<Kubeconfig>> {
    if let Some(p) = &k.kubeconfig {
        return Kubeconfig::read_from(p).map(Some).map_err(|e| {
            Error::Kubeconfig(format!("{} (the profile's kubeconfig): {e}", p.display()))
        });
    }
    if let Some(v) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        return Kubeconfig::read()
            .map(Some)
            .map_err(|e| Error::Kubeconfig(format!("KUBECONFIG={}: {e}", v.to_string_lossy())));
    }
    let home = std::env::var_os("HOME").map(|h| Path::new(&h).join(".kube/config"));
    match home {
        Some(p) if p.exists() => Kubeconfig::read_from(&p)
            .map(Some)
            .map_err(|e| Error::Kubeconfig(format!("{}: {e}", p.display()))),
        _ => Ok(None),
    }
}

/// The namespace a profile submits to, without contacting the cluster: the
/// profile's, else the kubeconfig context's, else `default`.
pub fn namespace(k: &profile::Kubernetes) -> String {
    if let Some(ns) = &k.namespace {
        return ns.clone();
    }
    read_kubeconfig(k)
        .ok()
        .flatten()
        .and_then(|kc| {
            let ctx = k.context.clone().or(kc.current_context.clone())?;
            kc.contexts
                .into_iter()
                .find(|c| c.name == ctx)
                .and_then(|c| c.context)
                .and_then(|c| c.namespace)
        })
        .unwrap_or_else(|| "default".to_owned())
}

impl Cluster {
    /// Connects with the profile's kubeconfig (else `KUBECONFIG`, else
    /// `~/.kube/config`, else the pod's service account inside a cluster).
    ///
    /// # Errors
    /// [`Error::Kubeconfig`] when there is none or it is unusable.
    pub fn connect(k: &profile::Kubernetes) -> Result<Cluster> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Submit(format!("starting the Kubernetes client: {e}")))?;
        let kubeconfig = read_kubeconfig(k)?;
        let config = rt.block_on(async {
            match kubeconfig {
                Some(kc) => {
                    let opts = KubeConfigOptions {
                        context: k.context.clone(),
                        ..KubeConfigOptions::default()
                    };
                    kube::Config::from_custom_kubeconfig(kc, &opts)
                        .await
                        .map_err(|e| Error::Kubeconfig(e.to_string()))
                }
                None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => {
                    kube::Config::incluster().map_err(|e| Error::Kubeconfig(e.to_string()))
                }
                None => Err(Error::Kubeconfig(
                    "none found: KUBECONFIG is not set, ~/.kube/config does not exist, and this is not a pod (set kubeconfig in the profile, or KUBECONFIG)".into(),
                )),
            }
        })?;
        let namespace = k
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = {
            let _guard = rt.enter();
            kube::Client::try_from(config).map_err(|e| Error::Kubeconfig(e.to_string()))?
        };
        Ok(Cluster {
            rt,
            client,
            namespace,
        })
    }

    /// The namespace submissions go to.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn api(&self, ns: &str) -> Api<CheckpointConversion> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// Creates `cr`; the same conversion submitted again is followed instead, and
    /// run again when it had failed.
    ///
    /// # Errors
    /// [`Error::Submit`] when the apiserver refuses (no CRD, no permission, a
    /// different resource of the same name) or cannot be reached.
    pub fn submit(&self, cr: &CheckpointConversion) -> Result<Submitted> {
        let ns = cr
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| self.namespace.clone());
        let name = cr.metadata.name.clone().unwrap_or_default();
        let api = self.api(&ns);
        self.rt.block_on(async {
            let refused = |what: &str, e: kube::Error| match e {
                kube::Error::Api(s) if s.code == 404 => Error::Submit(format!(
                    "{what} {ns}/{name}: the apiserver does not serve checkpointconversions.ckpt.dev (install the CRD: kubectl apply -f crds/, or the chart) or namespace {ns} does not exist: {}",
                    s.message
                )),
                kube::Error::Api(s) => Error::Submit(format!("{what} {ns}/{name}: {}", s.message)),
                e => Error::Submit(format!("{what} {ns}/{name}: {e}")),
            };
            match api.create(&PostParams::default(), cr).await {
                Ok(_) => Ok(Submitted::Created),
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    let old = api.get(&name).await.map_err(|e| refused("reading", e))?;
                    if !manifest::same_output(&old.spec, &cr.spec) {
                        return Err(Error::Submit(format!(
                            "{ns}/{name} exists with another spec (the name comes from the step, the target and what defines the output); delete it to submit again"
                        )));
                    }
                    let failed = old.status.as_ref().and_then(|s| s.phase.as_deref())
                        == Some(phase::FAILED)
                        && finished_run(&old);
                    if !failed {
                        return Ok(Submitted::Existing);
                    }
                    let retry = old.spec.retry.unwrap_or(0) + 1;
                    let patch = serde_json::json!({"spec": {"retry": retry, "job": cr.spec.job}});
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                        .await
                        .map_err(|e| refused("raising spec.retry of", e))?;
                    Ok(Submitted::Retried)
                }
                Err(e) => Err(refused("creating", e)),
            }
        })
    }

    /// Where `ns/name` stands.
    ///
    /// # Errors
    /// [`Error::Follow`] when it cannot be read.
    pub fn status(&self, ns: &str, name: &str, mounts: &[Mount]) -> Result<Status> {
        let cr = self.get(ns, name)?;
        Ok(status_of(&cr, mounts))
    }

    fn get(&self, ns: &str, name: &str) -> Result<CheckpointConversion> {
        self.rt
            .block_on(self.api(ns).get(name))
            .map_err(|e| match e {
                kube::Error::Api(s) if s.code == 404 => {
                    Error::Follow(format!("{ns}/{name}: no such CheckpointConversion"))
                }
                e => Error::Follow(format!("reading {ns}/{name}: {e}")),
            })
    }

    /// Follows `ns/name` until it finishes, calling `line` whenever its phase,
    /// reason or message changes.
    ///
    /// # Errors
    /// [`Error::Follow`] when it cannot be read.
    pub fn follow(
        &self,
        ns: &str,
        name: &str,
        mounts: &[Mount],
        line: &mut dyn FnMut(&str),
    ) -> Result<Summary> {
        crate::follow(|| Ok(status_of(&self.get(ns, name)?, mounts)), line)
    }
}

/// Whether the status describes the run the spec asks for now (not an earlier
/// generation or retry).
fn finished_run(cr: &CheckpointConversion) -> bool {
    let Some(st) = &cr.status else {
        return false;
    };
    st.observed_generation == cr.metadata.generation
        && st.retry.unwrap_or(0) == cr.spec.retry.unwrap_or(0)
}

fn condition<'a>(
    cr: &'a CheckpointConversion,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    cr.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
}

/// What the resource's status says: still active (one line), or finished with the
/// converter's summary (paths as this machine sees them when a mount shows them).
pub fn status_of(cr: &CheckpointConversion, mounts: &[Mount]) -> Status {
    let st = cr.status.clone().unwrap_or_default();
    let phase = st
        .phase
        .clone()
        .unwrap_or_else(|| phase::PENDING.to_owned());
    let line = match (&st.reason, &st.message) {
        (Some(r), Some(m)) => format!("{phase} ({r}: {m})"),
        (Some(r), None) => format!("{phase} ({r})"),
        _ if st.phase.is_none() => format!("{phase} (the operator has not looked at it yet)"),
        _ => phase.clone(),
    };
    let step = st.step.clone().unwrap_or_default();
    if phase == phase::REJECTED {
        let message = condition(cr, "Accepted")
            .map(|c| format!("{}: {}", c.reason, c.message))
            .unwrap_or(line);
        return Status::Finished(Box::new(Summary::failed(
            &step,
            2,
            &format!("rejected: {message}"),
        )));
    }
    if !finished_run(cr) || !(phase == phase::SUCCEEDED || phase == phase::FAILED) {
        return Status::Active(line);
    }
    if phase == phase::FAILED {
        let (code, message) = match condition(cr, "Failed") {
            Some(c) => (
                if c.reason == Reason::InvalidInput.as_str() {
                    2
                } else {
                    1
                },
                format!("{}: {}", c.reason, c.message),
            ),
            None => (1, line),
        };
        return Status::Finished(Box::new(Summary::failed(&step, code, &message)));
    }
    let host = |claim_path: &str| -> String {
        mounts::host_path(mounts, &cr.spec.target.pvc, claim_path)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| format!("{claim_path} (claim {})", cr.spec.target.pvc))
    };
    let sum = st.summary.clone().unwrap_or_default();
    let report = sum
        .report_path
        .as_deref()
        .filter(|p| !p.ends_with("ckpt-manifest.json"))
        .map(host);
    Status::Finished(Box::new(Summary {
        v: VERSION,
        step,
        status: SUCCEEDED.into(),
        output: sum.output_path.as_deref().map(host),
        kind: Some(cr.spec.target.kind),
        tensors: sum.tensors.and_then(|n| u64::try_from(n).ok()),
        bytes: sum.bytes.and_then(|n| u64::try_from(n).ok()),
        files: sum.files.and_then(|n| u64::try_from(n).ok()),
        seconds: sum.seconds,
        weights_digest: sum.output_digest.clone(),
        manifest: None,
        checks_passed: sum.checks_passed.and_then(|n| u64::try_from(n).ok()),
        checks_failed: sum.checks_failed.and_then(|n| u64::try_from(n).ok()),
        smoke_test_max_abs_diff: sum.smoke_test_max_abs_diff,
        report,
        warnings: sum.warnings.clone(),
        reused: sum.reused == Some(true),
        exit_code: None,
        error: None,
    }))
}
