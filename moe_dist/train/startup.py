"""What a node must provide before `moe-dist train` starts any process group: paths that mean something, writable
output folders, the token file, the experts' backend, the engine's optional package, and memory for the weights.

Each failure is bad input (exit 2), found by every rank of the node alike, so `moe-dist train` lets the first rank
of each node report it. The checks only read: a refused run creates nothing.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

from moe_dist.config import Config
from moe_dist.errors import CommandError, bad_input
from moe_dist.parallel.bootstrap import LaunchInfo
from moe_dist.parallel.topology import ParallelDims

MEMORY_FIX = ("lower those sizes, or spread the model over more ranks (parallel.ep, parallel.tp; `moe-dist plan "
              "CONFIG --world N` shows the memory per rank)")


def describe_sizes(cfg: Config) -> str:
    """The config fields that decide the model's size, for a memory message."""
    m, e = cfg.model, cfg.moe
    return (f"model.dim={m.dim}, model.n_layers={m.n_layers}, model.vocab_size={m.vocab_size}, "
            f"model.dense_hidden={m.dense_hidden}, moe.num_experts={e.num_experts}, moe.expert_hidden={e.expert_hidden}")


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def available_memory() -> Optional[int]:
    """Bytes this node can still give (MemAvailable), or None where /proc/meminfo is not there."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(cfg: Config, dims: ParallelDims, launch: LaunchInfo, ranks_here: int,
                 available: Optional[int] = None) -> None:
    """Refuse a model whose weights alone cannot fit before allocating any of it: an allocator failure comes late
    (after gigabytes were touched) or not at all (the kernel's OOM killer ends the process without a word).
    `ranks_here`: the ranks that share this node's memory. A lower bound only (gradients and AdamW moments come
    on top), so no model that could run is refused."""
    import torch

    from moe_dist.plan import param_counts
    params = param_counts(cfg, dims).total
    need = params * (2 if cfg.train.dtype == "bfloat16" else 4)
    available = available_memory() if available is None else available
    # The model is built on the host before it moves to its GPU, so host memory bounds every rank on the node.
    if available is not None and need * ranks_here > available:
        raise CommandError("memory", f"the weights alone need {_gib(need)} per rank ({params:,} parameters on each "
                           f"of {ranks_here} rank(s) here; {describe_sizes(cfg)}) but this machine has "
                           f"{_gib(available)} available; {MEMORY_FIX}")
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(launch.local_rank % torch.cuda.device_count()).total_memory
        if need > gpu:
            raise CommandError("memory", f"the weights alone need {_gib(need)} per rank ({params:,} parameters; "
                               f"{describe_sizes(cfg)}) but a GPU here holds {_gib(gpu)}; {MEMORY_FIX}")


def check_node(cfg: Config, dims: ParallelDims, launch: LaunchInfo) -> None:
    """Every check above, in the order a user would fix them."""
    import os

    from moe_dist.moe.experts import resolve_backend
    from moe_dist.train import preflight
    from moe_dist.train.data import check_data
    # An empty path would mean the current folder (Path("") is "."): never what a config means.
    for name, value in (("train.out_dir", cfg.train.out_dir), ("data.path", cfg.data.path),
                        ("checkpoint.dir", cfg.checkpoint.dir)):
        if value is not None and not value.strip():
            raise CommandError("config", f"{name} is empty; give a path"
                               + (", or null for the default" if name == "checkpoint.dir" else ""))
    preflight.check_outputs(cfg)
    with bad_input("data", ValueError, OSError):
        check_data(cfg)
    with bad_input("config", ValueError):
        resolve_backend(cfg.moe.backend, cfg.model.dim, cfg.moe.expert_hidden // dims.etp)
    if cfg.train.engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise CommandError("install", "train.engine=deepspeed but deepspeed is not installed; pip install "
                           "'moe-dist[deepspeed]', or set train.engine=native")
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    check_memory(cfg, dims, launch, ranks_here)
