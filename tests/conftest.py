"""Test-wide environment: CPU DeepSpeed accelerator and a repository-local extension cache.

Set at import time, before any test imports deepspeed or torch.utils.cpp_extension, which read
these variables once. TRITON_INTERPRET=1 runs the Triton kernels in triton's CPU interpreter; triton reads
it when a kernel is decorated, so it must be set before `moe_dist.kernels.ops` is first imported.
"""
import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("TRITON_INTERPRET", "1")
