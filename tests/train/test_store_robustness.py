"""The checkpoint store (moe_dist.train.checkpoint.store) against a hostile user: nothing lost, nothing silent.

Pruning by recorded step (a fresh run into a folder of later steps, steps past 999,999), `latest` and the
checkpoint just written never pruned, another writer's live temporary folder left alone; every unreadable
`latest` or meta.json reported by name and skipped with fallback; meta.json's own checksum; a full disk
during a save (plain, torch.save's and DCP's wrappings of it, and on one rank of two) reported as such with
the previous checkpoint intact.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from moe_dist.parallel.topology import Topology
from moe_dist.train import run_lock
from moe_dist.train.checkpoint import store
from moe_dist.train.checkpoint.store import CheckpointError, CheckpointSaveError

HOST = socket.gethostname()


def write_step(root: Path, step: int, keep: int = 3, fill=None) -> Path:
    def default_fill(tmp: Path) -> None:
        for name in ("a.bin", "b.bin"):
            with store.open_synced(tmp / name) as f:
                f.write(f"{name} of step {step}".encode() * 50)
    return store.write(root, step, Topology.single(), keep, fill or default_fill, {"engine": "test"})


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def latest(root: Path) -> str:
    return (root / "latest").read_text().strip()


def reseal(meta_path: Path, **changes) -> None:
    """Edit meta.json and recompute its checksum as the store defines it (sha256 of the sorted, compact JSON
    of every other key): the edit is then only caught by the checks behind the checksum."""
    meta = json.loads(meta_path.read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    meta["meta_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    meta_path.write_text(json.dumps(meta))


# ------------------------------------------------------------------------------------------ pruning order

def test_a_save_below_later_steps_is_kept_and_latest_stays_valid(tmp_path):
    """A fresh run (resume=never) into a folder holding step 5 saves step 1 with keep=1: name order deleted
    the folder just written and left `latest` naming nothing."""
    write_step(tmp_path, 5, keep=1)
    final = write_step(tmp_path, 1, keep=1)
    assert final.is_dir() and latest(tmp_path) == "step_000001"
    assert store.find(tmp_path, fallback=False)[0] == final
    assert names(tmp_path) == ["latest", "step_000001", "step_000005"]


def test_prune_orders_by_step_past_a_million(tmp_path):
    write_step(tmp_path, 999_999, keep=1)
    final = write_step(tmp_path, 1_000_000, keep=1)
    assert names(tmp_path) == ["latest", "step_1000000"]
    assert store.find(tmp_path, fallback=False)[0] == final
    assert store.complete_checkpoints(tmp_path) == [final]


def test_prune_never_deletes_what_latest_names(tmp_path):
    for step in (1, 2, 3):
        write_step(tmp_path, step)
    (tmp_path / "latest").write_text("step_000001\n")          # e.g. pointed back by hand to redo a stretch
    store.prune(tmp_path, keep=1)
    assert names(tmp_path) == ["latest", "step_000001", "step_000003"]


def test_prune_follows_the_recorded_step_not_the_name(tmp_path):
    """A folder whose meta.json records a later step than its name says (renamed by hand) counts by its
    record: name order would prune it as the oldest."""
    old = write_step(tmp_path, 100)
    os.rename(old, tmp_path / "step_000001")
    write_step(tmp_path, 8, keep=1)
    assert names(tmp_path) == ["latest", "step_000001", "step_000008"]


def test_copies_with_other_names_are_neither_pruned_nor_found(tmp_path):
    first = write_step(tmp_path, 1)
    os.system(f"cp -r {first} {tmp_path / 'step_000001.bak'}")
    for step in (2, 3, 4):
        write_step(tmp_path, step, keep=1)
    assert names(tmp_path) == ["latest", "step_000001.bak", "step_000004"]


def test_check_fresh_start_refuses_a_folder_with_checkpoints(tmp_path):
    store.check_fresh_start(tmp_path / "new")                    # nothing there: fine
    write_step(tmp_path, 5)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint.resume=never but {tmp_path} already holds 1 "
                                                        "checkpoint(s) of another run (newest step_000005, step 5)")
                       + ".*checkpoint.resume=auto.*checkpoint.dir"):
        store.check_fresh_start(tmp_path)
    store.check_fresh_start(tmp_path / "step_000005")            # a folder without step folders inside


# --------------------------------------------------------------------------------- unreadable checkpoints

def test_find_falls_back_by_recorded_step_past_a_million(tmp_path):
    write_step(tmp_path, 999_999)
    newest = write_step(tmp_path, 1_000_000)
    (newest / "a.bin").write_bytes(b"x")
    said = []
    path, meta = store.find(tmp_path, fallback=True, say=said.append)
    assert path.name == "step_999999" and meta["step"] == 999_999
    assert str(newest / "a.bin") in said[0]


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00step", b"   \n"])
def test_an_empty_or_garbled_latest_is_named_and_falls_back(tmp_path, content):
    write_step(tmp_path, 1)
    write_step(tmp_path, 2)
    (tmp_path / "latest").write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "latest")) + ".*checkpoint.fallback=true"):
        store.find(tmp_path, fallback=False)
    said = []
    path, meta = store.find(tmp_path, fallback=True, say=said.append)
    assert path.name == "step_000002" and meta["step"] == 2
    assert str(tmp_path / "latest") in said[0]


def test_latest_naming_a_missing_folder_falls_back(tmp_path):
    write_step(tmp_path, 1)
    (tmp_path / "latest").write_text("step_000005\n")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'latest'} names step_000005, which does not "
                                                        "exist; set checkpoint.fallback=true")):
        store.find(tmp_path, fallback=False)
    said = []
    assert store.find(tmp_path, fallback=True, say=said.append)[0].name == "step_000001"
    assert "step_000005" in said[0]


def test_latest_naming_something_outside_is_refused(tmp_path):
    write_step(tmp_path, 1)
    (tmp_path / "latest").write_text("../elsewhere\n")
    with pytest.raises(CheckpointError, match="not a checkpoint folder name"):
        store.find(tmp_path, fallback=False)


def test_a_non_utf8_meta_json_is_named_and_falls_back(tmp_path):
    write_step(tmp_path, 1)
    final = write_step(tmp_path, 2)
    data = bytearray((final / "meta.json").read_bytes())
    data[5] = 0xff                                               # one flipped byte
    (final / "meta.json").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(f"{final / 'meta.json'} is not UTF-8 text")):
        store.verify(final)
    said = []
    assert store.find(tmp_path, fallback=True, say=said.append)[0].name == "step_000001"
    assert str(final / "meta.json") in said[0]


def test_an_edited_meta_json_fails_its_checksum(tmp_path):
    final = write_step(tmp_path, 2)
    meta = json.loads((final / "meta.json").read_text())
    assert len(meta["meta_sha256"]) == 64 and meta["format"] == store.FORMAT
    meta["engine"] = "edited"
    (final / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=re.escape(f"{final / 'meta.json'} does not match its own meta_sha256")):
        store.verify(final)


def test_an_edited_step_does_not_make_the_fallback_skip_valid_checkpoints(tmp_path):
    """step_000003's meta.json edited to say step 2 (its checksum then fails): the fallback takes step_000002,
    the newest valid one, not step_000001 (the edited value must not decide what counts as previous)."""
    for step in (1, 2, 3):
        final = write_step(tmp_path, step)
    meta = json.loads((final / "meta.json").read_text())
    meta["step"] = 2
    (final / "meta.json").write_text(json.dumps(meta))
    path, found = store.find(tmp_path, fallback=True, say=lambda line: None)
    assert path.name == "step_000002" and found["step"] == 2


@pytest.mark.parametrize("change,expect", [
    (dict(step=None), "has no valid step (None)"),
    (dict(step="2"), "has no valid step ('2')"),
    (dict(step=3), "says step 3 but the folder is named step_000002"),
    (dict(files=None), "has no file manifest"),
    (dict(files={"a.bin": {"bytes": 3}}), "entry for a.bin lacks its bytes or sha256"),
    (dict(files={"../../etc/passwd": {"bytes": 3, "sha256": "0" * 64}}), "which is not a file inside"),
])
def test_a_meta_json_missing_or_wrong_keys_is_named_and_falls_back(tmp_path, change, expect):
    write_step(tmp_path, 1)
    final = write_step(tmp_path, 2)
    reseal(final / "meta.json", **change)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {final} is corrupt: {final / 'meta.json'}")
                       + ".*" + re.escape(expect)):
        store.verify(final)
    assert store.find(tmp_path, fallback=True, say=lambda s: None)[0].name == "step_000001"


def test_meta_json_that_is_not_an_object_is_named(tmp_path):
    final = write_step(tmp_path, 1)
    (final / "meta.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="holds a JSON list, not an object"):
        store.verify(final)


def test_required_caller_keys_are_checked(tmp_path):
    final = write_step(tmp_path, 1)
    assert store.verify(final, require=("engine",))["engine"] == "test"
    with pytest.raises(CheckpointError, match="lacks 'layout'"):
        store.find(tmp_path, fallback=False, require=("layout",))


def test_format_1_checkpoints_without_a_checksum_still_load(tmp_path):
    final = write_step(tmp_path, 1)
    meta = json.loads((final / "meta.json").read_text())
    del meta["meta_sha256"]
    meta["format"] = 1
    (final / "meta.json").write_text(json.dumps(meta))
    assert store.verify(final)["step"] == 1


def test_exclude_skips_a_checkpoint_the_caller_could_not_load(tmp_path):
    write_step(tmp_path, 1)
    second = write_step(tmp_path, 2)
    assert store.find(tmp_path, fallback=True, say=lambda s: None, exclude=[second])[0].name == "step_000001"


# --------------------------------------------------------------------------------------- full disk

def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _assert_intact(root: Path, failed_step: int) -> None:
    assert names(root) == ["latest", "step_000001"]              # no temporary folder, no new step folder
    assert latest(root) == "step_000001"
    assert store.find(root, fallback=False)[0].name == "step_000001"
    assert not (root / store.step_dir_name(failed_step)).exists()


def _raise_torch_save_enospc(tmp: Path) -> None:
    """torch.save into a file whose writes fail as on a full disk: torch reports 'unexpected pos N vs M'."""
    class Full:
        def __init__(self):
            self.n = 0

        def write(self, b):
            self.n += len(b)
            if self.n > 600:
                raise _enospc()
            return len(b)

        def flush(self):
            pass
    (tmp / "a.bin").write_bytes(b"partial")
    torch.save({"w": torch.randn(1000)}, Full())


def _raise_dcp_wrapped_enospc(tmp: Path) -> None:
    """DCP's own wrapping of a rank's error: CheckpointException{rank: (RuntimeError, trace)}, the OSError
    only as the RuntimeError's context (what dcp.save raised on a real full disk)."""
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception
    try:
        try:
            raise _enospc()
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as e:
        raise CheckpointException("write", {0: _wrap_exception(e)})


