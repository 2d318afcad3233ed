"""The native engine's sharded optimizer on gloo ranks (fp32): `train.shard_optimizer: states` (ZeRO-1) and
`states+grads` (ZeRO-2) give the losses and parameters of the unsharded engine (torch.optim.AdamW on whole
parameters) over 5 steps, in every layout family (DP, EP×DP, TP×EP, ETP×EP, gradient accumulation), with small
buckets so that shard boundaries cut through parameters; a sharded checkpoint resumes unsharded with the same
losses. Each layout's variants run in one spawn."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from checkpoint_helpers import G, GlobalBatcher, build_topo, make_cfg, tiny
from distributed import run_ranks
from moe_dist.train.native_engine import NativeEngine
from moe_dist.train.trainer import Trainer

MODES = ("none", "states", "states+grads")
STEPS = 5
BUCKET = 700          # elements: several buckets per kind, shards that start and end inside parameters


def _raw(tp, ep, etp, world, accum=1, **moe):
    # GlobalBatcher gives every micro-batch G sequences split over dp: batch_size counts one micro-batch.
    raw = tiny(tp, ep, etp, batch_size=G * tp // world, steps=STEPS, **moe)
    raw["train"].update(grad_accum_steps=accum, weight_decay=0.1, grad_clip=0.05, warmup_steps=0)
    return raw


def _trainer(raw, world, mode, cdir="", resume="never", weights_dtype=None):
    cdir = cdir or "/tmp/moe_dist_sharded_optimizer_test"        # train_step only: nothing is written there
    raw = {**raw, "train": {**raw["train"], "shard_optimizer": mode, "out_dir": cdir + "/out"},
           "checkpoint": {"dir": cdir, "keep": 3, "resume": resume}}
    cfg = make_cfg(raw)
    topo = build_topo(cfg, world)
    return Trainer(cfg, topo=topo, batcher=GlobalBatcher(G, cfg.train.seq_len, topo.dp.rank, topo.dp.size),
                   engine=functools.partial(NativeEngine, bucket_elems=BUCKET, weights_dtype=weights_dtype))


def _parity_worker(rank, world, layouts, modes=MODES):
    torch.manual_seed(0)
    out = {}
    for name, raw in layouts.items():
        out[name] = {}
        for mode in modes:
            trainer = _trainer(raw, world, mode)
            losses = [(r.loss, r.grad_norm) for r in (trainer.train_step(s) for s in range(STEPS))]
            out[name][mode] = {"losses": losses, "memory": trainer.engine.memory(),
                               "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                               "bias": [l.router.expert_bias_E.clone() for l in trainer.model.moe_layers]}
    return out


def _check_parity(results, layouts, modes=MODES):
    for name in layouts:
        for rank, res in enumerate(results):
            ref = res[name]["none"]
            for mode in modes[1:]:
                got = res[name][mode]
                for (l, n), (lr, nr) in zip(got["losses"], ref["losses"]):
                    assert l == pytest.approx(lr, rel=1e-5), (name, mode, rank)
                    assert n == pytest.approx(nr, rel=1e-5), (name, mode, rank)
                for p, want in ref["params"].items():
                    torch.testing.assert_close(got["params"][p], want, rtol=1e-5, atol=1e-5,
                                               msg=f"{name} {mode} rank {rank} {p}")
                for a, b in zip(got["bias"], ref["bias"]):
                    assert torch.equal(a, b), (name, mode, rank)
                # Sharding holds less: the moments (and, for ZeRO-2, the gradients) are split over the group.
                assert got["memory"]["optimizer"] < ref["memory"]["optimizer"], (name, mode)
                if mode == "states+grads":
                    assert got["memory"]["grads"] < ref["memory"]["grads"], (name, mode)


def _save_resume_worker(rank, world, raw, root):
    """Sharded ZeRO-2 run: save at step 2, continue to 4 (the reference); then an unsharded engine resumes from
    step 2 and a sharded one from the unsharded save: both continue with the reference's losses."""
    cdir = str(Path(root) / "sharded")
    _trainer(raw, world, "states+grads", cdir).fit(steps=2, progress=False)
    ref = _trainer(raw, world, "states+grads", cdir, resume="must").fit(steps=4, progress=False)
    torch.distributed.barrier()
    if rank == 0:
        (Path(cdir) / "latest").write_text("step_000002\n")
    torch.distributed.barrier()
    plain = _trainer(raw, world, "none", cdir, resume="must")
    got = plain.fit(steps=4, progress=False)
    back_dir = str(Path(root) / "plain")
    _trainer(raw, world, "none", back_dir).fit(steps=2, progress=False)
    back = _trainer(raw, world, "states", back_dir, resume="must").fit(steps=4, progress=False)
    return {"ref": [(s.step, s.loss) for s in ref.steps], "got": [(s.step, s.loss) for s in got.steps],
            "back": [(s.step, s.loss) for s in back.steps], "resumed": str(plain.resumed_from)}


