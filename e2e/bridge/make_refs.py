#!/usr/bin/env python3
"""Generate Megatron-Bridge 0.3.1 reference artifacts (CPU), deterministically.

    python e2e/bridge/make_refs.py CASE OUTDIR        CASE: llama | qwen3 | qwen3_moe |
                                                      nemotron_h | run_config_pyyaml | all

Each case is written to OUTDIR/<case>/ (replaced if present) with a ``case.json`` saying
what is where, which Bridge function produced it, the settings, the timings, and the checks
run on the way.  Every artifact except hf/ (written by transformers) is written by
Megatron-Bridge's own code (bridge_cpu.py); an artifact Bridge cannot produce on CPU is
listed under ``unavailable`` with the reason, and announced on stderr.  Any other failure
exits non-zero.  Run with the bridge venv (e2e/bridge/requirements.txt).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bridge_cpu as bc  # noqa: E402  (sets the offline environment before torch)
import torch  # noqa: E402

SEED = 1234
ADAPTER_SEED = 7
LORA_DIM, LORA_ALPHA = 8, 12
LORA_STEP = 50
MAMBA_IN_PROJ_PARTS = ("z", "x", "B", "C", "dt")
CASES = ("llama", "qwen3", "qwen3_moe", "nemotron_h", "run_config_pyyaml")


def loud(msg: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\nmake_refs: {msg}\n{bar}\n", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# HF sources (transformers 4.57, random weights, fixed seed)
# --------------------------------------------------------------------------------------------


def make_tokenizer(out_dir: str, vocab_size: int) -> int:
    """A tiny byte-level BPE trained offline with the tokenizers library on a fixed corpus,
    saved by transformers (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
    chat_template.jinja).  Returns its length."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = ["The quick brown fox jumps over the lazy dog. " * 3,
              "Checkpoints move between Megatron and Hugging Face.",
              "LoRA adapters merge into the base model they were trained on."] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0],
                                   eos_token=specials[1], pad_token=specials[2])
    fast.chat_template = ("{% for m in messages %}<|begin_of_text|>{{ m['role'] }}: "
                          "{{ m['content'] }}<|end_of_text|>{% endfor %}")
    fast.save_pretrained(out_dir)
    return len(fast)


TOKENS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)


def hf_config(case: str):
    import transformers as tf

    if case == "llama":
        return tf.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
                              tie_word_embeddings=False, **TOKENS)
    if case == "qwen3":
        return tf.Qwen3Config(vocab_size=320, hidden_size=64, intermediate_size=96,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6,
                              tie_word_embeddings=False, **TOKENS)
    if case == "qwen3_moe":
        return tf.Qwen3MoeConfig(vocab_size=320, hidden_size=64, intermediate_size=128,
                                 moe_intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                                 decoder_sparse_step=1, mlp_only_layers=[],
                                 max_position_embeddings=256, rms_norm_eps=1e-6,
                                 tie_word_embeddings=False, **TOKENS)
    raise KeyError(case)


def make_hf(case: str, out_dir: str, dtype=torch.bfloat16) -> dict:
    import transformers as tf

    cfg = hf_config(case)
    torch.manual_seed(SEED)
    cls = {"llama": tf.LlamaForCausalLM, "qwen3": tf.Qwen3ForCausalLM,
           "qwen3_moe": tf.Qwen3MoeForCausalLM}[case]
    model = cls(cfg).to(dtype)
    model.save_pretrained(out_dir)
    n = make_tokenizer(out_dir, 300)
    return {"class": cls.__name__, "dtype": str(dtype)[6:], "seed": SEED, "tokenizer_len": n}


# --------------------------------------------------------------------------------------------
# checks recorded in case.json (facts, not assertions about our converter)
# --------------------------------------------------------------------------------------------


def _dcp_tensors(iter_dir: str) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "interop"))
    import mcore_cpu  # plain torch DCP reading, no megatron

    return mcore_cpu.read_global_tensors(iter_dir)


