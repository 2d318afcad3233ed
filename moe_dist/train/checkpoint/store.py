"""Sharded, resharding training checkpoints on `torch.distributed.checkpoint` (DCP).

What a checkpoint holds: every parameter and its AdamW state (exp_avg, exp_avg_sq, step) as the GLOBAL
tensor, the persistent buffers (the DeepSeek expert bias), one RNG state per rank, and the step (the lr
schedule and the batcher are pure functions of the step, so the step is their whole state).

Why global tensors: a rank describes its shard as one or more chunks (offsets, sizes) of the global tensor,
computed from `model.param_shards` and the topology. Experts therefore live under their global index, and a
checkpoint written with one layout loads into any other (EP=2 → EP=4, TP=2 → TP=1): DCP reads, for each chunk
a rank asks for, the overlapping pieces that were stored. Replicas (dp, edp copies) describe the same chunk
and DCP's dedup keeps one writer. The chunk description is DCP's `_Checkpointable` protocol
(`__create_write_items__`, `__create_chunk_list__`, `__get_tensor_shard__`), the one DTensor implements;
`ShardView` implements it on a plain local tensor, and two small planner subclasses look such objects up
(the default planners only look inside `torch.Tensor` values).

On disk (a shared filesystem when ranks span nodes)::

    <dir>/step_000123/      __0_0.distcp ...  .metadata   (DCP)   meta.json (ours, written last)
    <dir>/latest            "step_000123"                 (updated after the rename)

A save writes into `step_000123.tmp-<nonce>/`, adds meta.json (config fields that fix the shapes, the layout,
the step, a size + sha256 manifest of every file), renames the folder, then replaces `latest`. A crash at
any point leaves either the previous checkpoint as `latest` or a complete new one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, StorageMeta, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from moe_dist.config import Config
from moe_dist.parallel.tensor_parallel import Shard, global_shape
from moe_dist.parallel.topology import Topology

FORMAT = 1
META_NAME = "meta.json"
LATEST_NAME = "latest"
# The config fields that fix parameter shapes: a checkpoint whose values differ cannot load.
SHAPE_FIELDS = {
    "model": ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "dense_hidden", "moe_every",
              "first_dense", "tie_embeddings"),
    "moe": ("num_experts", "expert_hidden", "activation", "num_shared_experts", "shared_expert_hidden",
            "expert_bias"),
}
# Fields that do not change shapes but do change what "continue exactly" means; differences are reported.
DATA_FIELDS = {"data": ("path", "val_fraction"), "train": ("seed", "batch_size", "seq_len", "grad_accum_steps")}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the checkpoint, the file or field, and the fix."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# ----------------------------------------------------------------------------- local shard → global chunks

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


class _SavePlanner(DefaultSavePlanner):
    def lookup_object(self, index: MetadataIndex) -> Any:
        obj = self.state_dict[index.fqn]
        if isinstance(obj, ShardView):
            return obj.__get_tensor_shard__(index)
        return super().lookup_object(index)


class _LoadPlanner(DefaultLoadPlanner):
    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        # The default first maps every value through `_init_state_dict` (for meta-device tensors), which turns
        # objects it does not know, our ShardViews, into None. Our values are real tensors: nothing to init.
        if self.flatten_state_dict or self.flatten_sharded_tensors:
            raise ValueError("checkpoint state dicts are flat; build _LoadPlanner with flatten_state_dict=False, "
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


# DCP's `.metadata` is a pickle of its own dataclasses; plain pickle.load would run any global a tampered file
# names. These are the only globals a DCP metadata file of tensors refers to.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_GLOBALS.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                         torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


class _SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose metadata load only builds DCP's own metadata types (weights-only in spirit)."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable checkpoint metadata ({e})") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ----------------------------------------------------------------------------------- the training state

def materialize_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter AdamW's state (zeros and step 0 before the first step), so that a fresh optimizer
    has tensors for DCP to load into. AdamW then takes its first step from this state exactly as from an
    empty one (it initialises to the same zeros)."""
    for p in model.parameters():
        st = optimizer.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def state_for_dcp(model, optimizer, topo: Topology, rng: bool = True) -> dict[str, Any]:
    """Flat name → tensor (replicated) or ShardView (sharded) for every piece of training state."""
    materialize_optimizer_state(model, optimizer)
    shards = model.param_shards
    out: dict[str, Any] = {}

    def put(key: str, t: torch.Tensor, spec: tuple[Shard, ...]) -> None:
        out[key] = ShardView(t.detach(), spec, topo) if spec else t.detach()

    for name, p in model.named_parameters():
        spec = shards.get(name, ())
        st = optimizer.state[p]
        put(f"model.{name}", p, spec)
        put(f"optim.{name}.exp_avg", st["exp_avg"], spec)
        put(f"optim.{name}.exp_avg_sq", st["exp_avg_sq"], spec)
        out[f"optim.{name}.step"] = st["step"]
    for name, b in model.named_buffers():
        owner, _, short = name.rpartition(".")
        if short not in model.get_submodule(owner)._non_persistent_buffers_set:
            out[f"buffer.{name}"] = b          # e.g. the expert bias: replicated, state like a parameter
    if rng:
        # Per rank under its own key (never deduplicated): jitter noise continues exactly on resume.
        out[f"rng.cpu.{topo.rank}"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out[f"rng.cuda.{topo.rank}"] = torch.cuda.get_rng_state()
    return out


def shape_fields(cfg: Config) -> dict[str, Any]:
    return {f"{sec}.{f}": getattr(getattr(cfg, sec), f) for sec, fields in SHAPE_FIELDS.items() for f in fields}


def data_fields(cfg: Config) -> dict[str, Any]:
    return {f"{sec}.{f}": getattr(getattr(cfg, sec), f) for sec, fields in DATA_FIELDS.items() for f in fields}


def layout_of(topo: Topology) -> dict[str, int]:
    d = topo.dims
    return {"world": d.world, "tp": d.tp, "ep": d.ep, "etp": d.etp, "dp": d.dp, "edp": d.edp}


# ------------------------------------------------------------------------------------------------- save

def _world_pg(topo: Topology):
    return topo.world.handle


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when no process group exists: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def broadcast_from_rank0(obj: Any, topo: Topology) -> Any:
    """Rank 0's value on every rank (a collective over the world)."""
    if topo.world.handle is None:          # one process (or a virtual layout without process groups)
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=topo.world.handle)
    return box[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(root: str | Path, step: int, model, optimizer, cfg: Config, topo: Topology, keep: int,
         extra: Optional[dict[str, Any]] = None) -> Path:
    """Write the checkpoint of `step` (every rank calls this: it is a collective); returns its folder."""
    root = Path(root)
    final = root / step_dir_name(step)
    # One name for the whole job: rank 0 draws the nonce and tells the others.
    tmp = Path(broadcast_from_rank0(str(root / f"{step_dir_name(step)}.tmp-{uuid.uuid4().hex[:10]}"), topo))
    if topo.rank == 0:
        tmp.mkdir(parents=True)
    _barrier(topo)
    state = state_for_dcp(model, optimizer, topo)
    with _quiet_single_process():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True, thread_count=1),
                 planner=_SavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False), process_group=_world_pg(topo))
    # dcp.save returns on every rank only after rank 0 has written .metadata: all files are in place.
    if topo.rank == 0:
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {"format": FORMAT, "step": step, "shape": shape_fields(cfg), "data": data_fields(cfg),
                "layout": layout_of(topo), "files": files, "torch": torch.__version__, **(extra or {})}
        _write_atomic(tmp / META_NAME, json.dumps(meta, indent=1, default=str) + "\n")
        _fsync_dir(tmp)
        if final.exists():                      # a re-save of the same step (e.g. after a restart)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / LATEST_NAME, final.name + "\n")     # last: the pointer moves only to a whole one
        prune(root, keep)
    _barrier(topo)
    return final


