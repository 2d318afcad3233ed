"""Tests for moe_dist.train.data: preparation, splitting and deterministic batching."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_dist.config import ConfigError
from moe_dist.train.data import Batcher, TokenDataset, decode, encode, prepare


def test_encode_decode_roundtrip() -> None:
    text = "def f(x):\n    return 'héllo ✓'\n"
    tok = encode(text)
    assert tok.dtype == np.uint8 and len(tok) == len(text.encode("utf-8"))
    assert decode(tok) == text
    assert decode(torch.from_numpy(tok.astype(np.int64))) == text


def test_prepare_dir_and_jsonl_roundtrip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha text")
    (src / "sub" / "b.py").write_text("def beta(): pass")
    (src / "ignored.bin").write_bytes(b"\xff\xfe nope")
    jl = tmp_path / "docs.jsonl"
    jl.write_text(json.dumps({"text": "gamma ünïcode"}) + "\n\n" + json.dumps({"text": "delta", "id": 2}) + "\n")
    out = tmp_path / "out" / "corpus.bin"
    meta = prepare([src, jl], out)
    expected = b"\n\n".join([b"alpha text", b"def beta(): pass", "gamma ünïcode".encode(), b"delta"])
    assert out.read_bytes() == expected
    assert meta["tokens"] == len(expected) and meta["dtype"] == "uint8" and meta["vocab_size"] == 256
    assert json.loads(out.with_suffix(".json").read_text()) == meta
    # Atomic write: nothing temporary is left behind.
    assert not out.with_suffix(".tmp").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["corpus.bin", "corpus.json"]


def test_prepare_max_bytes_truncates(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("x" * 1000)
    meta = prepare([f], tmp_path / "o.bin", max_bytes=100)
    assert meta["tokens"] == 100 and (tmp_path / "o.bin").stat().st_size == 100


def test_jsonl_missing_text_names_file_and_line(tmp_path: Path) -> None:
    jl = tmp_path / "bad.jsonl"
    jl.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    out = tmp_path / "o.bin"
    with pytest.raises(ValueError, match=r"bad\.jsonl:2.*text"):
        prepare([jl], out)
    assert not out.exists() and not out.with_suffix(".tmp").exists()


def test_missing_source_raises(tmp_path: Path) -> None:
    # A ConfigError (exit 2, one line from the CLI), raised before anything is written.
    with pytest.raises(ConfigError, match=r"nope\.txt does not exist"):
        prepare([tmp_path / "nope.txt"], tmp_path / "o.bin")
    assert list(tmp_path.iterdir()) == []


def test_prepare_stdlib_default(tmp_path: Path) -> None:
    out = tmp_path / "stdlib.bin"
    meta = prepare(None, out, max_bytes=200_000)
    data = out.read_bytes()
    assert meta["tokens"] == len(data) == 200_000
    assert b"def " in data and b"import " in data
    # Deterministic: the same interpreter always yields the same corpus.
    prepare(None, tmp_path / "again.bin", max_bytes=200_000)
    assert (tmp_path / "again.bin").read_bytes() == data


def _token_file(tmp_path: Path, n: int = 1000) -> Path:
    p = tmp_path / "tok.bin"
    p.write_bytes((np.arange(n) % 251).astype(np.uint8).tobytes())
    return p


def test_split_sizes(tmp_path: Path) -> None:
    p = _token_file(tmp_path, 1000)
    train = TokenDataset(p, seq_len=16, split="train", val_fraction=0.1)
    val = TokenDataset(p, seq_len=16, split="val", val_fraction=0.1)
    assert len(train.data) == 900 and len(val.data) == 100
    assert len(train) == 900 - 16
    # The val split is the tail of the file, disjoint from train.
    assert np.array_equal(np.concatenate([train.data, val.data]), np.fromfile(p, dtype=np.uint8))


def test_split_too_short(tmp_path: Path) -> None:
    p = _token_file(tmp_path, 100)
    with pytest.raises(ValueError, match="seq_len"):
        TokenDataset(p, seq_len=16, split="val", val_fraction=0.1)


def test_missing_file_mentions_prepare_data(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prepare-data") as e:
        TokenDataset(tmp_path / "absent.bin", seq_len=8)
    assert "absent.bin" in str(e.value)


def test_batcher_deterministic_and_shifted(tmp_path: Path) -> None:
    ds = TokenDataset(_token_file(tmp_path, 5000), seq_len=32, split="train", val_fraction=0.05)
    b0 = Batcher(ds, batch_size=4, seed=123, rank=0, world=2)
    x, y = b0.get_batch(7)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.long
    # y is x shifted by one token, taken from the file.
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal((x[:, :1] + 1) % 251, y[:, :1])
    # Same (seed, step, rank) gives the same batch, even from a fresh Batcher (exact resume).
    x2, y2 = Batcher(ds, batch_size=4, seed=123, rank=0, world=2).get_batch(7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # Different step, rank or seed gives a different batch.
    assert not torch.equal(x, b0.get_batch(8)[0])
    assert not torch.equal(x, Batcher(ds, 4, seed=123, rank=1, world=2).get_batch(7)[0])
    assert not torch.equal(x, Batcher(ds, 4, seed=124, rank=0, world=2).get_batch(7)[0])


def test_batcher_state_dict(tmp_path: Path) -> None:
    ds = TokenDataset(_token_file(tmp_path), seq_len=8)
    a, b = Batcher(ds, 2, seed=1), Batcher(ds, 2, seed=99)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.get_batch(3)[0], b.get_batch(3)[0])
    with pytest.raises(ValueError):
        Batcher(ds, 2, seed=0, rank=2, world=2)
