"""Routed experts as stacked weights, one layout for every backend. Legend: N permuted rows, D model
dim, F expert hidden, E local experts.

    w_in_EDF2  [E, D, 2F] for SwiGLU (gate and up fused: one GEMM), [E, D, F] for GELU
    w_out_EFD  [E, F, D]

Backends, chosen once at construction:
- `grouped_mm`: torch._grouped_mm (CPU and GPU). Needs int32 cumulative row ends and row strides that
  are multiples of 16 bytes, so D and F must be multiples of 16 / element size.
- `loop`: one matmul per expert; the reference, and the fallback for shapes grouped_mm refuses.
- `triton`: the Triton grouped GEMM (`moe_dist.kernels.ops`), forward, dX and dW kernels. Runs on a CUDA
  GPU, or on the CPU under `TRITON_INTERPRET=1` (correctness only); elsewhere asking for it raises.
- `auto`: grouped_mm where the shapes allow it, else loop (never triton: it is asked for by name).

Activation recompute (`train.recompute: moe_act`, `recompute_activation=True`): the activation's output, the
second GEMM's input, is the largest tensor the experts keep for backward ([N, F], next to the [N, 2F] first GEMM
output that the activation's own backward needs anyway). With recompute it is computed, consumed by the second
GEMM, then its memory is released; when backward reaches the experts' output the activation is run again on the
kept first GEMM output, the memory refilled in place (the second GEMM's saved reference sees the data again), and
that recomputed graph gives the activation's gradient. Every backend supports it: the three GEMMs save their
input tensor itself (torch._grouped_mm, the loop's split views, the Triton op's saved inputs), never a copy.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_dist.kernels.reference import grouped_gemm as loop_gemm

BACKENDS = ("auto", "grouped_mm", "loop", "triton")


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: torch._grouped_mm's backward rejects
    the strided gradients that views and reductions downstream can hand it."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _grouped_mm(x_NK: torch.Tensor, w_EKM: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    out = torch._grouped_mm(x_NK, w_EKM, offs=offsets_E)
    return _ContiguousGrad.apply(out)


def grouped_mm_supported(dim: int, hidden: int, dtype: torch.dtype) -> bool:
    align = 16 // torch.empty((), dtype=dtype).element_size()
    return hasattr(torch, "_grouped_mm") and dim % align == 0 and hidden % align == 0


def resolve_backend(name: str, dim: int, hidden: int, dtype: torch.dtype = torch.float32) -> str:
    if name not in BACKENDS:
        raise ValueError(f"moe.backend={name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "triton":
        from moe_dist.kernels._configs import unavailable_reason
        reason = unavailable_reason()
        if reason is not None:
            raise ValueError(f"moe.backend='triton': {reason}; or use backend 'auto' (grouped_mm) or 'loop'")
    if name == "grouped_mm" and not grouped_mm_supported(dim, hidden, dtype):
        align = 16 // torch.empty((), dtype=dtype).element_size()
        raise ValueError(f"moe.backend='grouped_mm' needs model.dim={dim} and moe.expert_hidden={hidden} "
                         f"to be multiples of {align} for {dtype}; use backend 'loop' or 'auto'")
    if name == "auto":
        return "grouped_mm" if grouped_mm_supported(dim, hidden, dtype) else "loop"
    return name


def rows_backend(requested: str) -> str:
    """Who moves the rows (permute/unpermute): "triton" or "torch". `moe.backend=triton` runs everything on
    Triton; `auto` takes the Triton row kernels whenever they run compiled on a visible CUDA GPU, beside
    torch._grouped_mm's GEMMs. Measured on one H200 (benchmarks/results/gpu_check.json): the Triton row kernels
    move 96-106% of a device copy's bandwidth, while the torch references (index gather + scatter-add) made the
    grouped_mm training run 20% slower than the Triton one although its GEMMs were 1.4x faster."""
    if requested == "triton":
        return "triton"
    if requested != "auto" or not torch.cuda.is_available():
        return "torch"
    from moe_dist.kernels._configs import HAS_TRITON, interpreting
    return "triton" if HAS_TRITON and not interpreting() else "torch"


def _select_gemm(backend: str):
    if backend == "triton":
        # Imported here: the kernel module decides compiled vs interpreted when it is first imported.
        from moe_dist.kernels.ops import grouped_gemm as triton_gemm
        return triton_gemm
    return _grouped_mm if backend == "grouped_mm" else loop_gemm


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """SwiGLU on a fused [gate | up] projection, or GELU."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


