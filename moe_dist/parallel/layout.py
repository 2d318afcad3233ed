"""The one place a parallel layout is judged: `check_layout(cfg, world)`.

A layout is the config's parallel sizes (`parallel.tp`, `ep`, `etp`) placed on a number of ranks. It is wrong
when the ranks cannot be split into those groups, or when a tensor the layout splits does not divide: experts
over ep, each expert's hidden dim over etp, heads and the dense MLP over tp, each micro-batch's tokens over tp
(every tp rank routes 1/tp of them). Every entry point asks this function before it builds anything, so each
bad layout yields the same single message everywhere: `moe-dist plan`, `moe-dist train` and the launch scripts
(before any process group exists), the trainer (for a topology handed in by code) and the benchmarks.
`config.validate` checks fields one by one and leaves layouts here (this module builds on the config, not the
other way round). The modules themselves (attention, MoE layer, dispatcher) trust the `Topology` they are
given and do not judge it again.

The first problem found is raised as a `LayoutError`, whose message names the field, the value and the fix.
"""
from __future__ import annotations

from typing import Optional

from moe_dist.config import Config, ConfigError
from moe_dist.parallel.topology import ParallelDims


class LayoutError(ConfigError):
    """The parallel layout cannot run; the message names the field, the value and the fix."""


def check_layout(cfg: Config, world: int | ParallelDims | None = None) -> Optional[ParallelDims]:
    """Judge `cfg`'s layout on `world` ranks and return its `ParallelDims`. With `world=None` only the parts
    that hold for any world size are judged (config validation before the launcher is known); the result is
    then None unless `parallel.world_size` fixes the world. Given the `ParallelDims` of a topology built
    elsewhere (a trainer handed one by code), the layout must also be the one the config asks for."""
    if isinstance(world, ParallelDims):
        dims = check_layout(cfg, world.world)
        if dims != world:
            raise LayoutError(f"the topology is {world.describe()} but the config asks for {dims.describe()} "
                              "(parallel.tp/ep/etp); build the Topology from check_layout(cfg, world)")
        return dims
    p, m, moe, t = cfg.parallel, cfg.model, cfg.moe, cfg.train
    for name in ("tp", "ep", "etp"):
        if getattr(p, name) < 1:
            raise LayoutError(f"parallel.{name}={getattr(p, name)}: must be >= 1")
    if p.world_size is not None and p.world_size < 1:
        raise LayoutError(f"parallel.world_size={p.world_size}: must be >= 1 or null (null: the launcher's)")

    # What the parallel sizes split, whatever the world size.
    if moe.num_experts % p.ep:
        raise LayoutError(f"moe.num_experts={moe.num_experts} is not divisible by parallel.ep={p.ep}; "
                          "choose ep that divides the expert count")
    if moe.expert_hidden % p.etp:
        raise LayoutError(f"moe.expert_hidden={moe.expert_hidden} is not divisible by parallel.etp={p.etp}; "
                          "choose etp that divides it")
    for name, value in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads or m.n_heads),
                        ("model.dense_hidden", m.dense_hidden)):
        if value % p.tp:
            raise LayoutError(f"{name}={value} is not divisible by parallel.tp={p.tp}; choose tp that divides it")
    if (t.batch_size * t.seq_len) % p.tp:
        raise LayoutError(f"train.batch_size·train.seq_len={t.batch_size * t.seq_len} tokens do not split over "
                          f"parallel.tp={p.tp} (each tp rank routes 1/tp of them); change batch_size or tp")
    if p.tp > 1 and moe.aux_loss_type == "seq" and t.batch_size % p.tp:
        raise LayoutError(f"train.batch_size={t.batch_size}: the sequence-level aux loss with parallel.tp={p.tp} "
                          "needs whole sequences on each tp rank; make batch_size a multiple of tp")
    if moe.pad_to_capacity and p.ep * p.etp > 1:
        raise LayoutError("moe.pad_to_capacity=True is single-process only (expert parallelism never pads on the "
                          "wire); set it false or use parallel.ep=1, parallel.etp=1")
    if t.engine == "deepspeed" and (p.tp > 1 or p.etp > 1):
        raise LayoutError(f"train.engine=deepspeed supports expert and data parallelism only (parallel.tp={p.tp}, "
                          f"parallel.etp={p.etp}); use train.engine=native for tensor parallelism")

    # The ranks.
    if world is None:
        if p.world_size is None:
            return None
        world = p.world_size
    if world < 1:
        raise LayoutError(f"world size {world}: must be >= 1; launch at least one rank")
    if p.world_size is not None and world != p.world_size:
        if world > 1:
            raise LayoutError(f"parallel.world_size={p.world_size} but {world} ranks were launched; launch "
                              f"{p.world_size} ranks or set parallel.world_size={world}")
        raise LayoutError(f"parallel.world_size={p.world_size} but 1 rank was launched (a single process); "
                          f"launch {p.world_size} ranks with torchrun, mpirun or srun, or set parallel.world_size=1")
    if world % p.tp:
        raise LayoutError(f"world size {world} is not divisible by parallel.tp={p.tp}; launch a multiple of "
                          f"{p.tp} ranks or change tp")
    if world % (p.ep * p.etp):
        raise LayoutError(f"world size {world} is not divisible by parallel.ep·parallel.etp={p.ep}·{p.etp}; "
                          f"launch a multiple of {p.ep * p.etp} ranks or change ep/etp")
    return ParallelDims(world=world, tp=p.tp, ep=p.ep, etp=p.etp)
