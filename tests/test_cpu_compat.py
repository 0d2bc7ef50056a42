"""Megatron on the CPU (patch A of ``parallel.megatron_patches``, ``parallel.cpu_compat``): scope
of the redirects, SDPA core attention against an explicit softmax reference (training, KV-cache
decode, chunked prefill, padding masks), CPU seeding, and Megatron's DDP + distributed optimizer +
grad clipping + schedules + dist-checkpointing (DP=2) and pipeline schedule (PP=2) on gloo, each
against a plain-torch reference."""

from __future__ import annotations

import math

import pytest
import torch
from mp_utils import run_ranks

from ebpo_megatron.models import ModelConfig

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is active only without CUDA")

TINY = ModelConfig(family="llama", num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                   num_kv_heads=2, vocab_size=128, max_position_embeddings=32)


# ---------------------------------------------------------------- scope of the redirects
def _scope(rank: int, world: int) -> dict:
    import importlib

    from megatron.core.pipeline_parallel import schedules

    from ebpo_megatron.parallel import megatron_patches

    zeros, ones_type = torch.zeros, torch.ones(1).type()
    megatron_patches.apply_megatron_patches()
    modules = [importlib.import_module(name) for name in megatron_patches.CUDA_CALL_SITES]
    cpu = torch.ones(1)
    with megatron_patches._cpu_passes_for_cuda():
        inside = (cpu.type(), torch.ones(1, dtype=torch.bfloat16).type(), cpu.type(torch.float64).dtype,
                  cpu.cuda() is cpu)
        with megatron_patches._cpu_passes_for_cuda():  # nested
            nested = cpu.type()
    outside = {}
    for name, call in (("current_device", torch.cuda.current_device), ("tensor_cuda", cpu.cuda)):
        try:
            call()
            outside[name] = "worked"
        except (AssertionError, RuntimeError):
            outside[name] = "raises"
    return {
        "all_patched": all(m.torch is megatron_patches._CPU_TORCH for m in modules),
        "proxy_device": str(schedules.torch.cuda.current_device()),
        "proxy_zeros": str(schedules.torch.zeros(2, device="cuda").device),
        "proxy_tensor": str(schedules.torch.tensor([1.0], device=torch.device("cuda")).device),
        "proxy_passthrough": schedules.torch.float32 is torch.float32 and schedules.torch.Tensor is torch.Tensor,
        "global_zeros_untouched": torch.zeros is zeros,
        "outside": outside,
        "type_outside": (ones_type, torch.ones(1).type()),
        "type_inside": inside, "type_nested": nested,
    }


def test_cpu_patches_reach_only_megatron_call_sites() -> None:
    out = run_ranks(_scope, 1)[0]
    assert out["all_patched"]
    assert out["proxy_device"] == out["proxy_zeros"] == out["proxy_tensor"] == "cpu"
    assert out["proxy_passthrough"] and out["global_zeros_untouched"]
    assert out["outside"] == {"current_device": "raises", "tensor_cuda": "raises"}  # torch itself is untouched
    assert out["type_outside"] == ("torch.FloatTensor", "torch.FloatTensor")
    assert out["type_inside"] == ("torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor", torch.float64, True)
    assert out["type_nested"] == "torch.cuda.FloatTensor"


def _with_cuda_reported(rank: int, world: int) -> dict:
    torch.cuda.is_available = lambda: True  # as on a GPU machine
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from ebpo_megatron.parallel import cpu_compat, megatron_patches

    spec = cpu_compat.adapt_layer_spec(get_gpt_layer_local_spec(normalization="RMSNorm"))
    megatron_patches.apply_megatron_patches()
    return {"schedules_torch_is_torch": schedules.torch is torch,
            "use_cpu_init": cpu_compat.use_cpu_initialization(),
            "core_attention_kept": spec.submodules.self_attention.submodules.core_attention is DotProductAttention}


def test_nothing_changes_when_cuda_is_available() -> None:
    out = run_ranks(_with_cuda_reported, 1)[0]
    assert out == {"schedules_torch_is_torch": True, "use_cpu_init": False,
                   "core_attention_kept": True}


# ---------------------------------------------------------------- SDPA core attention
def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """float64 softmax(q k^T / sqrt(d) masked) v; Megatron layout in and out; rows with no key -> 0."""
    q, k, v = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))  # [b, n, s, d]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~keep, float("-inf"))
    weights = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    out = weights @ v
    return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)


class _AttentionConfig:
    attention_dropout = 0.0


