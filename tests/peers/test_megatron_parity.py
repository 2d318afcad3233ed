"""Parity with Megatron-core (megatron.core.transformer.moe.moe_utils, installed from PyPI), run on the CPU.

Convention differences found (each test below checks the matched configuration):

Megatron-core (megatron.core.transformer.moe.moe_utils):
- routing, losses, "probs" token dropping and permute/unpermute match exactly.
- Group-limited routing with softmax and ``use_pre_softmax=False``: Megatron picks the groups (and experts)
  on the raw *logits*, we on the softmax probabilities. Sums of top logits and sums of top probabilities
  can rank groups differently, so only the pre-softmax variant is compared.
- top_k=1 with softmax and ``use_pre_softmax=False``: Megatron's weight is softmax over one logit = 1.0
  (no router gradient through the weights). Ours skips renormalisation when K == 1 (``renormalize`` is a
  no-op then), so the weight is the full-softmax probability = Megatron's ``use_pre_softmax=True``.
- Group selection uses the top ``topk // group_topk`` scores per group in Megatron; ours uses
  ``max(k // topk_groups, 1)`` (same whenever k >= topk_groups; Megatron sums zero scores otherwise).
- Megatron's aux loss counts come from a plain top-k over the unbiased, ungrouped scores
  (``compute_routing_scores_for_aux_loss``); our layer counts the real (biased / group-limited) selection.
  The loss *functions* are identical given the same counts.
- "position" drop policy: Megatron takes ``topk`` over a 0/1 map (tie order unspecified); ours is GShard's
  deterministic order. Not compared (tests/peers/test_deepspeed_parity.py compares the GShard order).
"""
from __future__ import annotations

import pytest
import torch

from moe_dist.config import MoEConfig
from moe_dist.kernels.reference import make_permute_map, permute, unpermute
from moe_dist.moe import losses
from moe_dist.moe.capacity import apply_capacity, expert_capacity
from moe_dist.moe.layer import MoELayer
from moe_dist.moe.router import Router
from peer_helpers import dense, router_from_logits


@pytest.fixture(scope="module")
def mu():
    pytest.importorskip("megatron.core")
    from megatron.core.transformer.moe import moe_utils
    return moe_utils


ROUTING_CASES = {
    # name: (megatron kwargs, our router kwargs, E, topk)
    "softmax_pre_norenorm": (dict(use_pre_softmax=True), dict(renormalize=False), 8, 2),
    "softmax_post_is_renorm": (dict(use_pre_softmax=False), dict(renormalize=True), 8, 2),
    "softmax_post_k3": (dict(use_pre_softmax=False), dict(renormalize=True), 6, 3),
    "softmax_pre_k1": (dict(use_pre_softmax=True), dict(renormalize=False), 8, 1),
    "softmax_scaled": (dict(use_pre_softmax=True, scaling_factor=2.5), dict(route_scale=2.5), 8, 2),
    "sigmoid_bias": (dict(score_function="sigmoid", scaling_factor=2.5, bias=True),
                     dict(score_func="sigmoid", expert_bias=True, renormalize=True, route_scale=2.5), 8, 2),
    "sigmoid_nobias_k1": (dict(score_function="sigmoid"), dict(score_func="sigmoid", renormalize=True), 8, 1),
    "group_softmax_pre": (dict(use_pre_softmax=True, num_groups=4, group_topk=2),
                          dict(num_groups=4, topk_groups=2), 8, 4),
    "group_sigmoid_bias": (dict(score_function="sigmoid", num_groups=4, group_topk=2, bias=True),
                           dict(score_func="sigmoid", expert_bias=True, renormalize=True, num_groups=4,
                                topk_groups=2), 16, 4),
}


