"""prepare-data with Hugging Face tokenizers: a trained byte-level BPE, a tokenizer.json file or a saved model's
folder, uint16/uint32 token files, the document separator, and reading them back through TokenDataset."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_dist import cli
from moe_dist.config import ConfigError
from moe_dist.train.data import Batcher, TokenDataset, prepare, read_meta
from moe_dist.train.tokenizer import EOT, train_bpe

tokenizers = pytest.importorskip("tokenizers")

DOCS = ["def alpha(x):\n    return x + 1\n", "Le café coûte 3 € — ünïcode ✓\n\nsecond paragraph",
        "class Beta:\n    pass\n" * 20, "import os\nimport sys\n" * 10]


def _corpus(tmp_path: Path) -> Path:
    jl = tmp_path / "docs.jsonl"
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    return jl


def _split_on(ids: np.ndarray, sep: int) -> list[list[int]]:
    docs, cur = [], []
    for i in ids.tolist():
        if i == sep:
            docs.append(cur)
            cur = []
        else:
            cur.append(i)
    return docs + [cur]


def test_trained_bpe_roundtrips_documents_as_uint16(tmp_path: Path) -> None:
    out = tmp_path / "data" / "tok.bin"
    meta = prepare([_corpus(tmp_path)], out, train_tokenizer=300)
    tok_file = out.with_suffix(".tokenizer.json")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 300 and meta["documents"] == len(DOCS)
    assert meta["tokenizer"] == str(tok_file.resolve()) and meta["tokenizer_trained"] is True
    assert meta["tokenizer_sha256"] == hashlib.sha256(tok_file.read_bytes()).hexdigest()
    assert meta["separator"] == {"text": EOT, "ids": [0], "special": True}
    assert json.loads(out.with_suffix(".json").read_text()) == meta
    assert sorted(p.name for p in out.parent.iterdir()) == ["tok.bin", "tok.json", "tok.tokenizer.json"]
    ids = np.fromfile(out, dtype="<u2")
    assert len(ids) == meta["tokens"] and ids.max() < 300 and ids.max() > 255     # merges were learnt and used
    tok = tokenizers.Tokenizer.from_file(str(tok_file))
    # Documents come back exactly (byte-level BPE is lossless), separated by the one EOT token each.
    assert [tok.decode(d) for d in _split_on(ids, 0)] == DOCS
    # TokenDataset reads the width from the sidecar: its windows are the file's ids, not bytes of them.
    ds = TokenDataset(out, seq_len=8, split="train", val_fraction=0.1)
    assert ds.vocab_size == 300 and ds.data.dtype.itemsize == 2
    assert np.array_equal(np.asarray(ds.data), ids[:len(ds.data)])
    x, y = Batcher(ds, batch_size=4, seed=0).get_batch(0)
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < 300


def test_train_tokenizer_through_the_cli(capsys, tmp_path: Path) -> None:
    out = tmp_path / "tok.bin"
    assert cli.main(["prepare-data", str(_corpus(tmp_path)), "--out", str(out), "--train-tokenizer", "280"]) == 0
    line = capsys.readouterr().out
    assert f"wrote {out}" in line and "tok.tokenizer.json" in line and "vocabulary 280" in line
    assert read_meta(out)["vocab_size"] == 280


def _hf_folder(tmp_path: Path) -> Path:
    """A tokenizer saved the way transformers saves a model's: tokenizer.json + tokenizer_config.json, with a BOS
    that its post-processor adds and an EOS named in the config (besides the BPE's own EOT)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import processors
    tok = train_bpe(DOCS * 3, 320)
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    folder = tmp_path / "model"
    hf.save_pretrained(folder)
    return folder


def test_tokenizer_folder_matches_transformers(tmp_path: Path) -> None:
    from transformers import AutoTokenizer
    folder = _hf_folder(tmp_path)
    out = tmp_path / "tok.bin"
    meta = prepare([_corpus(tmp_path)], out, tokenizer=folder)
    hf = AutoTokenizer.from_pretrained(folder)
    eos, bos = hf.convert_tokens_to_ids("</s>"), hf.convert_tokens_to_ids("<s>")
    # The config's EOS wins over the BPE's own EOT; documents are encoded without the BOS the post-processor adds.
    assert meta["separator"] == {"text": "</s>", "ids": [eos], "special": True}
    assert hf("x")["input_ids"][0] == bos                        # the peer would add it: we must not
    expected: list[int] = []
    for i, text in enumerate(DOCS):
        expected += ([eos] if i else []) + hf(text, add_special_tokens=False)["input_ids"]
    assert np.fromfile(out, dtype="<u2").tolist() == expected
    assert meta["vocab_size"] == len(hf) == 322 and meta["tokenizer"] == str((folder / "tokenizer.json").resolve())
    # The file itself is accepted as well as its folder, and gives the same tokens.
    prepare([_corpus(tmp_path)], tmp_path / "again.bin", tokenizer=folder / "tokenizer.json")
    assert (tmp_path / "again.bin").read_bytes() == out.read_bytes()


def _word_level(tmp_path: Path, n_words: int, special: list[str]) -> Path:
    from tokenizers import models, pre_tokenizers
    tok = tokenizers.Tokenizer(models.WordLevel({f"w{i}": i for i in range(n_words)} | {"[UNK]": n_words},
                                                unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(special)
    path = tmp_path / "words.json"
    tok.save(str(path))
    return path


def test_large_vocabulary_uses_uint32(tmp_path: Path) -> None:
    tok = _word_level(tmp_path, 70_000, ["[SEP]"])
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"text": "w69999 w3 w65536"}) + "\n" + json.dumps({"text": "w7 nope"}) + "\n")
    out = tmp_path / "big.bin"
    meta = prepare([src], out, tokenizer=tok)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_002
    assert meta["separator"]["text"] == "[SEP]"
    assert np.fromfile(out, dtype="<u4").tolist() == [69999, 3, 65536, 70_001, 7, 70_000]
    ds = TokenDataset(out, seq_len=2, split="train", val_fraction=0.0)
    assert np.asarray(ds.data).tolist()[:3] == [69999, 3, 65536]


