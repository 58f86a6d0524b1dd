//! One table per step: every parameter it takes, what value it wants, its
//! default, whether it changes what is written, and its help line. The
//! converter parses and documents its command line from these tables and the
//! operator renders Job arguments with the names in [`names`].

/// The parameter names the operator renders, spelled once.
pub mod names {
    /// The HF model (directory or cached id).
    pub const HF_MODEL_ID: &str = "hf_model_id";
    /// A Megatron run or iteration directory.
    pub const MEGATRON_PATH: &str = "megatron_path";
    /// The HF directory written by `convert/megatron_to_hf`.
    pub const HF_PATH: &str = "hf_path";
    /// The adapter of `convert/merge_lora`.
    pub const LORA_CHECKPOINT: &str = "lora_checkpoint";
    /// The merge backend.
    pub const BACKEND: &str = "backend";
    /// The HF base of a PEFT merge.
    pub const BASE_HF_PATH: &str = "base_hf_path";
    /// The Megatron base of a Megatron-Bridge merge.
    pub const BASE_MEGATRON_PATH: &str = "base_megatron_path";
    /// The merged HF output.
    pub const OUTPUT_HF_PATH: &str = "output_hf_path";
    /// The merged Megatron output.
    pub const OUTPUT_MEGATRON_PATH: &str = "output_megatron_path";
    /// Whether a Megatron-Bridge merge is also exported to HF.
    pub const EXPORT_HF: &str = "export_hf";
    /// The base's expected weights digest.
    pub const BASE_DIGEST: &str = "base_digest";
    /// A differing base name becomes a warning.
    pub const ALLOW_BASE_MISMATCH: &str = "allow_base_mismatch";
    /// Parameter dtype.
    pub const DTYPE: &str = "dtype";
    /// Tensor parallel size.
    pub const TP: &str = "tp";
    /// Pipeline parallel size.
    pub const PP: &str = "pp";
    /// Expert parallel size.
    pub const EP: &str = "ep";
    /// Expert tensor parallel size.
    pub const ETP: &str = "etp";
    /// Validate before publishing.
    pub const VALIDATE: &str = "validate";
    /// The numeric smoke test.
    pub const SMOKE_TEST: &str = "smoke_test";
    /// The number of processes a split conversion runs in.
    pub const WORKERS: &str = "workers";
    /// The part of a split conversion this process writes.
    pub const PART: &str = "part";
    /// The last step of a split conversion.
    pub const FINALIZE: &str = "finalize";
}

/// What a parameter takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    /// A filesystem path.
    Path,
    /// A Hugging Face model: a directory, or a model id found offline in the cache.
    Model,
    /// Free text.
    Text,
    /// `true` or `false` (also `1/0`, `yes/no`).
    Bool,
    /// An integer of at least `min`.
    Int {
        /// The smallest value accepted.
        min: u64,
    },
    /// A size such as `5GB`, `500MB` or `2GiB`.
    Size,
    /// `bfloat16`, `float16` or `float32`; with `auto`, also `auto`.
    DType {
        /// `auto` is accepted (keep the source's dtypes).
        auto: bool,
    },
    /// One of a fixed set of words.
    Choice(&'static [&'static str]),
    /// A weights digest (32 hexadecimal digits, optionally after `xxh3:`).
    Digest,
    /// Comma-separated integers.
    Ints,
    /// Accepted so command lines written for the Python runners work; no effect.
    Ignored,
}

impl Value {
    /// A short description for help (`PATH`, `true|false`).
    pub fn describe(self) -> String {
        match self {
            Value::Path => "PATH".into(),
            Value::Model => "DIR|MODEL_ID".into(),
            Value::Text => "TEXT".into(),
            Value::Bool => "true|false".into(),
            Value::Int { min } => format!("N≥{min}"),
            Value::Size => "SIZE".into(),
            Value::DType { auto: false } => "bfloat16|float16|float32".into(),
            Value::DType { auto: true } => "auto|bfloat16|float16|float32".into(),
            Value::Choice(c) => c.join("|"),
            Value::Digest => "DIGEST".into(),
            Value::Ints => "N,N,…".into(),
            Value::Ignored => "(ignored)".into(),
        }
    }
}

/// What a parameter is to the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Names an input; its content defines the output.
    Input,
    /// Names the output.
    Output,
    /// Changes the bytes written.
    Shapes,
    /// Changes how the step runs or what it checks, never the bytes written.
    Runtime,
}

