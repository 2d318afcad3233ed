"""Token dispatchers: move token rows to the experts that own them and bring the results back.
Legend: T tokens, D model dim, K top-k, E experts, N permuted rows.

A dispatcher has two calls. `dispatch` returns the rows grouped by local expert, their int32 offsets,
and a frozen metadata value; `combine` takes the expert output and that value back. The state of one
forward lives in the metadata, never in `self`, so one dispatcher serves every micro-batch.

`LocalDispatcher` is the single-process case: permute and unpermute, no communication. The
expert-parallel all-to-all dispatcher fills the same slot.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from moe_dist.kernels.reference import PermuteMap, make_permute_map, permute, unpermute


@dataclass(frozen=True)
class DispatchMeta:
    pmap: PermuteMap
    weights_TK: torch.Tensor


class Dispatcher(Protocol):
    num_local_experts: int

    def dispatch(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
                 keep_TK: Optional[torch.Tensor], capacity: Optional[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, DispatchMeta]: ...

    def combine(self, y_ND: torch.Tensor, meta: DispatchMeta) -> torch.Tensor: ...


class LocalDispatcher:
    """All experts live in this process. `pad_to_capacity` pads each expert's rows to the capacity
    (static shapes); `pad_multiple` aligns each group for block GEMMs."""

    def __init__(self, num_experts: int, pad_to_capacity: bool = False, pad_multiple: int = 1):
        self.num_local_experts = num_experts
        self.pad_to_capacity = pad_to_capacity
        self.pad_multiple = pad_multiple

    def dispatch(self, x_TD, indices_TK, weights_TK, keep_TK, capacity):
        pmap = make_permute_map(indices_TK, self.num_local_experts, keep_TK,
                                pad_multiple=self.pad_multiple,
                                capacity=capacity if self.pad_to_capacity else None)
        return permute(x_TD, pmap), pmap.offsets_E, DispatchMeta(pmap, weights_TK)

    def combine(self, y_ND, meta):
        return unpermute(y_ND, meta.pmap, meta.weights_TK)
