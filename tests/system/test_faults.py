"""Faults during `moe-dist train` on 2 CPU ranks, each with a bounded wait (a hang fails the test, not the suite).

- A rank killed (SIGKILL) or frozen (SIGSTOP) mid-training: the other rank exits with an error within the
  collective timeout (parallel.timeout_s), without any launcher agent to clean up after it; with EP=2, and with
  2 pipeline stages (no hang on a pending receive; the watchdog names the frozen stage first).
- A world size that does not match the config's layout is refused, under each launcher, before training starts.
- torchrun --max-restarts=1 after a rank is killed: the job resumes from the last checkpoint and each step
  appears exactly once in the final history (EP=2, and 2 pipeline stages as a slow case).
- A NaN/Inf loss stops the run naming the step and the layer whose router produced it, or is skipped when
  train.on_nonfinite=skip.
"""
from __future__ import annotations

import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distributed import free_port
from launch_helpers import (CONFIG, LAUNCH, SMALL, args_for, children, run_all, script_env, tokens,  # noqa: F401
                            train_records)

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


# The layouts a rank dies in: experts on 2 ranks (collectives), and 2 pipeline stages (the survivor mostly waits
# in a point-to-point receive from the other stage, or in a collective over the world at the end of a step).
# The pipeline case also lowers parallel.stall_warn_s so that the watchdog reports the stalled wait first.
STALL_WARN_S = 2
FAULT_LAYOUTS = {"ep2": ["--parallel.ep=2"],
                 "pp2": ["--parallel.pp=2", "--train.grad_accum_steps=2", f"--parallel.stall_warn_s={STALL_WARN_S}"]}