/// One parameter of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Param {
    /// The name (`hf_model_id`); also accepted as `--hf-model-id`.
    pub name: &'static str,
    /// Another accepted spelling (`torch_dtype` for `dtype`).
    pub alias: Option<&'static str>,
    /// What it takes.
    pub value: Value,
    /// The default, in words, when it has one.
    pub default: Option<&'static str>,
    /// Must be given (for `only`, when that applies).
    pub required: bool,
    /// `key=value` of another parameter this one belongs to (`backend=hf_peft`).
    pub only: Option<&'static str>,
    /// What it is to the output.
    pub role: Role,
    /// One line of help.
    pub help: &'static str,
}

impl Param {
    /// Whether the parameter changes what is written, so two runs that differ in it
    /// are different conversions.
    pub fn defines_output(&self) -> bool {
        matches!(self.role, Role::Input | Role::Shapes)
    }
}

const fn p(
    name: &'static str,
    value: Value,
    role: Role,
    default: Option<&'static str>,
    help: &'static str,
) -> Param {
    Param {
        name,
        alias: None,
        value,
        default,
        required: false,
        only: None,
        role,
        help,
    }
}

const fn required(mut param: Param) -> Param {
    param.required = true;
    param
}

const fn alias(mut param: Param, alias: &'static str) -> Param {
    param.alias = Some(alias);
    param
}

const fn only(mut param: Param, only: &'static str) -> Param {
    param.only = Some(only);
    param
}

const fn ignored(name: &'static str) -> Param {
    p(
        name,
        Value::Ignored,
        Role::Runtime,
        None,
        "accepted for command lines written for the Python runners; no effect",
    )
}

const VALIDATE_PARAM: Param = p(
    names::VALIDATE,
    Value::Bool,
    Role::Runtime,
    Some("true"),
    "validate the output before publishing it (false skips every check)",
);
const SMOKE_TEST: Param = p(
    names::SMOKE_TEST,
    Value::Bool,
    Role::Runtime,
    Some("true"),
    "include the numeric smoke test: a forward pass of source and output compared (LoRA merges: a probe of every merged tensor)",
);
const TP: Param = p(
    names::TP,
    Value::Int { min: 1 },
    Role::Shapes,
    Some("1"),
    "tensor parallel size the checkpoint is meant for (recorded in run_config.yaml; the tensors are stored whole)",
);
const PP: Param = p(
    names::PP,
    Value::Int { min: 1 },
    Role::Shapes,
    Some("1"),
    "pipeline parallel size (recorded in run_config.yaml)",
);
const EP: Param = p(
    names::EP,
    Value::Int { min: 1 },
    Role::Shapes,
    Some("1"),
    "expert parallel size (recorded in run_config.yaml; must divide the expert count)",
);
const ETP: Param = p(
    names::ETP,
    Value::Int { min: 1 },
    Role::Shapes,
    Some("1"),
    "expert tensor parallel size (recorded in run_config.yaml)",
);
const MAPPING: Param = p(
    "mapping",
    Value::Choice(&["auto", "identity"]),
    Role::Shapes,
    Some("auto"),
    "auto maps the architecture of config.json; identity copies tensors under their own names (a raw export)",
);
const ITERATION: Param = p(
    "iteration",
    Value::Int { min: 0 },
    Role::Shapes,
    Some("0"),
    "the iteration written when the Megatron path is a run directory",
);
const DISTCP_FILES: Param = p(
    "distcp_files",
    Value::Int { min: 1 },
    Role::Shapes,
    Some("2"),
    "number of .distcp data files (Megatron-Core's writer uses two per rank)",
);
const MAX_SHARD_SIZE: Param = p(
    "max_shard_size",
    Value::Size,
    Role::Shapes,
    Some("5GB"),
    "largest safetensors shard when the HF model's shard files are not mirrored",
);
const ALLOW_ROPE_MISMATCH: Param = p(
    "allow_rope_mismatch",
    Value::Bool,
    Role::Runtime,
    Some("false"),
    "convert a Llama 3 rope scaling whose low_freq_factor, high_freq_factor or original_max_position_embeddings Megatron-Core fixes to other values; the smoke test then compares both under Megatron-Core's values",
);
const WORKERS: Param = p(
    names::WORKERS,
    Value::Int { min: 1 },
    Role::Runtime,
    None,
    "split the conversion across N processes: with part=I, write only part I's output files into the target's shared staging directory; with finalize=true, check every part and publish; alone with --batch, N parts and the final step (spec.workers on Kubernetes, a job array and a final job on Slurm)",
);
const PART: Param = p(
    names::PART,
    Value::Int { min: 0 },
    Role::Runtime,
    None,
    "with workers=N, the part (0 ≤ I < N) this process writes: a disjoint, byte-balanced set of the planned output files",
);
const FINALIZE: Param = p(
    names::FINALIZE,
    Value::Bool,
    Role::Runtime,
    Some("false"),
    "with workers=N, after every part has run: check their completion records against the plan, write the side files and manifest, validate, publish (the bare word finalize also works)",
);
const KEEP_FP32: Param = p(
    "keep_fp32",
    Value::Bool,
    Role::Shapes,
    Some("true"),
    "tensors stored in float32 in a lower-precision source (router biases, Mamba A_log and D) stay float32; false casts them to dtype",
);

