"""`make gpu-check`: one command that proves the GPU path, part by part, within a few minutes of one GPU.
Legend: T tokens, H hidden (model dim), F expert hidden, E experts, K top-k, N = T·K permuted rows.

Parts, in this order, each in its own subprocess with its own time limit (its process group is killed on
overrun; a part that fails or runs over is reported with the tail of its output and the next part still runs):

  peak              the bf16 matmul peak this GPU reaches (8192³, `triton.testing.do_bench`) and a device copy's
                    GB/s: the denominators of MFU, measured in the same run
  kernels           the Triton kernels (`moe_dist.kernels.ops`: grouped GEMM, permute, unpermute; forward and every
                    gradient) compiled, against their PyTorch references (`moe_dist.kernels.reference`) computed in
                    fp64 from the same inputs, in fp32 and bf16: error ‖out − ref‖/‖ref‖, and no NaN/Inf. Shapes: the
                    ones tests/kernels/test_triton_kernels.py checks (read from that file), a Mixtral-sized one
                    and a fine-grained one (E=64, K=6); fresh random inputs (the seed is recorded)
  speed             benchmarks/kernels.py's rows (`gemm_row`, `rows_row`) on its SHAPES: grouped GEMM forward+
                    backward against torch._grouped_mm and the loop, permute/unpermute GB/s against a copy
  train:triton      50 bf16 steps of configs/gpu-check-200m.yaml (235M parameters, 84M active) through the Trainer
  train:grouped_mm  (one process, `Trainer.train_step`), once per expert backend (auto: the Triton row kernels
  train:auto        with torch._grouped_mm's GEMMs, what moe.backend=auto runs on a GPU): tokens/s, MFU, peak
                    memory against `moe-dist plan`'s estimate, LM loss of the first against the last 10 steps
  profile           a few moe.backend=auto steps under torch.profiler: device time per kernel and per kind
                    (GEMM, attention, row moves, optimizer, ...) against the steps' wall time
  layer             `moe-dist bench layer` in bf16 (a Mixtral-sized and a fine-grained layer; backends triton,
                    grouped_mm and auto) against the dense SwiGLU of equal active FLOPs, and DeepSpeed-MoE when
                    it imports

Targets (the table printed last; each PASS, FAIL, SKIP, TIMEOUT, ERROR, or REHEARSAL):
  kernel errors fp32 ≤ 1e-4 (Triton runs fp32 dots in ieee precision), bf16 ≤ 2e-2, all finite;
  grouped GEMM fwd+bwd ≥ 1.15× torch._grouped_mm at E ≥ 32 and ≥ 1.0× at E = 8; permute and unpermute ≥ 90% of
  the copy's GB/s; MoE layer (auto) ≥ 0.75× the dense ideal; training MFU ≥ 40% (an aim: the figure is what matters);
  peak memory within 15% of the plan; LM loss falling.
MFU = tokens/s × model FLOPs per token / the peak measured by `peak`. FLOPs per token are
`moe_dist.bench.alpha_beta.model_flops_per_token` (built on `moe_dist.plan`'s counts): 6 × the active matmul
weights (head and router included, the embedding lookup not) + attention 12·L·S·H·Dh, counted in full (not halved
for the causal mask), as Megatron's MFU formula counts it.

Without a GPU (or with --rehearsal) the same parts run as a rehearsal on the CPU: tiny shapes, the kernels in
Triton's interpreter (TRITON_INTERPRET=1), fp32, the same config shrunk, a few steps. The table and the JSON
then say that no GPU figure was produced: every target that ran shows REHEARSAL, except a kernel error over its
tolerance, which is a real failure wherever it is found.

Results: benchmarks/results/gpu_check.json on a GPU, runs/bench/gpu_check_rehearsal.json otherwise (or --out),
rewritten after every part so that a kill mid-run still leaves the parts done; PNGs beside it. Exit code: 0 when
every part ran and no target failed, 1 when a target failed, 2 when a part errored, ran over its limit or was
skipped for want of budget.

    python benchmarks/gpu_check.py [--parts kernels,speed,layer,train,profile] [--budget-s 470] [--limit kernels=200]
                                   [--steps 50] [--rehearsal] [--out PATH]
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from moe_dist.bench.timebox import PartSpec, run_all

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TRAIN_CONFIG = REPO / "configs" / "gpu-check-200m.yaml"
KERNEL_TESTS = REPO / "tests" / "kernels" / "test_triton_kernels.py"
ROWS_H = 37                              # the hidden size test_triton_kernels.py's permute cases use

TRAIN_BACKENDS = ("triton", "grouped_mm", "auto")   # auto: what users get (rows on Triton, GEMMs on _grouped_mm)
PART_ORDER = ("peak", "kernels", "speed", "train:triton", "train:grouped_mm", "train:auto", "profile", "layer")
PART_GROUPS = {"peak": ["peak"], "kernels": ["kernels"], "speed": ["speed"], "layer": ["layer"],
               "profile": ["profile"], "train": [f"train:{b}" for b in TRAIN_BACKENDS],
               **{f"train:{b}": [f"train:{b}"] for b in TRAIN_BACKENDS}}
# Seconds per part. GPU: what the part should take with Triton's autotuning from a cold cache, with room; the
# whole run must stay under 6 minutes (the budget cuts later parts short) and never pass 8.
# Rehearsal: about 45 CPU seconds in all; the limits leave room for a machine loaded by other jobs.
# First H200 run: peak 6 s, kernels over 150 s (fp32 autotuning at the Mixtral shape alone took 61 s: fp32
# now runs smaller T), speed 51 s, train 25 + 16 s, layer 53 s (two backends).
# Second run: kernels over 200 s (fp32 autotuning 74 s at one shape: configs that cannot fit shared memory are
# now pruned before compiling, not yet timed on a GPU), train:auto 24 s, profile 22 s, layer 80 s (cut by the
# budget after both cases, three backends).
LIMITS_GPU = {"peak": 45, "kernels": 200, "speed": 90, "train:triton": 75, "train:grouped_mm": 60,
              "train:auto": 60, "profile": 60, "layer": 120}
LIMITS_REHEARSAL = {"peak": 40, "kernels": 90, "speed": 60, "train:triton": 60, "train:grouped_mm": 60,
                    "train:auto": 60, "profile": 60, "layer": 60}
BUDGET_S = {"gpu": 470, "rehearsal": 360}

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
AIMS = {"gemm_E8": 1.0, "gemm_E32": 1.15, "rows_vs_copy": 0.9, "layer_vs_dense": 0.75, "mfu": 0.40,
        "memory_vs_plan": 0.15}
REHEARSAL_NOTE = ("REHEARSAL on the CPU: no GPU figure was produced. The parts ran at tiny shapes, the Triton "
                  "kernels in the interpreter, in fp32; times and ratios here say nothing about a GPU")

# Per mode: the shapes and sizes each part uses (plain values: they travel to the parts as JSON).
SETTINGS = {
    "gpu": {
        "dtype": "bfloat16",
        "kernels": {"dtypes": ["bfloat16", "float32"],     # bf16 first: the training dtype, and its compiled
                                                            # kernels serve the later parts from Triton's cache
                    # name: (T, H, F, E, K); the GEMM is x[N, H]·W[E, H, F], the row kernels move [T, H] rows
                    "shapes": {"mixtral_T2048": (2048, 4096, 14336, 8, 2), "fine_E64_k6": (4096, 2048, 1408, 64, 6)},
                    # fp32 (ieee dot, no tensor cores) at the same H, F, E, K with fewer tokens: the check is
                    # about correctness, and autotuning fp32 at T=2048 took a minute on the first H200 run.
                    "shapes_float32": {"mixtral_T256": (256, 4096, 14336, 8, 2),
                                       "fine_E64_k6_T512": (512, 2048, 1408, 64, 6)}},
        "speed": {"shapes": None, "repeats": 20, "warmup": 1},       # None: benchmarks/kernels.py's SHAPES
        "layer": {"cases": [dict(tokens=8192, dim=4096, hidden=14336, experts=8, top_k=2),
                            dict(tokens=16384, dim=2048, hidden=1408, experts=64, top_k=6)],
                  "repeats": 5, "warmup": 2, "deepspeed": True},
        "train": {"overrides": [], "steps": 50, "data_tokens": 4_000_000},
        "profile": {"warmup_steps": 4, "steps": 3},
    },
    "rehearsal": {
        "dtype": "float32",
        "kernels": {"dtypes": ["float32"],      # the interpreter computes bf16 tl.dot wrongly (tests/kernels)
                    "shapes": {"mixtral_tiny": (24, 32, 48, 8, 2), "fine_tiny": (8, 16, 24, 64, 6)}},
        # The interpreter runs one Python loop per program (the grouped GEMM launches N/16 + E + 1 of them per
        # column block), so E=32 stands for "E ≥ 32" here and the sizes stay at one block.
        "speed": {"shapes": {"mixtral_E8_k2": (8, 16, 8, 8, 2), "E32_k4": (4, 16, 8, 32, 4)},
                  "repeats": 1, "warmup": 0},
        "layer": {"cases": [dict(tokens=32, dim=32, hidden=32, experts=8, top_k=2),
                            dict(tokens=32, dim=32, hidden=32, experts=64, top_k=6)],
                  "repeats": 1, "warmup": 1, "deepspeed": False},
        "train": {"overrides": ["--model.dim=16", "--model.n_layers=1", "--model.n_heads=2",
                                "--model.max_seq_len=16", "--model.dense_hidden=32", "--moe.expert_hidden=16",
                                "--train.batch_size=1", "--train.seq_len=16", "--train.dtype=float32",
                                "--train.warmup_steps=1"],
                  "steps": 4, "data_tokens": 100_000},
        "profile": {"warmup_steps": 1, "steps": 1},
    },
}


# ------------------------------------------------------------------------------------------ judging


def _verdict(outcome: Optional[dict], gpu: bool, value: Optional[float], ok: Optional[bool],
             correctness: bool = False) -> str:
    """PASS/FAIL on a GPU; REHEARSAL on the CPU (a correctness failure still FAILs there); SKIP when the part was
    not run or gave no value; TIMEOUT / ERROR after the part's status."""
    if outcome is None or outcome["status"] == "skipped":
        return "SKIP"
    if outcome["status"] == "timeout":
        return "TIMEOUT"
    if outcome["status"] == "error":
        return "ERROR"
    if value is None or ok is None:
        return "SKIP"
    if correctness and not ok:
        return "FAIL"
    if not gpu:
        return "REHEARSAL"
    return "PASS" if ok else "FAIL"


