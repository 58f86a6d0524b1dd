"""The nemotron_h reference case (make_refs.py): a tiny Nemotron-H of the same form as
NVIDIA-Nemotron-3-Nano-30B-A3B (nemotron3_nano_30b_a3b_config.json), through Megatron-Bridge
0.3.1's NemotronHBridge (MambaModel) on CPU.

transformers 4.57 (Bridge 0.3.1's) has no nemotron_h, and released checkpoints load it as
remote code (auto_map).  The HF source is therefore written directly: config.json in the
released form (every key of the real config, sizes shrunk, auto_map added), a
configuration_nemotron_h.py that keeps every config.json key (what Bridge reads through
AutoConfig with trust_remote_code), and model.safetensors with exactly the tensor names,
shapes and dtypes transformers 5.24's NemotronHForCausalLM writes for this config
(``from_config(dtype=bfloat16)`` + ``save_pretrained``: everything bf16 except the router
``gate.weight`` and ``gate.e_score_correction_bias``, kept fp32), checked once against
transformers 5.24 (BRIDGE_NOTES.md).  Values: seeded, per tensor name.
"""

from __future__ import annotations

import json
import os
import zlib

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 1234
PATTERN = "M*-EM*E"  # Mamba, attention, dense (squared-ReLU) MLP, MoE

# Sizes of the tiny model; every other key keeps the real config's value.
TINY = {
    "hidden_size": 32,
    "hybrid_override_pattern": PATTERN,
    "num_hidden_layers": len(PATTERN),
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "intermediate_size": 48,
    "mamba_num_heads": 4,
    "mamba_head_dim": 8,
    "n_groups": 2,
    "ssm_state_size": 8,
    "chunk_size": 16,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
    "moe_shared_expert_intermediate_size": 32,
    "max_position_embeddings": 256,
    "vocab_size": 320,
}
AUTO_MAP = {"AutoConfig": "configuration_nemotron_h.NemotronHConfig",
            "AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM"}

CONFIGURATION_PY = '''"""Minimal configuration_nemotron_h for the tiny test checkpoint: keeps every config.json
key as an attribute (the released checkpoints ship NVIDIA's own file; this one is ours)."""
from transformers import PretrainedConfig


class NemotronHConfig(PretrainedConfig):
    model_type = "nemotron_h"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
'''


def tiny_config() -> dict:
    with open(os.path.join(HERE, "nemotron3_nano_30b_a3b_config.json")) as f:
        cfg = json.load(f)
    cfg.update(TINY)
    cfg["auto_map"] = AUTO_MAP
    return dict(sorted(cfg.items()))


