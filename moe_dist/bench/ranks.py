"""Measured training runs on N gloo CPU ranks for the benchmarks (spawned by `moe_dist.parallel.spawn`).

Fresh processes per measurement: every run starts from the same state (no warm allocator, no earlier run's
peak RSS in `ru_maxrss`), and a rank count is a real process count.
"""
from __future__ import annotations

import os
import resource
from typing import Any, Callable

from moe_dist.parallel.spawn import RanksFailed, free_port, run_ranks  # noqa: F401  (the benchmarks' entry points)


def rss_bytes() -> int:
    """Resident set size now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_rss_bytes() -> int:
    """This process's peak RSS so far (getrusage ru_maxrss is KiB on Linux). It sees torch's CPU allocations,
    which tracemalloc does not; it never goes down, hence fresh processes per measurement."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_and_measure(rank: int, world: int, cfg, steps: int, warmup: int = 2,
                      model_hook: Callable | None = None) -> dict[str, Any]:
    """One rank of a short training run (a `run_ranks` target). Builds the layout of `cfg.parallel` on the
    `world` ranks, applies `model_hook(model)` (tests use it to force a routing skew), runs `steps` train
    steps and returns this rank's measurements:

    step_s             wall time of every step (the first `warmup` are excluded from medians by the callers)
    lm_loss, drop_fraction   per step, global over ranks (from the trainer's StepResult)
    a2a_rows_out       per step, rows this rank sent to other EP ranks (all MoE layers, forward dispatch)
    a2a_calls          per step, calls of dist.all_to_all_single (count exchanges included)
    a2a_s              per step, seconds inside dist.all_to_all_single (gloo blocks, so this includes the
                       wait for the slowest peer: the exposed communication time)
    tp_calls, tp_bytes, tp_s   per step, collectives on the tensor-parallel group: calls, bytes (each call's
                       tensor for all-reduce, the full gathered/scattered tensor otherwise) and seconds inside
    tp_calls_by_op, tp_bytes_by_op   per step, the same split by torch.distributed function name
    kept_L, dropped_L  per MoE layer, assignments this rank kept / dropped, summed over steps: capacity is
                       applied to each rank's own tokens (a GShard group), so this is the per-rank drop count
    rss_before, peak_rss   bytes, before the first step and the process peak at the end (ru_maxrss)
    """
    import time

    import torch
    import torch.distributed as dist

    from moe_dist.parallel.topology import ParallelDims, Topology
    from moe_dist.train.trainer import Trainer

    p = cfg.parallel
    topo = (Topology.build(ParallelDims.create(world, p.tp, p.ep, p.etp, cfg.moe.num_experts), p.timeout_s)
            if world > 1 else Topology.single())
    trainer = Trainer(cfg, topo=topo)
    if model_hook is not None:
        model_hook(trainer.model)
    layers = trainer.model.moe_layers
    kept = [0] * len(layers)
    dropped = [0] * len(layers)

    def count(i):
        def hook(_module, _inputs, output):
            stats = output[1]
            kept[i] += int(stats.tokens_per_expert.sum())      # host sync: benchmark bookkeeping only
            dropped[i] += int(stats.dropped.sum())
        return hook

    handles = [layer.register_forward_hook(count(i)) for i, layer in enumerate(layers)]
    # Time the all-to-all where comm.py calls it (it looks the function up on torch.distributed at each call).
    # Patched only inside this spawned benchmark process, and restored before it returns.
    original = dist.all_to_all_single
    a2a_clock = [0.0]
    a2a_calls = [0]

    def timed_all_to_all(*a, **k):
        a2a_calls[0] += 1
        t0 = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            a2a_clock[0] += time.perf_counter() - t0

    dist.all_to_all_single = timed_all_to_all

    # The other collectives comm.py and dispatch.py call, counted when they run on the tp group (identified
    # by its handle: with tp = world it has the same members as WORLD but is a different group).
    tp_handle = topo.tp.handle
    tp_clock = [0.0]
    tp_ops: dict[str, list[float]] = {}          # name -> [calls, bytes]

    def nbytes(t) -> int:
        return sum(x.numel() * x.element_size() for x in t) if isinstance(t, (list, tuple)) else \
            t.numel() * t.element_size()

    def counted(name, fn, full_arg, group_arg):
        def wrapper(*a, **k):
            group = k["group"] if "group" in k else (a[group_arg] if len(a) > group_arg else None)
            if tp_handle is None or group is not tp_handle:
                return fn(*a, **k)
            c = tp_ops.setdefault(name, [0, 0])
            c[0] += 1
            c[1] += nbytes(a[full_arg])
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                tp_clock[0] += time.perf_counter() - t0
        return wrapper

    # name -> (positional index of the full-size tensor, of the group), from torch.distributed's signatures
    positions = {"all_reduce": (0, 2), "all_gather": (0, 2), "all_gather_into_tensor": (0, 2),
                 "reduce_scatter": (1, 3), "reduce_scatter_tensor": (1, 3)}
    wrapped = {name: getattr(dist, name) for name in positions}
    for name, (full_arg, group_arg) in positions.items():
        setattr(dist, name, counted(name, wrapped[name], full_arg, group_arg))
    out: dict[str, Any] = {"step_s": [], "lm_loss": [], "drop_fraction": [], "a2a_rows_out": [], "a2a_s": [],
                           "a2a_calls": [], "tp_calls": [], "tp_bytes": [], "tp_s": [], "tp_calls_by_op": [],
                           "tp_bytes_by_op": []}
    try:
        rss_before = rss_bytes()
        for step in range(steps):
            a2a_clock[0], a2a_calls[0], tp_clock[0] = 0.0, 0, 0.0
            tp_ops.clear()
            r = trainer.train_step(step)
            out["step_s"].append(r.seconds)
            out["lm_loss"].append(r.lm_loss)
            out["drop_fraction"].append(r.drop_fraction)
            out["a2a_rows_out"].append(r.a2a_rows_out)
            out["a2a_s"].append(a2a_clock[0])
            out["a2a_calls"].append(a2a_calls[0])
            out["tp_calls"].append(sum(int(c) for c, _ in tp_ops.values()))
            out["tp_bytes"].append(sum(int(b) for _, b in tp_ops.values()))
            out["tp_s"].append(tp_clock[0])
            out["tp_calls_by_op"].append({k: int(c) for k, (c, _) in tp_ops.items()})
            out["tp_bytes_by_op"].append({k: int(b) for k, (_, b) in tp_ops.items()})
    finally:
        dist.all_to_all_single = original
        for name, fn in wrapped.items():
            setattr(dist, name, fn)
        for h in handles:
            h.remove()
    out.update(kept_L=kept, dropped_L=dropped, rss_before=rss_before, peak_rss=peak_rss_bytes(),
               threads=torch.get_num_threads(), dp=topo.dims.dp, rank=rank)
    return out
