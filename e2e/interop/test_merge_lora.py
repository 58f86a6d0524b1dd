"""Interop tier 2, issue "convert/merge_lora": ckpt-convert's LoRA merge proved against peft 0.21.2
(`PeftModel.from_pretrained(...).merge_and_unload()`), transformers 5.24.0 and torch 2.15.0 (CPU).

  a. PEFT adapters (created with get_peft_model, random non-zero B, saved with save_pretrained), one
     per option that changes the merge, on tiny models of the dense families (and GPT-2 for Conv1D):
     our merged bf16 tensors against PEFT's merged tensors, element by element in bf16 ulps; and the
     float32 twin of each case: logits of our merged model in transformers against the UNMERGED PEFT
     model (the ground truth of what the adapter computes).
  b. Tied embeddings: where PEFT's merge_and_unload changes the shared matrix (a LoRA on lm_head or on
     the embedding of a tied model: docs/lora.md#tied-embeddings), we write both matrices and untie;
     the comparison is then against the unmerged model, and PEFT's own (wrong) merge is reported
     alongside.
  d. MoE and hybrid models (Qwen3-MoE, Mixtral, Nemotron-H): PEFT on attention, Mamba and MLP
     projections and, through target_parameters, on the experts transformers 5 fuses in memory;
     bit-identical to PEFT's merge in bf16, logits equal the unmerged model's in float32.
  c. Megatron-Bridge adapters (fused linear_qkv/linear_fc1 and canonical q/k/v, gate/up) on families
     Bridge 0.3.1 cannot produce here on CPU (Mistral, Qwen2) and in float32, built here as
     torch_dist checkpoints: the merged Megatron tensors and the exported HF tensors against the
     formula computed here in torch (docs/lora.md#megatron-bridge-merge-arithmetic), and the exported
     model's logits against the base plus the adapter applied unmerged. What the builder writes is
     pinned to Megatron-Bridge's own LoRA checkpoints ($CKPT_BRIDGE_REFS, e2e/bridge/): the same
     adapter tensor names, stacked shapes and dtype (`test_bridge_adapter_builder_matches_bridges_own`);
     Bridge also writes `_extra_state` items and a full run_config.yaml (with a PyYAML `!!set`), which
     the real-reference tests read (test_bridge_families.py, converter/tests/it/merge_lora.rs), and
     whose merges those tests compare bit for bit.

Tolerance (pinned here, printed per case; what the README claims): tensors must be bit-identical to
PEFT's merge, in bf16 and in float32, except DoRA, where the per-row (or per-column) norm is a
reduction whose order differs from torch.linalg.norm's: there at most one bf16 ulp is allowed, on at
most 1 in 10^4 elements (measured: 0 for row norms, 2.7e-5 for GPT-2's column norms), and in float32
at most 1e-5 relative to the tensor's largest element when that exceeds 1 (measured: 3.8e-6). float32 logits must match the
unmerged model within 1e-5 (relative to the largest logit when it exceeds 1: some adapters here, with
PEFT's random non-default init, move logits into the hundreds; measured: at most 2.8e-6).

Run: python -m pytest -q e2e/interop/test_merge_lora.py   (about two minutes on 2 cores)
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch

import interop_util as iu

SEED = 5
LOGITS_TOL = 1e-5  # relative to the largest |logit| when that exceeds 1
DORA_MAX_FRACTION = 1e-4
DORA_F32_TOL = 1e-5  # relative to the tensor's largest |element|

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402  (required: a missing peft fails the run)

warnings.filterwarnings("ignore", module="peft")
warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")


def logits_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want|, relative to max |want| when that exceeds 1."""
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def _gpt2(dtype):
    import transformers

    cfg = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                  bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["GPT2LMHeadModel"]
    cfg._attn_implementation = "eager"
    m = transformers.GPT2LMHeadModel(cfg)
    iu.randomize_(m, SEED)
    return m.to(dtype).eval()


# MoE and hybrid families, tiny; transformers 5 fuses their experts in memory
# (`experts.gate_up_proj` [E, 2F, h]) while the checkpoint keeps one matrix per expert.
MOE_FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       norm_topk_prob=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # Mamba-2, attention, squared-ReLU MLP and MoE layers (sigmoid router, shared expert).
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM",
                   dict(layers_block_type=["mamba", "attention", "mlp", "moe"], num_hidden_layers=4,
                        head_dim=16, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=8,
                        conv_kernel=4, chunk_size=8, intermediate_size=96, n_routed_experts=4,
                        num_experts_per_tok=2, moe_intermediate_size=32,
                        moe_shared_expert_intermediate_size=48, use_mamba_kernels=False)),
}


def _moe_model(family: str, dtype):
    import transformers

    cfg_cls, model_cls, kw = MOE_FAMILIES[family]
    args = dict(iu.BASE, **kw)
    cfg = getattr(transformers, cfg_cls)(**args)
    cfg.architectures = [model_cls]
    cfg._attn_implementation = "eager"
    m = getattr(transformers, model_cls)(cfg)
    iu.randomize_(m, SEED)
    return m.to(dtype).eval()


def build(family: str, dtype, vocab: int | None = None):
    if family == "gpt2":
        m = _gpt2(dtype)
    elif family in MOE_FAMILIES:
        m = _moe_model(family, dtype)
    else:
        m = iu.hf_model(family, SEED, dtype=dtype)
    if vocab:
        m.resize_token_embeddings(vocab, mean_resizing=False)
    return m


# --------------------------------------------------------------------------------------------
# one PEFT case: adapter, our merge, PEFT's merge
# --------------------------------------------------------------------------------------------


