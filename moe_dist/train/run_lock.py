"""One run per output folder: a lock file that names its holder (pid and host), taken when a run starts and
removed when it ends. Two runs writing one folder would interleave metrics.jsonl lines and prune each other's
checkpoints mid-save. A lock left by a process that died on this host is stale and taken over."""
from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from moe_dist.config import ConfigError

LOCK_NAME = ".moe-dist.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # it exists and belongs to someone else
        return True
    return True


def _read(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def acquire(folder: Path) -> Path:
    """Create `folder`/.moe-dist.lock for this process or raise ConfigError naming the holder."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            pid, host = holder.get("pid"), holder.get("host")
            if host == me["host"] and isinstance(pid, int) and not _alive(pid):
                path.unlink(missing_ok=True)       # its holder died on this host: stale
                continue
            raise ConfigError(f"{folder} is in use by another run (pid {pid} on host {host}, lock file {path}); "
                              "wait for it to finish, choose another train.out_dir, or delete the lock file if "
                              "that process is gone") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise ConfigError(f"could not take the lock {path}; another run keeps creating it")


@contextlib.contextmanager
def hold(folder: Path, enabled: bool = True) -> Iterator[None]:
    """Hold the folder's lock for the block (rank 0 only: `enabled` False on the other ranks)."""
    if not enabled:
        yield
        return
    path = acquire(folder)
    try:
        yield
    finally:
        if _read(path).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
