"""The one error boundary of `moe-dist` (moe_dist.errors and cli.main): which exception is which kind of error with
which exit code, the one line it ends with, a traceback only with --debug or for a bug, and the failures that used
to escape as tracebacks: an allocation that fails, a model too large for the machine, an unavailable experts
backend, DCP's own exception type, a full disk, Ctrl-C, a non-finite loss, a JSONL source that is not UTF-8.
In-process (`cli.main`), a few seconds."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest

from moe_dist import cli, errors
from moe_dist.config import ConfigError
from moe_dist.errors import CommandError, classify

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny-cpu.yaml")
SMALL = ["--train.steps=2", "--train.batch_size=2", "--train.seq_len=16", "--model.max_seq_len=16",
         "--model.n_layers=2", "--model.dim=32", "--model.n_heads=2", "--model.dense_hidden=32",
         "--moe.expert_hidden=16", "--train.tensorboard=false", "--quiet"]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "OMPI_COMM_WORLD_RANK", "SLURM_PROCID", "TORCHELASTIC_RESTART_COUNT")


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    from moe_dist.train.data import prepare
    path = tmp_path_factory.mktemp("boundary") / "tok.bin"
    prepare(None, path, max_bytes=40_000)
    return path


def _run(capsys, *argv: str) -> tuple[int, str, list[str]]:
    """(exit code, stderr, its `moe-dist:` lines) of `moe-dist ARGV` run in this process."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    return rc, err, [line for line in err.splitlines() if line.startswith("moe-dist:")]


def _train(tokens, tmp_path, *extra: str) -> list[str]:
    return ["train", TINY, *SMALL, f"--data.path={tokens}", f"--train.out_dir={tmp_path / 'run'}", *extra]


# ------------------------------------------------------------------------------------------ the kind table

def _dcp(inner: BaseException):
    from torch.distributed.checkpoint.api import CheckpointException
    return CheckpointException("failed", {1: (inner, None)})


