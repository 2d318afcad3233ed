"""How a failed `moe-dist` command ends: one line on stderr and a documented exit code.

Every command runs inside one boundary (`moe_dist.cli.main`) that turns an exception into

    moe-dist: <kind> error: <what happened>; <the fix>

and an exit code: 2 for bad input (config, layout, arguments, data or model files, an unusable checkpoint,
a model too large for this machine), 1 for a failure at run time (a dead peer, a full disk, a non-finite loss,
an allocation that failed), 130 after Ctrl-C, 143 after a SIGTERM save (the trainer returns that one itself).
Anything the boundary does not recognise is a bug: its traceback is printed, then a line asking to report it.
`--debug` prints the traceback of recognised errors too.

:func:`classify` is the pure part (exception -> :class:`Report`); :func:`report` prints.
"""
from __future__ import annotations

import contextlib
import errno
import sys
import traceback
from dataclasses import dataclass
from typing import Iterator, Optional, TextIO

EXIT_OK = 0
EXIT_RUNTIME = 1               # the input was fine, running it failed
EXIT_BAD_INPUT = 2             # a config, layout, argument, file or checkpoint error, reported before anything starts
EXIT_INTERRUPTED = 130         # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143          # stopped by SIGTERM after saving a checkpoint (128 + SIGTERM)

# The exit codes as `moe-dist --help` lists them.
EXIT_CODES_HELP = """exit codes:
  0    done
  1    runtime failure (a rank or the network failed, disk full, out of memory while running, non-finite loss)
  2    bad input (config, layout, arguments, data or model files, an unusable checkpoint, launcher variables)
  130  interrupted (Ctrl-C)
  143  stopped by SIGTERM after saving a checkpoint; run the same command again to resume

A failure ends with one line `moe-dist: <kind> error: <what happened>; <the fix>` on stderr; --debug adds the
traceback. A traceback without --debug is a bug in moe-dist: please report it."""


class CommandError(Exception):
    """An error a command reports as one line, `moe-dist: <kind> error: <message>`, exiting with `code`."""

    def __init__(self, kind: str, message: str, code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.kind, self.message, self.code = kind, message, code


@dataclass(frozen=True)
class Report:
    kind: str
    message: str
    code: int
    bug: bool = False          # not recognised: print the traceback and ask for a report


@contextlib.contextmanager
def bad_input(kind: str, *types: type[BaseException]) -> Iterator[None]:
    """Inside the block, the given exception types are bad input of `kind` (exit 2): used around the calls
    whose ValueErrors are about the user's files (prepare-data, the data check), so that a ValueError anywhere
    else still reads as the bug it is."""
    try:
        yield
    except CommandError:
        raise
    except types as e:
        if isinstance(e, OSError) and classify(e).code != EXIT_BAD_INPUT:
            raise                       # a full disk stays a runtime failure
        raise CommandError(kind, _text(e)) from e


def _text(e: BaseException) -> str:
    """The exception's message on one line."""
    if isinstance(e, OSError) and e.strerror:
        where = f" ({e.filename})" if e.filename is not None else ""
        return f"{e.strerror}{where}"
    text = str(e).strip() or type(e).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines) if len(lines) <= 3 else lines[0]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


_ALLOCATOR_TEXT = ("can't allocate memory", "out of memory", "not enough memory", "cannot allocate memory")
_BAD_PATH_ERRNOS = {errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EEXIST,
                    errno.ENAMETOOLONG, errno.EROFS, errno.ELOOP}
_OPTIONAL_PACKAGES = {"deepspeed": "deepspeed", "mpi4py": "mpi", "transformers": "hf", "safetensors": "hf",
                      "tokenizers": "hf", "wandb": "wandb", "triton": "triton", "tensorboard": "dev",
                      "matplotlib": "dev"}


