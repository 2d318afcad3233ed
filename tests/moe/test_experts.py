"""Expert backends (moe_dist.moe.experts): grouped_mm and triton equal the loop, outputs and every gradient.

fp32 and small shapes; every check compares against an independent computation.
"""
from __future__ import annotations

import pytest
import torch

from layer_helpers import D, FH, dominant_router, clone_layer, make_layer, run_fwd_bwd
from moe_dist.moe.experts import grouped_mm_supported


BACKEND_CASES = {
    # name: (layer kwargs, x shape, positive input, dominant expert)
    "dropless": (dict(num_experts=4, top_k=2), (2, 6, D), False, None),
    "cap1.0": (dict(num_experts=4, top_k=2, capacity_factor=1.0), (2, 6, D), False, None),
    "cap1.0_position": (dict(num_experts=4, top_k=2, capacity_factor=1.0, drop_policy="position"),
                        (2, 6, D), False, None),
    "more_experts_than_tokens": (dict(num_experts=16, top_k=2), (1, 3, D), False, None),
    "more_experts_than_tokens_cap": (dict(num_experts=16, top_k=2, capacity_factor=1.0, min_capacity=1),
                                     (1, 3, D), False, None),
    "one_token": (dict(num_experts=4, top_k=2), (1, 1, D), False, None),
    "one_expert_takes_all": (dict(num_experts=4, top_k=1), (2, 5, D), True, 0),
    "one_expert_takes_all_cap": (dict(num_experts=4, top_k=1, capacity_factor=1.0), (2, 5, D), True, 0),
    "single_expert": (dict(num_experts=1, top_k=1), (2, 3, D), False, None),
    "topk_equals_E": (dict(num_experts=4, top_k=4, renormalize=True), (2, 3, D), False, None),
    "shared_zloss_aux": (dict(num_experts=4, top_k=2, num_shared_experts=1, z_loss_coef=1e-2,
                              aux_loss_coef=1e-2), (2, 4, D), False, None),
    "gelu_sigmoid_bias": (dict(num_experts=8, top_k=2, activation="gelu", score_func="sigmoid",
                               expert_bias=True, renormalize=True), (2, 4, D), False, None),
}


def _triton_missing():
    from moe_dist.kernels._configs import unavailable_reason
    return unavailable_reason()


# The triton backend runs in the interpreter on the CPU: a spread of the cases keeps the suite fast (drops by
# both policies, empty experts, one token, all tokens to one expert, one expert, shared experts with both
# losses, GELU with sigmoid scores).
TRITON_CASES = ["cap1.0_position", "more_experts_than_tokens", "one_token", "one_expert_takes_all_cap",
                "single_expert", "shared_zloss_aux", "gelu_sigmoid_bias"]
BACKEND_PARAMS = (
    [pytest.param(c, "grouped_mm", marks=pytest.mark.skipif(not grouped_mm_supported(D, FH, torch.float32),
                                                            reason="torch._grouped_mm unavailable"))
     for c in BACKEND_CASES]
    + [pytest.param(c, "triton", marks=pytest.mark.skipif(_triton_missing() is not None,
                                                          reason=str(_triton_missing())))
       for c in TRITON_CASES])


@pytest.mark.parametrize("case,backend", BACKEND_PARAMS)
def test_backend_matches_loop(case: str, backend: str) -> None:
    kw, shape, positive, dominant = BACKEND_CASES[case]
    ref = make_layer(seed=1, backend="loop", **kw)
    if dominant is not None:
        dominant_router(ref, dominant)
    if ref.router.expert_bias_E is not None:
        ref.router.expert_bias_E.copy_(torch.linspace(-0.3, 0.3, ref.cfg.num_experts))
    gmm = clone_layer(ref, backend=backend)
    assert ref.experts.backend == "loop" and gmm.experts.backend == backend
    torch.manual_seed(2)
    x = torch.randn(shape)
    if positive:
        x = x.abs() + 0.1
    gy = torch.randn(shape)
    y1, s1, g1 = run_fwd_bwd(ref, x, gy)
    y2, s2, g2 = run_fwd_bwd(gmm, x, gy)
    if dominant is not None:  # the crafted case really sends every token to one expert
        assert int(s1.tokens_per_expert[dominant] + s1.dropped[dominant]) == x.shape[0] * x.shape[1]
    if case == "more_experts_than_tokens":
        assert (s1.tokens_per_expert == 0).any()
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
    assert torch.equal(s1.tokens_per_expert, s2.tokens_per_expert) and torch.equal(s1.dropped, s2.dropped)
    assert set(g1) == set(g2)
    expected = {"input", "router.weight_ED", "experts.w_in_EDF2", "experts.w_out_EFD"}
    if ref.shared is not None:
        expected |= {"shared.w_in.weight", "shared.w_out.weight"}
    assert expected <= set(g1)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-5, msg=f"grad {name} ({case})")
    assert g1["experts.w_in_EDF2"].abs().sum() > 0  # gradients actually flow


def test_rows_backend_auto_takes_triton_rows_only_on_a_compiled_gpu(monkeypatch):
    """moe.backend=auto moves the rows with the Triton kernels where they run compiled (a CUDA GPU) and with the
    torch references elsewhere; triton always uses them, grouped_mm and loop never."""
    from moe_dist.kernels import _configs
    from moe_dist.moe.experts import rows_backend
    assert rows_backend("triton") == "triton"
    for name in ("grouped_mm", "loop"):
        assert rows_backend(name) == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rows_backend("auto") == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_configs, "interpreting", lambda: False)
    assert rows_backend("auto") == ("triton" if _configs.HAS_TRITON else "torch")
    monkeypatch.setattr(_configs, "interpreting", lambda: True)      # interpreter: correctness only, never auto
    assert rows_backend("auto") == "torch"