@pytest.mark.parametrize("fill", ["plain", "torch_save", "dcp"])
def test_a_full_disk_is_reported_and_the_previous_checkpoint_stays(tmp_path, fill):
    write_step(tmp_path, 1)

    def plain(tmp: Path) -> None:
        (tmp / "a.bin").write_bytes(b"partial")
        raise _enospc()
    fills = {"plain": plain, "torch_save": _raise_torch_save_enospc, "dcp": _raise_dcp_wrapped_enospc}
    with pytest.raises(CheckpointSaveError) as info:
        write_step(tmp_path, 2, fill=fills[fill])
    msg = str(info.value)
    ranks = " (on rank 0)" if fill == "dcp" else ""
    assert msg.startswith(f"checkpoint {tmp_path / 'step_000002'} was not saved: no space left on device{ranks} "
                          f"while writing its files into {tmp_path / 'step_000002.tmp-'}")
    assert f"the previous checkpoint {tmp_path / 'step_000001'} is intact" in msg
    assert "point checkpoint.dir at a filesystem with room" in msg and "unexpected pos" not in msg
    assert "\n" not in msg
    _assert_intact(tmp_path, 2)


def test_a_full_disk_under_dcp_save_is_reported(tmp_path, monkeypatch):
    """The real DCP path (dcp_io.save): the shard file's fsync fails with ENOSPC inside DCP's writer."""
    from checkpoint_helpers import make_cfg, tiny
    from moe_dist.models.gpt import MoEGPT
    from moe_dist.train.checkpoint import dcp_io
    from moe_dist.train.trainer import build_optimizer
    cfg = make_cfg(tiny(ckpt_dir=str(tmp_path)))
    topo = Topology.single()
    model = MoEGPT(cfg, topo)
    opt = build_optimizer(model, cfg.train)
    dcp_io.save(tmp_path, 1, model, opt, cfg, topo, keep=3)
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".distcp"):
            raise _enospc()
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointSaveError, match=re.escape(f"checkpoint {tmp_path / 'step_000002'} was not saved: "
                                                            "no space left on device")):
        dcp_io.save(tmp_path, 2, model, opt, cfg, topo, keep=3)
    monkeypatch.undo()
    _assert_intact(tmp_path, 2)


