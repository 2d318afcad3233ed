"""Triton row movers for dispatch and combine. Legend: T tokens, H hidden, K top-k, N permuted rows.
The plan (`reference.make_permute_map`) stays in torch; these kernels move the data.

    permute            out_NH[n]    = x_TH[src_N[n]]            (zeros where src_N[n] = -1: padding)
    permute backward   dx_TH[t]     = Σ_k dy_NH[row_TK[t,k]]    (gather-add; row -1 = dropped)
    unpermute          out_TH[t]    = Σ_k w_TK[t,k]·y_NH[row_TK[t,k]]
    unpermute backward dy_NH[row]   = w_TK[t,k]·g_TH[t];  dw_TK[t,k] = <g_TH[t], y_NH[row_TK[t,k]]>

One program per output row, looping over H in BLOCK_H columns: every row is read once and written
once, which is what a bandwidth-bound kernel can do best. Sums over k accumulate in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from moe_dist.kernels._configs import check_device, rows_configs


@triton.autotune(configs=rows_configs(), key=["H"])
@triton.jit
def _gather_rows_kernel(x_ptr, src_ptr, out_ptr, H, stride_x, stride_o, BLOCK_H: tl.constexpr):
    n = tl.program_id(0)
    src = tl.load(src_ptr + n)
    cols = tl.arange(0, BLOCK_H)
    # Vector form of `src >= 0`: the interpreter rejects a scalar mask broadcast against a vector.
    real = (cols * 0 + src) >= 0
    for h0 in range(0, H, BLOCK_H):
        ok = (h0 + cols) < H
        v = tl.load(x_ptr + src * stride_x + h0 + cols, mask=ok & real, other=0.0)
        tl.store(out_ptr + n.to(tl.int64) * stride_o + h0 + cols, v, mask=ok)


@triton.autotune(configs=rows_configs(), key=["H", "K"])
@triton.jit
def _combine_kernel(y_ptr, row_ptr, w_ptr, out_ptr, K, H, stride_y, stride_o,
                    HAS_W: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    for h0 in range(0, H, BLOCK_H):
        ok = (h0 + cols) < H
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for k in range(0, K):
            row = tl.load(row_ptr + t * K + k)
            kept = ok & ((cols * 0 + row) >= 0)      # vector mask, as in _gather_rows_kernel
            v = tl.load(y_ptr + row * stride_y + h0 + cols, mask=kept, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(w_ptr + t * K + k).to(tl.float32)
            acc += v
        tl.store(out_ptr + t.to(tl.int64) * stride_o + h0 + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.autotune(configs=rows_configs(), key=["H", "K"])
@triton.jit
def _unpermute_bwd_kernel(g_ptr, y_ptr, row_ptr, w_ptr, gy_ptr, gw_ptr, K, H, stride_g, stride_y, stride_gy,
                          BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    for k in range(0, K):
        row = tl.load(row_ptr + t * K + k)
        w = tl.load(w_ptr + t * K + k).to(tl.float32)
        dot = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            ok = (h0 + cols) < H
            kept = ok & ((cols * 0 + row) >= 0)      # vector mask, as in _gather_rows_kernel
            g = tl.load(g_ptr + t.to(tl.int64) * stride_g + h0 + cols, mask=kept, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + row * stride_y + h0 + cols, mask=kept, other=0.0).to(tl.float32)
            tl.store(gy_ptr + row * stride_gy + h0 + cols, (w * g).to(gy_ptr.dtype.element_ty), mask=kept)
            dot += g * y
        # A dropped assignment (row -1) reads nothing, so its weight's gradient is 0.
        tl.store(gw_ptr + t * K + k, tl.sum(dot, axis=0).to(gw_ptr.dtype.element_ty))


@triton.jit
def _zero_padding_rows_kernel(src_ptr, out_ptr, H, stride_o, BLOCK_H: tl.constexpr):
    # Rows no assignment maps to (capacity / block padding) get no store in the scatter above.
    n = tl.program_id(0)
    if tl.load(src_ptr + n) < 0:
        cols = tl.arange(0, BLOCK_H)
        zeros = tl.zeros((BLOCK_H,), dtype=out_ptr.dtype.element_ty)
        for h0 in range(0, H, BLOCK_H):
            tl.store(out_ptr + n.to(tl.int64) * stride_o + h0 + cols, zeros, mask=(h0 + cols) < H)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels take a row stride only: columns must be dense.
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_map(row_TK: torch.Tensor, src_N: torch.Tensor) -> None:
    if row_TK.dim() != 2 or src_N.dim() != 1:
        raise ValueError(f"permute map wants row_TK[T,K] and src_N[N]; got {tuple(row_TK.shape)}, "
                         f"{tuple(src_N.shape)}")
    if row_TK.dtype != torch.int64 or src_N.dtype != torch.int64:
        raise ValueError(f"permute map indices must be int64, got {row_TK.dtype}, {src_N.dtype}")


def permute_rows(x_TH: torch.Tensor, src_N: torch.Tensor) -> torch.Tensor:
    """out[n] = x[src[n]], zero rows where src[n] = -1."""
    if x_TH.dim() != 2 or src_N.dim() != 1 or src_N.dtype != torch.int64:
        raise ValueError(f"permute wants x[T,H] and int64 src[N]; got {tuple(x_TH.shape)}, "
                         f"{tuple(src_N.shape)} {src_N.dtype}")
    check_device(x_TH, src_N)
    x_TH = _rows_contiguous(x_TH)
    H = x_TH.shape[1]
    out_NH = torch.empty(src_N.shape[0], H, dtype=x_TH.dtype, device=x_TH.device)
    if out_NH.numel():
        _gather_rows_kernel[(src_N.shape[0],)](x_TH, src_N, out_NH, H, x_TH.stride(0), out_NH.stride(0))
    return out_NH


def combine_rows(y_NH: torch.Tensor, row_TK: torch.Tensor, weights_TK: Optional[torch.Tensor] = None,
                 out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """out[t] = Σ_k w[t,k]·y[row[t,k]] (w = 1 when None: the permute backward); rows -1 skipped."""
    if y_NH.dim() != 2 or row_TK.dim() != 2 or row_TK.dtype != torch.int64:
        raise ValueError(f"combine wants y[N,H] and int64 row[T,K]; got {tuple(y_NH.shape)}, "
                         f"{tuple(row_TK.shape)} {row_TK.dtype}")
    if weights_TK is not None and weights_TK.shape != row_TK.shape:
        raise ValueError(f"weights {tuple(weights_TK.shape)} must match the row map {tuple(row_TK.shape)}")
    check_device(y_NH, row_TK)
    y_NH, row_TK = _rows_contiguous(y_NH), row_TK.contiguous()
    (T, K), H = row_TK.shape, y_NH.shape[1]
    out_TH = torch.empty(T, H, dtype=out_dtype or y_NH.dtype, device=y_NH.device)
    if out_TH.numel():
        w = row_TK if weights_TK is None else weights_TK.contiguous()   # unread when HAS_W is False
        _combine_kernel[(T,)](y_NH, row_TK, w, out_TH, K, H, y_NH.stride(0), out_TH.stride(0),
                              HAS_W=weights_TK is not None)
    return out_TH


def unpermute_backward(g_TH: torch.Tensor, y_NH: torch.Tensor, row_TK: torch.Tensor, src_N: torch.Tensor,
                       weights_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `combine_rows(y, row, w)` given g = d out: (dy [N,H], dw [T,K])."""
    _check_map(row_TK, src_N)
    check_device(g_TH, y_NH, row_TK, src_N, weights_TK)
    g_TH, y_NH = _rows_contiguous(g_TH), _rows_contiguous(y_NH)
    row_TK, weights_TK = row_TK.contiguous(), weights_TK.contiguous()
    (T, K), (N, H) = row_TK.shape, y_NH.shape
    gy_NH = torch.empty(N, H, dtype=y_NH.dtype, device=y_NH.device)
    gw_TK = torch.empty(T, K, dtype=weights_TK.dtype, device=weights_TK.device)
    if N and H:
        _zero_padding_rows_kernel[(N,)](src_N, gy_NH, H, gy_NH.stride(0), BLOCK_H=_zero_block(H))
    if T and K:
        _unpermute_bwd_kernel[(T,)](g_TH, y_NH, row_TK, weights_TK, gy_NH, gw_TK, K, H,
                                    g_TH.stride(0), y_NH.stride(0), gy_NH.stride(0))
    return gy_NH, gw_TK


def _zero_block(H: int) -> int:
    return min(triton.next_power_of_2(max(H, 1)), 1024)
