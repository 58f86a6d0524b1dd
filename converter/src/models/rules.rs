//! One table for both directions. A [`Rule`] says which Hugging Face tensors make
//! one Megatron-Core tensor and how their rows are arranged in it (a
//! [`Transform`]); the import plans the Megatron tensor from that table, and the
//! export plans each Hugging Face tensor by inverting the same row arrangement.
//! Nothing about a layer kind is written twice.
//!
//! Rows are slices along the first axis of a rule's per-layer tensor. Every
//! such tensor is 1-d, 2-d, or has unit axes between its first and last (a
//! convolution's `[channels, 1, width]`), so its rows are also rows of its last
//! axis, as the executor's gathers and the LoRA merge count them. Every
//! transform of the families is a row arrangement: copies,
//! QKV interleaves, `[gate; up]` concatenations, component slices of a fused
//! projection, and zero padding of a vocabulary.

use std::collections::HashMap;
use std::path::Path;

use crate::formats::dtype::DType;
use crate::formats::hf::HfCheckpoint;
use crate::formats::megatron::MegatronCheckpoint;
use crate::formats::source::GlobalTensor;
use crate::plan::tensor::{ChunkOut, TensorOut, copy_transform, out_dtype, row_len};
use crate::plan::{Input, PlanError, RowGather, Run};

/// A Hugging Face tensor of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfTensor {
    /// Full name (`model.layers.3.self_attn.q_proj.weight`).
    pub name: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// Position in the model's state-dict order (the order transformers registers
    /// parameters, which `save_pretrained` shards in).
    pub order: (u64, u64),
}

/// Where a Megatron tensor is stored: a key, and the leading indices that select
/// this rule's slice of it (the layer of a stacked key, the expert of a grouped
/// one), with the sizes of those leading axes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McKey {
    /// The DCP key.
    pub name: String,
    /// Leading indices, outermost first.
    pub prefix: Vec<u64>,
    /// Sizes of the leading axes the indices select from.
    pub prefix_dims: Vec<u64>,
}

impl McKey {
    /// A key holding the slice alone.
    pub fn plain(name: impl Into<String>) -> McKey {
        McKey {
            name: name.into(),
            prefix: Vec::new(),
            prefix_dims: Vec::new(),
        }
    }

    /// The global shape of the key, for a slice of `shape`.
    pub fn global_shape(&self, shape: &[u64]) -> Vec<u64> {
        [&self.prefix_dims[..], shape].concat()
    }
}

/// How the rows of the Megatron tensor come from the rows of the rule's Hugging
/// Face tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// The one HF tensor, unchanged.
    Copy,
    /// HF q, k and v interleaved per query group: each group's query heads, then
    /// its key head, then its value head (`docs/mapping.md#qkv-interleave`).
    Qkv {
        /// Query heads per group.
        heads_per_group: u64,
        /// Query groups.
        groups: u64,
        /// Rows per head.
        head_dim: u64,
    },
    /// The HF tensors one after the other (`[gate; up]`), each stored as its own
    /// chunk, as Megatron-Core saves a SwiGLU `linear_fc1`.
    Concat,
    /// Rows `[start, start + rows of the Megatron tensor)` of the one HF tensor (one
    /// component of a fused projection saved under its own key).
    Rows {
        /// First row.
        start: u64,
    },
    /// The one HF tensor, then zero rows up to the Megatron tensor's rows (a padded
    /// vocabulary; the export drops the padding).
    PadRows,
}

/// A run of Megatron rows: `rows` rows from HF tensor `hf` (or zeros) starting at
/// its row `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    /// Index into the rule's HF tensors; `None` for zero rows.
    pub hf: Option<usize>,
    /// First row in that tensor.
    pub start: u64,
    /// Rows.
    pub rows: u64,
}

