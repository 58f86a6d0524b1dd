"""Interop tier 2, issue 15 (MoE and hybrid families): ckpt-convert against what the real
Megatron-Bridge 0.3.1 wrote on CPU for the reference cases `qwen3_moe` (Qwen3MoeForCausalLM,
2 layers, 4 experts top-2, QK norm) and `nemotron_h` (NemotronHForCausalLM, pattern `M*-EM*E`:
Mamba-2, attention, squared-ReLU MLP, MoE with shared expert and score-correction bias), read
from $CKPT_BRIDGE_REFS (e2e/bridge/BRIDGE_NOTES.md) with plain torch DCP and safetensors.

  a. hf_to_megatron of Bridge's HF source equals Bridge's own import (`import_ckpt`, bf16):
     the same tensor keys, global shapes, chunk boxes and values, bit for bit.  The one allowed
     difference: the router weight and the score-correction bias (`mlp.router.weight`,
     `mlp.router.expert_bias`) stay float32 in ours, as in the HF source, where Bridge casts the
     router weight to bf16 and rounds the bias to bf16 values; ours equal the source exactly and
     Bridge's after bf16 rounding, and the report names them as kept in float32.  Byte items:
     Bridge's, plus `core_attention._extra_state`, which the TransformerEngine layers Bridge uses on
     GPU save and megatron-core's local spec (the only one on CPU) does not.
  b. megatron_to_hf of Bridge's import equals Bridge's export (`export_ckpt`) bit for bit, and the
     HF source except where Bridge's import already lost precision (the routers, above);
     config.json is the source's as the released model has it (auto_map, hybrid_override_pattern,
     torch_dtype), where Bridge's transformers 4.57 re-serialises it.
  c. megatron_to_hf of our import gives back the HF source bit for bit (float32 routers kept).

Run: CKPT_BRIDGE_REFS=... python -m pytest -q e2e/interop/test_bridge_families.py  (a few seconds)
"""

from __future__ import annotations

import os

import pytest
import torch

import families_util as fu
import interop_util as iu
import mcore_cpu as mc

CASES = ["qwen3_moe", "nemotron_h"]


@pytest.fixture(scope="module")
def refs():
    return fu.bridge_refs()


@pytest.fixture(scope="module")
def ours(ckpt, refs, mod_tmp):
    """case -> (our import's iteration dir, its report); built lazily."""
    cache = {}

    def get(case):
        if case not in cache:
            run = os.path.join(mod_tmp, f"import_{case}")
            rep = ckpt("run", "convert/hf_to_megatron", f"hf_model_id={refs}/{case}/hf",
                       f"megatron_path={run}", "--json").json()
            assert rep["status"] == "succeeded", rep
            cache[case] = (os.path.join(run, "iter_0000000"), rep)
        return cache[case]

    return get


def _boxes(entry):
    return sorted((tuple(c["offsets"]), tuple(c["sizes"])) for c in entry.get("chunks", []))


@pytest.mark.parametrize("case", CASES)
def test_import_equals_bridge_import(case, refs, ours, report):
    it, rep = ours(case)
    theirs_dir = os.path.join(refs, case, "bridge_import", "iter_0000000")
    src, _ = iu.hf_dir_tensors(os.path.join(refs, case, "hf"))
    got, want = mc.read_global_tensors(it), mc.read_global_tensors(theirs_dir)
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    md_got = mc.read_dcp_metadata(it)["state_dict_metadata"]
    md_want = mc.read_dcp_metadata(theirs_dir)["state_dict_metadata"]

    bad, routers = [], []
    for k in sorted(want):
        g, w = got[k], want[k]
        if _boxes(md_got[k]) != _boxes(md_want[k]):
            bad.append(f"{k}: chunks {_boxes(md_got[k])} vs Bridge's {_boxes(md_want[k])}")
        if g.shape != w.shape:
            bad.append(f"{k}: shape {tuple(g.shape)} vs Bridge's {tuple(w.shape)}")
            continue
        s = src.get(_hf_router_name(k)) if fu.ROUTER_RE.search(k) else None
        if s is not None and s.dtype == torch.float32:
            routers.append(k)
            if g.dtype != torch.float32 or not torch.equal(g, s):
                bad.append(f"{k}: {g.dtype}, expected the source's float32 values")
            if not torch.equal(g.to(torch.bfloat16).float(), w.float()):
                bad.append(f"{k}: bf16-rounded value differs from Bridge's")
        elif g.dtype != w.dtype or not torch.equal(g, w):
            bad.append(f"{k}: {g.dtype} vs Bridge's {w.dtype}, max |Δ| "
                       f"{(g.double() - w.double()).abs().max().item():.3g}")
    assert not bad, f"{case}: {len(bad)} differences from Bridge's import:\n  " + "\n  ".join(bad)

    items_got = {k for k, v in md_got.items() if v["type"] != "tensor"}
    items_want = {k for k, v in md_want.items() if v["type"] != "tensor"}
    assert items_want <= items_got, sorted(items_want - items_got)
    extra = items_got - items_want
    assert all(fu.TE_ONLY_EXTRA_STATE.search(k) for k in extra), sorted(extra)
    payloads = {v["value"].__repr__() for v in mc.read_bytes_items(it).values()}
    assert payloads == {"[None]"}, payloads
    with open(os.path.join(it, "metadata.json")) as a, open(os.path.join(theirs_dir, "metadata.json")) as b:
        assert a.read() == b.read()
    load = lambda d: torch.load(os.path.join(d, "common.pt"), weights_only=True)  # noqa: E731
    assert load(it) == load(theirs_dir)

    expect_routers = 4 if case == "nemotron_h" else 0
    assert len(routers) == expect_routers, routers
    fu.assert_kept_fp32_reported(rep, routers, f"{case} import")
    report(f"[bridge a] {case:<10} import: {len(want)} tensors equal Bridge's bit for bit"
           f"{f', {len(routers)} routers float32 (= Bridge after bf16 rounding)' if routers else ''}; "
           f"{len(items_want)} byte items as Bridge's + {len(extra)} core_attention (TE)")


