"""Autograd-aware collectives over an explicit `Group` (moe_dist.parallel.topology).

Each op is an `autograd.Function` whose backward is the adjoint collective, so gradients flow through
dispatch, combine and the tensor-parallel regions exactly. On a group of one they are the identity and
touch no process group, so single-process code runs the same functions.

Tensor-parallel conventions (Megatron's f / g operators):
    copy_to_group       forward identity,         backward all-reduce (sum)
    reduce_from_group   forward all-reduce (sum), backward identity
    split_rows          forward keep my row block, backward all-gather
    gather_rows         forward all-gather rows,  backward keep my row block

Point-to-point (the pipeline's activations and gradients, outside autograd): `exchange` posts a batch of
sends and receives together and waits for all of them.

Every collective the package issues goes through `_issue` here, so `observe_collectives` sees each one
(operation, group, bytes, seconds): the benchmarks count and time communication through that hook instead
of patching `torch.distributed`. `_issue` also keeps this process's progress (collectives started per group,
the one in flight, and the `where` labels: step, MoE layer, forward/backward) that the watchdog
(moe_dist.parallel.watchdog) publishes, and, under `debug_sync`, makes every all-to-all first compare a small
digest across its group so that a desync stops with a message instead of a hang.
"""
from __future__ import annotations

import contextlib
import time
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Literal, Optional, Sequence

import torch
import torch.distributed as dist

from moe_dist.parallel.topology import Group, Topology


@dataclass(frozen=True)
class CollectiveCall:
    """One collective as `observe_collectives` reports it. `nbytes` is the full-size tensor: the input of an
    all-reduce, reduce-scatter, broadcast or all-to-all (what this rank sends), the gathered output of an
    all-gather."""
    op: str                      # "all_to_all", "all_reduce", "reduce_scatter", "all_gather", "broadcast", "barrier",
                                 # "send_recv" (a batch of point-to-point transfers: group = this rank and its peers)
    group: Group
    nbytes: int
    seconds: float               # wall time inside the call (gloo blocks: includes waiting for the peers)


# The observers of the `observe_collectives` blocks now open in this process. Module state, unlike the
# process groups: a hook must see collectives issued deep inside modules that take no extra argument for it,
# and it costs one empty-list test per collective when nobody observes.
_OBSERVERS: list[Callable[[CollectiveCall], None]] = []


@contextlib.contextmanager
def observe_collectives(callback: Callable[[CollectiveCall], None]) -> Iterator[None]:
    """Call `callback(CollectiveCall)` after every collective issued through this module inside the block."""
    _OBSERVERS.append(callback)
    try:
        yield
    finally:
        _OBSERVERS.remove(callback)


class DesyncError(RuntimeError):
    """Ranks of one group reached an all-to-all at different places or with split sizes that disagree."""


@dataclass
class InFlight:
    """The collective this process is inside: the watchdog reports it when it makes no progress."""
    op: str
    group: tuple[int, ...]       # the group's global ranks
    seq: int                     # 1 for the group's first collective in this process, 2 for the next, ...
    started: float               # time.time() at entry
    where: dict[str, Any]        # the `where` labels at entry (step, layer, phase)


class _Progress:
    """What this process has done so far. Module state for the same reason as _OBSERVERS; one dict increment
    and two assignments per collective."""

    def __init__(self) -> None:
        self.started: dict[tuple[int, ...], int] = {}
        # Point-to-point batches, counted apart: the two ends of a pipeline boundary need not post equally many
        # (GPipe pp=2, 4 micro-batches: 7 on one, 8 on the other), and their members' key is also a collective
        # group's (pp=2: the pp group), whose counts the watchdog compares across ranks.
        self.p2p: dict[tuple[int, ...], int] = {}
        self.current: InFlight | None = None
        self.where: dict[str, Any] = {}
        self.debug_sync = False


_PROGRESS = _Progress()


def progress() -> tuple[dict[tuple[int, ...], int], InFlight | None, dict[str, Any]]:
    """A copy of (collectives started per group, the one in flight, the current labels), for the watchdog's
    thread."""
    for _ in range(10):
        try:
            return dict(_PROGRESS.started), _PROGRESS.current, dict(_PROGRESS.where)
        except RuntimeError:       # the main thread added a group while we copied: copy again
            continue
    return {}, _PROGRESS.current, {}


@contextlib.contextmanager
def where(**labels: Any) -> Iterator[None]:
    """Label the collectives issued inside the block (e.g. step=5, layer="blocks.1.mlp"); nested blocks add
    to and then restore the outer labels. The autograd collectives carry their forward labels into backward."""
    before = dict(_PROGRESS.where)
    _PROGRESS.where = {**before, **labels}
    try:
        yield
    finally:
        _PROGRESS.where = before


@contextlib.contextmanager
def debug_sync(enabled: bool = True) -> Iterator[None]:
    """Inside the block every all-to-all first all-gathers (step, layer, split sizes) over its group and raises
    `DesyncError` on every member at the first disagreement, naming the ranks and the layer: one small extra
    collective per all-to-all, for finding the desyncs that otherwise hang until the timeout."""
    before = _PROGRESS.debug_sync
    _PROGRESS.debug_sync = enabled
    try:
        yield
    finally:
        _PROGRESS.debug_sync = before


