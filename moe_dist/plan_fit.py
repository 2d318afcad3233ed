"""`moe-dist plan CONFIG --world N --fit SIZE`: search the layouts of N ranks for those whose memory per rank
fits SIZE, and rank them by predicted time per token.

The search space, each dimension a config field the trainer reads:
    parallel.tp, parallel.ep, parallel.etp   every divisor of N (ep·etp must divide N too); `check_layout`
                                             judges each, and its message is the rejection reason
    train.shard_optimizer                    none, states, states+grads
    train.recompute                          none, moe_act, moe, block
    train.batch_size (the micro-batch)       1, 2, 4, 8, where it divides the global batch
    parallel.pp                              every divisor of N up to model.n_layers (the outer loop: tp, ep,
                                             etp then split the N/pp ranks of a stage), with the 1f1b schedule
                                             and interleaved with pp_virtual=2 where the micro-batches are a
                                             multiple of pp (its rounds; check_layout judges the rest) (GPipe is
                                             left out: the same bubble as 1F1B and more activations);
                                             the layers split evenly (parallel.pp_layers null)
The global batch is held fixed, so every candidate trains the same thing: the config's own
train.batch_size · train.grad_accum_steps · dp sequences (dp = N / (parallel.tp · parallel.pp) of the config),
each candidate making it up with grad_accum_steps = global / (micro-batch · its dp), which are also its pipeline
micro-batches. Memory is `plan.memory_per_rank` of the heaviest pipeline stage; time is `alpha_beta.estimate` with
the default H100 constants (the bubble and the P2P transfers included), compared per token so that micro-batches
compare. Layouts with fewer micro-batches than stages (grad_accum_steps < pp, the case the trainer warns about)
rank after every other fitting layout, whatever their predicted time. Only the native engine is modelled
(DeepSpeed shards by its own ZeRO stage).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass
from typing import Any

from moe_dist.bench import alpha_beta as ab
from moe_dist.config import Config, ConfigError, validate
from moe_dist.parallel.layout import check_layout
from moe_dist.parallel.topology import ParallelDims
from moe_dist.plan import Memory, activation_parts, heaviest_stage, memory_per_rank, memory_terms, param_counts

MICRO_BATCHES = (1, 2, 4, 8)
SHARD_MODES = ("none", "states", "states+grads")
RECOMPUTE_MODES = ("none", "moe_act", "moe", "block")
SHOWN = 5
# A layout fits when its predicted total stays under (1 - HEADROOM)·SIZE. The rest is for what the estimate
# leaves out: the CUDA context and the cuBLAS/NCCL workspaces (1-2 GiB), the caching allocator's fragmentation
# (typically 5-10% of what is allocated) and transient buffers (the logits' gradient, all-to-all receive
# buffers, the optimizer step's temporaries).
HEADROOM = 0.10
# The native engine does not overlap its gradient reduction with backward: none/states reduce after the last
# micro-batch's backward, and states+grads issues each bucket's reduce-scatter from a backward hook as a blocking
# collective, which the compute stream waits for. So the whole reduction is on the step's critical path.
ENGINE_OVERLAPS_GRAD_REDUCTION = False
EXIT_NOTHING_FITS = 1

_UNITS = {"GiB": 2**30, "GB": 10**9, "MiB": 2**20, "MB": 10**6, "TiB": 2**40, "TB": 10**12}
_FORMS = "a number with a unit (80GiB, 80GB; also MiB, MB, TiB, TB) or a byte count (8e10)"


def parse_size(text: str) -> int:
    """Bytes from `80GiB`, `80GB`, `8e10`. A bare G/M/T is refused: it could mean either power."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2) if m else ""
    if not m or (unit and unit not in _UNITS):
        hint = (f" ('{unit}' is ambiguous: write {m.group(1)}GiB for 2^30 bytes or {m.group(1)}GB for 10^9)"
                if m and unit.upper() in ("G", "M", "T", "GI", "MI", "TI") else "")
        raise ConfigError(f"--fit {text!r}: not a memory size{hint}; write {_FORMS}")
    size = float(m.group(1)) * _UNITS.get(unit, 1)
    if not math.isfinite(size) or size < 2**20:
        raise ConfigError(f"--fit {text!r}: {size:g} bytes is below 1 MiB (a bare number counts bytes); "
                          f"write {_FORMS}")
    return int(size)