def _target(tid: str, what: str, aim: str, outcome: Optional[dict], gpu: bool, value: Optional[float],
            ok: Optional[bool], detail: str = "", unit: str = "", correctness: bool = False) -> dict:
    verdict = _verdict(outcome, gpu, value, ok, correctness)
    if outcome is None:
        detail = "not run (--parts)"
    elif outcome["status"] == "skipped":
        detail = outcome.get("reason", "skipped")
    elif outcome["status"] in ("timeout", "error") and not detail:
        detail = f"part {outcome['status']} after {outcome.get('elapsed_s', 0):.0f} s; see its stderr_tail"
    return {"id": tid, "what": what, "aim": aim, "value": value, "unit": unit, "verdict": verdict, "detail": detail}


def _kernel_target(outcome, gpu) -> dict:
    res = (outcome or {}).get("result") or {}
    cases = res.get("cases", [])
    value = ok = None
    detail = ""
    if cases:
        worst = max(cases, key=lambda c: c["worst_over_tol"])
        value = worst["worst_over_tol"]
        finite = all(c["finite"] for c in cases)
        ok = value <= 1.0 and finite
        detail = (f"{len(cases)} checks; worst {worst['op']} {worst['case']} {worst['dtype']} "
                  f"{worst['worst_key']} = {worst['errors'][worst['worst_key']]:.2e} (tol {worst['tol']:.0e})"
                  + ("" if finite else "; NaN/Inf in: " + ", ".join(
                      f"{c['op']} {c['case']} {c['dtype']}" for c in cases if not c["finite"])))
    return _target("kernel_errors", "kernel error ‖out−ref‖/‖ref‖ ÷ tolerance (fp32 1e-4, bf16 2e-2), all finite",
                   "≤ 1", outcome, gpu, value, ok, detail, correctness=True)


