"""Adds a subcommand whose code lives in its own module, imported only for its arguments (the bench, tuning and
Hugging Face commands): `moe-dist train` never pays for their heavy imports."""
from __future__ import annotations

import argparse
import importlib


def add_command(parent: argparse._SubParsersAction, name: str, module: str, help_: str, run=None) -> None:
    """Subcommand `name` from `module` (its add_arguments(parser) and run(args) -> int; `run` wraps the call).
    The module is imported here only for its arguments, so it keeps heavy imports inside its functions; a
    command whose module is absent from this installation is simply not offered."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        return
    p = parent.add_parser(name, help=help_)
    mod.add_arguments(p)
    p.set_defaults(func=(run or _call)(module))


def _call(module: str):
    def run(args) -> int:
        return importlib.import_module(module).run(args)
    return run
