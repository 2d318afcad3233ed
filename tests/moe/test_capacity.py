"""Capacity (moe_dist.moe.capacity): the formula, the probs and position drop policies against Python
references, drops inside the layer, GShard capacity groups.
"""
from __future__ import annotations

import math

import pytest
import torch

from layer_helpers import D, clone_layer, make_cfg, make_layer
from moe_dist.moe.capacity import apply_capacity, expert_capacity


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
