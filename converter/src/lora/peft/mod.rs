//! PEFT LoRA adapter directories (`docs/lora.md#peft-adapter-directories`): which
//! directory `lora_checkpoint` means, `adapter_config.json` with PEFT's defaults
//! and matching rules, and the keys of `adapter_model.safetensors`.
//!
//! Matching follows the PEFT version the interop suite pins (0.21.2):
//! `target_modules` (list: exact name or `.`-suffix, then the layer filter; string:
//! a regular expression matched against the whole name), `exclude_modules`
//! (same forms, checked first), modules inside `modules_to_save` never carry
//! LoRA, `layers_to_transform` with the first numbered segment (or the one after
//! a `layers_pattern`), and `rank_pattern`/`alpha_pattern` as the first key in
//! JSON order whose `(.*\.)?(KEY)$` matches. Patterns are Python regular
//! expressions, evaluated with a backtracking engine ([`PyRegex`]) that has
//! Python `re`'s look-around and back-references.

mod config;
mod dir;
pub mod plan;
mod weights;

pub use config::{AdapterConfig, Bias, PyRegex, Targets, TokenIndices, default_targets};
pub use dir::{Resolved, resolve, step_of};
pub use weights::{AdapterWeights, Keys, Part, Replacement, classify};

/// The adapter's configuration file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The legacy pickled weights (`safe_serialization=False`), never read.
pub const PICKLED_WEIGHTS_FILE: &str = "adapter_model.bin";
/// The prefix of every saved key (`PeftModel` → `LoraModel` → the transformers model).
pub const KEY_PREFIX: &str = "base_model.model.";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::LoraError;
    use std::path::Path;

    fn cfg(json: serde_json::Value) -> Result<AdapterConfig, LoraError> {
        let mut obj = json.as_object().unwrap().clone();
        obj.insert("peft_type".into(), "LORA".into());
        AdapterConfig::from_json(Path::new("adapter_config.json"), &obj)
    }

    #[test]
    fn list_targets_match_exact_names_and_dotted_suffixes() {
        let c =
            cfg(serde_json::json!({"target_modules": ["q_proj", "model.layers.1.mlp.up_proj"]}))
                .unwrap();
        let t = |m: &str| c.targets(m, true, "llama").unwrap();
        assert!(t("model.layers.0.self_attn.q_proj"));
        assert!(!t("model.layers.0.self_attn.qq_proj"));
        assert!(t("model.layers.1.mlp.up_proj"));
        assert!(!t("model.layers.0.mlp.up_proj"));
    }

    #[test]
    fn regex_targets_match_the_whole_name() {
        let c = cfg(serde_json::json!({"target_modules": r".*\.(q|v)_proj"})).unwrap();
        assert!(
            c.targets("model.layers.0.self_attn.q_proj", true, "llama")
                .unwrap()
        );
        assert!(
            !c.targets("model.layers.0.self_attn.q_proj.x", true, "llama")
                .unwrap()
        );
        assert!(
            !c.targets("model.layers.0.self_attn.k_proj", true, "llama")
                .unwrap()
        );
    }

    #[test]
    fn exclusions_modules_to_save_and_layer_filters() {
        let c = cfg(serde_json::json!({
            "target_modules": ["q_proj", "v_proj", "lm_head"],
            "exclude_modules": ["model.layers.2.self_attn.q_proj"],
            "modules_to_save": ["lm_head"],
            "layers_to_transform": [0, 2],
        }))
        .unwrap();
        let t = |m: &str| c.targets(m, true, "llama").unwrap();
        assert!(t("model.layers.0.self_attn.q_proj"));
        assert!(
            !t("model.layers.1.self_attn.q_proj"),
            "layer 1 is not transformed"
        );
        assert!(!t("model.layers.2.self_attn.q_proj"), "excluded");
        assert!(t("model.layers.2.self_attn.v_proj"));
        assert!(!t("lm_head"), "inside modules_to_save");
        // A layers_pattern picks the number after it (and accepts a root-level list).
        let c = cfg(serde_json::json!({
            "target_modules": ["w"], "layers_to_transform": 3, "layers_pattern": "blocks",
        }))
        .unwrap();
        assert!(c.targets("encoder.layers.1.blocks.3.w", true, "x").unwrap());
        assert!(c.targets("blocks.3.w", true, "x").unwrap());
        assert!(!c.targets("encoder.layers.3.blocks.1.w", true, "x").unwrap());
    }

    #[test]
    fn patterns_take_the_first_match_in_json_order() {
        let c = cfg(serde_json::json!({
            "r": 8, "lora_alpha": 16,
            "rank_pattern": {"q_proj": 4, r"layers\.0\.self_attn\.q_proj": 2},
            "alpha_pattern": {r"layers\.0\..*": 3},
        }))
        .unwrap();
        assert_eq!(
            c.rank_and_alpha("model.layers.0.self_attn.q_proj").unwrap(),
            (4, 3.0)
        );
        assert_eq!(
            c.rank_and_alpha("model.layers.1.self_attn.v_proj").unwrap(),
            (8, 16.0)
        );
        // "^q_proj" never matches a nested module: the ^ only fits an empty prefix.
        let c = cfg(serde_json::json!({"rank_pattern": {"^q_proj": 2}})).unwrap();
        assert_eq!(
            c.rank_and_alpha("model.layers.0.self_attn.q_proj")
                .unwrap()
                .0,
            8
        );
        // rslora.
        let c = cfg(serde_json::json!({"r": 16, "lora_alpha": 8, "use_rslora": true})).unwrap();
        assert_eq!(c.scale("m").unwrap().2, 2.0);
    }

    #[test]
    fn unsupported_patterns_and_variants_are_refused_with_the_reason() {
        // Python re syntax is evaluated now; only what is not a pattern is refused.
        assert!(cfg(serde_json::json!({"rank_pattern": {r"(a)\1": 2}})).is_ok());
        let e = cfg(serde_json::json!({"rank_pattern": {"(a": 2}})).unwrap_err();
        assert!(e.to_string().contains("is not a regular expression"), "{e}");
        for (k, v, says) in [
            (
                "layer_replication",
                serde_json::json!([[0, 2]]),
                "layer_replication",
            ),
            (
                "init_lora_weights",
                serde_json::json!("pissa_niter_4"),
                "rewrites the base",
            ),
            (
                "init_lora_weights",
                serde_json::json!("loftq"),
                "rewrites the base",
            ),
            (
                "init_lora_weights",
                serde_json::json!("olora"),
                "rewrites the base",
            ),
            ("use_qalora", serde_json::json!(true), "QALoRA"),
            ("task_type", serde_json::json!("SEQ_CLS"), "classification"),
        ] {
            let e = cfg(serde_json::json!({ k: v })).unwrap_err();
            assert!(e.to_string().contains(says), "{k}: {e}");
        }
        let mut obj = serde_json::Map::new();
        obj.insert("peft_type".into(), "IA3".into());
        let e = AdapterConfig::from_json(Path::new("a"), &obj).unwrap_err();
        assert!(e.to_string().contains("only LoRA"), "{e}");
        // Harmless values of the same fields are accepted.
        cfg(serde_json::json!({"init_lora_weights": "gaussian", "layer_replication": null, "use_qalora": false})).unwrap();
    }

    #[test]
    fn keys_are_sorted_into_lora_tensors_and_replacements() {
        let names = [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "base_model.model.model.embed_tokens.base_layer.weight",
            "base_model.model.lm_head.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias",
        ];
        let k = classify(Path::new("a"), &names).unwrap();
        assert_eq!(k.modules["model.layers.0.self_attn.q_proj"][&Part::B], 1);
        assert_eq!(k.modules["model.embed_tokens"][&Part::EmbeddingA], 2);
        let targets: Vec<(&str, bool)> = k
            .replacements
            .iter()
            .map(|r| (r.target.as_str(), r.base_layer))
            .collect();
        assert_eq!(
            targets,
            vec![
                ("model.embed_tokens.weight", true),
                ("lm_head.weight", false),
                ("model.layers.0.self_attn.q_proj.bias", true)
            ]
        );
        // target_parameters: one wrapper per parameter, the inner ones under base_layer.
        let k = classify(
            Path::new("a"),
            &[
                "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight",
                "base_model.model.model.layers.0.mlp.experts.lora_B.weight",
            ],
        )
        .unwrap();
        assert_eq!(k.nested["model.layers.0.mlp.experts"][&1][&Part::A], 0);
        assert_eq!(k.modules["model.layers.0.mlp.experts"][&Part::B], 1);
        let e = classify(
            Path::new("a"),
            &["base_model.model.m.base_layer.q.lora_A.weight"],
        )
        .unwrap_err();
        assert!(e.to_string().contains("base layer"), "{e}");
        let e = classify(Path::new("a"), &["model.layers.0.q.lora_A.weight"]).unwrap_err();
        assert!(e.to_string().contains("base_model.model."), "{e}");
        let e = classify(Path::new("a"), &["base_model.model.x.lora_E"]).unwrap_err();
        assert!(e.to_string().contains("does not merge"), "{e}");
    }

    #[test]
    fn steps_come_from_checkpoint_names() {
        assert_eq!(step_of(Path::new("checkpoint-1000")), Some(1000));
        assert_eq!(
            step_of(Path::new("run/checkpoint-500/my_adapter")),
            Some(500)
        );
        assert_eq!(step_of(Path::new("global_step300")), Some(300));
        assert_eq!(step_of(Path::new("final")), None);
    }

    #[test]
    fn target_patterns_have_python_re_semantics() {
        let c = cfg(serde_json::json!({"target_modules": r".*(?<!k)_proj"})).unwrap();
        let t = |m: &str| c.targets(m, true, "llama").unwrap();
        assert!(t("model.layers.0.self_attn.q_proj"));
        assert!(t("model.layers.0.mlp.up_proj"));
        assert!(!t("model.layers.0.self_attn.k_proj"));
        // A back-reference: the layer digit must not reappear.
        let c = cfg(serde_json::json!({"target_modules": r".*layers\.(\d)\.x(?!\1)\d"})).unwrap();
        assert!(c.targets("m.layers.1.x2", true, "llama").unwrap());
        assert!(!c.targets("m.layers.1.x1", true, "llama").unwrap());
        let bad = cfg(serde_json::json!({"target_modules": "(unclosed"}));
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("is not a regular expression")
        );
    }
}
