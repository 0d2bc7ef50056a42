"""Native rollout engine: sampling from the Megatron-Core GPTModel itself with a static KV cache.

P prompts are left-padded to the longest one, L_p. Prefill runs the P padded prompts once with a
[P, 1, L_p, L_p] mask (causal, and padding keys masked); the KV cache of each prompt and its
last logits are then copied to its n samples (the G responses of a group share their prompt), so
prefill costs P, not P·n, sequences. Each decode step feeds one token per sequence of the
B = P·n with a [B, 1, 1, L_p + t] mask that hides the padding keys. RoPE only sees position
differences, so the per-sequence shift that left padding introduces changes nothing: the logits
equal those of an unpadded forward. When no prompt of a batch is padded, no mask is passed at all
(the prefill is then causal by the attention's mask type, a decode step attends to every cached
key), which spares SDPA a mask per layer. A group is never split across batches of
``max_batch_size``. A bf16 model on a CPU multiplies by oneDNN-prepacked copies of its weights,
made once per ``generate`` (``models.prepacked_linear``).

TP: logits are gathered over the vocabulary shards (``runtime_gather_output``) and every TP
rank draws from an identically seeded generator, so all ranks sample the same tokens. The
generator lives on the CPU and the model's device does the rest (tokens, masks, cache), so a
seed gives the same draws on any device.
PP > 1 is not supported by this engine (a clear error); vLLM is the engine for large models.
"""

from __future__ import annotations

import time
from typing import Iterable

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from ..models.prepacked_linear import prepacked_weights
from .base import RolloutBatch, RolloutEngine, SamplingParams
from .sampling import sample_tokens


