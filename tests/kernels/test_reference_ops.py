"""The reference permute/unpermute (kernels/reference.py) carry hand-written backwards for speed; here they
are checked against autograd through the naive formulas they replace, in fp32 and with a bf16 y:
dropless, dropped assignments, padding to capacity and to a block multiple, an empty batch."""
from __future__ import annotations

import pytest
import torch

from moe_dist.kernels import reference as ref


def naive_permute(x_TH, pmap):
    valid = pmap.src_N >= 0
    out = x_TH.new_zeros(pmap.num_rows, x_TH.shape[1])
    return out.index_copy(0, valid.nonzero().squeeze(1), x_TH.index_select(0, pmap.src_N[valid]))


def naive_unpermute(y_NH, pmap, w_TK):
    T, K = pmap.row_TK.shape
    kept = pmap.row_TK >= 0
    gathered = y_NH.index_select(0, pmap.row_TK.clamp_min(0).reshape(-1)).view(T, K, -1)
    return torch.einsum("tkh,tk->th", gathered.to(w_TK.dtype), w_TK * kept).to(y_NH.dtype)


CASES = {
    "dropless_k2": dict(T=37, E=5, K=2),
    "dropless_k1": dict(T=20, E=3, K=1),
    "dropped_k3": dict(T=29, E=6, K=3, drop=0.3),
    "capacity_pad": dict(T=24, E=4, K=2, drop=0.2, capacity=14),
    "pad_multiple": dict(T=19, E=4, K=2, pad_multiple=8),
    "one_expert": dict(T=9, E=1, K=1),
    "hot_expert": dict(T=16, E=4, K=2, hot=True),
}


def make(case, dtype=torch.float32, seed=0):
    c = CASES[case]
    g = torch.Generator().manual_seed(seed)
    T, E, K, H = c["T"], c["E"], c["K"], 12
    idx = torch.rand(T, E, generator=g).argsort(-1)[:, :K]
    if c.get("hot"):
        idx[:, 0] = 0
    keep = torch.rand(T, K, generator=g) > c["drop"] if "drop" in c else None
    if keep is not None and "capacity" in c:
        # Keep at most `capacity` rows per expert, as apply_capacity guarantees.
        flat = torch.where(keep.reshape(-1), idx.reshape(-1), torch.full_like(idx.reshape(-1), E))
        seen = torch.zeros(E + 1, dtype=torch.long)
        for i, e in enumerate(flat.tolist()):
            seen[e] += 1
            if e < E and seen[e] > c["capacity"]:
                keep.view(-1)[i] = False
    pmap = ref.make_permute_map(idx, E, keep, pad_multiple=c.get("pad_multiple", 1), capacity=c.get("capacity"))
    x = torch.randn(T, H, generator=g).to(dtype)
    w = torch.rand(T, K, generator=g)
    return pmap, x, w


@pytest.mark.parametrize("case", sorted(CASES))
def test_permute_forward_and_grad_match_naive(case) -> None:
    pmap, x, _ = make(case)
    gy = torch.randn(pmap.num_rows, x.shape[1])
    outs = []
    for fn in (ref.permute, naive_permute):
        xx = x.clone().requires_grad_()
        y = fn(xx, pmap)
        (y * gy).sum().backward()
        outs.append((y.detach(), xx.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_unpermute_forward_and_grads_match_naive(case, dtype) -> None:
    pmap, x, w = make(case, dtype)
    y = torch.randn(pmap.num_rows, x.shape[1]).to(dtype)
    g = torch.randn(x.shape).to(dtype)
    outs = []
    for fn in (ref.unpermute, naive_unpermute):
        yy, ww = y.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(yy, pmap, ww)
        (out.float() * g.float()).sum().backward()
        outs.append((out.detach(), yy.grad, ww.grad))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert outs[0][0].dtype == dtype
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, **tol)
    # Padding rows and rows of dropped assignments get no gradient.
    assert torch.all(outs[0][1][pmap.src_N < 0] == 0)


def test_empty_batch() -> None:
    pmap = ref.make_permute_map(torch.zeros(0, 2, dtype=torch.long), 4, capacity=3)
    x = torch.zeros(0, 8, requires_grad=True)
    y = ref.permute(x, pmap)
    assert y.shape == (12, 8) and torch.all(y == 0)
    w = torch.zeros(0, 2, requires_grad=True)
    out = ref.unpermute(y, pmap, w)
    assert out.shape == (0, 8)
    (y.sum() + out.sum()).backward()
    assert x.grad.shape == (0, 8)