def _adapter(d: str, family: str, dtype, kw: dict, vocab: int | None) -> str:
    torch.manual_seed(1)
    model = get_peft_model(build(family, dtype, vocab), LoraConfig(init_lora_weights=False, **kw))
    with torch.no_grad():  # every trained tensor moves, B included (random non-zero B)
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    out = os.path.join(d, "adapter")
    model.save_pretrained(out)
    return out


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in bf16 ulps (same-sign values; the order of bit patterns)."""
    ia = a.view(torch.int16).to(torch.int32)
    ib = b.view(torch.int16).to(torch.int32)
    ia = torch.where(ia < 0, -0x8000 - ia, ia)
    ib = torch.where(ib < 0, -0x8000 - ib, ib)
    return (ia - ib).abs()


def run_case(ckpt, tmp, family, dtype, kw, vocab=None, extra=()):
    """Returns a dict with our tensors, PEFT's merged tensors, base tensors, logits and configs."""
    d = os.path.join(tmp, f"{family}-{str(dtype).split('.')[-1]}")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    base_dir = os.path.join(d, "base")
    build(family, dtype).save_pretrained(base_dir)
    adapter = _adapter(d, family, dtype, kw, vocab)
    out = os.path.join(d, "merged")
    rep = ckpt("run", "convert/merge_lora", f"lora_checkpoint={adapter}", f"base_hf_path={base_dir}",
               f"output_hf_path={out}", *extra, "--json").json()
    assert rep["status"] == "succeeded", rep
    assert not any(f.startswith("adapter_") for f in os.listdir(out)), os.listdir(out)
    toks = iu.tokens(128, seed=SEED)
    unmerged = PeftModel.from_pretrained(build(family, dtype, vocab), adapter).eval()
    with torch.no_grad():
        l_unmerged = unmerged(toks).logits.float()
    merged = unmerged.merge_and_unload()
    with torch.no_grad():
        l_peft = merged(toks).logits.float()
    import transformers

    ours_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype,
                                                                    attn_implementation="eager")
    with torch.no_grad():
        l_ours = ours_model(toks).logits.float()
    ours, _ = iu.hf_dir_tensors(out)
    base, _ = iu.hf_dir_tensors(base_dir)
    peft_sd = merged.state_dict()
    if family in MOE_FAMILIES:
        # In memory the experts are fused; compare with what save_pretrained writes.
        merged.save_pretrained(os.path.join(d, "peft_merged"))
        peft_sd, _ = iu.hf_dir_tensors(os.path.join(d, "peft_merged"))
    return {
        "ours": ours, "peft": peft_sd, "base": base, "report": rep,
        "config": json.load(open(os.path.join(out, "config.json"))),
        "peft_tied": bool(merged.config.tie_word_embeddings),
        "l_ours": l_ours, "l_peft": l_peft, "l_unmerged": l_unmerged,
    }


def compare_bf16(r, skip=(), dora=False):
    """Max ulps and the fraction of elements that differ, over every tensor PEFT also has."""
    ours, ref = r["ours"], r["peft"]
    worst, differing, total = 0, 0, 0
    for k, v in ours.items():
        if k in skip:
            continue
        assert k in ref, f"{k} is not in PEFT's merged model"
        w = ref[k]
        assert v.dtype == w.dtype and tuple(v.shape) == tuple(w.shape), (k, v.dtype, w.dtype, v.shape, w.shape)
        if v.dtype == torch.bfloat16:
            u = _ulps(v, w)
            worst = max(worst, int(u.max()))
            differing += int((u > 0).sum())
            total += u.numel()
        else:
            assert torch.equal(v, w), k
    # PEFT's state dict lists a tied head under both names; we write it once.
    missing = set(ref) - set(ours) - set(skip)
    if not r["config"].get("tie_word_embeddings", False):
        assert not missing, f"missing from our output: {sorted(missing)}"
    frac = differing / max(total, 1)
    if dora:
        assert worst <= 1 and frac <= DORA_MAX_FRACTION, (worst, frac)
    else:
        assert worst == 0, f"max {worst} ulps on {frac:.2e} of the elements (expected bit-identical)"
    return worst, frac


def compare_f32_tensors(r, dora):
    """Max |ours - PEFT's merge| over every float32 tensor (relative to the tensor's largest element
    when that exceeds 1): 0 (bit-identical) except for DoRA."""
    worst = 0.0
    for k, v in r["ours"].items():
        w = r["peft"][k]
        assert v.dtype == w.dtype, (k, v.dtype, w.dtype)
        if dora and v.dtype == torch.float32:
            worst = max(worst, float((v - w).abs().max()) / max(1.0, float(w.abs().max())))
        else:
            assert torch.equal(v, w), f"{k}: the float32 merge differs from PEFT's (expected bit-identical)"
    assert worst <= DORA_F32_TOL, f"DoRA float32: {worst:.2e} > {DORA_F32_TOL}"
    return worst


