"""One PPO/EBPO train step under TP, PP, DP and micro-batching equals the single-process step."""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch

from ebpo_megatron.models import ModelConfig
from mp_utils import run_ranks

CFG = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                  num_kv_heads=2, vocab_size=60, max_position_embeddings=32)
BATCH, WIDTH = 8, 12


def fixed_batch():
    from ebpo_megatron.trainer.batching import PolicyBatch

    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, CFG.vocab_size, (BATCH, WIDTH), generator=g)
    lengths = torch.randint(7, WIDTH + 1, (BATCH,), generator=g)
    mask = torch.zeros(BATCH, WIDTH - 1)
    for b in range(BATCH):
        mask[b, 3: int(lengths[b]) - 1] = 1.0
    advantages = torch.randn(BATCH, generator=g)
    old_logp = -3.0 - 0.3 * torch.rand(BATCH, WIDTH - 1, generator=g)  # ratios away from 1: clipping active
    return PolicyBatch(tokens, lengths, mask, advantages, old_logp=old_logp)


def full_init(name: str, shape_hint: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    shape = shape_hint[name]
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return 0.05 * torch.randn(shape, generator=g)


def _step(rank, world, tp, pp, micro, agg, shapes, recompute="none", old_logp="given", prompt_logits=False,
          precision="fp32"):
    from megatron.core import parallel_state

    from ebpo_megatron.models import build_policy
    from ebpo_megatron.models.weights import assign_full_weights, full_weights
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize
    from ebpo_megatron.config.training import LossConfig, OptimConfig, StepConfig
    from ebpo_megatron.trainer.policy_trainer import PolicyTrainer

    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    cfg = dataclasses.replace(CFG, recompute=recompute, precision=precision)
    initialize(parallel, cfg)
    cpu_compat.set_seed(0)
    chunks = build_policy(cfg, parallel)
    if shapes is None:  # shape discovery run (single process)
        return {n: tuple(t.shape) for n, t in full_weights(chunks).items()}
    assign_full_weights(chunks, lambda n: full_init(n, shapes))
    recomputed = old_logp.startswith("recompute")  # π_old = π_θ; the batch's old_logp: π_rollout
    trainer = PolicyTrainer(
        chunks, OptimConfig(lr=1e-3, adam_eps=1e-3, weight_decay=0.01, clip_grad=1.0),
        LossConfig(kl_coef=0.0, agg=agg, tis_cap=1.5 if recomputed else None),
        StepConfig(micro_batch_size=micro, step_kl=recomputed,
                   old_logp="rollout" if old_logp == "rollout" else "recompute"),
    )
    trainer.skip_prompt_logits = not prompt_logits
    batch = fixed_batch()
    if old_logp == "rollout" or recomputed:  # the same π_old, arriving as the engine's sampling log-probs
        batch = dataclasses.replace(batch, old_logp=None, rollout_logp=batch.old_logp)
    if old_logp == "recompute-separately":  # a forward pass of its own before the step
        batch = batch.with_logps(old_logp=trainer.logprobs(batch))
    dp = parallel_state.get_data_parallel_world_size()
    share = BATCH // dp
    mine = batch.select(slice(parallel_state.get_data_parallel_rank() * share,
                              (parallel_state.get_data_parallel_rank() + 1) * share))
    metrics = trainer.train_step(mine)
    return {"metrics": metrics, "weights": full_weights(trainer.chunks)}


def run_layout(shapes, world, tp, pp, micro, agg="token-mean", recompute="none", old_logp="given",
               prompt_logits=False, precision="fp32"):
    results = run_ranks(_step, world, tp, pp, micro, agg, shapes, recompute, old_logp, prompt_logits, precision)
    weights = {}
    for r in results:
        weights.update(r["weights"])
    return results[0]["metrics"], weights


@pytest.fixture(scope="module")
def shapes():
    return run_ranks(_step, 1, 1, 1, 4, "token-mean", None)[0]


@pytest.fixture(scope="module")
def single(shapes):
    return {agg: run_layout(shapes, 1, 1, 1, 8, agg) for agg in ("token-mean", "seq-mean-token-mean")}


def assert_same(reference, other):
    ref_metrics, ref_w = reference
    metrics, w = other
    assert set(w) == set(ref_w)
    for key in ("actor/loss", "actor/pg_loss", "actor/grad_norm", "actor/clip_frac", "actor/entropy",
                "actor/param_norm"):
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5, abs=1e-7), key
    assert ref_metrics["actor/clip_frac"] > 0  # the clipped branch is exercised
    for name in ref_w:
        assert torch.allclose(w[name], ref_w[name], atol=1e-5, rtol=0), name


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_four_micro_batches_equal_one(shapes, single, agg):
    assert_same(single[agg], run_layout(shapes, 1, 1, 1, 2, agg))