/// `convert/hf_to_megatron`.
pub const HF_TO_MEGATRON: &[Param] = &[
    required(p(
        names::HF_MODEL_ID,
        Value::Model,
        Role::Input,
        None,
        "the Hugging Face model: a directory, or a model id found offline in the HF cache (HF_HUB_CACHE, HF_HOME)",
    )),
    required(p(
        names::MEGATRON_PATH,
        Value::Path,
        Role::Output,
        None,
        "the run directory to write (iter_0000000/ and latest_checkpointed_iteration.txt inside), or a path ending in iter_NNNNNNN",
    )),
    alias(
        p(
            names::DTYPE,
            Value::DType { auto: false },
            Role::Shapes,
            Some("bfloat16"),
            "parameter dtype of the Megatron checkpoint",
        ),
        "torch_dtype",
    ),
    TP,
    PP,
    EP,
    ETP,
    p(
        "make_vocab_size_divisible_by",
        Value::Int { min: 1 },
        Role::Shapes,
        Some("no padding (Megatron-Bridge's rule)"),
        "pad the vocabulary to a multiple of this × tp, as a training recipe that derives the vocabulary from the tokenizer does",
    ),
    MAPPING,
    ITERATION,
    DISTCP_FILES,
    KEEP_FP32,
    ALLOW_ROPE_MISMATCH,
    VALIDATE_PARAM,
    SMOKE_TEST,
    WORKERS,
    PART,
    FINALIZE,
    ignored("trust_remote_code"),
    ignored("device_map"),
    ignored("distributed"),
];

/// `convert/megatron_to_hf`.
pub const MEGATRON_TO_HF: &[Param] = &[
    required(p(
        names::MEGATRON_PATH,
        Value::Path,
        Role::Input,
        None,
        "the iter_NNNNNNN directory to read",
    )),
    p(
        names::HF_MODEL_ID,
        Value::Model,
        Role::Input,
        None,
        "the HF model that supplies config.json, tokenizer and chat template, and the shard layout to mirror (required unless mapping=identity)",
    ),
    required(p(
        names::HF_PATH,
        Value::Path,
        Role::Output,
        None,
        "the Hugging Face directory to write",
    )),
    alias(
        p(
            names::DTYPE,
            Value::DType { auto: true },
            Role::Shapes,
            Some("bfloat16"),
            "dtype of the exported floating-point weights (auto keeps the checkpoint's)",
        ),
        "torch_dtype",
    ),
    p(
        names::TP,
        Value::Int { min: 1 },
        Role::Runtime,
        Some("1"),
        "accepted as Megatron-Bridge's export takes it; any saved layout is read",
    ),
    p(
        names::PP,
        Value::Int { min: 1 },
        Role::Runtime,
        Some("1"),
        "accepted as Megatron-Bridge's export takes it; any saved layout is read",
    ),
    p(
        names::EP,
        Value::Int { min: 1 },
        Role::Runtime,
        Some("1"),
        "accepted as Megatron-Bridge's export takes it; any saved layout is read",
    ),
    p(
        names::ETP,
        Value::Int { min: 1 },
        Role::Runtime,
        Some("1"),
        "accepted as Megatron-Bridge's export takes it; any saved layout is read",
    ),
    MAPPING,
    MAX_SHARD_SIZE,
    p(
        "mirror_shards",
        Value::Bool,
        Role::Shapes,
        Some("true"),
        "put each tensor in the shard file it has in hf_model_id's weights, as Megatron-Bridge does",
    ),
    KEEP_FP32,
    ALLOW_ROPE_MISMATCH,
    VALIDATE_PARAM,
    SMOKE_TEST,
    WORKERS,
    PART,
    FINALIZE,
    ignored("trust_remote_code"),
    ignored("show_progress"),
    ignored("strict"),
    ignored("distributed"),
    ignored("distributed_save"),
    ignored("save_every_n_ranks"),
    ignored("device_map"),
];

