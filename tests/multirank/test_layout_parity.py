"""Parity of every parallel layout with one process on the whole batch (gloo CPU ranks, fp32).

One training step of a tiny MoE GPT on 4 ranks — EP=4, EP=2×DP=2, TP=2×EP=2, ETP=2×EP=2, DP=4 — in
dropless and capacity modes: logits, LM loss, auxiliary losses, every gradient (each rank's shard of
the reference gradient) and every parameter after AdamW. All layouts run in one spawn of 4 ranks.
Layer-level edge cases use a router whose choices are forced by the input.
"""
from __future__ import annotations

import copy
import time

import pytest
import torch

from distributed import run_ranks
from moe_dist import config
from moe_dist.models.gpt import MoEGPT
from moe_dist.moe.layer import MoELayer
from moe_dist.parallel.layout import check_layout
from moe_dist.parallel.tensor_parallel import local_slice
from moe_dist.parallel.topology import ParallelDims, Topology
from moe_dist.train.trainer import Trainer

WORLD = 4
LAYOUTS = {"ep4": (1, 4, 1), "ep2_dp2": (1, 2, 1), "tp2_ep2": (2, 2, 1), "etp2_ep2": (1, 2, 2), "dp4": (1, 1, 1)}
MODES = {"dropless": {"capacity_factor": None}, "capacity": {"capacity_factor": 1.0, "min_capacity": 1}}


def tiny_config(tp=1, ep=1, etp=1, **moe) -> dict:
    return {
        "model": {"dim": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 16,
                  "dense_hidden": 96, "first_dense": 1},
        "moe": {"num_experts": 8, "top_k": 2, "expert_hidden": 32, "renormalize": True, "aux_loss_coef": 0.01,
                "z_loss_coef": 0.001, "num_shared_experts": 1, "balance_over": "global_batch", **moe},
        "parallel": {"tp": tp, "ep": ep, "etp": etp},
        "train": {"batch_size": 2, "seq_len": 16, "lr": 1e-2, "warmup_steps": 0, "grad_clip": 0.05,
                  "steps": 10, "out_dir": "/tmp/moe_dist_parity"},
    }


CASES = {f"{lay}-{mode}": tiny_config(*LAYOUTS[lay], **MODES[mode]) for lay in LAYOUTS for mode in MODES}
# The Triton kernels (permute, grouped GEMM, unpermute) in the interpreter, through all-to-all and ETP.
CASES["etp2_ep2-triton"] = tiny_config(1, 2, 2, backend="triton")
CASES["ep4-deepseek"] = tiny_config(1, 4, 1, score_func="sigmoid", expert_bias=True, num_groups=4,
                                    topk_groups=2, aux_loss_type="seq")


class FixedBatcher:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def get_batch(self, step):
        return self.x, self.y


def global_batch(cfg: config.Config, dp: int):
    g = torch.Generator().manual_seed(7)
    B, S = cfg.train.batch_size * dp, cfg.train.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (B, S + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def one_step(cfg: config.Config, topo: Topology, x, y) -> dict:
    trainer = Trainer(cfg, batcher=FixedBatcher(x, y), topo=topo)
    model = trainer.model
    with torch.no_grad():
        out = model(x, y)
    step = trainer.train_step(0)
    return {"logits": out.logits, "lm_loss": float(out.lm_loss),
            "aux": [float(s.aux_loss + s.z_loss) for s in out.stats],
            "rows_out": [s.a2a_rows_out for s in out.stats],
            "step_loss": step.loss, "grad_norm": step.grad_norm,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers() if "expert_bias" in n}}


def _parity_worker(rank, world, cases):
    results = {}
    for name, raw in cases.items():
        cfg = config.from_dict(raw)
        config.validate(cfg)
        topo = Topology.build(check_layout(cfg, world), timeout_s=60)
        x, y = global_batch(cfg, topo.dims.dp)
        B = cfg.train.batch_size
        rows = slice(topo.dp.rank * B, (topo.dp.rank + 1) * B)
        t0 = time.perf_counter()
        results[name] = one_step(cfg, topo, x[rows], y[rows])
        results[name]["seconds"] = time.perf_counter() - t0
    return results


