"""`moe-dist bench layer`: the MoE layer's forward+backward against DeepSpeed-MoE, our expert backends and a
dense MLP of equal active FLOPs, in one process on equal shapes and dtypes. Legend: T tokens, D model dim,
F expert hidden, E experts, K top-k, C capacity.

Variants, timed in the same run with interleaved repeats (each round runs every variant once, so drift in
the machine's load hits them alike) and reported as medians and ratios:
- `ours_<backend>`: `MoELayer(cfg, D)` in the single-process layout (router, aux loss, capacity, permute,
  experts, weighted unpermute), for `grouped_mm`, `loop` and, on a GPU, `triton`.
- `deepspeed`: `deepspeed.moe.layer.MoE` with ep_size=1 on a world-1 gloo group: its gate and its
  capacity-padded [E, C, D] dispatch, the same SwiGLU expert as ours looped over E. Capacity mode uses the
  same capacity factor as ours; dropless mode is DeepSpeed's `drop_tokens=False` (capacity = the largest
  expert's load, every expert padded to it). Its gate supports K = 1 and 2 only: other K are "n/a".
- `deepspeed_einsum` (`--deepspeed-einsum`): the same DeepSpeed gate and experts behind the GShard einsum
  dispatch its MOELayer used up to v0.18 (the installed 0.19 gathers instead); O(T²) work, keep T small.
- `dense`: one SwiGLU MLP of hidden K·F on all T tokens: the same active FLOPs with no routing, the ideal
  a sparse layer can approach.

The breakdown times each stage of our layer separately (forward+backward, inputs detached at the stage's
boundary, same data): router (+ aux loss and capacity), permute (map + gather), all-to-all (zero in the
single-process layout: `moe-dist bench scaling` measures it on ranks), experts, unpermute. The sum of the
stages is reported next to the whole layer, so the split can be checked.

Clocks: wall (default) or `--clock cpu` (process CPU time, with `--threads 1`: robust on a machine loaded by
others). `--reuse-freed-memory` keeps glibc from returning large blocks to the OS, whose page faults on
every fresh activation otherwise dominate and make CPU timings depend on allocation history.

Presets: `quick` (tiny shapes, seconds: tests), `default` (the issue's T=16384 shapes at K=1,2, minutes),
`full` (E 8..128 × K 1,2,6 × T 4096,16384). Any sweep axis can be overridden on the command line.
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

PRESETS = {
    # tokens, dim, hidden, experts, top_k, repeats, warmup, breakdown configurations
    "quick": dict(tokens=[256], dim=64, hidden=128, experts=[4, 8], top_k=[1, 2], repeats=2, warmup=1),
    "default": dict(tokens=[16384], dim=256, hidden=512, experts=[8, 16, 64, 128], top_k=[1, 2],
                    repeats=3, warmup=1),
    "full": dict(tokens=[4096, 16384], dim=256, hidden=512, experts=[8, 16, 64, 128], top_k=[1, 2, 6],
                 repeats=5, warmup=1),
}
MODES = ("capacity", "dropless")
STAGES = ("router", "permute", "all_to_all", "experts", "unpermute")
DEEPSPEED_TOP_K = (1, 2)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="quick: tiny shapes for tests; default: T=16384, K=1,2 (minutes); full: the issue's sweep")
    p.add_argument("--quick", dest="preset", action="store_const", const="quick",
                   help="the same as --preset quick (every bench command takes --quick for a smoke run)")
    p.add_argument("--tokens", type=int, nargs="+", help="tokens per rank (T); overrides the preset")
    p.add_argument("--dim", type=int, help="model dim D")
    p.add_argument("--hidden", type=int, help="expert hidden F")
    p.add_argument("--experts", type=int, nargs="+", help="numbers of experts E")
    p.add_argument("--top-k", type=int, nargs="+", help="top-k values K")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="capacity: cf as below, ours vs DeepSpeed at the same cf; dropless: vs drop_tokens=False")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--min-capacity", type=int, default=4)
    p.add_argument("--backends", nargs="+", choices=("grouped_mm", "loop", "triton"),
                   default=["grouped_mm", "loop", "triton"],
                   help="our expert backends (triton only where it runs compiled, i.e. on a GPU)")
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
    p.add_argument("--out", help="result JSON (default benchmarks/results/layer_<device>[_<preset>].json); "
                                 "PNGs are written beside it")


@dataclass(frozen=True)
class Case:
    tokens: int
    experts: int
    top_k: int
    mode: str

    def label(self) -> str:
        return f"T={self.tokens} E={self.experts} k={self.top_k} {self.mode}"


def _settings(args) -> dict:
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
    bad = [(e, k) for e in s["experts"] for k in s["top_k"] if k > e]
    if bad:
        raise ValueError(f"--top-k larger than --experts in {bad}: choose K ≤ E")
    if args.capacity_factor <= 0:
        raise ValueError(f"--capacity-factor={args.capacity_factor}: must be positive")
    return s


# ------------------------------------------------------------------------------------------ modules


def _swiglu_module(dim: int, hidden: int, dtype, device, seed: int):
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


def _our_layer(case: Case, dim: int, hidden: int, backend: str, args, dtype, device):
    import torch
    from moe_dist.config import MoEConfig
    from moe_dist.moe.layer import MoELayer
    cfg = MoEConfig(num_experts=case.experts, top_k=case.top_k, expert_hidden=hidden, backend=backend,
                    capacity_factor=args.capacity_factor if case.mode == "capacity" else None,
                    min_capacity=args.min_capacity, renormalize=case.top_k > 1)
    torch.manual_seed(args.seed)
    return MoELayer(cfg, dim).to(device, dtype)


_DS_READY = False


def _init_deepspeed(device: str) -> None:
    """DeepSpeed-MoE asks its `groups` module for an expert-parallel group, which needs deepspeed.comm
    initialised: a world-1 gloo group in this process (ep_size=1, so no message is ever sent)."""
    global _DS_READY
    if _DS_READY:
        return
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", verbose=False)
    _DS_READY = True


def _deepspeed_layer(case: Case, dim: int, hidden: int, args, dtype, device):
    _init_deepspeed(device)
    import logging
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import logger
    logger.setLevel(logging.WARNING)
    layer = MoE(dim, _swiglu_module(dim, hidden, dtype, device, args.seed), num_experts=case.experts,
                ep_size=1, k=case.top_k, capacity_factor=args.capacity_factor,
                eval_capacity_factor=args.capacity_factor, min_capacity=args.min_capacity,
                drop_tokens=case.mode == "capacity",
                # Deterministic second choice, as ours (its default samples it with Gumbel noise).
                top2_2nd_expert_sampling=False).to(device, dtype)
    layer.set_deepspeed_parallelism()
    return layer


def copy_weights_to_deepspeed(ds, ours) -> None:
    """Give DeepSpeed's layer our router and expert weights: both then route every token alike and their
    experts see the same loads, so the timing compares the implementations, not two routings."""
    import torch
    moe = ds.deepspeed_moe
    with torch.no_grad():
        moe.gate.wg.weight.copy_(ours.router.weight_ED)
        for e, expert in enumerate(moe.experts.deepspeed_experts):
            expert.w_in_DF2.copy_(ours.experts.w_in_EDF2[e])
            expert.w_out_FD.copy_(ours.experts.w_out_EFD[e])


class DeepSpeedEinsumMoE:
    """DeepSpeed-MoE's layer as it was before its sparse dispatch (MOELayer.forward up to v0.18, ep_size=1):
    its gating functions build dense [T, E, C] combine weights and a dispatch mask, and two einsums move
    the tokens ("sec,sm->ecm" into the capacity-padded expert buffer, "sec,ecm->sm" back). Same gate weights
    and experts as the installed `deepspeed` variant, which it wraps; only the dispatch differs."""

    def __init__(self, ds):
        self.ds = ds

    def parameters(self):
        return self.ds.parameters()

    def __call__(self, x):
        import torch
        import torch.nn.functional as F
        from deepspeed.moe.sharded_moe import top1gating, top2gating
        moe = self.ds.deepspeed_moe
        gate = moe.gate
        d = x.shape[-1]
        r = x.reshape(-1, d)
        logits = F.linear(r.float(), gate.wg.weight.float())
        if gate.k == 1:
            l_aux, combine_sec, mask_sec, counts = top1gating(
                logits, gate.capacity_factor, gate.min_capacity, None, None, gate.drop_tokens, gate.use_rts,
                None, sparse_routes=False)
        else:
            l_aux, combine_sec, mask_sec, counts = top2gating(
                logits, gate.capacity_factor, gate.min_capacity, gate.drop_tokens, None,
                gate.top2_2nd_expert_sampling, sparse_routes=False)
        E = combine_sec.shape[1]
        dispatched_ecm = torch.einsum("sec,sm->ecm", mask_sec.type_as(r), r)
        out_ecm = moe.experts(dispatched_ecm.reshape(1, E, -1, d)).reshape(E, -1, d)
        y = torch.einsum("sec,ecm->sm", combine_sec.type_as(r), out_ecm)
        return y.reshape(x.shape), l_aux, counts


DEEPSPEED_OPTIONS = {"ep_size": 1, "use_rts": True, "top2_2nd_expert_sampling": False,
                     "noisy_gate_policy": None, "use_tutel": False}


# ------------------------------------------------------------------------------------------ timing


def _sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def reuse_freed_memory() -> None:
    """Turn off glibc's mmap for large blocks (M_MMAP_MAX=0) and its heap trimming (M_TRIM_THRESHOLD):
    PyTorch's CPU allocator calls malloc/free directly, and by default every tensor over the mmap
    threshold comes back as fresh pages whose first touch faults (about 0.35 ms per MiB here), which on
    the CPU costs as much as a GEMM's memory traffic. Process-wide, for every variant."""
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4          # glibc malloc.h
    if libc is None or not hasattr(libc, "mallopt") or not (
            libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)):
        raise ValueError("--reuse-freed-memory needs glibc's mallopt; run without it (or preload tcmalloc)")


