"""The model's pipeline stages as the runtime's chunks (moe_dist.pipeline.runtime's `StageChunk`), and the
per-micro-batch `ModelOutput`s gathered back from them.

A rank holds `len(model.chunk_layers)` chunks (more than one with the interleaved schedule). Chunk c of every
micro-batch runs the layers of its virtual stage: from the token ids (virtual stage 0, which embeds them) or
from the previous stage's activation, to the activation it sends on, or, on the last virtual stage, to the
micro-batch's loss. The MoE load-balancing and z losses of a chunk join the backward on the chunk's own stage:
`AttachAuxLoss` ties them to the chunk's output, so when the output's gradient arrives the aux term receives its
gradient too and nothing about them crosses stages.
Legend: B sequences, S positions, D model dim.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch

from moe_dist.models.gpt import ModelOutput, MoEGPT, aux_sum
from moe_dist.moe.layer import MoEStats


class AttachAuxLoss(torch.autograd.Function):
    """Forward returns the activation unchanged; backward passes its gradient through and gives the aux loss
    the gradient `scale` (Megatron-core's MoEAuxLossAutoScaler): the aux loss is minimised with weight
    `scale` on the stage that computed it, by the same backward as the activation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.save_for_backward(aux)
        return x

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad_x, torch.full_like(aux, ctx.scale), None


@dataclass
class MicroRecord:
    """What one chunk kept of one micro-batch's forward (detached: only logging and the trainer read it)."""
    lm_loss: Optional[torch.Tensor]       # the last chunk's mean cross-entropy, unscaled
    aux_loss: torch.Tensor                # Σ of the chunk's MoE layers' aux + z losses, unscaled
    stats: list[MoEStats]
    moe_layer_ids: tuple[int, ...]


def _detached(s: MoEStats) -> MoEStats:
    return dataclasses.replace(s, aux_loss=s.aux_loss.detach(), z_loss=s.z_loss.detach())


class ModelChunk:
    """One local model chunk over a step's micro-batches (the runtime's StageChunk). `micro_batches[i]` is
    (token ids, targets) of micro-batch i; `scale` multiplies every loss (1/micro-batches in training, so
    that gradients add up to the step's mean); `autocast` is the engine's precision context."""

    def __init__(self, model: MoEGPT, chunk: int, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
                 scale: float, autocast: Callable[[], ContextManager] = contextlib.nullcontext):
        self.model, self.chunk = model, chunk
        self.layers = model.chunk_layers[chunk]
        v = model.chunk_stages[chunk]
        self.first = v == 0
        self.last = v == model.n_virtual - 1
        self.micro_batches, self.scale, self.autocast = micro_batches, scale, autocast
        self.records: dict[int, MicroRecord] = {}
        param = next(model.parameters())
        self.dtype = param.dtype
        self.device = param.device

    def activation_shape(self) -> tuple[int, ...]:
        """What the previous virtual stage sends: the residual stream of one micro-batch, [B, S, D] (whole on
        every tp rank)."""
        x = self.micro_batches[0][0]
        return (x.shape[0], x.shape[1], self.model.cfg.model.dim)

    def forward(self, micro: int, inp: Optional[torch.Tensor]) -> torch.Tensor:
        idx_BS, targets_BS = self.micro_batches[micro]
        model = self.model
        with self.autocast():
            x_BSD = model.embed_tokens(idx_BS) if self.first else inp
            x_BSD, stats, ids = model.run_layers(x_BSD, self.layers)
            aux = aux_sum(stats, x_BSD.device)
            lm_loss = None
            if self.last:
                _, lm_loss = model.head_loss(x_BSD, targets_BS)
                out = (lm_loss + aux) * self.scale
            elif aux.requires_grad:
                out = AttachAuxLoss.apply(x_BSD, aux, self.scale)
            else:
                out = x_BSD
        self.records[micro] = MicroRecord(None if lm_loss is None else lm_loss.detach(), aux.detach(),
                                          [_detached(s) for s in stats], ids)
        return out


def build_chunks(model: MoEGPT, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], scale: float,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> list[ModelChunk]:
    """This rank's chunks, indexed by local chunk (the schedules' `Action.chunk`)."""
    return [ModelChunk(model, c, micro_batches, scale, autocast) for c in range(len(model.chunk_layers))]


def collect_outputs(chunks: list[ModelChunk], micro_batches: int) -> list[ModelOutput]:
    """One ModelOutput per micro-batch from this rank's chunks: the LM loss where this rank holds the last
    virtual stage (a zero elsewhere), the aux loss and stats of this rank's MoE layers in layer order, with
    their global indices. No logits."""
    outs = []
    for m in range(micro_batches):
        recs = [c.records[m] for c in chunks]
        lm = next((r.lm_loss for r in recs if r.lm_loss is not None), None)
        if lm is None:
            lm = torch.zeros((), device=recs[0].aux_loss.device)
        outs.append(ModelOutput(None, lm, sum((r.aux_loss for r in recs[1:]), recs[0].aux_loss),
                                [s for r in recs for s in r.stats],
                                tuple(i for r in recs for i in r.moe_layer_ids)))
    return outs
