"""Bad input of every kind, one table: config fields, overrides, arguments, YAML, data files, output folders,
checkpoint folders, sizes too large for the machine, the launcher's environment and the launch scripts' variables.

Each case asserts the contract of every `moe-dist` command: the exit code (2 for bad input), exactly one error
line `moe-dist: <kind> error: ...` naming the field or the file, no traceback, and nothing on disk lost or changed:
a prepared folder (a config, a token file, a finished run with its checkpoints) and the case's own folder are
hashed before and after, so a refused command may not even create a file.

`moe-dist` runs in this process (`cli.main`, stderr from capsys); only the launch scripts run as subprocesses
(they stop in bash, before any Python starts, except the layout case). A few seconds in all.

Cases whose id starts with `peer-` test work that other parts of the code base own (data checks, checkpoint
store and run lock, `plan --fit`, Hugging Face import and export): they are written against the same contract and
come last in the table; `-k "not peer"` runs this suite's own cases alone.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

from moe_dist import cli

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
                 "GROUP_RANK", "NNODES", "NPROC_PER_NODE", "NUM_GPUS", "NODE_RANK", "TP", "EP", "ETP", "PP",
                 "MAX_RESTARTS", "RDZV_TIMEOUT", "SHUTDOWN_TIMEOUT", "CONFIG", "PYTHON", "MPIRUN", "HOSTFILE", "SRUN",
                 "DEEPSPEED")

GOOD_YAML = """\
model: {{dim: 32, n_layers: 2, n_heads: 2, max_seq_len: 16, dense_hidden: 32}}
moe: {{num_experts: 4, top_k: 2, expert_hidden: 16}}
train: {{steps: 2, batch_size: 2, seq_len: 16, warmup_steps: 1, tensorboard: false, out_dir: {out}}}
data: {{path: {tok}}}
"""


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]               # `moe-dist` arguments, or a launch script and its arguments
    names: tuple[str, ...]              # what the one error line must contain (formatted like argv)
    code: int = 2
    files: dict = field(default_factory=dict)   # the case's own files: name -> text or bytes ({c}/name)
    env: dict = field(default_factory=dict)
    # (world, case folder) -> None or a function that undoes what it holds, called before hashing
    setup: Optional[Callable[[Path, Path], Optional[Callable[[], None]]]] = None
    script: bool = False                # argv[0] is a launch script: run it as a subprocess


def T(*extra: str) -> tuple[str, ...]:
    """`moe-dist train` on the prepared config, into the case's own folder."""
    return ("train", "{good}", "--train.out_dir={c}/run", *extra, "--quiet")


def _copy_run(world: Path, c: Path) -> None:
    shutil.copytree(world / "runs" / "prev", c / "run")


def _step_dir(c: Path) -> Path:
    return c / "run" / "checkpoints" / "step_000002"


def _corrupt_meta(world: Path, c: Path) -> None:
    _copy_run(world, c)
    (_step_dir(c) / "meta.json").write_text("{ not json")


def _latest_to_nowhere(world: Path, c: Path) -> None:
    _copy_run(world, c)
    (c / "run" / "checkpoints" / "latest").write_text("step_000099\n")


def _truncate_shard(world: Path, c: Path) -> None:
    _copy_run(world, c)
    shard = max((p for p in _step_dir(c).iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:100])


def _format_99(world: Path, c: Path) -> None:
    _copy_run(world, c)
    meta = _step_dir(c) / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": 99}))


def _locked(world: Path, c: Path) -> Callable[[], None]:
    """A run folder another live run holds: its lock file, flock'ed on a descriptor of its own (flock conflicts
    between descriptors even in one process), naming pid 1 on this host. Returns the release."""
    import fcntl
    _copy_run(world, c)
    path = c / "run" / ".moe-dist.lock"
    path.write_text(json.dumps({"pid": 1, "host": socket.gethostname()}))
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return lambda: os.close(fd)


def _empty_dir(world: Path, c: Path) -> None:
    (c / "empty").mkdir()


BAD_JSONL = '{"text": "one"}\n{"text": broken\n'
_S = ("--train.steps=2",)              # a harmless override, for cases whose point is elsewhere

