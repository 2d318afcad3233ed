"""The layer's losses and statistics (moe_dist.moe.losses): aux and z losses, entropy, per-expert counts.
"""
from __future__ import annotations

import torch

from layer_helpers import D, make_layer


def test_layer_stats_and_losses() -> None:
    layer = make_layer(seed=12, num_experts=4, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01)
    x = torch.randn(2, 6, D)
    y, stats = layer(x)
    r = layer.router(x.reshape(-1, D))
    counts = torch.bincount(r.indices_TK.reshape(-1), minlength=4)
    assert torch.equal(stats.tokens_per_expert, counts)
    P = r.probs_TE.mean(0)
    torch.testing.assert_close(stats.aux_loss, 0.1 * 4 * (counts.float() / 24 * P).sum())
    torch.testing.assert_close(stats.z_loss, 0.01 * torch.logsumexp(r.logits_TE, -1).square().mean())
    p = r.probs_TE
    torch.testing.assert_close(stats.entropy, -(p * p.log()).sum(-1).mean())
    assert stats.aux_loss.requires_grad and stats.z_loss.requires_grad and not stats.entropy.requires_grad