@pytest.mark.parametrize("world,tp,pp", [(2, 2, 1), (2, 1, 2), (2, 1, 1), (4, 2, 2)],
                         ids=["TP2", "PP2", "DP2", "TP2xPP2"])
def test_parallel_layouts_equal_single_process(shapes, single, world, tp, pp):
    assert_same(single["token-mean"], run_layout(shapes, world, tp, pp, 2))


def test_weights_move_and_updates_differ_from_init(single):
    metrics, weights = single["token-mean"]
    shapes = {n: tuple(t.shape) for n, t in weights.items()}
    moved = max(float((weights[n] - full_init(n, shapes)).abs().max()) for n in weights)
    assert 1e-4 < moved < 1e-2  # one Adam step of lr 1e-3
    norm = sum(float(w.double().pow(2).sum()) for w in weights.values()) ** 0.5  # float64, updated weights
    assert metrics["actor/param_norm"] == pytest.approx(norm, rel=1e-7)


def test_bf16_step_stays_within_bf16_rounding_of_the_fp32_step(shapes, single):
    """precision bf16: bf16 weights and activations, fp32 main parameters and Adam state in the
    distributed optimizer (Megatron's mixed-precision path, as on a GPU), from the same weights
    and batch as the fp32 step: the same step up to bf16's rounding (8 significant bits)."""
    metrics, weights = run_layout(shapes, 1, 1, 1, 8, precision="bf16")
    ref_metrics, ref_weights = single["token-mean"]
    for key in ("actor/loss", "actor/pg_loss", "actor/entropy", "actor/param_norm"):
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=2e-2), key
    assert metrics["actor/grad_norm"] == pytest.approx(ref_metrics["actor/grad_norm"], rel=5e-2)
    # every weight bf16, the norms' too (as Megatron's Float16Module makes them on a GPU)
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    for name, weight in weights.items():
        initial = full_init(name, shapes)
        step = ref_weights[name] - initial  # the fp32 step's update (Adam, lr 1e-3)
        start = initial.to(weight.dtype).float()  # where the bf16 run started: the rounded weights
        rounding = (start - initial).norm()
        # the bf16 weights are the fp32 main parameters rounded: at most the two roundings (start,
        # end) away from the fp32 step's weights, plus a little of the step (bf16 gradients)
        assert (weight.float() - ref_weights[name]).norm() <= 2 * rounding + 0.1 * step.norm(), name
        taken = weight.float() - start
        if "layernorm" in name and taken.norm() == 0:
            continue  # norm weights start at 1.0, where a step of ~1e-3 is below bf16's resolution
        # the update they took points the fp32 step's way
        assert float((taken * step).sum() / (taken.norm() * step.norm())) > 0.95, name


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_activation_recomputation_gives_the_same_step(shapes, single, recompute):
    assert_same(single["token-mean"], run_layout(shapes, 1, 1, 1, 8, "token-mean", recompute))


def test_old_logp_from_the_rollout_equals_the_given_old_logp(shapes, single):
    """``train.step.old_logp: rollout`` takes π_old from the engine's log-probs, no extra pass."""
    metrics, weights = run_layout(shapes, 1, 1, 1, 8, old_logp="rollout")
    assert_same(single["token-mean"], (metrics, weights))
    assert "rollout/logp_diff_mean" not in metrics


def test_logits_on_prompt_positions_change_nothing(shapes, single):
    """The trainer skips the output layer before the first response position
    (``PolicyBatch.response_start`` = 3 here); computing all positions gives the same step."""
    assert_same(single["token-mean"], run_layout(shapes, 1, 1, 1, 8, prompt_logits=True))


@pytest.mark.parametrize("world,tp,pp", [(1, 1, 1), (2, 1, 2), (2, 1, 1)], ids=["single", "PP2", "DP2"])
def test_on_policy_old_logp_from_the_update_equals_a_separate_forward(shapes, world, tp, pp):
    """``old_logp: recompute`` in an on-policy step takes π_old from the update's own forward,
    detached: the same step, truncated-IS weights, rollout-mismatch metrics and step KL as with
    π_old from a forward pass of its own (in 4 micro-batches, under PP and DP too)."""
    separate = run_layout(shapes, 1, 1, 1, 8, old_logp="recompute-separately")
    metrics, weights = run_layout(shapes, world, tp, pp, 2, old_logp="recompute")
    for key in ("actor/loss", "actor/pg_loss", "actor/grad_norm", "actor/entropy", "actor/param_norm",
                "actor/step_kl", "rollout/logp_diff_mean", "rollout/logp_diff_max"):
        assert metrics[key] == pytest.approx(separate[0][key], rel=1e-5, abs=1e-7), key
    assert separate[0]["rollout/logp_diff_mean"] > 0.1 and separate[0]["actor/step_kl"] > 0
    for name in weights:
        assert torch.allclose(weights[name], separate[1][name], atol=1e-5, rtol=0), name