@pytest.mark.parametrize("case", list(ROUTING_CASES))
def test_megatron_topk_routing(mu, case: str) -> None:
    mkw, okw, E, k = ROUTING_CASES[case]
    mkw = dict(mkw)
    torch.manual_seed(0)
    T = 64
    logits = torch.randn(T, E) * 2
    bias = None
    if mkw.pop("bias", False):
        bias = torch.linspace(-0.4, 0.4, E)[torch.randperm(E)]
    router = Router(MoEConfig(num_experts=E, top_k=k, expert_hidden=16, **okw), E)
    with torch.no_grad():
        router.weight_ED.copy_(torch.eye(E))
        if bias is not None:
            router.expert_bias_E.copy_(bias)
    lg = logits.clone().requires_grad_(True)
    ours = router(lg)
    probs_m, map_m = mu.topk_routing_with_score_function(logits.clone().requires_grad_(True), k,
                                                         expert_bias=bias, **mkw)
    our_dense = dense(ours.weights_TK, ours.indices_TK, E)
    our_map = dense(torch.ones_like(ours.weights_TK), ours.indices_TK, E).bool()
    assert torch.equal(our_map, map_m), case
    torch.testing.assert_close(our_dense, probs_m, rtol=1e-6, atol=1e-6)
    # Gradients of the routed probabilities wrt the logits agree too.
    g = torch.randn(T, E)
    lg2 = logits.clone().requires_grad_(True)
    pm, _ = mu.topk_routing_with_score_function(lg2, k, expert_bias=bias, **mkw)
    (gm,) = torch.autograd.grad((pm * g).sum(), lg2)
    (go,) = torch.autograd.grad((our_dense * g).sum(), lg)
    torch.testing.assert_close(go, gm, rtol=1e-5, atol=1e-6)
    if bias is not None:  # the bias matters in this case
        unbiased = torch.sigmoid(logits).topk(k, -1).indices.sort(-1).values
        assert not torch.equal(unbiased, ours.indices_TK.sort(-1).values)


def test_megatron_group_limited_post_softmax_convention(mu) -> None:
    """Documented difference: Megatron's use_pre_softmax=False ranks groups on logits, ours on probs.
    Pick logits where the two rankings disagree and check each side does what its convention says."""
    logits = torch.tensor([[10.0, -100.0, 5.0, 5.0]])   # groups {0,1}, {2,3}; group_topk=1, topk=2
    _, ours = router_from_logits(logits, num_groups=2, topk_groups=1, renormalize=True, top_k=2)
    _, map_m = mu.topk_routing_with_score_function(logits, 2, use_pre_softmax=False, num_groups=2, group_topk=1)
    # logits: group sums 10-100 < 5+5 -> Megatron picks group {2,3}; probs: e^10 > 2e^5 -> ours picks {0,1}
    assert map_m[0].nonzero().squeeze(1).tolist() == [2, 3]
    assert sorted(ours.indices_TK[0].tolist()) == [0, 1]


def test_megatron_top1_post_softmax_convention(mu) -> None:
    """Documented difference: top-1 with renormalize=True keeps the softmax probability (ours) where
    Megatron's use_pre_softmax=False gives 1.0; ours equals Megatron's use_pre_softmax=True."""
    torch.manual_seed(9)
    logits = torch.randn(10, 4)
    _, ours = router_from_logits(logits, top_k=1, renormalize=True)
    post, _ = mu.topk_routing_with_score_function(logits, 1, use_pre_softmax=False)
    pre, _ = mu.topk_routing_with_score_function(logits, 1, use_pre_softmax=True)
    assert torch.equal(post.sum(-1), torch.ones(10))
    torch.testing.assert_close(dense(ours.weights_TK, ours.indices_TK, 4), pre, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("T,E,k,total", [(32, 8, 2, None), (20, 4, 1, None), (16, 8, 3, 64)])
def test_megatron_load_balancing_loss(mu, T, E, k, total) -> None:
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(T, E), -1)
    idx = probs.topk(k, -1).indices
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    if total is not None:  # global-batch balance: counts describe a larger batch than the local probs
        counts = counts * (total // T)
    coef = 0.37
    p1 = probs.clone().requires_grad_(True)
    p2 = probs.clone().requires_grad_(True)
    ours = losses.load_balancing_loss(p1, counts, k, coef, num_tokens=total)
    theirs = mu.switch_load_balancing_loss_func(p2, counts, total or T, k, E, coef)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    (g1,) = torch.autograd.grad(ours, p1)
    (g2,) = torch.autograd.grad(theirs, p2)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-8)


