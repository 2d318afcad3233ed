"""`train.engine: native`: our own gradient reduction, clipping and AdamW, in one of two forms chosen once:

- whole parameters (`train.shard_optimizer: none` with fp32 weights): `torch.optim.AdamW` over the model's
  parameters, gradients in the parameters' `.grad`, reduced by `moe_dist.parallel.grads`;
- flat buckets (`train.shard_optimizer: states | states+grads`, or bf16 weights): `FlatAdamW` of
  `moe_dist.train.sharded_optimizer`, fp32 gradient buffers, fp32 master weights and AdamW moments, sharded
  over the dp group (dense) and the edp group (experts) when asked (ZeRO-1 / ZeRO-2).

Both save the same checkpoint entries (global tensors, see moe_dist.train.checkpoint.state), so either loads
the other's checkpoints, in any layout.

With pipeline parallelism (parallel.pp > 1) `forward_backward` runs the schedule parallel.pp_schedule names
(moe_dist.pipeline.schedules / runtime) over this rank's model chunks (moe_dist.pipeline.model), and
`forward_only` runs the forward-only pipeline; reduction, clipping and the update are the same per stage, with
the norm summed over the stages (moe_dist.parallel.grads).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from moe_dist.config import Config
from moe_dist.models.gpt import MoEGPT, ModelOutput
from moe_dist.parallel.grads import clip_gradients, reduce_gradients
from moe_dist.parallel.topology import Topology
from moe_dist.train import checkpoint as ckpt
from moe_dist.train import precision
from moe_dist.train.adamw import build_optimizer
from moe_dist.train.engine import Engine, peak_allocated, tensor_bytes, weights_autocast


class NativeEngine(Engine):
    """See the module docstring. `weights_dtype` forces the weights' dtype (default: `precision.weights_dtype`,
    bf16 only on a GPU with train.dtype=bfloat16): tests run the bf16 master-weight path on the CPU with it.
    `bucket_elems` caps the elements of one flat bucket (tests use small ones to get several buckets)."""

    name = "native"

    def __init__(self, cfg: Config, topo: Topology, model: MoEGPT, *, weights_dtype: Optional[torch.dtype] = None,
                 bucket_elems: Optional[int] = None):
        self.cfg, self.topo, self.model = cfg, topo, model
        self.device = next(model.parameters()).device
        self.weights_dtype = weights_dtype or precision.weights_dtype(cfg.train, self.device)
        self.flat = None
        self.optimizer: Optional[torch.optim.AdamW] = None
        if cfg.train.shard_optimizer != "none" or self.weights_dtype != torch.float32:
            from moe_dist.train.sharded_optimizer import FlatAdamW
            # FlatAdamW casts the weights itself, after taking their fp32 values as the master.
            self.flat = FlatAdamW(model, topo, cfg.train, shard=cfg.train.shard_optimizer,
                                  weights_dtype=self.weights_dtype,
                                  **({"bucket_elems": bucket_elems} if bucket_elems else {}))
        else:
            self.optimizer = build_optimizer(model, cfg.train)

    # ------------------------------------------------------------------------------------------ step

    def forward(self, idx_BS: torch.Tensor, targets_BS: Optional[torch.Tensor] = None) -> ModelOutput:
        with self._autocast():
            return self.model(idx_BS, targets_BS)

    def forward_backward(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[ModelOutput]:
        if self.topo.dims.pp == 1:
            return super().forward_backward(micro_batches)
        from moe_dist.pipeline.model import build_chunks, collect_outputs
        from moe_dist.pipeline.runtime import run_schedule
        from moe_dist.pipeline.schedules import build_schedule
        p, m = self.cfg.parallel, len(micro_batches)
        chunks = build_chunks(self.model, micro_batches, 1.0 / m, self._autocast)
        actions = build_schedule(p.pp_schedule, p.pp, p.pp_virtual, m, self.topo.pp.rank)
        run_schedule(actions, self.topo, chunks, m)
        return collect_outputs(chunks, m)

    def forward_only(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[ModelOutput]:
        if self.topo.dims.pp == 1:
            return super().forward_only(micro_batches)
        from moe_dist.pipeline.model import build_chunks, collect_outputs
        from moe_dist.pipeline.runtime import run_forward
        chunks = build_chunks(self.model, micro_batches, 1.0, self._autocast)
        run_forward(self.topo, chunks, len(micro_batches))          # without autograd
        return collect_outputs(chunks, len(micro_batches))

    def _autocast(self):
        # fp32 weights on a GPU with train.dtype=bfloat16 cannot happen here (the weights are then bf16), but
        # a forced fp32 engine on a GPU keeps the earlier behaviour: bf16 autocast over fp32 weights.
        if self.device.type == "cuda" and self.cfg.train.dtype == "bfloat16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return weights_autocast(self.model)

    def zero_grad(self) -> None:
        if self.flat is not None:
            self.flat.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.flat is not None:
            self.flat.after_backward()

    def reduce_and_clip(self, max_norm: float) -> float:
        if self.flat is not None:
            return self.flat.reduce_and_clip(max_norm)
        reduce_gradients(self.model, self.topo)
        return clip_gradients(self.model, self.topo, max_norm)

    def step(self, lr: float) -> None:
        if self.flat is not None:
            self.flat.step(lr)
            return None
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        return None

    def skip(self) -> None:
        self.zero_grad()

    # ----------------------------------------------------------------------------------- checkpoints

    def _state(self):
        return self.flat if self.flat is not None else self.optimizer

    def save(self, root: Path, step: int, keep: int) -> Path:
        return ckpt.save(root, step, self.model, self._state(), self.cfg, self.topo, keep=keep)

    def load(self, path: Path, meta: dict[str, Any]) -> bool:
        return ckpt.load(path, meta, self.model, self._state(), self.topo)

    # ----------------------------------------------------------------------------------------- memory

    def memory(self) -> dict[str, int]:
        if self.flat is not None:
            return {**self.flat.memory(), **peak_allocated(self.device)}
        params = list(self.model.parameters())
        # Step counters (one scalar per parameter) are left out: the memory formula models tensors of
        # parameter size only.
        moments = [st[k] for st in self.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq") if k in st]
        return {"weights": tensor_bytes(params), "grads": tensor_bytes(p.grad for p in params),
                "optimizer": tensor_bytes(moments), **peak_allocated(self.device)}
