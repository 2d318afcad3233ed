"""PyTorch references of the kernel contracts: permute (rows grouped by expert, with the row map and
per-expert offsets), unpermute (combine fused with the top-k weighting) and grouped GEMM (one matmul per
expert over its rows). Legend: T tokens, H hidden, K top-k, E experts, N permuted rows.

They are the semantics the Triton kernels must reproduce, and the implementation the CPU path uses:
plain torch ops. permute/unpermute carry hand-written backwards (gathers only, no scatter-add; see
_Permute/_Unpermute), tested against autograd through the naive formula in tests/kernels/test_reference_ops.py.

Row order: assignments are grouped by expert; inside an expert, by token then by slot. Experts are
numbered so that grouping by global expert id is also grouping by (destination EP rank, local expert).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class PermuteMap:
    row_TK: torch.Tensor        # int64 row of each assignment in the permuted tensor, -1 when dropped
    src_N: torch.Tensor         # int64 token of each permuted row, -1 for padding rows
    counts_E: torch.Tensor      # int64 real (unpadded) rows per expert
    offsets_E: torch.Tensor     # int32 cumulative row ends per expert, padding included
    num_rows: int               # N
    padded: bool = False        # some rows may be padding (src_N = -1): capacity or pad_multiple asked for


def make_permute_map(indices_TK: torch.Tensor, num_experts: int, keep_TK: Optional[torch.Tensor] = None,
                     pad_multiple: int = 1, capacity: Optional[int] = None) -> PermuteMap:
    """Plan the permutation. `capacity` pads every expert to exactly that many rows (static shapes);
    `pad_multiple` rounds each expert's group up to a multiple (GEMM block alignment)."""
    T, K = indices_TK.shape
    device = indices_TK.device
    flat_e = indices_TK.reshape(-1)
    if keep_TK is not None:
        # Dropped assignments sort after every real expert and are cut off below.
        flat_e = torch.where(keep_TK.reshape(-1), flat_e, torch.full_like(flat_e, num_experts))
    counts_E = torch.bincount(flat_e, minlength=num_experts + 1)[:num_experts]
    if capacity is not None:
        if int(counts_E.max()) > capacity if counts_E.numel() else False:  # host sync: input check only
            raise ValueError(f"an expert holds more than capacity={capacity} rows; apply capacity first")
        padded_E = torch.full_like(counts_E, capacity)
    elif pad_multiple > 1:
        padded_E = (counts_E + pad_multiple - 1) // pad_multiple * pad_multiple
    else:
        padded_E = counts_E
    ends_E = torch.cumsum(padded_E, 0)
    starts_E = ends_E - padded_E
    order = torch.argsort(flat_e, stable=True)          # (expert, token, slot) order
    sorted_e = flat_e[order]
    real = sorted_e < num_experts
    order, sorted_e = order[real], sorted_e[real]
    real_starts = torch.cumsum(counts_E, 0) - counts_E
    pos = torch.arange(order.numel(), device=device) - real_starts[sorted_e]
    rows = starts_E[sorted_e] + pos
    row_flat = torch.full((T * K,), -1, dtype=torch.long, device=device)
    row_flat[order] = rows
    # Host sync: the permuted tensor's size is data dependent (dropless routing).
    num_rows = int(ends_E[-1]) if num_experts else 0
    src_N = torch.full((num_rows,), -1, dtype=torch.long, device=device)
    src_N[rows] = order // K
    return PermuteMap(row_flat.view(T, K), src_N, counts_E, ends_E.to(torch.int32), num_rows,
                      padded=capacity is not None or pad_multiple > 1)


def _gather_sum(y_NH: torch.Tensor, row_TK: torch.Tensor, w_TK: torch.Tensor, out_dtype: torch.dtype
                ) -> torch.Tensor:
    """out[t] = Σ_k w[t,k]·y[row(t,k)] with w already zero where row = -1; accumulates in w's dtype.
    One [T,H] gather and one fused multiply-add per slot: no [T,K,H] temporary, no batched tiny GEMM."""
    T, K = row_TK.shape
    rows_TK = row_TK.clamp_min(0)
    out = y_NH.index_select(0, rows_TK[:, 0]).to(w_TK.dtype).mul_(w_TK[:, :1])
    # One scratch buffer for the other slots: on the CPU a fresh large tensor costs its page faults,
    # as much as the gather itself.
    tmp = y_NH.new_empty(out.shape) if K > 1 else None
    for k in range(1, K):
        torch.index_select(y_NH, 0, rows_TK[:, k], out=tmp)
        out.addcmul_(tmp.to(w_TK.dtype), w_TK[:, k:k + 1])
    return out.to(out_dtype)


def _row_weights(pmap_row_TK: torch.Tensor, w_TK: torch.Tensor, num_rows: int) -> torch.Tensor:
    """w_N: the combine weight of every permuted row (0 for padding rows)."""
    kept = pmap_row_TK.reshape(-1) >= 0
    w_N = w_TK.new_zeros(num_rows)
    w_N[pmap_row_TK.reshape(-1)[kept]] = w_TK.reshape(-1)[kept]
    return w_N


