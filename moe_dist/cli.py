"""`moe-dist`: the command line. Each command parses its arguments, validates the config, and hands off.

Every command runs inside one error boundary (:func:`main`): a failure ends with one line
`moe-dist: <kind> error: <what happened>; <the fix>` and a documented exit code (moe_dist.errors: 2 bad input,
1 runtime failure, 130 Ctrl-C, 143 after a SIGTERM save); a traceback only with --debug or for a bug."""
from __future__ import annotations

import argparse
import json
import sys

from moe_dist.errors import (EXIT_BAD_INPUT, EXIT_CODES_HELP, EXIT_RUNTIME, EXIT_TERMINATED,  # noqa: F401
                             CommandError, report)

_QUIET_RANK_WAIT_S = 20.0      # how long a rank other than 0 waits before exiting on bad input at start-up


def _load_config(path: str, overrides: list[str]):
    from moe_dist import config
    return config.load(path, overrides)


def _launch():
    """The launcher's view of this process; its variables are input too: same report, same exit code."""
    import os

    from moe_dist.parallel import bootstrap
    try:
        return bootstrap.detect_launch(os.environ)
    except ValueError as e:
        raise CommandError("launch", str(e)) from None


def _judge_layout(cfg):
    """The layout on the launcher's world size: every error about sizes comes before any process group."""
    from moe_dist.parallel.layout import check_layout
    return check_layout(cfg, _launch().world_size)


def _start_ranks(cfg, dims):
    """Start the process groups (the layout was judged) and build the topology."""
    import os

    import torch

    from moe_dist.parallel import bootstrap
    from moe_dist.parallel.topology import Topology
    if dims.world > 1:
        # Ranks on one node share its cores; torch's default (all cores per rank) thrashes.
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dims.world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    bootstrap.init_distributed(cfg.parallel.timeout_s)
    return Topology.build(dims, cfg.parallel.timeout_s)


def _quiet_unless_first(scope: str) -> None:
    """Bad input found at start-up: one rank reports it, the others exit with the same code in silence, so a
    launch prints one message, not one per rank. `scope` "world": judged alike on every rank (the config, the
    layout), so rank 0 reports. "node": facts of this node (folders, files, memory), so the first rank of each
    node reports. Exiting at once could let torchrun stop the reporting rank before it prints (its agent stops
    every worker once one fails), so the others wait for that stop first, bounded in case it runs elsewhere."""
    import os
    import time

    from moe_dist.parallel import bootstrap
    try:
        launch = bootstrap.detect_launch(os.environ)
    except ValueError:                   # an incomplete launcher environment: every rank reports that
        return
    if (launch.rank if scope == "world" else launch.local_rank) != 0:
        time.sleep(_QUIET_RANK_WAIT_S)
        raise SystemExit(EXIT_BAD_INPUT)


def _bad_input(e: BaseException) -> bool:
    from moe_dist.errors import classify
    return classify(e).code == EXIT_BAD_INPUT


def cmd_train(args) -> int:
    from moe_dist.parallel import bootstrap
    from moe_dist.train import startup
    try:
        cfg = _load_config(args.config, args.overrides)
        dims = _judge_layout(cfg)
    except Exception as e:               # the same on every rank
        if _bad_input(e):
            _quiet_unless_first("world")
        raise
    try:
        startup.check_node(cfg, dims, _launch())
    except Exception as e:               # the same on every rank of this node
        if _bad_input(e):
            _quiet_unless_first("node")
        raise
    topo = _start_ranks(cfg, dims)
    say = print if topo.rank == 0 else (lambda *a, **k: None)
    try:
        return _train(args, cfg, topo, say)
    except BaseException as e:
        if topo.is_distributed and not isinstance(e, (SystemExit, KeyboardInterrupt)):
            e.add_note(f"rank {topo.rank} of {topo.dims.world}")    # which rank's line this is
        raise
    finally:
        bootstrap.shutdown()


def _build_trainer(cfg, topo):
    from moe_dist.errors import classify
    from moe_dist.train.trainer import Trainer
    try:
        return Trainer(cfg, topo=topo)       # it builds the engine train.engine names
    except (MemoryError, RuntimeError) as e:
        if classify(e).kind != "memory":
            raise
        from moe_dist.plan import param_counts
        from moe_dist.train.startup import MEMORY_FIX, describe_sizes
        params = param_counts(cfg, topo.dims).total
        raise CommandError("memory", f"allocating the model failed ({str(e).strip().splitlines()[0]}): "
                           f"{params:,} parameters per rank ({describe_sizes(cfg)}); {MEMORY_FIX}", EXIT_RUNTIME) from e


