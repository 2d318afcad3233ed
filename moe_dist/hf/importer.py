"""`moe-dist import-hf DIR --out CKPT`: a Hugging Face MoE model folder (config.json + safetensors, or a torch
.bin read weights-only) becomes a moe_dist config (YAML) and a step-0 checkpoint of the normal format, which
`moe-dist train CONFIG` continues from on any layout.

Everything is judged before anything is written: the family, every config field moe_dist must reproduce, and
every tensor's presence and shape against config.json. The checkpoint is then published atomically by the
checkpoint store; the YAML comes last.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moe_dist.config import ConfigError
from moe_dist.hf import ckpt_io, families, mapping
from moe_dist.hf.weights import HFWeights, check_names_and_shapes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="DIR", help="a folder with config.json and the weights (save_pretrained's)")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint folder to create (checkpoint.dir)")
    p.add_argument("--config-out", default=None, metavar="FILE",
                   help="where to write the moe_dist config (default: CKPT.yaml beside the checkpoint folder)")


def read_config_json(folder: Path) -> dict:
    f = folder / "config.json"
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder; pass the folder save_pretrained wrote (config.json + weights)")
    if not f.is_file():
        raise ConfigError(f"{folder} has no config.json; pass the folder save_pretrained wrote")
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{f} must hold a JSON object")
    return raw


def expected_tensors(rules: list[mapping.Rule]) -> dict[str, tuple[int, ...]]:
    return {k: s for r in rules for k, s in zip(r.theirs, r.shapes)}


def fill_model(model: torch.nn.Module, rules: list[mapping.Rule], weights: HFWeights) -> None:
    mapping.check_covers(rules, model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for r in rules:
            params[r.ours].copy_(r.join([weights.get(k) for k in r.theirs]))


def convert(model_dir: str | Path, out: str | Path, config_out: str | Path | None = None,
            say=print) -> tuple[Path, Path]:
    """Import; returns (checkpoint step folder, config YAML)."""
    src, root = Path(model_dir), Path(out)
    raw = read_config_json(src)
    where = str(src / "config.json")
    fam = families.family_of(raw, where)
    hc = families.hf_config_object(raw, where)
    cfg = families.to_config(fam, hc, where)
    cfg.checkpoint.dir = str(root)
    cfg_path = Path(config_out) if config_out else ckpt_io.default_config_path(root)
    ckpt_io.refuse_used_root(root, cfg_path)
    weights = HFWeights(src)
    rules = mapping.rules(fam, cfg, fused=mapping.is_fused(weights.shapes))
    want = expected_tensors(rules)
    optional: tuple[str, ...] = ()
    if cfg.model.tie_embeddings:
        want["lm_head.weight"] = (cfg.model.vocab_size, cfg.model.dim)   # tied: absent or a copy of the embedding
        optional = ("lm_head.weight",)
    check_names_and_shapes(weights.shapes, want, str(src), f"the {fam.name} model config.json describes",
                           optional=optional)
    model = ckpt_io.empty_model(cfg)
    fill_model(model, rules, weights)
    record = {"family": fam.name, "source": str(src.resolve()), "config_json": raw}
    header = (f"moe_dist config of the {fam.name} model imported from {src} by `moe-dist import-hf`.\n"
              f"Train: moe-dist train {cfg_path} --data.path=TOKENS (a token file of vocabulary "
              f"{cfg.model.vocab_size}; the checkpoint.dir below resumes from the imported weights).")
    return ckpt_io.publish(model, cfg, root, record, src, cfg_path, header,
                           f"import-hf: {fam.name} ({families.config_summary(cfg)})", say)


def run(args) -> int:
    return ckpt_io.reporting_checkpoint_errors(lambda: convert(args.model_dir, args.out, args.config_out))
