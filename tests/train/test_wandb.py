"""MetricsLogger's Weights & Biases run, in offline mode (no network): the run's transaction log on disk holds the
project, the name, the config and every logged step; a missing wandb package is a ConfigError before training."""
from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest
import torch

from moe_dist.config import Config, ConfigError
from moe_dist.train import metrics
from moe_dist.train.metrics import MetricsLogger, check_wandb


def _records(run_file: Path):
    """The protobuf records of a wandb transaction log (`run-<id>.wandb`): a 7-byte file header, then 32 KiB
    blocks of chunks, each a 7-byte header (checksum u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)
    and its bytes; a block tail shorter than a header is padding."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:          # zero padding at the end of a block
            pos += block - pos % block
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec


def _history(run_dir: Path) -> tuple[list[dict], dict]:
    [run_file] = run_dir.glob("run-*.wandb")
    rows, info = [], {}
    for rec in _records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in rec.history.item if not (item.key or item.nested_key[0]).startswith("_")})
        elif kind == "run":
            info.update(project=rec.run.project, name=rec.run.display_name, id=rec.run.run_id,
                        config={u.key: json.loads(u.value_json) for u in rec.run.config.update})
    return rows, info


needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")


@pytest.fixture
def offline(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    return tmp_path / "wb"


@needs_wandb
def test_offline_run_holds_config_steps_eval_and_memory(tmp_path: Path, offline: Path) -> None:
    out = tmp_path / "my-run"
    cfg = Config()
    m = MetricsLogger(out, enabled=True, moe_layer_ids=[1, 3], tensorboard=False, wandb_project="moe-test", config=cfg)
    for s in range(3):
        m.log_step(s, {"loss": 5.0 - s, "lr": 1e-3, "skipped": False, "grad_norm": float("nan")},
                   torch.tensor([[1, 1, 1, 5], [2, 2, 2, 2]]))
    m.log_step(3, {"val_loss": 4.5}, kind="eval")
    m.log_step(0, {"weights": 1000, "optimizer": {"moments": 800, "master": 400}}, kind="memory")
    m.close()
    [run_dir] = offline.glob("wandb/offline-run-*")
    rows, info = _history(run_dir)
    assert info["project"] == "moe-test" and info["name"] == "my-run"
    assert info["config"]["model"]["vocab_size"] == cfg.model.vocab_size
    assert info["config"]["train"]["lr"] == cfg.train.lr
    train = [r for r in rows if "train/loss" in r]
    assert [(r["step"], r["train/loss"]) for r in train] == [(0, 5.0), (1, 4.0), (2, 3.0)]
    assert "train/grad_norm" not in train[0] and train[0]["train/skipped"] == 0     # non-finite left out
    assert train[0]["train/expert_imbalance/layer1"] == pytest.approx(2.5)        # 5 / mean(1,1,1,5)
    assert train[0]["train/expert_imbalance/layer3"] == pytest.approx(1.0)
    assert [(r["step"], r["eval/val_loss"]) for r in rows if "eval/val_loss" in r] == [(3, 4.5)]
    [mem] = [r for r in rows if "memory/weights" in r]
    assert mem == {"step": 0, "memory/weights": 1000, "memory/optimizer/moments": 800,
                   "memory/optimizer/master": 400}
    # The JSONL is written as before, beside the run.
    assert len(metrics.load_records(out / "metrics.jsonl")) == 3
    assert (out / metrics.WANDB_ID_NAME).read_text().strip() == info["id"]


@needs_wandb
def test_run_files_go_to_the_output_folder_without_wandb_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    m = MetricsLogger(tmp_path / "run", enabled=True, tensorboard=False, wandb_project="p")
    m.log_step(0, {"loss": 1.0})
    m.close()
    [run_dir] = (tmp_path / "run").glob("wandb/offline-run-*")
    rows, _ = _history(run_dir)
    assert rows == [{"step": 0, "train/loss": 1.0}]


@needs_wandb
def test_resume_continues_the_same_run(tmp_path: Path, offline: Path) -> None:
    out = tmp_path / "run"
    m = MetricsLogger(out, enabled=True, tensorboard=False, wandb_project="p")
    m.log_step(0, {"loss": 1.0})
    m.close()
    first = (out / metrics.WANDB_ID_NAME).read_text().strip()
    m = MetricsLogger(out, enabled=True, tensorboard=False, wandb_project="p", resume_step=1)
    m.log_step(1, {"loss": 0.5})
    m.close()
    assert (out / metrics.WANDB_ID_NAME).read_text().strip() == first
    ids = {_history(d)[1]["id"] for d in offline.glob("wandb/offline-run-*")}
    assert ids == {first}
    # A fresh (not resumed) run into the same folder starts a new wandb run.
    m = MetricsLogger(out, enabled=True, tensorboard=False, wandb_project="p")
    m.close()
    assert (out / metrics.WANDB_ID_NAME).read_text().strip() != first


def test_disabled_rank_and_unset_project_start_no_run(tmp_path: Path, monkeypatch) -> None:
    def boom(*a, **k):
        raise AssertionError("no wandb run expected")
    monkeypatch.setattr(metrics, "_wandb_run", boom)
    MetricsLogger(tmp_path / "a", enabled=False, wandb_project="p").close()
    m = MetricsLogger(tmp_path / "b", enabled=True, tensorboard=False)
    m.log_step(0, {"loss": 1.0})
    m.close()
    assert not (tmp_path / "b" / metrics.WANDB_ID_NAME).exists()


def test_missing_wandb_is_a_config_error_naming_the_extra(tmp_path: Path, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train\.wandb_project='p' but the wandb package is not installed; "
                                          r"pip install moe_dist\[wandb\]"):
        check_wandb("p")
    check_wandb(None)
    # The constructor checks on every rank, before it writes anything.
    for enabled in (True, False):
        with pytest.raises(ConfigError, match=r"moe_dist\[wandb\]"):
            MetricsLogger(tmp_path / "run", enabled=enabled, wandb_project="p")
    assert not (tmp_path / "run").exists()


@needs_wandb
def test_a_run_that_cannot_start_is_a_config_error(tmp_path: Path, monkeypatch) -> None:
    import wandb

    def refuse(*a, **k):
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")
    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(ConfigError, match=r"wandb could not start a run \(api_key not configured.*WANDB_MODE=offline"):
        MetricsLogger(tmp_path / "run", enabled=True, tensorboard=False, wandb_project="p")


@needs_wandb
def test_trainer_logs_to_wandb(tmp_path: Path, offline: Path) -> None:
    """The Trainer hands train.wandb_project and the config to the logger: the offline run holds the train and
    eval rows and the config's sections."""
    from moe_dist.train.data import prepare
    from moe_dist.train.trainer import Trainer
    from trainer_helpers import make_cfg, tiny
    prepare(None, tmp_path / "tok.bin", max_bytes=50_000)
    raw = tiny()
    raw["data"] = {"path": str(tmp_path / "tok.bin")}
    cfg = make_cfg(raw, out_dir=str(tmp_path / "run"), steps=3, eval_every=2, eval_batches=1,
                   wandb_project="proj")
    Trainer(cfg).fit(progress=False)
    [run_dir] = offline.glob("wandb/offline-run-*")
    rows, info = _history(run_dir)
    assert info["project"] == "proj" and info["name"] == "run" and info["config"]["train"]["steps"] == 3
    assert [r["step"] for r in rows if "train/loss" in r] == [0, 1, 2]
    assert [r["step"] for r in rows if "eval/val_loss" in r] == [2, 3]
