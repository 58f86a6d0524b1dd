//! Planned tensors before their bytes have a place: an HF tensor or a Megatron
//! chunk, its source boxes and its row gather; and the assembly of a list of
//! them into a [`Plan`] with every output offset laid out.

use crate::formats::dtype::DType;
use crate::formats::hf::{self, SideFile};
use crate::plan::layout::{self, DcpBytesSpec, DcpChunkSpec, HfTensorSpec, Sharding};
use crate::plan::{Copied, Generated, Input, Plan, PlanError, RowGather};

/// One output tensor of an HF checkpoint and how to make it.
#[derive(Debug, Clone)]
pub struct TensorOut {
    /// HF name.
    pub name: String,
    /// Output dtype.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Source boxes.
    pub inputs: Vec<Input>,
    /// Row gather.
    pub gather: RowGather,
    /// The transform, in words.
    pub transform: String,
}

/// One chunk of a Megatron tensor and how to make it.
#[derive(Debug, Clone)]
pub struct ChunkOut {
    /// The DCP key.
    pub fqn: String,
    /// Global shape of the key.
    pub global_shape: Vec<u64>,
    /// Chunk start.
    pub offsets: Vec<u64>,
    /// Chunk extent.
    pub sizes: Vec<u64>,
    /// Output dtype.
    pub dtype: DType,
    /// Source boxes.
    pub inputs: Vec<Input>,
    /// Row gather.
    pub gather: RowGather,
    /// The transform, in words.
    pub transform: String,
}

/// Elements per row of a tensor of `shape`: its last axis (1 for 0-d and 1-d),
/// so a 2-d weight's rows are its output units, as the LoRA merge and its probe
/// see them.
pub fn row_len(shape: &[u64]) -> u64 {
    if shape.len() >= 2 {
        shape[shape.len() - 1]
    } else {
        1
    }
}

/// Rows of a tensor of `shape`.
pub fn rows(shape: &[u64]) -> u64 {
    shape.iter().product::<u64>() / row_len(shape).max(1)
}

/// The dtype a tensor is written in: floats take `to`, others keep theirs.
pub fn out_dtype(from: DType, to: Option<DType>) -> DType {
    match to {
        Some(to) if from.is_float() && from != to => to,
        _ => from,
    }
}

/// Describes a copy or cast.
pub fn copy_transform(from: DType, to: DType) -> String {
    if from == to {
        "copy".into()
    } else {
        format!("cast {from}→{to}")
    }
}

/// Plans an HF checkpoint from `tensors` (in state-dict order).
///
/// # Errors
/// [`PlanError`] if a header cannot be laid out.
pub fn plan_hf(tensors: Vec<TensorOut>, sharding: &Sharding) -> Result<Plan, PlanError> {
    let specs: Vec<HfTensorSpec> = tensors
        .iter()
        .map(|t| HfTensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect();
    let l = layout::hf(&specs, sharding, 0)?;
    let mut plan = Plan {
        files: l.files,
        ..Plan::default()
    };
    plan.generated.extend(l.index);
    for (t, dest) in tensors.into_iter().zip(l.dests) {
        plan.pieces.push(crate::plan::Piece {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            inputs: t.inputs,
            gather: t.gather,
            dest,
            transform: t.transform,
            merge: None,
        });
    }
    Ok(plan)
}

/// Plans the data of a Megatron iteration directory from `chunks` and `bytes`
/// items over `nfiles` `.distcp` files.
pub fn plan_megatron(chunks: Vec<ChunkOut>, bytes: &[DcpBytesSpec], nfiles: usize) -> Plan {
    let specs: Vec<DcpChunkSpec> = chunks
        .iter()
        .map(|c| DcpChunkSpec {
            fqn: c.fqn.clone(),
            dtype: c.dtype,
            global_shape: c.global_shape.clone(),
            offsets: c.offsets.clone(),
            sizes: c.sizes.clone(),
        })
        .collect();
    let l = layout::dcp(&specs, bytes, nfiles, 0);
    let mut plan = Plan {
        files: l.files,
        ..Plan::default()
    };
    plan.generated.push(Generated {
        rel: ".metadata".into(),
        bytes: l.metadata,
    });
    for (c, dest) in chunks.into_iter().zip(l.dests) {
        let name = if c.sizes == c.global_shape {
            c.fqn
        } else {
            format!("{}[{}]", c.fqn, crate::plan::box_text(&c.offsets, &c.sizes))
        };
        plan.pieces.push(crate::plan::Piece {
            name,
            dtype: c.dtype,
            shape: c.sizes,
            inputs: c.inputs,
            gather: c.gather,
            dest,
            transform: c.transform,
            merge: None,
        });
    }
    plan
}

/// Adds copies of `files` under `prefix` (e.g. `tokenizer/`); later lists win over
/// earlier ones for the same output path.
pub fn copy_side_files(plan: &mut Plan, files: &[SideFile], prefix: &str) {
    for f in files {
        let rel = format!("{prefix}{}", f.rel);
        plan.copied.retain(|c| c.rel != rel);
        plan.copied.push(Copied {
            rel,
            from: f.path.clone(),
            kind: serde_json::to_value(f.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
        });
    }
}

/// Tokenizer and chat-template files of a side-file list.
pub fn tokenizer_files(files: &[SideFile]) -> Vec<SideFile> {
    files
        .iter()
        .filter(|f| {
            matches!(
                f.kind,
                hf::SideFileKind::Tokenizer | hf::SideFileKind::ChatTemplate
            )
        })
        .cloned()
        .collect()
}
