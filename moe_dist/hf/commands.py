"""Registers the Hugging Face subcommands on the `moe-dist` parser. Each module is imported only to add its
arguments and keeps `transformers`/`safetensors` imports inside its functions."""
from __future__ import annotations

import argparse

from moe_dist.subcommands import add_command

# (command, module, help): each module provides add_arguments(parser) and run(args) -> exit code.
_COMMANDS = [
    ("import-hf", "moe_dist.hf.importer",
     "convert a Hugging Face MoE model folder (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) into a moe_dist checkpoint "
     "and config"),
    ("export-hf", "moe_dist.hf.exporter",
     "write a moe_dist checkpoint as a Hugging Face folder (config.json + safetensors) that transformers loads"),
    ("upcycle", "moe_dist.hf.upcycle",
     "turn a dense Hugging Face model (Llama, Mistral, Qwen2) into an MoE checkpoint whose step-0 logits equal "
     "the dense model's"),
]


def register(sub: argparse._SubParsersAction) -> None:
    for name, module, help_ in _COMMANDS:
        add_command(sub, name, module, help_)
