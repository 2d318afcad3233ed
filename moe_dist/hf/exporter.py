"""`moe-dist export-hf CKPT --out DIR`: a moe_dist checkpoint as a Hugging Face folder (config.json + safetensors,
the tokenizer files carried from the import) that `AutoModelForCausalLM.from_pretrained` loads as the family.

The family is the one recorded at import (`hf_source.json` in CKPT), or `--family` for a model trained from
scratch; a config no family can express is refused naming the field. The folder is written under a temporary
name and renamed when complete, so DIR either does not exist or is whole.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

import torch

from moe_dist import config as config_mod
from moe_dist.config import Config, ConfigError
from moe_dist.hf import ckpt_io, families, mapping
from moe_dist.hf.weights import save_safetensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint folder (checkpoint.dir): its latest step")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to create")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="the moe_dist config the checkpoint was trained with (default: CKPT.yaml beside it, as "
                        "import-hf and upcycle write it)")
    p.add_argument("--family", default=None, choices=sorted(families.FAMILIES),
                   help="the Hugging Face family to write (default: the one recorded at import)")
    p.add_argument("--step", type=int, default=None, help="export this step instead of the latest")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the written weights")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest safetensors file (5GB, 500MB, bytes); more tensors go to further shards")


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3, "KIB": 1024, "MIB": 1024 ** 2,
             "GIB": 1024 ** 3}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        value = float(num) * units[t[len(num):]]
    except (ValueError, KeyError):
        raise ConfigError(f"--max-shard-size={text!r}: write a size like 5GB, 500MB or 1000000") from None
    if value < 1:
        raise ConfigError(f"--max-shard-size={text!r}: must be positive")
    return int(value)


def load_config(root: Path, path: Optional[str], record: Optional[dict]) -> Config:
    cfg_path = Path(path) if path else ckpt_io.default_config_path(root)
    if not cfg_path.is_file():
        raise ConfigError(f"no config for {root}: {cfg_path} does not exist; pass --config FILE (the config it "
                          "was trained with)")
    return config_mod.load(cfg_path)


def choose_family(cfg: Config, flag: Optional[str], record: Optional[dict]) -> families.Family:
    name = flag or (record or {}).get("family")
    if name is None:
        able = [f.name for f in families.FAMILIES.values() if families.expressible(f, cfg) is None]
        hint = (f"families that can express this config: {', '.join(able)}" if able else
                "no family can express this config")
        raise ConfigError(f"the checkpoint was not imported from Hugging Face, so no family is recorded; pass "
                          f"--family ({hint})")
    if name not in families.FAMILIES:
        raise ConfigError(f"family {name!r} (recorded in {ckpt_io.RECORD}) is unknown; pass --family")
    return families.FAMILIES[name]


def build_hf_config(fam: families.Family, cfg: Config, record: Optional[dict], dtype: str):
    base = (record or {}).get("config_json") if (record or {}).get("family") == fam.name else None
    values = families.to_hf(fam, cfg, base)
    values["dtype"] = dtype
    values.pop("torch_dtype", None)
    return families.hf_config_object(values, f"the {fam.name} config built for export")


def hf_tensors(model: torch.nn.Module, fam: families.Family, cfg: Config, dtype: torch.dtype
               ) -> dict[str, torch.Tensor]:
    rules = mapping.rules(fam, cfg)
    mapping.check_covers(rules, model)
    params = dict(model.named_parameters())
    out = {}
    with torch.no_grad():
        for r in rules:
            for name, t in zip(r.theirs, r.split(params[r.ours].detach())):
                out[name] = t.to(dtype).contiguous()
    return out


def export(checkpoint: str | Path, out: str | Path, config_path: Optional[str] = None, family: Optional[str] = None,
           step: Optional[int] = None, dtype: str = "float32", max_shard_size: str = "5GB", say=print) -> Path:
    root, dest = Path(checkpoint), Path(out)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(f"--out {dest} exists and is not empty; choose a new folder")
    from moe_dist.train.preflight import check_writable_dir      # the one judge of output folders
    check_writable_dir(dest, "--out")
    if not root.is_dir():
        raise ConfigError(f"{root} is not a checkpoint folder")
    record = ckpt_io.read_record(root)
    cfg = load_config(root, config_path, record)
    fam = choose_family(cfg, family, record)
    hf_cfg = build_hf_config(fam, cfg, record, dtype)
    shard_bytes = parse_size(max_shard_size)
    model, path, got_step = ckpt_io.load_weights(root, cfg, step)
    tensors = hf_tensors(model, fam, cfg, DTYPES[dtype])
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        hf_cfg.save_pretrained(tmp)
        save_safetensors(tensors, tmp, shard_bytes)
        carried = root / ckpt_io.FILES_DIR
        if carried.is_dir():
            for f in carried.iterdir():
                if not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
        (tmp / "moe_dist_export.json").write_text(json.dumps(
            {"checkpoint": str(path.resolve()), "step": got_step, "family": fam.name}, indent=1) + "\n")
        if dest.exists():
            dest.rmdir()                   # empty (checked above)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"export-hf: {path} (step {got_step}) -> {dest} as {fam.name} ({fam.architecture}, {dtype})")
    return dest


def run(args) -> int:
    return ckpt_io.reporting_checkpoint_errors(lambda: export(args.checkpoint, args.out, args.config, args.family,
                                                              args.step, args.dtype, args.max_shard_size))
