"""Checkpoints of pipeline-parallel runs: every rank saves only its stage's entries under the model's global
names (`blocks.<i>.…`, the embedding on the first stage, norm and head on the last), and a checkpoint loads into
another pipeline split, expert and data layout, or one process.

Each resharding case trains a 4-layer model in an uninterrupted reference run that saves at step 2, then resumes
other layouts from that checkpoint: their losses for steps 2 and 3 equal the reference's (fp32 tolerance; the
global batch and its micro-batches are the same in every layout). PP=2 on 2 ranks (tied embeddings) → one
process; a one-process checkpoint → PP=2; PP=2 → PP=2 bit for bit with router jitter (the RNG state comes back
in the same layout only). On 4 ranks the reference keeps its optimizer state in FlatAdamW shards
(train.shard_optimizer=states) and the resumed runs in torch's AdamW, so the optimizer entries travel between
both forms too: PP=2×EP=2 → PP=1×EP=4, and (slow) → PP=4, → a 1+3 layer split, → interleaved virtual stages.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from checkpoint_helpers import G, GlobalBatcher, build_topo, make_cfg, tiny
from distributed import run_ranks
from moe_dist.parallel.topology import Topology
from moe_dist.train.trainer import Trainer

ACCUM = 2          # micro-batches per step: the pipeline schedules run 2 of them through the stages
N_LAYERS = 4


def _layout(pp: int, ep: int = 1, world: int = 4, pp_layers=None, tie: bool = False, jitter_eps: float = 0.0,
            pp_virtual: int = 1, pp_schedule: str = "1f1b", **train) -> dict:
    """A 4-layer tiny model on `world` ranks: pp stages of world/pp ranks, each micro-batch G sequences."""
    dp = world // pp
    raw = tiny(1, ep, 1, batch_size=G // dp, steps=6, jitter_eps=jitter_eps)
    raw["model"].update({"n_layers": N_LAYERS, "tie_embeddings": tie})
    raw["parallel"].update({"pp": pp, "pp_layers": pp_layers, "pp_virtual": pp_virtual, "pp_schedule": pp_schedule})
    raw["train"].update({"grad_accum_steps": ACCUM, **train})
    return raw


def _run(raw: dict, world: int, cdir: str, resume: str, steps: int, out_dir: str, every: int = 0):
    """Train with the global batcher until `steps`; returns the (step, loss) of each step run, the checkpoint
    it resumed from and what rank 0 said about the resume."""
    raw = copy.deepcopy(raw)
    raw["checkpoint"].update({"dir": cdir, "keep": 5, "resume": resume, "every": every})
    cfg = make_cfg(raw)
    cfg.train.out_dir = out_dir
    topo = build_topo(cfg, world) if world > 1 else Topology.single()
    trainer = Trainer(cfg, topo=topo, batcher=GlobalBatcher(G, cfg.train.seq_len, topo.dp.rank, topo.dp.size))
    said: list[str] = []
    trainer._say = lambda *a, **k: said.append(" ".join(map(str, a)))
    hist = trainer.fit(steps=steps, progress=False)
    return [(s.step, s.loss) for s in hist.steps], str(trainer.resumed_from), said


def _reference(rank, world, raw, cdir):
    """The uninterrupted run (4 steps, a checkpoint at step 2), and what its checkpoint holds per rank."""
    losses, _, _ = _run(raw, world, cdir, "never", 4, cdir + "/out", every=2)
    torch.distributed.barrier()
    if rank == 0:
        (Path(cdir) / "latest").write_text("step_000002\n")     # the resumed runs start from step 2
    torch.distributed.barrier()
    return losses


def _resume_into(rank, world, raws: dict, cdir, root):
    """Each layout of `raws` in turn resumes from step 2 of `cdir` and trains steps 2 and 3."""
    out = {}
    for name, raw in raws.items():
        got, resumed, said = _run(raw, world, cdir, "must", 4, str(Path(root) / name))
        torch.distributed.barrier()
        if rank == 0:
            (Path(cdir) / "latest").write_text("step_000002\n")  # the resumed run saved step 4 there
        torch.distributed.barrier()
        out[name] = {"got": got, "resumed": resumed, "said": said}
    return out


def _check(ref, results, name, said_layout=None):
    """The resumed layout's steps 2-3 equal the reference's; every rank logs the same global loss."""
    r = results[0][name]
    assert r["resumed"].endswith("step_000002"), r["resumed"]
    assert [s for s, _ in r["got"]] == [s for s, _ in ref[2:]] == [2, 3]
    for (_, got), (_, want) in zip(r["got"], ref[2:]):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), name
    for other in results[1:]:
        assert other[name]["got"] == r["got"], name
    if said_layout is not None:
        resumed = [line for line in r["said"] if line.startswith("resumed from")]
        assert resumed and said_layout in resumed[0], r["said"]


def _entries(path: Path) -> dict[str, list]:
    """Entry name → the files DCP wrote its chunks into."""
    from moe_dist.train.checkpoint.safe_load import SafeReader
    md = SafeReader(path).read_metadata()
    files: dict[str, set] = {}
    for index, info in md.storage_data.items():
        files.setdefault(index.fqn, set()).add(info.relative_path)
    return {k: sorted(v) for k, v in files.items()}


def _check_stage_files(path: Path, stage_of_rank: dict[int, int], tied: bool = False):
    """Each layer's entries come only from the files of ranks on its stage; embed from stage 0, head last. A
    tied embedding has a copy on the last stage too, under the same name: DCP keeps one writer of the two."""
    entries = _entries(path)
    n_stages = max(stage_of_rank.values()) + 1
    per_stage = N_LAYERS // n_stages
    for fqn, files in entries.items():
        stages = {stage_of_rank[int(f.split("_")[2])] for f in files}     # "__<rank>_0.distcp"
        if ".blocks." in f".{fqn}":
            layer = int(fqn.split("blocks.")[1].split(".")[0])
            assert stages == {layer // per_stage}, (fqn, files)
        elif fqn.startswith(("model.embed", "optim.embed")):
            assert len(stages) == 1 and stages <= ({0, n_stages - 1} if tied else {0}), (fqn, files)
        elif fqn.startswith(("model.head", "optim.head", "model.norm", "optim.norm")):
            assert stages == {n_stages - 1}, (fqn, files)
    layers = {int(k.split("blocks.")[1].split(".")[0]) for k in entries if "blocks." in k}
    assert layers == set(range(N_LAYERS))


# ------------------------------------------------------------------------------------------- 2 ranks ↔ 1

def _two_rank_cases(rank, world, tied, cdir_tied, jitter, cdir_jitter, pp2, cdir_pp1):
    """One spawn for three cases: (1) the tied reference the parent then loads in one process; (2) router jitter
    on: a resume in the same layout continues bit for bit only if each rank's RNG state came back; (3) the
    parent's one-process checkpoint (recorded like those of versions before pipelines) resumed on 2 stages."""
    out = {"tied_ref": _reference(rank, world, tied, cdir_tied), "whole": _reference(rank, world, jitter, cdir_jitter)}
    out["same"], out["same_from"], _ = _run(jitter, world, cdir_jitter, "must", 4, cdir_jitter + "/out2")
    out["from_pp1"], out["from_pp1_from"], _ = _run(pp2, world, cdir_pp1, "must", 4, cdir_pp1 + "/out_pp2")
    return out


