"""Selective recompute, `train.recompute` (moe_dist.models.gpt, moe_dist.moe.experts): `moe_act` (the routed
experts' activation), `moe` (the whole MoE layer), `block` (the whole block) give the gradients of no recompute
— router jitter and capacity drops included (the RNG replays) — and really recompute: the activation's output is
not kept, the router runs again in backward. On 2 gloo ranks with ep=2 the all-to-alls rerun in backward in the
same order on both ranks, also when one rank's experts receive no rows."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from distributed import run_ranks
from layer_helpers import D, FH, make_layer
from moe_dist.models.gpt import MoEGPT
from moe_dist.moe.layer import MoELayer
from moe_dist.parallel.comm import observe_collectives
from moe_dist.parallel.layout import check_layout
from moe_dist.parallel.topology import Topology
from trainer_helpers import make_cfg, tiny, tokens

MODES = ("none", "moe_act", "moe", "block")
ROUTING = {"dropless": {}, "jitter_capacity": {"jitter_eps": 0.2, "capacity_factor": 1.0, "min_capacity": 1}}


def _triton_missing():
    from moe_dist.kernels._configs import unavailable_reason
    return unavailable_reason()


def _model_grads(cfg, x, y, seed=5):
    """Loss, every gradient, and how many times each MoE layer's router ran in one forward + backward."""
    torch.manual_seed(seed)                      # the jitter's draws: the same in every mode
    model = MoEGPT(cfg)
    calls = Counter()
    for i, layer in enumerate(model.moe_layers):
        layer.router.register_forward_hook(lambda *_, i=i: calls.update([i]))
    out = model(x, y)
    out.loss.backward()
    return float(out.loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}, calls


# Moved here from tests/train/test_trainer.py (block recompute, then named activation checkpointing), now over
# every mode.
@pytest.mark.parametrize("routing", list(ROUTING))
@pytest.mark.parametrize("mode", MODES[1:])
def test_recompute_gives_the_same_gradients(mode, routing):
    """Recomputing replays the RNG state (router jitter) and the routing, so capacity drops, the loss and every
    gradient equal those of no recompute; the router runs twice where the MoE layer or the block is recomputed
    (so the recompute is real), once otherwise."""
    x, y = tokens(2)
    loss0, g0, calls0 = _model_grads(make_cfg(tiny(**ROUTING[routing]), recompute="none"), x, y)
    loss1, g1, calls1 = _model_grads(make_cfg(tiny(**ROUTING[routing]), recompute=mode), x, y)
    assert loss0 == loss1
    for n, g in g0.items():
        torch.testing.assert_close(g1[n], g, rtol=1e-6, atol=1e-8, msg=n)
    assert set(calls0.values()) == {1}
    assert set(calls1.values()) == ({2} if mode in ("moe", "block") else {1})


def test_recompute_is_off_in_evaluation_and_without_grad():
    """eval() or no_grad: nothing to recompute, the plain forward runs (same logits as recompute=none)."""
    x, y = tokens(2)
    logits = []
    for mode in MODES:
        torch.manual_seed(0)
        model = MoEGPT(make_cfg(tiny(), recompute=mode))
        with torch.no_grad():
            logits.append(model(x).logits)
        model.eval()
        assert torch.equal(model(x).logits, logits[0])
    assert all(torch.equal(l, logits[0]) for l in logits)


def _retained_bytes_and_grads(layer: MoELayer, x: torch.Tensor):
    """Bytes of every distinct storage autograd keeps for backward after forward (saved tensors whose memory
    was released count 0), the number of rows the experts ran, and every gradient after backward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        y, stats = layer(x)
    storages = {}
    for t in saved:
        s = t.untyped_storage()
        storages[s.data_ptr() or id(s)] = s.nbytes()
    ((y * y).sum()).backward()
    return sum(storages.values()), int(stats.tokens_per_expert.sum()), \
        [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("backend", ["loop", "auto", "triton"])
def test_moe_act_keeps_no_activation_output_and_equal_gradients(backend, activation):
    """moe_act on every backend: the gradients are exactly those of no recompute, and what autograd keeps after
    forward shrinks by the activation's [N, F] output (and, for SwiGLU, silu(gate), which its product kept)."""
    if backend == "triton" and _triton_missing():
        pytest.skip(str(_triton_missing()))
    results = []
    for recompute in (False, True):
        layer = make_layer(seed=1, backend=backend, activation=activation, capacity_factor=1.0, min_capacity=1,
                           num_shared_experts=1)
        layer.experts.recompute_activation = recompute
        x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(2), requires_grad=True)
        results.append(_retained_bytes_and_grads(layer, x))
    (kept0, rows, g0), (kept1, rows1, g1) = results
    assert rows == rows1 and rows > 0
    assert kept0 - kept1 == (2 if activation == "swiglu" else 1) * rows * FH * 4
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_moe_act_is_chosen_by_the_config():
    model = MoEGPT(make_cfg(tiny(), recompute="moe_act"))
    assert all(layer.experts.recompute_activation for layer in model.moe_layers)
    model = MoEGPT(make_cfg(tiny(), recompute="moe"))
    assert not any(layer.experts.recompute_activation for layer in model.moe_layers)


# ------------------------------------------------------------------------------------------ 2 ranks, ep=2

def _collectives(fn):
    ops = []
    with observe_collectives(lambda c: ops.append(c.op)):
        result = fn()
    return result, ops


