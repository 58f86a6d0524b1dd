"""Interop tier 2, issue 15 (MoE families): Qwen3-MoE and Mixtral proved against megatron-core
0.16.1's own mixture-of-experts GPTModel (local spec, SequentialMLP experts, TopKRouter, all-gather
dispatcher; CPU/gloo via mcore_moe.py, which says what it patches and why) and transformers 5.24.0
(eager attention, float32), with torch 2.15.0.

Sources: tiny transformers models (2 layers, hidden 64, 4 heads / 2 KV groups, 4 experts top-2,
random weights from a fixed seed, float32), saved by save_pretrained (one tensor per expert on
disk, as released checkpoints have them).  Qwen3-MoE with and without norm_topk_prob (MCore's
softmax after / before the top-k), Mixtral (w1/w3/w2, always renormalised).

  a. hf_to_megatron dtype=float32 loads into the MoE GPTModel (MCore's default strictness) and its
     logits equal transformers' on the source: max |Δ| <= 1e-4 relative to the largest logit.
     Negative control: two experts swapped, or an expert's gate/up halves swapped, move them far
     beyond that.
  b. our key set, global shapes, dtypes and chunk boxes are what the model's sharded_state_dict
     requests (router, expert axis with a gate and an up chunk per expert, separate pre-MLP norm).
  c. tp=2 and ep=2: our hf_to_megatron with tp=2 / ep=2 holds the same global tensors as tp=1 and
     records the parallelism; it loads into a TP=2 (resp. EP=2) model, 2 gloo ranks, every rank's
     shards equal to the expected slices (each EP rank holds 2 of the 4 experts); that model is
     then saved by megatron-core itself in both on-disk expert layouts it writes (the expert axis
     `mlp.experts.experts.linear_fc1.weight`, and singleton local shards, one key per expert
     `mlp.experts.experts.{e}.linear_fc1.weight_w/_v`), and our megatron_to_hf of each gives the
     HF source back bit for bit.  Also tp=2, ep=2 with expert tensor parallelism 1 (etp=1: the
     dense layers split in two, every expert whole; 2 ranks).  The same with megatron-core's other
     CPU-buildable expert module, GroupedMLP (TP=1; TEGroupedMLP needs TransformerEngine).

Run: python -m pytest -q e2e/interop/test_moe_families.py   (about a minute on 2 cores)
"""

from __future__ import annotations

import os

import pytest
import torch
import yaml

import families_util as fu
import interop_util as iu
import mcore_moe as mm

SEED = 23
pytestmark = [pytest.mark.filterwarnings("ignore:Apex is not installed.*:UserWarning"),
              pytest.mark.filterwarnings("ignore:The legacy GroupedMLP will be deprecated.*:UserWarning")]
TOL = 1e-4  # relative to the largest |logit| when that exceeds 1

CASES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=32, moe_intermediate_size=32, num_experts=4, norm_topk_prob=True,
                       rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3_moe_no_norm_topk": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                               dict(head_dim=32, moe_intermediate_size=32, num_experts=4,
                                    norm_topk_prob=False, rms_norm_eps=1e-6,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(head_dim=16, intermediate_size=32, num_local_experts=4, rms_norm_eps=1e-5,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}
BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64,
            tie_word_embeddings=False)
# (case, tp, ep) of the multi-rank checks
# (case, tp, ep, etp): etp None leaves megatron-core's default (the experts split like the dense
# layers, etp = tp); etp=1 with tp=2 keeps every expert whole while the dense layers are split.
PARALLEL = [("qwen3_moe", 2, 1, None), ("qwen3_moe", 1, 2, None), ("mixtral", 1, 2, None),
            ("qwen3_moe", 2, 2, 1)]


def hf_moe_model(case: str, seed: int = SEED):
    cfg_cls, model_cls, kw = CASES[case]
    transformers = fu.require_transformers(cfg_cls, model_cls)
    cfg = getattr(transformers, cfg_cls)(**BASE, **kw)
    cfg.architectures = [model_cls]
    cfg._attn_implementation = "eager"
    model = getattr(transformers, model_cls)(cfg)
    iu.randomize_(model, seed)
    return model.float().eval()


def _tokens():
    return iu.tokens(128, seed=SEED, batch=2, seq=12, must_include=[0, 127])


@pytest.fixture(scope="module")
def src(ckpt, mod_tmp):
    """case -> {"dir", "model", "cfg" (mcore_moe), "iter" (our float32 conversion, tp=1)}."""
    cache = {}

    def get(case):
        if case not in cache:
            model = hf_moe_model(case)
            d = os.path.join(mod_tmp, f"hf_{case}")
            model.save_pretrained(d)
            tensors, _ = iu.hf_dir_tensors(d)
            assert any(".experts.3." in k for k in tensors), "per-expert tensors on disk expected"
            run = os.path.join(mod_tmp, f"mg_{case}")
            rep = ckpt("run", "convert/hf_to_megatron", f"hf_model_id={d}", f"megatron_path={run}",
                       "dtype=float32", "--json").json()
            assert rep["status"] == "succeeded" and rep["validation"]["smoke_test"] == "passed", rep
            cache[case] = {"dir": d, "model": model, "tensors": tensors, "cfg": mm.moe_cfg_from_hf(model.config),
                           "iter": os.path.join(run, "iter_0000000")}
        return cache[case]

    return get