# option -> (LoraConfig kwargs, families, resized vocab, is DoRA)
T = ["q_proj", "v_proj"]
DENSE = ["llama", "mistral", "qwen2", "qwen3"]
OPTIONS = {
    "r_alpha": (dict(r=8, lora_alpha=16, target_modules=T), DENSE, None, False),
    "all_linear": (dict(r=4, lora_alpha=8, target_modules="all-linear"), DENSE, None, False),
    "rslora": (dict(r=8, lora_alpha=7, use_rslora=True,
                    target_modules=["q_proj", "k_proj", "o_proj", "down_proj"]), ["llama", "qwen3"], None, False),
    "dora": (dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj", "down_proj"]),
             ["llama", "qwen2"], None, True),
    "dora_embedding": (dict(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens", "v_proj"]),
                       ["llama"], None, True),
    "rank_alpha_pattern": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 4},
                                alpha_pattern={"v_proj": 3, r"^q_proj": 100}),
                           ["llama", "qwen3"], None, False),
    "target_regex": (dict(r=4, lora_alpha=8, target_modules=r".*layers\.[02]\.(self_attn\.(q|k)|mlp\.gate)_proj"),
                     ["mistral"], None, False),
    # Python re beyond Rust's regex: a negative look-behind and a back-reference.
    "target_regex_lookaround": (dict(r=4, lora_alpha=8, target_modules=r".*(?<!k)_proj"), ["llama"], None, False),
    "target_regex_backreference": (dict(r=4, lora_alpha=8,
                                        target_modules=r".*layers\.(\d)\.self_attn\.(q|v)_proj(?!\1)"),
                                   ["qwen3"], None, False),
    "exclude_list": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                          exclude_modules=["o_proj", "model.layers.1.self_attn.q_proj"]), ["llama"], None, False),
    "exclude_regex": (dict(r=4, lora_alpha=8, target_modules=T, exclude_modules=r".*layers\.0\..*"),
                      ["qwen2"], None, False),
    "layers_to_transform": (dict(r=4, lora_alpha=8, target_modules=T, layers_to_transform=[0, 2],
                                 layers_pattern="layers"), ["llama"], None, False),
    "layers_to_transform_int": (dict(r=4, lora_alpha=8, target_modules=T, layers_to_transform=1),
                                ["qwen3"], None, False),
    "fan_in_fan_out": (dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
                       ["gpt2"], None, False),
    "fan_in_fan_out_dora": (dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                 use_dora=True), ["gpt2"], None, True),
    "bias_all": (dict(r=4, lora_alpha=8, target_modules=T, bias="all"), ["qwen2"], None, False),
    "bias_lora_only": (dict(r=4, lora_alpha=8, target_modules=T, bias="lora_only"), ["qwen2"], None, False),
    "lora_bias": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True),
                  ["qwen2"], None, False),
    "modules_to_save": (dict(r=4, lora_alpha=8, target_modules=T, modules_to_save=["lm_head", "model.norm"]),
                        ["llama", "qwen2"], None, False),
    "embedding_lora": (dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]), DENSE, None, False),
    "saved_embeddings_resized": (dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]),
                                 ["llama"], 136, False),
    "trainable_tokens": (dict(r=4, lora_alpha=8, target_modules=T, trainable_token_indices=[3, 5, 7]),
                         ["llama", "llama_tied"], None, False),
}
CASES = [(opt, fam) for opt, (_, fams, _, _) in OPTIONS.items() for fam in fams]


@pytest.mark.parametrize("option,family", CASES, ids=[f"{o}-{f}" for o, f in CASES])
def test_peft_option(option, family, ckpt, tmp, report):
    kw, _, vocab, dora = OPTIONS[option]
    r = run_case(ckpt, tmp, family, torch.bfloat16, kw, vocab)
    worst, frac = compare_bf16(r, dora=dora)
    if vocab:
        assert r["config"]["vocab_size"] == vocab
    r32 = run_case(ckpt, tmp, family, torch.float32, kw, vocab)
    compare_f32 = compare_f32_tensors(r32, dora)
    diff = logits_diff(r32["l_ours"], r32["l_unmerged"])
    report(f"[merge_lora a] {option:<26} {family:<10} bf16 vs PEFT merge: max {worst} ulp, "
           f"{frac:.2e} of elements differ | f32: max |ours - PEFT merge| {compare_f32:.1e}, "
           f"rel. max |logits(ours) - logits(unmerged PEFT)| {diff:.1e}")
    assert diff <= LOGITS_TOL, f"{option}/{family}: logits differ from the unmerged model by {diff:.3e}"
    assert float(r32["l_unmerged"].abs().max()) > 0.5, "degenerate logits: the comparison would prove little"


# Options whose merge would not be what the adapter computes, in the adapter_config.json PEFT itself
# writes: PiSSA and OLoRA (the adapter was initialised from the base and the base rewritten to the
# residual, so base + B·A needs that residual base, not the one on disk) and layer replication
# (the adapted model has more layers than the base). Refused with the reason, nothing written.
UNFAITHFUL = {
    "pissa": (dict(init_lora_weights="pissa"), "rewrites the base weights"),
    "pissa_niter": (dict(init_lora_weights="pissa_niter_2"), "rewrites the base weights"),
    "olora": (dict(init_lora_weights="olora"), "rewrites the base weights"),
    "layer_replication": (dict(init_lora_weights=False, layer_replication=[[0, 2], [1, 2]]), "layer_replication"),
}


@pytest.mark.parametrize("case", list(UNFAITHFUL))
def test_unfaithful_variants_saved_by_peft_are_refused(case, ckpt, tmp):
    kw, says = UNFAITHFUL[case]
    base_dir = os.path.join(tmp, "base")
    build("llama", torch.float32).save_pretrained(base_dir)
    torch.manual_seed(1)
    model = get_peft_model(build("llama", torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **kw))
    adapter = os.path.join(tmp, "adapter")
    model.save_pretrained(adapter)
    with open(os.path.join(adapter, "adapter_config.json")) as fh:
        saved = json.load(fh)
    for k, v in kw.items():  # PEFT kept the option in the file we read
        assert saved[k] == v or (k == "layer_replication" and saved[k] == [list(x) for x in v]), (k, saved[k])
    out = os.path.join(tmp, "merged")
    r = ckpt("run", "convert/merge_lora", f"lora_checkpoint={adapter}", f"base_hf_path={base_dir}",
             f"output_hf_path={out}", expect=2)
    assert "adapter_config.json" in r.stderr and says in r.stderr, r.stderr
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(tmp) if "staging" in n], os.listdir(tmp)


