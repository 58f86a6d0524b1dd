"""Writes the seed corpora of the fuzz targets from real files made by the
reference stack (torch, torch.distributed.checkpoint, safetensors,
transformers, peft, PyYAML), into corpus/<target>/.

Usage, with the reference venv (e2e/requirements.txt):
    python converter/fuzz/seeds.py [--extra DIR ...]
--extra adds up to 8 files per target of the .metadata, run_config.yaml,
model.safetensors.index.json, *.safetensors and torch archives found under DIR
(for instance a Megatron-Bridge reference tree, or a checkpoint ckpt-convert
wrote). Seeds are at most 32 KiB; existing files are replaced, names are stable
(torch.save writes a random serialization id, so its seeds change on every run).
"""
import argparse
import collections
import hashlib
import io
import json
import os
import pickle
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
MAX_SEED = 32 << 10
# Seeds taken from each --extra tree, per target, at most.
MAX_EXTRA = 8


def put(target, name, data):
    if isinstance(data, str):
        data = data.encode()
    if len(data) > MAX_SEED:
        return
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


class Pwn:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ckpt-pwned",))


def pickles():
    values = {
        "plain": {"a": 1, "b": [1.5, None, True], "c": ("x", b"y"), "d": {1, 2}, "e": frozenset([3])},
        "bigint": [2**63 - 1, -(2**63), 2**70, -1, 0],
        "unicode": ["é", "日本", "\x00", ""],
        "bytes": [bytearray(b"abc"), b"\xff" * 300],
        "nested": [[[[{"k": ([],)}]]]],
        "odict": collections.OrderedDict([("x", 1), ("y", 2)]),
    }
    shared = [1, 2]
    values["shared"] = [shared, shared, {"again": shared}]
    rec = []
    rec.append(rec)
    values["recursive"] = rec
    for name, v in values.items():
        for proto in range(0, 6):
            put("pickle", f"{name}-p{proto}", pickle.dumps(v, protocol=proto))
    put("pickle", "os-system-p2", pickle.dumps(Pwn(), protocol=2))
    put("pickle", "os-system-p0", pickle.dumps(Pwn(), protocol=0))


