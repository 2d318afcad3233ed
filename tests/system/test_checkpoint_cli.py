"""A preempted `moe-dist train` process (SIGTERM) saves a checkpoint, exits 143, and its relaunch finishes."""
from __future__ import annotations

import json
import re
import signal

from checkpoint_helpers import corpus  # noqa: F401  (a fixture)
from moe_dist import cli
from moe_dist.train import checkpoint as ckpt


def test_cli_sigterm_saves_exits_143_and_the_relaunch_finishes(tmp_path, corpus):
    """A preempted `moe-dist train` saves, exits as terminated (so restart policies relaunch it), and the
    relaunch resumes and completes every step once."""
    import subprocess
    import sys
    import time
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "moe_dist.cli", "train", "configs/tiny-cpu.yaml", "--train.batch_size=2",
            "--train.seq_len=16", "--model.max_seq_len=16", "--model.n_layers=2", "--model.dim=32",
            "--model.n_heads=2", "--model.dense_hidden=32", "--moe.expert_hidden=16", f"--data.path={corpus}",
            f"--train.out_dir={run}", "--train.tensorboard=false", "--quiet", "--train.steps=400"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == cli.EXIT_TERMINATED, out
    match = re.search(r"SIGTERM: stopped after step (\d+) of 400", out)
    assert match, out
    done = int(match.group(1))
    assert done < 400 and (run / "checkpoints" / ckpt.step_dir_name(done)).is_dir()
    again = subprocess.run(argv[:-1] + [f"--train.steps={done + 3}"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"(step {done}" in again.stdout
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if '"train"' in l]
    assert steps == list(range(done + 3))
