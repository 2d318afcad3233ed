"""`train.engine: deepspeed` against the native trainer, on gloo CPU ranks (DS_ACCELERATOR=cpu, fp32).

Parity: the same config, seeded weights and batches trained a few steps by the native `Trainer` and by
`DeepSpeedTrainer` in the same fresh processes (DeepSpeed's expert groups are process-global, so every case
gets its own spawn) give the same losses, gradient norms, expert counts and parameters, with ZeRO-1 and ZeRO-2
by default; with --run-slow also stage 0 (our own clipping), accumulation, pure data parallelism, EP=2×DP=2 on
4 ranks, DeepSpeed groups in another rank order, and checkpoint resume. Clipping is active (a small
train.grad_clip), so DeepSpeed's global norm is checked against ours. Then the generated DeepSpeed JSON and the
user's file over it, and `launch/deepspeed.sh` under DeepSpeed's launcher on 2 CPU processes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from moe_dist import config
from moe_dist.config import ConfigError

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
RTOL, ATOL = 1e-5, 1e-7


def tiny(tmp: Path, data: Path, ep: int, stage: int, accum: int = 1, **moe) -> dict:
    return {
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 16, "dense_hidden": 64, "first_dense": 0},
        "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32, "renormalize": True, "aux_loss_coef": 0.01,
                "z_loss_coef": 0.001, "num_shared_experts": 1, "balance_over": "global_batch", **moe},
        "parallel": {"ep": ep},
        "train": {"batch_size": 2, "seq_len": 16, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1,
                  "grad_clip": 0.05, "steps": STEPS, "grad_accum_steps": accum, "engine": "deepspeed",
                  "zero_stage": stage,
                  "out_dir": str(tmp / "run")},
        "data": {"path": str(data)},
    }


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    from moe_dist.train.data import prepare
    path = tmp_path_factory.mktemp("ds_data") / "tok.bin"
    prepare(None, path, max_bytes=100_000)
    return path


def _both_engines(rank, world, raw):
    """Native trainer, then DeepSpeed, on the same ranks: per-step results and final local parameters."""
    from moe_dist.parallel.topology import ParallelDims, Topology
    from moe_dist.train.deepspeed_engine import DeepSpeedTrainer
    from moe_dist.train.trainer import Trainer
    cfg = config.from_dict(raw)
    config.validate(cfg)
    topo = Topology.build(ParallelDims.create(world, ep=cfg.parallel.ep, num_experts=cfg.moe.num_experts),
                          timeout_s=60)
    out = {}
    for name, cls in (("native", Trainer), ("deepspeed", DeepSpeedTrainer)):
        trainer = cls(cfg, topo=topo)
        init = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        steps = [trainer.train_step(s) for s in range(STEPS)]
        out[name] = {"loss": [s.loss for s in steps], "lm": [s.lm_loss for s in steps],
                     "aux": [s.aux_loss for s in steps], "z": [s.z_loss for s in steps],
                     "norm": [s.grad_norm for s in steps],
                     "counts": [torch.stack(s.tokens_per_expert) for s in steps],
                     "init": init, "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                     "buffers": {n: b.clone() for n, b in trainer.model.named_buffers() if "expert_bias" in n},
                     "val": trainer.evaluate(2)}
    out["bucket"] = trainer.engine.zero_reduce_bucket_size()     # the user's file reached DeepSpeed
    # A router that produces NaN on one rank: every rank raises together, naming that router (no hang).
    if rank == 0:
        with torch.no_grad():
            trainer.model.moe_layers[0].router.weight_ED.fill_(float("nan"))
    try:
        trainer.train_step(STEPS)
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


# ---------------------------------------------------------------------------------------------------
# The generated DeepSpeed JSON, the user's file over it, and what is refused (no process started).

def _cfg(tmp_path, **train) -> config.Config:
    raw = tiny(tmp_path, tmp_path / "none.bin", ep=2, stage=2)
    raw["train"].update(train)
    cfg = config.from_dict(raw)
    config.validate(cfg)
    return cfg


def test_generated_config_follows_ours(tmp_path):
    from moe_dist.train.deepspeed_engine import deepspeed_config
    ds = deepspeed_config(_cfg(tmp_path, grad_accum_steps=3, zero_stage=1), dp=4)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 2 * 3 * 4
    assert ds["zero_optimization"]["stage"] == 1 and ds["gradient_clipping"] == 0.05
    assert ds["zero_allow_untested_optimizer"] is True and ds["bf16"]["enabled"] is False
    # Stage 0: DeepSpeed's clip would use a per-rank norm, so the engine clips itself and DeepSpeed must not.
    assert deepspeed_config(_cfg(tmp_path, zero_stage=0), dp=2)["gradient_clipping"] == 0.0


def test_user_file_overrides_key_by_key(tmp_path):
    from moe_dist.train.deepspeed_engine import deepspeed_config
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 0.5,
                                "train_micro_batch_size_per_gpu": 2}))        # repeating our value is fine
    ds = deepspeed_config(_cfg(tmp_path, deepspeed_config=str(user)), dp=2)
    assert ds["zero_optimization"] == {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True,
                                       "overlap_comm": False, "reduce_bucket_size": 1000}
    assert ds["gradient_clipping"] == 0.5


@pytest.mark.parametrize("user,message", [
    ({"train_micro_batch_size_per_gpu": 4}, "sets train_micro_batch_size_per_gpu=4 but our config gives 2; "
                                            "remove the key and set train.batch_size instead"),
    ({"gradient_accumulation_steps": 2}, "set train.grad_accum_steps instead"),
    ({"train_batch_size": 64}, "set train.batch_size × train.grad_accum_steps × data-parallel ranks instead"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3; use 0, 1 or 2"),
    ({"fp16": {"enabled": True}}, "enables fp16"),
    ({"use_data_before_expert_parallelism": True}, "our rank order is ep fastest, then data"),
    ([1, 2], "must hold a JSON object"),
])
def test_user_file_conflicts_are_refused_naming_the_field(tmp_path, user, message):
    from moe_dist.train.deepspeed_engine import deepspeed_config
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    with pytest.raises(ConfigError, match="train.deepspeed_config") as e:
        deepspeed_config(_cfg(tmp_path, deepspeed_config=str(path)), dp=2)
    assert message in str(e.value)


def test_missing_or_broken_user_file_is_refused(tmp_path):
    from moe_dist.train.deepspeed_engine import deepspeed_config
    with pytest.raises(ConfigError, match=r"train.deepspeed_config='.*nope.json' does not exist"):
        deepspeed_config(_cfg(tmp_path, deepspeed_config=str(tmp_path / "nope.json")), dp=2)
    (tmp_path / "bad.json").write_text("{stage: 2")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        deepspeed_config(_cfg(tmp_path, deepspeed_config=str(tmp_path / "bad.json")), dp=2)


@pytest.mark.parametrize("section,override,message", [
    ("train", {"on_nonfinite": "skip"}, "train.on_nonfinite=skip is not supported with train.engine=deepspeed"),
])
def test_unsupported_settings_are_refused_before_deepspeed_starts(tmp_path, section, override, message):
    from moe_dist.train.deepspeed_engine import DeepSpeedTrainer
    cfg = _cfg(tmp_path)
    for k, v in override.items():
        setattr(getattr(cfg, section), k, v)
    with pytest.raises(ConfigError, match=message):
        DeepSpeedTrainer(cfg)


def _mismatched_groups(rank, world):
    """DeepSpeed's data-before-expert order puts ranks {0,1} in one expert-data group, ours {0,2}."""
    import deepspeed
    from deepspeed.utils import groups

    from moe_dist.parallel.topology import ParallelDims, Topology
    from moe_dist.train.deepspeed_engine import check_expert_groups
    deepspeed.init_distributed(dist_backend="gloo")
    topo = Topology.build(ParallelDims.create(world, ep=2), timeout_s=60)
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
    from moe_dist.parallel.topology import ParallelDims, Topology
    from moe_dist.train.deepspeed_engine import DeepSpeedTrainer
    cfg = config.from_dict(raw)
    config.validate(cfg)
    topo = Topology.build(ParallelDims.create(world, ep=cfg.parallel.ep, num_experts=cfg.moe.num_experts),
                          timeout_s=60)
    trainer = DeepSpeedTrainer(cfg, topo=topo)
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
# launch/deepspeed.sh: DeepSpeed's launcher starts 2 CPU processes running `moe-dist train`.

