"""`launch/deepspeed.sh`: DeepSpeed's launcher starts 2 CPU processes running `moe-dist train`; the example
hostfile parses as DeepSpeed reads it; incomplete multi-node settings are refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepspeed_helpers import tokens  # noqa: F401  (a fixture)

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------
# launch/deepspeed.sh: DeepSpeed's launcher starts 2 CPU processes running `moe-dist train`.

# Slow (about 37 s: DeepSpeed's launcher and its import on 2 ranks); the engine's own tests stay in the default suite.
@pytest.mark.slow
def test_launcher_script_trains_tiny_cpu_on_2_processes(tmp_path, tokens):
    from distributed import free_port
    env = {**os.environ, "NUM_GPUS": "2", "EP": "2", "MASTER_PORT": str(free_port()),
           "CONFIG": str(REPO / "configs" / "tiny-cpu.yaml"), "DS_ACCELERATOR": "cpu",
           "VIRTUAL_ENV": str(Path(sys.executable).parent.parent),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    overrides = ["--train.steps=3", "--train.batch_size=2", "--train.seq_len=32", "--model.max_seq_len=32",
                 "--model.n_layers=2", "--model.dim=64", "--model.dense_hidden=128", "--moe.expert_hidden=64",
                 "--train.zero_stage=2", "--train.eval_batches=1", f"--data.path={tokens}",
                 f"--train.out_dir={tmp_path / 'run'}"]
    r = subprocess.run([str(REPO / "launch" / "deepspeed.sh"), *overrides], capture_output=True, text=True,
                       timeout=400, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "world=2 dense: dp=2×tp=1  expert: edp=1×ep=2×etp=1" in r.stdout
    assert r.stdout.count("moe-dist train:") == 1             # rank 0 alone reports
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "lm_loss" in row]
    assert [row["step"] for row in steps] == [0, 1, 2]
    assert all(row["a2a_rows_out"] == row["a2a_rows_leaving"] > 0 for row in steps)


def test_hostfile_example_parses_as_deepspeed_reads_it():
    from deepspeed.launcher.runner import fetch_hostfile
    assert dict(fetch_hostfile(str(REPO / "launch" / "hostfile.example"))) == {"node01": 8, "node02": 8}


@pytest.mark.parametrize("env,message", [
    ({"NNODES": "2"}, "NNODES=2 needs HOSTFILE"),
    ({"HOSTFILE": "/nonexistent/hosts"}, "HOSTFILE=/nonexistent/hosts does not exist"),
    ({"HOSTFILE": str(REPO / "launch" / "hostfile.example"), "NNODES": "2", "NODE_RANK": "1"},
     "NODE_RANK (no ssh) needs MASTER_ADDR"),
])
def test_launcher_script_refuses_incomplete_multi_node_settings(env, message):
    base = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "NNODES", "HOSTFILE", "NODE_RANK")}
    r = subprocess.run([str(REPO / "launch" / "deepspeed.sh")], capture_output=True, text=True, timeout=60,
                       env={**base, "DEEPSPEED": "/bin/false", **env})
    assert r.returncode == 2 and message in r.stderr
