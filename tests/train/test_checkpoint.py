"""Sharded checkpoints (moe_dist.train.checkpoint) in one process: chunks of the global tensor, atomic saves,
corruption and fallback, incompatible shapes, optimizer state, tampered metadata, resume through the CLI.

Exact resume and resharding on 2 and 4 ranks, and SIGTERM on every rank, are in
tests/multirank/test_checkpoint_ranks.py; a preempted `moe-dist train` process in
tests/system/test_checkpoint_cli.py.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from checkpoint_helpers import GlobalBatcher, corpus, make_cfg, tiny  # noqa: F401  (corpus: a fixture)
from moe_dist import cli
from moe_dist.models.gpt import MoEGPT
from moe_dist.parallel.tensor_parallel import Shard, global_shape, local_slice
from moe_dist.parallel.topology import ParallelDims, Topology
from moe_dist.train import checkpoint as ckpt
from moe_dist.train.trainer import Trainer, build_optimizer


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
    pd = ParallelDims(**dims)
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


class _Holder:
    """A plain attribute holder, like the loss-scaler objects in ZeRO's optimizer state."""
    def __init__(self, value):
        self.value = value


def test_weights_only_loading_refuses_globals_unless_named(tmp_path):
    """torch.save files (the DeepSpeed engine's rank files) load through the weights-only unpickler: a global
    that runs code is refused naming the file, an attribute holder only when the caller names its class."""
    tampered, holder = tmp_path / "tampered.pt", tmp_path / "holder.pt"
    torch.save({"w": torch.ones(2), "x": _RunsCode()}, tampered)
    torch.save({"w": torch.ones(2), "h": _Holder(3)}, holder)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{tampered}: refused by weights-only loading")):
        ckpt.load_weights_only(tampered)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{holder}: refused by weights-only loading")):
        ckpt.load_weights_only(holder)
    state = ckpt.load_weights_only(holder, allow=[_Holder])
    assert torch.equal(state["w"], torch.ones(2)) and state["h"].value == 3


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
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [0, 1, 2]
    assert [r["step"] for r in recs if r["kind"] == "memory"] == [0, 2]     # the first step of each run
    assert cli.main(argv + ["--train.steps=3", "--model.dim=48"]) == 2
    assert "model.dim 32 (checkpoint) vs 48 (config)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ pipeline layouts

def _pp_cfg(pp=2, n_layers=4, **parallel):
    raw = tiny(1, 2, 1)
    raw["model"]["n_layers"] = n_layers
    raw["parallel"].update({"pp": pp, **parallel})
    return make_cfg(raw)


OLD_LAYOUT = {"world": 4, "tp": 1, "ep": 2, "etp": 1, "dp": 4, "edp": 2}    # as written before pipelines


def test_a_layout_without_stages_is_recorded_as_before():
    """pp = 1 adds no key: a checkpoint of an older version is the same layout (its RNG state is restored),
    and an older version reads ours."""
    topo = Topology.virtual(ParallelDims(world=4, ep=2), 0)
    assert ckpt.layout_of(topo, _pp_cfg(pp=1)) == ckpt.layout_of(topo) == OLD_LAYOUT
    assert ckpt.same_layout(OLD_LAYOUT, ckpt.layout_of(topo))
    assert ckpt.describe_layout(OLD_LAYOUT) == "world=4 tp=1 ep=2 etp=1 dp=4"


def test_a_pipeline_layout_records_stages_virtual_stages_and_the_split():
    topo = Topology.virtual(ParallelDims(world=4, ep=2, pp=2), 3)
    layout = ckpt.layout_of(topo, _pp_cfg())
    assert layout == {"world": 4, "tp": 1, "ep": 2, "etp": 1, "dp": 2, "edp": 1, "pp": 2, "pp_virtual": 1,
                      "pp_layers": [2, 2]}
    assert ckpt.describe_layout(layout) == "world=4 tp=1 ep=2 etp=1 dp=2 pp=2 pp_layers=2,2"
    # The split the run uses is what counts: the default even split and the same split written out agree.
    assert ckpt.same_layout(layout, ckpt.layout_of(topo, _pp_cfg(pp_layers=[2, 2])))
    uneven = ckpt.layout_of(topo, _pp_cfg(pp_layers=[1, 3]))
    assert not ckpt.same_layout(layout, uneven) and uneven["pp_layers"] == [1, 3]
    assert not ckpt.same_layout(layout, OLD_LAYOUT)
    interleaved = ckpt.layout_of(topo, _pp_cfg(pp_virtual=2, pp_schedule="interleaved"))
    assert interleaved["pp_virtual"] == 2 and interleaved["pp_layers"] == [1, 1, 1, 1]
    assert "pp=2 pp_virtual=2 pp_layers=1,1,1,1" in ckpt.describe_layout(interleaved)
