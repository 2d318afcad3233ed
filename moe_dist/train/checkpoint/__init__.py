"""Sharded, resharding training checkpoints, in one module per job:

- `store`      the atomic store: tmp folder → files → sha256 manifest (meta.json, checksummed itself) → fsync
               → rename → `latest` → keep-K prune by recorded step; `find` and `verify` on the way back,
               `check_fresh_start` for checkpoint.resume=never. The native trainer and the DeepSpeed engine
               both save through it.
- `shards`     DCP's shard protocol on plain tensors (`ShardView`, `shard_chunks`, the two planners): each
               rank's shard is chunks of the global tensor, so any layout loads any checkpoint.
- `state`      what the native trainer saves (parameters, AdamW moments, persistent buffers, RNG per rank) and
               the config fields that decide whether a checkpoint fits (`check_compatible`).
- `safe_load`  loading that never runs code: DCP metadata through an allow-list unpickler, `torch.save` files
               weights-only.
- `dcp_io`     `save` and `load` of the native trainer's state with DCP, joining the four above.
"""
from moe_dist.train.checkpoint.dcp_io import load, save
from moe_dist.train.checkpoint.safe_load import load_weights_only
from moe_dist.train.checkpoint.shards import ShardView, shard_chunks
from moe_dist.train.checkpoint.state import (check_compatible, data_fields, describe_layout, layout_of,
                                             materialize_optimizer_state, same_layout, shape_fields,
                                             state_for_dcp)
from moe_dist.train.checkpoint.store import (FORMAT, LATEST_NAME, META_NAME, CheckpointError, CheckpointSaveError,
                                             check_fresh_start, complete_checkpoints, find, find_on_rank0, prune,
                                             step_dir_name, verify)

__all__ = ["CheckpointError", "CheckpointSaveError", "ShardView", "shard_chunks", "save", "load", "find",
           "find_on_rank0", "verify", "check_fresh_start", "check_compatible", "prune", "complete_checkpoints",
           "layout_of", "state_for_dcp", "step_dir_name", "describe_layout", "FORMAT", "LATEST_NAME", "META_NAME",
           "materialize_optimizer_state", "same_layout", "shape_fields", "data_fields", "load_weights_only"]
