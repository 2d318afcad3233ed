"""Which dtype the model's weights have, decided once when the engine is built.

On a GPU with `train.dtype: bfloat16` the weights are bf16 (compute and communication in bf16; the router
upcasts its own math to fp32), gradients accumulate in fp32 buffers and the optimizer updates fp32 master
weights, copied back to bf16 after each step: what Megatron's distributed optimizer and DeepSpeed's bf16 mode
do. Everywhere else the weights are fp32 and are their own master (no copy). On the CPU bf16 is only chosen
when a caller forces it (`NativeEngine(weights_dtype=torch.bfloat16)`): tests of the master-weight path.
"""
from __future__ import annotations

import torch

from moe_dist.config import TrainConfig


def weights_dtype(t: TrainConfig, device: torch.device) -> torch.dtype:
    """bf16 on a GPU with train.dtype=bfloat16, else fp32 (bf16 matmuls on the CPU are slower and only change
    the numbers)."""
    if device.type == "cuda" and t.dtype == "bfloat16":
        return torch.bfloat16
    return torch.float32

