"""Where the Triton kernels may run, and the block configurations they are tuned over.

The interpreter (`TRITON_INTERPRET=1`) is read by `triton.jit` when a kernel module is imported, so
the choice of config set is made here, once, at import, the same way triton makes it.
"""
from __future__ import annotations

import importlib.util
import math

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when triton runs kernels in its numpy interpreter (CPU tensors, correctness only)."""
    if not HAS_TRITON:
        return False
    from triton import knobs
    return bool(knobs.runtime.interpret)


def unavailable_reason() -> str | None:
    """None when the kernels can run here, else a sentence naming the fix."""
    if not HAS_TRITON:
        return "triton is not installed; pip install 'moe_dist[triton]'"
    if interpreting() or torch.cuda.is_available():
        return None
    return ("no GPU is visible and the Triton interpreter is off; run on a CUDA GPU, or set "
            "TRITON_INTERPRET=1 before Python starts (CPU, small shapes, correctness only)")


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter; say which fix applies."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    for t in tensors:
        if t.device.type != "cuda" and not interpreting():
            raise RuntimeError(f"triton kernels need CUDA tensors, got a {t.device} tensor; move it to the "
                               "GPU or set TRITON_INTERPRET=1 before Python starts")


def gemm_configs():
    """Grouped GEMM tiles. Interpreter: one small config (speed of tests; 16 is tl.dot's minimum).
    GPU: H100-class tiles; autotuned per (K, M, E), so each expert-layer shape is tuned once."""
    import triton
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ]


def wgrad_configs():
    """dW tiles: BLOCK_K × BLOCK_M outputs per program, BLOCK_R rows reduced per step."""
    import triton
    if interpreting():
        return [triton.Config({"BLOCK_K": 16, "BLOCK_M": 16, "BLOCK_R": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_K": 128, "BLOCK_M": 128, "BLOCK_R": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_K": 128, "BLOCK_M": 256, "BLOCK_R": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_K": 64, "BLOCK_M": 128, "BLOCK_R": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_K": 128, "BLOCK_M": 128, "BLOCK_R": 32}, num_warps=4, num_stages=4),
    ]


def rows_configs():
    """Row-moving kernels (permute, unpermute): BLOCK_H columns per program, one row each."""
    import triton
    if interpreting():
        return [triton.Config({"BLOCK_H": 32}, num_warps=1)]
    return [triton.Config({"BLOCK_H": b}, num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8))]


# ------------------------------------------------------------------------------------------ pruning
# Tiles whose software pipeline cannot fit in shared memory fail only after Triton has compiled them, and fp32
# tiles take twice the bf16 bytes: on the first H200 runs, autotuning the fp32 grouped GEMM at one Mixtral shape
# took 61-74 s, most of it compiling configs that could never launch. These prune such configs before compiling.
# The estimate counts `num_stages` buffers of both operand tiles (Triton keeps at most that many in flight) and
# ignores the epilogue's scratch, so it only removes configs that cannot fit.

def shared_memory_limit() -> float:
    """Bytes of shared memory one program may use on the current GPU; unlimited in the interpreter."""
    if interpreting() or not torch.cuda.is_available():
        return math.inf
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return float(getattr(props, "shared_memory_per_block_optin", 0) or 227 * 1024)


def _fitting(configs, elem_bytes: int, tile_elems) -> list:
    """The configs whose operand tiles × stages fit; the smallest one when none does (the autotuner needs one)."""
    need = {id(c): tile_elems(c.kwargs) * elem_bytes * max(c.num_stages, 1) for c in configs}
    limit = shared_memory_limit()
    ok = [c for c in configs if need[id(c)] <= limit]
    return ok or [min(configs, key=lambda c: need[id(c)])]


def prune_gemm_configs(configs, named_args, **kwargs) -> list:
    """`early_config_prune` of the grouped GEMM (forward and dX): an x tile BLOCK_M×BLOCK_K and a w tile
    BLOCK_K×BLOCK_N per stage."""
    return _fitting(configs, named_args["x_ptr"].element_size(),
                    lambda k: k["BLOCK_M"] * k["BLOCK_K"] + k["BLOCK_K"] * k["BLOCK_N"])


def prune_wgrad_configs(configs, named_args, **kwargs) -> list:
    """`early_config_prune` of the dW kernel: an xᵀ tile BLOCK_K×BLOCK_R and a dy tile BLOCK_R×BLOCK_M per stage."""
    return _fitting(configs, named_args["x_ptr"].element_size(),
                    lambda k: k["BLOCK_K"] * k["BLOCK_R"] + k["BLOCK_R"] * k["BLOCK_M"])
