"""Faults during `moe-dist train` on 2 CPU ranks, each with a bounded wait (a hang fails the test, not the suite).

- A rank killed (SIGKILL) or frozen (SIGSTOP) mid-training: the other rank exits with an error within the
  collective timeout (parallel.timeout_s), without any launcher agent to clean up after it.
- A world size that does not match the config's layout is refused, under each launcher, before training starts.
- torchrun --max-restarts=1 after a rank is killed: the job resumes from the last checkpoint and each step
  appears exactly once in the final history.
- A NaN/Inf loss stops the run naming the step and the layer whose router produced it, or is skipped when
  train.on_nonfinite=skip.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from test_launch import (CONFIG, LAUNCH, SMALL, args_for, free_port, run_all, script_env,  # noqa: F401
                         tokens, train_records)

TIMEOUT_S = 8          # parallel.timeout_s of the fault runs: rendezvous and every collective


class Rank:
    """One `moe-dist train` process with torchrun's variables, its stdout read line by line as it comes."""

    def __init__(self, rank: int, world: int, port: int, args: list[str], cwd: Path):
        env = script_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        self.proc = subprocess.Popen([sys.executable, "-m", "moe_dist.cli", "train", *args], env=env, cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.err.append), daemon=True).start()

    @staticmethod
    def _pump(stream, sink):
        for line in stream:
            sink(line)

    def wait_for_line(self, prefix: str, deadline_s: float) -> str:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith(prefix):
                return line
        pytest.fail(f"no line starting {prefix!r} within {deadline_s}s (rc={self.proc.poll()}):\n"
                    + "".join(self.err)[-3000:])

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_dead_or_frozen_rank_makes_the_other_exit_within_the_timeout(fault, tokens, tmp_path):
    # Many steps so that rank 0 is certainly mid-training when its peer goes; progress printed every step.
    args = args_for(tokens, tmp_path / "run", "--parallel.ep=2", "--train.steps=100000", "--train.log_every=1",
                    f"--parallel.timeout_s={TIMEOUT_S}")
    port = free_port()
    ranks = [Rank(r, 2, port, args, tmp_path) for r in range(2)]
    try:
        ranks[0].wait_for_line("step     2/", deadline_s=120)
        t0 = time.monotonic()
        # SIGKILL: the peer's sockets close. SIGSTOP: they stay open and silent, so only the timeout can help.
        os.kill(ranks[1].proc.pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        try:
            rc = ranks[0].proc.wait(timeout=TIMEOUT_S + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still running {TIMEOUT_S + 60}s after its peer was {fault}ed: a hang")
        waited = time.monotonic() - t0
    finally:
        for r in ranks:
            r.kill()
    err = "".join(ranks[0].err)
    assert rc != 0, "rank 0 finished although its peer was gone"
    # The error comes from a collective (gloo), not from anything else going wrong.
    assert any(w in err for w in ("gloo", "Gloo", "Connection", "Timed out", "timed out", "DistBackendError")), \
        err[-3000:]
    # Startup slack on a loaded machine: the collective itself is bounded by TIMEOUT_S.
    assert waited < TIMEOUT_S + 30, f"rank 0 needed {waited:.0f}s to give up (timeout {TIMEOUT_S}s)"


def _fake_srun(tmp_path: Path) -> dict[str, str]:
    from test_launch import fake_srun
    fake_srun(tmp_path)
    env = script_env(SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost")
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
    return env


@pytest.mark.parametrize("launcher", ["torchrun.sh", "mpirun.sh", "slurm.sbatch"])
def test_a_world_that_does_not_match_the_config_is_refused_before_training(launcher, tokens, tmp_path):
    if launcher == "mpirun.sh":
        from test_launch import _mpirun_or_skip
        _mpirun_or_skip()
    env = _fake_srun(tmp_path) if launcher == "slurm.sbatch" else script_env(NPROC_PER_NODE="2")
    cmd = [str(LAUNCH / launcher), *args_for(tokens, tmp_path / "run", "--parallel.world_size=4", "--parallel.ep=2")]
    [(rc, out, err)] = run_all([(cmd, env)], cwd=tmp_path, wait_s=120)
    assert rc != 0
    assert "parallel.world_size=4 but 2 ranks were launched; launch 4 ranks or set parallel.world_size=2" in err
    assert "moe-dist train:" not in out             # no model was built ...
    assert not (tmp_path / "run").exists()          # ... and no step ran