def test_pissa_converted_to_lora_on_save_merges_like_peft(ckpt, tmp, report):
    """The way PEFT makes a PiSSA adapter portable (`save_pretrained(...,
    path_initial_model_for_weight_conversion=...)`) writes a plain LoRA of rank 2r against the
    original base: that one is merged, bit-identical to PEFT's merge in float32."""
    base_dir = os.path.join(tmp, "base")
    build("llama", torch.float32).save_pretrained(base_dir)
    torch.manual_seed(1)
    model = get_peft_model(build("llama", torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    init = os.path.join(tmp, "initial")
    model.peft_config["default"].init_lora_weights = True  # as PEFT's PiSSA guide saves the initial adapter
    model.save_pretrained(init)
    model.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():  # "training"
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    adapter = os.path.join(tmp, "adapter")
    model.save_pretrained(adapter, path_initial_model_for_weight_conversion=init)
    with open(os.path.join(adapter, "adapter_config.json")) as fh:
        saved = json.load(fh)
    assert saved["init_lora_weights"] is True and saved["r"] == 8, saved
    out = os.path.join(tmp, "merged")
    ckpt("run", "convert/merge_lora", f"lora_checkpoint={adapter}", f"base_hf_path={base_dir}", f"output_hf_path={out}")
    want = PeftModel.from_pretrained(build("llama", torch.float32), adapter).merge_and_unload().state_dict()
    ours, _ = iu.hf_dir_tensors(out)
    changed = [k for k in ours if "q_proj" in k or "v_proj" in k]
    assert changed
    for k, v in ours.items():
        assert torch.equal(v, want[k]), k
    report(f"[merge_lora a] pissa converted on save: {len(changed)} adapted tensors bit-identical to PEFT's merge (float32)")


# PEFT on MoE and hybrid models: attention, Mamba in_proj, dense and shared-expert MLPs through
# target_modules; the routed experts through target_parameters (one nested wrapper per adapted
# parameter; one rank block per expert, B's columns interleaved by expert).
MOE_CASES = {
    "qwen3_moe": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    "mixtral": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"],
                    target_parameters=["mlp.experts.gate_up_proj"]),
    "nemotron_h": dict(r=4, lora_alpha=8, target_modules=["in_proj", "q_proj", "o_proj", "up_proj", "down_proj"],
                       target_parameters=["mixer.experts.up_proj", "mixer.experts.down_proj"]),
}


@pytest.mark.parametrize("family", list(MOE_CASES))
def test_peft_on_moe_and_hybrid_models(family, ckpt, tmp, report):
    kw = MOE_CASES[family]
    r = run_case(ckpt, tmp, family, torch.bfloat16, kw)
    worst, frac = compare_bf16(r)
    expert_keys = [k for k in r["ours"] if ".experts.0." in k]
    assert expert_keys, "the checkpoint keeps one matrix per expert"
    changed = [k for k in expert_keys if not torch.equal(r["ours"][k], r["base"][k])]
    assert changed, "target_parameters must change the experts"
    r32 = run_case(ckpt, tmp, family, torch.float32, kw)
    diff = logits_diff(r32["l_ours"], r32["l_unmerged"])
    report(f"[merge_lora d] {family:<10} bf16 vs PEFT merge: max {worst} ulp ({len(changed)} expert-0 "
           f"matrices changed) | f32 rel. max |logits(ours) - logits(unmerged PEFT)| {diff:.1e}")
    assert diff <= LOGITS_TOL, f"{family}: logits differ from the unmerged model by {diff:.3e}"
    assert float(r32["l_unmerged"].abs().max()) > 0.5, "degenerate logits: the comparison would prove little"


# --------------------------------------------------------------------------------------------
# b. tied embeddings
# --------------------------------------------------------------------------------------------

TIED = {
    # LoRA on the head of a tied model: PEFT adds the delta to the shared matrix (the input
    # embedding changes too); we write the head and the untouched embedding and untie.
    "lora_lm_head": (dict(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]), "lm_head.weight"),
    # LoRA on the embedding of a tied model: PEFT changes the head too; we keep the head.
    "lora_embedding": (dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
                       "model.embed_tokens.weight"),
    # ensure_weight_tying with LoRA on both: PEFT 0.21.2 creates the head's adapter from the
    # embedding's, but they are separate parameters once cast to the model's dtype.
    "ensure_weight_tying_lora": (dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"],
                                      ensure_weight_tying=True), None),
    # modules_to_save on the head: two matrices; PEFT unties as well.
    "modules_to_save_lm_head": (dict(r=4, lora_alpha=8, target_modules=T, modules_to_save=["lm_head"]), None),
    # ensure_weight_tying with modules_to_save: one trained matrix, still tied.
    "ensure_weight_tying_mts": (dict(r=4, lora_alpha=8, target_modules=T, modules_to_save=["lm_head"],
                                     ensure_weight_tying=True), None),
}


