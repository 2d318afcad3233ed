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
    assert ab.pipeline_bubble_seconds(0.5, 4, virtual=2) == pytest.approx(0.75)      # a chunk is half a slot


def _pipelined(pp: int, m: int, **kw) -> tuple[config.Config, ParallelDims]:
    cfg = ab.with_layout(MIXTRAL, ep=8, pp=pp, grad_accum_steps=m, shard_optimizer="states", **kw)
    return cfg, check_layout(cfg, 64)


@pytest.mark.parametrize("tied", [False, True])
def test_stages_partition_the_flops_and_bytes(tied):
    # Every layer's work is on exactly one stage, the head's on the last: the stages add up to the whole model.
    cfg, dims = _pipelined(4, 8)
    if tied:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tie_embeddings=True))
    whole = ab.flops_per_rank(cfg, ParallelDims(world=1, ep=1))
    one = check_layout(ab.with_layout(cfg, ep=8, grad_accum_steps=8), 64)
    per = [ab.flops_per_rank(cfg, dims, s) for s in range(4)]
    for k in ("dense", "attention", "head", "moe_dense"):
        assert sum(f[k] for f in per) == pytest.approx(whole[k]), k
    assert sum(f["experts"] for f in per) == pytest.approx(ab.flops_per_rank(cfg, one)["experts"])
    assert [f["head"] > 0 for f in per] == [False, False, False, True]
    eb = [sum(ab.elementwise_bytes(cfg, dims, s).values()) for s in range(4)]
    assert sum(eb) == pytest.approx(sum(ab.elementwise_bytes(cfg, one).values()))


def test_pipeline_terms_are_their_formulas():
    # Mixtral on 64 H100s as Megatron-core trains it: TP1 EP8 PP4, 1F1B, 16 micro-batches of one sequence.
    cfg, dims = _pipelined(4, 16)
    e = ab.estimate(cfg, dims)
    assert e.step_s == pytest.approx(sum(e.terms().values()))
    # The last stage (8 layers + the head) is the slowest: its terms make the step; the bubble is 3 of its slots.
    assert e.stage == 3 and max(e.stage_step_s) == e.stage_step_s[3]
    assert e.bubble_s == pytest.approx(3 * e.slot_s)
    assert e.slot_s == pytest.approx((e.compute_s + e.non_gemm_s + e.alltoall_s + e.recompute_s + e.tp_s) / 16)
    assert e.bubble_fraction == pytest.approx(3 / (16 + 3))
    # P2P: one [1, 4096, 4096] bf16 activation and one gradient per slot of the critical path, 16 + 3 slots,
    # over InfiniBand (a stage is 16 ranks, two nodes: neighbours are on different nodes).
    xfer = 10e-6 + 4096 * 4096 * 2 / 50e9
    assert e.p2p_s == pytest.approx(2 * (16 + 3) * xfer)
    # Each stage reduces only its own parameters (over dp = 16 ranks, experts over edp = 2).
    r = ab.grad_reduction(cfg, dims, NET, 0)
    p0 = param_counts(cfg, dims, 0)
    assert r.reduce_s == pytest.approx(ab.reduce_scatter_seconds(4 * p0.dense, 16, 1, NET)
                                       + ab.reduce_scatter_seconds(4 * p0.expert, 2, 8, NET))
    # Interleaving two chunks per rank halves the bubble; fewer micro-batches than stages make it most of the step.
    il = ab.estimate(*_pipelined(4, 16, pp_virtual=2))
    assert il.bubble_s == pytest.approx(il.slot_s * 3 / 2) and il.step_s < e.step_s
    few = ab.estimate(*_pipelined(4, 2))
    assert few.bubble_fraction == pytest.approx(3 / 5)
    # One stage: no bubble, no P2P.
    assert ab.estimate(*_pipelined(1, 4)).terms()["pipeline_bubble"] == 0 == ab.estimate(*_pipelined(1, 4)).p2p_s


def test_tied_embedding_gradient_crosses_the_pipeline():
    cfg, dims = _pipelined(4, 8)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tie_embeddings=True))
    ar = ab.allreduce_seconds(4 * 32000 * 4096, 2, 48, NET)
    assert [ab.grad_reduction(cfg, dims, NET, s).embed_s for s in range(4)] == [ar, 0.0, 0.0, ar]


def test_optimizer_term_is_memory_bound_over_the_shard():
    cfg, dims = _mixtral(shard_optimizer="states")
    p = param_counts(cfg, dims)
    shard = -(-p.dense // 64) - (-p.expert // 8)
    assert ab.optimizer_seconds(cfg, dims, ab.Compute()) == pytest.approx(
        (10 * p.total + 34 * shard) / (0.7 * 3.35e12))


def test_mixtral_64_h100_next_to_the_published_468():
    # Megatron-core's published Mixtral 8x7B bf16 figure on 64 H100s is 468 TFLOP/s/GPU (TP1 EP8 PP4, the
    # layout its Mixtral example recommends; pipelined below). Our layout: tp=1, ep=8, optimizer states sharded,
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
    # Megatron-core's own layout, TP1 EP8 PP4 (1F1B), on the same global batch: 16 micro-batches per dp rank.
    pp = ab.estimate(*_pipelined(4, 16))
    assert 0.7 * 468 < pp.tflops_per_gpu < 1.2 * 468
    print(f"TP1 EP8 PP4 1F1B: {pp.tflops_per_gpu:.0f} TFLOP/s/GPU (bubble {pp.bubble_fraction:.1%})")
