//! The conversion Job, built from a resource and the operator's settings: a pure
//! function, so every field is covered by table tests.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
    PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, PersistentVolumeClaimVolumeSource,
    PodSecurityContext, PodSpec, PodTemplateSpec, SeccompProfile, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::api::CheckpointConversion;
use crate::step::{Invocation, Share};

/// Label on everything the operator creates for a conversion.
pub const CONVERSION_LABEL: &str = "ckpt.dev/conversion";
/// Label with the resource generation the Job was made for.
pub const GENERATION_LABEL: &str = "ckpt.dev/generation";
/// Label with the `spec.retry` the Job was made for: the run it belongs to.
pub const RETRY_LABEL: &str = "ckpt.dev/retry";
/// Label of the Jobs of a split run: `parts` (the Indexed Job) or `finalize`.
pub const STAGE_LABEL: &str = "ckpt.dev/stage";
/// Label of the Jobs of a split run: the number of parts.
pub const WORKERS_LABEL: &str = "ckpt.dev/workers";
/// [`STAGE_LABEL`] of the Indexed Job that writes the parts.
pub const STAGE_PARTS: &str = "parts";
/// [`STAGE_LABEL`] of the Job that checks the parts and publishes.
pub const STAGE_FINALIZE: &str = "finalize";
/// [`STAGE_LABEL`] of the Job that removes a deleted split run's staging.
pub const STAGE_CLEANUP: &str = "cleanup";
/// The finalizer of a resource whose run is split across pods: its parts share a
/// staging directory beside the target, which outlives them (a part run again
/// reuses its files), so it is removed before the resource goes.
pub const STAGING_FINALIZER: &str = "ckpt.dev/split-staging";
/// How long a finished cleanup Job stays (it has no owner to go with).
const CLEANUP_TTL_SECONDS: i32 = 300;
/// The label the Job controller puts on each pod of an Indexed Job: its index.
pub const COMPLETION_INDEX_LABEL: &str = "batch.kubernetes.io/job-completion-index";
/// Annotation naming the operator replica that created the Job (its `--instance`,
/// the pod name in the chart), so a reader can tell which leader acted.
pub const CREATED_BY_ANNOTATION: &str = "ckpt.dev/created-by";
/// The converter container's name.
pub const CONTAINER: &str = "convert";
/// Exit code of a preflight refusal: the input will not get better on retry.
pub const EXIT_PREFLIGHT: i32 = 2;

/// Operator-wide defaults for conversion Jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct JobDefaults {
    /// Converter image.
    pub image: String,
    /// Pull policy.
    pub image_pull_policy: Option<String>,
    /// Pod retries (`backoffLimit`).
    pub backoff_limit: i32,
    /// `ttlSecondsAfterFinished`, if any.
    pub ttl_seconds_after_finished: Option<i32>,
    /// Default non-root user and group.
    pub run_as_user: i64,
    /// Service account for converter pods.
    pub service_account: Option<String>,
    /// The converter binary inside the image.
    pub command: String,
    /// This operator replica, recorded on the Jobs it creates.
    pub created_by: Option<String>,
}

impl Default for JobDefaults {
    fn default() -> Self {
        JobDefaults {
            image: "ghcr.io/ckpt-dev/ckpt-convert:latest".into(),
            image_pull_policy: None,
            backoff_limit: 2,
            ttl_seconds_after_finished: None,
            run_as_user: 65532,
            service_account: None,
            command: "/ckpt-convert".into(),
            created_by: None,
        }
    }
}

/// The Job name for a resource generation: deterministic, at most 63 characters
/// (pod labels carry it), unique per generation.
pub fn job_name(resource: &str, generation: i64) -> String {
    name_within(resource, &format!("-g{generation}"), 63)
}

/// The name of the Job that does `share` of the run of `resource`'s generation
/// `generation`. The parts' Job leaves room for `-INDEX` within 63 characters: the
/// Job controller names each pod's host `JOB-INDEX`.
pub fn run_job_name(resource: &str, generation: i64, share: Share) -> String {
    match share {
        Share::Whole => job_name(resource, generation),
        Share::Parts { .. } => name_within(resource, &format!("-g{generation}"), 63 - 4),
        Share::Finalize { .. } => name_within(resource, &format!("-g{generation}-finalize"), 63),
    }
}