def judge(outcomes: dict[str, dict], gpu: bool) -> list[dict]:
    """Every target from the parts' results (pure: no I/O), in table order."""
    t = [_kernel_target(outcomes.get("kernels"), gpu)]

    sp = outcomes.get("speed")
    rows = ((sp or {}).get("result") or {}).get("rows", [])
    for tid, label, pick, aim in (("gemm_E8", "E=8", lambda e: e == 8, AIMS["gemm_E8"]),
                                  ("gemm_E32", "E≥32", lambda e: e >= 32, AIMS["gemm_E32"])):
        sel = [r for r in rows if pick(r["shape"]["E"]) and "speedup_triton_over_grouped_mm" in r["gemm"]]
        value = min((r["gemm"]["speedup_triton_over_grouped_mm"]["fwd_bwd"] for r in sel), default=None)
        detail = ", ".join(f"{r['name']} {r['gemm']['speedup_triton_over_grouped_mm']['fwd_bwd']:.2f}×" for r in sel)
        t.append(_target(tid, f"grouped GEMM fwd+bwd, Triton ÷ torch._grouped_mm speed, {label}", f"≥ {aim}×", sp, gpu,
                         value, None if value is None else value >= aim, detail, "×"))
    fr = [(r["name"], k, r["rows"]["fraction_of_copy"][k]) for r in rows for k in ("permute", "unpermute")]
    value = min((f for _, _, f in fr), default=None)
    worst = min(fr, key=lambda x: x[2]) if fr else None
    t.append(_target("rows_vs_copy", "permute/unpermute GB/s ÷ device copy GB/s (worst)",
                     f"≥ {AIMS['rows_vs_copy']:.0%}", sp, gpu, value,
                     None if value is None else value >= AIMS["rows_vs_copy"],
                     f"worst {worst[1]} {worst[0]}" if worst else "", "of copy"))

    ly = outcomes.get("layer")
    lres = (ly or {}).get("result") or {}
    cases = lres.get("cases", [])
    # Judged on what users get (auto) when it ran, else on Triton; the JSON holds every backend's ratios.
    backend = next((b for b in ("auto", "triton") if any(b in c["backends"] for c in cases)),
                   cases[0]["primary"] if cases else "")
    vals = [(c["label"], c["ratios"].get(f"{backend}_speed_vs_dense")) for c in cases]
    vals = [(n, v) for n, v in vals if v is not None]
    value = min((v for _, v in vals), default=None)
    t.append(_target("layer_vs_dense", f"MoE layer fwd+bwd ({backend or 'ours'}) ÷ dense SwiGLU of equal active "
                     "FLOPs, speed", f"≥ {AIMS['layer_vs_dense']}×", ly, gpu, value,
                     None if value is None else value >= AIMS["layer_vs_dense"],
                     ", ".join(f"{n} {v:.2f}×" for n, v in vals), "×"))
    from_ds = [(c["label"], c["ratios"].get(f"{backend}_speed_vs_deepspeed")) for c in cases]
    from_ds = [(n, v) for n, v in from_ds if v is not None]
    ds_target = _target("layer_vs_deepspeed", f"MoE layer ({backend or 'ours'}) ÷ DeepSpeed-MoE, speed",
                        "report", ly, gpu, min((v for _, v in from_ds), default=None), True if from_ds else None,
                        ", ".join(f"{n} {v:.2f}×" for n, v in from_ds), "×")
    if ly and ly["status"] == "ok" and lres.get("deepspeed_skipped"):
        ds_target.update(verdict="SKIP", detail=f"skipped: {lres['deepspeed_skipped']}")
    t.append(ds_target)

    for b in TRAIN_BACKENDS:
        o = outcomes.get(f"train:{b}")
        r = (o or {}).get("result") or {}
        mfu = r.get("mfu")
        t.append(_target(f"mfu_{b}", f"training MFU, moe.backend={b} (aim; the figure is the result)",
                         f"≥ {AIMS['mfu']:.0%}", o, gpu, mfu, None if mfu is None else mfu >= AIMS["mfu"],
                         (f"{r['tokens_per_s']:,.0f} tokens/s × {r['flops_per_token'] / 1e9:.2f} GFLOP/token ÷ "
                          f"{r['peak_tflops']:.0f} TFLOP/s measured") if mfu is not None else r.get("mfu_note", ""),
                         "of peak"))
        peak, plan = r.get("peak_allocated"), r.get("plan_bytes")
        dev = None if not peak or not plan else peak / plan - 1
        t.append(_target(f"memory_{b}", f"peak memory ÷ plan's estimate − 1, moe.backend={b}",
                         f"within ±{AIMS['memory_vs_plan']:.0%}", o, gpu, dev,
                         None if dev is None else abs(dev) <= AIMS["memory_vs_plan"],
                         (f"max_memory_allocated {peak / 2**30:.2f} GiB vs plan {plan / 2**30:.2f} GiB" if dev is not None
                          else ("no CUDA allocator on the CPU" if r else "")), "off"))
        first, last = r.get("loss_first10"), r.get("loss_last10")
        t.append(_target(f"loss_{b}", f"LM loss falls (mean of first vs last 10 steps), moe.backend={b}",
                         "last < first", o, gpu, last, None if last is None else last < first,
                         f"{first:.3f} → {last:.3f}" if last is not None else ""))
    return t


def exit_code(outcomes: dict[str, dict], targets: list[dict]) -> int:
    if any(o["status"] in ("timeout", "error", "skipped") for o in outcomes.values()):
        return 2
    return 1 if any(t["verdict"] == "FAIL" for t in targets) else 0


def _fmt_value(t: dict) -> str:
    v = t["value"]
    if v is None:
        return "-"
    if t["unit"] in ("of peak", "of copy"):
        return f"{v:.1%}"
    if t["unit"] == "off":
        return f"{v:+.1%}"
    if t["unit"] == "×":
        return f"{v:.2f}×"
    return f"{v:.3g}"


