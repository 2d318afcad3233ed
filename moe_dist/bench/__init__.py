"""Benchmarks and tuning commands (`moe-dist bench layer|scaling`, `moe-dist tune-capacity`).

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; `commands.py`
wires them into the CLI so the modules never edit the parser of another."""
