"""Interop tier 2, issue 15: a tiny stand-in for NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16, the
model the Nemotron conversion guide uses, round-tripped HF -> Megatron -> HF by ckpt-convert.

The stand-in: config.json in the released form, every key of
e2e/bridge/nemotron3_nano_30b_a3b_config.json (the published config) with the sizes shrunk, the
layer pattern of the same form (`MEM*EME`: Mamba-2 and MoE layers alternating, one attention layer,
no dense MLP; `hybrid_override_pattern`, not transformers 5's `layers_block_type`) and `auto_map`
(the released checkpoint loads as remote code); the weights made by transformers 5.24's
NemotronHForCausalLM (random, fixed seed), saved in several shards with an index, bf16 except
the tensors the real checkpoint keeps in float32: the Mamba `A_log` and `D` and the router's
`e_score_correction_bias` (which ones are float32 in the real checkpoint is inferred, not read
from it: docs/mapping.md#dtypes; transformers 5.24 itself keeps the router weight
and the bias in float32 when it loads or makes a model).

  a. hf_to_megatron (default dtype bf16) at tp=1, tp=2, ep=2 and tp=2 ep=2: the same global tensors
     at every parallelism, the parallelism recorded in run_config.yaml, the float32 tensors kept
     float32 (Megatron `mixer.A_log`, `mixer.D`, `mlp.router.expert_bias`) and the report counting
     every one of them;
  b. megatron_to_hf of each gives the source back bit for bit: every tensor with its dtype, the
     shard files and index, config.json as released (auto_map, hybrid_override_pattern), and the
     report counts the float32 tensors kept again.

Run: python -m pytest -q e2e/interop/test_nemotron3_nano.py   (a few seconds)
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

import families_util as fu
import interop_util as iu

HERE = os.path.dirname(os.path.abspath(__file__))
RELEASED_CONFIG = os.path.join(os.path.dirname(HERE), "bridge", "nemotron3_nano_30b_a3b_config.json")
SEED = 41
PATTERN = "MEM*EME"
TINY = dict(hidden_size=32, hybrid_override_pattern=PATTERN, num_hidden_layers=len(PATTERN),
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=16,
            mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8, chunk_size=16,
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            moe_shared_expert_intermediate_size=32, max_position_embeddings=256, vocab_size=256)
AUTO_MAP = {"AutoConfig": "configuration_nemotron_h.NemotronHConfig",
            "AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM"}
FP32 = ("mixer.A_log", "mixer.D", "mixer.gate.e_score_correction_bias")
PARALLEL = [(1, 1), (2, 1), (1, 2), (2, 2)]


def released_form_config() -> dict:
    with open(RELEASED_CONFIG) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["NemotronHForCausalLM"] and "hybrid_override_pattern" in cfg
    released = cfg["hybrid_override_pattern"]
    assert set(released) == set(PATTERN) == {"M", "E", "*"}, (released, PATTERN)
    cfg.update(TINY)
    cfg["auto_map"] = AUTO_MAP
    return dict(sorted(cfg.items()))


@pytest.fixture(scope="module")
def nano(mod_tmp):
    """The stand-in's HF directory and tensors."""
    from safetensors.torch import load_file, save_file

    transformers = fu.require_transformers("NemotronHConfig", "NemotronHForCausalLM")

    cfg_json = released_form_config()
    hc = transformers.NemotronHConfig(**{k: v for k, v in cfg_json.items()
                                         if k not in ("auto_map", "architectures", "torch_dtype",
                                                      "transformers_version", "model_type")})
    assert hc.hybrid_override_pattern == PATTERN
    model = transformers.NemotronHForCausalLM(hc)
    iu.randomize_(model, SEED)
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.copy_(0.2 * torch.randn(m.e_score_correction_bias.shape, generator=g))
    d = os.path.join(mod_tmp, "nano")
    model.float().save_pretrained(d, max_shard_size="40KB")
    # The released form: config.json as published (sizes shrunk), dtypes as the real checkpoint.
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg_json, f, indent=2)
        f.write("\n")
    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    assert len(files) > 1, files
    for fn in files:
        p = os.path.join(d, fn)
        ts = load_file(p)
        save_file({k: v.contiguous() if k.endswith(FP32) else v.to(torch.bfloat16).contiguous()
                   for k, v in ts.items()}, p, metadata={"format": "pt"})
    idx = os.path.join(d, "model.safetensors.index.json")
    with open(idx) as f:
        index = json.load(f)
    index["metadata"]["total_size"] = sum(
        t.numel() * t.element_size() for fn in files for t in load_file(os.path.join(d, fn)).values())
    with open(idx, "w") as f:
        json.dump(index, f, indent=2)
    tensors, where = iu.hf_dir_tensors(d)
    fp32 = sorted(k for k, v in tensors.items() if v.dtype == torch.float32)
    n_m, n_e = PATTERN.count("M"), PATTERN.count("E")
    assert len(fp32) == 2 * n_m + n_e and all(k.endswith(FP32) for k in fp32), fp32
    assert all(v.dtype == torch.bfloat16 for k, v in tensors.items() if k not in fp32)
    return {"dir": d, "tensors": tensors, "where": where, "fp32": fp32, "config": cfg_json}


