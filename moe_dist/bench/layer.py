"""`moe-dist bench layer`: the MoE layer's forward+backward against DeepSpeed-MoE, our expert backends and a
dense MLP of equal active FLOPs, in one process on equal shapes and dtypes. Legend: T tokens, D model dim,
F expert hidden, E experts, K top-k, N permuted rows.

Variants, timed in the same run with interleaved repeats (`moe_dist.bench.timing.measure`: each round runs
every variant once, so drift in the machine's load hits them alike) and reported as medians and ratios:
- `ours_<backend>`: `MoELayer(cfg, D)` in the single-process layout (router, aux loss, capacity, permute,
  experts, weighted unpermute), for `grouped_mm`, `loop` and, on a GPU, `triton`.
- `deepspeed`: `deepspeed.moe.layer.MoE` with ep_size=1 (`moe_dist.bench.deepspeed_ref`, which says how both
  route alike): its gate at every K and its capacity-padded [E, C, D] dispatch, the same SwiGLU expert as ours
  looped over E. Capacity mode uses the same capacity factor as ours; dropless mode is DeepSpeed's
  `drop_tokens=False` (capacity = the largest expert's load, every expert padded to it).
- `deepspeed_einsum` (`--deepspeed-einsum`): the same DeepSpeed gate and experts behind the GShard einsum
  dispatch its MOELayer used up to v0.18 (the installed 0.19 gathers instead); O(T²) work, keep T small.
- `dense`: one SwiGLU MLP of hidden K·F on all T tokens: the same active FLOPs with no routing, the ideal
  a sparse layer can approach.

The breakdown times each public step of our layer (`MoELayer.route` + `capacity`, `dispatch`, `run_experts`,
`combine`: the calls its `forward` makes) on its own, forward+backward, inputs detached at the step's boundary,
same data. The all-to-all is zero in the single-process layout (`moe-dist bench scaling` measures it on ranks);
the benchmarked layer has no shared experts. The sum of the stages is reported next to the whole layer, so the
split can be checked.

Clocks: wall (default) or `--clock cpu` (process CPU time, with `--threads 1`: robust on a machine loaded by
others). `--reuse-freed-memory` keeps glibc from returning large blocks to the OS, whose page faults on
every fresh activation otherwise dominate and make CPU timings depend on allocation history.

Presets: `quick` (tiny shapes, seconds: tests), `default` (T=16384, D=256, F=512: E 8..128 at K=1,2 and the
fine-grained E=64 at K=6; minutes), `full` (E 8..128 × K 1,2,6 × T 4096,16384). `--tokens`, `--experts` and
`--top-k` replace the preset's sweep (every E with every K). Results go to runs/bench/ under the current
directory unless `--out` names the JSON.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from moe_dist.bench.timing import measure, medians, reuse_freed_memory, timed_call

PRESETS = {
    # tokens, dim, hidden, experts × top_k, extra (E, K) pairs, repeats, warmup
    "quick": dict(tokens=[256], dim=64, hidden=128, experts=[4, 8], top_k=[1, 2], repeats=2, warmup=1),
    "default": dict(tokens=[16384], dim=256, hidden=512, experts=[8, 16, 64, 128], top_k=[1, 2],
                    extra_pairs=[(64, 6)], repeats=3, warmup=1),
    "full": dict(tokens=[4096, 16384], dim=256, hidden=512, experts=[8, 16, 64, 128], top_k=[1, 2, 6],
                 repeats=5, warmup=1),
}
MODES = ("capacity", "dropless")
STAGES = ("router", "permute", "all_to_all", "experts", "unpermute")
AUX_LOSS_COEF = 0.01            # MoEConfig's default, which our layer uses; DeepSpeed's l_aux is weighted alike


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="quick: tiny shapes for tests; default: T=16384, K=1,2 and E=64 K=6 (minutes); "
                        "full: T 4096,16384 × E 8..128 × K 1,2,6")
    p.add_argument("--quick", dest="preset", action="store_const", const="quick",
                   help="the same as --preset quick (every bench command takes --quick for a smoke run)")
    p.add_argument("--tokens", type=int, nargs="+", help="tokens per rank (T); overrides the preset")
    p.add_argument("--dim", type=int, help="model dim D")
    p.add_argument("--hidden", type=int, help="expert hidden F")
    p.add_argument("--experts", type=int, nargs="+",
                   help="numbers of experts E (with --top-k: every E with every K, instead of the preset's)")
    p.add_argument("--top-k", type=int, nargs="+", help="top-k values K")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="capacity: cf as below, ours vs DeepSpeed at the same cf; dropless: vs drop_tokens=False")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--min-capacity", type=int, default=4)
    p.add_argument("--backends", nargs="+", choices=("grouped_mm", "loop", "triton", "auto"),
                   default=["grouped_mm", "loop", "triton"],
                   help="our expert backends (triton only where it runs compiled, i.e. on a GPU; auto: what "
                        "moe.backend=auto runs, on a GPU torch._grouped_mm's GEMMs with the Triton row kernels)")
    p.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeed-MoE")
    p.add_argument("--deepspeed-einsum", action="store_true",
                   help="also time DeepSpeed-MoE's GShard einsum dispatch (its MOELayer up to v0.18, on its own "
                        "gating functions): O(T²·k·D) work, so keep T small (e.g. --tokens 4096)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-stage breakdown")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="default: fp32 on the CPU, bf16 on a GPU")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: perf_counter; cpu: this process's CPU time (CPU only): robust on a machine "
                        "loaded by others, best with --threads 1 (no spinning worker threads)")
    p.add_argument("--reuse-freed-memory", action="store_true",
                   help="glibc only: serve every allocation from the heap and never trim it (mallopt), so a "
                        "freed activation's pages are reused instead of page-faulted in again; what tcmalloc or "
                        "jemalloc give. Applies to every variant alike")
    p.add_argument("--repeats", type=int, help="timed rounds per configuration (median reported)")
    p.add_argument("--warmup", type=int, help="untimed calls per variant first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replot", metavar="JSON", help="only redraw the PNGs of an existing result file")
    p.add_argument("--out", help="result JSON (default runs/bench/layer_<device>[_<preset>].json under the "
                                 "current directory); PNGs are written beside it")


@dataclass(frozen=True)
class Case:
    tokens: int
    experts: int
    top_k: int
    mode: str

    def label(self) -> str:
        return f"T={self.tokens} E={self.experts} k={self.top_k} {self.mode}"


def _settings(args) -> dict:
    """The sweep: the preset with the command line's overrides, checked; `pairs` lists the (E, K) to run."""
    s = dict(PRESETS[args.preset])
    for key in ("tokens", "dim", "hidden", "experts", "top_k", "repeats", "warmup"):
        v = getattr(args, key)
        if v is not None:
            s[key] = v
    for key in ("dim", "hidden", "repeats"):
        if s[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')}={s[key]}: must be at least 1")
    if s["warmup"] < 0:
        raise ValueError(f"--warmup={s['warmup']}: must be 0 or more")
    for key in ("tokens", "experts", "top_k"):
        bad = [v for v in s[key] if v < 1]
        if bad:
            raise ValueError(f"--{key.replace('_', '-')} {bad}: every value must be at least 1")
    pairs = [(e, k) for e in s["experts"] for k in s["top_k"]]
    if args.experts is None and args.top_k is None:      # the preset's own extra shapes
        pairs += [p for p in s.pop("extra_pairs", []) if p not in pairs]
    s.pop("extra_pairs", None)
    bad = [(e, k) for e, k in pairs if k > e]
    if bad:
        raise ValueError(f"--top-k larger than --experts in {bad}: choose K ≤ E")
    if args.capacity_factor <= 0:
        raise ValueError(f"--capacity-factor={args.capacity_factor}: must be positive")
    s["pairs"] = pairs
    return s


# ------------------------------------------------------------------------------------------ modules


def swiglu_module(dim: int, hidden: int, dtype, device, seed: int):
    """The routed experts' MLP as a plain module (w_in [D, 2F] fused gate|up, w_out [F, D], same activation
    code): DeepSpeed's expert, and with hidden K·F the dense-equivalent ideal."""
    import torch
    import torch.nn as nn
    from moe_dist.moe.experts import activate

    class SwiGLU(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.w_in_DF2 = nn.Parameter((torch.randn(dim, 2 * hidden, generator=g) * 0.02).to(device, dtype))
            self.w_out_FD = nn.Parameter((torch.randn(hidden, dim, generator=g) * 0.02).to(device, dtype))

        def forward(self, x):
            shape = x.shape
            h = activate(x.reshape(-1, dim) @ self.w_in_DF2, "swiglu")
            return (h @ self.w_out_FD).view(shape)

    return SwiGLU()


def our_layer(case: Case, dim: int, hidden: int, backend: str, args, dtype, device):
    """Our single-process `MoELayer` for the case (same seed: same weights for every backend)."""
    import torch
    from moe_dist.config import MoEConfig
    from moe_dist.moe.layer import MoELayer
    cfg = MoEConfig(num_experts=case.experts, top_k=case.top_k, expert_hidden=hidden, backend=backend,
                    capacity_factor=args.capacity_factor if case.mode == "capacity" else None,
                    min_capacity=args.min_capacity, renormalize=case.top_k > 1, aux_loss_coef=AUX_LOSS_COEF)
    torch.manual_seed(args.seed)
    return MoELayer(cfg, dim).to(device, dtype)


def deepspeed_twin(case: Case, ours, dim: int, hidden: int, args, dtype, device):
    """DeepSpeed-MoE's layer for the case, holding `ours`'s router and expert weights."""
    from moe_dist.bench import deepspeed_ref
    ds = deepspeed_ref.deepspeed_layer(swiglu_module(dim, hidden, dtype, device, args.seed), dim, case.experts,
                                       case.top_k, args.capacity_factor, args.min_capacity,
                                       drop_tokens=case.mode == "capacity", dtype=dtype, device=device)
    deepspeed_ref.copy_weights(ds, ours)
    return ds


# ------------------------------------------------------------------------------------------ timing


def _step(module, x, loss: Callable, device: str, clock: str) -> Callable[[], float]:
    """A timed forward+backward of `loss(module, x)` (gradients reset and the input detached first,
    outside the clock)."""
    held = {}

    def setup():
        for p in module.parameters():
            p.grad = None
        held["x"] = x.detach().requires_grad_()

    return timed_call(lambda: loss(module, held["x"]).backward(), device, clock, setup)


def _ours_loss(layer, x):
    y, stats = layer(x)
    return y.float().sum() + stats.aux_loss + stats.z_loss


def _deepspeed_loss(layer, x):
    from moe_dist.bench.deepspeed_ref import loss
    return loss(layer, x, AUX_LOSS_COEF)


def _dense_loss(mlp, x):
    return mlp(x).float().sum()


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return num / den if num and den else None


def run_case(case: Case, s: dict, args, dtype, device: str, backends: list[str], with_ds: bool,
             dense_cache: dict) -> dict:
    import torch
    dim, hidden = s["dim"], s["hidden"]
    g = torch.Generator().manual_seed(args.seed + case.tokens)
    x = torch.randn(1, case.tokens, dim, generator=g).to(device, dtype)
    fns, notes, extra = {}, {}, {}
    layer = kept_E = None
    for b in backends:
        layer = our_layer(case, dim, hidden, b, args, dtype, device)     # same seed: same weights
        fns[f"ours_{b}"] = _step(layer, x, _ours_loss, device, args.clock)
        with torch.no_grad():
            _, st = layer(x)
        extra[f"ours_{b}_drop_fraction"] = st.drop_fraction
        extra["capacity"] = st.capacity
        kept_E = st.tokens_per_expert
    if with_ds:
        from moe_dist.bench import deepspeed_ref
        ds = deepspeed_twin(case, layer, dim, hidden, args, dtype, device)
        ds_kept_E = deepspeed_ref.kept_per_expert(ds, x)
        # Same experts chosen and min(load, C) kept per expert: both layers do the same expert work.
        extra["deepspeed_same_loads"] = bool(torch.equal(ds_kept_E.cpu(), kept_E.cpu()))
        extra["deepspeed_drop_fraction"] = 1.0 - float(ds_kept_E.sum()) / (case.tokens * case.top_k)
        fns["deepspeed"] = _step(ds, x, _deepspeed_loss, device, args.clock)
        if args.deepspeed_einsum:
            fns["deepspeed_einsum"] = _step(deepspeed_ref.EinsumMoE(ds), x, _deepspeed_loss, device, args.clock)
    key = (case.tokens, case.top_k)
    if key not in dense_cache:
        dense_cache[key] = swiglu_module(dim, case.top_k * hidden, dtype, device, args.seed)
    fns["dense"] = _step(dense_cache[key], x, _dense_loss, device, args.clock)

    samples = measure(fns, s["repeats"], s["warmup"])
    med = medians(samples)
    # Forward 6·T·K·D·F (gate+up 4·D·F, down 2·D·F per row), backward twice that.
    flops = 18 * case.tokens * case.top_k * dim * hidden
    ratios = {}
    for b in backends:
        t = med[f"ours_{b}"]
        ratios[f"{b}_speed_vs_deepspeed"] = _ratio(med.get("deepspeed"), t)
        ratios[f"{b}_speed_vs_dense"] = _ratio(med["dense"], t)
    for b in backends:
        if "deepspeed_einsum" in med:
            ratios[f"{b}_speed_vs_deepspeed_einsum"] = _ratio(med["deepspeed_einsum"], med[f"ours_{b}"])
    ratios["deepspeed_speed_vs_dense"] = _ratio(med["dense"], med.get("deepspeed"))
    return {**asdict(case), **extra,
            "median_ms": {n: t * 1e3 for n, t in med.items()},
            "samples_ms": {n: [round(t * 1e3, 3) for t in v] for n, v in samples.items()},
            "gflops": {n: flops / t / 1e9 for n, t in med.items()},
            "ratios": ratios, "notes": notes}


def breakdown_case(case: Case, s: dict, args, dtype, device: str, backend: str) -> dict:
    """Our layer split into the public steps its `forward` composes, each timed forward+backward on its own
    (inputs detached and requiring grad at the step's boundary, upstream gradients random), plus the whole
    layer for reference."""
    import torch
    dim, T = s["dim"], case.tokens
    layer = our_layer(case, dim, s["hidden"], backend, args, dtype, device)
    g = torch.Generator().manual_seed(args.seed + T)
    x_TD = torch.randn(T, dim, generator=g).to(device, dtype)

    # One forward to fix the routing and the stages' inputs.
    with torch.no_grad():
        routing = layer.route(x_TD, 1, T)
        cap = layer.capacity(routing)
        x_ND, offsets_E, meta = layer.dispatch(x_TD, routing, cap)
        y_ND = layer.run_experts(x_ND, offsets_E)
    gw_TK = torch.randn(routing.weights_TK.shape, generator=g).to(device)
    g_ND = torch.randn(x_ND.shape, generator=g).to(device, dtype)
    g_TD = torch.randn(x_TD.shape, generator=g).to(device, dtype)
    # The router weights as a leaf: the unpermute's backward computes their gradient, as in the layer.
    w_TK = routing.weights_TK.detach().requires_grad_()

    def router(xx):
        rr = layer.route(xx, 1, T)
        layer.capacity(rr)
        torch.autograd.backward([rr.weights_TK, rr.aux_loss], [gw_TK, None])

    def permute(xx):
        layer.dispatch(xx, routing, cap)[0].backward(g_ND)

    def experts(xn):
        layer.run_experts(xn, offsets_E).backward(g_ND)

    def unpermute(yn):
        w_TK.grad = None
        layer.combine(yn, meta, weights_TK=w_TK).backward(g_TD)

    def stage(fn, inp):
        held = {}

        def setup():
            for p in layer.parameters():
                p.grad = None
            held["x"] = inp.detach().requires_grad_()
        return timed_call(lambda: fn(held["x"]), device, args.clock, setup)

    fns = {"router": stage(router, x_TD), "permute": stage(permute, x_TD), "experts": stage(experts, x_ND),
           "unpermute": stage(unpermute, y_ND),
           "whole_layer": _step(layer, x_TD.unsqueeze(0), _ours_loss, device, args.clock)}
    med = {n: t * 1e3 for n, t in medians(measure(fns, s["repeats"], s["warmup"])).items()}
    stages = {k: med.get(k, 0.0) for k in STAGES}     # all_to_all: 0 in the single-process layout
    return {**asdict(case), "backend": backend, "stages_ms": stages, "sum_of_stages_ms": sum(stages.values()),
            "whole_layer_ms": med["whole_layer"],
            "note": "single process: no all-to-all (measured on ranks by `moe-dist bench scaling`)"}


# ------------------------------------------------------------------------------------------ command


def default_out(device: str, preset: str) -> Path:
    """runs/bench/layer_<device>[_<preset>].json under the current directory (never the package's tree)."""
    from moe_dist.bench.report import RUN_DIR
    return RUN_DIR / f"layer_{device}{'' if preset == 'default' else '_' + preset}.json"


def _backends(args, s: dict, device: str, dtype, dtype_name: str) -> tuple[list[str], dict]:
    """The requested backends that can run here, and why the others cannot."""
    from moe_dist.moe.experts import grouped_mm_supported
    backends, skipped = [], {}
    for b in args.backends:
        if b == "triton" and (device != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
            skipped[b] = "n/a: the Triton kernels run compiled on a CUDA GPU only (the CPU interpreter " \
                         "checks correctness, its times mean nothing)"
        elif b == "grouped_mm" and not grouped_mm_supported(s["dim"], s["hidden"], dtype):
            skipped[b] = f"n/a: grouped_mm needs D and F multiples of 16 bytes of {dtype_name}"
        else:
            backends.append(b)
    if not backends:
        raise ValueError(f"--backends {args.backends}: none can run here ({skipped}); add 'loop'")
    return backends, skipped


def run(args) -> int:
    from moe_dist.bench import layer_plots
    if args.replot:
        import json
        path = Path(args.replot)
        written = layer_plots.plot(json.loads(path.read_text()), path)
        print("wrote " + ", ".join(str(p) for p in written))
        return 0
    import torch
    s = _settings(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    dtype_name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reuse_freed_memory:
        reuse_freed_memory()
    if args.clock == "cpu" and device != "cpu":
        raise ValueError("--clock cpu measures CPU time and means nothing for GPU work; use --clock wall")

    backends, skipped = _backends(args, s, device, dtype, dtype_name)
    primary = backends[0]
    with_ds = not args.no_deepspeed
    if with_ds:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            with_ds = False
            skipped["deepspeed"] = "n/a: deepspeed is not installed (pip install -e .[deepspeed])"

    cases = [Case(T, E, K, m) for T in s["tokens"] for E, K in s["pairs"] for m in args.modes]
    print(f"bench layer: {len(cases)} configurations, D={s['dim']} F={s['hidden']} {dtype_name} on {device} "
          f"({torch.get_num_threads()} threads, {args.clock} clock), "
          f"variants: {', '.join('ours_' + b for b in backends)}"
          f"{', deepspeed' if with_ds else ''}, dense; {s['repeats']} repeats", flush=True)
    results, dense_cache = [], {}
    t_start = time.perf_counter()
    for i, case in enumerate(cases):
        r = run_case(case, s, args, dtype, device, backends, with_ds, dense_cache)
        r["device"] = device
        results.append(r)
        med, rat = r["median_ms"], r["ratios"]
        ds = f"deepspeed {med['deepspeed']:.1f} ms" if "deepspeed" in med else "deepspeed n/a"
        if "deepspeed_einsum" in med:
            ds += f", deepspeed_einsum {med['deepspeed_einsum']:.1f} ms"
        print(f"[{i + 1}/{len(cases)}] {case.label()}: "
              + ", ".join(f"{b} {med['ours_' + b]:.1f} ms" for b in backends)
              + f", {ds}, dense {med['dense']:.1f} ms | {primary}: "
              f"{_fmt(rat[f'{primary}_speed_vs_deepspeed'])}× DeepSpeed, "
              f"{_fmt(rat[f'{primary}_speed_vs_dense'])}× dense  ({time.perf_counter() - t_start:.0f} s)",
              flush=True)

    breakdown = []
    if not args.no_breakdown:
        bcases = [Case(max(s["tokens"]), E, K, m) for E, K in s["pairs"] for m in args.modes]
        for j, case in enumerate(bcases):
            b = breakdown_case(case, s, args, dtype, device, primary)
            breakdown.append(b)
            print(f"[breakdown {j + 1}/{len(bcases)}] {case.label()}: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in b["stages_ms"].items())
                  + f" ms; sum {b['sum_of_stages_ms']:.1f} vs whole {b['whole_layer_ms']:.1f} ms", flush=True)

    from moe_dist.bench.deepspeed_ref import OPTIONS as DEEPSPEED_OPTIONS
    payload = {
        "benchmark": "MoE layer forward+backward: ours vs DeepSpeed-MoE vs dense-equivalent ideal",
        "preset": args.preset,
        "config": {"dim": s["dim"], "hidden": s["hidden"], "tokens": s["tokens"], "experts": s["experts"],
                   "top_k": s["top_k"], "pairs": s["pairs"], "modes": list(args.modes),
                   "capacity_factor": args.capacity_factor, "min_capacity": args.min_capacity,
                   "activation": "swiglu", "aux_loss_coef": AUX_LOSS_COEF,
                   "router": "softmax, renormalised top-k for k>1", "drop_policy": "probs",
                   "dtype": dtype_name, "device": device, "threads": torch.get_num_threads(),
                   "repeats": s["repeats"], "warmup": s["warmup"], "seed": args.seed, "clock": args.clock,
                   "allocator": "glibc heap only, no trim (--reuse-freed-memory)" if args.reuse_freed_memory
                   else "default",
                   "backends": backends, "primary_backend": primary, "skipped": skipped,
                   "deepspeed_options": DEEPSPEED_OPTIONS if with_ds else None,
                   "routing": "router at init on Gaussian inputs (near-uniform loads); DeepSpeed gets the "
                              "same router and expert weights, so both pick the same experts and keep the same "
                              "loads per expert (deepspeed_same_loads in each result)"},
        "results": results,
        "breakdown": breakdown,
        "elapsed_s": time.perf_counter() - t_start,
    }
    payload["targets"] = layer_plots.targets(results, primary)
    from moe_dist.bench.report import write_result
    out = Path(args.out) if args.out else default_out(device, args.preset)
    write_result(out, payload)
    written = [out]
    try:
        written += layer_plots.plot(payload, out)
    except ImportError:
        print("matplotlib is missing: no plots")
    t = payload["targets"]
    print(f"targets at T={t['tokens']} ({primary}): worst {_fmt(t['min_speed_vs_deepspeed'])}× DeepSpeed "
          f"(target ≥ {t['target_vs_deepspeed']}), worst {_fmt(t['min_speed_vs_dense'])}× dense "
          f"(target ≥ {t['target_vs_dense']})")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"
