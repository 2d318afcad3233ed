"""The atomic checkpoint store: step folders that appear whole or not at all, a `latest` pointer, a size and
sha256 manifest, keep-K pruning. It does not look inside the files: the native trainer fills a folder with
DCP's shards, the DeepSpeed engine with one file per rank, and both publish and find checkpoints here.

On disk (a shared filesystem when ranks span nodes)::

    <root>/step_000123/      <the writers' files>   meta.json (the manifest, written last)
    <root>/latest            "step_000123"          (replaced after the rename)

`write` is the one save sequence: every rank writes its files into `step_000123.tmp-<nonce>-<pid>-<host>/`
and fsyncs them; rank 0 then hashes every file into meta.json (which carries a sha256 of its own content),
fsyncs the folder, renames it to `step_000123`, fsyncs the root, replaces `latest` (a temporary file, fsynced,
renamed) and prunes. A crash at any point leaves either the previous checkpoint as `latest` or a complete new
one; a failed save (a full disk on any rank) removes its temporary folder and leaves `latest` where it was.

Checkpoints are ordered by the step meta.json records (the folder name is only a fallback): names stop sorting
by step past step 999,999. Pruning never deletes the checkpoint `latest` names nor the one just written, and a
temporary entry only when it is stale: its writer is this process, or a dead process on this host, or it
predates the run lock this process holds on the folder (moe_dist.train.run_lock). `verify` names any file
whose size or hash differs from the manifest, and `find` reports every unusable checkpoint by name and, with
fallback, goes on to the previous complete one.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch.distributed.checkpoint.api import CheckpointException

from moe_dist.parallel.comm import broadcast_from_rank0, gather_stack
from moe_dist.parallel.topology import Topology
from moe_dist.train import run_lock

FORMAT = 2                         # 2: meta.json carries META_SUM, the sha256 of its own canonical content
READS = (1, 2)                     # format 1 (no META_SUM) was written by earlier versions and still loads
META_NAME = "meta.json"
META_SUM = "meta_sha256"
LATEST_NAME = "latest"
TMP_MARK = ".tmp-"                 # in the name of every folder or file that is not published yet
_RESERVED = ("format", "step", "files", META_SUM)      # meta.json keys the store writes itself
_STEP_DIR = re.compile(r"step_(\d+)")
_MSG_BYTES = 1024                  # a rank's save error as sent to the others (utf-8, cut to this length)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the checkpoint, the file or field, and the fix."""


class CheckpointSaveError(CheckpointError):
    """A save failed (a full disk, an I/O error); the previous checkpoint and `latest` are untouched."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of_name(name: str) -> Optional[int]:
    """The step in a checkpoint folder's name, or None when the name is not one (a copy, a temporary)."""
    m = _STEP_DIR.fullmatch(name)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------- temporary names

def _tmp_name(base: str) -> str:
    """`<base>.tmp-<nonce>-<pid>-<host>`: the writer's identity lets prune tell a live writer's entry from a
    dead one's (the host name may hold dashes; it comes last)."""
    return f"{base}{TMP_MARK}{uuid.uuid4().hex[:10]}-{os.getpid()}-{socket.gethostname()}"


def _tmp_owner(name: str) -> Optional[tuple[int, str]]:
    """(pid, host) from a temporary name, or None when the name carries none (hand-made or an older version)."""
    parts = name.split(TMP_MARK, 1)[-1].split("-", 2)
    if len(parts) == 3 and re.fullmatch(r"[0-9a-f]+", parts[0]) and parts[1].isdigit() and parts[2]:
        return int(parts[1]), parts[2]
    return None


