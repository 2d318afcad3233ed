"""Checks a run makes before its first step, so that a wrong path fails at once instead of at the first save
or at the end of training: the output folder and the checkpoint folder must be folders this process can write,
and (on rank 0) no other run may hold them.
"""
from __future__ import annotations

import os
from pathlib import Path

from moe_dist.config import Config, ConfigError
from moe_dist.train import run_lock


def check_writable_dir(path: Path, field: str) -> None:
    """`path` is a folder this process can write into, or could be created as one; nothing is created."""
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"{field}={str(path)!r} is a broken symbolic link (to {os.readlink(path)!r}); point "
                          f"{field} at a folder or fix the link")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field}={str(path)!r} is an existing file, not a folder; point {field} at a folder")
    existing = path
    while not existing.exists():                 # the nearest ancestor that exists decides
        if existing.is_symlink():
            raise ConfigError(f"{field}={str(path)!r} cannot be created: {str(existing)!r} is a broken symbolic "
                              f"link; point {field} at a folder or fix the link")
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{field}={str(path)!r} cannot be created: {str(existing)!r} is a file; point {field} "
                          "at a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}={str(path)!r} is not writable ({str(existing)!r} denies this user); choose "
                          "another path or fix its permissions")


def check_outputs(cfg: Config, check_locks: bool = False) -> None:
    """train.out_dir and checkpoint.dir (default <out_dir>/checkpoints) are writable folders; with
    `check_locks` (rank 0), neither is locked by another run, so that a second run is refused before it builds
    its model rather than when `fit` takes the locks."""
    out, ck = Path(cfg.train.out_dir), run_lock.checkpoint_dir(cfg)
    check_writable_dir(out, "train.out_dir")
    ck_field = "checkpoint.dir" if cfg.checkpoint.dir is not None else "train.out_dir (its checkpoints/ folder)"
    check_writable_dir(ck, ck_field)
    if check_locks:
        run_lock.check_free(out, "train.out_dir")
        run_lock.check_free(ck, "checkpoint.dir")
