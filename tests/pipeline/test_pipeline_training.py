"""The Trainer's loop around a pipeline (2 gloo ranks, PP2, fp32), in one spawn:
- `fit` on a token corpus (1F1B, 2 micro-batches per step, validation every 2 steps through the forward-only
  pipeline) logs the losses, validation losses and per-expert counts of every MoE layer (both stages') that one
  process logs, and rank 0's metrics file holds the counts of every layer;
- with fewer micro-batches than stages the bubble warning is printed by rank 0 only;
- a non-finite router on the last stage (layer 3, rank 1 only) makes both ranks raise naming `blocks.3`, or both
  skip the step.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import pytest
import torch

from checkpoint_helpers import corpus  # noqa: F401  (a fixture)
from distributed import run_ranks
from test_pipeline_parity import one_thread
from moe_dist import config
from moe_dist.parallel.layout import check_layout
from moe_dist.parallel.topology import Topology
from moe_dist.train.trainer import Trainer

STEPS = 4


def raw_config(data: str, out: str, pp: int = 1, accum: int = 2, **train) -> dict:
    return {
        "model": {"dim": 32, "n_layers": 4, "n_heads": 2, "max_seq_len": 8, "dense_hidden": 32, "first_dense": 1},
        "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 16, "aux_loss_coef": 0.01, "z_loss_coef": 0.001,
                "balance_over": "global_batch", "num_shared_experts": 1},
        "parallel": {"pp": pp},
        "train": {"batch_size": 2, "seq_len": 8, "lr": 1e-2, "warmup_steps": 0, "steps": STEPS, "grad_clip": 1.0,
                  "grad_accum_steps": accum, "eval_every": 2, "eval_batches": 3, "tensorboard": False,
                  "out_dir": out, **train},
        "data": {"path": data, "val_fraction": 0.1},
        "checkpoint": {"dir": out + "/ckpt", "resume": "never", "every": 0},
    }


def _trainer(raw: dict, world: int) -> Trainer:
    cfg = config.from_dict(raw)
    config.validate(cfg)
    return Trainer(cfg, topo=Topology.build(check_layout(cfg, world), timeout_s=60))


def history(trainer: Trainer) -> dict:
    hist = trainer.fit(progress=False)
    return {"steps": [(s.loss, s.lm_loss, s.aux_loss, s.z_loss, s.grad_norm) for s in hist.steps],
            "counts": [torch.stack(s.tokens_per_expert) for s in hist.steps], "evals": hist.evals}


def _nonfinite(rank: int, world: int, raw: dict, mode: str) -> dict:
    raw = copy.deepcopy(raw)
    raw["train"].update(on_nonfinite=mode, eval_every=0, out_dir=raw["train"]["out_dir"] + "-" + mode)
    raw["checkpoint"]["dir"] = raw["train"]["out_dir"] + "/ckpt"
    trainer = _trainer(raw, world)
    state = {}
    if 3 in trainer.model.blocks:
        def poison(mod, args):
            # Rank 1 (the last stage, holding layer 3), step 1 only: its router input, so its logits, become NaN.
            return (args[0] * float("nan"),) if state.get("step") == 1 else None
        trainer.model.blocks[3].mlp.router.register_forward_pre_hook(poison)

    def on_step(r):
        state["step"] = r.step + 1
    try:
        trainer.fit(steps=3, progress=False, on_step=on_step)
    except FloatingPointError as e:
        return {"error": str(e)}
    return {"skipped": [s.skipped for s in trainer.history.steps],
            "finite": all(torch.isfinite(p).all() for p in trainer.model.parameters())}


def _worker(rank: int, world: int, raw: dict) -> dict:
    out = {"fit": history(_trainer(raw, world))}
    warned = copy.deepcopy(raw)
    warned["train"].update(grad_accum_steps=1, out_dir=raw["train"]["out_dir"] + "-warned")
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        _trainer(warned, world)
    out["said"] = said.getvalue()
    out["raise"] = _nonfinite(rank, world, raw, "raise")
    out["skip"] = _nonfinite(rank, world, raw, "skip")
    return out


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):  # noqa: F811  (corpus: the fixture)
    root = tmp_path_factory.mktemp("pipeline_training")
    raw = raw_config(str(corpus), str(root / "pp2"), pp=2)
    results = run_ranks(_worker, 2, raw, timeout=400)
    with one_thread():
        ref = history(_trainer(raw_config(str(corpus), str(root / "one")), 1))
    return root, results, ref


def test_pipeline_fit_logs_what_one_process_logs(runs):
    root, results, ref = runs
    assert ref["steps"][-1][1] < ref["steps"][0][1]                       # the LM loss falls
    assert [s for s, _ in ref["evals"]] == [2, 4]
    for rank, res in enumerate(results):
        got = res["fit"]
        for g, w in zip(got["steps"], ref["steps"]):
            assert g == pytest.approx(w, rel=1e-5), rank
        for g, w in zip(got["counts"], ref["counts"]):
            assert g.shape == (3, 4) and torch.equal(g, w), rank          # layers 1 (stage 0), 2 and 3 (stage 1)
        assert [s for s, _ in got["evals"]] == [2, 4]
        assert [v for _, v in got["evals"]] == pytest.approx([v for _, v in ref["evals"]], rel=1e-5), rank
    records = [json.loads(line) for line in (root / "pp2" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == STEPS and all(len(r["tokens_per_expert"]) == 3 for r in train)


def test_pipeline_bubble_warning_on_rank0_only(runs):
    _, results, _ = runs
    assert "layout warning: train.grad_accum_steps=1 is below parallel.pp=2" in results[0]["said"]
    assert "layout warning" not in results[1]["said"]


def test_nonfinite_on_the_last_stage_raises_or_skips_on_every_rank(runs):
    _, results, _ = runs
    for res in results:
        r = res["raise"]
        assert "error" in r, r
        assert "step 1:" in r["error"] and "layer 3 (blocks.3.mlp.router)" in r["error"]
        r = res["skip"]
        assert r["skipped"] == [False, True, False] and r["finite"]