class NativeEngine(RolloutEngine):
    """Generates with the policy's own GPTModel (shared with the trainer: no weight copy)."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int, max_sequence_length: int,
                 max_batch_size: int = 256) -> None:
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError(
                "rollout.engine 'native' supports pipeline_parallel = 1 only; "
                "use rollout.engine: vllm for pipeline-parallel models"
            )
        self.model = model
        self.vocab_size = getattr(model, "real_vocab_size", None)  # logits past it are padding
        self.pad_token_id = pad_token_id
        self.max_sequence_length = max_sequence_length
        self.max_batch_size = max_batch_size

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to copy: this engine samples from the training model's own parameters."""
        for _ in named_tensors:
            pass

    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> RolloutBatch:
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids: expected at least one prompt")
        for i, prompt in enumerate(prompt_token_ids):
            if not prompt:
                raise ValueError(f"prompt_token_ids[{i}]: empty prompt")
            if len(prompt) + params.max_new_tokens > self.max_sequence_length:
                raise ValueError(
                    f"prompt_token_ids[{i}]: {len(prompt)} prompt tokens + max_new_tokens "
                    f"{params.max_new_tokens} exceed the context of {self.max_sequence_length} tokens"
                )
        start = time.perf_counter()
        prompts = [p for p in prompt_token_ids for _ in range(params.n)]
        groups_per_batch = max(1, self.max_batch_size // params.n)
        results: list[tuple[list[int], list[float], str]] = []
        with prepacked_weights(self.model, rows=min(len(prompts), groups_per_batch * params.n)):
            for first in range(0, len(prompt_token_ids), groups_per_batch):
                chunk = prompt_token_ids[first: first + groups_per_batch]
                generator = torch.Generator().manual_seed(params.seed + first * params.n)
                results.extend(self._generate_chunk(chunk, params, generator))
        seconds = time.perf_counter() - start
        new_tokens = sum(len(r[0]) for r in results)
        return RolloutBatch(
            prompt_ids=prompts,
            response_ids=[r[0] for r in results],
            logprobs=[r[1] for r in results],
            finish_reasons=[r[2] for r in results],
            group_ids=torch.arange(len(prompt_token_ids)).repeat_interleave(params.n),
            stats={"rollout/seconds": seconds, "rollout/tokens_per_s": new_tokens / max(seconds, 1e-9)},
        )

    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams,
                        generator: torch.Generator) -> list[tuple[list[int], list[float], str]]:
        """Samples ``params.n`` responses for each of ``prompts`` (module docstring)."""
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        n = params.n
        batch = len(prompts) * n
        prompt_len = max(len(p) for p in prompts)
        tokens = torch.full((len(prompts), prompt_len), self.pad_token_id, dtype=torch.long)
        prompt_pad = torch.ones((len(prompts), prompt_len), dtype=torch.bool)
        for b, p in enumerate(prompts):
            tokens[b, prompt_len - len(p):] = torch.tensor(p)
            prompt_pad[b, prompt_len - len(p):] = False
        tokens, prompt_pad = tokens.to(device), prompt_pad.to(device)
        total = prompt_len + params.max_new_tokens
        context = StaticInferenceContext(max_batch_size=batch, max_sequence_length=total)
        padded = bool(prompt_pad.any())
        causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=device).triu(1)
        mask = causal[None, None] | prompt_pad[:, None, None, :] if padded else None  # True = masked out
        positions = torch.arange(prompt_len, device=device).unsqueeze(0).expand(len(prompts), -1)
        logits = model(tokens, positions, mask, inference_context=context, runtime_gather_output=True)
        logits = logits.repeat_interleave(n, dim=0)
        _share_prompt_cache(context, len(prompts), n, prompt_len)
        is_pad = prompt_pad.repeat_interleave(n, dim=0)
        context.increment_sequence_len_offset(prompt_len)
        context.enable_decode_mode()

        stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=device)
        new_tokens = (batch, params.max_new_tokens)
        key_is_pad = torch.cat([is_pad, torch.zeros(new_tokens, dtype=torch.bool, device=device)], 1)
        out_tokens = torch.full(new_tokens, self.pad_token_id, dtype=torch.long, device=device)
        out_logp = torch.zeros(new_tokens, device=device)
        length = torch.zeros(batch, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        stopped = torch.zeros(batch, dtype=torch.bool, device=device)
        for t in range(params.max_new_tokens):
            token, logp = sample_tokens(
                logits[:, -1, : self.vocab_size], temperature=params.temperature, top_k=params.top_k,
                top_p=params.top_p, generator=generator,
            )
            active = ~finished
            out_tokens[active, t] = token[active]
            out_logp[active, t] = logp[active]
            length += active.long()
            hit_stop = active & torch.isin(token, stop_ids)
            stopped |= hit_stop
            finished |= hit_stop
            if bool(finished.all()) or t == params.max_new_tokens - 1:
                break
            offset = context.sequence_len_offset
            step_mask = key_is_pad[:, None, None, : offset + 1] if padded else None
            step_positions = torch.full((batch, 1), offset, dtype=torch.long, device=device)
            logits = model(token.unsqueeze(1), step_positions, step_mask,
                           inference_context=context, runtime_gather_output=True)
            context.increment_sequence_len_offset(1)
        model.train(was_training)
        out_tokens, out_logp, length, stopped = (x.cpu() for x in (out_tokens, out_logp, length, stopped))
        return [
            (out_tokens[b, : length[b]].tolist(), out_logp[b, : length[b]].tolist(),
             "stop" if stopped[b] else "length")
            for b in range(batch)
        ]


def _share_prompt_cache(context: StaticInferenceContext, prompts: int, n: int, prompt_len: int) -> None:
    """Copy the prefilled keys/values of prompt i (batch slot i) to the slots i·n, …, i·n + n − 1
    of its samples; the cache layout is [sequence, batch, heads·dim] per layer."""
    if n == 1:
        return
    for memories in context.key_value_memory_dict.values():
        for memory in memories:
            shared = memory[:prompt_len, :prompts].repeat_interleave(n, dim=1)
            memory[:prompt_len, : prompts * n] = shared
