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
use crate::step::Invocation;

/// Label on everything the operator creates for a conversion.
pub const CONVERSION_LABEL: &str = "ckpt.dev/conversion";
/// Label with the resource generation the Job was made for.
pub const GENERATION_LABEL: &str = "ckpt.dev/generation";
/// Label with the `spec.retry` the Job was made for: the run it belongs to.
pub const RETRY_LABEL: &str = "ckpt.dev/retry";
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
    let suffix = format!("-g{generation}");
    if resource.len() + suffix.len() <= 63 {
        return format!("{resource}{suffix}");
    }
    // Keep it unique when truncating: a short digest of the full name.
    let digest = resource.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let tag = format!("-{:08x}", digest as u32);
    let keep = 63 - suffix.len() - tag.len();
    let mut head = resource[..keep].trim_end_matches('-').to_owned();
    head.push_str(&tag);
    head.push_str(&suffix);
    head
}

/// Builds the Job that runs `inv` for `cr`.
pub fn build(cr: &CheckpointConversion, inv: &Invocation, defaults: &JobDefaults) -> Job {
    let generation = cr.metadata.generation.unwrap_or(1);
    let name = job_name(&cr.name_any(), generation);
    let opts = cr.spec.job.clone().unwrap_or_default();
    let labels = BTreeMap::from([
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
    let container = Container {
        name: CONTAINER.into(),
        image: Some(opts.image.clone().unwrap_or_else(|| defaults.image.clone())),
        image_pull_policy: opts
            .image_pull_policy
            .clone()
            .or_else(|| defaults.image_pull_policy.clone()),
        command: Some(vec![defaults.command.clone()]),
        args: Some(inv.args.clone()),
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
            backoff_limit: Some(opts.backoff_limit.unwrap_or(defaults.backoff_limit)),
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
    }
}
