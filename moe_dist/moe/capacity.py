"""Expert capacity and token dropping. Legend: T tokens, E experts, K top-k.

Capacity C = ceil(K·T/E·cf), at least `min_capacity`; `cf=None` means dropless (nothing dropped).
Two drop policies decide which assignments an over-full expert keeps:
- "probs": the C assignments with the highest router weight (Megatron-core's "probs" policy);
- "position": first come, first served in GShard/DeepSpeed order: all first choices (slot 0) in token
  order, then all second choices, ... (DeepSpeed's `top2gating` counts top-1 locations before top-2).
  Megatron-core's "position" policy takes a `topk` over a 0/1 map, whose tie order is unspecified; we
  use the deterministic GShard order instead.
A dropped assignment contributes nothing to the output; its token still keeps the residual stream.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from moe_dist.config import MoEConfig


def expert_capacity(num_tokens: int, cfg: MoEConfig) -> Optional[int]:
    if cfg.capacity_factor is None:
        return None
    return max(math.ceil(cfg.top_k * num_tokens / cfg.num_experts * cfg.capacity_factor), cfg.min_capacity)


@dataclass(frozen=True)
class CapacityResult:
    keep_TK: Optional[torch.Tensor]   # bool, None when nothing can drop (dropless)
    dropped_E: torch.Tensor           # int64 assignments dropped per expert
    capacity: Optional[int]


def apply_capacity(indices_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int,
                   capacity: Optional[int], policy: str = "probs") -> CapacityResult:
    T, K = indices_TK.shape
    if capacity is None or capacity >= T * K:
        return CapacityResult(None, torch.zeros(num_experts, dtype=torch.long, device=indices_TK.device),
                              capacity)
    # Flatten in priority order: slot-major so that every first choice outranks every second choice.
    flat_expert = indices_TK.t().reshape(-1)                       # [K·T], order (slot, token)
    if policy == "probs":
        prio = weights_TK.detach().t().reshape(-1).float()
        # Stable sort by expert, highest weight first inside each expert.
        order = torch.argsort(-prio, stable=True)
        order = order[torch.argsort(flat_expert[order], stable=True)]
    elif policy == "position":
        order = torch.argsort(flat_expert, stable=True)
    else:
        raise ValueError(f"moe.drop_policy={policy!r}: choose 'probs' or 'position'")
    counts_E = torch.bincount(flat_expert, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    sorted_expert = flat_expert[order]
    rank_in_expert = torch.arange(order.numel(), device=order.device) - starts_E[sorted_expert]
    keep_flat = torch.empty_like(flat_expert, dtype=torch.bool)
    keep_flat[order] = rank_in_expert < capacity
    keep_TK = keep_flat.view(K, T).t().contiguous()
    dropped_E = (counts_E - counts_E.clamp(max=capacity))
    return CapacityResult(keep_TK, dropped_E, capacity)
