"""One run per output folder: a lock file that names its holder (pid, host, start time), taken when a run
starts and removed when it ends. Two runs writing one folder would interleave metrics.jsonl lines and prune
each other's checkpoints mid-save.

The lock is an exclusive `flock` on `<folder>/.moe-dist.lock`, held for the whole run on an open descriptor:
the kernel releases it when the process dies however it dies, so a lock file left by a killed run is taken
over without guessing from pids (and a pid reused by an unrelated process does not keep the folder locked).
The file's content only names the holder for the message. Where the filesystem has no `flock` the lock falls
back to creating the file exclusively, and a lock whose pid is dead on this host is stale. A lock file that
names another host is never taken over (its process may be alive there; a filesystem whose locks do not span
hosts could not tell): the message says to delete it when that run is gone.

A run locks its output folder and its checkpoint folder (`hold_run`): two runs with different output folders
but one checkpoint folder would prune each other's checkpoints. The checkpoint store asks `held_since` which
temporary folders predate this process's lock, so that it deletes only those.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

from moe_dist.config import Config, ConfigError

LOCK_NAME = ".moe-dist.lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

# The locks this process holds: real folder path -> (open descriptor or None, the lock file's mtime). Process
# state by nature (a lock belongs to a process); the checkpoint store reads it through `held_since`.
_HELD: dict[str, tuple[Optional[int], float]] = {}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # it exists and belongs to someone else
        return True
    return True


def _holder_text(path: Path) -> dict:
    # A holder writes its content right after taking the lock: a reader may see it empty for a moment.
    for _ in range(20):
        try:
            holder = json.loads(path.read_text())
            if isinstance(holder, dict):
                return holder
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}


def _in_use(folder: Path, path: Path, field: str, holder: dict) -> ConfigError:
    pid, host = holder.get("pid", "unknown"), holder.get("host", "unknown")
    since = holder.get("started")
    when = ""
    if isinstance(since, (int, float)):
        when = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
    return ConfigError(f"{folder} is in use by another run (pid {pid} on host {host}{when}; lock file {path}): "
                       f"two runs in one folder corrupt each other's checkpoints and metrics; wait for it to "
                       f"finish, choose another {field}, or delete the lock file if that run is gone")


def _content() -> bytes:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                       "token": uuid.uuid4().hex}).encode()


def acquire(folder: Path, field: str = "train.out_dir") -> Path:
    """Take `folder`/.moe-dist.lock for this process (creating the folder), or raise ConfigError naming the
    holder's pid and host and the fix (`field` is the config field that chose the folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    key = os.path.realpath(folder)
    if key in _HELD:
        raise _in_use(folder, path, field, _held_text(key, path))
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(folder, path, field, _holder_text(path)) from None
        except OSError as e:
            os.close(fd)
            if e.errno in _NO_FLOCK:
                return _acquire_exclusive(folder, path, field, key)
            raise
        # Locked; but a holder that just finished unlinked the file we opened: lock the one at `path`.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        holder = _holder_text_fd(fd)
        if holder.get("host") not in (None, socket.gethostname()):
            os.close(fd)
            raise _in_use(folder, path, field, holder)
        # Nobody holds it: a new file, or one left by a run that died on this host. Ours now.
        os.ftruncate(fd, 0)
        os.pwrite(fd, _content(), 0)
        os.fsync(fd)
        _HELD[key] = (fd, os.fstat(fd).st_mtime)
        return path
    raise ConfigError(f"could not take the lock {path}; other runs keep taking and releasing it")


def _held_text(key: str, path: Path) -> dict:
    """Our own lock's content, read through the descriptor that holds it: where flock is emulated with POSIX
    locks (NFS), closing any other descriptor of the file would drop this process's lock."""
    fd = _HELD[key][0]
    return _holder_text_fd(fd) if fd is not None else _holder_text(path)


