"""Shared helpers for benchmark results: the machine record, an atomic JSON write and matplotlib figures.

Every result file says where and under what load it was measured (`machine_info`), so a number read later
can be judged; `write_result` adds that block and writes through a temporary file
and `os.replace`, so a reader (or a crashed run) never sees half a JSON. Package versions are read from the
installed metadata, not by importing the packages: importing DeepSpeed or Triton takes seconds and may print
accelerator warnings.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import socket
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

# Where a benchmark writes when no --out is given: runs/bench/ under the directory it runs in, like a training
# run's runs/<name>/. Relative on purpose: an installed package never writes into its own source tree, and the
# figures committed under benchmarks/results/ are only ever written by naming that folder with --out.
RUN_DIR = Path("runs", "bench")
_PACKAGES = ("torch", "deepspeed", "triton", "numpy", "matplotlib")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Host, cores, load and versions at the time of the call (call it when the measurement ends, so the
    load average covers the run)."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:                        # not available on every platform
        load = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "load_average_1_5_15min": load,
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in _PACKAGES},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }
    if "torch" in sys.modules:             # only when the caller already paid for the import
        import torch
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def _clean(x: Any) -> Any:
    """JSON has no NaN/Infinity: write them as null rather than emit a file strict parsers refuse."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json_atomic(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(data), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_result(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` plus a `machine` block (see `machine_info`) atomically; returns the path. A `machine`
    key already in the payload is kept and the record is stored under `machine_record` instead."""
    data = dict(payload)
    data["machine" if "machine" not in data else "machine_record"] = machine_info()
    return write_json_atomic(path, data)


def figure(nrows: int = 1, ncols: int = 1, *, width: float = 5.5, height: float = 4.0, **kwargs):
    """(fig, axes) from pyplot on the Agg backend (no display needed; the import is paid only here)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kwargs)


def save_figure(fig, path: str | Path, note: str | None = None, dpi: int = 120) -> Path:
    """Save (creating the folder) and close; `note` is printed small under the plots, e.g. the conditions
    of the measurement ("4 ranks on 2 cores: oversubscribed")."""
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if note:
        fig.text(0.01, 0.005, note, fontsize=7, color="0.3", ha="left", va="bottom", wrap=True)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def machine_note(info: dict[str, Any] | None = None) -> str:
    """One line for a plot: host, usable cores, load, torch version, date."""
    i = info or machine_info()
    load = i["load_average_1_5_15min"]
    return (f"{i['hostname']}: {i['cpus_usable'] or i['cpu_count']} usable cores, load {load[0] if load else '?'}, "
            f"torch {i['versions']['torch']}, {i['date'][:10]}")
