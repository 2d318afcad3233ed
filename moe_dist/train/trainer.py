"""The training loop, as a class with small methods. The parallel layout comes in as a `Topology`
(one process when None): the model holds this rank's shards, the batcher reads this dp rank's
windows, and gradients are reduced over the layout's groups before the optimizer step."""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from moe_dist.config import Config, TrainConfig
from moe_dist.models.gpt import MoEGPT, ModelOutput
from moe_dist.parallel.comm import all_reduce_
from moe_dist.parallel.grads import clip_gradients, reduce_gradients
from moe_dist.parallel.topology import Topology
from moe_dist.train.data import Batcher, TokenDataset


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(t.steps - t.warmup_steps, 1)
    progress = min((step - t.warmup_steps) / span, 1.0)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: MoEGPT, t: TrainConfig) -> torch.optim.AdamW:
    # Matrices decay; norms, biases, and other vectors do not (they set scales, not features).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95), eps=1e-8)


@dataclass
class StepResult:
    step: int
    loss: float
    lm_loss: float
    aux_loss: float
    drop_fraction: float
    tokens_per_expert: list[torch.Tensor]   # per MoE layer, [E], summed over every rank
    grad_norm: float
    lr: float
    seconds: float
    a2a_rows_out: int = 0                    # rows this rank sent to other EP ranks (all MoE layers, forward)
    a2a_rows_leaving: int = 0                # its kept assignments whose expert lives on another EP rank


@dataclass
class History:
    steps: list[StepResult] = field(default_factory=list)

    def expert_load(self) -> torch.Tensor:
        """[layers, E] assignments summed over the run."""
        return torch.stack([torch.stack(s.tokens_per_expert) for s in self.steps]).sum(0)