def hf_tensors(cfg: dict) -> dict:
    """{name: (shape, dtype)} in the order of the layers, as transformers 5.24 names them."""
    D, V = cfg["hidden_size"], cfg["vocab_size"]
    H, G, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    nh, hdim, ng, ds, k = (cfg["mamba_num_heads"], cfg["mamba_head_dim"], cfg["n_groups"],
                           cfg["ssm_state_size"], cfg["conv_kernel"])
    d_inner = nh * hdim
    conv_dim = d_inner + 2 * ng * ds
    E, moeF, sF, F = (cfg["n_routed_experts"], cfg["moe_intermediate_size"],
                      cfg["moe_shared_expert_intermediate_size"], cfg["intermediate_size"])
    bf, f32 = torch.bfloat16, torch.float32
    out = {"backbone.embeddings.weight": ((V, D), bf)}
    for i, kind in enumerate(cfg["hybrid_override_pattern"]):
        p = f"backbone.layers.{i}."
        out[p + "norm.weight"] = ((D,), bf)
        if kind == "M":
            out[p + "mixer.A_log"] = ((nh,), bf)
            out[p + "mixer.D"] = ((nh,), bf)
            out[p + "mixer.conv1d.bias"] = ((conv_dim,), bf)
            out[p + "mixer.conv1d.weight"] = ((conv_dim, 1, k), bf)
            out[p + "mixer.dt_bias"] = ((nh,), bf)
            out[p + "mixer.in_proj.weight"] = ((2 * d_inner + 2 * ng * ds + nh, D), bf)
            out[p + "mixer.norm.weight"] = ((d_inner,), bf)
            out[p + "mixer.out_proj.weight"] = ((D, d_inner), bf)
        elif kind == "*":
            out[p + "mixer.q_proj.weight"] = ((H * hd, D), bf)
            out[p + "mixer.k_proj.weight"] = ((G * hd, D), bf)
            out[p + "mixer.v_proj.weight"] = ((G * hd, D), bf)
            out[p + "mixer.o_proj.weight"] = ((D, H * hd), bf)
        elif kind == "-":
            out[p + "mixer.up_proj.weight"] = ((F, D), bf)
            out[p + "mixer.down_proj.weight"] = ((D, F), bf)
        elif kind == "E":
            for e in range(E):
                out[p + f"mixer.experts.{e}.up_proj.weight"] = ((moeF, D), bf)
                out[p + f"mixer.experts.{e}.down_proj.weight"] = ((D, moeF), bf)
            out[p + "mixer.gate.e_score_correction_bias"] = ((E,), f32)
            out[p + "mixer.gate.weight"] = ((E, D), f32)
            out[p + "mixer.shared_experts.up_proj.weight"] = ((sF, D), bf)
            out[p + "mixer.shared_experts.down_proj.weight"] = ((D, sF), bf)
        else:
            raise ValueError(kind)
    out["backbone.norm_f.weight"] = ((D,), bf)
    out["lm_head.weight"] = ((V, D), bf)
    return out