def test_sdpa_core_attention_training_decode_chunked_and_padding() -> None:
    from megatron.core.transformer.enums import AttnMaskType

    from ebpo_megatron.parallel.cpu_compat import SDPACoreAttention

    attention = SDPACoreAttention(_AttentionConfig(), 1, AttnMaskType.causal, "self").eval()
    g = torch.Generator().manual_seed(0)
    s, b, heads, groups, d = 7, 2, 4, 2, 8
    q = torch.randn(s, b, heads, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(s, b, groups, d, generator=g, dtype=torch.float64) for _ in range(2))
    causal = torch.ones(s, s, dtype=torch.bool).tril()

    def check(got: torch.Tensor, want: torch.Tensor) -> None:
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)

    # training / prefill: causal, s_q = s_k
    check(attention(q, k, v), reference_attention(q, k, v, causal))
    # decode: 1 query against all cached keys, mask type no_mask (as Megatron passes it)
    last = attention(q[-1:], k, v, attn_mask_type=AttnMaskType.no_mask)
    check(last, reference_attention(q[-1:], k, v, torch.ones(1, s, dtype=torch.bool)))
    # ... which top-left causal alignment (is_causal=True) would get wrong: the trap
    trap = reference_attention(q[-1:], k, v, causal[:1])
    assert (trap - last).abs().max() > 0.1
    # chunked prefill: the last 3 queries, causal, bottom-right aligned
    check(attention(q[-3:], k, v, attn_mask_type=AttnMaskType.causal), reference_attention(q[-3:], k, v, causal[-3:]))
    # explicit mask (True = masked out): left padding of 2 in sequence 0 -> its pad queries see nothing
    pad = torch.zeros(b, s, dtype=torch.bool)
    pad[0, :2] = True
    masked = ~causal[None, None] | pad[:, None, None, :]
    got = attention(q, k, v, attention_mask=masked)
    check(got, reference_attention(q, k, v, ~masked))
    assert torch.isfinite(got).all() and got[:2, 0].abs().max() == 0
    # decode with the padding mask the native engine passes ([b, 1, 1, s_k], grouped products);
    # a sequence whose keys are all masked gets 0
    step_mask = pad[:, None, None, :].clone()
    check(attention(q[-1:], k, v, attention_mask=step_mask), reference_attention(q[-1:], k, v, ~step_mask))
    step_mask[1] = True
    blind = attention(q[-1:], k, v, attention_mask=step_mask)
    check(blind, reference_attention(q[-1:], k, v, ~step_mask))
    assert blind[:, 1].abs().max() == 0


def test_sdpa_core_attention_backward_matches_reference() -> None:
    from megatron.core.transformer.enums import AttnMaskType

    from ebpo_megatron.parallel.cpu_compat import SDPACoreAttention

    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, 1, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 1, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)  # MQA
    v = torch.randn(5, 1, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 1, 32, generator=g, dtype=torch.float64)
    attention = SDPACoreAttention(_AttentionConfig(), 1, AttnMaskType.causal, "self")
    got = torch.autograd.grad((attention(q, k, v) * w).sum(), (q, k, v))
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    want = torch.autograd.grad((reference_attention(q, k, v, causal) * w).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_sdpa_core_attention_computes_bf16_in_float32() -> None:
    """bf16 q, k, v: the output is the float32 attention of the same (bf16) values rounded once
    to bf16, and gradients come back in bf16 (the float64 reference, not the bf16 kernels)."""
    from megatron.core.transformer.enums import AttnMaskType

    from ebpo_megatron.parallel.cpu_compat import SDPACoreAttention

    g = torch.Generator().manual_seed(2)
    q = torch.randn(6, 2, 4, 8, generator=g).bfloat16().requires_grad_()
    k = torch.randn(6, 2, 2, 8, generator=g).bfloat16().requires_grad_()
    v = torch.randn(6, 2, 2, 8, generator=g).bfloat16().requires_grad_()
    attention = SDPACoreAttention(_AttentionConfig(), 1, AttnMaskType.causal, "self")
    got = attention(q, k, v)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    want = reference_attention(q.double(), k.double(), v.double(), causal)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want.bfloat16().double(), atol=0, rtol=2**-7)
    decode = attention(q[-1:], k, v, attn_mask_type=AttnMaskType.no_mask)
    want_decode = reference_attention(q[-1:].double(), k.double(), v.double(), torch.ones(1, 6, dtype=torch.bool))
    torch.testing.assert_close(decode.double(), want_decode.bfloat16().double(), atol=0, rtol=2**-7)
    got.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))


