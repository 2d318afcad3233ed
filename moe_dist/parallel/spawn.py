"""Run a function on N gloo CPU ranks in fresh spawned processes and collect what each returns.

Used by the benchmarks (fresh processes per measurement: no warm allocator, no earlier peak RSS, a rank count
that is a real process count) and by the multi-rank tests. Each rank gets `threads` intra-op threads
(default 1): ranks sharing a few cores thrash with torch's default of one thread per core. A rank that raises
fails the call with its traceback; the parent never waits past `timeout_s`.
"""
from __future__ import annotations

import os
import random
import socket
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable


class RanksFailed(RuntimeError):
    """A rank raised, wrote nothing, or did not finish in time; the message holds every rank's traceback."""


class _PortTaken(RuntimeError):
    pass


def free_port(lo: int | None = None, hi: int | None = None, host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now on `host`: the kernel's pick, or one drawn from [lo, hi).

    `host` is where the port's future owner binds: loopback for ranks on this machine, "" (every interface) for
    a rendezvous store that other nodes reach. The port is only free at the moment of the call; whoever binds it
    later can lose it to another process, so they retry on EADDRINUSE (run_ranks does)."""
    if (lo is None) != (hi is None) or (lo is not None and not 0 < lo < hi <= 65536):
        raise ValueError(f"free_port(lo={lo}, hi={hi}): give both bounds with 0 < lo < hi <= 65536, or neither")
    for _ in range(200):
        with socket.socket() as s:
            try:
                s.bind((host, 0 if lo is None else random.randrange(lo, hi)))
            except OSError:
                continue
            return s.getsockname()[1]
    span = "" if lo is None else f" in [{lo}, {hi})"
    raise RuntimeError(f"no free port on {host or 'any interface'}{span} after 200 tries")


def _entry(rank: int, world: int, port: int, out_dir: str, threads: int, timeout_s: float,
           fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      OMP_NUM_THREADS=str(threads))
    # Rank 0 here serves its own store. Inherited from a parent that torchrun started, this variable would make
    # torch's env:// rendezvous treat every rank as a client of a torchrun agent's store that is not on this port.
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    import torch
    import torch.distributed as dist
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        result = fn(rank, world, *args)
        torch.save({"ok": result}, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()
    except BaseException:
        torch.save({"error": traceback.format_exc()}, Path(out_dir) / f"rank{rank}.pt")
        raise


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, threads: int = 1, timeout_s: float = 600.0,
              collective_timeout_s: float = 120.0, may_die: tuple[int, ...] = (), port_tries: int = 3) -> list[Any]:
    """fn(rank, world, *args) on `world` gloo ranks (a process group exists even for world=1); returns the
    per-rank results. `fn` and `args` must be picklable (a module-level function); results travel by
    torch.save. Ranks in `may_die` may exit without a result (None in the list). The rendezvous port is picked
    free and bound by rank 0 a moment later; another process can take it in between, so an EADDRINUSE start
    is retried on a new port."""
    if world < 1:
        raise ValueError(f"world={world}: need at least one rank")
    for attempt in range(port_tries):
        try:
            return _run_once(fn, world, args, threads, timeout_s, collective_timeout_s, may_die)
        except _PortTaken:
            if attempt == port_tries - 1:
                raise RanksFailed(f"the rendezvous port was taken {port_tries} times in a row") from None
    raise AssertionError("unreachable")


def _run_once(fn, world, args, threads, timeout_s, collective_timeout_s, may_die) -> list[Any]:
    import torch
    import torch.multiprocessing as mp

    def load(f: Path) -> dict:
        # Written by our own child processes a moment ago (results are arbitrary picklable values).
        return torch.load(f, weights_only=False)

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world, port, out_dir, threads, collective_timeout_s, fn, args))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s)
            rank0 = Path(out_dir, "rank0.pt")
            if p is procs[0] and rank0.exists() and "EADDRINUSE" in str(load(rank0).get("error", "")):
                for q in procs:            # the others wait for a store that never comes: stop them now
                    q.kill()
                    q.join()
                raise _PortTaken()
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results, errors = [], []
        for r in range(world):
            f = Path(out_dir) / f"rank{r}.pt"
            if not f.exists() and r in may_die:
                results.append(None)
                continue
            data = load(f) if f.exists() else {"error": f"rank {r} wrote nothing"}
            if "error" in data:
                errors.append((r, data["error"]))
            results.append(data.get("ok"))
        if errors:
            # The first rank to fail is the cause; the others usually report its closed connection.
            raise RanksFailed(f"ranks {[r for r, _ in errors]} failed (hung: {hung}):\n"
                              + "\n".join(f"--- rank {r} ---\n{e}" for r, e in errors))
        if hung:
            raise RanksFailed(f"ranks {hung} did not finish within {timeout_s}s")
        return results
