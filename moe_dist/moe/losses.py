"""Router auxiliary losses. Legend: T tokens, E experts, K top-k, B sequences, S sequence length.

Every function returns a scalar joined to the graph through the router probabilities (the counts are
integers and carry no gradient, as in Switch/GShard). Conventions match Megatron-core's
`switch_load_balancing_loss_func` and `z_loss_func` (tested against them).
"""
from __future__ import annotations

import torch


def load_balancing_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor, top_k: int,
                        coef: float, num_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """α·E·Σ_i f_i·P_i with f_i = counts_i / (T·K) (share of assignments) and P_i = mean_t probs[t, i].

    ``counts_E`` and ``num_tokens`` may describe a larger batch than ``probs_TE`` (global-batch balance:
    counts summed over data-parallel ranks); then P_i is this rank's share of the global mean. A tensor
    ``num_tokens`` stays on the device (no host sync); an empty batch then gives 0 through the clamp.
    """
    T, E = probs_TE.shape
    total = T if num_tokens is None else num_tokens
    if isinstance(total, torch.Tensor):
        total = total.to(probs_TE.dtype).clamp_min(1)
    elif total == 0:
        return probs_TE.sum() * 0.0
    f_E = counts_E.to(probs_TE.dtype) / (total * top_k)
    P_E = probs_TE.sum(0) / total
    return coef * E * torch.sum(f_E * P_E)


def seq_load_balancing_loss(probs_BSE: torch.Tensor, counts_BE: torch.Tensor, top_k: int,
                            coef: float) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss: the load-balancing loss of each sequence, averaged over B."""
    B, S, E = probs_BSE.shape
    if B * S == 0:
        return probs_BSE.sum() * 0.0
    f_BE = counts_BE.to(probs_BSE.dtype) / (S * top_k)
    P_BE = probs_BSE.mean(1)
    return coef * E * torch.sum(f_BE * P_BE) / B


def z_loss(logits_TE: torch.Tensor, coef: float) -> torch.Tensor:
    """ST-MoE router z-loss: coef · mean_t logsumexp(logits_t)²; keeps router logits small and stable."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return coef * torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the per-token router distribution; a statistic, detached."""
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros(())
    # probs rows already sum to 1 (softmax, or sigmoid scores normalised by the router); entr() is
    # -p·ln p with 0 at p = 0, one pass instead of clamp, log, multiply.
    return torch.special.entr(probs_TE.detach().float()).sum(-1).mean()