def table(report: dict) -> str:
    lines = []
    head = ("GPU: " + report["environment"].get("device", "?")) if report["gpu_figure"] else REHEARSAL_NOTE
    lines.append(f"gpu-check: {head}")
    lines.append(f"{'part':18s} {'status':9s} {'seconds':>8s} {'limit':>6s} {'CPU s':>6s}")
    for name, o in report["parts"].items():
        lines.append(f"{name:18s} {o['status']:9s} {o.get('elapsed_s', 0):8.1f} {o.get('limit_s') or 0:6.0f} "
                     f"{o.get('cpu_s', 0):6.1f}")
    lines.append("")
    lines.append(f"{'target':78s} {'value':>9s}  {'aim':14s} verdict")
    for t in report["targets"]:
        lines.append(f"{t['what'][:78]:78s} {_fmt_value(t):>9s}  {t['aim']:14s} {t['verdict']}")
        if t["detail"]:
            lines.append(f"    {t['detail']}")
    fig = report.get("figures", {})
    if fig:
        lines.append("")
        lines.append("figures: " + ", ".join(f"{k} {v}" for k, v in fig.items()))
    if not report["gpu_figure"]:
        lines.append(REHEARSAL_NOTE)
    lines.append(f"exit {report['exit_code']}; results: {report['out']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ parts (children)


def load_bench_kernels():
    """benchmarks/kernels.py as a module (benchmarks/ is not a package). Import it after TRITON_INTERPRET is
    settled: it reads it, and so does the kernel module it imports."""
    spec = importlib.util.spec_from_file_location("bench_kernels", HERE / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_test_cases() -> tuple[dict, dict]:
    """(GEMM_CASES, PERMUTE_CASES) as tests/kernels/test_triton_kernels.py defines them, read from that file (its
    assignments only: the module itself needs pytest), so this check and the tests never drift apart."""
    if not KERNEL_TESTS.is_file():
        return {}, {}
    tree = ast.parse(KERNEL_TESTS.read_text())
    ns: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) in ("GEMM_CASES", "PERMUTE_CASES")
                                                for t in node.targets):
            exec(compile(ast.Module([node], type_ignores=[]), str(KERNEL_TESTS), "exec"), ns)
    return ns.get("GEMM_CASES", {}), ns.get("PERMUTE_CASES", {})


def _rel_err(got, want) -> float:
    got, want = got.double(), want.double()
    ref_norm = float(want.norm())
    diff = float((got - want).norm())
    return diff / ref_norm if ref_norm > 0 else diff


def _grads(fn, inputs, grad_out):
    """Output and the gradients of `inputs` (zeros where the graph does not reach an input)."""
    import torch
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    gs = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True)
    return [out.detach()] + [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, gs)]


def _compare(names, got, want, dtype: str) -> dict:
    import torch
    errors = {n: _rel_err(a, b) for n, a, b in zip(names, got, want)}
    key = max(errors, key=errors.get)
    tol = TOLERANCE[dtype]
    return {"errors": errors, "tol": tol, "worst_key": key, "worst_over_tol": errors[key] / tol,
            "finite": all(bool(torch.isfinite(a).all()) for a in got)}


def check_gemm(counts: list[int], tail: int, K: int, M: int, dtype: str, device: str, g) -> dict:
    """ops.grouped_gemm forward, dX and dW against reference.grouped_gemm in fp64 on the same inputs."""
    import torch
    from moe_dist.kernels import ops, reference as ref
    dt = getattr(torch, dtype)
    offsets_E = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
    N = sum(counts) + tail
    x = torch.randn(N, K, generator=g, device=device).to(dt)
    w = (torch.randn(len(counts), K, M, generator=g, device=device) * K ** -0.5).to(dt)
    dy = torch.randn(N, M, generator=g, device=device).to(dt)
    got = _grads(lambda a, b: ops.grouped_gemm(a, b, offsets_E), [x, w], dy)
    want = _grads(lambda a, b: ref.grouped_gemm(a, b, offsets_E), [x.double(), w.double()], dy.double())
    return _compare(("out", "grad_x", "grad_w"), got, want, dtype)


def check_rows(T: int, E: int, K: int, drop: float, kw: dict, H: int, dtype: str, device: str, g) -> dict:
    """ops.permute (forward, dX) and ops.unpermute (forward, dY, d router weights) against the references in
    fp64. Router weights stay fp32 as in the layer; the rows are `dtype`."""
    import torch
    from moe_dist.kernels import ops, reference as ref
    dt = getattr(torch, dtype)
    indices_TK = torch.rand(T, E, generator=g, device=device).argsort(-1)[:, :K]   # K distinct experts per token
    keep_TK = torch.rand(T, K, generator=g, device=device) >= drop if drop else None
    pmap = ref.make_permute_map(indices_TK, E, keep_TK, **kw)
    x = torch.randn(T, H, generator=g, device=device).to(dt)
    dy_N = torch.randn(pmap.num_rows, H, generator=g, device=device).to(dt)
    y = torch.randn(pmap.num_rows, H, generator=g, device=device).to(dt)
    w = torch.rand(T, K, generator=g, device=device)
    g_T = torch.randn(T, H, generator=g, device=device).to(dt)
    got = (_grads(lambda a: ops.permute(a, pmap), [x], dy_N)
           + _grads(lambda a, b: ops.unpermute(a, pmap, b), [y, w], g_T))
    want = (_grads(lambda a: ref.permute(a, pmap), [x.double()], dy_N.double())
            + _grads(lambda a, b: ref.unpermute(a, pmap, b), [y.double(), w.double()], g_T.double()))
    return _compare(("permute_out", "permute_grad_x", "unpermute_out", "unpermute_grad_y", "unpermute_grad_w"),
                    got, want, dtype)


def part_kernels(ctx: dict, save: Callable[[dict], None]) -> dict:
    import torch
    kern = load_bench_kernels()
    device = ctx["device"]
    s = ctx["settings"]["kernels"]
    gemm_cases, rows_cases = kernel_test_cases()
    res: dict[str, Any] = {"seed": ctx["seed"], "tolerance": TOLERANCE, "reference": "fp64, same inputs upcast",
                           "test_cases_from": str(KERNEL_TESTS.relative_to(REPO)) if gemm_cases else None,
                           "cases": []}
    g = torch.Generator(device=device).manual_seed(ctx["seed"])
    jobs: list[tuple[str, str, Callable[[str], dict]]] = []
    for name, (counts, tail, K, M) in gemm_cases.items():
        jobs.append(("grouped_gemm", name, lambda dt, c=counts, t=tail, k=K, m=M: check_gemm(c, t, k, m, dt, device, g)))
    for name, (T, E, K, drop, kw) in rows_cases.items():
        jobs.append(("permute+unpermute", name,
                     lambda dt, a=(T, E, K, drop, kw): check_rows(*a, ROWS_H, dt, device, g)))
    def big_jobs(shapes: dict) -> list[tuple[str, str, Callable[[str], dict]]]:
        big = []
        for name, (T, H, F, E, K) in shapes.items():
            pmap, _ = kern.routed(T, H, E, K, torch.float32, device, seed=ctx["seed"])
            counts = pmap.counts_E.tolist()              # host sync: the GEMM check takes per-expert counts
            big.append(("grouped_gemm", f"{name} (T={T} H={H} F={F} E={E} K={K})",
                        lambda dt, c=counts, h=H, f=F: check_gemm(c, 0, h, f, dt, device, g)))
            big.append(("permute+unpermute", f"{name} (T={T} H={H} E={E} K={K})",
                        lambda dt, a=(T, E, K, 0.0, {}, H): check_rows(*a, dt, device, g)))
        return big
    if device == "cuda":
        res["configs"] = ("large shapes: every autotuning config; the tests' shapes: each kernel pinned to the "
                          "config autotuning chose at the large shapes of the same dtype (compiling every config "
                          "for each of their integer specialisations would take minutes)")
    for dtype in s["dtypes"]:
        big = big_jobs(s.get(f"shapes_{dtype}", s["shapes"]))
        for i, (op, name, job) in enumerate(big + jobs):
            with pinned_to_best(autotuners()) if device == "cuda" and i >= len(big) else contextlib.nullcontext():
                t0 = time.perf_counter()
                r = job(dtype)
            res["cases"].append({"op": op, "case": name, "dtype": dtype, **r,
                                 "seconds": round(time.perf_counter() - t0, 3)})
            save(res)
            print(f"{op:18s} {name:40s} {dtype:8s} worst {r['worst_key']} {r['errors'][r['worst_key']]:.2e} "
                  f"(tol {r['tol']:.0e}){'' if r['finite'] else ' NON-FINITE'}  {time.perf_counter() - t0:.1f}s")
        if device == "cuda":
            torch.cuda.empty_cache()
    return res