@pytest.mark.parametrize("target", ["latest", "meta.json"])
def test_a_full_disk_while_publishing_puts_everything_back(tmp_path, monkeypatch, target):
    write_step(tmp_path, 1)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == target:
            raise _enospc()
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointSaveError, match="no space left on device while publishing it; the previous "
                                                  "checkpoint .*step_000001 is intact"):
        write_step(tmp_path, 2)
    monkeypatch.undo()
    _assert_intact(tmp_path, 2)


def test_a_failed_resave_of_the_same_step_restores_the_old_folder(tmp_path, monkeypatch):
    first = write_step(tmp_path, 1)
    before = (first / "a.bin").read_bytes()
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "latest":
            raise _enospc()
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointSaveError):
        write_step(tmp_path, 1, fill=lambda tmp: (tmp / "a.bin").write_bytes(b"new"))
    monkeypatch.undo()
    assert names(tmp_path) == ["latest", "step_000001"] and (first / "a.bin").read_bytes() == before
    store.verify(first)


def _one_rank_fails(rank, world, root):
    import errno as _errno

    from moe_dist.parallel.topology import ParallelDims
    from moe_dist.train.checkpoint import store as _store
    topo = Topology.build(ParallelDims(world=world), timeout_s=30)

    def fill(tmp):
        with _store.open_synced(Path(tmp) / f"rank{rank}.bin") as f:
            f.write(b"x" * 100)
    plain = Path(root) / "plain"
    _store.write(plain, 1, topo, 3, fill, {"engine": "test"})

    def fails_on_rank1(tmp):
        if rank == 1:
            raise OSError(_errno.ENOSPC, "No space left on device")
        fill(tmp)
    out = {}
    try:
        _store.write(plain, 2, topo, 3, fails_on_rank1, {"engine": "test"})
    except _store.CheckpointSaveError as e:
        out["plain"] = str(e)
    out["dcp"] = _dcp_save_fails_on_rank1(rank, world, Path(root) / "dcp")
    return out