def torch_saves():
    import zipfile

    import torch

    def save(obj, **kw):
        buf = io.BytesIO()
        torch.save(obj, buf, **kw)
        return buf.getvalue()

    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    archives = {
        "f32": t,
        "bf16": t.to(torch.bfloat16),
        "f16": t.to(torch.float16),
        "i64": torch.arange(5),
        "u8": torch.arange(7, dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "f8": t.to(torch.float8_e4m3fn),
        "zero-d": torch.tensor(3.0),
        "empty": torch.empty(0, dtype=torch.uint8),
        "transposed": t.t(),
        "offset-view": t[1:3, 2:5],
        "shared-storage": [t, t[2]],
        "parameter": torch.nn.Parameter(t),
        "state-dict": torch.nn.Linear(3, 2).state_dict(),
        "train-state": {
            "step": torch.tensor(10),
            "consumed_train_samples": torch.tensor(100),
            "floating_point_operations_so_far": torch.tensor(1.5, dtype=torch.float32),
            "do_train": torch.tensor(True),
        },
        "common": {
            "checkpoint_version": 3.0,
            "iteration": 10,
            "content_metadata": {"singleton_local_shards": False},
            "args": __import__("argparse").Namespace(tp=1, pp=1),
        },
        "extra-state-list-none": [None],
        "extra-state-te": [torch.empty(0, dtype=torch.uint8)],
        "bytesio": [io.BytesIO(save({"scale": torch.ones(2)}))],
        "os-system": [Pwn()],
    }
    for name, obj in archives.items():
        data = save(obj)
        put("torch_save", name, data)
        put("torch_zip", name, data)
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            pkl = [n for n in z.namelist() if n.endswith("data.pkl")][0]
            put("pickle", f"torch-{name}", z.read(pkl))
    put("torch_save", "legacy-format", save(t, _use_new_zipfile_serialization=False))
    hostile = os.path.join(HERE, "..", "tests", "data", "hostile")
    for f in sorted(os.listdir(hostile)):
        if f.endswith(".pt"):
            with open(os.path.join(hostile, f), "rb") as fh:
                put("torch_save", f[:-3], fh.read())


def dcp():
    import torch
    import torch.distributed.checkpoint as dcp

    cases = {
        "tensors": {"w": torch.ones(4, 3), "b": torch.zeros(3, dtype=torch.bfloat16)},
        "bytes": {"w": torch.ones(2), "extra": io.BytesIO(b"payload")},
        "objects": {"w": torch.arange(6).reshape(2, 3), "obj": {"a": 1}, "n": 7},
        "scalar": {"s": torch.tensor(1.0)},
    }
    for name, sd in cases.items():
        with tempfile.TemporaryDirectory() as d:
            dcp.save(sd, checkpoint_id=d, no_dist=True)
            with open(os.path.join(d, ".metadata"), "rb") as f:
                md = f.read()
            put("dcp_metadata", f"dcp-{name}", md)
            put("pickle", f"dcp-{name}", md)


def safetensors_files():
    import torch
    from safetensors.torch import save

    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    cases = {
        "f32": {"w": t},
        "mixed": {"a": t.to(torch.bfloat16), "b": torch.arange(3), "c": torch.tensor([True])},
        "metadata": ({"w": t}, {"format": "pt", "note": "x"}),
        "empty": {"e": torch.empty(0, 4)},
        "zero-d": {"s": torch.tensor(2.0)},
        "f8": {"q": t.to(torch.float8_e5m2)},
        "many": {f"layers.{i}.w": torch.ones(2, dtype=torch.float16) * i for i in range(20)},
    }
    for name, c in cases.items():
        tensors, meta = c if isinstance(c, tuple) else (c, None)
        put("safetensors", name, save(tensors, metadata=meta))


def hf_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, max_shard_size="10KB")
        for f in sorted(os.listdir(d)):
            p = os.path.join(d, f)
            data = open(p, "rb").read()
            if f.endswith(".index.json"):
                put("hf_index", "transformers", data)
            elif f.endswith(".safetensors"):
                put("safetensors", f"transformers-{f}", data)
            elif f == "config.json":
                put("peft_config", "not-an-adapter", data)
    put("hf_index", "escape", json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    put("hf_index", "not-a-name", json.dumps({"weight_map": {"a": 3}, "metadata": {"total_size": 1}}))


def peft_configs():
    from peft import LoraConfig

    variants = {
        "basic": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "regex": LoraConfig(r=4, target_modules=r".*\.(q|k)_proj"),
        "patterns": LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"layers.0": 2}, alpha_pattern={"q": 3}),
        "dora": LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, use_rslora=True),
        "layers": LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0, 1], layers_pattern="layers"),
        "save": LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], bias="lora_only"),
        "all-linear": LoraConfig(r=4, target_modules="all-linear", exclude_modules=["lm_head"]),
    }
    for name, cfg in variants.items():
        with tempfile.TemporaryDirectory() as d:
            cfg.save_pretrained(d)
            put("peft_config", name, open(os.path.join(d, "adapter_config.json"), "rb").read())


