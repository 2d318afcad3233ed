"""Autograd-aware collectives over an explicit `Group` (moe_dist.parallel.topology).

Each op is an `autograd.Function` whose backward is the adjoint collective, so gradients flow through
dispatch, combine and the tensor-parallel regions exactly. On a group of one they are the identity and
touch no process group, so single-process code runs the same functions.

Tensor-parallel conventions (Megatron's f / g operators):
    copy_to_group       forward identity,         backward all-reduce (sum)
    reduce_from_group   forward all-reduce (sum), backward identity
    split_rows          forward keep my row block, backward all-gather
    gather_rows         forward all-gather rows,  backward keep my row block
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from moe_dist.parallel.topology import Group


def _a2a(x: torch.Tensor, send: Sequence[int], recv: Sequence[int], group: Group) -> torch.Tensor:
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=list(recv), input_split_sizes=list(send),
                           group=group.handle)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _a2a(x, send, recv, group)

    @staticmethod
    def backward(ctx, g):
        return _a2a(g, ctx.recv, ctx.send, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int], group: Group) -> torch.Tensor:
    """Rows [send_splits[j] rows to member j]; returns the rows received, grouped by source member."""
    if group.handle is None:
        return x
    return _AllToAll.apply(x, tuple(send_splits), tuple(recv_splits), group)


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x, group=group.handle)
    return x


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


def copy_to_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Enter a region where each member computes a part of a sum (column-parallel input)."""
    return x if group.handle is None else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Leave that region: sum the members' partial results (row-parallel output)."""
    return x if group.handle is None else _ReduceFromGroup.apply(x, group)


def _gather_rows(x: torch.Tensor, group: Group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(group.size)]
    dist.all_gather(parts, x.contiguous(), group=group.handle)
    return torch.cat(parts, 0)


class _SplitRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.chunk(group.size, 0)[group.rank].contiguous()

    @staticmethod
    def backward(ctx, g):
        return _gather_rows(g, ctx.group), None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_rows(x, group)

    @staticmethod
    def backward(ctx, g):
        return g.chunk(ctx.group.size, 0)[ctx.group.rank].contiguous(), None


def split_rows(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Rows replicated over the group → this member's contiguous block (rows must divide evenly)."""
    if group.handle is None:
        return x
    if x.shape[0] % group.size:
        raise ValueError(f"{x.shape[0]} rows do not split over a group of {group.size}")
    return _SplitRows.apply(x, group)


def gather_rows(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Each member's equal block of rows → all rows, replicated over the group."""
    return x if group.handle is None else _GatherRows.apply(x, group)


def all_reduce_(x: torch.Tensor, group: Group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of a tensor outside autograd (statistics, gradients)."""
    if group.handle is not None:
        dist.all_reduce(x, op=op, group=group.handle)
    return x
