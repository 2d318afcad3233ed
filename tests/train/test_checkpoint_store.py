"""The atomic checkpoint store alone (moe_dist.train.checkpoint.store): one process, plain files, no DCP.

What both engines rely on: a save leaves no temporary folder, every file and folder is fsynced before the
rename that publishes it, `latest` moves last, keep-K pruning, a re-save of the same step, and `verify`/`find`
naming a truncated, altered or missing file.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from moe_dist.parallel.topology import Topology
from moe_dist.train.checkpoint import store
from moe_dist.train.checkpoint.store import CheckpointError


def write_step(root: Path, step: int, keep: int = 3, payload: bytes = b"", fill=None) -> Path:
    """A checkpoint of two files whose contents depend on the step."""
    def default_fill(tmp: Path) -> None:
        for name in ("a.bin", "b.bin"):
            with store.open_synced(tmp / name) as f:
                f.write(f"{name} of step {step}".encode() * 100 + payload)
    return store.write(root, step, Topology.single(), keep, fill or default_fill, {"engine": "test"})


def test_save_publishes_a_whole_folder_with_its_manifest_and_no_tmp_left(tmp_path):
    final = write_step(tmp_path, 7)
    assert final == tmp_path / "step_000007"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000007"]     # no .tmp- folder or file
    assert (tmp_path / "latest").read_text() == "step_000007\n"
    meta = json.loads((final / "meta.json").read_text())
    assert meta["format"] == store.FORMAT and meta["step"] == 7 and meta["engine"] == "test"
    assert set(meta["files"]) == {"a.bin", "b.bin"}
    for name, entry in meta["files"].items():
        assert entry["bytes"] == (final / name).stat().st_size and len(entry["sha256"]) == 64
    assert store.verify(final) == meta
    assert store.find(tmp_path, fallback=False) == (final, meta)


def test_files_and_folders_are_fsynced_and_latest_moves_last(tmp_path, monkeypatch):
    """Record every fsync (by path) and rename in order: the data files, meta.json and the folder are synced
    before the folder's rename, the root after it, and the rename onto `latest` comes after all of them."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", f"{Path(src).name} -> {Path(dst).name}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_step(tmp_path, 3)
    monkeypatch.undo()

    publish = next(i for i, (kind, what) in enumerate(events) if kind == "replace" and what.endswith("-> step_000003"))
    tmp_name = events[publish][1].split(" -> ")[0]
    assert tmp_name.startswith("step_000003.tmp-")
    synced_before = {Path(p).name for kind, p in events[:publish] if kind == "fsync"}
    assert {"a.bin", "b.bin", tmp_name} <= synced_before                     # data files, then the folder
    assert any(kind == "replace" and what.endswith("-> meta.json") for kind, what in events[:publish])
    assert ("fsync", str(tmp_path)) in events[publish + 1:]                  # the rename itself made durable
    last = max(i for i, (kind, _) in enumerate(events) if kind == "replace")
    assert events[last][1].endswith("-> latest") and last > publish         # the pointer moves last
    assert events[last + 1:] == [("fsync", str(tmp_path))]                   # and is made durable too


def test_a_save_that_dies_before_publishing_leaves_latest_on_the_previous_one(tmp_path):
    write_step(tmp_path, 1)

    def dies(tmp: Path) -> None:
        (tmp / "a.bin").write_bytes(b"half")
        raise RuntimeError("killed while writing")
    with pytest.raises(RuntimeError, match="killed while writing"):
        write_step(tmp_path, 2, fill=dies)
    assert (tmp_path / "latest").read_text().strip() == "step_000001"
    assert [p.name for p in store.complete_checkpoints(tmp_path)] == ["step_000001"]
    assert store.find(tmp_path, fallback=False)[0].name == "step_000001"
    write_step(tmp_path, 2)                                   # the next save clears the dead one's folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001", "step_000002"]


def test_prune_keeps_the_newest_k_and_removes_leftovers(tmp_path):
    tmp_path.joinpath("step_000009.tmp-dead").mkdir()            # a save that crashed before its rename
    tmp_path.joinpath("latest.tmp-dead").write_text("step_000009\n")     # a pointer write that crashed
    for step in range(1, 6):
        write_step(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000004", "step_000005"]


def test_a_resave_of_the_same_step_replaces_it(tmp_path):
    write_step(tmp_path, 4)
    final = write_step(tmp_path, 4, payload=b"redone")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000004"]
    assert (final / "a.bin").read_bytes().endswith(b"redone")
    store.verify(final)


@pytest.mark.parametrize("damage", ["truncate", "alter", "delete"])
def test_verify_names_the_damaged_file(tmp_path, damage):
    final = write_step(tmp_path, 2)
    victim = final / "b.bin"
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[:10])
        expect = f"file {victim} has 10 bytes, the manifest says {len(data)} (truncated or overwritten)"
    elif damage == "alter":
        victim.write_bytes(bytes([data[0] ^ 1]) + data[1:])          # same size, other content
        expect = f"file {victim} does not match its sha256 in meta.json"
    else:
        victim.unlink()
        expect = f"file {victim} is missing"
    with pytest.raises(CheckpointError, match=re.escape(expect)):
        store.verify(final)
    with pytest.raises(CheckpointError, match=re.escape(expect) + ".*set checkpoint.fallback=true"):
        store.find(tmp_path, fallback=False)


def test_find_falls_back_past_a_damaged_latest_saying_why(tmp_path):
    write_step(tmp_path, 1)
    final = write_step(tmp_path, 2)
    (final / "a.bin").write_bytes(b"")
    said: list[str] = []
    path, meta = store.find(tmp_path, fallback=True, say=said.append)
    assert path.name == "step_000001" and meta["step"] == 1
    assert len(said) == 1 and str(final / "a.bin") in said[0] and "falling back" in said[0]


def test_find_without_checkpoints_and_with_a_dangling_latest(tmp_path):
    assert store.find(tmp_path / "nothing", fallback=False) is None
    assert store.find_on_rank0(tmp_path / "nothing", False, Topology.single()) is None
    write_step(tmp_path, 1)
    (tmp_path / "latest").write_text("step_000005\n")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'latest'} names step_000005, which does "
                                                        "not exist")):
        store.find(tmp_path, fallback=False)          # with fallback: test_store_robustness.py


def test_meta_json_missing_or_unreadable_is_named(tmp_path):
    final = write_step(tmp_path, 1)
    (final / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(f"{final / 'meta.json'} is not valid JSON")):
        store.verify(final)
    (final / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {final} is incomplete: "
                                                        f"{final / 'meta.json'} is missing")):
        store.verify(final)


def test_the_caller_cannot_overwrite_the_store_s_own_meta_fields(tmp_path):
    with pytest.raises(ValueError, match=r"meta keys \['step'\] are written by the store itself"):
        store.write(tmp_path, 1, Topology.single(), 1, lambda tmp: None, {"step": 3})
    assert not tmp_path.joinpath("latest").exists()