def _hf_router_name(key):
    """HF name of a per-layer Megatron router key of the hybrid case (a Qwen3-MoE router is a
    stacked bf16 key: nothing kept)."""
    leaf = "weight" if key.endswith("router.weight") else "e_score_correction_bias"
    return f"backbone.layers.{key.split('.')[2]}.mixer.gate.{leaf}"


@pytest.mark.parametrize("case", CASES)
def test_export_of_bridge_import_equals_bridge_export(case, refs, ckpt, tmp, report):
    out = os.path.join(tmp, "hf")
    rep = ckpt("run", "convert/megatron_to_hf",
               f"megatron_path={refs}/{case}/bridge_import/iter_0000000",
               f"hf_model_id={refs}/{case}/hf", f"hf_path={out}", "--json").json()
    assert rep["status"] == "succeeded", rep
    got, where = iu.hf_dir_tensors(out)
    bridge, bridge_where = iu.hf_dir_tensors(os.path.join(refs, case, "bridge_export"))
    src, src_where = iu.hf_dir_tensors(os.path.join(refs, case, "hf"))
    iu.assert_bitwise_equal(got, bridge, f"{case}: our export vs Bridge's export")
    assert where == bridge_where == src_where

    lossy = sorted(k for k in src if fu.ROUTER_RE.search(k) and src[k].dtype == torch.float32)
    assert len(lossy) == (4 if case == "nemotron_h" else 0), lossy
    iu.assert_bitwise_equal({k: v for k, v in got.items() if k not in lossy},
                            {k: v for k, v in src.items() if k not in lossy}, f"{case}: export vs source")
    for k in lossy:  # Bridge's import rounded them to bf16; the export keeps what it holds
        assert torch.equal(got[k].float(), src[k].to(torch.bfloat16).float()), k
    # The router weight comes back bf16 (what Bridge's import holds); the bias float32.
    kept = [k for k in lossy if k.endswith("e_score_correction_bias")]
    assert all(got[k].dtype == torch.float32 for k in kept)
    fu.assert_kept_fp32_reported(rep, kept, f"{case} export")

    cfg_src = fu.load_json(os.path.join(refs, case, "hf", "config.json"))
    cfg_got = fu.load_json(os.path.join(out, "config.json"))
    cfg_bridge = fu.load_json(os.path.join(refs, case, "bridge_export", "config.json"))
    assert cfg_got == cfg_src, {k: (cfg_got.get(k), cfg_src.get(k)) for k in set(cfg_got) | set(cfg_src)
                                if cfg_got.get(k) != cfg_src.get(k)}
    renamed = {"torch_dtype", "dtype", "transformers_version"}  # transformers 4.57 re-serialising
    diff = {k for k in set(cfg_got) | set(cfg_bridge) if cfg_got.get(k) != cfg_bridge.get(k)}
    assert diff <= renamed, diff
    if case == "nemotron_h":
        assert cfg_got["auto_map"] == {"AutoConfig": "configuration_nemotron_h.NemotronHConfig",
                                       "AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM"}
        assert cfg_got["hybrid_override_pattern"] == "M*-EM*E"
        assert cfg_got.get("torch_dtype") == "bfloat16"
        with open(os.path.join(out, "configuration_nemotron_h.py"), "rb") as a, \
                open(os.path.join(refs, case, "hf", "configuration_nemotron_h.py"), "rb") as b:
            assert a.read() == b.read(), "remote-code configuration not copied from hf_model_id"
    bridge_files = set(os.listdir(os.path.join(refs, case, "bridge_export")))
    ours_files = set(os.listdir(out)) - {"ckpt-manifest.json", "ckpt-validation.json"}
    assert ours_files == bridge_files, ours_files ^ bridge_files
    report(f"[bridge b] {case:<10} export of Bridge's import: {len(got)} tensors = Bridge's export bit for bit"
           f"; = source except {len(lossy)} routers (Bridge's bf16 rounding); config.json = source's")


@pytest.mark.parametrize("case", CASES)
def test_round_trip_of_our_import_equals_source(case, refs, ours, ckpt, tmp):
    it, _ = ours(case)
    out = os.path.join(tmp, "hf")
    rep = ckpt("run", "convert/megatron_to_hf", f"megatron_path={it}", f"hf_model_id={refs}/{case}/hf",
               f"hf_path={out}", "--json").json()
    got, where = iu.hf_dir_tensors(out)
    src, src_where = iu.hf_dir_tensors(os.path.join(refs, case, "hf"))
    iu.assert_bitwise_equal(got, src, f"{case}: round trip")
    assert where == src_where
    fu.assert_kept_fp32_reported(rep, [k for k, v in src.items() if v.dtype == torch.float32],
                                 f"{case} round-trip export")
