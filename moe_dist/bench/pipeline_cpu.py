"""Pipeline step time on CPU ranks that share cores: the schedule's timeline when the stages' ranks compete for
`cores` cores (the measured-vs-model check of benchmarks/pipeline.py).

The alpha-beta model (`alpha_beta.estimate`) gives every rank its own device: a pipelined step is m slots of the
slowest stage plus the bubble, (p-1) slots (1F1B, GPipe) or (p-1)/v (interleaved), so the idle share is
(p-1)/(m+p-1) or (p-1)/(v·m+p-1). gloo ranks on a few cores break that assumption: while one stage idles in the
fill or drain, the others get its cores. `simulate` runs every pp rank's action list
(`moe_dist.pipeline.schedules.build_schedule`, the runtime's own order) with the dataflow dependencies

    F(v, micro) after F(v-1, micro);   B(v, micro) after B(v+1, micro) and F(v, micro)   (v = virtual stage)

and processor sharing: while A stages compute, each of their `ranks_per_stage` ranks runs at
min(1, cores / (A · ranks_per_stage)) of its full speed (one thread per rank, the scheduler sharing the cores
evenly). `f_s` and `b_s` are one chunk's forward and backward at full speed (one core per rank); transfers cost
`transfer_s` each, on the critical path (a send waits for its receive: gloo's rendezvous). With cores >= every
rank this is the dedicated-device timeline: makespan (m+p-1)·(f+b) for 1F1B with equal stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from moe_dist.pipeline.schedules import Action, build_schedule


@dataclass(frozen=True)
class Timeline:
    makespan_s: float
    busy_s: tuple[float, ...]          # per pp rank: time spent computing (at whatever speed it got)
    work_s: tuple[float, ...]          # per pp rank: its work at full speed (the same time with a core each)

    @property
    def idle_s(self) -> tuple[float, ...]:
        return tuple(self.makespan_s - b for b in self.busy_s)

    @property
    def bubble_fraction(self) -> tuple[float, ...]:
        """Per pp rank: the share of the step it waits (neither computing nor done)."""
        return tuple(i / self.makespan_s for i in self.idle_s) if self.makespan_s else ()


def simulate(kind: str, pp: int, virtual: int, micro_batches: int, f_s: Sequence[float] | float,
             b_s: Sequence[float] | float, ranks_per_stage: int = 1, cores: float = float("inf"),
             transfer_s: float = 0.0) -> Timeline:
    """The step's timeline (module docstring). `f_s`/`b_s`: one value for every chunk, or one per virtual stage
    (index v = pp rank + chunk·pp)."""
    n_v = pp * virtual
    f = [f_s] * n_v if isinstance(f_s, (int, float)) else list(f_s)
    b = [b_s] * n_v if isinstance(b_s, (int, float)) else list(b_s)
    if len(f) != n_v or len(b) != n_v:
        raise ValueError(f"f_s and b_s need one value per virtual stage ({n_v}), got {len(f)} and {len(b)}")
    plans: list[list[Action]] = [build_schedule(kind, pp, virtual, micro_batches, r) for r in range(pp)]
    done: dict[tuple[str, int, int], float] = {}
    pos = [0] * pp
    ready_at = [0.0] * pp              # when the rank may start its next action (its last one ended)
    running: dict[int, list] = {}      # pp rank → [action, remaining full-speed work, started]
    busy = [0.0] * pp
    now = 0.0

    def deps(r: int, a: Action) -> list[tuple[str, int, int]]:
        v = r + a.chunk * pp
        if a.kind == "F":
            return [("F", v - 1, a.micro)] if v > 0 else []
        return ([("B", v + 1, a.micro)] if v < n_v - 1 else []) + [("F", v, a.micro)]

    def start_ready() -> None:
        for r in range(pp):
            if r in running or pos[r] >= len(plans[r]):
                continue
            a = plans[r][pos[r]]
            ds = deps(r, a)
            if all(d in done for d in ds):
                # A dependency on another rank's result arrives one transfer after it finished.
                arrive = max([ready_at[r]] + [done[d] + (transfer_s if _rank(d, pp) != r else 0.0) for d in ds])
                if arrive <= now + 1e-15:
                    v = r + a.chunk * pp
                    running[r] = [a, f[v] if a.kind == "F" else b[v]]

    def next_arrival() -> float:
        """The earliest future time a blocked rank's inputs arrive (transfers in flight)."""
        t = float("inf")
        for r in range(pp):
            if r in running or pos[r] >= len(plans[r]):
                continue
            ds = deps(r, plans[r][pos[r]])
            if all(d in done for d in ds):
                arrive = max([ready_at[r]] + [done[d] + (transfer_s if _rank(d, pp) != r else 0.0) for d in ds])
                if arrive > now:
                    t = min(t, arrive)
        return t

    while any(pos[r] < len(plans[r]) for r in range(pp)):
        start_ready()
        if not running:
            t = next_arrival()
            if t == float("inf"):
                raise RuntimeError(f"deadlock at t={now}: ranks wait at "
                                   f"{ {r: plans[r][pos[r]] for r in range(pp) if pos[r] < len(plans[r])} }")
            now = t
            continue
        speed = min(1.0, cores / (len(running) * ranks_per_stage))
        # Advance to the first completion or the first arrival that could start another stage (speeds change).
        finish = min(rem for _, rem in running.values()) / speed
        step = min(finish, next_arrival() - now)
        for r, item in running.items():
            item[1] -= step * speed
            busy[r] += step
        now += step
        for r in [r for r, (_, rem) in running.items() if rem <= 1e-12]:
            a, _ = running.pop(r)
            done[(a.kind, r + a.chunk * pp, a.micro)] = now
            ready_at[r] = now
            pos[r] += 1
    work = [sum((f if a.kind == "F" else b)[r + a.chunk * pp] for a in plans[r]) for r in range(pp)]
    return Timeline(now, tuple(busy), tuple(work))


def _rank(key: tuple[str, int, int], pp: int) -> int:
    return key[1] % pp