def _hf_tensors(d: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def compare_hf(a_dir: str, b_dir: str) -> dict:
    a, b = _hf_tensors(a_dir), _hf_tensors(b_dir)
    differ = sorted(k for k in set(a) | set(b)
                    if k not in a or k not in b or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k]))
    detail = {}
    for k in differ:
        if k in a and k in b:
            same_as_cast = bool(torch.equal(a[k].to(b[k].dtype), b[k]))
            detail[k] = {"first": str(a[k].dtype)[6:], "second": str(b[k].dtype)[6:],
                         "second_equals_first_cast_to_its_dtype": same_as_cast}
        else:
            detail[k] = "only in " + ("first" if k in a else "second")
    ca, cb = (json.load(open(os.path.join(d, "config.json"))) for d in (a_dir, b_dir))
    config = {k: {"first": ca.get(k, "<absent>"), "second": cb.get(k, "<absent>")}
              for k in sorted(set(ca) | set(cb)) if ca.get(k, "<absent>") != cb.get(k, "<absent>")}
    return {"tensors": len(a), "identical": not differ, "differing": detail,
            "config_json_differences": config,
            "files": {"first": sorted(os.listdir(a_dir)), "second": sorted(os.listdir(b_dir))}}


def check_megatron_merge(base_iter: str, lora_iter: str, merged_iter: str, scale: float) -> dict:
    """Is the merged Megatron checkpoint W + scale * (B @ A) computed in the parameter dtype
    (bf16 matmul, bf16 scale, bf16 add), per fused tensor and layer?"""
    base, lora, merged = _dcp_tensors(base_iter), _dcp_tensors(lora_iter), _dcp_tensors(merged_iter)
    out = {"merged_tensors": [], "unchanged_elsewhere": True, "formula": "W + (alpha/dim) * (B @ A) in the parameter dtype",
           "explicit_rounding_formula": "dt(f32(W) + f32(dt(f32(dt(f32(B) @ f32(A))) * alpha/dim)))"}
    adapters = sorted(k[: -len(".adapter.linear_in.weight")] for k in lora if k.endswith(".adapter.linear_in.weight"))
    touched = set()
    def whole(sd, key):  # Mamba in_proj is stored as its z, x, B, C, dt parts
        if key in sd:
            return sd[key], [key]
        parts = [f"{key}.{p}" for p in MAMBA_IN_PROJ_PARTS]
        return torch.cat([sd[p] for p in parts]), parts

    for mod in adapters:
        a, _ = whole(lora, f"{mod}.adapter.linear_in.weight")
        b, _ = whole(lora, f"{mod}.adapter.linear_out.weight")
        key = f"{mod}.weight"
        w, keys = whole(base, key)
        m, _ = whole(merged, key)
        want = w + scale * (b @ a)
        f32 = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
        # The same, one rounding per operation spelled out: fp32 product rounded to the
        # parameter dtype, scaled in fp32 and rounded, added in fp32 and rounded.
        dt = w.dtype
        prod = (b.float() @ a.float()).to(dt)
        explicit = (w.float() + (prod.float() * scale).to(dt).float()).to(dt)
        out["merged_tensors"].append({"key": key, "equal_param_dtype_formula": bool(torch.equal(m, want)),
                                      "equal_explicit_rounding_formula": bool(torch.equal(m, explicit)),
                                      "equal_fp32_formula": bool(torch.equal(m, f32)),
                                      "elements_differing_from_fp32_formula": int((m != f32).sum())})
        touched.update(keys)
    for k, t in base.items():
        if k not in touched and k in merged and not torch.equal(t, merged[k]):
            out["unchanged_elsewhere"] = False
    out["same_keys_as_base"] = sorted(base) == sorted(merged)
    return out


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------


