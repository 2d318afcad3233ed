"""Pipeline schedules: every (kind, pp 1..4, virtual 1..3, micro-batches 1..8) the sizes admit completes under
the dataflow dependencies and under the runtime's point-to-point plan (a rendezvous model: a send completes only
once its receive is posted, and both ends of each pair post their messages in the same order), runs each
(micro-batch, virtual stage) exactly once forward and once backward, and holds the in-flight micro-batches the
theory says. Pure arithmetic: no processes."""
from __future__ import annotations

import itertools

import pytest

from moe_dist.pipeline.schedules import (KINDS, Action, Transfer, build_schedule, check_schedule, exchanges,
                                         forward_schedule, in_flight, kind_of, simulate, simulate_exchanges)

CASES = [(kind, pp, v, m) for kind, pp, v, m in itertools.product(KINDS, range(1, 5), range(1, 4), range(1, 9))
         if (v == 1 or kind == "interleaved") and (kind != "interleaved" or m % pp == 0)]


def _all(kind, pp, v, m):
    return [build_schedule(kind, pp, v, m, r) for r in range(pp)]


@pytest.mark.parametrize("kind,pp,v,m", CASES)
def test_every_schedule_completes_once_per_micro_and_stage_without_deadlock(kind, pp, v, m):
    scheds = _all(kind, pp, v, m)
    for r, acts in enumerate(scheds):
        want = {(k, mi, c) for k in "FB" for mi in range(m) for c in range(v)}
        got = [(a.kind, a.micro, a.chunk) for a in acts]
        assert sorted(got) == sorted(want), f"rank {r}: not exactly one F and one B per (micro, chunk)"
    span, _ = simulate(scheds, v)
    assert span >= m * v * 3.0                           # at least the ideal m·v·(F + B) on every rank
    simulate_exchanges([[batch for batch, _ in exchanges(kind, scheds[r], r, pp, v)] for r in range(pp)])
    # The runtime sees only each rank's list: the kind it infers gives the same transfers.
    inferred = [kind_of(scheds[r], pp, v, m, r) for r in range(pp)]
    assert [[b for b, _ in exchanges(k, scheds[r], r, pp, v) if b] for r, k in enumerate(inferred)] == \
        [[b for b, _ in exchanges(kind, scheds[r], r, pp, v) if b] for r in range(pp)]


@pytest.mark.parametrize("kind,pp,v,m", CASES)
def test_in_flight_micro_batches_match_the_theory(kind, pp, v, m):
    for r, acts in enumerate(_all(kind, pp, v, m)):
        if kind == "gpipe":
            want = m
        elif kind == "1f1b":
            want = min(pp - r, m)
        elif m == pp:                                    # interleaved with m == pp: all forwards first
            want = m * v
        else:
            want = min((pp - r - 1) * 2 + (v - 1) * pp + 1, m * v)
        assert in_flight(acts) == want, f"rank {r}"


def test_1f1b_is_warmup_steady_cooldown():
    assert build_schedule("1f1b", 4, 1, 6, 1) == [
        Action("F", 0, 0), Action("F", 1, 0),                                  # warm-up: pp − s − 1 = 2
        Action("F", 2, 0), Action("B", 0, 0), Action("F", 3, 0), Action("B", 1, 0),
        Action("F", 4, 0), Action("B", 2, 0), Action("F", 5, 0), Action("B", 3, 0),
        Action("B", 4, 0), Action("B", 5, 0)]                                  # cool-down
    assert build_schedule("1f1b", 4, 1, 6, 3)[:4] == [Action("F", 0, 0), Action("B", 0, 0),
                                                       Action("F", 1, 0), Action("B", 1, 0)]


def test_interleaved_follows_megatron_order():
    # pp=2, 2 chunks, 4 micro-batches, rank 0: warm-up (2−0−1)·2 + (2−1)·2 = 4 forwards; micro-batches in
    # groups of pp, each group through chunk 0 then chunk 1; backward from the last chunk.
    acts = build_schedule("interleaved", 2, 2, 4, 0)
    assert acts[:4] == [Action("F", 0, 0), Action("F", 1, 0), Action("F", 0, 1), Action("F", 1, 1)]
    assert acts[4:8] == [Action("F", 2, 0), Action("B", 0, 1), Action("F", 3, 0), Action("B", 1, 1)]
    assert acts[-4:] == [Action("B", 2, 1), Action("B", 3, 1), Action("B", 2, 0), Action("B", 3, 0)]


@pytest.mark.parametrize("kind,pp,v,m", CASES)
def test_bubble_fraction_is_the_textbook_one(kind, pp, v, m):
    # A stage's F = 1 and B = 2 split over its v chunks; transfers free: the idle share of the step is
    # (p−1)/(v·m+p−1) (v = 1 for GPipe and 1F1B), the figure `plan` states.
    span, _ = simulate(_all(kind, pp, v, m), v, f_time=1 / v, b_time=2 / v)
    assert (span - 3.0 * m) / span == pytest.approx((pp - 1) / (v * m + pp - 1))


def test_forward_only_order_completes_for_any_micro_batch_count():
    for pp, v, m in itertools.product(range(1, 5), range(1, 4), range(1, 9)):
        scheds = [forward_schedule(pp, v, m, r) for r in range(pp)]
        assert all(sorted((a.micro, a.chunk) for a in s) == sorted(itertools.product(range(m), range(v)))
                   for s in scheds)
        simulate(scheds, v)
        simulate_exchanges([[b for b, _ in exchanges("gpipe", scheds[r], r, pp, v)] for r in range(pp)])


def test_the_checkers_catch_a_deadlock_and_a_crossed_order():
    # Every rank does all backwards before any forward: nothing can start.
    bad = [[Action("B", 0, 0), Action("F", 0, 0)] for _ in range(2)]
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(bad)
    # Two neighbours that both send before they receive, each in its own batch: each send waits forever.
    send = lambda r, peer: Transfer("send", "activation", r, 0, peer)
    recv = lambda r, peer: Transfer("recv", "activation", peer, 0, peer)
    with pytest.raises(RuntimeError, match="point-to-point deadlock"):
        simulate_exchanges([[[send(0, 1)], [recv(0, 1)]], [[send(1, 0)], [recv(1, 0)]]])
    # The same two messages posted together complete.
    simulate_exchanges([[[send(0, 1), recv(0, 1)]], [[send(1, 0), recv(1, 0)]]])
    # Two messages received in the other order than sent: fine with tags, wrong without (NCCL).
    a0, a1 = (Transfer("send", "activation", 0, i, 1) for i in range(2))
    b0, b1 = (Transfer("recv", "activation", 0, i, 0) for i in range(2))
    with pytest.raises(RuntimeError, match="receives"):
        simulate_exchanges([[[a0, a1]], [[b1, b0]]])


@pytest.mark.parametrize("args,match", [
    (("zigzag", 2, 1, 4), "unknown"),
    (("1f1b", 2, 2, 4), "interleaved"),
    (("interleaved", 4, 2, 6), "multiple of 4"),
    (("gpipe", 0, 1, 4), "must be >= 1"),
])
def test_impossible_sizes_are_refused_with_the_fix(args, match):
    with pytest.raises(ValueError, match=match):
        check_schedule(*args)
    with pytest.raises(ValueError, match=match):
        build_schedule(*args, 0)
