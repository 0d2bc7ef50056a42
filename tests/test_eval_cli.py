"""`ebpo-eval`, `tools/estimate_difficulty.py` and `tools/label_topics.py --checkpoint` on tiny
models: a synthetic-task run and a math-file run (an offline byte-level BPE tokenizer), each
warm-started for a few seconds so that their pass rates are neither all 0 nor all 1. Metrics in
the JSON are recomputed here from the raw per-sample verdicts with the formulas written out."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from mp_utils import free_port, run_ranks

ROOT = Path(__file__).resolve().parents[1]
EVAL = [sys.executable, "-m", "ebpo_megatron.evaluate"]
SYNTHETIC = [
    "run.torch_threads=1", "run.wandb=disabled", "data.synthetic.levels=[0]", "data.synthetic.num_train=200",
    "data.synthetic.num_eval=12", "model.hidden_size=64", "model.ffn_hidden_size=128", "sft.steps=80",
    "sft.batch_size=64", "rollout.max_new_tokens=3",
]
PROBLEMS = [(f"What is {a} plus {b}?", str(a + b)) for a, b in [(1, 2), (3, 4), (2, 5), (6, 1), (4, 4), (7, 2)]] + [
    (f"How many ways can {n} people stand in a line?", str(math.factorial(n))) for n in (2, 3, 4)
] + [(f"What is the area of a square with side {s}?", str(s * s)) for s in (2, 3, 5)]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(cmd: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; on timeout its whole process group is killed."""
    with subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _train_and_save(rank: int, world: int, config_file: str, sft_steps: int) -> None:
    """Build the run's task and policy, warm-start it, save a model-only checkpoint as step_000001."""
    import torch

    from ebpo_megatron.config.schema import dump_config, load_config
    from ebpo_megatron.evaluation.runner import build_eval_task, load_benchmarks
    from ebpo_megatron.models import build_policy
    from ebpo_megatron.parallel import cpu_compat, initialize
    from ebpo_megatron.trainer.checkpoint import save_model
    from ebpo_megatron.trainer.rollout_batch import build_policy_batch
    from ebpo_megatron.trainer.run import _sft_batches
    from ebpo_megatron.data.tasks import build_task
    from ebpo_megatron.trainer.warm_start import sft_warm_start

    config = load_config(config_file)
    initialize(config.parallel, config.model)
    cpu_compat.set_seed(config.run.seed)
    run_dir = config.run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    chunks = build_policy(config.model, config.parallel)
    if config.data.task == "synthetic":
        batches = _sft_batches(build_task(config, run_dir), config)
    else:  # answer every training problem with \boxed{answer}
        task = build_eval_task(config, run_dir)
        [bench] = load_benchmarks(task, [Path(config.data.train_files[0])])
        tok = task.tokenizer
        prompts = [list(p.token_ids) for p in bench.prompts]
        answers = [tok.encode(f"\\boxed{{{p.answer}}}") + [tok.eos_id] for p in bench.prompts]
        batch = build_policy_batch(prompts, answers, [[0.0] * len(a) for a in answers], torch.zeros(len(prompts)),
                                   tok.pad_id)
        batches = [batch] * sft_steps
    sft_warm_start(chunks[0], batches, lr=config.sft.lr)
    save_model(run_dir / "checkpoints" / "step_000001", chunks)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory) -> Path:
    """A tiny synthetic-task run directory with config.yaml, tokenizer/ and checkpoints/step_000001."""
    out = tmp_path_factory.mktemp("synthetic")
    config = out / "config.yaml"
    from ebpo_megatron.config.schema import dump_config, load_config

    config.write_text(dump_config(load_config(ROOT / "examples/tiny_cpu.yaml",
                                              [*SYNTHETIC, f"run.output_dir={out}", "run.name=run"])))
    run_ranks(_train_and_save, 1, str(config), 0)
    return out / "run"


def _bpe_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [f"{q} \\boxed{{{a}}} user assistant" for q, a in PROBLEMS] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)


