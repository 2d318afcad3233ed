"""Kernel benchmark: the Triton grouped GEMM vs torch._grouped_mm and the loop reference, and the Triton
permute/unpermute vs the device's copy bandwidth. Legend: T tokens, H hidden, F expert hidden, E experts,
K top-k, N = T·K permuted rows.

GPU (bf16, `triton.testing.do_bench`): three shapes (Mixtral 8x7B-like E=8 k=2, fine-grained E=64 k=6, and
E=32 k=4), forward and forward+backward of the up-projection GEMM x[N,H]·W[E,H,2F]; GB/s of permute and
unpermute against a same-size device copy. Writes kernels_gpu.json and .png.

CPU (fp32, wall clock, median of interleaved rotated repeats from `moe_dist.bench.timing.measure`): Triton
cannot run natively without a GPU, so the same shapes scaled down (T/32, H/16, F/16) time grouped_mm vs loop
and the permute/unpermute references against a CPU copy; the Triton kernels then run in the interpreter
(TRITON_INTERPRET=1, set here before they are imported) at a tiny shape, for their error against the
references only: interpreter times say nothing about GPU speed. Writes kernels_cpu.json and .png.

Results go to runs/bench/ under the current directory unless `--out` names another path; the figures
committed under benchmarks/results/ were written with `--out benchmarks/results/kernels_<device>.json`.

    python benchmarks/kernels.py [--repeats 20] [--warmup 1] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not GPU:
    os.environ["TRITON_INTERPRET"] = "1"    # before moe_dist.kernels.ops is imported (triton reads it then)

from moe_dist.kernels import ops, reference as ref                   # noqa: E402
from moe_dist.kernels._configs import unavailable_reason             # noqa: E402
from moe_dist.moe.experts import _grouped_mm                         # noqa: E402
from moe_dist.bench.report import RUN_DIR                            # noqa: E402
from moe_dist.bench.timing import measure, medians, timed_call       # noqa: E402

# name: (T, H, F, E, K): Mixtral 8x7B's expert shapes, a fine-grained (DeepSeek-like) one and E=32 k=4
# between them; all three at Mixtral's T.
SHAPES = {
    "mixtral_E8_k2": (16384, 4096, 3584, 8, 2),
    "fine_E64_k6": (16384, 2048, 1408, 64, 6),
    "E32_k4": (16384, 4096, 2048, 32, 4),
}
CPU_SCALE = (32, 16, 16)                 # T, H, F divided by these on the CPU
INTERPRETER_SHAPE = (24, 32)             # T, H for the interpreter's error check

GEMMS = {"triton": ops.grouped_gemm, "grouped_mm": _grouped_mm, "loop": ref.grouped_gemm}


def bench(fns: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each candidate.

    CPU: the shared harness (`timing.measure`: warm-up, then rounds that run every candidate once in a
    rotated order, so load drift hits all alike), wall clock.
    GPU: `triton.testing.do_bench`, kept on purpose: it times with CUDA events on the stream, so a sub-ms
    kernel is not charged the host's launch and synchronise overhead that a host clock around
    `torch.cuda.synchronize()` adds; and it zeroes a buffer larger than L2 before every call, so each kernel
    starts from cold cache, as it does inside a training step where other layers ran in between."""
    if GPU:
        import triton.testing
        return {k: triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median") / 1e3 for k, f in fns.items()}
    return medians(measure({k: timed_call(f) for k, f in fns.items()}, repeats, warmup))


def routed(T: int, H: int, E: int, K: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    indices_TK = torch.rand(T, E, generator=g).argsort(-1)[:, :K].to(device)    # uniform random routing
    pmap = ref.make_permute_map(indices_TK, E)
    x_TH = torch.randn(T, H, generator=g).to(device, dtype)
    return pmap, x_TH


def gemm_row(T, H, F, E, K, dtype, device, names, repeats, warmup=1) -> dict:
    pmap, x_TH = routed(T, H, E, K, dtype, device)
    x_NH = ref.permute(x_TH, pmap).requires_grad_()
    g = torch.Generator().manual_seed(1)
    w_EHM = (torch.randn(E, H, 2 * F, generator=g) * H ** -0.5).to(device, dtype).requires_grad_()
    dy_NM = torch.randn(x_NH.shape[0], 2 * F, generator=g).to(device, dtype)
    offs = pmap.offsets_E

    def fwd(gemm):
        def f():
            with torch.no_grad():
                gemm(x_NH, w_EHM, offs)
        return f

    def fwd_bwd(gemm):
        return lambda: torch.autograd.grad(gemm(x_NH, w_EHM, offs), (x_NH, w_EHM), dy_NM)

    flops = 2 * x_NH.shape[0] * H * 2 * F
    t_f = bench({n: fwd(GEMMS[n]) for n in names}, repeats, warmup)
    t_fb = bench({n: fwd_bwd(GEMMS[n]) for n in names}, repeats, warmup)
    row = {"fwd_s": t_f, "fwd_bwd_s": t_fb,
           "fwd_tflops": {n: flops / t / 1e12 for n, t in t_f.items()},
           "fwd_bwd_tflops": {n: 3 * flops / t / 1e12 for n, t in t_fb.items()}}
    first = names[0]
    for other in names[1:]:
        row[f"speedup_{first}_over_{other}"] = {"fwd": t_f[other] / t_f[first], "fwd_bwd": t_fb[other] / t_fb[first]}
    return row


def rows_row(T, H, E, K, dtype, device, impl, repeats, warmup=1) -> dict:
    """permute / unpermute GB/s (bytes read + written) against a copy of the permuted tensor."""
    pmap, x_TH = routed(T, H, E, K, dtype, device)
    w_TK = torch.rand(T, K, generator=torch.Generator().manual_seed(1)).to(device)
    y_NH = ref.permute(x_TH, pmap)
    size = y_NH.element_size()
    N = y_NH.shape[0]
    t = bench({"permute": lambda: impl.permute(x_TH, pmap), "unpermute": lambda: impl.unpermute(y_NH, pmap, w_TK),
               "copy": lambda: y_NH.clone()}, repeats, warmup)
    moved = {"permute": 2 * N * H * size, "unpermute": (N + T) * H * size, "copy": 2 * N * H * size}
    gbs = {k: moved[k] / t[k] / 1e9 for k in t}
    return {"seconds": t, "gb_per_s": gbs,
            "fraction_of_copy": {k: gbs[k] / gbs["copy"] for k in ("permute", "unpermute")}}


def interpreter_errors(T: int, H: int, E: int, K: int) -> dict:
    """Max |triton − reference| of permute → grouped GEMM → unpermute, output and every gradient, at a
    tiny fp32 shape in the interpreter."""
    pmap, x_TH = routed(T, H, E, K, torch.float32, "cpu", seed=1)
    g = torch.Generator().manual_seed(2)
    w_EHM = torch.randn(E, H, H, generator=g) * H ** -0.5
    r_TK = torch.rand(T, K, generator=g)
    out = {}
    for name, (perm, unperm, gemm) in {"triton": (ops.permute, ops.unpermute, ops.grouped_gemm),
                                       "reference": (ref.permute, ref.unpermute, ref.grouped_gemm)}.items():
        args = [a.clone().requires_grad_() for a in (x_TH, w_EHM, r_TK)]
        h = gemm(perm(args[0], pmap), args[1], pmap.offsets_E)
        y = unperm(h, pmap, args[2])
        out[name] = [y.detach()] + list(torch.autograd.grad(y.square().sum(), args))
    return {k: float((a - b).abs().max()) for k, a, b in zip(("out", "grad_x", "grad_w", "grad_router"),
                                                              out["triton"], out["reference"])}


def environment() -> dict:
    import triton
    env = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
           "triton": triton.__version__, "threads": torch.get_num_threads()}
    if GPU:
        env.update(device=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   capability=".".join(map(str, torch.cuda.get_device_capability())))
    else:
        env.update(device=f"cpu ({platform.processor() or platform.machine()})")
    return env


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    rows = report["results"]
    names = list(rows[0]["gemm"]["fwd_bwd_tflops"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    xs = range(len(rows))
    width = 0.8 / len(names)
    unit = "TFLOP/s" if GPU else "TFLOP/s (CPU fp32)"
    for i, n in enumerate(names):
        a1.bar([x + (i - (len(names) - 1) / 2) * width for x in xs],
               [r["gemm"]["fwd_bwd_tflops"][n] for r in rows], width, label=n)
    a1.set_xticks(list(xs), [r["name"] for r in rows], fontsize=8)
    a1.set_ylabel(unit)
    a1.set_title("grouped GEMM x·W_in, forward+backward")
    a1.legend(fontsize=8)
    for i, k in enumerate(("permute", "unpermute", "copy")):
        a2.bar([x + (i - 1) * 0.27 for x in xs], [r["rows"]["gb_per_s"][k] for r in rows], 0.27, label=k)
    a2.set_xticks(list(xs), [r["name"] for r in rows], fontsize=8)
    a2.set_ylabel("GB/s")
    a2.set_title("permute / unpermute vs copy" + ("" if GPU else " (torch references)"))
    a2.legend(fontsize=8)
    fig.suptitle(f"{report['environment']['device']}, {report['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20, help="CPU only: timed rounds per candidate")
    p.add_argument("--warmup", type=int, default=1, help="CPU only: untimed calls per candidate first")
    p.add_argument("--out", default=str(RUN_DIR / ("kernels_gpu.json" if GPU else "kernels_cpu.json")),
                   help="result JSON, the PNG beside it (default %(default)s under the current directory; the "
                        "committed figures use --out benchmarks/results/kernels_<device>.json)")
    a = p.parse_args()
    dtype = torch.bfloat16 if GPU else torch.float32
    device = "cuda" if GPU else "cpu"
    report = {"benchmark": "grouped GEMM and permute/unpermute kernels", "dtype": str(dtype).removeprefix("torch."),
              "environment": environment(), "results": []}
    if GPU:
        report["targets"] = {"gemm_fwd_bwd_speedup_over_grouped_mm": {"E>=32": 1.15, "E=8": 1.0},
                             "permute_unpermute_fraction_of_copy": 0.9}
        names, impl = ["triton", "grouped_mm", "loop"], ops
    else:
        reason = "no GPU" if unavailable_reason() is None else unavailable_reason()
        note = (f"Triton kernels not timed: {reason}; they cannot run natively on the CPU (the interpreter checks "
                "correctness only). Timed: grouped_mm vs loop and the permute/unpermute references at shapes "
                f"scaled down by T/{CPU_SCALE[0]}, H/{CPU_SCALE[1]}, F/{CPU_SCALE[2]}. GPU figures pending.")
        print(note)
        report["note"] = note
        names, impl = ["grouped_mm", "loop"], ref
    for name, (T, H, F, E, K) in SHAPES.items():
        if not GPU:
            T, H, F = T // CPU_SCALE[0], H // CPU_SCALE[1], F // CPU_SCALE[2]
        row = {"name": name, "shape": dict(T=T, H=H, F=F, E=E, K=K, N=T * K),
               "gemm": gemm_row(T, H, F, E, K, dtype, device, names, a.repeats, a.warmup),
               "rows": rows_row(T, H, E, K, dtype, device, impl, a.repeats, a.warmup)}
        if not GPU:
            Ti, Hi = INTERPRETER_SHAPE
            row["interpreter_max_abs_error"] = dict(shape=dict(T=Ti, H=Hi, E=E, K=K),
                                                    **interpreter_errors(Ti, Hi, E, K))
        report["results"].append(row)
        g, r = row["gemm"], row["rows"]
        ratio = next(k for k in g if k.startswith("speedup_"))
        print(f"{name:14s} {row['shape']}: GEMM fwd+bwd " + ", ".join(f"{n} {v:.3f}" for n, v in g["fwd_bwd_tflops"].items())
              + f" TFLOP/s; {ratio} fwd {g[ratio]['fwd']:.2f}x fwd+bwd {g[ratio]['fwd_bwd']:.2f}x; "
              + ", ".join(f"{k} {v:.1f}" for k, v in r["gb_per_s"].items()) + " GB/s")
        if "interpreter_max_abs_error" in row:
            print(f"{'':14s} interpreter max |triton - reference|: {row['interpreter_max_abs_error']}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