@pytest.mark.parametrize("case", list(TIED))
def test_tied_embeddings(case, ckpt, tmp, report):
    kw, peft_exact = TIED[case]
    r = run_case(ckpt, tmp, "llama_tied", torch.bfloat16, kw)
    r32 = run_case(ckpt, tmp, "llama_tied", torch.float32, kw)
    ours_tied = r["config"].get("tie_word_embeddings")
    diverges = case in ("lora_lm_head", "lora_embedding", "ensure_weight_tying_lora")
    if diverges:
        # Both matrices written and the config untied. PEFT's merge changed the shared matrix, so
        # only the tensor it gets right is compared with it; the other must be the base's.
        assert ours_tied is False
        assert "lm_head.weight" in r["ours"] and "model.embed_tokens.weight" in r["ours"]
        both = ["lm_head.weight", "model.embed_tokens.weight"]
        skip = [k for k in both if k != peft_exact]
        worst, frac = compare_bf16(r, skip=skip)
        if peft_exact:
            (partner,) = skip
            assert torch.equal(r["ours"][partner], r["base"]["model.embed_tokens.weight"]), partner
    else:
        worst, frac = compare_bf16(r)
        assert ours_tied == r["peft_tied"], (ours_tied, r["peft_tied"])
    ours = logits_diff(r32["l_ours"], r32["l_unmerged"])
    theirs = logits_diff(r32["l_peft"], r32["l_unmerged"])
    report(f"[merge_lora b] tied {case:<26} tie_word_embeddings={ours_tied!s:<5} bf16 vs PEFT: max {worst} ulp "
           f"({frac:.2e}) | f32 logits vs unmerged: ours {ours:.1e}, PEFT merge_and_unload {theirs:.1e}")
    assert ours <= LOGITS_TOL, f"{case}: {ours:.3e}"
    if diverges:
        assert theirs > 100 * LOGITS_TOL, "PEFT's merge was expected to change the tied partner here"


# --------------------------------------------------------------------------------------------
# the wrong base, end to end with real PEFT adapters
# --------------------------------------------------------------------------------------------


def test_wrong_base_is_refused(ckpt, tmp):
    """An adapter for one model into another of the same architecture and shapes: refused by
    the digest recorded in our manifest; an adapter for a deeper model: refused by shapes."""
    d = tmp
    src = os.path.join(d, "src")
    iu.hf_model("llama", SEED, dtype=torch.bfloat16).save_pretrained(src)
    ckpt("run", "convert/hf_to_megatron", f"hf_model_id={src}", f"megatron_path={d}/mg")
    ckpt("run", "convert/megatron_to_hf", f"megatron_path={d}/mg/iter_0000000", f"hf_model_id={src}",
         f"hf_path={d}/base_a")
    other = os.path.join(d, "other")
    iu.hf_model("llama", SEED + 1, dtype=torch.bfloat16).save_pretrained(other)
    ckpt("run", "convert/hf_to_megatron", f"hf_model_id={other}", f"megatron_path={d}/mg2")
    ckpt("run", "convert/megatron_to_hf", f"megatron_path={d}/mg2/iter_0000000", f"hf_model_id={other}",
         f"hf_path={d}/base_b")
    model = get_peft_model(iu.hf_model("llama", SEED + 1, dtype=torch.bfloat16),
                           LoraConfig(r=4, target_modules=T, init_lora_weights=False))
    model.peft_config["default"].base_model_name_or_path = f"{d}/base_b"
    model.save_pretrained(f"{d}/adapter")
    out = ckpt("run", "convert/merge_lora", f"lora_checkpoint={d}/adapter", f"base_hf_path={d}/base_a",
               f"output_hf_path={d}/merged", "allow_base_mismatch=true", expect=2)
    assert "wrong base" in out.stderr and "never overridden" in out.stderr, out.stderr
    assert not os.path.exists(f"{d}/merged")
    ckpt("run", "convert/merge_lora", f"lora_checkpoint={d}/adapter", f"base_hf_path={d}/base_b",
         f"output_hf_path={d}/merged")
    deep = get_peft_model(iu.hf_model("llama", SEED, dtype=torch.bfloat16, num_hidden_layers=4),
                          LoraConfig(r=4, target_modules=T, init_lora_weights=False))
    deep.save_pretrained(f"{d}/deep")
    out = ckpt("run", "convert/merge_lora", f"lora_checkpoint={d}/deep", f"base_hf_path={d}/base_a",
               f"output_hf_path={d}/merged_deep", "allow_base_mismatch=true", expect=2)
    assert "model.layers.3.self_attn" in out.stderr and "no such tensor in the base" in out.stderr


# --------------------------------------------------------------------------------------------
# c. Megatron-Bridge adapters
# --------------------------------------------------------------------------------------------

MB_METADATA = ('{"sharded_backend": "torch_dist", "sharded_backend_version": 1, '
               '"common_backend": "torch", "common_backend_version": 1}')


def _qkv_rows(hc):
    """Rows of q, k and v inside the fused linear_qkv (per query group: its q heads, k, v)."""
    h, g = hc.num_attention_heads, hc.num_key_value_heads
    d = getattr(hc, "head_dim", None) or hc.hidden_size // h
    p = h // g
    q = [gi * (p + 2) * d + j for gi in range(g) for j in range(p * d)]
    k = [gi * (p + 2) * d + p * d + j for gi in range(g) for j in range(d)]
    v = [gi * (p + 2) * d + (p + 1) * d + j for gi in range(g) for j in range(d)]
    return q, k, v, d