def _barrier(topo: Topology) -> None:
    if topo.world.handle is not None:
        dist.barrier(group=topo.world.handle)


def complete_checkpoints(root: Path) -> list[Path]:
    """Renamed (finished) step folders, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and ".tmp-" not in p.name)


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and temporary folders of saves that never finished."""
    done = complete_checkpoints(root)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for p in root.iterdir():
        if ".tmp-" in p.name and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- load

def verify(path: Path) -> dict[str, Any]:
    """Check meta.json and every file of the manifest (present, same size, same sha256); returns the meta."""
    meta_path = path / META_NAME
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {meta_path} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {meta_path} is not valid JSON ({e.msg})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}; this version reads {FORMAT}")
    for name, want in meta["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: file {f} is missing")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: file {f} has {size} bytes, the manifest says "
                                  f"{want['bytes']} (truncated or overwritten)")
        if _sha256(f) != want["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: file {f} does not match its sha256 in {META_NAME}")
    return meta


def check_compatible(meta: dict[str, Any], cfg: Config, path: Path) -> list[str]:
    """Refuse a checkpoint of another model shape (naming the field); return notes on data differences."""
    mine = shape_fields(cfg)
    for key, saved in meta["shape"].items():
        if key in mine and mine[key] != saved:
            raise CheckpointError(f"checkpoint {path} does not fit this model: {key} {saved} (checkpoint) vs "
                                  f"{mine[key]} (config); set {key}={saved} or start a new run in another "
                                  "checkpoint.dir")
    notes = []
    now = data_fields(cfg)
    for key, saved in meta.get("data", {}).items():
        if key in now and now[key] != saved:
            notes.append(f"{key} {saved} (checkpoint) vs {now[key]} (config): batches after the resume differ "
                         "from the interrupted run's")
    return notes


