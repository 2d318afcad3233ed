"""moe_dist.parallel.topology: rank groups equal Megatron-core's RankGenerator for every small layout (with and
without pipeline stages), coordinates agree with the groups, and `Topology.build` makes the groups it describes.
(Bad layouts: tests/parallel/test_layout.py.)"""
from __future__ import annotations

import itertools

import pytest

from moe_dist.parallel.tensor_parallel import Shard, global_shape, local_slice
from moe_dist.parallel.topology import ALL_GROUP_NAMES, GROUP_NAMES, ParallelDims, Topology

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


# pp > 1: pp is the slowest axis of both views (Megatron-core's order tp-cp-ep-dp-pp).
PP_LAYOUTS = [(w, tp, ep, etp, pp) for w in (2, 4, 8, 16, 32) for pp in (2, 4)
              for tp, ep, etp in itertools.product((1, 2, 4), (1, 2, 4), (1, 2))
              if w % (tp * pp) == 0 and w % (pp * ep * etp) == 0]


def _megatron_groups(d: ParallelDims) -> dict[str, list[list[int]]]:
    from megatron.core.parallel_state import RankGenerator, default_embedding_ranks
    dense = RankGenerator(tp=d.tp, ep=1, dp=d.dp, pp=d.pp, cp=1, order="tp-cp-ep-dp-pp")
    expert = RankGenerator(tp=d.etp, ep=d.ep, dp=d.edp, pp=d.pp, cp=1, order="tp-cp-ep-dp-pp")
    assert expert.get_ranks("pp") == dense.get_ranks("pp")             # both views agree on the stages
    assert expert.get_ranks("tp-ep-dp") == dense.get_ranks("tp-dp")
    return {"tp": dense.get_ranks("tp"), "dp": dense.get_ranks("dp"), "etp": expert.get_ranks("tp"),
            "ep": expert.get_ranks("ep"), "edp": expert.get_ranks("dp"), "expert_mp": expert.get_ranks("tp-ep"),
            "pp": dense.get_ranks("pp"), "stage": dense.get_ranks("tp-dp"),
            "embed": [default_embedding_ranks(g) for g in dense.get_ranks("pp")]}


def test_pipeline_layouts_match_megatron_rank_generator() -> None:
    assert len(PP_LAYOUTS) > 60
    for world, tp, ep, etp, pp in PP_LAYOUTS:
        d = ParallelDims(world=world, tp=tp, ep=ep, etp=etp, pp=pp)
        want = _megatron_groups(d)
        for name in ALL_GROUP_NAMES:
            assert d.rank_groups(name) == want[name], (world, tp, ep, etp, pp, name)


def test_pp1_pipeline_groups_are_trivial() -> None:
    for world, tp, ep, etp in LAYOUTS[::7]:
        d = ParallelDims(world=world, tp=tp, ep=ep, etp=etp)
        assert d.rank_groups("pp") == d.rank_groups("embed") == [[r] for r in range(world)]
        assert d.rank_groups("stage") == [list(range(world))]
        assert d.coords(world - 1)["pp"] == 0
        assert d.rank_groups("pp") == _megatron_groups(d)["pp"]


@pytest.mark.parametrize("world,tp,ep,etp,pp", [(8, 2, 2, 1, 2), (16, 1, 2, 2, 4), (8, 1, 1, 1, 4), (4, 2, 1, 1, 2)])
def test_pipeline_coordinates_are_positions_in_the_groups(world, tp, ep, etp, pp) -> None:
    d = ParallelDims(world=world, tp=tp, ep=ep, etp=etp, pp=pp)
    assert d.dp == world // (tp * pp) and d.edp == world // (pp * ep * etp)
    for rank in range(world):
        topo = Topology.virtual(d, rank)
        c = d.coords(rank)
        assert rank == c["tp"] + tp * (c["dp"] + d.dp * c["pp"])
        assert rank == c["etp"] + etp * (c["ep"] + ep * (c["edp"] + d.edp * c["pp"]))
        for axis in ("tp", "dp", "etp", "ep", "edp", "pp"):
            assert topo.groups[axis].rank == c[axis]
            assert topo.groups[axis].ranks[c[axis]] == rank
        # Every group of either view lies inside this rank's stage.
        assert set(topo.stage.ranks) == {r for r in range(world) if d.coords(r)["pp"] == c["pp"]}
        for name in GROUP_NAMES:
            assert set(topo.groups[name].ranks) <= set(topo.stage.ranks)
        # Point-to-point neighbours and the embedding group.
        s = topo.pp.rank
        nxt, prev = topo.pp.ranks[(s + 1) % pp], topo.pp.ranks[(s - 1) % pp]
        assert d.coords(nxt)["pp"] == (s + 1) % pp and d.coords(prev)["pp"] == (s - 1) % pp
        assert {d.coords(nxt)[a] for a in ("tp", "dp")} == {c[a] for a in ("tp", "dp")} or tp * d.dp == 1
        if s in (0, pp - 1):
            assert topo.embed.ranks == (topo.pp.ranks[0], topo.pp.ranks[-1])
        else:
            assert topo.embed.ranks == (rank,) and topo.embed.rank == 0


def test_describe_names_pp_only_when_pipelined() -> None:
    assert ParallelDims(world=8, tp=2, ep=2).describe() == "world=8 dense: dp=4×tp=2  expert: edp=4×ep=2×etp=1"
    assert ParallelDims(world=8, tp=2, ep=2, pp=2).describe() == \
        "world=8 dense: pp=2×dp=2×tp=2  expert: pp=2×edp=2×ep=2×etp=1"


def _build_and_reduce(rank, world, pp, ep):
    import torch
    import torch.distributed as dist
    d = ParallelDims(world=world, ep=ep, pp=pp)
    topo = Topology.build(d, timeout_s=60)
    out = {}
    for name in ALL_GROUP_NAMES:
        g = topo.groups[name]
        x = torch.tensor([float(rank)])
        if g.size > 1:
            dist.all_reduce(x, group=g.handle)
        out[name] = (g.ranks, g.rank, x.item(), g.handle is dist.group.WORLD)
    return out


# pp=1 builds run in every multi-rank test; this one only adds that its stage group is the world group itself.
@pytest.mark.parametrize("world,pp,ep", [(4, 2, 2), pytest.param(2, 1, 2, marks=pytest.mark.slow)])
def test_build_makes_the_groups_it_describes(world, pp, ep) -> None:
    """On gloo ranks: the built groups equal the virtual ones and a sum over each adds exactly its ranks;
    with pp=1 the stage group is the world itself (no second communicator)."""
    from distributed import run_ranks
    results = run_ranks(_build_and_reduce, world, pp, ep)
    d = ParallelDims(world=world, ep=ep, pp=pp)
    for rank, got in enumerate(results):
        virtual = Topology.virtual(d, rank)
        for name, (ranks, index, total, is_world) in got.items():
            assert (ranks, index) == (virtual.groups[name].ranks, virtual.groups[name].rank), (rank, name)
            assert total == sum(ranks), (rank, name)
        assert got["stage"][3] == (pp == 1)