def _bridge_adapter(run_dir, hc, dim, alpha, dtype, canonical, seed=3, hf_model_id=None):
    """A Megatron-Bridge LoRA (or CanonicalLoRA) checkpoint: stacked adapter tensors
    (docs/lora.md#megatron-bridge-adapter-checkpoints) written with torch DCP, metadata.json,
    run_config.yaml, and a tracker."""
    import torch.distributed.checkpoint as dcp

    L, h, f = hc.num_hidden_layers, hc.hidden_size, hc.intermediate_size
    q, k, v, d = _qkv_rows(hc)
    heads, groups = hc.num_attention_heads, hc.num_key_value_heads
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    pre = "decoder.layers."
    sd = {}
    if canonical:
        for name, rows in (("adapter_q", heads * d), ("adapter_k", groups * d), ("adapter_v", groups * d)):
            sd[f"{pre}self_attention.linear_qkv.adapter.{name}.linear_in.weight"] = rnd(L, dim, h)
            sd[f"{pre}self_attention.linear_qkv.adapter.{name}.linear_out.weight"] = rnd(L, rows, dim)
        for name in ("adapter_gate", "adapter_up"):
            sd[f"{pre}mlp.linear_fc1.adapter.{name}.linear_in.weight"] = rnd(L, dim, h)
            sd[f"{pre}mlp.linear_fc1.adapter.{name}.linear_out.weight"] = rnd(L, f, dim)
        targets = ["linear_q", "linear_k", "linear_v", "linear_proj", "linear_fc1_gate", "linear_fc1_up",
                   "linear_fc2"]
    else:
        sd[f"{pre}self_attention.linear_qkv.adapter.linear_in.weight"] = rnd(L, dim, h)
        sd[f"{pre}self_attention.linear_qkv.adapter.linear_out.weight"] = rnd(L, len(q) + len(k) + len(v), dim)
        sd[f"{pre}mlp.linear_fc1.adapter.linear_in.weight"] = rnd(L, dim, h)
        sd[f"{pre}mlp.linear_fc1.adapter.linear_out.weight"] = rnd(L, 2 * f, dim)
        targets = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    sd[f"{pre}self_attention.linear_proj.adapter.linear_in.weight"] = rnd(L, dim, heads * d)
    sd[f"{pre}self_attention.linear_proj.adapter.linear_out.weight"] = rnd(L, h, dim)
    sd[f"{pre}mlp.linear_fc2.adapter.linear_in.weight"] = rnd(L, dim, f)
    sd[f"{pre}mlp.linear_fc2.adapter.linear_out.weight"] = rnd(L, h, dim)
    it = os.path.join(run_dir, "iter_0000050")
    os.makedirs(it)
    dcp.save(sd, checkpoint_id=it)
    with open(os.path.join(it, "metadata.json"), "w") as fh:
        fh.write(MB_METADATA)
    with open(os.path.join(run_dir, "latest_checkpointed_iteration.txt"), "w") as fh:
        fh.write("50")
    target = "megatron.bridge.peft.canonical_lora.CanonicalLoRA" if canonical else "megatron.bridge.peft.lora.LoRA"
    with open(os.path.join(it, "run_config.yaml"), "w") as fh:
        fh.write("checkpoint:\n  pretrained_checkpoint: null\n  save_optim: false\n"
                 f"model:\n  num_layers: {L}\n  hf_model_id: {hf_model_id or 'null'}\n"
                 f"peft:\n  _target_: {target}\n  dim: {dim}\n  alpha: {alpha}\n  dropout: 0.0\n"
                 "  dropout_position: pre\n  target_modules:\n" + "".join(f"  - {t}\n" for t in targets))
    return sd


@pytest.mark.parametrize("canonical", [False, True], ids=["fused", "canonical"])
def test_bridge_adapter_builder_matches_bridges_own(canonical, tmp):
    """The adapters `_bridge_adapter` writes have the tensor names, stacked shapes and dtype of the
    LoRA checkpoints Megatron-Bridge 0.3.1 itself saved for the same model (fused LoRA and
    CanonicalLoRA on the Llama reference), so (c) merges what Bridge writes, not our idea of it."""
    import torch.distributed.checkpoint as dcp
    import transformers

    import families_util as fu

    refs = fu.bridge_refs()
    real_dir = os.path.join(refs, "llama", "lora_canonical" if canonical else "lora", "iter_0000050")
    real = {k: (tuple(v.size), v.properties.dtype)
            for k, v in dcp.FileSystemReader(real_dir).read_metadata().state_dict_metadata.items()
            if "adapter" in k and "_extra_state" not in k}
    assert real, f"no adapter tensors in {real_dir}"
    hc = transformers.AutoConfig.from_pretrained(os.path.join(refs, "llama", "hf"))
    import yaml

    with open(os.path.join(real_dir, "run_config.yaml")) as fh:
        peft = yaml.safe_load(fh)["peft"]
    sd = _bridge_adapter(os.path.join(tmp, "adapter"), hc, peft["dim"], peft["alpha"], torch.bfloat16, canonical)
    built = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
    assert built == real, {"only ours": sorted(set(built) - set(real)), "only Bridge's": sorted(set(real) - set(built)),
                           "differing": {k: (built[k], real[k]) for k in set(built) & set(real) if built[k] != real[k]}}


