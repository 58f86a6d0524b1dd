//! The reconcile shell: gathers observations from the API, asks [`crate::decide`]
//! what to do, and does it (create the Job, apply the status, publish events).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event as CoreEvent, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};

use crate::api::CheckpointConversion;
use crate::claim;
use crate::decide::{self, Observed};
use crate::job::{self, JobDefaults};
use crate::metrics::Metrics;
use crate::pace::Pacer;
use crate::reason::Reason;
use crate::step::Share;
use crate::view::{Runs, failed_pod, job_view, parts_status, pod_view, runs};

/// The field manager of everything the operator applies.
pub const MANAGER: &str = "ckpt-operator";

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done.
        action: String,
        /// The error.
        #[source]
        source: kube::Error,
    },
    /// The resource has no namespace (the CRD is namespaced, so this is a bug).
    #[error("resource {0} has no namespace")]
    NoNamespace(String),
}

impl Error {
    /// The label for the error metric.
    pub fn metric_label(&self) -> String {
        match self {
            Error::Kube {
                source: kube::Error::Api(s),
                ..
            } => format!("api_{}", s.code),
            Error::Kube { .. } => "kube".into(),
            Error::NoNamespace(_) => "no_namespace".into(),
        }
    }

    /// Transient API trouble is retried soon; anything else waits longer.
    pub fn retry_after(&self) -> Duration {
        match self {
            Error::Kube {
                source: kube::Error::Api(s),
                ..
            } if s.code == 409 || s.code >= 500 || s.code == 429 => Duration::from_secs(5),
            Error::Kube { .. } => Duration::from_secs(15),
            Error::NoNamespace(_) => Duration::from_secs(300),
        }
    }
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}

/// What reconciles share.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Job defaults.
    pub defaults: JobDefaults,
    /// Event recorder.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Job creation slots (`--jobs-per-second`).
    pub pacer: Pacer,
    /// Reconciles allowed to run at once, across every watched namespace
    /// (`--reconcile-concurrency`).
    pub running: tokio::sync::Semaphore,
}

async fn pods_of(ctx: &Context, ns: &str, job_name: &str) -> Result<Vec<Pod>, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let mut list = pods
        .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job_name}")))
        .await
        .map_err(kube_err(format!("listing the pods of Job {ns}/{job_name}")))?
        .items;
    list.sort_by_key(|p| p.metadata.creation_timestamp.clone());
    Ok(list)
}

async fn observe(cr: &CheckpointConversion, ctx: &Context, ns: &str) -> Result<Observed, Error> {
    let mut obs = Observed::default();
    let name = cr.name_any();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    let list = jobs
        .list(&ListParams::default().labels(&format!("{}={name}", job::CONVERSION_LABEL)))
        .await
        .map_err(kube_err(format!("listing the Jobs of {ns}/{name}")))?;
    let Runs {
        current,
        parts,
        previous,
    } = runs(cr, list.items);
    obs.previous_job = previous;
    if let Ok(inv) = crate::step::invocation(&cr.spec) {
        // The target is taken before any Job of a new run is created (see claim).
        if let Some(c) = claim::claim(&ctx.client, ns, cr)
            .await
            .map_err(kube_err(format!("claiming the target of {ns}/{name}")))?
        {
            obs.conflict = Some(c.owner);
            obs.conflict_running_pod = c.running_pod;
        }
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
        let mut claims: Vec<&str> = inv.mounts.iter().map(|m| m.claim.as_str()).collect();
        claims.sort_unstable();
        claims.dedup();
        for claim in claims {
            if pvcs
                .get_opt(claim)
                .await
                .map_err(kube_err(format!(
                    "reading PersistentVolumeClaim {ns}/{claim}"
                )))?
                .is_none()
            {
                obs.missing_pvcs.push(claim.to_owned());
            }
        }
    }
    let mut parts_pods = None;
    if let Some(p) = &parts {
        let pods = pods_of(ctx, ns, &p.name_any()).await?;
        let (mut status, done) = parts_status(p, &pods);
        if let Some(c) = current.as_ref().filter(|c| c.name_any() != p.name_any()) {
            status.finalize_job = Some(c.name_any());
        }
        obs.parts = Some(status);
        obs.parts_done = done;
        parts_pods = Some((p.name_any(), pods));
    }
    if let Some(j) = current {
        let job_name = j.name_any();
        // The most recent pod tells the current story; the last failed one, why the
        // previous attempt ended.
        let list = match parts_pods {
            Some((name, pods)) if name == job_name => pods,
            _ => pods_of(ctx, ns, &job_name).await?,
        };
        obs.pod = list.last().map(pod_view);
        obs.failed_pod = list.iter().rev().find(|p| failed_pod(p)).map(pod_view);
        if list.is_empty() && !job_view(&j).finished() {
            obs.pod_creation_failure = pod_creation_failure(ctx, ns, &j).await?;
        }
        obs.job = Some(job_view(&j));
    }
    Ok(obs)
}

