#!/usr/bin/env python3
"""megatron-core 0.16.1 mixture-of-experts GPTModel on CPU (gloo), for test_moe_families.py.

Built on mcore_cpu.py (its CPU patches, process groups, deterministic fills, DCP readers), with
what a MoE model needs on top.  The model is megatron-core's own: GPTModel with the local layer
spec for MoE (`get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False)`: SequentialMLP
experts, TopKRouter, the all-gather token dispatcher), fp32, no fusions.  What is changed, and
why (all process-local):

  M1. `moe_utils.te_general_gemm = None`.  The router's gating linear (router_gating_linear)
      tests `te_general_gemm is not None`, a name moe_utils defines only when TransformerEngine
      imports: without TE the forward raises NameError.  None is the value "no TE" means.
  M2. The layer spec's `sharded_state_dict_keys_map` keeps only
      `input_layernorm. -> self_attention.linear_qkv.layer_norm_`.  The local spec also renames
      `pre_mlp_layernorm.` to `mlp.linear_fc1.layer_norm_` (right for a dense MLP, whose TE
      linear_fc1 fuses the norm); a MoE layer has no fused fc1, and the TransformerEngine spec
      (what Megatron-Bridge trains and saves with) keeps `pre_mlp_layernorm.weight`.
  M3. Only for `grouped=True` (megatron-core's legacy GroupedMLP: `moe_grouped_gemm=True` with the
      local spec; weights as [hidden, experts·ffn] matrices, transposed per expert when saved):
      `grouped_gemm_util.assert_grouped_gemm_is_available` -> no-op, so the module can be built
      without the grouped_gemm CUDA package; such a model is only loaded and saved, never run.
  Config choices, not patches: SequentialMLP experts by default (TEGroupedMLP needs TE),
  `moe_token_dispatcher_type="allgather"` (the all-to-all one keeps CUDA streams), no load
  balancing / aux loss (training only), router dtype fp32.

Python API:
    moe_cfg_from_hf(hc) -> cfg dict (mcore_cpu names + num_moe_experts, moe_router_topk,
                                     moe_ffn_hidden_size, moe_router_pre_softmax)
    build_moe_gpt(cfg, grouped=False) -> GPTModel (current process group)
    load_moe(cfg, iter_dir, grouped=False) -> GPTModel (TP=1, in process; reads the checkpoint's
                                             content metadata)
    save_moe(model, iter_dir, singleton_local_shards) (dist_checkpointing.save, as Megatron-LM)
    sharded_keys(model) -> mcore_cpu.sharded_keys
    load_save_multi(cfg, iter_dir, tp, ep, expected, saves) -> per-rank results
        (tp*ep... ranks build their shard of the model, load ``iter_dir`` as Megatron does,
        compare every shard with ``expected`` global tensors, then save the model with
        ``dist_checkpointing.save`` into each of ``saves`` = [{"dir", "singleton_local_shards"}])

Never put process-spawning code behind anything but the ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional

import torch

import mcore_cpu as mc

_PATCHED = False


def patch_moe_for_cpu() -> None:
    """mcore_cpu's patches plus M1 (module docstring). Idempotent."""
    global _PATCHED
    mc.patch_mcore_for_cpu()
    if _PATCHED:
        return
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):  # M1
        moe_utils.te_general_gemm = None
    _PATCHED = True


def moe_cfg_from_hf(hc) -> Dict[str, Any]:
    """cfg dict of a Qwen3-MoE or Mixtral HF config (Megatron-Bridge's CONFIG_MAPPING;
    docs/mapping.md#configuration)."""
    import interop_util as iu

    cfg = iu.mcore_cfg_from_hf(hc)
    if hc.model_type == "qwen3_moe":
        experts, ffn = hc.num_experts, hc.moe_intermediate_size
        pre_softmax = not bool(hc.norm_topk_prob)
        cfg["qk_layernorm"] = True
    elif hc.model_type == "mixtral":
        experts, ffn = hc.num_local_experts, hc.intermediate_size
        pre_softmax = False  # Mixtral renormalises the top-k: softmax over the chosen logits
    else:
        raise ValueError(hc.model_type)
    cfg.update(ffn_hidden_size=ffn, num_moe_experts=experts, moe_router_topk=hc.num_experts_per_tok,
               moe_ffn_hidden_size=ffn, moe_router_pre_softmax=pre_softmax)
    return cfg


