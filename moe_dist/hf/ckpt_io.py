"""moe_dist checkpoints on the Hugging Face side: write a model as a step-0 checkpoint of the normal format, read
a checkpoint's weights back, and the record of where an imported model came from.

An imported (or upcycled) model is written as the trainer writes its own checkpoints (the native engine's
`save`): every parameter as a global tensor, experts under their global index, AdamW moments of zero
and step 0 (the state AdamW starts from anyway), so `moe-dist train` resumes from it on any layout with no
special case. The record `hf_source.json` beside the step folders keeps the family and the original
config.json (token ids, ...) for export; the store's pruning leaves it alone. Tokenizer files are copied into
`hf_files/` and written back by export.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from moe_dist.config import Config, ConfigError, to_dict
from moe_dist.models.gpt import MoEGPT
from moe_dist.parallel.topology import Topology

RECORD = "hf_source.json"
FILES_DIR = "hf_files"
# Small files of a model folder that belong with the weights (tokenizer, chat template, generation defaults).
CARRIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
           "merges.txt", "generation_config.json", "chat_template.jinja", "added_tokens.json")


def reporting_checkpoint_errors(work: Callable[[], Any]) -> int:
    """Run a command's work; an unusable checkpoint (corrupt, incomplete, another model's, or one that could not
    be published) is bad input: one line `moe-dist: checkpoint error: ...` and exit 2, as `moe-dist train` does.
    ConfigError goes on to the CLI's own boundary."""
    from moe_dist.train.checkpoint import CheckpointError
    try:
        work()
    except CheckpointError as e:
        print(f"moe-dist: checkpoint error: {e}", file=sys.stderr)
        return 2
    return 0


def default_config_path(root: Path) -> Path:
    """The YAML written beside a checkpoint folder: runs/x/ckpt -> runs/x/ckpt.yaml."""
    root = Path(root)
    return root.with_name(root.name + ".yaml")


def refuse_used_root(root: Path, config_out: Optional[Path] = None) -> None:
    """--out must be a new (or empty of checkpoints) folder this user can write; judged before any work."""
    from moe_dist.train.checkpoint import LATEST_NAME, complete_checkpoints
    from moe_dist.train.preflight import check_writable_dir      # the one judge of output folders
    check_writable_dir(root, "--out")
    if config_out is not None:
        check_writable_dir(config_out.parent, "--config-out's folder")
    if (root / LATEST_NAME).exists() or complete_checkpoints(root):
        raise ConfigError(f"--out {root} already holds checkpoints; choose a new folder (an import never mixes "
                          "with another run's checkpoints)")


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def config_yaml(cfg: Config, header: str) -> str:
    return "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(to_dict(cfg), sort_keys=False)


def empty_model(cfg: Config) -> MoEGPT:
    """A one-process model with uninitialised weights (no random draw of weights about to be overwritten: for a
    model of billions of parameters that draw takes minutes). Every parameter must then be filled."""
    from moe_dist.models.gpt import head_dim, rotary_tables
    with torch.device("meta"):
        model = MoEGPT(cfg)
    model.to_empty(device="cpu")
    if cfg.model.tie_embeddings:
        model.head.weight = model.embed.weight     # to_empty gives each module its own tensor: tie them again
    m = cfg.model
    model.rope_cos, model.rope_sin = rotary_tables(m.max_seq_len, head_dim(m), m.rope_theta)
    return model


def write_step0(model: MoEGPT, cfg: Config, root: Path, record: dict[str, Any],
                carried_from: Optional[Path] = None) -> Path:
    """Publish `model` as the step-0 checkpoint under `root` (atomic: the store's tmp folder, rename, `latest`),
    then the record and the carried files. Returns the step folder."""
    from moe_dist.train.native_engine import NativeEngine
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # The native engine writes it, so the checkpoint is exactly what training writes (fp32 weights, zero moments).
    engine = NativeEngine(cfg, Topology.single(), model, weights_dtype=torch.float32)
    # Zero moments as stride-0 views of one zero: no memory until DCP writes each one (it copies a view whose
    # storage is smaller than the tensor, one tensor at a time), so the peak stays near the weights' size.
    zero = torch.zeros((), dtype=torch.float32)
    for p in model.parameters():
        engine.optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32), "exp_avg": zero.expand_as(p),
                                     "exp_avg_sq": zero.expand_as(p)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        path = engine.save(root, 0, keep=cfg.checkpoint.keep)
    if carried_from is not None:
        files = [carried_from / n for n in CARRIED if (carried_from / n).is_file()]
        if files:
            tmp = root / f"{FILES_DIR}.tmp-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            for f in files:
                shutil.copy2(f, tmp / f.name)
            if (root / FILES_DIR).exists():
                shutil.rmtree(root / FILES_DIR)
            os.replace(tmp, root / FILES_DIR)
    write_atomic(root / RECORD, json.dumps(record, indent=1, default=str) + "\n")
    return path


def publish(model: MoEGPT, cfg: Config, root: Path, record: dict[str, Any], src: Path, cfg_path: Path,
            header: str, what: str, say: Callable[[str], None]) -> tuple[Path, Path]:
    """The end of import-hf and upcycle: the step-0 checkpoint, then the YAML config beside it, then one line
    on the model (`what` and its parameter counts) and where both went."""
    from moe_dist.models.gpt import count_parameters
    path = write_step0(model, cfg, root, record, carried_from=src)
    write_atomic(cfg_path, config_yaml(cfg, header))
    n = count_parameters(model, cfg)
    say(f"{what}, {n['total'] / 1e6:.2f}M parameters ({n['active'] / 1e6:.2f}M active)")
    say(f"checkpoint: {path}\nconfig: {cfg_path}")
    return path, cfg_path


def read_record(root: Path) -> Optional[dict[str, Any]]:
    f = Path(root) / RECORD
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f} is not valid JSON ({e.msg}); delete it and pass --family") from None


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def load_weights(root: Path, cfg: Config, step: Optional[int] = None) -> tuple[MoEGPT, Path, int]:
    """A one-process model holding the weights of the checkpoint `step` (default: the one `latest` names) under
    `root`; the optimizer state is not read. Returns (model, its folder, its step)."""
    import torch.distributed.checkpoint as dcp
    from moe_dist.train import checkpoint as ckpt
    from moe_dist.train.checkpoint.safe_load import SafeReader
    from moe_dist.train.checkpoint.shards import ShardLoadPlanner
    root = Path(root)
    if step is None:
        found = ckpt.find(root, fallback=False, say=lambda *_: None)
        if found is None:
            raise ConfigError(f"{root} holds no checkpoint (no step_* folder); point at a checkpoint.dir")
        path, meta = found
    else:
        path = root / ckpt.step_dir_name(step)
        if not path.is_dir():
            raise ConfigError(f"{root} has no checkpoint of step {step}; there are "
                              f"{[p.name for p in ckpt.complete_checkpoints(root)]}")
        meta = ckpt.verify(path)
    ckpt.check_compatible(meta, cfg, path)
    model = MoEGPT(cfg)
    state = {f"model.{n}": p.data for n, p in model.named_parameters()}
    stored = SafeReader(path).read_metadata().state_dict_metadata
    missing = sorted(k for k in state if k not in stored)
    if missing:
        raise ConfigError(f"checkpoint {path} lacks {missing[0]} (and {len(missing) - 1} more) that the config's "
                          "model has; pass the config the checkpoint was trained with (--config)")
    with _quiet(), torch.no_grad():
        dcp.load(state, storage_reader=SafeReader(path),
                 planner=ShardLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False))
    return model, path, int(meta["step"])
