"""PyTorch references of the kernel contracts (see DESIGN.md, "Kernels"). Legend: T tokens, H hidden,
K top-k, E experts, N permuted rows.

They are the semantics the Triton kernels must reproduce, and the implementation the CPU path uses:
plain differentiable torch ops, so autograd gives every gradient.

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
    return PermuteMap(row_flat.view(T, K), src_N, counts_E, ends_E.to(torch.int32), num_rows)


def permute(x_TH: torch.Tensor, pmap: PermuteMap) -> torch.Tensor:
    """Rows grouped by expert; padding rows are zero."""
    if pmap.num_rows == int(pmap.counts_E.sum()):        # no padding: a pure gather
        return x_TH.index_select(0, pmap.src_N)
    valid = pmap.src_N >= 0
    out = x_TH.new_zeros(pmap.num_rows, x_TH.shape[1])
    return out.index_copy(0, valid.nonzero().squeeze(1), x_TH.index_select(0, pmap.src_N[valid]))


def unpermute(y_NH: torch.Tensor, pmap: PermuteMap, weights_TK: torch.Tensor) -> torch.Tensor:
    """y_TH[t] = Σ_k w[t,k]·y[row(t,k)], dropped assignments contribute nothing. Accumulates in the
    weights' dtype (fp32 router weights), returns y's dtype."""
    T, K = pmap.row_TK.shape
    kept_TK = pmap.row_TK >= 0
    rows = pmap.row_TK.clamp_min(0).reshape(-1)
    H = y_NH.shape[1]
    gathered = y_NH.index_select(0, rows).view(T, K, H) if y_NH.shape[0] else y_NH.new_zeros(T, K, H)
    w_TK = weights_TK * kept_TK
    out = torch.einsum("tkh,tk->th", gathered.to(w_TK.dtype), w_TK)
    return out.to(y_NH.dtype)


def grouped_gemm(x_NK: torch.Tensor, w_EKM: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """out[rows of e] = x[rows of e] @ w[e]; rows past offsets[-1] are zero."""
    ends = offsets_E.tolist()                  # host sync: the loop needs the group bounds
    out = x_NK.new_zeros(x_NK.shape[0], w_EKM.shape[2])
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            out[start:end] = x_NK[start:end] @ w_EKM[e]
        start = end
    return out
