"""Helpers of the MoE and hybrid family tests (test_bridge_families.py, test_moe_families.py,
test_nemotron_h.py); no fixtures here."""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List

import pytest
import torch

# The router tensors Megatron-Core keeps in float32 (router dtype fp32; the score-correction
# bias is a float32 buffer), in either naming.
ROUTER_RE = re.compile(r"(mlp\.router\.(weight|expert_bias)|mixer\.gate\.(weight|e_score_correction_bias))$")

# TransformerEngine layers give core attention an `_extra_state`; megatron-core's local spec
# (the only one on CPU) does not, so CPU references lack these byte items.
TE_ONLY_EXTRA_STATE = re.compile(r"\.core_attention\._extra_state/")


def bridge_refs() -> str:
    """$CKPT_BRIDGE_REFS: what the real Megatron-Bridge 0.3.1 wrote on CPU (layout in
    e2e/bridge/BRIDGE_NOTES.md).  Missing: the test fails with the way to make them."""
    d = os.environ.get("CKPT_BRIDGE_REFS")
    if not d or not os.path.isfile(os.path.join(d, ".complete")):
        pytest.fail(
            "these tests compare with what Megatron-Bridge 0.3.1 itself writes: set CKPT_BRIDGE_REFS "
            "to the references directory (./run-tests.sh makes and exports it; by hand: install "
            "e2e/bridge/requirements.txt into a Python 3.11 venv, then "
            "`e2e/bridge/refs.sh <that venv>/bin/python` prints the directory)"
            + (f"; {d!r} has no .complete marker" if d else ""),
            pytrace=False,
        )
    return d


def require_transformers(*names: str):
    """transformers with these classes (5.24.0 of e2e/requirements.txt has them), else fail with
    the install hint."""
    import transformers

    missing = [n for n in names if not hasattr(transformers, n)]
    if missing:
        pytest.fail(f"transformers {transformers.__version__} has no {', '.join(missing)}: these tests "
                    "need the pinned reference stack (transformers 5.24.0): `pip install --no-deps -r "
                    "e2e/requirements.txt` into the interop venv, or run ./run-tests.sh", pytrace=False)
    return transformers


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want|, relative to max |want| when that exceeds 1 (as test_merge_lora.py)."""
    return float((got.float() - want.float()).abs().max()) / max(1.0, float(want.abs().max()))


def kept_fp32_warning(rep: Dict) -> List[str]:
    return [w for w in rep.get("warnings", []) if "float32 tensors of a" in w and "kept in float32" in w]


def assert_kept_fp32_reported(rep: Dict, kept: List[str], what: str) -> None:
    """The report names the float32 tensors kept against the asked dtype: one warning whose
    count is len(kept) and whose listed names (the first few) are all among ``kept``."""
    notes = kept_fp32_warning(rep)
    if not kept:
        assert not notes, f"{what}: no tensor is kept in float32, yet the report says {notes}"
        return
    assert len(notes) == 1, f"{what}: expected one kept-float32 note, found {rep.get('warnings')}"
    m = re.match(r"(\d+) float32 tensors of a (\w+) source kept in float32 instead of (\w+)"
                 r" \(keep_fp32=false casts them\): (.*)$", notes[0])
    assert m, notes[0]
    assert int(m.group(1)) == len(kept), f"{what}: report counts {m.group(1)}, kept {len(kept)}: {sorted(kept)}"
    listed = [n.strip() for n in m.group(4).replace("…", "").split(",") if n.strip()]
    assert listed and set(listed) <= set(kept), (listed, sorted(kept))
    assert (len(listed) < len(kept)) == notes[0].endswith("…"), notes[0]


def load_json(path: str):
    with open(path) as f:
        return json.load(f)
