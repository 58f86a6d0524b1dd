//! `adapter_model.safetensors` and the roles of its keys.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::{CONFIG_FILE, KEY_PREFIX, PICKLED_WEIGHTS_FILE, WEIGHTS_FILE};
use crate::formats::safetensors;
use crate::formats::source::{Files, GlobalTensor};
use crate::lora::LoraError;
use crate::plan::TensorStore;

/// The adapter's weights, opened for reading (a store of the merge plan).
#[derive(Debug)]
pub struct AdapterWeights {
    /// The weights file.
    pub path: PathBuf,
    /// The mapped file.
    pub files: Files,
    /// Its tensors, in offset order.
    pub tensors: Vec<GlobalTensor>,
    /// Name → index in `tensors`.
    pub by_name: HashMap<String, usize>,
    /// The header bytes (for the provenance digest).
    pub header: Vec<u8>,
}

impl AdapterWeights {
    /// Opens `dir/adapter_model.safetensors`.
    ///
    /// # Errors
    /// [`LoraError::Refused`] when only the pickled `adapter_model.bin` is there
    /// (never unpickled: a pickle can run code) or no weights at all; a format
    /// error for a broken safetensors file.
    pub fn open(dir: &Path) -> Result<AdapterWeights, LoraError> {
        let path = dir.join(WEIGHTS_FILE);
        if !path.is_file() {
            let pickled = dir.join(PICKLED_WEIGHTS_FILE);
            let why = if pickled.is_file() {
                format!(
                    "holds {PICKLED_WEIGHTS_FILE} (a pickle, saved with safe_serialization=False) and no {WEIGHTS_FILE}: pickles can run code when loaded and are never read here; re-save the adapter with save_pretrained(safe_serialization=True)"
                )
            } else {
                format!("expected {WEIGHTS_FILE} next to {CONFIG_FILE}, found none")
            };
            return Err(LoraError::Refused {
                path: dir.to_owned(),
                why,
            });
        }
        let mut files = Files::default();
        let (id, file) = safetensors::open(&mut files, &path)
            .map_err(|e| LoraError::Unreadable(e.to_string()))?;
        let header = files.get(id).bytes()[..file.header_len as usize].to_vec();
        let by_name = file
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(AdapterWeights {
            path,
            files,
            tensors: file.tensors,
            by_name,
            header,
        })
    }
}

impl TensorStore for AdapterWeights {
    fn files(&self) -> &Files {
        &self.files
    }
    fn tensors(&self) -> &[GlobalTensor] {
        &self.tensors
    }
    fn label(&self) -> &str {
        "adapter"
    }
}

/// A LoRA tensor's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    /// `lora_A.weight`, `[r, in]`.
    A,
    /// `lora_B.weight`, `[out, r]`.
    B,
    /// `lora_B.bias`, `[out]` (`lora_bias`).
    BBias,
    /// `lora_embedding_A`, `[r, vocab]`.
    EmbeddingA,
    /// `lora_embedding_B`, `[dim, r]`.
    EmbeddingB,
    /// `lora_magnitude_vector` (DoRA).
    Magnitude,
    /// `token_adapter.trainable_tokens_delta`, `[rows, dim]`.
    TokensDelta,
}

const SUFFIXES: [(&str, Part); 7] = [
    (".lora_A.weight", Part::A),
    (".lora_B.weight", Part::B),
    (".lora_B.bias", Part::BBias),
    (".lora_embedding_A", Part::EmbeddingA),
    (".lora_embedding_B", Part::EmbeddingB),
    (".lora_magnitude_vector", Part::Magnitude),
    (".token_adapter.trainable_tokens_delta", Part::TokensDelta),
];

/// A saved tensor that replaces a base tensor whole (`modules_to_save`, saved
/// embedding layers, trained biases).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replacement {
    /// Index of the adapter tensor.
    pub tensor: usize,
    /// The base tensor it replaces (key without `base_model.model.` and `.base_layer`).
    pub target: String,
    /// The module whose parameter it is.
    pub module: String,
    /// Whether the key had `.base_layer` (the base weight under a LoRA wrapper,
    /// loaded into the base parameter itself).
    pub base_layer: bool,
}

/// The adapter's keys, sorted by role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keys {
    /// Module path → its LoRA tensors (adapter tensor indices).
    pub modules: BTreeMap<String, BTreeMap<Part, usize>>,
    /// Whole-tensor replacements.
    pub replacements: Vec<Replacement>,
    /// LoRA tensors of nested parameter wrappers (`target_parameters`): module
    /// path → nesting depth (≥ 1) → its tensors.
    pub nested: BTreeMap<String, BTreeMap<usize, BTreeMap<Part, usize>>>,
}

/// Sorts the adapter's tensor names (`names[i]` is tensor `i`) into LoRA tensors
/// per module and replacements, after removing `base_model.model.`.
///
/// # Errors
/// [`LoraError::Refused`] naming `path` and the key: a key without the prefix, a
/// LoRA key of another method (`lora_E`), or one of a module wrapper's internals.
pub fn classify(path: &Path, names: &[&str]) -> Result<Keys, LoraError> {
    let mut keys = Keys::default();
    for (i, name) in names.iter().enumerate() {
        let refuse = |why: String| LoraError::Refused {
            path: path.to_owned(),
            why: format!("tensor {name:?}: {why}"),
        };
        let rest = name.strip_prefix(KEY_PREFIX).ok_or_else(|| {
            refuse(format!(
                "expected every key to start with {KEY_PREFIX:?} (as PeftModel.save_pretrained writes them)"
            ))
        })?;
        if let Some((module, part)) = SUFFIXES
            .iter()
            .find_map(|(s, p)| rest.strip_suffix(s).map(|m| (m, *p)))
        {
            // `target_parameters` nests one wrapper per adapted parameter of a
            // module: the k-th inner one is under k `.base_layer`s.
            let mut module = module;
            let mut depth = 0usize;
            while let Some(m) = module.strip_suffix(".base_layer") {
                module = m;
                depth += 1;
            }
            if module.contains(".base_layer.") {
                return Err(refuse(
                    "is a LoRA tensor inside a wrapped module's base layer, which PEFT does not write"
                        .into(),
                ));
            }
            let slot = if depth == 0 {
                keys.modules.entry(module.to_owned()).or_default()
            } else {
                keys.nested
                    .entry(module.to_owned())
                    .or_default()
                    .entry(depth)
                    .or_default()
            };
            if slot.insert(part, i).is_some() {
                return Err(refuse("appears twice".into()));
            }
            continue;
        }
        if rest.contains(".lora_") || rest.starts_with("lora_") {
            return Err(refuse(
                "is a LoRA tensor of a kind this converter does not merge (expected lora_A.weight, lora_B.weight, lora_B.bias, lora_embedding_A/B, lora_magnitude_vector)".into(),
            ));
        }
        if rest.contains(".modules_to_save.") || rest.contains(".original_module.") {
            return Err(refuse(
                "names a modules_to_save wrapper's internals, which PEFT never saves".into(),
            ));
        }
        let (param_path, param) = rest.rsplit_once('.').unwrap_or(("", rest));
        let (module, base_layer) = match param_path.strip_suffix(".base_layer") {
            Some(m) => (m, true),
            None => (param_path, false),
        };
        let target = if module.is_empty() {
            param.to_owned()
        } else {
            format!("{module}.{param}")
        };
        keys.replacements.push(Replacement {
            tensor: i,
            target,
            module: module.to_owned(),
            base_layer,
        });
    }
    Ok(keys)
}
