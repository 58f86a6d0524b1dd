//! A plan: every output file, and every piece of tensor data, with the source
//! regions it is made from and the one transform that makes it.
//!
//! Plans are built from headers and metadata only. Each [`Piece`] is one output
//! tensor (or one chunk of a Megatron tensor): a list of source boxes and a
//! [`RowGather`] that says which rows of which input, in which order, form the
//! output rows, with a dtype cast. Copy, cast, QKV interleave and split, gate/up
//! concatenation and split, and vocabulary padding and unpadding are all row
//! gathers, so one kernel executes every plan and `--dry-run` can print it.
//!
//! A LoRA merge is not a row gather: the values change. A piece may carry a
//! [`LoraMerge`], a second stage applied to the gathered rows (the base weight)
//! with further inputs (the adapter's matrices); the kernels are in
//! [`crate::plan::merge`].

pub mod layout;
pub mod merge;
pub mod tensor;

use std::path::PathBuf;

use crate::formats::dtype::DType;
use crate::formats::source::{Files, GlobalTensor};

/// Something that holds source tensors.
pub trait TensorStore: Sync {
    /// The mapped files the tensors live in.
    fn files(&self) -> &Files;
    /// The tensors.
    fn tensors(&self) -> &[GlobalTensor];
    /// A short label for messages (`hf`, `megatron`, `adapter`).
    fn label(&self) -> &str;
}

impl TensorStore for crate::formats::hf::HfCheckpoint {
    fn files(&self) -> &Files {
        &self.files
    }
    fn tensors(&self) -> &[GlobalTensor] {
        &self.tensors
    }
    fn label(&self) -> &str {
        "hf"
    }
}

impl TensorStore for crate::formats::megatron::MegatronCheckpoint {
    fn files(&self) -> &Files {
        &self.files
    }
    fn tensors(&self) -> &[GlobalTensor] {
        &self.tensors
    }
    fn label(&self) -> &str {
        "megatron"
    }
}

/// A box of a source tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// Which store (index into the executor's store list).
    pub store: usize,
    /// Which tensor of that store.
    pub tensor: usize,
    /// Box start.
    pub offsets: Vec<u64>,
    /// Box extent.
    pub sizes: Vec<u64>,
}

impl Input {
    /// The whole tensor `tensor` of `store`.
    pub fn whole(store: usize, tensor: usize, t: &GlobalTensor) -> Input {
        Input {
            store,
            tensor,
            offsets: vec![0; t.shape.len()],
            sizes: t.shape.clone(),
        }
    }

    /// Elements in the box.
    pub fn numel(&self) -> u64 {
        self.sizes.iter().product()
    }
}

/// A run of output rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// The input the rows come from; `None` for zero rows (vocabulary padding).
    pub input: Option<usize>,
    /// First row in that input.
    pub start: u64,
    /// Number of rows.
    pub rows: u64,
}

/// Output rows as runs of input rows. A row is the last axis of a tensor (one
/// element for 1-d tensors); every input and the output share the row length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowGather {
    /// Elements per row.
    pub row_len: u64,
    /// Runs, in output order.
    pub runs: Vec<Run>,
}

impl RowGather {
    /// All rows of input 0, in order (a copy or cast).
    pub fn copy(rows: u64, row_len: u64) -> RowGather {
        RowGather {
            row_len,
            runs: vec![Run {
                input: Some(0),
                start: 0,
                rows,
            }],
        }
    }

    /// Total output rows.
    pub fn rows(&self) -> u64 {
        self.runs.iter().map(|r| r.rows).sum()
    }
}

/// A matrix operand of a merge: the boxes of some of the piece's inputs, read in
/// order and concatenated, as `rows` × `cols` row-major elements (any float dtype;
/// widened to f32 exactly), or, when `transposed`, as its transpose (`cols` ×
/// `rows` row-major: one input per column gathers a strided column set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operand {
    /// Indices into the piece's inputs.
    pub inputs: Vec<usize>,
    /// Rows.
    pub rows: u64,
    /// Columns.
    pub cols: u64,
    /// The inputs hold the matrix transposed.
    pub transposed: bool,
}

impl Operand {
    /// The row-major matrix of a column-major buffer when `transposed`.
    pub fn arrange<T: Copy + Default>(&self, read: Vec<T>) -> Vec<T> {
        if !self.transposed {
            return read;
        }
        let (r, c) = (self.rows as usize, self.cols as usize);
        let mut out = vec![T::default(); read.len()];
        for j in 0..c {
            for i in 0..r {
                out[i * c + j] = read[j * r + i];
            }
        }
        out
    }
}