def _table():
    import torch
    import torch.distributed as dist
    import yaml

    from moe_dist.parallel.comm import DesyncError
    from moe_dist.parallel.layout import LayoutError
    from moe_dist.train.checkpoint import CheckpointError
    from moe_dist.train.checkpoint import store
    rows = [
        (CommandError("launch", "RANK='x' is not an integer"), "launch", 2),
        (CommandError("memory", "too big", errors.EXIT_RUNTIME), "memory", 1),
        (LayoutError("world size 3 ..."), "layout", 2),
        (ConfigError("moe.top_k=9: ..."), "config", 2),
        (yaml.YAMLError("bad"), "config", 2),
        (CheckpointError("checkpoint x is corrupt"), "checkpoint", 2),
        (_dcp(CheckpointError("entry w is missing")), "checkpoint", 2),
        (_dcp(KeyError("w")), "checkpoint", 1),
        (_dcp(OSError(errno.ENOSPC, "No space left on device", "/ckpt/x")), "disk", 1),
        (UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte"), "data", 2),
        (MemoryError(), "memory", 1),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 400000000000000 bytes."),
         "memory", 1),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "memory", 1),
        (OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl"), "disk", 1),
        (OSError(errno.EDQUOT, "Disk quota exceeded", "/runs/x"), "disk", 1),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x.bin"), "file", 2),
        (PermissionError(errno.EACCES, "Permission denied", "/runs"), "file", 2),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/data"), "file", 2),
        (OSError(errno.EIO, "Input/output error", "/nfs/x"), "I/O", 1),
        (FloatingPointError("step 3: loss nan; ..."), "training", 1),
        (RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory"),
         "checkpoint", 2),
        (dist.DistBackendError("Connection closed by peer [127.0.0.1]:1234"), "distributed", 1),
        (RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer"), "distributed", 1),
        (DesyncError("rank 1 is at step 3, rank 0 at step 4"), "distributed", 1),
        (ModuleNotFoundError("No module named 'deepspeed'", name="deepspeed"), "install", 2),
        (KeyboardInterrupt(), "interrupted", 130),
        (ValueError("x"), "internal", 1),
        (ZeroDivisionError("division by zero"), "internal", 1),
        (RuntimeError("some torch bug"), "internal", 1),
    ]
    if hasattr(store, "CheckpointSaveError"):
        rows.append((store.CheckpointSaveError("checkpoint step_3 was not saved: disk full"), "checkpoint", 1))
    return rows


def test_every_exception_has_a_kind_and_an_exit_code():
    for exc, kind, code in _table():
        r = classify(exc)
        assert (r.kind, r.code) == (kind, code), exc
        assert r.bug == (kind == "internal"), exc
        assert "\n" not in r.message, exc


def test_dcp_wrapped_errors_report_the_rank_and_the_inner_message():
    r = classify(_dcp(ConfigError("checkpoint x does not fit this model: model.dim 32 vs 48")))
    assert r.message == "rank 1: checkpoint x does not fit this model: model.dim 32 vs 48" and r.code == 2


def test_a_report_is_one_line_a_bug_adds_its_traceback(capsys):
    import io
    out = io.StringIO()
    assert errors.report(ConfigError("moe.top_k=9: cannot exceed 8"), stream=out) == 2
    assert out.getvalue() == "moe-dist: config error: moe.top_k=9: cannot exceed 8\n"
    out = io.StringIO()
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError as e:
        assert errors.report(e, stream=out) == 1
    lines = out.getvalue().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == ("moe-dist: internal error: ZeroDivisionError: division by zero; this is a bug in moe-dist: "
                         "please report it with the traceback above")


def test_a_rank_note_prefixes_the_message():
    import io
    out = io.StringIO()
    e = ConfigError("x")
    e.add_note("rank 1 of 2")
    errors.report(e, stream=out)
    assert out.getvalue() == "moe-dist: config error: rank 1 of 2: x\n"


# ----------------------------------------------------------------------------------------- through cli.main

def test_help_lists_the_exit_codes_and_debug(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "--debug" in out and "exit codes:" in out
    for line in ("0    done", "1    runtime failure", "2    bad input", "143  stopped by SIGTERM"):
        assert line in out


def test_an_argument_error_ends_with_one_moe_dist_line(capsys):
    rc, err, lines = _run(capsys, "plan", TINY, "--world", "two")
    assert rc == 2 and err.startswith("usage: moe-dist plan")
    assert lines == ["moe-dist: argument error: argument --world: invalid int value: 'two'; see `moe-dist plan "
                     "--help`"]
    assert err.splitlines()[-1] == lines[0]


def test_a_bug_prints_its_traceback_and_asks_for_a_report(capsys, monkeypatch):
    import moe_dist.models.gpt as gpt
    monkeypatch.setattr(gpt, "count_parameters", lambda *a: 1 // 0)
    rc, err, lines = _run(capsys, "params", TINY)
    assert rc == 1 and "Traceback (most recent call last)" in err
    assert lines == ["moe-dist: internal error: ZeroDivisionError: integer division or modulo by zero; this is a "
                     "bug in moe-dist: please report it with the traceback above"]


@pytest.mark.parametrize("where", ["first", "last"])
def test_debug_anywhere_adds_the_traceback_of_a_known_error(capsys, where):
    argv = ["params", TINY, "--moe.top_k=99"]
    argv = ["--debug", *argv] if where == "first" else [*argv, "--debug"]
    rc, err, lines = _run(capsys, *argv)
    assert rc == 2 and "Traceback (most recent call last)" in err and "ConfigError" in err
    assert len(lines) == 1 and lines[0].startswith("moe-dist: config error: moe.top_k=99")
    rc, err, _ = _run(capsys, "params", TINY, "--moe.top_k=99")
    assert rc == 2 and "Traceback" not in err


def test_an_allocator_failure_names_the_sizes(capsys, tmp_path, tokens, monkeypatch):
    """Before: a RuntimeError traceback from the allocator, naming bytes but no config field."""
    import moe_dist.train.trainer as trainer_mod

    def alloc(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 400000000 bytes. "
                           "Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(trainer_mod, "Trainer", alloc)
    rc, err, lines = _run(capsys, *_train(tokens, tmp_path))
    assert rc == 1 and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(
        "moe-dist: memory error: allocating the model failed (DefaultCPUAllocator: can't allocate memory: you tried "
        "to allocate 400000000 bytes. Error code 12 (Cannot allocate memory)): ")
    assert "model.dim=32, model.n_layers=2" in lines[0] and "moe.expert_hidden=16" in lines[0]
    assert "parameters per rank" in lines[0]


def test_a_model_too_large_for_the_machine_is_refused_before_allocating(capsys, tmp_path, tokens, monkeypatch):
    """model.dim=10**7: the weights alone are hundreds of terabytes. Refused before any tensor or process group
    exists (before: the embedding's 10 GB were allocated and written, then the allocator failed, or the
    kernel's OOM killer ended the process)."""
    import torch.distributed as dist

    import moe_dist.train.trainer as trainer_mod
    monkeypatch.setattr(trainer_mod, "Trainer", lambda *a, **k: pytest.fail("the model was built"))
    rc, err, lines = _run(capsys, *_train(tokens, tmp_path, "--model.dim=10000000"))
    assert rc == 2 and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("moe-dist: memory error: the weights alone need ")
    assert "model.dim=10000000" in lines[0] and "moe-dist plan CONFIG --world N" in lines[0]
    assert not dist.is_initialized() and not (tmp_path / "run").exists()


def test_an_unavailable_experts_backend_is_a_config_error(capsys, tmp_path, tokens):
    """Before: a ValueError traceback from inside the model's constructor."""
    rc, err, lines = _run(capsys, *_train(tokens, tmp_path, "--moe.backend=grouped_mm", "--moe.expert_hidden=18"))
    assert rc == 2 and "Traceback" not in err
    assert lines == ["moe-dist: config error: moe.backend='grouped_mm' needs model.dim=32 and moe.expert_hidden=18 "
                     "to be multiples of 4 for torch.float32; use backend 'loop' or 'auto'"]


def _fit_raises(monkeypatch, exc: BaseException):
    import moe_dist.train.trainer as trainer_mod

    def fit(self, *a, **k):
        raise exc
    monkeypatch.setattr(trainer_mod.Trainer, "fit", fit)


@pytest.mark.parametrize("exc,code,line", [
    (FloatingPointError("step 2: loss nan; the router of layer 1 produced non-finite logits first; set "
                        "train.on_nonfinite=skip to skip such steps"), 1,
     "moe-dist: training error: step 2: loss nan; the router of layer 1 produced non-finite logits first; set "
     "train.on_nonfinite=skip to skip such steps"),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl"), 1,
     "moe-dist: disk error: No space left on device (/runs/x/metrics.jsonl): the disk is full; free space, or point "
     "train.out_dir/checkpoint.dir at another disk, then run again (it resumes from the last complete checkpoint)"),
    (KeyboardInterrupt(), 130,
     "moe-dist: interrupted error: stopped by Ctrl-C; run the same command again to resume from the last checkpoint"),
], ids=["nonfinite", "disk-full", "ctrl-c"])
def test_failures_during_fit_end_as_one_line(capsys, tmp_path, tokens, monkeypatch, exc, code, line):
    import torch.distributed as dist
    _fit_raises(monkeypatch, exc)
    rc, err, lines = _run(capsys, *_train(tokens, tmp_path))
    assert (rc, lines) == (code, [line]) and "Traceback" not in err
    assert not dist.is_initialized()                # the process group was shut down on the way out


def test_a_dcp_checkpoint_exception_is_a_checkpoint_error(capsys, tmp_path, tokens, monkeypatch):
    """DCP wraps each rank's failure in CheckpointException, a BaseException: it escaped `except Exception`."""
    from moe_dist.train.checkpoint import CheckpointError
    _fit_raises(monkeypatch, _dcp(CheckpointError("checkpoint /c/step_2 lacks 3 entries this model needs")))
    rc, err, lines = _run(capsys, *_train(tokens, tmp_path))
    assert rc == 2 and "Traceback" not in err
    assert lines == ["moe-dist: checkpoint error: rank 1: checkpoint /c/step_2 lacks 3 entries this model needs"]


def test_a_non_utf8_jsonl_line_is_named(capsys, tmp_path):
    """Before: a UnicodeDecodeError traceback naming neither the file nor the line (data.py names them now, as a
    config error; the boundary turns a stray UnicodeDecodeError into a data error)."""
    src = tmp_path / "docs.jsonl"
    src.write_bytes(b'{"text": "one"}\n{"text": "two"}\n{"text": "thr\xffee"}\n')
    out = tmp_path / "out" / "tok.bin"
    rc, err, lines = _run(capsys, "prepare-data", str(src), "--out", str(out))
    assert rc == 2 and "Traceback" not in err
    assert lines == [f"moe-dist: config error: {src}:3: not UTF-8 text (byte 0xff at column 14); re-encode the file "
                     "as UTF-8 or drop that line"]
    assert not out.exists()


# ------------------------------------------------------------------------------- one report per launch

def _as_rank(monkeypatch, rank: int, local_rank: int, world: int = 4, per_node: int = 2):
    monkeypatch.setattr(cli, "_QUIET_RANK_WAIT_S", 0.0)
    for var, value in dict(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=local_rank, LOCAL_WORLD_SIZE=per_node,
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=1).items():
        monkeypatch.setenv(var, str(value))


@pytest.mark.parametrize("rank,local_rank,reports", [(0, 0, True), (1, 1, False), (2, 0, True), (3, 1, False)])
def test_a_missing_token_file_is_reported_once_per_node(capsys, tmp_path, monkeypatch, rank, local_rank, reports):
    """A fact of the node (its files): the first rank of each node reports it, the others exit 2 in silence."""
    _as_rank(monkeypatch, rank, local_rank)
    rc, err, lines = _run(capsys, "train", TINY, "--parallel.ep=2", f"--data.path={tmp_path / 'nope.bin'}",
                          f"--train.out_dir={tmp_path / 'run'}")
    assert rc == 2 and "Traceback" not in err
    assert len(lines) == (1 if reports else 0)
    if reports:
        assert lines[0].startswith("moe-dist: data error: ") and "nope.bin" in lines[0]
        assert "moe-dist prepare-data" in lines[0]


@pytest.mark.parametrize("rank,reports", [(0, True), (1, False), (2, False)])
def test_a_config_error_is_reported_by_rank_0_alone(capsys, monkeypatch, rank, reports):
    _as_rank(monkeypatch, rank, rank % 2)
    rc, err, lines = _run(capsys, "train", TINY, "--train.seed=-1")
    assert rc == 2 and len(lines) == (1 if reports else 0)


def test_a_bad_launcher_variable_is_reported_by_every_rank(capsys, monkeypatch):
    """An incomplete launcher environment cannot say which rank this is: each reports it."""
    monkeypatch.setenv("RANK", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    rc, err, lines = _run(capsys, "train", TINY)
    assert rc == 2
    assert lines == ["moe-dist: launch error: RANK='x' is not an integer; fix the launcher's environment"]
