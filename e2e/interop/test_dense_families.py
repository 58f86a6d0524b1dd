"""Interop tier 2, issue "Dense model families": the MAPPINGS of ckpt-convert for Llama (untied
and tied), Mistral, Qwen2 and Qwen3, proved against megatron-core 0.16.1 (GPTModel, local spec,
CPU/gloo via mcore_cpu.py) and transformers 5.24.0 (eager attention, float32), with torch 2.15.0.

  a. HF -> Megatron (float32) loads into MCore with the default strictness; logits equal HF's.
  b. padded vocabulary (130 -> 256 rows, make_vocab_size_divisible_by=128).
  c. HF -> Megatron -> HF is bit-identical in bf16 (the default dtype).
  d. our key set / global shapes / chunk boxes are what MCore's sharded_state_dict requests.
  e. MCore-saved checkpoints (TP=1, TP=2) -> HF load in transformers with MCore's logits.

Run: python -m pytest -q e2e/interop/test_dense_families.py   (a few minutes on 2 cores)
"""

from __future__ import annotations

import os

import pytest
import torch
import yaml

import interop_util as iu

SEED = 77
TOL = 1e-4
PAD_TO = 128
# case -> (family, HF config overrides, extra hf_to_megatron arguments, padded vocab)
CASES = {
    "llama": ("llama", {}, [], None),
    "llama_tied": ("llama_tied", {}, [], None),
    "mistral": ("mistral", {}, [], None),
    "qwen2": ("qwen2", {}, [], None),
    "qwen3": ("qwen3", {}, [], None),
    "llama_vocab130": ("llama", {"vocab_size": 130}, [f"make_vocab_size_divisible_by={PAD_TO}"], 256),
    "llama_tied_vocab130": ("llama_tied", {"vocab_size": 130},
                            [f"make_vocab_size_divisible_by={PAD_TO}"], 256),
}
FAMILY_CASES = ["llama", "llama_tied", "mistral", "qwen2", "qwen3"]
PAD_CASES = ["llama_vocab130", "llama_tied_vocab130"]
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj",
                       "self_attention.core_attention", "mlp.linear_fc1", "mlp.linear_fc2")


def _tokens(vocab):
    # ids at both ends of the vocabulary (129/128 are the rows beyond 128 in the padded case)
    return iu.tokens(vocab, seed=SEED, batch=2, seq=12, must_include=[0, vocab - 1, vocab - 2, 1])


def _build_src(case, out_dir, dtype, max_shard_size):
    family, over, _, _ = CASES[case]
    model = iu.hf_model(family, SEED, dtype=dtype, **over)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tensors, where = iu.hf_dir_tensors(out_dir)
    iu.check_perturbed(tensors)
    tied = bool(model.config.tie_word_embeddings)
    assert ("lm_head.weight" in tensors) == (not tied), sorted(tensors)
    return {"case": case, "dir": out_dir, "config": model.config, "tensors": tensors,
            "where": where, "model": model}


def _to_megatron(ckpt, src, run, *extra):
    args = ["run", "convert/hf_to_megatron", f"hf_model_id={src['dir']}", f"megatron_path={run}",
            *CASES[src["case"]][2], *extra, "--json"]
    rep = ckpt(*args).json()
    assert rep["status"] == "succeeded", rep
    return os.path.join(run, "iter_0000000")


def _mcore_cfg(src):
    return iu.mcore_cfg_from_hf(src["config"], vocab_size=CASES[src["case"]][3])


# --------------------------------------------------------------------------------------------
# float32 sources and their Megatron conversions (shared by a, b, d)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def f32(ckpt, mod_tmp):
    """case -> {source dict, "iter": our float32 Megatron iteration dir}; built lazily."""
    cache = {}

    def get(case):
        if case not in cache:
            src = _build_src(case, os.path.join(mod_tmp, f"hf_f32_{case}"), torch.float32, "5GB")
            src["iter"] = _to_megatron(ckpt, src, os.path.join(mod_tmp, f"mg_f32_{case}"), "dtype=float32")
            cache[case] = src
        return cache[case]

    return get


