"""Pipeline parallelism trains like one process (gloo CPU ranks, fp32): 5 optimizer steps of 4 micro-batches
through the Trainer in PP2, PP2×EP2, PP2×DP2, PP2×TP2 (1F1B), interleaved PP2 with 2 virtual stages, GPipe PP2,
and PP2×EP2 with the optimizer state sharded (train.shard_optimizer=states), against one process on the whole
global batch: every step's logged losses (LM, aux, z) and gradient norm, the expert counts (and, with PP2×EP2,
the expert bias they update), and every parameter
after the last step, each rank's under its global name (`blocks.<i>…` whatever stage holds layer i), compared
with the reference's slice for that rank; together the ranks hold every parameter of the reference.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from checkpoint_helpers import GlobalBatcher
from distributed import run_ranks
from moe_dist import config
from moe_dist.models.gpt import MoEGPT
from moe_dist.parallel.layout import check_layout
from moe_dist.parallel.tensor_parallel import local_slice
from moe_dist.parallel.topology import Topology
from moe_dist.train.trainer import Trainer
from trainer_helpers import fresh_out_dir

STEPS, ACCUM, G = 5, 4, 4          # optimizer steps, micro-batches per step, sequences per micro-batch


def raw_config(tp=1, ep=1, pp=1, schedule="1f1b", virtual=1, tie=True, bias=False, layers=None, **train) -> dict:
    """4 layers (layer 0 dense, 1–3 MoE), a shared expert, tied embeddings (their gradient summed over the first
    and last stage), aux and z losses balanced over the global batch, dropless routing."""
    return {
        "model": {"dim": 32, "n_layers": 4, "n_heads": 2, "max_seq_len": 8, "dense_hidden": 32, "first_dense": 1,
                  "tie_embeddings": tie},
        "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 16, "aux_loss_coef": 0.01, "z_loss_coef": 0.001,
                "balance_over": "global_batch", "num_shared_experts": 1, "expert_bias": bias},
        "parallel": {"tp": tp, "ep": ep, "pp": pp, "pp_schedule": schedule, "pp_virtual": virtual, "pp_layers": layers},
        "train": {"batch_size": 1, "seq_len": 8, "lr": 1e-2, "warmup_steps": 0, "steps": STEPS, "grad_clip": 0.05,
                  "grad_accum_steps": ACCUM, "weight_decay": 0.1, "tensorboard": False, **train},
        "checkpoint": {"resume": "never"},
    }


# name → (world, raw config)
CASES = {
    "pp2": (2, raw_config(pp=2)),
    "pp2_ep2": (4, raw_config(ep=2, pp=2, bias=True)),
    "pp2_dp2": (4, raw_config(pp=2, tie=False)),
    "pp2_tp2": (4, raw_config(tp=2, pp=2)),
    "pp2_interleaved": (2, raw_config(pp=2, schedule="interleaved", virtual=2)),
    "pp2_gpipe": (2, raw_config(pp=2, schedule="gpipe")),
    "pp2_ep2_zero1": (4, raw_config(ep=2, pp=2, bias=True, shard_optimizer="states")),
    # slow: four stages; interleaved with experts split; an uneven split with blocks recomputed in backward
    "pp4": (4, raw_config(pp=4)),
    "pp2_ep2_interleaved": (4, raw_config(ep=2, pp=2, schedule="interleaved", virtual=2, bias=True)),
    "pp2_dp2_uneven_recompute": (4, raw_config(pp=2, layers=[1, 3], recompute="block", tie=False)),
}


def _cfg(raw: dict, batch_size: int) -> config.Config:
    raw = copy.deepcopy(raw)
    raw["train"]["batch_size"] = batch_size
    raw["train"]["out_dir"] = fresh_out_dir()
    cfg = config.from_dict(raw)
    config.validate(cfg)
    return cfg


def train(cfg: config.Config, topo: Topology) -> dict:
    trainer = Trainer(cfg, topo=topo, batcher=GlobalBatcher(G, cfg.train.seq_len, topo.dp.rank, topo.dp.size))
    steps = [trainer.train_step(s) for s in range(STEPS)]
    return {"steps": [(r.lm_loss, r.aux_loss - r.z_loss, r.z_loss, r.grad_norm) for r in steps],
            "counts": [torch.stack(r.tokens_per_expert) for r in steps],
            "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            "bias": {n: b.clone() for n, b in trainer.model.named_buffers() if "expert_bias" in n}}


def _worker(rank, world, cases):
    torch.manual_seed(0)
    out = {}
    for name, raw in cases.items():
        cfg = _cfg(raw, G // (world // (raw["parallel"]["tp"] * raw["parallel"]["pp"])))
        topo = Topology.build(check_layout(cfg, world), timeout_s=60)
        out[name] = train(cfg, topo)
    return out


@contextlib.contextmanager
def one_thread():
    """The reference runs in the test process with one intra-op thread, like each rank: on a busy 2-core machine
    torch's second thread makes these tiny ops tens of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference(raw: dict) -> dict:
    ref = copy.deepcopy(raw)
    ref["parallel"] = {}
    with one_thread():
        return train(_cfg(ref, G), Topology.single())