@pytest.fixture(scope="module")
def math_run(tmp_path_factory) -> dict[str, Path]:
    """A tiny math run: BPE tokenizer, 12 problems (jsonl and a verl-style parquet), a model
    warm-started to answer them with \\boxed{}, its run directory and config."""
    pytest.importorskip("transformers")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    out = tmp_path_factory.mktemp("math")
    _bpe_tokenizer(out / "tokenizer")
    rows = [{"id": f"p{i}", "problem": q, "answer": a, "source_note": f"row {i}"} for i, (q, a) in enumerate(PROBLEMS)]
    jsonl = out / "arith.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = out / "arith_verl.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"data_source": "arith", "prompt": [{"role": "user", "content": r["problem"]}], "ability": "math",
         "reward_model": {"style": "rule", "ground_truth": r["answer"]}, "extra_info": {"index": i}}
        for i, r in enumerate(rows)]), parquet)
    config = out / "config.yaml"
    config.write_text(f"""
run: {{name: run, output_dir: {out}, seed: 7, torch_threads: 1, wandb: disabled}}
model: {{family: llama, num_layers: 2, hidden_size: 64, ffn_hidden_size: 128, num_attention_heads: 4,
        num_kv_heads: 2, vocab_size: 512, max_position_embeddings: 96}}
data: {{task: math, train_files: [{jsonl}], tokenizer_dir: {out / 'tokenizer'}, max_prompt_tokens: 80}}
rollout: {{engine: native, max_new_tokens: 8}}
sft: {{lr: 3.0e-3}}
""")
    run_ranks(_train_and_save, 1, str(config), 60)
    return {"run": out / "run", "config": config, "jsonl": jsonl, "parquet": parquet}


# ------------------------------------------------------------------------------ recomputation
def pass_at_k(n: int, c: int, k: int) -> float:
    """1 − C(n−c, k) / C(n, k), written out with binomials."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def maj_solved(answers: list, correct: list[int], m: int) -> bool:
    """Largest group of identical answers among the first m (None does not vote), ties to the
    earliest; solved when that group's first sample is correct."""
    votes = [(a, i) for i, a in enumerate(answers[:m]) if a is not None]
    if not votes:
        return False
    counts = Counter(a for a, _ in votes)
    first = {a: i for a, i in reversed(votes)}
    winner = max(counts, key=lambda a: (counts[a], -first[a]))
    return bool(correct[first[winner]])


def check_metrics(report: dict, k: int, maj: int) -> list[float]:
    """Every benchmark's metrics equal their recomputation; returns all pass@1 values."""
    assert report["settings"]["k"] == k and report["settings"]["maj"] == maj
    pass1 = []
    for name, bench in report["benchmarks"].items():
        samples = bench["samples"]
        assert len(samples) == bench["problems"] > 0 and all(len(s["correct"]) == k for s in samples), name
        n_c = [(len(s["correct"]), sum(s["correct"])) for s in samples]
        expected = {
            "pass@1": sum(c / n for n, c in n_c) / len(n_c),
            f"maj@{maj}": sum(maj_solved(s["answers"], s["correct"], maj) for s in samples) / len(samples),
            f"pass@{maj}": sum(pass_at_k(n, c, maj) for n, c in n_c) / len(n_c),
            f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in n_c) / len(n_c),
        }
        topics = sorted({s["topic"] for s in samples})
        if 2 <= len(topics) <= 20:  # per topic: correct samples / samples
            for topic in topics:
                flags = [f for s in samples if s["topic"] == topic for f in s["correct"]]
                expected[f"pass@1/{topic}"] = sum(flags) / len(flags)
        assert bench["metrics"] == pytest.approx(expected, abs=1e-12), name
        pass1.append(expected["pass@1"])
    common = set.intersection(*(set(b["metrics"]) for b in report["benchmarks"].values()))
    assert set(report["average"]) == common  # the average covers the metrics every benchmark has
    for key in common:
        values = [b["metrics"][key] for b in report["benchmarks"].values()]
        assert report["average"][key] == pytest.approx(sum(values) / len(values))
    return pass1


# ------------------------------------------------------------------------------ ebpo-eval
def test_eval_synthetic_run_config_found_from_checkpoint(synthetic_run, tmp_path):
    out, table = tmp_path / "eval.json", tmp_path / "eval.md"
    done = run([*EVAL, "--checkpoint", str(synthetic_run / "checkpoints/step_000001"), "--k", "8", "--maj", "4",
                "--out", str(out), "--table", str(table)])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["benchmarks"]) == ["held-out"] and report["benchmarks"]["held-out"]["problems"] == 12
    [pass1] = check_metrics(report, k=8, maj=4)
    assert 0.0 < pass1 < 1.0  # the warm start learned something, not everything
    text = table.read_text()
    assert text.splitlines()[0] == "| checkpoint | metric | held-out | avg |"
    assert f"| step_000001 | pass@1 | {100 * pass1:.2f} | {100 * pass1:.2f} |" in text and text in done.stdout


