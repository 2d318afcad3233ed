"""`train.engine: deepspeed` against the native trainer, on gloo CPU ranks (DS_ACCELERATOR=cpu, fp32).

Parity: the same config, seeded weights and batches trained a few steps by `Trainer` over the native engine and
over the DeepSpeed engine (`DeepSpeedEngine`, what train.engine=deepspeed builds) in the same fresh processes
(DeepSpeed's expert groups are process-global, so every case gets its own spawn) give the same losses, gradient
norms, expert counts and parameters, with ZeRO-1 and ZeRO-2 by default, and its checkpoint's manifest (a
truncated and a corrupt rank file named on every rank, then the fallback); with --run-slow also stage 0 (our own
clipping), accumulation, pure data parallelism, EP=2×DP=2 on 4 ranks, DeepSpeed groups in another rank order,
and checkpoint resume. Clipping is active (a small train.grad_clip), so DeepSpeed's global norm is checked
against ours. The generated DeepSpeed JSON is in
tests/train/test_deepspeed_engine.py, `launch/deepspeed.sh` in tests/system/test_deepspeed_launch.py.
"""
from __future__ import annotations

import json

import pytest
import torch

from deepspeed_helpers import ATOL, RTOL, STEPS, tiny, tokens  # noqa: F401  (tokens: a fixture)
from distributed import run_ranks
from moe_dist import config

pytest.importorskip("deepspeed")