@dataclass(frozen=True)
class Candidate:
    cfg: Config
    dims: ParallelDims
    memory: Memory
    step: ab.StepEstimate

    @property
    def tokens_per_rank(self) -> float:
        t = self.cfg.train
        return t.batch_size * t.seq_len * t.grad_accum_steps * self.dims.dp / self.dims.world

    @property
    def seconds_per_token(self) -> float:
        """Step time over the tokens one rank trains in it (tp ranks share theirs)."""
        return self.step.step_s / self.tokens_per_rank

    @property
    def few_micro_batches(self) -> bool:
        """Fewer micro-batches than pipeline stages: most of the step is bubble."""
        return self.cfg.train.grad_accum_steps < self.dims.pp

    def settings(self) -> dict[str, Any]:
        t, d, p = self.cfg.train, self.dims, self.cfg.parallel
        return {"tp": d.tp, "ep": d.ep, "etp": d.etp, "dp": d.dp, "edp": d.edp, "pp": d.pp,
                "pp_virtual": p.pp_virtual, "pp_schedule": p.pp_schedule if d.pp > 1 else "none",
                "shard_optimizer": t.shard_optimizer, "recompute": t.recompute, "batch_size": t.batch_size,
                "grad_accum_steps": t.grad_accum_steps}

    def overrides(self) -> str:
        s = self.settings()
        pp = f"--parallel.pp={s['pp']} --parallel.pp_virtual={s['pp_virtual']} "
        if s["pp"] > 1:
            pp += f"--parallel.pp_schedule={s['pp_schedule']} "
        return (f"--parallel.tp={s['tp']} --parallel.ep={s['ep']} --parallel.etp={s['etp']} {pp}"
                f"--train.shard_optimizer={s['shard_optimizer']} --train.recompute={s['recompute']} "
                f"--train.batch_size={s['batch_size']} --train.grad_accum_steps={s['grad_accum_steps']}")


@dataclass
class FitResult:
    world: int
    limit: int
    global_batch: int                  # sequences per optimizer step
    usable: int = 0                    # limit less HEADROOM: what a layout's predicted total must stay under
    considered: int = 0
    valid: int = 0
    fits: list[Candidate] = dataclasses.field(default_factory=list)
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)         # reason → candidates
    too_big: dict[tuple[int, ...], Candidate] = dataclasses.field(default_factory=dict)  # smallest per layout


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


PIPELINES = (("1f1b", 1), ("interleaved", 2))    # (schedule, pp_virtual) tried for every pp > 1