# --------------------------------------------------------------------------------------------
# a (+ b). logits: our checkpoint in MCore vs the HF source in transformers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", FAMILY_CASES + PAD_CASES)
def test_logits_match_hf(case, f32, mcore, report):
    src = f32(case)
    hc = src["config"]
    cfg = _mcore_cfg(src)
    v = hc.vocab_size
    toks = _tokens(v)
    model = mcore.load_into_gpt(cfg, src["iter"])  # default strictness (assume_ok_unexpected)
    got = mcore.forward_logits(model, toks)
    assert got.shape == (2, 12, cfg["vocab_size"])
    want = iu.hf_logits(src["dir"], toks)
    assert want.shape == (2, 12, v)
    assert want.abs().max().item() > 1.0, "degenerate logits: the comparison would prove little"
    diff = (got[..., :v] - want).abs().max().item()
    report(f"[dense a] {case:<20} max |logits(MCore, our ckpt) - logits(HF)| = {diff:.3e}"
           f"  (max |logit| {want.abs().max().item():.2f}, vocab {v}"
           f"{' padded to ' + str(cfg['vocab_size']) if cfg['vocab_size'] != v else ''})")
    assert diff <= TOL, f"{case}: max abs logits difference {diff:.3e} > {TOL}"


def test_logits_check_detects_layout_errors(f32, mcore, report):
    """Negative control for (a): the weights are scaled so that the usual mapping mistakes move
    the logits far beyond the 1e-4 tolerance (else a passing (a) would prove little)."""
    src = f32("llama")
    toks = _tokens(src["config"].vocab_size)
    want = iu.hf_logits(src["dir"], toks)
    d, p = 16, 2  # head_dim, query heads per group
    mistakes = {
        "swap two query heads of group 0 (layer 1)":
            ("decoder.layers.1.self_attention.linear_qkv.weight",
             lambda w: torch.cat([w[d:2 * d], w[:d], w[2 * d:]])),
        "swap k and v of group 1 (layer 0)":
            ("decoder.layers.0.self_attention.linear_qkv.weight",
             lambda w: torch.cat([w[:(p + 2) * d + p * d], w[-d:], w[-2 * d:-d]])),
        "fc1 as [up; gate] (layer 2)":
            ("decoder.layers.2.mlp.linear_fc1.weight", lambda w: torch.cat([w[128:], w[:128]])),
        "input/pre-mlp norms swapped (layer 0)": None,
    }
    for what, m in mistakes.items():
        model = mcore.load_into_gpt(_mcore_cfg(src), src["iter"])
        sd = model.state_dict()
        with torch.no_grad():
            if m is None:
                a = sd["decoder.layers.0.input_layernorm.weight"].clone()
                sd["decoder.layers.0.input_layernorm.weight"].copy_(sd["decoder.layers.0.pre_mlp_layernorm.weight"])
                sd["decoder.layers.0.pre_mlp_layernorm.weight"].copy_(a)
            else:
                key, f = m
                sd[key].copy_(f(sd[key].clone()))
        diff = (mcore.forward_logits(model, toks) - want).abs().max().item()
        report(f"[dense a control] llama, {what}: max |logits diff| = {diff:.3e}")
        assert diff > 100 * TOL, f"{what}: only {diff:.3e}; the logits comparison is too weak"


