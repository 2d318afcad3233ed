"""Shared by the checkpoint tests (tests/train/test_checkpoint.py, tests/multirank/test_checkpoint_ranks.py,
tests/system/test_checkpoint_cli.py): a tiny config, its topology, the same global batch in every layout, and a
small token corpus."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_dist import config
from moe_dist.parallel.layout import check_layout
from moe_dist.parallel.topology import Topology
from moe_dist.train.data import prepare

G = 4   # sequences per global batch, the same in every layout


def tiny(tp=1, ep=1, etp=1, *, batch_size=2, steps=4, ckpt_dir="", data="", **moe) -> dict:
    return {
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 8, "dense_hidden": 32, "first_dense": 1},
        "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 16, "aux_loss_coef": 0.01, "z_loss_coef": 0.001,
                "balance_over": "global_batch", "expert_bias": True, "num_shared_experts": 1, **moe},
        "parallel": {"tp": tp, "ep": ep, "etp": etp},
        "train": {"batch_size": batch_size, "seq_len": 8, "lr": 1e-2, "warmup_steps": 1, "steps": steps,
                  "out_dir": str(Path(ckpt_dir) / "out"), "tensorboard": False},
        "data": {"path": data},
        "checkpoint": {"dir": ckpt_dir, "keep": 3},
    }


def make_cfg(raw: dict) -> config.Config:
    cfg = config.from_dict(raw)
    config.validate(cfg)
    return cfg


def build_topo(cfg: config.Config, world: int) -> Topology:
    return Topology.build(check_layout(cfg, world), timeout_s=60)


class GlobalBatcher:
    """The same global batch of G sequences per step in every layout; dp rank r reads rows r·G/dp ..."""

    def __init__(self, G: int, seq: int, dp_rank: int, dp: int):
        self.G, self.seq, self.rank, self.dp = G, seq, dp_rank, dp

    def get_batch(self, step: int):
        g = torch.Generator().manual_seed(1000 + step)
        tok = torch.randint(0, 256, (self.G, self.seq + 1), generator=g)
        rows = slice(self.rank * self.G // self.dp, (self.rank + 1) * self.G // self.dp)
        return tok[rows, :-1], tok[rows, 1:]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckdata") / "tok.bin"
    prepare(None, out, max_bytes=60_000)
    return out