impl Transform {
    /// The Megatron rows, in order, as runs of HF rows. `hf_rows` are the rows of
    /// the rule's HF tensors, `mc_rows` those of the Megatron slice.
    ///
    /// # Errors
    /// A message when the rows do not add up.
    pub fn segments(&self, hf_rows: &[u64], mc_rows: u64) -> Result<Vec<Seg>, String> {
        let one = |i: usize, start: u64, rows: u64| Seg {
            hf: Some(i),
            start,
            rows,
        };
        let segs = match *self {
            Transform::Copy => vec![one(0, 0, hf_rows[0])],
            Transform::Concat => hf_rows
                .iter()
                .enumerate()
                .map(|(i, &r)| one(i, 0, r))
                .collect(),
            Transform::Rows { start } => {
                if start + mc_rows > hf_rows[0] {
                    return Err(format!(
                        "rows {start}..{} of a tensor of {} rows",
                        start + mc_rows,
                        hf_rows[0]
                    ));
                }
                vec![one(0, start, mc_rows)]
            }
            Transform::PadRows => {
                let mut s = vec![one(0, 0, hf_rows[0])];
                if mc_rows > hf_rows[0] {
                    s.push(Seg {
                        hf: None,
                        start: 0,
                        rows: mc_rows - hf_rows[0],
                    });
                }
                s
            }
            Transform::Qkv {
                heads_per_group: p,
                groups,
                head_dim: d,
            } => {
                let mut s = Vec::with_capacity(3 * groups as usize);
                for g in 0..groups {
                    s.push(one(0, g * p * d, p * d));
                    s.push(one(1, g * d, d));
                    s.push(one(2, g * d, d));
                }
                s
            }
        };
        let total: u64 = segs.iter().map(|s| s.rows).sum();
        if total != mc_rows {
            return Err(format!(
                "the rows add up to {total}, the Megatron tensor has {mc_rows}"
            ));
        }
        Ok(segs)
    }

    /// The transform in words, for `--dry-run` and reports.
    pub fn describe(&self, import: bool) -> &'static str {
        match (self, import) {
            (Transform::Copy, _) => "copy",
            (Transform::Qkv { .. }, true) => "qkv interleave",
            (Transform::Qkv { .. }, false) => "qkv split",
            (Transform::Concat, true) => "concat",
            (Transform::Concat, false) => "split",
            (Transform::Rows { .. }, true) => "component of a fused tensor",
            (Transform::Rows { .. }, false) => "fused components joined",
            (Transform::PadRows, true) => "vocab pad",
            (Transform::PadRows, false) => "vocab unpad",
        }
    }
}

/// One Megatron tensor slice and the HF tensors it is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The HF tensors.
    pub hf: Vec<HfTensor>,
    /// Where the Megatron slice is stored: the first key is what the import writes;
    /// the export accepts any of them (another layout or spelling of the same
    /// tensor: per-layer or stacked keys, separate or fused norms).
    pub mc: Vec<McKey>,
    /// The Megatron slice's shape. For [`Transform::PadRows`] the first axis is
    /// the padded size the import writes; the export accepts any size at least
    /// the HF rows.
    pub shape: Vec<u64>,
    /// How the rows are arranged.
    pub transform: Transform,
    /// Rules that together replace this one on export when none of its keys
    /// exists (another way Megatron-Core saves the same tensors).
    pub or: Vec<Rule>,
}

/// Where a plan's expectations come from, for messages.
pub struct Context<'a> {
    /// The model (`LlamaForCausalLM`).
    pub model: &'a str,
    /// Its configuration file.
    pub config: &'a Path,
}

impl Context<'_> {
    fn why(&self) -> String {
        format!("from {} of {}", self.config.display(), self.model)
    }
}

fn shape_text(shape: &[u64]) -> String {
    format!("{shape:?}")
}

/// How floating-point tensors change type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    /// The dtype asked for (`None` keeps every tensor's).
    pub to: Option<DType>,
    /// Keep tensors that are float32 in a source whose other tensors are of lower
    /// precision (router biases, Mamba `A_log` and `D`).
    pub keep_fp32: bool,
    /// The precision most of the source's floating-point tensors have.
    pub source: Option<DType>,
}

impl Precision {
    /// The precision of `tensors`: the dtype of most floating-point ones.
    pub fn majority(tensors: &[GlobalTensor]) -> Option<DType> {
        let mut counts: Vec<(DType, usize)> = Vec::new();
        for t in tensors.iter().filter(|t| t.dtype.is_float()) {
            match counts.iter_mut().find(|(d, _)| *d == t.dtype) {
                Some((_, n)) => *n += 1,
                None => counts.push((t.dtype, 1)),
            }
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d)
    }