def _ranks_worker(rank, world):
    torch.set_num_threads(1)
    res = {}
    # The model: data parallel over 2 (each rank its own rows), experts over ep=2, jitter and capacity drops.
    for mode in MODES:
        cfg = make_cfg(tiny(ep=2, jitter_eps=0.2, capacity_factor=1.0, min_capacity=1), recompute=mode)
        topo = Topology.build(check_layout(cfg, world), timeout_s=60)
        x, y = tokens(4)
        x, y = x[2 * rank:2 * rank + 2], y[2 * rank:2 * rank + 2]
        torch.manual_seed(5 + rank)
        model = MoEGPT(cfg, topo)
        out, fwd = _collectives(lambda: model(x, y))
        _, bwd = _collectives(lambda: out.loss.backward())
        res[mode] = {"loss": float(out.loss.detach()), "fwd": fwd, "bwd": bwd,
                     "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    # Expert tensor parallelism (etp=2): the dispatch's all-gather of counts and its etp all-to-alls rerun too.
    for mode in ("none", "moe"):
        cfg = make_cfg(tiny(etp=2, jitter_eps=0.2, capacity_factor=1.0, min_capacity=1), recompute=mode)
        topo = Topology.build(check_layout(cfg, world), timeout_s=60)
        x, y = tokens(4)
        torch.manual_seed(5 + rank)
        model = MoEGPT(cfg, topo)
        out = model(x[2 * rank:2 * rank + 2], y[2 * rank:2 * rank + 2])
        _, bwd = _collectives(lambda: out.loss.backward())
        res[f"etp_{mode}"] = {"loss": float(out.loss.detach()), "bwd": bwd,
                              "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    # One MoE layer whose router sends every token to experts 0 and 1 (rank 0's): rank 1's experts get no rows,
    # yet both ranks must rerun the same all-to-alls when the layer is recomputed.
    cfg = make_cfg(tiny(ep=2))
    topo = Topology.build(check_layout(cfg, world), timeout_s=60)
    for recompute in (False, True):
        torch.manual_seed(3)
        layer = MoELayer(cfg.moe, cfg.model.dim, topo)
        with torch.no_grad():
            for p in layer.parameters():       # a layer built alone: the model's reset_parameters never ran
                p.normal_(0.0, 0.2)
            layer.router.weight_ED.zero_()
            layer.router.weight_ED[:2] = 1.0
        x = torch.rand(2, 4, cfg.model.dim, generator=torch.Generator().manual_seed(rank)).requires_grad_()
        if recompute:
            y, stats = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
        else:
            y, stats = layer(x)
        _, bwd = _collectives(lambda: (y.square().sum() + stats.aux_loss).backward())
        res[f"layer_{recompute}"] = {"bwd": bwd, "rows_in": stats.a2a_rows_in, "rows_out": stats.a2a_rows_out,
                                     "grads": [x.grad] + [p.grad for p in layer.parameters()]}
    return res


@pytest.fixture(scope="module")
def rank_runs():
    return run_ranks(_ranks_worker, 2, timeout=300)


@pytest.mark.parametrize("mode", MODES[1:])
def test_two_ranks_recompute_gives_the_same_gradients(rank_runs, mode):
    for r in rank_runs:
        assert r[mode]["loss"] == r["none"]["loss"]
        for n, g in r["none"]["grads"].items():
            torch.testing.assert_close(r[mode]["grads"][n], g, rtol=1e-6, atol=1e-8, msg=n)


def test_two_ranks_recompute_under_expert_tensor_parallelism(rank_runs):
    for r in rank_runs:
        assert r["etp_moe"]["loss"] == r["etp_none"]["loss"]
        for n, g in r["etp_none"]["grads"].items():
            torch.testing.assert_close(r["etp_moe"]["grads"][n], g, rtol=1e-6, atol=1e-8, msg=n)
    assert rank_runs[0]["etp_moe"]["bwd"] == rank_runs[1]["etp_moe"]["bwd"]
    assert len(rank_runs[0]["etp_moe"]["bwd"]) > len(rank_runs[0]["etp_none"]["bwd"])


def test_two_ranks_rerun_the_same_collectives_in_backward(rank_runs):
    """Both ranks issue the same collectives in the same order (lockstep), forward and backward. Backward reruns
    the dispatch's count exchange and both row all-to-alls per recomputed MoE layer (moe, block), and nothing
    more for moe_act. tiny() has 2 MoE layers of 3 and balance_over=global_batch (a counts all-reduce over the
    world per layer, rerun too)."""
    r0, r1 = rank_runs
    for mode in MODES:
        assert r0[mode]["fwd"] == r1[mode]["fwd"] and r0[mode]["bwd"] == r1[mode]["bwd"], mode
    base = Counter(r0["none"]["bwd"])
    assert base["all_to_all"] == 2 * 2                      # per MoE layer: the combine's and the dispatch's
    assert Counter(r0["moe_act"]["bwd"]) == base
    for mode in ("moe", "block"):
        extra = Counter(r0[mode]["bwd"]) - base
        assert extra == Counter({"all_to_all": 2 * 3, "all_reduce": 2}), (mode, extra)
    assert all(Counter(r[m]["fwd"]) == Counter(r0["none"]["fwd"]) for r in rank_runs for m in MODES)


def test_two_ranks_recompute_a_layer_whose_experts_get_no_rows(rank_runs):
    r0, r1 = rank_runs
    # 8 tokens × top-2 per rank, all for rank 0's experts: rank 1 sends its 16 rows away and receives none.
    assert (r1["layer_True"]["rows_in"], r1["layer_True"]["rows_out"]) == (0, 16)
    assert (r0["layer_True"]["rows_in"], r0["layer_True"]["rows_out"]) == (16, 0)
    for r in rank_runs:
        for a, b in zip(r["layer_True"]["grads"], r["layer_False"]["grads"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    assert r0["layer_True"]["bwd"] == r1["layer_True"]["bwd"]