def _dcp_save_fails_on_rank1(rank, world, root):
    """A real 2-rank DCP save whose rank-1 shard hits a full disk: DCP gathers the error to every rank."""
    import errno as _errno
    import os as _os

    from checkpoint_helpers import build_topo, make_cfg, tiny
    from moe_dist.models.gpt import MoEGPT
    from moe_dist.train.checkpoint import dcp_io
    from moe_dist.train.checkpoint import store as _store
    from moe_dist.train.trainer import build_optimizer
    cfg = make_cfg(tiny(ep=2, ckpt_dir=str(root)))
    topo = build_topo(cfg, world)
    model = MoEGPT(cfg, topo)
    opt = build_optimizer(model, cfg.train)
    dcp_io.save(root, 1, model, opt, cfg, topo, keep=3)
    real_fsync = _os.fsync

    def fsync(fd):
        if rank == 1 and _os.readlink(f"/proc/self/fd/{fd}").endswith(".distcp"):
            raise OSError(_errno.ENOSPC, "No space left on device")
        real_fsync(fd)
    _os.fsync = fsync
    try:
        dcp_io.save(root, 2, model, opt, cfg, topo, keep=3)
    except _store.CheckpointSaveError as e:
        return str(e)
    finally:
        _os.fsync = real_fsync
    return "no error"


