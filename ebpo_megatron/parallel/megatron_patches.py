"""Every monkeypatch of Megatron-Core, switched on in one place: :func:`apply_megatron_patches`.

``parallel.initialize`` calls it before it creates any process group, so every run path, the
evaluation, the converters, the benchmarks and the tests have the patches before they build a
model; later calls do nothing. The patches replace private names of Megatron-Core and were
written for :data:`SUPPORTED_MEGATRON_CORE` (file:line below are megatron-core 0.16.1's); another
release is refused with a RuntimeError (:func:`check_megatron_version`) unless the environment
sets ``EBPO_ALLOW_UNTESTED_MEGATRON=1``, which turns the error into a warning.

Global patches (whole process, installed in this order):

A. **Megatron on the CPU** (:func:`_run_megatron_on_cpu`), only when CUDA is absent
   (``cpu_compat.cuda_absent``); on a GPU machine none of A is installed. tests/test_cpu_compat.py
   covers it. All inside Megatron-Core, never in ``torch`` itself:

   1. *CUDA call sites.* The Megatron modules listed in :data:`CUDA_CALL_SITES` (schedules,
      pipeline p2p, DDP buffers, optimizer, grad clipping, RoPE, static KV cache, TP gathers,
      dist-checkpoint save) see, as their module-global name ``torch``, a thin proxy of ``torch``
      in which ``torch.cuda.current_device()`` is the CPU device, ``torch.cuda.synchronize()`` a
      no-op, and tensor factories (``torch.zeros(..., device="cuda")`` and friends) build on the
      CPU. Every other attribute is the real one, and code outside those modules is untouched.
   2. *Tensor methods.* A few Megatron functions compare the argument-less ``Tensor.type()`` with
      ``'torch.cuda.FloatTensor'`` (distrib_optimizer.py:361/420/582, optimizer.py:671/690,
      clip_grads.py:167) or call ``Tensor.cuda()`` (language_module.py:244, the tied embedding
      of the last pipeline stage). Only while one of them runs, a CPU tensor passes for a CUDA
      one: ``.type()`` reports the ``torch.cuda.*`` name and ``.cuda()`` returns the tensor
      (:func:`_cpu_passes_for_cuda`).
   3. *Optimizer state gather.* ``DistributedOptimizer.get_parameter_state_dp_zero`` moves its
      send buffer with ``.cuda()`` unless it gathers over the gloo group
      (distrib_optimizer.py:1089); on CPU every group is gloo, so it is always asked to
      (``use_gloo_comm=True``).
   4. *RNG state for activation recomputation.* ``_get_cuda_rng_state`` / ``_set_cuda_rng_state``
      (tensor_parallel/random.py:41/72), saved and restored around each recomputed block, act on
      the CPU generator.

   Not covered (not on this project's paths): CPU offloading of optimizer state
   (optimizer.py:375), ``tensor_parallel.broadcast_data`` (data.py:84), the fully parallel
   *load* exchange (exchange_utils.py:336/499), CUDA graphs, MoE, FSDP.
B. **RoPE** (:func:`_route_rope_through_ours`): ``Attention.forward`` (attention.py:1097/1110)
   calls its module-global ``apply_rotary_pos_emb``; it becomes ``parallel.rope.apply_rotary_pos_emb``
   (standard RoPE without Megatron's ``torch.cat``; every other case is Megatron's function).
C. **Loading the distributed optimizer with torch's AdamW** (no Transformer Engine / apex;
   :func:`_load_only_checkpointed_optimizer_states`, tests/test_checkpoint.py):
   ``DistributedOptimizer._set_main_param_and_optimizer_states`` (distrib_optimizer.py:936-940)
   copies every key of the destination state, including torch AdamW's ``step``, which the fully
   reshardable checkpoint does not hold (it restores ``step`` from the param groups): KeyError.
D. **Single-rank bucket collectives** (:func:`_skip_single_rank_bucket_collectives`,
   tests/test_policy_trainer.py): with one rank in the distributed optimizer's group, that rank's
   shard of a DDP bucket is the whole bucket, so the gradient reduce-scatter
   (param_and_grad_buffer.py:443) and the parameter all-gather (param_and_grad_buffer.py:285) map
   a buffer onto itself; the backends still run them (gloo copies the buffer: ~3% of a CPU train
   step of a 26M model).

Per object (plain functions, called where the object is made; nothing global):

* :func:`unshare_adam_steps` (here): after ``DistributedOptimizer.load_state_dict`` every
  parameter shares *one* ``step`` tensor (distrib_optimizer.py:817-822); called by
  ``trainer.checkpoint.load_checkpoint``.
* ``cpu_compat.adapt_layer_spec``: without CUDA the local layer spec's core attention is SDPA.
* ``cpu_compat.set_seed``: without CUDA, seeds a tracker of CPU generator states and makes it
  Megatron's RNG tracker, as ``model_parallel_cuda_manual_seed`` does with its own on a GPU.
* ``models.builder.layer_spec``: Megatron subclasses put in the layer spec
  (``models.no_grad_linear``, ``models.rotated_key_cache``).
* ``models.swiglu_mlp.use_swiglu_mlp``: a built model's ``MLP`` modules become ``SwiGLUMLP``
  (after the build, not in the spec: ``TransformerLayer`` recognizes ``MLP`` by identity).

These build on Megatron 0.16 internals too; the version check stands for them as well.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any

import torch

from .cpu_compat import cuda_absent

#: Megatron-Core releases the patches were written for (version prefixes).
SUPPORTED_MEGATRON_CORE: tuple[str, ...] = ("0.16.",)
#: The release the test suite ran on: what a mismatch asks to install.
TESTED_MEGATRON_CORE = "0.16.1"
#: Set to "1" to run an untested Megatron-Core release anyway (a warning instead of the error).
ALLOW_UNTESTED_ENV = "EBPO_ALLOW_UNTESTED_MEGATRON"

#: Megatron-Core modules whose global ``torch`` becomes the CPU proxy (patch A.1), and why.
CUDA_CALL_SITES: dict[str, str] = {
    "megatron.core.pipeline_parallel.schedules": "zeros(device='cuda') token counters (schedules.py:596/983/2138)",
    "megatron.core.pipeline_parallel.p2p_communication": "PP buffers on current_device, synchronize (p2p_communication.py:190-398)",
    "megatron.core.distributed.param_and_grad_buffer": "DDP buffers on current_device (param_and_grad_buffer.py:783/800/806)",
    "megatron.core.optimizer.optimizer": "tensor(device='cuda') scalars (optimizer.py:473/481/485/907/1141)",
    "megatron.core.optimizer.distrib_optimizer": "state buffers on current_device (distrib_optimizer.py:791/1077)",
    "megatron.core.optimizer.clip_grads": "zeros/tensor(device='cuda') (clip_grads.py:90/103/115/174/207)",
    "megatron.core.optimizer.grad_scaler": "loss scale tensors (grad_scaler.py:15/88-94)",
    "megatron.core.utils": "GlobalMemoryBuffer and l2-norm tensors (utils.py:631/1207)",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "inv_freq moved to current_device (rotary_pos_embedding.py:162)",
    "megatron.core.models.gpt.gpt_model": "static-batch decode offsets (gpt_model.py:415)",
    "megatron.core.transformer.attention": "static KV cache on current_device (attention.py:430)",
    "megatron.core.tensor_parallel.mappings": "TP gather/scatter buffers (mappings.py:91/141/148/181/442)",
    "megatron.core.tensor_parallel.layers": "sequence-parallel gather buffers (layers.py:552/597/607)",
    "megatron.core.tensor_parallel.data": "broadcast_data buffers (data.py:37/86)",
    "megatron.core.tensor_parallel.utils": "split/gather buffers (tensor_parallel/utils.py:70/91)",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "synchronize before writing (filesystem_async.py:230)",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "failure flags on current_device (state_dict_saver.py:204/252)",
    "megatron.core.dist_checkpointing.strategies.async_utils": "liveness flags (async_utils.py:165/212/604)",
    "megatron.core.dist_checkpointing.strategies.fully_parallel": "synchronize (fully_parallel.py:272/281)",
    "megatron.core.dist_checkpointing.exchange_utils": "empty_like(device='cuda') (exchange_utils.py:104/110/326)",
}

_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "zeros_like",
              "ones_like", "empty_like", "full_like", "rand", "randn", "randint")
_applied = False


# ---------------------------------------------------------------- version check
def installed_megatron_core() -> str:
    """The installed megatron-core version (package metadata; for a source checkout on the
    path, ``megatron.core.package_info``)."""
    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        from megatron.core.package_info import __version__

        return __version__


def check_megatron_version() -> str:
    """The installed megatron-core version, if it is one of :data:`SUPPORTED_MEGATRON_CORE`.

    Otherwise a RuntimeError naming the installed and the supported versions and the two ways
    on; with ``EBPO_ALLOW_UNTESTED_MEGATRON=1`` a RuntimeWarning with the same text instead.
    """
    installed = installed_megatron_core()
    if installed.startswith(SUPPORTED_MEGATRON_CORE):
        return installed
    supported = ", ".join(prefix + "x" for prefix in SUPPORTED_MEGATRON_CORE)
    message = (
        f"megatron-core {installed} is installed, but ebpo_megatron patches private Megatron-Core "
        f"functions (ebpo_megatron/parallel/megatron_patches.py) written for megatron-core "
        f"{supported}, which change between releases. Install the tested version "
        f"(pip install megatron-core=={TESTED_MEGATRON_CORE}), or set {ALLOW_UNTESTED_ENV}=1 to "
        f"try {installed} anyway."
    )
    if os.environ.get(ALLOW_UNTESTED_ENV) != "1":
        raise RuntimeError(message)
    warnings.warn(f"{message} ({ALLOW_UNTESTED_ENV}=1: trying it)", RuntimeWarning, stacklevel=2)
    return installed


# ---------------------------------------------------------------- the one switch
def apply_megatron_patches() -> None:
    """Check the Megatron-Core version (:func:`check_megatron_version`), then install the global
    patches A-D of the module docstring; once per process (later calls do nothing)."""
    global _applied
    if _applied:
        return
    check_megatron_version()
    if cuda_absent():
        _run_megatron_on_cpu()
    _route_rope_through_ours()
    _load_only_checkpointed_optimizer_states()
    _skip_single_rank_bucket_collectives()
    _applied = True


# ---------------------------------------------------------------- A: Megatron on the CPU
def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def build(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return build


class _CpuCuda:
    """``torch.cuda`` as the patched Megatron modules see it."""

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(*_: Any, **__: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _CpuTorch:
    """``torch`` as the patched Megatron modules see it: CUDA placements land on the CPU."""

    cuda = _CpuCuda()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


for _name in _FACTORIES:
    setattr(_CpuTorch, _name, staticmethod(_on_cpu(getattr(torch, _name))))
_CPU_TORCH = _CpuTorch()


@contextlib.contextmanager
def _cpu_passes_for_cuda() -> Iterator[None]:
    """While active, ``cpu_tensor.type()`` (no arguments) reports ``torch.cuda.<Type>`` and
    ``cpu_tensor.cuda()`` returns the tensor itself."""
    original_type, original_cuda = torch.Tensor.type, torch.Tensor.cuda

    def type_name(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = original_type(self, *args, **kwargs)
        if args or kwargs or self.device.type != "cpu" or name.startswith("torch.cuda."):
            return name
        return "torch.cuda." + name[len("torch."):]

    def to_cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self if self.device.type == "cpu" else original_cuda(self, *args, **kwargs)

    torch.Tensor.type, torch.Tensor.cuda = type_name, to_cuda  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = original_type, original_cuda  # type: ignore[method-assign]


def _run_with_cpu_as_cuda(owner: Any, attr: str) -> None:
    """Wrap ``owner.attr`` (function, method, static- or classmethod) in :func:`_cpu_passes_for_cuda`."""
    raw = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
    kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
    fn = raw.__func__ if kind else raw

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _cpu_passes_for_cuda():
            return fn(*args, **kwargs)

    setattr(owner, attr, kind(wrapped) if kind else wrapped)


def _run_megatron_on_cpu() -> None:
    """Patches A.1-A.4 (module docstring)."""
    for module_name in CUDA_CALL_SITES:  # A.1
        importlib.import_module(module_name).torch = _CPU_TORCH

    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.tensor_parallel import random as megatron_random

    _run_with_cpu_as_cuda(distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups")  # A.2
    _run_with_cpu_as_cuda(distrib_optimizer.DistributedOptimizer, "__init__")
    _run_with_cpu_as_cuda(optimizer.Float16OptimizerWithFloat16Params, "__init__")
    _run_with_cpu_as_cuda(clip_grads, "clip_grad_by_total_norm_fp32")
    optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32  # imported by name
    _run_with_cpu_as_cuda(LanguageModule, "setup_embeddings_and_output_layer")

    gather = distrib_optimizer.DistributedOptimizer.get_parameter_state_dp_zero  # A.3

    @functools.wraps(gather)
    def gather_over_gloo(self: Any, use_gloo_comm: bool = True, *args: Any, **kwargs: Any) -> Any:
        return gather(self, True, *args, **kwargs)

    distrib_optimizer.DistributedOptimizer.get_parameter_state_dp_zero = gather_over_gloo

    megatron_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()  # A.4
    megatron_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


# ---------------------------------------------------------------- B: RoPE
def _route_rope_through_ours() -> None:
    """Patch B: Megatron's attention (``megatron.core.transformer.attention``) applies RoPE
    through :func:`.rope.apply_rotary_pos_emb`."""
    from megatron.core.transformer import attention

    from .rope import apply_rotary_pos_emb

    attention.apply_rotary_pos_emb = apply_rotary_pos_emb


# ---------------------------------------------------------------- C: optimizer states on load
def _load_only_checkpointed_optimizer_states() -> None:
    """Patch C: ``_set_main_param_and_optimizer_states`` copies the keys the checkpoint has,
    under ``torch.no_grad()`` (the main params are views of parameters that require grad)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self: Any, model_param: torch.nn.Parameter, tensors: dict[str, torch.Tensor]) -> None:
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destination = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            for key, tensor in destination.items():
                if key in tensors:
                    tensor.copy_(tensors[key])

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