def megatron_seq_aux(mu, probs_BSE, idx_BSK, E, k, coef):
    """Megatron's Router._apply_seq_aux_loss: tokens are [S, B] sequence-first; [S·B, E] is reshaped to
    [S, B·E] so every (sequence, expert) pair becomes one 'expert' of the switch loss, divided by B."""
    B, S, _ = probs_BSE.shape
    probs_SB_E = probs_BSE.transpose(0, 1).reshape(S * B, E)
    map_BSE = torch.zeros(B, S, E, dtype=torch.bool).scatter(2, idx_BSK, True)
    map_SB_E = map_BSE.transpose(0, 1).reshape(S * B, E)
    scores = probs_SB_E.reshape(S, -1)
    rmap = map_SB_E.reshape(S, -1)
    tokens_per_expert = rmap.sum(dim=0)           # get_tokens_per_expert_and_token_count, one rank
    total_num_tokens = rmap.shape[0]              # = S
    return mu.switch_load_balancing_loss_func(scores, tokens_per_expert, total_num_tokens, k, E, coef) / B


@pytest.mark.parametrize("B,S,E,k", [(3, 8, 4, 2), (1, 5, 8, 1), (4, 6, 6, 3)])
def test_megatron_seq_load_balancing_loss(mu, B, S, E, k) -> None:
    torch.manual_seed(2)
    probs = torch.softmax(torch.randn(B, S, E), -1)
    idx = probs.topk(k, -1).indices
    counts_BE = torch.zeros(B, E, dtype=torch.long).scatter_add(1, idx.reshape(B, -1),
                                                               torch.ones(B, S * k, dtype=torch.long))
    coef = 0.1
    p1 = probs.clone().requires_grad_(True)
    p2 = probs.clone().requires_grad_(True)
    ours = losses.seq_load_balancing_loss(p1, counts_BE, k, coef)
    theirs = megatron_seq_aux(mu, p2, idx, E, k, coef)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(torch.autograd.grad(ours, p1)[0], torch.autograd.grad(theirs, p2)[0],
                               rtol=1e-6, atol=1e-8)


def test_megatron_seq_aux_loss_through_layer(mu) -> None:
    """End to end: the layer's sequence-level aux loss (its own [B, S] token layout and counts) equals
    Megatron's on the same probabilities and choices."""
    torch.manual_seed(3)
    B, S, D, E, k = 3, 5, 16, 4, 2
    layer = MoELayer(MoEConfig(num_experts=E, top_k=k, expert_hidden=16, aux_loss_coef=0.2,
                               aux_loss_type="seq"), D)
    layer.router.weight_ED.data.normal_()
    x = torch.randn(B, S, D)
    _, stats = layer(x)
    r = layer.router(x.reshape(-1, D))
    theirs = megatron_seq_aux(mu, r.probs_TE.view(B, S, E), r.indices_TK.view(B, S, k), E, k, 0.2)
    torch.testing.assert_close(stats.aux_loss, theirs, rtol=1e-6, atol=1e-8)


