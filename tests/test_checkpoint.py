"""Sharded checkpoints (moe_dist.train.checkpoint): exact resume, resharding, corruption, SIGTERM, the CLI.

Exact resume: a run stopped at step s and resumed gives bit-identical losses to an uninterrupted run (2 and 4
gloo ranks, router jitter on so the per-rank RNG matters, expert bias on so buffers matter).
Reshard: a checkpoint written with one layout loads into another; the next steps' losses equal the original
layout's continued losses to fp32 tolerance (the global batch is the same in every layout).
"""
from __future__ import annotations

import copy
import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from moe_dist import cli, config
from moe_dist.models.gpt import MoEGPT
from moe_dist.parallel.tensor_parallel import Shard, global_shape, local_slice
from moe_dist.parallel.topology import ParallelDims, Topology
from moe_dist.train import checkpoint as ckpt
from moe_dist.train.data import prepare
from moe_dist.train.trainer import Trainer, build_optimizer


def tiny(tp=1, ep=1, etp=1, *, batch_size=2, steps=4, ckpt_dir="", data="", **moe) -> dict:
    return {
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 8, "dense_hidden": 32, "first_dense": 1},
        "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 16, "aux_loss_coef": 0.01, "z_loss_coef": 0.001,
                "balance_over": "global_batch", "expert_bias": True, "num_shared_experts": 1, **moe},
        "parallel": {"tp": tp, "ep": ep, "etp": etp},
        "train": {"batch_size": batch_size, "seq_len": 8, "lr": 1e-2, "warmup_steps": 1, "steps": steps,
                  "out_dir": str(Path(ckpt_dir) / "out"), "tensorboard": False},
        "data": {"path": data},
        "checkpoint": {"dir": ckpt_dir, "keep": 3},
    }


def make_cfg(raw: dict) -> config.Config:
    cfg = config.from_dict(raw)
    config.validate(cfg)
    return cfg


def build_topo(cfg: config.Config, world: int) -> Topology:
    p = cfg.parallel
    return Topology.build(ParallelDims.create(world, p.tp, p.ep, p.etp, cfg.moe.num_experts), timeout_s=60)


class GlobalBatcher:
    """The same global batch of G sequences per step in every layout; dp rank r reads rows r·G/dp ..."""

    def __init__(self, G: int, seq: int, dp_rank: int, dp: int):
        self.G, self.seq, self.rank, self.dp = G, seq, dp_rank, dp

    def get_batch(self, step: int):
        g = torch.Generator().manual_seed(1000 + step)
        tok = torch.randint(0, 256, (self.G, self.seq + 1), generator=g)
        rows = slice(self.rank * self.G // self.dp, (self.rank + 1) * self.G // self.dp)
        return tok[rows, :-1], tok[rows, 1:]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckdata") / "tok.bin"
    prepare(None, out, max_bytes=60_000)
    return out


# ------------------------------------------------------------------------------- chunks of the global tensor

@pytest.mark.parametrize("spec,dims", [
    ((Shard(0, "ep"),), dict(world=4, ep=4)),
    ((Shard(0, "ep"), Shard(2, "etp", 2)), dict(world=4, ep=2, etp=2)),     # SwiGLU's [gate | up] under ETP
    ((Shard(0, "ep"), Shard(1, "etp")), dict(world=4, ep=2, etp=2)),
    ((Shard(0, "tp", 2),), dict(world=4, tp=4)),                            # attention's [k | v] under TP
    ((Shard(1, "tp"),), dict(world=2, tp=2)),
])
def test_chunks_tile_the_global_tensor(spec, dims):
    """Each rank's chunks are exactly its local_slice, placed where they sit in the global tensor, and the
    distinct chunks of all ranks cover every element once (replicas share chunk offsets)."""
    pd = ParallelDims.create(**dims)
    local_shape = list((8, 6, 12))
    topo0 = Topology.virtual(pd, 0)
    for s in spec:
        local_shape[s.dim] //= topo0.groups[s.axis].size
    full = torch.arange(8 * 6 * 12, dtype=torch.float32).view(8, 6, 12)
    covered = torch.zeros_like(full)
    seen = set()
    for rank in range(pd.world):
        topo = Topology.virtual(pd, rank)
        local = local_slice(full, spec, topo).clone()
        assert global_shape(local.shape, spec, topo) == full.shape
        view = ckpt.ShardView(local, spec, topo)
        assert view.size() == full.shape
        for offsets, sizes, piece in view.chunks:
            region = full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]
            assert torch.equal(piece, region), (rank, offsets, sizes)
            assert piece.data_ptr() >= local.data_ptr()        # a view into the shard, not a copy
            if tuple(offsets) not in seen:
                seen.add(tuple(offsets))
                covered[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))] += 1
    assert torch.equal(covered, torch.ones_like(full))


