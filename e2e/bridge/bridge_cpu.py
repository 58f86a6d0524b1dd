#!/usr/bin/env python3
"""Run the real Megatron-Bridge 0.3.1 (megatron-core 0.16.1) on CPU, for reference artifacts.

Only for the bridge venv of ``e2e/bridge/requirements.txt``.  Everything here is Bridge's
own code path; the patches below only make it run without CUDA / TransformerEngine /
mamba_ssm and are applied in this process only (nothing on disk changes).  What each patch
is for, and what was observed, is in BRIDGE_NOTES.md.

API (all functions build their own gloo world of size 1 and tear it down again):
    patch()                                         idempotent, called by everything below
    import_ckpt(hf_dir, run_dir, dtype)             AutoBridge.import_ckpt
    export_ckpt(iter_dir, hf_reference_dir, out_dir) AutoBridge.export_ckpt
    lora_checkpoint(hf_dir, base_run_dir, run_dir, ...)   a PEFT training checkpoint
    merge(lora_run_dir, hf_dir, out_megatron, out_hf, base_run_dir)   Bridge's merges
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

_PATCHED = False
_TE_ONLY_FUSIONS = ("apply_rope_fusion", "moe_permute_fusion")


def _fail(msg: str):
    raise SystemExit(
        f"bridge_cpu: {msg}\n"
        "The Megatron-Bridge references need the pinned venv of e2e/bridge/requirements.txt "
        "(Python 3.11): `python3 -m venv V && V/bin/pip install --no-deps -r e2e/bridge/requirements.txt`, "
        "or run the repository's test command (its bridge_env step builds it)."
    )


# --------------------------------------------------------------------------------------------
# patches
# --------------------------------------------------------------------------------------------


class _TEStandIn(types.ModuleType):
    """Stand-in for ``transformer_engine`` / ``transformer_engine.pytorch`` while Bridge's LoRA
    modules are imported: they subclass ``te.Linear`` and name ``te.ops.*`` in signatures at
    import time.  Every attribute is a fresh dummy class, so no real module ever matches
    ``module.__class__ == te.Linear`` and LoRA takes its megatron-core path."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in ("pytorch", "ops"):
            sub = _TEStandIn(f"{self.__name__}.{name}")
            setattr(self, name, sub)
            return sub
        cls = type(name, (torch.nn.Module,), {})
        setattr(self, name, cls)
        return cls


class _LoraTEFinder:
    """Meta-path finder for Bridge's two LoRA modules: imports their other dependencies
    first, then runs the module body with the TransformerEngine stand-in in sys.modules, and
    removes it again."""

    TARGETS = ("megatron.bridge.peft.lora_layers", "megatron.bridge.peft.lora")

    def find_spec(self, name, path, target=None):
        if name not in self.TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                spec.loader = _LoraTELoader(spec.loader)
                return spec
        return None


class _LoraTELoader:
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        import ast
        import importlib

        for node in ast.parse(self.inner.get_source(module.__name__)).body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for n in names:
                if not n.startswith("transformer_engine"):
                    importlib.import_module(n)
        te = _TEStandIn("transformer_engine")
        sys.modules["transformer_engine"] = te
        sys.modules["transformer_engine.pytorch"] = te.pytorch
        try:
            self.inner.exec_module(module)
        finally:
            del sys.modules["transformer_engine"]
            del sys.modules["transformer_engine.pytorch"]


