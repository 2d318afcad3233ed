"""`moe-dist tune-capacity CONFIG`: sweep the capacity factor on real data and recommend one.

For every factor (default 1.0, 1.25, 1.5, 2.0 and dropless) a short training run starts in fresh processes
(`--ranks N` gloo ranks, the layout of `parallel.*`), from the same seed and on the same batches, and reports:
- dropped-token share per MoE layer and per rank. Capacity applies to each rank's own tokens (GShard: a rank's
  micro-batch is one group), so a rank drops what overflows its experts' slots from its tokens alone;
- tokens/s (global batch / median step time after warm-up);
- peak memory: ru_maxrss of each rank process, and its growth from just before the first step (a fresh
  process per factor, because ru_maxrss never goes down; tracemalloc does not see torch's allocations);
- all-to-all bytes the forward dispatch sends per rank per step (combine returns as many and backward
  repeats both, so the step moves 4x this);
- the LM loss after N steps (mean of the last few steps) relative to the dropless run.
The recommendation is the smallest factor whose worst layer drops at most `--drop-target` of its assignments
and whose loss is within `--loss-tol` (relative) of dropless; dropless when none qualifies.
Writes runs/bench/tune_capacity_<config>[_quick].json and .png under the current directory unless `--out`
names another path; the figures committed under benchmarks/results/ were written with
`--out benchmarks/results/tune_capacity_<config>`.
"""
from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

DEFAULT_FACTORS = "1.0,1.25,1.5,2.0,dropless"
# --quick: a smaller model and a few steps, the same code path (tests and smoke checks).
QUICK_OVERRIDES = ["--model.dim=64", "--model.n_layers=2", "--model.dense_hidden=128", "--moe.expert_hidden=64",
                   "--train.batch_size=4", "--train.seq_len=64"]


def parse_factors(text: str) -> list[Optional[float]]:
    """'1.0,1.5,dropless' -> [1.0, 1.5, None]; sorted, dropless last, duplicates refused."""
    out: list[Optional[float]] = []
    for item in (s.strip() for s in text.split(",")):
        if item.lower() in ("dropless", "none", "null"):
            out.append(None)
            continue
        try:
            f = float(item)
        except ValueError:
            raise ValueError(f"--factors: {item!r} is not a number or 'dropless'; "
                             f"write e.g. --factors={DEFAULT_FACTORS}") from None
        if not (f > 0 and math.isfinite(f)):
            raise ValueError(f"--factors: {item!r} must be a positive capacity factor (or 'dropless')")
        out.append(f)
    if len(set(out)) != len(out):
        raise ValueError(f"--factors: {text!r} lists a factor twice")
    return sorted((f for f in out if f is not None)) + ([None] if None in out else [])


def label(factor: Optional[float]) -> str:
    return "dropless" if factor is None else f"{factor:g}"