def test_pp2_checkpoints_resume_exactly_and_reshard_to_and_from_one_process(tmp_path):
    """PP=2 on 2 ranks (tied embeddings, torch AdamW) → one process (FlatAdamW): steps 2-3 match the
    uninterrupted run, the shared weight coming back from one entry. One process → PP=2: the same. PP=2 → PP=2
    with router jitter: bit for bit."""
    cdir_pp1, cdir_tied = str(tmp_path / "pp1"), str(tmp_path / "pp2_tied")
    ref_pp1, _, _ = _run(_layout(1, world=1), 1, cdir_pp1, "never", 4, cdir_pp1 + "/out", every=2)
    (Path(cdir_pp1) / "latest").write_text("step_000002\n")
    results = run_ranks(_two_rank_cases, 2, _layout(2, world=2, tie=True), cdir_tied,
                        _layout(2, world=2, jitter_eps=0.1), str(tmp_path / "pp2_jitter"), _layout(2, world=2),
                        cdir_pp1, timeout=400)
    for r in results:
        assert r["same_from"].endswith("step_000002") and r["same"] == r["whole"][2:]     # exact float equality
        _check(ref_pp1, [{"pp2": {"got": r["from_pp1"], "resumed": r["from_pp1_from"], "said": None}}], "pp2")
    _check_stage_files(Path(cdir_tied) / "step_000002", {0: 0, 1: 1}, tied=True)
    got, resumed, said = _run(_layout(1, world=1, tie=True, shard_optimizer="states"), 1, cdir_tied, "must", 4,
                              str(tmp_path / "pp1_from_tied"))
    _check(results[0]["tied_ref"], [{"pp1": {"got": got, "resumed": resumed, "said": said}}], "pp1",
           "saved with world=2 tp=1 ep=1 etp=1 dp=1 pp=2 pp_layers=2,2, resharded to world=1 tp=1 ep=1 etp=1 dp=1")


