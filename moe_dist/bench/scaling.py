"""`moe-dist bench scaling`: weak and strong scaling of the training step on gloo CPU ranks, for four layouts,
then the same curves on 8–1024 GPUs from the alpha-beta model (`alpha_beta.py`).

Layouts at N ranks (N=1 is the shared baseline: one process, no collective):
    EP-only  tp=1, ep=N              (dense weights replicated, every expert on one rank)
    EP×DP    tp=1, ep=N/2, edp=2     (N=2: plain DP)           GPU: ep=8 (one node), dp=N/8
    TP×EP    tp=2, ep=N/2
    PP×EP    pp=2, ep=N/2, 1F1B      GPU: pp=4, ep=8 (Megatron-core's Mixtral layout TP1 EP8 PP4), N >= 32
Weak scaling: each dp rank reads `--batch-per-rank`·tp sequences (tokens per rank fixed, a tp group shares its
tokens) and the model has `--experts-per-rank`·ep experts (experts per rank fixed). Strong scaling: the
global batch is `--batch-per-rank`·max(ranks) sequences and the config's expert count, whatever N.
PP×EP: a pipeline of pp ranks shares its dp rank's sequences (`--batch-per-rank`·pp of them in weak scaling, so
tokens per rank stay fixed), in 2·pp micro-batches (train.grad_accum_steps) of half `--batch-per-rank` each; on
GPUs 4·pp = 16 micro-batches of the config's batch_size. Its CPU model line is the 1F1B timeline with the ranks
sharing the cores (`bench.pipeline_cpu.simulate`) on the bottleneck stage's FLOPs, plus the fitted all-to-all
and the point-to-point transfers at the all-to-all's alpha-beta.

Measured per point: tokens/s (global batch / median step time), efficiency against linear — raw (N times the
1-rank rate) and normalised by cores (min(N, cores) times it: each rank has one thread, so ranks beyond the
cores share them; with 4 ranks on 2 cores the raw figure cannot exceed 50%) — all-to-all bytes per rank and
the share of the step spent inside the all-to-alls, and the same for the collectives on the tensor-parallel
group (calls, bytes, seconds; `alpha_beta.tp_collectives` predicts the calls and bytes). Calls and seconds
come from `moe_dist.parallel.comm.observe_collectives`, which reports every collective the package issues
(`ranks.train_and_measure`), so nothing in torch.distributed is patched.
The CPU model line is `alpha_beta.CpuFit`: the 1-rank compute time scaled by the rank's FLOPs and by the
core sharing, plus alpha-beta fitted to the measured all-to-all times, plus a second alpha-beta for the TP
collectives (`alpha_beta.fit_tp`; the JSON's tp_fit_method says whether it was fitted or borrowed); it is
drawn solid over measured ranks and dashed beyond.
The GPU panels use the shapes of `--gpu-config` (Mixtral 8x7B) with the named link and TFLOP/s inputs and
mark the published Megatron-core figure for comparison.

Results go to runs/bench/scaling_cpu[_quick].json and .png under the current directory unless `--out` names
another path; the figures committed under benchmarks/results/ were written with `--out benchmarks/results/...`.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path
from typing import Any

LAYOUTS = ("EP-only", "EP×DP", "TP×EP", "PP×EP")
GPU_PP = 4                  # pipeline stages of the GPU PP×EP curve
# Megatron-core MoE README (NVIDIA/Megatron-LM, megatron/core/transformer/moe/README.md, MCore v0.9):
# "468 TFLOPS for Mixtral 8X7B bf16 training" on H100. The README gives no layout; its Mixtral example
# (examples/mixtral/README.md) recommends TP1 EP8 PP4 for training, which the PP×EP curve models at 64 GPUs; the
# EP×DP point (pp=1) is compared too.
PUBLISHED = {"tflops_per_gpu": 468.0, "gpus": 64, "layout": "EP×DP",
             "source": "NVIDIA/Megatron-LM megatron/core/transformer/moe/README.md (MCore v0.9): "
                       "'468 TFLOPS for Mixtral 8X7B bf16 training' on H100; 64 GPUs, EP=8 per NVIDIA's recipe"}


def layout(name: str, n: int) -> tuple[int, int]:
    """(tp, ep) of a CPU layout at n ranks."""
    if n == 1:
        return 1, 1
    if name == "EP-only":
        return 1, n
    if name == "EP×DP":
        return 1, n // 2
    if name == "TP×EP":
        return 2, n // 2
    if name == "PP×EP":
        return 1, n // 2
    raise ValueError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUTS)}")


def stages(name: str, n: int) -> int:
    """Pipeline stages of a CPU layout at n ranks."""
    return 2 if name == "PP×EP" and n > 1 else 1


def gpu_layout(name: str, n: int, experts: int) -> tuple[int, int, int]:
    """(tp, ep, num_experts) on n GPUs. EP-only and TP×EP keep one expert per GPU (experts scaled with ep:
    Mixtral's shapes with more experts); EP×DP is Mixtral itself, ep = its 8 experts inside one node."""
    if name == "EP-only":
        return 1, n, n
    if name == "EP×DP":
        return 1, min(experts, n), experts
    if name == "TP×EP":
        return 2, n // 2, n // 2
    if name == "PP×EP":
        return 1, experts, experts            # with GPU_PP stages: from pp·ep = 32 GPUs on
    raise ValueError(f"unknown layout {name!r}")


def point_config(base, mode: str, name: str, n: int, args):
    from moe_dist.bench.alpha_beta import with_layout
    tp, ep = layout(name, n)
    pp = stages(name, n)
    dp = n // (tp * pp)
    if pp > 1:
        # 2·pp micro-batches of half a rank's sequences: the dp rank's batch_per_rank·pp (weak) or its share
        # of the global batch (strong).
        mb = max(1, args.batch_per_rank // 2)
        seqs = args.batch_per_rank * pp if mode == "weak" else args.batch_per_rank * max(args.ranks) // dp
        return with_layout(base, tp=tp, ep=ep, pp=pp, pp_schedule="1f1b", batch_size=mb,
                           grad_accum_steps=max(1, seqs // mb),
                           num_experts=args.experts_per_rank * ep if mode == "weak" else None)
    if mode == "weak":
        return with_layout(base, tp=tp, ep=ep, batch_size=args.batch_per_rank * tp,
                           num_experts=args.experts_per_rank * ep)
    glob = args.batch_per_rank * max(args.ranks)
    return with_layout(base, tp=tp, ep=ep, batch_size=glob // dp)


def measure(cfg, n: int, steps: int, warmup: int) -> dict[str, Any]:
    from moe_dist.bench.ranks import run_ranks, train_and_measure
    res = run_ranks(train_and_measure, n, cfg, steps, warmup)
    timed = range(min(warmup, steps - 1), steps)
    step_s = statistics.median(max(r["step_s"][i] for r in res) for i in timed)
    a2a_s = statistics.median(statistics.mean(r["a2a_s"][i] for r in res) for i in timed)
    rows = statistics.mean(statistics.mean(r["a2a_rows_out"][i] for i in timed) for r in res)
    calls = statistics.mean(r["a2a_calls"][-1] for r in res)
    tokens = cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum_steps * res[0]["dp"]
    fwd_bytes = rows * cfg.model.dim * 4
    tp_s = statistics.median(statistics.mean(r["tp_s"][i] for r in res) for i in timed)
    p2p_s = statistics.median(statistics.mean(r["p2p_s"][i] for r in res) for i in timed)
    return {"ranks": n, "tp": cfg.parallel.tp, "ep": cfg.parallel.ep, "dp": res[0]["dp"], "pp": cfg.parallel.pp,
            "micro_batches": cfg.train.grad_accum_steps,
            "p2p_s": p2p_s, "p2p_bytes_per_rank_step": statistics.mean(r["p2p_bytes"][-1] for r in res),
            "num_experts": cfg.moe.num_experts, "batch_per_dp_rank": cfg.train.batch_size,
            "step_s": step_s, "tokens_per_s": tokens / step_s, "a2a_s": a2a_s, "a2a_share": a2a_s / step_s,
            "a2a_calls_per_step": calls, "a2a_dispatch_bytes_per_rank": fwd_bytes,
            "a2a_bytes_per_rank_step": 4 * fwd_bytes,      # dispatch + combine, forward + backward
            "tp_calls_per_step": statistics.mean(r["tp_calls"][-1] for r in res),
            "tp_bytes_per_rank_step": statistics.mean(r["tp_bytes"][-1] for r in res),
            "tp_calls_by_op": res[0]["tp_calls_by_op"][-1], "tp_s": tp_s, "tp_share": tp_s / step_s,
            "peak_rss_mib": max(r["peak_rss"] for r in res) / 2**20}


def cpu_model(points: dict[str, list[dict]], base_cfg_for, cores: int, extra_ranks: list[int]):
    """Fit `CpuFit` to one mode's points and return (fit, {layout: [(n, modelled tokens/s)]})."""
    from moe_dist.bench.alpha_beta import CpuFit, fit_alpha_beta, fit_tp, flops_per_rank, tp_collectives
    from moe_dist.parallel.layout import check_layout
    from moe_dist.parallel.topology import ParallelDims
    from moe_dist.bench.pipeline_cpu import simulate
    from moe_dist.plan import alltoall_rows_per_layer, p2p_per_step
    from moe_dist.plan import stages as stages_of
    from moe_dist.models.gpt import is_moe_layer
    one = next(iter(points.values()))[0]
    cfg1 = base_cfg_for("EP-only", 1)
    f1 = sum(flops_per_rank(cfg1, ParallelDims(world=1)).values())
    multi = [p for ps in points.values() for p in ps if p["ep"] > 1]
    alpha, beta = fit_alpha_beta([(p["a2a_calls_per_step"], p["a2a_bytes_per_rank_step"], p["a2a_s"])
                                  for p in multi])
    tp_pts = [p for ps in points.values() for p in ps if p["tp"] > 1]
    tp_alpha, tp_beta, tp_method = fit_tp([(p["tp_calls_per_step"], p["tp_bytes_per_rank_step"], p["tp_s"])
                                           for p in tp_pts], alpha, beta)
    fit = CpuFit(one["step_s"], cores, alpha, beta, tp_alpha, tp_beta)
    calls_per_moe_layer = (statistics.mean(p["a2a_calls_per_step"] for p in multi) /
                           sum(is_moe_layer(cfg1.model, i) for i in range(cfg1.model.n_layers))) if multi else 0
    lines = {}
    for name, ps in points.items():
        ns = sorted({p["ranks"] for p in ps} | set(extra_ranks))
        line = []
        for n in ns:
            try:
                cfg = base_cfg_for(name, n)
                dims = check_layout(cfg, n)
            except ValueError:              # LayoutError: this layout cannot run on n ranks
                continue
            work = sum(flops_per_rank(cfg, dims).values()) / f1
            n_moe = max(st.n_moe for st in stages_of(cfg, dims))
            byts = 4 * n_moe * alltoall_rows_per_layer(cfg, dims)["sent"] * cfg.model.dim * 4
            calls = calls_per_moe_layer * n_moe if dims.ep > 1 else 0
            tc = tp_collectives(cfg, dims)
            m = cfg.train.grad_accum_steps
            if dims.pp > 1:
                # One micro-batch of the slowest stage at full speed (its all-to-alls included), run through the
                # 1F1B timeline with the ranks sharing the cores; transfers at the all-to-all's alpha-beta.
                slot = fit.step(1, work, calls, byts)
                tl = simulate("1f1b", dims.pp, 1, m, slot / 3, 2 * slot / 3, ranks_per_stage=n // dims.pp,
                              cores=cores)
                sent = max(p2p_per_step(cfg, dims).sent_per_rank)
                step = tl.makespan_s + 2 * m * alpha + (sent / beta if beta else 0.0)
            else:
                step = fit.step(n, work, calls, byts, tc.calls, tc.bytes)
            line.append((n, cfg.train.batch_size * cfg.train.seq_len * m * dims.dp / step))
        lines[name] = line
    return fit, lines, tp_method


def gpu_curves(gcfg, args, net, comp) -> dict[str, dict[str, list[dict]]]:
    from moe_dist.bench.alpha_beta import estimate, with_layout
    from moe_dist.parallel.layout import check_layout
    out: dict[str, dict[str, list[dict]]] = {"weak": {}, "strong": {}}
    E = gcfg.moe.num_experts
    for mode in ("weak", "strong"):
        for name in LAYOUTS:
            rows = []
            for n in args.gpus:
                tp, ep, experts = gpu_layout(name, n, E)
                pp = GPU_PP if name == "PP×EP" else 1
                dp = n // (tp * pp)
                if dp < 1:
                    continue
                if mode == "weak":
                    batch = gcfg.train.batch_size * tp        # sequences per dp rank: tokens per GPU fixed
                else:
                    if args.gpu_global_batch % dp:
                        continue
                    batch = args.gpu_global_batch // dp
                    experts = E if name in ("EP×DP", "PP×EP") else experts
                # A pipeline runs 4·pp micro-batches (weak) or splits its dp rank's sequences into up to that many.
                micro = 4 * pp if mode == "weak" else max(1, min(4 * pp, batch))
                mb = batch if pp == 1 or mode == "weak" else max(1, batch // micro)
                try:
                    cfg = with_layout(gcfg, tp=tp, ep=ep, batch_size=mb, num_experts=experts, pp=pp,
                                      grad_accum_steps=(micro if mode == "weak" else batch // mb) if pp > 1 else None)
                    dims = check_layout(cfg, n)
                except ValueError:          # LayoutError: this layout cannot run on n GPUs
                    continue
                e = estimate(cfg, dims, net, comp, overlap_dp=not args.no_dp_overlap)
                rows.append({"gpus": n, "tp": tp, "ep": ep, "pp": pp, "dp": dims.dp, "num_experts": experts,
                             "batch_per_dp_rank": batch, "micro_batches": cfg.train.grad_accum_steps,
                             "bubble_s": e.bubble_s, "pipeline_p2p_s": e.p2p_s,
                             "step_s": e.step_s, "compute_s": e.compute_s,
                             "alltoall_s": e.alltoall_s, "tp_collectives_s": e.tp_s,
                             "dp_allreduce_exposed_s": e.dp_allreduce_s,
                             "tokens_per_s_per_gpu": e.tokens_per_s_per_gpu, "tflops_per_gpu": e.tflops_per_gpu,
                             "alltoall_share": e.alltoall_share, "tp_share": e.tp_s / e.step_s})
            out[mode][name] = rows
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/tiny-cpu.yaml", help="model measured on the CPU ranks")
    p.add_argument("--ranks", default="1,2,4", help="CPU rank counts (must start at 1)")
    p.add_argument("--batch-per-rank", type=int, default=4, help="sequences per rank (weak); strong: global "
                   "batch = this × max ranks")
    p.add_argument("--experts-per-rank", type=int, default=4, help="weak scaling: experts = this × ep")
    p.add_argument("--steps", type=int, default=None, help="steps per point (default 8, --quick 3)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gpu-config", default="configs/mixtral-8x7b.yaml", help="shapes for the GPU extrapolation")
    p.add_argument("--gpus", default="8,16,32,64,128,256,512,1024")
    p.add_argument("--gpu-global-batch", type=int, default=1024, help="strong scaling on GPUs: sequences")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--intra-gbps", type=float, default=450.0, help="GB/s per GPU one way (H100 NVLink 4)")
    p.add_argument("--inter-gbps", type=float, default=50.0, help="GB/s per GPU one way (400 Gb/s InfiniBand)")
    p.add_argument("--intra-latency-us", type=float, default=3.0)
    p.add_argument("--inter-latency-us", type=float, default=10.0)
    p.add_argument("--expert-tflops", type=float, default=600.0, help="H100 bf16 grouped GEMM, Mixtral shapes")
    p.add_argument("--dense-tflops", type=float, default=720.0, help="H100 bf16 dense GEMM")
    p.add_argument("--no-dp-overlap", action="store_true", help="count the DP gradient all-reduce as exposed")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="subset of " + ", ".join(LAYOUTS))
    p.add_argument("--modes", default="weak,strong", help="weak, strong or both")
    p.add_argument("--quick", action="store_true", help="small model, ranks 1,2, 3 steps: a smoke run")
    p.add_argument("--out", default=None, help="output path without suffix (default runs/bench/scaling_cpu[_quick] "
                   "under the current directory; the committed figures use --out benchmarks/results/scaling_cpu)")


def _ints(text: str, flag: str) -> list[int]:
    from moe_dist.config import ConfigError
    try:
        vals = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise ConfigError(f"{flag}={text!r}: write a comma list of integers, e.g. 1,2,4") from None
    if not vals or vals[0] < 1:
        raise ConfigError(f"{flag}={text!r}: counts must be >= 1")
    return vals


def run(args: argparse.Namespace) -> int:
    from moe_dist import config
    from moe_dist.bench.alpha_beta import Compute, Network, model_flops_per_token
    from moe_dist.bench.report import RUN_DIR, machine_info, machine_note, write_result
    from moe_dist.bench.tune_capacity import QUICK_OVERRIDES
    args.ranks = _ints("1,2" if args.quick and args.ranks == "1,2,4" else args.ranks, "--ranks")
    args.gpus = _ints(args.gpus, "--gpus")
    if args.ranks[0] != 1:
        raise config.ConfigError(f"--ranks={args.ranks}: the list must start at 1 (the baseline of every curve)")
    bad = [n for n in args.ranks[1:] if n % 2]
    if bad:
        raise config.ConfigError(f"--ranks: {bad} are odd; EP×DP and TP×EP split ranks in halves, use even counts")
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    modes = [x.strip() for x in args.modes.split(",") if x.strip()]
    if not layouts or set(layouts) - set(LAYOUTS):
        raise config.ConfigError(f"--layouts={args.layouts!r}: choose from {', '.join(LAYOUTS)}")
    if not modes or set(modes) - {"weak", "strong"}:
        raise config.ConfigError(f"--modes={args.modes!r}: choose weak, strong or weak,strong")
    steps = args.steps if args.steps is not None else (3 if args.quick else 8)
    if args.warmup >= steps:
        raise config.ConfigError(f"--warmup={args.warmup} leaves no timed step of --steps={steps}")
    base = config.load(args.config, QUICK_OVERRIDES if args.quick else [])
    if not Path(base.data.path).is_file():
        raise config.ConfigError(f"data.path={base.data.path} does not exist; make it with "
                                 f"`moe-dist prepare-data --out {base.data.path}`")
    gcfg = config.load(args.gpu_config)
    net = Network(gpus_per_node=args.gpus_per_node, intra_gbps=args.intra_gbps, inter_gbps=args.inter_gbps,
                  intra_latency_us=args.intra_latency_us, inter_latency_us=args.inter_latency_us)
    comp = Compute(expert_tflops=args.expert_tflops, dense_tflops=args.dense_tflops)
    info0 = machine_info()
    cores = info0["cpus_usable"] or info0["cpu_count"]
    print(f"bench scaling: {args.config}{' (quick)' if args.quick else ''} on {args.ranks} gloo ranks, 1 thread "
          f"each, {cores} usable cores{' — OVERSUBSCRIBED above ' + str(cores) + ' ranks' if max(args.ranks) > cores else ''}",
          flush=True)

    measured: dict[str, dict[str, list[dict]]] = {}
    models: dict[str, Any] = {}
    for mode in modes:
        measured[mode] = {name: [] for name in layouts}
        baseline = None
        for name in layouts:
            for n in args.ranks:
                if n == 1 and baseline is not None:
                    measured[mode][name].append(baseline)       # the shared 1-rank point
                    continue
                cfg = point_config(base, mode, name, n, args)
                config.validate(cfg)
                pt = measure(cfg, n, steps, args.warmup)
                if n == 1:
                    baseline = pt
                measured[mode][name].append(pt)
                print(f"  {mode:6s} {name:8s} N={n}: {pt['tokens_per_s']:9,.0f} tok/s  step {pt['step_s'] * 1e3:7.1f} ms"
                      f"  a2a {pt['a2a_share']:5.1%} of the step, {pt['a2a_bytes_per_rank_step'] / 1024:7.0f} KiB/rank"
                      f"  tp {pt['tp_share']:5.1%}, {pt['tp_calls_per_step']:.0f} calls",
                      flush=True)
        for name, pts in measured[mode].items():
            t1 = pts[0]["tokens_per_s"]
            for p in pts:
                p["efficiency_raw"] = p["tokens_per_s"] / (p["ranks"] * t1)
                p["efficiency_per_core"] = p["tokens_per_s"] / (min(p["ranks"], cores) * t1)
                p["oversubscribed"] = p["ranks"] > cores
        fit, lines, tp_method = cpu_model(measured[mode], lambda nm, n, m=mode: point_config(base, m, nm, n, args), cores,
                               [2 * max(args.ranks)])
        models[mode] = {"compute_1rank_s": fit.compute_1, "cores": fit.cores, "alpha_s_per_call": fit.alpha_s,
                        "beta_bytes_per_s": fit.beta_bytes_per_s, "tp_alpha_s_per_call": fit.tp_alpha_s,
                        "tp_beta_bytes_per_s": fit.tp_beta_bytes_per_s, "tp_fit_method": tp_method,
                        "lines": {k: [{"ranks": n, "tokens_per_s": v} for n, v in line] for k, line in lines.items()}}
        for name, pts in measured[mode].items():
            model_at = dict(lines[name])
            for p in pts:
                p["model_tokens_per_s"] = model_at.get(p["ranks"])
                p["model_error"] = (model_at[p["ranks"]] / p["tokens_per_s"] - 1) if p["ranks"] in model_at else None

    gpu = gpu_curves(gcfg, args, net, comp)
    fpt = model_flops_per_token(gcfg)
    at = next((r for r in gpu["weak"][PUBLISHED["layout"]] if r["gpus"] == PUBLISHED["gpus"]), None)
    comparison = dict(PUBLISHED, model_flops_per_token=fpt,
                      published_tokens_per_s_per_gpu=PUBLISHED["tflops_per_gpu"] * 1e12 / fpt,
                      model_tflops_per_gpu=at["tflops_per_gpu"] if at else None,
                      relative_error=(at["tflops_per_gpu"] / PUBLISHED["tflops_per_gpu"] - 1) if at else None,
                      not_modelled="all-to-all/compute overlap, load imbalance")
    # The recipe's own layout, TP1 EP8 PP4 (1F1B, 16 micro-batches per dp rank).
    pp_at = next((r for r in gpu["weak"]["PP×EP"] if r["gpus"] == PUBLISHED["gpus"]), None)
    comparison.update(pp_layout="TP1 EP8 PP4, 1F1B, 16 micro-batches",
                      pp_model_tflops_per_gpu=pp_at["tflops_per_gpu"] if pp_at else None,
                      pp_relative_error=(pp_at["tflops_per_gpu"] / PUBLISHED["tflops_per_gpu"] - 1) if pp_at else None)
    if at:
        print(f"GPU model vs published: Mixtral 8x7B on {PUBLISHED['gpus']} H100, EP=8: model "
              f"{at['tflops_per_gpu']:.0f} TFLOPS/GPU vs {PUBLISHED['tflops_per_gpu']:.0f} published "
              f"({comparison['relative_error']:+.0%})"
              + (f"; TP1 EP8 PP4: {pp_at['tflops_per_gpu']:.0f} ({comparison['pp_relative_error']:+.0%})"
                 if pp_at else ""))

    out = Path(args.out) if args.out else RUN_DIR / ("scaling_cpu_quick" if args.quick else "scaling_cpu")
    info = machine_info()
    payload = {
        "command": "bench scaling", "config": args.config, "quick": args.quick, "steps": steps,
        "warmup": args.warmup, "ranks": args.ranks, "batch_per_rank": args.batch_per_rank,
        "experts_per_rank": args.experts_per_rank, "threads_per_rank": 1, "cores": cores,
        "oversubscribed": max(args.ranks) > cores,
        "oversubscription_note": f"each rank runs 1 intra-op thread; {cores} usable cores, so runs with more "
                                 f"ranks than cores time-share them (and share them with other users: see the "
                                 f"load average). efficiency_raw = tokens/s / (N·tokens/s at 1 rank); "
                                 f"efficiency_per_core divides by min(N, cores) instead.",
        "tp_time_method": "seconds inside the all-reduces and all-gathers on the tp group per step, as "
                          "moe_dist.parallel.comm.observe_collectives reports them, mean over ranks, median over "
                          "timed steps",
        "a2a_time_method": "seconds inside the all-to-alls per step (count exchanges included), as "
                           "moe_dist.parallel.comm.observe_collectives reports them (gloo blocks, so it includes "
                           "waiting for the slowest peer), mean over ranks, median over timed steps",
        "measured": measured, "cpu_model": models,
        "gpu_model": {"config": args.gpu_config, "network": dataclasses.asdict(net),
                      "compute": {"expert_tflops": comp.expert_tflops, "dense_tflops": comp.dense_tflops},
                      "dp_allreduce_overlapped": not args.no_dp_overlap, "curves": gpu},
        "published_comparison": comparison,
    }
    write_result(out.with_suffix(".json"), payload)
    note = (f"CPU: gloo, 1 thread/rank, {cores} cores" + (f" — {max(args.ranks)} ranks OVERSUBSCRIBE them" if
            max(args.ranks) > cores else "") + f"; {machine_note(info)}. GPU: alpha-beta model, "
            f"NVLink {net.intra_gbps:g} GB/s, IB {net.inter_gbps:g} GB/s, {comp.expert_tflops:g}/{comp.dense_tflops:g} "
            f"TFLOP/s expert/dense.")
    plot(measured, models, gpu, comparison, out.with_suffix(".png"), note, cores, args)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


def plot(measured, models, gpu, comparison, path: Path, note: str, cores: int, args) -> Path:
    from moe_dist.bench.report import figure, save_figure
    fig, ax = figure(2, len(measured), width=6.0, height=4.2)
    colors = dict(zip(LAYOUTS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    top = max(args.ranks)
    for col, mode in enumerate(measured):
        a = ax[0, col]
        for name in measured[mode]:
            pts = measured[mode][name]
            a.plot([p["ranks"] for p in pts], [p["tokens_per_s"] for p in pts], "o", color=colors[name],
                   label=f"{name} measured")
            line = [(d["ranks"], d["tokens_per_s"]) for d in models[mode]["lines"][name]]
            inside = [(n, v) for n, v in line if n <= top]
            beyond = [(n, v) for n, v in line if n >= top]
            if inside:
                a.plot(*zip(*inside), "-", color=colors[name], lw=1)
            if len(beyond) > 1:
                a.plot(*zip(*beyond), "--", color=colors[name], lw=1)
        t1 = next(iter(measured[mode].values()))[0]["tokens_per_s"]
        xs = sorted({d["ranks"] for line in models[mode]["lines"].values() for d in line})
        a.plot(xs, [t1 * n for n in xs], ":", color="0.6", label="linear")
        a.plot(xs, [t1 * min(n, cores) for n in xs], "-.", color="0.75", label=f"linear in cores ({cores})")
        if top > cores:
            a.axvspan(cores, max(xs), color="0.92", zorder=0)
            a.text(cores, a.get_ylim()[1] * 0.95, " oversubscribed", fontsize=7, va="top", color="0.4")
        a.set_xscale("log", base=2)
        a.set_xticks(xs, [str(n) for n in xs])
        a.set_xlabel("CPU ranks (gloo, 1 thread each)")
        a.set_ylabel("tokens/s")
        a.set_title(f"{mode} scaling, CPU: points measured, line model (dashed: extrapolated)", fontsize=9)
        a.legend(fontsize=7)
        g = ax[1, col]
        for name in LAYOUTS:
            rows = gpu[mode][name]
            g.plot([r["gpus"] for r in rows], [r["tflops_per_gpu"] for r in rows], "--", color=colors[name],
                   label=f"{name} (model)")
        if mode == "weak" and comparison.get("model_tflops_per_gpu"):
            g.plot([comparison["gpus"]], [comparison["tflops_per_gpu"]], "*", ms=12, color="black",
                   label=f"Megatron-core published (EP×DP {comparison['relative_error']:+.0%}"
                         + (f", PP×EP {comparison['pp_relative_error']:+.0%}" if comparison.get("pp_relative_error")
                            is not None else "") + " model error)")
        g.set_xscale("log", base=2)
        g.set_xlabel("H100 GPUs (model only, no GPU measurement)")
        g.set_ylabel("model TFLOPS per GPU")
        g.set_ylim(bottom=0)
        g.set_title(f"{mode} scaling, {Path(args.gpu_config).stem}, alpha-beta extrapolation", fontsize=9)
        g.legend(fontsize=7)
    return save_figure(fig, path, note)
