"""Data preparation and loading: a byte-level tokenizer, a flat token file, random windows.

No downloads ever: the default corpus is the Python standard library's own source, which exists
on every machine that can run this package. Tokens are bytes (vocab 256), so the file is plain
uint8 and memory-maps without any header.
"""
from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch

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
                yield str(p), p.read_bytes()
    elif source.suffix == ".jsonl":
        with source.open("r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{source}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ValueError(f"{source}:{lineno}: line {lineno} has no string \"text\" field")
                yield f"{source}:{lineno}", rec["text"].encode("utf-8")
    elif source.is_file():
        yield str(source), source.read_bytes()
    else:
        raise FileNotFoundError(f"data source not found: {source}")


def prepare(sources: Sequence[str | Path] | None, out: str | Path,
            max_bytes: int | None = None) -> dict[str, Any]:
    """Concatenates documents into a uint8 token file `out`; writes `out`.json metadata; returns it."""
    out = Path(out)
    if sources is None:
        docs: Iterator[tuple[str, bytes]] = ((str(p), p.read_bytes()) for p in _stdlib_files())
        labels = ["<python stdlib>"]
        max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    else:
        paths = [Path(s) for s in sources]
        docs = (d for p in paths for d in _documents(p))
        labels = [str(p) for p in paths]
    chunks: list[bytes] = []
    total = n_docs = 0
    for _, data in docs:
        if chunks:
            chunks.append(DOC_SEP)
            total += len(DOC_SEP)
        chunks.append(data)
        total += len(data)
        n_docs += 1
        if max_bytes is not None and total >= max_bytes:
            break
    blob = b"".join(chunks)
    if max_bytes is not None:
        blob = blob[:max_bytes]
    if not blob:
        raise ValueError(f"no text found in sources {labels}")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write-then-rename: a crash or a concurrent reader never sees a half-written token file.
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    meta = {"tokens": len(blob), "dtype": "uint8", "vocab_size": VOCAB_SIZE,
            "sources": labels, "documents": n_docs}
    meta_tmp = out.with_suffix(".json.tmp")
    meta_tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(meta_tmp, out.with_suffix(".json"))
    return meta


def check_data(cfg) -> None:
    """Before any model or process group: the token file exists and each split it is cut into holds at least
    one window of train.seq_len + 1 tokens (a ValueError naming the file and the fix otherwise)."""
    TokenDataset(cfg.data.path, cfg.train.seq_len, "train", cfg.data.val_fraction)
    if cfg.data.val_fraction > 0:
        TokenDataset(cfg.data.path, cfg.train.seq_len, "val", cfg.data.val_fraction)


class TokenDataset:
    """A read-only memory map of a token file, split into a train head and a val tail."""

    def __init__(self, path: str | Path, seq_len: int,
                 split: Literal["train", "val"] = "train", val_fraction: float = 0.05) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"token file {self.path} not found; create it with "
                             f"`moe-dist prepare-data --out {self.path}`")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        data = np.memmap(self.path, dtype=np.uint8, mode="r")
        cut = int(len(data) * (1.0 - val_fraction))
        # A contiguous split (not interleaved windows) so val text never overlaps train text.
        self.data = data[:cut] if split == "train" else data[cut:]
        self.seq_len = seq_len
        self.split = split
        if len(self.data) < seq_len + 1:
            raise ValueError(f"{split} split of {self.path} has {len(self.data)} tokens, fewer than "
                             f"seq_len + 1 = {seq_len + 1}; use more data or a smaller seq_len")

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