/// The message of the Job's latest `FailedCreate` event: why it has no pod (a
/// missing ServiceAccount, a quota, an admission webhook). Only the Job controller's
/// events say so; the Job's status does not.
async fn pod_creation_failure(ctx: &Context, ns: &str, j: &Job) -> Result<Option<String>, Error> {
    let Some(uid) = j.metadata.uid.as_deref() else {
        return Ok(None);
    };
    let events: Api<CoreEvent> = Api::namespaced(ctx.client.clone(), ns);
    let list = events
        .list(&ListParams::default().fields(&format!(
            "involvedObject.kind=Job,involvedObject.uid={uid},reason=FailedCreate"
        )))
        .await
        .map_err(kube_err(format!(
            "listing the events of Job {ns}/{}",
            j.name_any()
        )))?;
    let when = |e: &CoreEvent| {
        e.last_timestamp
            .clone()
            .map(|t| t.0)
            .or(e.event_time.clone().map(|t| t.0))
            .or(e.metadata.creation_timestamp.clone().map(|t| t.0))
    };
    Ok(list
        .items
        .iter()
        .max_by_key(|e| when(e))
        .and_then(|e| e.message.clone()))
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Reconciles one resource.
///
/// # Errors
/// [`Error`] when an API call fails; the controller retries per [`error_policy`].
pub async fn reconcile(cr: Arc<CheckpointConversion>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _permit = ctx
        .running
        .acquire()
        .await
        .expect("the reconcile semaphore is never closed");
    let _running = ctx.metrics.running();
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let ns = cr
        .namespace()
        .ok_or_else(|| Error::NoNamespace(cr.name_any()))?;
    let key = format!("{ns}/{}", cr.name_any());
    let api: Api<CheckpointConversion> = Api::namespaced(ctx.client.clone(), &ns);
    // The watch cache can lag behind our own last status write; deciding on it would
    // repeat that write's events. The apiserver's copy is the truth.
    let Some(cr) = api
        .get_opt(&cr.name_any())
        .await
        .map_err(kube_err(format!("reading {ns}/{}", cr.name_any())))?
        .filter(|fresh| fresh.metadata.uid == cr.metadata.uid)
    else {
        ctx.pacer.forget(&key);
        return Ok(Action::await_change());
    };
    if cr.metadata.deletion_timestamp.is_some() {
        // The Job and its pods go with the resource (owner references); the output
        // on the PVC stays. A split run's staging is removed first.
        ctx.pacer.forget(&key);
        if has_staging_finalizer(&cr) {
            return clean_up_split(&cr, &ctx, &api, &ns).await;
        }
        return Ok(Action::await_change());
    }
    let obs = observe(&cr, &ctx, &ns).await?;
    let now = now();
    let mut decision = decide::decide(&cr, &obs, &now);
    if decision.create_job.is_none() {
        ctx.pacer.forget(&key);
    } else if let Some(wait) = ctx.pacer.slot(&key) {
        decision = decide::queued(&cr, decision, wait, &now);
    }
    ctx.metrics.jobs_waiting.set(ctx.pacer.waiting() as i64);
    let mut created = false;
    if let Some(inv) = &decision.create_job {
        // The parts' staging outlives them; the finalizer keeps the resource until
        // it is removed (or published), so it is there before any part runs.
        if matches!(inv.share, Share::Parts { .. }) {
            set_staging_finalizer(&api, &cr, true).await?;
        }
        let job = job::build(&cr, inv, &ctx.defaults);
        let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
        let params = PostParams {
            field_manager: Some(MANAGER.into()),
            ..PostParams::default()
        };
        match jobs.create(&params, &job).await {
            Ok(_) => {
                created = true;
                ctx.metrics.jobs_created.inc();
                // The parts are counted once, when the Job that finishes them is made.
                if matches!(inv.share, Share::Finalize { .. }) {
                    for part in &obs.parts_done {
                        ctx.metrics.part_bytes.observe(part.bytes as f64);
                        ctx.metrics.part_seconds.observe(part.seconds);
                    }
                }
            }
            // Created by an earlier reconcile whose status write was lost: fine.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(kube_err(format!("creating Job {ns}/{}", job.name_any()))(e)),
        }
    }
    // The resource as the apiserver has it now (a status write moves its
    // resourceVersion, which the finalizer's patch is conditional on).
    let mut latest = cr.clone();
    if cr.status.as_ref() != Some(&decision.status) {
        let patch = serde_json::json!({
            "apiVersion": CheckpointConversion::api_version(&()),
            "kind": CheckpointConversion::kind(&()),
            "status": decision.status,
        });
        latest = api
            .patch_status(
                &cr.name_any(),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(patch),
            )
            .await
            .map_err(kube_err(format!(
                "writing the status of {ns}/{}",
                cr.name_any()
            )))?;
    }
    let reference = cr.object_ref(&());
    for n in &decision.events {
        // Only the reconcile that created the Job tells of it.
        let creates = [Reason::JobCreated.as_str(), Reason::PartsDone.as_str()];
        if creates.contains(&n.reason.as_str()) && !created {
            continue;
        }
        let ev = Event {
            type_: if n.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: n.reason.clone(),
            note: Some(n.message.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
            // Events are best effort; status already carries the facts.
            tracing::warn!(error = %e, reason = %n.reason, "could not publish an event");
        }
    }
    // Published: the staging became the output, and nothing is left to remove.
    if decision.status.phase.as_deref() == Some(crate::api::phase::SUCCEEDED) {
        set_staging_finalizer(&api, &latest, false).await?;
    }
    if let Some(outcome) = decision.finished {
        let duration = match (
            &decision.status.start_time,
            &decision.status.completion_time,
        ) {
            (Some(a), Some(b)) => b.0.duration_since(a.0).try_into().ok(),
            _ => None,
        };
        let step = decision.status.step.clone().unwrap_or_default();
        ctx.metrics.finished(&step, outcome, duration);
        tracing::info!(resource = %cr.name_any(), namespace = %ns, %step, outcome, "conversion finished");
    }
    ctx.metrics
        .reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(decision
        .requeue
        .map_or_else(Action::await_change, Action::requeue))
}

fn has_staging_finalizer(cr: &CheckpointConversion) -> bool {
    cr.finalizers().iter().any(|f| f == job::STAGING_FINALIZER)
}

/// Adds or removes [`job::STAGING_FINALIZER`], keeping every other finalizer: a
/// merge patch of the whole list with the resource's `resourceVersion`, so that a
/// concurrent change of the list is a conflict (retried) rather than lost.
async fn set_staging_finalizer(
    api: &Api<CheckpointConversion>,
    cr: &CheckpointConversion,
    on: bool,
) -> Result<(), Error> {
    if has_staging_finalizer(cr) == on {
        return Ok(());
    }
    let mut finalizers: Vec<String> = cr
        .finalizers()
        .iter()
        .filter(|f| *f != job::STAGING_FINALIZER)
        .cloned()
        .collect();
    if on {
        finalizers.push(job::STAGING_FINALIZER.to_owned());
    }
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": cr.resource_version(), "finalizers": finalizers},
    });
    let name = cr.name_any();
    match api
        .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => Ok(()),
        // Gone meanwhile: nothing holds it any more.
        Err(kube::Error::Api(s)) if s.code == 404 && !on => Ok(()),
        Err(e) => Err(kube_err(format!(
            "{} the finalizer of {name}",
            if on { "adding" } else { "removing" }
        ))(e)),
    }
}