class _Permute(torch.autograd.Function):
    """Forward is a row gather. Backward sums each token's K row gradients by gathering them
    (dx[t] = Σ_k dy[row(t,k)]): autograd's index_select backward is an index_add, which on the CPU
    runs one slice add per row."""

    @staticmethod
    def forward(ctx, x_TH, src_N, row_TK, padded):
        ctx.save_for_backward(row_TK)
        ctx.num_tokens = x_TH.shape[0]
        if not padded:                                      # a pure gather
            return x_TH.index_select(0, src_N)
        if x_TH.shape[0] == 0:                              # only padding rows
            return x_TH.new_zeros(src_N.shape[0], x_TH.shape[1])
        out = x_TH.index_select(0, src_N.clamp_min(0))
        return out.masked_fill_((src_N < 0).unsqueeze(1), 0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_NH):
        (row_TK,) = ctx.saved_tensors
        T, H = ctx.num_tokens, dy_NH.shape[1]
        if dy_NH.shape[0] == 0 or T == 0:
            return dy_NH.new_zeros(T, H), None, None, None
        kept_TK = (row_TK >= 0).to(dy_NH.dtype)
        return _gather_sum(dy_NH, row_TK, kept_TK, dy_NH.dtype), None, None, None


class _Unpermute(torch.autograd.Function):
    """y_TH[t] = Σ_k w[t,k]·y[row(t,k)]. Backward works per permuted row n of token t = src(n):
    dy[n] = w_n·g[t] and dw_n = <g[t], y[n]>, both from one gather of g (rows are distinct, so no
    scatter-add is needed)."""

    @staticmethod
    def forward(ctx, y_NH, row_TK, src_N, weights_TK):
        w_TK = weights_TK * (row_TK >= 0)
        ctx.save_for_backward(y_NH, row_TK, src_N, weights_TK)
        T, K = row_TK.shape
        if y_NH.shape[0] == 0 or T == 0:
            return y_NH.new_zeros(T, y_NH.shape[1])
        return _gather_sum(y_NH, row_TK, w_TK, y_NH.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_TH):
        y_NH, row_TK, src_N, weights_TK = ctx.saved_tensors
        N = y_NH.shape[0]
        if N == 0 or row_TK.shape[0] == 0:
            return torch.zeros_like(y_NH), None, None, torch.zeros_like(weights_TK)
        w_N = _row_weights(row_TK, weights_TK.detach(), N)
        g_NH = g_TH.index_select(0, src_N.clamp_min(0)).to(w_N.dtype)    # padding rows: w_N = 0 below
        dy = dw = None
        if ctx.needs_input_grad[3]:
            # Row-wise dot products without an [N,H] temporary (einsum lowers to a batched GEMV); first,
            # because dy below reuses g_NH's memory.
            dw_N = torch.einsum("nh,nh->n", g_NH, y_NH.to(g_NH.dtype))   # padding rows: never read below
            kept_TK = row_TK >= 0
            dw = (dw_N.index_select(0, row_TK.clamp_min(0).reshape(-1)).view_as(row_TK) * kept_TK)
            dw = dw.to(weights_TK.dtype)
        if ctx.needs_input_grad[0]:
            dy = g_NH.mul_(w_N.unsqueeze(1)).to(y_NH.dtype)             # in place: no second [N,H] buffer
        return dy, None, None, dw


def permute(x_TH: torch.Tensor, pmap: PermuteMap) -> torch.Tensor:
    """Rows grouped by expert; padding rows are zero."""
    return _Permute.apply(x_TH, pmap.src_N, pmap.row_TK, pmap.padded)


def unpermute(y_NH: torch.Tensor, pmap: PermuteMap, weights_TK: torch.Tensor) -> torch.Tensor:
    """y_TH[t] = Σ_k w[t,k]·y[row(t,k)], dropped assignments contribute nothing. Accumulates in the
    weights' dtype (fp32 router weights), returns y's dtype."""
    return _Unpermute.apply(y_NH, pmap.row_TK, pmap.src_N, weights_TK)


def grouped_gemm(x_NK: torch.Tensor, w_EKM: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """out[rows of e] = x[rows of e] @ w[e]; rows past offsets[-1] are zero."""
    ends = offsets_E.tolist()                  # host sync: the loop needs the group bounds
    # split/unbind and one cat, never slices, indexing or slice writes: the backward of each of those
    # allocates a gradient the size of the whole operand, which made the loop O(E·N·M) in backward.
    sizes, start = [], 0
    for end in ends:
        sizes.append(max(end - start, 0))
        start = max(start, end)
    tail = x_NK.shape[0] - start
    xs = x_NK.split(sizes + [tail])
    parts = [x_e @ w_e for x_e, w_e, n in zip(xs, w_EKM.unbind(0), sizes) if n > 0]
    if tail or not parts:
        parts.append(x_NK.new_zeros(tail, w_EKM.shape[2]))
    return torch.cat(parts) if len(parts) > 1 else parts[0]
