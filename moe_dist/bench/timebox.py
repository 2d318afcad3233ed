"""Run a sequence of commands, each under its own time limit and all under one budget: the time box of
`make gpu-check` (benchmarks/gpu_check.py), usable by any check that must finish inside a lease.

Each part runs in a session of its own, so an overrun kills its whole process group (its children too); its
output lines are echoed with its name and elapsed seconds; it writes its result as JSON to the path in
$TIMEBOX_RESULT (rewriting it as it goes, so a part cut short keeps what it wrote). A part that fails or runs over
is reported and the next one still runs.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

MIN_START_S = 10                         # a part is not started with less budget than this left


@dataclass
class PartSpec:
    """One part: the command that runs it, its time limit, extra environment. The command writes its result as
    JSON to the path in $TIMEBOX_RESULT (it may rewrite it as it goes: a part cut short keeps what it wrote)."""
    name: str
    cmd: list[str]
    limit_s: float
    env: dict[str, str] = field(default_factory=dict)
    cwd: Optional[Path] = None            # the part's working folder (default: this process's)


def _kill_group(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGTERM to the part's whole process group (it runs in a session of its own), SIGKILL after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _children_cpu_s() -> float:
    """CPU seconds of the waited-for child processes so far (a part's CPU time, its own children included)."""
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_part(spec: PartSpec, result_path: Path, say: Callable[[str], None] = print, tail_lines: int = 40) -> dict:
    """Run one part under its limit; its output lines are echoed with the part's name and elapsed seconds.
    Returns {"status": ok | error | timeout, "elapsed_s", "limit_s", "returncode", "result", "stderr_tail",
    "stdout_tail"}; `result` is whatever the part last wrote (possibly partial), or None."""
    result_path.unlink(missing_ok=True)
    env = {**os.environ, **spec.env, "PYTHONUNBUFFERED": "1", "TIMEBOX_RESULT": str(result_path)}
    t0 = time.monotonic()
    cpu0 = _children_cpu_s()
    proc = subprocess.Popen(spec.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                            errors="replace", start_new_session=True, cwd=spec.cwd)
    tails = {"stdout": collections.deque(maxlen=tail_lines), "stderr": collections.deque(maxlen=tail_lines)}

    def pump(stream, key):
        for line in stream:
            line = line.rstrip("\n")
            tails[key].append(line)
            say(f"  {spec.name} +{time.monotonic() - t0:5.1f}s | {line}")

    readers = [threading.Thread(target=pump, args=(getattr(proc, k), k), daemon=True) for k in tails]
    for r in readers:
        r.start()
    timed_out = False
    try:
        proc.wait(timeout=spec.limit_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
    except BaseException:                # Ctrl-C: take the part down with us
        _kill_group(proc, grace_s=1.0)
        raise
    finally:
        for r in readers:
            r.join(timeout=5)
    elapsed = time.monotonic() - t0
    cpu = _children_cpu_s() - cpu0
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        result = None
    status = "timeout" if timed_out else ("ok" if proc.returncode == 0 and result is not None else "error")
    return {"status": status, "elapsed_s": round(elapsed, 2), "cpu_s": round(cpu, 2), "limit_s": spec.limit_s,
            "returncode": proc.returncode, "result": result,
            "stderr_tail": "\n".join(tails["stderr"]), "stdout_tail": "\n".join(tails["stdout"])}


def run_all(specs: list[PartSpec], budget_s: float, workdir: Path,
            on_part: Callable[[str, dict], None] = lambda name, outcome: None,
            say: Callable[[str], None] = print, min_start_s: float = MIN_START_S) -> dict[str, dict]:
    """Run the parts in order within `budget_s` in all: each gets min(its limit, the budget left); one that
    cannot start with `min_start_s` left is skipped. `on_part(name, outcome)` follows every part (the caller
    writes its JSON there)."""
    t0 = time.monotonic()
    outcomes: dict[str, dict] = {}
    for i, spec in enumerate(specs):
        left = budget_s - (time.monotonic() - t0)
        if left < min_start_s:
            outcome = {"status": "skipped", "reason": f"budget exhausted: {max(left, 0):.0f} s of --budget-s="
                       f"{budget_s:g} left", "result": None}
            say(f"[{time.monotonic() - t0:6.1f}s] {spec.name}: skipped ({outcome['reason']})")
        else:
            limit = min(spec.limit_s, left)
            say(f"[{time.monotonic() - t0:6.1f}s] part {i + 1}/{len(specs)} {spec.name}: start (limit {limit:.0f} s)")
            spec = dataclasses.replace(spec, limit_s=limit)
            outcome = run_part(spec, workdir / f"{spec.name.replace(':', '_')}.json", say)
            say(f"[{time.monotonic() - t0:6.1f}s] {spec.name}: {outcome['status']} in {outcome['elapsed_s']:.1f} s"
                + (f" (exit {outcome['returncode']})" if outcome["status"] == "error" else ""))
        outcomes[spec.name] = outcome
        on_part(spec.name, outcome)
    return outcomes