class _Group:
    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size


def test_single_rank_bucket_collectives_are_skipped_only_when_they_are_identities():
    """megatron_patches patch D: a one-rank group's reduce-scatter / all-gather of a bucket onto
    itself returns without calling the backend; every other call goes through. (DP2 above runs
    the real collectives and equals the single process, which skips them.)"""
    from ebpo_megatron.parallel.megatron_patches import _identity_on_one_rank

    calls = []
    collective = _identity_on_one_rank(lambda out, inp, **kw: calls.append((out, inp, kw)) or "work")
    bucket, other = torch.arange(8.0), torch.zeros(8)
    assert collective(bucket[:], bucket, group=_Group(1)) is None  # the shard is the whole bucket
    assert calls == []
    assert collective(other, bucket, group=_Group(1)) == "work"  # different memory
    assert collective(bucket[:4], bucket, group=_Group(1)) == "work"  # a part of the bucket
    assert collective(bucket[:4], bucket, group=_Group(2)) == "work"  # a real shard
    assert collective(bucket, bucket, group=_Group(1), async_op=True) == "work"  # a handle is awaited
    assert len(calls) == 4 and calls[-1][2]["async_op"] is True
    assert torch.equal(bucket, torch.arange(8.0))


ENTROPY_COEF, TEMPERATURE = 0.05, 0.8


def _entropy_bonus_step(rank, world, tp, shapes):
    """A step whose loss includes −c·agg(H) at T ≠ 1, in two micro-batches; on one rank also a
    plain-torch reference of its loss, entropy and gradient norm, from the same weights before
    the step: full-vocabulary log_softmax of the model's logits, autograd."""
    from ebpo_megatron.algorithms.losses import aggregate, policy_loss
    from ebpo_megatron.models import build_policy
    from ebpo_megatron.models.weights import assign_full_weights
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize
    from ebpo_megatron.config.training import LossConfig, OptimConfig, StepConfig
    from ebpo_megatron.trainer.policy_trainer import PolicyTrainer

    parallel = ParallelConfig(tensor_parallel=tp)
    initialize(parallel, CFG)
    cpu_compat.set_seed(0)
    chunks = build_policy(CFG, parallel)
    assign_full_weights(chunks, lambda n: full_init(n, shapes))
    loss_cfg = LossConfig(kl_coef=0.0, entropy_coef=ENTROPY_COEF)
    batch = fixed_batch()
    reference = None
    if world == 1:
        params = [p for p in chunks[0].parameters() if p.requires_grad]
        positions = torch.arange(WIDTH).unsqueeze(0).expand(BATCH, -1)
        logits = chunks[0](batch.tokens, positions, None)[:, :-1, : CFG.vocab_size] / TEMPERATURE
        logp_all = torch.log_softmax(logits.double(), -1)
        logp = logp_all.gather(-1, batch.tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        mask = batch.loss_mask.double()
        totals = {"total_tokens": float(mask.sum()), "total_seqs": float(BATCH)}
        pg_loss, _ = policy_loss(logp, batch.old_logp.double(), batch.advantages.double(), mask,
                                 clip_low=loss_cfg.clip_low, clip_high=loss_cfg.clip_high, agg=loss_cfg.agg,
                                 **totals)
        loss = pg_loss - ENTROPY_COEF * aggregate(entropy, mask, loss_cfg.agg, **totals)
        grads = torch.autograd.grad(loss, params)
        reference = {"actor/loss": float(loss), "actor/entropy": float((entropy * mask).sum() / mask.sum()),
                     "actor/grad_norm": float(sum(g.double().pow(2).sum() for g in grads).sqrt())}
    trainer = PolicyTrainer(chunks, OptimConfig(lr=1e-3), loss_cfg,
                            StepConfig(micro_batch_size=BATCH // 2, temperature=TEMPERATURE, step_kl=False))
    return {"metrics": trainer.train_step(batch), "reference": reference}


def test_entropy_bonus_step_equals_plain_torch_reference(shapes):
    """``entropy_coef > 0``: H is a loss term computed from the same log Z as log π
    (``vocab_parallel_logprobs_and_entropy``); loss, entropy and gradient norm equal the float64
    plain-torch reference, for TP = 1 and TP = 2."""
    single = run_ranks(_entropy_bonus_step, 1, 1, shapes)[0]
    reference = single["reference"]
    tp2 = run_ranks(_entropy_bonus_step, 2, 2, shapes)[0]
    for metrics in (single["metrics"], tp2["metrics"]):
        for key, value in reference.items():
            assert metrics[key] == pytest.approx(value, rel=1e-5), key
    without = reference["actor/loss"] + ENTROPY_COEF * reference["actor/entropy"]
    assert abs(without - reference["actor/loss"]) > 1e-3  # the entropy term is not negligible
