"""Shared fixtures of the interop suite (tier 2: the Python reference stack, on CPU).

Run (from the repository root, after ``cargo build --release``):

    . <venv with e2e/requirements.txt>/bin/activate
    python -m pytest -q e2e/interop

The converter under test is ``$CKPT_CONVERT_BIN`` or, when unset,
``<repo>/target/release/ckpt-convert``.  A missing binary or a missing Python package FAILS
the run (never a skip): the message says how to provide it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

# Before torch / transformers are imported anywhere: no network, few threads.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Child processes (the TP=2 gloo ranks spawned by mcore_cpu) run with one thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # makes `import mcore_cpu` work in every test module

_INSTALL_HINT = (
    "The interop tests need the pinned reference stack of e2e/requirements.txt "
    "(torch 2.15.0, transformers 5.24.0, peft 0.21.2, safetensors 0.8.0, megatron-core 0.16.1, "
    "pytest): create a Python 3.11 venv and run "
    "`pip install --no-deps -r e2e/requirements.txt`, then activate it and rerun "
    "`python -m pytest -q e2e/interop` (or run the repository's test command, which does this)."
)


def _require(modname: str):
    import warnings

    try:
        with warnings.catch_warnings():  # megatron-core's import-time TE/Apex/deprecation notes
            warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|dynamic_context).*")
            return __import__(modname, fromlist=["_"])
    except ImportError as e:  # a missing prerequisite fails the run with instructions
        raise ImportError(f"cannot import {modname!r} ({e}). {_INSTALL_HINT}") from e


torch = _require("torch")
_require("safetensors.torch")
_require("transformers")
_require("megatron.core")

torch.set_num_threads(2)
# torch's DCP event logger logs every load at DEBUG; keep it out of failure reports.
import logging  # noqa: E402

import torch.distributed.checkpoint  # noqa: E402,F401  (creates the logger)

for _name in list(logging.root.manager.loggerDict):
    if "dcp_logger" in _name or _name.startswith("c10d-"):
        logging.getLogger(_name).setLevel(logging.WARNING)
try:
    torch.set_num_interop_threads(1)
except RuntimeError:  # already set (parallel work started): keep it
    pass


# --------------------------------------------------------------------------------------------
# the converter binary
# --------------------------------------------------------------------------------------------


def converter_bin() -> str:
    path = os.environ.get("CKPT_CONVERT_BIN") or os.path.join(REPO, "target", "release", "ckpt-convert")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        src = "CKPT_CONVERT_BIN" if os.environ.get("CKPT_CONVERT_BIN") else "the default path"
        pytest.fail(
            f"ckpt-convert binary not found at {path} ({src}). Build it first: "
            f"`cd {REPO} && cargo build --release` (or run the repository's test command), "
            f"or point CKPT_CONVERT_BIN at a built binary.",
            pytrace=False,
        )
    return path


class CkptResult(str):
    """stdout of a ckpt-convert run (a ``str``), with ``.stderr``, ``.rc``, ``.json()``."""

    stderr: str = ""
    rc: int = 0

    def json(self):
        return json.loads(self)


def run_ckpt(*args, expect: int = 0, timeout: float = 300) -> CkptResult:
    """Run ``ckpt-convert *args``; assert the exit code is ``expect``; return stdout."""
    cmd = [converter_bin(), *[str(a) for a in args]]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    dt = time.monotonic() - t0
    if p.returncode != expect:
        pytest.fail(
            f"`{shlex.join(cmd)}` exited with {p.returncode}, expected {expect} ({dt:.1f}s)\n"
            f"--- stdout ---\n{p.stdout[-6000:]}\n--- stderr ---\n{p.stderr[-6000:]}",
            pytrace=False,
        )
    out = CkptResult(p.stdout)
    out.stderr = p.stderr
    out.rc = p.returncode
    return out


@pytest.fixture(scope="session")
def ckpt():
    """``ckpt(*args, expect=0)`` -> stdout; fails the test on another exit code."""
    converter_bin()  # fail early, with the build hint, when the binary is missing
    return run_ckpt


@pytest.fixture
def tmp(tmp_path) -> str:
    """A fresh scratch directory (str) for one test."""
    return str(tmp_path)


@pytest.fixture(scope="module")
def mod_tmp(tmp_path_factory, request) -> str:
    """A scratch directory shared by a test module's fixtures."""
    return str(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))


@pytest.fixture(scope="module")
def mcore():
    """The in-process world-size-1 gloo group + MCore parallel state, shared by a module.
    Yields the ``mcore_cpu`` module."""
    import mcore_cpu as mc

    mc._ensure_dist(1, 1)
    yield mc
    mc.destroy_dist()


# --------------------------------------------------------------------------------------------
# numbers worth seeing in the run log (printed at the end even with -q and captured output)
# --------------------------------------------------------------------------------------------

_REPORT_LINES = []


@pytest.fixture(scope="session")
def report():
    """``report(msg)``: print ``msg`` now (visible with -s) and again in the terminal summary."""

    def _report(msg: str) -> None:
        print(msg)
        _REPORT_LINES.append(msg)

    return _report


def peer_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("torch", "transformers", "safetensors", "megatron-core", "peft"):
        try:
            out.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            out.append(f"{dist} (not installed)")
    return ", ".join(out)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.section("interop measurements")
    terminalreporter.write_line(f"peers: {peer_versions()}; converter: {os.environ.get('CKPT_CONVERT_BIN') or os.path.join(REPO, 'target', 'release', 'ckpt-convert')}")
    for line in _REPORT_LINES:
        terminalreporter.write_line(line)


def pytest_configure(config):
    # Known noise from megatron-core 0.16.1 / torch 2.15 on CPU; everything else stays visible.
    for pat in (
        "ignore:.*torch.distributed is disabled, unavailable or uninitialized.*:UserWarning",
        "ignore:.*custom_layers.transformer_engine.*:DeprecationWarning",
        "ignore:full scope is deprecated.*:UserWarning",
        "ignore:MLP requires ffn_hidden_size.*:DeprecationWarning",
        "ignore:`load_state_dict` is deprecated.*:FutureWarning",
        "ignore:Please use DTensor instead.*:FutureWarning",
        "ignore:Transformer Engine and Apex are not installed.*:UserWarning",
        "ignore:.*dynamic_context.py.*:DeprecationWarning",
        "ignore:.*tp_group is None, using default tp group.*:DeprecationWarning",
    ):
        config.addinivalue_line("filterwarnings", pat)
