"""Tests for the MoE layer: router, capacity, dispatch, experts and their backends.

fp32 and small shapes throughout; every check compares against an independent computation.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_dist.config import MoEConfig
from moe_dist.kernels.reference import make_permute_map
from moe_dist.moe.capacity import apply_capacity, expert_capacity
from moe_dist.moe.dispatch import LocalDispatcher
from moe_dist.moe.experts import grouped_mm_supported
from moe_dist.moe.layer import MoELayer
from moe_dist.moe.router import Router

D = 16   # model dim; multiple of 4 so grouped_mm accepts fp32
FH = 16  # expert hidden


def make_cfg(**kw) -> MoEConfig:
    base = dict(num_experts=4, top_k=2, expert_hidden=FH, aux_loss_coef=0.0, min_capacity=0)
    base.update(kw)
    return MoEConfig(**base)


def make_layer(seed: int = 0, dim: int = D, **kw) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(make_cfg(**kw), dim)
    # Larger weights than the 0.02 init so outputs and gradients are O(1) and 1e-5 tolerances mean something.
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.5)
    return layer


def clone_layer(layer: MoELayer, strict: bool = True, **kw) -> MoELayer:
    cfg = dict(vars(layer.cfg))
    cfg.update(kw)
    other = MoELayer(MoEConfig(**cfg), layer.router.weight_ED.shape[1])
    other.load_state_dict(layer.state_dict(), strict=strict)
    return other


def run_fwd_bwd(layer: MoELayer, x: torch.Tensor, gy: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y, stats = layer(x)
    loss = (y * gy).sum() + stats.aux_loss + stats.z_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    grads["input"] = x.grad.clone()
    return y.detach(), stats, grads


# ---------------------------------------------------------------------------------------------------------
# Backends: grouped_mm == loop, outputs and every gradient.
# ---------------------------------------------------------------------------------------------------------

def _dominant_router(layer: MoELayer, expert: int = 0) -> None:
    """Every token with positive features picks `expert` first (its logit is ≫ the others)."""
    with torch.no_grad():
        layer.router.weight_ED[expert] = 5.0


BACKEND_CASES = {
    # name: (layer kwargs, x shape, positive input, dominant expert)
    "dropless": (dict(num_experts=4, top_k=2), (2, 6, D), False, None),
    "cap1.0": (dict(num_experts=4, top_k=2, capacity_factor=1.0), (2, 6, D), False, None),
    "cap1.0_position": (dict(num_experts=4, top_k=2, capacity_factor=1.0, drop_policy="position"),
                        (2, 6, D), False, None),
    "more_experts_than_tokens": (dict(num_experts=16, top_k=2), (1, 3, D), False, None),
    "more_experts_than_tokens_cap": (dict(num_experts=16, top_k=2, capacity_factor=1.0, min_capacity=1),
                                     (1, 3, D), False, None),
    "one_token": (dict(num_experts=4, top_k=2), (1, 1, D), False, None),
    "one_expert_takes_all": (dict(num_experts=4, top_k=1), (2, 5, D), True, 0),
    "one_expert_takes_all_cap": (dict(num_experts=4, top_k=1, capacity_factor=1.0), (2, 5, D), True, 0),
    "single_expert": (dict(num_experts=1, top_k=1), (2, 3, D), False, None),
    "topk_equals_E": (dict(num_experts=4, top_k=4, renormalize=True), (2, 3, D), False, None),
    "shared_zloss_aux": (dict(num_experts=4, top_k=2, num_shared_experts=1, z_loss_coef=1e-2,
                              aux_loss_coef=1e-2), (2, 4, D), False, None),
    "gelu_sigmoid_bias": (dict(num_experts=8, top_k=2, activation="gelu", score_func="sigmoid",
                               expert_bias=True, renormalize=True), (2, 4, D), False, None),
}


def _triton_missing():
    from moe_dist.kernels._configs import unavailable_reason
    return unavailable_reason()


# The triton backend runs in the interpreter on the CPU: a spread of the cases keeps the suite fast (drops by
# both policies, empty experts, one token, all tokens to one expert, one expert, shared experts with both
# losses, GELU with sigmoid scores).
TRITON_CASES = ["cap1.0_position", "more_experts_than_tokens", "one_token", "one_expert_takes_all_cap",
                "single_expert", "shared_zloss_aux", "gelu_sigmoid_bias"]
BACKEND_PARAMS = (
    [pytest.param(c, "grouped_mm", marks=pytest.mark.skipif(not grouped_mm_supported(D, FH, torch.float32),
                                                            reason="torch._grouped_mm unavailable"))
     for c in BACKEND_CASES]
    + [pytest.param(c, "triton", marks=pytest.mark.skipif(_triton_missing() is not None,
                                                          reason=str(_triton_missing())))
       for c in TRITON_CASES])


@pytest.mark.parametrize("case,backend", BACKEND_PARAMS)
def test_backend_matches_loop(case: str, backend: str) -> None:
    kw, shape, positive, dominant = BACKEND_CASES[case]
    ref = make_layer(seed=1, backend="loop", **kw)
    if dominant is not None:
        _dominant_router(ref, dominant)
    if ref.router.expert_bias_E is not None:
        ref.router.expert_bias_E.copy_(torch.linspace(-0.3, 0.3, ref.cfg.num_experts))
    gmm = clone_layer(ref, backend=backend)
    assert ref.experts.backend == "loop" and gmm.experts.backend == backend
    torch.manual_seed(2)
    x = torch.randn(shape)
    if positive:
        x = x.abs() + 0.1
    gy = torch.randn(shape)
    y1, s1, g1 = run_fwd_bwd(ref, x, gy)
    y2, s2, g2 = run_fwd_bwd(gmm, x, gy)
    if dominant is not None:  # the crafted case really sends every token to one expert
        assert int(s1.tokens_per_expert[dominant] + s1.dropped[dominant]) == x.shape[0] * x.shape[1]
    if case == "more_experts_than_tokens":
        assert (s1.tokens_per_expert == 0).any()
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
    assert torch.equal(s1.tokens_per_expert, s2.tokens_per_expert) and torch.equal(s1.dropped, s2.dropped)
    assert set(g1) == set(g2)
    expected = {"input", "router.weight_ED", "experts.w_in_EDF2", "experts.w_out_EFD"}
    if ref.shared is not None:
        expected |= {"shared.w_in.weight", "shared.w_out.weight"}
    assert expected <= set(g1)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-5, msg=f"grad {name} ({case})")
    assert g1["experts.w_in_EDF2"].abs().sum() > 0  # gradients actually flow


# ---------------------------------------------------------------------------------------------------------
# The layer equals a dense computation: every expert on every token, weighted by the gates.
# ---------------------------------------------------------------------------------------------------------

def dense_reference(layer: MoELayer, x_BSD: torch.Tensor) -> torch.Tensor:
    cfg = layer.cfg
    x = x_BSD.reshape(-1, x_BSD.shape[-1])
    W = layer.router.weight_ED
    logits = x @ W.t()
    if cfg.score_func == "softmax":
        scores = torch.softmax(logits, -1)
    else:
        scores = torch.sigmoid(logits)
    sel = scores.detach()
    if layer.router.expert_bias_E is not None:
        sel = sel + layer.router.expert_bias_E
    idx = sel.topk(cfg.top_k, dim=-1).indices
    w = scores.gather(1, idx)
    if cfg.renormalize and cfg.top_k > 1:
        w = w / w.sum(-1, keepdim=True)
    w = w * cfg.route_scale
    gates = torch.zeros_like(scores).scatter(1, idx, w)            # [T, E]
    Fh = cfg.expert_hidden
    out = torch.zeros_like(x)
    for e in range(cfg.num_experts):
        h = x @ layer.experts.w_in_EDF2[e]
        if cfg.activation == "swiglu":
            h = F.silu(h[:, :Fh]) * h[:, Fh:]
        else:
            h = F.gelu(h)
        out = out + gates[:, e:e + 1] * (h @ layer.experts.w_out_EFD[e])
    if layer.shared is not None:
        h = x @ layer.shared.w_in.weight.t()
        if cfg.activation == "swiglu":
            h = F.silu(h[:, :h.shape[1] // 2]) * h[:, h.shape[1] // 2:]
        else:
            h = F.gelu(h)
        out = out + h @ layer.shared.w_out.weight.t()
    return out.view_as(x_BSD)


DENSE_CASES = {
    "softmax_swiglu_k2": dict(num_experts=4, top_k=2, renormalize=True),
    "softmax_swiglu_k3_E6": dict(num_experts=6, top_k=3, renormalize=True),
    "softmax_gelu_k2": dict(num_experts=4, top_k=2, renormalize=True, activation="gelu"),
    "softmax_norenorm_k2": dict(num_experts=4, top_k=2, renormalize=False),
    "sigmoid_bias_scale": dict(num_experts=8, top_k=2, renormalize=True, score_func="sigmoid",
                               expert_bias=True, route_scale=2.5),
    "shared_experts": dict(num_experts=4, top_k=2, renormalize=True, num_shared_experts=2),
    "shared_experts_gelu_hidden": dict(num_experts=4, top_k=2, renormalize=True, num_shared_experts=1,
                                       shared_expert_hidden=8, activation="gelu"),
}


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


def test_capacity_larger_than_batch_drops_nothing() -> None:
    dropless = make_layer(seed=5, num_experts=4, top_k=2)
    big = clone_layer(dropless, capacity_factor=100.0)
    x = torch.randn(2, 6, D)
    y0, s0 = dropless(x)
    y1, s1 = big(x)
    assert s1.capacity == expert_capacity(12, big.cfg) and s1.capacity >= 12
    assert int(s1.dropped.sum()) == 0 and s1.drop_fraction == 0.0
    assert int(s1.tokens_per_expert.sum()) == 12 * 2
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_all_tokens_to_one_expert_drops_overflow(policy: str) -> None:
    T, E, k = 16, 4, 1
    layer = make_layer(seed=6, num_experts=E, top_k=k, capacity_factor=1.0, drop_policy=policy)
    with torch.no_grad():  # expert 2 wins every token, with distinct (unsaturated) weights
        layer.router.weight_ED.zero_()
        layer.router.weight_ED[2] = 0.3
    x = torch.rand(1, T, D) + 0.1
    y, stats = layer(x)
    C = math.ceil(k * T / E * 1.0)
    assert stats.capacity == C == 4
    assert stats.dropped.tolist() == [0, 0, T * k - C, 0]
    assert stats.tokens_per_expert.tolist() == [0, 0, C, 0]
    assert stats.drop_fraction == pytest.approx((T * k - C) / (T * k))
    # Dropped tokens get exactly zero from the routed experts; kept ones do not.
    zero_rows = (y[0] == 0).all(-1)
    assert int(zero_rows.sum()) == T - C
    if policy == "position":
        assert zero_rows.tolist() == [False] * C + [True] * (T - C)   # first come, first served
    else:
        r = layer.router(x[0])
        kept = r.weights_TK[:, 0].topk(C).indices
        assert sorted((~zero_rows).nonzero().squeeze(1).tolist()) == sorted(kept.tolist())


def test_token_with_all_assignments_dropped_gets_zero() -> None:
    # k=2: every token's first choice is expert 0 (C slots), second choices go elsewhere. Force the second
    # choice onto expert 1 too so tokens past capacity lose both assignments.
    layer = make_layer(seed=7, num_experts=4, top_k=2, capacity_factor=1.0, drop_policy="position")
    with torch.no_grad():
        layer.router.weight_ED.zero_()
        layer.router.weight_ED[0] = 5.0
        layer.router.weight_ED[1] = 4.0
    T = 8
    x = torch.rand(1, T, D) + 0.1
    y, stats = layer(x)
    C = math.ceil(2 * T / 4)
    assert stats.capacity == C == 4
    assert stats.dropped.tolist() == [T - C, T - C, 0, 0]
    assert (y[0, C:] == 0).all() and (y[0, :C] != 0).any(-1).all()
    # With a shared expert, dropped tokens get exactly the shared expert's output.
    shared = clone_layer(layer, strict=False, num_shared_experts=1)
    torch.manual_seed(0)
    shared.shared.w_in.weight.data.normal_()
    ys, _ = shared(x)
    torch.testing.assert_close(ys[0, C:], shared.shared(x[0, C:]), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Capacity policies.
# ---------------------------------------------------------------------------------------------------------

def ref_keep_position(indices, E, C):
    T, K = indices.shape
    used = [0] * E
    keep = torch.zeros(T, K, dtype=torch.bool)
    for k in range(K):
        for t in range(T):
            e = int(indices[t, k])
            if used[e] < C:
                keep[t, k] = True
                used[e] += 1
    return keep


def ref_keep_probs(indices, weights, E, C):
    T, K = indices.shape
    keep = torch.zeros(T, K, dtype=torch.bool)
    for e in range(E):
        pos = [(float(weights[t, k]), t, k) for t in range(T) for k in range(K) if int(indices[t, k]) == e]
        pos.sort(key=lambda p: -p[0])
        for _, t, k in pos[:C]:
            keep[t, k] = True
    return keep


def test_position_policy_keeps_first_choices_first() -> None:
    # Expert 0 is the second choice of tokens 0,1 and the first choice of tokens 2..5: with C=4 the four
    # first choices win even though tokens 0,1 come earlier.
    indices = torch.tensor([[1, 0], [2, 0], [0, 1], [0, 2], [0, 3], [0, 1]])
    weights = torch.full((6, 2), 0.5)
    res = apply_capacity(indices, weights, 4, 4, "position")
    keep = res.keep_TK
    assert keep[:, 0].all()                        # every first choice fits (expert 0 has 4 of them)
    assert not keep[0, 1] and not keep[1, 1]        # second choices to expert 0 lose
    assert res.dropped_E.tolist() == [2, 0, 0, 0]
    # C=2: first choices in token order.
    res = apply_capacity(indices, weights, 4, 2, "position")
    assert res.keep_TK[:, 0].tolist() == [True, True, True, True, False, False]
    assert res.keep_TK[:, 1].tolist() == [False, False, True, True, True, False]
    assert res.dropped_E.tolist() == [4, 1, 0, 0]


def test_probs_policy_keeps_highest_weights() -> None:
    indices = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])
    weights = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.8, 0.2]])
    res = apply_capacity(indices, weights, 3, 2, "probs")
    # expert 0: weights 0.6, 0.9, 0.7, 0.2 -> keeps 0.9, 0.7; expert 1: 0.4, 0.1, 0.8 -> keeps 0.8, 0.4
    assert res.keep_TK.tolist() == [[False, True], [True, False], [True, True], [True, False]]
    assert res.dropped_E.tolist() == [2, 1, 0]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("policy", ["probs", "position"])
def test_apply_capacity_matches_python_reference(seed: int, policy: str) -> None:
    g = torch.Generator().manual_seed(seed)
    T, E, K = 13, 5, 2
    scores = torch.rand(T, E, generator=g) ** 3
    scores[:, 0] += 0.5            # make expert 0 popular so something drops
    w, idx = scores.topk(K, dim=-1)
    C = 1 + seed % 4
    res = apply_capacity(idx, w, E, C, policy)
    ref = ref_keep_position(idx, E, C) if policy == "position" else ref_keep_probs(idx, w, E, C)
    assert torch.equal(res.keep_TK, ref)
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    assert torch.equal(res.dropped_E, counts - counts.clamp(max=C))
    assert torch.equal(torch.bincount(idx[res.keep_TK], minlength=E), counts.clamp(max=C))


def test_apply_capacity_dropless_and_bad_policy() -> None:
    idx = torch.tensor([[0, 1], [0, 1]])
    w = torch.ones(2, 2)
    res = apply_capacity(idx, w, 2, None)
    assert res.keep_TK is None and res.dropped_E.tolist() == [0, 0] and res.capacity is None
    assert apply_capacity(idx, w, 2, 4).keep_TK is None
    with pytest.raises(ValueError, match="drop_policy"):
        apply_capacity(idx, w, 2, 1, "random")


@pytest.mark.parametrize("T,E,k,cf,minc", [(16, 4, 1, 1.0, 0), (16, 4, 2, 1.0, 0), (10, 4, 2, 1.25, 0),
                                           (7, 3, 2, 0.5, 0), (7, 3, 2, 0.5, 4), (100, 8, 2, 1.1, 4),
                                           (0, 4, 2, 1.0, 3), (5, 8, 1, 2.0, 0)])
def test_expert_capacity_formula(T, E, k, cf, minc) -> None:
    cfg = make_cfg(num_experts=E, top_k=k, capacity_factor=cf, min_capacity=minc)
    assert expert_capacity(T, cfg) == max(math.ceil(k * T / E * cf), minc)
    assert expert_capacity(T, make_cfg(num_experts=E, top_k=k, capacity_factor=None)) is None


def test_pad_to_capacity_offsets_and_output() -> None:
    E, C = 4, 5
    idx = torch.tensor([[0, 1], [0, 2], [1, 2], [0, 3], [2, 0]])
    keep = apply_capacity(idx, torch.rand(5, 2), E, C, "position").keep_TK
    pmap = make_permute_map(idx, E, keep, capacity=C)
    assert pmap.offsets_E.dtype == torch.int32
    assert pmap.offsets_E.tolist() == [C, 2 * C, 3 * C, 4 * C] and pmap.num_rows == E * C
    disp = LocalDispatcher(E, pad_to_capacity=True)
    x = torch.randn(5, D)
    x_ND, offs, meta = disp.dispatch(x, idx, torch.rand(5, 2), None, C)
    assert offs.tolist() == [C, 2 * C, 3 * C, 4 * C]
    assert x_ND.shape == (E * C, D)
    assert int((meta.pmap.src_N < 0).sum()) == E * C - 10 and (x_ND[meta.pmap.src_N < 0] == 0).all()
    with pytest.raises(ValueError, match="capacity"):
        make_permute_map(torch.zeros(3, 1, dtype=torch.long), 2, capacity=2)


@pytest.mark.parametrize("backend", ["loop", "auto"])
def test_pad_to_capacity_same_output_as_unpadded(backend: str) -> None:
    base = make_layer(seed=8, num_experts=4, top_k=2, capacity_factor=1.0, backend=backend)
    padded = clone_layer(base, pad_to_capacity=True)
    x = torch.randn(2, 6, D)
    gy = torch.randn(2, 6, D)
    y0, s0, g0 = run_fwd_bwd(base, x, gy)
    y1, s1, g1 = run_fwd_bwd(padded, x, gy)
    assert int(s0.dropped.sum()) > 0  # the case exercises drops
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    assert torch.equal(s0.tokens_per_expert, s1.tokens_per_expert) and torch.equal(s0.dropped, s1.dropped)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Router.
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T,E,k", [(12, 4, 2), (13, 4, 2), (7, 8, 3), (10, 3, 3), (5, 6, 1)])
def test_force_balanced(T, E, k) -> None:
    layer = make_layer(num_experts=E, top_k=k, force_balanced=True)
    _dominant_router(layer, 0)  # the router's own preference must be ignored
    x = torch.rand(1, T, D)
    r = layer.router(x[0])
    counts = torch.bincount(r.indices_TK.reshape(-1), minlength=E)
    assert int(counts.max() - counts.min()) <= 1 and int(counts.sum()) == T * k
    assert all(len(set(row)) == k for row in r.indices_TK.tolist())  # distinct experts per token
    _, stats = layer(x)
    assert torch.equal(stats.tokens_per_expert, counts)


def test_router_fp32_under_bf16() -> None:
    layer = make_layer(seed=9, num_experts=4, top_k=2, renormalize=True)
    ref = clone_layer(layer)
    layer.to(torch.bfloat16)
    # nn.Module.to casts the router weight too; the router upcasts it and the input before the logits.
    assert layer.router.weight_ED.dtype == torch.bfloat16
    x = torch.randn(1, 4, D)
    r = layer.router(x[0].bfloat16())
    for t in (r.weights_TK, r.probs_TE, r.logits_TE):
        assert t.dtype == torch.float32
    assert r.indices_TK.dtype == torch.int64
    # logits = fp32 matmul of the bf16-rounded operands.
    expected = x[0].bfloat16().float() @ layer.router.weight_ED.float().t()
    torch.testing.assert_close(r.logits_TE, expected, rtol=1e-6, atol=1e-6)
    y, stats = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert stats.aux_loss.dtype == torch.float32
    y_ref, _ = ref(x)
    torch.testing.assert_close(y.float(), y_ref, rtol=5e-2, atol=5e-2)


def test_update_expert_bias() -> None:
    rate = 0.01
    router = Router(make_cfg(num_experts=4, top_k=2, expert_bias=True, bias_update_rate=rate,
                             score_func="sigmoid"), D)
    assert router.expert_bias_E.tolist() == [0, 0, 0, 0]
    assert "expert_bias_E" in dict(router.named_buffers()) and "expert_bias_E" not in dict(router.named_parameters())
    router.update_expert_bias(torch.tensor([5, 1, 3, 3]))     # mean 3: 0 over-, 1 under-loaded
    torch.testing.assert_close(router.expert_bias_E, torch.tensor([-rate, rate, 0.0, 0.0]))
    router.update_expert_bias(torch.tensor([6, 0, 2, 4]))
    torch.testing.assert_close(router.expert_bias_E, torch.tensor([-2 * rate, 2 * rate, rate, -rate]))
    with pytest.raises(RuntimeError, match="expert_bias"):
        Router(make_cfg(num_experts=4), D).update_expert_bias(torch.ones(4))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("E,G,TG,k", [(8, 4, 2, 4), (8, 4, 1, 2), (16, 4, 2, 3), (12, 3, 2, 2)])
def test_group_limited_routing(score_func, E, G, TG, k) -> None:
    torch.manual_seed(10)
    router = Router(make_cfg(num_experts=E, top_k=k, num_groups=G, topk_groups=TG, score_func=score_func), D)
    router.weight_ED.data.normal_()
    x = torch.randn(40, D)
    r = router(x)
    groups = r.indices_TK // (E // G)
    assert all(len(set(row)) <= TG for row in groups.tolist())
    assert all(len(set(row)) == k for row in r.indices_TK.tolist())
    # Reference: group score = sum of its top-max(k//TG,1) scores; best TG groups; top-k inside them.
    lg = r.logits_TE.detach()
    scores = torch.softmax(lg, -1) if score_func == "softmax" else torch.sigmoid(lg)
    gs = scores.view(-1, G, E // G).topk(max(k // TG, 1), -1).values.sum(-1)
    top_groups = gs.topk(TG, -1).indices
    for t in range(x.shape[0]):
        allowed = [e for e in range(E) if e // (E // G) in top_groups[t].tolist()]
        best = sorted(allowed, key=lambda e: -float(scores[t, e]))[:k]
        assert sorted(best) == sorted(r.indices_TK[t].tolist())
    if k <= TG:
        return
    # Without the limit, some token would have used more groups (the test is not vacuous).
    free = Router(make_cfg(num_experts=E, top_k=k, score_func=score_func), D)
    free.load_state_dict(router.state_dict())
    free_groups = free(x).indices_TK // (E // G)
    assert any(len(set(row)) > TG for row in free_groups.tolist())


def test_jitter_only_in_training() -> None:
    base = make_layer(seed=11, num_experts=4, top_k=2)
    jit = clone_layer(base, jitter_eps=0.2)
    x = torch.randn(2, 5, D)
    base.eval(), jit.eval()
    y0, _ = base(x)
    y1, _ = jit(x)
    y2, _ = jit(x)
    assert torch.equal(y0, y1) and torch.equal(y1, y2)
    base.train(), jit.train()
    torch.manual_seed(0)
    yt0, _ = base(x)
    assert torch.equal(yt0, y0)              # jitter_eps=0 adds nothing in training either
    torch.manual_seed(0)
    r1 = jit.router(x.reshape(-1, D))
    r_eval = base.router(x.reshape(-1, D))
    assert not torch.allclose(r1.logits_TE, r_eval.logits_TE)
    # Multiplicative jitter within [1-eps, 1+eps] per input feature.
    ratio_bound = (r1.logits_TE - r_eval.logits_TE).abs()
    bound = 0.2 * (x.reshape(-1, D).abs() @ base.router.weight_ED.abs().t())
    assert (ratio_bound <= bound + 1e-5).all()


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


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_groups_apply_capacity_to_each_group_alone(policy: str) -> None:
    # GShard groups: one call with capacity_groups=2 equals two calls, one per half of the tokens.
    grouped = make_layer(seed=4, num_experts=4, top_k=2, capacity_factor=0.75, min_capacity=1,
                         drop_policy=policy, capacity_groups=2)
    single = clone_layer(grouped, capacity_groups=1)
    x = torch.randn(4, 6, D)
    y, stats = grouped(x)
    halves = [single(h) for h in x.chunk(2)]
    torch.testing.assert_close(y, torch.cat([h[0] for h in halves]), rtol=1e-6, atol=1e-6)
    assert torch.equal(stats.dropped, halves[0][1].dropped + halves[1][1].dropped)
    assert int(stats.dropped.sum()) > 0
    assert stats.capacity == halves[0][1].capacity