def _is_stale(entry: Path, root: Path) -> bool:
    """Whether a temporary entry in `root` may be deleted: nobody can be writing it any more."""
    owner = _tmp_owner(entry.name)
    if owner is None:
        return True                # every writer of this version names itself, so none is writing this one
    pid, host = owner
    if host == socket.gethostname() and (pid == os.getpid() or not run_lock.pid_alive(pid)):
        return True                # this process saves one checkpoint at a time; a dead writer writes nothing
    since = run_lock.held_since(root)
    if since is None:
        return False               # a live process on this host, or one on another host: not ours to judge
    try:
        return entry.lstat().st_mtime < since      # older than our lock: its writer died before we started
    except FileNotFoundError:
        return False


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
    format, the step, the manifest of every file and meta.json's own checksum. When any rank fails (a full
    disk), every rank raises CheckpointSaveError, the temporary folder is removed and `latest` still names
    the previous checkpoint."""
    clash = [k for k in _RESERVED if k in meta]
    if clash:
        raise ValueError(f"meta keys {clash} are written by the store itself; rename them in the caller")
    root = Path(root)
    final = root / step_dir_name(step)
    # One folder for the whole job: rank 0 names and creates it, and tells the others (or why it could not).
    tmp, error = None, None
    if topo.rank == 0:
        tmp = root / _tmp_name(final.name)
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            error = _save_failed(final, f"creating {tmp}", describe_error(e, root), root)
    tmp, error = broadcast_from_rank0((tmp, error), topo)
    if error:
        raise CheckpointSaveError(error)
    mine, described, io = None, None, True
    try:
        fill(tmp)
    except (Exception, CheckpointException) as e:      # DCP's CheckpointException is a BaseException
        # Judged before the folder is removed: removing it frees the space that tells a full disk.
        mine, described, io = e, describe_error(e, tmp), _is_io_error(e, tmp)
    # Doubles as the barrier: every rank's files are complete (or failed) before rank 0 goes on.
    errors = _gather_errors(described, topo)
    if any(errors):
        if topo.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if not io:
            raise mine                 # a bug in the writer, not the disk: its own traceback says more
        rank, what = next((r, e) for r, e in enumerate(errors) if e)
        # DCP hands every rank the same error (naming the rank that failed): then no rank is singled out.
        who = f"rank {rank} " if len({e for e in errors}) > 1 else ""
        exc = CheckpointSaveError(_save_failed(final, f"{who}writing its files into {tmp}", what, root))
        raise exc from mine
    error = None
    if topo.rank == 0:
        try:
            _publish(root, tmp, final, {"format": FORMAT, "step": step, **meta}, keep)
        except _NotDurable as e:
            error = (f"checkpoint {final} was saved and {root / LATEST_NAME} names it, but making the rename "
                     f"durable failed ({describe_error(e.__cause__ or e, root)}); check the filesystem of {root}")
        except OSError as e:           # e.g. a full disk: every rank must learn it, not wait in a barrier
            shutil.rmtree(tmp, ignore_errors=True)
            error = _save_failed(final, "publishing it", describe_error(e, root), root)
    # Rank 0's outcome doubles as the closing barrier: no rank returns before the folder is published.
    error = broadcast_from_rank0(error, topo)
    if error:
        raise CheckpointSaveError(error)
    return final


def describe_error(e: BaseException, where: Path) -> str:
    """What a failed write or read of checkpoint files under `where` ran into, in one line for a message:
    'no space left on device' when a full disk is anywhere in the chain (torch turns it into 'unexpected pos N
    vs M' and keeps the OSError as the context; DCP wraps each rank's error in a CheckpointException, whose
    failing ranks are named), else the first line of the error."""
    ranks = f" (on rank {', '.join(map(str, sorted(e.failures)))})" if isinstance(e, CheckpointException) else ""
    for exc in _chain(e):
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return ("no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded") + ranks
    innermost = next((x for x in _chain(e) if not isinstance(x, CheckpointException)), e)
    text = str(innermost).strip().splitlines()
    what = f"{type(innermost).__name__}: {text[0] if text else ''}{ranks}"
    free = _free_bytes(where)
    if free is not None and free < (1 << 20):
        # A path-based torch.save loses the errno altogether ('basic_ios::clear'); an empty disk says it.
        return f"no space left on device ({free} bytes free; the writer reported {what})"
    return what


def _is_io_error(e: BaseException, where: Path) -> bool:
    """Whether a writer's failure came from the filesystem (an OSError anywhere in the chain, or a full disk
    behind torch's 'unexpected pos'), rather than from a bug in the writer."""
    if any(isinstance(x, OSError) for x in _chain(e)):
        return True
    free = _free_bytes(where)
    return free is not None and free < (1 << 20)


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen, todo = set(), [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        if isinstance(x, CheckpointException):
            todo.extend(wrapped[0] for wrapped in x.failures.values())
        todo.extend([x.__cause__, x.__context__])


def _free_bytes(path: Path) -> Optional[int]:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def _save_failed(final: Path, doing: str, what: Any, root: Path) -> str:
    prev, _ = _read_latest(root)
    kept = (f"the previous checkpoint {prev} is intact and {root / LATEST_NAME} still names it"
            if prev is not None else "no earlier checkpoint was touched")
    fix = ("free space there or point checkpoint.dir at a filesystem with room"
           if "space" in str(what) or "quota" in str(what) else "fix the cause and run again to resume")
    return (f"checkpoint {final} was not saved: {what} while {doing}; {kept}, and the temporary folder was "
            f"removed; {fix}")


def _gather_errors(mine: Optional[str], topo: Topology) -> list[Optional[str]]:
    """Every rank's error (None: it wrote its files) on every rank: a collective over the world."""
    if topo.world.handle is None:
        return [mine]
    buf = torch.zeros(_MSG_BYTES, dtype=torch.uint8)
    if mine is not None:
        data = (mine.encode()[:_MSG_BYTES - 1] or b"?")
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if torch.distributed.get_backend(topo.world.handle) == "nccl":
        buf = buf.to(torch.device("cuda", torch.cuda.current_device()))
    # Host sync: every rank must know whether any rank failed before the folder may be published.
    rows = gather_stack(buf, topo.world).cpu()
    return [bytes(r.tolist()).rstrip(b"\0").decode(errors="replace") or None for r in rows]


def _publish(root: Path, tmp: Path, final: Path, meta: dict[str, Any], keep: int) -> None:
    """Rank 0: manifest, rename, `latest`, prune; each step durable before the next makes it visible. A
    failure before `latest` moves puts everything back: the new folder under its temporary name (the caller
    removes it) and a re-saved step's old folder under its own name."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p, fsync=True)}
             for p in sorted(tmp.iterdir()) if p.is_file()}
    _write_atomic(tmp / META_NAME, json.dumps(seal({**meta, "files": files}), indent=1) + "\n")
    aside = None
    if final.exists():
        # A re-save of the same step (a restart redid it): a rename sets the old one aside at once (an rmtree
        # would leave `latest` naming a half-deleted folder for as long as it runs); prune deletes it below.
        aside = root / _tmp_name(final.name)
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / LATEST_NAME, final.name + "\n")     # last: the pointer moves only to a whole folder
    except _NotDurable:
        raise                          # `latest` moved already: only the closing fsync failed; undo nothing
    except OSError:
        with contextlib.suppress(OSError):
            if final.exists() and not tmp.exists():
                os.replace(final, tmp)
            if aside is not None:
                os.replace(aside, final)
        raise
    prune(root, keep, protect=(final,))


def seal(meta: dict[str, Any]) -> dict[str, Any]:
    """meta as JSON values plus META_SUM, the sha256 of its canonical form (sorted keys, no spaces): an edit
    of any field, the step included, no longer matches."""
    plain = json.loads(json.dumps({k: v for k, v in meta.items() if k != META_SUM}, default=str))
    return {**plain, META_SUM: _meta_digest(plain)}


def _meta_digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != META_SUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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


class _NotDurable(OSError):
    """The rename of `_write_atomic` happened but the folder's fsync failed: the new name is visible."""


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(_tmp_name(path.name))
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    try:
        _fsync_dir(path.parent)
    except OSError as e:
        raise _NotDurable(e.errno, e.strerror) from e


# ------------------------------------------------------------------------------------------------- order

def complete_checkpoints(root: Path) -> list[Path]:
    """Renamed (finished) step folders, oldest first by the step each records."""
    return [p for _, p in _by_step(Path(root))]


def _by_step(root: Path) -> list[tuple[int, Path]]:
    """(recorded step, folder) of every folder named like a checkpoint, oldest first. The step comes from
    meta.json; when that cannot be read, from the name (verify then reports the folder)."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        named = step_of_name(p.name)
        if named is not None and p.is_dir():
            out.append((_recorded_step(p, named), p))
    return sorted(out, key=lambda sp: (sp[0], sp[1].name))


def _recorded_step(path: Path, default: int) -> int:
    """The step meta.json records, when it can be trusted (it matches its own checksum, or predates checksums);
    else `default` (the name's): an edited step must not reorder checkpoints, e.g. make a fallback skip valid
    ones that lie between the edited value and the real one."""
    try:
        meta = json.loads((path / META_NAME).read_bytes().decode())
        step = meta.get("step")
        if META_SUM in meta and meta[META_SUM] != _meta_digest(meta):
            return default
    except (OSError, ValueError, AttributeError):
        return default
    return step if isinstance(step, int) and not isinstance(step, bool) else default


def prune(root: Path, keep: int, protect: Iterable[Path] = ()) -> None:
    """Delete all but the newest `keep` checkpoints (by recorded step), never the one `latest` names, those in
    `protect`, nor a step-named folder without meta.json; and the stale temporary entries that saves which
    never finished left behind."""
    root = Path(root)
    spare = {Path(p) for p in protect}
    named, _ = _read_latest(root)
    if named is not None:
        spare.add(named)
    for _, old in _by_step(root)[:-keep]:
        # A step-named folder without meta.json was not published by this store (the manifest goes in before
        # the rename): someone's own folder, e.g. an output folder named step_000001 inside checkpoint.dir.
        if old not in spare and (old / META_NAME).is_file():
            shutil.rmtree(old, ignore_errors=True)
    for p in root.iterdir():
        if TMP_MARK in p.name and _is_stale(p, root):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def check_fresh_start(root: str | Path, topo: Optional[Topology] = None) -> None:
    """checkpoint.resume=never: refuse a folder that already holds checkpoints. A new run there would mix its
    steps with theirs, move `latest` backwards, and keep-K pruning would delete the older run's checkpoints.
    With `topo`, a collective: rank 0 looks and every rank raises alike."""
    error = None
    if topo is None or topo.rank == 0:
        done = _by_step(Path(root))
        if done:
            step, newest = done[-1]
            error = (f"checkpoint.resume=never but {root} already holds {len(done)} checkpoint(s) of another run "
                     f"(newest {newest.name}, step {step}); a fresh run there would mix its checkpoints with "
                     "them and pruning would delete theirs: set checkpoint.resume=auto to continue that run, "
                     "point checkpoint.dir (or train.out_dir) at a new folder, or move that folder away")
    if topo is not None:
        error = broadcast_from_rank0(error, topo)
    if error:
        raise CheckpointError(error)


# ------------------------------------------------------------------------------------------------- find

def _corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is corrupt: {what}")


def verify(path: Path, require: Sequence[str] = ()) -> dict[str, Any]:
    """Check meta.json (readable, its own checksum, its step, the caller's `require`d keys) and every file of
    the manifest (present, same size, same sha256); returns the meta."""
    meta_path = path / META_NAME
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {meta_path} is missing")
    try:
        raw = meta_path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} is unreadable: {meta_path}: {e.strerror or e}") from None
    try:
        meta = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _corrupt(path, f"{meta_path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}: "
                             "damaged on disk)") from None
    except json.JSONDecodeError as e:
        raise _corrupt(path, f"{meta_path} is not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict):
        raise _corrupt(path, f"{meta_path} holds a JSON {type(meta).__name__}, not an object")
    if meta.get("format") not in READS:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r} in {meta_path}; this version "
                              f"reads {' and '.join(map(str, READS))}: load it with the moe_dist that wrote it")
    if meta["format"] >= 2 and meta.get(META_SUM) != _meta_digest(meta):
        raise _corrupt(path, f"{meta_path} does not match its own {META_SUM} (edited or damaged after the save)")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _corrupt(path, f"{meta_path} has no valid step ({step!r})")
    named = step_of_name(path.name)
    if named is not None and named != step:
        raise _corrupt(path, f"{meta_path} says step {step} but the folder is named {path.name}")
    missing = [k for k in require if k not in meta]
    if missing:
        raise _corrupt(path, f"{meta_path} lacks {', '.join(map(repr, missing))}")
    files = meta.get("files")
    if not isinstance(files, dict):
        raise _corrupt(path, f"{meta_path} has no file manifest")
    for name, want in files.items():
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise _corrupt(path, f"{meta_path} names {name!r}, which is not a file inside the checkpoint folder")
        if (not isinstance(want, dict) or not isinstance(want.get("bytes"), int)
                or not isinstance(want.get("sha256"), str)):
            raise _corrupt(path, f"{meta_path}'s entry for {name} lacks its bytes or sha256")
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: file {f} is missing")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise _corrupt(path, f"file {f} has {size} bytes, the manifest says {want['bytes']} (truncated or "
                                 "overwritten)")
        try:
            digest = _sha256(f)
        except OSError as e:
            raise CheckpointError(f"checkpoint {path} is unreadable: file {f}: {e.strerror or e}") from None
        if digest != want["sha256"]:
            raise _corrupt(path, f"file {f} does not match its sha256 in {META_NAME}")
    return meta


def _read_latest(root: Path) -> tuple[Optional[Path], Optional[str]]:
    """(the folder `latest` names, None) when usable; (None, what is wrong) when not; (None, None) when
    there is no `latest`."""
    pointer = root / LATEST_NAME
    if not pointer.exists() and not pointer.is_symlink():
        return None, None
    try:
        raw = pointer.read_bytes()
    except OSError as e:
        return None, f"{pointer} cannot be read ({e.strerror or e})"
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, f"{pointer} is not UTF-8 text (damaged on disk)"
    if not name:
        return None, f"{pointer} is empty"
    if step_of_name(name) is None:
        return None, f"{pointer} names {name[:80]!r}, which is not a checkpoint folder name (step_NNNNNN)"
    if not (root / name).is_dir():
        return None, f"{pointer} names {name}, which does not exist"
    return root / name, None


def find(root: str | Path, fallback: bool, say: Callable[[str], None] = print, require: Sequence[str] = (),
         exclude: Iterable[Path] = ()) -> Optional[tuple[Path, dict]]:
    """The checkpoint to resume from (verified), or None when there is none. `latest` names it; an unusable
    `latest` or checkpoint raises naming it, or with `fallback` is reported and skipped for the previous
    complete checkpoint by recorded step. `exclude`: folders a caller could not load although they verified."""
    root = Path(root)
    skip = {Path(p) for p in exclude}
    done = [(s, p) for s, p in _by_step(root) if p not in skip]
    first, problem = _read_latest(root)
    if first is not None and first in skip:
        first, problem = None, f"{first} could not be loaded"
    newest_first = [p for _, p in reversed(done)]
    errors: list[str] = []
    if problem is not None:
        if not fallback:
            alt = f" ({newest_first[0].name})" if newest_first else ""
            raise CheckpointError(f"{problem}; set checkpoint.fallback=true to load the newest complete checkpoint"
                                  f"{alt} instead, or write its folder name into {root / LATEST_NAME}")
        say(f"checkpoint: {problem}; falling back to the newest complete checkpoint")
        errors.append(problem)
        candidates = newest_first
    elif first is None:
        if not done:
            return None
        candidates = newest_first
        say(f"checkpoint: {root / LATEST_NAME} is missing; using the newest complete folder {candidates[0]}")
    else:
        below = _recorded_step(first, step_of_name(first.name) or 0)
        candidates = [first] + [p for s, p in reversed(done) if s < below]
    for path in candidates:
        try:
            meta = verify(path, require)
        except CheckpointError as e:
            if not fallback:
                raise CheckpointError(f"{e}; set checkpoint.fallback=true to load the previous complete "
                                      "checkpoint instead") from None
            errors.append(str(e))
            say(f"checkpoint: {e}; falling back to the previous checkpoint")
            continue
        return path, meta
    raise CheckpointError(f"no usable checkpoint in {root}: " + "; ".join(errors) + "; restore one of them, or "
                          "start a new run with a new checkpoint.dir")


def find_on_rank0(root: str | Path, fallback: bool, topo: Topology, say: Callable[[str], None] = print,
                  require: Sequence[str] = (), exclude: Iterable[Path] = ()) -> Optional[tuple[Path, dict]]:
    """`find` as a collective: rank 0 picks and verifies (each file hashed once, not once per rank) and every
    rank gets its answer, or raises its error, so all ranks take the same decision."""
    found = err = None
    if topo.rank == 0:
        try:
            found = find(root, fallback, say=say, require=require, exclude=exclude)
        except CheckpointError as e:
            err = str(e)
    found, err = broadcast_from_rank0((found, err), topo)
    if err:
        raise CheckpointError(err)
    return found
