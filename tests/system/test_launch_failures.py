"""How launch/torchrun.sh fails: a MASTER_PORT held by another program (refused at once, naming it; before, the
launch waited in silence for minutes), a rendezvous that never completes (a line naming the endpoint after
RDZV_TIMEOUT), bad input found by the workers (the workers' exit code 2 and their one line, not torchrun's 1 and a
traceback), SIGTERM to the agent after the workers saved (143, not 1 and a traceback), a worker killed by a signal.
The probe of moe_dist.parallel.torchrun_agent is tested in-process against sockets held here."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from distributed import free_port
from launch_helpers import LAUNCH, args_for, children, run_all, script_env, tokens  # noqa: F401
from moe_dist.errors import CommandError
from moe_dist.parallel import torchrun_agent


def _held_port() -> tuple[socket.socket, int]:
    """A port another program holds: bound and listening, never answering."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("moe-dist:")]


# ---------------------------------------------------------------------------------------- the probe alone

def test_options_are_read_before_the_script():
    argv = ["--nnodes=2", "--rdzv-endpoint=h:5", "--standalone", "--rdzv_conf=join_timeout=3", "-m",
            "moe_dist.cli", "train", "--nnodes=9"]
    assert torchrun_agent._options(argv) == {"nnodes": "2", "rdzv-endpoint": "h:5", "standalone": "",
                                             "rdzv-conf": "join_timeout=3"}


def test_a_free_port_passes():
    torchrun_agent.check_endpoint("127.0.0.1", free_port(), nnodes=1)


def test_another_hosts_address_passes():
    """An address this host does not have: the node that has it hosts the store (TEST-NET-3, never local)."""
    torchrun_agent.check_endpoint("203.0.113.7", 29500, nnodes=2)


@pytest.mark.parametrize("nnodes", [1, 2])
def test_a_port_held_by_another_program_is_refused_naming_it(nnodes):
    s, port = _held_port()
    try:
        t0 = time.monotonic()
        with pytest.raises(CommandError) as info:
            torchrun_agent.check_endpoint("127.0.0.1", port, nnodes=nnodes, probe_s=1.0)
        assert time.monotonic() - t0 < 10
    finally:
        s.close()
    assert info.value.kind == "launch" and info.value.code == 2
    assert f"MASTER_PORT={port} on MASTER_ADDR=127.0.0.1 is already in use by another program" in str(info.value)


def test_a_port_that_answers_as_a_store_passes_with_several_nodes():
    """Two "nodes" on one host: the second finds the first one's rendezvous store on the port."""
    from datetime import timedelta

    import torch.distributed as dist
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    try:
        torchrun_agent.check_endpoint("127.0.0.1", port, nnodes=2, probe_s=5.0)
    finally:
        del store


# -------------------------------------------------------------------------------------------- the script

def test_torchrun_sh_refuses_a_held_master_port_at_once(tokens, tmp_path):
    """Before: torchrun connected to the other program as a rendezvous client and waited (150 s and 960 s seen)."""
    s, port = _held_port()
    try:
        t0 = time.monotonic()
        [(rc, _, err)] = run_all([([str(LAUNCH / "torchrun.sh"), *args_for(tokens, tmp_path / "run")],
                                   script_env(NPROC_PER_NODE="2", EP="2", MASTER_PORT=str(port)))],
                                 cwd=tmp_path, wait_s=120)
        took = time.monotonic() - t0
    finally:
        s.close()
    assert rc == 2 and "Traceback" not in err
    assert _lines(err) == [f"moe-dist: launch error: MASTER_PORT={port} on MASTER_ADDR=127.0.0.1 is already in use by "
                           "another program, so the rendezvous cannot start there; leave MASTER_PORT unset on one node "
                           "(torchrun --standalone picks a free port) or choose a free one"]
    assert took < 90, f"{took:.0f}s"          # two Python start-ups on a loaded machine; the hang was minutes
    assert not (tmp_path / "run").exists()


