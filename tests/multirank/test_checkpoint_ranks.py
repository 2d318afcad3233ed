"""Sharded checkpoints on 2 and 4 gloo ranks.

Exact resume: a run stopped at step s and resumed gives bit-identical losses to an uninterrupted run (2 and 4
gloo ranks, router jitter on so the per-rank RNG matters, expert bias on so buffers matter).
Reshard: a checkpoint written with one layout loads into another; the next steps' losses equal the original
layout's continued losses to fp32 tolerance (the global batch is the same in every layout).
SIGTERM on one rank: every rank saves and stops.
"""
from __future__ import annotations

import copy
import os
import signal
from pathlib import Path

import pytest
import torch

from checkpoint_helpers import G, GlobalBatcher, build_topo, corpus, make_cfg, tiny  # noqa: F401  (corpus: a fixture)
from distributed import run_ranks
from moe_dist.train.trainer import Trainer


# ------------------------------------------------------------------------------------ exact resume (N ranks)

def _resume_worker(rank, world, raw_by_name, root):
    out = {}
    for name, raw in raw_by_name.items():
        losses = {}
        for run in ("whole", "part1", "part2"):
            r = copy.deepcopy(raw)
            r["checkpoint"]["dir"] = str(Path(root) / name / ("whole" if run == "whole" else "parts"))
            r["train"]["out_dir"] = r["checkpoint"]["dir"] + "/out"
            cfg = make_cfg(r)
            trainer = Trainer(cfg, topo=build_topo(cfg, world))
            hist = trainer.fit(steps=2 if run == "part1" else None, progress=False)
            losses[run] = [(s.step, s.loss, s.lm_loss) for s in hist.steps]
            if run != "part1":
                losses[run + "_params"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
                losses[run + "_bias"] = [l.router.expert_bias_E.clone() for l in trainer.model.moe_layers]
            losses[run + "_resumed"] = str(trainer.resumed_from)
        out[name] = losses
    return out


RESUME_CASES = {2: {"ep2": tiny(1, 2, 1, jitter_eps=0.1)},
                4: {"tp2_ep2": tiny(2, 2, 1, jitter_eps=0.1), "etp2_ep2": tiny(1, 2, 2, jitter_eps=0.1)}}


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_resume_is_bit_identical(world, corpus, tmp_path):
    cases = {n: {**r, "data": {"path": str(corpus)}} for n, r in RESUME_CASES[world].items()}
    results = run_ranks(_resume_worker, world, cases, str(tmp_path), timeout=300)
    for name in cases:
        for rank, res in enumerate(results):
            r = res[name]
            assert r["part1_resumed"] == "None" and r["part2_resumed"].endswith("step_000002")
            assert [s for s, *_ in r["part2"]] == [2, 3]
            assert r["part2"] == r["whole"][2:], (name, rank)              # exact float equality
            for n, p in r["whole_params"].items():
                assert torch.equal(p, r["part2_params"][n]), (name, rank, n)
            for a, b in zip(r["whole_bias"], r["part2_bias"]):
                assert torch.equal(a, b) and a.abs().sum() > 0


# -------------------------------------------------------------------------------------------------- reshard



def _continue(raw: dict, world: int, cdir: str, resume: str, steps: int, out_dir: str = ""):
    """Train with the global batcher until `steps`; returns the (step, loss) of every step run."""
    cfg = make_cfg({**raw, "checkpoint": {"dir": cdir, "keep": 5, "resume": resume}})
    cfg.train.out_dir = out_dir or cdir + "/out"
    topo = build_topo(cfg, world)
    trainer = Trainer(cfg, topo=topo, batcher=GlobalBatcher(G, cfg.train.seq_len, topo.dp.rank, topo.dp.size))
    hist = trainer.fit(steps=steps, progress=False)
    return [(s.step, s.loss) for s in hist.steps], str(trainer.resumed_from)


def _save_then_continue(rank, world, raw, cdir):
    """Save at step 2, then record steps 2-3 of the same layout resumed from it; `latest` back to step 2."""
    _continue(raw, world, cdir, "never", 2)
    ref, _ = _continue(raw, world, cdir, "must", 4)
    torch.distributed.barrier()
    if rank == 0:
        (Path(cdir) / "latest").write_text("step_000002\n")
    torch.distributed.barrier()
    return ref


def _reshard_worker(rank, world, pairs, root, src_world2):
    out = {}
    for name, (src, dst) in pairs.items():
        cdir = str(Path(root) / name) if src is not None else src_world2
        ref = _save_then_continue(rank, world, src, cdir) if src is not None else None
        got, resumed = _continue(dst, world, cdir, "must", 4, out_dir=str(Path(root) / (name + "_dst")))
        out[name] = {"ref": ref, "got": got, "resumed": resumed}
    return out


def _lay(tp, ep, etp, world=4):
    return tiny(tp, ep, etp, batch_size=G * tp // world, steps=6)


RESHARD = {"dp4_to_ep2dp2": (_lay(1, 1, 1), _lay(1, 2, 1)),
           "tp2_to_tp1": (_lay(2, 1, 1), _lay(1, 1, 1)),
           "etp2ep2_to_ep4": (_lay(1, 2, 2), _lay(1, 4, 1))}
RESHARD_SLOW = {"ep2w2_to_ep4": (None, _lay(1, 4, 1)),          # saved on 2 ranks, loaded on 4
                "ep4_to_tp2ep2": (_lay(1, 4, 1), _lay(2, 2, 1))}


def _check_reshard(results, pairs, ref_w2=None):
    for name in pairs:
        r = results[0][name]
        ref = r["ref"] if r["ref"] is not None else ref_w2
        assert r["resumed"].endswith("step_000002"), r["resumed"]
        assert [s for s, _ in r["got"]] == [s for s, _ in ref] == [2, 3]
        for (_, got), (_, want) in zip(r["got"], ref):
            assert got == pytest.approx(want, rel=1e-5), name
        for other in results[1:]:
            assert other[name]["got"] == r["got"]                      # every rank logs the same global loss


def test_reshard_to_other_layouts(tmp_path):
    """DP=4 → EP=2×DP=2; TP=2 → TP=1; ETP=2×EP=2 → EP=4 (4 ranks): the continued losses match."""
    _check_reshard(run_ranks(_reshard_worker, 4, RESHARD, str(tmp_path), "", timeout=400), RESHARD)


@pytest.mark.slow
def test_reshard_across_world_sizes(tmp_path):
    """EP=2 on 2 ranks → EP=4 on 4 ranks; EP=4 → TP=2×EP=2."""
    ep2_w2 = str(tmp_path / "ep2_w2")
    ref_w2 = run_ranks(_save_then_continue, 2, _lay(1, 2, 1, world=2), ep2_w2, timeout=200)[0]
    results = run_ranks(_reshard_worker, 4, RESHARD_SLOW, str(tmp_path), ep2_w2, timeout=400)
    _check_reshard(results, RESHARD_SLOW, ref_w2)


# -------------------------------------------------------------------------------------------------- SIGTERM

def _sigterm_worker(rank, world, raw):
    cfg = make_cfg(raw)
    trainer = Trainer(cfg, topo=build_topo(cfg, world), batcher=GlobalBatcher(G, 8, rank, world))

    def on_step(r):
        if rank == 1 and r.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)        # one rank only: the others must agree and save too
    hist = trainer.fit(progress=False, on_step=on_step)
    return {"steps": [s.step for s in hist.steps], "stopped": trainer.stopped_at,
            "saved": str(trainer.last_checkpoint)}


def test_sigterm_saves_on_every_rank_and_stops(tmp_path):
    raw = tiny(1, 2, 1, batch_size=2, steps=6, ckpt_dir=str(tmp_path / "ck"))
    results = run_ranks(_sigterm_worker, 2, raw, timeout=200)
    for r in results:
        assert r["steps"] == [0, 1] and r["stopped"] == 2 and r["saved"].endswith("step_000002")
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step_000002"