def yamls():
    import yaml

    run_config = {
        "model": {
            "_target_": "megatron.bridge.models.llama.llama_provider.Llama32ModelProvider1B",
            "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
            "num_query_groups": 2, "kv_channels": 16, "vocab_size": 128, "seq_length": 4096,
            "normalization": "RMSNorm", "gated_linear_unit": True, "rotary_base": 500000.0,
            "layernorm_epsilon": 1e-5, "share_embeddings_and_output_weights": False,
            "params_dtype": {"_target_": "torch.bfloat16", "_call_": False},
            "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
        },
        "checkpoint": {"save": "/ckpt", "pretrained_checkpoint": "/base", "save_optim": False, "save_rng": False},
        "peft": {"_target_": "megatron.bridge.peft.lora.LoRA", "dim": 8, "alpha": 16,
                 "target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]},
        "tokenizer": {"tokenizer_type": "HuggingFaceTokenizer"},
    }
    put("yaml", "run-config-safe", yaml.safe_dump(run_config))
    put("bridge_config", "lora", yaml.safe_dump(run_config))
    canon = json.loads(json.dumps(run_config))
    canon["peft"]["_target_"] = "megatron.bridge.peft.canonical_lora.CanonicalLoRA"
    canon["peft"]["target_modules"] = ["linear_q", "linear_k", "linear_v"]
    put("bridge_config", "canonical", yaml.safe_dump(canon))
    dora = json.loads(json.dumps(run_config))
    dora["peft"]["_target_"] = "megatron.bridge.peft.dora.DoRA"
    put("bridge_config", "dora", yaml.safe_dump(dora))
    tupled = json.loads(json.dumps(run_config))
    tupled["model"]["window"] = (4, 4)
    tupled["model"]["layers"] = {1, 2}
    put("yaml", "run-config-python-tags", yaml.dump(tupled))
    shared = {"x": 1}
    put("yaml", "anchors", yaml.dump({"a": shared, "b": shared, "c": [shared]}))
    put("yaml", "merge-keys", "base: &b {x: 1, y: 2}\nderived:\n  <<: *b\n  y: 3\n")
    put("yaml", "scalars", "a: yes\nb: 0o17\nc: 1_000\nd: .inf\ne: ~\nf: 2001-12-14\ng: 0x1F\n")
    put("yaml", "code-tag", "a: !!python/object/apply:os.system ['touch /tmp/x']\n")
    put("yaml", "two-docs", "a: 1\n---\nb: 2\n")


def summaries():
    ok = {"v": 1, "step": "convert/megatron_to_hf", "status": "succeeded", "output": "/data/out",
          "kind": "checkpoint_hf", "tensors": 291, "bytes": 6425673728, "files": 9, "seconds": 12.5,
          "weights_digest": "a" * 32, "manifest": "/data/out/ckpt-manifest.json", "checks_passed": 9,
          "checks_failed": 0, "smoke_test_max_abs_diff": 0.0, "report": "/data/out/ckpt-validation.json",
          "warnings": ["w" * 100] * 3}
    put("summary", "succeeded", json.dumps(ok))
    put("summary", "reused", json.dumps(dict(ok, reused=True)))
    put("summary", "failed", json.dumps({"v": 1, "step": "convert/hf_to_megatron", "status": "failed",
                                         "exit_code": 2, "error": "hf_model_id=x: does not exist"}))
    put("summary", "unknown-fields", json.dumps(dict(ok, future={"a": [1, 2]}, v=1)))
    put("summary", "v2", json.dumps(dict(ok, v=2)))
    put("summary", "long-error", json.dumps({"v": 1, "step": "s", "status": "failed", "exit_code": 1,
                                             "error": "é" * 1800}))


def extra(dirs):
    taken = collections.Counter()

    def put(target, name, data):
        if taken[(root, target)] < MAX_EXTRA and len(data) <= MAX_SEED:
            taken[(root, target)] += 1
            globals()["put"](target, name, data)

    for root in dirs:
        for dp, dns, files in sorted(os.walk(root)):
            dns.sort()
            for f in sorted(files):
                p = os.path.join(dp, f)
                try:
                    data = open(p, "rb").read()
                except OSError:
                    continue
                rel = os.path.relpath(p, root)
                tag = hashlib.sha256(rel.encode()).hexdigest()[:10]
                if f == ".metadata":
                    put("dcp_metadata", f"extra-{tag}", data)
                elif f == "run_config.yaml":
                    put("yaml", f"extra-{tag}", data)
                    if b"peft:" in data:
                        put("bridge_config", f"extra-{tag}", data)
                elif f.endswith(".index.json"):
                    put("hf_index", f"extra-{tag}", data)
                elif f.endswith(".safetensors"):
                    put("safetensors", f"extra-{tag}", data)
                elif f.endswith(".pt") or f.endswith(".distcp"):
                    put("torch_save", f"extra-{tag}", data)
                elif f == "adapter_config.json":
                    put("peft_config", f"extra-{tag}", data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--extra", nargs="*", default=[])
    args = ap.parse_args()
    pickles()
    torch_saves()
    dcp()
    safetensors_files()
    hf_model()
    peft_configs()
    yamls()
    summaries()
    extra(args.extra)
    for t in sorted(os.listdir(CORPUS)):
        print(t, len(os.listdir(os.path.join(CORPUS, t))))


if __name__ == "__main__":
    sys.exit(main())