# ------------------------------------------------------------------------------------------- 4 ranks

def _reference_then_resume(rank, world, raw, cdir, raws, root):
    return {"ref": _reference(rank, world, raw, cdir), **_resume_into(rank, world, raws, cdir, root)}


def _four_rank_case(tmp_path, targets: dict):
    """One spawn: the PP=2×EP=2 reference (ZeRO-1 FlatAdamW), then each target layout resumed from its step 2."""
    cdir = str(tmp_path / "pp2ep2")
    raws = {name: raw for name, (raw, _) in targets.items()}
    results = run_ranks(_reference_then_resume, 4, _layout(2, ep=2, shard_optimizer="states"), cdir, raws,
                        str(tmp_path), timeout=400)
    # Ranks 0-1 are stage 0 (dp=2, ep=2), ranks 2-3 stage 1.
    _check_stage_files(Path(cdir) / "step_000002", {0: 0, 1: 0, 2: 1, 3: 1})
    for name, (_, layout) in targets.items():
        _check(results[0]["ref"], results, name, "saved with world=4 tp=1 ep=2 etp=1 dp=2 pp=2 pp_layers=2,2, "
                                                 "resharded to " + layout)


def test_pp2_ep2_checkpoint_loads_as_ep4(tmp_path):
    """PP=2×EP=2 (4 ranks, sharded FlatAdamW) → PP=1×EP=4 (torch AdamW)."""
    _four_rank_case(tmp_path, {"pp1_ep4": (_layout(1, ep=4), "world=4 tp=1 ep=4 etp=1 dp=4")})


@pytest.mark.slow
def test_pp2_ep2_checkpoint_loads_as_pp4(tmp_path):
    """PP=2×EP=2 → PP=4 (one layer per stage), → PP=2×EP=2 with the layers split 1 + 3, and → PP=2×EP=2 with
    two virtual stages per rank (interleaved: rank 0 holds layers 0 and 2)."""
    _four_rank_case(tmp_path, {
        "pp4": (_layout(4), "world=4 tp=1 ep=1 etp=1 dp=1 pp=4 pp_layers=1,1,1,1"),
        "pp2_1_3": (_layout(2, ep=2, pp_layers=[1, 3]), "world=4 tp=1 ep=2 etp=1 dp=2 pp=2 pp_layers=1,3"),
        "pp2_v2": (_layout(2, ep=2, pp_virtual=2, pp_schedule="interleaved"),
                   "world=4 tp=1 ep=2 etp=1 dp=2 pp=2 pp_virtual=2 pp_layers=1,1,1,1"),
    })