# ------------------------------------------------------------------------------------ exact resume (N ranks)

def _resume_worker(rank, world, raw_by_name, root):
    out = {}
    for name, raw in raw_by_name.items():
        losses = {}
        for run in ("whole", "part1", "part2"):
            r = copy.deepcopy(raw)
            r["checkpoint"]["dir"] = str(Path(root) / name / ("whole" if run == "whole" else "parts"))
            r["train"]["out_dir"] = r["checkpoint"]["dir"] + "/out"
            cfg = make_cfg(r)
            trainer = Trainer(cfg, topo=build_topo(cfg, world))
            hist = trainer.fit(steps=2 if run == "part1" else None, progress=False)
            losses[run] = [(s.step, s.loss, s.lm_loss) for s in hist.steps]
            if run != "part1":
                losses[run + "_params"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
                losses[run + "_bias"] = [l.router.expert_bias_E.clone() for l in trainer.model.moe_layers]
            losses[run + "_resumed"] = str(trainer.resumed_from)
        out[name] = losses
    return out


RESUME_CASES = {2: {"ep2": tiny(1, 2, 1, jitter_eps=0.1)},
                4: {"tp2_ep2": tiny(2, 2, 1, jitter_eps=0.1), "etp2_ep2": tiny(1, 2, 2, jitter_eps=0.1)}}


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_resume_is_bit_identical(world, corpus, tmp_path):
    cases = {n: {**r, "data": {"path": str(corpus)}} for n, r in RESUME_CASES[world].items()}
    results = run_ranks(_resume_worker, world, cases, str(tmp_path), timeout=300)
    for name in cases:
        for rank, res in enumerate(results):
            r = res[name]
            assert r["part1_resumed"] == "None" and r["part2_resumed"].endswith("step_000002")
            assert [s for s, *_ in r["part2"]] == [2, 3]
            assert r["part2"] == r["whole"][2:], (name, rank)              # exact float equality
            for n, p in r["whole_params"].items():
                assert torch.equal(p, r["part2_params"][n]), (name, rank, n)
            for a, b in zip(r["whole_bias"], r["part2_bias"]):
                assert torch.equal(a, b) and a.abs().sum() > 0


# -------------------------------------------------------------------------------------------------- reshard

G = 4   # sequences per global batch, the same in every layout


def _continue(raw: dict, world: int, cdir: str, resume: str, steps: int, out_dir: str = ""):
    """Train with the global batcher until `steps`; returns the (step, loss) of every step run."""
    cfg = make_cfg({**raw, "checkpoint": {"dir": cdir, "keep": 5, "resume": resume}})
    cfg.train.out_dir = out_dir or cdir + "/out"
    topo = build_topo(cfg, world)
    trainer = Trainer(cfg, topo=topo, batcher=GlobalBatcher(G, cfg.train.seq_len, topo.dp.rank, topo.dp.size))
    hist = trainer.fit(steps=steps, progress=False)
    return [(s.step, s.loss) for s in hist.steps], str(trainer.resumed_from)


def _save_then_continue(rank, world, raw, cdir):
    """Save at step 2, then record steps 2-3 of the same layout resumed from it; `latest` back to step 2."""
    _continue(raw, world, cdir, "never", 2)
    ref, _ = _continue(raw, world, cdir, "must", 4)
    torch.distributed.barrier()
    if rank == 0:
        (Path(cdir) / "latest").write_text("step_000002\n")
    torch.distributed.barrier()
    return ref


def _reshard_worker(rank, world, pairs, root, src_world2):
    out = {}
    for name, (src, dst) in pairs.items():
        cdir = str(Path(root) / name) if src is not None else src_world2
        ref = _save_then_continue(rank, world, src, cdir) if src is not None else None
        got, resumed = _continue(dst, world, cdir, "must", 4, out_dir=str(Path(root) / (name + "_dst")))
        out[name] = {"ref": ref, "got": got, "resumed": resumed}
    return out


def _lay(tp, ep, etp, world=4):
    return tiny(tp, ep, etp, batch_size=G * tp // world, steps=6)


RESHARD = {"dp4_to_ep2dp2": (_lay(1, 1, 1), _lay(1, 2, 1)),
           "tp2_to_tp1": (_lay(2, 1, 1), _lay(1, 1, 1)),
           "etp2ep2_to_ep4": (_lay(1, 2, 2), _lay(1, 4, 1))}
RESHARD_SLOW = {"ep2w2_to_ep4": (None, _lay(1, 4, 1)),          # saved on 2 ranks, loaded on 4
                "ep4_to_tp2ep2": (_lay(1, 4, 1), _lay(2, 2, 1))}


def _check_reshard(results, pairs, ref_w2=None):
    for name in pairs:
        r = results[0][name]
        ref = r["ref"] if r["ref"] is not None else ref_w2
        assert r["resumed"].endswith("step_000002"), r["resumed"]
        assert [s for s, _ in r["got"]] == [s for s, _ in ref] == [2, 3]
        for (_, got), (_, want) in zip(r["got"], ref):
            assert got == pytest.approx(want, rel=1e-5), name
        for other in results[1:]:
            assert other[name]["got"] == r["got"]                      # every rank logs the same global loss


def test_reshard_to_other_layouts(tmp_path):
    """DP=4 → EP=2×DP=2; TP=2 → TP=1; ETP=2×EP=2 → EP=4 (4 ranks): the continued losses match."""
    _check_reshard(run_ranks(_reshard_worker, 4, RESHARD, str(tmp_path), "", timeout=400), RESHARD)


@pytest.mark.slow
def test_reshard_across_world_sizes(tmp_path):
    """EP=2 on 2 ranks → EP=4 on 4 ranks; EP=4 → TP=2×EP=2."""
    ep2_w2 = str(tmp_path / "ep2_w2")
    ref_w2 = run_ranks(_save_then_continue, 2, _lay(1, 2, 1, world=2), ep2_w2, timeout=200)[0]
    results = run_ranks(_reshard_worker, 4, RESHARD_SLOW, str(tmp_path), ep2_w2, timeout=400)
    _check_reshard(results, RESHARD_SLOW, ref_w2)


# -------------------------------------------------------------------------------------- corruption, shapes

def _single(tmp_path: Path, steps: int, **over):
    raw = tiny(ckpt_dir=str(tmp_path / "ck"), steps=steps)
    raw["checkpoint"].update(over)
    cfg = make_cfg(raw)
    trainer = Trainer(cfg, batcher=GlobalBatcher(2, 8, 0, 1))
    cfg.checkpoint.every = 1
    return trainer, cfg


def test_saves_are_atomic_kept_and_manifested(tmp_path):
    trainer, cfg = _single(tmp_path, steps=4, keep=2)
    (tmp_path / "ck").mkdir(parents=True)
    (tmp_path / "ck" / "step_000009.tmp-dead").mkdir()          # a save that crashed before its rename
    trainer.fit(progress=False)
    root = tmp_path / "ck"
    assert sorted(p.name for p in root.iterdir() if p.name != "out") == ["latest", "step_000003", "step_000004"]
    assert (root / "latest").read_text().strip() == "step_000004"
    meta = json.loads((root / "step_000004" / "meta.json").read_text())
    assert meta["step"] == 4 and meta["layout"]["world"] == 1 and meta["shape"]["model.dim"] == 32
    assert set(meta["files"]) == {p.name for p in (root / "step_000004").iterdir()} - {"meta.json"}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in meta["files"].values())


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupt_latest_is_named_and_falls_back(tmp_path, damage):
    trainer, cfg = _single(tmp_path, steps=2)
    trainer.fit(progress=False)
    victim = sorted((tmp_path / "ck" / "step_000002").glob("*.distcp"))[0]
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:100])
    else:
        victim.unlink()
    with pytest.raises(ckpt.CheckpointError, match=re.escape(str(victim)) + ".*checkpoint.fallback=true"):
        ckpt.find(tmp_path / "ck", fallback=False)
    # Without fallback the run refuses to start, naming the file.
    trainer3, _ = _single(tmp_path, steps=2)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(victim.name)):
        trainer3.fit(progress=False)
    said = []
    path, meta = ckpt.find(tmp_path / "ck", fallback=True, say=said.append)
    assert path.name == "step_000001" and meta["step"] == 1
    assert "falling back" in said[0] and victim.name in said[0]
    # With fallback the trainer resumes from step 1 and redoes step 1.
    trainer2, _ = _single(tmp_path, steps=2, fallback=True)
    hist = trainer2.fit(progress=False)
    assert trainer2.resumed_from.name == "step_000001" and [s.step for s in hist.steps] == [1]