# ---------------------------------------------------------------- seeding
def _seeding(rank: int, world: int) -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize

    initialize(ParallelConfig(tensor_parallel=2), TINY)
    cpu_compat.set_seed(7)
    tracker = get_cuda_rng_tracker()
    default_before = torch.rand(3)
    with tracker.fork():  # model-parallel-rng: seed + 2718 + tp_rank
        forked = torch.rand(3)
    default_after = torch.rand(3)
    with tracker.fork():  # continues its own stream
        forked_next = torch.rand(3)
    cpu_compat.set_seed(7)
    repeat = torch.rand(3)
    return {"tracker": type(tracker).__name__, "default": torch.cat([default_before, default_after]),
            "forked": torch.cat([forked, forked_next]), "repeat": repeat}


def test_set_seed_tracks_megatron_streams_on_the_cpu_generator() -> None:
    out = run_ranks(_seeding, 2)
    for rank, r in enumerate(out):
        assert r["tracker"] == "CpuRNGStatesTracker"
        default = torch.Generator().manual_seed(7)
        torch.testing.assert_close(r["default"], torch.rand(6, generator=default), atol=0, rtol=0)  # fork restores it
        stream = torch.Generator().manual_seed(7 + 2718 + rank)
        torch.testing.assert_close(r["forked"], torch.rand(6, generator=stream), atol=0, rtol=0)
        torch.testing.assert_close(r["repeat"], r["default"][:3], atol=0, rtol=0)
    assert not torch.equal(out[0]["forked"], out[1]["forked"])  # TP ranks differ inside TP regions
    assert torch.equal(out[0]["default"], out[1]["default"])  # and agree outside


