//! The reconcile shell: gathers observations from the API, asks [`crate::decide`]
//! what to do, and does it (create the Job, apply the status, publish events).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};

use crate::api::CheckpointConversion;
use crate::decide::{self, JobView, Observed, PodView};
use crate::job::{self, JobDefaults};
use crate::metrics::Metrics;

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
    /// All conversions, for target conflicts.
    pub store: Store<CheckpointConversion>,
}

/// True when two claim paths are the same or one contains the other.
fn overlaps(a: &str, b: &str) -> bool {
    a == b || a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/"))
}

/// The earliest other resource writing the same target (creation time, then name).
pub fn target_conflict(
    cr: &CheckpointConversion,
    all: &[Arc<CheckpointConversion>],
) -> Option<String> {
    let key = |c: &CheckpointConversion| (c.metadata.creation_timestamp.clone(), c.name_any());
    let mine = key(cr);
    let mut others: Vec<&Arc<CheckpointConversion>> = all
        .iter()
        .filter(|o| {
            o.namespace() == cr.namespace()
                && o.name_any() != cr.name_any()
                && o.metadata.deletion_timestamp.is_none()
                && o.spec.target.pvc == cr.spec.target.pvc
                && overlaps(&o.spec.target.path, &cr.spec.target.path)
                && key(o) < mine
        })
        .collect();
    others.sort_by_key(|o| key(o));
    others.first().map(|o| o.name_any())
}

fn job_view(j: &Job) -> JobView {
    let status = j.status.clone().unwrap_or_default();
    let cond = |t: &str| {
        status
            .conditions
            .as_ref()
            .and_then(|cs| cs.iter().find(|c| c.type_ == t && c.status == "True"))
            .map(|c| {
                (
                    c.reason.clone().unwrap_or_default(),
                    c.message.clone().unwrap_or_default(),
                )
            })
    };
    JobView {
        name: j.name_any(),
        active: status.active.unwrap_or(0),
        succeeded: status.succeeded.unwrap_or(0),
        failed: status.failed.unwrap_or(0),
        complete: cond("Complete").is_some(),
        failure: cond("Failed"),
        start_time: status.start_time.clone(),
        completion_time: status.completion_time.clone(),
    }
}

fn pod_view(p: &Pod) -> PodView {
    let status = p.status.clone().unwrap_or_default();
    let container = status
        .container_statuses
        .as_ref()
        .and_then(|cs| cs.iter().find(|c| c.name == job::CONTAINER).cloned());
    let terminated = container
        .as_ref()
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.clone());
    let waiting = container
        .as_ref()
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.waiting.clone());
    let unschedulable = status
        .conditions
        .as_ref()
        .and_then(|cs| {
            cs.iter().find(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            })
        })
        .map(|c| c.message.clone().unwrap_or_default());
    PodView {
        exit_code: terminated.as_ref().map(|t| t.exit_code),
        message: terminated.and_then(|t| t.message),
        waiting: waiting
            .and_then(|w| w.reason.map(|r| (r, w.message.unwrap_or_default())))
            .filter(|(r, _)| r != "ContainerCreating" && r != "PodInitializing"),
        unschedulable,
    }
}

