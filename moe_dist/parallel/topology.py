"""The parallel layout: one world, two views over the same ranks (Megatron-core's "parallel folding").

    dense view   rank = tp_rank + tp·dp_rank                      (attention, dense MLPs, router)
    expert view  rank = etp_rank + etp·(ep_rank + ep·edp_rank)    (routed experts)

`tp` varies fastest, then `ep`, then the data-parallel index: the order Megatron-core's `RankGenerator`
uses for `tp-cp-ep-dp-pp` with cp = pp = 1, so every rank→group map here equals Megatron-core's.

`ParallelDims` is pure arithmetic (no process group) on sizes that `moe_dist.parallel.layout.check_layout`
has judged (that function returns it): `moe-dist plan` uses it before any process starts. `Topology` adds this process's rank and the process groups, built once by
`Topology.build` and passed explicitly to every module that communicates.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

# Group name → the axes (of the view it belongs to) that vary inside one group.
DENSE_GROUPS = {"tp": ("tp",), "dp": ("dp",)}
EXPERT_GROUPS = {"etp": ("etp",), "ep": ("ep",), "edp": ("edp",), "expert_mp": ("etp", "ep")}
GROUP_NAMES = tuple(DENSE_GROUPS) + tuple(EXPERT_GROUPS)


def orthogonal_groups(sizes: dict[str, int], varying: tuple[str, ...]) -> list[list[int]]:
    """Rank groups of a mixed-radix layout. `sizes` lists the axes fastest first; ranks in one group share
    every axis not in `varying`. Groups are ordered by the fixed coordinates, fastest axis first."""
    names = list(sizes)
    strides, s = {}, 1
    for n in names:
        strides[n] = s
        s *= sizes[n]
    fixed = [n for n in names if n not in varying]
    groups = []
    # itertools.product varies its last argument fastest; reverse so the fastest axis leads.
    for fixed_coords in itertools.product(*(range(sizes[n]) for n in reversed(fixed))):
        base = sum(c * strides[n] for n, c in zip(reversed(fixed), fixed_coords))
        ranks = [base + sum(c * strides[n] for n, c in zip(reversed(varying), inner))
                 for inner in itertools.product(*(range(sizes[n]) for n in reversed(varying)))]
        groups.append(sorted(ranks))
    return groups


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    world: int
    tp: int = 1
    ep: int = 1
    etp: int = 1

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def edp(self) -> int:
        return self.world // (self.ep * self.etp)

    def dense_sizes(self) -> dict[str, int]:
        return {"tp": self.tp, "dp": self.dp}

    def expert_sizes(self) -> dict[str, int]:
        return {"etp": self.etp, "ep": self.ep, "edp": self.edp}

    def rank_groups(self, name: str) -> list[list[int]]:
        if name in DENSE_GROUPS:
            return orthogonal_groups(self.dense_sizes(), DENSE_GROUPS[name])
        if name in EXPERT_GROUPS:
            return orthogonal_groups(self.expert_sizes(), EXPERT_GROUPS[name])
        raise ValueError(f"unknown group '{name}'; known: {', '.join(GROUP_NAMES)}")

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index on every axis of both views."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} is outside the world of {self.world}")
        return {"tp": rank % self.tp, "dp": rank // self.tp,
                "etp": rank % self.etp, "ep": rank // self.etp % self.ep, "edp": rank // (self.etp * self.ep)}

    def describe(self) -> str:
        return f"world={self.world} dense: dp={self.dp}×tp={self.tp}  expert: edp={self.edp}×ep={self.ep}×etp={self.etp}"


@dataclass(frozen=True)
class Group:
    """One process group seen from one rank: its ranks, this rank's index in it, and the handle
    (None when the group has a single member or when no process group exists, e.g. on the meta device)."""
    ranks: tuple[int, ...]
    rank: int
    handle: Optional[dist.ProcessGroup] = None

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclass(frozen=True)
class Topology:
    dims: ParallelDims
    rank: int
    groups: dict[str, Group] = field(default_factory=dict)

    @property
    def tp(self) -> Group:
        return self.groups["tp"]

    @property
    def dp(self) -> Group:
        return self.groups["dp"]

    @property
    def ep(self) -> Group:
        return self.groups["ep"]

    @property
    def etp(self) -> Group:
        return self.groups["etp"]

    @property
    def edp(self) -> Group:
        return self.groups["edp"]

    @property
    def expert_mp(self) -> Group:
        return self.groups["expert_mp"]

    @property
    def world(self) -> Group:
        return self.groups["world"]

    @property
    def is_distributed(self) -> bool:
        return self.dims.world > 1

    @classmethod
    def virtual(cls, dims: ParallelDims, rank: int = 0) -> "Topology":
        """The layout of one rank without process groups: for shapes (meta-device models, `plan`)."""
        groups = {}
        for name in GROUP_NAMES:
            members = next(g for g in dims.rank_groups(name) if rank in g)
            groups[name] = Group(tuple(members), members.index(rank))
        groups["world"] = Group(tuple(range(dims.world)), rank)
        return cls(dims, rank, groups)

    @classmethod
    def single(cls) -> "Topology":
        return cls.virtual(ParallelDims(world=1))

    @classmethod
    def build(cls, dims: ParallelDims, timeout_s: Optional[float] = None) -> "Topology":
        """Create every process group (a collective: all ranks call it, in the same order)."""
        if not dist.is_initialized():
            if dims.world == 1:
                return cls.single()
            raise RuntimeError("torch.distributed is not initialised; call moe_dist.parallel.bootstrap first")
        if dist.get_world_size() != dims.world:
            raise ValueError(f"the launcher started {dist.get_world_size()} ranks but the layout needs {dims.world}")
        rank = dist.get_rank()
        timeout = timedelta(seconds=timeout_s) if timeout_s else None
        groups = {}
        for name in GROUP_NAMES:
            mine = None
            for members in dims.rank_groups(name):
                # new_group is collective over the whole world even for groups this rank is not in.
                handle = dist.new_group(members, timeout=timeout) if len(members) > 1 else None
                if rank in members:
                    mine = Group(tuple(members), members.index(rank), handle)
            groups[name] = mine
        groups["world"] = Group(tuple(range(dims.world)), rank, dist.group.WORLD)
        return cls(dims, rank, groups)