def _train(args, cfg, topo, say) -> int:
    from moe_dist.train.trainer import format_expert_load
    trainer = _build_trainer(cfg, topo)
    n = sum(p.numel() for p in trainer.model.parameters())
    moe_ids = list(trainer.model.all_moe_layer_ids)     # every pipeline stage's
    header = f"moe-dist train: {args.config} | {n / 1e6:.2f}M parameters"
    if topo.is_distributed:
        header += f" on rank 0 of {topo.dims.describe()}"
    if moe_ids:
        header += f" | {cfg.moe.num_experts} experts, top-{cfg.moe.top_k}, MoE layers {moe_ids}"
        if trainer.model.moe_layers:               # rank 0's stage may hold dense layers only
            header += f" | experts backend {trainer.model.moe_layers[0].experts.backend}"
    else:
        header += " (no MoE layer)"
    say(header, flush=True)
    history = trainer.fit(progress=not args.quiet)   # resumes from `latest` first (checkpoint.resume)
    steps = history.steps
    if trainer.stopped_at is not None:
        # SIGTERM: fit saved and said where. The run is not finished, so exit as a terminated process
        # would (128+15): torchrun --max-restarts, a SLURM requeue or a retry loop then relaunch it, and
        # the relaunch resumes from the checkpoint just written. Exit 0 would read as "all steps done".
        return EXIT_TERMINATED
    if not steps:
        say(f"nothing to do: the checkpoint is at step {cfg.train.steps} already (train.steps); raise "
            "train.steps to continue", flush=True)
        return 0
    evals = getattr(history, "evals", [])
    if evals and evals[-1][0] == steps[-1].step + 1:
        val = evals[-1][1]                             # fit evaluated the last step already
    else:
        val = trainer.evaluate(cfg.train.eval_batches)   # every rank joins: the model's collectives need the whole group
    first = sum(s.lm_loss for s in steps[:10]) / min(10, len(steps))
    last = sum(s.lm_loss for s in steps[-10:]) / min(10, len(steps))
    tokens = len(steps) * cfg.train.batch_size * cfg.train.seq_len * topo.dp.size * cfg.train.grad_accum_steps
    skipped = getattr(history, "skipped_steps", 0)
    say(f"\ndone: {len(steps)} steps in {trainer.wall_seconds:.1f}s, {tokens / trainer.wall_seconds:,.0f} "
        f"tokens/s; LM loss {first:.3f} -> {last:.3f} (mean of first/last 10 steps); "
        + (f"val loss {val:.3f}" if val is not None else "val loss: none (data.val_fraction=0)")
        + (f"; {skipped} non-finite steps skipped" if skipped else ""))
    if moe_ids and history.expert_load().numel():
        where = f" (all {topo.dims.world} ranks)" if topo.is_distributed else ""
        say(f"\nper-expert load over the run{where} (share of assignments):")
        say(format_expert_load(history.expert_load(), moe_ids))
    if getattr(trainer, "last_checkpoint", None):
        say(f"\ncheckpoint: {trainer.last_checkpoint}")
    say(f"\nmetrics: {cfg.train.out_dir}/metrics.jsonl")
    return 0


def cmd_prepare_data(args) -> int:
    from moe_dist.train.data import prepare
    kwargs = {}
    if args.tokenizer is not None:
        kwargs["tokenizer"] = args.tokenizer
    if args.train_tokenizer is not None:
        kwargs["train_tokenizer"] = args.train_tokenizer
    meta = prepare(args.sources or None, args.out, args.max_bytes, **kwargs)
    what = meta.get("tokenizer") or "byte"
    print(f"wrote {args.out}: {meta['tokens']:,} tokens ({what}, vocabulary {meta['vocab_size']:,}) from "
          f"{meta['documents']:,} documents ({', '.join(meta['sources'])})")
    return 0


