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
    merge_megatron(lora_run_dir, hf_dir, out_dir)   examples/peft/merge_lora.py (v0.3.1)
    merge_hf(lora_run_dir, hf_dir, out_dir)          save_hf_pretrained(merge_adapter_weights=True)
    merge(lora_run_dir, hf_dir, out_megatron, out_hf)   both
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



def _fail(msg: str):
    raise SystemExit(
        f"bridge_cpu: {msg}\n"
        "The Megatron-Bridge references need the pinned venv of e2e/bridge/requirements.txt "
        "(Python 3.11): `python3 -m venv V && V/bin/pip install --no-deps -r e2e/bridge/requirements.txt`, "
        "then run with V/bin/python, or run the repository's test command (its bridge_env step "
        "builds it)."
    )


try:
    import torch  # noqa: E402
except ImportError as _e:
    _fail(f"cannot import torch ({_e})")

_PATCHED = False
_TE_ONLY_FUSIONS = ("apply_rope_fusion", "moe_permute_fusion")


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


def _without_fusions(init):
    def wrapped(self, *args, **kwargs):
        config = kwargs.get("config")
        if config is None:
            config = next((a for a in args if hasattr(a, "moe_permute_fusion")), None)
        saved = {k: getattr(config, k) for k in _TE_ONLY_FUSIONS if getattr(config, k, False)}
        for k in saved:
            setattr(config, k, False)
        try:
            init(self, *args, **kwargs)
        finally:
            for k, v in saved.items():
                setattr(config, k, v)

    return wrapped


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

    # MoE: the local backend has no TEGroupedMLP, and its grouped choice is the legacy
    # GroupedMLP (weight1/weight2, which Bridge 0.3.1 does not map), so experts are built as
    # SequentialMLP (local_experts.<e>.linear_fc1/2).  With Bridge's singleton_local_shards=False
    # both write the same DCP keys (mlp.experts.experts.linear_fc1.weight, expert axis
    # prepended).  The provider keeps moe_grouped_gemm as Bridge sets it (run_config.yaml).
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    # The local spec also renames pre_mlp_layernorm to mlp.linear_fc1.layer_norm_weight on MoE
    # layers, where the TE spec keeps a separate norm (pre_mlp_layernorm.weight: an MoE MLP
    # has no fused linear_fc1): for MoE layers only input_layernorm is renamed.
    def local_layer_spec(config):
        spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False,
                                        qk_layernorm=config.qk_layernorm,
                                        normalization=config.normalization)
        if config.num_moe_experts:
            spec.submodules.sharded_state_dict_keys_map = {
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
        return spec

    gpt_provider.transformer_engine_layer_spec = local_layer_spec

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

    # The MoE all-to-all dispatcher puts its permutation indices on "cuda" when
    # moe_permute_fusion is set; it is built with the flag off (restored afterwards).
    from megatron.core.transformer.moe import token_dispatcher as td

    for cls_name in ("MoEAlltoAllTokenDispatcher", "MoEAllGatherTokenDispatcher", "MoEFlexTokenDispatcher"):
        cls = getattr(td, cls_name, None)
        if cls is not None:
            cls.__init__ = _without_fusions(cls.__init__)
    # ... and it creates a class-wide CUDA stream for device-to-host copies on first use: a
    # placeholder (it is only used in the forward's CUDA path, never run here).
    if getattr(td.MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream", None) is None:
        td.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = "no CUDA stream on CPU"
    # Likewise the shared expert's overlap stream (moe_shared_expert_overlap, set by Bridge's
    # Nemotron-H provider).
    from megatron.core.transformer.moe import shared_experts

    if getattr(shared_experts.SharedExpertMLP, "stream", None) is None:
        shared_experts.SharedExpertMLP.stream = "no CUDA stream on CPU"

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

    _patch_hybrid()

    # (12) Determinism only: torch DCP stamps every save with random uuid4 ids
    # (StorageMeta.save_id / load_id in .metadata).  They are drawn from a seeded generator
    # instead, so the same inputs give the same bytes.  Readers must not depend on them.
    import random
    import uuid

    from torch.distributed.checkpoint import filesystem as dcp_fs

    _uuid_rng = random.Random(20240601)
    dcp_fs._generate_uuid = lambda: str(uuid.UUID(int=_uuid_rng.getrandbits(128), version=4))

    # (12b) Determinism only: megatron-core's writer saves with two threads and collects the
    # write results in completion order, so the key order of Metadata.storage_data varies from
    # run to run (same entries, same data files).  The results are put in (file, offset) order.
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    _orig_finish = fsa.FileSystemWriterAsync.finish

    def finish(self, metadata, results):
        results = [sorted(wl, key=lambda wr: (str(wr.storage_data.relative_path), wr.storage_data.offset))
                   for wl in results]
        return _orig_finish(self, metadata, results)

    fsa.FileSystemWriterAsync.finish = finish

    _PATCHED = True


class TorchGatedRMSNorm(torch.nn.Module):
    """Torch stand-in for mamba_ssm's gated, grouped RMSNorm (``layernorm_gated.RMSNorm``):
    same parameter (``weight`` [hidden]), same constructor; forward is the reference math
    (y = rmsnorm_per_group(x * silu(z)) * weight, norm_before_gate=False)."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True,
                 device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size or hidden_size
        self.norm_before_gate = norm_before_gate
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x, z=None):
        dtype = x.dtype
        x = x.float()
        if z is not None and not self.norm_before_gate:
            x = x * torch.nn.functional.silu(z.float())
        g = x.reshape(*x.shape[:-1], -1, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        y = g.reshape(x.shape) * self.weight.float()
        if z is not None and self.norm_before_gate:
            y = y * torch.nn.functional.silu(z.float())
        return y.to(dtype)


def _patch_hybrid() -> None:
    """Nemotron-H / hybrid (MambaModel) on CPU."""
    from megatron.core.ssm import mamba_block, mamba_mixer
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    # (14) mamba_ssm absent: megatron-core's ExtendedRMSNorm derives from a MagicMock and has
    # no parameter at all.  Use the torch gated RMSNorm with ExtendedRMSNorm's checkpoint
    # sharding (weight split on dim 0), so mixer.norm.weight exists like on GPU.
    if not getattr(mamba_mixer, "HAVE_MAMBA_SSM", True):
        class ExtendedRMSNorm(TorchGatedRMSNorm):
            def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
                from megatron.core import parallel_state

                if not hasattr(self, "tp_group"):
                    self.tp_group = parallel_state.get_tensor_model_parallel_group()
                state_dict = self.state_dict(prefix="", keep_vars=True)
                return make_sharded_tensors_for_checkpoint(
                    state_dict, prefix, {"weight": 0}, sharded_offsets, tp_group=self.tp_group,
                    dp_cp_group=metadata["dp_cp_group"])

        mamba_mixer.RMSNormGated = TorchGatedRMSNorm
        mamba_mixer.ExtendedRMSNorm = ExtendedRMSNorm
        # MambaMixer refuses to be built without mamba_ssm; its kernels are used only by the
        # forward, which these references never run (no torch scan is provided here).
        mamba_mixer.HAVE_MAMBA_SSM = True

    # (15) MambaStack builds its final norm with TENorm unconditionally: megatron-core's
    # torch RMSNorm with the same arguments (key decoder.final_norm.weight either way).
    mamba_block.TENorm = WrappedTorchNorm

    # (16) Bridge's Mamba provider defaults to megatron-core's TE hybrid spec: a local spec
    # whose checkpoint keys are the TE ones (fused-norm names for M, *, - layers; separate
    # pre_mlp_layernorm for E layers; sequential experts).
    from megatron.bridge.models.mamba import mamba_provider

    mamba_provider.transformer_engine_mamba_stack_spec = local_mamba_stack_spec

    # (17) Bridge's adapter wrapper reads ``tp_size`` from the wrapped Mamba in_proj to lay
    # out the in_proj adapter's checkpoint (z/x/B/C/dt split); TE linears have it, megatron-
    # core's ColumnParallelLinear does not.  Same value: the size of its TP group.
    from megatron.core.tensor_parallel import layers as tpl

    if not hasattr(tpl.ColumnParallelLinear, "tp_size"):
        tpl.ColumnParallelLinear.tp_size = property(
            lambda self: torch.distributed.get_world_size(self.tp_group)
            if getattr(self, "tp_group", None) is not None else 1)


def local_mamba_stack_spec():
    """megatron-core's mamba_stack_spec with local (non-TE) modules; see patch (16)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import (
        MoETransformerLayer,
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    moe = get_moe_module_spec(use_te=False, num_experts=8, moe_grouped_gemm=False)
    return ModuleSpec(
        module=MambaStack,
        submodules=MambaStackSubmodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    norm=WrappedTorchNorm,
                    mixer=ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(
                        in_proj=ColumnParallelLinear, out_proj=RowParallelLinear)),
                    mamba_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"},
                ),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=WrappedTorchNorm,
                    self_attention=ModuleSpec(
                        module=SelfAttention,
                        params={"attn_mask_type": AttnMaskType.causal},
                        submodules=SelfAttentionSubmodules(
                            linear_qkv=ColumnParallelLinear, core_attention=DotProductAttention,
                            linear_proj=RowParallelLinear),
                    ),
                    self_attn_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"},
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=WrappedTorchNorm,
                    mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                        linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
                    mlp_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
                ),
            ),
            moe_layer=ModuleSpec(
                module=MoETransformerLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=WrappedTorchNorm, mlp=moe, mlp_bda=get_bias_dropout_add),
            ),
        ),
    )


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
def world(seed: int = 1234, model_parallel: bool = True):
    """A gloo world of size 1 (what torchrun --nproc-per-node 1 gives a script), with
    megatron-core's parallel state (TP=PP=EP=1) unless the code run inside initialises it."""
    patch()
    from megatron.core import parallel_state as ps

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                                         world_size=1, rank=0)
    if model_parallel:
        ps.initialize_model_parallel(1, 1)
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    try:
        yield
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------
# import / export
# --------------------------------------------------------------------------------------------


