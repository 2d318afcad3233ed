"""One rank of the bootstrap tests: ``bootstrap_worker.py MODE TIMEOUT_S``, launcher variables from the environment.

MODE ``allreduce``: init, all-reduce rank+1, print one JSON line. ``exit``: rank 1 leaves right after init
while rank 0 all-reduces. ``stall``: rank 1 sleeps instead of joining rank 0's all-reduce.
Rank 0 of ``exit``/``stall`` prints ``ERROR <seconds>`` and exits 3 when the collective fails.
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from moe_dist.parallel.bootstrap import init_distributed, shutdown

torch.set_num_threads(1)
mode, timeout_s = sys.argv[1], float(sys.argv[2])
info = init_distributed(timeout_s, backend="gloo")
if mode != "allreduce" and info.rank == 1:
    if mode == "stall":
        time.sleep(120)  # the test kills this process long before
    os._exit(0)  # a dead peer: no destroy_process_group, no goodbye
start = time.monotonic()
t = torch.tensor([info.rank + 1.0])
try:
    dist.all_reduce(t)
except Exception as e:  # gloo raises RuntimeError or DistBackendError, depending on how the peer failed
    print(f"ERROR {time.monotonic() - start:.1f} {type(e).__name__}", flush=True)
    os._exit(3)  # skip destroy_process_group: it could wait on the dead peer
line = json.dumps({"launcher": info.launcher, "rank": info.rank, "world": info.world_size,
                   "local_rank": info.local_rank, "addr": info.master_addr, "port": info.master_port,
                   "sum": t.item()})
os.write(1, (line + "\n").encode())  # one write: ranks sharing a pipe (torchrun) cannot interleave a line
shutdown()