/// The name of the Job that removes the staging of resource `resource` (uid
/// `uid`): a resource created again under the same name gets its own.
pub fn cleanup_job_name(resource: &str, uid: &str) -> String {
    let short: String = uid.chars().take(8).collect();
    name_within(resource, &format!("-cleanup-{short}"), 63)
}

/// The Job that removes what the split run of the deleted `cr` left beside its
/// target (`ckpt-convert clean`, which removes only staging that no process
/// holds), mounting the target's directory only. It has no owner: it must outlive
/// the resource it cleans for (a foreground deletion takes every dependent
/// first), and goes by its TTL.
pub fn cleanup(cr: &CheckpointConversion, clean: &Invocation, defaults: &JobDefaults) -> Job {
    let mut job = build(cr, clean, defaults);
    let uid = cr.metadata.uid.clone().unwrap_or_default();
    job.metadata.name = Some(cleanup_job_name(&cr.name_any(), &uid));
    job.metadata.owner_references = None;
    let stage = |labels: &mut Option<BTreeMap<String, String>>| {
        labels
            .get_or_insert_default()
            .insert(STAGE_LABEL.to_owned(), STAGE_CLEANUP.to_owned());
    };
    stage(&mut job.metadata.labels);
    if let Some(spec) = job.spec.as_mut() {
        spec.ttl_seconds_after_finished = Some(CLEANUP_TTL_SECONDS);
        spec.active_deadline_seconds = None;
        if let Some(meta) = spec.template.metadata.as_mut() {
            stage(&mut meta.labels);
        }
    }
    job
}

/// `resource` + `suffix` in at most `max` characters; when truncated, a short
/// digest of the full name keeps it unique.
fn name_within(resource: &str, suffix: &str, max: usize) -> String {
    if resource.len() + suffix.len() <= max {
        return format!("{resource}{suffix}");
    }
    let digest = resource.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let tag = format!("-{:08x}", digest as u32);
    let keep = max - suffix.len() - tag.len();
    let mut head = resource[..keep].trim_end_matches('-').to_owned();
    head.push_str(&tag);
    head.push_str(suffix);
    head
}