def test_megatron_z_loss(mu) -> None:
    torch.manual_seed(4)
    logits = torch.randn(24, 8) * 3
    l1 = logits.clone().requires_grad_(True)
    l2 = logits.clone().requires_grad_(True)
    ours = losses.z_loss(l1, 1e-3)
    theirs = mu.z_loss_func(l2, 1e-3)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.autograd.grad(ours, l1)[0], torch.autograd.grad(theirs, l2)[0],
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("cf", [0.5, 1.0, 1.25, 3.0])
@pytest.mark.parametrize("T,E,k", [(32, 8, 2), (20, 4, 1), (30, 6, 3)])
def test_megatron_token_dropping_probs(mu, cf, T, E, k) -> None:
    torch.manual_seed(5)
    logits = torch.randn(T, E) * 2
    logits[:, 0] += 1.5  # a popular expert so something drops
    # k=1: Megatron's post-softmax weight is always 1.0 (all ties); compare with pre-softmax there.
    _, ours = router_from_logits(logits, top_k=k, renormalize=k > 1)
    probs_m, map_m = mu.topk_routing_with_score_function(logits, k, use_pre_softmax=k == 1)
    cfg = MoEConfig(num_experts=E, top_k=k, capacity_factor=cf, min_capacity=0)
    C = expert_capacity(T, cfg)
    assert C == mu.get_capacity(T * k, E, cf)
    res = apply_capacity(ours.indices_TK, ours.weights_TK, E, C, "probs")
    final_probs, final_map = mu.apply_router_token_dropping(probs_m, map_m, k, cf, drop_policy="probs")
    keep = res.keep_TK if res.keep_TK is not None else torch.ones_like(ours.indices_TK, dtype=torch.bool)
    our_map = dense(keep.float(), ours.indices_TK, E).bool()
    assert torch.equal(our_map, final_map)
    torch.testing.assert_close(dense(ours.weights_TK * keep, ours.indices_TK, E), final_probs,
                               rtol=1e-6, atol=1e-7)
    assert torch.equal(res.dropped_E, map_m.sum(0) - final_map.sum(0))
    if cf <= 1.0:
        assert int(res.dropped_E.sum()) > 0


@pytest.mark.parametrize("drop", [False, True])
def test_megatron_permute_unpermute(mu, drop: bool) -> None:
    torch.manual_seed(6)
    T, E, k, H = 20, 6, 2, 8
    logits = torch.randn(T, E) * 2
    logits[:, 1] += 1.0
    _, r = router_from_logits(logits, top_k=k, renormalize=True)
    probs_m, map_m = mu.topk_routing_with_score_function(logits, k, use_pre_softmax=False)
    keep = None
    if drop:
        C = expert_capacity(T, MoEConfig(num_experts=E, top_k=k, capacity_factor=1.0, min_capacity=0))
        keep = apply_capacity(r.indices_TK, r.weights_TK, E, C, "probs").keep_TK
        probs_m, map_m = mu.apply_router_token_dropping(probs_m, map_m, k, 1.0, drop_policy="probs")
        assert keep is not None and not keep.all()
    x = torch.randn(T, H)
    pmap = make_permute_map(r.indices_TK, E, keep)
    ours = permute(x, pmap)
    theirs, _, sorted_indices = mu.permute(x, map_m)
    assert torch.equal(pmap.src_N, sorted_indices)        # grouped by expert, token order inside
    assert torch.equal(ours, theirs)
    assert torch.equal(pmap.counts_E, map_m.sum(0))
    y = torch.randn(pmap.num_rows, H)
    out_ours = unpermute(y, pmap, r.weights_TK)
    out_theirs = mu.unpermute(y, sorted_indices, x.shape, probs=probs_m, routing_map=map_m)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-6, atol=1e-6)


def test_megatron_expert_bias_update(mu, monkeypatch) -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    # One process meets nobody: an in-memory store needs no port (as bootstrap does for world 1).
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        # One rank: the TP×DP group is the world group.
        monkeypatch.setattr(mu.parallel_state, "get_tensor_and_data_parallel_group",
                            lambda with_context_parallel=False: dist.group.WORLD)
        rate = 1e-2
        router = Router(MoEConfig(num_experts=6, top_k=2, expert_hidden=16, expert_bias=True,
                                  bias_update_rate=rate, score_func="sigmoid"), 8)
        bias = torch.linspace(-0.1, 0.1, 6)
        router.expert_bias_E.copy_(bias)
        for counts in ([7, 1, 4, 4, 2, 6], [0, 0, 12, 0, 12, 0]):
            c = torch.tensor(counts)
            theirs = mu.get_updated_expert_bias(c.clone().float(), router.expert_bias_E.clone(), rate)
            router.update_expert_bias(c)
            torch.testing.assert_close(router.expert_bias_E, theirs, rtol=0, atol=1e-7)
        assert not torch.equal(router.expert_bias_E, bias)
    finally:
        dist.destroy_process_group()
