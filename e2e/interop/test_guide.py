"""The conversion guide's four local commands, run verbatim with `ckpt-convert run` in place of
`nemotron steps run`, on a tiny stand-in of the model every example uses
(nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16: hybrid Mamba-2 / attention / MoE).

The stand-in is the Nemotron-H model of the Megatron-Bridge references ($CKPT_BRIDGE_REFS,
made by e2e/bridge/refs.sh): the released model's config.json form (auto_map,
hybrid_override_pattern, remote-code configuration file) at tiny sizes, served from an offline
Hugging Face cache under the guide's model id, so `hf_model_id=nvidia/...` resolves as it does
on a user's machine. The Megatron-Bridge LoRA checkpoint and its base are Bridge's own; the PEFT
adapter is made here with PEFT on transformers 5.

Each command must succeed, validate (its smoke test passed) and write what the next consumer
loads: HF outputs load in transformers and compute the logits the references do.

Run: python -m pytest -q e2e/interop/test_guide.py   (about 30 s on 2 cores)
"""

from __future__ import annotations

import os
import shlex
import shutil

import pytest
import torch

MODEL_ID = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16"

# The guide's commands (docs/train-models/how-to/convert-checkpoints.md of the Nemotron tooling),
# with `nemotron steps run` replaced by `ckpt-convert run`; the /path/to/... placeholders are
# filled in below.
GUIDE = {
    "hf_to_megatron": """ckpt-convert run convert/hf_to_megatron -c default \\
    hf_model_id=/path/to/hf_checkpoint_or_model_id \\
    megatron_path=/path/to/output_megatron_checkpoint""",
    "megatron_to_hf": """ckpt-convert run convert/megatron_to_hf -c default \\
    megatron_path=/path/to/megatron/iter_0000100 \\
    hf_model_id=nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16 \\
    hf_path=/path/to/output_hf_checkpoint""",
    "merge_hf_peft": """ckpt-convert run convert/merge_lora -c default \\
    backend=hf_peft \\
    lora_checkpoint=/path/to/adapter_checkpoint \\
    base_hf_path=/path/to/original_hf_base \\
    output_hf_path=/path/to/merged_hf_checkpoint""",
    "merge_megatron_bridge": """ckpt-convert run convert/merge_lora -c default \\
    backend=megatron_bridge \\
    lora_checkpoint=/path/to/lora_megatron_checkpoint \\
    base_megatron_path=/path/to/original_dense_megatron_checkpoint \\
    hf_model_id=nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16 \\
    output_megatron_path=/path/to/merged_megatron_checkpoint \\
    output_hf_path=/path/to/merged_hf_checkpoint""",
}


def refs() -> str:
    r = os.environ.get("CKPT_BRIDGE_REFS")
    if not r or not os.path.isdir(os.path.join(r, "nemotron_h")):
        pytest.fail("CKPT_BRIDGE_REFS must name the Megatron-Bridge references (made by "
                    "`e2e/bridge/refs.sh BRIDGE_VENV_PYTHON`; the repository's test command does this)",
                    pytrace=False)
    return r


def run_guide(ckpt, name: str, paths: dict) -> str:
    cmd = GUIDE[name]
    for placeholder, value in paths.items():
        assert placeholder in cmd, (name, placeholder)
        cmd = cmd.replace(placeholder, value)
    # A shell joins the lines the guide continues with a backslash.
    words = shlex.split(cmd.replace("\\\n", " "))
    assert words[:2] == ["ckpt-convert", "run"]
    return ckpt(*words[1:], "--json").json()


def hf_logits(path: str, toks) -> torch.Tensor:
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(toks).logits.float()