def _expected_hf(base, sd, hc, scale, dtype, canonical):
    """The merged HF tensors of `merge_arithmetic=fp32` (Megatron-Bridge >= 0.5): per HF tensor,
    W' = dtype(f32(W) + scale * (f32(B_part) @ f32(A))), B split like the fused weight, A shared.
    (The default arithmetic, Megatron-Bridge 0.3.1's, is proven bit for bit against Bridge's own
    merges in converter/tests/it/merge_lora.rs.)"""
    q, k, v, _ = _qkv_rows(hc)
    f = hc.intermediate_size
    pre = "decoder.layers."
    out = {}
    for layer in range(hc.num_hidden_layers):
        def merged(hf_name, a, b):
            w = base[f"model.layers.{layer}.{hf_name}.weight"].float()
            out[f"model.layers.{layer}.{hf_name}.weight"] = (w + scale * (b.float() @ a.float())).to(dtype)

        if canonical:
            for hf_name, part in (("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v")):
                key = f"{pre}self_attention.linear_qkv.adapter.adapter_{part}"
                merged(hf_name, sd[f"{key}.linear_in.weight"][layer], sd[f"{key}.linear_out.weight"][layer])
            for hf_name, part in (("mlp.gate_proj", "gate"), ("mlp.up_proj", "up")):
                key = f"{pre}mlp.linear_fc1.adapter.adapter_{part}"
                merged(hf_name, sd[f"{key}.linear_in.weight"][layer], sd[f"{key}.linear_out.weight"][layer])
        else:
            a = sd[f"{pre}self_attention.linear_qkv.adapter.linear_in.weight"][layer]
            b = sd[f"{pre}self_attention.linear_qkv.adapter.linear_out.weight"][layer]
            for hf_name, rows in (("self_attn.q_proj", q), ("self_attn.k_proj", k), ("self_attn.v_proj", v)):
                merged(hf_name, a, b[rows])
            a = sd[f"{pre}mlp.linear_fc1.adapter.linear_in.weight"][layer]
            b = sd[f"{pre}mlp.linear_fc1.adapter.linear_out.weight"][layer]
            merged("mlp.gate_proj", a, b[:f])
            merged("mlp.up_proj", a, b[f:])
        for hf_name, mod in (("self_attn.o_proj", "self_attention.linear_proj"), ("mlp.down_proj", "mlp.linear_fc2")):
            merged(hf_name, sd[f"{pre}{mod}.adapter.linear_in.weight"][layer],
                   sd[f"{pre}{mod}.adapter.linear_out.weight"][layer])
    return out


def _unmerged_peft(family, dtype, sd, hc, dim, alpha, canonical):
    """The base with the Megatron-Bridge adapter applied unmerged, as PEFT LoRA layers (the HF-PEFT
    adapter export of docs/lora.md#megatron-bridge-merge-arithmetic: A shared by q/k/v and by
    gate/up, B split)."""
    model = iu.hf_model(family, SEED, dtype=dtype)
    mods = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = get_peft_model(model, LoraConfig(r=dim, lora_alpha=alpha, target_modules=mods))
    q, k, v, _ = _qkv_rows(hc)
    f = hc.intermediate_size
    pre = "decoder.layers."
    with torch.no_grad():
        for layer in range(hc.num_hidden_layers):
            blk = pm.base_model.model.model.layers[layer]

            def put(mod, a, b):
                mod.lora_A["default"].weight.copy_(a.float())
                mod.lora_B["default"].weight.copy_(b.float())

            if canonical:
                for name, part in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
                    key = f"{pre}self_attention.linear_qkv.adapter.adapter_{part}"
                    put(getattr(blk.self_attn, name), sd[f"{key}.linear_in.weight"][layer],
                        sd[f"{key}.linear_out.weight"][layer])
                for name, part in (("gate_proj", "gate"), ("up_proj", "up")):
                    key = f"{pre}mlp.linear_fc1.adapter.adapter_{part}"
                    put(getattr(blk.mlp, name), sd[f"{key}.linear_in.weight"][layer],
                        sd[f"{key}.linear_out.weight"][layer])
            else:
                a = sd[f"{pre}self_attention.linear_qkv.adapter.linear_in.weight"][layer]
                b = sd[f"{pre}self_attention.linear_qkv.adapter.linear_out.weight"][layer]
                for name, rows in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    put(getattr(blk.self_attn, name), a, b[rows])
                a = sd[f"{pre}mlp.linear_fc1.adapter.linear_in.weight"][layer]
                b = sd[f"{pre}mlp.linear_fc1.adapter.linear_out.weight"][layer]
                put(blk.mlp.gate_proj, a, b[:f])
                put(blk.mlp.up_proj, a, b[f:])
            put(blk.self_attn.o_proj, sd[f"{pre}self_attention.linear_proj.adapter.linear_in.weight"][layer],
                sd[f"{pre}self_attention.linear_proj.adapter.linear_out.weight"][layer])
            put(blk.mlp.down_proj, sd[f"{pre}mlp.linear_fc2.adapter.linear_in.weight"][layer],
                sd[f"{pre}mlp.linear_fc2.adapter.linear_out.weight"][layer])
    return pm.eval()


