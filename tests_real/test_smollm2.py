"""SmolLM2-135M-Instruct through the user's path: HF -> Megatron (loaded at TP=1 and at TP=3 x
PP=2 on gloo ranks) -> HF is bit-exact; Megatron logits equal transformers' (1e-4, fp32) on chat
prompts; the native engine's greedy decoding equals transformers' greedy `generate` token for
token for 32 new tokens on 8 prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mp_utils import run_ranks
from test_conversion import hf_state

QUESTIONS = ["What is 7 + 5?", "What is 6 * 8?", "What is 23 + 58?", "What is 3 + 4 * 2?",
             "What is 9 * 9 - 7?", "Name a prime number.", "What is 41 + 17?", "What is 2 * 7?"]


def chat_prompts(hf_dir: Path) -> list[list[int]]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    out = []
    for q in QUESTIONS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q + " Put the final answer in \\boxed{}."}],
                                            add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def padded(prompts: list[list[int]], pad: int) -> torch.Tensor:
    width = max(map(len, prompts))
    return torch.tensor([p + [pad] * (width - len(p)) for p in prompts])


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory) -> Path:
    from ebpo_megatron.conversion import convert_hf_to_megatron

    out = tmp_path_factory.mktemp("smollm2") / "megatron"
    convert_hf_to_megatron(hf_dir, out, tp=3, pp=2)
    return out


def _load_logits_resave(rank, world, tp, pp, megatron_dir, tokens, resave_dir, greedy_prompts):
    from ebpo_megatron.config.schema import load_config
    from ebpo_megatron.models import build_policy
    from ebpo_megatron.parallel import ParallelConfig, cpu_compat, initialize
    from ebpo_megatron.rollout.base import SamplingParams
    from ebpo_megatron.rollout.native_engine import NativeEngine
    from ebpo_megatron.trainer.checkpoint import load_model, save_model
    from megatron_forward import megatron_logits

    cfg = load_config(Path(megatron_dir) / "model.yaml").model
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    initialize(parallel, cfg)
    cpu_compat.set_seed(0)
    chunks = build_policy(cfg, parallel)
    load_model(Path(megatron_dir), chunks)
    logits = megatron_logits(chunks, tokens, cfg.vocab_size)
    save_model(Path(resave_dir), chunks)
    greedy = None
    if greedy_prompts:
        engine = NativeEngine(chunks[0], pad_token_id=2, max_sequence_length=256, max_batch_size=8)
        batch = engine.generate(greedy_prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=32,
                                                               stop_token_ids=()))
        greedy = batch.response_ids
    return {"logits": logits, "greedy": greedy}


@pytest.mark.parametrize("tp,pp", [(1, 1), (3, 2)], ids=["TP1", "TP3xPP2"])
def test_round_trip_logits_and_greedy_decoding(hf_dir, converted, tmp_path, tp, pp):
    import transformers

    from ebpo_megatron.conversion import convert_megatron_to_hf

    prompts = chat_prompts(hf_dir)
    tokens = padded(prompts[:4], 2)[:, :40]  # full rows (no padding inside the first 40 tokens)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
    with torch.no_grad():
        reference = model(tokens).logits
    results = run_ranks(_load_logits_resave, tp * pp, tp, pp, str(converted), tokens, str(tmp_path / "resaved"),
                        prompts if pp == 1 else None)
    logits = next(r["logits"] for r in results if r["logits"] is not None)
    assert torch.allclose(logits, reference, atol=1e-4), float((logits - reference).abs().max())

    back = tmp_path / "hf"
    convert_megatron_to_hf(tmp_path / "resaved", back, config_file=converted / "model.yaml")
    original, returned = hf_state(hf_dir), hf_state(back)
    original.pop("lm_head.weight", None)  # tied
    assert sorted(returned) == sorted(original)
    assert all(torch.equal(returned[k], original[k]) for k in original)

    if pp == 1:  # greedy: the native engine against transformers, 32 tokens, no stop token
        for prompt, ours in zip(prompts, results[0]["greedy"]):
            assert hf_greedy(model, prompt, 32) == ours


@torch.no_grad()
def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """argmax decoding with transformers' KV cache, no stop token (as the engine was asked)."""
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens = []
    for _ in range(new_tokens):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens
