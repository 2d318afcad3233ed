"""Parity with DeepSpeed (deepspeed.moe.sharded_moe, installed from PyPI), run on the CPU.

Convention differences found (each test below checks the matched configuration):

DeepSpeed (deepspeed.moe.sharded_moe):
- top1gating capacity = max(ceil(T/E·cf), min_capacity) = ours with k=1. Its l_aux = E·Σ me·ce equals our
  ``load_balancing_loss(probs, counts, top_k=1, coef=1)``.
- top1gating with ``use_rts=False`` keeps an *unspecified* subset of an over-full expert's tokens (a
  ``topk`` over a tied 0/1 mask, not first-come); only per-expert kept counts are comparable then.
- top2gating capacity = ceil(T/E · 2cf) (ours: ceil(2T/E · cf); equal up to float rounding, tested on exact
  values). Keep order is GShard's (all first choices, then second choices) = our "position" policy.
- top2gating l_aux = E²·mean(me·ce) = E·Σ me·ce where ce counts *first choices only*, divided by T: it equals
  our load-balancing loss with top_k=1 on first-choice counts, not ours with k=2 (which counts both
  choices, divided by 2T).
- top2gating renormalises the gates over the *kept* assignments (after capacity): a token whose second
  choice is dropped gets weight 1.0 on its first choice. Ours renormalises before dropping, so that token
  keeps g1/(g1+g2). Weights agree where both assignments are kept.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from moe_dist.config import MoEConfig  # noqa: E402
from moe_dist.moe import losses  # noqa: E402
from moe_dist.moe.capacity import apply_capacity, expert_capacity  # noqa: E402
from peer_helpers import dense, router_from_logits  # noqa: E402


@pytest.fixture(scope="module")
def ds():
    pytest.importorskip("deepspeed")
    from deepspeed.moe import sharded_moe
    return sharded_moe


@pytest.mark.parametrize("T,E,cf,minc,hot", [(32, 4, 1.0, 0, 0.0), (32, 8, 1.0, 4, 0.0),
                                             (24, 4, 0.5, 0, 2.0), (40, 8, 1.25, 2, 1.0),
                                             (16, 4, 4.0, 0, 0.0)])
def test_deepspeed_top1gating(ds, T, E, cf, minc, hot) -> None:
    torch.manual_seed(7)
    logits = torch.randn(T, E)
    logits[:, 1] += hot
    router, r = router_from_logits(logits, top_k=1)
    l_aux, combine, dispatch, exp_counts = ds.top1gating(logits.clone(), cf, minc, use_rts=False,
                                                         noisy_gate_policy=None, drop_tokens=True)
    counts = torch.bincount(r.indices_TK.reshape(-1), minlength=E)
    assert torch.equal(exp_counts, counts)
    # DeepSpeed l_aux = E·Σ_i me_i·ce_i (me: mean gate, ce: fraction of tokens) = ours with k=1, coef=1.
    torch.testing.assert_close(l_aux, losses.load_balancing_loss(r.probs_TE, counts, 1, 1.0),
                               rtol=1e-6, atol=1e-7)
    cfg = MoEConfig(num_experts=E, top_k=1, capacity_factor=cf, min_capacity=minc)
    C = expert_capacity(T, cfg)
    assert combine.shape == (T, E, C)
    res = apply_capacity(r.indices_TK, r.weights_TK, E, C, "position")
    keep = res.keep_TK if res.keep_TK is not None else torch.ones(T, 1, dtype=torch.bool)
    ds_kept = dispatch.any(-1)                                    # [T, E]
    routed = dense(torch.ones(T, 1), r.indices_TK, E).bool()
    assert not (ds_kept & ~routed).any()
    assert torch.equal(ds_kept.sum(0), counts - res.dropped_E)   # same number kept per expert
    if int(res.dropped_E.sum()) == 0:
        assert torch.equal(ds_kept, routed)
    else:
        # The subset DeepSpeed keeps in an over-full expert is topk's tie order (see module docstring);
        # experts under capacity keep exactly the same tokens.
        under = counts <= C
        assert torch.equal(ds_kept[:, under], dense(keep.float(), r.indices_TK, E).bool()[:, under])
    # Combine weights: the un-renormalised top-1 softmax probability.
    torch.testing.assert_close(combine.sum(-1), dense(r.weights_TK, r.indices_TK, E) * ds_kept,
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("T,E,cf,minc,hot", [(32, 8, 0.75, 0, 1.5), (32, 4, 0.5, 0, 1.0),
                                             (24, 4, 1.0, 0, 2.0), (16, 8, 1.0, 4, 0.0),
                                             (32, 8, 4.0, 0, 0.0)])
def test_deepspeed_top2gating(ds, T, E, cf, minc, hot) -> None:
    torch.manual_seed(8)
    logits = torch.randn(T, E)
    logits[:, 2] += hot
    _, r = router_from_logits(logits, top_k=2, renormalize=True)
    l_aux, combine, dispatch, exp_counts = ds.top2gating(logits.clone(), cf, minc, drop_tokens=True,
                                                         top2_2nd_expert_sampling=False)
    counts = torch.bincount(r.indices_TK.reshape(-1), minlength=E)
    assert torch.equal(exp_counts, counts)
    # l_aux counts first choices only, per token: ours with top_k=1 on first-choice counts.
    first = torch.bincount(r.indices_TK[:, 0], minlength=E)
    torch.testing.assert_close(l_aux, losses.load_balancing_loss(r.probs_TE, first, 1, 1.0),
                               rtol=1e-6, atol=1e-7)
    # Capacity: DeepSpeed ceil(T/E·2cf), ours ceil(2T/E·cf) (T/E exact in these cases).
    C = expert_capacity(T, MoEConfig(num_experts=E, top_k=2, capacity_factor=cf, min_capacity=minc))
    assert C == max(math.ceil(T / E * 2 * cf), minc)
    assert combine.shape == (T, E, C)
    res = apply_capacity(r.indices_TK, r.weights_TK, E, C, "position")
    keep = res.keep_TK if res.keep_TK is not None else torch.ones(T, 2, dtype=torch.bool)
    ds_kept = dispatch.any(-1)
    assert torch.equal(ds_kept, dense(keep.float(), r.indices_TK, E).bool())   # GShard order == ours
    ds_w = combine.sum(-1)
    both = keep.all(-1)
    ours_w = dense(r.weights_TK * keep, r.indices_TK, E)
    torch.testing.assert_close(ds_w[both], ours_w[both], rtol=1e-6, atol=1e-7)
    # Where one assignment is dropped DeepSpeed renormalises over the kept one (weight 1.0); ours keeps
    # the pre-drop renormalised weight.
    one = keep.sum(-1) == 1
    if cf < 1.0:
        assert one.any()
    kept_w = (r.weights_TK * keep).sum(-1, keepdim=True)
    torch.testing.assert_close(ds_w[one], (ours_w / kept_w.clamp_min(1e-20))[one], rtol=1e-6, atol=1e-7)
    if one.any():
        assert (ds_w[one].sum(-1) == 1).all() or torch.allclose(ds_w[one].sum(-1), torch.ones(int(one.sum())))
        assert (ours_w[one].sum(-1) < 1).all()
    none = keep.sum(-1) == 0
    assert (ds_w[none] == 0).all() and (ours_w[none] == 0).all()
