"""`ebpo-train` end to end on the embedded task: the run directory's contents, and a run killed
(SIGKILL) in the middle of step 4 that resumes to step 6 with the metrics and weights of an
uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "run.steps=6", "run.eval_every=3", "run.save_every=3", "run.keep_last=3", "run.wandb=disabled",
    "run.torch_threads=1", "sft.steps=40", "data.prompts_per_step=8", "data.synthetic.num_train=300",
    "data.synthetic.num_eval=24", "model.hidden_size=32", "model.ffn_hidden_size=64",
    "train.step.micro_batch_size=16",
]


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ebpo_megatron.train", "--config", str(ROOT / "examples/tiny_cpu.yaml"),
            f"run.output_dir={out}", "run.name=e2e", *TINY, *extra]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def last_rows(path: Path) -> dict[int, dict]:
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        rows[row["step"]] = row
    return rows


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not (k.startswith("perf/") or k in ("time_s", "rollout/tokens_per_s",
                                                                                "rollout/seconds"))}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    done = subprocess.run(command(out), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "e2e", done.stdout + done.stderr


def test_run_directory_has_metrics_config_plot_and_checkpoint(straight):
    run_dir, output = straight
    assert (run_dir / "config.yaml").is_file() and (run_dir / "tokenizer/tokenizer.model").is_file()
    rows = last_rows(run_dir / "metrics.jsonl")
    assert sorted(rows) == [0, 1, 2, 3, 4, 5, 6]
    for key in ("reward/mean", "actor/entropy", "actor/grad_norm", "actor/step_kl", "adv/zero_signal_frac",
                "ebpo/shrinkage", "ebpo/mu_glob", "actor/kl_ref", "rollout/logp_diff_mean"):
        assert key in rows[4], key
    assert "eval/pass@1" in rows[0] and "eval/pass@1" in rows[6]
    assert rows[6]["rollout/logp_diff_max"] < 1e-3  # sampler and trainer agree on log-probs
    assert (run_dir / "training_curves.png").stat().st_size > 10_000
    assert (run_dir / "checkpoints/step_000006/COMPLETE").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["estimator"] == "ebpo"
    assert "held-out pass@1" in output


def test_eval_before_sft_scores_the_weights_as_loaded(tmp_path):
    """``sft.eval_before`` evaluates the loaded weights before the warm start changes them: a run
    started from another run's post-warm-start weights (its frozen reference copy) reports, before
    its own warm start, that run's step-0 evaluation (computed by the trainer's engine)."""
    larger = ["sft.steps=600", "model.hidden_size=64", "model.ffn_hidden_size=128", "data.synthetic.num_eval=100"]
    first = subprocess.run(command(tmp_path / "first", "run.steps=1", *larger),
                           cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    first_dir = tmp_path / "first" / "e2e"
    step0 = last_rows(first_dir / "metrics.jsonl")[0]
    assert step0["eval/pass@1"] > 0.0  # the untrained model scores 0: the check below can tell them apart
    shutil.copytree(first_dir / "tokenizer", tmp_path / "second" / "e2e" / "tokenizer")  # the same pieces
    second = subprocess.run(command(tmp_path / "second", "run.steps=1", *larger, "sft.steps=2",
                                    "sft.eval_before=true", f"model.checkpoint={first_dir / 'reference'}"),
                            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    before = json.loads((tmp_path / "second" / "e2e" / "summary.json").read_text())["before_sft"]
    assert before["eval/pass@1"] == step0["eval/pass@1"]
    assert "[sft] before the warm start: eval/pass@1" in second.stdout


def test_sigkill_mid_step_then_resume_matches_uninterrupted_run(straight, tmp_path):
    run_dir, _ = straight
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = out / "e2e/metrics.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # wait for checkpoint 3, then kill inside step 4
            if (out / "e2e/checkpoints/step_000003/COMPLETE").is_file() and metrics.is_file() \
                    and 3 in last_rows(metrics):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the first run never reached its step-3 checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 6 not in last_rows(metrics)
    resumed = subprocess.run(command(out), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[resume] continuing from step 3" in resumed.stdout + resumed.stderr
    want, got = last_rows(run_dir / "metrics.jsonl"), last_rows(metrics)
    for step in range(1, 7):
        assert comparable(got[step]) == pytest.approx(comparable(want[step]), rel=1e-6, abs=1e-9), step
    assert got[6]["actor/param_norm"] == pytest.approx(want[6]["actor/param_norm"], rel=1e-9)
    # rows the killed run wrote after its checkpoint were dropped: every step appears once
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(7))


def test_bad_config_fails_before_any_work(tmp_path):
    done = subprocess.run(command(tmp_path, "algorithm.estimatr=grpo"), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "algorithm.estimatr: unknown key. Did you mean 'algorithm.estimator'" in done.stderr
    assert not (tmp_path / "e2e").exists()


def test_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(tmp_path):
    # a learning rate of 1e30 blows the weights up within a few steps
    done = subprocess.run(command(tmp_path, "train.optim.lr=1e30", "train.optim.clip_grad=1e30", "run.save_every=1"),
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "is nan" in done.stderr and "Last good checkpoint" in done.stderr


def test_math_task_trains_from_jsonl_with_a_local_hf_tokenizer(tmp_path):
    pytest.importorskip("math_verify")
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from test_math_data import CHATML, CORPUS

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHATML
    fast.save_pretrained(tmp_path / "tok")
    data = ROOT / "tests/data/math_small.jsonl"
    done = subprocess.run(command(tmp_path, "data.task=math", f"data.train_files=[{data}]",
                                  f"data.tokenizer_dir={tmp_path / 'tok'}", "data.max_prompt_tokens=200",
                                  "model.vocab_size=512", "model.max_position_embeddings=256", "sft.steps=0",
                                  "rollout.max_new_tokens=8", "run.steps=2", "run.eval_every=2", "run.save_every=2",
                                  "data.prompts_per_step=4", "data.order=topic"),
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = last_rows(tmp_path / "e2e/metrics.jsonl")
    assert sorted(rows) == [0, 1, 2] and "reward/boxed_frac" in rows[1]
    for extra, message in ((["model.vocab_size=512", "data.max_prompt_tokens=3"], "data.train_files: no usable prompt"),
                           (["data.max_prompt_tokens=200"], "model.vocab_size 32 is smaller than the tokenizer's 300")):
        bad = subprocess.run(command(tmp_path / "b", "data.task=math", f"data.train_files=[{data}]",
                                     f"data.tokenizer_dir={tmp_path / 'tok'}", *extra),
                             cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr[-2000:]
