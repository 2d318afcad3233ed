"""Checks a run makes before its first step, so that a wrong path fails at once instead of at the first save
or at the end of training: the output folder and the checkpoint folder must be folders this process can write.
"""
from __future__ import annotations

import os
from pathlib import Path

from moe_dist.config import Config, ConfigError


def _check_writable_dir(path: Path, field: str) -> None:
    """`path` is a folder this process can write into, or could be created as one; nothing is created."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field}={str(path)!r} is an existing file, not a folder; point {field} at a folder")
    existing = path
    while not existing.exists():                 # the nearest ancestor that exists decides
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{field}={str(path)!r} cannot be created: {str(existing)!r} is a file; point {field} "
                          "at a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}={str(path)!r} is not writable ({str(existing)!r} denies this user); choose "
                          "another path or fix its permissions")


def check_outputs(cfg: Config) -> None:
    """train.out_dir and checkpoint.dir (default <out_dir>/checkpoints) are writable folders."""
    _check_writable_dir(Path(cfg.train.out_dir), "train.out_dir")
    if cfg.checkpoint.dir is not None:
        _check_writable_dir(Path(cfg.checkpoint.dir), "checkpoint.dir")
    else:
        _check_writable_dir(Path(cfg.train.out_dir) / "checkpoints", "train.out_dir (its checkpoints/ folder)")