MB_CASES = [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", True), ("mistral", False)]


@pytest.mark.parametrize("family,canonical", MB_CASES,
                         ids=[f"{f}-{'canonical' if c else 'fused'}" for f, c in MB_CASES])
def test_megatron_bridge(family, canonical, ckpt, tmp, report):
    import mcore_cpu as mc

    dim, alpha = 8, 12
    scale = alpha / dim
    results = {}
    for dtype, dname in ((torch.bfloat16, "bfloat16"), (torch.float32, "float32")):
        d = os.path.join(tmp, dname)
        os.makedirs(d)
        hf_dir = os.path.join(d, "hf")
        model = iu.hf_model(family, SEED, dtype=dtype)
        model.save_pretrained(hf_dir)
        iu.save_tiny_tokenizer(hf_dir, model.config.vocab_size)
        hc = model.config
        ckpt("run", "convert/hf_to_megatron", f"hf_model_id={hf_dir}", f"megatron_path={d}/base", f"dtype={dname}")
        base_iter = os.path.join(d, "base", "iter_0000000")
        sd = _bridge_adapter(os.path.join(d, "adapter"), hc, dim, alpha, dtype, canonical, hf_model_id=hf_dir)
        rep = ckpt("run", "convert/merge_lora", f"lora_checkpoint={d}/adapter", f"base_megatron_path={base_iter}",
                   f"output_megatron_path={d}/merged_mg", f"output_hf_path={d}/merged_hf",
                   f"hf_model_id={hf_dir}", "merge_arithmetic=fp32", "--json").json()
        assert rep["kind"] == "checkpoint_hf" and rep["other_outputs"][0]["kind"] == "checkpoint_megatron", rep
        ours, _ = iu.hf_dir_tensors(f"{d}/merged_hf")
        base, _ = iu.hf_dir_tensors(hf_dir)
        want = _expected_hf(base, sd, hc, scale, dtype, canonical)
        worst, differing, total = 0, 0, 0
        for name, t in ours.items():
            w = want.get(name, base[name])
            if dtype == torch.bfloat16:
                u = _ulps(t, w)
                worst = max(worst, int(u.max()))
                differing += int((u > 0).sum())
                total += u.numel()
            else:
                assert torch.equal(t, w), name
        assert worst == 0, f"HF export: max {worst} ulps on {differing / total:.2e} of the elements"
        # The merged Megatron tensors: the fused weights with the fused formula, unchanged elsewhere.
        got_mg = mc.read_global_tensors(f"{d}/merged_mg/iter_0000000")
        base_mg = mc.read_global_tensors(base_iter)
        assert sorted(got_mg) == sorted(base_mg)
        q, k, v, _ = _qkv_rows(hc)
        inv = torch.empty(len(q) + len(k) + len(v), dtype=torch.long)
        inv[torch.tensor(q + k + v)] = torch.arange(len(inv))
        f = hc.intermediate_size
        for layer in range(hc.num_hidden_layers):
            qkv = torch.cat([want[f"model.layers.{layer}.self_attn.{n}_proj.weight"] for n in "qkv"])[inv]
            fc1 = torch.cat([want[f"model.layers.{layer}.mlp.{n}_proj.weight"] for n in ("gate", "up")])
            for key, expect in (("decoder.layers.self_attention.linear_qkv.weight", qkv),
                                ("decoder.layers.mlp.linear_fc1.weight", fc1),
                                ("decoder.layers.self_attention.linear_proj.weight",
                                 want[f"model.layers.{layer}.self_attn.o_proj.weight"]),
                                ("decoder.layers.mlp.linear_fc2.weight",
                                 want[f"model.layers.{layer}.mlp.down_proj.weight"])):
                assert torch.equal(got_mg[key][layer], expect), (key, layer)
        for key, t in base_mg.items():
            if not any(m in key for m in ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight",
                                          "linear_fc2.weight")):
                assert torch.equal(got_mg[key], t), key
        results[dname] = (d, hc, sd, worst, differing / max(total, 1))
    # Logits (float32): the exported model against the base with the adapter applied unmerged.
    d, hc, sd, _, _ = results["float32"]
    toks = iu.tokens(hc.vocab_size, seed=SEED)
    want_logits = _unmerged_peft(family, torch.float32, sd, hc, dim, alpha, canonical)
    with torch.no_grad():
        lw = want_logits(toks).logits.float()
    lo = iu.hf_logits(f"{d}/merged_hf", toks)
    diff = logits_diff(lo, lw)
    _, _, _, worst, frac = results["bfloat16"]
    report(f"[merge_lora c] megatron_bridge {family:<8} {'canonical' if canonical else 'fused':<9} bf16 vs formula: "
           f"max {worst} ulp ({frac:.2e}) | f32 logits(export) - logits(base + adapter) {diff:.1e}")
    assert float(lw.abs().max()) > 1.0
    assert diff <= LOGITS_TOL, diff


def test_megatron_bridge_merged_checkpoint_loads_in_mcore(ckpt, tmp, mcore, report):
    """The merged Megatron checkpoint loads into megatron-core's GPTModel with the default
    strictness and gives the logits of the base plus the adapter."""
    family, dim, alpha = "llama", 8, 16
    model = iu.hf_model(family, SEED, dtype=torch.float32)
    hf_dir = os.path.join(tmp, "hf")
    model.save_pretrained(hf_dir)
    hc = model.config
    ckpt("run", "convert/hf_to_megatron", f"hf_model_id={hf_dir}", f"megatron_path={tmp}/base", "dtype=float32")
    sd = _bridge_adapter(os.path.join(tmp, "adapter"), hc, dim, alpha, torch.float32, False)
    ckpt("run", "convert/merge_lora", f"lora_checkpoint={tmp}/adapter",
         f"base_megatron_path={tmp}/base/iter_0000000", f"output_megatron_path={tmp}/merged", "export_hf=false")
    toks = iu.tokens(hc.vocab_size, seed=SEED)
    got = mcore.forward_logits(mcore.load_into_gpt(iu.mcore_cfg_from_hf(hc), f"{tmp}/merged/iter_0000000"), toks)
    with torch.no_grad():
        want = _unmerged_peft(family, torch.float32, sd, hc, dim, alpha, False)(toks).logits.float()
    diff = logits_diff(got, want)
    report(f"[merge_lora c] merged Megatron checkpoint in megatron-core: max |logits - logits(base + adapter)| {diff:.1e}")
    assert diff <= LOGITS_TOL, diff