def _fast_worker(rank, world, layouts, root):
    return {"parity": _parity_worker(rank, world, layouts, ("none", "states+grads")),
            "resume": _save_resume_worker(rank, world, layouts["dp2"], root)}


def test_dp2_zero2_equals_unsharded_and_its_checkpoint_loads_unsharded(tmp_path):
    """The default suite's case (one spawn): DP2, ZeRO-2 against torch AdamW; a ZeRO-2 checkpoint resumed by
    the unsharded engine, and an unsharded one by ZeRO-1, continue with the same losses."""
    layouts = {"dp2": _raw(1, 1, 1, 2)}
    results = run_ranks(_fast_worker, 2, layouts, str(tmp_path), timeout=400)
    _check_parity([r["parity"] for r in results], layouts, ("none", "states+grads"))
    for r in (r["resume"] for r in results):
        assert r["resumed"].endswith("step_000002")
        assert [s for s, _ in r["got"]] == [s for s, _ in r["back"]] == [2, 3]
        assert [s for s, _ in r["ref"]] == [2, 3]
        ref = dict(r["ref"])
        for step, loss in r["got"] + r["back"]:
            assert loss == pytest.approx(ref[step], rel=1e-5), step


def _recomputed(raw):
    """Blocks recomputed in backward: ZeRO-2's gradient hooks fire while backward reruns forwards."""
    raw["train"]["recompute"] = "block"
    return raw


LAYOUTS_4 = {"dp4": _raw(1, 1, 1, 4), "ep2_dp2": _raw(1, 2, 1, 4),
             "tp2_ep2": _raw(2, 2, 1, 4), "etp2_ep2": _raw(1, 2, 2, 4),
             "ep2_dp2_accum2": _raw(1, 2, 1, 4, accum=2), "ep2_dp2_recompute": _recomputed(_raw(1, 2, 1, 4))}


@pytest.mark.slow
def test_sharded_equals_unsharded_on_four_ranks():
    results = run_ranks(_parity_worker, 4, LAYOUTS_4, timeout=1500, collective_timeout_s=300)
    _check_parity(results, LAYOUTS_4)


def _bf16_worker(rank, world, raw):
    """bf16 weights (forced on the CPU) with fp32 masters, unsharded and ZeRO-2."""
    out = {}
    for mode in ("none", "states+grads"):
        trainer = _trainer(raw, world, mode, weights_dtype=torch.bfloat16)
        losses = [trainer.train_step(s).loss for s in range(STEPS)]
        out[mode] = {"losses": losses, "dtypes": {p.dtype for p in trainer.model.parameters()},
                     "dense": {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                               if ".experts." not in n},
                     "master": {n: t["weight"] for n, t in trainer.engine.flat.checkpoint_tensors().items()}}
    return out


@pytest.mark.slow
def test_bf16_weights_with_sharded_fp32_masters_on_four_ranks():
    """EP2×DP2 with bf16 weights: every dp rank ends with the same bf16 dense weights (the all-gather of the
    updated shards), the bf16 weights are the rounded fp32 masters, and ZeRO-2 trains like the unsharded
    master path (bf16 rounding of the copies aside)."""
    results = run_ranks(_bf16_worker, 4, _raw(1, 2, 1, 4), timeout=900, collective_timeout_s=300)
    for mode in ("none", "states+grads"):
        for res in results:
            assert res[mode]["dtypes"] == {torch.bfloat16}
            for n, p in res[mode]["dense"].items():
                assert torch.equal(p, results[0][mode]["dense"][n]), (mode, n)
                assert torch.equal(p, res[mode]["master"][n].bfloat16()), (mode, n)
    for res in results:
        assert res["states+grads"]["losses"] == pytest.approx(res["none"]["losses"], rel=1e-2)