def test_the_guides_four_commands_run_verbatim(ckpt, tmp, report, monkeypatch):
    r = refs()
    case = os.path.join(r, "nemotron_h")
    # The guide's model id in an offline HF cache.
    hub = os.path.join(tmp, "hub")
    repo = os.path.join(hub, "models--" + MODEL_ID.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", "0123456789abcdef0123456789abcdef01234567")
    shutil.copytree(os.path.join(case, "hf"), snap)
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write("0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("HF_HUB_CACHE", hub)
    toks = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))

    # 1. HF -> Megatron, from a local directory (the guide's "hf_checkpoint_or_model_id").
    mg = os.path.join(tmp, "megatron")
    rep = run_guide(ckpt, "hf_to_megatron", {
        "/path/to/hf_checkpoint_or_model_id": snap,
        "/path/to/output_megatron_checkpoint": mg,
    })
    assert rep["status"] == "succeeded" and rep["validation"]["smoke_test"] == "passed", rep
    assert os.path.isfile(os.path.join(mg, "iter_0000000", ".metadata"))

    # 2. Megatron -> HF with the model id (resolved from the cache). The guide names iteration
    # 100 of a training run: a run of ours at that iteration stands in for it.
    run_dir = os.path.join(tmp, "sft")
    ckpt("run", "convert/hf_to_megatron", f"hf_model_id={MODEL_ID}", f"megatron_path={run_dir}",
         "iteration=100")
    hf_out = os.path.join(tmp, "hf_out")
    rep = run_guide(ckpt, "megatron_to_hf", {
        "/path/to/megatron/iter_0000100": os.path.join(run_dir, "iter_0000100"),
        "/path/to/output_hf_checkpoint": hf_out,
    })
    assert rep["status"] == "succeeded" and rep["validation"]["smoke_test"] == "passed", rep
    src = hf_logits(snap, toks)
    out = hf_logits(hf_out, toks)
    assert torch.equal(src, out), "the exported model must compute the source's logits exactly"
    report(f"[guide] hf_to_megatron + megatron_to_hf: logits of the export equal the source's "
           f"(max |logit| {float(src.abs().max()):.2f})")

    # 3. PEFT merge into the HF base.
    from peft import LoraConfig, PeftModel, get_peft_model
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(snap, dtype=torch.bfloat16)
    torch.manual_seed(4)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                         target_modules=["in_proj", "q_proj", "o_proj", "up_proj"],
                                         target_parameters=["mixer.experts.down_proj"]))
    adapter = os.path.join(tmp, "adapter")
    pm.save_pretrained(adapter)
    merged_hf = os.path.join(tmp, "merged_hf")
    rep = run_guide(ckpt, "merge_hf_peft", {
        "/path/to/adapter_checkpoint": adapter,
        "/path/to/original_hf_base": snap,
        "/path/to/merged_hf_checkpoint": merged_hf,
    })
    assert rep["status"] == "succeeded" and rep["validation"]["smoke_test"] == "passed", rep
    ref = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(snap, dtype=torch.bfloat16), adapter
    ).merge_and_unload()
    ref_dir = os.path.join(tmp, "peft_merged")
    ref.save_pretrained(ref_dir)
    from safetensors.torch import load_file

    ours = load_file(os.path.join(merged_hf, "model.safetensors"))
    theirs = load_file(os.path.join(ref_dir, "model.safetensors"))
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "bit-identical to PEFT's merge"

    # 4. Megatron-Bridge merge, with the HF export, of Bridge's own LoRA checkpoint into the base
    # it was trained on (both run directories, as Bridge writes them).
    out_mg = os.path.join(tmp, "merged_megatron")
    out_hf = os.path.join(tmp, "merged_megatron_hf")
    rep = run_guide(ckpt, "merge_megatron_bridge", {
        "/path/to/lora_megatron_checkpoint": os.path.join(case, "lora"),
        "/path/to/original_dense_megatron_checkpoint": os.path.join(case, "bridge_import"),
        "/path/to/merged_megatron_checkpoint": out_mg,
        "/path/to/merged_hf_checkpoint": out_hf,
    })
    assert rep["status"] == "succeeded" and rep["validation"]["smoke_test"] == "passed", rep
    assert rep["other_outputs"][0]["validation"]["smoke_test"] == "passed", rep
    ours = load_file(os.path.join(out_hf, "model.safetensors"))
    theirs = load_file(os.path.join(case, "merged_hf", "model.safetensors"))
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "bit-identical to Bridge's merge"
    report("[guide] merge_lora hf_peft and megatron_bridge: bit-identical to PEFT's and "
           "Megatron-Bridge's merges")
