"""Helpers shared by test_formats.py and test_dense_families.py (no fixtures here)."""

from __future__ import annotations

import json
import os
import zlib
from typing import Any, Dict, Iterable, List, Tuple

import torch

# --------------------------------------------------------------------------------------------
# tiny HF models of the dense families
# --------------------------------------------------------------------------------------------

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, tie_word_embeddings=False)


def _rope(theta: float) -> Dict[str, Any]:
    return {"rope_parameters": {"rope_type": "default", "rope_theta": float(theta)}}


# family -> (config class, model class, config kwargs on top of BASE)
FAMILIES: Dict[str, Tuple[str, str, Dict[str, Any]]] = {
    # Llama 2/3 style, untied
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=16, **_rope(10000))),
    # Llama 3.2 style: tied embeddings (no lm_head.weight on disk)
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM",
                   dict(head_dim=16, tie_word_embeddings=True, **_rope(500000))),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(head_dim=16, rms_norm_eps=1e-6, **_rope(1000000))),
    # q/k/v biases
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(head_dim=16, rms_norm_eps=1e-6, **_rope(1000000))),
    # q_norm/k_norm, head_dim (32) != hidden/heads (16)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, rms_norm_eps=1e-6, **_rope(1000000))),
}


def hf_config(family: str, **overrides):
    """The family's HF config, with ``architectures`` set as in a real checkpoint's config.json."""
    import transformers

    cfg_cls, model_cls, kw = FAMILIES[family]
    args = dict(BASE, **kw)
    args.update(overrides)
    cfg = getattr(transformers, cfg_cls)(**args)
    cfg.architectures = [model_cls]
    return cfg


def hf_model(family: str, seed: int, dtype=torch.float32, **overrides):
    """A randomly initialised family model, every weight a function of (seed, name):
    matrices N(0,1)/sqrt(fan_in), norms 1 ± (0.02 + 0.1·|N|), biases ±(0.02 + 0.1·|N|),
    so a swapped or dropped tensor changes the logits by far more than the tolerance."""
    import transformers

    cfg = hf_config(family, **overrides)
    cfg._attn_implementation = "eager"
    model = getattr(transformers, FAMILIES[family][1])(cfg)
    randomize_(model, seed)
    return model.to(dtype).eval()


def _kind(name: str) -> str:
    if "norm" in name:
        return "norm"
    if name.endswith(".bias"):
        return "bias"
    return "weight"


def randomize_(model, seed: int) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62)
            t = torch.randn(tuple(p.shape), generator=g, dtype=torch.float32)
            k = _kind(name)
            # |offset| >= 0.02 survives bf16 rounding (spacing 2^-7 near 1)
            if k == "norm":
                t = 1.0 + torch.where(t < 0, -1.0, 1.0) * (0.02 + 0.1 * t.abs())
            elif k == "bias":
                t = torch.where(t < 0, -1.0, 1.0) * (0.02 + 0.1 * t.abs())
            else:
                t = t / (p.shape[-1] ** 0.5)
            p.copy_(t)
    check_perturbed(model.state_dict())


def check_perturbed(sd: Dict[str, torch.Tensor]) -> None:
    """Every norm weight differs from 1 and every bias from 0, element-wise."""
    for name, t in sd.items():
        k = _kind(name)
        if k == "norm":
            assert bool((t.float() != 1).all()), f"{name} has elements equal to 1"
        elif k == "bias":
            assert bool((t.float() != 0).all()), f"{name} has elements equal to 0"


def mcore_cfg_from_hf(hc, vocab_size: int | None = None, params_dtype: str = "float32") -> Dict[str, Any]:
    """mcore_cpu cfg dict from an HF config (Megatron-Bridge's CONFIG_MAPPING;
    docs/mapping.md#configuration)."""
    rp = getattr(hc, "rope_parameters", None) or {}
    theta = rp.get("rope_theta", getattr(hc, "rope_theta", 10000.0))
    heads = hc.num_attention_heads
    head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // heads
    mt = hc.model_type
    return dict(
        num_layers=hc.num_hidden_layers,
        hidden_size=hc.hidden_size,
        ffn_hidden_size=hc.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=hc.num_key_value_heads,
        kv_channels=head_dim,
        vocab_size=vocab_size or hc.vocab_size,
        max_sequence_length=hc.max_position_embeddings,
        rotary_base=theta,
        layernorm_epsilon=hc.rms_norm_eps,
        share_embeddings_and_output_weights=bool(hc.tie_word_embeddings),
        add_qkv_bias=(mt == "qwen2") or bool(getattr(hc, "attention_bias", False)),
        qk_layernorm=(mt == "qwen3"),
        params_dtype=params_dtype,
    )