def _holder_text_fd(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return holder if isinstance(holder, dict) else {}
    except ValueError:
        return {}


def _acquire_exclusive(folder: Path, path: Path, field: str, key: str) -> Path:
    """Without flock: the file is created whole (written aside, then hard-linked, which fails when it exists);
    a lock of a dead pid on this host is stale and taken over."""
    for _ in range(3):
        tmp = path.with_name(f"{LOCK_NAME}.{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(_content())
        try:
            os.link(tmp, path)
        except FileExistsError:
            holder = _holder_text(path)
            pid, host = holder.get("pid"), holder.get("host")
            if host == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
                path.unlink(missing_ok=True)       # its holder died on this host: stale
                continue
            raise _in_use(folder, path, field, holder) from None
        finally:
            tmp.unlink(missing_ok=True)
        _HELD[key] = (None, path.stat().st_mtime)
        return path
    raise ConfigError(f"could not take the lock {path}; another run keeps creating it")


def check_free(folder: Path, field: str = "train.out_dir") -> None:
    """Raise ConfigError naming the holder when another run holds `folder`'s lock now (what `acquire` would
    refuse); takes nothing and creates nothing. For a check before the model is built (rank 0 only: a probe
    from another rank of the same job could meet rank 0's own lock)."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    key = os.path.realpath(folder)
    if key in _HELD:
        raise _in_use(folder, path, field, _held_text(key, path))
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return                     # no lock file (or none this user can read: acquire will say more)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)       # closing the descriptor gives it back
        except BlockingIOError:
            raise _in_use(folder, path, field, _holder_text(path)) from None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
            holder = _holder_text_fd(fd)
            pid = holder.get("pid")
            if not (holder.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid)):
                raise _in_use(folder, path, field, holder) from None
            return
        holder = _holder_text_fd(fd)
        if holder.get("host") not in (None, socket.gethostname()):
            raise _in_use(folder, path, field, holder)
    finally:
        os.close(fd)


def release(folder: Path) -> None:
    """Remove this process's lock on `folder` (the file first, then the descriptor's flock)."""
    key = os.path.realpath(folder)
    held = _HELD.pop(key, None)
    if held is None:
        return
    fd, _ = held
    path = Path(folder) / LOCK_NAME
    try:
        if fd is not None:
            mine = _holder_text_fd(fd)
            if mine.get("pid") == os.getpid():
                path.unlink(missing_ok=True)
        elif _holder_text(path).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
    finally:
        if fd is not None:
            os.close(fd)


def held_since(path: str | Path) -> Optional[float]:
    """The mtime of the lock this process holds on `path` or on a folder above it (None when none): anything
    in the folder older than that was written before this run started."""
    real = os.path.realpath(path)
    for folder, (_, mtime) in _HELD.items():
        if real == folder or real.startswith(folder.rstrip(os.sep) + os.sep):
            return mtime
    return None


@contextlib.contextmanager
def hold(folder: Path, enabled: bool = True, field: str = "train.out_dir") -> Iterator[None]:
    """Hold the folder's lock for the block (rank 0 only: `enabled` False on the other ranks); released on
    return and on any exception, after which a folder the lock created and nothing filled is removed again."""
    if not enabled:
        yield
        return
    folder = Path(folder)
    created = not folder.exists()
    acquire(folder, field)
    try:
        yield
    except BaseException:
        release(folder)
        # A run refused or failed before writing anything leaves no empty folder behind that it created.
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise
    else:
        release(folder)


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.train.out_dir) / "checkpoints")


@contextlib.contextmanager
def hold_run(cfg: Config, enabled: bool = True) -> Iterator[None]:
    """Hold the output folder's lock and the checkpoint folder's for the block (rank 0 only). Both, even when
    one lies inside the other: a run whose checkpoint.dir is another run's <out_dir>/checkpoints must be
    refused too."""
    out, ck = Path(cfg.train.out_dir), checkpoint_dir(cfg)
    with contextlib.ExitStack() as stack:
        stack.enter_context(hold(out, enabled, "train.out_dir"))
        if os.path.realpath(ck) != os.path.realpath(out):
            stack.enter_context(hold(ck, enabled, "checkpoint.dir"))
        yield
