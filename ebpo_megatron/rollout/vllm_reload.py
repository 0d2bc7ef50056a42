"""Weight updates inside the in-process vLLM worker: the functions ``LLM.collective_rpc`` runs.

vLLM post-processes a layer's weights after loading them (``process_weights_after_loading``):
its CPU kernels repack every linear weight into a kernel-specific form and leave ``layer.weight``
empty, quantized models convert and rescale. A plain ``model.load_weights`` into a running model
therefore either fails (the empty CPU weight) or writes tensors that the kernels never read.
vLLM's layer-wise reload session does it properly, and a sync of many buckets must be *one*
session:

    begin_update_rpc   initialize_layerwise_reload(model): every layer back to its checkpoint form
    load_bucket_rpc    model.load_weights(bucket), once per bucket; a layer is processed (repacked)
                       as soon as all of its elements have arrived, whichever bucket brought them
    finish_update_rpc  finalize_layerwise_reload(model, model_config), then the checks below

A single vLLM ``reload_weights`` per bucket would process a layer whose q/k/v (or gate/up) are
split over two buckets with only part of them, and corrupt it.

After finalize:
- Tied modules are re-processed: vLLM processes a parameter shared by two modules only through
  the first (its documented limitation), so a tied ``lm_head`` would keep a kernel copy (CPU:
  the packed GEMM weight) of the *previous* embedding.
- The load accounting of the session is reported (``UpdateReport``): layers that received only
  part of their elements (q but not k, ...), which the session completes with uninitialized
  memory. Vocabulary layers are never "partial": vLLM pads their rows to a multiple of 64 and
  the padding rows are never loaded nor read; attention layers are processed at finalize.
  (A layer that received nothing keeps its previous weights; the engine finds those by the
  parameter names ``load_weights`` reports.)

Releases without the reload API (before layer-wise reloading) load with the model's plain
``load_weights`` (correct on GPUs, where linear weights are used as loaded); ``reload_api()``
tells which path the engine takes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch

RELOAD_MODULE = "vllm.model_executor.model_loader.reload"
LAYERWISE_MODULE = "vllm.model_executor.model_loader.reload.layerwise"


@dataclass
class UpdateReport:
    """What a reload session loaded, per vLLM layer (module name)."""

    partial: list[str] = field(default_factory=list)  # layers that received only part of their elements
    retied: list[str] = field(default_factory=list)  # tied modules re-processed after finalize


def reload_api() -> Any | None:
    """vLLM's layer-wise reload module, or None where the installed release has none."""
    try:
        module = importlib.import_module(RELOAD_MODULE)
    except ImportError:
        return None
    needed = ("initialize_layerwise_reload", "finalize_layerwise_reload")
    return module if all(hasattr(module, name) for name in needed) else None


def worker_model(worker: Any) -> torch.nn.Module:
    """The ``nn.Module`` a vLLM worker runs."""
    if hasattr(worker, "get_model"):
        return worker.get_model()
    return worker.model_runner.model


def begin_update_rpc(worker: Any) -> None:
    """Open a reload session: the next loads are buffered per layer and processed when complete."""
    reload_api().initialize_layerwise_reload(worker_model(worker))


def load_bucket_rpc(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> list[str] | None:
    """The model's own HF-name loader on one bucket; the vLLM parameter names it filled."""
    loaded = worker_model(worker).load_weights(weights)
    return None if loaded is None else sorted(loaded)


def finish_update_rpc(worker: Any) -> UpdateReport:
    """Close the session (module docstring): account, finalize, re-process tied modules."""
    model = worker_model(worker)
    report = _load_accounting(model)
    reload_api().finalize_layerwise_reload(model, worker.vllm_config.model_config)
    report.retied = _reprocess_tied_modules(model)
    return report


def parameter_names_rpc(worker: Any) -> list[str]:
    """Names of the vLLM model's parameters (tied ones once)."""
    return [name for name, _ in worker_model(worker).named_parameters()]


def _load_accounting(model: torch.nn.Module) -> UpdateReport:
    """Layers of the open session that received some but not all of their elements (complete
    layers were processed and left the session)."""
    layerwise = importlib.import_module(LAYERWISE_MODULE)
    from vllm.model_executor.layers.attention import is_deferred_attention_layer
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    report = UpdateReport()
    for name, module in model.named_modules():
        info = layerwise.LAYERWISE_INFO.get(module)
        if info is None or not info.can_load() or isinstance(module, VocabParallelEmbedding):
            continue
        if 0 < info.load_numel < (info.load_numel_total or 0) and not is_deferred_attention_layer(module):
            report.partial.append(name)
    return report


def _reprocess_tied_modules(model: torch.nn.Module) -> list[str]:
    """Run ``process_weights_after_loading`` again on every module whose parameters all belong
    to an earlier module (a tied lm_head); returns their names."""
    owner: dict[int, str] = {}
    retied = []
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if params and all(id(p) in owner for p in params):
            method = getattr(module, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(module)
            retied.append(name)
        for p in params:
            owner.setdefault(id(p), name)
    return retied
