"""Interop tier 2, issue 15 (hybrid family): Nemotron-H (`NemotronHForCausalLM`; Mamba-2 `M`,
attention `*`, squared-ReLU MLP `-`, MoE `E` layers) proved against megatron-core 0.16.1's hybrid
MambaModel (CPU/gloo via mcore_hybrid.py, which says what it patches and why) and transformers
5.24.0's NemotronHForCausalLM, with torch 2.15.0.

Source: a tiny NemotronH made with transformers (pattern `MEM*E-M`, hidden 32, 4 Mamba heads × 8 in
2 groups, state 8, conv 4, chunk_size 4; 4 heads / 2 KV groups; 4 experts top-2 with a shared
expert, routed_scaling_factor 2.5), random weights from a fixed seed; saved in float32, and in
bf16 as transformers saves it (`_from_config(dtype=bfloat16)`: the router weight and
`e_score_correction_bias` stay float32).

  a. Megatron side, by names, shapes, dtypes and chunking (megatron-core's Mamba mixer runs only on
     CUDA kernels, so no Megatron forward; MCORE_NOTES.md): our hf_to_megatron output has exactly
     the keys, global shapes and chunk boxes the MambaModel's sharded_state_dict requests (Mamba
     in_proj / conv1d per component, expert axis, router, shared expert, output layer), and its
     dtypes, except the float32 tensors of the source we keep (the report names them) where a bf16
     Megatron model holds bf16; it loads into the model (MCore's default strictness) with every
     shard equal.  At TP=2 (2 gloo ranks): our tp=2 output has the keys, global shapes and dtypes
     of the TP=2 model's request and loads into it, every rank's shards equal.
  b. HF side: transformers' forward of our hf_to_megatron -> megatron_to_hf export (float32) equals
     the source's logits exactly (the tensors come back bit for bit).
  c. Our smoke-test forward (`ckpt-convert validate DIR dump_logits=F tokens=…`) against
     transformers' forward on the same checkpoint: max |Δ| <= 1e-4 relative to the largest logit.
     Like with like: transformers runs its PyTorch fallbacks (mamba_ssm and causal_conv1d are not
     installed; asserted): the chunked SSD scan (`mamba2_chunk_scan`, chunk_size 4, so 3 chunks
     over 12 tokens; its chunk helper is seen running) and a torch causal conv; ours follows
     neither kernel: a sequential per-token scan (state h ← exp(dt·A)·h + dt·B·x, y = C·h + D·x),
     a direct causal convolution, the gated grouped RMSNorm (norm of y·silu(z) per group).  Both
     clamp the time step below at time_step_min, as transformers does (Megatron-Core does not
     clamp): a case with one head's time step under it shows the clamp matters there, and our
     Megatron view (Megatron-Core's rule) then differs, which the conversion's own smoke test
     avoids by computing both sides with the source's rule.  Group-limited routing (n_group 2,
     topk_group 1) is a case of its own.

Run: python -m pytest -q e2e/interop/test_nemotron_h.py   (about half a minute on 2 cores)
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import yaml

import families_util as fu
import interop_util as iu
import mcore_hybrid as mh

SEED = 31
TOL = 1e-4  # relative to the largest |logit| when that exceeds 1
PATTERN = "MEM*E-M"
CONFIG = dict(vocab_size=128, hidden_size=32, hybrid_override_pattern=PATTERN, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8,
              n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=4, n_routed_experts=4,
              num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=32,
              routed_scaling_factor=2.5, max_position_embeddings=64, layer_norm_epsilon=1e-5)
SEQ = 12
# The time-step clamp case: head 1 of layer 0 gets dt_bias -12, so softplus(dt + dt_bias) is far
# below time_step_min (0.001) at every position.
CASES = {"plain": {}, "dt_clamped": {"dt_bias": -12.0}, "grouped_routing": {"n_group": 2, "topk_group": 1}}
pytestmark = pytest.mark.filterwarnings("ignore:Apex is not installed.*:UserWarning")


def nemotron_config(**over):
    transformers = fu.require_transformers("NemotronHConfig", "NemotronHForCausalLM")
    kw = dict(CONFIG)
    kw.update({k: v for k, v in over.items() if k != "dt_bias"})
    cfg = transformers.NemotronHConfig(**kw)
    cfg.architectures = ["NemotronHForCausalLM"]
    cfg._attn_implementation = "eager"
    assert cfg.hybrid_override_pattern == PATTERN
    return cfg


def nemotron_model(dtype=torch.float32, **over):
    """A randomly initialised NemotronH (interop_util.randomize_: every weight a function of
    (seed, name)); bf16 as transformers makes it (router weight and bias kept float32)."""
    import transformers

    cfg = nemotron_config(**over)
    model = transformers.NemotronHForCausalLM(cfg)
    iu.randomize_(model, SEED)
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():  # a buffer, which randomize_ (parameters) leaves at zero
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.copy_(0.2 * torch.randn(m.e_score_correction_bias.shape, generator=g))
    if "dt_bias" in over:
        with torch.no_grad():
            model.model.layers[0].mixer.dt_bias[1] = over["dt_bias"]
    model = model.float().eval()
    if dtype == torch.float32:
        return model
    m16 = transformers.NemotronHForCausalLM._from_config(cfg, dtype=dtype)
    m16.load_state_dict(model.state_dict())
    return m16.eval()


def _tokens():
    return iu.tokens(128, seed=SEED, batch=1, seq=SEQ, must_include=[0, 127])[0].tolist()


@pytest.fixture(scope="module")
def bf16_src(ckpt, mod_tmp):
    """The bf16 source (as transformers saves it) and our default (bf16) conversions at tp 1, 2."""
    model = nemotron_model(torch.bfloat16)
    d = os.path.join(mod_tmp, "hf_bf16")
    model.save_pretrained(d)
    tensors, _ = iu.hf_dir_tensors(d)
    fp32 = sorted(k for k, v in tensors.items() if v.dtype == torch.float32)
    assert len(fp32) == 4 and all(fu.ROUTER_RE.search(k) for k in fp32), fp32
    out = {"dir": d, "model": model, "tensors": tensors, "fp32": fp32}
    for tp in (1, 2):
        run = os.path.join(mod_tmp, f"mg_bf16_tp{tp}")
        rep = ckpt("run", "convert/hf_to_megatron", f"hf_model_id={d}", f"megatron_path={run}", f"tp={tp}",
                   "--json").json()
        assert rep["status"] == "succeeded" and rep["validation"]["smoke_test"] == "passed", rep
        out[tp] = (os.path.join(run, "iter_0000000"), rep)
    return out


# --------------------------------------------------------------------------------------------
# a. the Megatron side: names, shapes, dtypes, chunks; loads
# --------------------------------------------------------------------------------------------


def test_megatron_side_matches_mcore_hybrid_model(bf16_src, ckpt, mcore, report):
    import mcore_cpu as mc

    it, rep = bf16_src[1]
    cfg = mh.hybrid_cfg_from_hf(bf16_src["model"].config)
    model = mh.build_hybrid(cfg)
    want, want_objects = mh.requested(model)
    doc = iu.inspect(ckpt, it)
    ours = {t["name"]: t for t in doc["tensors"]}
    assert set(ours) == set(want), f"only ours: {sorted(set(ours) - set(want))}, only MCore's: " \
                                   f"{sorted(set(want) - set(ours))}"
    kept, bad = [], []
    for k, w in sorted(want.items()):
        o = ours[k]
        if tuple(o["shape"]) != w["shape"] or iu.boxes(o["chunks"]) != w["boxes"]:
            bad.append(f"{k}: ours {o['shape']} {iu.boxes(o['chunks'])}, MCore {w['shape']} {w['boxes']}")
        if o["dtype"] != w["dtype"]:
            if (o["dtype"], w["dtype"]) == ("float32", "bfloat16"):
                kept.append(k)
            else:
                bad.append(f"{k}: dtype {o['dtype']}, MCore {w['dtype']}")
    assert not bad, "\n".join(bad)
    # The float32 tensors of the source stay float32 (a bf16 model holds them in bf16): the routers.
    assert sorted(kept) == sorted(k for k in ours if k.endswith("mlp.router.weight")), kept
    assert all(ours[k]["dtype"] == want[k]["dtype"] == "float32" for k in ours if k.endswith("expert_bias"))
    fu.assert_kept_fp32_reported(rep, kept + [k for k in ours if k.endswith("expert_bias")], "import")
    # What only a hybrid model has, by name:
    for k, shape in [("decoder.layers.0.mixer.in_proj.weight.z", (32, 32)),
                     ("decoder.layers.0.mixer.in_proj.weight.dt", (4, 32)),
                     ("decoder.layers.0.mixer.conv1d.weight.B", (16, 1, 4)),
                     ("decoder.layers.0.mixer.in_proj.layer_norm_weight", (32,)),
                     ("decoder.layers.1.mlp.experts.experts.linear_fc1.weight", (4, 16, 32)),
                     ("decoder.layers.1.pre_mlp_layernorm.weight", (32,)),
                     ("decoder.layers.5.mlp.linear_fc1.layer_norm_weight", (32,)),
                     ("decoder.final_norm.weight", (32,))]:
        assert want[k]["shape"] == shape, (k, want[k]["shape"])
    items = {b["name"] for b in doc["byte_items"]}
    assert want_objects <= items, sorted(want_objects - items)
    assert all(fu.TE_ONLY_EXTRA_STATE.search(k) for k in items - want_objects), sorted(items - want_objects)
    assert "output_layer._extra_state/shard_0_1" in want_objects

    loaded = mh.load_hybrid(cfg, it)  # MCore's default strictness
    res = mc.check_loaded_shards(loaded, mc.read_global_tensors(it))
    assert res["checked"] >= len(want) and not res["mismatched"] and not res["no_expected"], res
    report(f"[nemotron_h a] TP=1: {len(want)} keys, shapes, chunks as MambaModel's sharded_state_dict; "
           f"dtypes too except {len(kept)} router weights kept float32; {len(want_objects)} byte items "
           f"(+{len(items - want_objects)} core_attention, TE); loads, {res['checked']} shards equal")


def test_megatron_side_tp2(bf16_src, ckpt, report):
    import mcore_cpu as mc

    it, _ = bf16_src[2]
    with open(os.path.join(it, "run_config.yaml")) as f:
        assert yaml.safe_load(f)["model"]["tensor_model_parallel_size"] == 2  # as Megatron-Bridge reads it
    expected = mc.read_global_tensors(it)
    iu.assert_bitwise_equal(expected, mc.read_global_tensors(bf16_src[1][0]), "tp=2 vs tp=1 conversion")
    ours = {t["name"]: t for t in iu.inspect(ckpt, it)["tensors"]}
    cfg = mh.hybrid_cfg_from_hf(bf16_src["model"].config)
    results = mh.keys_and_load_multi(cfg, it, 2, expected)
    for r in results:
        req, res = r["requested"], r["result"]
        assert set(req) == set(ours), sorted(set(ours) ^ set(req))
        for k, w in req.items():
            assert ours[k]["shape"] == w["shape"], (k, ours[k]["shape"], w["shape"])
            assert ours[k]["dtype"] == w["dtype"] or k.endswith("router.weight"), (k, ours[k]["dtype"], w)
        assert res["error"] is None, (r["rank"], res["error"])
        assert res["checked"] and not res["mismatched"] and not res["no_expected"], (r["rank"], res)
    split = results[1]["requested"]["decoder.layers.0.mixer.in_proj.weight.x"]["boxes"]
    assert split == [[[16, 0], [16, 32]]], split  # rank 1 holds the second half of x
    report(f"[nemotron_h a] TP=2: our tp=2 output has the keys, global shapes and dtypes of the TP=2 "
           f"model's request; loads, {[r['result']['checked'] for r in results]} shards equal per rank")


# --------------------------------------------------------------------------------------------
# b. the HF side: transformers on our export
# --------------------------------------------------------------------------------------------


def test_hf_export_logits_equal_source(ckpt, tmp, report):
    import transformers

    model = nemotron_model()
    src = os.path.join(tmp, "hf")
    model.save_pretrained(src)
    run = os.path.join(tmp, "mg")
    ckpt("run", "convert/hf_to_megatron", f"hf_model_id={src}", f"megatron_path={run}", "dtype=float32")
    out = os.path.join(tmp, "hf_back")
    ckpt("run", "convert/megatron_to_hf", f"megatron_path={run}/iter_0000000", f"hf_model_id={src}",
         f"hf_path={out}", "dtype=float32")
    got_t, _ = iu.hf_dir_tensors(out)
    src_t, _ = iu.hf_dir_tensors(src)
    iu.assert_bitwise_equal(got_t, src_t, "float32 round trip")
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert type(back).__name__ == "NemotronHForCausalLM"
    assert not info.get("missing_keys") and not info.get("unexpected_keys"), info
    toks = torch.tensor([_tokens()])
    with torch.no_grad():
        want = model(toks).logits.float()
        got = back.eval()(toks).logits.float()
    assert want.abs().max().item() > 1.0
    diff = (got - want).abs().max().item()
    report(f"[nemotron_h b] transformers on our export vs on the source: max |Δlogit| = {diff:.3e}")
    assert diff == 0.0, diff


# --------------------------------------------------------------------------------------------
# c. our smoke-test forward against transformers' forward
# --------------------------------------------------------------------------------------------


def _dump(ckpt, path, toks, out, *extra, foreign=("manifest",)):
    rep = ckpt("validate", path, f"dump_logits={out}", "tokens=" + ",".join(map(str, toks)), *extra,
               "--json", expect=1 if foreign else 0).json()
    assert [c["name"] for c in rep["checks"] if not c["passed"]] == list(foreign), rep["checks"]
    from safetensors.torch import load_file

    d = load_file(out)
    assert d["tokens"].tolist() == toks
    return d["logits"]


def _transformers_logits(model, toks):
    """transformers' forward, with proof of the path it takes: no mamba_ssm / causal_conv1d, so
    the PyTorch fallbacks; the chunked scan's helper (segment_sum) runs."""
    from transformers.models.nemotron_h import modeling_nemotron_h as mnh

    missing = [p for p in ("mamba_ssm", "causal_conv1d") if importlib.util.find_spec(p) is None]
    assert missing == ["mamba_ssm", "causal_conv1d"], f"kernel packages installed: {missing}"
    calls = []
    orig = mnh.segment_sum
    mnh.segment_sum = lambda x: (calls.append(tuple(x.shape)), orig(x))[1]
    try:
        with torch.no_grad():
            logits = model(torch.tensor([toks])).logits[0].float()
    finally:
        mnh.segment_sum = orig
    # The intra-chunk call sees A as (batch, heads, chunks, chunk_size).
    n_chunks = {(s[2], s[3]) for s in calls if len(s) == 4}
    assert n_chunks, f"transformers did not run its PyTorch chunked scan ({calls})"
    return logits, calls, n_chunks


