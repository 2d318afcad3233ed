"""Pipeline step time and bubble on gloo CPU ranks, measured against the model.

For each layout PP=p × EP=e (default PP2×EP2 on 4 ranks) and each number of micro-batches m (train.grad_accum_steps,
1F1B), on the config's model (default tiny-cpu, fp32, one thread per rank):

- pipeline run: p·e ranks train `--steps` steps; per step the wall time (slowest rank) and, per rank, the seconds
  inside the pipeline's point-to-point batches (a receive blocks until the neighbour stage produced the tensor,
  so this is the rank's wait: the measured bubble, transfers included);
- stage run, the same stage work without any pipeline wait: pp=1 on e ranks (the same EP) with n_layers/p layers
  (a stage's layers, plus the embedding and the head, which are small here), the same micro-batch and m.
  From the two values of m, T_stage(m) = a + m·s: s is one micro-batch's forward + backward on one stage, a the
  per-step rest (gradient reduction, clipping, optimizer over a stage's parameters).

Each rank's CPU time per step is recorded too (gloo's receives sleep, so it is the rank's work whatever the load):
the pipeline ranks' CPU time against the stage run's checks that a rank does one stage's work, and the stage
run's CPU-time fit gives the step with a free core per rank, a_cpu + (m + p - 1)·s_cpu, compared with the pipeline
run's step normalised the same way (each rank's CPU work over the share of the step it was not waiting, the
slowest rank's), and the bubble with that rest, (p-1)·s_cpu / (a_cpu + (m + p - 1)·s_cpu). These hold on a
loaded machine; the wall-clock figures below need an idle one.
Predictions from those stage figures alone (none fitted to the pipeline runs):
    dedicated   a + (m + p - 1)·s, bubble (p-1)/(m+p-1): the alpha-beta model's structure (`alpha_beta.estimate`,
                every rank its own device)
    shared      the schedule's timeline with the p·e ranks sharing the machine's cores (`bench.pipeline_cpu`,
                forward = s/3, backward = 2s/3), plus a·max(1, p·e/cores) (every rank runs its optimizer at once)
Measured bubble = mean over ranks of (seconds waiting in point-to-point batches) / step; the predicted ones are
(p-1)/(m+p-1), the same with the stage's rest a in the step ((p-1)·s / (a + (m+p-1)·s)), and the shared-core
timeline's idle share of its step. `--repeats` interleaves stage and pipeline runs (medians reported), so a change
in the machine's load hits both alike; every run's figures are in the JSON.

Writes pipeline_cpu.json and .png under runs/bench/ unless --out names another path (the committed figure:
--out benchmarks/results/pipeline_cpu).

    python benchmarks/pipeline.py [--config configs/tiny-cpu.yaml] [--layouts 2x2] [--micro-batches 4,8]
                                  [--micro-batch 2] [--steps 8] [--warmup 2] [--repeats 3] [--out PATH]
    python benchmarks/pipeline.py --replot RESULT.json         (the figure again from a result)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
from pathlib import Path

from moe_dist import config
from moe_dist.bench.pipeline_cpu import simulate
from moe_dist.bench.ranks import run_ranks, train_and_measure
from moe_dist.bench.report import RUN_DIR, figure, machine_info, machine_note, save_figure, write_result
from moe_dist.parallel.layout import bubble_fraction
from moe_dist.plan import make_plan

REPO = Path(__file__).resolve().parents[1]


def _cfg(base: config.Config, *, pp: int, ep: int, m: int, mb: int, n_layers: int, out: str) -> config.Config:
    cfg = dataclasses.replace(
        base, model=dataclasses.replace(base.model, n_layers=n_layers),
        parallel=dataclasses.replace(base.parallel, pp=pp, ep=ep, tp=1, etp=1, pp_schedule="1f1b", pp_virtual=1,
                                     pp_layers=None),
        train=dataclasses.replace(base.train, grad_accum_steps=m, batch_size=mb, out_dir=out))
    config.validate(cfg)
    return cfg


def measure(cfg: config.Config, world: int, steps: int, warmup: int) -> dict:
    res = run_ranks(train_and_measure, world, cfg, steps, warmup)
    timed = range(warmup, steps)
    step = [max(r["step_s"][i] for r in res) for i in timed]
    wait = {r["rank"]: statistics.median(r["p2p_s"][i] for i in timed) for r in res}
    return {"world": world, "step_s": statistics.median(step), "step_s_all": step,
            "p2p_wait_s_per_rank": wait, "pp_rank": {r["rank"]: r["pp_rank"] for r in res},
            "p2p_calls_per_step": statistics.mean(r["p2p_calls"][-1] for r in res),
            "p2p_bytes_per_rank_step": statistics.mean(r["p2p_bytes"][-1] for r in res),
            "a2a_s": statistics.median(statistics.mean(r["a2a_s"][i] for r in res) for i in timed),
            "cpu_s_per_rank": {r["rank"]: statistics.median(r["cpu_s"][i] for i in timed) for r in res},
            "threads_per_rank": res[0]["threads"], "lm_loss": res[0]["lm_loss"][-1]}


def _normalised(run: dict) -> float:
    """The run's step at a full core per rank: each rank's CPU work over the share of the step it was not waiting
    for its neighbour stage, C_r / (1 - wait_r / step), the slowest rank's. Assumes the load slowed a rank's
    computing evenly within the step (the wait share is then what it would be on an idle machine)."""
    step = run["step_s"]
    return max(run["cpu_s_per_rank"][r] / max(1e-9, 1 - run["p2p_wait_s_per_rank"][r] / step)
               for r in run["cpu_s_per_rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "tiny-cpu.yaml"))
    ap.add_argument("--layouts", default="2x2", help="PPxEP pairs, comma-separated (2x2: PP2×EP2 on 4 ranks)")
    ap.add_argument("--micro-batches", default="4,8", help="train.grad_accum_steps values (two or more)")
    ap.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch (train.batch_size)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="stage and pipeline runs, interleaved; medians reported")
    ap.add_argument("--out", default=str(RUN_DIR / "pipeline_cpu"),
                    help="output path without suffix (the committed figure: benchmarks/results/pipeline_cpu)")
    args = ap.parse_args()
    ms = sorted({int(x) for x in args.micro_batches.split(",")})
    if len(ms) < 2:
        raise SystemExit("--micro-batches: give two or more values (the stage time is fitted as a + m·s)")
    layouts = [tuple(int(x) for x in item.lower().split("x")) for item in args.layouts.split(",")]
    base = config.load(args.config)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pp, ep in layouts:
            world = pp * ep
            stage_runs: dict[int, list[dict]] = {m: [] for m in ms}
            pipe_runs: dict[int, list[dict]] = {m: [] for m in ms}
            # Repeats interleave the stage and pipeline runs, so a change in the machine's load hits both alike.
            for rep in range(args.repeats):
                for m in ms:
                    cfg = _cfg(base, pp=1, ep=ep, m=m, mb=args.micro_batch, n_layers=base.model.n_layers // pp,
                               out=f"{tmp}/stage_{pp}x{ep}_{m}_{rep}")
                    stage_runs[m].append(measure(cfg, ep, args.steps, args.warmup))
                    cfg = _cfg(base, pp=pp, ep=ep, m=m, mb=args.micro_batch, n_layers=base.model.n_layers,
                               out=f"{tmp}/pipe_{pp}x{ep}_{m}_{rep}")
                    pipe_runs[m].append(measure(cfg, world, args.steps, args.warmup))
                    print(f"PP{pp}×EP{ep} m={m} repeat {rep}: stage run {stage_runs[m][-1]['step_s']:.3f} s, "
                          f"pipeline {pipe_runs[m][-1]['step_s']:.3f} s (load {os.getloadavg()[0]:.1f})", flush=True)
            stage = {m: statistics.median(r["step_s"] for r in stage_runs[m]) for m in ms}
            # T_stage(m) = a + m·s, least squares over the m values.
            mean_m, mean_t = statistics.mean(ms), statistics.mean(stage.values())
            s = sum((m - mean_m) * (stage[m] - mean_t) for m in ms) / sum((m - mean_m) ** 2 for m in ms)
            a = max(0.0, mean_t - s * mean_m)
            # The same fit on CPU time (mean over the stage run's ranks): the work, whatever the load.
            stage_cpu = {m: statistics.median(statistics.mean(r["cpu_s_per_rank"].values()) for r in stage_runs[m])
                         for m in ms}
            mean_c = statistics.mean(stage_cpu.values())
            s_cpu = sum((m - mean_m) * (stage_cpu[m] - mean_c) for m in ms) / sum((m - mean_m) ** 2 for m in ms)
            a_cpu = max(0.0, mean_c - s_cpu * mean_m)
            for m in ms:
                cfg = _cfg(base, pp=pp, ep=ep, m=m, mb=args.micro_batch, n_layers=base.model.n_layers, out=tmp)
                runs = pipe_runs[m]
                step = statistics.median(r["step_s"] for r in runs)
                # Per run: each rank's wait over the run's step; the median run's mean over ranks.
                bubbles = [statistics.mean(w / r["step_s"] for w in r["p2p_wait_s_per_rank"].values()) for r in runs]
                per_rank = {str(k): statistics.median(r["p2p_wait_s_per_rank"][k] / r["step_s"] for r in runs)
                            for k in runs[0]["p2p_wait_s_per_rank"]}
                plan = make_plan(cfg, world)
                dedicated = a + (m + pp - 1) * s
                share = max(1.0, world / cores)
                tl = simulate("1f1b", pp, 1, m, s / 3, 2 * s / 3, ranks_per_stage=ep, cores=cores)
                shared = tl.makespan_s + a * share
                row = {"pp": pp, "ep": ep, "world": world, "micro_batches": m, "micro_batch": args.micro_batch,
                       "layers": base.model.n_layers, "stage_step_s": stage[m],
                       "stage_step_s_runs": [r["step_s"] for r in stage_runs[m]],
                       "stage_micro_batch_s": s, "stage_rest_s": a,
                       "measured_step_s": step, "measured_step_s_runs": [r["step_s"] for r in runs],
                       "pipeline_runs": runs,
                       "predicted_step_s_dedicated": dedicated, "predicted_step_s_shared": shared,
                       "step_error_dedicated": dedicated / step - 1, "step_error_shared": shared / step - 1,
                       "measured_bubble": statistics.median(bubbles), "measured_bubble_runs": bubbles,
                       "measured_bubble_per_rank": per_rank,
                       "predicted_bubble_formula": bubble_fraction(pp, m),
                       "predicted_bubble_dedicated": (pp - 1) * s / dedicated,
                       "predicted_bubble_shared": statistics.mean(tl.idle_s) / shared,
                       "p2p_bytes_per_step_plan": plan.p2p.per_step,
                       "p2p_sent_bytes_per_rank_plan": list(plan.p2p.sent_per_rank),
                       "p2p_sent_bytes_per_rank_measured": statistics.mean(r["p2p_bytes_per_rank_step"] for r in runs),
                       # CPU time: a stage's work per step in the stage run and on each pipeline rank (they should
                       # agree: the pipeline rank runs one stage), and the step the model predicts with a free core
                       # per rank from the stage run's CPU-time fit.
                       "stage_cpu_s": stage_cpu[m], "stage_cpu_micro_batch_s": s_cpu, "stage_cpu_rest_s": a_cpu,
                       "pipeline_cpu_s_per_rank": {str(k): statistics.median(r["cpu_s_per_rank"][k] for r in runs)
                                                   for k in runs[0]["cpu_s_per_rank"]},
                       "predicted_step_s_free_cores": a_cpu + (m + pp - 1) * s_cpu,
                       "predicted_bubble_free_cores": (pp - 1) * s_cpu / (a_cpu + (m + pp - 1) * s_cpu),
                       "measured_step_s_normalised": statistics.median(_normalised(r) for r in runs)}
                row["step_error_free_cores"] = (row["predicted_step_s_free_cores"]
                                                / row["measured_step_s_normalised"] - 1)
                rows.append(row)
                print(f"PP{pp}×EP{ep} m={m}: CPU-time normalised step {row['measured_step_s_normalised']:.3f} s vs "
                      f"{row['predicted_step_s_free_cores']:.3f} s predicted ({row['step_error_free_cores']:+.0%}); "
                      f"bubble vs {row['predicted_bubble_free_cores']:.1%} predicted with the stage's rest; stage CPU "
                      f"{stage_cpu[m]:.3f} s, pipeline ranks' CPU {sorted(row['pipeline_cpu_s_per_rank'].values())}",
                      flush=True)
                print(f"PP{pp}×EP{ep} m={m}: measured {step:.3f} s, predicted {dedicated:.3f} s with a core per rank "
                      f"({row['step_error_dedicated']:+.0%}), {shared:.3f} s sharing {cores} cores "
                      f"({row['step_error_shared']:+.0%}); bubble measured {row['measured_bubble']:.1%}, "
                      f"(p-1)/(m+p-1) {row['predicted_bubble_formula']:.1%}, with the stage's rest "
                      f"{row['predicted_bubble_dedicated']:.1%}, shared-core timeline "
                      f"{row['predicted_bubble_shared']:.1%}", flush=True)
    info = machine_info()
    payload = {"command": "benchmarks/pipeline.py", "config": args.config, "schedule": "1f1b",
               "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "cores": cores,
               "threads_per_rank": rows[0]["pipeline_runs"][0]["threads_per_rank"] if rows else None,
               "clock": "wall (the trainer's step timer)",
               "method": __doc__, "rows": rows}
    out = Path(args.out)
    write_result(out.with_suffix(".json"), payload)
    plot(rows, out.with_suffix(".png"), f"gloo, {cores} cores, 1 thread/rank, fp32, wall clock and CPU time; "
         f"{machine_note(info)}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def plot(rows: list[dict], path: Path, note: str) -> Path:
    fig, ax = figure(1, 2, width=6.5, height=4.2)
    labels = [f"PP{r['pp']}×EP{r['ep']}\nm={r['micro_batches']}" for r in rows]
    xs = list(range(len(rows)))

    def bars(a, series, title, ylabel):
        w = 0.8 / len(series)
        for i, (label, key) in enumerate(series):
            a.bar([x - 0.4 + w * (i + 0.5) for x in xs], [r.get(key) or 0 for r in rows], w, label=label)
        a.set_xticks(xs, labels)
        a.set_ylabel(ylabel)
        a.set_title(title, fontsize=9)
        top = max((r.get(key) or 0) for r in rows for _, key in series)
        a.set_ylim(0, top * (1.2 + 0.08 * len(series)))       # room for the legend above the bars
        a.legend(fontsize=7, loc="upper left", ncol=2)

    bars(ax[0, 0], [("measured, CPU-time normalised", "measured_step_s_normalised"),
                    ("model, free core per rank (stage CPU fit)", "predicted_step_s_free_cores"),
                    ("measured, wall clock", "measured_step_s"),
                    ("model, a core per rank (stage wall fit)", "predicted_step_s_dedicated"),
                    ("model, ranks share the cores (wall)", "predicted_step_s_shared")],
         "1F1B step time", "step time (s)")
    bars(ax[0, 1], [("measured: wait in P2P / step", "measured_bubble"),
                     ("(p-1)/(m+p-1)", "predicted_bubble_formula"),
                     ("model with the step's rest (CPU fit)", "predicted_bubble_free_cores"),
                     ("shared-core timeline", "predicted_bubble_shared")],
         "pipeline bubble", "share of the step")
    return save_figure(fig, path, note)


def replot(json_path: str) -> None:
    """Draw the figure again from a result JSON (next to it, .png)."""
    import json
    data = json.loads(Path(json_path).read_text())
    m = data["machine"]
    note = (f"gloo, {data['cores']} cores, {data['threads_per_rank']} thread/rank, fp32, wall clock and CPU time; "
            f"{machine_note(m)}")
    print(plot(data["rows"], Path(json_path).with_suffix(".png"), note))


if __name__ == "__main__":
    import sys
    if len(sys.argv) == 3 and sys.argv[1] == "--replot":
        replot(sys.argv[2])
    else:
        main()
