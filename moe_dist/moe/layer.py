"""The MoE layer: router → capacity → dispatch → experts → combine (+ shared experts).
Legend: B sequences, S positions, T = B·S tokens, D model dim, E experts, K top-k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from moe_dist.config import MoEConfig
from moe_dist.moe import losses
from moe_dist.moe.capacity import apply_capacity, expert_capacity
from moe_dist.moe.dispatch import Dispatcher, LocalDispatcher
from moe_dist.moe.experts import DenseMLP, GroupedExperts
from moe_dist.moe.router import Router


@dataclass(frozen=True)
class MoEStats:
    """One layer's forward, as a value. Counts are per expert over this process's tokens."""
    tokens_per_expert: torch.Tensor   # int64 [E] assignments processed (after drops)
    dropped: torch.Tensor             # int64 [E] assignments dropped by capacity
    aux_loss: torch.Tensor            # scaled by moe.aux_loss_coef, joined to the graph
    z_loss: torch.Tensor              # scaled by moe.z_loss_coef, joined to the graph
    entropy: torch.Tensor             # mean router entropy (nats), detached
    num_tokens: int
    capacity: Optional[int]

    @property
    def drop_fraction(self) -> float:
        total = int(self.tokens_per_expert.sum() + self.dropped.sum())
        return float(self.dropped.sum()) / total if total else 0.0


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig, dim: int, dispatcher: Optional[Dispatcher] = None):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg, dim)
        self.dispatcher = dispatcher or LocalDispatcher(cfg.num_experts, pad_to_capacity=cfg.pad_to_capacity)
        self.experts = GroupedExperts(self.dispatcher.num_local_experts, dim, cfg.expert_hidden,
                                      cfg.activation, cfg.backend)
        shared_hidden = cfg.shared_expert_hidden or cfg.num_shared_experts * cfg.expert_hidden
        self.shared = DenseMLP(dim, shared_hidden, cfg.activation) if cfg.num_shared_experts else None

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        cfg = self.cfg
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        r = self.router(x_TD)

        counts_E = torch.bincount(r.indices_TK.reshape(-1), minlength=cfg.num_experts)
        aux = self._aux_loss(r.probs_TE, r.indices_TK, counts_E, B, S)
        zl = losses.z_loss(r.logits_TE, cfg.z_loss_coef) if cfg.z_loss_coef > 0 else x_TD.new_zeros((), dtype=torch.float32)

        cap = expert_capacity(B * S, cfg)
        dropped = apply_capacity(r.indices_TK, r.weights_TK, cfg.num_experts, cap, cfg.drop_policy)

        x_ND, offsets_E, meta = self.dispatcher.dispatch(x_TD, r.indices_TK, r.weights_TK,
                                                         dropped.keep_TK, cap)
        y_ND = self.experts(x_ND, offsets_E)
        y_TD = self.dispatcher.combine(y_ND, meta)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)

        stats = MoEStats(tokens_per_expert=(counts_E - dropped.dropped_E).detach(),
                         dropped=dropped.dropped_E, aux_loss=aux, z_loss=zl,
                         entropy=losses.router_entropy(r.probs_TE), num_tokens=B * S, capacity=cap)
        return y_TD.view(B, S, D), stats

    def _aux_loss(self, probs_TE, indices_TK, counts_E, B, S) -> torch.Tensor:
        cfg = self.cfg
        if cfg.aux_loss_coef == 0:
            return probs_TE.new_zeros(())
        if cfg.aux_loss_type == "seq":
            seq_of_token = torch.arange(B * S, device=probs_TE.device).repeat_interleave(cfg.top_k) // S
            counts_BE = torch.zeros(B, cfg.num_experts, dtype=torch.long, device=probs_TE.device)
            counts_BE.index_put_((seq_of_token, indices_TK.reshape(-1)),
                                 torch.ones_like(seq_of_token), accumulate=True)
            return losses.seq_load_balancing_loss(probs_TE.view(B, S, cfg.num_experts), counts_BE, cfg.top_k,
                                                  cfg.aux_loss_coef)
        return losses.load_balancing_loss(probs_TE, counts_E, cfg.top_k, cfg.aux_loss_coef)
