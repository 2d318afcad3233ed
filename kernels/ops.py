"""The Triton kernels as differentiable torch ops, with the references' signatures. Legend: T tokens,
H hidden, K top-k (for permute/unpermute) or input features (for the GEMM), M output features,
E experts, N permuted rows.

Each kernel is a `torch.library.custom_op` (namespace `moe_dist`) with a fake (shape-only) twin and a
registered autograd formula whose backward is itself a custom op, so `torch.compile` traces forward
and backward without graph breaks and never looks inside a kernel.

    grouped_gemm(x_NK, w_EKM, offsets_E) -> [N, M]       == reference.grouped_gemm
    permute(x_TH, pmap)                  -> [N, H]       == reference.permute
    unpermute(y_NH, pmap, weights_TK)    -> [T, H]       == reference.unpermute

The experts' SwiGLU MLP on these GEMMs is `moe_dist.moe.experts.GroupedExperts(backend="triton")`.
"""
from __future__ import annotations

import torch

from moe_dist.kernels import triton_gemm, triton_permute
from moe_dist.kernels.reference import PermuteMap

Tensor = torch.Tensor

# ------------------------------------------------------------------------------------------ grouped GEMM


@torch.library.custom_op("moe_dist::grouped_gemm", mutates_args=())
def _grouped_gemm(x_NK: Tensor, w_EKM: Tensor, offsets_E: Tensor) -> Tensor:
    return triton_gemm.grouped_gemm(x_NK, w_EKM, offsets_E)


@_grouped_gemm.register_fake
def _(x_NK, w_EKM, offsets_E):
    return x_NK.new_empty(x_NK.shape[0], w_EKM.shape[2])


@torch.library.custom_op("moe_dist::grouped_gemm_dx", mutates_args=())
def _grouped_gemm_dx(dy_NM: Tensor, w_EKM: Tensor, offsets_E: Tensor) -> Tensor:
    return triton_gemm.grouped_gemm_dx(dy_NM, w_EKM, offsets_E)


@_grouped_gemm_dx.register_fake
def _(dy_NM, w_EKM, offsets_E):
    return dy_NM.new_empty(dy_NM.shape[0], w_EKM.shape[1])


@torch.library.custom_op("moe_dist::grouped_gemm_dw", mutates_args=())
def _grouped_gemm_dw(x_NK: Tensor, dy_NM: Tensor, offsets_E: Tensor) -> Tensor:
    return triton_gemm.grouped_gemm_dw(x_NK, dy_NM, offsets_E)


@_grouped_gemm_dw.register_fake
def _(x_NK, dy_NM, offsets_E):
    return x_NK.new_empty(offsets_E.shape[0], x_NK.shape[1], dy_NM.shape[1])


def _gemm_setup(ctx, inputs, output):
    x_NK, w_EKM, offsets_E = inputs
    ctx.save_for_backward(x_NK, w_EKM, offsets_E)


def _gemm_backward(ctx, dy_NM):
    x_NK, w_EKM, offsets_E = ctx.saved_tensors
    dx = _grouped_gemm_dx(dy_NM, w_EKM, offsets_E) if ctx.needs_input_grad[0] else None
    dw = _grouped_gemm_dw(x_NK, dy_NM, offsets_E) if ctx.needs_input_grad[1] else None
    return dx, dw, None


_grouped_gemm.register_autograd(_gemm_backward, setup_context=_gemm_setup)

# ------------------------------------------------------------------------------------------ permute


@torch.library.custom_op("moe_dist::permute", mutates_args=())
def _permute(x_TH: Tensor, src_N: Tensor, row_TK: Tensor) -> Tensor:
    return triton_permute.permute_rows(x_TH, src_N)


@_permute.register_fake
def _(x_TH, src_N, row_TK):
    return x_TH.new_empty(src_N.shape[0], x_TH.shape[1])


@torch.library.custom_op("moe_dist::permute_backward", mutates_args=())
def _permute_backward(dy_NH: Tensor, row_TK: Tensor) -> Tensor:
    return triton_permute.combine_rows(dy_NH, row_TK)


@_permute_backward.register_fake
def _(dy_NH, row_TK):
    return dy_NH.new_empty(row_TK.shape[0], dy_NH.shape[1])


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])


def _permute_bwd(ctx, dy_NH):
    (row_TK,) = ctx.saved_tensors
    return _permute_backward(dy_NH, row_TK), None, None


_permute.register_autograd(_permute_bwd, setup_context=_permute_setup)

# ------------------------------------------------------------------------------------------ unpermute


@torch.library.custom_op("moe_dist::unpermute", mutates_args=())
def _unpermute(y_NH: Tensor, row_TK: Tensor, src_N: Tensor, weights_TK: Tensor) -> Tensor:
    return triton_permute.combine_rows(y_NH, row_TK, weights_TK)


@_unpermute.register_fake
def _(y_NH, row_TK, src_N, weights_TK):
    return y_NH.new_empty(row_TK.shape[0], y_NH.shape[1])


@torch.library.custom_op("moe_dist::unpermute_backward", mutates_args=())
def _unpermute_backward(g_TH: Tensor, y_NH: Tensor, row_TK: Tensor, src_N: Tensor,
                        weights_TK: Tensor) -> tuple[Tensor, Tensor]:
    return triton_permute.unpermute_backward(g_TH, y_NH, row_TK, src_N, weights_TK)


@_unpermute_backward.register_fake
def _(g_TH, y_NH, row_TK, src_N, weights_TK):
    return torch.empty_like(y_NH), torch.empty_like(weights_TK)


def _unpermute_setup(ctx, inputs, output):
    y_NH, row_TK, src_N, weights_TK = inputs
    ctx.save_for_backward(y_NH, row_TK, src_N, weights_TK)


def _unpermute_bwd(ctx, g_TH):
    y_NH, row_TK, src_N, weights_TK = ctx.saved_tensors
    dy_NH, dw_TK = _unpermute_backward(g_TH, y_NH, row_TK, src_N, weights_TK)
    return dy_NH, None, None, dw_TK


_unpermute.register_autograd(_unpermute_bwd, setup_context=_unpermute_setup)

# ------------------------------------------------------------------------------------------ public API


def grouped_gemm(x_NK: Tensor, w_EKM: Tensor, offsets_E: Tensor) -> Tensor:
    """out[rows of e] = x[rows of e] @ w[e]; rows past offsets[-1] are zero. Differentiable in x and w."""
    return _grouped_gemm(x_NK, w_EKM, offsets_E)


def permute(x_TH: Tensor, pmap: PermuteMap) -> Tensor:
    """Rows grouped by expert (padding rows zero); backward is the gather-add kernel."""
    return _permute(x_TH, pmap.src_N, pmap.row_TK)


def unpermute(y_NH: Tensor, pmap: PermuteMap, weights_TK: Tensor) -> Tensor:
    """y_TH[t] = Σ_k w[t,k]·y[row(t,k)], dropped assignments contribute nothing; returns y's dtype.
    Backward gives the gradients of y and of the router weights."""
    return _unpermute(y_NH, pmap.row_TK, pmap.src_N, weights_TK)