def autotuners() -> list:
    """The autotuned kernels of moe_dist.kernels (found by type, not by name)."""
    from triton.runtime.autotuner import Autotuner
    from moe_dist.kernels import triton_gemm, triton_permute
    return [v for m in (triton_gemm, triton_permute) for v in vars(m).values() if isinstance(v, Autotuner)]


@contextlib.contextmanager
def pinned_to_best(tuners: list):
    """Each autotuner limited to the config it chose last (`best_config`; none chosen yet: left as it is), so new
    shapes compile one config instead of all of them; restored on exit."""
    saved = [(t, t.configs) for t in tuners]
    for t in tuners:
        best = getattr(t, "best_config", None)
        if best is not None:
            t.configs = [best]
    try:
        yield
    finally:
        for t, configs in saved:
            t.configs = configs


def part_peak(ctx: dict, save) -> dict:
    """bf16 8192³ matmul TFLOP/s and a 1 GiB device copy's GB/s (GPU, do_bench medians); on the CPU an fp32
    512³ matmul and a 32 MiB copy through the shared harness (rehearsal: no GPU figure)."""
    import torch
    if ctx["device"] == "cuda":
        import triton.testing
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        mm_s = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median") / 1e3
        x = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
        y = torch.empty_like(x)
        cp_s = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median") / 1e3
        nbytes, dtype, device = x.numel(), "bfloat16", torch.cuda.get_device_name()
    else:
        from moe_dist.bench.timing import measure, medians, timed_call
        n = 512
        a, b = torch.randn(n, n), torch.randn(n, n)
        x = torch.empty(32 * 2 ** 20, dtype=torch.uint8)
        y = torch.empty_like(x)
        med = medians(measure({"mm": timed_call(lambda: a @ b), "copy": timed_call(lambda: y.copy_(x))}, 5, 1))
        mm_s, cp_s, nbytes, dtype, device = med["mm"], med["copy"], x.numel(), "float32", "cpu"
    res = {"device": device, "matmul": {"n": n, "dtype": dtype, "seconds": mm_s, "tflops": 2 * n ** 3 / mm_s / 1e12},
           "copy": {"bytes": nbytes, "seconds": cp_s, "gb_per_s": 2 * nbytes / cp_s / 1e9}}
    print(f"{device}: {dtype} {n}³ matmul {res['matmul']['tflops']:.1f} TFLOP/s; copy "
          f"{res['copy']['gb_per_s']:.0f} GB/s (read + write)")
    return res


def part_speed(ctx: dict, save) -> dict:
    import torch
    from moe_dist.kernels import ops
    kern = load_bench_kernels()
    s = ctx["settings"]["speed"]
    shapes = s["shapes"] or kern.SHAPES
    dtype = getattr(torch, ctx["settings"]["dtype"])
    res: dict[str, Any] = {"dtype": ctx["settings"]["dtype"], "timer": "triton.testing.do_bench median"
                           if kern.GPU else "moe_dist.bench.timing (CPU wall clock; interpreter: meaningless)",
                           "rows": []}
    for name, (T, H, F, E, K) in shapes.items():
        t0 = time.perf_counter()
        row = {"name": name, "shape": dict(T=T, H=H, F=F, E=E, K=K, N=T * K),
               "gemm": kern.gemm_row(T, H, F, E, K, dtype, ctx["device"], ["triton", "grouped_mm", "loop"],
                                     s["repeats"], s["warmup"]),
               "rows": kern.rows_row(T, H, E, K, dtype, ctx["device"], ops, s["repeats"], s["warmup"])}
        res["rows"].append(row)
        save(res)
        sp, fr = row["gemm"]["speedup_triton_over_grouped_mm"], row["rows"]["fraction_of_copy"]
        print(f"{name:14s} fwd+bwd TFLOP/s " + ", ".join(f"{n} {v:.1f}" for n, v in row["gemm"]["fwd_bwd_tflops"].items())
              + f"; triton/grouped_mm fwd {sp['fwd']:.2f}x fwd+bwd {sp['fwd_bwd']:.2f}x; permute {fr['permute']:.0%} "
              f"unpermute {fr['unpermute']:.0%} of copy  {time.perf_counter() - t0:.1f}s")
        if ctx["device"] == "cuda":
            torch.cuda.empty_cache()
    return res


