//! Prints the CustomResourceDefinition of `CheckpointConversion` as YAML, the file
//! checked in under `crds/`.

use ckpt_operator::api::CheckpointConversion;
use kube::CustomResourceExt;

fn main() {
    print!(
        "{}",
        serde_yaml_ng::to_string(&CheckpointConversion::crd()).expect("the CRD serializes")
    );
}
