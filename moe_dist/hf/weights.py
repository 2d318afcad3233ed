"""Tensors of a Hugging Face model folder, read without running code, and written as safetensors.

Reading: `model.safetensors`, or shards listed by `model.safetensors.index.json` (names and shapes come from the
file headers, tensors one at a time when asked for); a torch `pytorch_model.bin` (or its index) only through
the weights-only unpickler, which builds tensors and containers and nothing else. Writing: safetensors files of
at most `max_shard_bytes` each, with the index transformers reads when there is more than one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from moe_dist.config import ConfigError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def _shape(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(n)) for n in shape) + "]"


class HFWeights:
    """name -> tensor of one folder. `shapes` is known before any tensor is read (safetensors headers)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._bin: dict[Path, dict[str, torch.Tensor]] = {}
        files = self._files()
        if files[0].suffix == ".safetensors":
            self._read_safetensors_headers(files)
        else:
            for f in files:
                for name, t in self._load_bin(f).items():
                    self._file_of[name], self.shapes[name] = f, tuple(t.shape)

    def _files(self) -> list[Path]:
        d = self.folder
        for index in (SAFE_INDEX, BIN_INDEX):
            if (d / index).is_file():
                try:
                    weight_map = json.loads((d / index).read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConfigError(f"{d / index} is not a weight index ({e}); re-save the model") from None
                files = sorted({d / f for f in weight_map.values()})
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise ConfigError(f"{d / index} lists {', '.join(missing)}, which {d} lacks; download every "
                                      "shard")
                return files
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (d / single).is_file():
                return [d / single]
        raise ConfigError(f"{d} holds no weights (model.safetensors, {SAFE_INDEX}, pytorch_model.bin or "
                          f"{BIN_INDEX}); point at the folder save_pretrained wrote")

    def _read_safetensors_headers(self, files: list[Path]) -> None:
        from safetensors import safe_open
        for f in files:
            try:
                with safe_open(f, framework="pt") as h:
                    for name in h.keys():
                        if name in self._file_of:
                            raise ConfigError(f"tensor {name} is in both {self._file_of[name].name} and {f.name}")
                        self._file_of[name] = f
                        self.shapes[name] = tuple(h.get_slice(name).get_shape())
            except ConfigError:
                raise
            except Exception as e:     # a truncated or non-safetensors file
                raise ConfigError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0]})") from None

    def _load_bin(self, f: Path) -> dict[str, torch.Tensor]:
        if f not in self._bin:
            from moe_dist.train.checkpoint.safe_load import load_weights_only
            from moe_dist.train.checkpoint.store import CheckpointError
            try:
                sd = load_weights_only(f)
            except CheckpointError as e:
                raise ConfigError(str(e)) from None
            except Exception as e:
                raise ConfigError(f"{f}: not a readable torch file ({str(e).splitlines()[0]})") from None
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise ConfigError(f"{f}: not a state dict of tensors")
            self._bin[f] = sd
        return self._bin[f]

    def get(self, name: str) -> torch.Tensor:
        """One tensor as fp32 on the CPU."""
        f = self._file_of[name]
        if f.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(f, framework="pt") as h:
                t = h.get_tensor(name)
        else:
            t = self._load_bin(f)[name]
        if not t.is_floating_point():
            raise ConfigError(f"tensor {name} in {f.name} has dtype {t.dtype}; a weight must be floating point")
        return t.float()


def check_names_and_shapes(have: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]], where: str,
                           what: str, ignore: tuple[str, ...] = ("rotary_emb.inv_freq",),
                           optional: tuple[str, ...] = ()) -> None:
    """Refuse, in one line, tensors that are missing, unexpected or of another shape than `what` implies."""
    def listed(items: list[str]) -> str:
        return "; ".join(items[:4]) + (f"; and {len(items) - 4} more" if len(items) > 4 else "")

    missing = [f"{k} {_shape(s)}" for k, s in want.items() if k not in have and k not in optional]
    if missing:
        raise ConfigError(f"{where} lacks {len(missing)} tensor(s) that {what} needs: {listed(missing)}; "
                          "the download is incomplete or config.json belongs to another model")
    extra = [f"{k} {_shape(s)}" for k, s in have.items() if k not in want and not k.endswith(ignore)]
    if extra:
        raise ConfigError(f"{where} holds {len(extra)} tensor(s) that {what} does not have: {listed(extra)}; "
                          "config.json describes another model than these weights")
    wrong = [f"{k} is {_shape(have[k])}, expected {_shape(s)}" for k, s in want.items()
             if k in have and tuple(have[k]) != tuple(s)]
    if wrong:
        raise ConfigError(f"{where}: {len(wrong)} tensor(s) do not match {what}: {listed(wrong)}; config.json "
                          "contradicts the weights")


def save_safetensors(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> list[str]:
    """Write `tensors` as one model.safetensors, or as shards with model.safetensors.index.json when they exceed
    max_shard_bytes; returns the file names written."""
    from safetensors.torch import save_file
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += n
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, folder / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2) + "\n")
    return names + [SAFE_INDEX]
