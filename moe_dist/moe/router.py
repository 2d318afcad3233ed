"""Token-choice top-k router. Legend: T tokens, D model dim, E experts, K top-k, G expert groups.

All router math runs in fp32 whatever the model dtype: the top-k choice and the softmax are sensitive to
rounding, and a bf16 router makes routing differ between ranks that see the same token.

Semantics (tested against Megatron-core's `topk_routing_with_score_function`):
- softmax: scores = softmax(logits) over all E, then top-k; `renormalize` rescales the K weights to sum
  to 1 (Mixtral), which equals Megatron's softmax-over-the-top-k (`use_pre_softmax=False`) for K > 1;
  at K = 1 the weight stays the full probability (Megatron's post-softmax top-1 weight is a constant 1,
  which gives the router no gradient through the combine).
- sigmoid (DeepSeek-V3): scores = sigmoid(logits); the expert bias is added for *selection only*; the
  weights are the unbiased scores of the chosen experts, renormalised when K > 1 and `renormalize`.
- group-limited: experts form G groups; a group's score is the sum of its top-(K/topk_groups) scores;
  each token keeps `topk_groups` groups and picks its K experts inside them. Groups are ranked on
  the scores (probabilities), as Megatron-core does with pre-softmax; its post-softmax variant ranks
  them on raw logits and can pick other groups.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_dist.config import MoEConfig


@dataclass(frozen=True)
class RouterOutput:
    weights_TK: torch.Tensor      # fp32 combine weights of the chosen experts
    indices_TK: torch.Tensor      # int64 expert ids
    probs_TE: torch.Tensor        # fp32 probabilities over all experts (for the load-balancing loss)
    logits_TE: torch.Tensor       # fp32 router logits (for the z-loss)


def _group_limited_topk(scores_TE: torch.Tensor, k: int, groups: int, topk_groups: int) -> torch.Tensor:
    T, E = scores_TE.shape
    grouped = scores_TE.view(T, groups, E // groups)
    per_group = max(k // topk_groups, 1)
    group_score_TG = grouped.topk(min(per_group, E // groups), dim=-1).values.sum(-1)
    chosen_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
    chosen_TG.scatter_(1, group_score_TG.topk(topk_groups, dim=-1).indices, True)
    mask_TE = chosen_TG.unsqueeze(-1).expand(T, groups, E // groups).reshape(T, E)
    return scores_TE.masked_fill(~mask_TE, float("-inf")).topk(k, dim=-1).indices


class Router(nn.Module):
    def __init__(self, cfg: MoEConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        # Whatever dtype the model is cast to, forward() upcasts this weight and computes logits in fp32.
        self.weight_ED = nn.Parameter(torch.empty(cfg.num_experts, dim))
        if cfg.expert_bias:
            # A buffer, not a parameter: it is updated by the load rule below, never by the optimizer.
            self.register_buffer("expert_bias_E", torch.zeros(cfg.num_experts))
        else:
            self.expert_bias_E = None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight_ED, std=std)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        cfg = self.cfg
        x_TD = x_TD.float()
        if self.training and cfg.jitter_eps > 0:
            noise = torch.empty_like(x_TD).uniform_(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)
            x_TD = x_TD * noise
        logits_TE = F.linear(x_TD, self.weight_ED.float())
        if cfg.score_func == "softmax":
            scores_TE = torch.softmax(logits_TE, dim=-1)
            probs_TE = scores_TE
        else:
            scores_TE = torch.sigmoid(logits_TE)
            probs_TE = scores_TE / (scores_TE.sum(-1, keepdim=True) + 1e-20)

        indices_TK = self._select(scores_TE.detach())
        weights_TK = scores_TE.gather(1, indices_TK)
        if cfg.renormalize and self.top_k > 1:
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
        if cfg.route_scale != 1.0:
            weights_TK = weights_TK * cfg.route_scale
        return RouterOutput(weights_TK, indices_TK, probs_TE, logits_TE)

    def _select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        cfg, T = self.cfg, scores_TE.shape[0]
        if cfg.force_balanced:
            # Token t gets experts (t·K + j) mod E: every expert receives the same share (±1).
            base = torch.arange(T, device=scores_TE.device).unsqueeze(1) * self.top_k
            return (base + torch.arange(self.top_k, device=scores_TE.device)) % self.num_experts
        if self.expert_bias_E is not None:
            scores_TE = scores_TE + self.expert_bias_E
        if cfg.num_groups > 1 and T > 0:
            return _group_limited_topk(scores_TE, self.top_k, cfg.num_groups, cfg.topk_groups)
        if self.top_k == 1:
            return scores_TE.argmax(-1, keepdim=True)      # a max-reduction; topk sorts a candidate heap
        return scores_TE.topk(self.top_k, dim=-1).indices

    @torch.no_grad()
    def update_expert_bias(self, counts_E: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing (DeepSeek-V3): raise the bias of under-loaded experts and lower
        that of over-loaded ones by a fixed step. Call once per optimizer step with the step's counts
        (summed over micro-batches, and over data-parallel ranks so every rank keeps the same bias)."""
        if self.expert_bias_E is None:
            raise RuntimeError("update_expert_bias needs moe.expert_bias: true")
        counts_E = counts_E.float()
        self.expert_bias_E += self.cfg.bias_update_rate * torch.sign(counts_E.mean() - counts_E)
