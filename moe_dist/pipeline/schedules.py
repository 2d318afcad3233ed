"""Pipeline schedules as pure per-rank action lists, and the point-to-point plan that executes them.

A schedule says, for one pp rank, in which order it runs the forward (F) and backward (B) of each
(micro-batch, local model chunk). Local chunk c of pp rank r is virtual stage v = r + c·pp (Megatron-core's
interleaving; moe_dist.pipeline.stages). Three kinds:

    gpipe        every F (micro-batches in order), then every B           in flight on a stage: m
    1f1b         warm-up of pp−r−1 F, steady F/B pairs, cool-down of B     in flight on stage r: min(pp−r, m)
    interleaved  1F1B over `virtual` chunks per rank (Megatron-core's order: micro-batches in groups of pp,
                 each group through chunk 0, then chunk 1, ...; backward mirrors it from the last chunk);
                 warm-up (pp−r−1)·2 + (virtual−1)·pp F (all of them when m == pp); needs m % pp == 0.
                 In flight on rank r: min((pp−r−1)·2 + (virtual−1)·pp + 1, m·virtual) (micro, chunk) pairs,
                 m·virtual when m == pp.

With a backward twice a forward and free transfers, all three idle (p−1)/(v·m+p−1) of the step (v = 1 for gpipe
and 1f1b): `simulate` reproduces it exactly (tested).

`exchanges` turns a rank's actions into the batches of sends and receives the runtime posts between them:
the send of action i's result and the receive of action i+1's input form one batch (Megatron-core's
send_forward_recv_backward and friends), every op of a batch completes before the next action runs. Both
the dataflow (`simulate`) and these batches (`simulate_exchanges`, a rendezvous model where a send completes
only when its receive is posted: gloo's and NCCL's behaviour) are checked by the tests for every schedule
the layout check admits, so the runtime cannot deadlock by construction.

Everything here is arithmetic: no torch, no process group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

KINDS = ("gpipe", "1f1b", "interleaved")


@dataclass(frozen=True)
class Action:
    kind: Literal["F", "B"]
    micro: int
    chunk: int          # local model chunk c (virtual stage pp_rank + c·pp)


def check_schedule(kind: str, pp: int, virtual: int, micro_batches: int) -> None:
    """Raise ValueError naming the value and the fix when no schedule of `kind` exists for these sizes
    (moe_dist.parallel.layout judges the config fields; this guards direct callers)."""
    if kind not in KINDS:
        raise ValueError(f"pipeline schedule '{kind}' is unknown; use one of {', '.join(KINDS)}")
    if pp < 1 or virtual < 1 or micro_batches < 1:
        raise ValueError(f"pp={pp}, virtual={virtual}, micro_batches={micro_batches}: each must be >= 1")
    if virtual > 1 and kind != "interleaved":
        raise ValueError(f"virtual={virtual} model chunks per rank need the 'interleaved' schedule, not '{kind}'")
    if kind == "interleaved" and micro_batches % pp:
        raise ValueError(f"the interleaved schedule runs micro-batches in groups of pp={pp}: micro_batches="
                         f"{micro_batches} must be a multiple of {pp} (set train.grad_accum_steps to one)")


def _interleaved_warmup(pp: int, virtual: int, m: int, r: int) -> int:
    # With micro_batches == pp every rank runs all forwards first (as Megatron-core does): the steady F/B pairs
    # would each wait for a gradient that only arrives after the pair.
    return m * virtual if m == pp else min((pp - r - 1) * 2 + (virtual - 1) * pp, m * virtual)


def _interleaved(pp: int, virtual: int, m: int, r: int) -> list[Action]:
    """Megatron-core's forward_backward_pipelining_with_interleaving, as a list."""
    total = m * virtual
    group = pp * virtual

    def at(k: int, forward: bool) -> tuple[int, int]:
        chunk = (k % group) // pp
        return (k // group) * pp + k % pp, (chunk if forward else virtual - 1 - chunk)

    warmup = _interleaved_warmup(pp, virtual, m, r)
    out = [Action("F", *at(k, True)) for k in range(warmup)]
    for k in range(total - warmup):
        out.append(Action("F", *at(k + warmup, True)))
        out.append(Action("B", *at(k, False)))
    out += [Action("B", *at(k, False)) for k in range(total - warmup, total)]
    return out


def build_schedule(kind: str, pp: int, virtual: int, micro_batches: int, pp_rank: int) -> list[Action]:
    """The ordered actions of pp rank `pp_rank`: one F and one B per (micro-batch, local chunk)."""
    check_schedule(kind, pp, virtual, micro_batches)
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp rank {pp_rank} is outside 0..{pp - 1}")
    m = micro_batches
    if kind == "gpipe":
        return [Action("F", i, 0) for i in range(m)] + [Action("B", i, 0) for i in range(m)]
    if kind == "interleaved":
        return _interleaved(pp, virtual, m, pp_rank)
    warmup = min(pp - pp_rank - 1, m)
    out = [Action("F", i, 0) for i in range(warmup)]
    for i in range(m - warmup):
        out += [Action("F", warmup + i, 0), Action("B", i, 0)]
    return out + [Action("B", i, 0) for i in range(m - warmup, m)]


def kind_of(actions: Sequence[Action], pp: int, virtual: int, micro_batches: int, pp_rank: int) -> str:
    """Which schedule `actions` is (the runtime runs only lists whose transfer plan is proven here). A list that
    two kinds share (e.g. interleaved with virtual = 1 on the last rank is 1F1B's) gets the same transfers
    under either (tested)."""
    actions = list(actions)
    for kind in KINDS:
        try:
            if build_schedule(kind, pp, virtual, micro_batches, pp_rank) == actions:
                return kind
        except ValueError:
            continue
    raise ValueError(f"the actions of pp rank {pp_rank} are not a gpipe, 1f1b or interleaved schedule for pp={pp}, "
                     f"virtual={virtual}, micro_batches={micro_batches}; build them with build_schedule")


def forward_schedule(pp: int, virtual: int, micro_batches: int, pp_rank: int) -> list[Action]:
    """Forward only (evaluation): micro-batches in groups of pp (the last one may be smaller), each group through
    chunk 0, then chunk 1, ... (the forward order of the interleaved schedule; with virtual = 1 simply the
    micro-batches in order). Any micro_batches works."""
    if pp < 1 or virtual < 1 or micro_batches < 1:
        raise ValueError(f"pp={pp}, virtual={virtual}, micro_batches={micro_batches}: each must be >= 1")
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp rank {pp_rank} is outside 0..{pp - 1}")
    return [Action("F", m, c) for start in range(0, micro_batches, pp) for c in range(virtual)
            for m in range(start, min(start + pp, micro_batches))]


def in_flight(actions: Sequence[Action]) -> int:
    """Peak number of (micro-batch, chunk) pairs whose forward ran and whose backward has not: the activations
    a rank holds at once (1F1B: pp − stage; GPipe: micro-batches; interleaved: its warm-up + 1, in chunk units)."""
    live, peak = 0, 0
    for a in actions:
        live += 1 if a.kind == "F" else -1
        peak = max(peak, live)
    return peak


# ------------------------------------------------------------------------------------------- dataflow

def _deps(a: Action, pp_rank: int, pp: int, virtual: int) -> list[tuple[str, int, int]]:
    """The (kind, virtual stage, micro) results action `a` waits for: F(v, m) needs F(v−1, m); B(v, m) needs
    B(v+1, m) and F(v, m)."""
    v = pp_rank + a.chunk * pp
    if a.kind == "F":
        return [("F", v - 1, a.micro)] if v > 0 else []
    return ([("B", v + 1, a.micro)] if v < pp * virtual - 1 else []) + [("F", v, a.micro)]


def simulate(schedules: Sequence[Sequence[Action]], virtual: int = 1, f_time: float = 1.0,
             b_time: float = 2.0) -> tuple[float, list[list[tuple[float, float, Action]]]]:
    """Run every rank's list (index = pp rank) with the dataflow dependencies, transfers free and instant.
    Returns (makespan, per rank [(start, end, action)]); raises RuntimeError on a deadlock (no rank can
    proceed) or a missing/duplicate action. f_time and b_time are the durations of one chunk's F and B:
    the makespan minus the ideal m·virtual·(f+b) is the bubble."""
    pp = len(schedules)
    done: dict[tuple[str, int, int], float] = {}
    pos = [0] * pp
    clock = [0.0] * pp
    timeline: list[list[tuple[float, float, Action]]] = [[] for _ in range(pp)]
    while any(pos[r] < len(schedules[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while pos[r] < len(schedules[r]):
                a = schedules[r][pos[r]]
                deps = _deps(a, r, pp, virtual)
                if any(d not in done for d in deps):
                    break
                key = (a.kind, r + a.chunk * pp, a.micro)
                if key in done:
                    raise RuntimeError(f"rank {r} runs {a} twice")
                start = max([clock[r]] + [done[d] for d in deps])
                clock[r] = done[key] = start + (f_time if a.kind == "F" else b_time)
                timeline[r].append((start, clock[r], a))
                pos[r] += 1
                progressed = True
        if not progressed:
            stuck = {r: schedules[r][pos[r]] for r in range(pp) if pos[r] < len(schedules[r])}
            raise RuntimeError(f"deadlock: ranks wait at {stuck}")
    return max(clock, default=0.0), timeline


# ------------------------------------------------------------------------------------ point-to-point plan

@dataclass(frozen=True)
class Transfer:
    """One send or receive of a pipeline step. `what` is "activation" (output of virtual stage `stage` going
    to stage+1) or "gradient" (gradient of the input of `stage` going to stage−1); `stage` is always the
    sender's virtual stage, so both ends of one message carry the same (what, stage, micro)."""
    op: Literal["send", "recv"]
    what: Literal["activation", "gradient"]
    stage: int
    micro: int
    peer: int           # pp rank of the other end

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.what, self.stage, self.micro)


def _recv_before(a: Action, r: int, pp: int, virtual: int) -> Optional[Transfer]:
    v = r + a.chunk * pp
    if a.kind == "F":
        return Transfer("recv", "activation", v - 1, a.micro, (v - 1) % pp) if v > 0 else None
    return Transfer("recv", "gradient", v + 1, a.micro, (v + 1) % pp) if v < pp * virtual - 1 else None


def _send_after(a: Action, r: int, pp: int, virtual: int) -> Optional[Transfer]:
    v = r + a.chunk * pp
    if a.kind == "F":
        return Transfer("send", "activation", v, a.micro, (v + 1) % pp) if v < pp * virtual - 1 else None
    return Transfer("send", "gradient", v, a.micro, (v - 1) % pp) if v > 0 else None


def _groups(kind: str, actions: Sequence[Action], pp_rank: int, pp: int, virtual: int) -> list[list[Action]]:
    """The runs of actions with no transfer between them. Interleaved: each steady-state F with the B after it
    (Megatron-core exchanges once per F/B pair there; its longer warm-up gives the slack that needs). 1F1B and
    GPipe: every action alone (a pair would wait for a gradient the next stage only sends after the pair)."""
    if kind != "interleaved":
        return [[a] for a in actions]
    warmup = _interleaved_warmup(pp, virtual, len(actions) // (2 * virtual), pp_rank)
    steady = len(actions) - 2 * warmup          # 2 · (total − warmup) actions in F/B pairs
    return ([[a] for a in actions[:warmup]]
            + [list(actions[i:i + 2]) for i in range(warmup, warmup + steady, 2)]
            + [[a] for a in actions[warmup + steady:]])


def exchanges(kind: str, actions: Sequence[Action], pp_rank: int, pp: int,
              virtual: int) -> list[tuple[list[Transfer], list[Action]]]:
    """The rank's step as [(transfer batch, actions)]: post the batch, wait for all of it, run the actions;
    the last entry holds the final sends and no action. A batch holds the sends of the previous actions'
    results (sends first) and the receives of the next actions' inputs (Megatron-core's
    send_forward_recv_backward and friends). Hand-overs between two chunks of the same rank (pp=1) are
    local, not transfers."""
    out: list[tuple[list[Transfer], list[Action]]] = []
    prev: list[Action] = []
    for group in _groups(kind, actions, pp_rank, pp, virtual) + [[]]:
        sends = [_send_after(a, pp_rank, pp, virtual) for a in prev]
        recvs = [_recv_before(a, pp_rank, pp, virtual) for a in group]
        batch = [t for t in sends + recvs if t is not None and t.peer != pp_rank]
        out.append((batch, group))
        prev = group
    return out


def simulate_exchanges(plans: Sequence[Sequence[Sequence[Transfer]]]) -> None:
    """Check the batches of every pp rank (index = pp rank) against a rendezvous model: a rank posts its next
    batch once the current one completed; a transfer completes when the other end has posted the matching
    transfer; a batch completes when all its transfers have. Also checks that between every pair of ranks the
    messages are posted in the same order at both ends (what in-order matching needs, e.g. NCCL, which has no
    tags). Raises RuntimeError on a deadlock or an order mismatch."""
    pp = len(plans)
    order: dict[tuple[int, int, str], list] = {}
    for r, plan in enumerate(plans):
        for batch in plan:
            for t in batch:
                src, dst = (r, t.peer) if t.op == "send" else (t.peer, r)
                order.setdefault((src, dst, t.op), []).append(t.key)
    for (src, dst, op), keys in order.items():
        if op == "send" and keys != order.get((src, dst, "recv"), []):
            raise RuntimeError(f"rank {src} sends to rank {dst} in the order {keys} but rank {dst} receives "
                               f"{order.get((src, dst, 'recv'), [])}")
    pos = [0] * pp
    done: list[set] = [set() for _ in range(pp)]       # transfers of the current batch that completed
    while any(pos[r] < len(plans[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            if pos[r] >= len(plans[r]):
                continue
            for t in plans[r][pos[r]]:
                if t in done[r]:
                    continue
                peer_batch = plans[t.peer][pos[t.peer]] if pos[t.peer] < len(plans[t.peer]) else []
                want = Transfer("recv" if t.op == "send" else "send", t.what, t.stage, t.micro, r)
                if want in peer_batch:
                    done[r].add(t)
                    done[t.peer].add(want)
                    progressed = True
            if all(t in done[r] for t in plans[r][pos[r]]):
                pos[r] += 1
                done[r] = set()
                progressed = True
        if not progressed:
            stuck = {r: plans[r][pos[r]] for r in range(pp) if pos[r] < len(plans[r])}
            raise RuntimeError(f"point-to-point deadlock: ranks wait at {stuck}")
