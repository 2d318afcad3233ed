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
        except OSError as e:             # missing or unreadable: name the file, not a traceback
            raise CheckpointError(f"{path}: unreadable checkpoint metadata ({e.strerror or e})") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_weights_only(path: Path, allow: Sequence[type] = ()) -> Any:
    """`torch.load` of a `torch.save` file onto the CPU with the weights-only unpickler: tensors, containers
    and the classes in `allow`, nothing else. Any file that cannot be loaded raises CheckpointError naming it:
    refused objects, and a truncated, empty, damaged or missing file."""
    with torch.serialization.safe_globals(list(allow)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message wraps the reason in advice on weights_only=False, which is what this refuses.
            reason = _unpickling_reason(str(e))
            if "GLOBAL" in reason:
                raise CheckpointError(f"{path}: refused by weights-only loading ({reason}); the file holds objects "
                                      "other than tensors, so it was altered or written by other code") from None
            raise CheckpointError(f"{path}: refused by weights-only loading ({reason}); the file is damaged or "
                                  "was not written by torch.save: restore it or load an earlier checkpoint "
                                  "(checkpoint.fallback=true)") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            # A truncated zip ('failed finding central directory'), an empty file (EOFError), a missing one.
            what = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
            state = "it is truncated or damaged"
            if isinstance(e, OSError):
                what = e.strerror or what
                state = "it is missing" if isinstance(e, FileNotFoundError) else "it cannot be read"
            elif isinstance(e, EOFError):
                what = "the file ends before its data"
            raise CheckpointError(f"{path} cannot be loaded ({what}): {state}; restore it or load an earlier "
                                  "checkpoint (checkpoint.fallback=true)") from None


def _unpickling_reason(message: str) -> str:
    """The line of torch's weights-only error that says what was refused (its other lines are advice)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or ln.lower().startswith("unsupported"):
            return ln
    return lines[0] if lines else "unreadable pickle"