@pytest.fixture(scope="module")
def parity_runs():
    return run_ranks(_parity_worker, WORLD, CASES, timeout=400)


@pytest.mark.parametrize("case", list(CASES))
def test_step_matches_one_process(parity_runs, case):
    raw = CASES[case]
    cfg = config.from_dict(raw)
    p = cfg.parallel
    dims = ParallelDims(world=WORLD, tp=p.tp, ep=p.ep, etp=p.etp)
    ref_raw = copy.deepcopy(raw)
    ref_raw["parallel"] = {}
    ref_raw["moe"]["capacity_groups"] = WORLD
    ref_raw["train"]["batch_size"] = cfg.train.batch_size * dims.dp
    ref_cfg = config.from_dict(ref_raw)
    x, y = global_batch(cfg, dims.dp)
    ref = one_step(ref_cfg, Topology.single(), x, y)

    ranks = [r[case] for r in parity_runs]
    tol = dict(rtol=1e-4, atol=1e-5)
    B = cfg.train.batch_size
    assert sum(r["lm_loss"] for r in ranks) / WORLD == pytest.approx(ref["lm_loss"], rel=1e-5)
    for layer, ref_aux in enumerate(ref["aux"]):
        assert sum(r["aux"][layer] for r in ranks) / dims.dp == pytest.approx(ref_aux, rel=1e-4, abs=1e-7)
    for rank, r in enumerate(ranks):
        topo = Topology.virtual(dims, rank)
        d = topo.dp.rank
        torch.testing.assert_close(r["logits"], ref["logits"][d * B:(d + 1) * B], **tol)
        assert r["step_loss"] == pytest.approx(ref["step_loss"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
        shards = MoEGPT(cfg, topo).param_shards
        assert set(r["grads"]) == set(ref["grads"])
        for name, g in r["grads"].items():
            want = local_slice(ref["grads"][name], shards.get(name, ()), topo)
            torch.testing.assert_close(g, want, **tol, msg=lambda m: f"rank {rank} grad {name}: {m}")
            # Adam's first step is ≈ lr·sign(g): a gradient near zero moves its weight by a noisy amount,
            # so parameters compare to half a percent of a step (gradients above match to 1e-5).
            want = local_slice(ref["params"][name], shards.get(name, ()), topo)
            torch.testing.assert_close(r["params"][name], want, rtol=1e-4, atol=cfg.train.lr * 5e-3,
                                       msg=lambda m: f"rank {rank} param {name}: {m}")
        for name, b in r["buffers"].items():
            torch.testing.assert_close(b, ref["buffers"][name])


def test_capacity_mode_drops_and_dropless_sends_exactly_what_leaves(parity_runs):
    # Capacity 1.0 on a random router must drop something, or the capacity cases test nothing.
    ref_cfg = config.from_dict({**CASES["ep4-capacity"], "parallel": {}})
    ref_cfg.moe.capacity_groups = WORLD
    x, y = global_batch(ref_cfg, 4)
    ref_cfg.train.batch_size = 8
    stats = MoEGPT(ref_cfg)(x, y).stats
    assert sum(int(s.dropped.sum()) for s in stats) > 0
    for case in ("ep4-dropless", "ep2_dp2-dropless", "etp2_ep2-dropless"):
        rows = [r[case]["rows_out"] for r in parity_runs]
        assert all(n > 0 for per_rank in rows for n in per_rank), case


# ---------------------------------------------------------------------------------------------------
# Layer-level edge cases: the input forces the router's choice. Router weight = identity on the first
# E dims, so a token x = 3·e_a + 2·e_b (+ noise elsewhere) picks experts a then b.

E, D, S = 8, 32, 4
EDGE = {
    # rank → list of (first, second) expert per token; experts 2r, 2r+1 live on rank r under EP=4.
    "tokens_all_leave_rank0": {0: [(2, 5), (7, 3), (4, 6), (5, 2)], 1: [(0, 1)] * 4, 2: [(1, 6)] * 4, 3: [(3, 7)] * 4},
    "expert5_idle_everywhere": {r: [(0, 1), (2, 3), (4, 6), (7, 0)] for r in range(4)},
    "rank2_has_no_tokens": {0: [(0, 1)] * 4, 1: [(6, 7)] * 4, 2: [], 3: [(2, 4), (4, 2), (1, 3), (5, 0)]},
    "all_to_one_expert": {r: [(0, 1)] * 4 for r in range(4)},
}
EDGE_LAYOUTS = {"ep4": (4, 1), "ep2_etp2": (2, 2)}


def edge_inputs(assign: list[tuple[int, int]], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(assign), D, generator=g) * 0.1
    x[:, :E] = 0
    for t, (a, b) in enumerate(assign):
        x[t, a], x[t, b] = 3.0, 2.0
    return x.view(-1, S, D) if assign else x.view(0, S, D)


def edge_layer(topo: Topology | None = None) -> MoELayer:
    cfg = config.MoEConfig(num_experts=E, top_k=2, expert_hidden=16, aux_loss_coef=0.0, capacity_factor=None)
    torch.manual_seed(3)
    full = MoELayer(cfg, D)
    with torch.no_grad():
        full.router.weight_ED.copy_(torch.eye(E, D))
    if topo is None:
        return full
    layer = MoELayer(cfg, D, topo)
    shards = layer.param_shards
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(local_slice(dict(full.named_parameters())[name], shards.get(name, ()), topo))
    return layer


def _edge_worker(rank, world, cases):
    out = {}
    for (lay, (ep, etp)), (case, assign) in cases:
        topo = Topology.build(ParallelDims(world=world, ep=ep, etp=etp), timeout_s=60)
        layer = edge_layer(topo)
        x = edge_inputs(assign[rank], seed=rank).requires_grad_()
        y, stats = layer(x)
        (y * torch.arange(1, D + 1)).sum().backward()
        out[(lay, case)] = {"y": y.detach(), "dx": x.grad, "counts": stats.tokens_per_expert,
                            "grads": {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                                      for n, p in layer.named_parameters()}}
    return out


EDGE_CASES = [((lay, EDGE_LAYOUTS[lay]), (case, EDGE[case])) for lay in EDGE_LAYOUTS for case in EDGE]


@pytest.fixture(scope="module")
def edge_runs():
    return run_ranks(_edge_worker, WORLD, EDGE_CASES, timeout=300)


@pytest.mark.parametrize("lay_case", [(lay, case) for (lay, _), (case, _) in EDGE_CASES],
                         ids=lambda lc: f"{lc[0]}-{lc[1]}")
def test_layer_edge_cases_match_one_process(edge_runs, lay_case):
    lay, case = lay_case
    ep, etp = EDGE_LAYOUTS[lay]
    dims = ParallelDims(world=WORLD, ep=ep, etp=etp)
    xs = [edge_inputs(EDGE[case][r], seed=r) for r in range(WORLD)]
    x = torch.cat(xs).requires_grad_()
    layer = edge_layer()
    y, stats = layer(x)
    (y * torch.arange(1, D + 1)).sum().backward()
    sizes = [len(xi) for xi in xs]
    for rank, (y_r, dx_r) in enumerate(zip(y.split(sizes), x.grad.split(sizes))):
        got = edge_runs[rank][(lay, case)]
        torch.testing.assert_close(got["y"], y_r.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["dx"], dx_r, rtol=1e-5, atol=1e-6)
        topo = Topology.virtual(dims, rank)
        shards = MoELayer(layer.cfg, D, topo).param_shards
        for name, p in layer.named_parameters():
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            if name.startswith("router"):       # replicated, fed by this rank's tokens only: summed over ranks
                total = sum(r[(lay, case)]["grads"][name] for r in edge_runs)
                torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-6)
                continue
            torch.testing.assert_close(got["grads"][name], local_slice(want, shards.get(name, ()), topo),
                                       rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank} {name}: {m}")
    counts = sum(r[(lay, case)]["counts"] for r in edge_runs)
    torch.testing.assert_close(counts, stats.tokens_per_expert)
    if case == "expert5_idle_everywhere":
        assert int(counts[5]) == 0


# ---------------------------------------------------------------------------------------------------
# All-to-all rows measured in the layer equal what `moe-dist plan` predicts (balanced routing), and the
# micro-batch balance scope gives each rank the loss of its own tokens.

BYTES_LAYOUTS = {"ep4": (1, 4, 1), "ep2_dp2": (1, 2, 1), "tp2_ep2": (2, 2, 1), "etp2_ep2": (1, 2, 2)}


def _rows_worker(rank, world, cases):
    out = {}
    for name, raw in cases.items():
        cfg = config.from_dict(raw)
        topo = Topology.build(check_layout(cfg, world), timeout_s=60)
        x, y = global_batch(cfg, topo.dims.dp)
        B = cfg.train.batch_size
        rows = slice(topo.dp.rank * B, (topo.dp.rank + 1) * B)
        stats = MoEGPT(cfg, topo)(x[rows], y[rows]).stats
        out[name] = {"rows_out": [s.a2a_rows_out for s in stats], "rows_in": [s.a2a_rows_in for s in stats],
                     "aux": [float(s.aux_loss.detach()) for s in stats]}
    return out


ROW_CASES = {lay: tiny_config(*BYTES_LAYOUTS[lay], force_balanced=True) for lay in BYTES_LAYOUTS}
ROW_CASES["ep2_dp2-micro_batch"] = tiny_config(1, 2, 1, balance_over="micro_batch")


@pytest.fixture(scope="module")
def row_runs():
    return run_ranks(_rows_worker, WORLD, ROW_CASES, timeout=300)


@pytest.mark.parametrize("lay", list(BYTES_LAYOUTS))
def test_alltoall_rows_match_plan_and_nothing_is_padded(row_runs, lay):
    from moe_dist.plan import alltoall_rows_per_layer
    cfg = config.from_dict(ROW_CASES[lay])
    p = cfg.parallel
    predicted = alltoall_rows_per_layer(cfg, ParallelDims(world=WORLD, tp=p.tp, ep=p.ep, etp=p.etp))
    for r in row_runs:
        # Dropless and balanced: every rank sends exactly the rows bound for other ranks' experts.
        assert r[lay]["rows_out"] == [predicted["sent"]] * 2
        assert r[lay]["rows_in"] == [predicted["sent"]] * 2


def test_micro_batch_balance_is_each_ranks_own_loss(row_runs):
    raw = copy.deepcopy(ROW_CASES["ep2_dp2-micro_batch"])
    raw["parallel"] = {}
    cfg = config.from_dict(raw)
    x, y = global_batch(cfg, WORLD)
    B = cfg.train.batch_size
    for rank, r in enumerate(row_runs):
        own = MoEGPT(cfg)(x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]).stats
        assert r["ep2_dp2-micro_batch"]["aux"] == pytest.approx([float(s.aux_loss.detach()) for s in own], rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# A rank that dies mid-step: the others raise inside the collective timeout instead of hanging.

def _die_mid_step(rank, world, raw, dying_rank):
    import os
    cfg = config.from_dict(raw)
    topo = Topology.build(check_layout(cfg, world), timeout_s=20)
    x, y = global_batch(cfg, world)
    B = cfg.train.batch_size
    out = MoEGPT(cfg, topo)(x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B])
    if rank == dying_rank:
        os._exit(17)          # after the forward's all-to-alls, before the backward's
    t0 = time.perf_counter()
    try:
        out.lm_loss.backward()
    except RuntimeError as e:
        return {"error": str(e), "seconds": time.perf_counter() - t0}
    return {"error": None, "seconds": time.perf_counter() - t0}


def test_dead_rank_makes_the_others_fail_not_hang():
    t0 = time.perf_counter()
    survivor, dead = run_ranks(_die_mid_step, 2, tiny_config(1, 2, 1), 1, timeout=60, collective_timeout_s=20,
                               may_die=(1,))
    assert dead is None
    assert survivor["error"] is not None, "rank 0's backward finished although its peer was dead"
    assert survivor["seconds"] < 25, f"rank 0 waited {survivor['seconds']:.0f}s, past the 20 s timeout"
    assert time.perf_counter() - t0 < 55