/// A deleted resource whose run was split across pods: its Jobs go first (their
/// pods are told to stop), then, unless the run published, a Job removes the
/// staging the parts shared (`ckpt-convert clean`), and then the finalizer goes.
/// Each step is looked at again until it is done.
async fn clean_up_split(
    cr: &CheckpointConversion,
    ctx: &Context,
    api: &Api<CheckpointConversion>,
    ns: &str,
) -> Result<Action, Error> {
    let name = cr.name_any();
    let uid = cr.metadata.uid.clone().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    let labelled = ListParams::default().labels(&format!("{}={name}", job::CONVERSION_LABEL));
    let list = jobs
        .list(&labelled)
        .await
        .map_err(kube_err(format!("listing the Jobs of {ns}/{name}")))?;
    let cleanup_name = job::cleanup_job_name(&name, &uid);
    for j in list.items.iter().filter(|j| {
        j.owner_references().iter().any(|r| r.uid == uid) && j.metadata.deletion_timestamp.is_none()
    }) {
        match jobs
            .delete(&j.name_any(), &DeleteParams::background())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(kube_err(format!("deleting Job {ns}/{}", j.name_any()))(e)),
        }
    }
    // Until every pod of its runs is gone, a part may still write.
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let left = pods
        .list(&labelled)
        .await
        .map_err(kube_err(format!("listing the pods of {ns}/{name}")))?
        .items
        .into_iter()
        .filter(|p| p.labels().get("batch.kubernetes.io/job-name") != Some(&cleanup_name))
        .count();
    if left > 0 {
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    let published = crate::conditions::is_true(
        &cr.status.clone().unwrap_or_default().conditions,
        crate::conditions::types::SUCCEEDED,
    );
    if !published {
        let done = match jobs
            .get_opt(&cleanup_name)
            .await
            .map_err(kube_err(format!("reading Job {ns}/{cleanup_name}")))?
        {
            None => {
                let clean = crate::step::clean(&cr.spec);
                let job = job::cleanup(cr, &clean, &ctx.defaults);
                let params = PostParams {
                    field_manager: Some(MANAGER.into()),
                    ..PostParams::default()
                };
                match jobs.create(&params, &job).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => {
                        return Err(kube_err(format!("creating Job {ns}/{cleanup_name}"))(e));
                    }
                }
                None
            }
            Some(j) => {
                let view = job_view(&j);
                view.finished().then_some(view)
            }
        };
        let Some(view) = done else {
            return Ok(Action::requeue(Duration::from_secs(2)));
        };
        let target = format!("{}:{}", cr.spec.target.pvc, cr.spec.target.path);
        let (reason, note) = if view.complete {
            (
                Reason::StagingRemoved,
                format!("Job {cleanup_name} removed what the split run left beside {target}"),
            )
        } else {
            (
                Reason::StagingNotRemoved,
                format!(
                    "Job {cleanup_name} could not remove what the split run left beside {target} ({}); `ckpt-convert clean` on the target's directory removes it",
                    view.failure
                        .map(|(r, m)| format!("{r}: {m}"))
                        .unwrap_or_default()
                ),
            )
        };
        let ev = Event {
            type_: if reason.is_warning() {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.as_str().to_owned(),
            note: Some(note),
            action: "Delete".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &cr.object_ref(&())).await {
            tracing::warn!(error = %e, "could not publish an event");
        }
    }
    set_staging_finalizer(api, cr, false).await?;
    Ok(Action::await_change())
}