def _dtype(d):
    if isinstance(d, torch.dtype):
        return d
    return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
            "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}[d]


def import_ckpt(hf_dir: str, run_dir: str, dtype="bfloat16", trust_remote_code: bool = False) -> None:
    """``AutoBridge.import_ckpt(hf_dir, run_dir, torch_dtype=dtype)``: writes run_dir/iter_0000000
    (and the tracker files) exactly as Bridge's save_megatron_model does."""
    patch()
    from megatron.bridge import AutoBridge

    with world():
        kw = {"trust_remote_code": True} if trust_remote_code else {}
        AutoBridge.import_ckpt(hf_dir, run_dir, torch_dtype=_dtype(dtype), **kw)


def export_ckpt(iter_dir: str, hf_reference_dir: str, out_dir: str, trust_remote_code: bool = False) -> None:
    """``AutoBridge.from_hf_pretrained(hf_reference_dir).export_ckpt(iter_dir, out_dir)``.
    export_ckpt opens its own temporary gloo world."""
    patch()
    from megatron.bridge import AutoBridge

    kw = {"trust_remote_code": True} if trust_remote_code else {}
    bridge = AutoBridge.from_hf_pretrained(hf_reference_dir, **kw)
    bridge.export_ckpt(iter_dir, out_dir, show_progress=False)


