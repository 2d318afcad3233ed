"""`train.engine: deepspeed` against the native trainer, on gloo CPU ranks (DS_ACCELERATOR=cpu, fp32).

Parity: the same config, seeded weights and batches trained a few steps by the native `Trainer` and by
`DeepSpeedTrainer` in the same fresh processes (DeepSpeed's expert groups are process-global, so every case
gets its own spawn) give the same losses, gradient norms and parameters, with ZeRO-1 and ZeRO-2 (and stage 0,
where our own clipping replaces DeepSpeed's). Gradient clipping is active (a small train.grad_clip), so
DeepSpeed's global norm is checked against ours. Then the generated DeepSpeed JSON and its user override, and
the `deepspeed` launcher running `launch/deepspeed.sh` on 2 CPU processes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from moe_dist import config
from moe_dist.config import ConfigError

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
RTOL, ATOL = 1e-5, 1e-7


def tiny(tmp: Path, data: Path, ep: int, stage: int, accum: int = 1, **moe) -> dict:
    return {
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 16, "dense_hidden": 64, "first_dense": 0},
        "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32, "renormalize": True, "aux_loss_coef": 0.01,
                "z_loss_coef": 0.001, "num_shared_experts": 1, "balance_over": "global_batch", **moe},
        "parallel": {"ep": ep},
        "train": {"batch_size": 2, "seq_len": 16, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1,
                  "grad_clip": 0.05, "steps": STEPS, "grad_accum_steps": accum, "engine": "deepspeed", "zero_stage": stage,
                  "out_dir": str(tmp / "run")},
        "data": {"path": str(data)},
    }


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    from moe_dist.train.data import prepare
    path = tmp_path_factory.mktemp("ds_data") / "tok.bin"
    prepare(None, path, max_bytes=100_000)
    return path


def _both_engines(rank, world, raw):
    """Native trainer, then DeepSpeed, on the same ranks: per-step results and final local parameters."""
    from moe_dist.parallel.topology import ParallelDims, Topology
    from moe_dist.train.deepspeed_engine import DeepSpeedTrainer
    from moe_dist.train.trainer import Trainer
    cfg = config.from_dict(raw)
    config.validate(cfg)
    topo = Topology.build(ParallelDims.create(world, ep=cfg.parallel.ep, num_experts=cfg.moe.num_experts),
                          timeout_s=60)
    out = {}
    for name, cls in (("native", Trainer), ("deepspeed", DeepSpeedTrainer)):
        trainer = cls(cfg, topo=topo)
        init = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        steps = [trainer.train_step(s) for s in range(STEPS)]
        out[name] = {"loss": [s.loss for s in steps], "lm": [s.lm_loss for s in steps],
                     "aux": [s.aux_loss for s in steps], "z": [s.z_loss for s in steps], "norm": [s.grad_norm for s in steps],
                     "counts": [torch.stack(s.tokens_per_expert) for s in steps],
                     "init": init, "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                     "buffers": {n: b.clone() for n, b in trainer.model.named_buffers() if "expert_bias" in n},
                     "val": trainer.evaluate(2)}
    return out


def _check_parity(results, move_tol: float = RTOL):
    for rank, r in enumerate(results):
        nat, ds = r["native"], r["deepspeed"]
        for key in ("loss", "lm", "aux", "z", "norm"):
            torch.testing.assert_close(torch.tensor(ds[key], dtype=torch.float64),
                                       torch.tensor(nat[key], dtype=torch.float64), rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"rank {rank} {key}: {m}")
        # Clipping was active: a norm above grad_clip on every step (else the test would not check the rule).
        assert min(nat["norm"]) > 0.05
        for a, b in zip(ds["counts"], nat["counts"]):
            assert torch.equal(a, b)
        assert ds["params"].keys() == nat["params"].keys()
        worst = max(float((ds["params"][n] - nat["params"][n]).abs().max()
                          / (nat["params"][n] - nat["init"][n]).abs().max().clamp_min(1e-12)) for n in nat["params"])
        print(f"rank {rank}: largest parameter difference / largest move of its tensor = {worst:.2e}")
        for name in nat["params"]:
            torch.testing.assert_close(ds["init"][name], nat["init"][name], rtol=0, atol=0)
            # AdamW divides by sqrt(v) + eps: at elements whose gradient is near eps it turns fp32 rounding (another
            # summation order of the reductions) into visible differences; the absolute floor is a fraction of the
            # largest move of the tensor, so it still catches any update that went wrong.
            moved = float((nat["params"][name] - nat["init"][name]).abs().max())
            torch.testing.assert_close(ds["params"][name], nat["params"][name], rtol=RTOL,
                                       atol=max(ATOL, move_tol * moved),
                                       msg=lambda m: f"rank {rank} {name}: {m}")
        for name in nat["buffers"]:
            torch.testing.assert_close(ds["buffers"][name], nat["buffers"][name], rtol=RTOL, atol=ATOL)
        assert ds["val"] == pytest.approx(nat["val"], rel=RTOL)
        # The parameters moved: the comparison is of trained weights, not of the initial ones twice.
        assert nat["loss"][0] != nat["loss"][-1]


@pytest.mark.parametrize("stage,accum", [(1, 1), (2, 1), (2, 2), (0, 1)],
                         ids=["zero1", "zero2", "zero2-accum2", "zero0"])
def test_deepspeed_matches_native_ep2_on_2_ranks(tmp_path, tokens, stage, accum):
    results = run_ranks(_both_engines, 2, tiny(tmp_path, tokens, ep=2, stage=stage, accum=accum), timeout=300)
    # With accumulation ZeRO-2 reduces every micro-batch and sums the reduced gradients, the native trainer
    # sums first and reduces once: the same gradient up to rounding (losses and norms still agree to 1e-5).
    _check_parity(results, move_tol=RTOL if accum == 1 else 1e-4)


def test_zero2_matches_native_ep2_dp2_on_4_ranks_with_expert_bias(tmp_path, tokens):
    """EP=2 × EDP=2: expert gradients are reduced over {0,2} and {1,3}, dense ones over all four; the
    DeepSeek-style router (sigmoid, expert bias updated from the global counts) must follow too."""
    raw = tiny(tmp_path, tokens, ep=2, stage=2, score_func="sigmoid", expert_bias=True, aux_loss_type="seq",
               bias_update_rate=0.01)
    # Four ranks: reduce-scatter and all-reduce add the four partial gradients in different orders (with two
    # the sum is exact either way), so the parameters agree to rounding, as with accumulation.
    _check_parity(run_ranks(_both_engines, 4, raw, timeout=400), move_tol=1e-4)


# ---------------------------------------------------------------------------------------------------
# launch/deepspeed.sh: DeepSpeed's launcher starts 2 CPU processes running `moe-dist train`.

def test_launcher_script_trains_tiny_cpu_on_2_processes(tmp_path, tokens):
    from distributed import free_port
    env = {**os.environ, "NUM_GPUS": "2", "EP": "2", "MASTER_PORT": str(free_port()),
           "CONFIG": str(REPO / "configs" / "tiny-cpu.yaml"), "DS_ACCELERATOR": "cpu",
           "VIRTUAL_ENV": str(Path(sys.executable).parent.parent), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    overrides = ["--train.steps=3", "--train.batch_size=2", "--train.seq_len=32", "--model.max_seq_len=32",
                 "--model.n_layers=2", "--model.dim=64", "--model.dense_hidden=128", "--moe.expert_hidden=64",
                 "--train.zero_stage=2", "--train.eval_batches=1", f"--data.path={tokens}",
                 f"--train.out_dir={tmp_path / 'run'}"]
    r = subprocess.run([str(REPO / "launch" / "deepspeed.sh"), *overrides], capture_output=True, text=True,
                       timeout=400, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "world=2 dense: dp=2×tp=1  expert: edp=1×ep=2×etp=1" in r.stdout
    assert r.stdout.count("moe-dist train:") == 1             # rank 0 alone reports
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "lm_loss" in row]
    assert [row["step"] for row in steps] == [0, 1, 2]
    assert all(row["a2a_rows_out"] == row["a2a_rows_leaving"] > 0 for row in steps)