/// What to do after a failed reconcile: count it, and retry by kind.
pub fn error_policy(cr: Arc<CheckpointConversion>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(resource = %cr.name_any(), error = %err, "reconcile failed");
    ctx.metrics
        .errors
        .get_or_create(&crate::metrics::ErrorLabels {
            error: err.metric_label(),
        })
        .inc();
    Action::requeue(err.retry_after())
}

/// Settings of the controller loop.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// Watch only these namespaces (all when empty).
    pub namespaces: Vec<String>,
    /// Job defaults.
    pub defaults: JobDefaults,
    /// The reporting instance (pod name) for events.
    pub instance: Option<String>,
    /// Reconciles that may run at once, across all watched namespaces (at least 1).
    pub concurrency: u16,
    /// At most this many Jobs created per second (`None`: no limit).
    pub jobs_per_second: Option<f64>,
}

/// Runs the controller until `shutdown` resolves: one controller per watched
/// namespace (or one for all), so that a namespaced install needs no cluster-wide
/// permission. Targets are per namespace (claims are), so nothing is shared.
///
/// # Errors
/// When the CRD is not installed or cannot be listed.
pub async fn run(
    client: Client,
    settings: RunSettings,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let scopes: Vec<Option<String>> = if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().cloned().map(Some).collect()
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: settings.instance.clone(),
            },
        ),
        client: client.clone(),
        defaults: settings.defaults,
        metrics,
        pacer: Pacer::new(settings.jobs_per_second),
        running: tokio::sync::Semaphore::new(usize::from(settings.concurrency.max(1))),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut loops = Vec::new();
    for scope in scopes {
        let api = |c: &Client| -> Api<CheckpointConversion> {
            match &scope {
                Some(ns) => Api::namespaced(c.clone(), ns),
                None => Api::all(c.clone()),
            }
        };
        if let Err(e) = api(&client).list(&ListParams::default().limit(1)).await {
            anyhow::bail!(
                "cannot list CheckpointConversions in {} ({e}); is the CRD installed (kubectl apply -f crds/), and may the operator read them there?",
                scope.as_deref().unwrap_or("all namespaces")
            );
        }
        let mut stop = stop_rx.clone();
        loops.push(
            controller(&client, scope)
                // The queue holds one entry per resource at most (requests for one
                // resource are merged); this bounds the reconciles started at once.
                .with_config(ControllerConfig::default().concurrency(settings.concurrency.max(1)))
                .graceful_shutdown_on(async move {
                    let _ = stop.wait_for(|s| *s).await;
                }),
        );
    }
    futures::future::join_all(loops.into_iter().map(|c| {
        c.run(reconcile, error_policy, ctx.clone())
            .for_each(|r| async move {
                match r {
                    Ok((obj, _)) => tracing::debug!(resource = %obj_name(&obj), "reconciled"),
                    Err(e) => tracing::debug!(error = %e, "reconcile error"),
                }
            })
    }))
    .await;
    Ok(())
}