def classify(e: BaseException) -> Report:
    """Which kind of error `e` is, its one-line message and the exit code."""
    from moe_dist.config import ConfigError
    if isinstance(e, CommandError):
        return Report(e.kind, e.message, e.code)
    if isinstance(e, KeyboardInterrupt):
        return Report("interrupted", "stopped by Ctrl-C; run the same command again to resume from the last "
                      "checkpoint", EXIT_INTERRUPTED)
    try:
        from moe_dist.parallel.layout import LayoutError
        if isinstance(e, LayoutError):
            return Report("layout", _text(e), EXIT_BAD_INPUT)
    except ImportError:                 # pragma: no cover - a broken install; the ConfigError branch still works
        pass
    if isinstance(e, ConfigError):
        return Report("config", _text(e), EXIT_BAD_INPUT)
    import yaml
    if isinstance(e, yaml.YAMLError):
        return Report("config", f"YAML: {_text(e)}; fix the file's syntax", EXIT_BAD_INPUT)
    from moe_dist.train.checkpoint import store
    save_error = getattr(store, "CheckpointSaveError", ())
    if save_error and isinstance(e, save_error):        # writing failed (a full disk): the input was fine
        return Report("checkpoint", _text(e), EXIT_RUNTIME)
    if isinstance(e, store.CheckpointError):            # an unusable checkpoint
        return Report("checkpoint", _text(e), EXIT_BAD_INPUT)
    dcp = _dcp_failure(e)
    if dcp is not None:
        return dcp
    if isinstance(e, UnicodeDecodeError):
        return Report("data", f"not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset {e.start} of a chunk "
                      f"({e.reason}); re-encode the file as UTF-8", EXIT_BAD_INPUT)
    if isinstance(e, MemoryError) or _is_allocator_failure(e):
        return Report("memory", f"{_first_line(e)}; lower the model's sizes or train.batch_size, or spread it over "
                      "more ranks (`moe-dist plan CONFIG --world N` shows the memory per rank)", EXIT_RUNTIME)
    if isinstance(e, OSError):
        return _os_error(e)
    if isinstance(e, FloatingPointError):
        return Report("training", _text(e), EXIT_RUNTIME)
    if isinstance(e, RuntimeError) and str(e).startswith("PytorchStreamReader failed"):
        return Report("checkpoint", f"a torch.save file is truncated or corrupt ({_first_line(e)}); load an "
                      "earlier checkpoint (checkpoint.fallback=true) or delete the damaged one", EXIT_BAD_INPUT)
    dist_error = _dist_error(e)
    if dist_error is not None:
        return dist_error
    if isinstance(e, ImportError) and e.name and e.name.split(".")[0] in _OPTIONAL_PACKAGES:
        top = e.name.split(".")[0]
        return Report("install", f"{top} is not installed ({_first_line(e)}); pip install "
                      f"'moe-dist[{_OPTIONAL_PACKAGES[top]}]'", EXIT_BAD_INPUT)
    return Report("internal", f"{_first_line(e)}; this is a bug in moe-dist: please report it with the traceback "
                  "above", EXIT_RUNTIME, bug=True)


def _is_allocator_failure(e: BaseException) -> bool:
    try:
        import torch
        if isinstance(e, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):       # pragma: no cover
        pass
    return isinstance(e, RuntimeError) and any(t in str(e).lower() for t in _ALLOCATOR_TEXT)


def _os_error(e: OSError) -> Report:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return Report("disk", f"{_text(e)}: the disk is full; free space, or point train.out_dir/checkpoint.dir "
                      "at another disk, then run again (it resumes from the last complete checkpoint)", EXIT_RUNTIME)
    if e.errno in _BAD_PATH_ERRNOS or isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                                                      PermissionError, FileExistsError)):
        return Report("file", f"{_text(e)}; check the path and its permissions", EXIT_BAD_INPUT)
    return Report("I/O", f"{_text(e)}; check the disk or the network file system, then run again", EXIT_RUNTIME)


def _dcp_failure(e: BaseException) -> Optional[Report]:
    """torch.distributed.checkpoint wraps what failed on each rank in its own CheckpointException (a
    BaseException); report the first rank's error as what it is."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:                         # pragma: no cover
        return None
    if not isinstance(e, CheckpointException):
        return None
    for rank, (inner, _trace) in sorted(e.failures.items()):
        r = classify(inner)
        if r.bug:
            return Report("checkpoint", f"rank {rank}: {_first_line(inner)}; the checkpoint could not be read or "
                          "written: load an earlier one (checkpoint.fallback=true) or check the folder",
                          EXIT_RUNTIME)
        return Report(r.kind, f"rank {rank}: {r.message}", r.code)
    return Report("checkpoint", "the checkpoint step failed on no named rank; check the checkpoint folder",
                  EXIT_RUNTIME)


# What a collective that failed in a backend raises when it is not one of torch's DistError types (gloo's
# timeouts and closed connections come as plain RuntimeErrors).
_BACKEND_TEXT = ("gloo", "nccl", "connection closed by peer", "connection reset by peer")


def _dist_error(e: BaseException) -> Optional[Report]:
    try:
        import torch.distributed as dist
        kinds = tuple(t for t in (getattr(dist, "DistError", None),) if t is not None)
        from moe_dist.parallel.comm import DesyncError
    except ImportError:                         # pragma: no cover
        return None
    if isinstance(e, DesyncError):              # its message says where the ranks parted
        return Report("distributed", _text(e), EXIT_RUNTIME)
    if isinstance(e, kinds) or (isinstance(e, RuntimeError) and any(t in str(e).lower() for t in _BACKEND_TEXT)):
        return Report("distributed", f"{_first_line(e)}; another rank failed or the network broke (that rank's "
                      "own output names the cause); raise parallel.timeout_s if the ranks are only slow",
                      EXIT_RUNTIME)
    return None


def report(e: BaseException, debug: bool = False, stream: Optional[TextIO] = None) -> int:
    """Print `e` as the command's last line (after its traceback for a bug or with `debug`); return the exit
    code. A note added with `e.add_note("rank R of W")` prefixes the message."""
    stream = stream or sys.stderr
    r = classify(e)
    if r.bug or debug:
        traceback.print_exception(e, file=stream)
    notes = [n for n in getattr(e, "__notes__", []) if n.startswith("rank ")]
    message = f"{notes[0]}: {r.message}" if notes else r.message
    print(f"moe-dist: {r.kind} error: {message}", file=stream, flush=True)
    return r.code
