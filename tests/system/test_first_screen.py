"""What `make demo` shows first: `torchrun --standalone` training on 2 CPU ranks prints no error line.

torchrun's agent already serves the rendezvous store on MASTER_PORT; a rank 0 that tried to serve a second one
there would fail to bind, and torch prints that as "[E... TCPStore.cpp] The server socket on <port> has failed
to bind" before it carries on. The run would still succeed, so only its stderr shows the fault."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# glog-style error lines from torch's C++ ("[E1129 19:44:55.35 TCPStore.cpp:277] ...") and its Python
# loggers ("E1129 19:44:52.875000 5675 torch/...").
ERROR_LINE = re.compile(r"^\[?E\d{4} ", re.MULTILINE)


def test_torchrun_standalone_first_screen_has_no_error_line(tmp_path):
    from moe_dist.train.data import prepare
    tokens = tmp_path / "tok.bin"
    prepare(None, tokens, max_bytes=300_000)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "moe_dist.cli", "train",
           str(REPO / "configs" / "tiny-cpu.yaml"), "--parallel.ep=2", "--checkpoint.resume=never",
           "--train.steps=2", "--train.batch_size=2", "--train.seq_len=32", "--model.max_seq_len=32",
           "--model.n_layers=2", "--model.dim=64", "--model.dense_hidden=128", "--moe.expert_hidden=64",
           f"--data.path={tokens}", f"--train.out_dir={tmp_path / 'run'}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    env["OMP_NUM_THREADS"] = "1"  # as `make demo` sets it
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("moe-dist train: "), r.stdout[:500]
    assert "failed to bind" not in r.stderr and "TCPStore" not in r.stderr, r.stderr[-3000:]
    assert not ERROR_LINE.search(r.stderr), r.stderr[-3000:]
