"""Loading that never runs code from a checkpoint file.

Both of our formats are pickles underneath: DCP's `.metadata` is a pickle of its own dataclasses, and
`torch.save` files (the DeepSpeed engine's rank files) pickle their containers. A plain unpickler would call
any global a tampered file names. DCP's metadata therefore goes through an unpickler that builds only DCP's
metadata types (`SafeReader`), and `torch.save` files through torch's weights-only unpickler, which builds
tensors and containers plus the classes a caller names (`load_weights_only`).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import StorageMeta

from moe_dist.train.checkpoint.store import CheckpointError

# These are the only globals a DCP metadata file of tensors refers to.
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


class SafeReader(dcp.FileSystemReader):
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


def load_weights_only(path: Path, allow: Sequence[type] = ()) -> Any:
    """`torch.load` of a `torch.save` file onto the CPU with the weights-only unpickler: tensors, containers
    and the classes in `allow`, nothing else."""
    with torch.serialization.safe_globals(list(allow)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message continues with advice on weights_only=False, which is what this function refuses.
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: refused by weights-only loading ({first}); the file holds objects "
                                  "other than tensors, so it was altered or written by other code") from None
