"""A watchdog that names a stalled collective instead of leaving every rank silent until the timeout.

Each rank runs one daemon thread. Every `poll_s` it publishes this process's progress (moe_dist.parallel.comm:
collectives started per group, the one in flight with its step / MoE layer / phase labels) to the rendezvous
store under `moe_dist/watchdog/<rank>`. When a collective has been in flight for `stall_warn_s`, the rank inside
it, and rank 0 on behalf of any rank, print which collective, where, and which members of its group have not
arrived (a member that has started fewer collectives on that group), with what those members are doing
instead, or that they stopped reporting (a frozen or dead process). The report repeats every `stall_warn_s`
until the collective completes or `parallel.timeout_s` ends the run. A stalled point-to-point batch (the
pipeline's activations and gradients, `comm.exchange`) is reported the same way, with its labels (step, stage,
micro-batch, which transfer) and what each of its peers is doing.

Why the store and a thread: a frozen rank cannot answer a question, so every rank writes its state ahead of
time, and the thread keeps doing so while the main thread blocks inside gloo. Reads and writes are small
(one short JSON value per rank per poll). With NCCL, collectives return at launch and block later, in a
host sync; the in-flight record then covers only the launch, so this watchdog reports stalls of CPU-blocking
(gloo) collectives and of the object/broadcast calls; NCCL's own watchdog covers the GPU side.
"""
from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from dataclasses import asdict
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from moe_dist.parallel import comm
from moe_dist.parallel.topology import Topology

KEY = "moe_dist/watchdog/"
P2P_OPS = ("send_recv",)          # comm's point-to-point batches (the pipeline's activations and gradients)


def _group_key(ranks: tuple[int, ...]) -> str:
    return ",".join(map(str, ranks))