/// `convert/merge_lora`.
pub const MERGE_LORA: &[Param] = &[
    required(p(
        names::LORA_CHECKPOINT,
        Value::Path,
        Role::Input,
        None,
        "the adapter: a PEFT adapter directory (or a training output directory: the highest checkpoint-N is taken) or a Megatron-Bridge adapter checkpoint",
    )),
    p(
        names::BACKEND,
        Value::Choice(&["auto", "hf_peft", "megatron_bridge"]),
        Role::Shapes,
        Some("auto (megatron_bridge when base_megatron_path is given)"),
        "which LoRA implementation's merge is reproduced",
    ),
    p(
        names::BASE_DIGEST,
        Value::Digest,
        Role::Runtime,
        None,
        "the base's expected weights digest (from its ckpt-manifest.json); a base with another digest is refused",
    ),
    p(
        names::ALLOW_BASE_MISMATCH,
        Value::Bool,
        Role::Runtime,
        Some("false"),
        "a differing base model name becomes a warning (shapes and digests are never overridden)",
    ),
    alias(
        p(
            names::DTYPE,
            Value::DType { auto: true },
            Role::Runtime,
            Some("auto"),
            "must be the base's dtype: the merge keeps the base's dtypes, as PEFT's save_pretrained does",
        ),
        "torch_dtype",
    ),
    required(only(
        p(
            names::BASE_HF_PATH,
            Value::Model,
            Role::Input,
            None,
            "the Hugging Face base the adapter was trained on (a directory or a cached model id)",
        ),
        "backend=hf_peft",
    )),
    required(only(
        p(
            names::OUTPUT_HF_PATH,
            Value::Path,
            Role::Output,
            None,
            "the merged Hugging Face directory to write",
        ),
        "backend=hf_peft",
    )),
    required(only(
        p(
            names::BASE_MEGATRON_PATH,
            Value::Path,
            Role::Input,
            None,
            "the Megatron iter_* directory of the base the adapter was trained on",
        ),
        "backend=megatron_bridge",
    )),
    required(only(
        p(
            names::OUTPUT_MEGATRON_PATH,
            Value::Path,
            Role::Output,
            None,
            "the run or iter_* directory the merged Megatron checkpoint is written to",
        ),
        "backend=megatron_bridge",
    )),
    only(
        p(
            names::EXPORT_HF,
            Value::Bool,
            Role::Shapes,
            Some("true"),
            "also export the merged model to Hugging Face at output_hf_path",
        ),
        "backend=megatron_bridge",
    ),
    only(
        p(
            names::OUTPUT_HF_PATH,
            Value::Path,
            Role::Output,
            None,
            "the Hugging Face directory of the export (required with export_hf=true)",
        ),
        "backend=megatron_bridge",
    ),
    only(
        alias(
            p(
                names::HF_MODEL_ID,
                Value::Model,
                Role::Input,
                None,
                "the HF model whose config.json and tokenizer the export is built around",
            ),
            "hf_model_path",
        ),
        "backend=megatron_bridge",
    ),
    only(
        p(
            names::BASE_HF_PATH,
            Value::Model,
            Role::Input,
            None,
            "used as hf_model_id when that is not given",
        ),
        "backend=megatron_bridge",
    ),
    only(
        p(
            "merge_arithmetic",
            Value::Choice(&["param_dtype", "fp32"]),
            Role::Shapes,
            Some("param_dtype"),
            "param_dtype: product, scaling and sum each rounded to the parameter dtype, as Megatron-Bridge ≤ 0.4's merge_lora computes them; fp32: computed in float32 and rounded once, as Megatron-Bridge ≥ 0.5",
        ),
        "backend=megatron_bridge",
    ),
    only(ITERATION, "backend=megatron_bridge"),
    only(DISTCP_FILES, "backend=megatron_bridge"),
    only(MAX_SHARD_SIZE, "backend=megatron_bridge"),
    p(
        names::TP,
        Value::Int { min: 1 },
        Role::Runtime,
        Some("1"),
        "accepted as the upstream merge script takes it; the merge reads any saved layout",
    ),
    p(
        names::PP,
        Value::Int { min: 1 },
        Role::Runtime,
        Some("1"),
        "accepted as the upstream merge script takes it; the merge reads any saved layout",
    ),
    p(
        names::EP,
        Value::Int { min: 1 },
        Role::Runtime,
        Some("1"),
        "accepted as the upstream merge script takes it; the merge reads any saved layout",
    ),
    VALIDATE_PARAM,
    SMOKE_TEST,
    WORKERS,
    PART,
    FINALIZE,
    ignored("trust_remote_code"),
    ignored("device_map"),
    ignored("low_cpu_mem_usage"),
    ignored("safe_serialization"),
    ignored("save_tokenizer"),
    ignored("upstream_script"),
    ignored("cpu"),
    ignored("debug"),
    ignored("show_progress"),
    ignored("strict"),
    ignored("nproc_per_node"),
];