def part_layer(ctx: dict, save) -> dict:
    """`moe-dist bench layer` once per case (its own JSON and PNGs beside ours), dropless, no breakdown."""
    from moe_dist.bench import layer
    s = ctx["settings"]["layer"]
    ds_skip = None
    if not s["deepspeed"]:
        ds_skip = "not in the rehearsal (its import alone takes seconds of the rehearsal's time)"
    else:
        try:
            import deepspeed  # noqa: F401
        except Exception as e:         # ImportError, or an accelerator probe failing at import
            ds_skip = f"deepspeed not importable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    res: dict[str, Any] = {"deepspeed_skipped": ds_skip, "cases": []}
    for c in s["cases"]:
        label = f"T={c['tokens']} D={c['dim']} F={c['hidden']} E={c['experts']} k={c['top_k']}"
        out = Path(ctx["artifacts"]) / f"{ctx['stem']}_layer_E{c['experts']}_k{c['top_k']}.json"
        argv = ["--tokens", str(c["tokens"]), "--dim", str(c["dim"]), "--hidden", str(c["hidden"]),
                "--experts", str(c["experts"]), "--top-k", str(c["top_k"]), "--modes", "dropless",
                "--backends", "triton", "grouped_mm", "auto", "--no-breakdown", "--repeats", str(s["repeats"]),
                "--warmup", str(s["warmup"]), "--dtype", "bf16" if ctx["settings"]["dtype"] == "bfloat16" else "fp32",
                "--device", ctx["device"], "--out", str(out)] + (["--no-deepspeed"] if ds_skip else [])
        p = argparse.ArgumentParser()
        layer.add_arguments(p)
        layer.run(p.parse_args(argv))
        payload = json.loads(out.read_text())
        (r,) = payload["results"]
        res["cases"].append({"label": label, "json": str(out), "backends": payload["config"]["backends"],
                             "primary": payload["config"]["primary_backend"], "skipped": payload["config"]["skipped"],
                             "median_ms": r["median_ms"], "ratios": r["ratios"]})
        save(res)
    return res


def part_train(ctx: dict, save, backend: str) -> dict:
    """Train through the Trainer in this process (one rank, Topology.single(); `Trainer.train_step` per step, so
    nothing is checkpointed). Data: `moe-dist prepare-data`'s byte corpus (the Python stdlib source), capped,
    prepared once in the run's temporary folder."""
    import torch
    from moe_dist.bench.alpha_beta import model_flops_per_token
    from moe_dist.plan import make_plan
    from moe_dist.train.trainer import Trainer
    s = ctx["settings"]["train"]
    steps = ctx["steps"] or s["steps"]
    cfg, overrides = _train_config(ctx, backend, steps, backend)
    plan = make_plan(cfg, 1)
    flops = model_flops_per_token(cfg)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    build_s = time.perf_counter() - t0
    n = sum(p.numel() for p in trainer.model.parameters())
    print(f"{Path(ctx['train_config']).name} moe.backend={backend}: {n / 1e6:.1f}M parameters "
          f"({plan.params_global.active / 1e6:.1f}M active), {flops / 1e9:.2f} GFLOP/token, "
          f"{cfg.train.batch_size}×{cfg.train.seq_len} tokens/step, built in {build_s:.1f}s")
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum_steps
    losses, secs = [], []
    res: dict[str, Any] = {"backend": backend, "config": str(Path(ctx["train_config"]).relative_to(REPO)),
                           "overrides": overrides[:len(s["overrides"]) + 1], "parameters": n,
                           "active_parameters": plan.params_global.active, "flops_per_token": flops,
                           "flops_per_token_formula": "moe_dist.bench.alpha_beta.model_flops_per_token: 6·active "
                           "matmul weights (head, router) + 12·L·S·H·Dh attention (full, not causal-halved)",
                           "tokens_per_step": tokens_per_step, "plan_bytes": plan.memory.total,
                           "plan_memory": dataclass_dict(plan.memory)}
    t_fit = time.perf_counter()
    for step in range(steps):
        r = trainer.train_step(step)
        losses.append(r.lm_loss)
        secs.append(r.seconds)
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d} LM loss {r.lm_loss:.4f} {tokens_per_step / r.seconds:,.0f} tokens/s "
                  f"{1e3 * r.seconds:.0f} ms  ({time.perf_counter() - t_fit:.1f}s)")
    skip = min(10, steps // 2)                 # the first steps include Triton's autotuning and allocator growth
    steady = statistics.median(secs[skip:])
    avg = min(10, steps // 2)                  # steps averaged at each end for "loss falls"
    res.update(steps=steps, lm_loss=losses, step_s=secs, steady_from_step=skip, steady_step_s=steady,
               tokens_per_s=tokens_per_step / steady, tokens_per_s_overall=tokens_per_step * steps / sum(secs),
               loss_first10=statistics.mean(losses[:avg]), loss_last10=statistics.mean(losses[-avg:]), loss_steps_averaged=avg,
               engine_memory=trainer.engine.memory())
    peak = (ctx.get("peak") or {}).get("matmul", {}).get("tflops")
    if ctx["device"] == "cuda":
        res["peak_allocated"] = int(torch.cuda.max_memory_allocated())
        if peak:
            res.update(peak_tflops=peak, mfu=res["tokens_per_s"] * flops / (peak * 1e12))
        else:
            res["mfu_note"] = "no measured peak (the peak part did not finish)"
    else:
        res["achieved_gflops_cpu"] = res["tokens_per_s"] * flops / 1e9
        res["mfu_note"] = "CPU rehearsal: no MFU"
    return res


def _train_config(ctx: dict, backend: str, steps: int, run: str):
    """The training config with this run's backend, data (prepared once per check in its temporary folder) and
    output folder; returns (config, overrides)."""
    from moe_dist import config as C
    from moe_dist.train.data import prepare
    s = ctx["settings"]["train"]
    work = Path(ctx["workdir"])
    data = work / "data" / "stdlib.bin"
    if not data.exists():
        t0 = time.perf_counter()
        prepare(None, data, s["data_tokens"])
        print(f"prepared {data} ({s['data_tokens']:,} byte tokens) in {time.perf_counter() - t0:.1f}s")
    overrides = s["overrides"] + [f"--moe.backend={backend}", f"--train.out_dir={work / ('train_' + run)}",
                                  f"--data.path={data}", f"--train.steps={steps}", "--train.tensorboard=false",
                                  "--checkpoint.resume=never"]
    return C.load(ctx["train_config"], overrides), overrides


# Kernel names → what they do, for the profile's split of device time (first match wins).
PROFILE_CATEGORIES = (
    ("GEMM", r"gemm|matmul|cutlass|xmma|nvjet|cublas|_grouped_gemm_kernel|_grouped_wgrad_kernel|splitk"),
    ("attention", r"flash|fmha|attention|sdpa|efficient_attention"),
    ("MoE row moves", r"permute|unpermute|combine|gather|scatter|index|sort|cumsum|histc|bincount"),
    ("optimizer", r"adam|foreach|multi_tensor|lerp|addcdiv|sqrt"),
    ("copies", r"memcpy|memset|copy|fill|cat"),
    ("reductions", r"reduce|sum|norm|softmax|max|mean"),
)


def part_profile(ctx: dict, save) -> dict:
    """Where a training step's time goes (moe.backend=auto): a few steps under torch.profiler after warm-up
    steps. GPU: device time per kernel, split into PROFILE_CATEGORIES, against the steps' wall time (busy < 1
    means the GPU waited on the host: launches, synchronisations). CPU rehearsal: the top operators by self CPU
    time."""
    import re

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from moe_dist.train.trainer import Trainer
    p = ctx["settings"]["profile"]
    warm, n = p["warmup_steps"], p["steps"]
    cfg, _ = _train_config(ctx, "auto", warm + n, "profile")
    trainer = Trainer(cfg)
    cuda = ctx["device"] == "cuda"
    warm_s = [trainer.train_step(step).seconds for step in range(warm)]
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for step in range(warm, warm + n):
            trainer.train_step(step)
        if cuda:
            torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t0) * 1e6
    # The profiler's own bookkeeping slows the host (the first H200 run: 217 ms per profiled step against 72-84
    # unprofiled), so device time is also set against the last unprofiled warm-up steps.
    plain_ms = statistics.median(warm_s[-2:]) * 1e3
    res: dict[str, Any] = {"backend": "auto", "steps_profiled": n, "after_warmup_steps": warm,
                           "wall_ms_per_step": wall_us / n / 1e3, "unprofiled_ms_per_step": plain_ms}
    if cuda:
        per_kernel: dict[str, list[float]] = {}
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                per_kernel.setdefault(e.name, [0.0, 0])
                per_kernel[e.name][0] += e.time_range.elapsed_us()
                per_kernel[e.name][1] += 1
        busy = sum(v[0] for v in per_kernel.values())
        cats: dict[str, float] = {}
        for name, (us, _) in per_kernel.items():
            cat = next((c for c, rx in PROFILE_CATEGORIES if re.search(rx, name, re.I)), "other")
            cats[cat] = cats.get(cat, 0.0) + us
        top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:25]
        res.update(device_busy_ms_per_step=busy / n / 1e3, device_busy_fraction=busy / wall_us,
                   device_busy_fraction_of_unprofiled_step=busy / n / 1e3 / plain_ms,
                   kernels_per_step=sum(v[1] for v in per_kernel.values()) / n,
                   category_ms_per_step={c: us / n / 1e3 for c, us in sorted(cats.items(), key=lambda kv: -kv[1])},
                   top_kernels=[{"name": k[:160], "ms_per_step": v[0] / n / 1e3, "calls_per_step": v[1] / n}
                                for k, v in top])
        print(f"step {res['wall_ms_per_step']:.1f} ms wall profiled ({plain_ms:.1f} ms unprofiled), GPU busy "
              f"{res['device_busy_ms_per_step']:.1f} ms ({res['device_busy_fraction_of_unprofiled_step']:.0%} of "
              f"the unprofiled step), {res['kernels_per_step']:.0f} kernels/step")
        print("device ms/step: " + ", ".join(f"{c} {v:.1f}" for c, v in res["category_ms_per_step"].items()))
        for k in res["top_kernels"][:10]:
            print(f"  {k['ms_per_step']:7.2f} ms  x{k['calls_per_step']:.0f}  {k['name'][:100]}")
    else:
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
        res["top_cpu_ops"] = [{"name": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / n / 1e3} for e in ops]
        print(f"step {res['wall_ms_per_step']:.1f} ms wall (CPU rehearsal: operators by self CPU time)")
    return res