def cmd_params(args) -> int:
    import torch
    from moe_dist.models.gpt import MoEGPT, count_parameters
    cfg = _load_config(args.config, args.overrides)
    with torch.device("meta"):           # no memory: only shapes
        model = MoEGPT(cfg)
    counts = count_parameters(model, cfg)
    if args.json:
        print(json.dumps(counts))
    else:
        for k, v in counts.items():
            print(f"{k:>14}: {v:>16,d}  ({v / 1e9:.2f}B)")
    return 0


def cmd_plan(args) -> int:
    from moe_dist.config import ConfigError
    from moe_dist.plan import format_plan, make_plan, to_json
    cfg = _load_config(args.config, args.overrides)
    world = args.world if args.world is not None else cfg.parallel.world_size
    if world is None:
        raise ConfigError("no world size: pass --world N (or set parallel.world_size in the config)")
    if args.fit is not None:
        # Search the layouts of `world` ranks that fit the memory size instead of judging the config's own.
        from moe_dist.plan_fit import cmd_fit
        return cmd_fit(cfg, world, args)
    plan = make_plan(cfg, world)          # a layout that cannot run raises LayoutError here
    if args.check:
        return 0
    print(json.dumps(to_json(plan), indent=1) if args.json else format_plan(plan, args.config))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error ends with the one `moe-dist: argument error: ...` line like every other
    error (argparse's own ends with `<prog>: error: ...`); exit code 2 as argparse's."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        print(f"moe-dist: argument error: {message}; see `{self.prog} --help`", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moe-dist", description="Expert-parallel Mixture-of-Experts training.", epilog=EXIT_CODES_HELP,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of every error, not only the one-line report")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML config (overrides: --section.field=value)")
    t.add_argument("config")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("prepare-data", help="build a token file: bytes, an HF tokenizer.json, or a BPE trained on the sources "
                                               "(default source: the Python stdlib)")
    d.add_argument("sources", nargs="*", help="text files, folders, or .jsonl files with a 'text' field")
    d.add_argument("--out", default="data/stdlib.bin")
    d.add_argument("--max-bytes", type=int, default=None)
    d.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenize with a Hugging Face tokenizer.json (a file, or a folder holding one)")
    d.add_argument("--train-tokenizer", type=int, default=None, metavar="VOCAB_SIZE",
                   help="train a byte-level BPE tokenizer of this vocabulary size on the sources and save it "
                        "beside the token file")
    d.set_defaults(func=cmd_prepare_data)

    c = sub.add_parser("params", help="total and active parameter counts of a config (no memory used)")
    c.add_argument("config")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_params)

    pl = sub.add_parser("plan", help="rank groups, per-rank parameters, memory and all-to-all bytes of a layout "
                                     "(no process started)")
    pl.add_argument("config")
    pl.add_argument("--world", type=int, default=None, help="number of ranks (default: parallel.world_size)")
    pl.add_argument("--json", action="store_true", help="the same report as JSON")
    pl.add_argument("--check", action="store_true",
                    help="only judge the layout: print nothing and exit 0 when it can run, else one error line and "
                         "exit 2 (the launch scripts run this before starting any rank)")
    pl.add_argument("--fit", default=None, metavar="SIZE",
                    help="search every valid layout of --world ranks (parallel sizes with pipeline stages, 1F1B "
                         "or interleaved, optimizer sharding, recompute, micro-batch) for those whose memory per rank fits SIZE (80GiB, 80GB, 8e10 "
                         "bytes) and rank them by predicted step time")
    pl.set_defaults(func=cmd_plan)

    from moe_dist.bench.commands import register
    register(sub)
    from moe_dist.hf.commands import register as register_hf
    register_hf(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug anywhere on the line (no override looks like it: those have an '=').
    debug = "--debug" in argv
    args, rest = parser.parse_known_args([a for a in argv if a != "--debug"])
    args.debug = debug
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    rest = [r for r in rest if not r.startswith("--local_rank")]
    if rest and args.command not in ("train", "params", "plan", "tune-capacity"):
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    bad = [r for r in rest if not r.startswith("--") or "=" not in r]
    if bad:
        parser.error(f"config overrides must look like --section.field=value, got {' '.join(bad)}")
    args.overrides = rest
    # The one error boundary: whatever a command raises ends as one line and an exit code (moe_dist.errors).
    # BaseException: DCP's CheckpointException is one, and Ctrl-C gets its line too; SystemExit passes.
    try:
        return args.func(args)
    except SystemExit:
        raise
    except BaseException as e:
        return report(e, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
