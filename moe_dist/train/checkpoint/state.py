"""The training state a checkpoint holds, and the config fields that decide whether it fits a run.

Every parameter and its AdamW state (exp_avg, exp_avg_sq, step) as the GLOBAL tensor (sharded ones as
`ShardView`s), the persistent buffers (the DeepSeek expert bias), one RNG state per rank, and the step (the lr
schedule and the batcher are pure functions of the step, so the step is their whole state). The optimizer is
either a torch optimizer (its per-parameter state is saved in place) or a flat one
(`moe_dist.train.sharded_optimizer.FlatAdamW`, sharded or with fp32 master weights) that rebuilds the same
per-parameter tensors for the save and takes them back after the load (`FlatState`): the entries do not depend
on how the optimizer holds them, so a sharded run's checkpoint loads unsharded and the other way round.

With pipeline stages each rank holds, and saves, only its stage's layers (and the embedding on the first
stage, the final norm and head on the last), under the model's global names (`blocks.<i>.…`): the entries
differ from rank to rank, DCP's global plan joins them, and a load in any other split (another pp, pp_virtual
or pp_layers, as well as ep/tp/dp) reads each entry from whichever rank's file holds it.

meta.json records the config fields that fix shapes (a mismatch is refused), those that fix the data order (a
mismatch is reported), and the layout (the RNG state is restored only on the layout it was saved with).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Protocol, Union, runtime_checkable

import torch

from moe_dist.config import Config
from moe_dist.parallel.tensor_parallel import Shard
from moe_dist.parallel.topology import Topology
from moe_dist.pipeline.stages import stage_sizes
from moe_dist.train.checkpoint.shards import ShardView
from moe_dist.train.checkpoint.store import CheckpointError

# The config fields that fix parameter shapes: a checkpoint whose values differ cannot load.
SHAPE_FIELDS = {
    "model": ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "dense_hidden", "moe_every",
              "first_dense", "tie_embeddings"),
    "moe": ("num_experts", "expert_hidden", "activation", "num_shared_experts", "shared_expert_hidden",
            "expert_bias"),
}
# Fields that do not change shapes but do change what "continue exactly" means; differences are reported.
DATA_FIELDS = {"data": ("path", "val_fraction"), "train": ("seed", "batch_size", "seq_len", "grad_accum_steps")}


@runtime_checkable
class FlatState(Protocol):
    """An optimizer whose state is not per parameter (flat buckets, shards, fp32 master weights)."""

    def checkpoint_tensors(self, fill: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        """Parameter name → {"weight", "exp_avg", "exp_avg_sq", "step"}, each shaped like the parameter (this
        rank's tp/ep shard); "weight" is the fp32 master. fill=False: zeros for a load to fill (no collective)."""

    def restore_checkpoint_tensors(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        """Take back tensors of `checkpoint_tensors`' form after a load."""


OptimizerState = Union[torch.optim.Optimizer, FlatState]


def materialize_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter AdamW's state (zeros and step 0 before the first step), so that a fresh optimizer
    has tensors for DCP to load into. AdamW then takes its first step from this state exactly as from an
    empty one (it initialises to the same zeros)."""
    for p in model.parameters():
        st = optimizer.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def state_for_dcp(model, optimizer: OptimizerState, topo: Topology, rng: bool = True,
                  fill: bool = True) -> dict[str, Any]:
    """Flat name → tensor (replicated) or ShardView (sharded) for every piece of training state. With a flat
    optimizer the parameter entries are rebuilt tensors (fill=False: zeros to load into); `restore` puts them
    back."""
    if isinstance(optimizer, torch.optim.Optimizer):
        materialize_optimizer_state(model, optimizer)
        per_param = {name: {"weight": p, **{k: optimizer.state[p][k] for k in ("exp_avg", "exp_avg_sq", "step")}}
                     for name, p in model.named_parameters()}
    else:
        per_param = optimizer.checkpoint_tensors(fill=fill)
    shards = model.param_shards
    out: dict[str, Any] = {}

    def put(key: str, t: torch.Tensor, spec: tuple[Shard, ...]) -> None:
        out[key] = ShardView(t.detach(), spec, topo) if spec else t.detach()

    for name, _ in model.named_parameters():
        spec = shards.get(name, ())
        st = per_param[name]
        put(f"model.{name}", st["weight"], spec)
        put(f"optim.{name}.exp_avg", st["exp_avg"], spec)
        put(f"optim.{name}.exp_avg_sq", st["exp_avg_sq"], spec)
        out[f"optim.{name}.step"] = st["step"]
    for name, b in model.named_buffers():
        owner, _, short = name.rpartition(".")
        if short not in model.get_submodule(owner)._non_persistent_buffers_set:
            out[f"buffer.{name}"] = b          # e.g. the expert bias: replicated, state like a parameter
    if rng:
        # Per rank under its own key (never deduplicated): jitter noise continues exactly on resume.
        out[f"rng.cpu.{topo.rank}"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out[f"rng.cuda.{topo.rank}"] = torch.cuda.get_rng_state()
    return out


def restore(model, optimizer: OptimizerState, state: dict[str, Any]) -> None:
    """After a load into `state_for_dcp(..., fill=False)`: hand a flat optimizer its tensors back (a torch
    optimizer's state was loaded in place)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return

    def local(v):
        return v.local if isinstance(v, ShardView) else v
    optimizer.restore_checkpoint_tensors(
        {name: {"weight": local(state[f"model.{name}"]), "exp_avg": local(state[f"optim.{name}.exp_avg"]),
                "exp_avg_sq": local(state[f"optim.{name}.exp_avg_sq"]), "step": state[f"optim.{name}.step"]}
         for name, _ in model.named_parameters()})


def shape_fields(cfg: Config) -> dict[str, Any]:
    return {f"{sec}.{f}": getattr(getattr(cfg, sec), f) for sec, fields in SHAPE_FIELDS.items() for f in fields}


def data_fields(cfg: Config) -> dict[str, Any]:
    return {f"{sec}.{f}": getattr(getattr(cfg, sec), f) for sec, fields in DATA_FIELDS.items() for f in fields}


def layout_of(topo: Topology, cfg: Optional[Config] = None) -> dict[str, Any]:
    """The layout meta.json records. With pipeline stages (pp > 1) it adds `pp`, and with `cfg` the virtual
    stages per rank (`pp_virtual`) and the layers of each virtual stage in model order (`pp_layers`, the split
    the run uses, so an explicit even split and the default one are the same layout). A pp = 1 layout is
    recorded exactly as before pipelines existed: older checkpoints compare equal to it, and older readers
    read ours."""
    d = topo.dims
    out: dict[str, Any] = {"world": d.world, "tp": d.tp, "ep": d.ep, "etp": d.etp, "dp": d.dp, "edp": d.edp}
    pp = d.pp
    if pp > 1:
        out["pp"] = pp
        if cfg is not None:
            p = cfg.parallel
            out["pp_virtual"] = p.pp_virtual
            out["pp_layers"] = stage_sizes(cfg.model.n_layers, pp, p.pp_virtual, p.pp_layers)
    return out


def _normal(layout: dict[str, Any]) -> dict[str, Any]:
    """A recorded layout with its pipeline fields made explicit: no `pp` means one stage (a checkpoint of a
    version before pipelines, or pp = 1), whose virtual stages and split say nothing more."""
    out = {**layout, "pp": layout.get("pp", 1)}
    if out["pp"] == 1:
        out.pop("pp_virtual", None)
        out.pop("pp_layers", None)
    return out


def same_layout(saved: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether a checkpoint's recorded layout is this run's: then rank r holds the same shards and the same
    layers as the rank r that saved, and its RNG state continues exactly."""
    return _normal(saved) == _normal(now)


def describe_layout(layout: dict[str, Any]) -> str:
    text = f"world={layout['world']} tp={layout['tp']} ep={layout['ep']} etp={layout['etp']} dp={layout['dp']}"
    if layout.get("pp", 1) > 1:
        text += f" pp={layout['pp']}"
        if layout.get("pp_virtual", 1) > 1:
            text += f" pp_virtual={layout['pp_virtual']}"
        if "pp_layers" in layout:
            text += f" pp_layers={','.join(map(str, layout['pp_layers']))}"
    return text


def check_compatible(meta: dict[str, Any], cfg: Config, path: Path) -> list[str]:
    """Refuse a checkpoint of another model shape (naming the field); return notes on data differences."""
    mine = shape_fields(cfg)
    for key, saved in meta["shape"].items():
        if key in mine and mine[key] != saved:
            raise CheckpointError(f"checkpoint {path} does not fit this model: {key} {saved} (checkpoint) vs "
                                  f"{mine[key]} (config); set {key}={saved} or start a new run in another "
                                  "checkpoint.dir")
    notes = []
    now = data_fields(cfg)
    for key, saved in meta.get("data", {}).items():
        if key in now and now[key] != saved:
            notes.append(f"{key} {saved} (checkpoint) vs {now[key]} (config): batches after the resume differ "
                         "from the interrupted run's")
    return notes