def test_no_special_token_separates_with_blank_line_text(tmp_path: Path) -> None:
    tok_path = tmp_path / "bpe.json"
    from tokenizers import models, pre_tokenizers, decoders, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=270, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tok_path))
    meta = prepare([_corpus(tmp_path)], tmp_path / "t.bin", tokenizer=tok_path)
    assert meta["separator"]["text"] == "\n\n" and meta["separator"]["special"] is False
    ids = np.fromfile(tmp_path / "t.bin", dtype="<u2").tolist()
    assert tok.decode(ids) == "\n\n".join(DOCS)


def test_max_bytes_caps_text_read_without_cutting_a_character(tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_text("é" * 100)                                # 2 bytes per character
    out = tmp_path / "t.bin"
    prepare([src], out, max_bytes=11, train_tokenizer=260)
    tok = tokenizers.Tokenizer.from_file(str(out.with_suffix(".tokenizer.json")))
    assert tok.decode(np.fromfile(out, dtype="<u2").tolist()) == "é" * 5


def test_bad_tokenizer_arguments_are_config_errors(tmp_path: Path) -> None:
    src = _corpus(tmp_path)
    out = tmp_path / "t.bin"
    with pytest.raises(ConfigError, match=r"--tokenizer=.*empty.*without a tokenizer\.json"):
        (tmp_path / "empty").mkdir()
        prepare([src], out, tokenizer=tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"--tokenizer=.*absent.*does not exist"):
        prepare([src], out, tokenizer=tmp_path / "absent.json")
    (tmp_path / "junk.json").write_text("{not a tokenizer")
    with pytest.raises(ConfigError, match=r"not a readable tokenizer\.json"):
        prepare([src], out, tokenizer=tmp_path / "junk.json")
    with pytest.raises(ConfigError, match=r"--train-tokenizer=100: .* at least 257"):
        prepare([src], out, train_tokenizer=100)
    with pytest.raises(ConfigError, match="--tokenizer and --train-tokenizer both given"):
        prepare([src], out, tokenizer=tmp_path / "junk.json", train_tokenizer=300)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_failed_tokenization_leaves_the_previous_outputs(tmp_path: Path) -> None:
    out = tmp_path / "t.bin"
    prepare([_corpus(tmp_path)], out, train_tokenizer=300)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("t.*")}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n{broken\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2"):
        prepare([bad], out, train_tokenizer=300)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("t.*")} == before      # no .tmp, nothing replaced


def test_a_model_trains_on_uint16_tokens(tmp_path: Path) -> None:
    """The whole path: a trained tokenizer's ids (some above 255) through TokenDataset and Batcher into a model
    whose vocabulary holds them; the data check accepts it, and the loss falls from ln(vocab)."""
    from moe_dist.train.trainer import Trainer
    from trainer_helpers import make_cfg, tiny
    src = tmp_path / "a.txt"
    src.write_text("".join(DOCS) * 30)
    out = tmp_path / "tok.bin"
    prepare([src], out, train_tokenizer=300)
    raw = tiny()
    raw["model"]["vocab_size"] = 300
    raw["data"] = {"path": str(out), "val_fraction": 0.1}
    cfg = make_cfg(raw, out_dir=str(tmp_path / "run"), steps=12, eval_every=0)
    trainer = Trainer(cfg)
    x, _ = trainer.batcher.get_batch(0)
    assert int(x.max()) > 255
    hist = trainer.fit(progress=False)
    losses = [r.lm_loss for r in hist.steps]
    assert losses[0] == pytest.approx(np.log(300), rel=0.1) and losses[-1] < losses[0] - 0.3
