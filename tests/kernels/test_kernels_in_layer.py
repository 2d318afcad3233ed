"""The `triton` experts backend in the MoE layer at tiny fp32 shapes in triton's CPU interpreter
(TRITON_INTERPRET=1, set in tests/conftest.py): against a dense computation, and the whole dispatch →
experts → combine path on the Triton permute/unpermute kernels. The layer-level comparison with `loop`
is `tests/moe/test_experts.py::test_backend_matches_loop[...-triton]`.
"""
from __future__ import annotations

import pytest
import torch

from layer_helpers import D, DENSE_CASES, dense_reference, make_layer
from moe_dist.kernels import reference as ref
from moe_dist.kernels._configs import unavailable_reason
from moe_dist.moe.experts import GroupedExperts

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

@pytest.mark.parametrize("case", ["softmax_swiglu_k3_E6", "shared_experts_gelu_hidden"])
def test_triton_layer_equals_dense_computation(case: str) -> None:
    layer = make_layer(seed=3, backend="triton", **DENSE_CASES[case])
    x = torch.randn(2, 5, D)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    params = [layer.router.weight_ED, layer.experts.w_in_EDF2, layer.experts.w_out_EFD]
    y, _ = layer(x1)
    gy = torch.randn_like(y)
    g_layer = torch.autograd.grad((y * gy).sum(), [x1] + params)
    y_ref = dense_reference(layer, x2)
    g_ref = torch.autograd.grad((y_ref * gy).sum(), [x2] + params)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_layer, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,capacity", [(1, None), (2, 3), (6, None)])
def test_dispatch_experts_combine_on_kernels(k: int, capacity) -> None:
    """permute → triton experts → unpermute (the path the dispatcher takes with backend 'triton') equals
    the reference permute → loop experts → unpermute, output and every gradient."""
    from moe_dist.kernels import ops
    T, E, H, FH = 7, 8, 20, 12
    torch.manual_seed(k)
    loop = GroupedExperts(E, H, FH, backend="loop")
    with torch.no_grad():
        for p in loop.parameters():
            p.normal_(0.0, 0.5)
    tri = GroupedExperts(E, H, FH, backend="triton")
    tri.load_state_dict(loop.state_dict())
    indices_TK = torch.rand(T, E).argsort(-1)[:, :k]
    indices_TK[:4, 0] = 3                                      # a popular expert, so capacity drops
    keep_TK = None
    if capacity is not None:
        counts = torch.zeros(E, dtype=torch.long)
        keep_TK = torch.zeros(T, k, dtype=torch.bool)
        for t in range(T):
            for j in range(k):
                e = int(indices_TK[t, j])
                keep_TK[t, j] = bool(counts[e] < capacity)
                counts[e] += 1
        assert not keep_TK.all()
    pmap = ref.make_permute_map(indices_TK, E, keep_TK, capacity=capacity)
    x, w, gy = torch.randn(T, H), torch.rand(T, k), torch.randn(T, H)

    def run(experts, permute, unpermute):
        x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = unpermute(experts(permute(x1, pmap), pmap.offsets_E), pmap, w1)
        grads = torch.autograd.grad((y * gy).sum(), [x1, w1, *experts.parameters()])
        return [y.detach(), *grads]

    for a, b in zip(run(tri, ops.permute, ops.unpermute), run(loop, ref.permute, ref.unpermute)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
