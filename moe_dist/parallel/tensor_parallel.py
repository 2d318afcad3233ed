"""How parameters are split across ranks, and the tensor-parallel linears of the dense parts.

A parameter's split is a tuple of `Shard(dim, axis, chunks)`: along `dim`, over the ranks of `axis`
("tp", "ep" or "etp"), with `chunks` interleaved blocks split separately (SwiGLU's fused [gate | up]
and attention's [k | v] are split per block so every rank keeps matching gate/up and k/v columns).
The model keeps these in a typed dict (`MoEGPT.param_shards`), never as tensor attributes; they drive
initialisation (every layout draws the same global weights), gradient norms and parity tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_dist.moe.experts import activate
from moe_dist.parallel.comm import copy_to_group, reduce_from_group
from moe_dist.parallel.topology import Group, Topology


@dataclass(frozen=True)
class Shard:
    dim: int
    axis: str            # "tp", "ep" or "etp"
    chunks: int = 1


def local_slice(full: torch.Tensor, shards: tuple[Shard, ...], topo: Topology) -> torch.Tensor:
    """This rank's part of a full (global) tensor."""
    out = full
    for s in shards:
        g = topo.groups[s.axis]
        n = out.shape[s.dim]
        if n % (s.chunks * g.size):
            raise ValueError(f"dimension {s.dim} of size {n} does not split into {s.chunks}×{g.size} blocks over {s.axis}")
        blocks = out.unflatten(s.dim, (s.chunks, g.size, n // (s.chunks * g.size)))
        out = blocks.select(s.dim + 1, g.rank).flatten(s.dim, s.dim + 1)
    return out


def global_shape(local: torch.Size, shards: tuple[Shard, ...], topo: Topology) -> torch.Size:
    shape = list(local)
    for s in shards:
        shape[s.dim] *= topo.groups[s.axis].size
    return torch.Size(shape)


class ColumnParallelLinear(nn.Module):
    """y = x·Wᵀ (+ b) with W's output rows split over tp: each rank computes its block of output features.
    The bias, when asked for, is split with its rows (`bias`, same shards as `weight`)."""

    def __init__(self, in_features: int, out_features: int, tp: Group, chunks: int = 1, bias: bool = False):
        super().__init__()
        if out_features % (tp.size * chunks):
            raise ValueError(f"{out_features} output features do not split over tp={tp.size} ({chunks} blocks)")
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features // tp.size, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features // tp.size)) if bias else None
        self.param_shards = {}
        if tp.size > 1:
            self.param_shards = {name: (Shard(0, "tp", chunks),) for name in ("weight", "bias")
                                 if getattr(self, name) is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_group(x, self.tp), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = Σ_ranks x_r·W_rᵀ with W's input columns split over tp; the sum is the all-reduce."""

    def __init__(self, in_features: int, out_features: int, tp: Group):
        super().__init__()
        if in_features % tp.size:
            raise ValueError(f"{in_features} input features do not split over tp={tp.size}")
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp.size))
        self.param_shards = {"weight": (Shard(1, "tp"),)} if tp.size > 1 else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_group(F.linear(x, self.weight), self.tp)


def sum_over_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    """The sum of every member's `x`, on every member, with the sum's own adjoint in backward (an all-reduce
    both ways). Unlike `reduce_from_group`, whose backward is the identity because everything downstream of it
    is replicated, the sum here feeds computations that differ per member (each scales its own shard), so the
    members' gradients of the sum are partial and must be added too."""
    return x if group.handle is None else copy_to_group(reduce_from_group(x, group), group)


class ShardedRMSNorm(nn.Module):
    """RMSNorm over `features` features split into equal contiguous blocks over tp (a column-parallel
    projection's output): the mean of squares is over all features, so the members' sums of squares are added
    (`rms_norm_over_group` does that for several norms in one all-reduce). Computed in fp32 and cast back
    before the weight multiplies, as Hugging Face's RMSNorm does. On a group of one it is a plain RMSNorm."""

    def __init__(self, features: int, tp: Group, eps: float):
        super().__init__()
        if features % tp.size:
            raise ValueError(f"{features} normalised features do not split over tp={tp.size}")
        self.tp, self.features, self.eps = tp, features, eps
        self.weight = nn.Parameter(torch.ones(features // tp.size))
        self.param_shards = {"weight": (Shard(0, "tp"),)} if tp.size > 1 else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_over_group([(self, x)], self.tp)[0]

    def extra_repr(self) -> str:
        return f"features={self.features}, eps={self.eps}, tp={self.tp.size}"


def rms_norm_over_group(pairs: list[tuple[ShardedRMSNorm, torch.Tensor]], tp: Group) -> list[torch.Tensor]:
    """Apply each norm to its tensor, with one all-reduce (forward and backward) for all their sums of squares
    (attention normalises q and k together: one collective per direction instead of two)."""
    sq = torch.cat([x.float().pow(2).sum(-1, keepdim=True) for _, x in pairs], dim=-1)
    sq = sum_over_group(sq, tp)
    out = []
    for i, (norm, x) in enumerate(pairs):
        inv = torch.rsqrt(sq[..., i:i + 1] / norm.features + norm.eps)
        out.append(norm.weight * (x.float() * inv).to(x.dtype))
    return out


class ParallelMLP(nn.Module):
    """A dense MLP with the experts' activation, its hidden dim split over tp (column then row parallel):
    the dense layers of the model and, with a group of one, the shared experts."""

    def __init__(self, dim: int, hidden: int, activation: str, tp: Group):
        super().__init__()
        self.activation = activation
        swiglu = activation == "swiglu"
        self.w_in = ColumnParallelLinear(dim, 2 * hidden if swiglu else hidden, tp, chunks=2 if swiglu else 1)
        self.w_out = RowParallelLinear(hidden, dim, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(activate(self.w_in(x), self.activation))