def test_launcher_script_trains_tiny_cpu_on_2_processes(tmp_path, tokens):
    from distributed import free_port
    env = {**os.environ, "NUM_GPUS": "2", "EP": "2", "MASTER_PORT": str(free_port()),
           "CONFIG": str(REPO / "configs" / "tiny-cpu.yaml"), "DS_ACCELERATOR": "cpu",
           "VIRTUAL_ENV": str(Path(sys.executable).parent.parent),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    overrides = ["--train.steps=3", "--train.batch_size=2", "--train.seq_len=32", "--model.max_seq_len=32",
                 "--model.n_layers=2", "--model.dim=64", "--model.dense_hidden=128", "--moe.expert_hidden=64",
                 "--train.zero_stage=2", "--train.eval_batches=1", f"--data.path={tokens}",
                 f"--train.out_dir={tmp_path / 'run'}"]
    r = subprocess.run([str(REPO / "launch" / "deepspeed.sh"), *overrides], capture_output=True, text=True,
                       timeout=400, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "world=2 dense: dp=2×tp=1  expert: edp=1×ep=2×etp=1" in r.stdout
    assert r.stdout.count("moe-dist train:") == 1             # rank 0 alone reports
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "lm_loss" in row]
    assert [row["step"] for row in steps] == [0, 1, 2]
    assert all(row["a2a_rows_out"] == row["a2a_rows_leaving"] > 0 for row in steps)


def test_hostfile_example_parses_as_deepspeed_reads_it():
    from deepspeed.launcher.runner import fetch_hostfile
    assert dict(fetch_hostfile(str(REPO / "launch" / "hostfile.example"))) == {"node01": 8, "node02": 8}


@pytest.mark.parametrize("env,message", [
    ({"NNODES": "2"}, "NNODES=2 needs HOSTFILE"),
    ({"HOSTFILE": "/nonexistent/hosts"}, "HOSTFILE=/nonexistent/hosts does not exist"),
    ({"HOSTFILE": str(REPO / "launch" / "hostfile.example"), "NNODES": "2", "NODE_RANK": "1"},
     "NODE_RANK (no ssh) needs MASTER_ADDR"),
])
def test_launcher_script_refuses_incomplete_multi_node_settings(env, message):
    base = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "NNODES", "HOSTFILE", "NODE_RANK")}
    r = subprocess.run([str(REPO / "launch" / "deepspeed.sh")], capture_output=True, text=True, timeout=60,
                       env={**base, "DEEPSPEED": "/bin/false", **env})
    assert r.returncode == 2 and message in r.stderr