CASES: list[Case] = [
    # ------------------------------------------------------------------------------- config fields (overrides)
    Case("moe-top_k-above-experts", T("--moe.top_k=9"), ("moe.top_k=9", "moe.num_experts=4")),
    Case("moe-top_k-zero", T("--moe.top_k=0"), ("moe.top_k=0",)),
    Case("moe-num_experts-zero", T("--moe.num_experts=0"), ("moe.num_experts=0",)),
    Case("moe-expert_hidden-zero", T("--moe.expert_hidden=0"), ("moe.expert_hidden=0",)),
    Case("moe-capacity_factor-zero", T("--moe.capacity_factor=0"), ("moe.capacity_factor",)),
    Case("moe-capacity_factor-negative", T("--moe.capacity_factor=-1.5"), ("moe.capacity_factor",)),
    Case("moe-capacity_factor-text", T("--moe.capacity_factor=big"), ("moe.capacity_factor",)),
    Case("moe-min_capacity-negative", T("--moe.min_capacity=-1"), ("moe.min_capacity",)),
    Case("moe-num_groups-not-dividing", T("--moe.num_groups=3"), ("moe.num_groups",)),
    Case("moe-topk_groups-above-groups", T("--moe.topk_groups=2"), ("moe.topk_groups",)),
    Case("moe-jitter_eps-above-one", T("--moe.jitter_eps=1.5"), ("moe.jitter_eps",)),
    Case("moe-aux_loss_coef-negative", T("--moe.aux_loss_coef=-1"), ("moe.aux_loss_coef",)),
    Case("moe-z_loss_coef-negative", T("--moe.z_loss_coef=-0.1"), ("moe.z_loss_coef",)),
    Case("moe-route_scale-zero", T("--moe.route_scale=0"), ("moe.route_scale",)),
    Case("moe-score_func-unknown", T("--moe.score_func=tanh"), ("moe.score_func",)),
    Case("moe-activation-unknown", T("--moe.activation=relu"), ("moe.activation",)),
    Case("moe-drop_policy-unknown", T("--moe.drop_policy=random"), ("moe.drop_policy",)),
    Case("moe-balance_over-unknown", T("--moe.balance_over=batch"), ("moe.balance_over",)),
    Case("moe-backend-unknown", T("--moe.backend=cuda"), ("moe.backend",)),
    Case("moe-backend-unavailable", T("--moe.backend=grouped_mm", "--moe.expert_hidden=18"),
         ("moe.backend='grouped_mm'", "moe.expert_hidden=18")),
    Case("moe-pad_to_capacity-dropless", T("--moe.pad_to_capacity=true"), ("moe.pad_to_capacity",)),
    Case("moe-num_shared_experts-negative", T("--moe.num_shared_experts=-1"), ("moe.num_shared_experts",)),
    Case("moe-shared_expert_hidden-zero", T("--moe.shared_expert_hidden=0"), ("moe.shared_expert_hidden",)),
    Case("moe-renormalize-not-bool", T("--moe.renormalize=maybe"), ("moe.renormalize",)),
    Case("model-dim-zero", T("--model.dim=0"), ("model.dim=0",)),
    Case("model-dim-text", T("--model.dim=abc"), ("model.dim='abc'",)),
    Case("model-dim-fraction", T("--model.dim=1.5"), ("model.dim=1.5",)),
    Case("model-dim-bool", T("--model.dim=true"), ("model.dim=True",)),
    Case("model-n_layers-zero", T("--model.n_layers=0"), ("model.n_layers",)),
    Case("model-n_heads-not-dividing", T("--model.n_heads=3"), ("model.n_heads=3",)),
    Case("model-n_kv_heads-not-dividing", T("--model.n_kv_heads=3"), ("model.n_kv_heads=3",)),
    Case("model-head_dim-one", T("--model.head_dim=1"), ("model.head_dim=1",)),
    Case("model-head-size-odd", T("--model.dim=30"), ("model.head_dim", "model.dim")),
    Case("model-vocab_size-zero", T("--model.vocab_size=0"), ("model.vocab_size",)),
    Case("model-max_seq_len-zero", T("--model.max_seq_len=0"), ("model.max_seq_len",)),
    Case("model-first_dense-negative", T("--model.first_dense=-1"), ("model.first_dense",)),
    Case("model-qk_norm-unknown", T("--model.qk_norm=both"), ("model.qk_norm",)),
    Case("train-steps-zero", T("--train.steps=0"), ("train.steps=0",)),
    Case("train-steps-null", T("--train.steps=null"), ("train.steps",)),
    Case("train-batch_size-zero", T("--train.batch_size=0"), ("train.batch_size",)),
    Case("train-seq_len-above-max", T("--train.seq_len=999"), ("train.seq_len=999", "model.max_seq_len")),
    Case("train-lr-negative", T("--train.lr=-1"), ("train.lr",)),
    Case("train-lr-nan", T("--train.lr=nan"), ("train.lr",)),
    Case("train-lr-inf", T("--train.lr=inf"), ("train.lr",)),
    Case("train-min_lr-above-lr", T("--train.min_lr=1"), ("train.min_lr",)),
    Case("train-warmup-negative", T("--train.warmup_steps=-1"), ("train.warmup_steps",)),
    Case("train-grad_clip-negative", T("--train.grad_clip=-1"), ("train.grad_clip",)),
    Case("train-seed-negative", T("--train.seed=-1"), ("train.seed=-1",)),
    Case("train-seed-past-2**64", T("--train.seed=18446744073709551616"), ("train.seed=18446744073709551616",)),
    Case("train-dtype-unknown", T("--train.dtype=float16"), ("train.dtype",)),
    Case("train-zero_stage-three", T("--train.zero_stage=3"), ("train.zero_stage=3",)),
    Case("train-eval_every-negative", T("--train.eval_every=-1"), ("train.eval_every",)),
    Case("train-eval_batches-zero", T("--train.eval_batches=0"), ("train.eval_batches",)),
    Case("train-grad_accum_steps-zero", T("--train.grad_accum_steps=0"), ("train.grad_accum_steps",)),
    Case("train-recompute-unknown", T("--train.recompute=everything"), ("train.recompute",)),
    Case("train-activation_checkpointing-replaced", T("--train.activation_checkpointing=true"),
         ("train.activation_checkpointing", "train.recompute")),
    Case("train-shard_optimizer-with-deepspeed", T("--train.engine=deepspeed", "--train.shard_optimizer=states"),
         ("train.shard_optimizer", "train.engine")),
    Case("train-shard_optimizer-unknown", T("--train.shard_optimizer=all"), ("train.shard_optimizer",)),
    Case("train-deepspeed_config-without-engine", T("--train.deepspeed_config=ds.json"), ("train.deepspeed_config",)),
    Case("train-on_nonfinite-unknown", T("--train.on_nonfinite=ignore"), ("train.on_nonfinite",)),
    Case("train-engine-unknown", T("--train.engine=megatron"), ("train.engine",)),
    Case("train-out_dir-empty", T("--train.out_dir="), ("train.out_dir",)),
    Case("train-out_dir-is-a-file", T("--train.out_dir={c}/afile"), ("train.out_dir", "afile"), files={"afile": "x"}),
    Case("train-out_dir-under-a-file", T("--train.out_dir={c}/afile/sub"), ("train.out_dir", "afile"),
         files={"afile": "x"}),
    Case("checkpoint-dir-under-a-file", T("--checkpoint.dir={c}/afile/ck"), ("checkpoint.dir", "afile"),
         files={"afile": "x"}),
    Case("checkpoint-every-negative", T("--checkpoint.every=-1"), ("checkpoint.every",)),
    Case("checkpoint-keep-zero", T("--checkpoint.keep=0"), ("checkpoint.keep",)),
    Case("checkpoint-resume-unknown", T("--checkpoint.resume=sometimes"), ("checkpoint.resume",)),
    Case("checkpoint-fallback-not-bool", T("--checkpoint.fallback=perhaps"), ("checkpoint.fallback",)),
    Case("data-val_fraction-one", T("--data.val_fraction=1"), ("data.val_fraction",)),
    Case("data-val_fraction-negative", T("--data.val_fraction=-0.1"), ("data.val_fraction",)),
    Case("data-path-empty", T("--data.path="), ("data.path",)),
    Case("parallel-timeout_s-zero", T("--parallel.timeout_s=0"), ("parallel.timeout_s",)),
    Case("parallel-stall_warn_s-zero", T("--parallel.stall_warn_s=0"), ("parallel.stall_warn_s",)),
    Case("parallel-tp-zero", T("--parallel.tp=0"), ("parallel.tp",)),
    Case("parallel-ep-not-dividing-world", T("--parallel.ep=3"), ("parallel.ep",)),
    Case("parallel-world_size-mismatch", T("--parallel.world_size=4"), ("parallel.world_size=4",)),
    Case("memory-dim-too-large", T("--model.dim=10000000"), ("memory error", "model.dim=10000000")),
    Case("memory-experts-too-large", T("--moe.num_experts=4096", "--moe.expert_hidden=1000000"),
         ("memory error", "moe.num_experts=4096", "moe.expert_hidden=1000000")),
    # --------------------------------------------------------------------------------- overrides, arguments
    Case("override-unknown-field", T("--moe.topk=1"), ("'topk'", "top_k")),
    Case("override-unknown-section", T("--mo.top_k=1"), ("'mo'", "moe")),
    Case("override-without-dot", T("--moe=1"), ("'moe'", "section.field")),
    Case("override-with-two-dots", T("--a.b.c=1"), ("a.b.c",)),
    Case("override-without-dashes", T("moe.top_k=1"), ("argument error", "moe.top_k=1")),
    Case("override-without-value", T("--moe.top_k"), ("argument error", "--moe.top_k")),
    Case("override-on-prepare-data", ("prepare-data", "--out", "{c}/o.bin", "--moe.top_k=1"),
         ("argument error", "--moe.top_k=1")),
    Case("train-without-config", ("train",), ("argument error", "config")),
    Case("train-config-missing", ("train", "{c}/nope.yaml"), ("nope.yaml", "configs/")),
    Case("train-config-is-a-folder", ("train", "{c}"), ("config file",)),
    Case("unknown-command", ("trian", "{good}"), ("argument error", "trian")),
    Case("params-flag-typo", ("params", "{good}", "--jsn"), ("argument error", "--jsn")),
    Case("plan-without-world", ("plan", "{good}"), ("--world",)),
    Case("plan-world-text", ("plan", "{good}", "--world", "two"), ("argument error", "--world")),
    Case("plan-world-zero", ("plan", "{good}", "--world", "0"), ("layout error", "world size 0")),
    Case("plan-layout-does-not-fit", ("plan", "{good}", "--world", "2", "--parallel.ep=4"), ("parallel.ep",)),
    # -------------------------------------------------------------------------------------------------- YAML
    Case("yaml-duplicate-section", ("train", "{c}/bad.yaml"),
         ("bad.yaml:3", "'model'", "lines 1 and 3"), files={"bad.yaml": "model: {dim: 32}\ntrain: {}\nmodel: {}\n"}),
    Case("yaml-duplicate-field", ("train", "{c}/bad.yaml"), ("bad.yaml:3", "'steps'", "lines 2 and 3"),
         files={"bad.yaml": "train:\n  steps: 3\n  steps: 4\n"}),
    Case("yaml-null-out_dir", ("train", "{c}/bad.yaml"), ("bad.yaml:2", "train.out_dir", "null"),
         files={"bad.yaml": "train:\n  out_dir: null\n"}),
    Case("yaml-empty-data-path", ("train", "{c}/bad.yaml"), ("bad.yaml:2", "data.path", "null"),
         files={"bad.yaml": "data:\n  path:\n"}),
    Case("yaml-python-object-tag", ("train", "{c}/bad.yaml"), ("bad.yaml:2:", "python/object/apply:os.system"),
         files={"bad.yaml": "train:\n  out_dir: !!python/object/apply:os.system ['touch pwned']\n"}),
    Case("yaml-python-name-tag", ("params", "{c}/bad.yaml"), ("bad.yaml:1:", "python/name:os.system"),
         files={"bad.yaml": "model: !!python/name:os.system ''\n"}),
    Case("yaml-bad-indentation", ("train", "{c}/bad.yaml"), ("bad.yaml:3:",),
         files={"bad.yaml": "train:\n  steps: 3\n   lr: 0.1\n"}),
    Case("yaml-tab", ("train", "{c}/bad.yaml"), ("bad.yaml:2:",), files={"bad.yaml": "train:\n\tsteps: 3\n"}),
    Case("yaml-unclosed-bracket", ("train", "{c}/bad.yaml"), ("bad.yaml:3:",),
         files={"bad.yaml": "train:\n  steps: [1, 2\n"}),
    Case("yaml-unclosed-quote", ("train", "{c}/bad.yaml"), ("bad.yaml:",),
         files={"bad.yaml": "train:\n  out_dir: \"runs/x\n"}),
    Case("yaml-two-documents", ("train", "{c}/bad.yaml"), ("bad.yaml:",),
         files={"bad.yaml": "train: {steps: 1}\n---\ntrain: {steps: 2}\n"}),
    Case("yaml-not-utf8", ("train", "{c}/bad.yaml"), ("bad.yaml", "not UTF-8", "offset 21", "line 2"),
         files={"bad.yaml": b"train:\n  out_dir: caf\xe9\n"}),
    Case("yaml-top-level-list", ("train", "{c}/bad.yaml"), ("mapping of sections", "list"),
         files={"bad.yaml": "- model\n- train\n"}),
    Case("yaml-top-level-text", ("train", "{c}/bad.yaml"), ("mapping of sections",), files={"bad.yaml": "hello\n"}),
    Case("yaml-section-is-a-number", ("train", "{c}/bad.yaml"), ("section 'model'",), files={"bad.yaml": "model: 5\n"}),
    Case("yaml-unknown-section", ("train", "{c}/bad.yaml"), ("'trian'", "train"),
         files={"bad.yaml": "trian: {steps: 2}\n"}),
    Case("yaml-unknown-field", ("train", "{c}/bad.yaml"), ("'stepz'", "steps"), files={"bad.yaml": "train:\n  stepz: 2\n"}),
    Case("yaml-list-in-text-field", ("train", "{c}/bad.yaml"), ("bad.yaml:2", "train.out_dir"),
         files={"bad.yaml": "train:\n  out_dir: [a, b]\n"}),
    Case("yaml-number-as-field-name", ("train", "{c}/bad.yaml"), ("field 1", "'train'"),
         files={"bad.yaml": "train:\n  1: 2\n"}),
    Case("yaml-replaced-field", ("train", "{c}/bad.yaml"), ("train.activation_checkpointing", "train.recompute"),
         files={"bad.yaml": "train:\n  activation_checkpointing: true\n"}),
    Case("yaml-bad-choice", ("train", "{c}/bad.yaml"), ("bad.yaml:2", "train.dtype"),
         files={"bad.yaml": "train:\n  dtype: fp8\n"}),
    Case("yaml-seed-out-of-range", ("train", "{c}/bad.yaml"), ("train.seed=-5",), files={"bad.yaml": "train:\n  seed: -5\n"}),
    # -------------------------------------------------------------------------------------------- data files
    Case("data-missing", T("--data.path={c}/nope.bin"), ("nope.bin",)),
    Case("data-is-a-folder", T("--data.path={c}"), ("data.path", "is a folder, not a token file")),
    Case("prepare-source-missing", ("prepare-data", "{c}/nope.txt", "--out", "{c}/o.bin"), ("nope.txt",)),
    Case("prepare-jsonl-bad-json", ("prepare-data", "{c}/docs.jsonl", "--out", "{c}/o.bin"), ("docs.jsonl:2",),
         files={"docs.jsonl": BAD_JSONL}),
    Case("prepare-jsonl-no-text", ("prepare-data", "{c}/docs.jsonl", "--out", "{c}/o.bin"), ("docs.jsonl:1", "text"),
         files={"docs.jsonl": '{"body": "x"}\n'}),
    Case("prepare-jsonl-not-utf8", ("prepare-data", "{c}/docs.jsonl", "--out", "{c}/o.bin"),
         ("docs.jsonl:2", "UTF-8"), files={"docs.jsonl": b'{"text": "a"}\n{"text": "b\xff"}\n'}),
    Case("prepare-no-text", ("prepare-data", "{c}/empty", "--out", "{c}/o.bin"), ("no text",), setup=_empty_dir),
    Case("prepare-max-bytes-text", ("prepare-data", "--out", "{c}/o.bin", "--max-bytes", "lots"),
         ("argument error", "--max-bytes")),
    Case("bench-layer-experts-zero", ("bench", "layer", "--quick", "--no-deepspeed", "--experts", "0", "--out",
                                      "{c}/b"), ("argument error", "--experts")),
    Case("bench-layer-top_k-above-experts", ("bench", "layer", "--quick", "--no-deepspeed", "--experts", "4",
                                             "--top-k", "9", "--out", "{c}/b"), ("argument error", "--top-k")),
    Case("bench-layer-replot-missing", ("bench", "layer", "--replot", "{c}/nope.json"), ("nope.json",)),
    Case("tune-capacity-factors-text", ("tune-capacity", str(REPO / "configs" / "tiny-cpu.yaml"), "--quick", "--factors", "x", "--out", "{c}/t"),
         ("argument error", "--factors")),
    # the prepared folder's own files as the target of a refused command: nothing of them may change
    Case("prepare-over-existing-tokens-missing-source", ("prepare-data", "{c}/nope.txt", "--out", "{w}/data/tok.bin"),
         ("nope.txt",)),
    Case("prepare-over-existing-tokens-bad-jsonl", ("prepare-data", "{c}/docs.jsonl", "--out", "{w}/data/tok.bin"),
         ("docs.jsonl:2",), files={"docs.jsonl": BAD_JSONL}),
    Case("train-bad-config-into-a-finished-run", ("train", "{good}", "--train.out_dir={w}/runs/prev", "--moe.top_k=9",
                                                  "--quiet"), ("moe.top_k=9",)),
    Case("resume-a-finished-run-with-another-model", ("train", "{good}", "--train.out_dir={w}/runs/prev",
                                                      "--model.dim=48", "--train.steps=4", "--quiet"),
         ("model.dim", "48")),
    # ----------------------------------------------------------------------------------------- checkpoints
    Case("ckpt-does-not-fit-the-model", T("--model.dim=48"), ("model.dim", "48"), setup=_copy_run),
    Case("ckpt-truncated-shard", T(), ("step_000002", "corrupt"), setup=_truncate_shard),
    Case("ckpt-format-unknown", T(), ("format", "99"), setup=_format_99),
    # ------------------------------------------------------------------------------- the launcher's environment
    Case("env-rank-not-a-number", T(), ("launch error", "RANK='x'"), env={"RANK": "x", "WORLD_SIZE": "2",
                                                                          "LOCAL_RANK": "0"}),
    Case("env-world-size-missing", T(), ("launch error", "WORLD_SIZE"), env={"RANK": "0"}),
    Case("env-rank-above-world", T(), ("launch error", "RANK=3"), env={"RANK": "3", "WORLD_SIZE": "2",
                                                                       "LOCAL_RANK": "0"}),
    Case("env-master-port-range", T(), ("launch error", "MASTER_PORT=99999"),
         env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"}),
    Case("env-slurm-nodelist", T(), ("launch error", "SLURM_JOB_NODELIST"),
         env={"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "node[1-",
              "SLURM_JOB_ID": "7"}),
    Case("env-world-does-not-fit-layout", T("--parallel.ep=2"), ("layout error", "parallel.ep"),
         env={"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}),
    # ------------------------------------------------------------------------------------ the launch scripts
    Case("torchrun-nproc-text", ("torchrun.sh", "{good}"), ("NPROC_PER_NODE='two'",), env={"NPROC_PER_NODE": "two"},
         script=True),
    Case("torchrun-nproc-zero", ("torchrun.sh", "{good}"), ("NPROC_PER_NODE=0",), env={"NPROC_PER_NODE": "0"},
         script=True),
    Case("torchrun-nnodes-text", ("torchrun.sh", "{good}"), ("NNODES='many'",), env={"NNODES": "many"}, script=True),
    Case("torchrun-nnodes-zero", ("torchrun.sh", "{good}"), ("NNODES=0",), env={"NNODES": "0"}, script=True),
    Case("torchrun-port-range", ("torchrun.sh", "{good}"), ("MASTER_PORT=70000",), env={"MASTER_PORT": "70000"},
         script=True),
    Case("torchrun-port-text", ("torchrun.sh", "{good}"), ("MASTER_PORT='http'",), env={"MASTER_PORT": "http"},
         script=True),
    Case("torchrun-max-restarts-negative", ("torchrun.sh", "{good}"), ("MAX_RESTARTS='-1'",),
         env={"MAX_RESTARTS": "-1"}, script=True),
    Case("torchrun-ep-text", ("torchrun.sh", "{good}"), ("EP='x'",), env={"EP": "x"}, script=True),
    Case("torchrun-tp-zero", ("torchrun.sh", "{good}"), ("TP=0",), env={"TP": "0"}, script=True),
    Case("torchrun-pp-text", ("torchrun.sh", "{good}"), ("PP='two'", "parallel.pp"), env={"PP": "two"}, script=True),
    Case("slurm-pp-zero", ("slurm.sbatch", "{good}"), ("PP=0", "parallel.pp"), env={"PP": "0"}, script=True),
    Case("torchrun-rdzv-timeout-text", ("torchrun.sh", "{good}"), ("RDZV_TIMEOUT='soon'",),
         env={"RDZV_TIMEOUT": "soon"}, script=True),
    Case("torchrun-omp-threads-text", ("torchrun.sh", "{good}"), ("OMP_NUM_THREADS='all'",),
         env={"OMP_NUM_THREADS": "all"}, script=True),
    Case("torchrun-config-missing", ("torchrun.sh",), ("nope.yaml",), env={"CONFIG": "nope.yaml"}, script=True),
    Case("torchrun-nodes-without-master", ("torchrun.sh", "{good}"), ("NNODES=2", "MASTER_ADDR"),
         env={"NNODES": "2", "MASTER_PORT": "29400"}, script=True),
    Case("torchrun-layout-does-not-fit", ("torchrun.sh", "{good}"), ("layout error", "parallel.ep"),
         env={"NPROC_PER_NODE": "2", "EP": "4"}, script=True),
    Case("mpirun-nproc-text", ("mpirun.sh", "{good}"), ("NPROC_PER_NODE='two'",), env={"NPROC_PER_NODE": "two"},
         script=True),
    Case("deepspeed-num-gpus-text", ("deepspeed.sh",), ("NUM_GPUS='two'",), env={"NUM_GPUS": "two", "CONFIG": "{good}"},
         script=True),
    Case("deepspeed-node-rank-range", ("deepspeed.sh",), ("NODE_RANK=5",),
         env={"NNODES": "2", "NODE_RANK": "5", "CONFIG": "{good}"}, script=True),
    Case("deepspeed-port-zero", ("deepspeed.sh",), ("MASTER_PORT=0",), env={"MASTER_PORT": "0", "CONFIG": "{good}"},
         script=True),
    Case("deepspeed-hostfile-missing", ("deepspeed.sh",), ("HOSTFILE", "nohosts"),
         env={"NNODES": "2", "HOSTFILE": "{c}/nohosts", "CONFIG": "{good}"}, script=True),
    Case("deepspeed-config-missing", ("deepspeed.sh",), ("nope.yaml",), env={"CONFIG": "{c}/nope.yaml"}, script=True),
    Case("slurm-tp-text", ("slurm.sbatch", "{good}"), ("TP='two'",), env={"TP": "two"}, script=True),
    Case("slurm-ntasks-text", ("slurm.sbatch", "{good}"), ("SLURM_NTASKS='x'",), env={"SLURM_NTASKS": "x"}, script=True),
    Case("slurm-port-range", ("slurm.sbatch", "{good}"), ("MASTER_PORT=65536",), env={"MASTER_PORT": "65536"},
         script=True),
    Case("slurm-config-missing", ("slurm.sbatch", "{c}/nope.yaml"), ("nope.yaml",), script=True),
    # -------------------------------------------------------------- the pipeline (the prepared model: 2 layers)
    Case("pp-not-dividing-world", T("--parallel.pp=2"), ("layout error", "world size 3", "parallel.tp·parallel.pp=1·2",
                                                         "launch a multiple of 2 ranks"),
         env={"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}),
    Case("pp-not-dividing-world-plan", ("plan", "{good}", "--world", "3", "--parallel.pp=2"),
         ("layout error", "world size 3", "parallel.tp·parallel.pp=1·2")),
    Case("pp-zero", T("--parallel.pp=0"), ("parallel.pp=0",)),
    Case("pp-more-stages-than-layers", T("--parallel.pp=4"), ("parallel.pp=4", "model.n_layers=2", "lower pp")),
    Case("pp-layers-not-summing", T("--parallel.pp=2", "--parallel.pp_layers=[1,2]"),
         ("parallel.pp_layers=[1, 2]", "sums to 3", "model.n_layers=2")),
    Case("pp-layers-wrong-length", T("--parallel.pp=2", "--parallel.pp_layers=[2]"),
         ("parallel.pp_layers=[2]", "1 entries", "2 virtual stages")),
    Case("pp-layers-not-numbers", T("--parallel.pp=2", "--parallel.pp_layers=[1,x]"), ("parallel.pp_layers[1]='x'",)),
    Case("pp-layers-middle-stage-empty", T("--parallel.pp=3", "--model.n_layers=3", "--parallel.pp_layers=[2,0,1]"),
         ("parallel.pp_layers=[2, 0, 1]", "virtual stage 1 holds no layer")),
    Case("pp-with-engine-deepspeed", T("--parallel.pp=2", "--train.engine=deepspeed"),
         ("train.engine=deepspeed", "parallel.pp=2", "PipelineModule", "train.engine=native")),
    Case("pp-interleaved-without-virtual", T("--parallel.pp=2", "--parallel.pp_schedule=interleaved"),
         ("parallel.pp_schedule=interleaved", "pp_virtual=1", "set pp_virtual=2")),
    Case("pp-virtual-without-interleaved", T("--parallel.pp=2", "--model.n_layers=4", "--parallel.pp_virtual=2"),
         ("parallel.pp_virtual=2", "parallel.pp_schedule=interleaved")),
    Case("pp-interleaved-grad-accum-not-multiple", T("--parallel.pp=2", "--model.n_layers=4", "--parallel.pp_virtual=2",
                                                     "--parallel.pp_schedule=interleaved", "--train.grad_accum_steps=3"),
         ("train.grad_accum_steps=3", "multiple of parallel.pp=2", "grad_accum_steps=4")),
    Case("pp-with-zero2", T("--parallel.pp=2", "--train.shard_optimizer=states+grads"),
         ("train.shard_optimizer=states+grads", "parallel.pp=2", "train.shard_optimizer=states")),
    Case("pp-schedule-unknown", T("--parallel.pp_schedule=zerobubble"), ("parallel.pp_schedule",)),
    # ---------------------------------------------------------------- work other parts of the code base own
    Case("peer-data-file-too-small", T("--data.path={c}/small.bin"), ("small.bin",),
         files={"small.bin": b"abc", "small.json": json.dumps({"tokens": 3, "dtype": "uint8", "vocab_size": 256,
                                                                "sources": ["x"], "documents": 1})}),
    Case("peer-data-val-split-too-small", T("--data.val_fraction=0.0001"), ("val", "data.val_fraction")),
    Case("peer-data-vocab-larger-than-model", T("--model.vocab_size=100"), ("model.vocab_size",)),
    Case("peer-prepare-out-is-a-folder", ("prepare-data", "{c}/a.txt", "--out", "{c}"), ("--out",),
         files={"a.txt": "hello world\n"}),
    Case("peer-prepare-out-json-collision", ("prepare-data", "{c}/a.txt", "--out", "{c}/x.json"), ("x.json",),
         files={"a.txt": "hello world\n"}),
    Case("peer-prepare-out-overwrites-source", ("prepare-data", "{c}/a.txt", "--out", "{c}/a.txt"), ("a.txt",),
         files={"a.txt": "hello world\n"}),
    Case("peer-prepare-max-bytes-zero", ("prepare-data", "{c}/a.txt", "--out", "{c}/o.bin", "--max-bytes", "0"),
         ("--max-bytes",), files={"a.txt": "hello world\n"}),
    Case("peer-prepare-max-bytes-negative", ("prepare-data", "{c}/a.txt", "--out", "{c}/o.bin", "--max-bytes", "-5"),
         ("--max-bytes",), files={"a.txt": "hello world\n"}),
    Case("peer-prepare-tokenizer-missing", ("prepare-data", "{c}/a.txt", "--out", "{c}/o.bin", "--tokenizer",
                                            "{c}/nope.json"), ("nope.json",), files={"a.txt": "hello world\n"}),
    Case("peer-prepare-tokenizer-and-training", ("prepare-data", "{c}/a.txt", "--out", "{c}/o.bin", "--tokenizer",
                                                 "{c}/t.json", "--train-tokenizer", "300"), ("--tokenizer",),
         files={"a.txt": "hello world\n"}),
    # Refused, but the run folder is created first (the run lock) and left behind, empty.
    Case("peer-ckpt-resume-must-without-one", T("--checkpoint.resume=must"), ("checkpoint.resume",)),
    Case("peer-ckpt-corrupt-meta", T(), ("meta.json",), setup=_corrupt_meta),
    Case("peer-ckpt-latest-names-nothing", T(), ("latest", "step_000099"), setup=_latest_to_nowhere),
    Case("peer-run-folder-locked", T(), (".moe-dist.lock", "pid 1"), setup=_locked),
    Case("peer-plan-fit-text", ("plan", "{good}", "--world", "2", "--fit", "lots"), ("--fit", "lots")),
    Case("peer-plan-fit-zero", ("plan", "{good}", "--world", "2", "--fit", "0GB"), ("--fit",)),
    Case("peer-plan-fit-bytes-too-small", ("plan", "{good}", "--world", "2", "--fit", "10"), ("--fit",)),
    Case("peer-import-hf-missing-folder", ("import-hf", "{c}/nope", "--out", "{c}/ck"), ("nope",)),
    Case("peer-import-hf-without-config", ("import-hf", "{c}/empty", "--out", "{c}/ck"), ("config.json",),
         setup=_empty_dir),
    Case("peer-import-hf-config-not-json", ("import-hf", "{c}/m", "--out", "{c}/ck"), ("config.json",),
         files={"m/config.json": "{ nope"}),
    Case("peer-upcycle-missing-folder", ("upcycle", "{c}/nope", "--experts", "4", "--top-k", "2", "--out", "{c}/ck"),
         ("nope",)),
    Case("peer-deepspeed-config-not-json", T("--train.engine=deepspeed", "--train.deepspeed_config={c}/ds.json"),
         ("train.deepspeed_config", "ds.json"), files={"ds.json": "{ not json"}),
    Case("peer-export-hf-missing-checkpoint", ("export-hf", "{c}/nope", "--out", "{c}/hf"), ("nope",)),
]


# ------------------------------------------------------------------------------------------------ machinery

def _tree_hash(*roots: Path) -> dict[str, str]:
    """Every file under the roots (path relative to its root) -> sha256 of its bytes; folders as entries too."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            key = f"{root.name}/{p.relative_to(root)}"
            out[key] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The prepared folder: a good config, a token file, and a finished 2-step run with its checkpoint."""
    import torch

    from moe_dist.train.data import prepare
    w = tmp_path_factory.mktemp("world")
    (w / "data").mkdir()
    prepare(None, w / "data" / "tok.bin", max_bytes=40_000)
    (w / "good.yaml").write_text(GOOD_YAML.format(out=w / "runs" / "unused", tok=w / "data" / "tok.bin"))
    saved = {k: os.environ.pop(k) for k in LAUNCHER_VARS if k in os.environ}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["train", str(w / "good.yaml"), f"--train.out_dir={w / 'runs' / 'prev'}", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
        os.environ.update(saved)
    assert (w / "runs" / "prev" / "checkpoints" / "step_000002").is_dir()
    return w


def _fill(text: str, world: Path, c: Path) -> str:
    return text.format(good=world / "good.yaml", c=c, w=world, tok=world / "data" / "tok.bin")


def _run_script(case: Case, world: Path, c: Path) -> tuple[int, str]:
    from launch_helpers import script_env
    script, *args = [_fill(a, world, c) for a in case.argv]
    env = script_env(**{k: _fill(v, world, c) for k, v in case.env.items()})
    r = subprocess.run([str(LAUNCH / script), *args], env=env, cwd=c, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stderr


def _run_cli(case: Case, world: Path, c: Path, capsys, monkeypatch) -> tuple[int, str]:
    for var in LAUNCHER_VARS + ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    for k, v in case.env.items():
        monkeypatch.setenv(k, _fill(v, world, c))
    monkeypatch.setattr(cli, "_QUIET_RANK_WAIT_S", 0.0)
    capsys.readouterr()
    try:
        rc = cli.main([_fill(a, world, c) for a in case.argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: Path, tmp_path: Path, capsys, monkeypatch):
    import torch.distributed as dist
    c = tmp_path / "case"
    c.mkdir()
    for name, content in case.files.items():
        (c / name).parent.mkdir(parents=True, exist_ok=True)
        (c / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    release = case.setup(world, c) if case.setup else None
    before = _tree_hash(world, c)
    try:
        rc, err = (_run_script(case, world, c) if case.script else _run_cli(case, world, c, capsys, monkeypatch))
    finally:
        if release:
            release()
    errors = [line for line in err.splitlines() if line.startswith("moe-dist:") and " error: " in line]
    assert rc == case.code, f"exit {rc}, expected {case.code}\n{err[-3000:]}"
    assert len(errors) == 1, f"{len(errors)} error lines:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    for name in case.names:
        assert _fill(name, world, c) in errors[0], f"{name!r} not named in: {errors[0]}"
    assert _tree_hash(world, c) == before, "a refused command changed or created files"
    assert not dist.is_initialized()


def test_pipeline_bubble_warning_names_the_field_the_value_and_the_fix():
    """Fewer micro-batches than stages runs (no error) but is reported, with the bubble's share of the step."""
    from moe_dist.config import Config
    from moe_dist.parallel.layout import check_layout, layout_warnings
    cfg = Config()
    cfg.parallel.pp, cfg.train.grad_accum_steps = 2, 1
    assert layout_warnings(cfg, check_layout(cfg, 2)) == [
        "train.grad_accum_steps=1 is below parallel.pp=2: runs, but the pipeline bubble is (p−1)/(m+p−1) = 50% of "
        "the step; raise train.grad_accum_steps (to 8: 11%)"]


def test_the_table_is_large_and_its_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 80
    first_peer = next(n for n, i in enumerate(ids) if i.startswith("peer-"))
    assert all(i.startswith("peer-") for i in ids[first_peer:])      # the peers' cases come last