# --------------------------------------------------------------------------------------------
# a. logits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case, src, mcore, report):
    s = src(case)
    toks = _tokens()
    model = mm.load_moe(s["cfg"], s["iter"])
    got = mcore.forward_logits(model, toks)
    want = iu.hf_logits(s["model"], toks)
    assert got.shape == want.shape == (2, 12, 128)
    assert want.abs().max().item() > 1.0, "degenerate logits: the comparison would prove little"
    diff = fu.rel_diff(got, want)
    report(f"[moe a] {case:<24} max |logits(MCore MoE, our ckpt) - logits(HF)| / max(1, max|logit|) = "
           f"{diff:.3e}  (max |logit| {want.abs().max().item():.2f}; pre_softmax="
           f"{s['cfg']['moe_router_pre_softmax']})")
    assert diff <= TOL, f"{case}: {diff:.3e} > {TOL}"


def test_logits_check_detects_expert_errors(src, mcore, report):
    """Negative control for (a): mapping mistakes inside the experts move the logits far beyond
    the tolerance, so a passing (a) proves the expert mapping."""
    s = src("qwen3_moe")
    toks = _tokens()
    want = iu.hf_logits(s["model"], toks)
    f = s["cfg"]["moe_ffn_hidden_size"]

    def swap_experts(m):
        ex = m.decoder.layers[0].mlp.experts.local_experts
        a, b = ex[0].linear_fc1.weight, ex[1].linear_fc1.weight
        t = a.detach().clone()
        a.copy_(b)
        b.copy_(t)

    def swap_halves(m):
        w = m.decoder.layers[1].mlp.experts.local_experts[2].linear_fc1.weight
        w.copy_(torch.cat([w[f:], w[:f]]).clone())

    def router_rows(m):
        w = m.decoder.layers[1].mlp.router.weight
        w.copy_(w[[1, 0, 2, 3]].clone())

    for what, mutate in [("experts 0 and 1 of layer 0 swapped (fc1)", swap_experts),
                         ("gate/up halves of expert 2, layer 1", swap_halves),
                         ("router rows 0 and 1 of layer 1 swapped", router_rows)]:
        model = mm.load_moe(s["cfg"], s["iter"])
        with torch.no_grad():
            mutate(model)
        diff = fu.rel_diff(mcore.forward_logits(model, toks), want)
        report(f"[moe a control] qwen3_moe, {what}: relative max |Δlogit| = {diff:.3e}")
        assert diff > 100 * TOL, f"{what}: only {diff:.3e}; the logits comparison is too weak"


# --------------------------------------------------------------------------------------------
# b. names, shapes, dtypes, chunks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["qwen3_moe", "mixtral"])
def test_name_map_matches_mcore_request(case, src, ckpt, mcore):
    s = src(case)
    want, want_objects = iu.mcore_requested(mcore, mm.build_moe_gpt(s["cfg"]))
    doc = iu.inspect(ckpt, s["iter"])
    ours = {t["name"]: t for t in doc["tensors"]}
    assert set(ours) == set(want), f"only ours: {sorted(set(ours) - set(want))}, only MCore's: " \
                                   f"{sorted(set(want) - set(ours))}"
    for k, w in want.items():
        o = ours[k]
        assert (tuple(o["shape"]), o["dtype"]) == (w["shape"], w["dtype"]), (k, o, w)
        assert iu.boxes(o["chunks"]) == w["boxes"], (k, iu.boxes(o["chunks"]), w["boxes"])
    fc1 = want["decoder.layers.mlp.experts.experts.linear_fc1.weight"]
    assert fc1["shape"] == (2, 4, 64, 64) and len(fc1["boxes"]) == 2 * 4 * 2  # layer × expert × gate/up
    assert "decoder.layers.pre_mlp_layernorm.weight" in want
    items = {b["name"] for b in doc["byte_items"]}
    assert want_objects <= items, sorted(want_objects - items)
    assert all(fu.TE_ONLY_EXTRA_STATE.search(k) for k in items - want_objects), sorted(items - want_objects)


# --------------------------------------------------------------------------------------------
# c. TP=2 / EP=2 / ETP=1 beside TP=2: our conversions load; megatron-core's own saves (both layouts) come back
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,tp,ep,etp", PARALLEL,
                         ids=[f"{c}-tp{t}-ep{e}" + (f"-etp{x}" if x else "") for c, t, e, x in PARALLEL])