/// The controller of one scope: the resources, their Jobs, the Jobs' pods and
/// events (what a pod that cannot start says), and the resources again, so that a
/// resource refused for a target is looked at when the target's owner goes.
fn controller(client: &Client, scope: Option<String>) -> Controller<CheckpointConversion> {
    fn api<K>(c: &Client, scope: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        match scope {
            Some(ns) => Api::namespaced(c.clone(), ns),
            None => Api::all(c.clone()),
        }
    }
    let labelled = watcher::Config::default().labels(job::CONVERSION_LABEL);
    let controller = Controller::new(
        api::<CheckpointConversion>(client, &scope),
        watcher::Config::default().any_semantic(),
    )
    .owns(api::<Job>(client, &scope), labelled.clone());
    let store = controller.store();
    let for_events = store.clone();
    controller
        .watches(api::<Pod>(client, &scope), labelled, |pod: Pod| {
            let ns = pod.namespace();
            pod.labels()
                .get(job::CONVERSION_LABEL)
                .map(|name| ObjectRef::new(name).within(ns.as_deref().unwrap_or_default()))
        })
        .watches(
            api::<CoreEvent>(client, &scope),
            watcher::Config::default().fields("involvedObject.kind=Job"),
            move |ev: CoreEvent| {
                let job = ev.involved_object.name.clone();
                let ns = ev.involved_object.namespace.clone();
                for_events
                    .state()
                    .into_iter()
                    .filter(|cr| {
                        cr.namespace() == ns
                            && cr.status.as_ref().and_then(|s| s.job_name.clone()) == job
                    })
                    .map(|cr| ObjectRef::from_obj(&*cr))
                    .collect::<Vec<_>>()
            },
        )
        .watches(
            api::<CheckpointConversion>(client, &scope),
            watcher::Config::default(),
            move |changed: CheckpointConversion| {
                store
                    .state()
                    .into_iter()
                    .filter(|cr| {
                        cr.namespace() == changed.namespace()
                            && cr.name_any() != changed.name_any()
                            && cr.status.as_ref().and_then(|s| s.reason.as_deref())
                                == Some(Reason::TargetConflict.as_str())
                            && claim::conflicting(&cr.spec, &changed.spec)
                    })
                    .map(|cr| ObjectRef::from_obj(&*cr))
                    .collect::<Vec<_>>()
            },
        )
}

fn obj_name(o: &ObjectRef<CheckpointConversion>) -> String {
    match &o.namespace {
        Some(ns) => format!("{ns}/{}", o.name),
        None => o.name.clone(),
    }
}

#[cfg(test)]
mod tests {
    //! The shell's API traffic against a mocked apiserver (tower-test): each test
    //! scripts the requests the reconcile must make, in order, and answers them.

    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock::{self, Handle};

    type Mock = Handle<Request<Body>, Response<Body>>;

    fn resource() -> CheckpointConversion {
        crate::fixtures::sft_to_hf()
    }

