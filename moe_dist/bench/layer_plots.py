"""`bench layer`'s summary against its targets and its figures, both read from the result payload alone (so
`--replot` redraws a stored JSON without timing anything).

Targets, for our primary backend at the largest T and E ≥ 8: forward+backward at least 1.5× as fast as
DeepSpeed-MoE, and at least 0.85× (CPU, fp32) or 0.75× (GPU, bf16) the speed of the dense MLP of equal active
FLOPs.
"""
from __future__ import annotations

from pathlib import Path

TARGET_VS_DEEPSPEED = 1.5
TARGET_VS_DENSE = {"cpu": 0.85, "cuda": 0.75}


def targets(results: list[dict], primary: str) -> dict:
    """The worst ratios of `primary` at the largest T over E ≥ 8, beside the targets."""
    big = max(r["tokens"] for r in results)
    rows = [r for r in results if r["tokens"] == big and r["experts"] >= 8]
    vs_ds = [r["ratios"][f"{primary}_speed_vs_deepspeed"] for r in rows
             if r["ratios"].get(f"{primary}_speed_vs_deepspeed")]
    vs_dense = [r["ratios"][f"{primary}_speed_vs_dense"] for r in rows]
    on_cpu = all(r.get("device", "cpu") == "cpu" for r in rows)
    return {"tokens": big, "backend": primary,
            "min_speed_vs_deepspeed": min(vs_ds) if vs_ds else None, "target_vs_deepspeed": TARGET_VS_DEEPSPEED,
            "min_speed_vs_dense": min(vs_dense) if vs_dense else None,
            "target_vs_dense": TARGET_VS_DENSE["cpu" if on_cpu else "cuda"]}


def conditions(payload: dict) -> str:
    """One line on how the numbers were taken: device, dtype, threads, clock, allocator, machine and load."""
    from moe_dist.bench.report import machine_note
    c = payload["config"]
    return (f"{c['device']} {c['dtype']}, {c['threads']} thread(s), {c.get('clock', 'wall')} clock, "
            f"allocator {c.get('allocator', 'default')}; {machine_note(payload.get('machine'))}")


def plot(payload: dict, out: Path) -> list[Path]:
    """Speed ratios per (T, mode) panel, and the stacked per-stage breakdown: `out` with .png, and
    `<stem>_breakdown.png` beside it."""
    from moe_dist.bench.report import figure, save_figure
    written = []
    results, primary = payload["results"], payload["config"]["primary_backend"]
    note = conditions(payload)
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
        ax.axhline(payload["targets"]["target_vs_deepspeed"], color="C3", lw=0.8, ls="--")
        ax.axhline(payload["targets"]["target_vs_dense"], color="C2", lw=0.8, ls=":")
        ax.axhline(1.0, color="0.4", lw=0.6)
        ax.set_xticks(range(len(es)), [f"E={e}" for e in es])
        ax.set_ylabel(f"speed ratio ({primary}, fwd+bwd)")
        ax.set_title(f"T={T}, {mode}", fontsize=9)
        ax.legend(fontsize=6)
    written.append(save_figure(fig, out.with_suffix(".png"), note=note + "; 0 = not measured"))

    if payload["breakdown"]:
        bd = payload["breakdown"]
        stages = list(bd[0]["stages_ms"])
        fig, axes = figure(1, 1, width=max(5.0, 0.7 * len(bd) + 2), height=4.0)
        ax = axes[0][0]
        bottom = [0.0] * len(bd)
        for i, st in enumerate(stages):
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
