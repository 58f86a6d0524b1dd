#!/usr/bin/env python3
"""megatron-core 0.16.1 hybrid (Mamba-2 / attention / MLP / MoE) MambaModel on CPU (gloo), for
test_nemotron_h.py: built, its ``sharded_state_dict()`` read, and checkpoints loaded into it.
No forward pass: megatron-core's Mamba mixer runs only on mamba_ssm / causal_conv1d CUDA kernels.

Built on mcore_cpu.py and mcore_moe.py (their patches).  What is changed, and why (process-local):

  H1. mamba_ssm is absent, so megatron-core's `mamba_mixer` sets `HAVE_MAMBA_SSM=False` and makes
      its gated RMSNorm (`RMSNormGated`, base of `ExtendedRMSNorm`) a MagicMock, which has no
      parameter at all.  `ExtendedRMSNorm` is replaced by a torch module with the same constructor
      and the same parameter (`weight` [d_inner / TP]) sharded exactly as megatron-core's
      `ExtendedRMSNorm.sharded_state_dict` does (dim 0 over TP); `HAVE_MAMBA_SSM=True` lets
      `MambaMixer.__init__` run (it only checks the flag; the kernels are used by the forward).
  H2. einops is not in the reference stack; `MambaMixer.__init__` and `MambaContextParallel.__init__`
      only check `HAVE_EINOPS` (einops is used by the forward): the flags are set.
  H3. `MambaStack` builds its final norm with `TENorm` whatever the spec says; without
      TransformerEngine that cannot be built.  megatron-core's own torch norm (`WrappedTorchNorm`,
      same arguments) stands in; the key (`decoder.final_norm.weight`) is the same.
  H4. The stack spec: megatron-core's `mamba_stack_spec` uses TransformerEngine modules (fused
      norm + linear).  `local_hybrid_spec()` is the same stack with megatron-core's local modules
      (ColumnParallelLinear, RowParallelLinear, DotProductAttention, WrappedTorchNorm, SequentialMLP
      experts) and the separate norms renamed to the TE spec's checkpoint keys, as megatron-core's
      local GPT spec does for dense layers: Mamba `norm.` -> `mixer.in_proj.layer_norm_`,
      attention `input_layernorm.` -> `self_attention.linear_qkv.layer_norm_`, MLP
      `pre_mlp_layernorm.` -> `mlp.linear_fc1.layer_norm_`; a MoE layer keeps its separate
      `pre_mlp_layernorm` (as in the TE spec).  Every other key, shape and chunk is megatron-core's
      own sharded_state_dict code (the Mamba in_proj / conv1d split per component, the expert
      axis, router, shared expert, output layer).
  Config choices, not patches: SequentialMLP experts (grouped GEMM needs CUDA packages / TE),
  all-gather dispatcher, no shared-expert overlap (CUDA streams), fp32 router.

Dtypes: `bf16=True` models are wrapped in megatron-core's `Float16Module`, as Megatron-LM and
Megatron-Bridge train and save them (every parameter bf16), and each router's
`_maintain_float32_expert_bias()` runs, as it does before every load (the expert bias float32).

Python API:
    hybrid_cfg_from_hf(hc) -> cfg dict;  build_hybrid(cfg) -> MambaModel (maybe Float16Module)
    requested(model) -> ({key: {"shape", "dtype", "boxes"}}, {byte item keys})
    load_hybrid(cfg, iter_dir) -> model (TP=1, in process, MCore's default strictness)
    keys_and_load_multi(cfg, iter_dir, tp, expected) -> per-rank results (spawned gloo ranks:
        each rank's requested keys, and the load of ``iter_dir`` compared with ``expected``)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, List

import torch

import mcore_cpu as mc
import mcore_moe as mm

_PATCHED = False


class TorchGatedRMSNorm(torch.nn.Module):
    """Stand-in for mamba_ssm's gated, grouped RMSNorm: same constructor and parameter; its math
    (rmsnorm per group of x·silu(z), times weight) is never run here."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None,
                 dtype=None):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size or hidden_size, norm_before_gate
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)


