//! The steps, named as users type them (`convert/hf_to_megatron`), and which
//! artifact kinds each reads and writes.

use crate::kind::ArtifactKind;
use crate::params::{self, Param};

/// A step of `ckpt-convert run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    /// `convert/hf_to_megatron`.
    HfToMegatron,
    /// `convert/megatron_to_hf`.
    MegatronToHf,
    /// `convert/merge_lora`.
    MergeLora,
    /// `convert/validate`.
    Validate,
}

impl Step {
    /// Every step, in the order help lists them.
    pub const ALL: [Step; 4] = [
        Step::HfToMegatron,
        Step::MegatronToHf,
        Step::MergeLora,
        Step::Validate,
    ];

    /// The name users type.
    pub fn name(self) -> &'static str {
        match self {
            Step::HfToMegatron => "convert/hf_to_megatron",
            Step::MegatronToHf => "convert/megatron_to_hf",
            Step::MergeLora => "convert/merge_lora",
            Step::Validate => "convert/validate",
        }
    }

    /// The step named `name`.
    pub fn from_name(name: &str) -> Option<Step> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// What the step does, in one line.
    pub fn summary(self) -> &'static str {
        match self {
            Step::HfToMegatron => {
                "a Hugging Face directory into a Megatron-Core torch_dist checkpoint, as Megatron-Bridge's import writes it"
            }
            Step::MegatronToHf => {
                "a Megatron-Core iteration into a Hugging Face directory rebuilt around hf_model_id"
            }
            Step::MergeLora => {
                "a LoRA adapter merged into the base it was trained on (PEFT into HF, Megatron-Bridge into Megatron with an HF export)"
            }
            Step::Validate => {
                "check a published output: complete, matching its manifest, finite, and its forward pass against a reference"
            }
        }
    }

    /// The parameters the step takes.
    pub fn params(self) -> &'static [Param] {
        match self {
            Step::HfToMegatron => params::HF_TO_MEGATRON,
            Step::MegatronToHf => params::MEGATRON_TO_HF,
            Step::MergeLora => params::MERGE_LORA,
            Step::Validate => params::VALIDATE,
        }
    }

    /// The parameter named `name` (or spelled by its alias).
    pub fn param(self, name: &str) -> Option<&'static Param> {
        self.params()
            .iter()
            .find(|p| p.name == name || p.alias == Some(name))
    }

    /// The step that turns a `source` artifact into a `target` one.
    pub fn for_kinds(source: ArtifactKind, target: ArtifactKind) -> Option<Step> {
        match (source, target) {
            (ArtifactKind::CheckpointHf, ArtifactKind::CheckpointMegatron) => {
                Some(Step::HfToMegatron)
            }
            (ArtifactKind::CheckpointMegatron, ArtifactKind::CheckpointHf) => {
                Some(Step::MegatronToHf)
            }
            (ArtifactKind::CheckpointLora, ArtifactKind::CheckpointHf) => Some(Step::MergeLora),
            _ => None,
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in Step::ALL {
            assert_eq!(Step::from_name(s.name()), Some(s));
        }
        assert_eq!(Step::from_name("convert/hf2megatron"), None);
    }

    #[test]
    fn every_kind_pair_has_at_most_one_step() {
        assert_eq!(
            Step::for_kinds(ArtifactKind::CheckpointLora, ArtifactKind::CheckpointHf),
            Some(Step::MergeLora)
        );
        assert_eq!(
            Step::for_kinds(ArtifactKind::CheckpointHf, ArtifactKind::CheckpointHf),
            None
        );
    }
}