/// Builds the Job that runs `inv` for `cr`.
///
/// The Job of a split run's parts is an Indexed Job, one index per part, each
/// retried alone (`backoffLimitPerIndex`) and the whole Job failed as soon as one
/// part has used its retries; the final step's Job is an ordinary one.
pub fn build(cr: &CheckpointConversion, inv: &Invocation, defaults: &JobDefaults) -> Job {
    let generation = match inv.share {
        Share::Finalize { generation, .. } => generation,
        _ => cr.metadata.generation.unwrap_or(1),
    };
    let name = run_job_name(&cr.name_any(), generation, inv.share);
    let opts = cr.spec.job.clone().unwrap_or_default();
    let mut labels = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "ckpt-convert".to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "ckpt-operator".to_owned(),
        ),
        (CONVERSION_LABEL.to_owned(), cr.name_any()),
        (GENERATION_LABEL.to_owned(), generation.to_string()),
        (
            RETRY_LABEL.to_owned(),
            cr.spec.retry.unwrap_or(0).to_string(),
        ),
    ]);
    match inv.share {
        Share::Whole => {}
        Share::Parts { workers } | Share::Finalize { workers, .. } => {
            let stage = match inv.share {
                Share::Parts { .. } => STAGE_PARTS,
                _ => STAGE_FINALIZE,
            };
            labels.insert(STAGE_LABEL.to_owned(), stage.to_owned());
            labels.insert(WORKERS_LABEL.to_owned(), workers.to_string());
        }
    }
    // One volume per claim; a claim only ever mounted read-only is also read-only
    // at the volume level.
    let mut claims: Vec<(String, bool)> = Vec::new();
    for m in &inv.mounts {
        match claims.iter_mut().find(|(c, _)| *c == m.claim) {
            Some((_, ro)) => *ro &= m.read_only,
            None => claims.push((m.claim.clone(), m.read_only)),
        }
    }
    let volume_name = |claim: &str| {
        format!(
            "pvc-{}",
            claims
                .iter()
                .position(|(c, _)| c == claim)
                .expect("claim listed")
        )
    };
    let mut volumes: Vec<Volume> = claims
        .iter()
        .map(|(claim, ro)| Volume {
            name: volume_name(claim),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: ro.then_some(true),
            }),
            ..Volume::default()
        })
        .collect();
    volumes.push(Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    });
    let mut mounts: Vec<VolumeMount> = inv
        .mounts
        .iter()
        .map(|m| VolumeMount {
            name: volume_name(&m.claim),
            mount_path: m.mount_path.clone(),
            sub_path: (!m.sub_path.is_empty()).then(|| m.sub_path.clone()),
            read_only: m.read_only.then_some(true),
            ..VolumeMount::default()
        })
        .collect();
    mounts.push(VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..VolumeMount::default()
    });
    let run_as_user = opts.run_as_user.unwrap_or(defaults.run_as_user);
    let backoff_limit = opts.backoff_limit.unwrap_or(defaults.backoff_limit);
    let parts = match inv.share {
        Share::Parts { workers } => Some(workers),
        _ => None,
    };
    let container = Container {
        name: CONTAINER.into(),
        image: Some(opts.image.clone().unwrap_or_else(|| defaults.image.clone())),
        image_pull_policy: opts
            .image_pull_policy
            .clone()
            .or_else(|| defaults.image_pull_policy.clone()),
        command: Some(vec![defaults.command.clone()]),
        args: Some(inv.argv()),
        env: (!inv.env.is_empty()).then(|| {
            inv.env
                .iter()
                .map(|(k, v)| EnvVar {
                    name: k.clone(),
                    value: Some(v.clone()),
                    ..EnvVar::default()
                })
                .collect()
        }),
        resources: opts.resources.clone(),
        volume_mounts: Some(mounts),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(run_as_user),
            run_as_group: Some(opts.run_as_group.unwrap_or(run_as_user)),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        restart_policy: Some("Never".into()),
        volumes: Some(volumes),
        service_account_name: opts
            .service_account_name
            .clone()
            .or_else(|| defaults.service_account.clone()),
        automount_service_account_token: Some(false),
        node_selector: opts.node_selector.clone(),
        tolerations: opts.tolerations.clone(),
        image_pull_secrets: opts.image_pull_secrets.clone(),
        priority_class_name: opts.priority_class_name.clone(),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            fs_group: opts.fs_group,
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        ..PodSpec::default()
    };
    Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: cr.namespace(),
            labels: Some(labels.clone()),
            annotations: defaults
                .created_by
                .as_ref()
                .map(|who| BTreeMap::from([(CREATED_BY_ANNOTATION.to_owned(), who.clone())])),
            owner_references: cr.controller_owner_ref(&()).map(|mut r| {
                // Deleting the resource waits for the Job's removal in foreground
                // deletions, as controller-runtime's owner references do.
                r.block_owner_deletion = Some(true);
                vec![r]
            }),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            backoff_limit: match inv.share {
                // Each part has its own retries; the Job's default then allows any
                // number in all.
                Share::Parts { .. } => None,
                _ => Some(backoff_limit),
            },
            completion_mode: parts.map(|_| "Indexed".to_owned()),
            completions: parts,
            parallelism: parts,
            backoff_limit_per_index: parts.map(|_| backoff_limit),
            max_failed_indexes: parts.map(|_| 0),
            ttl_seconds_after_finished: opts
                .ttl_seconds_after_finished
                .or(defaults.ttl_seconds_after_finished),
            active_deadline_seconds: opts.active_deadline_seconds,
            pod_failure_policy: Some(PodFailurePolicy {
                rules: vec![
                    // Bad input fails at once: the converter refused before writing.
                    PodFailurePolicyRule {
                        action: "FailJob".into(),
                        on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                            container_name: Some(CONTAINER.into()),
                            operator: "In".into(),
                            values: vec![EXIT_PREFLIGHT],
                        }),
                        ..PodFailurePolicyRule::default()
                    },
                    // A node going away is not the conversion's fault.
                    PodFailurePolicyRule {
                        action: "Ignore".into(),
                        on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                            type_: "DisruptionTarget".into(),
                            status: "True".into(),
                        }]),
                        ..PodFailurePolicyRule::default()
                    },
                ],
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_deterministic_and_short() {
        assert_eq!(job_name("sft-to-hf", 1), "sft-to-hf-g1");
        let long = "a".repeat(63);
        let n = job_name(&long, 12);
        assert!(n.len() <= 63, "{n}");
        assert!(n.ends_with("-g12"));
        assert_eq!(n, job_name(&long, 12));
        assert_ne!(job_name(&format!("{}b", "a".repeat(62)), 12), n);
        let parts = run_job_name(&long, 12, Share::Parts { workers: 128 });
        assert!(parts.len() + "-127".len() <= 63, "{parts}");
        let fin = run_job_name(
            &long,
            12,
            Share::Finalize {
                workers: 128,
                generation: 12,
            },
        );
        assert!(fin.len() <= 63 && fin.ends_with("-g12-finalize"), "{fin}");
        assert_eq!(
            run_job_name("sft-to-hf", 2, Share::Parts { workers: 3 }),
            "sft-to-hf-g2"
        );
    }

    /// The cleanup Job of a deleted split run mounts the target's directory only,
    /// runs `clean` on the target, and has no owner (it outlives the resource).
    #[test]
    fn the_cleanup_job_cleans_the_target_and_outlives_the_resource() {
        let cr = crate::fixtures::sft_to_hf();
        let job = cleanup(&cr, &crate::step::clean(&cr.spec), &JobDefaults::default());
        assert_eq!(job.metadata.name.as_deref(), Some("sft-to-hf-cleanup-u-1"));
        assert!(job.metadata.owner_references.is_none());
        assert_eq!(
            job.metadata.labels.as_ref().unwrap()[STAGE_LABEL],
            STAGE_CLEANUP
        );
        assert_eq!(
            job.metadata.labels.as_ref().unwrap()[CONVERSION_LABEL],
            "sft-to-hf"
        );
        let spec = job.spec.unwrap();
        assert_eq!(spec.ttl_seconds_after_finished, Some(CLEANUP_TTL_SECONDS));
        let pod = spec.template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.args.as_deref().unwrap(), ["clean", "/data/target/sft-hf"]);
        let mounts = c.volume_mounts.as_ref().unwrap();
        assert_eq!(mounts[0].mount_path, "/data/target");
        assert_eq!(mounts[0].sub_path.as_deref(), Some("output/convert"));
        assert_eq!(mounts[0].read_only, None);
        // The target claim and /tmp, nothing else.
        assert_eq!(pod.volumes.unwrap().len(), 2);
    }

    #[test]
    fn a_split_run_is_an_indexed_job_then_a_final_one() {
        let cr = crate::fixtures::sft_to_hf();
        let mut spec = cr.spec.clone();
        spec.workers = Some(3);
        let inv = crate::step::invocation(&spec).unwrap();
        let defaults = JobDefaults::default();
        let parts = build(&cr, &inv, &defaults);
        let js = parts.spec.as_ref().unwrap();
        assert_eq!(js.completion_mode.as_deref(), Some("Indexed"));
        assert_eq!((js.completions, js.parallelism), (Some(3), Some(3)));
        assert_eq!(js.backoff_limit_per_index, Some(defaults.backoff_limit));
        assert_eq!((js.max_failed_indexes, js.backoff_limit), (Some(0), None));
        let labels = parts.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[STAGE_LABEL], STAGE_PARTS);
        assert_eq!(labels[WORKERS_LABEL], "3");
        let pod = js.template.spec.as_ref().unwrap();
        let args = pod.containers[0].args.as_ref().unwrap();
        assert_eq!(
            args[args.len() - 2..],
            ["workers=3", "part=$(JOB_COMPLETION_INDEX)"]
        );
        let fin = build(
            &cr,
            &inv.with_share(Share::Finalize {
                workers: 3,
                generation: 1,
            }),
            &defaults,
        );
        assert_eq!(fin.metadata.name.as_deref(), Some("sft-to-hf-g1-finalize"));
        let js = fin.spec.as_ref().unwrap();
        assert_eq!(js.completion_mode, None);
        assert_eq!(js.backoff_limit, Some(defaults.backoff_limit));
        let labels = fin.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[STAGE_LABEL], STAGE_FINALIZE);
        let args = js.template.spec.as_ref().unwrap().containers[0]
            .args
            .clone()
            .unwrap();
        assert_eq!(args[args.len() - 2..], ["workers=3", "finalize=true"]);
    }
}
