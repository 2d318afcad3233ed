"""The engine interface: what one `Trainer` loop asks of a training engine, and the engine chosen by
`train.engine`.

An engine owns everything between the loss and the updated weights: backward, gradient reduction over the
layout's groups, the global norm and clipping, the optimizer step and its state, saving and loading that state,
and reporting the memory it holds. The Trainer owns the loop: batches, the learning-rate schedule, the
global losses, the non-finite decision, the expert-bias rule, evaluation, SIGTERM and resume.

One optimizer step, as the Trainer drives it (every call is made by every rank, in the same order):

    engine.zero_grad()
    outs = engine.forward_backward(micro_batches)      # by default, for each micro-batch:
                                                       #   out = engine.forward(x, y)
                                                       #   engine.backward(out.loss / grad_accum_steps)
                                                       # the native engine with parallel.pp > 1 runs the
                                                       # pipeline schedule instead
    norm = engine.reduce_and_clip(train.grad_clip)     # None: the engine clips inside step()
    if the losses or the norm are not finite: engine.skip()   (train.on_nonfinite=skip) or raise
    else: after = engine.step(lr)                      # the norm when reduce_and_clip returned None

Engines:
- `NativeEngine` (`moe_dist.train.native_engine`): torch AdamW on whole parameters, or, with `train.shard_optimizer` or bf16
  weights, the flat-bucket optimizer of `moe_dist.train.sharded_optimizer` (ZeRO-1/ZeRO-2 semantics over the dp
  and edp groups, fp32 master weights).
- the DeepSpeed engine (`moe_dist.train.deepspeed_engine`, imported only when `train.engine=deepspeed`).
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from moe_dist.config import Config
from moe_dist.models.gpt import MoEGPT, ModelOutput
from moe_dist.parallel.topology import Topology

# What `Trainer(engine=...)` accepts: a function building the engine around the Trainer's model.
EngineFactory = Callable[[Config, Topology, MoEGPT], "Engine"]


class Engine(abc.ABC):
    """One training engine around one model on one rank of a layout.

    Attributes: `model` (the MoEGPT this rank trains; its parameters are the weights forward uses), `cfg`,
    `topo`, and `name` (the value of train.engine, recorded in checkpoints)."""

    name: str = "?"
    model: MoEGPT
    cfg: Config
    topo: Topology

    # ------------------------------------------------------------------------------------------ step

    @abc.abstractmethod
    def forward(self, idx_BS: torch.Tensor, targets_BS: Optional[torch.Tensor] = None) -> ModelOutput:
        """The model's forward in the engine's precision (training and evaluation both call this)."""

    def forward_backward(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[ModelOutput]:
        """Forward and backward of every micro-batch of one optimizer step ((token ids, targets) on the model's
        device), each loss divided by their number; returns one ModelOutput per micro-batch (losses and MoE
        stats; logits are not kept). Gradients add up over the micro-batches."""
        outs = []
        for x, y in micro_batches:
            out = self.forward(x, y)
            self.backward(out.loss / len(micro_batches))
            outs.append(dataclasses.replace(out, logits=None))
        return outs

    def forward_only(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[ModelOutput]:
        """The forward of every micro-batch without gradients (evaluation): one ModelOutput each, no logits."""
        with torch.no_grad():
            return [dataclasses.replace(self.forward(x, y), logits=None) for x, y in micro_batches]

    @abc.abstractmethod
    def zero_grad(self) -> None:
        """Start an optimizer step: no gradient from an earlier step remains."""

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss, already divided by train.grad_accum_steps; gradients add up
        over the micro-batches of a step (an engine may reduce them as it goes)."""

    @abc.abstractmethod
    def reduce_and_clip(self, max_norm: float) -> Optional[float]:
        """After the last micro-batch: reduce the gradients over the layout's groups (tp-partial summed over
        tp, dense averaged over dp, experts summed over edp and divided by dp), compute the exact global norm
        (each element counted once) and scale the gradients by min(1, max_norm / (norm + 1e-6)) when
        max_norm > 0. Returns the norm before clipping, the same on every rank; None when the engine can only
        compute it inside `step` (which then returns it)."""

    @abc.abstractmethod
    def step(self, lr: float) -> Optional[float]:
        """The optimizer update with learning rate `lr`. Returns the pre-clip norm when `reduce_and_clip`
        returned None (a non-finite value then means the engine did not update), else None."""

    @abc.abstractmethod
    def skip(self) -> None:
        """A non-finite step: drop this step's gradients; no weight and no optimizer state changes."""

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    # ----------------------------------------------------------------------------------- checkpoints

    def checkpoint_root(self, root: Path) -> Path:
        """Where this engine's checkpoints live under the run's checkpoint folder."""
        return root

    @abc.abstractmethod
    def save(self, root: Path, step: int, keep: int) -> Path:
        """Collective: write the checkpoint of `step` (steps done) under `root` through the atomic store
        (moe_dist.train.checkpoint.store), keeping the newest `keep`; returns the step folder."""

    @abc.abstractmethod
    def load(self, path: Path, meta: dict[str, Any]) -> bool:
        """Collective: fill weights, optimizer state and buffers from a verified checkpoint folder (`meta`:
        its meta.json). Returns True when this rank's RNG state was restored too (same layout). Raises
        CheckpointError when the checkpoint cannot load into this engine."""

    # ----------------------------------------------------------------------------------------- memory

    @abc.abstractmethod
    def memory(self) -> dict[str, int]:
        """Bytes this rank holds, counted from its tensors: `weights` (the model's parameters), `grads`
        (gradient buffers kept across micro-batches, incl. ZeRO-2's reduction bucket), `optimizer` (moments,
        fp32 master weights, step counters, padding); plus `peak_allocated`
        (torch.cuda.max_memory_allocated) on a GPU."""


def weights_autocast(model: torch.nn.Module):
    """bf16 autocast when the weights are bf16 or when a GPU runs fp32 weights under train.dtype=bfloat16;
    a no-op for fp32 weights on the CPU. Under autocast the ops torch keeps in fp32 (softmax, the loss) stay
    fp32, and the router upcasts its own math."""
    p = next(model.parameters())
    if p.dtype == torch.bfloat16:
        return torch.autocast(p.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def tensor_bytes(tensors) -> int:
    return sum(x.numel() * x.element_size() for x in tensors if x is not None)


def peak_allocated(device: torch.device) -> dict[str, int]:
    """{"peak_allocated": bytes} on a GPU (torch.cuda.max_memory_allocated), {} on the CPU."""
    if device.type == "cuda":
        return {"peak_allocated": int(torch.cuda.max_memory_allocated(device))}
    return {}
