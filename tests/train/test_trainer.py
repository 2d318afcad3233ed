"""Trainer features in one process: gradient accumulation, evaluation and seeds, the
learning-rate schedule. The global gradient norm against one process and non-finite losses on every rank are in
tests/multirank/test_trainer_ranks.py."""
from __future__ import annotations

import json

import pytest
import torch

from moe_dist.config import TrainConfig
from moe_dist.train.data import prepare
from moe_dist.train.trainer import Trainer, lr_at
from trainer_helpers import RowsBatcher, make_cfg, tiny, tokens



# --------------------------------------------------------------------------------------- accumulation

def test_two_micro_batches_equal_one_double_batch():
    """grad_accum_steps=2 of B sequences == one batch of 2B: LM and z losses are means, so the gradients and
    the parameters after AdamW match. The load-balancing loss is per micro-batch (f·P is not linear), hence
    aux_loss_coef=0 here; capacity is per micro-batch too, hence dropless."""
    raw = tiny(aux_loss_coef=0.0, expert_bias=True)
    x, y = tokens(4)
    acc = Trainer(make_cfg(raw, batch_size=2, grad_accum_steps=2), batcher=RowsBatcher(x, y, 2))
    one = Trainer(make_cfg(raw, batch_size=4), batcher=RowsBatcher(x, y, 4))
    ra, ro = acc.train_step(0), one.train_step(0)
    assert ra.lm_loss == pytest.approx(ro.lm_loss, rel=1e-6)
    assert ra.z_loss == pytest.approx(ro.z_loss, rel=1e-5)
    assert ra.grad_norm == pytest.approx(ro.grad_norm, rel=1e-5)
    for (n, a), b in zip(acc.model.named_parameters(), one.model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=n)
        # Adam's first step is ~lr·g/|g|: a gradient near 0 turns fp32 rounding into ~1e-6 here (lr = 1e-2,
        # so a real error would show at ~1e-3).
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=n)
    for la, lo in zip(acc.model.moe_layers, one.model.moe_layers):     # bias rule saw the same summed counts
        assert torch.equal(la.router.expert_bias_E, lo.router.expert_bias_E)
    assert [c.tolist() for c in ra.tokens_per_expert] == [c.tolist() for c in ro.tokens_per_expert]


# Recompute (activation checkpointing) in every mode, with router jitter and capacity drops: tests/models/test_recompute.py.


# ----------------------------------------------------------------------------------------- eval and seeds

def test_eval_every_is_logged_and_runs_repeat(tmp_path):
    data = tmp_path / "tok.bin"
    prepare(None, data, max_bytes=40_000)
    runs = []
    for i in range(2):
        raw = tiny()
        raw["data"] = {"path": str(data)}
        cfg = make_cfg(raw, eval_every=2, eval_batches=2, steps=5, out_dir=str(tmp_path / f"run{i}"))
        trainer = Trainer(cfg)
        hist = trainer.fit(progress=False)
        runs.append([s.loss for s in hist.steps])
        assert [s for s, _ in hist.evals] == [2, 4, 5]     # every 2 steps, and the last step
        recs = [json.loads(l) for l in (tmp_path / f"run{i}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs if r["kind"] == "eval"] == [2, 4, 5]
        assert all("z_loss" in r and "step_s" in r for r in recs if r["kind"] == "train")
    assert runs[0] == runs[1]          # same seed, same data: the same losses bit for bit


def test_lr_schedule_warmup_then_cosine():
    t = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, t) == pytest.approx(0.1)
    assert lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(55, t) == pytest.approx(0.55)
    assert lr_at(100, t) == pytest.approx(0.1)
    assert all(lr_at(s, t) >= lr_at(s + 1, t) for s in range(10, 100))