@pytest.mark.parametrize("case", list(CASES))
def test_smoke_forward_matches_transformers(case, ckpt, tmp, report):
    over = CASES[case]
    model = nemotron_model(**over)
    d = os.path.join(tmp, "hf")
    model.save_pretrained(d)
    toks = _tokens()
    want, calls, n_chunks = _transformers_logits(model, toks)
    assert n_chunks == {(SEQ // CONFIG["chunk_size"], CONFIG["chunk_size"])}, (calls, n_chunks)
    ours = _dump(ckpt, d, toks, os.path.join(tmp, "hf.safetensors"))
    assert ours.shape == want.shape == (SEQ, 128)
    assert want.abs().max().item() > 1.0, "degenerate logits: the comparison would prove little"
    diff = fu.rel_diff(ours, want)

    # The same weights through our Megatron view (hf_to_megatron float32, Megatron-Core's rules).
    run = os.path.join(tmp, "mg")
    rep = ckpt("run", "convert/hf_to_megatron", f"hf_model_id={d}", f"megatron_path={run}", "dtype=float32",
               "--json").json()
    assert rep["validation"]["smoke_test"] == "passed" and rep["validation"]["smoke_test_max_abs_diff"] == 0.0
    mg = _dump(ckpt, os.path.join(run, "iter_0000000"), toks, os.path.join(tmp, "mg.safetensors"), foreign=())
    mg_diff = fu.rel_diff(mg, want)

    note = ""
    if "dt_bias" in over:
        # The clamp is what differs here: transformers without it moves far.
        mixer = model.model.layers[0].mixer
        lim = mixer.time_step_limit
        mixer.time_step_limit = (0.0, float("inf"))
        try:
            unclamped, _, _ = _transformers_logits(model, toks)
        finally:
            mixer.time_step_limit = lim
        clamp_effect = fu.rel_diff(unclamped, want)
        note = (f"; without the time_step_min clamp transformers moves by {clamp_effect:.3e}, our Megatron view "
                f"(Megatron-Core's rule, no clamp) is {mg_diff:.3e} from transformers and "
                f"{fu.rel_diff(mg, unclamped):.3e} from transformers unclamped")
        assert clamp_effect > 10 * TOL and mg_diff > 10 * TOL, (clamp_effect, mg_diff)
        assert fu.rel_diff(mg, unclamped) <= TOL
    else:
        assert mg_diff <= TOL, f"{case}: Megatron view {mg_diff:.3e} > {TOL}"
        note = f"; our Megatron view of the conversion {mg_diff:.3e}"
    # Controls: the routing features of the case change transformers' logits here.
    routers = [m for m in model.modules() if type(m).__name__ == "NemotronHTopkRouter"]
    for what, attr, value in [("score-correction bias zeroed", "e_score_correction_bias", None),
                              ("group-limited routing off", "num_group", 1)]:
        if attr == "num_group" and "n_group" not in over:
            continue
        saved = [getattr(r, attr) for r in routers]
        for r in routers:
            setattr(r, attr, torch.zeros_like(r.e_score_correction_bias) if value is None else value)
        try:
            moved = fu.rel_diff(_transformers_logits(model, toks)[0], want)
        finally:
            for r, v in zip(routers, saved):
                setattr(r, attr, v)
        note += f"; {what}: transformers moves by {moved:.3e}"
        assert moved > 10 * TOL, (what, moved)
    report(f"[nemotron_h c] {case:<16} max |logits(ckpt-convert) - logits(transformers)| / max(1, max|logit|)"
           f" = {diff:.3e} (max |logit| {want.abs().max().item():.2f}; transformers: PyTorch chunked scan, "
           f"{SEQ // CONFIG['chunk_size']} chunks of {CONFIG['chunk_size']}; ours: sequential scan){note}")
    assert diff <= TOL, f"{case}: {diff:.3e} > {TOL}"