def test_incompatible_shape_is_refused_naming_the_field(tmp_path):
    trainer, cfg = _single(tmp_path, steps=1)
    trainer.fit(progress=False)
    raw = tiny(ckpt_dir=str(tmp_path / "ck"), steps=2)
    raw["model"]["dim"] = 48
    other = Trainer(make_cfg(raw), batcher=GlobalBatcher(2, 8, 0, 1))
    with pytest.raises(ckpt.CheckpointError, match=r"model\.dim 32 \(checkpoint\) vs 48 \(config\)"):
        other.fit(progress=False)


def test_resume_must_without_checkpoint_fails(tmp_path):
    trainer, cfg = _single(tmp_path, steps=1, resume="must")
    with pytest.raises(ckpt.CheckpointError, match="checkpoint.resume=must"):
        trainer.fit(progress=False)


def test_optimizer_state_round_trips_in_one_process(tmp_path):
    """Every parameter, AdamW moment and step, and the expert bias come back bit for bit."""
    cfg = make_cfg(tiny(ckpt_dir=str(tmp_path)))
    topo = Topology.single()
    model = MoEGPT(cfg, topo)
    opt = build_optimizer(model, cfg.train)
    x = torch.randint(0, 256, (2, 8))
    model(x, x).loss.backward()
    opt.step()
    model.moe_layers[0].router.expert_bias_E += 0.5
    ckpt.save(tmp_path, 1, model, opt, cfg, topo, keep=1)
    model2 = MoEGPT(cfg, topo)
    opt2 = build_optimizer(model2, cfg.train)
    ckpt.load(*ckpt.find(tmp_path, False), model2, opt2, topo)
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[a][k], opt2.state[b][k]), (n, k)
    assert torch.equal(model2.moe_layers[0].router.expert_bias_E, model.moe_layers[0].router.expert_bias_E)


