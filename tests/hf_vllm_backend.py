"""A CPU stand-in for ``rollout.vllm_engine._VLLMBackend``: the same methods and return types
as the vLLM calls it wraps, backed by a transformers model built from the engine's model
directory (random weights, like vLLM's ``load_format="dummy"``) that receives the trainer's
weights through ``load_weights`` and samples in plain torch. With it, everything of the vLLM
path except vLLM itself runs on CPU: the model directory the trainer writes, the weight sync
over the HF name mapping, the memory phases, and the spreading of prompts over processes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import torch

EVENTS: list[str] = []  # phase calls, in order, for the tests
PROMPTS_SEEN = [0]  # prompts generated in this process


class HFBackedVLLM:
    def __init__(self, model_dir: str | Path, *, tensor_parallel_size: int, gpu_memory_utilization: float,
                 enforce_eager: bool | None, load_format: str, dtype: str, seed: int, max_model_len: int | None,
                 engine_kwargs: dict[str, Any] | None) -> None:
        import transformers

        assert load_format == "dummy" and tensor_parallel_size == 1
        config = transformers.AutoConfig.from_pretrained(model_dir)
        self.model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
        self.max_model_len = max_model_len

    def generate(self, prompts: list[list[int]], requests: list[dict[str, Any]]) -> list[Any]:
        EVENTS.append("generate")
        outputs = []
        for prompt, request in zip(prompts, requests):
            PROMPTS_SEEN[0] += 1
            generator = torch.Generator().manual_seed(request["seed"])
            completions = [self._sample(prompt, request, generator, i) for i in range(request["n"])]
            outputs.append(SimpleNamespace(prompt_token_ids=list(prompt), outputs=completions))
        return outputs

    @torch.no_grad()
    def _sample(self, prompt: list[int], request: dict[str, Any], generator: torch.Generator, index: int):
        ids, tokens, logprobs, reason = list(prompt), [], [], "length"
        for _ in range(request["max_tokens"]):
            logits = self.model(torch.tensor([ids])).logits[0, -1].double()
            greedy = request["temperature"] == 0
            logp = torch.log_softmax(logits / (1.0 if greedy else request["temperature"]), -1)
            token = int(logp.argmax()) if greedy else int(torch.multinomial(logp.exp(), 1, generator=generator))
            tokens.append(token)
            logprobs.append({token: SimpleNamespace(logprob=float(logp[token]))})
            ids.append(token)
            if token in request["stop_token_ids"]:
                reason = "stop"
                break
        return SimpleNamespace(index=index, token_ids=tokens, logprobs=logprobs, finish_reason=reason)

    @torch.no_grad()
    def prompt_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        logits = self.model(torch.tensor([token_ids])).logits[0, :-1].double()
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(token_ids[1:])[:, None])[:, 0]

    def begin_update(self) -> None:
        EVENTS.append("sync")

    def finish_update(self) -> None:
        return None

    def load_weights(self, bucket: list[tuple[str, torch.Tensor]]) -> list[str]:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in bucket:
                params[name].copy_(tensor)
        return [name for name, _ in bucket]

    def parameter_names(self) -> set[str]:
        tied = self.model.config.tie_word_embeddings
        return {n for n, _ in self.model.named_parameters() if not (tied and n == "lm_head.weight")}

    def sleep(self, level: int) -> None:
        EVENTS.append(f"sleep{level}")

    def wake_up(self, tags: Sequence[str]) -> None:
        EVENTS.append("wake:" + ",".join(tags))

    def reset_prefix_cache(self) -> None:
        pass

    def synchronize(self) -> None:
        pass
