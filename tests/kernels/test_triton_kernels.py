"""Triton kernels against their PyTorch references: forward and every gradient. Legend: T tokens,
H hidden, K top-k, E experts, N permuted rows; for the GEMM, K input and M output features.

On the CPU the kernels run in triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
anything imports them) at small fp32 shapes: the interpreter computes bf16 tl.dot wrongly without an
error, fp32 right. The interpreter's blocks are 16 wide (kernels/_configs.py), so the shapes below
(20, 24, 37, ...) leave partial tiles on every edge.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_dist.kernels import reference as ref
from moe_dist.kernels._configs import interpreting, unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

if unavailable_reason() is None:
    from moe_dist.kernels import ops, triton_gemm, triton_permute

DEVICE = "cpu" if interpreting() else "cuda"
TOL = dict(rtol=1e-5, atol=1e-5)


def offsets_from_counts(counts, tail: int = 0):
    """int32 cumulative ends, and N = their total plus `tail` rows past the last group."""
    ends = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    n = int(ends[-1]) + tail if len(counts) else tail
    return ends.to(torch.int32).to(DEVICE), n


# ------------------------------------------------------------------------------------------ grouped GEMM

GEMM_CASES = {
    # name: (rows per expert, rows past the last group, K, M)
    "unaligned": ([5, 0, 15, 13, 2], 0, 20, 24),
    "empty_experts_and_tail": ([0, 7, 0, 0, 18, 0], 3, 17, 33),
    "one_expert": ([37], 0, 20, 24),
    "all_rows_one_expert_of_4": ([0, 0, 21, 0], 0, 16, 16),
    "one_token": ([0, 1, 0], 0, 20, 24),
    "E64_sparse": ([1 if e % 5 == 0 else 0 for e in range(64)] + [], 0, 24, 20),
    "tiny_dims": ([3, 4], 0, 3, 5),
}


@pytest.mark.parametrize("case", list(GEMM_CASES))
def test_grouped_gemm_forward_and_grads(case: str) -> None:
    counts, tail, K, M = GEMM_CASES[case]
    offsets_E, N = offsets_from_counts(counts, tail)
    g = torch.Generator().manual_seed(len(case))
    x = torch.randn(N, K, generator=g).to(DEVICE)
    w = torch.randn(len(counts), K, M, generator=g).to(DEVICE)
    dy = torch.randn(N, M, generator=g).to(DEVICE)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = ops.grouped_gemm(x1, w1, offsets_E)
    expected = ref.grouped_gemm(x2, w2, offsets_E)
    torch.testing.assert_close(out, expected, **TOL)
    (out * dy).sum().backward()
    (expected * dy).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    torch.testing.assert_close(w1.grad, w2.grad, **TOL)
    empty = [e for e, c in enumerate(counts) if c == 0]
    assert (w1.grad[empty] == 0).all()                  # experts with no rows get exactly zero
    if tail:
        assert (out[N - tail:] == 0).all() and (x1.grad[N - tail:] == 0).all()
    assert out.abs().sum() > 0


def test_grouped_gemm_strided_operands() -> None:
    # The dX pass feeds the forward kernel a transposed weight view; check arbitrary strides directly.
    offsets_E, N = offsets_from_counts([9, 0, 12])
    x = torch.randn(24, N, device=DEVICE).t()             # column-major x
    w = torch.randn(3, 20, 24, device=DEVICE).transpose(1, 2)   # w[E, K=24, M=20], transposed storage
    torch.testing.assert_close(triton_gemm.grouped_gemm(x, w, offsets_E), ref.grouped_gemm(x, w, offsets_E), **TOL)
    dy = torch.randn(N, 20, device=DEVICE)
    torch.testing.assert_close(triton_gemm.grouped_gemm_dw(x, dy, offsets_E),
                               torch.stack([x[:9].t() @ dy[:9], torch.zeros(24, 20), x[9:].t() @ dy[9:]]), **TOL)


def test_grouped_gemm_no_rows() -> None:
    offsets_E = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    x = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(3, 8, 16, device=DEVICE, requires_grad=True)
    out = ops.grouped_gemm(x, w, offsets_E)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert x.grad.shape == (0, 8) and (w.grad == 0).all()


def test_grouped_gemm_rejects_bad_input() -> None:
    x, w = torch.randn(4, 8, device=DEVICE), torch.randn(2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="int32"):
        triton_gemm.grouped_gemm(x, w, torch.tensor([2, 4], device=DEVICE))
    with pytest.raises(ValueError, match="disagree"):
        triton_gemm.grouped_gemm(x, torch.randn(2, 9, 16, device=DEVICE), torch.tensor([2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="dtypes"):
        triton_gemm.grouped_gemm(x, w.double(), torch.tensor([2, 4], dtype=torch.int32, device=DEVICE))


# ------------------------------------------------------------------------------------------ permute / unpermute

PERMUTE_CASES = {
    # name: (T, E, K, drop share, make_permute_map kwargs)
    "k1": (13, 4, 1, 0.0, {}),
    "k2_drops": (13, 4, 2, 0.3, {}),
    "k6_E64": (9, 64, 6, 0.0, {}),
    "k6_E8_pad_multiple": (11, 8, 6, 0.2, dict(pad_multiple=4)),
    "k2_capacity": (10, 4, 2, 0.0, dict(capacity=10)),
    "E1": (7, 1, 1, 0.0, {}),
    "one_token_k2": (1, 4, 2, 0.0, {}),
    "all_dropped": (3, 4, 2, 1.0, {}),
}


def _routing(T: int, E: int, K: int, drop: float, g: torch.Generator):
    indices_TK = torch.rand(T, E, generator=g).argsort(-1)[:, :K]      # K distinct experts per token
    keep_TK = torch.rand(T, K, generator=g) >= drop if drop else None
    return indices_TK.to(DEVICE), None if keep_TK is None else keep_TK.to(DEVICE)


@pytest.mark.parametrize("case", list(PERMUTE_CASES))
def test_permute_unpermute_forward_and_grads(case: str) -> None:
    T, E, K, drop, kw = PERMUTE_CASES[case]
    H = 37
    g = torch.Generator().manual_seed(len(case))
    indices_TK, keep_TK = _routing(T, E, K, drop, g)
    pmap = ref.make_permute_map(indices_TK, E, keep_TK, **kw)
    x = torch.randn(T, H, generator=g).to(DEVICE)
    w = torch.rand(T, K, generator=g).to(DEVICE)
    f = torch.randn(H, H, generator=g).to(DEVICE)   # a mixing step between, so dy differs from a copy
    gy = torch.randn(T, H, generator=g).to(DEVICE)

    def run(permute, unpermute):
        x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
        rows = permute(x1, pmap)
        out = unpermute(torch.tanh(rows @ f), pmap, w1)
        (out * gy).sum().backward()
        return rows.detach(), out.detach(), x1.grad, w1.grad

    got = run(ops.permute, ops.unpermute)
    want = run(ref.permute, ref.unpermute)
    for name, a, b in zip(("rows", "out", "grad x", "grad w"), got, want):
        if b is None:   # the reference's graph skips y when no row is kept; the kernels give zeros
            b = torch.zeros_like(a)
        torch.testing.assert_close(a, b, **TOL, msg=f"{name} ({case})")
    if keep_TK is not None:   # dropped assignments: no gradient reaches their weights
        assert (got[3][~keep_TK] == 0).all()
    if kw:                    # padding rows exist and are zero
        assert (pmap.src_N < 0).any() and (got[0][pmap.src_N < 0] == 0).all()


def test_unpermute_backward_zeroes_padding_rows() -> None:
    # Padding rows of dy get no scatter; the kernel must still write them (torch.empty holds garbage).
    pmap = ref.make_permute_map(torch.tensor([[0], [0], [1]], device=DEVICE), 2, capacity=4)
    y = torch.randn(8, 5, device=DEVICE)
    w = torch.rand(3, 1, device=DEVICE)
    g = torch.randn(3, 5, device=DEVICE)
    dy, dw = triton_permute.unpermute_backward(g, y, pmap.row_TK, pmap.src_N, w)
    pad = pmap.src_N < 0
    assert int(pad.sum()) == 5 and (dy[pad] == 0).all()
    torch.testing.assert_close(dy[pmap.row_TK[:, 0]], w * g, **TOL)
    torch.testing.assert_close(dw[:, 0], (g * y[pmap.row_TK[:, 0]]).sum(-1), **TOL)


def test_unpermute_mixed_dtypes_keeps_y_dtype() -> None:
    # bf16 expert rows with fp32 router weights: output in bf16, the weights' gradient in fp32. No tl.dot
    # here, so the interpreter computes bf16 right.
    pmap = ref.make_permute_map(torch.tensor([[0, 1], [1, 2], [2, 0]], device=DEVICE), 3)
    y = torch.randn(6, 24, device=DEVICE).bfloat16().requires_grad_()
    w = torch.rand(3, 2, device=DEVICE, requires_grad=True)
    out = ops.unpermute(y, pmap, w)
    assert out.dtype == torch.bfloat16
    expected = ref.unpermute(y.detach(), pmap, w.detach())
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
    out.float().sum().backward()
    assert y.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------ torch.library


def test_ops_pass_opcheck() -> None:
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of every custom op."""
    g = torch.Generator().manual_seed(0)
    offsets_E, N = offsets_from_counts([3, 0, 5])
    x = torch.randn(N, 16, generator=g).to(DEVICE)
    w = torch.randn(3, 16, 16, generator=g).to(DEVICE)
    pmap = ref.make_permute_map(torch.tensor([[0, 2], [2, 1], [0, 2]], device=DEVICE), 3, pad_multiple=2)
    xt = torch.randn(3, 16, generator=g).to(DEVICE)
    y = torch.randn(pmap.num_rows, 16, generator=g).to(DEVICE)
    wt = torch.rand(3, 2, generator=g).to(DEVICE)
    cases = [
        (torch.ops.moe_dist.grouped_gemm, (x.requires_grad_(), w.requires_grad_(), offsets_E)),
        (torch.ops.moe_dist.permute, (xt.requires_grad_(), pmap.src_N, pmap.row_TK)),
        (torch.ops.moe_dist.unpermute, (y.requires_grad_(), pmap.row_TK, pmap.src_N, wt.requires_grad_())),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compiles_without_graph_breaks() -> None:
    """permute → grouped GEMM → unpermute under torch.compile(fullgraph=True), forward and backward."""
    E, T, K, H = 4, 9, 2, 16
    g = torch.Generator().manual_seed(1)
    indices_TK, _ = _routing(T, E, K, 0.0, g)
    pmap = ref.make_permute_map(indices_TK, E)
    x = torch.randn(T, H, generator=g).to(DEVICE)
    w = torch.randn(E, H, H, generator=g).to(DEVICE)
    r = torch.rand(T, K, generator=g).to(DEVICE)

    def layer(x_TH, w_EHH, r_TK, permute, unpermute, gemm):
        return unpermute(gemm(permute(x_TH, pmap), w_EHH, pmap.offsets_E), pmap, r_TK)

    def grads(fn, *extra):
        args = [t.clone().requires_grad_() for t in (x, w, r)]
        out = fn(*args, *extra)
        out.square().sum().backward()
        return [out.detach()] + [a.grad for a in args]

    compiled = torch.compile(lambda *a: layer(*a, ops.permute, ops.unpermute, ops.grouped_gemm),
                             backend="aot_eager", fullgraph=True)
    for a, b in zip(grads(compiled), grads(layer, ref.permute, ref.unpermute, ref.grouped_gemm)):
        torch.testing.assert_close(a, b, **TOL)


# ------------------------------------------------------------------------------------------ availability


def test_without_gpu_or_interpreter_triton_backend_names_the_fix() -> None:
    code = ("import torch\n"
            "from moe_dist.moe.experts import resolve_backend\n"
            "assert not torch.cuda.is_available()\n"
            "print(resolve_backend('auto', 16, 16))\n"
            "try:\n"
            "    resolve_backend('triton', 16, 16)\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the triton backend is available without the interpreter")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    auto, message = r.stdout.splitlines()
    assert auto == "grouped_mm"
    assert "moe.backend='triton'" in message and "TRITON_INTERPRET=1" in message and "GPU" in message


_AOT = r'''
from triton import compile as triton_compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
from moe_dist.kernels import triton_gemm as g, triton_permute as p

def build(kernel, ptrs, consts, **options):
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    sig = {a: ptrs.get(a, "constexpr" if a in consts else "i32") for a in fn.arg_names}
    triton_compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options=options)
    print("compiled", fn.__name__, consts)

bf16 = dict(x_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", dy_ptr="*bf16", dw_ptr="*bf16", offsets_ptr="*i32")
build(g._grouped_gemm_kernel, bf16, dict(IEEE=False, BLOCK_E=16, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64),
      num_warps=8, num_stages=3)
build(g._grouped_wgrad_kernel, bf16, dict(IEEE=False, BLOCK_K=128, BLOCK_M=128, BLOCK_R=64), num_warps=8,
      num_stages=4)
rows = dict(x_ptr="*bf16", y_ptr="*bf16", g_ptr="*bf16", gy_ptr="*bf16", out_ptr="*bf16", src_ptr="*i64",
            row_ptr="*i64", w_ptr="*fp32", gw_ptr="*fp32")
build(p._gather_rows_kernel, rows, dict(BLOCK_H=2048), num_warps=8)
build(p._combine_kernel, rows, dict(HAS_W=True, BLOCK_H=2048), num_warps=8)
build(p._unpermute_bwd_kernel, rows, dict(BLOCK_H=4096), num_warps=8)
build(p._zero_padding_rows_kernel, rows, dict(BLOCK_H=1024))
'''


def test_kernels_compile_for_h100() -> None:
    """The interpreter accepts code the compiler rejects: compile every kernel for sm_90 (H100) with
    triton's bundled ptxas, no GPU needed, at a production tile config."""
    import triton
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("compiled") == 6, r.stdout


def test_autotuning_prunes_tiles_that_cannot_fit_shared_memory(monkeypatch) -> None:
    """On a GPU the grouped GEMM's autotuner compiles only the tiles whose pipelined operands fit shared memory:
    every H100-class bf16 tile fits 227 KiB, in fp32 only the smaller ones do; with none fitting, the smallest
    remains (the autotuner needs one)."""
    import triton

    from moe_dist.kernels import _configs
    monkeypatch.setattr(_configs, "interpreting", lambda: False)
    monkeypatch.setattr(_configs, "shared_memory_limit", lambda: 227 * 1024)
    gemm = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=8, num_stages=s)
            for m, n, k, s in ((128, 256, 64, 3), (128, 128, 64, 4), (64, 128, 64, 4), (128, 64, 64, 4))]
    bf16 = {"x_ptr": torch.empty(1, dtype=torch.bfloat16)}
    fp32 = {"x_ptr": torch.empty(1, dtype=torch.float32)}
    assert _configs.prune_gemm_configs(gemm, bf16) == gemm
    assert [c.kwargs["BLOCK_N"] for c in _configs.prune_gemm_configs(gemm, fp32)] == [128, 64]
    assert [c.kwargs["BLOCK_M"] for c in _configs.prune_gemm_configs(gemm, fp32)] == [64, 128]
    wgrad = [triton.Config({"BLOCK_K": 128, "BLOCK_M": 128, "BLOCK_R": r}, num_warps=8, num_stages=4) for r in (64, 32)]
    assert [c.kwargs["BLOCK_R"] for c in _configs.prune_wgrad_configs(wgrad, fp32)] == [32]
    monkeypatch.setattr(_configs, "shared_memory_limit", lambda: 1024)
    (only,) = _configs.prune_gemm_configs(gemm, fp32)
    # 64×128 and 128×64 both need (64·64 + 64·128)·4 B·4 stages, the least; the first in the list is kept
    assert (only.kwargs["BLOCK_M"], only.kwargs["BLOCK_N"]) == (64, 128)