async fn observe(cr: &CheckpointConversion, ctx: &Context, ns: &str) -> Result<Observed, Error> {
    let mut obs = Observed {
        conflict: target_conflict(cr, &ctx.store.state()),
        ..Observed::default()
    };
    if let Ok(inv) = crate::step::invocation(&cr.spec) {
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
    let name = job::job_name(&cr.name_any(), cr.metadata.generation.unwrap_or(1));
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    if let Some(j) = jobs
        .get_opt(&name)
        .await
        .map_err(kube_err(format!("reading Job {ns}/{name}")))?
    {
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
        let list = pods
            .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={name}")))
            .await
            .map_err(kube_err(format!("listing the pods of Job {ns}/{name}")))?;
        // The most recent pod tells the current story.
        obs.pod = list
            .items
            .iter()
            .max_by_key(|p| p.metadata.creation_timestamp.clone())
            .map(pod_view);
        obs.job = Some(job_view(&j));
    }
    Ok(obs)
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Reconciles one resource.
///
/// # Errors
/// [`Error`] when an API call fails; the controller retries per [`error_policy`].
pub async fn reconcile(cr: Arc<CheckpointConversion>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let ns = cr
        .namespace()
        .ok_or_else(|| Error::NoNamespace(cr.name_any()))?;
    if cr.metadata.deletion_timestamp.is_some() {
        // The Job and its pods go with the resource (owner references); the output
        // on the PVC stays.
        return Ok(Action::await_change());
    }
    let obs = observe(&cr, &ctx, &ns).await?;
    let decision = decide::decide(&cr, &obs, &now());
    if let Some(inv) = &decision.create_job {
        let job = job::build(&cr, inv, &ctx.defaults);
        let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
        match jobs.create(&PostParams::default(), &job).await {
            Ok(_) => {}
            // Created by an earlier reconcile whose status write was lost: fine.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(kube_err(format!("creating Job {ns}/{}", job.name_any()))(e)),
        }
    }
    if cr.status.as_ref() != Some(&decision.status) {
        let api: Api<CheckpointConversion> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = serde_json::json!({
            "apiVersion": CheckpointConversion::api_version(&()),
            "kind": CheckpointConversion::kind(&()),
            "status": decision.status,
        });
        api.patch_status(
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
    /// Watch only this namespace (all when `None`).
    pub namespace: Option<String>,
    /// Job defaults.
    pub defaults: JobDefaults,
    /// The reporting instance (pod name) for events.
    pub instance: Option<String>,
}

/// Runs the controller until `shutdown` resolves.
///
/// # Errors
/// When the CRD is not installed.
pub async fn run(
    client: Client,
    settings: RunSettings,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let (crs, jobs): (Api<CheckpointConversion>, Api<Job>) = match &settings.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    if let Err(e) = crs.list(&ListParams::default().limit(1)).await {
        anyhow::bail!(
            "cannot list CheckpointConversions ({e}); is the CRD installed? kubectl apply -f crds/"
        );
    }
    let controller = Controller::new(crs, watcher::Config::default().any_semantic()).owns(
        jobs,
        watcher::Config::default().labels(job::CONVERSION_LABEL),
    );
    let ctx = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: settings.instance.clone(),
            },
        ),
        client,
        defaults: settings.defaults,
        metrics,
        store: controller.store(),
    });
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            match r {
                Ok((obj, _)) => tracing::debug!(resource = %obj_name(&obj), "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
    Ok(())
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
    use crate::api::{Artifact, ArtifactKind, BaseModel, CheckpointConversionSpec};
    use http::{Request, Response};
    use kube::client::Body;
    use kube::runtime::reflector::store;
    use tower_test::mock::{self, Handle};

    type Mock = Handle<Request<Body>, Response<Body>>;

    fn resource() -> CheckpointConversion {
        let mut c = CheckpointConversion::new(
            "sft-to-hf",
            CheckpointConversionSpec {
                source: Artifact {
                    kind: ArtifactKind::CheckpointMegatron,
                    pvc: "lustre".into(),
                    path: "sft/iter_0000100".into(),
                },
                target: Artifact {
                    kind: ArtifactKind::CheckpointHf,
                    pvc: "lustre".into(),
                    path: "convert/sft-hf".into(),
                },
                base_model: Some(BaseModel {
                    pvc: "models".into(),
                    path: "hf/base".into(),
                    model_id: None,
                }),
                lora: None,
                parallelism: None,
                dtype: None,
                validation: None,
                job: None,
            },
        );
        c.metadata.namespace = Some("training".into());
        c.metadata.generation = Some(1);
        c.metadata.uid = Some("u-1".into());
        c
    }

    fn context(client: Client, others: Vec<CheckpointConversion>) -> Arc<Context> {
        let (reader, mut writer) = store::<CheckpointConversion>();
        for o in others {
            writer.apply_watcher_event(&watcher::Event::Apply(o));
        }
        Arc::new(Context {
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: MANAGER.into(),
                    instance: None,
                },
            ),
            client,
            defaults: JobDefaults::default(),
            metrics: Arc::new(Metrics::default()),
            store: reader,
        })
    }

    fn json(status: u16, body: serde_json::Value) -> Response<Body> {
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap()
    }

    fn not_found() -> Response<Body> {
        json(
            404,
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
        )
    }

    async fn expect(h: &mut Mock, method: &str, path_prefix: &str) -> serde_json::Value {
        let (req, send) = tokio::time::timeout(Duration::from_secs(2), h.next_request())
            .await
            .unwrap_or_else(|_| panic!("no {method} {path_prefix} request came"))
            .expect("service alive");
        assert_eq!(req.method().as_str(), method, "{}", req.uri());
        assert!(
            req.uri().path().starts_with(path_prefix),
            "expected {method} {path_prefix}…, got {}",
            req.uri()
        );
        let uri = req.uri().to_string();
        let body = http_body_util::BodyExt::collect(req.into_body())
            .await
            .unwrap()
            .to_bytes();
        let v: serde_json::Value = if body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&body).unwrap()
        };
        let answer = match (method, path_prefix) {
            ("GET", p) if p.contains("persistentvolumeclaims") => json(
                200,
                serde_json::json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "x"}}),
            ),
            ("GET", p) if p.contains("/jobs/") => not_found(),
            ("POST", p) if p.contains("/jobs") => json(201, v.clone()),
            ("PATCH", _) => json(200, serde_json::to_value(resource()).unwrap()),
            ("POST", p) if p.contains("/events") => json(201, v.clone()),
            _ => panic!("unscripted request {method} {uri}"),
        };
        send.send_response(answer);
        serde_json::json!({"uri": uri, "body": v})
    }

    #[tokio::test]
    async fn a_new_resource_creates_its_job_then_writes_status_and_events() {
        let (svc, mut h) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "training");
        let ctx = context(client, vec![]);
        let server = tokio::spawn(async move {
            // Claims first (lustre, models), then the Job of generation 1.
            expect(
                &mut h,
                "GET",
                "/api/v1/namespaces/training/persistentvolumeclaims/",
            )
            .await;
            expect(
                &mut h,
                "GET",
                "/api/v1/namespaces/training/persistentvolumeclaims/",
            )
            .await;
            expect(
                &mut h,
                "GET",
                "/apis/batch/v1/namespaces/training/jobs/sft-to-hf-g1",
            )
            .await;
            let job = expect(&mut h, "POST", "/apis/batch/v1/namespaces/training/jobs").await;
            let status = expect(&mut h, "PATCH", "/apis/ckpt.dev/v1alpha1/namespaces/training/checkpointconversions/sft-to-hf/status").await;
            let e1 = expect(
                &mut h,
                "POST",
                "/apis/events.k8s.io/v1/namespaces/training/events",
            )
            .await;
            let e2 = expect(
                &mut h,
                "POST",
                "/apis/events.k8s.io/v1/namespaces/training/events",
            )
            .await;
            (job, status, e1, e2)
        });
        let action = reconcile(Arc::new(resource()), ctx).await.unwrap();
        let (job, status, e1, e2) = server.await.unwrap();
        assert_eq!(action, Action::requeue(Duration::from_secs(60)));
        assert_eq!(job["body"]["metadata"]["name"], "sft-to-hf-g1");
        assert_eq!(job["body"]["metadata"]["ownerReferences"][0]["uid"], "u-1");
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
        assert_eq!(e1["body"]["reason"], "Accepted");
        assert_eq!(e2["body"]["reason"], "JobCreated");
    }

    #[tokio::test]
    async fn a_conflicting_resource_starts_nothing() {
        let (svc, mut h) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "training");
        let mut earlier = resource();
        earlier.metadata.name = Some("earlier".into());
        earlier.metadata.creation_timestamp =
            Some(Time(k8s_openapi::jiff::Timestamp::from_second(1).unwrap()));
        let mut mine = resource();
        mine.metadata.creation_timestamp =
            Some(Time(k8s_openapi::jiff::Timestamp::from_second(2).unwrap()));
        let ctx = context(client, vec![earlier, mine.clone()]);
        let server = tokio::spawn(async move {
            expect(
                &mut h,
                "GET",
                "/api/v1/namespaces/training/persistentvolumeclaims/",
            )
            .await;
            expect(
                &mut h,
                "GET",
                "/api/v1/namespaces/training/persistentvolumeclaims/",
            )
            .await;
            expect(
                &mut h,
                "GET",
                "/apis/batch/v1/namespaces/training/jobs/sft-to-hf-g1",
            )
            .await;
            // No Job is created: the status comes next.
            let status = expect(&mut h, "PATCH", "/apis/ckpt.dev/v1alpha1/namespaces/training/checkpointconversions/sft-to-hf/status").await;
            let event = expect(
                &mut h,
                "POST",
                "/apis/events.k8s.io/v1/namespaces/training/events",
            )
            .await;
            (status, event)
        });
        reconcile(Arc::new(mine), ctx).await.unwrap();
        let (status, event) = server.await.unwrap();
        let accepted = &status["body"]["status"]["conditions"][0];
        assert_eq!(
            (accepted["type"].as_str(), accepted["reason"].as_str()),
            (Some("Accepted"), Some("TargetConflict"))
        );
        assert_eq!(event["body"]["type"], "Warning");
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
