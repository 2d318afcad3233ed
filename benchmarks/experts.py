"""Experts forward+backward: `grouped_mm` backend vs the `loop` reference, on the same routed rows.

Ratios measured inside one run (same process, same inputs, interleaved rotated repeats of the shared harness
`moe_dist.bench.timing.measure`, wall clock). Default shapes are the tiny-cpu config's (8 experts, D=128, F=256,
top-2, 8×128 tokens), and 32 experts beside them.

Writes experts_cpu.json and a PNG beside it under runs/bench/ in the current directory unless `--out` names
another path; the figure committed under benchmarks/results/ was written with
`--out benchmarks/results/experts_cpu.json`.

    python benchmarks/experts.py [--tokens 1024 --dim 128 --hidden 256 --experts 8 32 --top-k 2] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from moe_dist.bench.report import RUN_DIR
from moe_dist.bench.timing import measure, medians, timed_call
from moe_dist.kernels.reference import make_permute_map, permute
from moe_dist.moe.experts import GroupedExperts


def fwd_bwd_candidate(experts: GroupedExperts, x_ND: torch.Tensor, offsets: torch.Tensor):
    """A `measure` candidate: one forward+backward on fresh leaf inputs; the gradients of the previous call
    are dropped outside the clock, so every call allocates its gradients alike."""
    def setup():
        experts.zero_grad(set_to_none=True)

    def fwd_bwd():
        y = experts(x_ND.detach().requires_grad_(), offsets)
        y.backward(torch.ones_like(y))
    return timed_call(fwd_bwd, setup=setup)


def run(tokens: int, dim: int, hidden: int, num_experts: int, top_k: int, dtype: torch.dtype,
        repeats: int, seed: int = 0, warmup: int = 2) -> dict:
    torch.manual_seed(seed)
    x_TD = torch.randn(tokens, dim, dtype=dtype)
    indices = torch.rand(tokens, num_experts).topk(top_k, dim=-1).indices   # uniform random routing
    pmap = make_permute_map(indices, num_experts)
    x_ND = permute(x_TD, pmap)
    backends = {b: GroupedExperts(num_experts, dim, hidden, "swiglu", b).to(dtype) for b in ("grouped_mm", "loop")}
    backends["loop"].load_state_dict(backends["grouped_mm"].state_dict())
    samples = measure({b: fwd_bwd_candidate(e, x_ND, pmap.offsets_E) for b, e in backends.items()},
                      repeats, warmup)
    # Forward: 2·N·D·2F (gate+up) + 2·N·F·D (down) = 6·N·D·F; backward doubles it.
    flops = 3 * 6 * x_ND.shape[0] * dim * hidden
    med = medians(samples)
    return {
        "shape": {"tokens": tokens, "dim": dim, "hidden": hidden, "experts": num_experts, "top_k": top_k,
                  "rows": int(x_ND.shape[0]), "dtype": str(dtype).removeprefix("torch.")},
        "median_s": med,
        "gflops": {b: flops / t / 1e9 for b, t in med.items()},
        "ratio_grouped_mm_over_loop_speed": med["loop"] / med["grouped_mm"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30, help="timed rounds per backend")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per backend first")
    p.add_argument("--out", default=str(RUN_DIR / "experts_cpu.json"),
                   help="result JSON, the PNG beside it (default %(default)s under the current directory; the "
                        "committed figure uses --out benchmarks/results/experts_cpu.json)")
    a = p.parse_args()
    rows = [run(a.tokens, a.dim, a.hidden, e, a.top_k, torch.float32, a.repeats, warmup=a.warmup)
            for e in a.experts]
    report = {"benchmark": "experts forward+backward, grouped_mm vs loop",
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "threads": torch.get_num_threads(), "device": "cpu"},
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "results": rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for r in rows:
        s = r["shape"]
        print(f"E={s['experts']:3d} T={s['tokens']} D={s['dim']} F={s['hidden']} k={s['top_k']}: "
              f"grouped_mm {r['median_s']['grouped_mm'] * 1e3:7.2f} ms ({r['gflops']['grouped_mm']:.1f} GFLOP/s), "
              f"loop {r['median_s']['loop'] * 1e3:7.2f} ms ({r['gflops']['loop']:.1f} GFLOP/s), "
              f"ratio {r['ratio_grouped_mm_over_loop_speed']:.2f}x")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = [f"E={r['shape']['experts']}" for r in rows]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["gflops"]["grouped_mm"] for r in rows], 0.4, label="grouped_mm")
        ax.bar([x + 0.2 for x in xs], [r["gflops"]["loop"] for r in rows], 0.4, label="loop")
        ax.set_xticks(list(xs), labels)
        ax.set_ylabel("GFLOP/s (fwd+bwd, fp32)")
        ax.set_title(f"Experts on CPU, T={a.tokens} D={a.dim} F={a.hidden} k={a.top_k}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
        print(f"wrote {out} and {out.with_suffix('.png')}")
    except ImportError:
        print(f"wrote {out} (matplotlib missing: no plot)")


if __name__ == "__main__":
    main()