    /// The dtype a tensor stored as `from` is written in, and whether it was kept
    /// in float32 against the asked dtype.
    pub fn of(&self, from: DType) -> (DType, bool) {
        let keep = self.keep_fp32
            && from == DType::F32
            && self.source.is_some_and(|s| s != DType::F32)
            && self.to.is_some_and(|t| t != DType::F32);
        if keep {
            (from, true)
        } else {
            (out_dtype(from, self.to), false)
        }
    }
}

fn cast_check(name: &str, from: DType, to: DType) -> Result<(), PlanError> {
    crate::formats::dtype::check_cast(from, to).map_err(|source| PlanError::Cast {
        tensor: name.to_owned(),
        source,
    })
}

/// The planned Megatron chunks of the rules, from an HF checkpoint.
pub struct Imported {
    /// Chunks, in rule order.
    pub chunks: Vec<ChunkOut>,
    /// Source tensors the rules used.
    pub used: Vec<bool>,
    /// Megatron keys kept in float32 against the asked dtype.
    pub kept_fp32: Vec<String>,
}

/// Plans the Megatron chunks of `rules` from `src` (store `store`).
///
/// # Errors
/// [`PlanError`] naming a missing or mis-shaped source tensor, or a refused cast.
pub fn import(
    rules: &[Rule],
    src: &HfCheckpoint,
    store: usize,
    precision: &Precision,
    ctx: &Context<'_>,
) -> Result<Imported, PlanError> {
    let mut out = Imported {
        chunks: Vec::new(),
        used: vec![false; src.tensors.len()],
        kept_fp32: Vec::new(),
    };
    for rule in rules {
        let mut inputs = Vec::with_capacity(rule.hf.len());
        let mut dtypes = Vec::with_capacity(rule.hf.len());
        for h in &rule.hf {
            let i = *src.by_name.get(&h.name).ok_or_else(|| PlanError::Missing {
                path: src.root.clone(),
                tensor: h.name.clone(),
                expected: format!("{} {}", shape_text(&h.shape), ctx.why()),
            })?;
            let t = &src.tensors[i];
            if t.shape != h.shape {
                return Err(PlanError::Shape {
                    path: src.root.join(&src.shard_of[&h.name]),
                    tensor: h.name.clone(),
                    expected: shape_text(&h.shape),
                    found: t.shape.clone(),
                    why: ctx.why(),
                });
            }
            out.used[i] = true;
            inputs.push(Input::whole(store, i, t));
            dtypes.push(t.dtype);
        }
        let key = &rule.mc[0];
        let (to, kept) = precision.of(dtypes[0]);
        for (h, from) in rule.hf.iter().zip(&dtypes) {
            cast_check(&h.name, *from, to)?;
        }
        if kept {
            out.kept_fp32.push(key.name.clone());
        }
        let hf_rows: Vec<u64> = rule.hf.iter().map(|h| h.shape[0]).collect();
        let mc_rows = rule.shape[0];
        let segs =
            rule.transform
                .segments(&hf_rows, mc_rows)
                .map_err(|why| PlanError::Inconsistent {
                    path: src.root.clone(),
                    why: format!("{}: {why}", key.name),
                })?;
        debug_assert_eq!(
            row_len(&rule.shape) * mc_rows,
            rule.shape.iter().product::<u64>()
        );
        let rl = row_len(&rule.shape);
        let transform = match rule.transform {
            Transform::Copy => copy_transform(dtypes[0], to),
            Transform::PadRows if mc_rows == hf_rows[0] => copy_transform(dtypes[0], to),
            Transform::PadRows => format!("vocab pad {}→{mc_rows}", hf_rows[0]),
            t => t.describe(true).to_owned(),
        };
        // A concatenation is saved one chunk per part; anything else as one chunk.
        let groups: Vec<Vec<Seg>> = match rule.transform {
            Transform::Concat => segs.iter().map(|s| vec![*s]).collect(),
            _ => vec![segs],
        };
        let mut row = 0;
        for group in groups {
            let rows: u64 = group.iter().map(|s| s.rows).sum();
            let mut offsets = key.prefix.clone();
            offsets.push(row);
            offsets.extend(std::iter::repeat_n(0, rule.shape.len() - 1));
            let mut sizes = vec![1; key.prefix.len()];
            sizes.push(rows);
            sizes.extend_from_slice(&rule.shape[1..]);
            let mut used_inputs: Vec<usize> = Vec::new();
            let runs = group
                .iter()
                .map(|s| Run {
                    input: s
                        .hf
                        .map(|i| match used_inputs.iter().position(|&u| u == i) {
                            Some(p) => p,
                            None => {
                                used_inputs.push(i);
                                used_inputs.len() - 1
                            }
                        }),
                    start: s.start,
                    rows: s.rows,
                })
                .collect();
            let description = match rule.transform {
                Transform::Concat if row == 0 => format!("first part of {}", key.name),
                Transform::Concat => format!("rows {row}.. of {}", key.name),
                _ => transform.clone(),
            };
            out.chunks.push(ChunkOut {
                fqn: key.name.clone(),
                global_shape: key.global_shape(&rule.shape),
                offsets,
                sizes,
                dtype: to,
                inputs: used_inputs.iter().map(|&i| inputs[i].clone()).collect(),
                gather: RowGather { row_len: rl, runs },
                transform: description,
            });
            row += rows;
        }
    }
    Ok(out)
}

