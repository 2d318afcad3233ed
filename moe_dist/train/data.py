"""Data preparation and loading: a flat token file with a JSON sidecar, split into train/val, random windows.

No downloads ever: the default corpus is the Python standard library's own source, which exists on every machine
that can run this package. The default tokens are bytes (vocab 256, uint8); `prepare(tokenizer=...)` or
`prepare(train_tokenizer=N)` tokenizes with a Hugging Face `tokenizers` tokenizer instead (uint16 ids when the
vocabulary fits 65,536, else uint32; see moe_dist/train/tokenizer.py).

Files of one prepared corpus `OUT` (e.g. data/tok.bin):
- `OUT`                   the token ids, raw little-endian integers of the sidecar's dtype, no header;
- `OUT` with suffix .json the sidecar: {"tokens", "dtype", "vocab_size", "documents", "sources", "max_bytes",
                          "tokenizer" (absolute path of the tokenizer.json, null for bytes), "tokenizer_sha256",
                          "tokenizer_trained", "separator" {"text", "ids", "special"}};
- `OUT` with suffix .tokenizer.json  the tokenizer trained by `train_tokenizer=N`.
A token file without a sidecar is read as bytes (files from before the sidecar existed).
"""
from __future__ import annotations

import codecs
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from moe_dist.config import ConfigError

