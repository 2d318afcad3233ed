"""Telemetry: JSONL records, resume without duplicated steps, TensorBoard scalars, expert-load heatmap."""
import json
from pathlib import Path

import pytest
import torch

from moe_dist.train.metrics import CURVE_NAME, HEATMAP_NAME, MetricsLogger, load_records, plot_expert_load


def _log_steps(m: MetricsLogger, steps, L=2, E=4):
    for s in steps:
        counts = torch.arange(L * E).reshape(L, E) + s
        m.log_step(s, {"loss": 5.0 - 0.1 * s, "tokens_per_s": 1000.0, "drop_fraction": 0.0}, counts)


def test_records_hold_scalars_and_per_expert_counts(tmp_path: Path) -> None:
    m = MetricsLogger(tmp_path, enabled=True, moe_layer_ids=[1, 3], tensorboard=False)
    _log_steps(m, range(3))
    m.log_step(2, {"val_loss": 4.2}, kind="eval")
    png = m.close()
    recs = load_records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert recs[1]["loss"] == pytest.approx(4.9)
    assert recs[2]["tokens_per_expert"] == [[2, 3, 4, 5], [6, 7, 8, 9]]
    assert load_records(tmp_path / "metrics.jsonl", kind="eval") == [{"step": 2, "kind": "eval", "val_loss": 4.2}]
    assert png == tmp_path / HEATMAP_NAME
    assert (tmp_path / CURVE_NAME).stat().st_size > 10_000
    from PIL import Image
    with Image.open(png) as im:
        assert im.size[0] > 400 and im.size[1] > 200


def test_non_finite_values_become_null(tmp_path: Path) -> None:
    m = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    m.log_step(0, {"loss": float("nan"), "grad_norm": float("inf"), "skipped": True})
    m.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    rec = json.loads(line)                  # strict JSON: no NaN token
    assert rec["loss"] is None and rec["grad_norm"] is None and rec["skipped"] is True


def test_resume_drops_steps_after_the_checkpoint_and_a_torn_line(tmp_path: Path) -> None:
    m = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    _log_steps(m, range(7))
    m.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 3.')          # the crash cut this line short
    m = MetricsLogger(tmp_path, enabled=True, tensorboard=False, resume_step=5)
    _log_steps(m, range(5, 9))
    m.close()
    steps = [r["step"] for r in load_records(tmp_path / "metrics.jsonl")]
    assert steps == list(range(9))          # every step exactly once
    assert (tmp_path / HEATMAP_NAME).exists()


def test_a_fresh_run_keeps_an_earlier_runs_metrics_aside(tmp_path: Path) -> None:
    """A new run into a folder holding another run's metrics.jsonl must not truncate it."""
    m = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    _log_steps(m, range(3))
    m.close()
    earlier = (tmp_path / "metrics.jsonl").read_text()
    for _ in range(2):                      # two fresh runs: two kept files, none overwritten
        m = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
        _log_steps(m, range(1))
        m.close()
    kept = sorted(tmp_path.glob("metrics.*.jsonl"))
    assert len(kept) == 2
    assert kept[0].read_text() == earlier or kept[1].read_text() == earlier
    assert [r["step"] for r in load_records(tmp_path / "metrics.jsonl")] == [0]


def test_disabled_logger_writes_nothing(tmp_path: Path) -> None:
    m = MetricsLogger(tmp_path / "r1", enabled=False)
    _log_steps(m, range(2))
    assert m.close() is None
    assert not (tmp_path / "r1").exists()


def test_tensorboard_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    m = MetricsLogger(tmp_path, enabled=True, tensorboard=True)
    _log_steps(m, range(4))
    m.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [0, 1, 2, 3]
    assert loss[-1].value == pytest.approx(4.7)


def test_heatmap_bins_long_runs(tmp_path: Path) -> None:
    counts = torch.randint(0, 50, (1000, 3, 8))
    out = plot_expert_load(counts, list(range(1000)), [0, 2, 4], tmp_path / "h.png", max_columns=50)
    assert out.stat().st_size > 10_000
