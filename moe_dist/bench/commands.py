"""Registers the benchmark and tuning subcommands on the `moe-dist` parser.

Each module is imported to add its arguments, so it keeps heavy imports (matplotlib, DeepSpeed) inside its
functions: `moe-dist train` never pays for them."""
from __future__ import annotations

import argparse
import importlib

from moe_dist.subcommands import add_command

# (command path, module, help)
_COMMANDS = [
    (("bench", "layer"), "moe_dist.bench.layer",
     "MoE layer forward+backward against DeepSpeed-MoE, our backends and the dense-equivalent ideal"),
    (("bench", "scaling"), "moe_dist.bench.scaling",
     "weak and strong scaling on gloo ranks, extrapolated with an alpha-beta communication model"),
    (("tune-capacity",), "moe_dist.bench.tune_capacity",
     "sweep the capacity factor: dropped tokens, throughput, memory and loss against dropless"),
]


def _run(module: str):
    def run(args) -> int:
        try:
            return importlib.import_module(module).run(args)
        except ValueError as e:
            # The benchmarks judge their options with ValueErrors that name the option (`--experts [0]: ...`):
            # bad arguments, one line and exit 2 at the command line's error boundary. Any other ValueError is
            # left to read as the bug it is.
            if str(e).startswith("--"):
                from moe_dist.errors import CommandError
                raise CommandError("argument", str(e)) from e
            raise
    return run


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks that write JSON and PNG under runs/bench/ in the current "
                           "directory, or where --out says")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for path, module, help_ in _COMMANDS:
        add_command(bench_sub if path[0] == "bench" else sub, path[-1], module, help_, run=_run)
