"""Run a function on N gloo ranks in fresh processes and collect what each returns.

Every rank is a spawned process with one intra-op thread (two cores shared by up to four ranks would
otherwise thrash). A rank that raises or hangs fails the caller with its traceback; the parent never
waits longer than `timeout`.
"""
from __future__ import annotations

import os
import random
import socket
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port(lo: int | None = None, hi: int | None = None) -> int:
    """A port nobody listens on now: any (port 0), or one in [lo, hi)."""
    for _ in range(200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", random.randrange(lo, hi) if lo else 0))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def _entry(rank, world, port, out_dir, timeout_s, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        result = fn(rank, world, *args)
        torch.save({"ok": result}, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()
    except BaseException:
        torch.save({"error": traceback.format_exc()}, Path(out_dir) / f"rank{rank}.pt")
        raise


def run_ranks(fn, world: int, *args, timeout: float = 180.0, collective_timeout_s: float = 60.0,
              may_die: tuple[int, ...] = ()) -> list:
    """fn(rank, world, *args) on `world` ranks; returns the per-rank results (picklable by torch.save).
    Ranks in `may_die` may exit without a result (None)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world, port, out_dir, collective_timeout_s, fn, args))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
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
            data = torch.load(f, weights_only=False) if f.exists() else {"error": f"rank {r} wrote nothing"}
            if "error" in data:
                errors.append((r, data["error"]))
            results.append(data.get("ok"))
        if errors:
            # The first rank to fail is the cause; the others usually report its closed connection.
            raise AssertionError(f"ranks {[r for r, _ in errors]} failed (hung: {hung}):\n"
                                 + "\n".join(f"--- rank {r} ---\n{e}" for r, e in errors))
        if hung:
            raise AssertionError(f"ranks {hung} did not finish within {timeout}s")
        return results
