"""`train.engine: deepspeed`: the engine (moe_dist.train.engine's interface) that hands backward, gradient
reduction, clipping and the optimizer step to DeepSpeed (`deepspeed.initialize`), with the optimizer state
(ZeRO-1) or the optimizer state and gradients (ZeRO-2) partitioned. The `Trainer` loop, the model, the batches
and the step semantics are the native engine's: `Trainer` builds this engine when train.engine=deepspeed.

What each side does:
- Our model keeps its own dispatch: tokens reach experts by our all-to-all over the topology's `ep` group.
- DeepSpeed reduces gradients: dense parameters averaged over the whole data-parallel world, expert
  parameters summed over the expert-data-parallel (`edp`) group and divided by the world (the rule of
  `moe_dist.parallel.grads.reduce_gradients`). It learns which parameters are experts from DeepSpeed's own
  MoE protocol (see `_tag_expert_parameters`), and it reduces them over `deepspeed.utils.groups`' expert
  groups, which `_expert_groups_module` creates and checks equal to our `edp`/`ep` groups rank for rank.
- Clipping: ZeRO-1/2 compute the global norm over partitions (dense partitions summed over the world,
  expert partitions over the world too, which counts each expert once) and clip by
  `max_norm / (norm + 1e-6)`: the native rule, tested equal. Stage 0 would clip by a per-rank norm that
  misses the other EP ranks' experts, so at stage 0 we clip with `clip_gradients` ourselves.
- A non-finite step (train.on_nonfinite=skip) is withdrawn through DeepSpeed's own step: at stage 0 with the
  gradients dropped first, under ZeRO through its overflow path (see `DeepSpeedEngine.skip`).

Checkpoints (the Trainer saves every checkpoint.every steps, at the end and on SIGTERM, and resumes from
`latest`): one file per rank under <checkpoint dir>/deepspeed/step_NNNNNN with its model shard and its ZeRO
partition, published by the same atomic store as the native checkpoints (moe_dist.train.checkpoint.store:
meta.json with a sha256 manifest, fsync, rename, `latest`, keep-K), so a truncated or corrupt rank file is named
on resume and checkpoint.fallback goes back to the previous complete step; resuming needs the same world size,
parallel.ep and train.zero_stage (see `DeepSpeedEngine.save`).

The generated DeepSpeed JSON (`deepspeed_config`) comes from our config; the user's file
(`train.deepspeed_config`) overrides it key by key, except the keys that must agree with our config
(batch sizes, gradient accumulation), which are refused with the field to change instead.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn

from moe_dist.config import Config, ConfigError
from moe_dist.models.gpt import MoEGPT, ModelOutput
from moe_dist.parallel.grads import clip_gradients
from moe_dist.parallel.topology import Topology
from moe_dist.train.checkpoint import store
from moe_dist.train.checkpoint.safe_load import load_weights_only
from moe_dist.train.checkpoint.state import data_fields, layout_of, shape_fields
from moe_dist.train.checkpoint.store import CheckpointError
from moe_dist.train.engine import Engine
from moe_dist.train.adamw import ADAMW_BETAS, ADAMW_EPS, adamw_groups
from moe_dist.train.engine import peak_allocated, tensor_bytes

# Keys of the DeepSpeed JSON that our config owns: a user file may repeat them only with the same value.
_OWNED = {"train_micro_batch_size_per_gpu": "train.batch_size",
          "gradient_accumulation_steps": "train.grad_accum_steps",
          "train_batch_size": "train.batch_size × train.grad_accum_steps × data-parallel ranks"}


def expert_group_name(ep: int) -> str:
    """DeepSpeed's name for the expert groups of one EP size (deepspeed.moe.layer.MoE uses the same)."""
    return f"ep_size_{ep}"