def _skip_once(trainer, rank: int, step: int) -> dict:
    """train.on_nonfinite=skip: a router made NaN on rank 0 for one step; every rank skips it together, nothing
    changes, and after the router is restored the next step trains as if the skipped one never happened."""
    router = trainer.model.moe_layers[0].router.weight_ED
    saved = router.detach().clone()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.cfg.train.on_nonfinite = "skip"
    if rank == 0:
        with torch.no_grad():
            router.fill_(float("nan"))
    skipped = trainer.train_step(step)
    with torch.no_grad():
        router.copy_(saved)
    unchanged = all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    after = trainer.train_step(step + 1)
    trainer.cfg.train.on_nonfinite = "raise"
    return {"skipped": skipped.skipped, "unchanged": unchanged, "loss": after.loss, "norm": after.grad_norm,
            "moved": not torch.equal(before["blocks.0.mlp.router.weight_ED"], router),
            "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()}}


def _both_engines(rank, world, raw):
    """Native trainer, then DeepSpeed, on the same ranks: per-step results and final local parameters; then one
    skipped step and one more (see `_skip_once`)."""
    from moe_dist.parallel.layout import check_layout
    from moe_dist.parallel.topology import Topology
    from moe_dist.train.deepspeed_engine import DeepSpeedEngine
    from moe_dist.train.native_engine import NativeEngine
    from moe_dist.train.trainer import Trainer
    cfg = config.from_dict(raw)
    config.validate(cfg)
    topo = Topology.build(check_layout(cfg, world),
                          timeout_s=60)
    out = {}
    for name, factory in (("native", NativeEngine), ("deepspeed", None)):
        trainer = Trainer(cfg, topo=topo, engine=factory)      # None: the engine train.engine names
        assert isinstance(trainer.engine, DeepSpeedEngine if factory is None else NativeEngine)
        init = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        steps = [trainer.train_step(s) for s in range(STEPS)]
        out[name] = {"loss": [s.loss for s in steps], "lm": [s.lm_loss for s in steps],
                     "aux": [s.aux_loss for s in steps], "z": [s.z_loss for s in steps],
                     "norm": [s.grad_norm for s in steps],
                     "counts": [torch.stack(s.tokens_per_expert) for s in steps],
                     "init": init, "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                     "buffers": {n: b.clone() for n, b in trainer.model.named_buffers() if "expert_bias" in n},
                     "val": trainer.evaluate(2)}
        out[name]["skip"] = _skip_once(trainer, rank, STEPS)
    out["bucket"] = trainer.engine.ds.zero_reduce_bucket_size()     # the user's file reached DeepSpeed
    # A router that produces NaN on one rank: every rank raises together, naming that router (no hang).
    if rank == 0:
        with torch.no_grad():
            trainer.model.moe_layers[0].router.weight_ED.fill_(float("nan"))
    try:
        trainer.train_step(STEPS + 2)
    except FloatingPointError as e:
        out["nonfinite"] = str(e)
    return out


def _check_parity(results, move_tol: float = RTOL):
    for r in results:
        assert "the router of layer 0 (blocks.0.mlp.router) produced non-finite logits first" in r["nonfinite"]
    for rank, r in enumerate(results):
        nat, ds = r["native"], r["deepspeed"]
        for key in ("loss", "lm", "aux", "z", "norm"):
            torch.testing.assert_close(torch.tensor(ds[key], dtype=torch.float64),
                                       torch.tensor(nat[key], dtype=torch.float64), rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"rank {rank} {key}: {m}")
        # Clipping was active: a norm above grad_clip on every step (else the test would not check the rule).
        assert min(nat["norm"]) > 0.05
        for a, b in zip(ds["counts"], nat["counts"]):
            assert torch.equal(a, b)
        assert ds["params"].keys() == nat["params"].keys()
        worst = max(float((ds["params"][n] - nat["params"][n]).abs().max()
                          / (nat["params"][n] - nat["init"][n]).abs().max().clamp_min(1e-12)) for n in nat["params"])
        print(f"rank {rank}: largest parameter difference / largest move of its tensor = {worst:.2e}")
        for name in nat["params"]:
            torch.testing.assert_close(ds["init"][name], nat["init"][name], rtol=0, atol=0)
            # AdamW divides by sqrt(v) + eps: at elements whose gradient is near eps it turns fp32 rounding (another
            # summation order of the reductions) into visible differences; the absolute floor is a fraction of the
            # largest move of the tensor, so it still catches any update that went wrong.
            moved = float((nat["params"][name] - nat["init"][name]).abs().max())
            torch.testing.assert_close(ds["params"][name], nat["params"][name], rtol=RTOL,
                                       atol=max(ATOL, move_tol * moved),
                                       msg=lambda m: f"rank {rank} {name}: {m}")
        for name in nat["buffers"]:
            torch.testing.assert_close(ds["buffers"][name], nat["buffers"][name], rtol=RTOL, atol=ATOL)
        assert ds["val"] == pytest.approx(nat["val"], rel=RTOL)
        # The parameters moved: the comparison is of trained weights, not of the initial ones twice.
        assert nat["loss"][0] != nat["loss"][-1]
        # A skipped step changes nothing in either engine, and the step after it agrees.
        for eng in (nat, ds):
            assert eng["skip"]["skipped"] and eng["skip"]["unchanged"] and eng["skip"]["moved"], rank
        torch.testing.assert_close(torch.tensor([ds["skip"]["loss"], ds["skip"]["norm"]], dtype=torch.float64),
                                   torch.tensor([nat["skip"]["loss"], nat["skip"]["norm"]], dtype=torch.float64),
                                   rtol=RTOL, atol=ATOL, msg=lambda m: f"rank {rank} step after the skip: {m}")
        for name, p in nat["skip"]["params"].items():
            moved = float((p - nat["init"][name]).abs().max())
            torch.testing.assert_close(ds["skip"]["params"][name], p, rtol=RTOL, atol=max(ATOL, move_tol * moved),
                                       msg=lambda m: f"rank {rank} {name} after the skip: {m}")


# ZeRO-1 and ZeRO-2 run by default; accumulation and stage 0 (our own clipping) with --run-slow (each spawn
# imports DeepSpeed and trains both engines: tens of seconds on a shared 2-core machine).
@pytest.mark.parametrize("ep,stage,accum", [(2, 1, 1), (2, 2, 1), pytest.param(2, 2, 2, marks=pytest.mark.slow),
                                            pytest.param(2, 0, 1, marks=pytest.mark.slow),
                                            pytest.param(1, 2, 1, marks=pytest.mark.slow)],
                         ids=["ep2-zero1", "ep2-zero2", "ep2-zero2-accum2", "ep2-zero0", "dp2-zero2"])
def test_deepspeed_matches_native_on_2_ranks(tmp_path, tokens, ep, stage, accum):
    raw = tiny(tmp_path, tokens, ep=ep, stage=stage, accum=accum)
    if ep == 2 and stage == 2 and accum == 1:
        # A user file with small buckets: ZeRO-2 then reduces dense and expert gradients in many pieces.
        (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 3000,
                                                                             "allgather_bucket_size": 3000}}))
        raw["train"]["deepspeed_config"] = str(tmp_path / "ds.json")
    results = run_ranks(_both_engines, 2, raw, timeout=300)
    if ep == 2 and stage == 2 and accum == 1:
        assert all(r["bucket"] == 3000 for r in results)
    # With accumulation ZeRO-2 reduces every micro-batch and sums the reduced gradients, the native trainer
    # sums first and reduces once: the same gradient up to rounding (losses and norms still agree to 1e-5).
    _check_parity(results, move_tol=RTOL if accum == 1 else 1e-4)