def patch() -> None:
    global _PATCHED
    if _PATCHED:
        return
    try:
        import megatron.core  # noqa: F401
        import transformers
    except ImportError as e:
        _fail(f"cannot import the reference stack ({e})")
    if not transformers.__version__.startswith("4."):
        _fail(f"transformers {transformers.__version__} found; Megatron-Bridge 0.3.1 needs 4.x")

    # (1) No CUDA: dist_checkpointing synchronizes around saves and allocates its small
    # collective buffers on current_device(); with gloo they must be CPU tensors.
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    # (2) Bridge's save_checkpoint collects the CUDA RNG state unconditionally, and
    # model_parallel_cuda_manual_seed reads/writes it: a constant 16-byte state, no-op set.
    torch.cuda.get_rng_state = lambda *a, **k: torch.zeros(16, dtype=torch.uint8)
    torch.cuda.set_rng_state = lambda *a, **k: None

    # (3) Tensor-parallel RNG tracker: fork() swaps CUDA generator states around every
    # init/dropout; on CPU a null context (weights are set explicitly, dropout is 0).
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()

    # (4) megatron-core's MoE router calls te_general_gemm, a name bound only when
    # TransformerEngine imports; None selects its torch path.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # (5) torch 2.15's TensorProperties carries `strides`, which megatron-core 0.16.1 passes
    # to torch.empty when it reads checkpoint metadata (non-default strictness).
    _patch_strides()

    # (6) Bridge's package init imports its LoRA layers (peft/lora_layers.py, peft/lora.py),
    # which import transformer_engine.pytorch at module level (they subclass te.Linear and
    # name te.ops in signatures).  Those two modules, and only they, get a stand-in module
    # while their bodies run; nothing else ever sees it (megatron-core decides at import
    # time whether TE is present, and must keep deciding "absent").
    try:
        import transformer_engine  # noqa: F401

        have_te = True
    except ImportError:
        have_te = False
    if not have_te:
        sys.meta_path.insert(0, _LoraTEFinder())
    import megatron.bridge  # noqa: F401  (the real package init)

    if not have_te:
        # (7) peft.utils / module_matcher derive HAVE_TE from names megatron-core defines even
        # without TE (MagicMock stand-ins); LoRA's transform then does isinstance(m, MagicMock).
        import megatron.bridge.peft.module_matcher as mm
        import megatron.bridge.peft.utils as pu

        for mod in (pu, mm):
            for k in list(vars(mod)):
                if k.startswith("HAVE_TE"):
                    setattr(mod, k, False)
        leaked = [n for n, m in list(sys.modules.items()) if isinstance(m, _TEStandIn)]
        if leaked:
            raise RuntimeError(f"bridge_cpu: TransformerEngine stand-in leaked into {leaked}")


    # (8) MegatronParamMapping.gather_from_ep_ranks parses the expert id after ".weight"
    # (grouped-GEMM names) even at EP=1; sequential experts (local spec) are named
    # local_experts.<e>.linear_fc1.weight.  At EP=1 the gather is the identity.
    from megatron.bridge.models.conversion import param_mapping as pm

    _orig_gather = pm.MegatronParamMapping.gather_from_ep_ranks

    def gather_from_ep_ranks(self, megatron_weights, megatron_module, hf_param_name):
        if self.ep_size == 1:
            return {str(hf_param_name): megatron_weights}
        return _orig_gather(self, megatron_weights, megatron_module, hf_param_name)

    pm.MegatronParamMapping.gather_from_ep_ranks = gather_from_ep_ranks

    # (9) No TransformerEngine: the GPT providers' default spec is the TE spec; use
    # megatron-core's local spec, whose sharded keys are the TE ones (fused-norm names).
    from megatron.bridge.models import gpt_provider

    gpt_provider.transformer_engine_layer_spec = gpt_provider.local_layer_spec

    # (10) Fusions that need TransformerEngine kernels (RoPE fusion, MoE permute fusion) are
    # refused by megatron-core's config check.  They only select forward kernels; the
    # providers keep their values (so run_config.yaml records what Bridge sets), and the
    # check runs with them off.
    from megatron.bridge.models import transformer_config as btc

    _orig_finalize = btc.TransformerConfig.finalize

    def finalize(self):
        saved = {k: getattr(self, k) for k in _TE_ONLY_FUSIONS if getattr(self, k, False)}
        for k in saved:
            setattr(self, k, False)
        try:
            _orig_finalize(self)
        finally:
            for k, v in saved.items():
                setattr(self, k, v)

    btc.TransformerConfig.finalize = finalize

    # (11) persist_layer_norm (set by Bridge's providers) picks a fused TE/Apex layer-norm
    # kernel; megatron-core's torch norm asserts it is off.  The norm is built from a copy of
    # the config with the flag off; the model's config keeps Bridge's value.
    import copy

    from megatron.core.transformer import torch_norm

    _orig_norm_new = torch_norm.WrappedTorchNorm.__new__

    def norm_new(cls, config, *args, **kwargs):
        if getattr(config, "persist_layer_norm", False):
            config = copy.copy(config)
            config.persist_layer_norm = False
        return _orig_norm_new(cls, config, *args, **kwargs)

    torch_norm.WrappedTorchNorm.__new__ = norm_new

    # (12) Determinism only: torch DCP stamps every save with random uuid4 ids
    # (StorageMeta.save_id / load_id in .metadata).  They are drawn from a seeded generator
    # instead, so the same inputs give the same bytes.  Readers must not depend on them.
    import random
    import uuid

    from torch.distributed.checkpoint import filesystem as dcp_fs

    _uuid_rng = random.Random(20240601)
    dcp_fs._generate_uuid = lambda: str(uuid.UUID(int=_uuid_rng.getrandbits(128), version=4))

    _PATCHED = True


def _patch_strides() -> None:
    import copy

    from megatron.core.dist_checkpointing.strategies import torch as mstorch

    cls = mstorch.TorchDistLoadShardedStrategy
    if getattr(cls, "_bridge_cpu_patched", False):
        return
    orig = cls.load_tensors_metadata

    def load_tensors_metadata(self, checkpoint_dir, metadata=None):
        if metadata is None:
            from torch.distributed.checkpoint import FileSystemReader

            metadata = FileSystemReader(checkpoint_dir).read_metadata()
        md = copy.copy(metadata)
        md.state_dict_metadata = {}
        for k, v in metadata.state_dict_metadata.items():
            props = getattr(v, "properties", None)
            if props is not None and "strides" in vars(props):
                v = copy.copy(v)
                v.properties = copy.copy(props)
                del v.properties.__dict__["strides"]
            md.state_dict_metadata[k] = v
        return orig(self, checkpoint_dir, md)

    cls.load_tensors_metadata = load_tensors_metadata
    cls._bridge_cpu_patched = True


# --------------------------------------------------------------------------------------------
# process group
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def world(seed: int = 1234):
    """A gloo world of size 1 with megatron-core's parallel state (TP=PP=EP=1)."""
    patch()
    from megatron.core import parallel_state as ps

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                                         world_size=1, rank=0)
    ps.initialize_model_parallel(1, 1)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed)
    try:
        yield
    finally:
        ps.destroy_model_parallel()
        torch.distributed.destroy_process_group()
