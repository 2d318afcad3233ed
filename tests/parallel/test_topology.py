"""moe_dist.parallel.topology: rank groups equal Megatron-core's RankGenerator for every small layout,
and coordinates agree with the groups. (Bad layouts: tests/parallel/test_layout.py.)"""
from __future__ import annotations

import itertools

import pytest

from moe_dist.parallel.tensor_parallel import Shard, global_shape, local_slice
from moe_dist.parallel.topology import GROUP_NAMES, ParallelDims, Topology

LAYOUTS = [(w, tp, ep, etp) for w in (1, 2, 4, 8, 16, 32)
           for tp, ep, etp in itertools.product((1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4))
           if w % tp == 0 and w % (ep * etp) == 0]


def test_every_small_layout_matches_megatron_rank_generator() -> None:
    from megatron.core.parallel_state import RankGenerator
    assert len(LAYOUTS) > 100
    for world, tp, ep, etp in LAYOUTS:
        d = ParallelDims(world=world, tp=tp, ep=ep, etp=etp)
        dense = RankGenerator(tp=tp, ep=1, dp=d.dp, pp=1, cp=1, order="tp-cp-ep-dp-pp")
        expert = RankGenerator(tp=etp, ep=ep, dp=d.edp, pp=1, cp=1, order="tp-cp-ep-dp-pp")
        want = {"tp": dense.get_ranks("tp"), "dp": dense.get_ranks("dp"), "etp": expert.get_ranks("tp"),
                "ep": expert.get_ranks("ep"), "edp": expert.get_ranks("dp"), "expert_mp": expert.get_ranks("tp-ep")}
        for name in GROUP_NAMES:
            assert d.rank_groups(name) == want[name], (world, tp, ep, etp, name)


@pytest.mark.parametrize("world,tp,ep,etp", [(8, 2, 2, 2), (16, 4, 4, 1), (4, 1, 2, 2)])
def test_coordinates_are_positions_in_the_groups(world, tp, ep, etp) -> None:
    d = ParallelDims(world=world, tp=tp, ep=ep, etp=etp)
    for rank in range(world):
        topo = Topology.virtual(d, rank)
        c = d.coords(rank)
        for axis in ("tp", "dp", "etp", "ep", "edp"):
            assert topo.groups[axis].rank == c[axis]
            assert topo.groups[axis].ranks[c[axis]] == rank
        assert topo.groups["world"].ranks == tuple(range(world))


def test_local_slices_tile_the_global_tensor() -> None:
    # [gate | up] split in 2 blocks over etp=2: each rank keeps matching gate and up columns.
    import torch
    d = ParallelDims(world=4, ep=2, etp=2)
    full = torch.arange(4 * 3 * 8).reshape(4, 3, 8)
    shards = (Shard(0, "ep"), Shard(2, "etp", chunks=2))
    parts = {}
    for rank in range(4):
        topo = Topology.virtual(d, rank)
        part = local_slice(full, shards, topo)
        assert part.shape == (2, 3, 4) and global_shape(part.shape, shards, topo) == full.shape
        parts[(topo.ep.rank, topo.etp.rank)] = part
    # rank with etp=1 holds gate columns 2,3 and up columns 6,7 of experts 2,3 (ep=1)
    assert torch.equal(parts[(1, 1)], full[2:4][:, :, [2, 3, 6, 7]])
    stacked = torch.cat([torch.cat([parts[(e, 0)][..., :2], parts[(e, 1)][..., :2],
                                    parts[(e, 0)][..., 2:], parts[(e, 1)][..., 2:]], -1) for e in (0, 1)])
    assert torch.equal(stacked, full)
