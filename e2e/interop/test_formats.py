"""Interop tier 2: the FILE FORMATS ckpt-convert reads and writes, proved by their reference
readers/writers (docs/megatron-torch-dist.md, docs/hf-layout.md).

Peers: torch 2.15.0 (torch.distributed.checkpoint, torch.load weights_only),
safetensors 0.8.0, transformers 5.24.0 (save_pretrained / from_pretrained),
megatron-core 0.16.1 (dist_checkpointing.save / load, on CPU via mcore_cpu.py).

Run: python -m pytest -q e2e/interop/test_formats.py   (about a minute on 2 cores)
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import interop_util as iu

SEED = 20241129
FLOAT_SPECIALS = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20,  # ties / off-ties
                  3.4028e38, -3.4028e38, 3.3895e38, float("inf"), -float("inf"),  # overflow
                  1e-40, -1e-40, 1e-45, 9.2e-41, 1.1754942e-38, 0.0, -0.0]  # subnormals, zeros


def _dcp_read(iter_dir):
    """Plain torch DCP: every tensor key into a full-size tensor sized from .metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = dcp.FileSystemReader(iter_dir).read_metadata()
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
             for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    dcp.load(state, storage_reader=dcp.FileSystemReader(iter_dir), no_dist=True)
    return md, state


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def src(mod_tmp):
    """transformers LlamaForCausalLM (GQA: 4 heads, 2 kv heads), random with a fixed seed,
    saved by transformers as a real sharded checkpoint (index + 6 shards)."""
    d = os.path.join(mod_tmp, "hf_llama")
    model = iu.hf_model("llama", SEED)
    model.save_pretrained(d, max_shard_size="100KB")
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    tensors, where = iu.hf_dir_tensors(d)
    assert len(set(where.values())) > 1, "transformers did not shard the source"
    return {"dir": d, "tensors": tensors, "where": where, "config": model.config}


@pytest.fixture(scope="module")
def mg(ckpt, src, mod_tmp):
    """hf_to_megatron mapping=identity dtype=float32 of ``src`` (run directory form)."""
    run = os.path.join(mod_tmp, "mg_identity")
    rep = ckpt("run", "convert/hf_to_megatron", f"hf_model_id={src['dir']}", f"megatron_path={run}",
               "mapping=identity", "dtype=float32", "--json").json()
    assert rep["status"] == "succeeded", rep
    it = os.path.join(run, "iter_0000000")
    assert os.path.realpath(rep["output"]) == os.path.realpath(it), rep
    return {"run": run, "iter": it}


# --------------------------------------------------------------------------------------------
# a. HF (transformers-written, sharded) -> Megatron torch_dist, read by plain torch
# --------------------------------------------------------------------------------------------


def test_identity_megatron_loads_with_plain_dcp(src, mg):
    """torch 2.15.0 DCP (FileSystemReader + dcp.load no_dist) reads every tensor bit-exactly;
    identity mapping = every HF tensor under its own name, one chunk covering it."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md, got = _dcp_read(mg["iter"])
    iu.assert_bitwise_equal(got, src["tensors"], "DCP vs safetensors source")
    for k, v in md.state_dict_metadata.items():
        assert isinstance(v, TensorStorageMetadata), f"{k}: {type(v).__name__} in an identity checkpoint"
        assert [(list(c.offsets), list(c.sizes)) for c in v.chunks] == [([0] * len(v.size), list(v.size))], k


def test_identity_megatron_dcp_to_torch_save(src, mg, tmp):
    """torch 2.15.0 format_utils.dcp_to_torch_save converts it; torch.load(weights_only) reads it."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(tmp, "full.pt")
    dcp_to_torch_save(mg["iter"], out)
    sd = torch.load(out, weights_only=True)
    iu.assert_bitwise_equal(sd, src["tensors"], "dcp_to_torch_save vs source")


TRAIN_STATE_DTYPES = {  # docs/megatron-torch-dist.md#train-state (Megatron-Bridge TrainState)
    "step": torch.int64, "consumed_train_samples": torch.int64, "skipped_train_samples": torch.int64,
    "consumed_valid_samples": torch.int64, "floating_point_operations_so_far": torch.float32,
    "do_train": torch.bool, "do_valid": torch.bool, "do_test": torch.bool,
}
METADATA_JSON = ('{"sharded_backend": "torch_dist", "sharded_backend_version": 1, '
                 '"common_backend": "torch", "common_backend_version": 1}')


