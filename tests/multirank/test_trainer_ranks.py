"""Trainer features on 2 (and, with --run-slow, 4) gloo ranks: the global gradient norm equals one process's,
and a non-finite loss on one rank makes every rank raise naming the router, or skip the step."""
from __future__ import annotations

import pytest
import torch

from distributed import run_ranks
from moe_dist.models.gpt import MoEGPT
from moe_dist.parallel.grads import global_grad_norm, reduce_gradients
from moe_dist.parallel.layout import check_layout
from moe_dist.parallel.topology import Topology
from moe_dist.train.trainer import Trainer
from trainer_helpers import RowsBatcher, make_cfg, tiny, tokens


NORM_LAYOUTS = {2: {"ep2": (1, 2, 1), "tp2": (2, 1, 1)}, 4: {"ep2_dp2": (1, 2, 1), "tp2_ep2": (2, 2, 1)}}


def _norm(rank, world, layouts, G):
    out = {}
    x, y = tokens(G, seed=3)
    for name, (tp, ep, etp) in layouts.items():
        cfg = make_cfg(tiny(tp, ep, etp), batch_size=G // (world // tp))
        topo = Topology.build(check_layout(cfg, world), timeout_s=60)
        model = MoEGPT(cfg, topo)
        B = cfg.train.batch_size
        model(x[topo.dp.rank * B:(topo.dp.rank + 1) * B], y[topo.dp.rank * B:(topo.dp.rank + 1) * B]).loss.backward()
        reduce_gradients(model, topo)
        out[name] = global_grad_norm(model, topo)
    return out


def _nonfinite(rank, world, mode):
    cfg = make_cfg(tiny(1, 2, 1), on_nonfinite=mode)
    topo = Topology.build(check_layout(cfg, world), timeout_s=60)
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
