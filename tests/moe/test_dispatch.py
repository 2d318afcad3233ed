"""Dispatch (moe_dist.moe.dispatch): pad_to_capacity's offsets, zero rows and unchanged output.
"""
from __future__ import annotations

import pytest
import torch

from layer_helpers import D, clone_layer, make_layer, run_fwd_bwd
from moe_dist.kernels.reference import make_permute_map
from moe_dist.moe.capacity import apply_capacity
from moe_dist.moe.dispatch import LocalDispatcher


def test_pad_to_capacity_offsets_and_output() -> None:
    E, C = 4, 5
    idx = torch.tensor([[0, 1], [0, 2], [1, 2], [0, 3], [2, 0]])
    keep = apply_capacity(idx, torch.rand(5, 2), E, C, "position").keep_TK
    pmap = make_permute_map(idx, E, keep, capacity=C)
    assert pmap.offsets_E.dtype == torch.int32
    assert pmap.offsets_E.tolist() == [C, 2 * C, 3 * C, 4 * C] and pmap.num_rows == E * C
    disp = LocalDispatcher(E, pad_to_capacity=True)
    x = torch.randn(5, D)
    x_ND, offs, meta = disp.dispatch(x, idx, torch.rand(5, 2), None, C)
    assert offs.tolist() == [C, 2 * C, 3 * C, 4 * C]
    assert x_ND.shape == (E * C, D)
    assert int((meta.pmap.src_N < 0).sum()) == E * C - 10 and (x_ND[meta.pmap.src_N < 0] == 0).all()
    with pytest.raises(ValueError, match="capacity"):
        make_permute_map(torch.zeros(3, 1, dtype=torch.long), 2, capacity=2)


@pytest.mark.parametrize("backend", ["loop", "auto"])
def test_pad_to_capacity_same_output_as_unpadded(backend: str) -> None:
    base = make_layer(seed=8, num_experts=4, top_k=2, capacity_factor=1.0, backend=backend)
    padded = clone_layer(base, pad_to_capacity=True)
    x = torch.randn(2, 6, D)
    gy = torch.randn(2, 6, D)
    y0, s0, g0 = run_fwd_bwd(base, x, gy)
    y1, s1, g1 = run_fwd_bwd(padded, x, gy)
    assert int(s0.dropped.sum()) > 0  # the case exercises drops
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    assert torch.equal(s0.tokens_per_expert, s1.tokens_per_expert) and torch.equal(s0.dropped, s1.dropped)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6)