def test_parallel_load_and_mcore_saves(case, tp, ep, etp, src, ckpt, tmp, report):
    import mcore_cpu as mc

    s = src(case)
    run = os.path.join(tmp, "ours")
    rep = ckpt("run", "convert/hf_to_megatron", f"hf_model_id={s['dir']}", f"megatron_path={run}",
               "dtype=float32", f"tp={tp}", f"ep={ep}", *([f"etp={etp}"] if etp else []), "--json").json()
    assert rep["status"] == "succeeded", rep
    it = os.path.join(run, "iter_0000000")
    expected = mc.read_global_tensors(s["iter"])
    iu.assert_bitwise_equal(mc.read_global_tensors(it), expected, f"tp={tp} ep={ep} vs tp=1 conversion")
    with open(os.path.join(it, "run_config.yaml")) as f:
        model = yaml.safe_load(f)["model"]  # as Megatron-Bridge reads it
    assert (model["tensor_model_parallel_size"], model["expert_model_parallel_size"]) == (tp, ep), model
    if etp:
        assert model["expert_tensor_parallel_size"] == etp, model

    saves = [{"dir": os.path.join(tmp, f"mcore_{lay}", "iter_0000001"), "singleton_local_shards": single}
             for lay, single in (("expert_axis", False), ("singleton", True))]
    results = mm.load_save_multi(s["cfg"], it, tp, ep, expected, saves, etp=etp)
    world = len(results)
    for r in results:
        res = r["result"]
        assert res["error"] is None, (r["rank"], res["error"])
        assert res["checked"] and not res["mismatched"] and not res["no_expected"], (r["rank"], res)
        assert r["local_experts"] == 4 // ep
    assert sorted(r["ep_rank"] for r in results) == sorted(list(range(ep)) * (world // ep))
    assert {r["etp_size"] for r in results} == {etp or tp}, results

    problems = []
    for sv in saves:
        md = mc.read_dcp_metadata(sv["dir"])["state_dict_metadata"]
        single = sv["singleton_local_shards"]
        per_expert = [k for k in md if ".experts.experts.3." in k and "_extra_state" not in k]
        axis = [k for k in md if k.endswith("mlp.experts.experts.linear_fc1.weight")]
        assert bool(per_expert) == single and bool(axis) != single, (single, per_expert, axis)
        if single:
            assert any(k.endswith("experts.experts.3.linear_fc1.weight_w") for k in per_expert), per_expert
        out = os.path.join(tmp, f"hf_from_{os.path.basename(os.path.dirname(sv['dir']))}")
        erep = ckpt("run", "convert/megatron_to_hf", f"megatron_path={sv['dir']}", f"hf_model_id={s['dir']}",
                    f"hf_path={out}", "dtype=float32", "--json").json()
        if erep["validation"]["smoke_test"] != "passed":
            problems.append(f"{sv['dir']}: smoke test {erep['validation']}")
        got, where = iu.hf_dir_tensors(out)
        try:
            iu.assert_bitwise_equal(got, s["tensors"], f"export of megatron-core's save ({'singleton' if single else 'expert axis'})")
        except AssertionError as e:
            problems.append(str(e))
    assert not problems, "\n".join(problems)
    report(f"[moe c] {case:<10} tp={tp} ep={ep}{f' etp={etp}' if etp else ''}: our conversion loads into MCore "
           f"({sum(r['result']['checked'] for r in results)} shards equal over {world} ranks); MCore's saves (expert "
           f"axis, singleton local shards) export to the source bit for bit")


@pytest.mark.parametrize("case", ["qwen3_moe", "mixtral"])
def test_grouped_mlp_saves(case, src, mcore, ckpt, tmp, report):
    """megatron-core's other expert module, GroupedMLP (legacy grouped GEMM: one [hidden, experts·ffn]
    matrix per projection, transposed per expert when saved; built on CPU with patch M3 of
    mcore_moe.py, never run): our conversion loads into it, every shard equal, and its own saves in
    both layouts export back to the source bit for bit."""
    import mcore_cpu as mc

    from megatron.core.transformer.moe.experts import GroupedMLP

    s = src(case)
    model = mm.load_moe(s["cfg"], s["iter"], grouped=True)
    assert isinstance(model.decoder.layers[0].mlp.experts, GroupedMLP)
    res = mc.check_loaded_shards(model, mc.read_global_tensors(s["iter"]))
    assert res["checked"] and not res["mismatched"] and not res["no_expected"], res
    for single in (False, True):
        it = os.path.join(tmp, f"grouped_{single}", "iter_0000001")
        mm.save_moe(model, it, single)
        out = os.path.join(tmp, f"hf_{single}")
        ckpt("run", "convert/megatron_to_hf", f"megatron_path={it}", f"hf_model_id={s['dir']}",
             f"hf_path={out}", "dtype=float32")
        got, _ = iu.hf_dir_tensors(out)
        iu.assert_bitwise_equal(got, s["tensors"], f"export of GroupedMLP's save (singleton={single})")
    report(f"[moe c] {case:<10} GroupedMLP: loads our conversion ({res['checked']} shards equal); its saves "
           f"(expert axis, singleton local shards) export to the source bit for bit")
