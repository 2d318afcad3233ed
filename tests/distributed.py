"""Run a function on N gloo ranks in fresh processes and collect what each returns (tests' wrapper of
`moe_dist.parallel.spawn.run_ranks`: one thread per rank, failures raised as AssertionError).

Every rank is a spawned process with one intra-op thread (two cores shared by up to four ranks would
otherwise thrash). A rank that raises or hangs fails the caller with its traceback; the parent never
waits longer than `timeout`.
"""
from __future__ import annotations

from moe_dist.parallel import spawn
from moe_dist.parallel.spawn import free_port  # noqa: F401  (imported by the tests from here)


def run_ranks(fn, world: int, *args, timeout: float = 180.0, collective_timeout_s: float = 60.0,
              may_die: tuple[int, ...] = ()) -> list:
    """fn(rank, world, *args) on `world` ranks; returns the per-rank results (picklable by torch.save).
    Ranks in `may_die` may exit without a result (None)."""
    try:
        return spawn.run_ranks(fn, world, *args, threads=1, timeout_s=timeout,
                               collective_timeout_s=collective_timeout_s, may_die=may_die)
    except spawn.RanksFailed as e:
        raise AssertionError(str(e)) from None
