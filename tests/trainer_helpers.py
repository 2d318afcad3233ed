"""Shared by the trainer's unit tests (tests/train/test_trainer.py) and its multi-rank tests
(tests/multirank/test_trainer_ranks.py): a tiny config, fixed token blocks and a batcher over them."""
from __future__ import annotations

import copy
import itertools
import os
import re
import tempfile
import uuid
from pathlib import Path

import torch

from moe_dist import config


# One folder per pytest session (set here, inherited by the ranks a test spawns), one per test, one per config a
# process makes: checkpoint.resume=never refuses a folder holding another run's checkpoints, so runs must not
# share one. The ranks of one run make their configs in the same order, so they agree on the folder.
os.environ.setdefault("MOE_DIST_TEST_SESSION", uuid.uuid4().hex[:8])
_CONFIGS_MADE = itertools.count()


def fresh_out_dir() -> str:
    test = os.environ.get("PYTEST_CURRENT_TEST", "no-test").split(" ")[0]
    role = "rank" if "RANK" in os.environ else "main"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", test)[-100:]
    return str(Path(tempfile.gettempdir()) / "moe_dist_trainer_test" / os.environ["MOE_DIST_TEST_SESSION"]
               / f"{name}-{role}{next(_CONFIGS_MADE)}")


def tiny(tp=1, ep=1, etp=1, **moe) -> dict:
    return {
        "model": {"dim": 32, "n_layers": 3, "n_heads": 2, "max_seq_len": 8, "dense_hidden": 32, "first_dense": 1},
        "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 16, "aux_loss_coef": 0.01, "z_loss_coef": 0.001,
                "balance_over": "global_batch", "num_shared_experts": 1, **moe},
        "parallel": {"tp": tp, "ep": ep, "etp": etp},
        "train": {"batch_size": 2, "seq_len": 8, "lr": 1e-2, "warmup_steps": 0, "steps": 4, "grad_clip": 0.5,
                  "tensorboard": False, "out_dir": fresh_out_dir()},
        "checkpoint": {"resume": "never"},
    }


def make_cfg(raw: dict, **train) -> config.Config:
    raw = copy.deepcopy(raw)
    raw["train"].update(train)
    cfg = config.from_dict(raw)
    config.validate(cfg)
    return cfg


def tokens(B: int, S: int = 8, seed: int = 0):
    t = torch.randint(0, 256, (B, S + 1), generator=torch.Generator().manual_seed(seed))
    return t[:, :-1], t[:, 1:]


class RowsBatcher:
    """get_batch(i) = rows [i·B, (i+1)·B) of a fixed token block (micro-batch i of a step's global batch)."""

    def __init__(self, x, y, B: int):
        self.x, self.y, self.B = x, y, B

    def get_batch(self, i: int):
        rows = slice((i * self.B) % len(self.x), (i * self.B) % len(self.x) + self.B)
        return self.x[rows], self.y[rows]