# ---------------------------------------------------------------- D: single-rank collectives
def _identity_on_one_rank(collective: Callable[..., Any]) -> Callable[..., Any]:
    """``collective(output, input, group=..., async_op=...)`` that returns at once when the
    group has one rank and ``output`` and ``input`` are the same memory (then it is the identity
    for a gather and for a SUM or AVG reduce-scatter). Asynchronous calls are left alone: their
    handle is waited on."""

    @functools.wraps(collective)
    def call(output: torch.Tensor, input: torch.Tensor, *args: Any, group: Any = None,
             async_op: bool = False, **kwargs: Any) -> Any:
        same_memory = output.data_ptr() == input.data_ptr() and output.numel() == input.numel()
        if not async_op and group is not None and group.size() == 1 and same_memory:
            return None
        return collective(output, input, *args, group=group, async_op=async_op, **kwargs)

    return call


def _skip_single_rank_bucket_collectives() -> None:
    """Patch D: the DDP buffers' ``dist_all_gather_func`` / ``dist_reduce_scatter_func`` skip
    the calls that are identities (:func:`_identity_on_one_rank`)."""
    from megatron.core.distributed import param_and_grad_buffer as buffers

    buffers.dist_all_gather_func = _identity_on_one_rank(buffers.dist_all_gather_func)
    buffers.dist_reduce_scatter_func = _identity_on_one_rank(buffers.dist_reduce_scatter_func)


# ---------------------------------------------------------------- per object
def unshare_adam_steps(optimizer: Any) -> None:
    """One ``step`` tensor per parameter after ``optimizer.load_state_dict``.

    Megatron's distributed optimizer gives every parameter *one shared* ``step`` tensor on load
    (distrib_optimizer.py:817-822); torch's in-place ``step += 1`` then advances it once per
    parameter and Adam's bias correction silently drifts on resume (tests/test_checkpoint.py).
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].detach().clone()