def _check_side_files(run, it_dir, iteration):
    """common.pt / train_state.pt / metadata.json / trackers as megatron-core 0.16.1 and
    Megatron-Bridge read them (torch 2.15.0 torch.load(weights_only=True))."""
    common = torch.load(os.path.join(it_dir, "common.pt"), weights_only=True)
    assert isinstance(common, dict), common
    assert common["checkpoint_version"] == 3.0 and isinstance(common["checkpoint_version"], float), common
    assert common["iteration"] == iteration and type(common["iteration"]) is int, common
    assert common["content_metadata"] == {"singleton_local_shards": False,
                                          "chained_optim_avoid_prefix": True}, common
    assert "args" not in common  # Bridge-style (no argparse Namespace)

    ts = torch.load(os.path.join(it_dir, "train_state.pt"), weights_only=True)
    assert set(ts) == set(TRAIN_STATE_DTYPES), sorted(ts)
    for k, dt in TRAIN_STATE_DTYPES.items():
        assert isinstance(ts[k], torch.Tensor) and ts[k].dim() == 0, (k, ts[k])
        assert ts[k].dtype == dt, (k, ts[k].dtype, dt)
        ts[k].item()  # TrainState.load_state_dict does .item() on all 8
    assert ts["step"].item() == iteration
    for k in ("consumed_train_samples", "skipped_train_samples", "consumed_valid_samples"):
        assert ts[k].item() == 0, (k, ts[k])

    latest = os.path.join(run, "latest_train_state.pt")
    lts = torch.load(latest, weights_only=True)
    assert set(lts) == set(ts) and all(torch.equal(lts[k], ts[k]) for k in ts)
    with open(latest, "rb") as a, open(os.path.join(it_dir, "train_state.pt"), "rb") as b:
        assert a.read() == b.read(), "latest_train_state.pt is not a copy of train_state.pt"

    with open(os.path.join(it_dir, "metadata.json")) as f:
        assert f.read() == METADATA_JSON
    with open(os.path.join(run, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == str(iteration)
    assert os.path.basename(it_dir) == f"iter_{iteration:07d}"


def test_identity_megatron_side_files(mg):
    _check_side_files(mg["run"], mg["iter"], 0)


def test_megatron_path_naming_the_iteration(ckpt, src, tmp):
    """A megatron_path ending in iter_NNNNNNN sets the iteration everywhere (Bridge's tracker
    reader wants iteration > 0)."""
    run = os.path.join(tmp, "run")
    it = os.path.join(run, "iter_0000042")
    ckpt("run", "convert/hf_to_megatron", f"hf_model_id={src['dir']}", f"megatron_path={it}",
         "mapping=identity", "dtype=float32")
    _check_side_files(run, it, 42)
    _, got = _dcp_read(it)
    iu.assert_bitwise_equal(got, src["tensors"], "iter_0000042")


# --------------------------------------------------------------------------------------------
# b. Megatron -> HF safetensors (identity), read by safetensors and transformers
# --------------------------------------------------------------------------------------------


def test_identity_back_to_hf_mirrors_source_shards(ckpt, src, mg, tmp):
    """safetensors 0.8.0 load_file + transformers 5.24.0 from_pretrained read the export;
    with hf_model_id the shard assignment mirrors the source index
    (docs/hf-layout.md#index-and-shards)."""
    import transformers

    out = os.path.join(tmp, "hf_out")
    ckpt("run", "convert/megatron_to_hf", f"megatron_path={mg['iter']}", f"hf_path={out}",
         "mapping=identity", f"hf_model_id={src['dir']}", "dtype=float32")
    tensors, where = iu.hf_dir_tensors(out)
    iu.assert_bitwise_equal(tensors, src["tensors"], "export vs source")
    assert where == src["where"], "shard assignment differs from the source index"

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True)
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(k), (k, info[k])
    sd = {k: v for k, v in model.state_dict().items() if k in src["tensors"]}
    assert sorted(sd) == sorted(src["tensors"])
    iu.assert_bitwise_equal(sd, src["tensors"], "from_pretrained state_dict")


def test_identity_back_to_hf_greedy_shards(ckpt, src, mg, tmp):
    """Without reference weights: max_shard_size splits greedily; the index is consistent and
    transformers loads the directory (given the config.json the export did not have)."""
    import transformers

    out = os.path.join(tmp, "hf_out")
    ckpt("run", "convert/megatron_to_hf", f"megatron_path={mg['iter']}", f"hf_path={out}",
         "mapping=identity", "dtype=float32", "max_shard_size=100KB", "validate=false")
    tensors, where = iu.hf_dir_tensors(out)
    iu.assert_bitwise_equal(tensors, src["tensors"], "greedy export vs source")
    files = sorted(set(where.values()))
    assert len(files) > 1 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)], files
    for f in files:
        assert os.path.getsize(os.path.join(out, f)) <= 100_000 + 65_536, f  # tensor ≤ 32 KiB each
    shutil.copy(os.path.join(src["dir"], "config.json"), out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    sd = {k: v for k, v in model.state_dict().items() if k in src["tensors"]}
    iu.assert_bitwise_equal(sd, src["tensors"], "from_pretrained of greedy export")


def test_greedy_shards_are_huggingface_hubs(ckpt, src, tmp):
    """Greedy sharding (an export with no reference weights to mirror) puts every tensor into the
    file huggingface_hub 2.4.0's `split_torch_state_dict_into_shards`, which `save_pretrained` uses,
    chooses for the same tensors in transformers' registration order and the same max_shard_size
    (docs/hf-layout.md)."""
    import transformers
    from huggingface_hub import split_torch_state_dict_into_shards

    run = os.path.join(tmp, "mg_llama")
    ckpt("run", "convert/hf_to_megatron", f"hf_model_id={src['dir']}", f"megatron_path={run}",
         "dtype=float32")
    config_only = os.path.join(tmp, "config_only")
    os.makedirs(config_only)
    shutil.copy(os.path.join(src["dir"], "config.json"), config_only)
    out = os.path.join(tmp, "hf_out")
    ckpt("run", "convert/megatron_to_hf", f"megatron_path={run}/iter_0000000", f"hf_model_id={config_only}",
         f"hf_path={out}", "dtype=float32", "max_shard_size=100KB")
    tensors, where = iu.hf_dir_tensors(out)
    order = transformers.AutoModelForCausalLM.from_config(src["config"]).state_dict()
    sd = {k: tensors[k] for k in order if k in tensors}
    assert sorted(sd) == sorted(tensors), sorted(set(tensors) ^ set(sd))
    split = split_torch_state_dict_into_shards(sd, max_shard_size=100_000)
    assert split.is_sharded and len(split.filename_to_tensors) > 2, split.filename_to_tensors
    assert where == split.tensor_to_filename, {
        k: (where[k], split.tensor_to_filename.get(k)) for k in where if where[k] != split.tensor_to_filename.get(k)}
    with open(os.path.join(out, "model.safetensors.index.json")) as fh:
        index = json.load(fh)
    assert index["weight_map"] == split.tensor_to_filename


@pytest.fixture(scope="module")
def f32_specials(src, mod_tmp):
    """A float32 HF dir whose tensors hit every bf16 rounding case (ties both ways, overflow
    to inf, fp32 subnormals, signed zeros) plus a wide-magnitude random tensor."""
    d = os.path.join(mod_tmp, "hf_specials")
    os.makedirs(d)
    shutil.copy(os.path.join(src["dir"], "config.json"), d)
    t = {k: v.clone() for k, v in src["tensors"].items()}
    sp = torch.tensor(FLOAT_SPECIALS, dtype=torch.float32)
    norm = t["model.norm.weight"]
    norm[: len(sp)] = sp
    g = torch.Generator().manual_seed(SEED)
    scale = torch.logspace(-44, 38, t["model.embed_tokens.weight"].shape[1], dtype=torch.float64)
    t["model.embed_tokens.weight"] = (torch.randn(t["model.embed_tokens.weight"].shape, generator=g,
                                                  dtype=torch.float64) * scale).float()
    # every float32 bit pattern of the low 16 bits around a few exponents (all rounding branches)
    low = torch.arange(0, 1 << 16, dtype=torch.int64)
    pats = torch.cat([(0x3F800000 | low), (0xC0A00000 | low), (0x00010000 | low)]).to(torch.int64)
    pats = torch.where(pats >= 2**31, pats - 2**32, pats).to(torch.int32).view(torch.float32)
    t["model.layers.0.mlp.down_proj.weight"] = pats[: 64 * 128].reshape(64, 128).clone()
    t["model.layers.1.mlp.down_proj.weight"] = pats[64 * 128: 2 * 64 * 128].reshape(64, 128).clone()
    from safetensors.torch import save_file

    save_file(t, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    return {"dir": d, "tensors": t}


# These format tests write what validation refuses on purpose (exports without config.json,
# NaN and infinity): they pass validate=false, and test the bytes, not the validation.


def _assert_bf16_of(got, f32, what):
    want = {k: v.to(torch.bfloat16) for k, v in f32.items()}
    iu.assert_bitwise_equal(got, want, what)


def test_default_dtype_is_bf16_rne_hf_to_megatron(ckpt, f32_specials, tmp):
    """Default dtype (bfloat16): every value equals torch 2.15.0 ``tensor.to(torch.bfloat16)``
    bit for bit (round to nearest even)."""
    run = os.path.join(tmp, "mg")
    ckpt("run", "convert/hf_to_megatron", f"hf_model_id={f32_specials['dir']}", f"megatron_path={run}",
         "mapping=identity", "validate=false")
    md, got = _dcp_read(os.path.join(run, "iter_0000000"))
    assert {v.properties.dtype for v in md.state_dict_metadata.values()} == {torch.bfloat16}
    _assert_bf16_of(got, f32_specials["tensors"], "hf_to_megatron default dtype")


def test_default_dtype_is_bf16_rne_megatron_to_hf(ckpt, f32_specials, tmp):
    run = os.path.join(tmp, "mg")
    ckpt("run", "convert/hf_to_megatron", f"hf_model_id={f32_specials['dir']}", f"megatron_path={run}",
         "mapping=identity", "dtype=float32", "validate=false")
    out = os.path.join(tmp, "hf")
    ckpt("run", "convert/megatron_to_hf", f"megatron_path={os.path.join(run, 'iter_0000000')}",
         f"hf_path={out}", "mapping=identity", "validate=false")
    got, _ = iu.hf_dir_tensors(out)
    _assert_bf16_of(got, f32_specials["tensors"], "megatron_to_hf default dtype")


def test_nan_stays_nan_in_bf16(ckpt, src, tmp):
    """NaN payloads are not a rounding question (torch 2.15 CPU writes every NaN as 0xFFFF);
    only require NaN -> NaN, with the sign kept or not."""
    d = os.path.join(tmp, "hf")
    os.makedirs(d)
    shutil.copy(os.path.join(src["dir"], "config.json"), d)
    t = {k: v.clone() for k, v in src["tensors"].items()}
    bits = torch.tensor([0x7FC00000, 0x7F800001, 0x7FBFFFFF, 0xFFC00000 - 2**32, 0x7FFFFFFF],
                        dtype=torch.int64).to(torch.int32)
    t["model.norm.weight"][:5] = bits.view(torch.float32)
    from safetensors.torch import save_file

    save_file(t, os.path.join(d, "model.safetensors"))
    run = os.path.join(tmp, "mg")
    ckpt("run", "convert/hf_to_megatron", f"hf_model_id={d}", f"megatron_path={run}", "mapping=identity",
         "validate=false")
    _, got = _dcp_read(os.path.join(run, "iter_0000000"))
    n = got["model.norm.weight"][:5]
    print("bf16 bits of 5 float32 NaNs:", [hex(x & 0xFFFF) for x in n.view(torch.int16).tolist()])
    assert bool(torch.isnan(n).all()), n


# --------------------------------------------------------------------------------------------
# c. checkpoints written by megatron-core itself (TP=1 in-process, TP=2 by 2 gloo ranks)
# --------------------------------------------------------------------------------------------

MCORE_LLAMA = dict(num_layers=3, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                   num_query_groups=2, vocab_size=128, max_sequence_length=64, rotary_base=10000,
                   layernorm_epsilon=1e-5)


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def mcore_ckpt(request, mcore, mod_tmp):
    tp = request.param
    d = os.path.join(mod_tmp, f"mcore_tp{tp}", "iter_0000001")
    glob = mcore.save_mcore_checkpoint(MCORE_LLAMA, d, tp=tp, seed=SEED)
    return {"tp": tp, "iter": d, "globals": glob}


def test_inspect_mcore_checkpoint_matches_torch_metadata(ckpt, mcore_ckpt):
    """ckpt-convert inspect of a megatron-core 0.16.1 torch_dist checkpoint (TP=1 / TP=2) lists
    exactly the keys, dtypes, global shapes, chunk boxes and files of torch 2.15.0's
    FileSystemReader.read_metadata(); `_extra_state` entries only as byte items."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    d = mcore_ckpt["iter"]
    md = dcp.FileSystemReader(d).read_metadata()
    doc = iu.inspect(ckpt, d)
    assert doc["kind"] == "checkpoint_megatron", doc["kind"]
    assert doc["iteration"] == 1
    tmeta = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    bmeta = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    assert len(tmeta) + len(bmeta) == len(md.state_dict_metadata)
    files_of = {}
    lengths = {}
    for idx, info in md.storage_data.items():
        files_of.setdefault(idx.fqn, set()).add(info.relative_path)
        lengths[idx.fqn] = lengths.get(idx.fqn, 0) + info.length

    got = {t["name"]: t for t in doc["tensors"]}
    assert sorted(got) == sorted(tmeta), (sorted(set(got) ^ set(tmeta)))
    if mcore_ckpt["tp"] == 2:  # really TP-sharded
        assert len(tmeta["decoder.layers.self_attention.linear_qkv.weight"].chunks) == 2 * 3
    for k, v in tmeta.items():
        t = got[k]
        assert t["dtype"] == str(v.properties.dtype).replace("torch.", ""), k
        assert t["shape"] == list(v.size), k
        assert iu.boxes(t["chunks"]) == iu.dcp_boxes(v), k
        assert sorted(t["files"]) == sorted(files_of[k]), k
        assert t["bytes"] == v.size.numel() * v.properties.dtype.itemsize, k

    items = {b["name"]: b for b in doc["byte_items"]}
    assert sorted(items) == sorted(bmeta)
    assert all("_extra_state/shard_" in k for k in items)
    for k, b in items.items():
        assert b["bytes"] == lengths[k], (k, b)
        assert b["payload"] == "[None]", (k, b)
    assert doc["total_parameters"] == sum(v.size.numel() for v in tmeta.values())
    assert doc["total_bytes"] == sum(t["bytes"] for t in doc["tensors"])
    assert doc["skipped_keys"] == 0


def test_mcore_checkpoint_to_hf_identity(ckpt, mcore_ckpt, tmp):
    """megatron_to_hf mapping=identity of a megatron-core checkpoint (any TP chunking) writes the
    global tensors that torch 2.15.0 DCP assembles, bit-exactly."""
    import mcore_cpu as mc

    out = os.path.join(tmp, "hf")
    ckpt("run", "convert/megatron_to_hf", f"megatron_path={mcore_ckpt['iter']}", f"hf_path={out}",
         "mapping=identity", "dtype=float32", "validate=false")
    got, _ = iu.hf_dir_tensors(out)
    want = mc.read_global_tensors(mcore_ckpt["iter"])
    iu.assert_bitwise_equal(got, want, f"identity export of MCore TP={mcore_ckpt['tp']}")
    iu.assert_bitwise_equal(want, mcore_ckpt["globals"], "DCP re-read")


# --------------------------------------------------------------------------------------------
# d. our Llama-mapped output loads into megatron-core with the default strictness
# --------------------------------------------------------------------------------------------


def test_llama_mapping_loads_in_mcore_default_strictness(ckpt, mcore, src, tmp):
    """megatron-core 0.16.1 dist_checkpointing.load (StrictHandling.ASSUME_OK_UNEXPECTED, the
    Megatron-Bridge fine-tuning default) into a GPTModel built from the same config; the
    ShardedTensor-backed parameters equal what torch 2.15.0 DCP reads from our files."""
    mc = mcore
    run = os.path.join(tmp, "mg")
    ckpt("run", "convert/hf_to_megatron", f"hf_model_id={src['dir']}", f"megatron_path={run}",
         "dtype=float32")
    it = os.path.join(run, "iter_0000000")
    _, ours = _dcp_read(it)
    cfg = iu.mcore_cfg_from_hf(src["config"])
    assert cfg["num_query_groups"] == 2 and cfg["num_attention_heads"] == 4
    model = mc.load_into_gpt(cfg, it)  # strict=None: MCore's default
    loaded = mc.model_global_tensors(model)
    assert set(loaded) <= set(ours), sorted(set(loaded) - set(ours))
    assert set(ours) == set(loaded), ("written but not requested", sorted(set(ours) - set(loaded)))
    iu.assert_bitwise_equal(loaded, ours, "MCore-loaded parameters vs DCP")
    # and it is not the MCore init: e.g. the final norm is the HF one
    assert torch.equal(loaded["decoder.final_layernorm.weight"], src["tensors"]["model.norm.weight"])


# --------------------------------------------------------------------------------------------
# run_config.yaml as PyYAML writes it (PyYAML 6.0.4, the writer Megatron-Bridge uses)
# --------------------------------------------------------------------------------------------


def _py_to_json(v):
    """What Python loaded, in the JSON the converter reports: sets and tuples as lists."""
    if isinstance(v, dict):
        return {str(k): _py_to_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_py_to_json(x) for x in v]
    if isinstance(v, (set, frozenset)):
        return [_py_to_json(x) for x in v]
    return v


def test_run_config_written_by_pyyaml_reads_as_python_reads_it(ckpt, tmp):
    """A Megatron-Bridge-style config holding a set (``peft.params_to_save`` in every LoRA
    run), a tuple, an anchor and its alias, a multi-line string and PyYAML's 1.1 scalars,
    dumped by PyYAML: the converter reads every value Python reads back."""
    import json

    import yaml

    shared = {"_target_": "torch.bfloat16", "_call_": False}
    config = {
        "_target_": "megatron.bridge.training.config.ConfigContainer",
        "model": {
            "_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider",
            "num_layers": 2,
            "layernorm_epsilon": 1e-05,
            "rotary_base": 500000.0,
            "params_dtype": shared,
            "pipeline_dtype": shared,  # the same object twice: PyYAML writes an anchor and an alias
            "window_size": (4095, 0),
            "hf_model_id": "meta-llama/Llama-3.2-1B",
            "notes": "first line\nsecond line: with a colon\n",
            "flags": ["yes", "on", "1e-5", "017", "null"],  # strings that look like other types
        },
        "peft": {
            "_target_": "megatron.bridge.peft.lora.LoRA",
            "dim": 16,
            "alpha": 32,
            "target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
            "params_to_save": {"decoder.final_layernorm.weight", "output_layer.weight"},
        },
        "checkpoint": {"pretrained_checkpoint": "/ckpt/base/iter_0000000", "save_optim": False},
    }
    text = yaml.dump(config, default_flow_style=False)
    # The file really holds what it is meant to test.
    for construct in ("!!set", "!!python/tuple", "&id001", "*id001"):
        assert construct in text, (construct, text)
    path = os.path.join(tmp, "run_config.yaml")
    with open(path, "w") as f:
        f.write(text)
    ours = json.loads(ckpt("inspect", path))
    expected = _py_to_json(yaml.unsafe_load(text))
    # A set has no order; compare its members.
    assert sorted(ours["peft"]["params_to_save"]) == sorted(expected["peft"]["params_to_save"])
    del ours["peft"]["params_to_save"], expected["peft"]["params_to_save"]
    assert ours == expected


def test_run_config_with_code_is_refused(ckpt, tmp):
    """A tag that makes PyYAML's unsafe loader run code is refused with its line, and
    nothing is executed."""
    import yaml

    marker = os.path.join(tmp, "ran")

    class Run:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    text = yaml.dump({"model": {"num_layers": 2, "hook": Run()}})
    assert "!!python/object/apply:posix.system" in text or "!!python/object/apply:os.system" in text, text
    path = os.path.join(tmp, "run_config.yaml")
    with open(path, "w") as f:
        f.write(text)
    out = ckpt("inspect", path, expect=2)
    line = next(i + 1 for i, l in enumerate(text.splitlines()) if "!!python/object" in l)
    assert f"line {line}:" in out.stderr and "python/object/apply" in out.stderr, out.stderr
    assert not os.path.exists(marker)