/// `convert/validate` (also `ckpt-convert validate PATH …`).
pub const VALIDATE: &[Param] = &[
    required(p(
        "path",
        Value::Path,
        Role::Input,
        None,
        "the output to validate: an HF directory, a Megatron iter_* directory, or a run directory naming one",
    )),
    p(
        "reference",
        Value::Path,
        Role::Input,
        None,
        "the source it was converted from: the forward pass of both is compared",
    ),
    p(
        names::HF_MODEL_ID,
        Value::Model,
        Role::Input,
        None,
        "the HF model whose config.json and tokenizer describe a Megatron checkpoint without a usable run_config.yaml",
    ),
    p(
        names::SMOKE_TEST,
        Value::Bool,
        Role::Runtime,
        Some("true"),
        "false skips the forward pass",
    ),
    p(
        "generate",
        Value::Bool,
        Role::Runtime,
        Some("false"),
        "greedy-decode max_new_tokens tokens after prompt and print the text (also --generate)",
    ),
    p(
        "prompt",
        Value::Text,
        Role::Runtime,
        Some("The capital of France is"),
        "the prompt of generate=true",
    ),
    p(
        "max_new_tokens",
        Value::Int { min: 1 },
        Role::Runtime,
        Some("8"),
        "tokens decoded by generate=true",
    ),
    p(
        "tokens",
        Value::Ints,
        Role::Runtime,
        Some("the smoke test's fixed ids"),
        "token ids of the forward pass dump_logits writes",
    ),
    p(
        "dump_logits",
        Value::Path,
        Role::Runtime,
        None,
        "write the f32 logits of tokens as safetensors (logits, tokens)",
    ),
];

#[cfg(test)]
mod tests {
    use crate::Step;

    #[test]
    fn names_are_unique_per_step_and_backend() {
        for step in Step::ALL {
            let ps = step.params();
            for (i, a) in ps.iter().enumerate() {
                for b in &ps[i + 1..] {
                    let same_scope = a.only.is_none() || b.only.is_none() || a.only == b.only;
                    let clash = a.name == b.name
                        || Some(a.name) == b.alias
                        || Some(b.name) == a.alias
                        || (a.alias.is_some() && a.alias == b.alias);
                    assert!(
                        !(clash && same_scope && a.only == b.only),
                        "{step}: {} listed twice in one scope",
                        a.name
                    );
                    assert!(
                        !(clash && same_scope && (a.only.is_none() != b.only.is_none())),
                        "{step}: {} is both general and backend-specific",
                        a.name
                    );
                }
            }
        }
    }

    #[test]
    fn only_names_a_choice_of_the_same_step() {
        for step in Step::ALL {
            for p in step.params() {
                if let Some(only) = p.only {
                    let (key, value) = only.split_once('=').expect("key=value");
                    let owner = step.param(key).expect("only names a parameter of the step");
                    match owner.value {
                        super::Value::Choice(c) => assert!(c.contains(&value), "{only}"),
                        other => panic!("{only}: {key} is {other:?}, not a choice"),
                    }
                }
            }
        }
    }
}
