"""Shared by the peer-parity tests (tests/peers/): our Router fed exact logits, and dense [T, E] gate maps."""
from __future__ import annotations

import torch

from moe_dist.config import MoEConfig
from moe_dist.moe.router import Router


def router_from_logits(logits: torch.Tensor, **kw):
    """Our Router with D == E and an identity weight, so its logits are exactly `logits`."""
    T, E = logits.shape
    base = dict(num_experts=E, top_k=2, expert_hidden=16, aux_loss_coef=0.0)
    base.update(kw)
    router = Router(MoEConfig(**base), E)
    with torch.no_grad():
        router.weight_ED.copy_(torch.eye(E))
    out = router(logits)
    torch.testing.assert_close(out.logits_TE, logits, rtol=0, atol=0)
    return router, out


def dense(weights_TK, indices_TK, E):
    return torch.zeros(indices_TK.shape[0], E, dtype=weights_TK.dtype).scatter(1, indices_TK, weights_TK)
