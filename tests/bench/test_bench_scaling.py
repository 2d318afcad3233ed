"""moe-dist bench scaling: the alpha-beta model's arithmetic, its FLOP count against an independent formula,
its byte counts against `moe-dist plan`, one measured run on 2 gloo ranks whose all-to-all bytes equal
the plan's (balanced routing) and whose JSON and PNG are written under runs/bench/ by default, and the TP collective count
(`tp_collectives`) against the calls and bytes measured on 2 gloo ranks with tp=2."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from moe_dist import config
from moe_dist.bench import alpha_beta as ab
from moe_dist.bench import scaling
from moe_dist.models.gpt import is_moe_layer
from moe_dist.parallel.layout import check_layout
from moe_dist.parallel.topology import ParallelDims
from moe_dist.plan import alltoall_rows_per_layer, param_counts
from moe_dist.train.data import prepare

NET = ab.Network()
REPO = Path(__file__).resolve().parents[2]


def test_alltoall_splits_bytes_between_nvlink_and_infiniband():
    b = 7e9
    # 8 ranks in one node: everything over NVLink.
    assert ab.alltoall_seconds(b, ep=8, tp=1, net=NET) == pytest.approx(3e-6 + b / 450e9)
    # 16 ranks over two nodes: 7 of 15 peers on the node, 8 off it; the NIC share is the bottleneck.
    per_peer = b / 15
    assert ab.alltoall_seconds(b, ep=16, tp=1, net=NET) == pytest.approx(10e-6 + 8 * per_peer / 50e9)
    # tp=2 spreads an ep group of 8 over two nodes (ranks 0,2,..,14): 4 peers per node.
    assert ab.alltoall_seconds(b, ep=8, tp=2, net=NET) == pytest.approx(10e-6 + 4 * (b / 7) / 50e9)
    assert ab.alltoall_seconds(b, ep=1, tp=1, net=NET) == 0.0
    # Ring all-reduce over 4 ranks of one node.
    assert ab.allreduce_seconds(1e9, 4, 1, NET) == pytest.approx(6 * 3e-6 + 1.5e9 / 450e9)


def test_flops_match_six_times_active_weights_plus_attention():
    cfg = config.load("configs/mixtral-8x7b.yaml")
    m, t = cfg.model, cfg.train
    active = param_counts(cfg, ParallelDims(world=1)).active
    want = 6 * (active - m.vocab_size * m.dim) + 12 * m.n_layers * t.seq_len * m.dim
    assert ab.model_flops_per_token(cfg) == pytest.approx(want, rel=1e-12)
    assert 70e9 < want < 95e9           # Mixtral 8x7B: 12.9B active -> ~77 GFLOP + attention


def test_estimate_uses_the_plans_bytes_and_the_named_throughputs():
    cfg = ab.with_layout(config.load("configs/mixtral-8x7b.yaml"), ep=8)
    dims = check_layout(cfg, 64)
    e = ab.estimate(cfg, dims)
    n_moe = sum(is_moe_layer(cfg.model, i) for i in range(cfg.model.n_layers))
    sent = alltoall_rows_per_layer(cfg, dims)["sent"] * cfg.model.dim * 2          # bf16
    assert e.alltoall_s == pytest.approx(4 * n_moe * ab.alltoall_seconds(sent, 8, 1, NET))
    f = ab.flops_per_rank(cfg, dims)
    assert e.compute_s == pytest.approx(f["dense"] / 720e12 + f["experts"] / 600e12)
    # Doubling every throughput halves compute; the all-to-all does not change.
    fast = ab.estimate(cfg, dims, comp=ab.Compute(expert_tflops=1200, dense_tflops=1440))
    assert fast.compute_s == pytest.approx(e.compute_s / 2) and fast.alltoall_s == e.alltoall_s
    # Never above the GEMM throughputs; the exposed DP all-reduce only slows it down.
    assert e.tflops_per_gpu < 720
    assert ab.estimate(cfg, dims, overlap_dp=False).step_s > e.step_s
    # Crossing nodes with the all-to-all (EP over 64 GPUs) costs more than staying inside one.
    wide_cfg = ab.with_layout(cfg, ep=64, num_experts=64)
    wide = ab.estimate(wide_cfg, check_layout(wide_cfg, 64))
    assert wide.alltoall_share > 3 * e.alltoall_share


def test_cpu_fit_recovers_alpha_beta_and_shares_cores():
    alpha, beta = 2e-4, 5e8
    pts = [(c, b, c * alpha + b / beta) for c, b in ((10, 1e6), (20, 4e6), (40, 3e6))]
    a, bb = ab.fit_alpha_beta(pts)
    assert a == pytest.approx(alpha) and bb == pytest.approx(beta)
    fit = ab.CpuFit(compute_1=0.1, cores=2, alpha_s=alpha, beta_bytes_per_s=beta)
    assert fit.step(2, 1.0, 0, 0) == pytest.approx(0.1)           # two ranks, two cores: no sharing
    assert fit.step(4, 1.0, 0, 0) == pytest.approx(0.2)           # four ranks share two cores
    assert fit.step(4, 0.5, 10, 1e6) == pytest.approx(0.1 + 10 * alpha + 1e6 / beta)


@pytest.fixture(scope="module")
def measured_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scaling")
    tokens = tmp / "tok.bin"
    prepare(None, tokens, max_bytes=200_000)
    raw = {"model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32, "dense_hidden": 64},
           "moe": {"num_experts": 8, "top_k": 2, "expert_hidden": 32, "force_balanced": True},
           "train": {"seq_len": 32, "warmup_steps": 0, "out_dir": str(tmp / "run")},
           "data": {"path": str(tokens)}}
    cfg_path = tmp / "small.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    parser = argparse.ArgumentParser()
    scaling.add_arguments(parser)
    # No --out: the results must go to runs/bench/ under the current directory, not into the checkout.
    args = parser.parse_args(["--config", str(cfg_path), "--ranks", "1,2", "--layouts", "EP-only",
                              "--modes", "weak", "--steps", "3", "--warmup", "1", "--batch-per-rank", "2",
                              "--experts-per-rank", "2", "--gpu-config", str(REPO / "configs" / "mixtral-8x7b.yaml")])
    committed = REPO / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime for p in committed.iterdir()}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        assert scaling.run(args) == 0
    assert {p.name: p.stat().st_mtime for p in committed.iterdir()} == before
    out = tmp / "runs" / "bench"
    return json.loads((out / "scaling_cpu.json").read_text()), out, args, config.load(cfg_path)


def test_measured_alltoall_bytes_equal_the_plan_and_outputs_are_written(measured_run):
    res, tmp, args, base = measured_run
    one, two = res["measured"]["weak"]["EP-only"]
    assert (one["ranks"], two["ranks"]) == (1, 2)
    # Weak scaling: experts = 2 x ep, tokens per rank fixed.
    assert (one["num_experts"], two["num_experts"], two["batch_per_dp_rank"]) == (2, 4, 2)
    assert one["a2a_bytes_per_rank_step"] == 0 and one["a2a_s"] == 0
    cfg = scaling.point_config(base, "weak", "EP-only", 2, args)
    sent = alltoall_rows_per_layer(cfg, check_layout(cfg, 2))["sent"]
    assert two["a2a_dispatch_bytes_per_rank"] == pytest.approx(2 * sent * 32 * 4)   # 2 MoE layers, fp32
    assert 0 < two["a2a_share"] < 1 and two["tokens_per_s"] > 0
    assert one["efficiency_raw"] == pytest.approx(1.0)
    assert two["efficiency_per_core"] == pytest.approx(two["efficiency_raw"] * 2 / min(2, res["cores"]))
    # The CPU model passes through the 1-rank point exactly (no communication there).
    assert one["model_error"] == pytest.approx(0.0, abs=1e-9)
    lines = res["cpu_model"]["weak"]["lines"]["EP-only"]
    assert [d["ranks"] for d in lines] == [1, 2, 4]                 # 4: extrapolated beyond the measurement
    assert res["published_comparison"]["tflops_per_gpu"] == 468.0
    assert res["published_comparison"]["relative_error"] is not None
    gpus = [r["gpus"] for r in res["gpu_model"]["curves"]["weak"]["EP×DP"]]
    assert gpus == [8, 16, 32, 64, 128, 256, 512, 1024]
    assert res["machine"]["cpu_count"] >= 1
    assert (tmp / "scaling_cpu.png").stat().st_size > 10_000


@pytest.mark.parametrize("flags, match", [
    (["--ranks", "2,4"], "must start at 1"),
    (["--ranks", "1,3"], "odd"),
    (["--layouts", "EP-only,ZeRO"], "--layouts"),
    (["--steps", "2", "--warmup", "2"], "--warmup=2 leaves no timed step"),
])
def test_bad_arguments_name_the_flag(flags, match):
    parser = argparse.ArgumentParser()
    scaling.add_arguments(parser)
    with pytest.raises(config.ConfigError, match=match):
        scaling.run(parser.parse_args(flags))


def test_gpu_tp_term_is_ring_collectives_of_the_counted_bytes():
    # Hand count, Mixtral-like shapes small enough to do on paper: 2 layers, the second MoE, tp=2 on NVLink.
    cfg = config.load("configs/mixtral-8x7b.yaml")
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, n_layers=2, dim=1024, moe_every=2, first_dense=0),
        moe=dataclasses.replace(cfg.moe, num_experts=4, aux_loss_coef=0.01, aux_loss_type="global",
                                balance_over="micro_batch", num_shared_experts=0),
        train=dataclasses.replace(cfg.train, batch_size=2, seq_len=512, dtype="bfloat16", grad_accum_steps=1,
                                  recompute="none"),
        parallel=dataclasses.replace(cfg.parallel, tp=2, ep=1, etp=1))
    dims = check_layout(cfg, 2)
    act = 2 * 512 * 1024 * 2                             # [T, D] bf16 = 2 MiB
    tc = ab.tp_collectives(cfg, dims)
    # attention 2 layers x (1 fwd + 2 bwd); dense MLP 1 layer x (1 + 1); MoE counts 1; grads + norm 2.
    assert tc.all_reduce_calls == 6 + 2 + 1 + 2
    assert tc.all_reduce_bytes == 8 * act + 8 * 5 + 4 * 4 * 1024 + 4
    assert (tc.all_gather_calls, tc.all_gather_bytes) == (2, 2 * act)
    # Ring over 2 GPUs on one node: all-reduce 2(n-1)a + 2(n-1)/n b/B, all-gather (n-1)a + (n-1)/n b/B.
    a, B = 3e-6, 450e9
    want = 11 * 2 * a + (8 * act + 40 + 16 * 1024 + 4) / B + 2 * (a + 0.5 * act / B)
    assert ab.tp_seconds(tc, 2, NET) == pytest.approx(want, rel=1e-12)
    e = ab.estimate(cfg, dims)
    assert e.tp_s == pytest.approx(want, rel=1e-12)
    assert e.step_s == pytest.approx(sum(e.terms().values()))
    # No tp, no term; recompute repeats wo's all-reduce (2 layers) and the counts; tp across nodes takes the NIC.
    assert ab.tp_collectives(cfg, ParallelDims(world=1)) == ab.TpCollectives()
    rc = ab.tp_collectives(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                              recompute="block")), dims)
    assert rc.all_reduce_calls == tc.all_reduce_calls + 2 + 1 and rc.all_gather_calls == 2
    assert rc.all_reduce_bytes == tc.all_reduce_bytes + 2 * act + 8 * 5
    slow = ab.Network(gpus_per_node=1)
    assert ab.tp_seconds(tc, 2, slow) == pytest.approx(11 * 2 * 10e-6 + (8 * act + 40 + 16 * 1024 + 4) / 50e9
                                                       + 2 * (10e-6 + 0.5 * act / 50e9), rel=1e-12)


def test_tp_fit_falls_back_when_not_identifiable():
    a, b = 1e-4, 2e8
    pts = [(c, by, c * a + by / b) for c, by in ((20, 1e6), (20, 4e6))]
    alpha, beta, method = ab.fit_tp(pts, 5e-5, 1e9)
    assert method == "fitted" and alpha == pytest.approx(a) and beta == pytest.approx(b)
    # More bytes but no more time (oversubscribed gloo): the TP data's own latency-only fit.
    alpha, beta, method = ab.fit_tp([(26, 2e7, 0.05), (26, 1e7, 0.07)], 5e-5, 1e9)
    assert method == "fitted, latency only" and beta == 0 and alpha == pytest.approx(0.12 / 52)
    # Equal (calls, bytes) at every point: only one number is known; alpha is borrowed.
    alpha, beta, method = ab.fit_tp([pts[0], pts[0]], 5e-5, 1e9)
    assert method.startswith("beta fitted") and alpha == 5e-5
    assert 20 * alpha + 1e6 / beta == pytest.approx(pts[0][2])
    assert ab.fit_tp([], 5e-5, 1e9) == (5e-5, 1e9, "all-to-all fit reused")


@pytest.mark.parametrize("qk_norm,gate,recompute", [
    ("none", False, "block"), ("none", False, "none"),
    # The full q/k norm's all-reduces, the per-head norms' and the shared gate's tp-partial gradients, and what
    # recompute=moe / block run again.
    pytest.param("full", True, "moe", marks=pytest.mark.slow),
    pytest.param("per_head", True, "block", marks=pytest.mark.slow),
    pytest.param("full", True, "block", marks=pytest.mark.slow)])
def test_counted_tp_collectives_equal_the_measured_ones_on_two_ranks(tmp_path, qk_norm, gate, recompute):
    from moe_dist.bench.ranks import run_ranks, train_and_measure
    tokens = tmp_path / "tok.bin"
    prepare(None, tokens, max_bytes=100_000)
    raw = {"model": {"dim": 16, "n_layers": 3, "n_heads": 2, "max_seq_len": 16, "dense_hidden": 32,
                     "moe_every": 2, "qk_norm": qk_norm},
           "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 16, "num_shared_experts": 1,
                   "shared_expert_gate": gate, "aux_loss_coef": 0.01, "z_loss_coef": 0.001},
           "parallel": {"tp": 2},
           "train": {"seq_len": 16, "batch_size": 2, "grad_accum_steps": 2, "recompute": recompute,
                     "warmup_steps": 0, "out_dir": str(tmp_path / "run")},
           "data": {"path": str(tokens)}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = config.load(tmp_path / "c.yaml")
    res = run_ranks(train_and_measure, 2, cfg, 2, 1)
    tc = ab.tp_collectives(cfg, check_layout(cfg, 2))
    for r in res:
        for step in range(2):
            by_op = r["tp_calls_by_op"][step]
            assert by_op == {"all_reduce": tc.all_reduce_calls, "all_gather": tc.all_gather_calls}
            assert r["tp_bytes_by_op"][step] == {"all_reduce": tc.all_reduce_bytes,
                                                 "all_gather": tc.all_gather_bytes}
            assert r["tp_calls"][step] == tc.calls and r["tp_s"][step] > 0


def test_pipeline_layout_points_keep_tokens_per_rank_and_the_gpu_curve_is_megatron_cores():
    parser = argparse.ArgumentParser()
    scaling.add_arguments(parser)
    args = parser.parse_args(["--ranks", "1,2,4", "--batch-per-rank", "4"])
    base = config.load(REPO / "configs" / "tiny-cpu.yaml")
    # PP×EP at 4 ranks: pp=2, ep=2, dp=2; each dp rank's 4·2 sequences in 2·pp = 4 micro-batches of 2.
    cfg = scaling.point_config(base, "weak", "PP×EP", 4, args)
    dims = check_layout(cfg, 4)
    assert (dims.pp, dims.ep, dims.dp, cfg.train.batch_size, cfg.train.grad_accum_steps) == (2, 2, 2, 2, 4)
    ep_only = scaling.point_config(base, "weak", "EP-only", 4, args)
    assert (cfg.train.batch_size * cfg.train.grad_accum_steps * dims.dp
            == ep_only.train.batch_size * check_layout(ep_only, 4).dp)         # the same tokens per rank
    assert scaling.point_config(base, "weak", "PP×EP", 1, args).parallel.pp == 1
    # GPU: TP1 EP8 PP4 from 32 GPUs, 16 micro-batches, with its bubble and transfers in the step.
    net, comp = ab.Network(), ab.Compute()
    gargs = parser.parse_args([])
    gargs.gpus = scaling._ints(gargs.gpus, "--gpus")          # what run() does with the flag
    curves = scaling.gpu_curves(config.load(REPO / "configs" / "mixtral-8x7b.yaml"), gargs, net, comp)
    rows = curves["weak"]["PP×EP"]
    assert rows[0]["gpus"] == 32 and all(r["pp"] == 4 and r["ep"] == 8 and r["micro_batches"] == 16 for r in rows)
    at64 = next(r for r in rows if r["gpus"] == 64)
    assert at64["bubble_s"] == pytest.approx(3 / 19 * (at64["step_s"] - at64["bubble_s"]), rel=0.2)
    assert at64["pipeline_p2p_s"] > 0 and 300 < at64["tflops_per_gpu"] < 468