def hf_logits(model_or_dir, tokens: torch.Tensor) -> torch.Tensor:
    import transformers

    if isinstance(model_or_dir, str):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_or_dir, attn_implementation="eager", dtype=torch.float32)
    else:
        model = model_or_dir
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def tokens(vocab: int, seed: int = 7, batch: int = 2, seq: int = 12, must_include: Iterable[int] = ()):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (batch, seq), generator=g)
    for i, tok in enumerate(must_include):
        t[i % batch, 1 + i // batch] = tok
    return t


# --------------------------------------------------------------------------------------------
# tokenizer (offline; for HF directories that must carry one)
# --------------------------------------------------------------------------------------------


def save_tiny_tokenizer(out_dir: str, vocab_size: int) -> None:
    """A word-level fast tokenizer with exactly ``vocab_size`` tokens, saved like HF does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for i in range(len(specials), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(out_dir)


# --------------------------------------------------------------------------------------------
# reading what was written
# --------------------------------------------------------------------------------------------


def hf_dir_tensors(d: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """({name: tensor}, {name: file}) of an HF directory; the index (if any) must agree
    exactly with the shard files' contents."""
    from safetensors.torch import load_file

    idx = os.path.join(d, "model.safetensors.index.json")
    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    tensors: Dict[str, torch.Tensor] = {}
    where: Dict[str, str] = {}
    for f in files:
        for k, v in load_file(os.path.join(d, f)).items():
            assert k not in tensors, f"{k} is in {where.get(k)} and {f}"
            tensors[k] = v
            where[k] = f
    if os.path.exists(idx):
        with open(idx) as fh:
            index = json.load(fh)
        assert index["weight_map"] == where, "index weight_map differs from the shard contents"
        assert sorted(set(index["weight_map"].values())) == files, "index names other files"
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        assert index["metadata"]["total_size"] == total, (index["metadata"], total)
    else:
        assert len(files) <= 1, f"{len(files)} shard files but no index in {d}"
    return tensors, where


def inspect(ckpt, path: str) -> Dict[str, Any]:
    return json.loads(ckpt("inspect", path, "--json"))


def boxes(chunks) -> List[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """Normalised chunk boxes from inspect's [[offsets, sizes], ...]."""
    return sorted((tuple(o), tuple(s)) for o, s in chunks)


def dcp_boxes(md_entry) -> List[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    return sorted((tuple(c.offsets), tuple(c.sizes)) for c in md_entry.chunks)


def mcore_requested(mc, model) -> Tuple[Dict[str, Dict[str, Any]], set]:
    """What ``model.sharded_state_dict()`` requests:
    ({ShardedTensor key: {"shape", "dtype", "boxes"}}, {ShardedObject unique keys})."""
    tensors: Dict[str, Dict[str, Any]] = {}
    objects = set()
    for e in mc.sharded_keys(model):
        if e["kind"] == "ShardedTensor":
            t = tensors.setdefault(e["key"], {"shape": tuple(e["global_shape"]), "dtype": e["dtype"],
                                              "boxes": []})
            assert t["shape"] == tuple(e["global_shape"]), e
            p = e["prepend_axis_num"]
            t["boxes"].append((tuple(e["global_offset"]), (1,) * p + tuple(e["local_shape"])))
        elif e["kind"] == "ShardedObject":
            objects.add(e["unique_key"])
        else:
            raise AssertionError(f"unexpected sharded_state_dict entry {e}")
    for t in tensors.values():
        t["boxes"] = sorted(t["boxes"])
    return tensors, objects


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() and t.dtype != torch.bool else t


def assert_bitwise_equal(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], what: str = "") -> None:
    assert sorted(got) == sorted(want), (
        f"{what}: key sets differ; only in output: {sorted(set(got) - set(want))}, "
        f"only in reference: {sorted(set(want) - set(got))}")
    bad = []
    for k in sorted(want):
        g, w = got[k], want[k]
        if g.dtype != w.dtype or tuple(g.shape) != tuple(w.shape):
            bad.append(f"{k}: {g.dtype}{tuple(g.shape)} vs {w.dtype}{tuple(w.shape)}")
        elif not torch.equal(_bits(g), _bits(w)):
            bad.append(f"{k}: values differ (max abs diff "
                       f"{(g.double() - w.double()).abs().nan_to_num(float('inf')).max().item():.3g})")
    assert not bad, f"{what}: {len(bad)} tensors differ:\n  " + "\n  ".join(bad)
