//! Example profiles, one per family, as `ckpt-convert profiles example` prints
//! them: Lepton and DGX Cloud are Kubernetes clusters (the operator runs the
//! conversion on the workspace's claim); Slurm runs it as a batch job on the shared
//! filesystem. The names are those the Nemotron conversion guide uses.

/// A family of example profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// DGX Cloud Lepton (Kubernetes).
    Lepton,
    /// DGX Cloud with Run:ai (Kubernetes).
    Dgxcloud,
    /// A Slurm cluster.
    Slurm,
}

impl Family {
    /// Every family, in the order they are printed.
    pub const ALL: [Family; 3] = [Family::Lepton, Family::Dgxcloud, Family::Slurm];

    /// `lepton`, `dgxcloud`, `slurm`.
    pub fn name(self) -> &'static str {
        match self {
            Family::Lepton => "lepton",
            Family::Dgxcloud => "dgxcloud",
            Family::Slurm => "slurm",
        }
    }

    /// The family named `name`.
    pub fn from_name(name: &str) -> Option<Family> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The conversion profile of the family (`lepton_convert_model`).
    pub fn profile(self) -> String {
        format!("{}_convert_model", self.name())
    }

    /// The profiles, as env.toml text.
    pub fn text(self) -> &'static str {
        match self {
            Family::Lepton => LEPTON,
            Family::Dgxcloud => DGXCLOUD,
            Family::Slurm => SLURM,
        }
    }
}

const LEPTON: &str = r#"# DGX Cloud Lepton: a Kubernetes cluster. The workspace (NEMOTRON_WORKSPACE, as the
# Nemotron profiles name it) is the claim "lustre-shared"; ckpt-operator runs the
# conversion there. Paths under the workspace become directories of the claim.
[lepton_base]
executor = "kubernetes"
description = "Lepton: a CheckpointConversion on the workspace's claim"
namespace = "training"
container_image = "ghcr.io/ckpt-dev/ckpt-convert:0.1.0"
mounts = [{ path = "${NEMOTRON_WORKSPACE:-/mnt/lustre-shared}", claim = "lustre-shared" }]
hf_home = "${NEMOTRON_WORKSPACE:-/mnt/lustre-shared}/hf"
node_selector = { "kubernetes.io/os" = "linux" }

[lepton_convert_model]
extends = "lepton_base"
description = "Lepton: checkpoint conversion (CPU only: no GPU is needed)"
resources = { requests = { cpu = "16", memory = "64Gi" }, limits = { memory = "64Gi" } }
"#;

const DGXCLOUD: &str = r#"# DGX Cloud (Run:ai): a Kubernetes cluster. The project's namespace holds the
# workspace claim, mounted at /workspace in the Nemotron profiles.
[dgxcloud_base]
executor = "kubernetes"
description = "DGX Cloud: a CheckpointConversion on the project's workspace claim"
namespace = "runai-my-project"
container_image = "ghcr.io/ckpt-dev/ckpt-convert:0.1.0"
mounts = [{ path = "/workspace", claim = "workspace-pvc" }]
hf_home = "/workspace/hf"

[dgxcloud_convert_model]
extends = "dgxcloud_base"
description = "DGX Cloud: checkpoint conversion (CPU only: no GPU is needed)"
resources = { requests = { cpu = "16", memory = "64Gi" }, limits = { memory = "64Gi" } }
"#;

const SLURM: &str = r#"# Slurm: a batch job on the shared filesystem, with the converter binary there (or
# container_image for sites with pyxis/enroot). Submitted with sbatch from this machine.
[slurm_base]
executor = "slurm"
description = "Slurm: a batch job on /lustre"
account = "my-account"
partition = "batch"
mounts = ["/lustre:/lustre"]
job_dir = "/lustre/${USER:-me}/ckpt-jobs"
hf_home = "/lustre/${USER:-me}/hf"
converter = "/lustre/${USER:-me}/bin/ckpt-convert"

[slurm_convert_model]
extends = "slurm_base"
description = "Slurm: checkpoint conversion (CPU only: no GPU is needed)"
time = "02:00:00"
cpus_per_task = 16
mem = "64G"
"#;

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::profile::{EnvFile, Executor};

    #[test]
    fn every_example_is_a_valid_profile_of_its_family() {
        for f in Family::ALL {
            let file = EnvFile::parse(Path::new("example.toml"), f.text()).unwrap();
            let p = file.profile(&f.profile()).unwrap();
            let want = match f {
                Family::Slurm => Executor::Slurm,
                _ => Executor::Kubernetes,
            };
            assert_eq!(p.executor, want, "{}", f.name());
            assert_eq!(p.extends, vec![format!("{}_base", f.name())]);
        }
        let all: String = Family::ALL
            .iter()
            .map(|f| f.text())
            .collect::<Vec<_>>()
            .join("\n");
        let file = EnvFile::parse(Path::new("example.toml"), &all).unwrap();
        assert_eq!(file.names().len(), 6);
    }
}