def make_moe_config(cfg: Dict[str, Any], grouped: bool = False):
    from megatron.core import parallel_state as ps

    base = mc.make_config(cfg)
    return dataclasses.replace(
        base,
        num_moe_experts=cfg["num_moe_experts"],
        moe_router_topk=cfg["moe_router_topk"],
        moe_ffn_hidden_size=cfg["moe_ffn_hidden_size"],
        moe_router_pre_softmax=cfg["moe_router_pre_softmax"],
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=grouped,
        moe_use_legacy_grouped_gemm=grouped,
        moe_permute_fusion=False,
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
    )


def build_moe_gpt(cfg: Dict[str, Any], grouped: bool = False):
    """GPTModel with MoE layers (local spec; SequentialMLP experts, or GroupedMLP) for the
    current group."""
    patch_moe_for_cpu()
    if grouped:
        from megatron.core.transformer.moe import grouped_gemm_util

        grouped_gemm_util.assert_grouped_gemm_is_available = lambda: None  # M3
    if not torch.distributed.is_initialized():
        mc._ensure_dist(1, 1)
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    c = mc.normalize_cfg(cfg)
    spec = get_gpt_layer_local_spec(num_experts=c["num_moe_experts"], moe_grouped_gemm=grouped,
                                    moe_use_legacy_grouped_gemm=grouped,
                                    qk_layernorm=c["qk_layernorm"], normalization=c["normalization"])
    spec.submodules.sharded_state_dict_keys_map = {  # M2
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    model = GPTModel(
        config=make_moe_config(c, grouped), transformer_layer_spec=spec, vocab_size=c["vocab_size"],
        max_sequence_length=c["max_sequence_length"], pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=c["share_embeddings_and_output_weights"],
        position_embedding_type="rope", rotary_percent=c["rotary_percent"], rotary_base=c["rotary_base"])
    model.eval()
    return model


def content_metadata(iter_dir: str) -> Optional[Dict[str, Any]]:
    """What the checkpoint's common state records (Megatron-LM passes it to sharded_state_dict)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_content_metadata(iter_dir)


def _load(cfg: Dict[str, Any], iter_dir: str, grouped: bool = False):
    from megatron.core import dist_checkpointing

    model = build_moe_gpt(cfg, grouped)
    md = content_metadata(iter_dir)
    sd = dist_checkpointing.load({"model": model.sharded_state_dict(metadata=md)}, iter_dir)["model"]
    r = model.load_state_dict(sd, strict=False)
    bad = [k for k in r.missing_keys if not k.endswith("_extra_state")] + list(r.unexpected_keys)
    if bad:
        raise RuntimeError(f"load_state_dict mismatch beyond _extra_state: {bad}")
    model.eval()
    return model, md


def load_moe(cfg: Dict[str, Any], iter_dir: str, grouped: bool = False):
    """Load ``iter_dir`` into a TP=1/EP=1 MoE GPTModel in this process (MCore's default
    strictness), as Megatron-LM does: the content metadata of the checkpoint decides the
    expert layout requested."""
    mc._ensure_dist(1, 1)
    return _load(cfg, iter_dir, grouped)[0]


def sharded_keys(model, metadata=None):
    return mc.sharded_keys(model, metadata)


def save_moe(model, out_dir: str, singleton: bool) -> None:
    from megatron.core import dist_checkpointing

    md = dict(mc.MLM_CONTENT_METADATA, singleton_local_shards=singleton)
    os.makedirs(out_dir, exist_ok=True)
    state = {"model": model.sharded_state_dict(metadata=dict(md)), "checkpoint_version": 3.0,
             "iteration": 1}
    dist_checkpointing.save(state, out_dir, content_metadata=md)
    torch.distributed.barrier()


# --------------------------------------------------------------------------------------------
# multi-rank: TP × EP (data parallel = EP for the dense part)
# --------------------------------------------------------------------------------------------


def _init(rank: int, world: int, port: int, tp: int, ep: int, etp: Optional[int] = None) -> None:
    patch_moe_for_cpu()
    from megatron.core import parallel_state, tensor_parallel

    torch.distributed.init_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             expert_model_parallel_size=ep,
                                             expert_tensor_parallel_size=etp)
    torch.manual_seed(mc.DEFAULT_SEED)
    tensor_parallel.model_parallel_cuda_manual_seed(mc.DEFAULT_SEED)  # names only (mcore_cpu patch 4)


def load_save_multi(cfg: Dict[str, Any], iter_dir: str, tp: int, ep: int,
                    expected: Dict[str, torch.Tensor], saves: List[Dict[str, Any]],
                    timeout: float = 600, etp: Optional[int] = None) -> List[Dict[str, Any]]:
    """See the module docstring. World size tp·ep (EP ranks are data-parallel ranks of the
    dense layers); with an expert tensor parallelism ``etp`` other than tp, the smallest world
    both the dense (tp × dp) and the expert (etp × ep × edp) layouts fill."""
    import math

    world = tp * ep if etp is None else math.lcm(tp, etp * ep)
    with tempfile.TemporaryDirectory(prefix="mcore_moe_") as td:
        exp = os.path.join(td, "expected.safetensors")
        mc._save_safetensors(expected, exp)
        job = {"cfg": mc.normalize_cfg(cfg), "dir": os.path.abspath(iter_dir), "expected": exp,
               "saves": [dict(s, dir=os.path.abspath(s["dir"])) for s in saves],
               "tp": tp, "ep": ep, "etp": etp, "world": world, "port": mc.free_port()}
        jf = os.path.join(td, "job.json")
        with open(jf, "w") as f:
            json.dump(job, f)
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "_rank", "--job", jf,
                                   "--rank", str(r)]) for r in range(world)]
        try:
            rcs = [p.wait(timeout=timeout) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if any(rcs):
            raise RuntimeError(f"MoE ranks failed with exit codes {rcs}")
        out = []
        for r in range(world):
            with open(os.path.join(td, f"rank{r}.json")) as f:
                out.append(json.load(f))
        return out


def _rank_main(job_file: str, rank: int) -> None:
    from safetensors.torch import load_file

    with open(job_file) as f:
        job = json.load(f)
    _init(rank, job["world"], job["port"], job["tp"], job["ep"], job.get("etp"))
    from megatron.core import parallel_state as ps

    try:
        try:
            model, md = _load(job["cfg"], job["dir"])
            res = dict(mc.check_loaded_shards(model, load_file(job["expected"])), error=None,
                       content_metadata=repr(md))
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            res, model = {"error": f"{type(e).__name__}: {e}"[:4000], "checked": 0, "mismatched": [],
                          "no_expected": []}, None
        if model is not None:
            for s in job["saves"]:
                save_moe(model, s["dir"], bool(s["singleton_local_shards"]))
        out = {"rank": rank, "tp_rank": ps.get_tensor_model_parallel_rank(),
               "ep_rank": ps.get_expert_model_parallel_rank(),
               "etp_size": ps.get_expert_tensor_parallel_world_size(),
               "local_experts": _local_experts(model), "result": res}
        with open(os.path.join(os.path.dirname(job_file), f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
        torch.distributed.barrier()
    finally:
        mc.destroy_dist()


def _local_experts(model) -> Optional[int]:
    if model is None:
        return None
    return len(model.decoder.layers[0].mlp.experts.local_experts)


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