VOCAB_SIZE = 256
DOC_SEP = b"\n\n"                    # between documents; plain text, so decode() stays readable
DEFAULT_MAX_BYTES = 20_000_000
TEXT_SUFFIXES = (".py", ".txt", ".md")


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes as uint8 tokens."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(tokens: np.ndarray | torch.Tensor | Sequence[int]) -> str:
    """Inverse of :func:`encode`; invalid UTF-8 (a window cut mid-character) is replaced, not fatal."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]   # prune: site-packages can be huge
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    # Sorted so the default corpus is identical from run to run on one interpreter.
    return sorted(files)


def _documents(source: Path) -> Iterator[tuple[str, bytes]]:
    """Yields (label, bytes) for every document in one source."""
    if source.is_dir():
        for p in sorted(source.rglob("*")):
            if p.is_file() and p.suffix in TEXT_SUFFIXES:
                yield str(p), _read(p)
    elif source.suffix == ".jsonl":
        with source.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ConfigError(f"{source}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                      f"{e.start + 1}); re-encode the file as UTF-8 or drop that line") from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{source}:{lineno}: not valid JSON ({e.msg}); fix or drop that line") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ConfigError(f"{source}:{lineno}: line {lineno} has no string \"text\" field; every line "
                                      "of a .jsonl source must be an object with a \"text\" string")
                yield f"{source}:{lineno}", rec["text"].encode("utf-8")
    elif source.is_file():
        yield str(source), _read(source)
    else:
        raise ConfigError(f"data source {source} does not exist; pass existing files or folders")


def _read(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read data source {p} ({e.strerror}); fix its permissions or leave it out") from None


def sidecar_path(token_file: str | Path) -> Path:
    """The metadata file of a token file: the same name with the suffix .json."""
    return Path(token_file).with_suffix(".json")


def trained_tokenizer_path(token_file: str | Path) -> Path:
    return Path(token_file).with_suffix(".tokenizer.json")


def _same_file(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _check_outputs(out: Path, outputs: dict[str, Path], sources: Sequence[Path], tokenizer: Optional[Path]) -> None:
    """Refuses outputs that would overwrite each other, an input, or land where a later run reads them as text."""
    if out.is_dir():
        raise ConfigError(f"--out={out} is a folder; give a file name such as --out={out / 'tok.bin'}")
    names = list(outputs.items())
    for i, (what, p) in enumerate(names):
        for other, q in names[i + 1:]:
            if _same_file(p, q):
                raise ConfigError(f"--out={out}: its {other} would be {q}, the same file as its {what}; give --out "
                                  f"a suffix such as .bin (--out={out.with_suffix('.bin')})")
        inputs = list(sources) + ([tokenizer] if tokenizer is not None else [])
        for src in inputs:
            if _same_file(p, src):
                raise ConfigError(f"--out={out}: its {what} {p} would overwrite the input {src}; write the token "
                                  "file elsewhere")
            if src.is_dir() and p.suffix in TEXT_SUFFIXES and os.path.realpath(p).startswith(
                    os.path.realpath(src) + os.sep):
                raise ConfigError(f"--out={out}: its {what} {p} would land in the source folder {src} with a text "
                                  "suffix and be read as a document next time; write it elsewhere or use .bin")


class _Outputs:
    """Temporary files renamed into place together at `commit` (each written, flushed and fsynced first), removed
    if anything fails: a crash or a concurrent reader never sees a half-written file. The token file is renamed
    before its sidecar, and readers check the sidecar's token count against the file's size, so a crash between
    the two renames is detected rather than misread."""

    def __init__(self) -> None:
        self.pending: list[tuple[Path, Path]] = []

    def tmp_for(self, final: Path) -> Path:
        tmp = final.with_name(final.name + ".tmp")
        self.pending.append((tmp, final))
        return tmp

    def commit(self) -> None:
        for tmp, _ in self.pending:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for tmp, final in self.pending:
            os.replace(tmp, final)
        dirs = {final.parent for _, final in self.pending}
        for d in dirs:                           # the renames themselves survive a power loss
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.pending = []

    def discard(self) -> None:
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)
        self.pending = []


def _progress(total: Optional[int], desc: str):
    # On stderr and only for a terminal: logs and pipes stay free of carriage-return noise.
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
                disable=not sys.stderr.isatty(), dynamic_ncols=True)


def _capped_texts(docs: Iterator[tuple[str, bytes]], max_bytes: Optional[int], counter: list[int],
                  bar=None) -> Iterator[str]:
    """Document texts until `max_bytes` bytes of text are read (the last one cut short, never mid-character);
    counter[0] counts the documents."""
    remaining = max_bytes
    for _, data in docs:
        if remaining is not None:
            cut = len(data) > remaining
            data = data[:remaining]
            remaining -= len(data)
        else:
            cut = False
        # Invalid UTF-8 inside a document is replaced; an incomplete character at a cut is dropped (final=False).
        text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(data, final=not cut)
        counter[0] += 1
        if bar is not None:
            bar.update(len(data))
        yield text
        if remaining == 0:
            return


def prepare(sources: Sequence[str | Path] | None, out: str | Path, max_bytes: int | None = None,
            tokenizer: str | Path | None = None, train_tokenizer: int | None = None) -> dict[str, Any]:
    """Writes the token file `out` and its sidecar (see the module docstring) from `sources` (default: the Python
    stdlib source, capped at DEFAULT_MAX_BYTES); returns the sidecar's content.

    Bytes (default): documents joined by DOC_SEP, the whole cut at `max_bytes` tokens. With `tokenizer` (a
    tokenizer.json or a folder holding one) or `train_tokenizer` (the vocabulary size of a byte-level BPE trained
    on the same text and saved as `out` with suffix .tokenizer.json), `max_bytes` caps the bytes of text read.
    Bad input raises ConfigError naming the argument and the fix, before anything is written.
    """
    out = Path(out)
    if max_bytes is not None and max_bytes < 1:
        raise ConfigError(f"--max-bytes={max_bytes}: must be at least 1; leave it out to read every source whole")
    if tokenizer is not None and train_tokenizer is not None:
        raise ConfigError("--tokenizer and --train-tokenizer both given; pass one: an existing tokenizer, or the "
                          "vocabulary size of one to train")
    tok_file = None
    if tokenizer is not None:
        from moe_dist.train.tokenizer import resolve_tokenizer_file
        tok_file = resolve_tokenizer_file(tokenizer)
    if sources is None:
        paths: list[Path] = []
        labels = ["<python stdlib>"]
        max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    else:
        paths = [Path(s) for s in sources]
        labels = [str(p) for p in paths]
        for p in paths:
            if not p.exists():
                raise ConfigError(f"data source {p} does not exist; pass existing files or folders")
    outputs = {"token file": out, "metadata file": sidecar_path(out)}
    if train_tokenizer is not None:
        outputs["tokenizer file"] = trained_tokenizer_path(out)
    _check_outputs(out, outputs, paths, tok_file)

    def docs() -> Iterator[tuple[str, bytes]]:       # a fresh pass over the sources on each call
        if sources is None:
            return ((str(p), p.read_bytes()) for p in _stdlib_files())
        return (d for p in paths for d in _documents(p))

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out={out}: cannot create its folder ({e.strerror}); choose another path") from None
    files = _Outputs()
    try:
        if tokenizer is None and train_tokenizer is None:
            meta = _write_bytes(docs(), max_bytes, files.tmp_for(out))
        else:
            meta = _write_tokenized(docs, max_bytes, files, out, tok_file, train_tokenizer)
        if meta["tokens"] == 0:
            raise ConfigError(f"no text found in sources {labels}; pass files holding text (.py, .txt, .md in "
                              "folders, or .jsonl lines with a \"text\" field)")
        meta.update(sources=labels, max_bytes=max_bytes)
        files.tmp_for(sidecar_path(out)).write_text(json.dumps(meta, indent=2) + "\n")
        files.commit()
    except BaseException:
        files.discard()
        raise
    return meta


def _write_bytes(docs: Iterator[tuple[str, bytes]], max_bytes: Optional[int], tmp: Path) -> dict[str, Any]:
    """Documents as uint8 tokens joined by DOC_SEP, the whole cut at `max_bytes` tokens."""
    total = n_docs = 0
    with open(tmp, "wb") as f, _progress(max_bytes, "bytes") as bar:
        for _, data in docs:
            piece = (DOC_SEP if n_docs else b"") + data
            if max_bytes is not None:
                piece = piece[:max_bytes - total]
            f.write(piece)
            total += len(piece)
            n_docs += 1
            bar.update(len(piece))
            if max_bytes is not None and total >= max_bytes:
                break
    return {"tokens": total, "dtype": "uint8", "vocab_size": VOCAB_SIZE, "documents": n_docs, "tokenizer": None,
            "tokenizer_sha256": None, "tokenizer_trained": False,
            "separator": {"text": DOC_SEP.decode(), "ids": list(DOC_SEP), "special": False}}


def _write_tokenized(docs, max_bytes: Optional[int], files: _Outputs, out: Path, tok_file: Optional[Path],
                     train_tokenizer: Optional[int]) -> dict[str, Any]:
    from moe_dist.train import tokenizer as T
    if train_tokenizer is not None:
        with _progress(max_bytes, "train tokenizer") as bar:
            tok = T.train_bpe(_capped_texts(docs(), max_bytes, [0], bar), train_tokenizer)
        tok_file = trained_tokenizer_path(out).resolve()
        tok_tmp = files.tmp_for(tok_file)
        tok.save(str(tok_tmp))
        sha = T.sha256_file(tok_tmp)
        sep = T.find_separator(tok, None)
    else:
        tok, tok_file = T.load_tokenizer(tok_file)
        sha = T.sha256_file(tok_file)
        sep = T.find_separator(tok, tok_file)
    vocab = T.vocab_size_of(tok)
    dtype = T.token_dtype(vocab)
    n_docs, total, batch, batch_chars = [0], 0, [], 0
    little = np.dtype(dtype).newbyteorder("<")           # the file format, whatever this machine's byte order
    with open(files.tmp_for(out), "wb") as f, _progress(max_bytes, "tokenize") as bar:
        for text in _capped_texts(docs(), max_bytes, n_docs, bar):
            batch.append(text)
            batch_chars += len(text)
            if batch_chars >= _ENCODE_BATCH_CHARS:       # bounded memory: encode and write in batches
                ids = T.encode_documents(tok, batch, sep, first=n_docs[0] == len(batch), dtype=dtype)
                f.write(ids.astype(little, copy=False).tobytes())
                total, batch, batch_chars = total + len(ids), [], 0
        if batch:
            ids = T.encode_documents(tok, batch, sep, first=n_docs[0] == len(batch), dtype=dtype)
            f.write(ids.astype(little, copy=False).tobytes())
            total += len(ids)
    return {"tokens": total, "dtype": dtype, "vocab_size": vocab, "documents": n_docs[0],
            "tokenizer": str(tok_file), "tokenizer_sha256": sha, "tokenizer_trained": train_tokenizer is not None,
            "separator": sep.as_json()}


_ENCODE_BATCH_CHARS = 4_000_000
_DTYPES = {"uint8": 255, "uint16": 65535, "uint32": 2**32 - 1}


def read_meta(path: str | Path, label: Optional[str] = None) -> dict[str, Any]:
    """The sidecar of token file `path`, checked against the file; bytes (uint8, vocab 256) when there is none.
    Errors are ConfigError naming `label` (default: the file) and the fix."""
    path = Path(path)
    label = label or f"token file {path}"
    fix = f"run `moe-dist prepare-data ... --out {path}` again"
    side = sidecar_path(path)
    size = path.stat().st_size
    if _same_file(side, path):
        raise ConfigError(f"{label}: a token file named *.json is its own metadata file; {fix} with --out ending "
                          ".bin")
    if not side.exists():
        if trained_tokenizer_path(path).exists():
            raise ConfigError(f"{label}: its metadata file {side} is missing, and the tokenizer beside it says the "
                              f"ids are not bytes, so their width is unknown; {fix}")
        return {"tokens": size, "dtype": "uint8", "vocab_size": VOCAB_SIZE, "tokenizer": None}
    try:
        meta = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{label}: its metadata file {side} is unreadable ({e}); {fix}") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{label}: its metadata file {side} is not a JSON object; {fix}")
    dtype, vocab, tokens = meta.get("dtype"), meta.get("vocab_size"), meta.get("tokens")
    if dtype not in _DTYPES:
        raise ConfigError(f"{label}: its metadata file {side} gives dtype={dtype!r}, not one of "
                          f"{', '.join(_DTYPES)}; {fix}")
    for name, v in (("vocab_size", vocab), ("tokens", tokens)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"{label}: its metadata file {side} gives {name}={v!r}, not a count; {fix}")
    if vocab - 1 > _DTYPES[dtype]:
        raise ConfigError(f"{label}: its metadata file {side} gives vocab_size={vocab} which {dtype} cannot hold; "
                          f"{fix}")
    itemsize = np.dtype(dtype).itemsize
    if tokens * itemsize != size:
        raise ConfigError(f"{label}: holds {size:,} bytes but its metadata file {side} says {tokens:,} {dtype} "
                          f"tokens ({tokens * itemsize:,} bytes): the two are from different runs; {fix}")
    return meta


def split_bounds(n_tokens: int, split: str, val_fraction: float) -> tuple[int, int]:
    """[lo, hi) of `split` in a file of `n_tokens`: train is the head, val the tail (contiguous, so val text
    never overlaps train text); no val split when val_fraction is 0."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if split == "val" and val_fraction == 0:
        raise ValueError("there is no val split when val_fraction is 0; set data.val_fraction above 0 to evaluate")
    cut = int(n_tokens * (1.0 - val_fraction))
    return (0, cut) if split == "train" else (cut, n_tokens)