class Watchdog:
    """Context manager: the publishing and checking thread runs inside the block (distributed runs only)."""

    def __init__(self, topo: Topology, stall_warn_s: float, timeout_s: float, poll_s: Optional[float] = None,
                 store: Optional[dist.Store] = None, say: Optional[Callable[[str], None]] = None):
        self.topo = topo
        self.stall_warn_s = stall_warn_s
        self.timeout_s = timeout_s
        self.poll_s = poll_s if poll_s is not None else min(max(stall_warn_s / 4, 0.2), 5.0)
        self._store = store
        self._say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last_report: dict[tuple, float] = {}      # (rank, group, seq) → time of its last report
        self.reports: list[str] = []                    # what this rank printed (tests read it)
        self._names = self._group_names(topo)
        self._host = socket.gethostname()

    @staticmethod
    def _group_names(topo: Topology) -> dict[tuple[int, ...], str]:
        names: dict[tuple[int, ...], list[str]] = {}
        for name, g in topo.groups.items():
            names.setdefault(g.ranks, []).append(name)
        return {ranks: "/".join(n) for ranks, n in names.items()}

    # --------------------------------------------------------------------------------------------- thread

    def __enter__(self) -> "Watchdog":
        if self.topo.is_distributed and dist.is_initialized():
            if self._store is None:
                self._store = dist.distributed_c10d._get_default_store()
            self._thread = threading.Thread(target=self._run, name="moe-dist-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 5)

    def _run(self) -> None:
        # The first report goes out at once: a rank that freezes within its first poll interval is then named
        # as no longer reporting rather than as never having reported.
        while True:
            try:
                self.poll()
            except Exception as e:     # the store went away (a rank died, shutdown): the run's own error wins
                if not self._stop.is_set():
                    self._say(f"moe-dist: watchdog: stopped ({type(e).__name__}: {e})")
                return
            if self._stop.wait(self.poll_s):
                return

    # ----------------------------------------------------------------------------------------- one poll

    def _snapshot(self) -> dict[str, Any]:
        started, current, labels = comm.progress()
        return {"t": time.time(), "host": self._host, "started": {_group_key(k): v for k, v in started.items()},
                "current": None if current is None else {**asdict(current), "group": list(current.group)},
                "where": labels}

    def _read(self, rank: int) -> Optional[dict[str, Any]]:
        key = f"{KEY}{rank}"
        if not self._store.check([key]):
            return None
        try:
            return json.loads(self._store.get(key).decode())
        except (ValueError, UnicodeDecodeError):
            return None

    def poll(self) -> None:
        """Publish this rank's progress; report a stall of this rank's collective, and on rank 0 of any rank's."""
        mine = self._snapshot()
        self._store.set(f"{KEY}{self.topo.rank}", json.dumps(mine))
        now = mine["t"]
        snaps = {self.topo.rank: mine}
        if self.topo.rank == 0:
            for r in range(1, self.topo.dims.world):
                snaps[r] = self._read(r)
        for r, snap in snaps.items():
            cur = snap and snap.get("current")
            if not cur:
                continue
            age = now - cur["started"]
            if age < self.stall_warn_s:
                continue
            key = (r, tuple(cur["group"]), cur["seq"])
            if now - self._last_report.get(key, -1e18) < self.stall_warn_s:
                continue
            self._last_report[key] = now
            line = self._describe(r, cur, age, snaps, now)
            self.reports.append(line)
            self._say(line)

    def _doing(self, snap: dict[str, Any], now: float) -> str:
        """What a rank was doing at its last report: frozen or dead (no report for a while), inside an
        operation, or computing; with the `where` labels."""
        stale = now - snap["t"]
        if stale > max(3 * self.poll_s, 2.0):
            return f"no report for {stale:.0f} s: frozen or dead"
        doing = snap.get("current")
        if doing:
            return (f"inside {doing['op']} #{doing['seq']} of ranks {doing['group']} "
                    f"({comm._describe_where(doing.get('where') or {})})")
        return f"computing ({comm._describe_where(snap.get('where') or {})})"

    def _describe(self, rank: int, cur: dict[str, Any], age: float, snaps: dict[int, Any], now: float) -> str:
        group = tuple(cur["group"])
        gkey = _group_key(group)
        where = comm._describe_where(cur.get("where") or {})
        left = max(self.timeout_s - age, 0.0)
        who = "" if rank == self.topo.rank else f" rank {rank}:"
        if cur["op"] in P2P_OPS:
            # Point-to-point: the record's group is this rank and its peers, and counts of such batches need
            # not pair up between the two ends, so each peer is described by what it is doing instead.
            peers = []
            for member in group:
                if member == rank:
                    continue
                snap = snaps.get(member) if member in snaps else self._read(member)
                peers.append(f"rank {member} (no report yet)" if snap is None
                             else f"rank {member} ({self._doing(snap, now)})")
            return (f"moe-dist: watchdog:{who} {cur['op']} #{cur['seq']} with ranks {list(group)} ({where}) has made "
                    f"no progress for {age:.0f} s; its peers: {', '.join(peers)}; parallel.timeout_s ends the run "
                    f"in {left:.0f} s")
        name = self._names.get(group, "group")
        waiting = []
        for member in group:
            if member == rank:
                continue
            snap = snaps.get(member) if member in snaps else self._read(member)
            if snap is None:
                waiting.append(f"rank {member} (no report yet)")
                continue
            done = snap["started"].get(gkey, 0)
            if done >= cur["seq"]:
                continue                              # it reached this collective (or passed it)
            waiting.append(f"rank {member} ({self._doing(snap, now)}; {done} of this group's collectives started)")
        return (f"moe-dist: watchdog:{who} {cur['op']} #{cur['seq']} on {name} {list(group)} ({where}) has made no "
                f"progress for {age:.0f} s; not arrived: {', '.join(waiting) or 'none (all members are inside it)'}"
                f"; parallel.timeout_s ends the run in {left:.0f} s")


class _LayerLabels:
    """Forward hooks that label the collectives of each MoE layer with its module name."""

    def __init__(self, model: torch.nn.Module):
        self.handles = []
        for name, module in model.named_modules():
            # By class name: moe_dist.moe sits above this package, which must not import it.
            if type(module).__name__ == "MoELayer":
                self.handles.append(module.register_forward_pre_hook(self._enter(name)))
                self.handles.append(module.register_forward_hook(self._leave, always_call=True))
        self._stack: list[Any] = []

    def _enter(self, name: str):
        def hook(module, args):
            cm = comm.where(layer=name)
            cm.__enter__()
            self._stack.append(cm)
        return hook

    def _leave(self, module, args, output):
        if self._stack:
            self._stack.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def watch_training(model: torch.nn.Module, topo: Topology, stall_warn_s: float, timeout_s: float,
                   debug_sync: bool = False) -> Iterator[Watchdog]:
    """What a training run enters once: the watchdog thread, MoE-layer labels on the model's collectives, and
    `parallel.debug_sync`. The loop labels each step itself with `comm.where(step=...)`."""
    labels = _LayerLabels(model)
    try:
        with comm.debug_sync(debug_sync), Watchdog(topo, stall_warn_s, timeout_s) as watchdog:
            yield watchdog
    finally:
        labels.remove()
