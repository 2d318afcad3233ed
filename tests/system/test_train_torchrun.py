"""`moe-dist train` under torchrun on 2 and 4 CPU processes: the layout comes from the config, the world from
the launcher; a world that does not fit is refused by every rank before training starts."""
from __future__ import annotations

import json


# ---------------------------------------------------------------------------------------------------
# `moe-dist train` under torchrun: the layout comes from the config, the world from the launcher.

def _torchrun_train(tmp_path, nproc: int, *overrides: str):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from moe_dist.train.data import prepare
    tokens = tmp_path / "tok.bin"
    if not tokens.exists():
        prepare(None, tokens, max_bytes=300_000)
    repo = Path(__file__).resolve().parents[2]
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", f"--nproc_per_node={nproc}", "-m", "moe_dist.cli", "train",
           str(repo / "configs" / "tiny-cpu.yaml"), "--train.steps=3", "--train.batch_size=2", "--train.seq_len=32",
           "--model.max_seq_len=32", "--model.n_layers=2", "--model.dim=64", "--model.dense_hidden=128",
           "--moe.expert_hidden=64", f"--data.path={tokens}", f"--train.out_dir={tmp_path / 'run'}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)


def test_train_command_under_torchrun_ep2_dp2(tmp_path):
    r = _torchrun_train(tmp_path, 4, "--parallel.ep=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world=4 dense: dp=4×tp=1  expert: edp=2×ep=2×etp=1" in r.stdout
    assert r.stdout.count("moe-dist train:") == 1             # rank 0 alone reports
    assert "per-expert load over the run (all 4 ranks)" in r.stdout
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    rows = [r for r in rows if r.get("kind", "train") == "train"]          # besides, one "memory" record
    assert len(rows) == 3
    # Dropless: rank 0 sends exactly its assignments to the other EP rank's experts, nothing padded.
    assert all(r["a2a_rows_out"] == r["a2a_rows_leaving"] > 0 for r in rows)


def test_train_command_refuses_a_world_that_does_not_fit_before_starting(tmp_path):
    r = _torchrun_train(tmp_path, 2, "--parallel.world_size=4")
    assert r.returncode != 0
    assert r.stderr.count("moe-dist: layout error: parallel.world_size=4 but 2 ranks were launched") == 1
    r = _torchrun_train(tmp_path, 2, "--parallel.ep=4")
    assert r.returncode != 0
    # Both ranks judge the layout; rank 0 alone prints it.
    assert r.stderr.count("moe-dist: layout error: world size 2 is not divisible by parallel.ep·parallel.etp=4·1") == 1
    # One moe-dist line in all; torchrun's own report follows, our traceback never does.
    assert r.stderr.count("moe-dist: ") == 1
    assert "moe_dist/" not in r.stderr
