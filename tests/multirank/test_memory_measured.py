"""Optimizer memory per rank, measured against the memory formula, on 4 gloo ranks (fp32, the CPU).

Layout EP=2×DP=2: dense parameters are data-parallel over all 4 ranks (dp=4), experts over 2 (edp=2), so
sharding must divide the two kinds differently. Each run trains one step (AdamW's moments exist from the first
step) and the measured bytes come from the first-step "memory" record of metrics.jsonl, which holds every rank's
`engine.memory()`. Per rank, with P_d / P_e the dense / expert elements the rank holds (counted on its model):

- train.shard_optimizer none → states: the dense moments fall 4× (dp) and the experts' 2× (edp), within 5%;
- the measured optimizer bytes equal `moe_dist.plan`'s prediction, 8·(P_d/s_d + P_e/s_e) (fp32 weights are
  their own master), within 5%, for none, states and states+grads; weights and (none / states) gradients too;
- states+grads keeps the optimizer bytes of states; its gradients (the fp32 shard and one reduction bucket)
  stay under the plan's bound.

The DeepSpeed engine's ZeRO-1 on the same layout holds the same moments plus an fp32 master partition (DeepSpeed
copies the weights even when they are fp32): 12·(P_d/dp + P_e/edp), also within 5%.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from distributed import run_ranks
from moe_dist import config

TOL = 0.05
WORLD = 4


def _raw(data: Path, out: Path, shard: str, engine: str = "native") -> dict:
    # Expert-heavy enough (8 experts × 64 hidden in both layers) that sharding experts over dp instead of
    # edp would miss the formula by far more than 5%.
    return {
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 16, "dense_hidden": 64, "first_dense": 0},
        "moe": {"num_experts": 8, "top_k": 2, "expert_hidden": 64, "aux_loss_coef": 0.01},
        "parallel": {"ep": 2},
        "train": {"batch_size": 1, "seq_len": 16, "steps": 1, "warmup_steps": 1, "shard_optimizer": shard,
                  "engine": engine, "zero_stage": 1, "out_dir": str(out), "tensorboard": False, "eval_every": 0},
        "data": {"path": str(data), "val_fraction": 0.0},
        "checkpoint": {"resume": "never", "dir": str(out / "ck")},
    }


def _by_kind(trainer) -> dict[str, int]:
    """The native engine's moment bytes split into dense and expert (from its flat buckets or its torch AdamW)."""
    engine = trainer.engine
    out = {"dense": 0, "expert": 0}
    if getattr(engine, "flat", None) is not None:
        for b in engine.flat.buckets:
            out["expert" if b.kind == "expert" else "dense"] += sum(
                t.numel() * t.element_size() for t in (b.exp_avg, b.exp_avg_sq))
        return out
    experts = {id(p) for p in trainer.model.expert_parameters()}
    for p, st in engine.optimizer.state.items():
        out["expert" if id(p) in experts else "dense"] += sum(
            st[k].numel() * st[k].element_size() for k in ("exp_avg", "exp_avg_sq"))
    return out


def _measure(rank, world, data, root, runs):
    from moe_dist.parallel.layout import check_layout
    from moe_dist.parallel.topology import Topology
    from moe_dist.plan import make_plan
    from moe_dist.train.trainer import Trainer
    out = {}
    for name, (shard, engine) in runs.items():
        cfg = config.from_dict(_raw(Path(data), Path(root) / name, shard, engine))
        config.validate(cfg)
        trainer = Trainer(cfg, topo=Topology.build(check_layout(cfg, world), timeout_s=120))
        trainer.fit(progress=False)
        experts = {id(p) for p in trainer.model.expert_parameters()}
        p_e = sum(p.numel() for p in trainer.model.parameters() if id(p) in experts)
        p_d = sum(p.numel() for p in trainer.model.parameters() if id(p) not in experts)
        plan = make_plan(cfg, world)
        out[name] = {"engine_memory": trainer.engine.memory(), "P_d": p_d, "P_e": p_e,
                     "plan": {"weights": plan.memory.weights, "grads": plan.memory.grads,
                              "optimizer": plan.memory.optimizer,
                              "P_d": plan.params_rank.dense, "P_e": plan.params_rank.expert},
                     "by_kind": _by_kind(trainer) if engine == "native" else None}
    return out


def _records(out_dir: Path) -> dict:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    mem = [r for r in rows if r["kind"] == "memory"]
    assert len(mem) == 1 and mem[0]["step"] == 0, mem          # one record, after the first step
    return mem[0]


