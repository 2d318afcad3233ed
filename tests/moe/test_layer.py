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


# ---------------------------------------------------------------------------------------------------------
# The public steps: forward is their composition, so a benchmark that times them one by one times forward.
# ---------------------------------------------------------------------------------------------------------

def _by_hand(layer, x_BSD):
    """forward's steps called one by one, as `bench layer`'s breakdown calls them (single process: no tp)."""
    B, S, D_ = x_BSD.shape
    x_TD = x_BSD.reshape(B * S, D_)
    routing = layer.route(x_TD, B, S)
    cap = layer.capacity(routing)
    x_ND, offsets_E, meta = layer.dispatch(x_TD, routing, cap)
    y_ND = layer.run_experts(x_ND, offsets_E)
    y_TD = layer.shared_experts(x_TD, layer.combine(y_ND, meta))
    return y_TD.view(B, S, D_), layer.stats(routing, cap, meta)


STAGE_CASES = {
    "dropless": dict(),
    "capacity": dict(capacity_factor=0.75, min_capacity=1),
    "capacity_groups_position": dict(capacity_factor=0.75, min_capacity=1, capacity_groups=2,
                                     drop_policy="position"),
    "shared_losses": dict(num_shared_experts=1, aux_loss_coef=0.01, z_loss_coef=0.01, capacity_factor=1.0),
    "seq_aux_top1": dict(top_k=1, aux_loss_coef=0.01, aux_loss_type="seq"),
    "all_to_all_dispatcher": dict(capacity_factor=1.0, dispatcher="all_to_all"),
}


@pytest.mark.parametrize("case", list(STAGE_CASES))
def test_stages_composed_by_hand_equal_forward(case: str) -> None:
    """route → capacity → dispatch → run_experts → combine → shared_experts → stats, called by hand, give
    forward's output, statistics, losses and every gradient exactly (not merely close)."""
    kw = dict(STAGE_CASES[case])
    layer = make_layer(seed=7, **{k: v for k, v in kw.items() if k != "dispatcher"})
    if kw.get("dispatcher") == "all_to_all":
        # The expert-parallel dispatcher on a group of one: its AllToAllMeta path without ranks.
        from moe_dist.moe.dispatch import AllToAllDispatcher
        from moe_dist.parallel.topology import Topology
        single = Topology.single()
        layer.dispatcher = AllToAllDispatcher(layer.cfg.num_experts, single.ep, single.etp)
    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(8))
    gy = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(9))
    results = []
    for run in (layer, lambda xx: _by_hand(layer, xx)):
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        y, stats = run(xx)
        ((y * gy).sum() + stats.aux_loss + stats.z_loss).backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        results.append((y.detach(), stats, xx.grad.clone(), grads))
    (y1, s1, gx1, g1), (y2, s2, gx2, g2) = results
    assert torch.equal(y1, y2) and torch.equal(gx1, gx2)
    assert g1.keys() == g2.keys() and all(torch.equal(g1[n], g2[n]) for n in g1)
    for field in ("tokens_per_expert", "dropped", "aux_loss", "z_loss", "entropy", "router_finite"):
        assert torch.equal(getattr(s1, field), getattr(s2, field)), field
    assert (s1.num_tokens, s1.capacity, s1.a2a_rows_out, s1.a2a_rows_in) == \
        (s2.num_tokens, s2.capacity, s2.a2a_rows_out, s2.a2a_rows_in)
    if "capacity_factor" in kw and case != "shared_losses":
        assert int(s1.dropped.sum()) > 0          # the capacity step really dropped something


@pytest.mark.parametrize("dispatcher", ["local", "all_to_all"])
def test_combine_takes_other_weights(dispatcher: str) -> None:
    """combine(y, meta, weights_TK=w) weights the expert rows by w instead of the router's weights (the
    breakdown passes a leaf there, whose gradient must arrive), for both kinds of dispatch metadata."""
    layer = make_layer(seed=5, capacity_factor=1.0)
    if dispatcher == "all_to_all":
        from moe_dist.moe.dispatch import AllToAllDispatcher
        from moe_dist.parallel.topology import Topology
        single = Topology.single()
        layer.dispatcher = AllToAllDispatcher(layer.cfg.num_experts, single.ep, single.etp)
    x_TD = torch.randn(10, D, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        routing = layer.route(x_TD, 1, 10)
        cap = layer.capacity(routing)
        x_ND, offsets_E, meta = layer.dispatch(x_TD, routing, cap)
        y_ND = layer.run_experts(x_ND, offsets_E)
        y_TD = layer.combine(y_ND, meta)
    w_TK = (3.0 * routing.weights_TK).requires_grad_()
    y3_TD = layer.combine(y_ND, meta, weights_TK=w_TK)
    torch.testing.assert_close(y3_TD.detach(), 3.0 * y_TD)
    y3_TD.sum().backward()
    assert w_TK.grad is not None and w_TK.grad.abs().sum() > 0
    assert torch.equal(layer.combine(y_ND, meta), y_TD)   # the stored metadata is unchanged