class Case:
    def __init__(self, name: str, outdir: str):
        self.name = name
        self.dir = os.path.join(outdir, name)
        if os.path.exists(self.dir):
            shutil.rmtree(self.dir)
        os.makedirs(self.dir)
        self.doc = {"case": name, "producer": "Megatron-Bridge 0.3.1 on CPU (e2e/bridge/bridge_cpu.py)",
                    "versions": _versions(), "artifacts": {}, "unavailable": {}, "checks": {}}

    def path(self, sub: str) -> str:
        return os.path.join(self.dir, sub)

    def step(self, sub: str, what: str, fn, *args, **kw):
        t0 = time.monotonic()
        res = fn(*args, **kw)
        print(f"make_refs: {self.name}/{sub}: {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
        self.doc["artifacts"][sub] = what
        return res

    def unavailable(self, sub: str, why: str):
        loud(f"{self.name}/{sub}: NOT PRODUCED by Megatron-Bridge on CPU: {why}")
        self.doc["unavailable"][sub] = why

    def write(self):
        with open(os.path.join(self.dir, "case.json"), "w") as f:
            json.dump(self.doc, f, indent=1, sort_keys=True)
            f.write("\n")


def _versions() -> dict:
    from importlib.metadata import version

    return {d: version(d) for d in ("megatron-bridge", "megatron-core", "torch", "transformers")}


def gpt_case(name: str, outdir: str, moe: bool = False) -> None:
    c = Case(name, outdir)
    hf, imp = c.path("hf"), c.path("bridge_import")
    c.doc["hf_source"] = c.step("hf", "transformers save_pretrained (random weights, seed "
                                f"{SEED}) + tiny byte-level BPE tokenizer", make_hf, name, hf)
    c.step("bridge_import", "AutoBridge.import_ckpt(hf, bridge_import, torch_dtype=bfloat16): "
           "run dir with iter_0000000", bc.import_ckpt, hf, imp, "bfloat16")
    imp_iter = os.path.join(imp, "iter_0000000")
    c.step("bridge_export", "AutoBridge.from_hf_pretrained(hf).export_ckpt(bridge_import/iter_0000000)",
           bc.export_ckpt, imp_iter, hf, c.path("bridge_export"))
    c.doc["checks"]["export_equals_hf_source"] = compare_hf(hf, c.path("bridge_export"))

    scale = LORA_ALPHA / LORA_DIM
    lora_kw = dict(dim=LORA_DIM, alpha=LORA_ALPHA, seed=ADAPTER_SEED, step=LORA_STEP)
    c.doc["lora"] = dict(lora_kw, scale=scale, base="bridge_import (checkpoint.pretrained_checkpoint)",
                         adapter_values="bridge_cpu.adapter_fill(name, shape, seed): randn * 0.05, "
                                        "cast to the parameter dtype")
    c.step("lora", "Bridge LoRA (fused: linear_qkv, linear_proj, linear_fc1, linear_fc2) training "
           "checkpoint via training.checkpointing.save_checkpoint", bc.lora_checkpoint, hf, imp,
           c.path("lora"), scheme="lora", **lora_kw)
    lora_iter = os.path.join(c.path("lora"), f"iter_{LORA_STEP:07d}")
    c.step("lora_canonical", "Bridge CanonicalLoRA (linear_q, linear_k, linear_v, linear_proj, "
           "linear_fc1_up, linear_fc1_gate, linear_fc2) training checkpoint", bc.lora_checkpoint,
           hf, imp, c.path("lora_canonical"), scheme="canonical_lora", **lora_kw)
    c.step("merged_megatron", "examples/peft/merge_lora.py (v0.3.1) merge_lora: LoRAMerge on the "
           "fused Megatron weights, save_megatron_model", bc.merge_megatron, c.path("lora"), hf,
           c.path("merged_megatron"))
    c.doc["checks"]["merged_megatron"] = check_megatron_merge(
        imp_iter, lora_iter, os.path.join(c.path("merged_megatron"), "iter_0000000"), scale)
    c.step("merged_hf", "save_hf_pretrained(merge_adapter_weights=True) of base + fused LoRA "
           "(peft_bridge merge per HF tensor)", bc.merge_hf, c.path("lora"), hf, c.path("merged_hf"))
    c.step("merged_hf_canonical", "save_hf_pretrained(merge_adapter_weights=True) of base + "
           "CanonicalLoRA", bc.merge_hf, c.path("lora_canonical"), hf, c.path("merged_hf_canonical"))
    c.step("merged_megatron_export", "export_ckpt(merged_megatron/iter_0000000)", bc.export_ckpt,
           os.path.join(c.path("merged_megatron"), "iter_0000000"), hf, c.path("merged_megatron_export"))
    c.doc["checks"]["merged_hf_equals_export_of_merged_megatron"] = compare_hf(
        c.path("merged_hf"), c.path("merged_megatron_export"))
    c.unavailable("merged_megatron_canonical",
                  "examples/peft/merge_lora.py v0.3.1 rebuilds the adapter structure with the LoRA "
                  "class unless peft._target_ names VLMLoRA, so a CanonicalLoRA checkpoint cannot "
                  "be loaded into it; LoRAMerge only merges LoRALinear modules (not the canonical "
                  "LoRALinearSplitQKV / LoRALinearSplitFC1UpGate wrappers)")
    c.write()


def moe_case(name: str, outdir: str) -> None:
    c = Case(name, outdir)
    hf, imp = c.path("hf"), c.path("bridge_import")
    c.doc["hf_source"] = c.step("hf", "transformers save_pretrained (random weights, seed "
                                f"{SEED}) + tiny byte-level BPE tokenizer", make_hf, name, hf)
    c.step("bridge_import", "AutoBridge.import_ckpt(hf, bridge_import, torch_dtype=bfloat16)",
           bc.import_ckpt, hf, imp, "bfloat16")
    imp_iter = os.path.join(imp, "iter_0000000")
    c.step("bridge_export", "AutoBridge.from_hf_pretrained(hf).export_ckpt(bridge_import/iter_0000000)",
           bc.export_ckpt, imp_iter, hf, c.path("bridge_export"))
    c.doc["checks"]["export_equals_hf_source"] = compare_hf(hf, c.path("bridge_export"))
    scale = LORA_ALPHA / LORA_DIM
    lora_kw = dict(dim=LORA_DIM, alpha=LORA_ALPHA, seed=ADAPTER_SEED, step=LORA_STEP)
    targets = ["linear_qkv", "linear_proj"]
    c.doc["lora"] = dict(lora_kw, scale=scale, target_modules=targets,
                         base="bridge_import (checkpoint.pretrained_checkpoint)",
                         adapter_values="bridge_cpu.adapter_fill(name, shape, seed): randn * 0.05, "
                                        "cast to the parameter dtype")
    c.step("lora", "Bridge LoRA on the attention linears of the MoE model (linear_qkv, linear_proj) "
           "via save_checkpoint", bc.lora_checkpoint, hf, imp, c.path("lora"), scheme="lora",
           target_modules=targets, **lora_kw)
    lora_iter = os.path.join(c.path("lora"), f"iter_{LORA_STEP:07d}")
    c.step("merged_megatron", "examples/peft/merge_lora.py (v0.3.1) merge_lora", bc.merge_megatron,
           c.path("lora"), hf, c.path("merged_megatron"))
    c.doc["checks"]["merged_megatron"] = check_megatron_merge(
        imp_iter, lora_iter, os.path.join(c.path("merged_megatron"), "iter_0000000"), scale)
    c.step("merged_hf", "save_hf_pretrained(merge_adapter_weights=True) of base + LoRA",
           bc.merge_hf, c.path("lora"), hf, c.path("merged_hf"))
    c.step("merged_megatron_export", "export_ckpt(merged_megatron/iter_0000000)", bc.export_ckpt,
           os.path.join(c.path("merged_megatron"), "iter_0000000"), hf, c.path("merged_megatron_export"))
    c.doc["checks"]["merged_hf_equals_export_of_merged_megatron"] = compare_hf(
        c.path("merged_hf"), c.path("merged_megatron_export"))
    c.unavailable("lora_experts",
                  "LoRA on the expert linears is not made: on GPU Bridge wraps TEGroupedMLP's grouped "
                  "linears (one adapter per layer shared by all experts, merged into every "
                  "weight<e>); without TransformerEngine the experts are SequentialMLP, which "
                  "would get one adapter per expert: a different checkpoint layout, not a "
                  "reference of what Bridge writes")
    c.write()


def typed_json(v):
    """Python values as JSON that keeps their YAML-relevant types: sets as {"!!set": [members,
    sorted]}, tuples as {"!!python/tuple": [...]}, non-finite floats as {"!!float": "inf"}..."""
    import math

    if isinstance(v, dict):
        return {str(k): typed_json(x) for k, x in v.items()}
    if isinstance(v, (set, frozenset)):
        return {"!!set": sorted(typed_json(x) for x in v)}
    if isinstance(v, tuple):
        return {"!!python/tuple": [typed_json(x) for x in v]}
    if isinstance(v, list):
        return [typed_json(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return {"!!float": repr(v)}
    return v


def bridge_style_config() -> dict:
    """A Megatron-Bridge-style run config (the shape of ConfigContainer.to_dict()) holding a
    set, a tuple, a shared object (PyYAML writes an anchor and an alias), a multi-line string,
    and the scalars PyYAML types specially."""
    targets = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    return {
        "_target_": "megatron.bridge.training.config.ConfigContainer",
        "checkpoint": {"_target_": "megatron.bridge.training.config.CheckpointConfig",
                       "pretrained_checkpoint": "/models/base", "save": "/runs/lora", "save_interval": 50,
                       "most_recent_k": -1, "load": None},
        "model": {"_target_": "megatron.bridge.models.llama.llama_provider.LlamaModelProvider",
                  "num_layers": 2, "hidden_size": 64, "layernorm_epsilon": 1e-05, "rotary_base": 500000.0,
                  "init_method_std": 0.02, "seq_length": 8192, "bf16": True, "fp16": False,
                  "params_dtype": {"_target_": "torch.bfloat16", "_call_": False},
                  "cuda_graph_scope": ("full_iteration", "moe_router"),
                  "moe_layer_freq": 1, "hybrid_override_pattern": "M*-E", "hf_model_id": "/models/base-hf",
                  "yes_string": "yes", "on_string": "on", "null_string": "null", "octal_like": "0755",
                  "float_inf": float("inf")},
        "peft": {"_target_": "megatron.bridge.peft.lora.LoRA", "dim": 8, "alpha": 12, "dropout": 0.0,
                 "dropout_position": "pre", "target_modules": targets,
                 "params_to_save": {"decoder.layers.0.self_attention.linear_qkv.adapter.linear_in.weight",
                                    "decoder.layers.0.self_attention.linear_qkv.adapter.linear_out.weight"},
                 "exclude_modules": []},
        "lora_targets_again": targets,
        "dataset": {"prompt_template": "### Question:\n{input}\n\n### Answer:\n{output}\n",
                    "seq_length": 2048},
    }


def pyyaml_case(name: str, outdir: str) -> None:
    import yaml

    c = Case(name, outdir)
    src = os.path.join(outdir, "llama", "lora", f"iter_{LORA_STEP:07d}", "run_config.yaml")
    if not os.path.exists(src):
        gpt_case("llama", outdir)
    shutil.copyfile(src, c.path("bridge_lora_run_config.yaml"))
    with open(src) as f:
        text = f.read()
    with open(c.path("bridge_lora_run_config.values.json"), "w") as f:
        json.dump(typed_json(yaml.safe_load(text)), f, indent=1, sort_keys=True)
        f.write("\n")
    c.doc["artifacts"]["bridge_lora_run_config.yaml"] = (
        "the run_config.yaml of llama/lora (Bridge's ConfigContainer.to_yaml: yaml.safe_dump("
        "default_flow_style=False) with Bridge's representers), byte for byte")
    c.doc["artifacts"]["bridge_lora_run_config.values.json"] = (
        "what Bridge's read_run_config parser (yaml.safe_load) returns for it, typed JSON")
    cfg = bridge_style_config()
    for fname, dump, load, loader in (
            ("synthetic_safe_dump", yaml.safe_dump, yaml.safe_load, "yaml.safe_load"),
            ("synthetic_dump", yaml.dump, yaml.full_load, "yaml.full_load")):
        text = dump(cfg, default_flow_style=False)
        with open(c.path(fname + ".yaml"), "w") as f:
            f.write(text)
        with open(c.path(fname + ".values.json"), "w") as f:
            json.dump(typed_json(load(text)), f, indent=1, sort_keys=True)
            f.write("\n")
        c.doc["artifacts"][fname + ".yaml"] = (
            f"PyYAML {yaml.__version__} {dump.__module__}.{dump.__name__}(config, "
            "default_flow_style=False) of make_refs.bridge_style_config()")
        c.doc["artifacts"][fname + ".values.json"] = f"{loader} of it, typed JSON (see typed_json)"
    c.doc["typed_json"] = ("sets -> {'!!set': sorted members}, tuples -> {'!!python/tuple': [...]}, "
                           "non-finite floats -> {'!!float': repr}")
    c.write()


def main(argv) -> int:
    if len(argv) != 3 or argv[1] not in CASES + ("all",):
        print(__doc__, file=sys.stderr)
        return 2
    outdir = os.path.abspath(argv[2])
    os.makedirs(outdir, exist_ok=True)
    if argv[1] == "all":
        # One process per case: Bridge and megatron-core keep process-wide state (parallel
        # state, environment variables set by ConfigContainer.validate, registries) that must
        # not leak from one model into the next.
        import subprocess

        for name in CASES:
            rc = subprocess.call([sys.executable, os.path.abspath(__file__), name, outdir])
            if rc != 0:
                return rc
        return 0
    cases = (argv[1],)
    for name in cases:
        t0 = time.monotonic()
        print(f"make_refs: {name} -> {outdir}/{name}", file=sys.stderr, flush=True)
        try:
            if name in ("llama", "qwen3"):
                gpt_case(name, outdir)
            elif name == "qwen3_moe":
                moe_case(name, outdir)
            elif name == "nemotron_h":
                import nemotron_h

                nemotron_h.case(name, outdir)
            elif name == "run_config_pyyaml":
                pyyaml_case(name, outdir)
        except BaseException:
            traceback.print_exc()
            loud(f"{name}: generation FAILED (see the traceback above)")
            return 1
        print(f"make_refs: {name} done in {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
