"""DCP's shard protocol on plain tensors: a rank's local shard described as chunks of the global tensor.

Why global tensors: a rank describes its shard as one or more chunks (offsets, sizes) of the global tensor,
computed from `model.param_shards` and the topology. Experts therefore live under their global index, and a
checkpoint written with one layout loads into any other (EP=2 → EP=4, TP=2 → TP=1): DCP reads, for each chunk
a rank asks for, the overlapping pieces that were stored. Replicas (dp, edp copies) describe the same chunk
and DCP's dedup keeps one writer. The chunk description is DCP's `_Checkpointable` protocol
(`__create_write_items__`, `__create_chunk_list__`, `__get_tensor_shard__`), the one DTensor implements;
`ShardView` implements it on a plain local tensor, and two small planner subclasses look such objects up
(the default planners only look inside `torch.Tensor` values).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from moe_dist.parallel.tensor_parallel import Shard, global_shape
from moe_dist.parallel.topology import Topology
from moe_dist.train.checkpoint.store import CheckpointError


def shard_chunks(local: torch.Tensor, spec: tuple[Shard, ...], topo: Topology
                 ) -> tuple[torch.Size, list[tuple[torch.Size, torch.Size, torch.Tensor]]]:
    """The global shape and this rank's pieces of the global tensor as (offsets, sizes, view of `local`).

    `local_slice` cuts dimension `s.dim` into `s.chunks` blocks and keeps part `rank` of each, so along one
    dimension the local tensor is a concatenation of runs of the global one. Per dimension we track those runs
    as (local start, global start, length); the chunks are their cartesian product over the dimensions."""
    gshape = global_shape(local.shape, spec, topo)
    runs = [[(0, 0, n)] for n in gshape]           # before any split, local index == global index
    size = list(gshape)
    for s in spec:
        g = topo.groups[s.axis]
        block = size[s.dim] // s.chunks
        part = block // g.size
        kept, pos = [], 0
        for c in range(s.chunks):
            a = c * block + g.rank * part           # the part kept from block c, in current local indices
            for ls, gs, n in runs[s.dim]:
                lo, hi = max(a, ls), min(a + part, ls + n)
                if lo < hi:
                    kept.append((pos + lo - a, gs + lo - ls, hi - lo))
            pos += part
        runs[s.dim] = kept
        size[s.dim] //= g.size
    chunks = []
    for combo in _product(runs):
        view = local
        for d, (ls, _, n) in enumerate(combo):
            view = view.narrow(d, ls, n)
        chunks.append((torch.Size(gs for _, gs, _ in combo), torch.Size(n for _, _, n in combo), view))
    return gshape, chunks


def _product(runs: list[list[tuple[int, int, int]]]) -> list[tuple[tuple[int, int, int], ...]]:
    out: list[tuple] = [()]
    for per_dim in runs:
        out = [c + (r,) for c in out for r in per_dim]
    return out


class ShardView:
    """This rank's shard of one global tensor, in DCP's `_Checkpointable` protocol (as DTensor does it).

    Writes go through the chunk views (no copy of the shard); reads land in them, so loading fills the
    parameter or optimizer state in place."""

    def __init__(self, local: torch.Tensor, spec: tuple[Shard, ...], topo: Topology):
        self.local = local
        self.global_size, self.chunks = shard_chunks(local, spec, topo)
        self._by_offset = {offsets: view for offsets, _, view in self.chunks}

    def size(self) -> torch.Size:                  # DCP compares this with the stored global size
        return self.global_size

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        props = TensorProperties.create_from_tensor(self.local)
        return [WriteItem(index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                                                      properties=props, size=self.global_size))
                for offsets, sizes, _ in self.chunks]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=offsets, sizes=sizes) for offsets, sizes, _ in self.chunks]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        try:
            return self._by_offset[torch.Size(index.offset)]
        except KeyError:
            raise ValueError(f"{index.fqn}: this rank holds no chunk at offset {tuple(index.offset)}") from None


class ShardSavePlanner(DefaultSavePlanner):
    """DCP's save planner, finding the chunks of `ShardView` values. Build it with flatten_state_dict=False,
    flatten_sharded_tensors=False: the state is already flat."""

    def lookup_object(self, index: MetadataIndex) -> Any:
        obj = self.state_dict[index.fqn]
        if isinstance(obj, ShardView):
            return obj.__get_tensor_shard__(index)
        return super().lookup_object(index)


class ShardLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, reading into the chunks of `ShardView` values in place; tensors only."""

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        # The default first maps every value through `_init_state_dict` (for meta-device tensors), which turns
        # objects it does not know, our ShardViews, into None. Our values are real tensors: nothing to init.
        if self.flatten_state_dict or self.flatten_sharded_tensors:
            raise ValueError("checkpoint state dicts are flat; build ShardLoadPlanner with flatten_state_dict=False, "
                             "flatten_sharded_tensors=False")
        self.original_state_dict = state_dict
        self.state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict[index.fqn]
        if isinstance(obj, ShardView):
            return obj.__get_tensor_shard__(index)
        return super().lookup_tensor(index)

    def load_bytes(self, read_item, value) -> None:
        # Our state holds tensors only; DCP's default would torch.load(weights_only=False) a byte item.
        raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn} is a pickled object, not a tensor; "
                              "moe_dist never writes those, so the checkpoint was altered or written by other code")
