"""Checks a run makes before its first step, so that a wrong path fails at once instead of at the first save
or at the end of training: the output folder and the checkpoint folder must be folders this process can write.
"""
from __future__ import annotations

import uuid
from pathlib import Path

from moe_dist.config import Config, ConfigError


def _check_writable_dir(path: Path, field: str) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field}={str(path)!r} is an existing file, not a folder; point {field} at a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(f"{field}={str(path)!r} is not a writable folder ({reason}); choose another path or fix "
                          "its permissions") from None


def check_outputs(cfg: Config) -> None:
    """train.out_dir and checkpoint.dir (default <out_dir>/checkpoints) are writable folders."""
    _check_writable_dir(Path(cfg.train.out_dir), "train.out_dir")
    if cfg.checkpoint.dir is not None:
        _check_writable_dir(Path(cfg.checkpoint.dir), "checkpoint.dir")
    else:
        _check_writable_dir(Path(cfg.train.out_dir) / "checkpoints", "train.out_dir (its checkpoints/ folder)")
