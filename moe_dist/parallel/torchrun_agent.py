"""torchrun's agent (`torch.distributed.run`) with the launch's own failures reported as one line and an exit code,
as `moe-dist` reports everything else. `launch/torchrun.sh` runs it in place of `python -m torch.distributed.run`:

    python -m moe_dist.parallel.torchrun_agent [torchrun options] -m moe_dist.cli train CONFIG ...

What it adds to torchrun:
- Before the rendezvous, the c10d endpoint is probed. A port this host cannot bind and that does not answer as a
  torch store is held by another program: torchrun would connect to it as a client and wait without end (the
  store's handshake has no timeout), so the launch is refused at once, naming the endpoint.
- A rendezvous that does not complete in time names the endpoint and the nodes expected (exit 1).
- SIGTERM to the agent: torchrun stops the workers with SIGTERM (they save a checkpoint, see `Trainer.fit`) and
  then raises; this exits 143 (128 + SIGTERM) instead of 1 with a traceback, so restart policies relaunch.
- A worker that failed: its own `moe-dist:` line is already on stderr, so the agent exits with the worker's code
  (2 for bad input, 1 at run time) instead of torchrun's 1 and a traceback. A worker killed by a signal printed
  nothing: the agent says which rank and which signal.
"""
from __future__ import annotations

import errno
import signal
import socket
import sys
import threading
from datetime import timedelta
from typing import Optional

from moe_dist.errors import EXIT_BAD_INPUT, EXIT_RUNTIME, CommandError, report

PROBE_S = 10.0          # how long a real store takes at most to answer a client's handshake


def _options(argv: list[str]) -> dict[str, str]:
    """torchrun's options before the training script, `--name=value` as launch/torchrun.sh writes them (a flag
    such as --standalone maps to ""), names with '-' (torchrun also takes '_')."""
    out = {}
    for arg in argv:
        if not arg.startswith("--"):
            break                       # `-m` or the script: its own arguments follow
        key, _, value = arg[2:].partition("=")
        out[key.replace("_", "-")] = value
    return out


def _answers_as_store(host: str, port: int, wait_s: float) -> bool:
    """Whether host:port completes a torch TCPStore client handshake within `wait_s`. The client's own timeout
    does not cover the handshake, so it runs in a thread that is abandoned if it never returns."""
    import torch.distributed as dist
    done: list[bool] = []

    def connect():
        try:
            dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=wait_s))
            done.append(True)
        except Exception:                # refused, reset, timed out: not a store that answers
            done.append(False)
    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(wait_s + 1.0)
    return bool(done and done[0])


def check_endpoint(host: str, port: int, nnodes: int, probe_s: float = PROBE_S) -> None:
    """Refuse an endpoint whose port another program holds on this host. On one node any listener there is
    another program's; on several, the node that hosts the store may meet its own peers' listener only if those
    run here too (several "nodes" on one host), which then answers as a store."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return                       # free here: torchrun's agent will host the store on it
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                return                   # not this host's address: the node that has it hosts the store
            if e.errno != errno.EADDRINUSE:
                return                   # unknown: let torchrun try and report
    if nnodes > 1 and _answers_as_store(host, port, probe_s):
        return                           # another node's agent on this host already serves the rendezvous
    fix = ("leave MASTER_PORT unset on one node (torchrun --standalone picks a free port) or choose a free one"
           if nnodes == 1 else "choose a free MASTER_PORT, the same on every node")
    raise CommandError("launch", f"MASTER_PORT={port} on MASTER_ADDR={host} is already in use by another program, "
                       f"so the rendezvous cannot start there; {fix}")


def _first_failure(e) -> tuple[int, int]:
    """(exit code, global rank) of the first failed worker of a ChildFailedError (the others were stopped by the
    agent after it, with SIGTERM)."""
    rank, failure = e.get_first_failure()
    return failure.exitcode, rank


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    opts = _options(argv)
    endpoint = opts.get("rdzv-endpoint")
    nnodes = (opts.get("nnodes") or "1").split(":")[-1]
    try:
        if endpoint and "standalone" not in opts:
            host, _, port = endpoint.rpartition(":")
            check_endpoint(host or "127.0.0.1", int(port), int(nnodes))
        torchrun.main(argv)
    except SignalException as e:
        # The workers got the same signal from the agent and saved (or were killed after --shutdown-timeout).
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        code, rank = _first_failure(e)
        if code > 0:
            return code                  # the worker printed its own `moe-dist:` line
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return report(CommandError("launch", f"rank {rank} on {socket.gethostname()} was killed by {name} without a report (SIGKILL: "
                                             "often the kernel's out-of-memory killer); see the system log, lower "
                                             "the memory per rank, or start fewer ranks per node", EXIT_RUNTIME))
    except RendezvousError as e:
        what = type(e).__name__
        conf = dict(kv.partition("=")[::2] for kv in opts.get("rdzv-conf", "").split(",") if kv)
        within = f" within {conf['join_timeout']}s" if "join_timeout" in conf else ""
        return report(CommandError("launch", f"the rendezvous at {endpoint or 'the standalone store'} did not complete"
                                             f"{within} ({what}: {str(e) or 'timed out'}); start the same command on all "
                                             f"{nnodes} nodes with the same MASTER_ADDR and MASTER_PORT, check that "
                                             "the port is reachable from every node, or raise RDZV_TIMEOUT",
                                   EXIT_RUNTIME))
    except CommandError as e:
        return report(e)
    except ValueError as e:              # torchrun's own argument checks
        return report(CommandError("launch", f"torchrun refused its arguments ({e}); fix the launcher variables",
                                   EXIT_BAD_INPUT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
