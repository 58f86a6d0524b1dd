//! The two weight views of the smoke forward pass: Hugging Face names
//! (`model.layers.N.self_attn.q_proj.weight`, …) and Megatron-Core names (the
//! fused `decoder.layers.self_attention.linear_qkv.weight`, stacked on a leading
//! layer axis or per layer, any chunking). Each view checks every shape it uses
//! against the configuration and names the tensor when one is missing or wrong.

use crate::formats::dtype::DType;
use crate::formats::hf::HfCheckpoint;
use crate::formats::megatron::MegatronCheckpoint;
use crate::formats::source::{Files, GlobalTensor};

use super::arch::Arch;
use super::forward::{Attention, Layer, Linear, Mlp, View};
use super::kernels::{self, Mat};

fn vector(
    files: &Files,
    t: &GlobalTensor,
    prefix: &[u64],
    len: usize,
    round_to: Option<DType>,
) -> Result<Vec<f32>, String> {
    let mut offsets = prefix.to_vec();
    offsets.push(0);
    let mut sizes = vec![1u64; prefix.len()];
    sizes.push(len as u64);
    let mut out = vec![0f32; len];
    kernels::read_box_f32(files, t, &offsets, &sizes, &mut out, round_to)?;
    Ok(out)
}

fn embed_rows(
    files: &Files,
    t: &GlobalTensor,
    tokens: &[u32],
    vocab: usize,
    hidden: usize,
    round_to: Option<DType>,
) -> Result<Vec<f32>, String> {
    if t.shape.len() != 2 || (t.shape[0] as usize) < vocab || t.shape[1] as usize != hidden {
        return Err(format!(
            "tensor {:?}: expected shape [≥{vocab}, {hidden}] (from the configuration), found {:?}",
            t.name, t.shape
        ));
    }
    let mut out = vec![0f32; tokens.len() * hidden];
    for (i, &tok) in tokens.iter().enumerate() {
        if tok as usize >= vocab {
            return Err(format!("token {tok} is outside the vocabulary of {vocab}"));
        }
        kernels::read_box_f32(
            files,
            t,
            &[u64::from(tok), 0],
            &[1, hidden as u64],
            &mut out[i * hidden..(i + 1) * hidden],
            round_to,
        )?;
    }
    Ok(out)
}

/// A Hugging Face checkpoint seen through its config.json.
pub struct HfView<'a> {
    ckpt: &'a HfCheckpoint,
    arch: Arch,
    round_to: Option<DType>,
}

impl<'a> HfView<'a> {
    /// The view of `ckpt` as `arch` describes it; with `round_to`, every weight is
    /// rounded to that dtype as it is read.
    pub fn new(ckpt: &'a HfCheckpoint, arch: Arch, round_to: Option<DType>) -> HfView<'a> {
        HfView {
            ckpt,
            arch,
            round_to,
        }
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<&'a GlobalTensor, String> {
        let t = self.ckpt.tensor(name).ok_or_else(|| {
            format!(
                "{}: tensor {name:?} is missing (expected {shape:?} from config.json)",
                self.ckpt.root.display()
            )
        })?;
        if t.shape
            .iter()
            .map(|&s| s as usize)
            .ne(shape.iter().copied())
        {
            return Err(format!(
                "{}: tensor {name:?}: expected shape {shape:?} (from config.json), found {:?}",
                self.ckpt.root.display(),
                t.shape
            ));
        }
        Ok(t)
    }

    fn mat(&self, name: &str, rows: usize, cols: usize) -> Result<Mat<'a>, String> {
        let t = self.get(name, &[rows, cols])?;
        Mat::new(&self.ckpt.files, t, Vec::new(), self.round_to)
    }

    fn vec(&self, name: &str, len: usize) -> Result<Vec<f32>, String> {
        let t = self.get(name, &[len])?;
        vector(&self.ckpt.files, t, &[], len, self.round_to)
    }

    fn linear(&self, p: &str, which: &str, rows: usize) -> Result<Linear<'a>, String> {
        let a = &self.arch;
        Ok(Linear {
            w: self.mat(&format!("{p}self_attn.{which}.weight"), rows, a.hidden)?,
            b: if a.qkv_bias {
                Some(self.vec(&format!("{p}self_attn.{which}.bias"), rows)?)
            } else {
                None
            },
        })
    }

    fn tied(&self) -> bool {
        self.arch
            .tied
            .unwrap_or_else(|| self.ckpt.tensor("lm_head.weight").is_none())
    }
}