def _nbytes(t: torch.Tensor | Sequence[torch.Tensor]) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return sum(x.numel() * x.element_size() for x in t)


def _issue(op: str, group: Group, nbytes: int, call: Callable[[], Any], counted: bool = True) -> Any:
    """Run one communication call with its progress recorded; `counted=False` (point-to-point) keeps it out of
    the per-group collective counts."""
    counts = _PROGRESS.started if counted else _PROGRESS.p2p
    seq = counts[group.ranks] = counts.get(group.ranks, 0) + 1
    _PROGRESS.current = InFlight(op, group.ranks, seq, time.time(), _PROGRESS.where)
    try:
        if not _OBSERVERS:
            return call()
        t0 = time.perf_counter()
        try:
            return call()
        finally:
            record = CollectiveCall(op, group, nbytes, time.perf_counter() - t0)
            for observer in list(_OBSERVERS):
                observer(record)
    finally:
        _PROGRESS.current = None


def _describe_where(labels: dict[str, Any]) -> str:
    phase = str(labels.get("phase", ""))
    # The pipeline's transfers name their stage and micro-batch in their phase already; everything inside a
    # stage's forward or backward (the MoE layers' collectives) gets them from the labels.
    placed = "(stage " not in phase
    parts = [f"step {labels['step']}" if "step" in labels else "",
             f"stage {labels['stage']}" if placed and "stage" in labels else "",
             f"micro-batch {labels['micro']}" if placed and "micro" in labels else "",
             str(labels.get("layer", "")), phase]
    return ", ".join(p for p in parts if p) or "outside any labelled step"


def _check_splits(send: Sequence[int], recv: Sequence[int], group: Group) -> None:
    """debug_sync: compare this all-to-all's place and split sizes across the group (all members raise alike)."""
    labels = _PROGRESS.where
    layer = zlib.crc32(str(labels.get("layer", "")).encode()) & 0x7FFFFFFF
    mine = torch.tensor([int(labels.get("step", -1)), layer, *send, *recv], dtype=torch.int64)
    table = torch.stack(_all_gather(mine, group))           # [members, 2 + 2·members]
    n = group.size
    sends, recvs = table[:, 2:2 + n], table[:, 2 + n:]
    problems = []
    if not (table[:, :2] == table[0, :2]).all():
        problems.append("the members are at different places")
    for i in range(n):
        for j in range(n):
            if sends[i, j] != recvs[j, i]:
                problems.append(f"rank {group.ranks[i]} sends {int(sends[i, j])} rows to rank {group.ranks[j]}, "
                                f"which expects {int(recvs[j, i])}")
    if not problems:
        return
    places = [None] * n
    dist.all_gather_object(places, _describe_where(labels), group=group.handle)
    at = "; ".join(f"rank {r}: {p}" for r, p in zip(group.ranks, places))
    raise DesyncError(f"all-to-all desync in the group of ranks {list(group.ranks)} ({at}): " + "; ".join(problems[:4])
                      + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
                      + ". The ranks disagree on routing or on the step; this would otherwise hang until "
                        "parallel.timeout_s")


def _a2a(x: torch.Tensor, send: Sequence[int], recv: Sequence[int], group: Group) -> torch.Tensor:
    if _PROGRESS.debug_sync:
        _check_splits(send, recv, group)
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    x = x.contiguous()
    _issue("all_to_all", group, _nbytes(x),
           lambda: dist.all_to_all_single(out, x, output_split_sizes=list(recv), input_split_sizes=list(send),
                                          group=group.handle))
    return out


def _backward_where(ctx):
    """The forward's labels, marked as backward (autograd runs backward outside the forward's `where`)."""
    return where(**{**ctx.where, "phase": "backward"})


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.send, ctx.recv, ctx.group, ctx.where = send, recv, group, _PROGRESS.where
        return _a2a(x, send, recv, group)

    @staticmethod
    def backward(ctx, g):
        with _backward_where(ctx):
            return _a2a(g, ctx.recv, ctx.send, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int], group: Group) -> torch.Tensor:
    """Rows [send_splits[j] rows to member j]; returns the rows received, grouped by source member."""
    if group.handle is None:
        return x
    return _AllToAll.apply(x, tuple(send_splits), tuple(recv_splits), group)


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    x = x.clone()
    _issue("all_reduce", group, _nbytes(x), lambda: dist.all_reduce(x, group=group.handle))
    return x


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.where = group, _PROGRESS.where
        return x

    @staticmethod
    def backward(ctx, g):
        with _backward_where(ctx):
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


def _all_gather(x: torch.Tensor, group: Group) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(group.size)]
    x = x.contiguous()
    _issue("all_gather", group, _nbytes(parts), lambda: dist.all_gather(parts, x, group=group.handle))
    return parts


def _gather_rows(x: torch.Tensor, group: Group) -> torch.Tensor:
    return torch.cat(_all_gather(x, group), 0)