class _RunsCode:
    """Unpickling this calls os.getcwd: stands in for any global a tampered file could name."""
    def __reduce__(self):
        return (os.getcwd, ())


def test_metadata_with_foreign_globals_is_refused(tmp_path):
    """DCP's .metadata is a pickle; our reader builds only DCP's metadata types, never an arbitrary global."""
    import pickle
    cfg = make_cfg(tiny(ckpt_dir=str(tmp_path)))
    topo = Topology.single()
    model = MoEGPT(cfg, topo)
    opt = build_optimizer(model, cfg.train)
    ckpt.save(tmp_path, 1, model, opt, cfg, topo, keep=1)
    path, meta = ckpt.find(tmp_path, False)
    (path / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata: unreadable checkpoint metadata "
                                                   r"\(posix\.getcwd is not allowed"):
        ckpt.load(path, meta, model, opt, topo)


# -------------------------------------------------------------------------------------------------- SIGTERM

def _sigterm_worker(rank, world, raw):
    cfg = make_cfg(raw)
    trainer = Trainer(cfg, topo=build_topo(cfg, world), batcher=GlobalBatcher(G, 8, rank, world))

    def on_step(r):
        if rank == 1 and r.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)        # one rank only: the others must agree and save too
    hist = trainer.fit(progress=False, on_step=on_step)
    return {"steps": [s.step for s in hist.steps], "stopped": trainer.stopped_at,
            "saved": str(trainer.last_checkpoint)}


def test_sigterm_saves_on_every_rank_and_stops(tmp_path):
    raw = tiny(1, 2, 1, batch_size=2, steps=6, ckpt_dir=str(tmp_path / "ck"))
    results = run_ranks(_sigterm_worker, 2, raw, timeout=200)
    for r in results:
        assert r["steps"] == [0, 1] and r["stopped"] == 2 and r["saved"].endswith("step_000002")
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step_000002"


# ------------------------------------------------------------------------------------------------------ CLI

def test_cli_train_resumes_from_latest(tmp_path, corpus, capsys):
    argv = ["train", "configs/tiny-cpu.yaml", "--train.batch_size=2", "--train.seq_len=16",
            "--model.max_seq_len=16", "--model.n_layers=2", "--model.dim=32", "--model.n_heads=2",
            "--model.dense_hidden=32", "--moe.expert_hidden=16", f"--data.path={corpus}",
            f"--train.out_dir={tmp_path / 'run'}", "--train.tensorboard=false", "--quiet"]
    assert cli.main(argv + ["--train.steps=2"]) == 0
    first = capsys.readouterr().out
    assert "resumed from" not in first and "step_000002" in first
    assert cli.main(argv + ["--train.steps=3"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / 'step_000002'} (step 2" in out
    assert "done: 1 steps" in out
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]
    assert cli.main(argv + ["--train.steps=3", "--model.dim=48"]) == 2
    assert "model.dim 32 (checkpoint) vs 48 (config)" in capsys.readouterr().err


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