def _layouts(world: int, n_layers: int):
    """(pp, schedule, virtual, tp, ep, etp): pp dividing the world (at most one stage per layer), then tp, ep,
    etp each dividing the world/pp ranks of a stage (ep·etp too); check_layout judges the rest."""
    for pp in _divisors(world):
        if pp > n_layers:
            continue
        stage = world // pp
        for sched, v in (PIPELINES if pp > 1 else (("1f1b", 1),)):
            for tp in _divisors(stage):
                for ep in _divisors(stage):
                    for etp in _divisors(stage // ep):
                        yield pp, sched, v, tp, ep, etp


def global_batch(cfg: Config, world: int) -> int:
    """Sequences per optimizer step in the config's own layout: batch_size · grad_accum_steps · world/(tp·pp)."""
    t, p = cfg.train, cfg.parallel
    return t.batch_size * t.grad_accum_steps * max(1, world // max(1, p.tp * p.pp))


def _candidate(cfg: Config, pp: int, sched: str, v: int, tp: int, ep: int, etp: int, mb: int, accum: int) -> Config:
    par = dataclasses.replace(cfg.parallel, tp=tp, ep=ep, etp=etp, pp=pp, pp_virtual=v, pp_schedule=sched,
                              pp_layers=None)
    return dataclasses.replace(cfg, parallel=par,
                               train=dataclasses.replace(cfg.train, batch_size=mb, grad_accum_steps=accum))


def search(cfg: Config, world: int, limit: int, net: ab.Network = ab.Network(),
           comp: ab.Compute = ab.Compute()) -> FitResult:
    """Every candidate of the module docstring's space, judged, sized and timed; `fits` sorted fastest first."""
    if cfg.train.engine != "native":
        raise ConfigError(f"train.engine={cfg.train.engine!r}: --fit models the native engine's memory; run it "
                          "with --train.engine=native")
    gb = global_batch(cfg, world)
    res = FitResult(world, limit, gb, usable=int(limit * (1 - HEADROOM)))
    for layout in _layouts(world, cfg.model.n_layers):
        for mb in MICRO_BATCHES:
            _judge(cfg, world, layout, mb, res, net, comp)
    res.fits.sort(key=lambda c: (c.few_micro_batches, c.seconds_per_token, c.memory.total))
    return res


def _key(c: Candidate) -> tuple[int, ...]:
    """The layout of a candidate, for the rejection list: (pp, pp_virtual, tp, ep, etp)."""
    return c.dims.pp, c.cfg.parallel.pp_virtual, c.dims.tp, c.dims.ep, c.dims.etp


def _judge(cfg: Config, world: int, layout: tuple, mb: int, res: FitResult,
           net: ab.Network, comp: ab.Compute) -> None:
    pp, sched, v, tp, ep, etp = layout
    n_modes = len(SHARD_MODES) * len(RECOMPUTE_MODES)
    dp = world // (tp * pp) if world % (tp * pp) == 0 else 0
    if sched == "interleaved" and dp and (res.global_batch // (mb * dp)) % pp:
        return              # interleaving needs micro-batches in rounds of pp: not a candidate (1F1B covers it)
    res.considered += n_modes
    if dp and res.global_batch % (mb * dp):
        reason = (f"micro-batch {mb} at dp={dp}: the global batch of {res.global_batch} sequences is not "
                  f"a multiple of batch_size·dp={mb * dp}")
        res.rejected[reason] = res.rejected.get(reason, 0) + n_modes
        return
    base = _candidate(cfg, pp, sched, v, tp, ep, etp, mb, max(1, res.global_batch // (mb * max(1, dp))))
    try:
        validate(base)
        dims = check_layout(base, world)
    except ConfigError as e:                         # a LayoutError too: check_layout's one message
        res.rejected[str(e)] = res.rejected.get(str(e), 0) + n_modes
        return
    params = param_counts(base, dims) if pp == 1 else None      # pipeline stages: each stage counts its own
    for shard in SHARD_MODES:
        sharded = dataclasses.replace(base, train=dataclasses.replace(base.train, shard_optimizer=shard))
        try:
            check_layout(sharded, world)             # e.g. ZeRO-2 with pipeline stages
        except ConfigError as e:
            res.rejected[str(e)] = res.rejected.get(str(e), 0) + len(RECOMPUTE_MODES)
            continue
        res.valid += len(RECOMPUTE_MODES)
        for rc in RECOMPUTE_MODES:
            c = dataclasses.replace(sharded, train=dataclasses.replace(sharded.train, recompute=rc))
            mem = memory_per_rank(c, dims, params)
            cand = Candidate(c, dims, mem, ab.estimate(c, dims, net, comp,
                                                       overlap_dp=ENGINE_OVERLAPS_GRAD_REDUCTION))
            if mem.total <= res.usable:
                res.fits.append(cand)
            else:
                key = _key(cand)
                if key not in res.too_big or mem.total < res.too_big[key].memory.total:
                    res.too_big[key] = cand


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def constants(net: ab.Network, comp: ab.Compute) -> dict[str, float]:
    return {"dense_gemm_tflops": comp.dense_tflops, "grouped_gemm_tflops": comp.expert_tflops,
            "attention_tflops": comp.attention_tflops, "hbm_tbps": comp.hbm_tbps,
            "memory_bound_efficiency": comp.memory_bound_efficiency, "nvlink_gbps": net.intra_gbps,
            "infiniband_gbps": net.inter_gbps, "gpus_per_node": net.gpus_per_node,
            "grad_reduction_overlapped": ENGINE_OVERLAPS_GRAD_REDUCTION}


def _rejections(res: FitResult) -> list[dict[str, Any]]:
    """One entry per kind: each distinct layout message, and each (tp, ep, etp) whose every option needs more
    memory than the limit (with its smallest need). Layouts of which some option fits are not listed."""
    fitting = {_key(c) for c in res.fits}
    out = [{"reason": r, "candidates": n} for r, n in res.rejected.items()]
    for key, c in sorted(res.too_big.items()):
        if key in fitting:
            continue
        s = c.settings()
        pp, v, tp, ep, etp = key
        where = (f"pp={pp}{f' (virtual {v})' if v > 1 else ''} " if pp > 1 else "")
        out.append({"reason": f"{where}tp={tp} ep={ep} etp={etp}: needs {_gib(c.memory.total)} per rank at the least "
                              f"(shard_optimizer={s['shard_optimizer']}, recompute={s['recompute']}, "
                              f"micro-batch {s['batch_size']}) > {_gib(res.usable)} usable",
                    "needs_bytes": c.memory.total})
    return out


def _row(c: Candidate) -> dict[str, Any]:
    m, e = c.memory, c.step
    return {"settings": c.settings(), "overrides": c.overrides(),
            "memory_bytes": dataclasses.asdict(m) | {"total": m.total},
            "memory_terms": memory_terms(c.cfg, c.dims),
            "activations_bytes": activation_parts(c.cfg, c.dims, heaviest_stage(c.cfg, c.dims)),
            "step_s": e.step_s, "seconds_per_token": c.seconds_per_token,
            "heaviest_stage": heaviest_stage(c.cfg, c.dims), "bubble_fraction": e.bubble_fraction,
            "tokens_per_s_per_gpu": e.tokens_per_s_per_gpu, "tflops_per_gpu": e.tflops_per_gpu,
            "step_terms_s": e.terms(), "dp_reduction_total_s": e.dp_total_s}


def to_json(res: FitResult, net: ab.Network, comp: ab.Compute) -> dict[str, Any]:
    return {"world": res.world, "limit_bytes": res.limit, "usable_bytes": res.usable, "headroom": HEADROOM,
            "global_batch_sequences": res.global_batch,
            "micro_batches": list(MICRO_BATCHES), "considered": res.considered, "valid": res.valid,
            "fitting": len(res.fits), "constants": constants(net, comp),
            "best": [_row(c) for c in res.fits[:SHOWN]], "rejected": _rejections(res)}


def format_fit(res: FitResult, title: str, net: ab.Network, comp: ab.Compute) -> str:
    seq = res.fits[0].cfg.train.seq_len if res.fits else None
    out = [f"moe-dist plan --fit {_gib(res.limit)} ({res.limit:,} bytes): {title} on {res.world} ranks",
           f"a layout fits when its predicted total is at most {_gib(res.usable)} ({HEADROOM:.0%} kept for the CUDA "
           "context, NCCL/cuBLAS workspaces, allocator fragmentation and transient buffers)",
           f"global batch {res.global_batch} sequences per step (the config's batch_size·grad_accum_steps·dp, "
           f"kept fixed); micro-batches {', '.join(map(str, MICRO_BATCHES))} where they divide it",
           f"searched {res.considered} candidates: {res.valid} valid layouts, {len(res.fits)} fit",
           "constants: dense GEMM {dense_gemm_tflops:g}, grouped GEMM {grouped_gemm_tflops:g}, attention "
           "{attention_tflops:g} TFLOP/s; HBM {hbm_tbps:g} TB/s × {memory_bound_efficiency:g}; NVLink "
           "{nvlink_gbps:g} GB/s, InfiniBand {infiniband_gbps:g} GB/s per GPU, {gpus_per_node} GPUs per node; "
           "gradient reduction not overlapped with backward (the native engine's)"
           .format(**constants(net, comp)), ""]
    if res.fits:
        out.append(f"best {min(SHOWN, len(res.fits))} (fastest per token first; memory in GiB per rank; micro-batches "
                   f"of {seq}-token sequences × accumulation steps):")
        out.append(f"  {'#':>2} {'pp':>3} {'tp':>3} {'ep':>3} {'etp':>3} {'schedule':<14}{'shard':<13}"
                   f"{'recompute':<10}{'mb×acc':>7}{'weights':>10}{'grads':>10}{'optim':>10}{'acts':>10}"
                   f"{'total':>10}{'step s':>9}{'bubble':>8}{'tok/s/GPU':>11}{'TFLOP/s':>9}")
        for i, c in enumerate(res.fits[:SHOWN], 1):
            s, m, e = c.settings(), c.memory, c.step
            sched = (s["pp_schedule"] + (f"×{s['pp_virtual']}" if s["pp_virtual"] > 1 else "")) if s["pp"] > 1 else "-"
            out.append(f"  {i:>2} {s['pp']:>3} {s['tp']:>3} {s['ep']:>3} {s['etp']:>3} {sched:<14}"
                       f"{s['shard_optimizer']:<13}"
                       f"{s['recompute']:<10}{str(s['batch_size']) + '×' + str(s['grad_accum_steps']):>7}"
                       + "".join(f"{v / 2**30:>10.1f}" for v in (m.weights, m.grads, m.optimizer, m.activations,
                                                                 m.total))
                       + f"{e.step_s:>9.3f}{e.bubble_fraction:>8.1%}{e.tokens_per_s_per_gpu:>11,.0f}"
                       f"{e.tflops_per_gpu:>9.0f}")
        best = res.fits[0]
        stage = (f" (stage {heaviest_stage(best.cfg, best.dims)}, the heaviest of {best.dims.pp})"
                 if best.dims.pp > 1 else "")
        out += ["", "  the best layout's overrides:", f"    {best.overrides()}",
                "  its step: " + ", ".join(f"{k} {v:.3f} s" for k, v in best.step.terms().items() if v),
                f"  its memory{stage}: " + "; ".join(f"{k} = {v}" for k, v in
                                                     memory_terms(best.cfg, best.dims).items())]
    rej = _rejections(res)
    if rej:
        out += ["", "rejected:"]
        out += [f"  {r['reason']}  [{r['candidates']} candidates]" for r in rej if "candidates" in r]
        # Memory: the layouts closest to fitting (every one of them is in --json).
        big = sorted((r for r in rej if "needs_bytes" in r), key=lambda r: r["needs_bytes"])
        out += [f"  {r['reason']}" for r in big[:SHOWN]]
        if len(big) > SHOWN:
            out.append(f"  ... and {len(big) - SHOWN} more layouts that need more memory (--json lists them)")
    return "\n".join(out)


def cmd_fit(cfg: Config, world: int, args) -> int:
    """`plan --fit SIZE`: print the best layouts (or JSON with --json); exit 1 when none fits."""
    limit = parse_size(args.fit)
    net, comp = ab.Network(), ab.Compute()
    res = search(cfg, world, limit, net, comp)
    print(json.dumps(to_json(res, net, comp), indent=1) if getattr(args, "json", False)
          else format_fit(res, getattr(args, "config", ""), net, comp))
    if res.fits:
        return 0
    smallest = min(res.too_big.values(), key=lambda c: c.memory.total, default=None)
    need = (f"the smallest valid layout needs {_gib(smallest.memory.total)} per rank ({smallest.overrides()})"
            if smallest else "no layout of these ranks is valid (see 'rejected')")
    hint = "; train.dtype=bfloat16 halves the weights" if cfg.train.dtype == "float32" else ""
    print(f"moe-dist: plan error: no layout of {world} ranks fits {_gib(limit)} ({_gib(res.usable)} usable): "
          f"{need}; use more ranks, a "
          f"larger memory or a shorter train.seq_len{hint}", file=sys.stderr)
    return EXIT_NOTHING_FITS