def deepspeed_config(cfg: Config, dp: int) -> dict[str, Any]:
    """The DeepSpeed JSON for our config on `dp` data-parallel ranks, with the user's file merged over it."""
    t = cfg.train
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.batch_size * t.grad_accum_steps * dp,
        # Stage 0 clips with our own global norm (see the module docstring), so DeepSpeed must not.
        "gradient_clipping": t.grad_clip if t.zero_stage > 0 else 0.0,
        "zero_optimization": {
            "stage": t.zero_stage,
            # DeepSpeed's MoE support in ZeRO-2 asserts both (stage_1_and_2._configure_moe_settings).
            "contiguous_gradients": True,
            "reduce_scatter": True,
            # Overlap needs a side stream; on the CPU there is none, and the order of reductions stays fixed.
            "overlap_comm": False,
        },
        # Our optimizer is torch.optim.AdamW (the native trainer's, same groups and betas): exact parity.
        "zero_allow_untested_optimizer": True,
        # The native trainer autocasts to bf16 on a GPU only and trains fp32 on the CPU; so does this engine
        # (DeepSpeed's bf16 keeps bf16 weights with fp32 master copies in the optimizer).
        "bf16": {"enabled": t.dtype == "bfloat16" and torch.cuda.is_available()},
        "steps_per_print": 1 << 30,          # we log; DeepSpeed's own step log would repeat it
        "wall_clock_breakdown": False,
    }
    if t.deepspeed_config is None:
        return generated
    path = Path(t.deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed_config={t.deepspeed_config!r} does not exist; give the path of a "
                          "DeepSpeed JSON file, or null to use the generated config alone")
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_config={t.deepspeed_config!r} is not valid JSON: {e}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"train.deepspeed_config={t.deepspeed_config!r} must hold a JSON object")
    for key, field_name in _OWNED.items():
        if key in user and user[key] != generated[key]:
            raise ConfigError(f"train.deepspeed_config sets {key}={user[key]!r} but our config gives "
                              f"{generated[key]!r}; remove the key and set {field_name} instead")
    merged = _merge(generated, user)
    stage = merged.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"train.deepspeed_config sets zero_optimization.stage={stage!r}; use 0, 1 or 2 "
                          "(stage 3 does not shard MoE experts), e.g. with train.zero_stage")
    if merged.get("fp16", {}).get("enabled"):
        raise ConfigError("train.deepspeed_config enables fp16; the MoE router needs fp32/bf16 ranges: "
                          "use train.dtype=bfloat16 instead")
    if merged.get("use_data_before_expert_parallelism"):
        raise ConfigError("train.deepspeed_config sets use_data_before_expert_parallelism; our rank order is ep "
                          "fastest, then data (Megatron's), and DeepSpeed's groups must match it: remove that key")
    if stage == 0 and merged.get("gradient_clipping", 0) and "gradient_clipping" in user:
        raise ConfigError("train.deepspeed_config sets gradient_clipping with ZeRO stage 0, where DeepSpeed's "
                          "norm misses the other expert-parallel ranks' experts; set train.grad_clip instead")
    return merged