def patch_hybrid_for_cpu() -> None:
    """mcore_moe's patches plus H1-H3 (module docstring). Idempotent."""
    global _PATCHED
    mm.patch_moe_for_cpu()
    if _PATCHED:
        return
    from megatron.core.ssm import mamba_block, mamba_context_parallel, mamba_mixer
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    if not mamba_mixer.HAVE_MAMBA_SSM:  # H1
        class ExtendedRMSNorm(TorchGatedRMSNorm):
            def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
                from megatron.core import parallel_state

                if not hasattr(self, "tp_group"):
                    self.tp_group = parallel_state.get_tensor_model_parallel_group()
                return make_sharded_tensors_for_checkpoint(
                    self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets,
                    tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])

        mamba_mixer.RMSNormGated = TorchGatedRMSNorm
        mamba_mixer.ExtendedRMSNorm = ExtendedRMSNorm
        mamba_mixer.HAVE_MAMBA_SSM = True
    mamba_mixer.HAVE_EINOPS = mamba_context_parallel.HAVE_EINOPS = True  # H2
    mamba_block.TENorm = WrappedTorchNorm  # H3
    _PATCHED = True


def local_hybrid_spec():
    """H4: megatron-core's hybrid stack with local modules and the TE spec's checkpoint keys."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import (MoETransformerLayer, TransformerLayer,
                                                             TransformerLayerSubmodules)

    moe = get_moe_module_spec(use_te=False, num_experts=8, moe_grouped_gemm=False)
    return ModuleSpec(module=MambaStack, submodules=MambaStackSubmodules(
        mamba_layer=ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
            norm=WrappedTorchNorm,
            mixer=ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(
                in_proj=ColumnParallelLinear, out_proj=RowParallelLinear)),
            mamba_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"})),
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                      submodules=SelfAttentionSubmodules(
                                          linear_qkv=ColumnParallelLinear, core_attention=DotProductAttention,
                                          linear_proj=RowParallelLinear)),
            self_attn_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"})),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                 linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"})),
        moe_layer=ModuleSpec(module=MoETransformerLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=WrappedTorchNorm, mlp=moe, mlp_bda=get_bias_dropout_add)),
    ))


def hybrid_cfg_from_hf(hc, params_dtype: str = "bfloat16") -> Dict[str, Any]:
    """cfg of a transformers NemotronHConfig (Megatron-Bridge's NemotronH CONFIG_MAPPING;
    docs/mapping.md#configuration)."""
    pattern = hc.hybrid_override_pattern
    return dict(
        pattern=pattern, num_layers=len(pattern), hidden_size=hc.hidden_size,
        ffn_hidden_size=hc.intermediate_size, num_attention_heads=hc.num_attention_heads,
        num_query_groups=hc.num_key_value_heads, kv_channels=hc.head_dim, vocab_size=hc.vocab_size,
        layernorm_epsilon=hc.layer_norm_epsilon, mamba_num_heads=hc.mamba_num_heads,
        mamba_head_dim=hc.mamba_head_dim, mamba_num_groups=hc.n_groups, mamba_state_dim=hc.ssm_state_size,
        num_moe_experts=hc.n_routed_experts, moe_router_topk=hc.num_experts_per_tok,
        moe_ffn_hidden_size=hc.moe_intermediate_size,
        moe_shared_expert_intermediate_size=hc.moe_shared_expert_intermediate_size * hc.n_shared_experts,
        moe_router_topk_scaling_factor=float(hc.routed_scaling_factor),
        moe_router_num_groups=hc.n_group, moe_router_group_topk=hc.topk_group,
        max_sequence_length=hc.max_position_embeddings, params_dtype=params_dtype,
        tied=bool(hc.tie_word_embeddings))


def make_hybrid_config(c: Dict[str, Any]):
    from megatron.core import parallel_state as ps
    from megatron.core.activations import squared_relu
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = mc._DTYPES[c["params_dtype"]]
    groups = c["moe_router_num_groups"]
    return TransformerConfig(
        num_layers=c["num_layers"], hidden_size=c["hidden_size"], ffn_hidden_size=c["ffn_hidden_size"],
        num_attention_heads=c["num_attention_heads"], num_query_groups=c["num_query_groups"],
        kv_channels=c["kv_channels"], normalization="RMSNorm", layernorm_epsilon=c["layernorm_epsilon"],
        gated_linear_unit=False, activation_func=squared_relu, add_bias_linear=False,
        is_hybrid_model=True, mamba_num_heads=c["mamba_num_heads"], mamba_head_dim=c["mamba_head_dim"],
        mamba_num_groups=c["mamba_num_groups"], mamba_state_dim=c["mamba_state_dim"],
        num_moe_experts=c["num_moe_experts"], moe_router_topk=c["moe_router_topk"],
        moe_ffn_hidden_size=c["moe_ffn_hidden_size"],
        moe_shared_expert_intermediate_size=c["moe_shared_expert_intermediate_size"],
        moe_shared_expert_overlap=False, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_dtype="fp32",
        moe_router_topk_scaling_factor=c["moe_router_topk_scaling_factor"],
        moe_router_num_groups=groups if groups > 1 else None,
        moe_router_group_topk=c["moe_router_group_topk"] if groups > 1 else None,
        moe_router_pre_softmax=False, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather", moe_grouped_gemm=False, moe_permute_fusion=False,
        attention_dropout=0.0, hidden_dropout=0.0, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype, use_cpu_initialization=True, perform_initialization=True,
        apply_rope_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size())


def build_hybrid(cfg: Dict[str, Any]):
    """MambaModel of ``cfg`` for the current process group; bf16 ones in a Float16Module."""
    patch_hybrid_for_cpu()
    if not torch.distributed.is_initialized():
        mc._ensure_dist(1, 1)
    from megatron.core.models.mamba import MambaModel
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.moe.router import TopKRouter

    config = make_hybrid_config(cfg)
    model = MambaModel(config=config, mamba_stack_spec=local_hybrid_spec(), vocab_size=cfg["vocab_size"],
                       max_sequence_length=cfg["max_sequence_length"],
                       hybrid_override_pattern=cfg["pattern"],
                       share_embeddings_and_output_weights=cfg["tied"], position_embedding_type="none")
    if config.bf16:
        model = Float16Module(config, model)
        for m in model.modules():
            if isinstance(m, TopKRouter):
                m._maintain_float32_expert_bias()
    model.eval()
    return model


def requested(model):
    """({ShardedTensor key: {"shape", "dtype", "boxes"}}, {ShardedObject keys}) of the model."""
    import interop_util as iu

    return iu.mcore_requested(mc, model)


def _load(cfg, iter_dir):
    from megatron.core import dist_checkpointing

    model = build_hybrid(cfg)
    sd = dist_checkpointing.load({"model": model.sharded_state_dict()}, iter_dir)["model"]
    inner = model.module if hasattr(model, "module") else model
    r = inner.load_state_dict(sd, strict=False)
    bad = [k for k in r.missing_keys if not k.endswith("_extra_state")] + list(r.unexpected_keys)
    if bad:
        raise RuntimeError(f"load_state_dict mismatch beyond _extra_state: {bad}")
    return model


def load_hybrid(cfg: Dict[str, Any], iter_dir: str):
    """Load ``iter_dir`` into a TP=1 MambaModel in this process, as Megatron does."""
    mc._ensure_dist(1, 1)
    return _load(cfg, iter_dir)


def keys_and_load_multi(cfg: Dict[str, Any], iter_dir: str, tp: int,
                        expected: Dict[str, torch.Tensor], timeout: float = 600) -> List[Dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="mcore_hybrid_") as td:
        exp = os.path.join(td, "expected.safetensors")
        mc._save_safetensors(expected, exp)
        job = {"cfg": cfg, "dir": os.path.abspath(iter_dir), "expected": exp, "tp": tp,
               "port": mc.free_port()}
        jf = os.path.join(td, "job.json")
        with open(jf, "w") as f:
            json.dump(job, f)
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "_rank", "--job", jf,
                                   "--rank", str(r)]) for r in range(tp)]
        try:
            rcs = [p.wait(timeout=timeout) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if any(rcs):
            raise RuntimeError(f"hybrid ranks failed with exit codes {rcs}")
        out = []
        for r in range(tp):
            with open(os.path.join(td, f"rank{r}.json")) as f:
                out.append(json.load(f))
        return out


def _rank_main(job_file: str, rank: int) -> None:
    from safetensors.torch import load_file

    with open(job_file) as f:
        job = json.load(f)
    mc.init_dist(rank, job["tp"], job["port"], tp=job["tp"])
    patch_hybrid_for_cpu()
    try:
        tensors, objects = requested(build_hybrid(job["cfg"]))
        try:
            model = _load(job["cfg"], job["dir"])
            res = dict(mc.check_loaded_shards(model, load_file(job["expected"])), error=None)
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            res = {"error": f"{type(e).__name__}: {e}"[:4000], "checked": 0, "mismatched": [],
                   "no_expected": []}
        out = {"rank": rank, "requested": {k: dict(v, shape=list(v["shape"])) for k, v in tensors.items()},
               "objects": sorted(objects), "result": res}
        with open(os.path.join(os.path.dirname(job_file), f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
        torch.distributed.barrier()
    finally:
        mc.destroy_dist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("_rank")
    p.add_argument("--job", required=True)
    p.add_argument("--rank", type=int, required=True)
    a = ap.parse_args(argv)
    _rank_main(a.job, a.rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