impl View for HfView<'_> {
    fn arch(&self) -> &Arch {
        &self.arch
    }

    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>, String> {
        let name = "model.embed_tokens.weight";
        let t = self.get(name, &[self.arch.vocab, self.arch.hidden])?;
        embed_rows(
            &self.ckpt.files,
            t,
            tokens,
            self.arch.vocab,
            self.arch.hidden,
            self.round_to,
        )
    }

    fn layer(&self, l: usize) -> Result<Layer<'_>, String> {
        let a = &self.arch;
        let (h, d, f) = (a.hidden, a.head_dim, a.ffn);
        let p = format!("model.layers.{l}.");
        Ok(Layer {
            input_norm: self.vec(&format!("{p}input_layernorm.weight"), h)?,
            attention: Attention::Split {
                q: self.linear(&p, "q_proj", a.heads * d)?,
                k: self.linear(&p, "k_proj", a.groups * d)?,
                v: self.linear(&p, "v_proj", a.groups * d)?,
            },
            qk_norm: if a.qk_norm {
                Some((
                    self.vec(&format!("{p}self_attn.q_norm.weight"), d)?,
                    self.vec(&format!("{p}self_attn.k_norm.weight"), d)?,
                ))
            } else {
                None
            },
            output: self.mat(&format!("{p}self_attn.o_proj.weight"), h, a.heads * d)?,
            mlp_norm: self.vec(&format!("{p}post_attention_layernorm.weight"), h)?,
            mlp: Mlp::Split {
                gate: self.mat(&format!("{p}mlp.gate_proj.weight"), f, h)?,
                up: self.mat(&format!("{p}mlp.up_proj.weight"), f, h)?,
            },
            down: self.mat(&format!("{p}mlp.down_proj.weight"), h, f)?,
        })
    }

    fn final_norm(&self) -> Result<Vec<f32>, String> {
        self.vec("model.norm.weight", self.arch.hidden)
    }

    fn head(&self) -> Result<Mat<'_>, String> {
        let name = if self.tied() {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        self.mat(name, self.arch.vocab, self.arch.hidden)
    }
}

/// A Megatron-Core checkpoint seen through its run_config.yaml (or the HF config
/// it was made from).
pub struct MegatronView<'a> {
    ckpt: &'a MegatronCheckpoint,
    arch: Arch,
    round_to: Option<DType>,
}

const LAYERS: &str = "decoder.layers.";

impl<'a> MegatronView<'a> {
    /// The view of `ckpt` as `arch` describes it; with `round_to`, every weight is
    /// rounded to that dtype as it is read.
    pub fn new(
        ckpt: &'a MegatronCheckpoint,
        arch: Arch,
        round_to: Option<DType>,
    ) -> MegatronView<'a> {
        MegatronView {
            ckpt,
            arch,
            round_to,
        }
    }

    /// A layer tensor under any of `names`: stacked (`decoder.layers.NAME`, a
    /// leading layer axis) or per layer (`decoder.layers.L.NAME`). Returns it with
    /// the leading index to read.
    fn find(
        &self,
        names: &[&str],
        l: usize,
        shape: &[usize],
    ) -> Result<(&'a GlobalTensor, Vec<u64>), String> {
        for name in names {
            if let Some(t) = self.ckpt.tensor(&format!("{LAYERS}{name}")) {
                let want: Vec<u64> = std::iter::once(self.arch.layers as u64)
                    .chain(shape.iter().map(|&s| s as u64))
                    .collect();
                if t.shape != want {
                    return Err(format!(
                        "{}: tensor {:?}: expected shape {want:?} (from {}), found {:?}",
                        self.ckpt.dir.display(),
                        t.name,
                        self.arch.name,
                        t.shape
                    ));
                }
                return Ok((t, vec![l as u64]));
            }
            if let Some(t) = self.ckpt.tensor(&format!("{LAYERS}{l}.{name}")) {
                if t.shape
                    .iter()
                    .map(|&s| s as usize)
                    .ne(shape.iter().copied())
                {
                    return Err(format!(
                        "{}: tensor {:?}: expected shape {shape:?} (from {}), found {:?}",
                        self.ckpt.dir.display(),
                        t.name,
                        self.arch.name,
                        t.shape
                    ));
                }
                return Ok((t, Vec::new()));
            }
        }
        Err(format!(
            "{}: tensor {:?} of layer {l} is missing (expected {shape:?} from {})",
            self.ckpt.dir.display(),
            format!("{LAYERS}{}", names[0]),
            self.arch.name
        ))
    }

    fn mat(&self, names: &[&str], l: usize, rows: usize, cols: usize) -> Result<Mat<'a>, String> {
        let (t, prefix) = self.find(names, l, &[rows, cols])?;
        Mat::new(&self.ckpt.files, t, prefix, self.round_to)
    }

    fn vec(&self, names: &[&str], l: usize, len: usize) -> Result<Vec<f32>, String> {
        let (t, prefix) = self.find(names, l, &[len])?;
        vector(&self.ckpt.files, t, &prefix, len, self.round_to)
    }

    fn top(&self, name: &str) -> Option<&'a GlobalTensor> {
        self.ckpt.tensor(name)
    }

    fn vocab_mat(&self, name: &str) -> Result<Mat<'a>, String> {
        let t = self.vocab_tensor(name)?;
        Mat::new(&self.ckpt.files, t, Vec::new(), self.round_to)
    }

    fn vocab_tensor(&self, name: &str) -> Result<&'a GlobalTensor, String> {
        let t = self
            .top(name)
            .ok_or_else(|| format!("{}: tensor {name:?} is missing", self.ckpt.dir.display()))?;
        let (v, h) = (self.arch.vocab as u64, self.arch.hidden as u64);
        if t.shape.len() != 2 || t.shape[0] < v || t.shape[1] != h {
            return Err(format!(
                "{}: tensor {name:?}: expected shape [≥{v}, {h}] (from {}), found {:?}",
                self.ckpt.dir.display(),
                self.arch.name,
                t.shape
            ));
        }
        Ok(t)
    }
}