def test_eval_math_files_with_explicit_config(math_run, tmp_path):
    out = tmp_path / "eval.json"
    done = run([*EVAL, "--checkpoint", str(math_run["run"] / "checkpoints/step_000001"), "--config",
                str(math_run["config"]), "--data", str(math_run["jsonl"]), str(math_run["parquet"]),
                "--k", "6", "--maj", "3", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["benchmarks"]) == ["arith", "arith_verl"]
    assert [b["problems"] for b in report["benchmarks"].values()] == [len(PROBLEMS)] * 2
    pass1 = check_metrics(report, k=6, maj=3)
    assert all(0.0 < p < 1.0 for p in pass1), pass1
    assert "| checkpoint | metric | arith | arith_verl | avg |" in done.stdout


def test_greedy_eval_under_torchrun_dp2_equals_one_process(synthetic_run, tmp_path):
    ckpt = str(synthetic_run / "checkpoints/step_000001")
    args = ["--checkpoint", ckpt, "--k", "2", "--maj", "2", "--temperature", "0"]
    one = run([*EVAL, *args, "--out", str(tmp_path / "one.json")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
               "-m", "ebpo_megatron.evaluate", *args, "--out", str(tmp_path / "two.json")], timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    one_report, two_report = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two_report["config"]["parallel"] == one_report["config"]["parallel"]
    assert two_report["benchmarks"]["held-out"]["samples"] == one_report["benchmarks"]["held-out"]["samples"]
    assert two.stdout.count("| step_000001 | pass@1 |") == 1  # rank 0 alone reports


@pytest.mark.parametrize("args, message", [
    ("--checkpoint {tmp}/nowhere --data {data}", "--checkpoint: directory not found"),
    ("--checkpoint {tmp} --data {data}", "is not a complete checkpoint (no COMPLETE marker)"),
    ("--checkpoint {ckpt} --data {tmp}/missing.jsonl", "--data: file not found"),
    ("--checkpoint {ckpt} --data {data} --k 4 --maj 8", "maj: expected 1 <= maj <= k (4), got 8"),
    pytest.param("--checkpoint {ckpt} rollout.engine=vllm --data {data}", "pip install 'ebpo_megatron[vllm]'",
                 marks=pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")),
    ("--checkpoint {ckpt} model.no_such_key=1 --data {data}", "--config:"),
])
def test_bad_input_exits_2_with_a_clear_message(math_run, tmp_path, capsys, args, message):
    from ebpo_megatron.evaluate import main

    ckpt = math_run["run"] / "checkpoints/step_000001"
    assert main(args.format(tmp=tmp_path, ckpt=ckpt, data=math_run["jsonl"]).split()) == 2
    assert message in capsys.readouterr().err


def _eval_held_out(rank: int, world: int, checkpoint: str, engine: str) -> dict:
    import hf_vllm_backend
    from ebpo_megatron.evaluate import resolve_config, run_evaluation
    from ebpo_megatron.evaluation.results import EvalSettings
    from ebpo_megatron.rollout import vllm_engine

    vllm_engine._VLLMBackend = hf_vllm_backend.HFBackedVLLM  # the only vLLM-specific class
    config, run_dir = resolve_config(Path(checkpoint), None, [f"rollout.engine={engine}"])
    settings = EvalSettings(k=2, maj=2, temperature=0.0, max_new_tokens=config.rollout.max_new_tokens)
    done = run_evaluation(config, Path(checkpoint), run_dir, [], settings)
    return {"problems": [(p.uid, p.correct, p.answers) for p in done.results[0].problems],
            "prompts_seen": hf_vllm_backend.PROMPTS_SEEN[0], "events": list(hf_vllm_backend.EVENTS)}


def test_eval_with_the_vllm_engine_equals_the_native_engine(synthetic_run):
    """``rollout.engine=vllm`` (vLLM replaced by tests/hf_vllm_backend.py): one engine per process,
    woken and sent the checkpoint's weights, the problems split over both processes; greedy
    results identical to the native engine's."""
    pytest.importorskip("transformers")
    checkpoint = str(synthetic_run / "checkpoints/step_000001")
    [native] = run_ranks(_eval_held_out, 1, checkpoint, "native")
    vllm = run_ranks(_eval_held_out, 2, checkpoint, "vllm")
    assert vllm[0]["problems"] == vllm[1]["problems"] == native["problems"]
    assert [r["prompts_seen"] for r in vllm] == [6, 6]  # 12 held-out problems, none generated twice
    assert vllm[0]["events"][-5:] == ["wake:weights", "wake:kv_cache", "sync", "generate", "sleep2"]
    assert native["prompts_seen"] == 0


def test_exit_status_of_the_installed_command(tmp_path):
    done = run([*EVAL, "--checkpoint", str(tmp_path / "nowhere")])
    assert done.returncode == 2 and "ebpo-eval: error: --checkpoint: directory not found" in done.stderr


# ------------------------------------------------------------------------------ tools
def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_estimate_difficulty_is_the_runner_pass_rate_and_keeps_every_row(math_run, tmp_path):
    import pyarrow.parquet as pq

    ckpt, data = str(math_run["run"] / "checkpoints/step_000001"), str(math_run["parquet"])
    out = tmp_path / "difficulty.parquet"
    done = run([sys.executable, "tools/estimate_difficulty.py", "--checkpoint", ckpt, "--data", data, "--out", str(out),
                "--samples", "6"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{len(PROBLEMS)} rows, {len(PROBLEMS)} scored with 6 samples" in done.stdout
    evaluated = run([*EVAL, "--checkpoint", ckpt, "--data", data, "--k", "6", "--maj", "1",
                     "--out", str(tmp_path / "eval.json")])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    samples = json.loads((tmp_path / "eval.json").read_text())["benchmarks"]["arith_verl"]["samples"]
    expected = {s["uid"]: sum(s["correct"]) / len(s["correct"]) for s in samples}

    before, after = pq.read_table(data), pq.read_table(out)
    assert after.column_names == before.column_names + ["difficulty"]
    assert after.drop(["difficulty"]).to_pylist() == before.to_pylist()
    difficulty = after.column("difficulty").to_pylist()
    assert difficulty == [expected[row] for row in range(len(PROBLEMS))]
    assert len(set(difficulty)) > 1  # not a constant column


def test_estimate_difficulty_refuses_a_missing_data_file(math_run, tmp_path):
    done = run([sys.executable, "tools/estimate_difficulty.py", "--checkpoint",
                str(math_run["run"] / "checkpoints/step_000001"), "--data", str(tmp_path / "none.jsonl"),
                "--out", str(tmp_path / "o.jsonl")])
    assert done.returncode == 2 and "--data: file not found" in done.stderr


@pytest.mark.parametrize("reply, topic", [
    ("Linear Algebra", "Linear Algebra"),
    ("The topic is geometry and trigonometry, not algebra & number theory.", "Geometry & Trigonometry"),
    ("  probability  &  STATISTICS", "Probability & Statistics"),
    ("\\boxed{7}", None),
    ("Algebra", None),
])
def test_parse_topic_takes_the_first_topic_named(reply, topic):
    assert load_tool("label_topics").parse_topic(reply) == topic


def test_label_topics_llm_mode_falls_back_and_counts(math_run, tmp_path):
    from ebpo_megatron.data.topics import TOPICS, classify_topic

    out = tmp_path / "labelled.jsonl"
    done = run([sys.executable, "tools/label_topics.py", "--in", str(math_run["jsonl"]), "--out", str(out),
                "--checkpoint", str(math_run["run"] / "checkpoints/step_000001"), "--max-new-tokens", "6",
                "model.max_position_embeddings=512"])
    assert done.returncode == 0, done.stderr[-3000:]
    counts = dict(re.findall(r"(llm|fallback_no_topic|fallback_too_long): (\d+)", done.stdout))
    counts = {k: int(v) for k, v in counts.items()}
    assert sum(counts.values()) == len(PROBLEMS) and f"(of {len(PROBLEMS)} rows)" in done.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "topic"} for r in rows] == [
        json.loads(line) for line in math_run["jsonl"].read_text().splitlines()]
    assert all(r["topic"] in TOPICS for r in rows)
    if counts["llm"] == 0:  # an untrained labeller: every label is the keyword classifier's
        assert [r["topic"] for r in rows] == [classify_topic(r["problem"]) for r in rows]