def find(root: str | Path, fallback: bool, say: Callable[[str], None] = print) -> Optional[tuple[Path, dict]]:
    """The checkpoint to resume from (verified), or None when there is none. `latest` names it; a corrupt one
    raises, or with `fallback` gives the newest older checkpoint that verifies (saying so)."""
    root = Path(root)
    done = complete_checkpoints(root)
    pointer = root / LATEST_NAME
    if pointer.is_file():
        first = root / pointer.read_text().strip()
        if not first.is_dir():
            raise CheckpointError(f"{pointer} names {first.name}, which does not exist; delete {pointer} or "
                                  "set checkpoint.resume=never")
    elif done:
        first = done[-1]
        say(f"checkpoint: {pointer} is missing; using the newest complete folder {first}")
    else:
        return None
    candidates = [first] + [p for p in reversed(done) if p.name < first.name]
    errors = []
    for path in candidates:
        try:
            meta = verify(path)
        except CheckpointError as e:
            if not fallback:
                raise CheckpointError(f"{e}; set checkpoint.fallback=true to load the previous complete "
                                      "checkpoint instead") from None
            errors.append(str(e))
            say(f"checkpoint: {e}; falling back to the previous checkpoint")
            continue
        return path, meta
    raise CheckpointError("no usable checkpoint in " + str(root) + ": " + "; ".join(errors))


def load(path: Path, meta: dict[str, Any], model, optimizer, topo: Topology) -> bool:
    """Fill model, optimizer state, buffers (and this rank's RNG when the layout is the one saved) in place
    from a verified checkpoint; returns whether the RNG state was restored."""
    same_layout = meta["layout"] == layout_of(topo)
    reader = _SafeReader(path)
    stored = reader.read_metadata().state_dict_metadata
    state = state_for_dcp(model, optimizer, topo, rng=same_layout)
    for key in [k for k in state if k.startswith("rng.") and k not in stored]:
        del state[key]                         # e.g. saved on a CPU machine, resumed on a GPU one
    missing = sorted(k for k in state if k not in stored)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} entries this model needs, e.g. "
                              f"{missing[0]}; it was saved by a different model or version")
    with _quiet_single_process():
        dcp.load(state, storage_reader=reader, planner=_LoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
                 process_group=_world_pg(topo))
    restored = f"rng.cpu.{topo.rank}" in state
    if restored:
        torch.set_rng_state(state[f"rng.cpu.{topo.rank}"])
    if f"rng.cuda.{topo.rank}" in state:
        torch.cuda.set_rng_state(state[f"rng.cuda.{topo.rank}"])
    return restored


def describe_layout(layout: dict[str, int]) -> str:
    return f"world={layout['world']} tp={layout['tp']} ep={layout['ep']} etp={layout['etp']} dp={layout['dp']}"


__all__ = ["CheckpointError", "ShardView", "shard_chunks", "save", "load", "find", "verify", "check_compatible",
           "prune", "complete_checkpoints", "broadcast_from_rank0", "layout_of", "state_for_dcp", "step_dir_name", "describe_layout"]