def _step(module, x, call: Callable, device: str, clock: Callable[[], float]) -> Callable[[], float]:
    """One timed forward+backward (gradients reset first, outside the clock)."""
    def run() -> float:
        for p in module.parameters():
            p.grad = None
        xx = x.detach().requires_grad_()
        _sync(device)
        t0 = clock()
        loss = call(module, xx)
        loss.backward()
        _sync(device)
        return clock() - t0
    return run


def _ours_loss(layer, x):
    y, stats = layer(x)
    return y.float().sum() + stats.aux_loss + stats.z_loss


def _deepspeed_loss(layer, x):
    y, l_aux, _ = layer(x)
    return y.float().sum() + 0.01 * l_aux      # our aux_loss_coef


def _dense_loss(mlp, x):
    return mlp(x).float().sum()


def measure(fns: dict[str, Callable[[], float]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of every variant: `warmup` untimed calls each, then `repeats` rounds that run
    every variant once, in an order rotated each round so no variant always follows the same one."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            samples[n].append(fns[n]())
    return samples


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return num / den if num and den else None


def run_case(case: Case, s: dict, args, dtype, device: str, backends: list[str], with_ds: bool,
             dense_cache: dict) -> dict:
    import torch
    clock = CLOCKS[args.clock]
    dim, hidden = s["dim"], s["hidden"]
    g = torch.Generator().manual_seed(args.seed + case.tokens)
    x = torch.randn(1, case.tokens, dim, generator=g).to(device, dtype)
    fns, notes, extra = {}, {}, {}
    layer = None
    for b in backends:
        layer = _our_layer(case, dim, hidden, b, args, dtype, device)     # same seed: same weights
        fns[f"ours_{b}"] = _step(layer, x, _ours_loss, device, clock)
        with torch.no_grad():
            _, st = layer(x)
        extra[f"ours_{b}_drop_fraction"] = st.drop_fraction
        extra["capacity"] = st.capacity
    if with_ds and case.top_k in DEEPSPEED_TOP_K:
        ds = _deepspeed_layer(case, dim, hidden, args, dtype, device)
        copy_weights_to_deepspeed(ds, layer)
        fns["deepspeed"] = _step(ds, x, _deepspeed_loss, device, clock)
        if args.deepspeed_einsum:
            fns["deepspeed_einsum"] = _step(DeepSpeedEinsumMoE(ds), x, _deepspeed_loss, device, clock)
    elif with_ds:
        notes["deepspeed"] = f"n/a: DeepSpeed-MoE's gate supports top-k {DEEPSPEED_TOP_K} only"
    key = (case.tokens, case.top_k)
    if key not in dense_cache:
        dense_cache[key] = _swiglu_module(dim, case.top_k * hidden, dtype, device, args.seed)
    fns["dense"] = _step(dense_cache[key], x, _dense_loss, device, clock)

    samples = measure(fns, s["repeats"], s["warmup"])
    med = {n: statistics.median(v) for n, v in samples.items()}
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
    """Our layer split into its stages, each timed forward+backward on its own (inputs detached and
    requiring grad at the stage boundary, upstream gradients random), plus the whole layer for reference."""
    import torch
    clock = CLOCKS[args.clock]
    from moe_dist.moe.dispatch import keep_connected
    dim = s["dim"]
    layer = _our_layer(case, dim, s["hidden"], backend, args, dtype, device)
    g = torch.Generator().manual_seed(args.seed + case.tokens)
    x_TD = torch.randn(case.tokens, dim, generator=g).to(device, dtype)
    T = case.tokens

    # One forward to fix the routing and the stage inputs.
    with torch.no_grad():
        r = layer.router(x_TD)
        keep_TK, _, cap = layer._capacity(r.indices_TK, r.weights_TK, T)
        x_ND, offsets_E, meta = layer.dispatcher.dispatch(x_TD, r.indices_TK, r.weights_TK, keep_TK, cap)
        y_ND = layer.experts(x_ND, offsets_E)
    gw_TK = torch.randn(r.weights_TK.shape, generator=g).to(device)
    g_ND = torch.randn(x_ND.shape, generator=g).to(device, dtype)
    g_TD = torch.randn(x_TD.shape, generator=g).to(device, dtype)

    def router(xx):
        rr = layer.router(xx)
        counts_E = torch.bincount(rr.indices_TK.reshape(-1), minlength=case.experts)
        aux = layer._aux_loss(rr.probs_TE, rr.indices_TK, counts_E, 1, T)
        layer._capacity(rr.indices_TK, rr.weights_TK, T)
        torch.autograd.backward([rr.weights_TK, aux], [gw_TK, None])

    def permute(xx):
        xn, _, _ = layer.dispatcher.dispatch(xx, r.indices_TK, r.weights_TK, keep_TK, cap)
        xn.backward(g_ND)

    def experts(xn):
        keep_connected(layer.experts(xn, offsets_E), xn).backward(g_ND)

    w_TK = r.weights_TK.detach().requires_grad_()

    def unpermute(yn):
        w_TK.grad = None
        out = layer.dispatcher.combine(yn, type(meta)(meta.pmap, w_TK))
        out.backward(g_TD)

    inputs = {"router": x_TD, "permute": x_TD, "experts": x_ND, "unpermute": y_ND}
    stage_fn = {"router": router, "permute": permute, "experts": experts, "unpermute": unpermute}

    def timed(fn, inp):
        def run():
            for p in layer.parameters():
                p.grad = None
            xx = inp.detach().requires_grad_()
            _sync(device)
            t0 = clock()
            fn(xx)
            _sync(device)
            return clock() - t0
        return run

    fns = {k: timed(stage_fn[k], inputs[k]) for k in stage_fn}
    fns["whole_layer"] = _step(layer, x_TD.unsqueeze(0), _ours_loss, device, clock)
    samples = measure(fns, s["repeats"], s["warmup"])
    med = {n: statistics.median(v) * 1e3 for n, v in samples.items()}
    stages = {k: med.get(k, 0.0) for k in STAGES}     # all_to_all: 0 in the single-process layout
    return {**asdict(case), "backend": backend, "stages_ms": stages, "sum_of_stages_ms": sum(stages.values()),
            "whole_layer_ms": med["whole_layer"],
            "note": "single process: no all-to-all (measured on ranks by `moe-dist bench scaling`)"}


# ------------------------------------------------------------------------------------------ report


def _targets(results: list[dict], primary: str) -> dict:
    """The issue's targets at the largest T, over E ≥ 8: worst ratios of our primary backend."""
    big = max(r["tokens"] for r in results)
    rows = [r for r in results if r["tokens"] == big and r["experts"] >= 8]
    vs_ds = [r["ratios"][f"{primary}_speed_vs_deepspeed"] for r in rows
             if r["ratios"].get(f"{primary}_speed_vs_deepspeed")]
    vs_dense = [r["ratios"][f"{primary}_speed_vs_dense"] for r in rows]
    return {"tokens": big, "backend": primary,
            "min_speed_vs_deepspeed": min(vs_ds) if vs_ds else None, "target_vs_deepspeed": 1.5,
            "min_speed_vs_dense": min(vs_dense) if vs_dense else None,
            "target_vs_dense": 0.85 if all(r.get("device", "cpu") == "cpu" for r in rows) else 0.75}


def _plots(payload: dict, out: Path) -> list[Path]:
    from moe_dist.bench.report import figure, machine_note, save_figure
    written = []
    results, primary = payload["results"], payload["config"]["primary_backend"]
    c = payload["config"]
    note = (f"{c['device']} {c['dtype']}, {c['threads']} thread(s), {c.get('clock', 'wall')} clock, "
            f"allocator {c.get('allocator', 'default')}; {machine_note(payload.get('machine'))}")
    groups = sorted({(r["tokens"], r["mode"]) for r in results})
    fig, axes = figure(1, len(groups), width=5.0, height=3.8)
    for ax, (T, mode) in zip(axes[0], groups):
        rows = [r for r in results if r["tokens"] == T and r["mode"] == mode]
        ks = sorted({r["top_k"] for r in rows})
        es = sorted({r["experts"] for r in rows})
        width = 0.8 / max(2 * len(ks), 1)
        for j, k in enumerate(ks):
            for m, (metric, label) in enumerate((("deepspeed", "vs DeepSpeed"), ("dense", "vs dense ideal"))):
                vals = []
                for e in es:
                    r = next((r for r in rows if r["experts"] == e and r["top_k"] == k), None)
                    vals.append((r and r["ratios"].get(f"{primary}_speed_vs_{metric}")) or 0.0)
                pos = [i + (2 * j + m - len(ks)) * width + width / 2 for i in range(len(es))]
                ax.bar(pos, vals, width, label=f"k={k} {label}", hatch="" if m == 0 else "//")
        ax.axhline(1.5, color="C3", lw=0.8, ls="--")
        ax.axhline(payload["targets"]["target_vs_dense"], color="C2", lw=0.8, ls=":")
        ax.axhline(1.0, color="0.4", lw=0.6)
        ax.set_xticks(range(len(es)), [f"E={e}" for e in es])
        ax.set_ylabel(f"speed ratio ({primary}, fwd+bwd)")
        ax.set_title(f"T={T}, {mode}", fontsize=9)
        ax.legend(fontsize=6)
    written.append(save_figure(fig, out.with_suffix(".png"), note=note + "; 0 = n/a"))

    if payload["breakdown"]:
        bd = payload["breakdown"]
        fig, axes = figure(1, 1, width=max(5.0, 0.7 * len(bd) + 2), height=4.0)
        ax = axes[0][0]
        bottom = [0.0] * len(bd)
        for i, st in enumerate(STAGES):
            vals = [b["stages_ms"][st] for b in bd]
            ax.bar(range(len(bd)), vals, 0.6, bottom=bottom, label=st, color=f"C{i}")
            bottom = [a + v for a, v in zip(bottom, vals)]
        ax.scatter(range(len(bd)), [b["whole_layer_ms"] for b in bd], marker="_", s=300, color="k",
                   label="whole layer", zorder=3)
        dense = [next((r["median_ms"]["dense"] for r in results if all(r[k] == b[k] for k in
                                                                        ("tokens", "experts", "top_k", "mode"))),
                      float("nan")) for b in bd]
        ax.scatter(range(len(bd)), dense, marker="_", s=300, color="C2", label="dense ideal", zorder=3)
        ax.set_xticks(range(len(bd)), [f"E={b['experts']}\nk={b['top_k']}\n{b['mode'][:4]}" for b in bd],
                      fontsize=7)
        ax.set_ylabel("ms, forward+backward")
        ax.set_title(f"where our layer's time goes ({bd[0]['backend']}, T={bd[0]['tokens']})", fontsize=9)
        ax.legend(fontsize=7)
        written.append(save_figure(fig, out.with_name(out.stem + "_breakdown.png"), note=note))
    return written


def run(args) -> int:
    if args.replot:
        import json
        path = Path(args.replot)
        written = _plots(json.loads(path.read_text()), path)
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
    primary = backends[0]
    with_ds = not args.no_deepspeed
    if with_ds:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            with_ds = False
            skipped["deepspeed"] = "n/a: deepspeed is not installed (pip install -e .[deepspeed])"

    cases = [Case(T, E, K, m) for T in s["tokens"] for E in s["experts"] for K in s["top_k"] for m in args.modes]
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
        bcases = [Case(max(s["tokens"]), E, K, m) for E in s["experts"] for K in s["top_k"] if K <= 2
                  for m in args.modes]
        for j, case in enumerate(bcases):
            b = breakdown_case(case, s, args, dtype, device, primary)
            breakdown.append(b)
            print(f"[breakdown {j + 1}/{len(bcases)}] {case.label()}: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in b["stages_ms"].items())
                  + f" ms; sum {b['sum_of_stages_ms']:.1f} vs whole {b['whole_layer_ms']:.1f} ms", flush=True)

    payload = {
        "benchmark": "MoE layer forward+backward: ours vs DeepSpeed-MoE vs dense-equivalent ideal",
        "preset": args.preset,
        "config": {"dim": s["dim"], "hidden": s["hidden"], "tokens": s["tokens"], "experts": s["experts"],
                   "top_k": s["top_k"], "modes": list(args.modes), "capacity_factor": args.capacity_factor,
                   "min_capacity": args.min_capacity, "activation": "swiglu", "aux_loss_coef": 0.01,
                   "router": "softmax, renormalised top-k for k>1", "drop_policy": "probs",
                   "dtype": dtype_name, "device": device, "threads": torch.get_num_threads(),
                   "repeats": s["repeats"], "warmup": s["warmup"], "seed": args.seed, "clock": args.clock,
                   "allocator": "glibc heap only, no trim (--reuse-freed-memory)" if args.reuse_freed_memory
                   else "default",
                   "backends": backends, "primary_backend": primary, "skipped": skipped,
                   "deepspeed_options": DEEPSPEED_OPTIONS if with_ds else None,
                   "routing": "router at init on Gaussian inputs (near-uniform loads); DeepSpeed gets the "
                              "same router and expert weights, so both route alike"},
        "results": results,
        "breakdown": breakdown,
        "elapsed_s": time.perf_counter() - t_start,
    }
    payload["targets"] = _targets(results, primary)
    from moe_dist.bench.report import write_result
    suffix = "" if args.preset == "default" else f"_{args.preset}"
    out = Path(args.out) if args.out else (Path(__file__).resolve().parents[2] / "benchmarks" / "results"
                                            / f"layer_{device}{suffix}.json")
    write_result(out, payload)
    written = [out]
    try:
        written += _plots(payload, out)
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
