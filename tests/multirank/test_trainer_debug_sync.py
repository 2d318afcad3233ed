"""parallel.debug_sync inside a real training run on 2 gloo ranks (EP=2): it changes no number, and a rank that
sends other split sizes stops both ranks at once with the step and the MoE layer named."""
from __future__ import annotations

import torch

from distributed import run_ranks
from moe_dist.moe import dispatch
from moe_dist.parallel import comm
from moe_dist.parallel.layout import check_layout
from moe_dist.parallel.topology import Topology
from moe_dist.train.trainer import Trainer
from trainer_helpers import RowsBatcher, make_cfg, tiny, tokens


def _train(rank, world, debug, tamper, out_dir):
    raw = tiny(1, 2, 1)
    raw["parallel"]["debug_sync"] = debug
    cfg = make_cfg(raw, out_dir=out_dir)
    topo = Topology.build(check_layout(cfg, world), timeout_s=60)
    x, y = tokens(4, seed=rank)
    trainer = Trainer(cfg, topo=topo, batcher=RowsBatcher(x, y, 2))
    if tamper and rank == 1:
        real = dispatch.all_to_all

        def shifted(x_, send, recv, group):
            # From step 1 on, rank 1 claims one row more from rank 0 and one fewer from itself (same total).
            if comm._PROGRESS.where.get("step") == 1 and recv[1] > 0:
                recv = [recv[0] + 1, recv[1] - 1]
            return real(x_, send, recv, group)
        dispatch.all_to_all = shifted
    gathers = []
    try:
        with comm.observe_collectives(lambda c: gathers.append(c.op) if c.op == "all_gather" else None):
            trainer.fit(steps=2, progress=False)
    except comm.DesyncError as e:
        return {"error": str(e)}
    return {"losses": [s.loss for s in trainer.history.steps], "all_gathers": len(gathers)}


def test_debug_sync_changes_nothing_and_compares_before_every_all_to_all(tmp_path):
    plain = run_ranks(_train, 2, False, False, str(tmp_path / "plain"), timeout=240)
    synced = run_ranks(_train, 2, True, False, str(tmp_path / "synced"), timeout=240)
    for a, b in zip(plain, synced):
        assert a["losses"] == b["losses"]
        # 2 MoE layers × (dispatch + combine) × (forward + backward) × 2 steps = 16 digests at least
        assert b["all_gathers"] - a["all_gathers"] >= 16


def test_a_rank_with_other_split_sizes_stops_both_naming_step_and_layer(tmp_path):
    out = run_ranks(_train, 2, True, True, str(tmp_path), timeout=240)
    for r in out:
        msg = r.get("error")
        assert msg is not None, "the desync was not detected"
        assert "step 1, blocks.1.mlp" in msg
        assert "rank 0 sends" in msg and "which expects" in msg
