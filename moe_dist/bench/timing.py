"""The timing harness every benchmark shares: warm-up, interleaved repeats, medians, and the clock.

Each candidate is a zero-argument callable that returns the seconds of one timed call (`timed_call` builds
one from a plain function). `measure` runs every candidate once per round, in an order rotated each round, so a
drift in the machine's load hits all candidates alike and no candidate always follows the same one; the
medians and the ratios between candidates of one run are what the benchmarks report.

Clocks: `wall` (perf_counter, what a user waits for) and `cpu` (this process's CPU time: robust on a machine
loaded by others, best with one intra-op thread so no worker thread spins). On a GPU the device is
synchronised before the clock is read at both ends.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU, whose ops finish before they return)."""
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def timed_call(fn: Callable[[], object], device: str = "cpu", clock: str = "wall",
               setup: Callable[[], object] | None = None) -> Callable[[], float]:
    """A candidate for `measure`: runs `setup()` outside the clock (e.g. resetting gradients), then times
    `fn()` between two device synchronisations."""
    tick = CLOCKS[clock]

    def run() -> float:
        if setup is not None:
            setup()
        sync(device)
        t0 = tick()
        fn()
        sync(device)
        return tick() - t0
    return run


def measure(fns: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of every candidate: `warmup` untimed calls each, then `repeats` rounds that run every
    candidate once, in an order rotated each round."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: must be at least 1")
    for f in fns.values():
        for _ in range(warmup):
            f()
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            samples[n].append(fns[n]())
    return samples


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {n: statistics.median(v) for n, v in samples.items()}


def reuse_freed_memory() -> None:
    """Turn off glibc's mmap for large blocks (M_MMAP_MAX=0) and its heap trimming (M_TRIM_THRESHOLD):
    PyTorch's CPU allocator calls malloc/free directly, and by default every tensor over the mmap threshold
    comes back as fresh pages whose first touch faults (about 0.35 ms per MiB on the 2-core CI machine), which on
    the CPU costs as much as a GEMM's memory traffic. Process-wide, for every candidate alike."""
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4          # glibc malloc.h
    if libc is None or not hasattr(libc, "mallopt") or not (
            libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)):
        raise ValueError("--reuse-freed-memory needs glibc's mallopt; run without it (or preload tcmalloc)")