# --------------------------------------------------------------------------------------------
# LoRA: a PEFT training checkpoint, written by Bridge's save_checkpoint
# --------------------------------------------------------------------------------------------


def adapter_fill(name: str, shape, seed: int, scale: float = 0.05) -> torch.Tensor:
    """The value given to adapter parameter ``name`` (fp32; cast to the parameter's dtype):
    a pure function of (seed, name), independent of the order parameters are visited in."""
    import zlib

    g = torch.Generator().manual_seed((seed * 1000003 + zlib.crc32(name.encode())) % (2**63))
    return torch.randn(*shape, generator=g, dtype=torch.float32) * scale


def _recipes_package() -> None:
    """(13) ``megatron.bridge.recipes/__init__`` imports every recipe, VLM ones included, which
    need megatron-energon (not installed: not needed here).  Register the package without
    running that aggregator, so that ``recipes.common`` and ``recipes.utils`` import as usual."""
    if "megatron.bridge.recipes" in sys.modules:
        return
    import importlib.util

    import megatron.bridge

    spec = importlib.util.find_spec("megatron.bridge.recipes")
    pkg = types.ModuleType("megatron.bridge.recipes")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__file__ = spec.origin
    pkg.__package__ = "megatron.bridge.recipes"
    pkg.__spec__ = spec
    sys.modules["megatron.bridge.recipes"] = pkg
    megatron.bridge.recipes = pkg


