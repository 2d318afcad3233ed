"""Trainer features: gradient accumulation, activation checkpointing, the global gradient norm against one
process, non-finite losses (raise naming the router's layer, or skip on every rank), evaluation and seeds."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from distributed import run_ranks
from moe_dist import config
from moe_dist.models.gpt import MoEGPT
from moe_dist.parallel.grads import global_grad_norm, reduce_gradients
from moe_dist.parallel.tensor_parallel import local_slice
from moe_dist.parallel.topology import ParallelDims, Topology
from moe_dist.train.data import prepare
from moe_dist.train.trainer import Trainer


def tiny(tp=1, ep=1, etp=1, **moe) -> dict:
    return {
        "model": {"dim": 32, "n_layers": 3, "n_heads": 2, "max_seq_len": 8, "dense_hidden": 32, "first_dense": 1},
        "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 16, "aux_loss_coef": 0.01, "z_loss_coef": 0.001,
                "balance_over": "global_batch", "num_shared_experts": 1, **moe},
        "parallel": {"tp": tp, "ep": ep, "etp": etp},
        "train": {"batch_size": 2, "seq_len": 8, "lr": 1e-2, "warmup_steps": 0, "steps": 4, "grad_clip": 0.5,
                  "tensorboard": False, "out_dir": "/tmp/moe_dist_trainer_test"},
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


# ------------------------------------------------------------------------------- activation checkpointing

@pytest.mark.parametrize("moe", [{}, {"jitter_eps": 0.2, "capacity_factor": 1.0, "min_capacity": 1}])
def test_activation_checkpointing_gives_the_same_gradients(moe):
    """Recomputing each block in backward replays its RNG (router jitter) and routing, so gradients are equal."""
    x, y = tokens(2)
    grads = []
    for ckpt in (False, True):
        cfg = make_cfg(tiny(**moe), activation_checkpointing=ckpt)
        torch.manual_seed(5)
        model = MoEGPT(cfg)
        out = model(x, y)
        out.loss.backward()
        grads.append((float(out.loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert grads[0][0] == grads[1][0]
    for n, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][n], g, rtol=1e-6, atol=1e-8, msg=n)


# ----------------------------------------------------------------------------- multi-rank: norm, NaN, skip

NORM_LAYOUTS = {2: {"ep2": (1, 2, 1), "tp2": (2, 1, 1)}, 4: {"ep2_dp2": (1, 2, 1), "tp2_ep2": (2, 2, 1)}}


def _norm(rank, world, layouts, G):
    out = {}
    x, y = tokens(G, seed=3)
    for name, (tp, ep, etp) in layouts.items():
        cfg = make_cfg(tiny(tp, ep, etp), batch_size=G // (world // tp))
        topo = Topology.build(ParallelDims.create(world, tp, ep, etp, 4), timeout_s=60)
        model = MoEGPT(cfg, topo)
        B = cfg.train.batch_size
        model(x[topo.dp.rank * B:(topo.dp.rank + 1) * B], y[topo.dp.rank * B:(topo.dp.rank + 1) * B]).loss.backward()
        reduce_gradients(model, topo)
        out[name] = global_grad_norm(model, topo)
    return out


def _nonfinite(rank, world, mode):
    cfg = make_cfg(tiny(1, 2, 1), on_nonfinite=mode)
    topo = Topology.build(ParallelDims.create(world, 1, 2, 1, 4), timeout_s=60)
    x, y = tokens(4, seed=rank)
    trainer = Trainer(cfg, topo=topo, batcher=RowsBatcher(x, y, 2))
    router = trainer.model.blocks[2].mlp.router         # the second MoE layer (layer 0 is dense)
    state = {}

    def poison(mod, args):
        # Rank 1 only, step 1 only: its router input (and so its logits) becomes NaN.
        return (args[0] * float("nan"),) if rank == 1 and state.get("step") == 1 else None
    router.register_forward_pre_hook(poison)
    snapshots = []

    def on_step(r):
        state["step"] = r.step + 1
        snapshots.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    try:
        trainer.fit(steps=3, progress=False, on_step=on_step)
    except FloatingPointError as e:
        return {"error": str(e)}
    hist = trainer.history
    return {"skipped": [s.skipped for s in hist.steps], "count": hist.skipped_steps,
            "unchanged": all(torch.equal(snapshots[0][n], snapshots[1][n]) for n in snapshots[0]),
            "changed_after": any(not torch.equal(snapshots[1][n], snapshots[2][n]) for n in snapshots[0]),
            "finite_after": all(torch.isfinite(p).all() for p in trainer.model.parameters())}


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_global_norm_equals_one_process(world):
    """The clip norm counts expert gradients once across EP ranks and dense ones once across TP ranks."""
    G = 4
    ranks = run_ranks(_norm, world, NORM_LAYOUTS[world], G, timeout=200)
    x, y = tokens(G, seed=3)
    ref_model = MoEGPT(make_cfg(tiny(), batch_size=G))
    ref_model(x, y).loss.backward()
    ref = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref_model.parameters()]))
    for name in NORM_LAYOUTS[world]:
        for r in ranks:
            assert r[name] == pytest.approx(float(ref), rel=1e-5), name


def _both_modes(rank, world):
    return {mode: _nonfinite(rank, world, mode) for mode in ("raise", "skip")}


def test_nonfinite_raise_or_skip_on_every_rank():
    """Rank 1's router of layer 2 goes NaN at step 1: every rank raises naming it, or every rank skips the step."""
    results = run_ranks(_both_modes, 2, timeout=200)
    for res in results:
        r = res["raise"]
        assert "error" in r, r
        assert "step 1:" in r["error"] and "layer 2 (blocks.2.mlp.router)" in r["error"]
        assert "train.on_nonfinite=skip" in r["error"]
        r = res["skip"]
        assert r["skipped"] == [False, True, False] and r["count"] == 1
        assert r["unchanged"] and r["changed_after"] and r["finite_after"]


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