def test_one_rank_out_of_space_fails_every_rank_without_a_hang(tmp_path):
    results = run_ranks(_one_rank_fails, 2, str(tmp_path), timeout=300, collective_timeout_s=30)
    for r in results:
        assert "rank 1 writing its files into" in r["plain"] and "no space left on device" in r["plain"], results
        assert r["dcp"].startswith(f"checkpoint {tmp_path / 'dcp' / 'step_000002'} was not saved: no space left on "
                                   "device (on rank 1) while writing its files into"), results
    _assert_intact(tmp_path / "plain", 2)
    _assert_intact(tmp_path / "dcp", 2)


# ------------------------------------------------------------------------------------ temporary folders

@pytest.fixture
def live_pid():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p.pid
    p.kill()
    p.wait()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_prune_leaves_a_live_writers_temporary_folder_alone(tmp_path, live_pid):
    theirs = tmp_path / f"step_000009{store.TMP_MARK}0123456789-{live_pid}-{HOST}"
    theirs.mkdir(parents=True)
    (theirs / "half.distcp").write_bytes(b"being written")
    dead = tmp_path / f"step_000008{store.TMP_MARK}0123456789-{_dead_pid()}-{HOST}"
    dead.mkdir()
    legacy = tmp_path / "step_000007.tmp-abcdef0123"               # named by an older version: nobody's
    legacy.mkdir()
    write_step(tmp_path, 1)
    assert theirs.is_dir() and (theirs / "half.distcp").read_bytes() == b"being written"
    assert not dead.exists() and not legacy.exists()


def test_prune_removes_another_host_s_leftover_only_when_older_than_our_lock(tmp_path):
    other = tmp_path / f"step_000009{store.TMP_MARK}0123456789-4242-some-other-host.example"
    other.mkdir(parents=True)
    write_step(tmp_path, 1)
    assert other.is_dir()                     # no lock held: a live run elsewhere may be writing it
    with run_lock.hold(tmp_path, field="checkpoint.dir"):
        write_step(tmp_path, 2)
        assert not other.exists()             # it predates the lock we hold: its writer is gone
        newer = tmp_path / f"step_000010{store.TMP_MARK}0123456789-4242-some-other-host.example"
        newer.mkdir()
        write_step(tmp_path, 3)
        assert newer.is_dir()                 # made while we hold the lock: not ours to judge


# ---------------------------------------------------------------- rank files (the DeepSpeed engine's layout)

def _rank_files(step: int):
    def fill(tmp: Path) -> None:
        for rank in range(2):
            with store.open_synced(tmp / f"rank{rank:05d}.pt") as f:
                torch.save({"model": {"w": torch.full((64,), float(step))}, "rank": rank}, f)
    return fill