    fn context(client: Client) -> Arc<Context> {
        Arc::new(Context {
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: MANAGER.into(),
                    instance: None,
                },
            ),
            client,
            defaults: JobDefaults {
                created_by: Some("operator-a".into()),
                ..JobDefaults::default()
            },
            metrics: Arc::new(Metrics::default()),
            pacer: Pacer::new(None),
            running: tokio::sync::Semaphore::new(1),
        })
    }

    fn json_response(status: u16, body: Value) -> Response<Body> {
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap()
    }

    fn not_found() -> Response<Body> {
        json_response(
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
        )
    }

    fn empty_list(kind: &str) -> Response<Body> {
        json_response(
            200,
            json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []}),
        )
    }

    fn pvc() -> Response<Body> {
        json_response(
            200,
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "x"}}),
        )
    }

    /// Waits for the next request, checks its method and path, answers it with
    /// `answer` (or, for `None`, as the apiserver would: the created object, or the
    /// patched resource) and returns
    /// `{"uri", "body"}`.
    async fn expect(
        h: &mut Mock,
        method: &str,
        path: &str,
        answer: Option<Response<Body>>,
    ) -> Value {
        let (req, send) = tokio::time::timeout(Duration::from_secs(5), h.next_request())
            .await
            .unwrap_or_else(|_| panic!("no {method} {path} request came"))
            .expect("service alive");
        assert_eq!(
            (req.method().as_str(), req.uri().path()),
            (method, path),
            "unexpected request {}",
            req.uri()
        );
        let uri = req.uri().to_string();
        let body = http_body_util::BodyExt::collect(req.into_body())
            .await
            .unwrap()
            .to_bytes();
        let v: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap()
        };
        let echo = || match method {
            // A status patch answers with the whole resource.
            "PATCH" => json_response(200, serde_json::to_value(resource()).unwrap()),
            _ => json_response(201, v.clone()),
        };
        send.send_response(answer.unwrap_or_else(echo));
        json!({"uri": uri, "body": v})
    }

    /// The reconcile's first reads: the resource from the apiserver, then its Jobs
    /// (none). Returns the Job list request.
    async fn fresh_read_and_no_jobs(h: &mut Mock) -> Value {
        let me = json_response(200, serde_json::to_value(resource()).unwrap());
        expect(h, "GET", &format!("{CR}/sft-to-hf"), Some(me)).await;
        expect(
            h,
            "GET",
            "/apis/batch/v1/namespaces/training/jobs",
            Some(empty_list("JobList")),
        )
        .await
    }

    /// Both claims of the resource exist.
    async fn claims_exist(h: &mut Mock) {
        expect(h, "GET", &format!("{PVCS}/lustre-shared"), Some(pvc())).await;
        expect(h, "GET", &format!("{PVCS}/models"), Some(pvc())).await;
    }

    /// The claim record of `lustre-shared` at `version`, holding `entries` (path →
    /// owner) and owned by `owners`.
    fn record(version: &str, entries: Value, owners: Value) -> Response<Body> {
        json_response(
            200,
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                   "metadata": {"name": "ckpt-targets.lustre-shared", "resourceVersion": version,
                                "ownerReferences": owners,
                                "annotations": {"ckpt.dev/targets": entries.to_string()}}}),
        )
    }

    /// The claim's owner `gone` is asked for: deleted, and none of its pods runs.
    async fn owner_gone(h: &mut Mock) {
        expect(h, "GET", &format!("{CR}/gone"), Some(not_found())).await;
        let pods = expect(
            h,
            "GET",
            "/api/v1/namespaces/training/pods",
            Some(empty_list("PodList")),
        )
        .await;
        assert!(
            pods["uri"]
                .as_str()
                .unwrap()
                .contains("ckpt.dev%2Fconversion%3Dgone"),
            "{pods}"
        );
    }

    async fn events(h: &mut Mock, n: usize) -> Vec<Value> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(
                expect(
                    h,
                    "POST",
                    "/apis/events.k8s.io/v1/namespaces/training/events",
                    None,
                )
                .await,
            );
        }
        out
    }

    const CR: &str = "/apis/ckpt.dev/v1alpha1/namespaces/training/checkpointconversions";
    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/training/leases";
    const PVCS: &str = "/api/v1/namespaces/training/persistentvolumeclaims";

    #[tokio::test]
    async fn a_new_resource_claims_its_target_creates_its_job_then_writes_status_and_events() {
        let (svc, mut h) = mock::pair::<Request<Body>, Response<Body>>();
        let ctx = context(Client::new(svc, "training"));
        let server = tokio::spawn(async move {
            // The apiserver's copy, not the watch cache's.
            let jobs = fresh_read_and_no_jobs(&mut h).await;
            // The target is taken before the Job exists: the claim record is created.
            let name = format!("{LEASES}/ckpt-targets.lustre-shared");
            expect(&mut h, "GET", &name, Some(not_found())).await;
            let record = expect(&mut h, "POST", LEASES, None).await;
            claims_exist(&mut h).await;
            let job = expect(
                &mut h,
                "POST",
                "/apis/batch/v1/namespaces/training/jobs",
                None,
            )
            .await;
            let status = expect(&mut h, "PATCH", &format!("{CR}/sft-to-hf/status"), None).await;
            (jobs, record, job, status, events(&mut h, 2).await)
        });
        let action = reconcile(Arc::new(resource()), ctx).await.unwrap();
        let (jobs, record, job, status, events) = server.await.unwrap();
        assert_eq!(action, Action::requeue(Duration::from_secs(60)));
        assert!(
            jobs["uri"]
                .as_str()
                .unwrap()
                .contains("labelSelector=ckpt.dev%2Fconversion%3Dsft-to-hf"),
            "{jobs}"
        );
        let annotations = &record["body"]["metadata"]["annotations"];
        let entries: Value =
            serde_json::from_str(annotations["ckpt.dev/targets"].as_str().unwrap()).unwrap();
        assert_eq!(
            entries,
            json!({"output/convert/sft-hf": {"name": "sft-to-hf", "uid": "u-1"}})
        );
        assert_eq!(
            record["body"]["metadata"]["ownerReferences"][0]["uid"],
            "u-1"
        );
        assert_eq!(job["body"]["metadata"]["name"], "sft-to-hf-g1");
        assert_eq!(job["body"]["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(
            job["body"]["metadata"]["annotations"]["ckpt.dev/created-by"],
            "operator-a"
        );
        assert_eq!(job["body"]["metadata"]["labels"]["ckpt.dev/retry"], "0");
        assert!(
            job["uri"]
                .as_str()
                .unwrap()
                .contains("fieldManager=ckpt-operator")
        );
        assert_eq!(
            job["body"]["spec"]["template"]["spec"]["containers"][0]["args"][1],
            "convert/megatron_to_hf"
        );
        assert!(
            status["uri"]
                .as_str()
                .unwrap()
                .contains("fieldManager=ckpt-operator")
        );
        assert!(status["uri"].as_str().unwrap().contains("force=true"));
        assert_eq!(status["body"]["status"]["phase"], "Running");
        assert_eq!(status["body"]["status"]["reason"], "JobCreated");
        assert_eq!(events[0]["body"]["reason"], "Accepted");
        assert_eq!(events[1]["body"]["reason"], "JobCreated");
    }

    #[tokio::test]
    async fn a_job_created_by_an_earlier_reconcile_is_not_announced_again() {
        let (svc, mut h) = mock::pair::<Request<Body>, Response<Body>>();
        let ctx = context(Client::new(svc, "training"));
        let server = tokio::spawn(async move {
            fresh_read_and_no_jobs(&mut h).await;
            let held = record(
                "7",
                json!({"output/convert/sft-hf": {"name": "sft-to-hf", "uid": "u-1"}}),
                json!([]),
            );
            expect(
                &mut h,
                "GET",
                &format!("{LEASES}/ckpt-targets.lustre-shared"),
                Some(held),
            )
            .await;
            claims_exist(&mut h).await;
            // The Job exists already: its creation is not news.
            let exists = json_response(
                409,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": "exists"}),
            );
            expect(
                &mut h,
                "POST",
                "/apis/batch/v1/namespaces/training/jobs",
                Some(exists),
            )
            .await;
            expect(&mut h, "PATCH", &format!("{CR}/sft-to-hf/status"), None).await;
            // Nothing else: the mock closing makes any further call fail the reconcile.
            events(&mut h, 1).await
        });
        reconcile(Arc::new(resource()), ctx).await.unwrap();
        let events = server.await.unwrap();
        assert_eq!(events[0]["body"]["reason"], "Accepted");
    }

    #[tokio::test]
    async fn a_target_owned_by_a_live_resource_starts_nothing() {
        let (svc, mut h) = mock::pair::<Request<Body>, Response<Body>>();
        let ctx = context(Client::new(svc, "training"));
        let mut earlier = resource();
        earlier.metadata.name = Some("earlier".into());
        earlier.metadata.uid = Some("u-0".into());
        let server = tokio::spawn(async move {
            fresh_read_and_no_jobs(&mut h).await;
            // A directory containing the target is owned.
            let owned = record(
                "7",
                json!({"output/convert": {"name": "earlier", "uid": "u-0"}}),
                json!([]),
            );
            expect(
                &mut h,
                "GET",
                &format!("{LEASES}/ckpt-targets.lustre-shared"),
                Some(owned),
            )
            .await;
            // The owner is asked of the apiserver: alive, so the claim is lost.
            let alive = json_response(200, serde_json::to_value(earlier).unwrap());
            expect(&mut h, "GET", &format!("{CR}/earlier"), Some(alive)).await;
            claims_exist(&mut h).await;
            // No Job is created: the status comes next.
            let status = expect(&mut h, "PATCH", &format!("{CR}/sft-to-hf/status"), None).await;
            (status, events(&mut h, 1).await)
        });
        reconcile(Arc::new(resource()), ctx).await.unwrap();
        let (status, events) = server.await.unwrap();
        let accepted = &status["body"]["status"]["conditions"][0];
        assert_eq!(
            (accepted["type"].as_str(), accepted["reason"].as_str()),
            (Some("Accepted"), Some("TargetConflict"))
        );
        assert!(accepted["message"].as_str().unwrap().contains("earlier"));
        assert_eq!(status["body"]["status"]["phase"], "Rejected");
        assert_eq!(events[0]["body"]["type"], "Warning");
    }

    #[tokio::test]
    async fn a_dead_owners_claim_is_taken_over() {
        let (svc, mut h) = mock::pair::<Request<Body>, Response<Body>>();
        let ctx = context(Client::new(svc, "training"));
        let server = tokio::spawn(async move {
            fresh_read_and_no_jobs(&mut h).await;
            let lease = format!("{LEASES}/ckpt-targets.lustre-shared");
            let gone = json!({"output/convert/sft-hf": {"name": "gone", "uid": "u-0"}});
            let owners = json!([{"apiVersion": "ckpt.dev/v1alpha1", "kind": "CheckpointConversion", "name": "gone", "uid": "u-0"}]);
            expect(
                &mut h,
                "GET",
                &lease,
                Some(record("7", gone.clone(), owners.clone())),
            )
            .await;
            owner_gone(&mut h).await;
            // A write that lost a race is read again and retried.
            let conflict = json_response(
                409,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "modified"}),
            );
            let first = expect(&mut h, "PUT", &lease, Some(conflict)).await;
            expect(&mut h, "GET", &lease, Some(record("8", gone, owners))).await;
            owner_gone(&mut h).await;
            let second = expect(&mut h, "PUT", &lease, None).await;
            claims_exist(&mut h).await;
            expect(
                &mut h,
                "POST",
                "/apis/batch/v1/namespaces/training/jobs",
                None,
            )
            .await;
            expect(&mut h, "PATCH", &format!("{CR}/sft-to-hf/status"), None).await;
            events(&mut h, 2).await;
            (first, second)
        });
        reconcile(Arc::new(resource()), ctx).await.unwrap();
        let (first, second) = server.await.unwrap();
        assert_eq!(first["body"]["metadata"]["resourceVersion"], "7");
        assert_eq!(second["body"]["metadata"]["resourceVersion"], "8");
        let entries: Value = serde_json::from_str(
            second["body"]["metadata"]["annotations"]["ckpt.dev/targets"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            entries,
            json!({"output/convert/sft-hf": {"name": "sft-to-hf", "uid": "u-1"}})
        );
        let refs = second["body"]["metadata"]["ownerReferences"]
            .as_array()
            .unwrap();
        assert_eq!(refs.len(), 1, "the dead owner's reference goes: {refs:?}");
        assert_eq!(refs[0]["uid"], "u-1");
    }

    #[tokio::test]
    async fn a_resource_deleted_meanwhile_is_left_alone() {
        let (svc, mut h) = mock::pair::<Request<Body>, Response<Body>>();
        let ctx = context(Client::new(svc, "training"));
        let server = tokio::spawn(async move {
            expect(&mut h, "GET", &format!("{CR}/sft-to-hf"), Some(not_found())).await;
        });
        let action = reconcile(Arc::new(resource()), ctx).await.unwrap();
        server.await.unwrap();
        assert_eq!(action, Action::await_change());
    }

    #[test]
    fn errors_choose_their_retry() {
        let conflict = Error::Kube {
            action: "x".into(),
            source: kube::Error::Api(
                kube::core::Status::failure("m", "Conflict")
                    .with_code(409)
                    .boxed(),
            ),
        };
        assert_eq!(conflict.retry_after(), Duration::from_secs(5));
        assert_eq!(conflict.metric_label(), "api_409");
        assert_eq!(
            Error::NoNamespace("x".into()).retry_after(),
            Duration::from_secs(300)
        );
    }
}