def _close(measured: float, predicted: float, what: str) -> None:
    assert abs(measured - predicted) <= TOL * predicted, (f"{what}: measured {measured:,.0f} B, "
                                                          f"predicted {predicted:,.0f} B")


def _run(tmp_path, corpus, runs):
    results = run_ranks(_measure, WORLD, str(corpus), str(tmp_path), runs, timeout=600)
    for name in runs:
        rec = _records(tmp_path / name)
        for rank, res in enumerate(results):
            # The metrics record carries what every rank's engine reported.
            row = rec["per_rank"][rank]
            for k in ("weights", "grads", "optimizer"):
                assert row[k] == res[name]["engine_memory"][k], (name, rank, k)
    return results


@pytest.mark.slow       # one 4-rank spawn, three one-step runs
def test_native_optimizer_state_falls_by_dp_and_edp_and_matches_plan(tmp_path, corpus):
    runs = {"none": ("none", "native"), "states": ("states", "native"), "states+grads": ("states+grads", "native")}
    results = _run(tmp_path, corpus, runs)
    dp, edp = WORLD, WORLD // 2
    for rank, res in enumerate(results):
        none, states, zero2 = res["none"], res["states"], res["states+grads"]
        p_d, p_e = none["P_d"], none["P_e"]
        # The plan counts the same parameters as the model holds (its formula's inputs are right).
        assert (none["plan"]["P_d"], none["plan"]["P_e"]) == (p_d, p_e)
        assert p_e > p_d / 2                                   # experts weigh enough to tell edp from dp
        # Dense moments fall by dp, expert moments by edp.
        _close(states["by_kind"]["dense"], none["by_kind"]["dense"] / dp, f"rank {rank} dense moments, states")
        _close(states["by_kind"]["expert"], none["by_kind"]["expert"] / edp, f"rank {rank} expert moments, states")
        # The formula, computed here, and the plan's prediction, against the engine's measurement.
        _close(none["engine_memory"]["optimizer"], 8 * (p_d + p_e), f"rank {rank} optimizer, none (formula)")
        _close(states["engine_memory"]["optimizer"], 8 * (p_d / dp + p_e / edp),
               f"rank {rank} optimizer, states (formula)")
        for name in runs:
            m, plan = res[name]["engine_memory"], res[name]["plan"]
            _close(m["optimizer"], plan["optimizer"], f"rank {rank} optimizer, {name} (plan)")
            _close(m["weights"], plan["weights"], f"rank {rank} weights, {name} (plan)")
        for name in ("none", "states"):
            _close(res[name]["engine_memory"]["grads"], res[name]["plan"]["grads"], f"rank {rank} grads, {name}")
        # ZeRO-2 shards the same optimizer state. Its gradients are the fp32 shard plus one reduction bucket: the
        # plan's bucket is min(whole model, 2^24 elements), here the whole model; the engine's largest bucket
        # is one kind's (dense or expert), so the plan bounds it from above on a model this small.
        assert zero2["engine_memory"]["optimizer"] == states["engine_memory"]["optimizer"]
        assert 4 * (p_d / dp + p_e / edp) < zero2["engine_memory"]["grads"] <= zero2["plan"]["grads"]
        print(f"rank {rank}: P_d={p_d} P_e={p_e}; optimizer bytes none={none['engine_memory']['optimizer']:,} "
              f"states={states['engine_memory']['optimizer']:,} (plan {states['plan']['optimizer']:,}); "
              f"grads none={none['engine_memory']['grads']:,} states+grads={zero2['engine_memory']['grads']:,} "
              f"(plan {zero2['plan']['grads']:,})")


@pytest.mark.slow       # a 4-rank spawn importing DeepSpeed
def test_deepspeed_zero1_holds_moments_and_an_fp32_master_partition(tmp_path, corpus):
    pytest.importorskip("deepspeed")
    results = _run(tmp_path, corpus, {"ds": ("none", "deepspeed")})
    for rank, res in enumerate(results):
        r = res["ds"]
        _close(r["engine_memory"]["optimizer"], 12 * (r["P_d"] / WORLD + r["P_e"] / (WORLD // 2)),
               f"rank {rank} DeepSpeed ZeRO-1 optimizer")
        print(f"rank {rank}: DeepSpeed ZeRO-1 optimizer bytes {r['engine_memory']['optimizer']:,}, "
              f"grads {r['engine_memory']['grads']:,}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from moe_dist.train.data import prepare
    out = tmp_path_factory.mktemp("memdata") / "tok.bin"
    prepare(None, out, max_bytes=20_000)
    return out
