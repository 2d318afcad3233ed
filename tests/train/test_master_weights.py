"""bf16 weights with fp32 master weights (the GPU path of train.dtype=bfloat16), forced on the CPU: the master
stays fp32 and keeps updates far below bf16's resolution that a bf16 optimizer loses; checkpoints hold the
master values."""
from __future__ import annotations

import functools

import pytest
import torch

from moe_dist.train import checkpoint as ckpt
from moe_dist.train.native_engine import NativeEngine
from moe_dist.train.trainer import Trainer
from trainer_helpers import RowsBatcher, make_cfg, tiny, tokens

LR, STEPS = 1e-4, 30        # 30 updates of 1e-4 each: far below bf16's spacing 2^-8 near 1.0, together above half of it


def _bf16_trainer(tmp_path, **train):
    cfg = make_cfg(tiny(), lr=LR, min_lr=LR, warmup_steps=0, weight_decay=0.0, grad_clip=0.0,
                   out_dir=str(tmp_path / "out"), **train)
    x, y = tokens(2)
    return Trainer(cfg, batcher=RowsBatcher(x, y, 2),
                   engine=functools.partial(NativeEngine, weights_dtype=torch.bfloat16))


def _unit_steps(engine, steps: int) -> None:
    """Every gradient 1 (the loss is the sum of all weights): Adam moves every weight by lr·1/(1+eps) a step."""
    for _ in range(steps):
        engine.zero_grad()
        engine.backward(sum(p.float().sum() for p in engine.model.parameters()))
        engine.reduce_and_clip(0.0)
        engine.step(LR)


@pytest.mark.parametrize("shard", ["none", "states+grads"])
def test_small_updates_accumulate_in_the_fp32_master(tmp_path, shard):
    trainer = _bf16_trainer(tmp_path, shard_optimizer=shard)
    engine = trainer.engine
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    assert all(b.master.dtype == torch.float32 and b.exp_avg.dtype == torch.float32 for b in engine.flat.buckets)
    norm = engine.model.blocks[0].attn_norm.weight                # RMSNorm weights start at exactly 1.0
    assert torch.equal(norm.float(), torch.ones_like(norm, dtype=torch.float32))
    init = {n: t["weight"].clone() for n, t in engine.flat.checkpoint_tensors().items()}
    _unit_steps(engine, STEPS)
    master = {n: t["weight"] for n, t in engine.flat.checkpoint_tensors().items()}
    for n in init:
        assert master[n].dtype == torch.float32
        torch.testing.assert_close(master[n], init[n] - STEPS * LR, rtol=0, atol=2e-6, msg=n)
    # The bf16 copy follows the master: 1 - 30e-4 rounds to the bf16 value below 1.0, 1 - 2^-8.
    assert torch.equal(norm.float(), torch.full_like(norm, 1 - 2 ** -8, dtype=torch.float32))

    # A bf16 optimizer on the same weights loses every one of these updates: 1 - 1e-4 rounds back to 1.0.
    naive = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = torch.optim.AdamW([naive], lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for _ in range(STEPS):
        naive.grad = torch.ones_like(naive)
        opt.step()
    assert torch.equal(naive, torch.ones_like(naive))


def test_checkpoint_holds_the_fp32_master_and_loads_into_fp32_weights(tmp_path):
    trainer = _bf16_trainer(tmp_path, shard_optimizer="states")
    _unit_steps(trainer.engine, 3)
    master = {n: t["weight"].clone() for n, t in trainer.engine.flat.checkpoint_tensors().items()}
    trainer.engine.save(tmp_path / "ck", 3, keep=1)
    cfg = make_cfg(tiny(), out_dir=str(tmp_path / "out2"))
    x, y = tokens(2)
    fp32 = Trainer(cfg, batcher=RowsBatcher(x, y, 2))               # the torch AdamW path, fp32 weights
    assert fp32.engine.flat is None
    fp32.engine.load(*ckpt.find(tmp_path / "ck", False))
    norm_name = "blocks.0.attn_norm.weight"
    for n, p in fp32.model.named_parameters():
        assert torch.equal(p, master[n]), n                          # not the bf16 copy's rounded values
        assert fp32.optimizer.state[p]["step"] == 3
    assert not torch.equal(master[norm_name], master[norm_name].bfloat16().float())
    # And back: the fp32 engine's checkpoint loads into bf16 weights with that master.
    fp32.engine.save(tmp_path / "ck2", 3, keep=1)
    again = _bf16_trainer(tmp_path / "again")
    again.engine.load(*ckpt.find(tmp_path / "ck2", False))
    for n, t in again.engine.flat.checkpoint_tensors().items():
        assert torch.equal(t["weight"], master[n]), n
        assert t["step"] == 3