def test_a_rendezvous_that_never_completes_names_the_endpoint(tokens, tmp_path):
    """NNODES=2 but only one node starts: torchrun's join timeout, then one line naming the endpoint."""
    port = free_port()
    [(rc, _, err)] = run_all([([str(LAUNCH / "torchrun.sh"), *args_for(tokens, tmp_path / "run")],
                               script_env(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                                          MASTER_PORT=str(port), RDZV_TIMEOUT="3"))], cwd=tmp_path, wait_s=120)
    assert rc == 1 and "Traceback" not in err
    [line] = _lines(err)
    assert line.startswith(f"moe-dist: launch error: the rendezvous at 127.0.0.1:{port} did not complete within 3s "
                           "(RendezvousTimeoutError")
    assert "start the same command on all 2 nodes with the same MASTER_ADDR and MASTER_PORT" in line


def test_bad_input_found_by_the_workers_exits_2_with_one_line(tokens, tmp_path):
    """The layout passes the launcher's check, the token file is missing: each worker finds it, the first rank
    of the node reports, and torchrun.sh exits 2 (before: torchrun's 1 and its ChildFailedError traceback)."""
    args = args_for(tokens, tmp_path / "run", "--parallel.ep=2", f"--data.path={tmp_path / 'missing.bin'}")
    [(rc, _, err)] = run_all([([str(LAUNCH / "torchrun.sh"), *args], script_env(NPROC_PER_NODE="2"))],
                             cwd=tmp_path, wait_s=180)
    assert rc == 2 and "Traceback" not in err and "ChildFailedError" not in err
    [line] = _lines(err)
    assert line.startswith("moe-dist: data error: ") and "missing.bin" in line


def _start_training(tokens, tmp_path, **env) -> subprocess.Popen:
    args = args_for(tokens, tmp_path / "run", "--train.steps=100000", "--train.log_every=1", "--checkpoint.every=0",
                    "--train.tensorboard=false", "--parallel.timeout_s=60")
    return subprocess.Popen([str(LAUNCH / "torchrun.sh"), *args], env=script_env(NPROC_PER_NODE="2", EP="2", **env),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_steps(proc: subprocess.Popen, metrics: Path, n: int, wait_s: float = 180) -> None:
    end = time.monotonic() + wait_s
    while time.monotonic() < end and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"kind": "train"') >= n:
            return
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no {n} training steps within {wait_s}s (rc={proc.poll()}):\n{proc.communicate()[1][-3000:]}")


def _finish(proc: subprocess.Popen, wait_s: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the launch did not end within {wait_s}s")
    return proc.returncode, out, err


def test_sigterm_to_the_agent_saves_and_exits_143(tokens, tmp_path):
    """torchrun.sh execs the agent, so this pid is the agent. It forwards SIGTERM to the workers, which save a
    checkpoint and exit 143; the agent then exits 143 too (before: 1, with a SignalException traceback)."""
    proc = _start_training(tokens, tmp_path)
    _wait_for_steps(proc, tmp_path / "run" / "metrics.jsonl", 3)
    proc.send_signal(signal.SIGTERM)
    rc, out, err = _finish(proc)
    assert rc == 143, err[-3000:]
    assert "Traceback" not in err and not _lines(err)
    assert "SIGTERM: stopped after step" in out
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_a_worker_killed_by_a_signal_is_named(tokens, tmp_path):
    """A worker killed by SIGKILL (the OOM killer's signal) prints nothing; the agent names it and exits 1."""
    proc = _start_training(tokens, tmp_path)
    _wait_for_steps(proc, tmp_path / "run" / "metrics.jsonl", 3)
    workers = children(proc.pid)
    assert workers, "the agent has no worker processes"
    os.kill(max(workers), signal.SIGKILL)
    rc, _, err = _finish(proc)
    assert rc == 1 and "Traceback" not in err
    assert any(line.startswith("moe-dist: launch error: rank ") and "was killed by SIGKILL without a report" in line
               for line in _lines(err)), err[-3000:]
