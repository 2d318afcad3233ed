"""Token dispatchers: move token rows to the experts that own them and bring the results back.
Legend: T tokens, D model dim, K top-k, E experts, N permuted rows.

A dispatcher has two calls. `dispatch` returns the rows grouped by local expert, their int32 offsets,
and a frozen metadata value; `combine` takes the expert output and that value back. The state of one
forward lives in the metadata, never in `self`, so one dispatcher serves every micro-batch.

`LocalDispatcher` is the single-process case: permute and unpermute, no communication.
`AllToAllDispatcher` fills the same slot when experts are sharded over ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Protocol

import torch

from moe_dist.kernels.reference import PermuteMap, make_permute_map, permute, unpermute
from moe_dist.parallel.comm import all_to_all, exchange_counts, gather_stack
from moe_dist.parallel.topology import Group


@dataclass(frozen=True)
class DispatchMeta:
    pmap: PermuteMap
    weights_TK: torch.Tensor

    def with_weights(self, weights_TK: torch.Tensor) -> "DispatchMeta":
        """The same dispatch with other combine weights (a new value: the metadata is frozen)."""
        return replace(self, weights_TK=weights_TK)


class Dispatcher(Protocol):
    num_local_experts: int

    def dispatch(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
                 keep_TK: Optional[torch.Tensor], capacity: Optional[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, DispatchMeta]: ...

    def combine(self, y_ND: torch.Tensor, meta: DispatchMeta) -> torch.Tensor: ...


def row_ops(backend: str):
    """(permute, unpermute): the Triton kernels for "triton" (`moe.experts.rows_backend` picks it for
    moe.backend=triton, and for auto on a CUDA GPU), else the torch references. Imported lazily: the kernel module reads TRITON_INTERPRET when it is first imported."""
    if backend == "triton":
        from moe_dist.kernels import ops
        return ops.permute, ops.unpermute
    return permute, unpermute


class LocalDispatcher:
    """All experts live in this process. `pad_to_capacity` pads each expert's rows to the capacity
    (static shapes); `pad_multiple` aligns each group for block GEMMs."""

    def __init__(self, num_experts: int, pad_to_capacity: bool = False, pad_multiple: int = 1,
                 backend: str = "auto"):
        self.num_local_experts = num_experts
        self.pad_to_capacity = pad_to_capacity
        self.pad_multiple = pad_multiple
        self._permute, self._unpermute = row_ops(backend)

    def dispatch(self, x_TD, indices_TK, weights_TK, keep_TK, capacity):
        pmap = make_permute_map(indices_TK, self.num_local_experts, keep_TK,
                                pad_multiple=self.pad_multiple,
                                capacity=capacity if self.pad_to_capacity else None)
        return self._permute(x_TD, pmap), pmap.offsets_E, DispatchMeta(pmap, weights_TK)

    def combine(self, y_ND, meta):
        return self._unpermute(y_ND, meta.pmap, meta.weights_TK)


@dataclass(frozen=True)
class AllToAllMeta:
    local: DispatchMeta
    send_splits: tuple[int, ...]     # rows this rank sent to each EP member
    recv_splits: tuple[int, ...]     # rows this rank received from each EP member
    etp_splits: tuple[int, ...]      # rows each ETP member received (what the ETP all-gather joins)
    order_R: torch.Tensor            # received rows (by source, then expert) → rows grouped by local expert
    inverse_R: torch.Tensor          # the inverse permutation

    def with_weights(self, weights_TK: torch.Tensor) -> "AllToAllMeta":
        """The same dispatch with other combine weights (a new value: the metadata is frozen)."""
        return replace(self, local=self.local.with_weights(weights_TK))

    def rows_out(self, ep_rank: int) -> int:
        """Rows that left this rank in the dispatch (its own block stays home)."""
        return sum(self.send_splits) - self.send_splits[ep_rank]

    def rows_in(self, ep_rank: int) -> int:
        """Rows that arrived from other ranks."""
        return sum(self.recv_splits) - self.recv_splits[ep_rank]


class AllToAllDispatcher:
    """Experts sharded over the expert-parallel group `ep` (whole experts, contiguous: global expert e
    lives on EP member e // E_local) and, with expert tensor parallelism, each expert's hidden dim over
    `etp`.

    dispatch: permute rows by global expert (= by (destination, local expert)) → exchange per-expert
    counts → all-to-all with variable splits over ep → [etp > 1: all-gather the received rows over etp]
    → regroup by local expert. combine runs the mirror image; the ETP step becomes a reduce-scatter,
    which also sums the row-parallel partial outputs of the experts. Dropless routing sends exactly the
    rows that leave the rank: no padding ever goes on the wire.
    """

    def __init__(self, num_experts: int, ep: Group, etp: Group, backend: str = "auto"):
        # ep divides num_experts: check_layout judged the layout before any group existed.
        self.num_experts, self.ep, self.etp = num_experts, ep, etp
        self.num_local_experts = num_experts // ep.size
        self._permute, self._unpermute = row_ops(backend)

    def dispatch(self, x_TD, indices_TK, weights_TK, keep_TK, capacity):
        P, L, Q = self.ep.size, self.num_local_experts, self.etp.size
        pmap = make_permute_map(indices_TK, self.num_experts, keep_TK)
        x_ND = self._permute(x_TD, pmap)
        send_PL = pmap.counts_E.view(P, L)
        recv_PL = exchange_counts(send_PL, self.ep)    # recv[p, l]: rows member p sends to my expert l
        recv_QPL = gather_stack(recv_PL, self.etp)      # [Q, P, L]: what every ETP member received
        # Host sync: the all-to-all needs its split sizes on the host. Both the send and the receive
        # counts come over in one transfer; with make_permute_map's row count (dropless sizes are data
        # dependent) these are the layer's two waits.
        host = torch.cat([send_PL.reshape(-1), recv_QPL.reshape(-1)]).tolist()
        send_P = [sum(host[p * L:(p + 1) * L]) for p in range(P)]
        recv_q = host[P * L:]
        etp_splits = [sum(recv_q[q * P * L:(q + 1) * P * L]) for q in range(Q)]
        mine = recv_q[self.etp.rank * P * L:(self.etp.rank + 1) * P * L]
        recv_P = [sum(mine[p * L:(p + 1) * L]) for p in range(P)]

        x_RD = all_to_all(x_ND, send_P, recv_P, self.ep)
        if Q > 1:
            # All-gather with unequal sizes, as an all-to-all that sends this rank's rows to every member.
            x_RD = all_to_all(x_RD.repeat(Q, 1), [x_RD.shape[0]] * Q, etp_splits, self.etp)
        # Received rows are ordered (etp source, ep source, local expert); the experts want them by
        # local expert. A stable sort on the expert id of each row keeps sources in order inside an expert.
        counts_SL = recv_QPL.reshape(Q * P, L)
        expert_of_row = torch.arange(L, device=x_TD.device).repeat(Q * P).repeat_interleave(
            counts_SL.reshape(-1), output_size=sum(etp_splits))
        order_R = torch.argsort(expert_of_row, stable=True)
        inverse_R = torch.empty_like(order_R)
        inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
        offsets_L = torch.cumsum(counts_SL.sum(0), 0).to(torch.int32)
        meta = AllToAllMeta(DispatchMeta(pmap, weights_TK), tuple(send_P), tuple(recv_P), tuple(etp_splits),
                            order_R, inverse_R)
        return x_RD.index_select(0, order_R), offsets_L, meta

    def combine(self, y_RD, meta: AllToAllMeta):
        Q = self.etp.size
        y_RD = y_RD.index_select(0, meta.inverse_R)
        if Q > 1:
            # Reduce-scatter: each member's block goes back to it and the Q partial sums are added.
            mine = meta.etp_splits[self.etp.rank]
            y_RD = all_to_all(y_RD, meta.etp_splits, [mine] * Q, self.etp).view(Q, mine, y_RD.shape[1]).sum(0)
        y_ND = all_to_all(y_RD, meta.recv_splits, meta.send_splits, self.ep)
        return keep_connected(self._unpermute(y_ND, meta.local.pmap, meta.local.weights_TK), y_ND)


def keep_connected(out: torch.Tensor, empty_src: torch.Tensor) -> torch.Tensor:
    """`out`, still joined to the autograd graph of `empty_src` when that has no rows. Ops on empty inputs
    may return fresh zeros; then backward would skip this rank's all-to-alls, which every member of the
    group must join, and the other ranks would wait until the timeout."""
    return out + empty_src.sum() if empty_src.shape[0] == 0 and empty_src.requires_grad else out