def test_a_truncated_rank_file_is_named_and_skipped_with_fallback(tmp_path):
    write_step(tmp_path, 1, fill=_rank_files(1))
    second = write_step(tmp_path, 2, fill=_rank_files(2))
    victim = second / "rank00001.pt"
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {second} is corrupt: file {victim} has 200 "
                                                        "bytes") + ".*checkpoint.fallback=true"):
        store.find(tmp_path, fallback=False)
    said = []
    path, meta = store.find(tmp_path, fallback=True, say=said.append)
    assert path.name == "step_000001" and str(victim) in said[0]
    from moe_dist.train.checkpoint import load_weights_only
    assert torch.equal(load_weights_only(path / "rank00001.pt")["model"]["w"], torch.full((64,), 1.0))


@pytest.mark.parametrize("damage,expect", [
    ("truncate", "failed reading zip archive: failed finding central directory): it is truncated or damaged"),
    ("empty", "(the file ends before its data): it is truncated or damaged"),
    ("missing", "(No such file or directory): it is missing"),
    ("garbage", "refused by weights-only loading (Unsupported operand"),
])
def test_weights_only_loading_names_a_damaged_file(tmp_path, damage, expect):
    """A rank file damaged after it verified (or loaded without verify) is a CheckpointError naming it, not
    torch's RuntimeError or EOFError."""
    from moe_dist.train.checkpoint import load_weights_only
    f = tmp_path / "rank00000.pt"
    torch.save({"w": torch.ones(256)}, f)
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[:len(data) // 2])
    elif damage == "empty":
        f.write_bytes(b"")
    elif damage == "missing":
        f.unlink()
    else:
        f.write_bytes(b"garbage" * 20)
    with pytest.raises(CheckpointError, match=re.escape(str(f)) + r"[: ].*" + re.escape(expect)):
        load_weights_only(f)


def test_missing_dcp_metadata_is_named(tmp_path):
    from moe_dist.train.checkpoint.safe_load import SafeReader
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / '.metadata'}: unreadable checkpoint metadata "
                                                        "(No such file or directory)")):
        SafeReader(tmp_path).read_metadata()


def test_a_bug_in_the_writer_keeps_its_own_error_and_leaves_nothing_behind(tmp_path):
    write_step(tmp_path, 1)

    def buggy(tmp: Path) -> None:
        (tmp / "a.bin").write_bytes(b"partial")
        raise TypeError("a bug, not the disk")
    with pytest.raises(TypeError, match="a bug, not the disk"):
        write_step(tmp_path, 2, fill=buggy)
    _assert_intact(tmp_path, 2)


def test_a_failed_fsync_after_latest_moved_is_not_reported_as_a_lost_save(tmp_path, monkeypatch):
    """`latest` already names the new folder when the root's closing fsync fails: nothing is rolled back (that
    would leave `latest` naming a missing folder) and the message says the checkpoint was saved."""
    write_step(tmp_path, 1)
    real_fsync_dir = store._fsync_dir

    def fsync_dir(path):
        if (tmp_path / "latest").read_text().strip() == "step_000002":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync_dir(path)
    monkeypatch.setattr(store, "_fsync_dir", fsync_dir)
    with pytest.raises(CheckpointSaveError, match=r"step_000002 was saved and .*latest names it, but making the "
                                                  r"rename durable failed \(OSError: .*Input/output error\)"):
        write_step(tmp_path, 2)
    monkeypatch.undo()
    assert latest(tmp_path) == "step_000002" and store.find(tmp_path, fallback=False)[0].name == "step_000002"


def test_prune_never_deletes_a_step_named_folder_it_did_not_publish(tmp_path):
    """An output folder that happens to be named like a checkpoint (no meta.json) is someone's data."""
    mine = tmp_path / "step_000000"
    mine.mkdir()
    (mine / "metrics.jsonl").write_text("{}\n")
    for step in (1, 2, 3):
        write_step(tmp_path, step, keep=1)
    assert (mine / "metrics.jsonl").exists() and names(tmp_path) == ["latest", "step_000000", "step_000003"]
