"""The MoE layer (moe_dist.moe.layer) equals a dense computation; empty batches.

fp32 and small shapes; every check compares against an independent computation.
"""
from __future__ import annotations

import pytest
import torch

from layer_helpers import D, DENSE_CASES, dense_reference, make_layer


@pytest.mark.parametrize("backend", ["loop", "auto"])
@pytest.mark.parametrize("case", list(DENSE_CASES))
def test_layer_equals_dense_computation(case: str, backend: str) -> None:
    layer = make_layer(seed=3, backend=backend, **DENSE_CASES[case])
    if layer.router.expert_bias_E is not None:
        # A large bias on experts 6, 7 forces them into every token's selection ...
        layer.router.expert_bias_E.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 5.0, 5.0]))
    torch.manual_seed(4)
    x = torch.randn(2, 5, D)
    x1 = x.clone().requires_grad_(True)
    y, _ = layer(x1)
    params = [x1, layer.router.weight_ED, layer.experts.w_in_EDF2, layer.experts.w_out_EFD]
    gy = torch.randn_like(y)
    g_layer = torch.autograd.grad((y * gy).sum(), params)
    x2 = x.clone().requires_grad_(True)
    y_ref = dense_reference(layer, x2)
    g_ref = torch.autograd.grad((y_ref * gy).sum(), [x2] + params[1:])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_layer, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if layer.router.expert_bias_E is not None:
        # ... but only selection changes: the weights are the unbiased sigmoid scores, renormalised.
        r = layer.router(x.reshape(-1, D))
        assert (r.indices_TK.sort(-1).values == torch.tensor([6, 7])).all()
        s = torch.sigmoid(x.reshape(-1, D) @ layer.router.weight_ED.t())[:, 6:8]
        torch.testing.assert_close(r.weights_TK.sort(-1).values,
                                   (2.5 * s / s.sum(-1, keepdim=True)).sort(-1).values)


# ---------------------------------------------------------------------------------------------------------
# Edge cases.
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 3, D), (1, 0, D)])
@pytest.mark.parametrize("kw", [dict(), dict(capacity_factor=1.0), dict(capacity_factor=1.0, pad_to_capacity=True,
                                                                         min_capacity=2),
                                dict(num_shared_experts=1, aux_loss_coef=0.01, z_loss_coef=0.01),
                                dict(aux_loss_coef=0.01, aux_loss_type="seq")],
                         ids=["dropless", "capacity", "pad_to_capacity_min2", "shared_losses", "seq_aux"])
def test_zero_tokens(shape, kw) -> None:
    layer = make_layer(**kw)
    x = torch.randn(shape, requires_grad=True)
    y, stats = layer(x)
    assert y.shape == shape
    assert stats.num_tokens == 0 and int(stats.tokens_per_expert.sum()) == 0 and int(stats.dropped.sum()) == 0
    assert stats.drop_fraction == 0.0
    (y.sum() + stats.aux_loss + stats.z_loss).backward()
    assert x.grad.shape == shape