def peft_config_container(hf_dir: str, base_run_dir: str, run_dir: str, peft, trust_remote_code: bool = False):
    """A ConfigContainer as Bridge's PEFT recipes build it (recipes.common._peft_common plus the
    per-model settings of e.g. qwen3_600m_peft_config), for the tiny model at ``hf_dir``."""
    from megatron.bridge import AutoBridge

    _recipes_package()
    from megatron.bridge.recipes.common import _peft_common

    cfg = _peft_common()
    kw = {"trust_remote_code": True} if trust_remote_code else {}
    cfg.model = AutoBridge.from_hf_pretrained(hf_dir, **kw).to_megatron_provider(load_weights=False)
    cfg.tokenizer.tokenizer_model = hf_dir
    cfg.model.tensor_model_parallel_size = 1
    cfg.model.pipeline_model_parallel_size = 1
    cfg.model.pipeline_model_parallel_layout = None
    cfg.model.pipeline_dtype = None
    cfg.model.virtual_pipeline_model_parallel_size = None
    cfg.model.context_parallel_size = 1
    cfg.model.sequence_parallel = False
    cfg.model.seq_length = 64
    cfg.peft = peft
    cfg.train.global_batch_size = 8
    cfg.train.micro_batch_size = 1
    cfg.train.train_iters = 100
    cfg.dataset.seq_length = 64
    cfg.checkpoint.save = run_dir
    cfg.checkpoint.load = run_dir
    cfg.checkpoint.pretrained_checkpoint = base_run_dir
    cfg.checkpoint.save_interval = 50
    cfg.logger.tensorboard_dir = None
    cfg.ddp.use_distributed_optimizer = False
    return cfg


def make_peft(scheme: str, dim: int, alpha: int, target_modules=None):
    """Bridge's own LoRA / CanonicalLoRA config objects."""
    patch()
    if scheme == "lora":
        from megatron.bridge.peft.lora import LoRA

        kw = {} if target_modules is None else {"target_modules": list(target_modules)}
        return LoRA(dim=dim, alpha=alpha, **kw)
    if scheme == "canonical_lora":
        from megatron.bridge.peft.canonical_lora import CanonicalLoRA

        kw = {} if target_modules is None else {"target_modules": list(target_modules)}
        return CanonicalLoRA(dim=dim, alpha=alpha, **kw)
    raise ValueError(f"unknown PEFT scheme {scheme!r} (lora | canonical_lora)")


def lora_checkpoint(hf_dir: str, base_run_dir: str, run_dir: str, *, scheme: str = "lora",
                    dim: int = 8, alpha: int = 16, target_modules=None, seed: int = 7,
                    step: int = 50, provider_overrides=None, trust_remote_code: bool = False) -> dict:
    """A Megatron-Bridge LoRA training checkpoint, made the way Bridge's finetune() makes one:

    ConfigContainer from the PEFT recipe template, ``cfg.validate()``, the tokenizer built from
    ``cfg.tokenizer`` (vocab check as in training.setup), Bridge's PEFT pre-wrap hook (loads
    ``checkpoint.pretrained_checkpoint`` = ``base_run_dir`` with Bridge's checkpoint loader,
    applies the PEFT transform, records ``params_to_save``), the model built by
    ``provide_distributed_model`` (Float16Module mixed-precision wrapper; no DDP wrapper: its
    CUDA stream cannot be made on CPU), then the adapter weights set to seeded values
    (``adapter_fill``: a function of seed and parameter name) in place of training, and
    ``training.checkpointing.save_checkpoint`` at ``step`` with no optimizer.
    Returns {parameter name: tensor} of the adapter weights as set."""
    patch()
    from megatron.bridge.training.checkpointing import init_checkpointing_context, save_checkpoint
    from megatron.bridge.training.setup import _create_peft_pre_wrap_hook, _validate_and_set_vocab_size
    from megatron.bridge.training.state import GlobalState
    from megatron.bridge.training.tokenizers.tokenizer import build_tokenizer

    _seed_host_rngs(seed)
    with world(seed):
        peft = make_peft(scheme, dim, alpha, target_modules)
        cfg = peft_config_container(hf_dir, base_run_dir, run_dir, peft, trust_remote_code)
        for k, v in (provider_overrides or {}).items():
            setattr(cfg.model, k, v)
        cfg.validate()
        state = GlobalState()
        state.cfg = cfg
        tokenizer = build_tokenizer(cfg.tokenizer)
        cfg.model.vocab_size, cfg.model.should_pad_vocab = _validate_and_set_vocab_size(
            cfg.model.vocab_size, tokenizer.vocab_size)
        cfg.dataset.tokenizer = tokenizer
        cfg.model.register_pre_wrap_hook(_create_peft_pre_wrap_hook(cfg, state))
        model = cfg.model.provide_distributed_model(ddp_config=cfg.ddp, wrap_with_ddp=False,
                                                    use_cpu_initialization=True)
        adapters = {}
        with torch.no_grad():
            for name, p in model[0].named_parameters():
                if p.requires_grad:
                    name = name[len("module."):] if name.startswith("module.") else name
                    p.copy_(adapter_fill(name, p.shape, seed).to(p.dtype))
                    adapters[name] = p.detach().clone()
        if not adapters:
            raise RuntimeError("the PEFT transform produced no trainable parameter")
        state.train_state.step = step
        _seed_host_rngs(seed)  # the rng_state item of the checkpoint records these
        save_checkpoint(state, model, None, None, 0,
                        checkpointing_context=init_checkpointing_context(cfg.checkpoint))
    return adapters


