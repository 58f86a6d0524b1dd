"""Interop tier 2, issue 15: Nemotron-3 Super's extras on a tiny hybrid model.

  a. Latent MoE (`moe_latent_size`: the experts work in a smaller width between
     `fc1_latent_proj` and `fc2_latent_proj`): a model made by transformers 5.24, converted
     HF -> Megatron -> HF bit for bit; Megatron-Core's names for the projections
     (`mlp.fc1_latent_proj.weight`, `mlp.fc2_latent_proj.weight`); and our smoke forward of both
     sides equal to transformers' forward of the source (float32, max |dlogit| <= 1e-4 relative).
  b. Multi-token prediction (`num_nextn_predict_layers`, `mtp_hybrid_override_pattern`).
     transformers 5.24 drops `mtp.*` weights on load and no producer of them runs on CPU (the
     Megatron-Bridge 0.3.1 of e2e/bridge has no MTP mapping), so the HF tensors are written here
     with the names of Megatron-Bridge's Nemotron-H mapping: one flat layer per pattern entry
     (`mtp.layers.{depth * len + i}.`, each with the norm and mixer names of a backbone layer), the
     input projection and its norms (`eh_proj`, `enorm`, `hnorm`) on the first and
     `final_layernorm` on the last. The test asserts our Megatron keys are exactly the nested ones
     that mapping pairs them with (`mtp.layers.{depth}.mtp_model_layer.layers.{i}.…`,
     `mtp.layers.{depth}.eh_proj.weight`, …), the round trip is bit for bit, run_config.yaml
     records the depth and pattern, the export still loads in transformers, and a checkpoint
     missing one MTP tensor is refused naming it.

Run: python -m pytest -q e2e/interop/test_nemotron3_super.py   (about 15 s)
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import yaml

import interop_util as iu

SEED = 13
BASE = dict(vocab_size=128, hidden_size=64, layers_block_type=["mamba", "attention", "moe", "moe"],
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=8, conv_kernel=4,
            chunk_size=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=48, moe_latent_size=16, tie_word_embeddings=False)


def latent_model():
    import transformers

    cfg = transformers.NemotronHConfig(**BASE)
    cfg.architectures = ["NemotronHForCausalLM"]
    cfg._attn_implementation = "eager"
    m = transformers.NemotronHForCausalLM(cfg)
    iu.randomize_(m, SEED)
    return m.float().eval()


def tensors(d):
    t, _ = iu.hf_dir_tensors(d)
    return t


def same(a, b):
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_latent_moe_converts_and_computes_as_transformers(ckpt, tmp, report):
    model = latent_model()
    src = os.path.join(tmp, "src")
    model.save_pretrained(src)
    assert any("fc1_latent_proj" in k for k in tensors(src))
    ckpt("run", "convert/hf_to_megatron", f"hf_model_id={src}", f"megatron_path={tmp}/mg", "dtype=float32")
    it = os.path.join(tmp, "mg", "iter_0000000")
    rep = json.loads(ckpt("inspect", it, "--json", "--all"))
    names = {t["name"] for t in rep["tensors"]}
    for layer in (2, 3):
        for proj in ("fc1_latent_proj", "fc2_latent_proj"):
            assert f"decoder.layers.{layer}.mlp.{proj}.weight" in names, sorted(names)
    ckpt("run", "convert/megatron_to_hf", f"megatron_path={it}", f"hf_model_id={src}",
         f"hf_path={tmp}/back", "dtype=float32")
    same(tensors(src), tensors(f"{tmp}/back"))
    toks = iu.tokens(128, seed=SEED, batch=1, seq=10)[0].tolist()
    with torch.no_grad():
        want = model(torch.tensor([toks])).logits[0].float()
    scale = max(1.0, float(want.abs().max()))
    from safetensors.torch import load_file

    # The source has no manifest of ours (that one check fails, exit 1); our output has one.
    for path, extra, rc in ((src, (), 1), (it, (f"hf_model_id={src}",), 0)):
        out = os.path.join(tmp, f"logits_{len(extra)}.safetensors")
        ckpt("validate", path, f"dump_logits={out}", "tokens=" + ",".join(map(str, toks)), *extra,
             "--json", expect=rc)
        got = load_file(out)["logits"][:, :128]
        diff = float((got - want).abs().max()) / scale
        report(f"[super a] latent MoE, {'Megatron' if extra else 'HF'} view: max |dlogit(ours) - "
               f"dlogit(transformers)| / max(1, max|logit|) = {diff:.1e}")
        assert diff <= 1e-4


def mtp_checkpoint(tmp) -> str:
    """The latent model with one MTP depth of pattern `*E` (attention, then MoE)."""
    d = os.path.join(tmp, "mtp_src")
    latent_model().save_pretrained(d)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_nextn_predict_layers"] = 1
    cfg["mtp_hybrid_override_pattern"] = "*E"
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    from safetensors.torch import load_file, save_file

    path = os.path.join(d, "model.safetensors")
    t = load_file(path)
    g = torch.Generator().manual_seed(SEED)
    h = BASE["hidden_size"]

    def rnd(shape):
        return 0.05 * torch.randn(shape, generator=g)

    # Flat layer 0 is an attention layer, flat layer 1 an MoE layer: their tensors are named as
    # the backbone's layers 1 and 2 are.
    for flat, backbone in ((0, 1), (1, 2)):
        for k, v in list(t.items()):
            if k.startswith(f"backbone.layers.{backbone}."):
                t[f"mtp.layers.{flat}." + k[len(f"backbone.layers.{backbone}."):]] = rnd(v.shape).to(v.dtype)
    t["mtp.layers.0.enorm.weight"] = 1 + rnd(h)
    t["mtp.layers.0.hnorm.weight"] = 1 + rnd(h)
    t["mtp.layers.0.eh_proj.weight"] = rnd((h, 2 * h))
    t["mtp.layers.1.final_layernorm.weight"] = 1 + rnd(h)
    save_file(t, path, metadata={"format": "pt"})
    return d


def test_multi_token_prediction_layers_round_trip_as_megatron_bridge_names_them(ckpt, tmp, report):
    src = mtp_checkpoint(tmp)
    ckpt("run", "convert/hf_to_megatron", f"hf_model_id={src}", f"megatron_path={tmp}/mg", "dtype=float32")
    it = os.path.join(tmp, "mg", "iter_0000000")
    rep = json.loads(ckpt("inspect", it, "--json", "--all"))
    mtp = sorted(t["name"] for t in rep["tensors"] if t["name"].startswith("mtp."))
    inner = "mtp.layers.0.mtp_model_layer.layers."
    want = sorted(
        ["mtp.layers.0.eh_proj.weight", "mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight",
         "mtp.layers.0.final_layernorm.weight",
         f"{inner}0.self_attention.linear_qkv.layer_norm_weight", f"{inner}0.self_attention.linear_qkv.weight",
         f"{inner}0.self_attention.linear_proj.weight",
         f"{inner}1.pre_mlp_layernorm.weight", f"{inner}1.mlp.router.weight", f"{inner}1.mlp.router.expert_bias",
         f"{inner}1.mlp.experts.experts.linear_fc1.weight", f"{inner}1.mlp.experts.experts.linear_fc2.weight",
         f"{inner}1.mlp.shared_experts.linear_fc1.weight", f"{inner}1.mlp.shared_experts.linear_fc2.weight",
         f"{inner}1.mlp.fc1_latent_proj.weight", f"{inner}1.mlp.fc2_latent_proj.weight"])
    assert mtp == want, (mtp, want)
    with open(os.path.join(it, "run_config.yaml")) as f:
        model_section = yaml.safe_load(f)["model"]
    assert model_section["mtp_num_layers"] == 1 and model_section["mtp_hybrid_override_pattern"] == "*E"
    back = os.path.join(tmp, "back")
    ckpt("run", "convert/megatron_to_hf", f"megatron_path={it}", f"hf_model_id={src}", f"hf_path={back}",
         "dtype=float32")
    same(tensors(src), tensors(back))
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(back)  # the MTP weights are ignored on load
    report(f"[super b] MTP: {len(mtp)} Megatron tensors named as Megatron-Bridge's mapping pairs them; "
           f"round trip bit for bit")

    # One MTP tensor missing: refused, naming it, nothing written.
    bad = os.path.join(tmp, "bad")
    shutil.copytree(src, bad)
    from safetensors.torch import load_file, save_file

    t = load_file(os.path.join(bad, "model.safetensors"))
    del t["mtp.layers.0.eh_proj.weight"]
    save_file(t, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
    out = ckpt("run", "convert/hf_to_megatron", f"hf_model_id={bad}", f"megatron_path={tmp}/bad_mg", expect=2)
    assert "mtp.layers.0.eh_proj.weight" in out.stderr, out.stderr
    assert not os.path.exists(f"{tmp}/bad_mg")


def test_the_guides_default_ep8_from_a_nemotron_step_config(ckpt, tmp, monkeypatch):
    """The Nemotron tooling's default config passes `ep: ${oc.env:NEMOTRON_CONVERT_EP,8}`: a copy of
    such a config given with -c converts a model with 8 experts per layer in one process, records
    ep=8, and the export is the source bit for bit."""
    import transformers

    cfg = transformers.NemotronHConfig(**dict(BASE, n_routed_experts=8, moe_latent_size=None))
    cfg.architectures = ["NemotronHForCausalLM"]
    m = transformers.NemotronHForCausalLM(cfg)
    iu.randomize_(m, SEED)
    src = os.path.join(tmp, "src")
    m.to(torch.bfloat16).save_pretrained(src)
    conf = os.path.join(tmp, "default.yaml")
    with open(conf, "w") as f:
        f.write("run:\n  env:\n    container_image: nvcr.io/nvidia/nemo:26.04\n"
                f"hf_model_id: {src}\nmegatron_path: {tmp}/mg\ntorch_dtype: bfloat16\n"
                "trust_remote_code: true\ndistributed: true\n"
                "tp: ${oc.env:NEMOTRON_CONVERT_TP,1}\npp: ${oc.env:NEMOTRON_CONVERT_PP,1}\n"
                "ep: ${oc.env:NEMOTRON_CONVERT_EP,8}\netp: ${oc.env:NEMOTRON_CONVERT_ETP,1}\n")
    monkeypatch.delenv("NEMOTRON_CONVERT_EP", raising=False)
    rep = ckpt("run", "convert/hf_to_megatron", "-c", conf, "--json").json()
    assert rep["status"] == "succeeded", rep
    with open(os.path.join(tmp, "mg", "iter_0000000", "run_config.yaml")) as f:
        assert yaml.safe_load(f)["model"]["expert_model_parallel_size"] == 8
    ckpt("run", "convert/megatron_to_hf", f"megatron_path={tmp}/mg/iter_0000000", f"hf_model_id={src}",
         f"hf_path={tmp}/back")
    same(tensors(src), tensors(f"{tmp}/back"))