class _RecomputedActivation(torch.autograd.Function):
    """activate(h) that keeps only h for backward. Its output's memory is released by `GroupedExperts` once
    the second GEMM holds it; `state["graph"]`, set by the refill hook, is the recomputed (h leaf, output)
    pair that backward differentiates (recomputed here if the hook did not run)."""

    @staticmethod
    def forward(ctx, h, activation, state):
        ctx.save_for_backward(h)
        ctx.activation, ctx.state = activation, state
        return activate(h, activation)

    @staticmethod
    def backward(ctx, g):
        (h,) = ctx.saved_tensors
        h_leaf, out = ctx.state.pop("graph", None) or _recompute(h, ctx.activation)
        (gh,) = torch.autograd.grad(out, h_leaf, g)
        return gh, None, None


def _recompute(h: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        h_leaf = h.detach().requires_grad_(True)
        return h_leaf, activate(h_leaf, activation)


def _release(t: torch.Tensor) -> None:
    t.untyped_storage().resize_(0)


def _refill(t: torch.Tensor, data: torch.Tensor) -> None:
    """Put `data` back into `t`'s released memory. A storage copy, not `t.copy_`: the tensor's version counter
    must not move, or autograd would reject the saved reference as modified in place."""
    t.untyped_storage().resize_(data.untyped_storage().nbytes())
    with torch.no_grad():
        t.untyped_storage().copy_(data.untyped_storage())


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int, activation: str = "swiglu",
                 backend: str = "auto", recompute_activation: bool = False):
        super().__init__()
        if activation not in ("swiglu", "gelu"):
            raise ValueError(f"moe.activation={activation!r}: choose 'swiglu' or 'gelu'")
        self.num_experts, self.dim, self.hidden, self.activation = num_experts, dim, hidden, activation
        width = 2 * hidden if activation == "swiglu" else hidden
        self.w_in_EDF2 = nn.Parameter(torch.empty(num_experts, dim, width))
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.backend = resolve_backend(backend, dim, hidden)
        self._gemm = _select_gemm(self.backend)
        self.recompute_activation = recompute_activation
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.w_in_EDF2, std=std)
        nn.init.normal_(self.w_out_EFD, std=std if out_std is None else out_std)

    def forward(self, x_ND: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """x_ND holds rows grouped by expert; offsets_E (int32) are cumulative group ends."""
        h_NF2 = self._gemm(x_ND, self.w_in_EDF2, offsets_E)
        if self.recompute_activation and self.training and torch.is_grad_enabled() and h_NF2.requires_grad:
            return self._forward_recomputing(h_NF2, offsets_E)
        return self._gemm(activate(h_NF2, self.activation).contiguous(), self.w_out_EFD, offsets_E)

    def _forward_recomputing(self, h_NF2: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        state: dict = {}
        a_NF = _RecomputedActivation.apply(h_NF2, self.activation, state)    # fresh and contiguous
        y_ND = self._gemm(a_NF, self.w_out_EFD, offsets_E)
        _release(a_NF)          # the second GEMM keeps a reference for its weight gradient: data comes back below

        def refill(grad: torch.Tensor) -> None:
            # Backward has reached the experts' output: the second GEMM's backward is next and reads a_NF.
            state["graph"] = _recompute(h_NF2, self.activation)
            _refill(a_NF, state["graph"][1])

        y_ND.register_hook(refill)
        return y_ND

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, "
                f"activation={self.activation}, backend={self.backend}"
                + (", recompute_activation=True" if self.recompute_activation else ""))
