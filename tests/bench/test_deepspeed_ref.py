"""`moe_dist.bench.deepspeed_ref`: DeepSpeed-MoE given our weights computes what ours computes, at every k
(dropless: the same outputs and input gradients, through its current sparse dispatch and through the einsum
dispatch rebuilt from its gating functions; with capacity: the same expert loads), so `bench layer` times two
implementations of one layer. Each check runs in a world-1 process: DeepSpeed's groups need an initialised
process group, which must not outlive the test."""
from __future__ import annotations

import argparse

import pytest
import torch

from distributed import run_ranks
from moe_dist.bench import deepspeed_ref
from moe_dist.bench import layer as bench_layer

pytest.importorskip("deepspeed")

TOP_K = (1, 2, 6)          # top1gating, top2gating and topkgating


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench_layer.add_arguments(p)
    return p.parse_args(list(argv))


def _pair(mode: str, k: int, capacity_factor: str):
    args = _parse("--capacity-factor", capacity_factor, "--min-capacity", "0")
    case = bench_layer.Case(tokens=48, experts=8, top_k=k, mode=mode)
    ours = bench_layer.our_layer(case, 16, 32, "grouped_mm", args, torch.float32, "cpu")
    with torch.no_grad():                       # O(1) weights so the comparison is not of tiny numbers
        for p in ours.parameters():
            p.normal_(0.0, 0.5)
    return ours, bench_layer.deepspeed_twin(case, ours, 16, 32, args, torch.float32, "cpu")


def _outputs(rank, world, ks):
    res = {}
    for k in ks:
        ours, ds = _pair("dropless", k, "1.0")
        x = torch.randn(1, 48, 16, generator=torch.Generator().manual_seed(1))
        out = {}
        for name, layer in (("ours", ours), ("ds", ds), ("ds_einsum", deepspeed_ref.EinsumMoE(ds))):
            xx = x.clone().requires_grad_()
            y = layer(xx)[0]
            y.square().sum().backward()
            out[name] = (y.detach(), xx.grad)
        res[k] = out
    return res


def _loads(rank, world, ks):
    res = {}
    for k in ks:
        ours, ds = _pair("capacity", k, "0.75")
        x = torch.randn(1, 48, 16, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            stats = ours(x)[1]
        res[k] = (stats.tokens_per_expert, stats.dropped, deepspeed_ref.kept_per_expert(ds, x))
    return res


def test_deepspeed_variant_computes_the_same_layer_dropless() -> None:
    """Dropless, shared weights: DeepSpeed's output and input gradient equal ours at k = 1, 2 and 6 (top-1
    weight = the probability; top-k renormalised over the chosen experts, as the bench configures ours)."""
    res = run_ranks(_outputs, 1, TOP_K, timeout=300)[0]
    assert set(res) == set(TOP_K)
    for k, out in res.items():
        for variant in ("ds", "ds_einsum"):
            for a, b in zip(out["ours"], out[variant]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"k={k} {variant}: {m}")


def test_deepspeed_keeps_the_same_loads_under_capacity() -> None:
    """At capacity factor 0.75 both drop, and both keep min(load, capacity) assignments per expert: the same
    loads at every k, whichever assignments each drop policy picks."""
    res = run_ranks(_loads, 1, TOP_K, timeout=300)[0]
    for k, (ours_kept, ours_dropped, ds_kept) in res.items():
        assert int(ours_dropped.sum()) > 0, f"k={k}: nothing dropped, the check would be empty"
        assert torch.equal(ours_kept, ds_kept), f"k={k}: ours {ours_kept.tolist()} vs DeepSpeed {ds_kept.tolist()}"