def summarise(factor: Optional[float], ranks: list[dict], cfg, warmup: int) -> dict[str, Any]:
    """One row of the table from every rank's `train_and_measure` result."""
    from moe_dist.plan import DTYPE_BYTES
    t = cfg.train
    steps = len(ranks[0]["step_s"])
    timed = slice(min(warmup, steps - 1), steps)
    step_s = statistics.median(max(r["step_s"][i] for r in ranks) for i in range(steps)[timed])
    tokens = t.batch_size * t.seq_len * ranks[0]["dp"]
    kept_L = [sum(r["kept_L"][i] for r in ranks) for i in range(len(ranks[0]["kept_L"]))]
    dropped_L = [sum(r["dropped_L"][i] for r in ranks) for i in range(len(kept_L))]
    share = [d / (k + d) if k + d else 0.0 for k, d in zip(kept_L, dropped_L)]
    per_rank = [sum(r["dropped_L"]) / max(sum(r["kept_L"]) + sum(r["dropped_L"]), 1) for r in ranks]
    last = max(1, min(5, steps // 4))
    rows_out = statistics.mean(statistics.mean(r["a2a_rows_out"]) for r in ranks)
    return {
        "factor": factor, "label": label(factor),
        "drop_share": sum(dropped_L) / max(sum(kept_L) + sum(dropped_L), 1),
        "drop_share_per_layer": share,
        "drop_share_worst_layer": max(share) if share else 0.0,
        "drop_share_per_rank": per_rank,
        "dropped_per_rank_per_layer": [r["dropped_L"] for r in ranks],
        "kept_per_rank_per_layer": [r["kept_L"] for r in ranks],
        "tokens_per_s": tokens / step_s, "median_step_s": step_s,
        "peak_rss_mib": max(r["peak_rss"] for r in ranks) / 2**20,
        "train_rss_growth_mib": max(r["peak_rss"] - r["rss_before"] for r in ranks) / 2**20,
        "a2a_dispatch_bytes_per_rank_step": rows_out * cfg.model.dim * DTYPE_BYTES[t.dtype],
        "final_lm_loss": statistics.mean(ranks[0]["lm_loss"][-last:]),
        "lm_loss_curve": ranks[0]["lm_loss"],
    }


def sweep(cfg, factors: Sequence[Optional[float]], steps: int, ranks: int = 1, warmup: int = 2,
          model_hook: Optional[Callable] = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every factor in fresh processes; rows in the order of `factors`, each with `loss_vs_dropless`
    (None when dropless is not among the factors). `model_hook(model)` runs in each rank after the model is
    built (a picklable module-level function: tests force a routing skew with it)."""
    import dataclasses

    from moe_dist.bench.ranks import run_ranks, train_and_measure
    from moe_dist.config import validate
    from moe_dist.parallel.layout import check_layout
    rows = []
    for f in factors:
        c = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=f))
        validate(c)
        check_layout(c, ranks)
        res = run_ranks(train_and_measure, ranks, c, steps, warmup, model_hook)
        rows.append(summarise(f, res, c, warmup))
        r = rows[-1]
        log(f"  factor {r['label']:>8}: drop {r['drop_share']:6.2%} (worst layer {r['drop_share_worst_layer']:6.2%}) "
            f"{r['tokens_per_s']:9,.0f} tok/s  loss {r['final_lm_loss']:.4f}")
    ref = next((r for r in rows if r["factor"] is None), None)
    for r in rows:
        r["loss_vs_dropless"] = (r["final_lm_loss"] / ref["final_lm_loss"] - 1) if ref else None
    return rows


def recommend(rows: list[dict[str, Any]], drop_target: float, loss_tol: float) -> dict[str, Any]:
    """The smallest factor with worst-layer drop share <= drop_target and loss within loss_tol (relative, and
    only checked when a dropless row exists) of dropless; dropless when no factor qualifies."""
    reasons = {}
    for r in sorted((r for r in rows if r["factor"] is not None), key=lambda r: r["factor"]):
        drop_ok = r["drop_share_worst_layer"] <= drop_target
        loss_ok = r["loss_vs_dropless"] is None or r["loss_vs_dropless"] <= loss_tol
        if drop_ok and loss_ok:
            return {"factor": r["factor"], "label": r["label"],
                    "reason": f"smallest factor with worst-layer drop {r['drop_share_worst_layer']:.2%} <= "
                              f"{drop_target:.2%} and loss {_pct(r['loss_vs_dropless'])} vs dropless "
                              f"(tolerance {loss_tol:+.2%})", "rejected": reasons}
        reasons[r["label"]] = ", ".join(
            ([f"drop {r['drop_share_worst_layer']:.2%} > {drop_target:.2%}"] if not drop_ok else [])
            + ([f"loss {_pct(r['loss_vs_dropless'])} > {loss_tol:+.2%}"] if not loss_ok else []))
    return {"factor": None, "label": "dropless", "reason": "no capacity factor met both the drop target and the "
            "loss tolerance", "rejected": reasons}


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:+.2%}"


def format_table(rows: list[dict[str, Any]], rec: dict[str, Any]) -> str:
    n_layers = len(rows[0]["drop_share_per_layer"])
    head = (f"{'factor':>8} {'drop':>7} " + " ".join(f"{'L' + str(i):>6}" for i in range(n_layers))
            + f" {'tok/s':>9} {'peak MiB':>9} {'+MiB':>6} {'a2a KiB':>8} {'loss':>7} {'vs dropless':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        mark = " <- recommended" if r["factor"] == rec["factor"] else ""
        lines.append(f"{r['label']:>8} {r['drop_share']:7.2%} "
                     + " ".join(f"{s:6.1%}" for s in r["drop_share_per_layer"])
                     + f" {r['tokens_per_s']:9,.0f} {r['peak_rss_mib']:9.0f} {r['train_rss_growth_mib']:6.0f} "
                       f"{r['a2a_dispatch_bytes_per_rank_step'] / 1024:8.0f} {r['final_lm_loss']:7.4f} "
                       f"{_pct(r['loss_vs_dropless']):>11}{mark}")
    lines.append(f"recommendation: capacity_factor={rec['label']} ({rec['reason']})")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], rec: dict[str, Any], path: Path, title: str, note: str,
         drop_target: float) -> Path:
    from moe_dist.bench.report import figure, save_figure
    fig, ax = figure(1, 2, width=5.5, height=4.0)
    a, b = ax[0, 0], ax[0, 1]
    finite = [r for r in rows if r["factor"] is not None]
    # Dropless has no factor: draw it one step right of the largest factor, labelled.
    xmax = max((r["factor"] for r in finite), default=1.0)
    xs = [r["factor"] if r["factor"] is not None else xmax * 1.25 for r in rows]
    ticks = [r["label"] for r in rows]
    a.plot(xs, [100 * r["drop_share"] for r in rows], "o-", label="all layers")
    a.plot(xs, [100 * r["drop_share_worst_layer"] for r in rows], "s--", label="worst layer")
    a.axhline(100 * drop_target, color="0.5", lw=0.8, ls=":", label=f"target {drop_target:.1%}")
    a.set_ylabel("dropped assignments (%)")
    a2 = a.twinx()
    a2.plot(xs, [r["tokens_per_s"] for r in rows], "^-", color="tab:green", label="tokens/s")
    a2.set_ylabel("tokens/s", color="tab:green")
    a.set_xticks(xs, ticks)
    a.set_xlabel("capacity factor")
    a.set_title(f"drop share and throughput — {title}")
    a.legend(loc="upper center", fontsize=8)
    b.bar(ticks, [100 * (r["loss_vs_dropless"] or 0.0) for r in rows],
          color=["tab:orange" if r["factor"] == rec["factor"] else "tab:blue" for r in rows])
    b.set_ylabel("LM loss vs dropless after N steps (%)")
    b.set_xlabel("capacity factor (orange: recommended)")
    b.set_title("loss cost of dropping; peak RSS (MiB) on top")
    for i, r in enumerate(rows):
        b.annotate(f"{r['peak_rss_mib']:.0f}", (i, 0), textcoords="offset points", xytext=(0, 4), ha="center",
                   fontsize=8)
    return save_figure(fig, path, note)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config; --section.field=value overrides follow")
    p.add_argument("--factors", default=DEFAULT_FACTORS, help=f"comma list, 'dropless' allowed (default {DEFAULT_FACTORS})")
    p.add_argument("--steps", type=int, default=None, help="train steps per factor (default 30, --quick 4)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the throughput median")
    p.add_argument("--ranks", type=int, default=1, help="gloo CPU ranks per run (layout from parallel.*)")
    p.add_argument("--drop-target", type=float, default=0.01, help="largest worst-layer drop share accepted")
    p.add_argument("--loss-tol", type=float, default=0.01, help="largest relative LM-loss increase vs dropless")
    p.add_argument("--quick", action="store_true", help="small model, 4 steps: a smoke run")
    p.add_argument("--out", default=None, help="output path without suffix (default "
                   "runs/bench/tune_capacity_<config>[_quick] under the current directory; the committed figures "
                   "use --out benchmarks/results/tune_capacity_<config>)")


def run(args: argparse.Namespace) -> int:
    from moe_dist import config
    from moe_dist.bench.report import RUN_DIR, machine_info, machine_note, write_result
    overrides = (QUICK_OVERRIDES if args.quick else []) + list(getattr(args, "overrides", []) or [])
    cfg = config.load(args.config, overrides)
    steps = args.steps if args.steps is not None else (4 if args.quick else 30)
    try:
        factors = parse_factors(args.factors)
    except ValueError as e:
        raise config.ConfigError(str(e)) from None
    for name, value, ok in (("--steps", steps, steps >= 1), ("--ranks", args.ranks, args.ranks >= 1),
                            ("--warmup", args.warmup, 0 <= args.warmup),
                            ("--drop-target", args.drop_target, 0 <= args.drop_target < 1),
                            ("--loss-tol", args.loss_tol, args.loss_tol >= 0)):
        if not ok:
            raise config.ConfigError(f"{name}={value} is out of range; see moe-dist tune-capacity --help")
    if args.warmup >= steps:
        raise config.ConfigError(f"--warmup={args.warmup} leaves no timed step of --steps={steps}; lower --warmup")
    from moe_dist.parallel.layout import LayoutError, check_layout
    try:
        check_layout(cfg, args.ranks)
    except LayoutError as e:             # it names the config field; here the world size is a flag
        raise LayoutError(f"{e} (the world size is --ranks={args.ranks})") from None
    if not Path(cfg.data.path).is_file():
        raise config.ConfigError(f"data.path={cfg.data.path} does not exist; make it with "
                                 f"`moe-dist prepare-data --out {cfg.data.path}` or pass --data.path=FILE")
    if None not in factors:
        factors.append(None)
        print("adding dropless: the loss is compared against it")
    print(f"tune-capacity: {args.config} on {args.ranks} rank(s), {steps} steps per factor, "
          f"factors {', '.join(map(label, factors))}", flush=True)
    rows = sweep(cfg, factors, steps, args.ranks, args.warmup, log=lambda s: print(s, flush=True))
    rec = recommend(rows, args.drop_target, args.loss_tol)
    print(format_table(rows, rec))
    stem = Path(args.config).stem + ("_quick" if args.quick else "")
    out = Path(args.out) if args.out else RUN_DIR / f"tune_capacity_{stem}"
    info = machine_info()
    cores = info["cpus_usable"] or info["cpu_count"]
    write_result(out.with_suffix(".json"), {
        "command": "tune-capacity", "config": args.config, "overrides": overrides, "ranks": args.ranks,
        "steps": steps, "warmup": args.warmup, "drop_target": args.drop_target, "loss_tol": args.loss_tol,
        "threads_per_rank": 1, "oversubscribed": args.ranks > cores,
        "memory_method": "ru_maxrss of each rank process (fresh processes per factor); growth = peak minus "
                         "RSS before the first step; max over ranks",
        "drop_counting": "per rank (each rank's tokens are one capacity group, GShard style), summed over "
                         "ranks and steps; worst layer used for the recommendation",
        "a2a_bytes_note": "forward dispatch bytes per rank per step; the step moves 4x (combine + backward)",
        "recommendation": rec, "rows": rows})
    note = (f"{args.ranks} gloo rank(s), 1 thread each, {steps} steps/factor; " + machine_note(info)
            + ("; OVERSUBSCRIBED: more ranks than cores" if args.ranks > cores else ""))
    plot(rows, rec, out.with_suffix(".png"), Path(args.config).stem, note, args.drop_target)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0