/// A Megatron checkpoint's tensors by name, for the export's lookups.
pub struct McIndex<'a> {
    ckpt: &'a MegatronCheckpoint,
    by_name: HashMap<&'a str, usize>,
}

impl<'a> McIndex<'a> {
    /// Indexes `ckpt`.
    pub fn new(ckpt: &'a MegatronCheckpoint) -> McIndex<'a> {
        McIndex {
            ckpt,
            by_name: ckpt
                .tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.as_str(), i))
                .collect(),
        }
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<(usize, &'a GlobalTensor)> {
        self.by_name.get(name).map(|&i| (i, &self.ckpt.tensors[i]))
    }

    /// The slice of a rule: the first of its keys that exists, checked against
    /// the rule's shape (any first axis of at least `min_rows` with
    /// [`Transform::PadRows`]). Returns the tensor index, the key and the slice's
    /// shape.
    ///
    /// # Errors
    /// [`PlanError::Missing`] when no key exists; [`PlanError::Shape`] when the
    /// first one found has another shape.
    pub fn find<'r>(
        &self,
        rule: &'r Rule,
        ctx: &Context<'_>,
    ) -> Result<(usize, &'r McKey, Vec<u64>), PlanError> {
        for key in &rule.mc {
            let Some((i, t)) = self.get(&key.name) else {
                continue;
            };
            let pad = matches!(rule.transform, Transform::PadRows);
            let n = key.prefix.len();
            let fits = t.shape.len() == n + rule.shape.len()
                && t.shape[..n] == key.prefix_dims[..]
                && if pad {
                    t.shape[n] >= rule.hf[0].shape[0] && t.shape[n + 1..] == rule.shape[1..]
                } else {
                    t.shape[n..] == rule.shape[..]
                };
            if !fits {
                let mut want = key.global_shape(&rule.shape);
                let expected = if pad {
                    want[n] = rule.hf[0].shape[0];
                    let mut text = shape_text(&want);
                    text = text.replacen(&want[n].to_string(), &format!("≥{}", want[n]), 1);
                    text
                } else {
                    shape_text(&want)
                };
                return Err(PlanError::Shape {
                    path: self.ckpt.dir.clone(),
                    tensor: key.name.clone(),
                    expected,
                    found: t.shape.clone(),
                    why: ctx.why(),
                });
            }
            return Ok((i, key, t.shape[n..].to_vec()));
        }
        Err(PlanError::Missing {
            path: self.ckpt.dir.clone(),
            tensor: rule.mc[0].name.clone(),
            expected: format!(
                "{} {}{}",
                shape_text(&rule.mc[0].global_shape(&rule.shape)),
                ctx.why(),
                if rule.mc.len() > 1 {
                    format!(
                        "; also looked for {}",
                        rule.mc[1..]
                            .iter()
                            .map(|k| k.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                } else {
                    String::new()
                }
            ),
        })
    }
}

/// The planned HF tensors of the rules, from a Megatron checkpoint.
pub struct Exported {
    /// Tensors with their state-dict position.
    pub tensors: Vec<((u64, u64), TensorOut)>,
    /// Source tensors the rules used.
    pub used: Vec<bool>,
    /// HF tensors kept in float32 against the asked dtype.
    pub kept_fp32: Vec<String>,
}

/// Where one run of an HF tensor's rows is in a Megatron tensor.
struct Piece {
    /// First row in the HF tensor.
    hf_start: u64,
    /// Rows.
    rows: u64,
    /// The Megatron tensor and the box of the rows.
    input: Input,
    /// The rule's transform.
    transform: Transform,
    /// Rows of the rule's Megatron slice.
    mc_rows: u64,
}

/// Plans the HF tensors of `rules` from `ckpt` (store `store`): each HF tensor
/// gathers the runs of Megatron rows the rules' transforms put it in, from one
/// Megatron tensor or several (a fused projection saved per component).
///
/// # Errors
/// [`PlanError`] naming a missing or mis-shaped Megatron tensor, rows of an HF
/// tensor that are not covered exactly once, or a refused cast.
pub fn export(
    rules: &[Rule],
    index: &McIndex<'_>,
    store: usize,
    precision: &Precision,
    ctx: &Context<'_>,
) -> Result<Exported, PlanError> {
    let ckpt = index.ckpt;
    let mut used = vec![false; ckpt.tensors.len()];
    let chosen = rules.iter().flat_map(|rule| {
        let present = rule.mc.iter().any(|k| index.get(&k.name).is_some());
        if present || rule.or.is_empty() {
            std::slice::from_ref(rule)
        } else {
            rule.or.as_slice()
        }
    });
    // HF tensor name → (the tensor, its runs); in the order first met.
    let mut order: Vec<String> = Vec::new();
    let mut runs: HashMap<String, (HfTensor, Vec<Piece>)> = HashMap::new();
    for rule in chosen {
        let (ti, key, shape) = index.find(rule, ctx)?;
        used[ti] = true;
        let hf_rows: Vec<u64> = rule.hf.iter().map(|h| h.shape[0]).collect();
        let segs =
            rule.transform
                .segments(&hf_rows, shape[0])
                .map_err(|why| PlanError::Inconsistent {
                    path: ckpt.dir.clone(),
                    why: format!("{}: {why}", key.name),
                })?;
        let mut mc_row = 0;
        for seg in &segs {
            if let Some(hi) = seg.hf {
                let h = &rule.hf[hi];
                let mut offsets = key.prefix.clone();
                offsets.push(mc_row);
                offsets.extend(std::iter::repeat_n(0, shape.len() - 1));
                let mut sizes = vec![1; key.prefix.len()];
                sizes.push(seg.rows);
                sizes.extend_from_slice(&shape[1..]);
                let entry = runs.entry(h.name.clone()).or_insert_with(|| {
                    order.push(h.name.clone());
                    (h.clone(), Vec::new())
                });
                entry.1.push(Piece {
                    hf_start: seg.start,
                    rows: seg.rows,
                    input: Input {
                        store,
                        tensor: ti,
                        offsets,
                        sizes,
                    },
                    transform: rule.transform,
                    mc_rows: shape[0],
                });
            }
            mc_row += seg.rows;
        }
    }
    let mut out = Exported {
        tensors: Vec::with_capacity(order.len()),
        used,
        kept_fp32: Vec::new(),
    };
    for name in order {
        let (h, mut pieces) = runs.remove(&name).expect("every name has its runs");
        pieces.sort_by_key(|p| p.hf_start);
        let mut next = 0;
        for p in &pieces {
            if p.hf_start != next {
                return Err(PlanError::Inconsistent {
                    path: ckpt.dir.clone(),
                    why: format!(
                        "the rows of {name} are not covered exactly once by the Megatron tensors (a gap or overlap at row {next})"
                    ),
                });
            }
            next += p.rows;
        }
        if next != h.shape[0] {
            return Err(PlanError::Inconsistent {
                path: ckpt.dir.clone(),
                why: format!(
                    "the Megatron tensors cover {next} rows of {name}, which has {}",
                    h.shape[0]
                ),
            });
        }
        let first = &ckpt.tensors[pieces[0].input.tensor];
        if let Some(p) = pieces
            .iter()
            .find(|p| ckpt.tensors[p.input.tensor].dtype != first.dtype)
        {
            return Err(PlanError::Inconsistent {
                path: ckpt.dir.clone(),
                why: format!(
                    "{name} is made of {} ({}) and {} ({}): expected one dtype",
                    first.name,
                    first.dtype,
                    ckpt.tensors[p.input.tensor].name,
                    ckpt.tensors[p.input.tensor].dtype
                ),
            });
        }
        let (to, kept) = precision.of(first.dtype);
        cast_check(&first.name, first.dtype, to)?;
        let joined = pieces
            .iter()
            .any(|p| p.input.tensor != pieces[0].input.tensor);
        let transform = match pieces[0].transform {
            _ if joined => "fused components joined".to_owned(),
            Transform::Copy => copy_transform(first.dtype, to),
            Transform::PadRows if pieces[0].mc_rows == next => copy_transform(first.dtype, to),
            Transform::PadRows => format!("vocab unpad {}→{next}", pieces[0].mc_rows),
            Transform::Concat => format!("part of {}", first.name),
            t => t.describe(false).to_owned(),
        };
        if kept {
            out.kept_fp32.push(name.clone());
        }
        let rl = row_len(&h.shape);
        out.tensors.push((
            h.order,
            TensorOut {
                name,
                dtype: to,
                shape: h.shape.clone(),
                gather: RowGather {
                    row_len: rl,
                    runs: pieces
                        .iter()
                        .enumerate()
                        .map(|(k, p)| Run {
                            input: Some(k),
                            start: 0,
                            rows: p.rows,
                        })
                        .collect(),
                },
                inputs: pieces.into_iter().map(|p| p.input).collect(),
                transform,
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qkv_interleave_follows_the_query_groups() {
        // heads 4, groups 2, d 1: megatron rows = q0 q1 k0 v0 q2 q3 k1 v1.
        let t = Transform::Qkv {
            heads_per_group: 2,
            groups: 2,
            head_dim: 1,
        };
        let segs = t.segments(&[4, 2, 2], 8).unwrap();
        let order: Vec<(usize, u64)> = segs
            .iter()
            .flat_map(|s| (s.start..s.start + s.rows).map(move |r| (s.hf.unwrap(), r)))
            .collect();
        assert_eq!(
            order,
            vec![
                (0, 0),
                (0, 1),
                (1, 0),
                (2, 0),
                (0, 2),
                (0, 3),
                (1, 1),
                (2, 1)
            ]
        );
        assert!(t.segments(&[4, 2, 2], 9).is_err());
    }

    #[test]
    fn padding_and_components() {
        let pad = Transform::PadRows.segments(&[5], 8).unwrap();
        assert_eq!(
            pad[1],
            Seg {
                hf: None,
                start: 0,
                rows: 3
            }
        );
        assert_eq!(Transform::PadRows.segments(&[5], 5).unwrap().len(), 1);
        assert_eq!(
            Transform::Rows { start: 3 }.segments(&[10], 4).unwrap(),
            vec![Seg {
                hf: Some(0),
                start: 3,
                rows: 4
            }]
        );
        assert!(Transform::Rows { start: 8 }.segments(&[10], 4).is_err());
    }

    #[test]
    fn fp32_is_kept_only_in_a_lower_precision_source() {
        let p = Precision {
            to: Some(DType::BF16),
            keep_fp32: true,
            source: Some(DType::BF16),
        };
        assert_eq!(p.of(DType::F32), (DType::F32, true));
        assert_eq!(p.of(DType::F16), (DType::BF16, false));
        let whole_fp32 = Precision {
            source: Some(DType::F32),
            ..p
        };
        assert_eq!(whole_fp32.of(DType::F32), (DType::BF16, false));
        let off = Precision {
            keep_fp32: false,
            ..p
        };
        assert_eq!(off.of(DType::F32), (DType::BF16, false));
    }
}
