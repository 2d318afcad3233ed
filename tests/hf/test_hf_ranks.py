"""Imported Hugging Face models on 2 gloo ranks: under expert parallelism (EP=2) and tensor parallelism (TP=2) the
logits equal transformers' on the same tokens; `moe-dist train CONFIG --checkpoint.dir=CKPT` under torchrun with
EP=2 continues from the imported step-0 checkpoint. All marked slow: each spawns 2 processes (50 s and more on
2 busy cores)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_helpers import build_topo, corpus  # noqa: F401  (corpus: a fixture)
from distributed import run_ranks
from hf_helpers import FAMILIES, hf_logits, random_model, save, tokens
from moe_dist.hf import importer

ATOL = 1e-4
LAYOUTS = {"ep2": ["--parallel.ep=2"], "tp2": ["--parallel.tp=2"]}


def _logits_worker(rank, world, cases, layouts):
    from moe_dist import config
    from moe_dist.models.gpt import MoEGPT
    from moe_dist.train import checkpoint as ckpt
    from moe_dist.train.native_engine import NativeEngine
    out = {}
    for name, (cfg_path, root, tok) in cases.items():
        for layout in layouts:
            overrides = LAYOUTS[layout]
            cfg = config.load(cfg_path, overrides)
            topo = build_topo(cfg, world)
            model = MoEGPT(cfg, topo)
            path, meta = ckpt.find_on_rank0(root, False, topo)
            NativeEngine(cfg, topo, model, weights_dtype=torch.float32).load(path, meta)
            with torch.no_grad():
                out[name, layout] = model.eval()(tok).logits
    return out


def _check_two_ranks(tmp_path, families: list[str], layouts: list[str]) -> None:
    cases, want = {}, {}
    tok = tokens()
    for fam in families:
        hf = random_model(fam)
        _, cfg_path = importer.convert(save(hf, tmp_path / fam / "hf"), tmp_path / fam / "ckpt", say=lambda *a: None)
        cases[fam] = (str(cfg_path), str(tmp_path / fam / "ckpt"), tok)
        want[fam] = hf_logits(hf, tok)
    results = run_ranks(_logits_worker, 2, cases, layouts, timeout=300)
    for rank, res in enumerate(results):
        for fam in families:
            for layout in layouts:
                torch.testing.assert_close(res[fam, layout], want[fam], atol=ATOL, rtol=0,
                                           msg=lambda m: f"{fam} {layout} rank {rank}: {m}")



@pytest.mark.slow
def test_two_ranks_ep2_equal_transformers(tmp_path):
    """The quickest of them: Qwen2-MoE (shared expert with its gate, a dense first layer, q/k/v biases)."""
    _check_two_ranks(tmp_path, ["qwen2_moe"], ["ep2"])


@pytest.mark.slow
def test_two_ranks_every_family_and_layout_equal_transformers(tmp_path):
    _check_two_ranks(tmp_path, FAMILIES, list(LAYOUTS))


@pytest.mark.slow
def test_train_command_continues_from_an_import_under_ep2(tmp_path, corpus):
    _, cfg_path = importer.convert(save(random_model("mixtral"), tmp_path / "hf"), tmp_path / "ckpt",
                                   say=lambda *a: None)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "moe_dist.cli", "train", str(cfg_path),
           f"--checkpoint.dir={tmp_path / 'ckpt'}", "--parallel.ep=2", f"--data.path={corpus}", "--train.steps=2",
           "--train.batch_size=2", "--train.seq_len=16", f"--train.out_dir={tmp_path / 'run'}",
           "--train.tensorboard=false", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {tmp_path / 'ckpt' / 'step_000000'} (step 0" in r.stdout
    assert (tmp_path / "ckpt" / "step_000002").is_dir()
    # The checkpoint the two ranks wrote exports; transformers computes what moe_dist does in one process.
    from moe_dist import config
    from moe_dist.hf import ckpt_io, exporter
    from transformers import AutoModelForCausalLM
    exporter.export(tmp_path / "ckpt", tmp_path / "out", say=lambda *a: None)
    model, _, step = ckpt_io.load_weights(tmp_path / "ckpt", config.load(cfg_path))
    assert step == 2
    tok = tokens()
    with torch.no_grad():
        want = model.eval()(tok).logits
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    torch.testing.assert_close(hf_logits(back, tok), want, atol=ATOL, rtol=0)
