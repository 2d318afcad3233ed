"""Bad data input refused with one clear ConfigError: prepare-data outputs that collide, a --max-bytes below 1,
token files whose vocabulary or splits do not fit the config, and sidecars that are missing, unreadable or stale."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moe_dist import cli
from moe_dist.config import Config, ConfigError, apply_overrides
from moe_dist.train.data import TokenDataset, check_data, prepare, read_meta


def _text(tmp_path: Path, n: int = 400) -> Path:
    src = tmp_path / "a.txt"
    rng = np.random.default_rng(0)          # varied text: a BPE must not fold it into a handful of tokens
    src.write_text("".join(chr(c) for c in rng.choice(list(b"abcdefgh ,.\n"), size=n)))
    return src


# ---------------------------------------------------------------------------------------------- prepare-data

def test_out_named_json_would_be_its_own_sidecar(tmp_path: Path) -> None:
    out = tmp_path / "X.json"
    with pytest.raises(ConfigError, match=r"--out=.*X\.json: its metadata file would be .*X\.json.*--out=.*X\.bin"):
        prepare([_text(tmp_path)], out)
    assert not out.exists()


def test_output_may_not_overwrite_an_input(tmp_path: Path) -> None:
    src = _text(tmp_path)
    before = src.read_bytes()
    with pytest.raises(ConfigError, match=r"token file .*a\.txt would overwrite the input"):
        prepare([src], src)
    # The sidecar of `docs.bin` is docs.json: refused when that is a source.
    (tmp_path / "docs.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"metadata file .*docs\.json would overwrite the input"):
        prepare([src, tmp_path / "docs.json"], tmp_path / "docs.bin")
    # The tokenizer being read, or the one to be trained.
    with pytest.raises(ConfigError, match=r"token file .*a\.txt would overwrite the input"):
        prepare([tmp_path / "docs.json"], src, tokenizer=src)
    assert src.read_bytes() == before and not (tmp_path / "docs.bin").exists()


def test_output_in_a_source_folder_with_a_text_suffix(tmp_path: Path) -> None:
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a.txt").write_text("some text " * 10)
    with pytest.raises(ConfigError, match=r"source folder .*src .*read as a document"):
        prepare([folder], folder / "tokens.txt")
    prepare([folder], folder / "tokens.bin")          # a .bin there is never read as text


def test_out_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--out=.* is a folder"):
        prepare([_text(tmp_path)], tmp_path)


@pytest.mark.parametrize("n", [0, -5])
def test_max_bytes_below_one_is_refused(tmp_path: Path, n: int) -> None:
    out = tmp_path / "o.bin"
    with pytest.raises(ConfigError, match=rf"--max-bytes={n}: must be at least 1"):
        prepare([_text(tmp_path)], out, max_bytes=n)
    assert not out.exists()


def test_cli_bad_prepare_input_is_exit_2_with_one_line(capsys, tmp_path: Path) -> None:
    src = _text(tmp_path)
    assert cli.main(["prepare-data", str(src), "--out", str(tmp_path / "o.bin"), "--max-bytes", "-5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["moe-dist: config error: --max-bytes=-5: must be at least 1; leave it out to read every source "
                   "whole"]
    assert cli.main(["prepare-data", str(src), "--out", str(tmp_path / "o.json")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert cli.main(["prepare-data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o.bin")]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o.bin").exists() and not (tmp_path / "o.json").exists()


# ------------------------------------------------------------------------------------------------ check_data

def _cfg(path: Path, *overrides: str) -> Config:
    return apply_overrides(Config(), [f"--data.path={path}", "--train.seq_len=16", *overrides])


def _byte_file(tmp_path: Path, n: int) -> Path:
    p = tmp_path / "tok.bin"
    p.write_bytes((np.arange(n) % 251).astype(np.uint8).tobytes())
    return p


def test_byte_data_needs_a_vocabulary_of_256(tmp_path: Path) -> None:
    p = _byte_file(tmp_path, 1000)                             # no sidecar: bytes, vocabulary 256
    check_data(_cfg(p, "--model.vocab_size=256"))
    check_data(_cfg(p, "--model.vocab_size=512"))              # a larger embedding is fine (unused rows)
    with pytest.raises(ConfigError, match=r"data\.path=.*256-token vocabulary \(bytes\) but model\.vocab_size=200 "
                                          r".*--model\.vocab_size=256"):
        check_data(_cfg(p, "--model.vocab_size=200"))


def test_tokenizer_vocabulary_larger_than_the_model_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    out = tmp_path / "tok.bin"
    prepare([_text(tmp_path, 3000)], out, train_tokenizer=300)
    check_data(_cfg(out, "--model.vocab_size=300"))
    with pytest.raises(ConfigError, match=r"300-token vocabulary \(tokenizer .*tok\.tokenizer\.json\) but "
                                          r"model\.vocab_size=256 .*--model\.vocab_size=300"):
        check_data(_cfg(out, "--model.vocab_size=256"))


def test_trainer_refuses_a_vocabulary_mismatch_before_building_the_model(tmp_path: Path) -> None:
    # Without the check the embedding lookup fails with an IndexError at step 0.
    from moe_dist.train.trainer import Trainer
    p = _byte_file(tmp_path, 1000)
    cfg = _cfg(p, "--model.vocab_size=128", "--model.dim=16", "--model.n_layers=1", "--model.n_heads=2",
               f"--train.out_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match=r"model\.vocab_size=128"):
        Trainer(cfg)


def test_splits_too_small_name_the_file_split_sizes_and_fix(tmp_path: Path) -> None:
    p = _byte_file(tmp_path, 100)            # val tail: 5 tokens < seq_len + 1 = 17
    with pytest.raises(ConfigError, match=r"data\.path=.*tok\.bin: the val split holds 5 tokens \(of 100, "
                                          r"data\.val_fraction=0\.05\), fewer than .* 17; .*data\.val_fraction=0"):
        check_data(_cfg(p))
    with pytest.raises(ConfigError, match=r"the train split holds 10 tokens \(of 10, .*\).* 17"):
        check_data(_cfg(_byte_file(tmp_path, 10), "--data.val_fraction=0"))


def test_val_fraction_zero_means_no_val_split(tmp_path: Path) -> None:
    p = _byte_file(tmp_path, 20)
    check_data(_cfg(p, "--data.val_fraction=0"))            # 20 train tokens hold a window of 17
    assert len(TokenDataset(p, 16, "train", 0.0).data) == 20
    with pytest.raises(ValueError, match="no val split when val_fraction is 0"):
        TokenDataset(p, 16, "val", 0.0)


def test_missing_token_file_names_data_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.path=.*absent\.bin does not exist; .*prepare-data --out"):
        check_data(_cfg(tmp_path / "absent.bin"))


# ------------------------------------------------------------------------------------------------- sidecars

def test_unreadable_or_stale_sidecars(tmp_path: Path) -> None:
    out = tmp_path / "tok.bin"
    prepare([_text(tmp_path)], out)
    side = out.with_suffix(".json")
    good = side.read_text()
    side.write_text("{torn")
    with pytest.raises(ConfigError, match=r"data\.path=.*metadata file .*tok\.json is unreadable.*prepare-data"):
        check_data(_cfg(out))
    side.write_text(json.dumps(json.loads(good) | {"dtype": "float32"}))
    with pytest.raises(ConfigError, match=r"dtype='float32'"):
        TokenDataset(out, 16)
    # A sidecar from another run (different token count): refused instead of misreading the ids.
    side.write_text(json.dumps(json.loads(good) | {"dtype": "uint16", "tokens": 10}))
    with pytest.raises(ConfigError, match=r"holds 400 bytes but .* says 10 uint16 tokens"):
        TokenDataset(out, 16)
    side.write_text(json.dumps(json.loads(good) | {"vocab_size": 1000}))
    with pytest.raises(ConfigError, match=r"vocab_size=1000 which uint8 cannot hold"):
        read_meta(out)


def test_missing_sidecar_of_tokenized_data_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    out = tmp_path / "tok.bin"
    prepare([_text(tmp_path, 3000)], out, train_tokenizer=300)
    out.with_suffix(".json").unlink()
    with pytest.raises(ConfigError, match=r"metadata file .*tok\.json is missing.*width is unknown"):
        check_data(_cfg(out, "--model.vocab_size=300"))


def test_token_file_named_json_is_refused_at_train(tmp_path: Path) -> None:
    p = tmp_path / "tok.json"
    p.write_bytes(bytes(100))
    with pytest.raises(ConfigError, match=r"named \*\.json is its own metadata file"):
        check_data(_cfg(p))


def test_jsonl_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    jl = tmp_path / "bad.jsonl"
    jl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 14\)"):
        prepare([jl], tmp_path / "o.bin")
    assert not (tmp_path / "o.bin").exists()