impl View for MegatronView<'_> {
    fn arch(&self) -> &Arch {
        &self.arch
    }

    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>, String> {
        let t = self.vocab_tensor("embedding.word_embeddings.weight")?;
        embed_rows(
            &self.ckpt.files,
            t,
            tokens,
            self.arch.vocab,
            self.arch.hidden,
            self.round_to,
        )
    }

    fn layer(&self, l: usize) -> Result<Layer<'_>, String> {
        let a = &self.arch;
        let (h, d, f) = (a.hidden, a.head_dim, a.ffn);
        let qkv = a.qkv_rows();
        Ok(Layer {
            input_norm: self.vec(
                &[
                    "self_attention.linear_qkv.layer_norm_weight",
                    "input_layernorm.weight",
                ],
                l,
                h,
            )?,
            attention: Attention::Fused(Linear {
                w: self.mat(&["self_attention.linear_qkv.weight"], l, qkv, h)?,
                b: if a.qkv_bias {
                    Some(self.vec(&["self_attention.linear_qkv.bias"], l, qkv)?)
                } else {
                    None
                },
            }),
            qk_norm: if a.qk_norm {
                Some((
                    self.vec(&["self_attention.q_layernorm.weight"], l, d)?,
                    self.vec(&["self_attention.k_layernorm.weight"], l, d)?,
                ))
            } else {
                None
            },
            output: self.mat(&["self_attention.linear_proj.weight"], l, h, a.heads * d)?,
            mlp_norm: self.vec(
                &[
                    "mlp.linear_fc1.layer_norm_weight",
                    "pre_mlp_layernorm.weight",
                ],
                l,
                h,
            )?,
            mlp: Mlp::Fused(self.mat(&["mlp.linear_fc1.weight"], l, 2 * f, h)?),
            down: self.mat(&["mlp.linear_fc2.weight"], l, h, f)?,
        })
    }

    fn final_norm(&self) -> Result<Vec<f32>, String> {
        for name in [
            "decoder.final_layernorm.weight",
            "decoder.final_norm.weight",
        ] {
            if let Some(t) = self.top(name) {
                if t.shape != [self.arch.hidden as u64] {
                    return Err(format!(
                        "{}: tensor {name:?}: expected shape [{}], found {:?}",
                        self.ckpt.dir.display(),
                        self.arch.hidden,
                        t.shape
                    ));
                }
                return vector(&self.ckpt.files, t, &[], self.arch.hidden, self.round_to);
            }
        }
        Err(format!(
            "{}: tensor \"decoder.final_layernorm.weight\" is missing",
            self.ckpt.dir.display()
        ))
    }

    fn head(&self) -> Result<Mat<'_>, String> {
        let tied = self
            .arch
            .tied
            .unwrap_or_else(|| self.top("output_layer.weight").is_none());
        self.vocab_mat(if tied {
            "embedding.word_embeddings.weight"
        } else {
            "output_layer.weight"
        })
    }
}