# ---------------------------------------------------------------- DDP + distributed optimizer (DP=2)
SEQ, MBS, GLOBAL = 16, 2, 8
# Adam's first step is lr·g/(|g| + eps): with eps = 1e-8 the fp32 round-off of tiny gradients
# (summed in another order over DP) moves weights by ~6e-4·lr; eps = 1e-4 keeps the comparison sharp.
ADAM_EPS = 1e-4


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, TINY.vocab_size, (GLOBAL, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    per_token = model(tokens, torch.arange(SEQ).expand_as(tokens), None, labels=labels)

    def loss_func(output: torch.Tensor):
        loss = output.float().mean()  # token mean of the micro-batch
        # clone: the schedule divides the returned loss in place (schedules.py:268-269)
        return loss, {"loss": loss.detach().clone()}

    return per_token, loss_func


def _dp_training(rank: int, world: int, workdir: str) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ebpo_megatron.models import build_policy
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize

    initialize(ParallelConfig(), TINY)
    cpu_compat.set_seed(0)
    model = build_policy(TINY, ParallelConfig())[0]
    cpu_compat.set_seed(0)
    reference = build_policy(TINY, ParallelConfig())[0]  # same initial weights, plain torch training
    same_init = all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))

    ddp = DistributedDataParallel(
        config=model.config, module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, clip_grad=0.05, adam_eps=ADAM_EPS,
                        use_distributed_optimizer=True),
        [ddp])
    model.config.finalize_model_grads_func = finalize_model_grads
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=ADAM_EPS, weight_decay=0.0)

    norms = []
    per_rank = GLOBAL // world
    for step in range(2):
        tokens, labels = _batch(step)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        micro = [(tokens[mine][i:i + MBS], labels[mine][i:i + MBS]) for i in range(0, per_rank, MBS)]
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(forward_step_func=_forward_step, data_iterator=iter(micro), model=[ddp],
                                    num_microbatches=len(micro), seq_length=SEQ, micro_batch_size=MBS,
                                    forward_only=False)
        ok, grad_norm, _ = optimizer.step()

        ref_optimizer.zero_grad()
        loss = sum(reference(tokens[i:i + MBS], torch.arange(SEQ).expand(MBS, SEQ), None,
                             labels=labels[i:i + MBS]).mean() for i in range(0, GLOBAL, MBS)) / (GLOBAL // MBS)
        loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        ref_optimizer.step()
        norms.append((ok, float(grad_norm), float(ref_norm)))
    weight_diff = max(float((a - b).abs().max()) for a, b in zip(model.parameters(), reference.parameters()))
    cpu_compat.set_seed(0)
    initial = build_policy(TINY, ParallelConfig())[0]
    moved = max(float((a - b).abs().max()) for a, b in zip(model.parameters(), initial.parameters()))

    # dist-checkpointing: model + distributed optimizer (fully reshardable), then the model back
    state = {"model": model.sharded_state_dict()}
    state["optimizer"] = optimizer.sharded_state_dict(
        state["model"], metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    dist_checkpointing.save(state, workdir)
    cpu_compat.set_seed(123)
    fresh = build_policy(TINY, ParallelConfig())[0]
    fresh.load_state_dict(dist_checkpointing.load({"model": fresh.sharded_state_dict()}, workdir)["model"])
    load_diff = max(float((a - b).abs().max()) for a, b in zip(model.parameters(), fresh.parameters()))
    return {"same_init": same_init, "norms": norms, "weight_diff": weight_diff, "moved": moved,
            "load_diff": load_diff}


def test_ddp_distributed_optimizer_and_checkpoint_on_gloo_equal_plain_adamw(tmp_path) -> None:
    (tmp_path / "ckpt").mkdir()
    out = run_ranks(_dp_training, 2, str(tmp_path / "ckpt"))
    for r in out:
        assert r["same_init"]
        for ok, norm, ref_norm in r["norms"]:
            assert ok and ref_norm > 0.05  # clipping is active
            assert abs(norm - ref_norm) < 1e-5 * ref_norm
        assert r["moved"] > 1e-3  # training changed the weights...
        assert r["weight_diff"] < 1e-7  # ...exactly as plain torch AdamW on the full batch
        assert r["load_diff"] == 0.0


# ---------------------------------------------------------------- pipeline schedule (PP=2)
def _pp_gradients(rank: int, world: int, tied: bool) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from test_models import reference_forward

    from ebpo_megatron.models import build_policy
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize

    cfg = ModelConfig(**{**vars(TINY), "tie_word_embeddings": tied})
    layout = ParallelConfig(pipeline_parallel=2)
    initialize(layout, cfg)
    cpu_compat.set_seed(0)
    stage = build_policy(cfg, layout)[0]  # tied: the last stage's output layer is synced at build
    offset = parallel_state.get_pipeline_model_parallel_rank() * (cfg.num_layers // 2)

    def global_name(name: str) -> str:
        if name.startswith("decoder.layers."):
            index, rest = name[len("decoder.layers."):].split(".", 1)
            return f"decoder.layers.{int(index) + offset}.{rest}"
        return name

    tokens, labels = _batch(0)
    micro = [(tokens[i:i + MBS], labels[i:i + MBS]) for i in range(0, 2 * MBS, MBS)]
    losses = get_forward_backward_func()(forward_step_func=_forward_step, data_iterator=iter(micro), model=[stage],
                                         num_microbatches=2, seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
    grads = {global_name(n): p.grad.double() for n, p in stage.named_parameters()}

    # float64 plain-torch reference from all stages' weights (a tied output layer is the embedding)
    shards = [None] * world
    mine = {global_name(n): p.detach().double() for n, p in stage.named_parameters()}
    dist.all_gather_object(shards, mine)
    tied_copy_equal = not tied or torch.equal(shards[0]["embedding.word_embeddings.weight"],
                                              shards[-1]["output_layer.weight"])
    full = {k: v.clone().requires_grad_(True) for shard in shards for k, v in shard.items()
            if not (tied and k == "output_layer.weight")}
    ref_loss = sum(torch.nn.functional.cross_entropy(reference_forward(full, cfg, t).flatten(0, 1), y.flatten())
                   for t, y in micro) / len(micro)
    ref_grads = dict(zip(full, torch.autograd.grad(ref_loss, list(full.values()))))
    untied = {n: g for n, g in grads.items() if n in ref_grads and not (tied and n == "embedding.word_embeddings.weight")}
    grad_diff = max(float((g - ref_grads[n]).abs().max()) for n, g in untied.items())
    grad_scale = max(float(g.abs().max()) for g in untied.values())
    stage_loss = sum(float(x["loss"]) for x in losses) / len(micro) if losses else None
    return {"names": sorted(grads), "grad_diff": grad_diff, "grad_scale": grad_scale, "tied_copy_equal": tied_copy_equal,
            "loss": stage_loss, "ref_loss": float(ref_loss)}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_pipeline_parallel_2_schedule_gradients_equal_float64_reference(tied: bool) -> None:
    first, last = run_ranks(_pp_gradients, 2, tied)
    assert "embedding.word_embeddings.weight" in first["names"] and "decoder.layers.0.mlp.linear_fc1.weight" in first["names"]
    assert "output_layer.weight" in last["names"] and "decoder.layers.1.mlp.linear_fc1.weight" in last["names"]
    assert first["loss"] is None and abs(last["loss"] - last["ref_loss"]) < 1e-5
    assert first["tied_copy_equal"]
    for r in (first, last):
        assert r["grad_scale"] > 1e-3 and r["grad_diff"] < 1e-6, r
