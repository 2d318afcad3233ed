"""Checks before the first step (moe_dist.train.preflight): an output or checkpoint path that cannot be a
writable folder, or one another run holds, is refused at once, naming the field, the path and the fix, through
the function, a Trainer (before its model is built) and `moe-dist train` (exit 2, one line, no step run).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_helpers import RowsBatcher, make_cfg, tiny, tokens
from moe_dist.config import ConfigError
from moe_dist.train import preflight, run_lock

REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, ck=None, out=None):
    raw = tiny()
    raw["checkpoint"] = {"resume": "never", "dir": None if ck is None else str(ck)}
    return make_cfg(raw, out_dir=str(out or tmp_path / "run"), steps=1)


def test_fresh_paths_pass_and_nothing_is_created(tmp_path):
    preflight.check_outputs(_cfg(tmp_path, ck=tmp_path / "a" / "b" / "ck"), check_locks=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("which", ["checkpoint.dir", "train.out_dir"])
def test_an_existing_file_is_refused(tmp_path, which):
    f = tmp_path / "a_file"
    f.write_text("not a folder")
    cfg = _cfg(tmp_path, ck=f) if which == "checkpoint.dir" else _cfg(tmp_path, out=f)
    with pytest.raises(ConfigError, match=re.escape(f"{which}={str(f)!r} is an existing file, not a folder; point "
                                                    f"{which} at a folder")):
        preflight.check_outputs(cfg)
    assert f.read_text() == "not a folder"


def test_a_folder_under_a_file_and_a_file_named_checkpoints_are_refused(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(ConfigError, match=re.escape(f"checkpoint.dir={str(f / 'sub')!r} cannot be created: "
                                                    f"{str(f)!r} is a file")):
        preflight.check_outputs(_cfg(tmp_path, ck=f / "sub"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    with pytest.raises(ConfigError, match=re.escape("train.out_dir (its checkpoints/ folder)=")):
        preflight.check_outputs(_cfg(tmp_path))


def test_a_broken_symlink_is_refused(tmp_path):
    link = tmp_path / "ck"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match=re.escape(f"checkpoint.dir={str(link)!r} is a broken symbolic link")):
        preflight.check_outputs(_cfg(tmp_path, ck=link))
    with pytest.raises(ConfigError, match=re.escape(f"{str(link)!r} is a broken symbolic link")):
        preflight.check_outputs(_cfg(tmp_path, ck=link / "sub"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match=r"checkpoint\.dir=.* is not writable"):
            preflight.check_outputs(_cfg(tmp_path, ck=ro / "ck"))
    finally:
        ro.chmod(0o700)


def test_a_folder_another_run_holds_is_refused_before_the_model(tmp_path):
    code = ("import sys, time; from pathlib import Path; from moe_dist.train import run_lock; "
            "run_lock.acquire(Path(sys.argv[1])); print('ready', flush=True); time.sleep(120)")
    ck = tmp_path / "ck"
    p = subprocess.Popen([sys.executable, "-c", code, str(ck)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        cfg = _cfg(tmp_path, ck=ck)
        preflight.check_outputs(cfg)                                  # other ranks: paths only
        with pytest.raises(ConfigError, match=f"{re.escape(str(ck))} is in use by another run \\(pid {p.pid} on "
                                              r"host .*choose another checkpoint\.dir"):
            preflight.check_outputs(cfg, check_locks=True)
        with pytest.raises(ConfigError, match=f"pid {p.pid}"):        # the probe left the holder's lock alone
            run_lock.acquire(ck, "checkpoint.dir")
    finally:
        p.kill()
        p.wait()
    preflight.check_outputs(cfg, check_locks=True)                    # its holder died: the lock is stale


def test_the_trainer_refuses_a_checkpoint_dir_that_is_a_file_before_building_the_model(tmp_path, monkeypatch):
    from moe_dist.train import trainer as trainer_mod

    def no_model(*a, **k):
        raise AssertionError("the model was built before the paths were checked")
    monkeypatch.setattr(trainer_mod, "MoEGPT", no_model)
    f = tmp_path / "ck_file"
    f.write_text("x")
    x, y = tokens(4)
    with pytest.raises(ConfigError, match=re.escape(f"checkpoint.dir={str(f)!r} is an existing file")):
        trainer_mod.Trainer(_cfg(tmp_path, ck=f), batcher=RowsBatcher(x, y, 2))
    assert not (tmp_path / "run").exists()


def test_cli_train_with_a_checkpoint_dir_that_is_a_file_exits_2_before_any_step(tmp_path):
    f = tmp_path / "ck_file"
    f.write_text("x")
    cmd = [str(Path(sys.executable).with_name("moe-dist")), "train", str(REPO / "configs" / "tiny-cpu.yaml"),
           f"--checkpoint.dir={f}", f"--train.out_dir={tmp_path / 'run'}", "--train.steps=2",
           f"--data.path={tmp_path / 'no_data.bin'}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.splitlines() == [f"moe-dist: config error: checkpoint.dir={str(f)!r} is an existing file, not a "
                                     "folder; point checkpoint.dir at a folder"], r.stderr[-2000:]
    assert "step" not in r.stdout and not (tmp_path / "run").exists()
    assert f.read_text() == "x"
