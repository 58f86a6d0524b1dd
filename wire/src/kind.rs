//! Artifact kinds, in the vocabulary of the training pipelines
//! (`checkpoint_hf`, `checkpoint_megatron`, `checkpoint_lora`).

use serde::{Deserialize, Serialize};

/// What a checkpoint directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    /// A Hugging Face safetensors directory.
    CheckpointHf,
    /// A Megatron-Core `torch_dist` checkpoint (an `iter_*` directory as source; a
    /// run directory or `iter_*` path as target).
    CheckpointMegatron,
    /// A LoRA adapter (PEFT directory or Megatron-Bridge adapter checkpoint).
    CheckpointLora,
}

impl ArtifactKind {
    /// Every kind.
    pub const ALL: [ArtifactKind; 3] = [
        ArtifactKind::CheckpointHf,
        ArtifactKind::CheckpointMegatron,
        ArtifactKind::CheckpointLora,
    ];

    /// The vocabulary name (`checkpoint_hf`).
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::CheckpointHf => "checkpoint_hf",
            ArtifactKind::CheckpointMegatron => "checkpoint_megatron",
            ArtifactKind::CheckpointLora => "checkpoint_lora",
        }
    }

    /// The kind named `name`.
    pub fn from_name(name: &str) -> Option<ArtifactKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl std::fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        for k in ArtifactKind::ALL {
            assert_eq!(ArtifactKind::from_name(k.as_str()), Some(k));
            assert_eq!(
                serde_json::to_value(k).unwrap(),
                serde_json::Value::String(k.as_str().into())
            );
        }
        assert_eq!(ArtifactKind::from_name("checkpoint"), None);
    }
}