# --------------------------------------------------------------------------------------------
# b. padded vocabulary
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", PAD_CASES)
def test_padded_vocab_rows(case, f32, ckpt, tmp):
    """130 rows -> 256 rows (multiple of make_vocab_size_divisible_by·tp = 128), zero padding;
    export back gives exactly the original 130 rows."""
    import mcore_cpu as mc

    src = f32(case)
    tied = bool(src["config"].tie_word_embeddings)
    g = mc.read_global_tensors(src["iter"])
    names = [("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
    if not tied:
        names.append(("output_layer.weight", "lm_head.weight"))
    assert ("output_layer.weight" in g) == (not tied)
    for mname, hname in names:
        t = g[mname]
        assert tuple(t.shape) == (256, 64), (mname, t.shape)
        assert torch.equal(t[:130], src["tensors"][hname]), mname
        assert bool((t[130:] == 0).all()) and not bool(torch.signbit(t[130:]).any()), f"{mname} padding rows"

    out = os.path.join(tmp, "hf_back")
    ckpt("run", "convert/megatron_to_hf", f"megatron_path={src['iter']}", f"hf_path={out}",
         f"hf_model_id={src['dir']}", "dtype=float32")
    back, where = iu.hf_dir_tensors(out)
    assert tuple(back["model.embed_tokens.weight"].shape) == (130, 64)
    iu.assert_bitwise_equal(back, src["tensors"], f"{case} export")
    assert where == src["where"]


@pytest.mark.parametrize("tp", [2])
def test_padded_vocab_tp_multiple(ckpt, tmp, tp):
    """The padding multiple is make_vocab_size_divisible_by·tp: 130 with 96·2 -> 192 rows."""
    src = _build_src("llama_vocab130", os.path.join(tmp, "hf"), torch.float32, "5GB")
    run = os.path.join(tmp, "mg")
    rep = ckpt("run", "convert/hf_to_megatron", f"hf_model_id={src['dir']}", f"megatron_path={run}",
               "make_vocab_size_divisible_by=96", f"tp={tp}", "dtype=float32", "--json").json()
    assert rep["status"] == "succeeded", rep
    doc = iu.inspect(ckpt, os.path.join(run, "iter_0000000"))
    shapes = {t["name"]: t["shape"] for t in doc["tensors"]}
    assert shapes["embedding.word_embeddings.weight"] == [192, 64]
    assert shapes["output_layer.weight"] == [192, 64]


def test_default_vocab_not_padded_at_tp2(f32, ckpt, tmp):
    """Megatron-Bridge builds exactly vocab_size rows unless padding is asked for
    (should_pad_vocab=False; docs/mapping.md#vocabulary-padding): with tp=2 and no
    make_vocab_size_divisible_by, vocab 128 stays 128 rows, as in megatron-core's own TP=2 save."""
    src = f32("llama")
    run = os.path.join(tmp, "mg")
    ckpt("run", "convert/hf_to_megatron", f"hf_model_id={src['dir']}", f"megatron_path={run}",
         "dtype=float32", "tp=2")
    shapes = {t["name"]: t["shape"] for t in iu.inspect(ckpt, os.path.join(run, "iter_0000000"))["tensors"]}
    assert shapes["embedding.word_embeddings.weight"] == [128, 64], shapes["embedding.word_embeddings.weight"]
    assert shapes["output_layer.weight"] == [128, 64], shapes["output_layer.weight"]


# --------------------------------------------------------------------------------------------
# c. round trip HF -> Megatron -> HF, bf16 (default dtype), bit-identical
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", FAMILY_CASES + PAD_CASES)
def test_round_trip_bf16_bit_identical(case, ckpt, tmp):
    import transformers

    src = _build_src(case, os.path.join(tmp, "hf_src"), torch.bfloat16, "40KB")
    assert all(t.dtype == torch.bfloat16 for t in src["tensors"].values())
    assert len(set(src["where"].values())) > 1  # a real index with several shards
    it = _to_megatron(ckpt, src, os.path.join(tmp, "mg"))  # default dtype
    doc = iu.inspect(ckpt, it)
    assert {t["dtype"] for t in doc["tensors"]} == {"bfloat16"}
    out = os.path.join(tmp, "hf_back")
    ckpt("run", "convert/megatron_to_hf", f"megatron_path={it}", f"hf_path={out}",
         f"hf_model_id={src['dir']}")
    back, where = iu.hf_dir_tensors(out)
    iu.assert_bitwise_equal(back, src["tensors"], f"{case} round trip")
    assert where == src["where"], "shard assignment differs from the source's"
    # the directory is a loadable HF model with the source's config
    for f in ("config.json", "generation_config.json"):
        assert os.path.exists(os.path.join(out, f)), f
    a = transformers.AutoConfig.from_pretrained(src["dir"]).to_dict()
    b = transformers.AutoConfig.from_pretrained(out).to_dict()
    a.pop("_name_or_path", None), b.pop("_name_or_path", None)
    assert a == b
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    sd = model.state_dict()
    for k, t in src["tensors"].items():
        assert torch.equal(sd[k], t), k


# --------------------------------------------------------------------------------------------
# d. name map: what we write vs what MCore's sharded_state_dict() requests
# --------------------------------------------------------------------------------------------


def _extra_state_names(num_layers):
    return {f"decoder.layers.{m}._extra_state/shard_{l}_{num_layers}"
            for m in EXTRA_STATE_MODULES for l in range(num_layers)}


@pytest.mark.parametrize("case", FAMILY_CASES + PAD_CASES)
def test_name_map_matches_mcore_request(case, f32, ckpt, mcore):
    src = f32(case)
    cfg = _mcore_cfg(src)
    want, want_objects = iu.mcore_requested(mcore, mcore.build_gpt(cfg))
    doc = iu.inspect(ckpt, src["iter"])
    ours = {t["name"]: t for t in doc["tensors"]}

    missing = sorted(set(want) - set(ours))
    assert not missing, f"MCore requests keys we do not write: {missing}"
    extra = sorted(set(ours) - set(want))
    assert not extra, f"we write tensor keys MCore does not request: {extra}"
    for k, w in want.items():
        o = ours[k]
        assert tuple(o["shape"]) == w["shape"], (k, o["shape"], w["shape"])
        assert o["dtype"] == w["dtype"] == "float32", (k, o["dtype"], w["dtype"])
        assert iu.boxes(o["chunks"]) == w["boxes"], (k, iu.boxes(o["chunks"]), w["boxes"])

    items = {b["name"] for b in doc["byte_items"]}
    assert want_objects <= items, f"MCore requests byte items we lack: {sorted(want_objects - items)}"
    L = cfg["num_layers"]
    assert items == _extra_state_names(L), sorted(items ^ _extra_state_names(L))
    core_attn = {n for n in items if ".core_attention." in n}
    assert items - want_objects == core_attn  # the local spec has no core_attention extra state
    assert all(b["payload"] == "[None]" for b in doc["byte_items"]), doc["byte_items"]


# --------------------------------------------------------------------------------------------
# e. the reverse: checkpoints saved by megatron-core -> HF -> transformers
# --------------------------------------------------------------------------------------------

# (family for the HF config, TP of the MCore save)
REVERSE = [("llama", 1), ("llama", 2), ("llama_tied", 1), ("mistral", 1), ("qwen2", 2), ("qwen3", 1)]


@pytest.fixture(scope="module")
def mcore_saved(mcore, mod_tmp):
    cache = {}

    def get(family, tp):
        key = (family, tp)
        if key not in cache:
            hc = iu.hf_config(family)
            cfg = iu.mcore_cfg_from_hf(hc)
            it = os.path.join(mod_tmp, f"mcore_{family}_tp{tp}", "iter_0000001")
            glob = mcore.save_mcore_checkpoint(cfg, it, tp=tp, seed=SEED)
            ref = os.path.join(mod_tmp, f"hf_ref_{family}")  # config + tokenizer, no weights
            if not os.path.exists(ref):
                import transformers

                hc.save_pretrained(ref)
                transformers.GenerationConfig.from_model_config(hc).save_pretrained(ref)
                iu.save_tiny_tokenizer(ref, hc.vocab_size)
            cache[key] = {"family": family, "tp": tp, "cfg": cfg, "iter": it, "globals": glob,
                          "ref": ref, "hc": hc}
        return cache[key]

    return get


@pytest.mark.parametrize("family,tp", REVERSE, ids=[f"{f}-tp{t}" for f, t in REVERSE])
def test_mcore_checkpoint_to_hf_logits(family, tp, mcore_saved, mcore, ckpt, tmp, report):
    import transformers

    m = mcore_saved(family, tp)
    out = os.path.join(tmp, "hf")
    ckpt("run", "convert/megatron_to_hf", f"megatron_path={m['iter']}", f"hf_path={out}",
         f"hf_model_id={m['ref']}", "dtype=float32")
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.exists(os.path.join(out, f)), f"{f} not copied from hf_model_id"
    text = "w5 w17 w127 <s> w3"
    want_ids = transformers.AutoTokenizer.from_pretrained(m["ref"])(text)["input_ids"]
    assert transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == want_ids
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    assert not info.get("missing_keys") and not info.get("unexpected_keys"), info
    toks = _tokens(m["hc"].vocab_size)
    want = mcore.forward_logits(mcore.load_into_gpt(m["cfg"], m["iter"]), toks)
    got = iu.hf_logits(hf, toks)
    assert want.abs().max().item() > 1.0
    diff = (got - want).abs().max().item()
    report(f"[dense e] {family + ' TP=' + str(tp):<20} max |logits(HF, our export) - logits(MCore)| = {diff:.3e}")
    assert diff <= TOL, f"{family} TP={tp}: max abs logits difference {diff:.3e} > {TOL}"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mcore_tp2_checkpoint_reimport_at_tp2(family, mcore_saved, ckpt, tmp):
    """MCore TP=2 save -> HF -> hf_to_megatron tp=2 (default options): the same keys, global
    shapes and global tensors (bit for bit) as megatron-core's own TP=2 checkpoint, and it loads
    into a TP=2 GPTModel (2 gloo ranks, default strictness) with every shard equal.
    Chunk boxes are not compared: ckpt-convert writes one chunk per layer (two for fc1) at any
    TP, which DCP/MCore read by intersection
    (docs/megatron-torch-dist.md#keys-global-shapes-and-chunks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    import mcore_cpu as mc

    m = mcore_saved(family, 2)
    hf = os.path.join(tmp, "hf")
    ckpt("run", "convert/megatron_to_hf", f"megatron_path={m['iter']}", f"hf_path={hf}",
         f"hf_model_id={m['ref']}", "dtype=float32")
    run = os.path.join(tmp, "mg")
    ckpt("run", "convert/hf_to_megatron", f"hf_model_id={hf}", f"megatron_path={run}", "dtype=float32",
         "tp=2")
    it = os.path.join(run, "iter_0000000")
    problems = []

    theirs = dcp.FileSystemReader(m["iter"]).read_metadata().state_dict_metadata
    doc = iu.inspect(ckpt, it)
    ours = {t["name"]: t for t in doc["tensors"]}
    tkeys = {k for k, v in theirs.items() if isinstance(v, TensorStorageMetadata)}
    if set(ours) != tkeys:
        problems.append(f"tensor keys differ: {sorted(set(ours) ^ tkeys)}")
    for k in sorted(tkeys & set(ours)):
        if ours[k]["shape"] != list(theirs[k].size):
            problems.append(f"{k}: global shape {ours[k]['shape']}, megatron-core TP=2 save has "
                            f"{list(theirs[k].size)}")
    bkeys = {k for k, v in theirs.items() if not isinstance(v, TensorStorageMetadata)}
    items = {b["name"] for b in doc["byte_items"]}
    if not bkeys <= items:
        problems.append(f"byte items megatron-core writes and we lack: {sorted(bkeys - items)}")

    got = mc.read_global_tensors(it)
    for k in sorted(set(got) & set(m["globals"])):
        if not torch.equal(got[k], m["globals"][k]):
            problems.append(f"{k}: global tensor differs from megatron-core's "
                            f"({list(got[k].shape)} vs {list(m['globals'][k].shape)})")

    for r in mc.load_check_multi(m["cfg"], it, tp=2, pp=1, expected=m["globals"]):
        res = r["result"]
        if res["error"] or res["mismatched"] or res["no_expected"] or not res["checked"]:
            problems.append(f"TP=2 MCore load, rank {r['rank']}: error={res['error']} "
                            f"mismatched={res['mismatched']} no_expected={res['no_expected']}")
    with open(os.path.join(it, "run_config.yaml")) as f:
        tp = yaml.safe_load(f)["model"]["tensor_model_parallel_size"]  # as Megatron-Bridge reads it
    if tp != 2:
        problems.append(f"run_config.yaml records tensor_model_parallel_size {tp!r}, not 2")
    assert not problems, f"{family}:\n  " + "\n  ".join(problems)


def test_our_tp2_output_loads_in_mcore_tp2(f32, mcore, ckpt, tmp):
    """hf_to_megatron tp=2 of a Llama (vocab 128 with make_vocab_size_divisible_by=64, so no
    padding is involved) loads into a TP=2 GPTModel (2 gloo ranks, default strictness); every
    rank's shards equal the TP=1 conversion's global tensors."""
    import mcore_cpu as mc

    src = f32("llama")
    run = os.path.join(tmp, "mg")
    ckpt("run", "convert/hf_to_megatron", f"hf_model_id={src['dir']}", f"megatron_path={run}",
         "dtype=float32", "tp=2", "make_vocab_size_divisible_by=64")
    it = os.path.join(run, "iter_0000000")
    got = mc.read_global_tensors(it)
    iu.assert_bitwise_equal(got, mc.read_global_tensors(src["iter"]), "tp=2 vs tp=1 conversion")
    for r in mc.load_check_multi(_mcore_cfg(src), it, tp=2, pp=1, expected=got):
        res = r["result"]
        assert res["error"] is None, (r["rank"], res["error"])
        assert not res["mismatched"] and not res["no_expected"] and res["checked"], (r["rank"], res)