class _SplitRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.where = group, _PROGRESS.where
        return x.chunk(group.size, 0)[group.rank].contiguous()

    @staticmethod
    def backward(ctx, g):
        with _backward_where(ctx):
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
        _issue("all_reduce", group, _nbytes(x), lambda: dist.all_reduce(x, op=op, group=group.handle))
    return x


def reduce_scatter_tensor_(out: torch.Tensor, x: torch.Tensor, group: Group,
                           op=dist.ReduceOp.SUM) -> torch.Tensor:
    """`out` = this member's equal block (along dim 0) of the sum of every member's `x`, outside autograd
    (a sharded optimizer's gradient reduction). On a group of one `out` is a copy of `x`."""
    if group.handle is None:
        return out.copy_(x)
    x = x.contiguous()
    _issue("reduce_scatter", group, _nbytes(x),
           lambda: dist.reduce_scatter_tensor(out, x, op=op, group=group.handle))
    return out


def all_gather_into_tensor_(out: torch.Tensor, x: torch.Tensor, group: Group) -> torch.Tensor:
    """`out` = every member's `x` concatenated along dim 0 in rank order, outside autograd (a sharded
    optimizer's updated weights). On a group of one `out` is a copy of `x`."""
    if group.handle is None:
        return out.copy_(x)
    x = x.contiguous()
    _issue("all_gather", group, _nbytes(out),
           lambda: dist.all_gather_into_tensor(out, x, group=group.handle))
    return out


@dataclass(frozen=True)
class PeerOp:
    """One transfer of a point-to-point `exchange`: send `tensor` to, or receive it (in place) from, the global
    rank `peer`. Gloo matches a send and a receive by (peer, tag); NCCL ignores tags and matches in posting
    order, so the two ends must post their transfers between them in the same order."""
    op: Literal["send", "recv"]
    tensor: torch.Tensor
    peer: int
    tag: int = 0


def exchange(ops: Sequence[PeerOp], group: Group, timeout_s: Optional[float] = None) -> None:
    """Post every send and receive of `ops` together (torch.distributed.batch_isend_irecv on `group`, whose
    members the peers must be) and return once all of them completed; received tensors are filled in place.
    Posting them together is what keeps two neighbours that both send from waiting on each other (a gloo send
    does not complete before its receive is posted). A receive waits at most `timeout_s` (default: the
    group's timeout, parallel.timeout_s): a dead peer ends it with an error, never a hang.
    For the progress record and the observers the batch is one "send_recv" on the group of this rank and its
    peers (bytes: what this rank sends)."""
    if not ops:
        return
    if group.handle is None:
        raise ValueError(f"point-to-point transfers with peers {sorted({o.peer for o in ops})} on a group of one "
                         f"(ranks {list(group.ranks)})")
    me = group.ranks[group.rank]
    for o in ops:
        if o.peer == me or o.peer not in group.ranks:
            raise ValueError(f"{o.op} with peer {o.peer}: the peer must be another member of {list(group.ranks)}")
        if not o.tensor.is_contiguous():
            raise ValueError(f"{o.op} with peer {o.peer}: the tensor must be contiguous")
    members = tuple(sorted({me, *(o.peer for o in ops)}))
    peers = Group(members, members.index(me))           # the record's key; the transfers run on `group`
    p2p = [dist.P2POp(dist.isend if o.op == "send" else dist.irecv, o.tensor, o.peer, group.handle, o.tag)
           for o in ops]
    timeout = None if timeout_s is None else timedelta(seconds=timeout_s)

    def run() -> None:
        works = dist.batch_isend_irecv(p2p)
        for w in works:            # the host waits here: the next action needs the received tensors
            if timeout is None:
                w.wait()
            else:
                w.wait(timeout)

    _issue("send_recv", peers, sum(_nbytes(o.tensor) for o in ops if o.op == "send"), run, counted=False)


def exchange_counts(send: torch.Tensor, group: Group) -> torch.Tensor:
    """recv[j] = what member j put in its send[this rank]: an equal-split all-to-all along dim 0, outside
    autograd (the dispatcher's per-expert row counts)."""
    if group.handle is None:
        return send
    recv = torch.empty_like(send)
    send = send.contiguous()
    _issue("all_to_all", group, _nbytes(send), lambda: dist.all_to_all_single(recv, send, group=group.handle))
    return recv


def gather_stack(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[group.size, *x.shape]: every member's `x`, outside autograd (a size in one view per member)."""
    if group.handle is None:
        return x.unsqueeze(0)
    return torch.stack(_all_gather(x, group))


def broadcast_from_rank0(obj: Any, topo: Topology) -> Any:
    """Rank 0's (picklable) value on every rank: a collective over the world. Used for decisions every rank
    must take alike (which checkpoint to load, whether to stop)."""
    if topo.world.handle is None:          # one process (or a virtual layout without process groups)
        return obj
    box = [obj]
    _issue("broadcast", topo.world, 0,
           lambda: dist.broadcast_object_list(box, src=0, group=topo.world.handle))
    return box[0]


def barrier(group: Group) -> None:
    """Wait until every member of `group` arrives (no-op on a group of one)."""
    if group.handle is not None:
        _issue("barrier", group, 0, lambda: dist.barrier(group=group.handle))