def dataclass_dict(x) -> dict:
    import dataclasses
    return {**dataclasses.asdict(x), "total": x.total}


CHILD_PARTS: dict[str, Callable[[dict, Callable], dict]] = {
    "peak": part_peak, "kernels": part_kernels, "speed": part_speed, "layer": part_layer,
    "train:triton": lambda ctx, save: part_train(ctx, save, "triton"),
    "train:grouped_mm": lambda ctx, save: part_train(ctx, save, "grouped_mm"),
    "train:auto": lambda ctx, save: part_train(ctx, save, "auto"),
    "profile": lambda ctx, save: part_profile(ctx, save),
}


def child_main(name: str, ctx_path: str) -> int:
    from moe_dist.bench.report import write_json_atomic
    ctx = json.loads(Path(ctx_path).read_text())
    out = Path(os.environ["TIMEBOX_RESULT"])

    def save(res: dict) -> None:
        write_json_atomic(out, {**res, "partial": True})

    res = CHILD_PARTS[name](ctx, save)
    write_json_atomic(out, {**res, "partial": False})
    return 0


# ------------------------------------------------------------------------------------------ the command


def _parse_parts(text: str) -> list[str]:
    wanted: list[str] = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        if item not in PART_GROUPS:
            raise SystemExit(f"gpu_check: --parts {item!r}: choose from {', '.join(sorted(PART_GROUPS))}")
        wanted += PART_GROUPS[item]
    if any(p.startswith("train:") for p in wanted):
        wanted.append("peak")                           # MFU's denominator
    return [p for p in PART_ORDER if p in wanted]


def _parse_limits(items: list[str]) -> dict[str, float]:
    limits = {}
    for item in items:
        name, _, value = item.partition("=")
        names = PART_GROUPS.get(name)
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not names or seconds <= 0:
            raise SystemExit(f"gpu_check: --limit {item!r}: write PART=SECONDS with PART one of "
                             f"{', '.join(sorted(PART_GROUPS))} and SECONDS > 0")
        limits.update({n: seconds for n in names})
    return limits


def environment(gpu: bool) -> dict:
    import platform

    import torch
    env = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
           "cuda": torch.version.cuda, "cpu_count": os.cpu_count()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if gpu:
        env.update(device=torch.cuda.get_device_name(0),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1))
    else:
        env["device"] = "cpu"
    return env