def check(name: str, world: int, results: list[dict]) -> None:
    raw = CASES[name][1]
    ref = reference(raw)
    cfg = _cfg(raw, 1)
    dims = check_layout(cfg, world)
    seen = set()
    for rank, res in enumerate(results):
        got = res[name]
        for step, (g, w) in enumerate(zip(got["steps"], ref["steps"])):
            assert g == pytest.approx(w, rel=1e-5, abs=1e-8), (name, rank, step)
        for g, w in zip(got["counts"], ref["counts"]):
            assert torch.equal(g, w), (name, rank)
        topo = Topology.virtual(dims, rank)
        shards = MoEGPT(cfg, topo).param_shards
        for pname, p in got["params"].items():
            want = local_slice(ref["params"][pname], shards.get(pname, ()), topo)
            # Adam moves a weight by ≈ lr whatever its gradient's size, so a near-zero gradient summed in another
            # order (tp, ep, stages) can move it by a few 1e-6 more or less: 2e-5 is a fifth of a percent of a step.
            torch.testing.assert_close(p, want, rtol=1e-5, atol=2e-5, msg=lambda m: f"{name} rank {rank} {pname}: {m}")
            seen.add(pname)
        for bname, b in got["bias"].items():
            assert b.abs().sum() > 0 and torch.equal(b, ref["bias"][bname]), (name, rank, bname)
    assert seen == set(ref["params"]), (name, set(ref["params"]) ^ seen)


def test_pp2_matches_one_process():
    """The two-rank cases in one spawn: PP2 with 1F1B, interleaved (2 virtual stages per rank) and GPipe."""
    names = ("pp2", "pp2_interleaved", "pp2_gpipe")
    results = run_ranks(_worker, 2, {n: CASES[n][1] for n in names}, timeout=300)
    for name in names:
        check(name, 2, results)


FOUR = {"pp2_ep2": ("pp2_ep2", "pp2_ep2_zero1"), "pp2_dp2": ("pp2_dp2",), "pp2_tp2": ("pp2_tp2",)}


@pytest.mark.parametrize("spawn", list(FOUR))
def test_pp2_on_four_ranks_matches_one_process(spawn):
    """PP2×EP2 (also with ZeRO-1 optimizer states, in the same spawn), PP2×DP2 (untied embeddings), PP2×TP2."""
    names = FOUR[spawn]
    results = run_ranks(_worker, 4, {n: CASES[n][1] for n in names}, timeout=400)
    for name in names:
        check(name, 4, results)


@pytest.mark.slow
def test_larger_pipelines_match_one_process():
    names = ("pp4", "pp2_ep2_interleaved", "pp2_dp2_uneven_recompute")
    results = run_ranks(_worker, 4, {n: CASES[n][1] for n in names}, timeout=900)
    for name in names:
        check(name, 4, results)