/// One update of a weight by an adapter, in the arithmetic of the tool whose
/// merge is reproduced (`docs/lora.md#peft-merge-arithmetic`,
/// `docs/lora.md#megatron-bridge-merge-arithmetic`). The weight `W` is the gathered piece
/// viewed as rows of its last axis. `acc = B @ A` is summed in f32 over the rank
/// with one fused multiply-add per term, in rank order (as CPU sgemm kernels do),
/// then `Δ = acc · scale` in f32.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// A linear layer: `W ← rne(W + Δ)`, one rounding (PEFT `Linear.merge`,
    /// Megatron-Bridge's merge per HF tensor). `A` is `[r, in]`, `B` is `[out, r]`;
    /// `W` is `[out, in]`, or `[in, out]` when `transposed` (a transformers
    /// `Conv1D`, PEFT's `fan_in_fan_out`). With `rows`, only those row runs of `W`
    /// (start, count) are updated, in order, and `B` has that many rows (adapters
    /// on parts of a fused tensor). With `magnitude` (DoRA, `[out]`):
    /// `W ← rne(m / ‖W + Δ‖ · (W + Δ))`, the norm per output unit.
    Linear {
        /// `A`, `[r, in]`.
        a: Operand,
        /// `B`, `[out, r]`.
        b: Operand,
        /// `alpha / r` (or `alpha / sqrt(r)`), rounded to f32.
        scale: f32,
        /// Where the result is rounded to `W`'s dtype.
        rounding: Rounding,
        /// `W` is stored `[in, out]`.
        transposed: bool,
        /// The row runs of `W` updated, when not all.
        rows: Option<Vec<(u64, u64)>>,
        /// The DoRA magnitude vector, `[out]`.
        magnitude: Option<Operand>,
    },
    /// An embedding: `A` is `[r, vocab]`, `B` is `[dim, r]`, `Δ = (B @ A)ᵀ · scale`,
    /// and `W ← rne(W + rne(Δ))`: PEFT rounds the delta to the weight's dtype before
    /// adding it (`Embedding.merge`). With `magnitude` (DoRA, `[dim]`):
    /// `W ← rne(m / ‖W + Δ‖ · (W + Δ))`, the norm over the vocabulary per column,
    /// without the early rounding.
    Embedding {
        /// `A`, `[r, vocab]`.
        a: Operand,
        /// `B`, `[dim, r]`.
        b: Operand,
        /// The scale, rounded to f32.
        scale: f32,
        /// The DoRA magnitude vector, `[dim]`.
        magnitude: Option<Operand>,
    },
    /// A bias: `W ← rne(W + values · scale)` (PEFT `lora_bias`).
    Bias {
        /// The adapter's bias, as many elements as `W`.
        values: Operand,
        /// The scale, rounded to f32.
        scale: f32,
    },
    /// Rows replaced: `W[indices[i]] ← rne(values[i])` (PEFT trainable tokens,
    /// `index_copy` of the delta cast to the weight's dtype).
    Rows {
        /// Row indices of `W`.
        indices: Vec<u64>,
        /// The new rows, `[indices.len(), row length]`.
        values: Operand,
    },
}

/// Where a linear update rounds to the weight's dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// Once: `W ← rne(W + acc · s)` in f32 (PEFT; Megatron-Bridge ≥ 0.5, which
    /// merges in f32).
    Once,
    /// After each operation, as a merge computed in the parameter's dtype rounds:
    /// `W ← rne(W + rne(rne(acc) · s))` (Megatron-Bridge ≤ 0.4's `LoRAMerge`, whose
    /// product, scaling and sum are bf16 tensor operations).
    EachStep,
    /// The delta computed in f32 and rounded to the weight's dtype before the sum:
    /// `W ← rne(W + rne(acc · s))` (PEFT's merge of a parameter adapted through
    /// `target_parameters`, which casts the delta to the parameter's dtype).
    DeltaFirst,
}

/// The merge stage of a piece: updates applied in order to the gathered weight.
/// The weight is held in the piece's dtype, as the tools being reproduced hold it
/// in the parameter's dtype: the gather casts into it (as loading a checkpoint
/// into a model does), and every update ends with one rounding to it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraMerge {
    /// Updates, in order.
    pub updates: Vec<Update>,
}

// Scales are finite (the planner checks), so equality is reflexive.
impl Eq for Update {}
impl Eq for LoraMerge {}

/// Where a piece's bytes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// Raw elements at an offset of an output file (safetensors data).
    Raw {
        /// Output file index.
        file: usize,
        /// Byte offset.
        offset: u64,
    },
    /// A one-tensor `torch.save` archive at an offset of a `.distcp` file.
    DcpItem {
        /// Output file index.
        file: usize,
        /// Byte offset of the archive.
        offset: u64,
    },
}

