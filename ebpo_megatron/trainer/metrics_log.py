"""Metrics: one JSON line per step in ``metrics.jsonl``, a console progress bar, wandb
(offline by default, so nothing needs a network) and optional tensorboard; plots at the end."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

from ..atomic_file import write_text_atomic

PANELS = [
    ("reward/mean", "reward"), ("eval/pass@1", "held-out pass@1"), ("actor/entropy", "entropy"),
    ("actor/grad_norm", "grad norm"), ("actor/step_kl", "per-step KL(π_t‖π_t+1)"),
    ("adv/zero_signal_frac", "zero-signal fraction"), ("ebpo/shrinkage", "shrinkage S"),
    ("ebpo/mu_glob", "μ_glob"),
]
BAR_FIELDS = [("reward/mean", "R"), ("actor/entropy", "H"), ("actor/step_kl", "KL"),
              ("ebpo/shrinkage", "S"), ("adv/zero_signal_frac", "zero"), ("eval/pass@1", "pass@1")]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a truncated last line (a run killed mid-write) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsLogger:
    """Console + metrics.jsonl + wandb (+ tensorboard); only rank 0 should create one."""

    def __init__(self, run_dir: Path, total_steps: int, wandb_mode: str = "offline",
                 project: str = "ebpo_megatron", config: dict | None = None,
                 tensorboard: bool = False, start_step: int = 0, *, label: str) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._trim_after(start_step)
        self.start = time.time()
        self._wandb = self._start_wandb(wandb_mode, project, config) if wandb_mode != "disabled" else None
        self._tb = self._start_tensorboard() if tensorboard else None
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc=label, dynamic_ncols=True,
                        mininterval=0.5)
        self.bar_values: dict[str, float] = {}

    def _trim_after(self, start_step: int) -> None:
        """Drop rows a previous process logged after its last checkpoint (step > ``start_step``;
        a fresh run, ``start_step`` 0, starts an empty file): the resumed run logs those steps
        again, and the file must hold each step once."""
        if not self.path.is_file():
            return
        kept = [row for row in read_metrics(self.path) if 0 < start_step and row.get("step", 0) <= start_step]
        write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def _start_wandb(self, mode: str, project: str, config: dict | None) -> Any:
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            return wandb.init(project=project, mode=mode, dir=str(self.run_dir), config=config or {},
                              name=self.run_dir.name, resume="allow")
        except Exception as err:  # wandb problems must never stop training
            warnings.warn(f"wandb ({mode}) could not start, logging to metrics.jsonl only: {err}")
            return None

    def _start_tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise RuntimeError("run.tensorboard: true needs the tensorboard package (pip install tensorboard)") from err
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, "time_s": round(time.time() - self.start, 3),
               **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            try:
                self._wandb.log(metrics, step=step)
            except Exception as err:  # noqa: BLE001
                warnings.warn(f"wandb.log failed, continuing without wandb: {err}")
                self._wandb = None
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)
        self.bar_values.update({short: metrics[key] for key, short in BAR_FIELDS if key in metrics})
        self.bar.set_postfix_str(" ".join(f"{k}={v:.3g}" for k, v in self.bar_values.items()), refresh=False)
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def plot_run(metrics_path: str | Path, out_png: str | Path, title: str = "",
             before_warm_start: dict[str, float] | None = None) -> Path:
    """A grid of the paper's training curves over steps; absent metrics say "not logged".

    ``before_warm_start`` (``before_sft.json``: held-out metrics of the weights as loaded) adds
    a cross at step 0 to the panels of its keys, beside the step-0 value after the warm start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(PANELS) / cols), cols, figsize=(4 * cols, 6.4))
    for ax, (key, label) in zip(axes.flat, PANELS):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        if before_warm_start and key in before_warm_start:
            ax.plot([0], [before_warm_start[key]], "x", color="tab:red", label="before warm start")
            ax.legend(loc="best", fontsize="small")
        ax.set_title(label)
        ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