def _too_small(label: str, split: str, have: int, total: int, seq_len: int, val_fraction: float) -> str:
    fix = "prepare more data or lower train.seq_len"
    if split == "val":
        fix += ", raise data.val_fraction, or set data.val_fraction=0 to train without validation"
    elif val_fraction > 0:
        fix += " or data.val_fraction"
    return (f"{label}: the {split} split holds {have:,} tokens (of {total:,}, data.val_fraction={val_fraction}), "
            f"fewer than one window of train.seq_len + 1 = {seq_len + 1:,}; {fix}")


def check_data(cfg) -> None:
    """Before any model or process group: the token file data.path exists, its vocabulary fits model.vocab_size
    and each split it is cut into holds at least one window of train.seq_len + 1 tokens. ConfigError otherwise,
    naming data.path, the sizes and the fix."""
    path = Path(cfg.data.path)
    label = f"data.path={cfg.data.path}"
    if path.is_dir():
        raise ConfigError(f"{label} is a folder, not a token file; point data.path at the file `moe-dist "
                          "prepare-data --out` wrote")
    if not path.is_file():
        raise ConfigError(f"{label} does not exist; create it with `moe-dist prepare-data --out {path}` or point "
                          "data.path at a token file")
    meta = read_meta(path, label)
    vocab, model_vocab = meta["vocab_size"], cfg.model.vocab_size
    if vocab > model_vocab:
        what = f"tokenizer {meta['tokenizer']}" if meta.get("tokenizer") else "bytes"
        raise ConfigError(f"{label} holds tokens of a {vocab:,}-token vocabulary ({what}) but model.vocab_size="
                          f"{model_vocab:,} has no embedding row for ids {model_vocab:,}..{vocab - 1:,}; set "
                          f"--model.vocab_size={vocab} (or more), or prepare the data with a tokenizer of at most "
                          f"{model_vocab:,} tokens")
    vf, L = cfg.data.val_fraction, cfg.train.seq_len
    for split in ("train", "val") if vf > 0 else ("train",):
        lo, hi = split_bounds(meta["tokens"], split, vf)
        if hi - lo < L + 1:
            raise ConfigError(_too_small(label, split, hi - lo, meta["tokens"], L, vf))


