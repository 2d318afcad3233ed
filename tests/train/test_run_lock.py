"""The run lock (moe_dist.train.run_lock): one run per output folder and per checkpoint folder.

A second run is refused naming the holder's pid and host; a lock left by a killed run, an empty lock file, or
one naming a pid now reused by an unrelated process is taken over; a lock naming another host is not; the lock
goes on return and on an exception; the checkpoint folder is locked too.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_dist import config
from moe_dist.config import ConfigError
from moe_dist.train import run_lock

HOST = socket.gethostname()
LOCK = run_lock.LOCK_NAME


def _holder_process(folder: Path) -> subprocess.Popen:
    """Another process that takes the folder's lock and keeps it until killed."""
    code = ("import sys, time; from pathlib import Path; from moe_dist.train import run_lock; "
            "run_lock.acquire(Path(sys.argv[1])); print('ready', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


@pytest.fixture
def holder(tmp_path):
    p = _holder_process(tmp_path / "run")
    yield p
    p.kill()
    p.wait()


def test_a_second_run_is_refused_naming_the_holder(tmp_path, holder):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'run'} is in use by another run (pid {holder.pid} "
                                                    f"on host {HOST}, since ") + r".*" + re.escape(
                                                        f"lock file {tmp_path / 'run' / LOCK}") + r".*choose another "
                                                    r"train\.out_dir, or delete the lock file if that run is gone"):
        run_lock.acquire(tmp_path / "run")
    assert json.loads((tmp_path / "run" / LOCK).read_text())["pid"] == holder.pid     # untouched


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "run" / LOCK).exists()                    # SIGKILL: no cleanup ran
    with run_lock.hold(tmp_path / "run"):
        assert json.loads((tmp_path / "run" / LOCK).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run" / LOCK).exists()


@pytest.mark.parametrize("content", ["", "{\"pid\": 12", "PID"])
def test_an_empty_or_torn_lock_file_is_taken_over(tmp_path, content):
    """A run that died between creating the lock file and writing it left it empty: nobody holds it."""
    (tmp_path / LOCK).write_text(content)
    with run_lock.hold(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()


def test_a_lock_naming_a_reused_pid_is_taken_over(tmp_path):
    """The dead holder's pid now belongs to an unrelated live process, which holds no lock."""
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({"pid": unrelated.pid, "host": HOST}))
        with run_lock.hold(tmp_path):
            assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    finally:
        unrelated.kill()
        unrelated.wait()


def test_a_lock_naming_another_host_is_refused(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": 4242, "host": "node-17.cluster"}))
    with pytest.raises(ConfigError, match=r"pid 4242 on host node-17\.cluster.*delete the lock file if that run is "
                                          r"gone"):
        run_lock.acquire(tmp_path)
    assert json.loads((tmp_path / LOCK).read_text())["host"] == "node-17.cluster"


def test_released_on_return_and_on_an_exception(tmp_path):
    with run_lock.hold(tmp_path):
        assert (tmp_path / LOCK).exists()
    assert not (tmp_path / LOCK).exists()
    with pytest.raises(KeyError):
        with run_lock.hold(tmp_path):
            raise KeyError("boom")
    assert not (tmp_path / LOCK).exists()
    assert run_lock.held_since(tmp_path) is None
    with run_lock.hold(tmp_path, enabled=False):                 # the other ranks: nothing taken
        assert not (tmp_path / LOCK).exists()


def test_a_failed_run_removes_only_the_empty_folders_it_created(tmp_path):
    cfg = config.from_dict({"train": {"out_dir": str(tmp_path / "new" / "run")}})
    with pytest.raises(KeyError):
        with run_lock.hold_run(cfg):
            raise KeyError("refused before any write")
    assert not (tmp_path / "new" / "run").exists()           # out_dir and its checkpoints/ folder: gone
    (tmp_path / "kept").mkdir()
    cfg = config.from_dict({"train": {"out_dir": str(tmp_path / "kept")}})
    with pytest.raises(KeyError):
        with run_lock.hold_run(cfg):
            (tmp_path / "kept" / "metrics.jsonl").write_text("{}")
            raise KeyError("failed after writing")
    assert (tmp_path / "kept" / "metrics.jsonl").exists()   # existed before, and holds a file: untouched


def test_two_holds_in_one_process_conflict(tmp_path):
    with run_lock.hold(tmp_path):
        with pytest.raises(ConfigError, match=f"pid {os.getpid()} on host"):
            run_lock.acquire(tmp_path)
        assert (tmp_path / LOCK).exists()
    assert not (tmp_path / LOCK).exists()


def test_held_since_covers_the_folder_and_what_is_below(tmp_path):
    assert run_lock.held_since(tmp_path) is None
    with run_lock.hold(tmp_path):
        since = run_lock.held_since(tmp_path)
        assert since == (tmp_path / LOCK).stat().st_mtime and since <= time.time() + 1
        assert run_lock.held_since(tmp_path / "checkpoints" / "deepspeed") == since
        assert run_lock.held_since(Path(str(tmp_path) + "-other")) is None


def _cfg(out_dir: Path, ck=None) -> config.Config:
    raw = {"train": {"out_dir": str(out_dir)}, "checkpoint": {"dir": str(ck) if ck else None}}
    return config.from_dict(raw)


@pytest.mark.parametrize("second_ck", ["same_dir", "default_of_first"])
def test_hold_run_locks_the_checkpoint_folder_too(tmp_path, second_ck):
    """Two runs with different output folders that share a checkpoint folder, given explicitly or as the
    first run's default <out_dir>/checkpoints, are refused."""
    if second_ck == "same_dir":
        first, ck = _cfg(tmp_path / "a", tmp_path / "shared_ck"), tmp_path / "shared_ck"
    else:
        first, ck = _cfg(tmp_path / "a"), tmp_path / "a" / "checkpoints"
    second = _cfg(tmp_path / "b", ck)
    with run_lock.hold_run(first):
        assert (ck / LOCK).exists()
        with pytest.raises(ConfigError, match=re.escape(f"{ck} is in use by another run") + r".*choose another "
                                              r"checkpoint\.dir"):
            with run_lock.hold_run(second):
                pass
        assert not (tmp_path / "b" / LOCK).exists()              # the second run's own lock was given back
    assert not (ck / LOCK).exists() and not (tmp_path / "a" / LOCK).exists()
    with run_lock.hold_run(second):
        pass


def test_the_trainer_refuses_a_folder_another_process_holds(tmp_path):
    from trainer_helpers import RowsBatcher, make_cfg, tiny, tokens
    from moe_dist.train.trainer import Trainer
    out = tmp_path / "run"
    p = _holder_process(out)
    try:
        cfg = make_cfg(tiny(), out_dir=str(out), steps=1)
        x, y = tokens(4)
        # Refused by the preflight probe when the Trainer is built, or at the latest when fit takes the lock.
        with pytest.raises(ConfigError, match=f"pid {p.pid} on host {re.escape(HOST)}"):
            Trainer(cfg, batcher=RowsBatcher(x, y, 2)).fit(progress=False)
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    finally:
        p.kill()
        p.wait()
