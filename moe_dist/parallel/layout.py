"""The one place a parallel layout is judged: `check_layout(cfg, world)`.

A layout is the config's parallel sizes (`parallel.tp`, `ep`, `etp`, `pp`) placed on a number of ranks. It is
wrong when the ranks cannot be split into those groups, or when a tensor the layout splits does not divide:
experts over ep, each expert's hidden dim over etp, heads and the dense MLP over tp, each micro-batch's tokens
over tp (every tp rank routes 1/tp of them), the layers over the pipeline's (virtual) stages. Every entry point asks this function before it builds anything, so each
bad layout yields the same single message everywhere: `moe-dist plan`, `moe-dist train` and the launch scripts
(before any process group exists), the trainer (for a topology handed in by code) and the benchmarks.
`config.validate` checks fields one by one and leaves layouts here (this module builds on the config, not the
other way round). The modules themselves (attention, MoE layer, dispatcher) trust the `Topology` they are
given and do not judge it again.

The first problem found is raised as a `LayoutError`, whose message names the field, the value and the fix.
A layout that runs but wastes time (a pipeline with fewer micro-batches than stages) is reported by
`layout_warnings`, which the trainer prints on rank 0.
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
                              "(parallel.tp/ep/etp/pp); build the Topology from check_layout(cfg, world)")
        return dims
    p, m, moe, t = cfg.parallel, cfg.model, cfg.moe, cfg.train
    for name in ("tp", "ep", "etp", "pp", "pp_virtual"):
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
    _check_pipeline(cfg)

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
    if p.pp == 1:
        if world % p.tp:
            raise LayoutError(f"world size {world} is not divisible by parallel.tp={p.tp}; launch a multiple of "
                              f"{p.tp} ranks or change tp")
        if world % (p.ep * p.etp):
            raise LayoutError(f"world size {world} is not divisible by parallel.ep·parallel.etp={p.ep}·{p.etp}; "
                              f"launch a multiple of {p.ep * p.etp} ranks or change ep/etp")
    else:
        # Every stage gets world/pp ranks, which both views split again: dense dp×tp, expert edp×ep×etp.
        if world % (p.tp * p.pp):
            raise LayoutError(f"world size {world} is not divisible by parallel.tp·parallel.pp={p.tp}·{p.pp} (each "
                              f"of the {p.pp} pipeline stages needs the same number of ranks, a multiple of tp); "
                              f"launch a multiple of {p.tp * p.pp} ranks or change tp/pp")
        if world % (p.pp * p.ep * p.etp):
            raise LayoutError(f"world size {world} is not divisible by parallel.pp·parallel.ep·parallel.etp="
                              f"{p.pp}·{p.ep}·{p.etp} (each of the {p.pp} pipeline stages holds every expert, split "
                              f"over ep·etp); launch a multiple of {p.pp * p.ep * p.etp} ranks or change pp/ep/etp")
    return ParallelDims(world=world, tp=p.tp, ep=p.ep, etp=p.etp, pp=p.pp)


def _check_pipeline(cfg: Config) -> None:
    """The pipeline's rules that hold for any world size: stages against layers, the schedule against the
    virtual stages and the micro-batches, the engine."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    stages = p.pp * p.pp_virtual
    if p.pp_virtual > 1 and p.pp_schedule != "interleaved":
        raise LayoutError(f"parallel.pp_virtual={p.pp_virtual} needs parallel.pp_schedule=interleaved (got "
                          f"{p.pp_schedule}; only the interleaved schedule runs several model chunks per stage); "
                          "set pp_schedule=interleaved or pp_virtual=1")
    if p.pp_schedule == "interleaved" and (p.pp_virtual < 2 or p.pp < 2):
        raise LayoutError(f"parallel.pp_schedule=interleaved needs parallel.pp >= 2 stages and parallel.pp_virtual "
                          f">= 2 model chunks per stage (got pp={p.pp}, pp_virtual={p.pp_virtual}); set "
                          "pp_virtual=2 or more (and pp >= 2), or use pp_schedule=1f1b")
    if stages > m.n_layers:
        what = (f"parallel.pp·parallel.pp_virtual={p.pp}·{p.pp_virtual}={stages} virtual stages"
                if p.pp_virtual > 1 else f"parallel.pp={p.pp} stages")
        fix = "pp·pp_virtual" if p.pp_virtual > 1 else "pp"
        raise LayoutError(f"{what} for model.n_layers={m.n_layers} layers: every stage needs a layer; lower "
                          f"{fix} to at most {m.n_layers} or add layers")
    if p.pp_layers is not None:
        sizes = list(p.pp_layers)
        if len(sizes) != stages:
            raise LayoutError(f"parallel.pp_layers={sizes} has {len(sizes)} entries but there are "
                              f"parallel.pp·parallel.pp_virtual={p.pp}·{p.pp_virtual}={stages} virtual stages; give "
                              "one layer count per virtual stage in model order, or null for an even split")
        if min(sizes) < 0:
            raise LayoutError(f"parallel.pp_layers={sizes} has a negative entry; give layer counts >= 0")
        if sum(sizes) != m.n_layers:
            raise LayoutError(f"parallel.pp_layers={sizes} sums to {sum(sizes)} but model.n_layers={m.n_layers}; "
                              "make the layer counts add up to n_layers, or null for an even split")
        empty = [v for v in range(1, stages - 1) if sizes[v] == 0]
        if empty:
            raise LayoutError(f"parallel.pp_layers={sizes}: virtual stage {empty[0]} holds no layer; only the first "
                              "and the last may (they still hold the embedding and the head), a middle stage "
                              "without layers would only pass activations on, a pipeline hop for nothing; give it "
                              "a layer or use fewer stages")
    if p.pp_schedule == "interleaved" and t.grad_accum_steps % p.pp:
        up = -(-t.grad_accum_steps // p.pp) * p.pp
        raise LayoutError(f"train.grad_accum_steps={t.grad_accum_steps} with parallel.pp_schedule=interleaved must "
                          f"be a multiple of parallel.pp={p.pp} (the interleaved schedule runs the micro-batches in "
                          f"rounds of pp per model chunk, as Megatron-core's does); set grad_accum_steps={up} or use "
                          "pp_schedule=1f1b")
    if t.engine == "deepspeed" and p.pp > 1:
        raise LayoutError(f"train.engine=deepspeed with parallel.pp={p.pp}: DeepSpeed's pipeline engine needs the "
                          "model as its own PipelineModule and does not compose with these MoE layers' expert "
                          "groups; use train.engine=native for pipeline parallelism, or parallel.pp=1")
    if t.shard_optimizer == "states+grads" and p.pp > 1:
        raise LayoutError(f"train.shard_optimizer=states+grads with parallel.pp={p.pp}: ZeRO-2 does not run with "
                          "pipeline parallelism (it flushes its gradient shards after each micro-batch's backward "
                          "over all of a rank's parameters, which a pipeline schedule splits per stage and chunk); use "
                          "train.shard_optimizer=states (ZeRO-1) or none")


def bubble_fraction(pp: int, micro_batches: int, virtual: int = 1) -> float:
    """Idle share of a pipelined step, (p−1)/(v·m+p−1) for p stages, m micro-batches and v model chunks per
    stage (GPipe and 1F1B: v = 1; the interleaved schedule shrinks the bubble v-fold)."""
    return (pp - 1) / (virtual * micro_batches + pp - 1)


def layout_warnings(cfg: Config, dims: Optional[ParallelDims] = None) -> list[str]:
    """Layouts that run but waste time, one line each naming the field, the value and the fix; the trainer
    prints them on rank 0. `dims` (from check_layout) defaults to the config's own sizes."""
    pp = dims.pp if dims is not None else cfg.parallel.pp
    m = cfg.train.grad_accum_steps
    out = []
    if pp > 1 and m < pp:
        # Interleaved runs need m % pp == 0 (check_layout), so m < pp means v = 1 here.
        out.append(f"train.grad_accum_steps={m} is below parallel.pp={pp}: runs, but the pipeline bubble is "
                   f"(p−1)/(m+p−1) = {bubble_fraction(pp, m):.0%} of the step; raise train.grad_accum_steps (to "
                   f"{4 * pp}: {bubble_fraction(pp, 4 * pp):.0%})")
    return out