@pytest.mark.parametrize("layout", list(FAULT_LAYOUTS))
def test_a_dead_or_frozen_rank_makes_the_other_exit_within_the_timeout(layout, tokens, tmp_path):
    """Two 2-rank jobs at once: in one rank 1 is killed (its sockets close), in the other it is stopped
    (SIGSTOP: its sockets stay open and silent, so only the collective timeout can free rank 0). With pp=2
    rank 1 is the last stage: rank 0 must not hang on a receive from it."""
    jobs = {}
    for fault in ("kill", "stop"):
        # Many steps so that rank 0 is certainly mid-training when its peer goes; progress printed every step.
        args = args_for(tokens, tmp_path / fault, *FAULT_LAYOUTS[layout], "--train.steps=100000",
                        "--train.log_every=1", f"--parallel.timeout_s={TIMEOUT_S}", "--train.tensorboard=false")
        port = free_port()
        jobs[fault] = [Rank(r, 2, port, args, tmp_path) for r in range(2)]
    try:
        t0 = {}
        for fault, ranks in jobs.items():
            ranks[0].wait_for_line("step     2/", deadline_s=120)
            os.kill(ranks[1].proc.pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
            t0[fault] = time.monotonic()
        waited = {}
        for fault, ranks in jobs.items():
            try:
                ranks[0].proc.wait(timeout=max(1.0, t0[fault] + TIMEOUT_S + 60 - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank 0 still running {TIMEOUT_S + 60}s after its peer got SIG{fault.upper()}: a hang")
            waited[fault] = time.monotonic() - t0[fault]
    finally:
        for ranks in jobs.values():
            for r in ranks:
                r.kill()
    print(", ".join(f"SIG{f.upper()}: rank 0 out after {w:.1f}s" for f, w in waited.items()))   # pytest -s
    for fault, ranks in jobs.items():
        err = "".join(ranks[0].err)
        assert ranks[0].proc.returncode != 0, f"{fault}: rank 0 finished although its peer was gone"
        # The error comes from a collective (gloo), not from anything else going wrong.
        assert any(w in err for w in ("gloo", "Gloo", "Connection", "Timed out", "timed out", "DistBackendError")), \
            err[-3000:]
        # The collective itself is bounded by TIMEOUT_S; the rest is slack for a loaded machine.
        assert waited[fault] < TIMEOUT_S + 30, f"{fault}: rank 0 needed {waited[fault]:.0f}s (timeout {TIMEOUT_S}s)"
    if layout == "pp2":
        # The frozen stage: before the timeout, rank 0's watchdog names the wait, and a point-to-point one with
        # its pipeline place; by its second report (every STALL_WARN_S) rank 1 has stopped reporting.
        reports = [ln for ln in "".join(jobs["stop"][0].err).splitlines() if ln.startswith("moe-dist: watchdog:")]
        assert reports, "".join(jobs["stop"][0].err)[-3000:]
        print(reports[-1])                                                                         # pytest -s
        assert any("rank 1 (no report for" in ln and "frozen or dead" in ln for ln in reports), reports
        for ln in reports:
            if " send_recv #" in ln:
                assert re.search(r"send_recv #\d+ with ranks \[0, 1\] \(step \d+, pipeline (send|recv) ", ln), ln


def test_a_world_that_does_not_match_the_config_is_refused_before_training(tokens, tmp_path):
    """torchrun.sh, mpirun.sh and slurm.sbatch (under a stand-in srun), all started at once, 2 ranks each."""
    from launch_helpers import fake_srun, mpirun_or_skip
    launchers = ["torchrun.sh", "slurm.sbatch"]
    try:
        mpirun_or_skip()
        launchers.append("mpirun.sh")
    except pytest.skip.Exception:
        pass                                        # no MPI here: the other two still run
    fake_srun(tmp_path)
    slurm = script_env(SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost")
    slurm["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{slurm['PATH']}"
    runs = run_all([([str(LAUNCH / name), *args_for(tokens, tmp_path / name, "--parallel.world_size=4",
                                                      "--parallel.ep=2")],
                     slurm if name == "slurm.sbatch" else script_env(NPROC_PER_NODE="2")) for name in launchers],
                   cwd=tmp_path, wait_s=150)
    for name, (rc, out, err) in zip(launchers, runs):
        assert rc != 0, name
        assert err.count("moe-dist: layout error: parallel.world_size=4 but 2 ranks were launched; launch 4 ranks "
                         "or set parallel.world_size=2") == 1, f"{name}:\n{err[-3000:]}"   # once: before any rank
        assert "moe-dist train:" not in out, name   # no model was built ...
        assert not (tmp_path / name).exists(), name  # ... and no step ran


# ---------------------------------------------------------------------------------------------------
# Elastic restart: torchrun.sh with MAX_RESTARTS=1, a worker killed after a checkpoint.


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [e[5:] for e in env if e.startswith(b"RANK=")]
    return int(found[0]) if found else None


def _last_logged_step(metrics: Path) -> int:
    if not metrics.exists():
        return -1
    steps = [json.loads(line).get("step", -1) for line in metrics.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=-1)


def _records_so_far(metrics: Path) -> list[dict]:
    """The complete training records in a file that may be being written (a last line may be cut short)."""
    recs = []
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind", "train") == "train":
            recs.append(rec)
    return recs


RESTART_STEPS, CKPT_EVERY, KILL_AFTER = 40, 10, 14


@pytest.mark.parametrize("layout", ["ep2", pytest.param("pp2", marks=pytest.mark.slow)])
def test_torchrun_max_restarts_resumes_from_the_last_checkpoint_with_no_step_lost_or_repeated(layout, tokens,
                                                                                              tmp_path):
    """EP=2, or 2 pipeline stages (each rank saves its stage's half of the checkpoint; the restart loads it)."""
    args = args_for(tokens, tmp_path / "run", f"--train.steps={RESTART_STEPS}", f"--checkpoint.every={CKPT_EVERY}",
                    "--checkpoint.keep=2", "--train.log_every=1", f"--parallel.timeout_s={TIMEOUT_S}",
                    "--train.tensorboard=false", *(["--train.grad_accum_steps=2"] if layout == "pp2" else []))
    env = script_env(NPROC_PER_NODE="2", MAX_RESTARTS="1", **({"EP": "2"} if layout == "ep2" else {"PP": "2"}))
    # torchrun.sh execs torchrun, so this pid is the elastic agent and the ranks are its children.
    agent = subprocess.Popen([str(LAUNCH / "torchrun.sh"), *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    killed, before = None, []
    try:
        end = time.monotonic() + 180
        # Kill rank 1 once a checkpoint exists and some steps after it ran (they must be redone, not kept twice).
        while killed is None and time.monotonic() < end and agent.poll() is None:
            if _last_logged_step(metrics) >= KILL_AFTER:
                killed = next((pid for pid in children(agent.pid) if _rank_of(pid) == 1), None)
                if killed:
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.02)
        if killed:
            time.sleep(0.5)          # rank 0 notices and dies; the restart (seconds later) rewrites the file
            before = _records_so_far(metrics)
        out, err = agent.communicate(timeout=max(1.0, end - time.monotonic()))
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
    assert killed is not None, f"the run ended (rc={agent.returncode}) before rank 1 could be killed:\n{err[-3000:]}"
    assert agent.returncode == 0, f"rc={agent.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    assert out.count("moe-dist train:") == 2, "expected one start and one restart"
    # Rank 0 may have saved one more checkpoint between the kill and noticing it, so any saved step will do.
    resumed = re.findall(r"resumed from \S+/step_(\d+) \(step (\d+),", out)
    assert len(resumed) == 1, out[-3000:]
    step = int(resumed[0][1])
    last_before = before[-1]["step"]
    assert int(resumed[0][0]) == step and step % CKPT_EVERY == 0 and CKPT_EVERY <= step <= last_before + 1
    assert last_before < RESTART_STEPS - 1, "the kill came after the last step: nothing was resumed"
    recs = train_records(tmp_path / "run")
    assert [r["step"] for r in recs] == list(range(RESTART_STEPS)), "a step was lost or logged twice"
    # Steps the killed attempt did after its checkpoint were redone from that checkpoint with the same result:
    # weights, AdamW state and data order came back exactly.
    redone = [r for r in before if r["step"] >= step]
    assert redone or step == last_before + 1
    for old in redone:
        new = recs[old["step"]]
        assert new["lm_loss"] == pytest.approx(old["lm_loss"], rel=1e-5, abs=1e-6), old["step"]
        assert new["grad_norm"] == pytest.approx(old["grad_norm"], rel=1e-4, abs=1e-6), old["step"]
    assert recs[:step] == before[:step]             # the steps before the checkpoint are kept as they were


# ---------------------------------------------------------------------------------------------------
# A non-finite loss: rank 1's router of layer 1 is poisoned (Inf weights) for step 2 only.

POISON_STEP, POISON_LAYER = 2, 1


def _poisoned_run(rank, world, overrides, out_dir):
    import torch

    from moe_dist import config
    from moe_dist.parallel.layout import check_layout
    from moe_dist.parallel.topology import Topology
    from moe_dist.train.trainer import Trainer
    cfg = config.load(CONFIG, [*overrides, f"--train.out_dir={out_dir}", "--checkpoint.resume=never",
                               "--train.tensorboard=false"])
    topo = Topology.build(check_layout(cfg, world), timeout_s=30)
    trainer = Trainer(cfg, topo=topo)
    router = trainer.model.blocks[POISON_LAYER].mlp.router.weight_ED
    others = [p for p in trainer.model.parameters() if p is not router]
    saved = {}

    def on_step(r):
        if r.step == POISON_STEP - 1:
            saved["router"] = router.detach().clone()
            saved["params"] = [p.detach().clone() for p in others]
            saved["adam_steps"] = [float(trainer.optimizer.state[p]["step"]) for p in others]
            if rank == 1:                      # one rank only: every rank must still agree to stop or skip
                with torch.no_grad():
                    router.fill_(float("inf"))
        if r.step == POISON_STEP:
            # The skipped step changed no parameter and no AdamW state.
            saved["unchanged"] = all(torch.equal(a, p) for a, p in zip(saved["params"], others))
            saved["adam_unchanged"] = saved["adam_steps"] == [float(trainer.optimizer.state[p]["step"])
                                                               for p in others]
            with torch.no_grad():
                router.copy_(saved["router"])
    try:
        history = trainer.fit(progress=False, on_step=on_step)
    except FloatingPointError as e:
        return {"error": str(e)}
    return {"skipped": [s.skipped for s in history.steps], "lm": [s.lm_loss for s in history.steps],
            "skipped_steps": history.skipped_steps, "unchanged": saved.get("unchanged"),
            "adam_unchanged": saved.get("adam_unchanged")}


def _both_policies(rank, world, overrides, out_dir):
    return {policy: _poisoned_run(rank, world, [*overrides, f"--train.on_nonfinite={policy}"], f"{out_dir}/{policy}")
            for policy in ("raise", "skip")}


def test_a_nonfinite_loss_names_the_step_and_the_router_or_is_skipped(tokens, tmp_path):
    """Rank 1's router weights of layer 1 turn Inf for one step. train.on_nonfinite=raise: both ranks stop with
    the same message naming the step and that router. skip: both ranks skip that step (no parameter or AdamW
    change, the step is logged as skipped) and train on."""
    from distributed import run_ranks
    overrides = [*SMALL, "--train.steps=5", f"--data.path={tokens}", "--parallel.ep=2"]
    results = run_ranks(_both_policies, 2, overrides, str(tmp_path), timeout=180, collective_timeout_s=30)
    errors = []
    for res in (r["raise"] for r in results):
        assert "error" in res, f"the run went on past a non-finite loss: {res}"
        assert re.match(rf"step {POISON_STEP}: loss (nan|inf)", res["error"]), res["error"]
        assert f"the router of layer {POISON_LAYER} (blocks.{POISON_LAYER}.mlp.router) produced non-finite " \
               "logits first" in res["error"]
        assert "train.on_nonfinite=skip" in res["error"]           # the fix is named
        errors.append(res["error"])
    assert errors[0] == errors[1]
    for res in (r["skip"] for r in results):
        assert res["skipped"] == [s == POISON_STEP for s in range(5)]
        assert res["skipped_steps"] == 1
        assert res["unchanged"] and res["adam_unchanged"], "the skipped step updated parameters or AdamW state"
        assert all(math.isfinite(v) for i, v in enumerate(res["lm"]) if i != POISON_STEP)
    recs = train_records(tmp_path / "skip")
    assert [r["step"] for r in recs] == list(range(5))
    assert [r["skipped"] for r in recs] == [s == POISON_STEP for s in range(5)]
