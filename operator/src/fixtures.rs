//! Test builders shared by the unit tests of the decision code and the reconcile
//! shell.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{
    Artifact, ArtifactKind, BaseModel, CheckpointConversion, CheckpointConversionSpec,
};

/// A time `secs` seconds after the epoch.
pub fn at(secs: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
}

/// `sft-to-hf` in namespace `training`, generation 1, uid `u-1`: a Megatron
/// checkpoint on `lustre-shared` exported to Hugging Face next to it, with the base
/// model on `models`.
pub fn sft_to_hf() -> CheckpointConversion {
    let mut c = CheckpointConversion::new(
        "sft-to-hf",
        CheckpointConversionSpec {
            source: Artifact {
                kind: ArtifactKind::CheckpointMegatron,
                pvc: "lustre-shared".into(),
                path: "output/sft/iter_0000100".into(),
            },
            target: Artifact {
                kind: ArtifactKind::CheckpointHf,
                pvc: "lustre-shared".into(),
                path: "output/convert/sft-hf".into(),
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
            parameters: None,
            job: None,
            retry: None,
            workers: None,
        },
    );
    c.metadata.namespace = Some("training".into());
    c.metadata.generation = Some(1);
    c.metadata.uid = Some("u-1".into());
    c
}
