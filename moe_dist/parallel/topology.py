"""The parallel layout: one world, two views over the same ranks (Megatron-core's "parallel folding").

    dense view   rank = tp_rank + tp·(dp_rank + dp·pp_rank)                      (attention, dense MLPs, router)
    expert view  rank = etp_rank + etp·(ep_rank + ep·(edp_rank + edp·pp_rank))   (routed experts)

Pipeline parallelism (`pp`) is the slowest axis of both views, so the two views agree on which stage a rank
holds: dp = world / (tp·pp), edp = world / (pp·ep·etp), and every group of either view lies inside one stage.
The order is Megatron-core's "tp-cp-ep-dp-pp" (cp = 1), so each rank→group map equals its `RankGenerator`.

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
# The pipeline's groups (dense view; the expert view has the same ones, pp being the slowest axis of both):
#   pp     one rank per stage, same (tp, dp) coordinates, ordered by stage: point-to-point neighbours
#   stage  every rank of one stage (dp×tp, equally edp×ep×etp)
#   embed  the first and last rank of a pp group (tied-embedding gradients are summed over it); a single
#          rank when pp = 1. Ranks of the middle stages are in no embed group (their `topo.embed` is themselves).
PIPELINE_GROUPS = {"pp": ("pp",), "stage": ("tp", "dp")}
PP_GROUP_NAMES = ("pp", "stage", "embed")
ALL_GROUP_NAMES = GROUP_NAMES + PP_GROUP_NAMES


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
    pp: int = 1

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def edp(self) -> int:
        return self.world // (self.pp * self.ep * self.etp)

    @property
    def stage_size(self) -> int:
        """Ranks per pipeline stage."""
        return self.world // self.pp

    def dense_sizes(self) -> dict[str, int]:
        return {"tp": self.tp, "dp": self.dp, "pp": self.pp}

    def expert_sizes(self) -> dict[str, int]:
        return {"etp": self.etp, "ep": self.ep, "edp": self.edp, "pp": self.pp}

    def rank_groups(self, name: str) -> list[list[int]]:
        """Every group of one kind, as lists of global ranks (a partition of the world, except "embed",
        which leaves out the middle stages)."""
        if name in DENSE_GROUPS:
            return orthogonal_groups(self.dense_sizes(), DENSE_GROUPS[name])
        if name in EXPERT_GROUPS:
            return orthogonal_groups(self.expert_sizes(), EXPERT_GROUPS[name])
        if name in PIPELINE_GROUPS:
            return orthogonal_groups(self.dense_sizes(), PIPELINE_GROUPS[name])
        if name == "embed":
            return [[g[0], g[-1]] if len(g) > 1 else [g[0]] for g in self.rank_groups("pp")]
        raise ValueError(f"unknown group '{name}'; known: {', '.join(ALL_GROUP_NAMES)}")

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index on every axis of both views."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} is outside the world of {self.world}")
        return {"tp": rank % self.tp, "dp": rank // self.tp % self.dp,
                "etp": rank % self.etp, "ep": rank // self.etp % self.ep,
                "edp": rank // (self.etp * self.ep) % self.edp, "pp": rank // self.stage_size}

    def describe(self) -> str:
        if self.pp == 1:
            return (f"world={self.world} dense: dp={self.dp}×tp={self.tp}  "
                    f"expert: edp={self.edp}×ep={self.ep}×etp={self.etp}")
        return (f"world={self.world} dense: pp={self.pp}×dp={self.dp}×tp={self.tp}  "
                f"expert: pp={self.pp}×edp={self.edp}×ep={self.ep}×etp={self.etp}")


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
    def pp(self) -> Group:
        """One rank per stage, ordered by stage (`pp.rank` is this rank's stage); the next stage's rank is
        `pp.ranks[(pp.rank + 1) % pp.size]`."""
        return self.groups["pp"]

    @property
    def stage(self) -> Group:
        """Every rank of this rank's pipeline stage."""
        return self.groups["stage"]

    @property
    def embed(self) -> Group:
        """{first, last} stage rank of this rank's pp group when this rank is on either (pp > 1); this rank
        alone otherwise."""
        return self.groups["embed"]

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
        for name in ALL_GROUP_NAMES:
            members = next((g for g in dims.rank_groups(name) if rank in g), [rank])
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
        # Names in a fixed order, groups in rank_groups' order: every rank calls new_group identically.
        for name in ALL_GROUP_NAMES:
            mine = Group((rank,), 0)           # only "embed" leaves ranks out: a middle stage's rank alone
            for members in dims.rank_groups(name):
                if len(members) == 1:
                    handle = None
                elif name == "stage" and dims.pp == 1:
                    handle = dist.group.WORLD  # the whole world: no second communicator for it
                else:
                    # new_group is collective over the whole world even for groups this rank is not in.
                    handle = dist.new_group(members, timeout=timeout)
                if rank in members:
                    mine = Group(tuple(members), members.index(rank), handle)
            groups[name] = mine
        groups["world"] = Group(tuple(range(dims.world)), rank, dist.group.WORLD)
        return cls(dims, rank, groups)
