"""Tests for the `moe-dist` command line (moe_dist.cli), run in-process and as `python -m moe_dist.cli`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_dist import cli
from moe_dist.train.data import DOC_SEP, prepare

REPO = Path(__file__).resolve().parents[2]
MIXTRAL = str(REPO / "configs" / "mixtral-8x7b.yaml")
SWITCH = str(REPO / "configs" / "switch-base-128.yaml")
TINY = str(REPO / "configs" / "tiny-cpu.yaml")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)       # imports must work from the installed package, not the source tree
    return env


# -------------------------------------------------------------------------------------------------- help

def test_help_subprocess_lists_commands() -> None:
    r = subprocess.run([sys.executable, "-m", "moe_dist.cli", "--help"], capture_output=True, text=True,
                       cwd=REPO, timeout=60, env=_env())
    assert r.returncode == 0, r.stderr
    for cmd in ("train", "prepare-data", "params"):
        assert cmd in r.stdout


def test_help_in_process(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "prepare-data" in out and "params" in out


def test_no_command_is_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2


# ------------------------------------------------------------------------------------------------ params

def _params(capsys, *argv: str) -> dict:
    assert cli.main(["params", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_params_mixtral_8x7b(capsys) -> None:
    counts = _params(capsys, MIXTRAL)
    assert counts["total"] == pytest.approx(46.7e9, rel=0.005)
    assert counts["active"] == pytest.approx(12.9e9, rel=0.01)
    assert counts["active"] < counts["total"]


def test_params_switch_base_128(capsys) -> None:
    counts = _params(capsys, SWITCH)
    assert counts["total"] == pytest.approx(7.4e9, rel=0.01)


def test_params_honours_overrides(capsys) -> None:
    base = _params(capsys, MIXTRAL)
    fewer = _params(capsys, MIXTRAL, "--model.n_layers=16")
    assert fewer["total"] < base["total"]


def test_params_table_output(capsys) -> None:
    assert cli.main(["params", MIXTRAL]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "active" in out and "B)" in out


def test_params_missing_config_is_config_error(capsys, tmp_path: Path) -> None:
    assert cli.main(["params", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "presets are in configs/" in err


# ------------------------------------------------------------------------------------- override errors

def test_bad_override_exits_2_without_training(capsys, monkeypatch) -> None:
    import moe_dist.train.trainer as trainer_mod

    def _no_training(*a, **k):
        raise AssertionError("Trainer was built despite an invalid config")

    monkeypatch.setattr(trainer_mod, "Trainer", _no_training)
    assert cli.main(["train", TINY, "--moe.top_k=99"]) == 2
    captured = capsys.readouterr()
    assert "config error" in captured.err and "moe.top_k" in captured.err and "99" in captured.err
    assert "step" not in captured.out


def test_unknown_override_key_suggests(capsys) -> None:
    assert cli.main(["params", TINY, "--moe.topk=1"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "did you mean 'top_k'" in err


@pytest.mark.parametrize("bad", ["--moe.top_k", "moe.top_k=1"])
def test_override_without_equals_or_dashes_errors(capsys, bad) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["train", TINY, bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--section.field=value" in err


def test_prepare_data_rejects_overrides(capsys, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["prepare-data", "--out", str(tmp_path / "o.bin"), "--moe.top_k=1"])
    assert e.value.code == 2
    assert "unrecognised arguments" in capsys.readouterr().err
    assert not (tmp_path / "o.bin").exists()


def test_bad_override_subprocess(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "moe_dist.cli", "params", TINY, "--moe.top_k=99"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120, env=_env())
    assert r.returncode == 2
    assert "config error" in r.stderr and "moe.top_k" in r.stderr


# ---------------------------------------------------------------------------------------------- prepare

def test_prepare_data_dir_of_txt(capsys, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    a, b = b"first document\nline two\n", "second doc \u2713".encode("utf-8")
    (src / "a.txt").write_bytes(a)
    (src / "b.txt").write_bytes(b)
    out = tmp_path / "out" / "tok.bin"
    assert cli.main(["prepare-data", str(src), "--out", str(out)]) == 0
    assert out.read_bytes() == a + DOC_SEP + b
    assert DOC_SEP == b"\n\n"
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["tokens"] == len(a) + len(DOC_SEP) + len(b) and meta["documents"] == 2
    assert f"wrote {out}" in capsys.readouterr().out


def test_prepare_data_max_bytes(capsys, tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("y" * 500)
    out = tmp_path / "o.bin"
    assert cli.main(["prepare-data", str(f), "--out", str(out), "--max-bytes", "64"]) == 0
    assert out.read_bytes() == b"y" * 64


# ------------------------------------------------------------------------------------------------- train

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    tokens = d / "tok.bin"
    meta = prepare(None, tokens, max_bytes=300_000)      # real text: the Python stdlib source
    assert meta["tokens"] >= 200_000
    out_dir = d / "run"
    argv = ["train", TINY, "--train.steps=3", "--train.batch_size=2", "--train.seq_len=32",
            "--model.max_seq_len=32", "--model.n_layers=2", "--model.dim=64", "--model.dense_hidden=128",
            "--moe.expert_hidden=64", f"--data.path={tokens}",
            f"--train.out_dir={out_dir}", "--quiet"]
    return argv, out_dir


def test_train_end_to_end(tiny_run, capsys) -> None:
    import torch
    argv, out_dir = tiny_run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # tiny matmuls: intra-op threads only add overhead, badly so on a busy machine
    try:
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    lines = [r for r in records if r.get("kind", "train") == "train"]     # besides, one "memory" record
    assert len(lines) == 3
    for i, rec in enumerate(lines):
        assert rec["step"] == i
        for key in ("loss", "tokens_per_s", "drop_fraction"):
            assert key in rec
        assert rec["loss"] == rec["loss"] and rec["loss"] > 0          # finite, not NaN
        assert rec["tokens_per_s"] > 0 and 0.0 <= rec["drop_fraction"] <= 1.0
    # The per-expert load table: header plus one row per MoE layer (both layers are MoE in tiny-cpu).
    assert "per-expert load" in out
    assert "layer |" in out and "max/mean" in out and "e0" in out and "e7" in out
    table = out.split("per-expert load", 1)[1]
    rows = [l for l in table.splitlines() if l.strip()[:1].isdigit() and "|" in l]
    assert [int(r.split("|")[0]) for r in rows] == [0, 1]
    assert "8 experts, top-2" in out
    assert "done: 3 steps" in out
    assert "metrics.jsonl" in out
    assert not [l for l in out.splitlines() if l.startswith("step ")]   # --quiet: no per-step lines


# -------------------------------------------------------------------------------------------- packaging

def test_moe_dist_kernels_imports() -> None:
    import moe_dist.kernels as k
    for name in ("permute", "unpermute", "grouped_gemm", "make_permute_map"):
        assert hasattr(k, name)


def test_top_level_kernels_is_not_ours(tmp_path: Path) -> None:
    code = ("import sys\n"
            "try:\n"
            "    import kernels\n"
            "except ModuleNotFoundError:\n"
            "    print('MISSING'); sys.exit(0)\n"
            "print('FOUND', getattr(kernels, '__file__', None))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/tmp", timeout=60,
                       env=_env())
    assert r.returncode == 0, r.stderr
    if r.stdout.startswith("MISSING"):
        return
    # Some unrelated PyPI `kernels` is installed: it must not be our folder.
    found = r.stdout.split(" ", 1)[1].strip()
    assert found == "None" or not Path(found).resolve().is_relative_to(REPO), r.stdout
