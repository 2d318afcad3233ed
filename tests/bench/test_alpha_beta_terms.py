"""The step-time model's explicit terms (moe_dist.bench.alpha_beta.estimate): each term against hand arithmetic
from the named constants, the order recompute modes cost in, the gradient reduction's exposed share, the
pipeline bubble, and the Mixtral 8x7B prediction on 64 H100s next to Megatron-core's published 468 TFLOP/s."""
from __future__ import annotations

import dataclasses

import pytest

from moe_dist import config
from moe_dist.bench import alpha_beta as ab
from moe_dist.parallel.layout import check_layout
from moe_dist.parallel.topology import ParallelDims
from moe_dist.plan import param_counts

MIXTRAL = config.load("configs/mixtral-8x7b.yaml")
NET = ab.Network()


def _mixtral(**kw) -> tuple[config.Config, ParallelDims]:
    cfg = ab.with_layout(MIXTRAL, ep=8, **kw)
    return cfg, check_layout(cfg, 64)


def test_constants_are_the_stated_ones():
    c = ab.Compute()
    assert (c.dense_tflops, c.expert_tflops, c.attention_tflops, c.hbm_tbps, c.memory_bound_efficiency) == (
        720.0, 600.0, 300.0, 3.35, 0.7)
    assert (NET.intra_gbps, NET.inter_gbps, NET.gpus_per_node) == (450.0, 50.0, 8)


def test_step_is_the_sum_of_its_terms_and_each_term_is_its_formula():
    cfg, dims = _mixtral(grad_accum_steps=2, shard_optimizer="states")
    e = ab.estimate(cfg, dims)
    assert e.step_s == pytest.approx(sum(e.terms().values()))
    f = ab.flops_per_rank(cfg, dims)
    assert e.compute_s == pytest.approx(2 * (f["dense"] / 720e12 + f["experts"] / 600e12))
    eb = ab.elementwise_bytes(cfg, dims)
    # Attention runs causal (half the counted FLOPs) at 300; elementwise forward + backward = 3x the forward
    # bytes at 70% of 3.35 TB/s.
    assert e.non_gemm_s == pytest.approx(2 * (f["attention"] / 2 / 300e12 + 3 * sum(eb.values()) / (0.7 * 3.35e12)))
    assert e.recompute_s == 0 and e.bubble_s == 0
    # The attention core is counted in the model FLOPs but not at GEMM speed.
    assert f["dense"] + f["attention"] + f["experts"] == pytest.approx(
        ab.model_flops_per_token(cfg) * cfg.train.batch_size * cfg.train.seq_len)
    # A faster memory system shrinks only the memory-bound parts.
    fast = ab.estimate(cfg, dims, comp=dataclasses.replace(ab.Compute(), hbm_tbps=6.7))
    assert fast.compute_s == e.compute_s and fast.non_gemm_s < e.non_gemm_s and fast.optimizer_s < e.optimizer_s


def test_recompute_costs_in_the_stated_order():
    times = {r: ab.estimate(*_mixtral(recompute=r)).recompute_s for r in ("none", "moe_act", "moe", "block")}
    assert times["none"] == 0 < times["moe_act"] < times["moe"] < times["block"]
    # block reruns every block's forward: about a third of the non-head compute, and below a full third of
    # the step's GEMM + non-GEMM time.
    e = ab.estimate(*_mixtral(recompute="block"))
    assert 0.25 * (e.compute_s + e.non_gemm_s) < e.recompute_s < (e.compute_s + e.non_gemm_s) / 3 + e.alltoall_s / 2


def test_gradient_reduction_exposed_share():
    # Unsharded: one fp32 all-reduce per step over dp (dense, ranks 1 apart) and edp (experts, 8 apart).
    cfg, dims = _mixtral()
    p = param_counts(cfg, dims)
    r = ab.grad_reduction(cfg, dims, NET)
    assert r.reduce_s == pytest.approx(ab.allreduce_seconds(4 * p.dense, 64, 1, NET)
                                       + ab.allreduce_seconds(4 * p.expert, 8, 8, NET))
    assert (r.reductions, r.gather_s) == (1, 0.0)
    e = ab.estimate(cfg, dims)
    hidden = ab.estimate(cfg, dims, overlap_dp=False)
    assert e.dp_total_s == hidden.dp_allreduce_s == pytest.approx(r.reduce_s)
    assert 0 < e.dp_allreduce_s < e.dp_total_s
    # Sharded: reduce-scatter of fp32 gradients, then an all-gather of the bf16 weights (exposed in full).
    cfg, dims = _mixtral(shard_optimizer="states", grad_accum_steps=4)
    r = ab.grad_reduction(cfg, dims, NET)
    assert r.gather_s == pytest.approx(ab.allgather_seconds(2 * p.dense, 64, 1, NET)
                                       + ab.allgather_seconds(2 * p.expert, 8, 8, NET))
    assert r.reduce_s == pytest.approx(r.gather_s * 2, rel=1e-2)     # fp32 gradients, bf16 weights (+ latency)
    assert ab.estimate(cfg, dims).dp_allreduce_s >= r.gather_s
    # states+grads reduces in every micro-batch's backward: m reductions per step.
    cfg2, _ = _mixtral(shard_optimizer="states+grads", grad_accum_steps=4)
    r2 = ab.grad_reduction(cfg2, dims, NET)
    assert r2.reductions == 4 and r2.reduce_s == r.reduce_s
    assert ab.estimate(cfg2, dims).dp_total_s == pytest.approx(4 * r.reduce_s + r.gather_s)


def test_pipeline_bubble_is_pp_minus_one_micro_batches():
    assert ab.pipeline_bubble_seconds(0.5, 1) == 0.0
    assert ab.pipeline_bubble_seconds(0.5, 4) == pytest.approx(1.5)


def test_optimizer_term_is_memory_bound_over_the_shard():
    cfg, dims = _mixtral(shard_optimizer="states")
    p = param_counts(cfg, dims)
    shard = -(-p.dense // 64) - (-p.expert // 8)
    assert ab.optimizer_seconds(cfg, dims, ab.Compute()) == pytest.approx(
        (10 * p.total + 34 * shard) / (0.7 * 3.35e12))


def test_mixtral_64_h100_next_to_the_published_468():
    # Megatron-core's published Mixtral 8x7B bf16 figure on 64 H100s is 468 TFLOP/s/GPU (with pipeline
    # parallelism, which this model does not have yet). Our layout: tp=1, ep=8, optimizer states sharded,
    # a global batch of 256 sequences of 4096 tokens (4 micro-batches of 1 per dp rank). The constants are the
    # kernel and link figures above, none fitted to 468; the band only guards against a broken model.
    cfg, dims = _mixtral(shard_optimizer="states", grad_accum_steps=4)
    e = ab.estimate(cfg, dims)
    assert 0.7 * 468 < e.tflops_per_gpu < 1.2 * 468
    assert e.tflops_per_gpu < 720 * 0.8                 # the GEMM speed bounds it from above with room
    # The native engine as it runs today, its gradient reduction not overlapped with backward: slower.
    native = ab.estimate(cfg, dims, overlap_dp=False)
    assert 0.6 * 468 < native.tflops_per_gpu < e.tflops_per_gpu
    print(f"Mixtral 8x7B, 64 H100: {e.tflops_per_gpu:.0f} TFLOP/s/GPU with the reduction overlapped, "
          f"{native.tflops_per_gpu:.0f} without; published 468")
