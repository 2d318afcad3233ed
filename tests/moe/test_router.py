"""The router (moe_dist.moe.router): forced balance, fp32 under bf16, the expert-bias update, group-limited
routing, jitter.
"""
from __future__ import annotations

import pytest
import torch

from layer_helpers import D, dominant_router, clone_layer, make_cfg, make_layer
from moe_dist.moe.router import Router


@pytest.mark.parametrize("T,E,k", [(12, 4, 2), (13, 4, 2), (7, 8, 3), (10, 3, 3), (5, 6, 1)])
def test_force_balanced(T, E, k) -> None:
    layer = make_layer(num_experts=E, top_k=k, force_balanced=True)
    dominant_router(layer, 0)  # the router's own preference must be ignored
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
