"""The atomic checkpoint store: step folders that appear whole or not at all, a `latest` pointer, a size and
sha256 manifest, keep-K pruning. It does not look inside the files: the native trainer fills a folder with
DCP's shards, the DeepSpeed engine with one file per rank, and both publish and find checkpoints here.

On disk (a shared filesystem when ranks span nodes)::

    <root>/step_000123/      <the writers' files>   meta.json (the manifest, written last)
    <root>/latest            "step_000123"          (replaced after the rename)

`write` is the one save sequence: every rank writes its files into `step_000123.tmp-<nonce>/` and fsyncs them;
rank 0 then hashes every file into meta.json, fsyncs the folder, renames it to `step_000123`, fsyncs the root,
replaces `latest` (a temporary file, fsynced, renamed) and prunes. A crash at any point leaves either the
previous checkpoint as `latest` or a complete new one; `verify` names any file whose size or hash differs from
the manifest, so a truncated shard or rank file is reported by its path.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

from moe_dist.parallel.comm import barrier, broadcast_from_rank0
from moe_dist.parallel.topology import Topology

FORMAT = 1
META_NAME = "meta.json"
LATEST_NAME = "latest"
TMP_MARK = ".tmp-"                 # in the name of every folder or file that is not published yet
_RESERVED = ("format", "step", "files")      # meta.json keys the store writes itself


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the checkpoint, the file or field, and the fix."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# ------------------------------------------------------------------------------------------------- write

@contextlib.contextmanager
def open_synced(path: Path) -> Iterator[IO[bytes]]:
    """A file opened for writing whose bytes are on disk (flushed and fsynced) when the block ends. A writer
    on another node than rank 0 must sync its own files: rank 0's fsync does not reach another node's cache."""
    with open(path, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write(root: str | Path, step: int, topo: Topology, keep: int, fill: Callable[[Path], None],
          meta: dict[str, Any]) -> Path:
    """Publish the checkpoint of `step` (a collective: every rank calls it); returns its folder.

    `fill(tmp)` runs on every rank and writes that rank's files into the folder `tmp`, synced (DCP's
    `sync_files=True`, or `open_synced`). `meta` holds the caller's fields of meta.json; the store adds the
    format, the step and the manifest of every file."""
    clash = [k for k in _RESERVED if k in meta]
    if clash:
        raise ValueError(f"meta keys {clash} are written by the store itself; rename them in the caller")
    root = Path(root)
    final = root / step_dir_name(step)
    # One folder for the whole job: rank 0 draws the nonce and tells the others.
    tmp = Path(broadcast_from_rank0(str(root / f"{final.name}{TMP_MARK}{uuid.uuid4().hex[:10]}"), topo))
    if topo.rank == 0:
        tmp.mkdir(parents=True)
    barrier(topo.world)                # the folder exists before anyone writes into it
    fill(tmp)
    barrier(topo.world)                # every rank's files are complete before rank 0 hashes them
    error = None
    if topo.rank == 0:
        try:
            _publish(root, tmp, final, {"format": FORMAT, "step": step, **meta}, keep)
        except OSError as e:           # e.g. a full disk: every rank must learn it, not wait in a barrier
            error = f"checkpoint {final} was not published: {e}"
    # Rank 0's outcome doubles as the closing barrier: no rank returns before the folder is published.
    error = broadcast_from_rank0(error, topo)
    if error:
        raise CheckpointError(error)
    return final


def _publish(root: Path, tmp: Path, final: Path, meta: dict[str, Any], keep: int) -> None:
    """Rank 0: manifest, rename, `latest`, prune; each step durable before the next makes it visible."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p, fsync=True)}
             for p in sorted(tmp.iterdir()) if p.is_file()}
    _write_atomic(tmp / META_NAME, json.dumps({**meta, "files": files}, indent=1, default=str) + "\n")
    if final.exists():
        # A re-save of the same step (a restart redid it): a rename sets the old one aside at once (an rmtree
        # would leave `latest` naming a half-deleted folder for as long as it runs); prune deletes it below.
        os.replace(final, final.with_name(f"{final.name}{TMP_MARK}stale-{uuid.uuid4().hex[:8]}"))
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / LATEST_NAME, final.name + "\n")     # last: the pointer moves only to a whole folder
    prune(root, keep)


def _sha256(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        if fsync:
            # Rank 0 reads every file for the manifest anyway; on one node this fsync also covers what the
            # other ranks wrote (across nodes only the writer's own fsync reaches the shared filesystem).
            os.fsync(f.fileno())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make the folder's entries (a new file, a rename) durable: a file's own fsync does not cover its name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def complete_checkpoints(root: Path) -> list[Path]:
    """Renamed (finished) step folders, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and TMP_MARK not in p.name)


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and what saves that never finished left behind."""
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for p in root.iterdir():
        if TMP_MARK in p.name:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------- find

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
    files = meta.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: {meta_path} has no file manifest")
    for name, want in files.items():
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


def find_on_rank0(root: str | Path, fallback: bool, topo: Topology,
                  say: Callable[[str], None] = print) -> Optional[tuple[Path, dict]]:
    """`find` as a collective: rank 0 picks and verifies (each file hashed once, not once per rank) and every
    rank gets its answer, or raises its error, so all ranks take the same decision."""
    found = err = None
    if topo.rank == 0:
        try:
            found = find(root, fallback, say=say)
        except CheckpointError as e:
            err = str(e)
    found, err = broadcast_from_rank0((found, err), topo)
    if err:
        raise CheckpointError(err)
    return found