class TokenDataset:
    """A read-only memory map of a token file (dtype from its sidecar), split into a train head and a val tail."""

    def __init__(self, path: str | Path, seq_len: int,
                 split: Literal["train", "val"] = "train", val_fraction: float = 0.05) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"token file {self.path} not found; create it with "
                             f"`moe-dist prepare-data --out {self.path}`")
        lo, hi = split_bounds(0, split, val_fraction)          # argument checks before touching the file
        self.meta = read_meta(self.path)
        self.vocab_size: int = self.meta["vocab_size"]
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")       # prepare writes little-endian ids
        data = np.memmap(self.path, dtype=dtype, mode="r") if self.meta["tokens"] else np.zeros(0, dtype)
        lo, hi = split_bounds(len(data), split, val_fraction)
        self.data = data[lo:hi]
        self.seq_len = seq_len
        self.split = split
        if len(self.data) < seq_len + 1:
            raise ValueError(_too_small(f"token file {self.path}", split, len(self.data), len(data), seq_len,
                                        val_fraction))

    def __len__(self) -> int:
        """Number of distinct window start positions."""
        return len(self.data) - self.seq_len


class Batcher:
    """Random windows whose choice depends only on (seed, step, rank).

    No iterator state means resuming at step s reproduces exactly the batches of an uninterrupted
    run, and data-parallel ranks draw different windows without any coordination.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} out of range for world size {world}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world = rank, world

    def get_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, self.rank])
        L = self.dataset.seq_len
        starts = rng.integers(0, len(self.dataset), size=self.batch_size)
        windows = np.stack([np.asarray(self.dataset.data[s:s + L + 1]) for s in starts])
        w = torch.from_numpy(windows.astype(np.int64))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "rank": self.rank, "world": self.world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # The rank may legitimately differ after an elastic restart; the seed is what matters.
        self.seed = int(state["seed"])
