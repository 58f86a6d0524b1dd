"""Self-test of e2e/interop/mcore_cpu.py against megatron-core 0.16.1 on CPU.

Run:  . <venv>/bin/activate && python -m pytest -q e2e/interop/test_mcore_cpu.py
(about two minutes on two cores; TP=2 cases spawn two gloo processes each).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mcore_cpu as mc  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# Llama-like, GQA: 4 query heads in 2 groups, head_dim 16.
LLAMA = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
             num_query_groups=2, vocab_size=128, max_sequence_length=64, rotary_base=10000,
             layernorm_epsilon=1e-6)
VARIANTS = {
    "llama": LLAMA,
    "tied": dict(LLAMA, share_embeddings_and_output_weights=True),
    # Qwen3-like: qk norm and head_dim (kv_channels) != hidden/heads
    "qk_layernorm": dict(LLAMA, qk_layernorm=True, kv_channels=32, rotary_base=1000000),
    # Qwen2-like: biases on q, k, v only
    "add_qkv_bias": dict(LLAMA, add_qkv_bias=True, layernorm_epsilon=1e-5),
}
TOKENS = torch.tensor([[1, 5, 9, 100, 127, 3, 64, 2, 77, 11],
                       [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
SEED = 4321


@pytest.fixture(scope="module", autouse=True)
def dist():
    mc._ensure_dist(1, 1)
    yield
    mc.destroy_dist()


def _filled(cfg, seed=SEED):
    m = mc.build_gpt(cfg)
    mc.fill_deterministic(m, seed)
    return m


def _params(model):
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


# ---------------------------------------------------------------- HF reference (test-only)

def _hf_model(cfg, glob):
    """transformers model holding the same weights (MCore grouped QKV split into q/k/v)."""
    import transformers

    c = mc.normalize_cfg(cfg)
    L, H, F = c["num_layers"], c["hidden_size"], c["ffn_hidden_size"]
    nh, G, d = c["num_attention_heads"], c["num_query_groups"], c["kv_channels"]
    qpg = nh // G
    common = dict(vocab_size=c["vocab_size"], hidden_size=H, intermediate_size=F,
                  num_hidden_layers=L, num_attention_heads=nh, num_key_value_heads=G,
                  head_dim=d, rms_norm_eps=c["layernorm_epsilon"],
                  max_position_embeddings=c["max_sequence_length"],
                  tie_word_embeddings=c["share_embeddings_and_output_weights"],
                  rope_parameters={"rope_type": "default", "rope_theta": float(c["rotary_base"])})
    if c["qk_layernorm"]:
        hcfg, cls = transformers.Qwen3Config(**common), transformers.Qwen3ForCausalLM
    elif c["add_qkv_bias"]:
        hcfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    else:
        hcfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    hcfg._attn_implementation = "eager"
    model = cls(hcfg).float().eval()

    def split_qkv(t):  # [G*(qpg+2)*d, ...] -> q, k, v
        t = t.reshape(G, (qpg + 2) * d, *t.shape[1:])
        q, k, v = t[:, :qpg * d], t[:, qpg * d:(qpg + 1) * d], t[:, (qpg + 1) * d:]
        return [x.reshape(-1, *t.shape[2:]) for x in (q, k, v)]

    g = glob
    sd = {"model.embed_tokens.weight": g["embedding.word_embeddings.weight"],
          "model.norm.weight": g["decoder.final_layernorm.weight"],
          "lm_head.weight": g.get("output_layer.weight", g["embedding.word_embeddings.weight"])}
    P = "decoder.layers."
    for i in range(L):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = g[P + "self_attention.linear_qkv.layer_norm_weight"][i]
        q, k, v = split_qkv(g[P + "self_attention.linear_qkv.weight"][i])
        sd.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                   p + "self_attn.v_proj.weight": v})
        if c["add_qkv_bias"]:
            qb, kb, vb = split_qkv(g[P + "self_attention.linear_qkv.bias"][i])
            sd.update({p + "self_attn.q_proj.bias": qb, p + "self_attn.k_proj.bias": kb,
                       p + "self_attn.v_proj.bias": vb})
        if c["qk_layernorm"]:
            sd[p + "self_attn.q_norm.weight"] = g[P + "self_attention.q_layernorm.weight"][i]
            sd[p + "self_attn.k_norm.weight"] = g[P + "self_attention.k_layernorm.weight"][i]
        sd[p + "self_attn.o_proj.weight"] = g[P + "self_attention.linear_proj.weight"][i]
        sd[p + "post_attention_layernorm.weight"] = g[P + "mlp.linear_fc1.layer_norm_weight"][i]
        fc1 = g[P + "mlp.linear_fc1.weight"][i]
        sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = fc1[:F], fc1[F:]
        sd[p + "mlp.down_proj.weight"] = g[P + "mlp.linear_fc2.weight"][i]
    model.load_state_dict(sd, strict=True)
    return model


# ---------------------------------------------------------------- tests

EXPECTED_TP1 = {  # DCP key -> (global size, chunks as (offsets, sizes))
    "embedding.word_embeddings.weight": ([128, 64], [([0, 0], [128, 64])]),
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight":
        ([2, 64], [([l, 0], [1, 64]) for l in (0, 1)]),
    "decoder.layers.self_attention.linear_qkv.weight":
        ([2, 128, 64], [([l, 0, 0], [1, 128, 64]) for l in (0, 1)]),
    "decoder.layers.self_attention.linear_proj.weight":
        ([2, 64, 64], [([l, 0, 0], [1, 64, 64]) for l in (0, 1)]),
    "decoder.layers.mlp.linear_fc1.layer_norm_weight":
        ([2, 64], [([l, 0], [1, 64]) for l in (0, 1)]),
    "decoder.layers.mlp.linear_fc1.weight":
        ([2, 256, 64], [([l, r, 0], [1, 128, 64]) for l in (0, 1) for r in (0, 128)]),
    "decoder.layers.mlp.linear_fc2.weight":
        ([2, 64, 128], [([l, 0, 0], [1, 64, 128]) for l in (0, 1)]),
    "decoder.final_layernorm.weight": ([64], [([0], [64])]),
    "output_layer.weight": ([128, 64], [([0, 0], [128, 64])]),
}
EXTRA_STATE = [f"decoder.layers.{m}._extra_state/shard_{l}_2"
               for m in ("self_attention.linear_qkv", "self_attention.linear_proj",
                         "mlp.linear_fc1", "mlp.linear_fc2") for l in (0, 1)]
EXPECTED_TP2_CHUNKS = {
    "embedding.word_embeddings.weight": [([r, 0], [64, 64]) for r in (0, 64)],
    "output_layer.weight": [([r, 0], [64, 64]) for r in (0, 64)],
    # one query group (2 q heads + k + v = 4*16 rows) per TP rank
    "decoder.layers.self_attention.linear_qkv.weight":
        [([l, r, 0], [1, 64, 64]) for l in (0, 1) for r in (0, 64)],
    "decoder.layers.self_attention.linear_proj.weight":
        [([l, 0, c], [1, 64, 32]) for l in (0, 1) for c in (0, 32)],
    # gate tp0, gate tp1, up tp0, up tp1
    "decoder.layers.mlp.linear_fc1.weight":
        [([l, r, 0], [1, 64, 64]) for l in (0, 1) for r in (0, 64, 128, 192)],
    "decoder.layers.mlp.linear_fc2.weight":
        [([l, 0, c], [1, 64, 64]) for l in (0, 1) for c in (0, 64)],
}


def _chunks(md, key):
    return sorted((tuple(c["offsets"]), tuple(c["sizes"]))
                  for c in md["state_dict_metadata"][key]["chunks"])


def _norm(chunks):
    return sorted((tuple(o), tuple(s)) for o, s in chunks)


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tp1") / "iter_0000001")
    glob = mc.save_mcore_checkpoint(LLAMA, d, seed=SEED)
    return d, glob


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tp2") / "iter_0000001")
    glob = mc.save_mcore_checkpoint(LLAMA, d, tp=2, seed=SEED)
    return d, glob


def test_tp1_layout(tp1):
    d, glob = tp1
    md = mc.read_dcp_metadata(d)
    assert md["files"] == [".metadata", "__0_0.distcp", "__0_1.distcp", "common.pt", "metadata.json"]
    tensors = {k for k, v in md["state_dict_metadata"].items() if v["type"] == "tensor"}
    assert tensors == set(EXPECTED_TP1)
    for k, (size, chunks) in EXPECTED_TP1.items():
        assert md["state_dict_metadata"][k]["size"] == size, k
        assert md["state_dict_metadata"][k]["dtype"] == "float32", k
        assert _chunks(md, k) == _norm(chunks), k
    others = {k: v["type"] for k, v in md["state_dict_metadata"].items() if v["type"] != "tensor"}
    assert others == {k: "BytesStorageMetadata" for k in EXTRA_STATE}
    assert all(v["value"] == [None] for v in mc.read_bytes_items(d).values())
    with open(os.path.join(d, "metadata.json")) as f:
        assert json.load(f) == {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                "common_backend": "torch", "common_backend_version": 1}
    # common.pt here holds only what this test gave dist_checkpointing.save, so comparing it would
    # prove nothing; ours is compared with the one Megatron-Bridge's own import wrote
    # (test_bridge_families.py::test_import_equals_bridge_import).


def test_tp1_roundtrip_and_forward(tp1):
    d, glob = tp1
    ref = _filled(LLAMA)
    fresh = mc.build_gpt(LLAMA)
    assert not torch.equal(_params(fresh)["decoder.final_layernorm.weight"],
                           _params(ref)["decoder.final_layernorm.weight"])
    loaded = mc.load_into_gpt(LLAMA, d)
    _assert_same_params(loaded, ref)
    logits = mc.forward_logits(loaded, TOKENS)
    assert logits.shape == (2, 10, 128) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, mc.forward_logits(ref, TOKENS))


def test_tp2_layout_and_reshard(tp1, tp2):
    d1, g1 = tp1
    d2, g2 = tp2
    assert sorted(g1) == sorted(g2) and all(torch.equal(g1[k], g2[k]) for k in g1)
    md = mc.read_dcp_metadata(d2)
    assert md["files"] == [".metadata", "__0_0.distcp", "__0_1.distcp", "__1_0.distcp",
                           "__1_1.distcp", "common.pt", "metadata.json"]
    for k, (size, chunks) in EXPECTED_TP1.items():
        assert md["state_dict_metadata"][k]["size"] == size
        assert _chunks(md, k) == _norm(EXPECTED_TP2_CHUNKS.get(k, chunks)), k
    # replicated tensors are written once, by TP rank 0
    for s in md["storage_data"]:
        if "layernorm" in s["fqn"] or "layer_norm" in s["fqn"] or "_extra_state" in s["fqn"]:
            assert s["relative_path"].startswith("__0_"), s
    loaded = mc.load_into_gpt(LLAMA, d2)  # TP=2 checkpoint into a TP=1 model
    _assert_same_params(loaded, _filled(LLAMA))
    assert torch.equal(mc.forward_logits(loaded, TOKENS),
                       mc.forward_logits(mc.load_into_gpt(LLAMA, d1), TOKENS))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_match_hf(name, tmp_path):
    cfg = VARIANTS[name]
    d = str(tmp_path / "iter_0000001")
    glob = mc.save_mcore_checkpoint(cfg, d, seed=SEED)
    keys = set(glob)
    assert ("output_layer.weight" in keys) == (name != "tied")
    assert ("decoder.layers.self_attention.q_layernorm.weight" in keys) == (name == "qk_layernorm")
    assert ("decoder.layers.self_attention.linear_qkv.bias" in keys) == (name == "add_qkv_bias")
    if name == "qk_layernorm":
        assert glob["decoder.layers.self_attention.q_layernorm.weight"].shape == (2, 32)
        assert glob["decoder.layers.self_attention.linear_qkv.weight"].shape == (2, 8 * 32, 64)
    if name == "add_qkv_bias":
        assert glob["decoder.layers.self_attention.linear_qkv.bias"].shape == (2, 128)
    model = mc.load_into_gpt(cfg, d)
    _assert_same_params(model, _filled(cfg))
    logits = mc.forward_logits(model, TOKENS)
    assert torch.isfinite(logits).all()
    with torch.no_grad():
        hf = _hf_model(cfg, glob)(TOKENS).logits.float()
    torch.testing.assert_close(logits, hf, rtol=1e-4, atol=1e-4)


def test_tp2_bias_tied(tmp_path):
    cfg = dict(LLAMA, add_qkv_bias=True, share_embeddings_and_output_weights=True)
    d = str(tmp_path / "iter_0000001")
    mc.save_mcore_checkpoint(cfg, d, tp=2, seed=SEED)  # checks globals == expected_global
    md = mc.read_dcp_metadata(d)
    assert "output_layer.weight" not in md["state_dict_metadata"]
    assert _chunks(md, "decoder.layers.self_attention.linear_qkv.bias") == \
        _norm([([l, r], [1, 64]) for l in (0, 1) for r in (0, 64)])
    _assert_same_params(mc.load_into_gpt(cfg, d), _filled(cfg))


def test_strictness(tmp_path, tp1):
    d_full, _ = tp1
    d_noes = str(tmp_path / "noes")
    mc.save_mcore_checkpoint(LLAMA, d_noes, seed=SEED, extra_state=False)
    md = mc.read_dcp_metadata(d_noes)
    assert not any("_extra_state" in k for k in md["state_dict_metadata"])
    ref = _filled(LLAMA)
    for strict in (None, "log_unexpected", "log_all", "raise_all", "return_all", "ignore_all"):
        _assert_same_params(mc.load_into_gpt(LLAMA, d_full, strict=strict), ref)
    # Without _extra_state: the default raises (DCP's CheckpointException is a BaseException).
    with pytest.raises(BaseException, match="CheckpointException"):
        mc.load_into_gpt(LLAMA, d_noes)
    with pytest.raises(BaseException, match="Unexpected keys"):
        mc.load_into_gpt(LLAMA, d_noes, strict="raise_unexpected")
    for strict in ("log_unexpected", "log_all", "ignore_all", "return_all"):
        _assert_same_params(mc.load_into_gpt(LLAMA, d_noes, strict=strict), ref)
    m = mc.load_into_gpt(LLAMA, d_noes, strict="return_unexpected")
    assert m._mcore_load_mismatch == ([], sorted(
        f"decoder.layers.{x}._extra_state" for x in
        ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")))


def test_cli_keys_tp2():
    cfg = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mcore_cpu_cfg_{os.getpid()}.json")
    with open(cfg, "w") as f:
        json.dump(LLAMA, f)
    try:
        out = subprocess.run([sys.executable, os.path.join(HERE, "mcore_cpu.py"), "keys",
                              "--cfg", cfg, "--tp", "2"], check=True, capture_output=True, text=True)
    finally:
        os.unlink(cfg)
    doc = json.loads(out.stdout)
    assert [r["tp_rank"] for r in doc["ranks"]] == [0, 1]
    for r in doc["ranks"]:
        e = {x["state_dict_key"]: x for x in r["entries"]}
        qkv = e["decoder.layers.1.self_attention.linear_qkv.weight"]
        assert qkv["key"] == "decoder.layers.self_attention.linear_qkv.weight"
        assert qkv["global_offset"] == [1, 64 * r["tp_rank"], 0] and qkv["local_shape"] == [64, 64]
        assert qkv["prepend_axis_num"] == 1
        ln = e["decoder.layers.0.input_layernorm.weight"]
        assert ln["key"] == "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
        assert ln["replica_id"] == [0, r["tp_rank"], 0]
        fc1 = [e[f"decoder.layers.0.mlp.linear_fc1.weight.{i}"] for i in (0, 1)]
        assert [x["global_offset"][1] for x in fc1] == [64 * r["tp_rank"], 128 + 64 * r["tp_rank"]]
        es = e["decoder.layers.1.mlp.linear_fc2._extra_state"]
        assert es["unique_key"] == "decoder.layers.mlp.linear_fc2._extra_state/shard_1_2"