@pytest.fixture(scope="module")
def imports(nano, ckpt, mod_tmp):
    """(tp, ep) -> (our iteration dir, report), default dtype (bf16)."""
    out = {}
    for tp, ep in PARALLEL:
        run = os.path.join(mod_tmp, f"mg_tp{tp}_ep{ep}")
        rep = ckpt("run", "convert/hf_to_megatron", f"hf_model_id={nano['dir']}", f"megatron_path={run}",
                   f"tp={tp}", f"ep={ep}", "--json").json()
        assert rep["status"] == "succeeded" and rep["validation"]["smoke_test"] == "passed", rep
        out[(tp, ep)] = (os.path.join(run, "iter_0000000"), rep)
    return out


def test_import_keeps_fp32_at_every_parallelism(nano, imports, ckpt, report):
    import mcore_cpu as mc

    base = mc.read_global_tensors(imports[(1, 1)][0])
    kept = sorted(k for k, v in base.items() if v.dtype == torch.float32)
    assert len(kept) == len(nano["fp32"]) and all(
        k.endswith(("mixer.A_log", "mixer.D", "mlp.router.expert_bias")) for k in kept), kept
    assert all(v.dtype == torch.bfloat16 for k, v in base.items() if k not in kept)
    for (tp, ep), (it, rep) in imports.items():
        fu.assert_kept_fp32_reported(rep, kept, f"import tp={tp} ep={ep}")
        if (tp, ep) != (1, 1):
            iu.assert_bitwise_equal(mc.read_global_tensors(it), base, f"tp={tp} ep={ep} vs tp=1")
        with open(os.path.join(it, "run_config.yaml")) as f:
            rc = yaml.safe_load(f)  # as Megatron-Bridge reads it
        assert (rc["model"]["tensor_model_parallel_size"], rc["model"]["expert_model_parallel_size"]) == (tp, ep)
        assert rc["model"]["hybrid_override_pattern"] == PATTERN
    report(f"[nano a] {PATTERN}: {len(base)} Megatron tensors equal at tp/ep {PARALLEL}; {len(kept)} float32 kept "
           f"and counted by the report ({PATTERN.count('M')}×A_log, D; {PATTERN.count('E')}×expert_bias)")


@pytest.mark.parametrize("tp,ep", PARALLEL, ids=[f"tp{t}-ep{e}" for t, e in PARALLEL])
def test_round_trip_bit_identical(tp, ep, nano, imports, ckpt, tmp):
    it, _ = imports[(tp, ep)]
    out = os.path.join(tmp, "hf")
    rep = ckpt("run", "convert/megatron_to_hf", f"megatron_path={it}", f"hf_model_id={nano['dir']}",
               f"hf_path={out}", "--json").json()
    assert rep["status"] == "succeeded" and rep["validation"]["smoke_test"] == "passed", rep
    got, where = iu.hf_dir_tensors(out)
    iu.assert_bitwise_equal(got, nano["tensors"], f"round trip tp={tp} ep={ep}")
    assert where == nano["where"], "shard assignment differs from the source's"
    assert fu.load_json(os.path.join(out, "config.json")) == nano["config"]
    fu.assert_kept_fp32_reported(rep, nano["fp32"], f"export tp={tp} ep={ep}")
