"""Shared by the DeepSpeed engine tests (tests/train/test_deepspeed_engine.py,
tests/multirank/test_deepspeed_ranks.py, tests/system/test_deepspeed_launch.py): a tiny config for
`train.engine: deepspeed` and a small token corpus."""
from __future__ import annotations

from pathlib import Path

import pytest

STEPS = 3
RTOL, ATOL = 1e-5, 1e-7


def tiny(tmp: Path, data: Path, ep: int, stage: int, accum: int = 1, **moe) -> dict:
    return {
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 16, "dense_hidden": 64, "first_dense": 0},
        "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32, "renormalize": True, "aux_loss_coef": 0.01,
                "z_loss_coef": 0.001, "num_shared_experts": 1, "balance_over": "global_batch", **moe},
        "parallel": {"ep": ep},
        "train": {"batch_size": 2, "seq_len": 16, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1,
                  "grad_clip": 0.05, "steps": STEPS, "grad_accum_steps": accum, "engine": "deepspeed",
                  "zero_stage": stage,
                  "out_dir": str(tmp / "run")},
        "data": {"path": str(data)},
    }


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    from moe_dist.train.data import prepare
    path = tmp_path_factory.mktemp("ds_data") / "tok.bin"
    prepare(None, path, max_bytes=100_000)
    return path
