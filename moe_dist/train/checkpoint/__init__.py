"""Training checkpoints (a package: the modules split in the next commit)."""
from moe_dist.train.checkpoint.store import (FORMAT, LATEST_NAME, META_NAME, CheckpointError, ShardView,
                                             broadcast_from_rank0, check_compatible, complete_checkpoints,
                                             data_fields, describe_layout, find, layout_of, load,
                                             materialize_optimizer_state, prune, save, shape_fields, shard_chunks,
                                             state_for_dcp, step_dir_name, verify)

__all__ = ["CheckpointError", "ShardView", "shard_chunks", "save", "load", "find", "verify", "check_compatible",
           "prune", "complete_checkpoints", "broadcast_from_rank0", "layout_of", "state_for_dcp", "step_dir_name",
           "describe_layout", "FORMAT", "LATEST_NAME", "META_NAME", "materialize_optimizer_state", "shape_fields",
           "data_fields"]