def _seed_host_rngs(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# merges
# --------------------------------------------------------------------------------------------


def _upstream_merge_lora():
    """examples/peft/merge_lora.py of Megatron-Bridge v0.3.1, vendored unchanged under
    upstream/ (the wheel does not ship examples)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "upstream", "merge_lora_v0_3_1.py")
    spec = importlib.util.spec_from_file_location("bridge_merge_lora_v0_3_1", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def merge_megatron(lora_run_dir: str, hf_dir: str, out_dir: str, base_run_dir: str | None = None) -> None:
    """Bridge 0.3.1's examples/peft/merge_lora.py ``merge_lora``: base from
    ``checkpoint.pretrained_checkpoint`` of the LoRA run_config.yaml (or ``base_run_dir``), the
    PEFT structure from its ``peft:`` section (LoRA class unless VLMLoRA), adapters loaded with
    dist_checkpointing, ``LoRAMerge`` (in the parameter dtype: W + alpha/dim * (B @ A)),
    ``save_megatron_model`` into ``out_dir``."""
    patch()
    from pathlib import Path

    up = _upstream_merge_lora()
    lora_dir = Path(_latest_iter(lora_run_dir))
    base = up._resolve_pretrained(lora_dir, base_run_dir)
    with world(model_parallel=False):
        up.merge_lora(base_dir=base, lora_dir=lora_dir, out_dir=Path(out_dir), hf_model_path=hf_dir)


def merge_hf(lora_run_dir: str, hf_dir: str, out_dir: str, base_run_dir: str | None = None,
             trust_remote_code: bool = False) -> None:
    """Bridge's HF export with merged adapters (``save_hf_pretrained(merge_adapter_weights=True)``,
    the peft_bridge path): the model is built as merge_lora.py builds it (base Megatron
    checkpoint, the PEFT class and settings of the run's ``peft:`` section, adapters loaded
    from the LoRA checkpoint), then exported; each HF tensor gets LoRAMerge.merge of its own
    slice of the adapter."""
    patch()
    from megatron.core import dist_checkpointing
    from megatron.bridge import AutoBridge
    from megatron.bridge.training.checkpointing import (
        _generate_model_state_dict,
        apply_peft_adapter_filter_to_state_dict,
    )
    from megatron.bridge.training.utils.checkpoint_utils import read_run_config

    lora_dir = _latest_iter(lora_run_dir)
    run_cfg = read_run_config(os.path.join(lora_dir, "run_config.yaml"))
    base = base_run_dir or run_cfg["checkpoint"]["pretrained_checkpoint"]
    pc = run_cfg["peft"]
    scheme = "canonical_lora" if pc["_target_"].endswith("CanonicalLoRA") else "lora"
    with world():
        kw = {"trust_remote_code": True} if trust_remote_code else {}
        bridge = AutoBridge.from_hf_pretrained(hf_dir, **kw)
        model = bridge.load_megatron_model(base, wrap_with_ddp=False)
        peft = make_peft(scheme, pc["dim"], pc["alpha"], pc["target_modules"])
        model = peft(model, training=False)
        sd = apply_peft_adapter_filter_to_state_dict(_generate_model_state_dict(model, {}), peft)
        loaded = dist_checkpointing.load(sd, lora_dir)
        model[0].load_state_dict(loaded["model"], strict=False)
        bridge.save_hf_pretrained(model, out_dir, show_progress=False, merge_adapter_weights=True)


def merge(lora_run_dir: str, hf_dir: str, out_megatron: str | None, out_hf: str | None,
          base_run_dir: str | None = None, trust_remote_code: bool = False) -> None:
    """Both of Bridge 0.3.1's merges of a LoRA run (either output may be None)."""
    if out_megatron:
        merge_megatron(lora_run_dir, hf_dir, out_megatron, base_run_dir)
    if out_hf:
        merge_hf(lora_run_dir, hf_dir, out_hf, base_run_dir, trust_remote_code)


def _latest_iter(run_dir: str) -> str:
    if os.path.basename(os.path.normpath(run_dir)).startswith("iter_"):
        return run_dir
    with open(os.path.join(run_dir, "latest_checkpointed_iteration.txt")) as f:
        return os.path.join(run_dir, "iter_{:07d}".format(int(f.read().strip())))
