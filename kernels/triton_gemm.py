"""Triton grouped GEMM over expert row groups: forward, dX and dW. Legend: N rows grouped by expert,
K input features, M output features, E experts; offsets_E holds int32 cumulative group ends.

    forward  out_NM[rows of e] = x_NK[rows of e] @ w_EKM[e]
    dX       dx_NK [rows of e] = dy_NM[rows of e] @ w_EKM[e]ᵀ     (the forward kernel on a transposed view)
    dW       dw_EKM[e]         = x_NK[rows of e]ᵀ @ dy_NM[rows of e]

Tiles: the forward grid is an upper bound on the row tiles, cdiv(N, BLOCK_M) + E + 1 (each group may
end in a partial tile; +1 for the rows past offsets[-1], which are written as zeros, as in the
reference). Each program finds its expert from the E offsets (a cumulative sum of tiles per group, in
registers), so no host sync and no torch-side tile map are needed, and the block size stays free for the
autotuner. Programs past the last tile exit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_dist.kernels._configs import (check_device, gemm_configs, prune_gemm_configs, prune_wgrad_configs,
                                      wgrad_configs)


@triton.jit
def _dot_precision(a, b, acc, IEEE: tl.constexpr):
    # fp32 inputs: full-precision dot (torch's default matmul precision, and the only one the
    # interpreter computes right); 16-bit inputs: tensor cores with fp32 accumulation.
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.autotune(configs=gemm_configs(), key=["K", "M", "E"],
                 prune_configs_by={"early_config_prune": prune_gemm_configs})
@triton.jit
def _grouped_gemm_kernel(x_ptr, w_ptr, out_ptr, offsets_ptr, N, K, M, E,
                         stride_xn, stride_xk, stride_we, stride_wk, stride_wm, stride_on, stride_om,
                         IEEE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Find this program's group from all E+1 group bounds at once (vector ops, no serial scan): group
    # i spans [starts[i], ends[i]); group E is the tail past offsets[-1], written as zeros; lanes past
    # E are empty.
    i = tl.arange(0, BLOCK_E)
    ends = tl.load(offsets_ptr + i, mask=i < E, other=N).to(tl.int32)
    starts = tl.load(offsets_ptr + i - 1, mask=(i > 0) & (i <= E), other=0).to(tl.int32)
    starts = tl.where(i > E, N, starts)
    tiles = tl.cdiv(ends - starts, BLOCK_M)
    cum_tiles = tl.cumsum(tiles, 0)
    if pid_tile >= tl.sum(tiles, 0):
        return
    sel_e = tl.sum((cum_tiles <= pid_tile).to(tl.int32), 0)
    this = i == sel_e
    sel_start = tl.sum(tl.where(this, starts, 0), 0)
    sel_end = tl.sum(tl.where(this, ends, 0), 0)
    sel_tile = pid_tile - tl.sum(tl.where(this, cum_tiles - tiles, 0), 0)
    rows = sel_start + sel_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < sel_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if sel_e < E:
        ks = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
        w_base = w_ptr + sel_e.to(tl.int64) * stride_we + cols[None, :] * stride_wm
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + ks) < K
            a = tl.load(x_rows + (k0 + ks)[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_base + (k0 + ks)[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot_precision(a, b, acc, IEEE)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_on + cols[None, :] * stride_om
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=wgrad_configs(), key=["K", "M", "E"],
                 prune_configs_by={"early_config_prune": prune_wgrad_configs})
@triton.jit
def _grouped_wgrad_kernel(x_ptr, dy_ptr, dw_ptr, offsets_ptr, K, M, E,
                          stride_xn, stride_xk, stride_dn, stride_dm, stride_we, stride_wk, stride_wm,
                          IEEE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_R: tl.constexpr):
    e = tl.program_id(0)
    pid = tl.program_id(1)
    n_m = tl.cdiv(M, BLOCK_M)
    ks = (pid // n_m) * BLOCK_K + tl.arange(0, BLOCK_K)
    ms = (pid % n_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_ok = ks < K
    m_ok = ms < M
    start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0).to(tl.int32)
    end = tl.load(offsets_ptr + e).to(tl.int32)
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    rs = tl.arange(0, BLOCK_R)
    # An empty group runs no iteration and stores zeros: its weights get no gradient.
    for r0 in range(start, end, BLOCK_R):
        rows = (r0 + rs).to(tl.int64)
        r_ok = (r0 + rs) < end
        xt = tl.load(x_ptr + rows[None, :] * stride_xn + ks[:, None] * stride_xk,
                     mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dn + ms[None, :] * stride_dm,
                     mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        acc = _dot_precision(xt, dy, acc, IEEE)
    out = dw_ptr + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk + ms[None, :] * stride_wm
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & m_ok[None, :])


def _check(x_NK: torch.Tensor, w_EKM: torch.Tensor, offsets_E: torch.Tensor) -> None:
    if x_NK.dim() != 2 or w_EKM.dim() != 3 or offsets_E.dim() != 1:
        raise ValueError(f"grouped_gemm wants x[N,K], w[E,K,M], offsets[E]; got {tuple(x_NK.shape)}, "
                         f"{tuple(w_EKM.shape)}, {tuple(offsets_E.shape)}")
    if x_NK.shape[1] != w_EKM.shape[1] or offsets_E.shape[0] != w_EKM.shape[0]:
        raise ValueError(f"grouped_gemm shapes disagree: x {tuple(x_NK.shape)}, w {tuple(w_EKM.shape)}, "
                         f"offsets {tuple(offsets_E.shape)}")
    if offsets_E.dtype != torch.int32:
        raise ValueError(f"grouped_gemm offsets must be int32 cumulative group ends, got {offsets_E.dtype}")
    if x_NK.dtype != w_EKM.dtype:
        raise ValueError(f"grouped_gemm dtypes differ: x {x_NK.dtype}, w {w_EKM.dtype}")
    check_device(x_NK, w_EKM, offsets_E)


def _launch_gemm(x_NK: torch.Tensor, w_EKM: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """x @ w per group for any strides of w (the dX pass hands in a transposed view)."""
    N, K = x_NK.shape
    E, _, M = w_EKM.shape
    out_NM = torch.empty(N, M, dtype=x_NK.dtype, device=x_NK.device)
    if N == 0 or M == 0:
        return out_NM
    if E == 0 or K == 0:
        return out_NM.zero_()

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]) + E + 1, triton.cdiv(M, meta["BLOCK_N"]))

    _grouped_gemm_kernel[grid](x_NK, w_EKM, out_NM, offsets_E, N, K, M, E,
                               x_NK.stride(0), x_NK.stride(1), *w_EKM.stride(), *out_NM.stride(),
                               IEEE=x_NK.dtype == torch.float32, BLOCK_E=triton.next_power_of_2(E + 1))
    return out_NM


def grouped_gemm(x_NK: torch.Tensor, w_EKM: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """out[rows of e] = x[rows of e] @ w[e]; rows past offsets[-1] are zero. Same contract as
    `reference.grouped_gemm`; no autograd here (see `ops.grouped_gemm`)."""
    _check(x_NK, w_EKM, offsets_E)
    return _launch_gemm(x_NK, w_EKM, offsets_E)


def grouped_gemm_dx(dy_NM: torch.Tensor, w_EKM: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """dx[rows of e] = dy[rows of e] @ w[e]ᵀ: the forward kernel on the transposed view, no copy."""
    w_EMK = w_EKM.transpose(1, 2)
    _check(dy_NM, w_EMK, offsets_E)
    return _launch_gemm(dy_NM, w_EMK, offsets_E)


def grouped_gemm_dw(x_NK: torch.Tensor, dy_NM: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """dw[e] = x[rows of e]ᵀ @ dy[rows of e]; experts with no rows get zeros."""
    if x_NK.dim() != 2 or dy_NM.dim() != 2 or x_NK.shape[0] != dy_NM.shape[0]:
        raise ValueError(f"grouped_gemm_dw wants x[N,K], dy[N,M]; got {tuple(x_NK.shape)}, {tuple(dy_NM.shape)}")
    if offsets_E.dtype != torch.int32:
        raise ValueError(f"grouped_gemm offsets must be int32 cumulative group ends, got {offsets_E.dtype}")
    check_device(x_NK, dy_NM, offsets_E)
    (N, K), M, E = x_NK.shape, dy_NM.shape[1], offsets_E.shape[0]
    dw_EKM = torch.empty(E, K, M, dtype=x_NK.dtype, device=x_NK.device)
    if dw_EKM.numel() == 0:
        return dw_EKM

    def grid(meta):
        return (E, triton.cdiv(K, meta["BLOCK_K"]) * triton.cdiv(M, meta["BLOCK_M"]))

    _grouped_wgrad_kernel[grid](x_NK, dy_NM, dw_EKM, offsets_E, K, M, E,
                                *x_NK.stride(), *dy_NM.stride(), *dw_EKM.stride(),
                                IEEE=x_NK.dtype == torch.float32)
    return dw_EKM
