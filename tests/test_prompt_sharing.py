"""Shared-prompt rows (models.prompt_sharing): each response sees exactly its own prefix, and a
train step on packed rows equals the step on one row per response (single process, PP, TP, DP,
micro-batches that split a group)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ebpo_megatron.models import ModelConfig
from ebpo_megatron.models.prompt_sharing import pack_shared_prompts, resolve_share_prompts
from mp_utils import run_ranks
from test_policy_trainer import full_init

CFG = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                  num_kv_heads=2, vocab_size=60, max_position_embeddings=64)
# (prompt length, response lengths): groups of unequal size and length, one empty response
# (the last: an empty response whose prompt ends before the first response position of the others)
GROUPS = [(5, [4, 6, 1]), (7, [6, 0, 3, 5]), (4, [2]), (6, [5, 5]), (3, [0])]


def grouped_batch(seed: int = 3):
    """A PolicyBatch of the rows of GROUPS (rollout_batch.build_policy_batch's layout) with
    rollout log-probs away from the policy's, so that clipping and truncated IS act."""
    from ebpo_megatron.trainer.rollout_batch import build_policy_batch

    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for prompt_len, response_lens in GROUPS:
        prompt = torch.randint(0, CFG.vocab_size, (prompt_len,), generator=g).tolist()
        for n in response_lens:
            prompts.append(prompt)
            responses.append(torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist())
    logps = [(-3.0 - 0.3 * torch.rand(len(r), generator=g)).tolist() for r in responses]
    advantages = torch.randn(len(responses), generator=g)
    return build_policy_batch(prompts, responses, logps, advantages, pad_token_id=0)


def test_each_packed_response_sees_exactly_its_own_prefix():
    """For every row b and every position t that predicts a response token, the packed query the
    gather picks holds token t and attends to exactly the tokens 0 … t of row b, each at its
    own position shifted by one constant (RoPE sees position differences only)."""
    batch = grouped_batch()
    start = batch.response_start()
    assert start > int(batch.prompt_lengths.min()) - 1  # the empty response's prompt ends before it
    packed = pack_shared_prompts(batch.tokens, batch.lengths, batch.prompt_lengths, start)
    assert packed is not None and packed.tokens.shape[0] == len(GROUPS)
    checked = 0
    for b in range(batch.size):
        prompt, length = int(batch.prompt_lengths[b]), int(batch.lengths[b])
        for t in range(prompt - 1, length - 1):
            row, query = int(packed.gather.row[b, t - start]), int(packed.gather.position[b, t - start])
            visible = (~packed.attention_mask[row, 0, query]).nonzero().flatten().tolist()
            seen = [(int(packed.tokens[row, j]), int(packed.positions[row, j])) for j in visible]
            shift = int(packed.positions[row, query]) - t
            assert seen == [(int(batch.tokens[b, i]), i + shift) for i in range(t + 1)], (b, t)
            checked += 1
    assert checked == int(batch.loss_mask.sum()) == sum(sum(r) for _, r in GROUPS)


def test_padding_queries_see_only_themselves_and_distinct_prompts_are_not_packed():
    batch = grouped_batch()
    packed = pack_shared_prompts(batch.tokens, batch.lengths, batch.prompt_lengths, batch.response_start())
    keep = ~packed.attention_mask[:, 0]
    prompt_width = max(p for p, _ in GROUPS)
    response_width = max(n for _, r in GROUPS for n in r)
    assert packed.tokens.shape[1] == prompt_width + 4 * response_width  # the largest group has 4
    padding = packed.tokens.new_ones(packed.tokens.shape, dtype=torch.bool)
    for g, (prompt_len, response_lens) in enumerate(GROUPS):
        padding[g, prompt_width - prompt_len: prompt_width] = False
        for slot, n in enumerate(response_lens):
            first = prompt_width + slot * response_width
            padding[g, first: first + n] = False
    for g, i in padding.nonzero().tolist():
        assert keep[g, i].nonzero().flatten().tolist() == [i]
    for g in range(len(GROUPS)):  # no real query sees a padding key
        real = (~padding[g]).nonzero().flatten()
        assert not (keep[g][real][:, padding[g]]).any()
    single = batch.select(torch.tensor([0, 3, 7, 8, 10]))  # one row of each prompt
    assert pack_shared_prompts(single.tokens, single.lengths, single.prompt_lengths, 0) is None
    with pytest.raises(ValueError, match="start 5 lies past the first response position"):
        pack_shared_prompts(batch.tokens, batch.lengths, batch.prompt_lengths, 5)


def test_share_prompts_setting_is_resolved_against_the_model():
    """auto: on where the model can run packed rows; true where it cannot: an error naming why."""
    class OtherAttention(torch.nn.Module):
        pass

    layer = SimpleNamespace(self_attention=SimpleNamespace(core_attention=OtherAttention()))
    config = SimpleNamespace(sequence_parallel=False, context_parallel_size=1, multi_latent_attention=False)
    model = SimpleNamespace(config=config, position_embedding_type="rope", decoder=SimpleNamespace(layers=[layer]))
    assert resolve_share_prompts("auto", model) is False
    assert resolve_share_prompts(False, model) is False
    with pytest.raises(ValueError, match="train.step.share_prompts.*OtherAttention"):
        resolve_share_prompts(True, model)
    model.position_embedding_type = "learned_absolute"
    with pytest.raises(ValueError, match="learned_absolute"):
        resolve_share_prompts(True, model)


def _step(rank, world, tp, pp, micro, share):
    from megatron.core import parallel_state

    from ebpo_megatron.config.training import LossConfig, OptimConfig, StepConfig
    from ebpo_megatron.models import build_policy
    from ebpo_megatron.models import prompt_sharing
    from ebpo_megatron.models.weights import assign_full_weights, full_weights
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize
    from ebpo_megatron.trainer import policy_trainer
    from ebpo_megatron.trainer.policy_trainer import PolicyTrainer

    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    initialize(parallel, CFG)
    cpu_compat.set_seed(0)
    chunks = build_policy(CFG, parallel)
    shapes = {n: tuple(t.shape) for n, t in full_weights(chunks).items()}
    assign_full_weights(chunks, lambda n: full_init(n, shapes))
    trainer = PolicyTrainer(
        chunks, OptimConfig(lr=1e-3, adam_eps=1e-3, weight_decay=0.01, clip_grad=1.0),
        LossConfig(kl_coef=0.0, agg="token-mean", tis_cap=1.5, entropy_coef=0.01),
        StepConfig(micro_batch_size=micro, step_kl=True, old_logp="recompute", share_prompts=share))
    packed_rows = []
    pack = prompt_sharing.pack_shared_prompts

    def counting_pack(*args, **kwargs):
        packed = pack(*args, **kwargs)
        packed_rows.append(0 if packed is None else packed.tokens.shape[0])
        return packed

    policy_trainer.pack_shared_prompts = counting_pack
    batch = grouped_batch()
    if parallel_state.get_data_parallel_world_size() > 1:  # whole groups per rank: rows 0-6 | 7-10
        dp_rank = parallel_state.get_data_parallel_rank()
        batch = batch.select(slice(0, 7) if dp_rank == 0 else slice(7, 11))
    before = trainer.logprobs(batch)
    metrics = trainer.train_step(batch)
    return {"metrics": metrics, "weights": full_weights(trainer.chunks), "logp": before,
            "mask": batch.loss_mask, "packed_rows": packed_rows}


def run(world, tp, pp, micro, share):
    results = run_ranks(_step, world, tp, pp, micro, share)
    weights = {}
    for r in results:
        weights.update(r["weights"])
    return results, weights


@pytest.fixture(scope="module")
def plain():
    return run(1, 1, 1, 11, False)


@pytest.mark.parametrize("world,tp,pp,micro", [(1, 1, 1, 11), (1, 1, 1, 4), (2, 1, 2, 7), (2, 2, 1, 11),
                                               (2, 1, 1, 7)], ids=["single", "micro4", "PP2", "TP2", "DP2"])
def test_packed_step_equals_one_row_per_response(plain, world, tp, pp, micro):
    """Log-probs before the step, the step's metrics (loss, truncated IS against the rollout's
    log-probs, entropy bonus, step KL) and the updated weights equal the plain layout's; with micro-batches of 4
    the groups are split over micro-batches and still packed."""
    (reference,), ref_weights = plain
    results, weights = run(world, tp, pp, micro, True)
    assert not reference["packed_rows"]  # the plain run never packs
    last = [r for r in results if r["logp"] is not None]
    assert all(any(r["packed_rows"]) for r in results)
    if world == 1 or pp == 2 or tp == 2:
        got = last[0]["logp"]
        torch.testing.assert_close(got * reference["mask"], reference["logp"] * reference["mask"],
                                   atol=2e-5, rtol=0)
    metrics = last[0]["metrics"]
    for key in ("actor/loss", "actor/pg_loss", "actor/grad_norm", "actor/clip_frac", "actor/entropy",
                "actor/param_norm", "actor/step_kl", "rollout/logp_diff_mean", "rollout/logp_diff_max"):
        assert metrics[key] == pytest.approx(reference["metrics"][key], rel=1e-5, abs=1e-7), key
    assert reference["metrics"]["actor/step_kl"] > 0 and reference["metrics"]["rollout/logp_diff_mean"] > 0.1
    assert set(weights) == set(ref_weights)
    for name in ref_weights:
        torch.testing.assert_close(weights[name], ref_weights[name], atol=1e-5, rtol=0, msg=name)