/// One unit of work: an output tensor or chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Output name (HF name, or DCP key with the chunk offsets).
    pub name: String,
    /// Output element type.
    pub dtype: DType,
    /// Output shape.
    pub shape: Vec<u64>,
    /// Source boxes.
    pub inputs: Vec<Input>,
    /// How output rows come from input rows.
    pub gather: RowGather,
    /// Where the bytes go.
    pub dest: Dest,
    /// The transform, in words, for `--dry-run` and reports (`copy`, `qkv interleave`).
    pub transform: String,
    /// A LoRA merge applied to the gathered rows, when the piece is a merged weight.
    pub merge: Option<LoraMerge>,
}

impl Piece {
    /// Output bytes.
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<u64>() * self.dtype.size() as u64
    }
}

/// An output file whose content is written by pieces (plus fixed bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutFile {
    /// Path relative to the output root.
    pub rel: String,
    /// Final length.
    pub len: u64,
    /// Bytes known at plan time (headers, small items), at their offsets.
    pub fixed: Vec<(u64, Vec<u8>)>,
}

/// A small output file generated whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// Path relative to the output root.
    pub rel: String,
    /// Content.
    pub bytes: Vec<u8>,
}

/// A file copied from a source (tokenizer, config, chat template).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    /// Path relative to the output root.
    pub rel: String,
    /// Source file.
    pub from: PathBuf,
    /// What it is (`config`, `tokenizer`, `chat_template`, ...), for provenance.
    pub kind: String,
}

/// Everything one output directory is made of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Files written by pieces.
    pub files: Vec<OutFile>,
    /// Pieces of tensor data.
    pub pieces: Vec<Piece>,
    /// Small generated files.
    pub generated: Vec<Generated>,
    /// Copied side files.
    pub copied: Vec<Copied>,
    /// Source tensors deliberately not converted, with the reason.
    pub skipped: Vec<(String, String)>,
}

impl Plan {
    /// Bytes of tensor data the plan writes.
    pub fn tensor_bytes(&self) -> u64 {
        self.pieces.iter().map(Piece::nbytes).sum()
    }

    /// The largest piece, in bytes.
    pub fn largest_piece(&self) -> u64 {
        self.pieces.iter().map(Piece::nbytes).max().unwrap_or(0)
    }

    /// One line per piece: output, shape, dtype, transform and sources.
    pub fn describe(&self, stores: &[&dyn TensorStore]) -> Vec<String> {
        self.pieces
            .iter()
            .map(|p| {
                let sources: Vec<String> = p
                    .inputs
                    .iter()
                    .map(|i| {
                        let t = &stores[i.store].tensors()[i.tensor];
                        if i.sizes == t.shape {
                            t.name.clone()
                        } else {
                            format!("{}[{}]", t.name, box_text(&i.offsets, &i.sizes))
                        }
                    })
                    .collect();
                let file = match &p.dest {
                    Dest::Raw { file, .. } | Dest::DcpItem { file, .. } => &self.files[*file].rel,
                };
                format!(
                    "{} {:?} {} <- {} ({}) -> {}",
                    p.name,
                    p.shape,
                    p.dtype,
                    sources.join(" + "),
                    p.transform,
                    file
                )
            })
            .collect()
    }
}

/// Renders a box as `a:b, c:d`.
pub fn box_text(offsets: &[u64], sizes: &[u64]) -> String {
    offsets
        .iter()
        .zip(sizes)
        .map(|(o, s)| format!("{o}:{}", o + s))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a plan cannot be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// A cast the converter does not do.
    #[error("tensor {tensor:?}: {source}")]
    Cast {
        /// The tensor.
        tensor: String,
        /// The refused cast.
        source: crate::formats::dtype::CastError,
    },
    /// A tensor the model needs is not in the source.
    #[error("{}: tensor {tensor:?} is missing (expected {expected})", path.display())]
    Missing {
        /// The checkpoint (or file) searched.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What it should be, and why (`[64, 128] from config.json`).
        expected: String,
    },
    /// A tensor has the wrong shape.
    #[error("{}: tensor {tensor:?}: expected shape {expected} ({why}), found {found:?}", path.display())]
    Shape {
        /// The file holding it.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The shape expected, in words (`[64, 128]`, `[≥128, 64]`).
        expected: String,
        /// The shape found.
        found: Vec<u64>,
        /// Where the expectation comes from (`from config.json of LlamaForCausalLM`).
        why: String,
    },
    /// A source tensor has no place in the output; converting would drop it.
    #[error("{}: tensor {tensor:?} has no place in a {model} with this configuration (refusing to drop weights)", path.display())]
    Unplaced {
        /// The file holding it.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The model it was expected to belong to.
        model: String,
    },
    /// The source contradicts its configuration in another way.
    #[error("{}: {why}", path.display())]
    Inconsistent {
        /// The checkpoint.
        path: PathBuf,
        /// What disagrees, with what was expected and found.
        why: String,
    },
    /// A format problem while laying out outputs.
    #[error(transparent)]
    Format(#[from] crate::formats::FormatError),
}
