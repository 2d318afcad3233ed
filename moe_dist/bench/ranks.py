"""Measured training runs on N gloo CPU ranks for the benchmarks (spawned by `moe_dist.parallel.spawn`).

Fresh processes per measurement: every run starts from the same state (no warm allocator, no earlier run's
peak RSS in `ru_maxrss`), and a rank count is a real process count.
"""
from __future__ import annotations

import os
import resource
import time
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
    a2a_calls          per step, all-to-alls this rank issued on any group (the dispatcher's count exchanges
                       included), as `moe_dist.parallel.comm.observe_collectives` reports them
    a2a_bytes          per step, bytes this rank handed to those all-to-alls (each call's input)
    a2a_s              per step, seconds inside those all-to-alls (gloo blocks, so this includes the wait for
                       the slowest peer: the exposed communication time)
    tp_calls, tp_bytes, tp_s   per step, collectives on the tensor-parallel group: calls, bytes (each call's
                       input for all-reduce, the full gathered output for all-gather) and seconds inside
    tp_calls_by_op, tp_bytes_by_op   per step, the same split by `CollectiveCall.op` ("all_reduce", "all_gather")
    p2p_calls, p2p_bytes, p2p_s   per step, the pipeline's point-to-point batches ("send_recv": activations and
                       gradients between stages): batches, bytes this rank sent, seconds inside them (a receive
                       blocks until the neighbour stage has produced the tensor: the rank's wait for the pipeline)
    pp_rank            this rank's pipeline stage (0 without stages)
    cpu_s              per step, this process's CPU time (time.process_time: every thread of it). gloo's
                       blocking receives sleep rather than spin, so this is the rank's work, whatever the
                       machine's load does to the wall time
    kept_L, dropped_L  per MoE layer, assignments this rank kept / dropped, summed over steps: capacity is
                       applied to each rank's own tokens (a GShard group), so this is the per-rank drop count
    rss_before, peak_rss   bytes, before the first step and the process peak at the end (ru_maxrss)
    """
    import torch

    from moe_dist.parallel.comm import CollectiveCall, observe_collectives
    from moe_dist.parallel.layout import check_layout
    from moe_dist.parallel.topology import Topology
    from moe_dist.train.trainer import Trainer

    p = cfg.parallel
    topo = Topology.build(check_layout(cfg, world), p.timeout_s) if world > 1 else Topology.single()
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
    step_calls: list[CollectiveCall] = []          # this step's collectives, in the order they were issued
    out: dict[str, Any] = {"step_s": [], "lm_loss": [], "drop_fraction": [], "a2a_rows_out": [], "a2a_s": [],
                           "a2a_calls": [], "a2a_bytes": [], "tp_calls": [], "tp_bytes": [], "tp_s": [],
                           "tp_calls_by_op": [], "tp_bytes_by_op": [], "p2p_calls": [], "p2p_bytes": [], "p2p_s": [],
                           "cpu_s": []}
    try:
        rss_before = rss_bytes()
        with observe_collectives(step_calls.append):
            for step in range(steps):
                step_calls.clear()
                cpu = time.process_time()
                r = trainer.train_step(step)
                out["cpu_s"].append(time.process_time() - cpu)
                a2a = [c for c in step_calls if c.op == "all_to_all"]
                tp = [c for c in step_calls if on_group(c, topo.tp)]
                p2p = [c for c in step_calls if c.op == "send_recv"]
                out["step_s"].append(r.seconds)
                out["lm_loss"].append(r.lm_loss)
                out["drop_fraction"].append(r.drop_fraction)
                out["a2a_rows_out"].append(r.a2a_rows_out)
                out["a2a_calls"].append(len(a2a))
                out["a2a_bytes"].append(sum(c.nbytes for c in a2a))
                out["a2a_s"].append(sum(c.seconds for c in a2a))
                out["tp_calls"].append(len(tp))
                out["tp_bytes"].append(sum(c.nbytes for c in tp))
                out["tp_s"].append(sum(c.seconds for c in tp))
                out["p2p_calls"].append(len(p2p))
                out["p2p_bytes"].append(sum(c.nbytes for c in p2p))
                out["p2p_s"].append(sum(c.seconds for c in p2p))
                by_op: dict[str, list[int]] = {}
                for c in tp:
                    calls_bytes = by_op.setdefault(c.op, [0, 0])
                    calls_bytes[0] += 1
                    calls_bytes[1] += c.nbytes
                out["tp_calls_by_op"].append({k: n for k, (n, _) in by_op.items()})
                out["tp_bytes_by_op"].append({k: b for k, (_, b) in by_op.items()})
    finally:
        for h in handles:
            h.remove()
    out.update(kept_L=kept, dropped_L=dropped, rss_before=rss_before, peak_rss=peak_rss_bytes(),
               threads=torch.get_num_threads(), dp=topo.dims.dp, rank=rank,
               pp_rank=topo.dims.coords(rank)["pp"] if world > 1 else 0)
    return out


def on_group(call, group) -> bool:
    """Whether a `CollectiveCall` ran on `group`. Members alone do not tell groups apart (with tp = world the
    tp group has the members of the world group but is another process group), so the handle must be the
    same object too; a group of one has no handle and issues no collective."""
    return group.handle is not None and call.group.handle is group.handle and call.group.ranks == group.ranks