def _value(name: str, shape, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed((SEED * 1000003 + zlib.crc32(name.encode())) % (2**63))
    r = torch.randn(*shape, generator=g, dtype=torch.float32)
    if name.endswith("A_log"):
        t = torch.log(torch.linspace(1.0, 16.0, shape[0])) + 0.01 * r
    elif name.endswith("mixer.D") or name.endswith("norm.weight") or name.endswith("norm_f.weight"):
        t = 1.0 + 0.1 * r
    elif name.endswith("dt_bias") or name.endswith("e_score_correction_bias"):
        t = 0.1 * r
    elif "conv1d" in name:
        t = 0.2 * r
    else:
        t = 0.02 * r
    return t.to(dtype)


def make_hf(out_dir: str) -> dict:
    from safetensors.torch import save_file

    import make_refs

    os.makedirs(out_dir, exist_ok=True)
    cfg = tiny_config()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out_dir, "configuration_nemotron_h.py"), "w") as f:
        f.write(CONFIGURATION_PY)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"_from_model_config": True, "bos_token_id": cfg["bos_token_id"],
                   "eos_token_id": cfg["eos_token_id"], "pad_token_id": cfg["pad_token_id"],
                   "transformers_version": cfg["transformers_version"]}, f, indent=2)
        f.write("\n")
    tensors = {n: _value(n, s, d) for n, (s, d) in hf_tensors(cfg).items()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    n = make_refs.make_tokenizer(out_dir, 300)
    return {"writer": "nemotron_h.make_hf (safetensors written directly; names/shapes/dtypes of "
                      "transformers 5.24 NemotronHForCausalLM)", "pattern": PATTERN, "seed": SEED,
            "tokenizer_len": n, "fp32_tensors": sorted(k for k, v in tensors.items() if v.dtype == torch.float32)}


def case(name: str, outdir: str) -> None:
    import bridge_cpu as bc
    import make_refs as mr

    c = mr.Case(name, outdir)
    hf, imp = c.path("hf"), c.path("bridge_import")
    c.doc["hf_source"] = c.step("hf", "config.json of the released form + tensors as transformers "
                                "5.24 writes them (see nemotron_h.py)", make_hf, hf)
    c.step("bridge_import", "AutoBridge.import_ckpt(hf, bridge_import, torch_dtype=bfloat16, "
           "trust_remote_code=True)", bc.import_ckpt, hf, imp, "bfloat16", trust_remote_code=True)
    imp_iter = os.path.join(imp, "iter_0000000")
    c.step("bridge_export", "AutoBridge.from_hf_pretrained(hf, trust_remote_code=True)"
           ".export_ckpt(bridge_import/iter_0000000)", bc.export_ckpt, imp_iter, hf,
           c.path("bridge_export"), trust_remote_code=True)
    c.doc["checks"]["export_equals_hf_source"] = mr.compare_hf(hf, c.path("bridge_export"))
    scale = mr.LORA_ALPHA / mr.LORA_DIM
    # The Nemotron-3 Nano recipe targets linear_qkv, linear_proj, linear_fc1, linear_fc2, in_proj,
    # out_proj.  linear_fc1/2 also match the routed experts, which on GPU are TEGroupedMLP (one
    # adapter per layer shared by all experts) and here SequentialMLP (one adapter per expert,
    # a different layout): the routed experts are left out with wildcard targets, everything
    # else the recipe adapts (dense MLP, shared expert, attention, Mamba) is adapted.
    targets = ["linear_qkv", "linear_proj", "in_proj", "out_proj", "*.mlp.linear_fc1", "*.mlp.linear_fc2",
               "*.shared_experts.linear_fc1", "*.shared_experts.linear_fc2"]
    lora_kw = dict(dim=mr.LORA_DIM, alpha=mr.LORA_ALPHA, seed=mr.ADAPTER_SEED, step=mr.LORA_STEP)
    c.doc["lora"] = dict(lora_kw, scale=scale, target_modules=targets,
                         base="bridge_import (checkpoint.pretrained_checkpoint)",
                         adapter_values="bridge_cpu.adapter_fill(name, shape, seed)")
    c.step("lora", "Bridge LoRA on the hybrid model (targets of the Nemotron-3 Nano recipe: "
           "linear_qkv, linear_proj, linear_fc1, linear_fc2, in_proj, out_proj) via save_checkpoint",
           bc.lora_checkpoint, hf, imp, c.path("lora"), scheme="lora", target_modules=targets,
           trust_remote_code=True, **lora_kw)
    lora_iter = os.path.join(c.path("lora"), f"iter_{mr.LORA_STEP:07d}")
    c.step("merged_megatron", "examples/peft/merge_lora.py (v0.3.1) merge_lora", bc.merge_megatron,
           c.path("lora"), hf, c.path("merged_megatron"))
    c.doc["checks"]["merged_megatron"] = mr.check_megatron_merge(
        imp_iter, lora_iter, os.path.join(c.path("merged_megatron"), "iter_0000000"), scale)
    c.step("merged_hf", "save_hf_pretrained(merge_adapter_weights=True) of base + LoRA",
           bc.merge_hf, c.path("lora"), hf, c.path("merged_hf"), trust_remote_code=True)
    c.step("merged_megatron_export", "export_ckpt(merged_megatron/iter_0000000)", bc.export_ckpt,
           os.path.join(c.path("merged_megatron"), "iter_0000000"), hf,
           c.path("merged_megatron_export"), trust_remote_code=True)
    c.doc["checks"]["merged_hf_equals_export_of_merged_megatron"] = mr.compare_hf(
        c.path("merged_hf"), c.path("merged_megatron_export"))
    c.unavailable("lora_experts",
                  "LoRA on the routed experts is not made: on GPU Bridge wraps TEGroupedMLP's grouped "
                  "linears (one adapter per layer shared by all experts); without TransformerEngine "
                  "the experts are SequentialMLP, which would get one adapter per expert (a different "
                  "checkpoint layout, not a reference of what Bridge writes)")
    c.write()