def _merge(base: dict, override: dict) -> dict:
    """`override` over `base`, recursively for nested objects (one key in zero_optimization keeps the rest)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _expert_groups_module(topo: Topology, num_experts: int) -> nn.Module:
    """A parameterless module that DeepSpeed recognises as an MoE layer.

    DeepSpeed turns on its MoE gradient path (expert parameters reduced over the expert-data-parallel
    group) only when `isinstance(module, deepspeed.moe.layer.MoE)` holds for some submodule, and it asks
    that module to create the expert groups (`set_deepspeed_parallelism`). Our experts live in our own
    MoELayer, so this marker stands in for them: it creates DeepSpeed's `ep_size_<ep>` groups and checks
    them against our topology. It holds no weights and is never called."""
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    class ExpertGroups(MoE):
        def __init__(self) -> None:
            nn.Module.__init__(self)          # MoE.__init__ would build DeepSpeed's own gate and experts
            self.num_experts = num_experts
            self.ep_size = topo.ep.size
            self.expert_group_name = expert_group_name(topo.ep.size)

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            if use_data_before_expert_parallel_:
                raise ConfigError("train.deepspeed_config sets use_data_before_expert_parallelism; our rank order "
                                  "is ep fastest, then data (Megatron's): remove that key")
            if self.expert_group_name not in groups._get_expert_parallel_group_dict():
                groups._create_expert_and_data_parallel(self.ep_size)   # collective over the world
            check_expert_groups(topo)

        def forward(self, *args, **kwargs):
            raise RuntimeError("the DeepSpeed expert-groups marker is not a layer; MoEGPT routes its own tokens")

    return ExpertGroups()


def check_expert_groups(topo: Topology) -> None:
    """DeepSpeed's expert-parallel, expert-data-parallel and data-parallel groups must be ours, rank for rank:
    otherwise expert gradients would be summed across different experts."""
    from deepspeed.utils import groups
    name = expert_group_name(topo.ep.size)
    theirs = {"ep": list(groups._get_expert_parallel_group_ranks(name)),
              "edp": list(groups._get_expert_data_parallel_group_ranks(name)),
              "dp": sorted(_group_ranks(groups._get_data_parallel_group(), topo.dims.world))}
    ours = {"ep": list(topo.ep.ranks), "edp": list(topo.edp.ranks), "dp": list(topo.dp.ranks)}
    for key in ours:
        if theirs[key] != ours[key]:
            raise RuntimeError(f"rank {topo.rank}: DeepSpeed's {key} group {theirs[key]} differs from ours "
                               f"{ours[key]} ({topo.dims.describe()}); expert gradients would be reduced over the "
                               "wrong ranks. DeepSpeed's groups were created with another layout in this process: "
                               "use one layout per process")


def _group_ranks(group, world: int) -> list[int]:
    import torch.distributed as dist
    if group is None or group is dist.group.WORLD:
        return list(range(world))
    return dist.get_process_group_ranks(group)


def _ensure_local_rank(topo: Topology) -> None:
    """DeepSpeed's engine reads LOCAL_RANK (or OpenMPI's) from the environment and refuses to start without
    it; torchrun and the deepspeed launcher set it, SLURM and hand-started process groups do not. DeepSpeed
    itself writes LOCAL_RANK back into os.environ, so filling it in here follows its own convention."""
    import os

    from moe_dist.parallel import bootstrap
    if "LOCAL_RANK" in os.environ or "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ:
        return
    try:
        local = bootstrap.detect_launch(os.environ).local_rank
    except ValueError:
        # A process group started by hand (tests): every rank is on this host.
        local = topo.rank
    os.environ["LOCAL_RANK"] = str(local)


class _EngineModule(nn.Module):
    """What DeepSpeed wraps: our model plus the expert-groups marker, so the model itself carries no
    DeepSpeed object. Parameter names gain a `model.` prefix inside the engine only."""

    def __init__(self, model: MoEGPT, marker: Optional[nn.Module]):
        super().__init__()
        self.model = model
        self.expert_groups = marker

    def forward(self, idx_BS: torch.Tensor, targets_BS: Optional[torch.Tensor] = None) -> ModelOutput:
        return self.model(idx_BS, targets_BS)


def _tag_expert_parameters(model: MoEGPT, ep: int) -> None:
    """DeepSpeed's MoE protocol marks expert parameters with `allreduce=False` and the name of their expert
    group (`deepspeed.moe.utils.is_moe_param`, read by `split_params_into_different_moe_groups_for_optimizer`
    and by ZeRO's reduction). The model itself carries no such attributes: its typed answer is
    `expert_parameters()` (attributes on tensors steer later code invisibly), and this engine is the one place
    that translates that list into DeepSpeed's attributes, right before handing the parameters to DeepSpeed."""
    for p in model.expert_parameters():
        p.allreduce = False
        p.group_name = expert_group_name(ep)


def _zero_state_classes() -> list[type]:
    """The classes ZeRO's optimizer state pickles besides tensors and containers: its loss-scaler objects
    (plain attribute holders), its ZeRO stage enum and its fragment addresses (two ints). Weights-only
    loading allows exactly these."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def rank_file_name(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def check_supported(ds_config: dict[str, Any]) -> None:
    """What this engine refuses, before DeepSpeed starts (so every rank raises the same error at once). Tensor
    parallelism is refused by the one layout check (moe_dist.parallel.layout.check_layout), which the Trainer
    runs before it builds any engine; train.shard_optimizer by config.validate."""
    if ds_config["zero_optimization"]["stage"] == 0 and ds_config.get("bf16", {}).get("enabled"):
        # DeepSpeed's bf16 optimizer at stage 0 keeps its own fp32 gradient buffers, which this engine can
        # neither withdraw (train.on_nonfinite=skip) nor clip with the global norm.
        raise ConfigError("train.zero_stage=0 with DeepSpeed's bf16 (train.dtype=bfloat16 on a GPU, or bf16.enabled "
                          "in train.deepspeed_config) is not supported by train.engine=deepspeed; use "
                          "train.zero_stage=1 or 2, or train.engine=native")


def _storage_bytes(tensors: Iterable[Optional[torch.Tensor]]) -> int:
    """Bytes of the distinct storages behind `tensors` (ZeRO-2's gradients are views into its buffers: each
    buffer counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.numel():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


class DeepSpeedEngine(Engine):
    """The engine interface on `deepspeed.initialize`: DeepSpeed owns backward, the reductions, ZeRO's global
    norm and clipping (stage 1/2) and the AdamW step on its partition; at stage 0 this engine clips with the
    native global norm (see the module docstring). `ds` is DeepSpeed's engine around `model`."""

    name = "deepspeed"

    def __init__(self, cfg: Config, topo: Topology, model: MoEGPT):
        self.ds_config = deepspeed_config(cfg, topo.dp.size)
        check_supported(self.ds_config)
        import deepspeed
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        self.cfg, self.topo, self.model = cfg, topo, model
        self.device = next(model.parameters()).device
        self.zero_stage = self.ds_config["zero_optimization"]["stage"]
        # A model without MoE layers is plain data parallelism: no marker (DeepSpeed would then insist on
        # an expert parameter group).
        has_experts = bool(model.expert_parameters())
        if has_experts:
            _tag_expert_parameters(model, topo.ep.size)
        module = _EngineModule(model, _expert_groups_module(topo, cfg.moe.num_experts) if has_experts else None)
        kwargs: dict[str, Any] = {}
        if "optimizer" in self.ds_config:
            # The user's file names DeepSpeed's optimizer; DeepSpeed splits the MoE groups itself.
            kwargs["model_parameters"] = list(module.parameters())
        else:
            # The native engine's AdamW groups (decay / no decay), each split into dense and expert groups.
            # DeepSpeed keys its split by group name; an empty group (no expert vectors) is dropped.
            named = [{**g, "name": name} for g, name in zip(adamw_groups(model, cfg.train), ("decay", "no_decay"))]
            groups = [g for g in split_params_into_different_moe_groups_for_optimizer(named) if g["params"]]
            kwargs["optimizer"] = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS)
        _ensure_local_rank(topo)
        self.ds, _, _, _ = deepspeed.initialize(model=module, config=copy.deepcopy(self.ds_config), **kwargs)
        self._grad_bytes = 0            # the most gradient storage seen at the end of a step's backward
        self._stepped = False           # DeepSpeed's step() ran in this optimizer step (see `skip`)

    # ------------------------------------------------------------------------------------------ step

    def forward(self, idx_BS: torch.Tensor, targets_BS: Optional[torch.Tensor] = None) -> ModelOutput:
        # Through DeepSpeed's engine: it resets ZeRO's per-backward flags and applies its bf16 autocast.
        return self.ds(idx_BS, targets_BS)

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    def zero_grad(self) -> None:
        # Nothing to clear: DeepSpeed drops every gradient (ZeRO's partitions and buckets included) at the end
        # of its optimizer step, `skip` withdraws a step through that same step, and a step that raised ends
        # the run.
        self._stepped = False

    def backward(self, loss: torch.Tensor) -> None:
        # The Trainer has divided the loss by train.grad_accum_steps already, so DeepSpeed must not again.
        self.ds.backward(loss, scale_wrt_gas=False)
        if not self.ds.is_gradient_accumulation_boundary():
            # DeepSpeed counts micro-batches in step(); off the boundary it neither clips nor updates. The
            # last micro-batch's step is `step` below.
            self.ds.step()

    def reduce_and_clip(self, max_norm: float) -> Optional[float]:
        self._grad_bytes = max(self._grad_bytes, self._gradient_bytes())
        if self.zero_stage == 0:
            # Gradients are whole and reduced on every rank here; DeepSpeed's stage-0 clip would use a
            # per-rank norm, so the native global norm and rule apply.
            return clip_gradients(self.model, self.topo, max_norm)
        return None                     # ZeRO computes the global norm over partitions inside step()

    def step(self, lr: float) -> Optional[float]:
        if "scheduler" not in self.ds_config:
            for g in self.ds.optimizer.param_groups:
                g["lr"] = lr
        self.ds.step()                  # ZeRO: global norm, clip, AdamW on this rank's partition
        self._stepped = True
        if self.zero_stage == 0:
            return None
        # Host sync: the norm computed inside step(), for the log and the non-finite decision. A non-finite
        # norm means DeepSpeed skipped the update itself (it counts as an overflow).
        return float(self.ds.get_global_grad_norm())

    def skip(self) -> None:
        """Withdraw this optimizer step through DeepSpeed's own step, so that its micro-batch counters stay right
        and it frees its gradients and buckets itself; no weight, moment or master weight changes."""
        if self._stepped:
            # ZeRO found the norm non-finite inside step() and skipped the update there already.
            return
        if self.zero_stage == 0:
            # Whole gradients in .grad: without them torch's AdamW updates nothing (it passes over a parameter
            # that has no gradient), and DeepSpeed's step counts the micro-batch.
            self.ds.optimizer.zero_grad(set_to_none=True)
        else:
            # The gradients are reduced into this rank's ZeRO partition. A NaN in it makes the global norm NaN
            # (on every rank: the norm is all-reduced), and ZeRO's step then takes its overflow path: no update,
            # gradients and buckets freed, moments and fp32 master untouched.
            for grads in (self.ds.optimizer.averaged_gradients or {}).values():
                for g in grads or []:
                    if g.numel():
                        g[(0,) * g.dim()] = float("nan")       # its first element, whatever its strides
                        break
        self.ds.step()
        self._stepped = True
        if self.zero_stage > 0 and math.isfinite(self.ds.get_global_grad_norm()):     # host sync: one scalar
            raise RuntimeError("DeepSpeed applied an update the engine meant to skip (its ZeRO step saw a finite "
                               "norm); this DeepSpeed version handles overflow differently")

    # ------------------------------------------------------------------------------------ checkpoints
    #
    # DeepSpeed's own engine.save_checkpoint is not used: with MoE it saves experts only from DeepSpeed's MoE
    # layer modules (none here, so our experts would be lost), and it keeps one expert per file. Instead each
    # rank saves its model shard and its ZeRO partition (DeepSpeed's optimizer state_dict, fp32 master copy
    # included) into one file, and a resume needs the same world size, parallel.ep and ZeRO stage: partitions
    # are per rank. The folder is published by the native checkpoints' store (same sequence, same meta.json),
    # so a truncated or corrupt rank file is reported by name and checkpoint.fallback applies here too.

    def checkpoint_root(self, root: Path) -> Path:
        """Beside (not among) the native checkpoints: the two formats do not load into each other."""
        return root / "deepspeed"

    def _layout(self) -> dict[str, int]:
        return {**layout_of(self.topo), "zero_stage": self.zero_stage}

    def save(self, root: Path, step: int, keep: int) -> Path:
        """Collective: every rank writes its rank file into the folder for `step`; the store publishes it."""
        import deepspeed

        def fill(tmp: Path) -> None:
            with store.open_synced(tmp / rank_file_name(self.topo.rank)) as f:
                torch.save({"model": self.model.state_dict(), "optimizer": self.ds.optimizer.state_dict(),
                            "rng": torch.get_rng_state()}, f)

        meta = {"engine": self.name, "layout": self._layout(), "shape": shape_fields(self.cfg),
                "data": data_fields(self.cfg), "torch": torch.__version__, "deepspeed": deepspeed.__version__}
        return store.write(root, step, self.topo, keep, fill, meta)

    def load(self, path: Path, meta: dict[str, Any]) -> bool:
        """This rank's file of a verified checkpoint of the same layout; the RNG state is always restored."""
        if meta.get("engine") != self.name:
            raise CheckpointError(f"{path} was not written by train.engine=deepspeed (its meta.json says engine="
                                  f"{meta.get('engine')!r}); point checkpoint.dir at a DeepSpeed run's folder")
        if meta["layout"] != self._layout():
            raise CheckpointError(f"{path} was saved with {meta['layout']} and this run is {self._layout()}: "
                                  "ZeRO partitions are per rank, so resume with the same world size, parallel.ep "
                                  "and train.zero_stage (or set checkpoint.resume=never)")
        state = load_weights_only(path / rank_file_name(self.topo.rank), allow=_zero_state_classes())
        self.model.load_state_dict(state["model"])
        optimizer = self.ds.optimizer
        if self.zero_stage == 0:
            optimizer.load_state_dict(state["optimizer"])       # torch's AdamW (bf16 at stage 0 is refused)
        else:
            # DeepSpeed reads the entry of this data-parallel rank only (a checkpoint of the same layout);
            # the fp32 master partition comes from the file, not from the (possibly bf16) weights.
            mine = [state["optimizer"] if r == self.topo.dp.rank else None for r in range(self.topo.dp.size)]
            optimizer.load_state_dict(mine, load_optimizer_states=True, load_from_fp32_weights=True)
        torch.set_rng_state(state["rng"])
        return True

    # ----------------------------------------------------------------------------------------- memory

    def _gradient_bytes(self) -> int:
        """Gradient storage alive after the last micro-batch's backward: the parameters' .grad (stage 0 and 1
        keep whole gradients), ZeRO-2's reduction buckets and this rank's reduced partition."""
        opt = self.ds.optimizer
        tensors: list[Optional[torch.Tensor]] = [p.grad for p in self.model.parameters()]
        for bucket in getattr(opt, "ipg_buckets", {}).values():
            tensors += list(bucket.buffer)
        tensors.append(getattr(opt, "grads_in_partition", None))
        for grads in (getattr(opt, "averaged_gradients", None) or {}).values():
            tensors += list(grads or [])
        return _storage_bytes(tensors)

    def memory(self) -> dict[str, int]:
        """`optimizer`: AdamW's moments over this rank's partition plus ZeRO's fp32 master partition (DeepSpeed
        keeps that copy even when the weights are fp32); `grads`: the most gradient storage seen at the end of a
        step's backward (0 before the first step)."""
        opt = self.ds.optimizer
        inner = getattr(opt, "optimizer", opt)          # ZeRO and bf16 wrap the torch AdamW; stage 0 fp32 is it
        moments = [st[k] for st in inner.state.values() for k in ("exp_avg", "exp_avg_sq") if k in st]
        master = (getattr(opt, "single_partition_of_fp32_groups", None)          # ZeRO-1/2
                  or getattr(opt, "fp32_groups_flat_partition", None) or [])     # bf16 at stage 0
        return {"weights": tensor_bytes(self.model.parameters()), "grads": self._grad_bytes,
                "optimizer": tensor_bytes(moments) + tensor_bytes(master), **peak_allocated(self.device)}