@pytest.mark.slow
def test_zero2_matches_native_ep2_dp2_on_4_ranks_with_expert_bias(tmp_path, tokens):
    """EP=2 × EDP=2: expert gradients are reduced over {0,2} and {1,3}, dense ones over all four; the
    DeepSeek-style router (sigmoid, expert bias updated from the global counts) must follow too."""
    raw = tiny(tmp_path, tokens, ep=2, stage=2, score_func="sigmoid", expert_bias=True, aux_loss_type="seq",
               bias_update_rate=0.01)
    # Four ranks: reduce-scatter and all-reduce add the four partial gradients in different orders (with two
    # the sum is exact either way), so the parameters agree to rounding, as with accumulation.
    _check_parity(run_ranks(_both_engines, 4, raw, timeout=400), move_tol=1e-4)


def _mismatched_groups(rank, world):
    """DeepSpeed's data-before-expert order puts ranks {0,1} in one expert-data group, ours {0,2}."""
    import deepspeed
    from deepspeed.utils import groups

    from moe_dist.parallel.topology import ParallelDims, Topology
    from moe_dist.train.deepspeed_engine import check_expert_groups
    deepspeed.init_distributed(dist_backend="gloo")
    topo = Topology.build(ParallelDims(world=world, ep=2), timeout_s=60)
    groups._create_expert_and_data_parallel(2, use_data_before_expert_parallel_=True)
    try:
        check_expert_groups(topo)
    except RuntimeError as e:
        return str(e)
    return None


@pytest.mark.slow
def test_groups_that_differ_from_ours_are_refused_at_start_up():
    messages = run_ranks(_mismatched_groups, 4, timeout=200)
    assert messages[0] is not None and messages[0].startswith("rank 0: DeepSpeed's ep group [0, 2] differs from ours "
                                                              "[0, 1] (world=4")
    assert "use one layout per process" in messages[0]
    assert all(m is not None for m in messages)


# ---------------------------------------------------------------------------------------------------
# Checkpoints: 2 steps, save, a fresh spawn resumes and trains 2 more == 4 steps straight.

def _fit(rank, world, raw):
    from moe_dist.parallel.layout import check_layout
    from moe_dist.parallel.topology import Topology
    from moe_dist.train.trainer import Trainer
    cfg = config.from_dict(raw)
    config.validate(cfg)
    topo = Topology.build(check_layout(cfg, world),
                          timeout_s=60)
    trainer = Trainer(cfg, topo=topo)
    history = trainer.fit(progress=False)
    return {"steps": [s.step for s in history.steps], "loss": [s.loss for s in history.steps],
            "resumed_from": trainer.resumed_from, "last": trainer.last_checkpoint,
            "params": {n: p.detach().clone() for n, p in trainer.model.state_dict().items()}}


