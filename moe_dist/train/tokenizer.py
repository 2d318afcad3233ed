"""Hugging Face `tokenizers` tokenizers for `prepare-data`: load a tokenizer.json, or train a byte-level BPE.

The `tokenizers` package is optional (`pip install moe_dist[hf]`); this module imports it only when a tokenizer
is asked for, so the byte-level default needs nothing beyond numpy.

Documents are joined with the tokenizer's end-of-text token when it has one, found in this order:
1. `eos_token` of a `tokenizer_config.json` beside the tokenizer.json (what transformers saves with a model);
2. the first of COMMON_EOS that the tokenizer holds as a special (added) token;
3. otherwise no special token: the ids of the text "\\n\\n" (as the byte-level default does), so documents stay
   apart in the text itself.
Documents are encoded without the tokenizer's own special tokens (no BOS/EOS added by its post-processor):
the separator above is the only special token the token file contains.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from moe_dist.config import ConfigError

EOT = "<|endoftext|>"                       # the separator, and only special token, of a trained BPE
# End-of-text tokens of well-known tokenizer families, tried in this order when no tokenizer_config.json says.
COMMON_EOS = (EOT, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")
UINT16_VOCAB = 1 << 16                      # ids 0..65535 fit uint16


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError("a tokenizer was asked for but the `tokenizers` package is not installed; "
                          "pip install moe_dist[hf]") from None
    return tokenizers


@dataclass(frozen=True)
class Separator:
    """What goes between two documents: `text` names it (a special token, or plain text), `ids` are its tokens."""
    text: str
    ids: tuple[int, ...]
    special: bool

    def as_json(self) -> dict:
        return {"text": self.text, "ids": list(self.ids), "special": self.special}


def token_dtype(vocab_size: int) -> str:
    """uint16 when ids 0..vocab_size-1 fit it, else uint32 (uint8 is the byte-level default's alone)."""
    if vocab_size <= UINT16_VOCAB:
        return "uint16"
    if vocab_size <= 1 << 32:
        return "uint32"
    raise ConfigError(f"a vocabulary of {vocab_size:,} tokens does not fit uint32 token ids; use a smaller tokenizer")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_tokenizer_file(path: str | Path) -> Path:
    """`path` itself when it is a file, `path/tokenizer.json` when it is a folder holding one."""
    p = Path(path)
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            raise ConfigError(f"--tokenizer={str(path)!r} is a folder without a tokenizer.json; point --tokenizer at a "
                              "tokenizer.json file or at a folder that holds one (a saved Hugging Face model)")
        return (p / "tokenizer.json").resolve()
    if not p.is_file():
        raise ConfigError(f"--tokenizer={str(path)!r} does not exist; point --tokenizer at a tokenizer.json file or a "
                          "folder holding one")
    return p.resolve()


def load_tokenizer(path: str | Path):
    """A `tokenizers.Tokenizer` from a tokenizer.json file, or a folder holding one; returns (tokenizer, file)."""
    tokenizers = _require_tokenizers()
    file = resolve_tokenizer_file(path)
    try:
        tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:         # the Rust side raises a plain Exception for any malformed file
        raise ConfigError(f"--tokenizer={str(path)!r}: {file} is not a readable tokenizer.json ({e}); pass the "
                          "tokenizer.json that `tokenizers` or transformers saved") from None
    return tok, file


def vocab_size_of(tok) -> int:
    """1 + the largest id the tokenizer can produce (added tokens may sit beyond the base vocabulary): the
    smallest model.vocab_size whose embedding covers every token."""
    return 1 + max(tok.get_vocab(with_added_tokens=True).values())


def _configured_eos(file: Path) -> Optional[str]:
    cfg = file.parent / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        eos = json.loads(cfg.read_text()).get("eos_token")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None                # a config we cannot read is no reason to refuse the tokenizer itself
    if isinstance(eos, dict):      # older transformers saved {"content": "</s>", ...}
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


def find_separator(tok, file: Optional[Path]) -> Separator:
    """The tokens between two documents (order in the module docstring)."""
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    candidates = ([_configured_eos(file)] if file is not None else []) + list(COMMON_EOS)
    for name in candidates:
        if name is not None and name in special:
            return Separator(name, (tok.token_to_id(name),), True)
    return Separator("\n\n", tuple(tok.encode("\n\n", add_special_tokens=False).ids), False)


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool = False):
    """A byte-level BPE (GPT-2 style: bytes mapped to printable characters, no prefix space) of `vocab_size`
    tokens trained on `texts`, with EOT as its one special token (id 0)."""
    tokenizers = _require_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # The trainer never shrinks below the byte alphabet plus the special token: a smaller size would be silently
    # exceeded, and the vocabulary check at `train` relies on the number the user gave.
    smallest = len(alphabet) + 1
    if vocab_size < smallest:
        raise ConfigError(f"--train-tokenizer={vocab_size}: a byte-level BPE needs at least {smallest} tokens "
                          f"(256 bytes + {EOT}); ask for more, e.g. --train-tokenizer=8192")
    if vocab_size > UINT16_VOCAB * 64:
        raise ConfigError(f"--train-tokenizer={vocab_size}: unreasonably large; ask for at most {UINT16_VOCAB * 64:,}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=alphabet,
                                  show_progress=show_progress)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_documents(tok, texts: list[str], sep: Separator, first: bool, dtype: str) -> np.ndarray:
    """The token ids of `texts`, each preceded by `sep` unless it is the very first document of the file."""
    parts: list[np.ndarray] = []
    sep_ids = np.asarray(sep.ids, dtype=dtype)
    for i, enc in enumerate(tok.encode_batch(texts, add_special_tokens=False)):
        if not (first and i == 0):
            parts.append(sep_ids)
        parts.append(np.asarray(enc.ids, dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
