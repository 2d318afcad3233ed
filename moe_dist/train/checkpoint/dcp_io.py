"""Save and load the training state with `torch.distributed.checkpoint` (DCP): the state (state.py) goes
through the shard protocol (shards.py) into a folder of the atomic store (store.py), and comes back into any
layout through the safe reader (safe_load.py).

A step folder holds DCP's files (`__<rank>_0.distcp`, `.metadata`) and the store's meta.json, whose caller
fields are the shape fields, the data fields, the layout and the torch version.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp

from moe_dist.config import Config
from moe_dist.parallel.topology import Topology
from moe_dist.train.checkpoint import store
from moe_dist.train.checkpoint.safe_load import SafeReader
from moe_dist.train.checkpoint.shards import ShardLoadPlanner, ShardSavePlanner
from moe_dist.train.checkpoint.state import (OptimizerState, data_fields, layout_of, restore, same_layout,
                                             shape_fields, state_for_dcp)
from moe_dist.train.checkpoint.store import CheckpointError


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when no process group exists: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save(root: str | Path, step: int, model, optimizer: OptimizerState, cfg: Config, topo: Topology, keep: int,
         extra: Optional[dict[str, Any]] = None) -> Path:
    """Write the checkpoint of `step` (every rank calls this: it is a collective); returns its folder."""
    state = state_for_dcp(model, optimizer, topo)

    def fill(tmp: Path) -> None:
        # sync_files: each rank fsyncs the shards it wrote. dcp.save returns on every rank only after rank 0
        # has written .metadata.
        with _quiet_single_process():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True, thread_count=1),
                     planner=ShardSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
                     process_group=topo.world.handle)

    meta = {"shape": shape_fields(cfg), "data": data_fields(cfg), "layout": layout_of(topo, cfg),
            "torch": torch.__version__, **(extra or {})}
    return store.write(root, step, topo, keep, fill, meta)


def load(path: Path, meta: dict[str, Any], model, optimizer: OptimizerState, topo: Topology,
         cfg: Optional[Config] = None) -> bool:
    """Fill model, optimizer state, buffers (and this rank's RNG when the layout is the one saved) in place
    from a verified checkpoint; returns whether the RNG state was restored. `cfg` (default: the model's)
    gives the pipeline split the layout comparison needs. Each rank asks only for its own entries (its
    stage's, with pipeline stages), wherever in the checkpoint's files they were written."""
    same = same_layout(meta["layout"], layout_of(topo, cfg or model.cfg))
    reader = SafeReader(path)
    stored = reader.read_metadata().state_dict_metadata
    state = state_for_dcp(model, optimizer, topo, rng=same, fill=False)
    for key in [k for k in state if k.startswith("rng.") and k not in stored]:
        del state[key]                         # e.g. saved on a CPU machine, resumed on a GPU one
    missing = sorted(k for k in state if k not in stored)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} entries this model needs, e.g. "
                              f"{missing[0]}; it was saved by a different model or version")
    with _quiet_single_process():
        dcp.load(state, storage_reader=reader,
                 planner=ShardLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
                 process_group=topo.world.handle)
    restore(model, optimizer, state)
    restored = f"rng.cpu.{topo.rank}" in state
    if restored:
        torch.set_rng_state(state[f"rng.cpu.{topo.rank}"])
    if f"rng.cuda.{topo.rank}" in state:
        torch.cuda.set_rng_state(state[f"rng.cuda.{topo.rank}"])
    return restored