@pytest.mark.slow      # four spawns, each importing DeepSpeed
@pytest.mark.parametrize("stage", [2, 0])
def test_resume_continues_exactly(tmp_path, tokens, stage):
    def raw(steps, resume, out):
        r = tiny(tmp_path, tokens, ep=2, stage=stage, score_func="sigmoid", expert_bias=True)   # bias buffers too
        r["train"].update(steps=steps, out_dir=str(tmp_path / out))
        r["checkpoint"] = {"dir": str(tmp_path / ("ck" if out == "run" else out)), "resume": resume, "keep": 1}
        return r
    straight = run_ranks(_fit, 2, raw(4, "never", "straight"), timeout=300)
    first = run_ranks(_fit, 2, raw(2, "never", "run"), timeout=300)
    assert first[0]["last"] == tmp_path / "ck" / "deepspeed" / "step_000002"
    # The lr schedule spans train.steps: a 2-step run then a 4-step resume would decay differently from
    # 4 straight steps, so the resumed run is the one that matches, from step 2 on.
    second = run_ranks(_fit, 2, raw(4, "must", "run"), timeout=300)
    assert second[0]["resumed_from"] == tmp_path / "ck" / "deepspeed" / "step_000002"
    assert second[0]["steps"] == [2, 3]
    assert sorted(p.name for p in (tmp_path / "ck" / "deepspeed").iterdir()) == ["latest", "step_000004"]  # keep=1
    for rank in range(2):
        torch.testing.assert_close(torch.tensor(second[rank]["loss"]), torch.tensor(straight[rank]["loss"][2:]),
                                   rtol=0, atol=0)
        for name, p in straight[rank]["params"].items():
            torch.testing.assert_close(second[rank]["params"][name], p, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    # Another layout is refused, naming what to keep equal.
    with pytest.raises(AssertionError, match="resume with the same world size, parallel.ep and train.zero_stage"):
        run_ranks(_fit, 2, {**raw(4, "must", "run"), "parallel": {"ep": 1}}, timeout=300)


# ---------------------------------------------------------------------------------------------------
# Checkpoints go through the native checkpoints' store: a manifest of the rank files, and a truncated rank
# file named by rank 0's verification on every rank (then checkpoint.fallback loads the previous step).

def _save_then_damage(rank, world, raw):
    """Save steps 1-3, truncate a rank file of step 3, then flip one byte of a rank file of step 2 (same size:
    only the sha256 tells) and point `latest` at step 2; resume without and with checkpoint.fallback after
    each."""
    from moe_dist.parallel.comm import barrier
    from moe_dist.parallel.layout import check_layout
    from moe_dist.parallel.topology import Topology
    from moe_dist.train.checkpoint import CheckpointError
    from moe_dist.train.trainer import Trainer
    cfg = config.from_dict(raw)
    config.validate(cfg)
    topo = Topology.build(check_layout(cfg, world), timeout_s=60)
    trainer = Trainer(cfg, topo=topo)
    trainer.fit(progress=False)                     # saves step_000001..3 (every=1, keep=3)
    folder = trainer.last_checkpoint
    meta = json.loads((folder / "meta.json").read_text())

    def damage(path, how):
        barrier(topo.world)
        if rank == 0:
            data = path.read_bytes()
            if how == "truncate":
                path.write_bytes(data[:1000])
            else:                                   # the same size, one byte different; `latest` names it
                mid = len(data) // 2
                path.write_bytes(data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:])
                (path.parent.parent / "latest").write_text(path.parent.name + "\n")
        barrier(topo.world)

    def resume(fallback):
        trainer.cfg.checkpoint.fallback = fallback
        try:
            return trainer.resume(), str(trainer.resumed_from), None
        except CheckpointError as e:
            return None, None, str(e)

    out = {"meta": meta, "folder": folder}
    trainer.cfg.checkpoint.resume = "must"          # the run above started fresh; now resume from its folder
    out["truncated"] = str(folder / "rank00001.pt")  # rank 1's file, found by rank 0's check
    damage(folder / "rank00001.pt", "truncate")
    out["after_truncate"] = {"strict": resume(False), "fallback": resume(True)}
    out["flipped"] = str(folder.parent / "step_000002" / "rank00000.pt")
    damage(folder.parent / "step_000002" / "rank00000.pt", "flip")
    out["after_flip"] = {"strict": resume(False), "fallback": resume(True)}
    return out


def test_save_writes_a_manifest_and_a_damaged_rank_file_is_named(tmp_path, tokens):
    from moe_dist.train.checkpoint.store import FORMAT
    raw = tiny(tmp_path, tokens, ep=2, stage=2)
    raw["checkpoint"] = {"dir": str(tmp_path / "ck"), "every": 1, "keep": 3, "resume": "never"}
    results = run_ranks(_save_then_damage, 2, raw, timeout=300)
    r = results[0]
    ck = tmp_path / "ck" / "deepspeed"
    assert r["folder"] == ck / "step_000003"
    meta = r["meta"]
    assert meta["engine"] == "deepspeed" and meta["step"] == 3 and meta["format"] == FORMAT
    assert meta["layout"] == {"world": 2, "tp": 1, "ep": 2, "etp": 1, "dp": 2, "edp": 1, "zero_stage": 2}
    assert set(meta["files"]) == {"rank00000.pt", "rank00001.pt"}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 1000 for f in meta["files"].values())
    for rank, res in enumerate(results):            # every rank raises rank 0's verdict, naming the file
        step, resumed, error = res["after_truncate"]["strict"]
        assert step is None and error.startswith(f"checkpoint {ck / 'step_000003'} is corrupt: file "
                                                 f"{r['truncated']} has 1000 bytes"), (rank, error)
        assert "set checkpoint.fallback=true" in error
        assert res["after_truncate"]["fallback"] == (2, str(ck / "step_000002"), None)
        # A flipped byte keeps the size: the sha256 names the file; the fallback goes one step further back.
        step, resumed, error = res["after_flip"]["strict"]
        assert step is None and error.startswith(f"checkpoint {ck / 'step_000002'} is corrupt: file {r['flipped']} "
                                                 "does not match its sha256"), (rank, error)
        assert res["after_flip"]["fallback"] == (1, str(ck / "step_000001"), None)
