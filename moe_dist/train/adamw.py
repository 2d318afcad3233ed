"""The AdamW settings every engine shares (torch's AdamW, the native flat-bucket AdamW and DeepSpeed's wrapper
of torch's): the parameter groups and the constants, so that the engines' updates are the same arithmetic."""
from __future__ import annotations

import torch

from moe_dist.config import TrainConfig


def adamw_groups(model: torch.nn.Module, t: TrainConfig) -> list[dict]:
    """Matrices decay; norms, biases and other vectors do not (they set scales, not features)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


ADAMW_BETAS, ADAMW_EPS = (0.9, 0.95), 1e-8


def build_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(adamw_groups(model, t), lr=t.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS)
