"""The engine interface in one process: the engine train.engine names, the memory each engine reports (the
per-rank formula `plan` models), the memory record of a run, and a run without a validation split."""
from __future__ import annotations

import functools
import json

import pytest
import torch

from moe_dist.train.data import prepare
from moe_dist.train.engine import Engine
from moe_dist.train.trainer import build_engine
from moe_dist.train.native_engine import NativeEngine
from moe_dist.train.sharded_optimizer import FlatAdamW
from moe_dist.train.trainer import Trainer
from trainer_helpers import RowsBatcher, make_cfg, tiny, tokens


def _trainer(tmp_path, engine=None, **train):
    x, y = tokens(4)
    cfg = make_cfg(tiny(), out_dir=str(tmp_path / "out"), **train)
    return Trainer(cfg, batcher=RowsBatcher(x, y, 2), engine=engine)


def test_train_engine_native_builds_the_native_engine(tmp_path):
    plain = _trainer(tmp_path)
    assert isinstance(plain.engine, NativeEngine) and isinstance(plain.engine, Engine)
    assert isinstance(plain.optimizer, torch.optim.AdamW) and plain.engine.flat is None
    sharded = _trainer(tmp_path, shard_optimizer="states")
    assert isinstance(sharded.engine.flat, FlatAdamW) and sharded.optimizer is None
    assert type(build_engine(sharded.cfg, sharded.topo, sharded.model)) is NativeEngine


@pytest.mark.parametrize("dtype,shard", [(torch.float32, "none"), (torch.bfloat16, "none"),
                                         (torch.float32, "states"), (torch.float32, "states+grads"),
                                         (torch.bfloat16, "states+grads")])
def test_memory_follows_the_formula_on_one_rank(tmp_path, dtype, shard):
    """One rank (s_d = s_e = 1, no padding): weights w·P, gradients 4·P (+ one bucket for ZeRO-2), optimizer
    8·P (+ 4·P of fp32 master with bf16 weights)."""
    trainer = _trainer(tmp_path, engine=functools.partial(NativeEngine, weights_dtype=dtype, bucket_elems=4000),
                       shard_optimizer=shard)
    trainer.train_step(0)
    P = sum(p.numel() for p in trainer.model.parameters())
    w = 2 if dtype == torch.bfloat16 else 4
    mem = trainer.engine.memory()
    assert mem["weights"] == w * P
    bucket = 4 * max(b.padded for b in trainer.engine.flat.buckets) if shard == "states+grads" else 0
    assert bucket <= 4 * 4000 + 4 * P // 4      # a bucket holds at most the cap, or one parameter over it
    assert mem["grads"] == 4 * P + bucket
    assert mem["optimizer"] == 8 * P + (4 * P if w == 2 else 0)
    assert "peak_allocated" not in mem           # a GPU figure


def test_fit_writes_one_memory_record_and_skips_evaluation_without_a_validation_split(tmp_path, capsys):
    data = tmp_path / "tok.bin"
    prepare(None, data, max_bytes=40_000)
    raw = tiny()
    raw["data"] = {"path": str(data), "val_fraction": 0.0}
    cfg = make_cfg(raw, eval_every=1, steps=3, out_dir=str(tmp_path / "run"), shard_optimizer="states+grads")
    trainer = Trainer(cfg)
    hist = trainer.fit(progress=False)
    assert trainer.evaluate(2) is None and hist.evals == []
    out = capsys.readouterr().out
    assert out.count("evaluation skipped: no validation split (data.val_fraction=0)") == 1
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [0, 1, 2]
    assert not [r for r in recs if r["kind"] == "eval"]
    [mem] = [r for r in recs if r["kind"] == "memory"]
    assert mem["step"] == 0
    assert {k: mem[k] for k in ("weights", "grads", "optimizer")} == trainer.engine.memory()
    assert mem["per_rank"] == [trainer.engine.memory()]


@pytest.mark.parametrize("shard", ["states", "states+grads"])
def test_a_skipped_nonfinite_step_changes_nothing_in_the_sharded_optimizer(tmp_path, shard):
    """train.on_nonfinite=skip: a NaN step leaves weights, moments and step counters as they were; the next
    step trains from clean gradients."""
    trainer = _trainer(tmp_path, on_nonfinite="skip", shard_optimizer=shard)
    router = trainer.model.moe_layers[0].router
    poison = {"on": False}
    router.register_forward_pre_hook(lambda mod, args: (args[0] * float("nan"),) if poison["on"] else None)
    trainer.train_step(0)
    before = trainer.engine.flat.checkpoint_tensors()
    poison["on"] = True
    assert trainer.train_step(1).skipped
    poison["on"] = False
    after = trainer.engine.flat.checkpoint_tensors()
    for n, t in before.items():
        for k in t:
            assert torch.equal(after[n][k], t[k]), (n, k)
    r = trainer.train_step(2)
    assert not r.skipped and r.grad_norm == r.grad_norm
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(t["step"] == 2 for t in trainer.engine.flat.checkpoint_tensors().values())


def test_zero2_frees_every_whole_gradient_and_zero1_keeps_them_in_the_flat_buffer(tmp_path):
    x, y = tokens(2)
    for shard in ("states", "states+grads"):
        trainer = _trainer(tmp_path, shard_optimizer=shard)
        engine = trainer.engine
        engine.zero_grad()
        engine.backward(engine.forward(x, y).loss)
        if shard == "states+grads":
            # Reduced into the shard accumulators as backward went: no parameter keeps a gradient.
            assert all(p.grad is None for p in trainer.model.parameters())
            assert all(b.grad_full is None and b.grad_acc.abs().sum() > 0 for b in engine.flat.buckets)
        else:
            # fp32 weights: the gradients are views of the flat fp32 buffers, filled in place by backward.
            for b in engine.flat.buckets:
                for s in b.slots:
                    assert s.param.grad.data_ptr() == b.grad_full[s.start:].data_ptr()
                assert b.grad_full.abs().sum() > 0