def plot(report: dict, path: Path) -> Optional[Path]:
    """Targets as value ÷ aim bars, and the training loss curves of each backend."""
    try:
        from moe_dist.bench.report import figure, save_figure
        fig, axes = figure(1, 2, width=6.5, height=4.2)
    except ImportError:
        return None
    a1, a2 = axes[0]
    rows = [(t["id"], t["value"], t) for t in report["targets"] if t["value"] is not None]
    aims = {"gemm_E8": AIMS["gemm_E8"], "gemm_E32": AIMS["gemm_E32"], "rows_vs_copy": AIMS["rows_vs_copy"],
            "layer_vs_dense": AIMS["layer_vs_dense"], **{f"mfu_{b}": AIMS["mfu"] for b in TRAIN_BACKENDS}}
    bars = [(i, v / aims[i], t["verdict"]) for i, v, t in rows if i in aims]
    colors = {"PASS": "tab:green", "FAIL": "tab:red"}
    a1.barh([b[0] for b in bars], [b[1] for b in bars], color=[colors.get(b[2], "tab:gray") for b in bars])
    a1.axvline(1.0, color="k", lw=1)
    a1.set_xlabel("measured ÷ aim (≥ 1 meets it)")
    a1.set_title("targets" + ("" if report["gpu_figure"] else " (REHEARSAL: no GPU figure)"), fontsize=10)
    for b in TRAIN_BACKENDS:
        r = (report["parts"].get(f"train:{b}") or {}).get("result") or {}
        if r.get("lm_loss"):
            a2.plot(range(len(r["lm_loss"])), r["lm_loss"], label=f"moe.backend={b}")
    a2.set_xlabel("step")
    a2.set_ylabel("LM loss")
    a2.set_title("training, " + report["environment"].get("device", "?"), fontsize=10)
    if a2.get_legend_handles_labels()[0]:
        a2.legend(fontsize=8)
    return save_figure(fig, path, note=None if report["gpu_figure"] else REHEARSAL_NOTE)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="kernels,speed,layer,train,profile",
                   help="comma-separated: kernels, speed, layer, profile, train (= train:triton, train:grouped_mm, "
                        "train:auto), peak; train adds peak (MFU's denominator). Default: all, run in the order "
                        + ", ".join(PART_ORDER))
    p.add_argument("--budget-s", type=float, help=f"seconds for the whole run (default {BUDGET_S['gpu']} on a GPU, "
                   f"{BUDGET_S['rehearsal']} in the rehearsal); a part gets min(its limit, what is left)")
    p.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                   help="one part's time limit (repeatable); defaults: GPU " + ", ".join(
                       f"{k} {v}" for k, v in LIMITS_GPU.items()))
    p.add_argument("--steps", type=int, help="training steps per backend (default 50 on a GPU, 3 in the rehearsal)")
    p.add_argument("--seed", type=int, help="seed of the kernels' random inputs (default: fresh, recorded)")
    p.add_argument("--rehearsal", action="store_true", help="run the CPU rehearsal even where a GPU is visible")
    p.add_argument("--out", help="result JSON (default benchmarks/results/gpu_check.json on a GPU, "
                                 "runs/bench/gpu_check_rehearsal.json otherwise); PNGs beside it")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--ctx", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child_main(a.child, a.ctx)

    t_start = time.monotonic()
    parts = _parse_parts(a.parts)
    limits_override = _parse_limits(a.limit)
    if a.steps is not None and a.steps < 2:
        raise SystemExit(f"gpu_check: --steps={a.steps}: must be at least 2 (first vs last steps)")
    import torch
    gpu = (torch.cuda.is_available() and not a.rehearsal and os.environ.get("TRITON_INTERPRET", "0") != "1")
    mode = "gpu" if gpu else "rehearsal"
    out = Path(a.out) if a.out else (REPO / "benchmarks" / "results" / "gpu_check.json" if gpu
                                     else Path("runs", "bench", "gpu_check_rehearsal.json"))
    out = out.resolve()
    limits = {**(LIMITS_GPU if gpu else LIMITS_REHEARSAL), **limits_override}
    budget = a.budget_s or BUDGET_S[mode]
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "little")
    env = {"TRITON_INTERPRET": "0" if gpu else "1"}
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""                # a rehearsal on a GPU machine stays on the CPU
    elif os.environ.get("DS_ACCELERATOR") == "cpu":
        env["DS_ACCELERATOR"] = "cuda"                  # the Makefile's CPU default would put DeepSpeed-MoE on the CPU
    from moe_dist.bench.report import write_result
    report: dict[str, Any] = {
        "check": "gpu-check: Triton kernels, kernel speed, MoE layer and training on one GPU",
        "mode": mode, "gpu_figure": gpu, "note": None if gpu else REHEARSAL_NOTE,
        "environment": environment(gpu), "out": str(out), "budget_s": budget, "seed": seed,
        "settings": SETTINGS[mode], "train_config": str(TRAIN_CONFIG.relative_to(REPO)),
        "parts": {}, "targets": [], "exit_code": None,
    }
    print(f"gpu-check ({'GPU: ' + report['environment']['device'] if gpu else REHEARSAL_NOTE}); parts "
          f"{', '.join(parts)}; budget {budget:.0f} s; results {out}", flush=True)

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        ctx_path = work / "ctx.json"

        def spec(name: str) -> PartSpec:
            return PartSpec(name, [sys.executable, str(Path(__file__).resolve()), "--child", name,
                                   "--ctx", str(ctx_path)], limits[name], env, cwd=REPO)

        def write_ctx() -> None:
            peak = (report["parts"].get("peak") or {}).get("result")
            ctx_path.write_text(json.dumps({
                "mode": mode, "device": "cuda" if gpu else "cpu", "settings": SETTINGS[mode], "seed": seed,
                "steps": a.steps, "train_config": str(TRAIN_CONFIG), "workdir": str(work),
                "artifacts": str(out.parent), "stem": out.stem, "peak": peak}))

        def on_part(name: str, outcome: dict) -> None:
            report["parts"][name] = outcome
            report["targets"] = judge(report["parts"], gpu)
            report["elapsed_s"] = round(time.monotonic() - t_start, 1)
            write_result(out, report)
            write_ctx()                              # the next part sees the peak measured so far

        out.parent.mkdir(parents=True, exist_ok=True)
        write_ctx()
        run_all([spec(n) for n in parts], budget, work, on_part, say=lambda s: print(s, flush=True))

    report["targets"] = judge(report["parts"], gpu)
    report["exit_code"] = exit_code(report["parts"], report["targets"])
    report["elapsed_s"] = round(time.monotonic() - t_start, 1)
    png = plot(report, out.with_suffix(".png"))
    report["figures"] = {"summary": str(png)} if png else {}
    report["figures"].update({f"layer {c['label']}": c["json"].replace(".json", ".png")
                              for c in ((report["parts"].get("layer") or {}).get("result") or {}).get("cases", [])})
    write_result(out, report)
    print("\n" + table(report), flush=True)
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
