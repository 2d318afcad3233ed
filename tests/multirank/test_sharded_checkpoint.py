"""Checkpoints of the sharded optimizer (`train.shard_optimizer`) across layouts, on gloo ranks.

A checkpoint stores every parameter and AdamW moment as a global tensor whichever way the optimizer state was
sharded when it was written, so a sharded run's checkpoint loads into an unsharded layout and the reverse. Each
case trains the source layout 4 steps straight (saving at step 2 on the way), points `latest` back at step 2,
and resumes the destination layout from there: its steps 2-3 must give the source's own steps 2-3 to fp32
rounding. The global batch is the same in every layout (checkpoint_helpers.GlobalBatcher).

- EP=2×DP=2 sharded over dp=4 (dense) and edp=2 (experts) → EP=4 unsharded, on 4 ranks;
- DP=4 unsharded on 4 ranks → DP=2 sharded on 2 ranks (another world size and shard count).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from checkpoint_helpers import G, GlobalBatcher, build_topo, corpus, make_cfg, tiny  # noqa: F401  (corpus: a fixture)
from distributed import run_ranks
from moe_dist.train.trainer import Trainer

RTOL = 1e-5


def _layout(ep: int, world: int, shard: str, data: Path) -> dict:
    raw = tiny(1, ep, 1, batch_size=G // world, steps=6, data=str(data))
    raw["train"]["shard_optimizer"] = shard
    return raw


def _fit(raw: dict, world: int, cdir: str, resume: str, steps: int, out_dir: str, every: int = 0):
    cfg = make_cfg({**raw, "checkpoint": {"dir": cdir, "keep": 5, "resume": resume, "every": every}})
    cfg.train.out_dir = out_dir
    topo = build_topo(cfg, world)
    trainer = Trainer(cfg, topo=topo, batcher=GlobalBatcher(G, cfg.train.seq_len, topo.dp.rank, topo.dp.size))
    hist = trainer.fit(steps=steps, progress=False)
    return {"steps": [(s.step, s.loss) for s in hist.steps], "resumed": str(trainer.resumed_from),
            "optimizer_bytes": _optimizer_bytes(trainer)}


def _optimizer_bytes(trainer) -> int:
    """This rank's optimizer-state bytes as its engine reports them: proof that the sharding was in effect."""
    return int(trainer.engine.memory()["optimizer"])


def _source(rank, world, raw, cdir):
    """4 steps straight (saves at 2 and 4); `latest` goes back to step 2 for the destination to resume."""
    import torch
    out = _fit(raw, world, cdir, "never", 4, cdir + "/out", every=2)
    torch.distributed.barrier()
    if rank == 0:
        (Path(cdir) / "latest").write_text("step_000002\n")
    torch.distributed.barrier()
    return out


def _destination(rank, world, raw, cdir, out_dir):
    return _fit(raw, world, cdir, "must", 4, out_dir)


def _source_then_destination(rank, world, src, dst, cdir, out_dir):
    return {"src": _source(rank, world, src, cdir), "dst": _destination(rank, world, dst, cdir, out_dir)}


def _check(src: list[dict], dst: list[dict]) -> None:
    ref = src[0]["steps"]
    assert [s for s, _ in ref] == [0, 1, 2, 3]
    for r in dst:
        assert r["resumed"].endswith("step_000002"), r["resumed"]
        assert [s for s, _ in r["steps"]] == [2, 3]
        for (step, got), (_, want) in zip(r["steps"], ref[2:]):
            assert got == pytest.approx(want, rel=RTOL), (step, got, want)
        assert r["steps"] == dst[0]["steps"]                  # every rank logs the same global loss
    # The steps before the save moved the loss: the comparison is of a trained state, not of the initial one.
    assert ref[0][1] != ref[2][1]


@pytest.mark.slow       # one 4-rank spawn training 6 steps in two layouts
def test_sharded_ep2_dp2_checkpoint_loads_into_unsharded_ep4(tmp_path, corpus):
    src, dst = _layout(2, 4, "states", corpus), _layout(4, 4, "none", corpus)
    res = run_ranks(_source_then_destination, 4, src, dst, str(tmp_path / "ck"), str(tmp_path / "dst"),
                    timeout=600)
    # Sharded: dense state over dp=4, expert state over edp=2; unsharded EP=4 holds all of its own experts'.
    assert all(r["src"]["optimizer_bytes"] < r["dst"]["optimizer_bytes"] for r in res)
    _check([r["src"] for r in res], [r["dst"] for r in res])


@pytest.mark.slow       # a 4-rank spawn, then a 2-rank one
def test_unsharded_dp4_checkpoint_loads_into_sharded_dp2_on_2_ranks(tmp_path, corpus):
    cdir = str(tmp_path / "ck")
    src = run_ranks(_source, 4, _layout(1, 4, "none", corpus), cdir, timeout=400)
    dst = run_ranks(_destination, 2, _layout(1, 2, "states+grads", corpus), cdir, str(tmp_path / "dst"),
                    timeout=400)
    # DP=4 unsharded holds the whole state on every rank; DP=2 sharded half of it.
    assert all(d["optimizer_bytes"] < s["optimizer_bytes"] for s in src for d in dst)
    _check(src, dst)
