//! The identity mapping: every tensor under its own name, whole, floats cast to
//! the asked dtype. A raw export of Megatron tensors to safetensors and back, and
//! the proof that both formats are right.

use crate::formats::dtype::DType;
use crate::plan::tensor::{ChunkOut, TensorOut, copy_transform, out_dtype, row_len, rows};
use crate::plan::{Input, PlanError, RowGather, TensorStore};

/// One tensor of `src`, whole, under its own name.
struct Whole {
    name: String,
    shape: Vec<u64>,
    dtype: DType,
    input: Input,
    gather: RowGather,
    transform: String,
}

fn planned(
    src: &dyn TensorStore,
    store: usize,
    dtype: Option<DType>,
) -> Result<Vec<Whole>, PlanError> {
    src.tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let to = out_dtype(t.dtype, dtype);
            crate::formats::dtype::check_cast(t.dtype, to).map_err(|source| PlanError::Cast {
                tensor: t.name.clone(),
                source,
            })?;
            Ok(Whole {
                name: t.name.clone(),
                shape: t.shape.clone(),
                dtype: to,
                input: Input::whole(store, i, t),
                gather: RowGather::copy(rows(&t.shape), row_len(&t.shape)),
                transform: copy_transform(t.dtype, to),
            })
        })
        .collect()
}

/// Every tensor of `src` as one Megatron chunk under its own name.
///
/// # Errors
/// [`PlanError::Cast`] for a cast the converter does not do.
pub fn chunks(
    src: &dyn TensorStore,
    store: usize,
    dtype: Option<DType>,
) -> Result<Vec<ChunkOut>, PlanError> {
    Ok(planned(src, store, dtype)?
        .into_iter()
        .map(|w| ChunkOut {
            fqn: w.name,
            global_shape: w.shape.clone(),
            offsets: vec![0; w.shape.len()],
            sizes: w.shape,
            dtype: w.dtype,
            inputs: vec![w.input],
            gather: w.gather,
            transform: w.transform,
        })
        .collect())
}

/// Every tensor of `src` as one HF tensor under its own name.
///
/// # Errors
/// [`PlanError::Cast`] for a cast the converter does not do.
pub fn tensors(
    src: &dyn TensorStore,
    store: usize,
    dtype: Option<DType>,
) -> Result<Vec<TensorOut>, PlanError> {
    Ok(planned(src, store, dtype)?
        .into_iter()
        .map(|w| TensorOut {
            name: w.name,
            shape: w.shape,
            dtype: w.dtype,
            inputs: vec![w.input],
            gather: w.gather,
            transform: w.transform,
        })
        .collect())
}

/// The warning every identity import carries.
pub const IMPORT_WARNING: &str = "mapping=identity writes tensors under their HF names and no _extra_state items; Megatron-Core loads it only into a model with those keys, with a relaxed dist_ckpt_strictness";