class Trainer:
    def __init__(self, cfg: Config, model: Optional[MoEGPT] = None, batcher: Optional[Batcher] = None,
                 topo: Optional[Topology] = None):
        self.cfg = cfg
        self.topo = topo = topo or Topology.single()
        torch.manual_seed(cfg.train.seed + topo.rank)    # jitter noise differs per rank, as per micro-batch
        self.model = model or MoEGPT(cfg, topo)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.batcher = batcher or Batcher(
            TokenDataset(cfg.data.path, cfg.train.seq_len, "train", cfg.data.val_fraction),
            cfg.train.batch_size, cfg.train.seed, rank=topo.dp.rank, world=topo.dp.size)
        self.history = History()

    @property
    def is_logger(self) -> bool:
        return self.topo.rank == 0

    def _global_losses(self, out: ModelOutput) -> tuple[float, float]:
        """(LM loss, aux loss) of the global batch: LM is replicated over tp and averaged over dp; each
        rank's aux loss is its share of its group's loss, so the world sum over dp gives the mean."""
        v = torch.stack([out.lm_loss.detach().float() / self.topo.tp.size, out.aux_loss.detach().float()])
        all_reduce_(v, self.topo.world)
        v = v / self.topo.dims.dp
        return float(v[0]), float(v[1])   # host sync: logging

    def train_step(self, step: int) -> StepResult:
        t0 = time.perf_counter()
        self.model.train()
        lr = lr_at(step, self.cfg.train)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        x, y = self.batcher.get_batch(step)
        out: ModelOutput = self.model(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        reduce_gradients(self.model, self.topo)
        norm = clip_gradients(self.model, self.topo, self.cfg.train.grad_clip)
        lm, aux = self._global_losses(out)
        if not math.isfinite(lm + aux):
            raise FloatingPointError(f"step {step}: loss is {lm + aux}; lower train.lr or check the data")
        self.optimizer.step()
        # Per-expert counts over every rank's tokens: the bias rule and the load report see the global batch.
        E = self.cfg.moe.num_experts
        kept_dropped = torch.stack([torch.stack([s.tokens_per_expert, s.dropped]) for s in out.stats]) \
            if out.stats else torch.zeros(0, 2, E, dtype=torch.long)
        leaving = self._rows_leaving(kept_dropped[:, 0])
        all_reduce_(kept_dropped, self.topo.world)
        counts = list(kept_dropped[:, 0])
        self.model.update_expert_bias(counts)
        dropped = int(kept_dropped[:, 1].sum())
        routed = dropped + int(kept_dropped[:, 0].sum())
        return StepResult(step=step, loss=lm + aux, lm_loss=lm, aux_loss=aux,
                          drop_fraction=dropped / routed if routed else 0.0,
                          tokens_per_expert=counts, grad_norm=norm, lr=lr,
                          seconds=time.perf_counter() - t0,
                          a2a_rows_out=sum(s.a2a_rows_out for s in out.stats),
                          a2a_rows_leaving=leaving)

    def _rows_leaving(self, kept_LE: torch.Tensor) -> int:
        """This rank's kept assignments to experts on other EP ranks, counted from the routing alone, to check
        that dispatch sends exactly these rows (no padding)."""
        ep, E = self.topo.ep, self.cfg.moe.num_experts
        local = slice(ep.rank * E // ep.size, (ep.rank + 1) * E // ep.size)
        return int(kept_LE.sum() - kept_LE[:, local].sum())     # host sync: one scalar for the log

    def fit(self, steps: Optional[int] = None, progress: bool = True,
            on_step: Optional[Callable[[StepResult], None]] = None) -> History:
        steps = steps or self.cfg.train.steps
        t = self.cfg.train
        tokens_per_step = t.batch_size * t.seq_len * self.topo.dp.size     # the global batch
        progress = progress and self.is_logger
        out_dir = Path(t.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        log = open(out_dir / "metrics.jsonl", "w") if self.is_logger else None
        tty = progress and sys.stderr.isatty()
        bar = tqdm(total=steps, disable=not tty, dynamic_ncols=True, desc="train")
        t_start = time.perf_counter()
        try:
            for step in range(steps):
                r = self.train_step(step)
                self.history.steps.append(r)
                tps = tokens_per_step / r.seconds
                if log:
                    log.write(json.dumps({"step": step, "loss": r.loss, "lm_loss": r.lm_loss, "aux_loss": r.aux_loss,
                                      "drop_fraction": r.drop_fraction, "grad_norm": r.grad_norm, "lr": r.lr,
                                          "tokens_per_s": tps, "step_s": r.seconds,
                                          "a2a_rows_out": r.a2a_rows_out,
                                          "a2a_rows_leaving": r.a2a_rows_leaving}) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{r.lm_loss:.3f}", aux=f"{r.aux_loss:.4f}", tok_s=f"{tps:,.0f}",
                                drop=f"{r.drop_fraction:.1%}")
                if progress and not tty and (step % t.log_every == 0 or step == steps - 1):
                    print(f"step {step:5d}/{steps} loss {r.lm_loss:.4f} aux {r.aux_loss:.4f} "
                          f"drop {r.drop_fraction:.2%} {tps:,.0f} tok/s lr {r.lr:.2e}", flush=True)
                if on_step:
                    on_step(r)
        finally:
            bar.close()
            if log:
                log.close()
        self.wall_seconds = time.perf_counter() - t_start
        return self.history

    @torch.no_grad()
    def evaluate(self, batches: int = 8) -> float:
        """Mean LM loss on the validation split (fixed windows, so runs compare)."""
        val = Batcher(TokenDataset(self.cfg.data.path, self.cfg.train.seq_len, "val", self.cfg.data.val_fraction),
                      self.cfg.train.batch_size, seed=0, rank=self.topo.dp.rank, world=self.topo.dp.size)
        self.model.eval()
        losses = [self._global_losses(self.model(*val.get_batch(i)))[0] for i in range(batches)]
        self.model.train()
        return sum(losses) / len(losses)


def format_expert_load(load_LE: torch.Tensor, moe_layer_ids: list[int]) -> str:
    """A table of each MoE layer's share of assignments per expert, with max/mean imbalance."""
    E = load_LE.shape[1]
    head = "layer | " + " ".join(f"e{e:<4d}" for e in range(E)) + " | max/mean"
    lines = [head, "-" * len(head)]
    for lid, row in zip(moe_layer_ids, load_LE.float()):
        share = row / row.sum().clamp_min(1)
        imb = float(row.max() / row.mean().clamp_min(1e-9))
        lines.append(f"{lid:5d} | " + " ".join(f"{s:5.1%}"[:5].ljust(5) for s in share.tolist()) + f" | {imb:.2f}")
    return "\n".join(lines)
