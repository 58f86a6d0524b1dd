//! The checked-in CRD is what the Rust types generate, and its CEL rules say what
//! the documentation says (checked locally here; the apiserver enforces them in
//! the control-plane tests).

use ckpt_operator::api::{ArtifactKind, CheckpointConversion, CheckpointConversionSpec};
use ckpt_wire::Step;
use kube::CustomResourceExt;
use serde_json::json;

#[test]
fn checked_in_crd_matches_the_types() {
    let generated = serde_yaml_ng::to_string(&CheckpointConversion::crd()).unwrap();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/checkpointconversions.ckpt.dev.yaml"
    );
    let checked_in = std::fs::read_to_string(path).unwrap();
    assert!(
        generated == checked_in,
        "crds/checkpointconversions.ckpt.dev.yaml is out of date: run `cargo run -p ckpt-operator --bin crdgen > crds/checkpointconversions.ckpt.dev.yaml`"
    );
}

fn spec() -> serde_json::Value {
    json!({
        "source": {"kind": "checkpoint_megatron", "pvc": "lustre-shared", "path": "output/sft/iter_0000100"},
        "target": {"kind": "checkpoint_hf", "pvc": "lustre-shared", "path": "output/convert/sft-hf"},
        "baseModel": {"pvc": "models", "path": "hf/base"},
        "dtype": "bfloat16"
    })
}

fn check(new: &serde_json::Value, old: Option<&serde_json::Value>) -> Result<(), String> {
    CheckpointConversionSpec::validate_cel(new, old).map_err(|e| e.to_string())
}

#[test]
fn cel_rules_accept_the_documented_example() {
    check(&spec(), None).unwrap();
}

#[test]
fn cel_rules_refuse_what_the_issue_lists() {
    let mut inside = spec();
    inside["target"]["path"] = json!("output/sft/iter_0000100/hf");
    assert!(
        check(&inside, None)
            .unwrap_err()
            .contains("must not equal, be inside, or contain source.path")
    );
    let mut same = spec();
    same["target"]["path"] = json!("output/sft/iter_0000100");
    assert!(check(&same, None).is_err());
    // Same path on another claim is fine.
    let mut other_claim = same.clone();
    other_claim["target"]["pvc"] = json!("scratch");
    check(&other_claim, None).unwrap();
    let mut lora = spec();
    lora["lora"] = json!({"backend": "hf_peft"});
    assert!(
        check(&lora, None)
            .unwrap_err()
            .contains("lora is only valid with a checkpoint_lora source")
    );
    let mut pair = spec();
    pair["target"]["kind"] = json!("checkpoint_megatron");
    assert!(check(&pair, None).unwrap_err().contains("no step converts"));
    let mut no_base = spec();
    no_base.as_object_mut().unwrap().remove("baseModel");
    assert!(
        check(&no_base, None)
            .unwrap_err()
            .contains("baseModel is required")
    );
}

/// The CEL rule on kind pairs is the converter's step table, spelled for the
/// apiserver: it accepts exactly the pairs a step converts.
#[test]
fn cel_kind_pairs_are_the_converter_steps() {
    for source in ArtifactKind::ALL {
        for target in ArtifactKind::ALL {
            let mut s = spec();
            s["source"]["kind"] = json!(source);
            s["target"]["kind"] = json!(target);
            if source == ArtifactKind::CheckpointLora {
                s["lora"] = json!({"backend": "hf_peft"});
            }
            let accepted = match check(&s, None) {
                Ok(()) => true,
                Err(e) if e.contains("no step converts") => false,
                Err(e) => panic!("{source} → {target}: {e}"),
            };
            assert_eq!(
                accepted,
                Step::for_kinds(source, target).is_some(),
                "{source} → {target}"
            );
        }
    }
}

#[test]
fn output_defining_fields_are_immutable_and_job_knobs_are_not() {
    let old = spec();
    let mut new = spec();
    new["dtype"] = json!("float32");
    assert!(
        check(&new, Some(&old))
            .unwrap_err()
            .contains("dtype is immutable")
    );
    let mut new = spec();
    new["target"]["path"] = json!("output/convert/other");
    assert!(
        check(&new, Some(&old))
            .unwrap_err()
            .contains("target is immutable")
    );
    let mut new = spec();
    new["job"] = json!({"backoffLimit": 4});
    check(&new, Some(&old)).unwrap();
    let mut old = spec();
    old["parameters"] = json!({"keep_fp32": "false"});
    let mut new = old.clone();
    new["parameters"]["keep_fp32"] = json!("true");
    assert!(
        check(&new, Some(&old))
            .unwrap_err()
            .contains("parameters is immutable")
    );
}

/// Regression (issue 10, finding 2): a rule on an optional field runs only when an
/// old value exists, so the parent compares presence, for every optional field that
/// defines the output.
#[test]
fn optional_output_fields_can_be_neither_added_nor_removed() {
    let old = spec();
    for (field, value) in [
        ("lora", json!({"backend": "hf_peft"})),
        ("parallelism", json!({"tp": 2})),
        ("validation", json!({"enabled": false})),
        ("parameters", json!({"keep_fp32": "false"})),
    ] {
        let mut new = spec();
        new[field] = value.clone();
        let err = check(&new, Some(&old)).unwrap_err();
        assert!(
            err.contains(&format!("{field} is immutable")),
            "{field}: {err}"
        );
        // And once set at creation, it cannot go.
        let mut with = spec();
        with[field] = value;
        let err = check(&spec(), Some(&with)).unwrap_err();
        assert!(
            err.contains(&format!("{field} is immutable")),
            "{field}: {err}"
        );
    }
    for field in ["baseModel", "dtype"] {
        let mut new = spec();
        new.as_object_mut().unwrap().remove(field);
        let err = check(&new, Some(&old)).unwrap_err();
        assert!(
            err.contains(&format!("{field} is immutable")),
            "{field}: {err}"
        );
    }
    // retry only goes up; job settings and a first retry are free.
    let mut raised = spec();
    raised["retry"] = json!(2);
    check(&raised, Some(&old)).unwrap();
    let mut lowered = spec();
    lowered["retry"] = json!(1);
    assert!(
        check(&lowered, Some(&raised))
            .unwrap_err()
            .contains("retry may only be raised")
    );
    assert!(check(&spec(), Some(&raised)).is_err());
}

#[test]
fn crd_schema_bounds_strings_and_lists_for_cel_cost() {
    let crd = serde_json::to_value(CheckpointConversion::crd()).unwrap();
    let props = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(props["source"]["properties"]["path"]["maxLength"], 1024);
    assert_eq!(props["target"]["properties"]["pvc"]["maxLength"], 253);
    assert_eq!(props["parallelism"]["properties"]["tp"]["minimum"], 1.0);
    let status = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
    assert_eq!(status["conditions"]["x-kubernetes-list-type"], "map");
    // kubectl get shows why and what, not only the phase.
    let columns: Vec<&str> = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["jsonPath"].as_str().unwrap())
        .collect();
    for path in [".status.phase", ".status.reason", ".status.message"] {
        assert!(columns.contains(&path), "{columns:?}");
    }
}
