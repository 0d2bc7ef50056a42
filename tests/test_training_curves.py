"""``plot_run``: every panel plots its metric over the logged steps, absent metrics say so, and
``before_warm_start`` marks the held-out value of the weights as loaded at step 0."""

from __future__ import annotations

import json

import matplotlib.figure
import pytest


def test_panels_curves_and_the_before_warm_start_cross(tmp_path, monkeypatch):
    from ebpo_megatron.trainer.metrics_log import PANELS, plot_run

    rows = [{"step": s, "reward/mean": 0.1 * s, "eval/pass@1": 0.2 + 0.05 * s} for s in range(4)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "rew')  # torn last line
    figures = []
    original = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (figures.append(fig), original(fig, *a, **k))[1])

    out = plot_run(metrics, tmp_path / "curves.png", title="t",
                   before_warm_start={"eval/pass@1": 0.015, "not/a/panel": 1.0})

    assert out.stat().st_size > 0 and len(figures) == 1
    panels = {ax.get_title(): ax for ax in figures[0].axes}
    assert set(panels) == {label for _, label in PANELS}
    reward = panels["reward"].lines
    assert len(reward) == 1 and list(reward[0].get_xdata()) == [0, 1, 2, 3]
    assert list(reward[0].get_ydata()) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    held_out = panels["held-out pass@1"].lines
    assert [line.get_label() for line in held_out][1] == "before warm start"
    assert list(held_out[1].get_xdata()) == [0] and list(held_out[1].get_ydata()) == [0.015]
    assert list(held_out[0].get_ydata()) == pytest.approx([0.2, 0.25, 0.3, 0.35])
    entropy = panels["entropy"]
    assert not entropy.lines and [t.get_text() for t in entropy.texts] == ["not logged"]
    assert all(len(ax.lines) <= 1 for title, ax in panels.items() if title != "held-out pass@1")
