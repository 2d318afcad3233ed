"""Step time of every parallel layout on N CPU ranks, and the all-to-all rows measured against `moe-dist plan`.

For each layout this runs `moe-dist train` under torchrun twice:
- with the learned router: median step time after warm-up, tokens/s, and the dropless byte ratio
  (rows the dispatch sent / kept assignments whose expert lives on another EP rank; 1.00 means nothing
  padded and nothing sent twice);
- with `moe.force_balanced` (uniform routing, the assumption of `plan`): rows sent per layer per rank,
  measured vs predicted.
Writes layouts_cpu.json and .png under runs/bench/ in the current directory unless `--out` names another
path; the figure committed under benchmarks/results/ was written with `--out benchmarks/results/layouts_cpu`.

    python benchmarks/layouts.py [--config configs/tiny-cpu.yaml] [--nproc 4] [--steps 30] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from moe_dist import config
from moe_dist.bench.report import RUN_DIR
from moe_dist.models.gpt import is_moe_layer
from moe_dist.parallel.layout import check_layout
from moe_dist.plan import alltoall_rows_per_layer

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {"EP=4": (1, 4, 1), "EP=2×EDP=2": (1, 2, 1), "TP=2×EP=2": (2, 2, 1), "ETP=2×EP=2": (1, 2, 2),
           "DP=4 (EP=1)": (1, 1, 1)}


def train(cfg_path: str, nproc: int, steps: int, out_dir: Path, overrides: list[str]) -> list[dict]:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", f"--nproc_per_node={nproc}", "-m", "moe_dist.cli", "train", cfg_path,
           f"--train.steps={steps}", f"--train.out_dir={out_dir}", "--quiet", *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "tiny-cpu.yaml"))
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=str(RUN_DIR / "layouts_cpu"),
                    help="output path without suffix (default %(default)s under the current directory; the "
                         "committed figure uses --out benchmarks/results/layouts_cpu)")
    args = ap.parse_args()
    base = config.load(args.config)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (tp, ep, etp) in LAYOUTS.items():
            layout = [f"--parallel.tp={tp}", f"--parallel.ep={ep}", f"--parallel.etp={etp}"]
            learned = train(args.config, args.nproc, args.steps, Path(tmp) / "a", layout)
            warm = learned[min(5, len(learned) - 1):]
            step_s = statistics.median(r["step_s"] for r in warm)
            sent, leaving = sum(r["a2a_rows_out"] for r in warm), sum(r["a2a_rows_leaving"] for r in warm)
            balanced = train(args.config, args.nproc, 3, Path(tmp) / "b", layout + ["--moe.force_balanced=true"])
            cfg = config.load(args.config, layout + ["--moe.force_balanced=true"])
            dims = check_layout(cfg, args.nproc)
            n_moe = sum(is_moe_layer(cfg.model, i) for i in range(cfg.model.n_layers))
            predicted = alltoall_rows_per_layer(cfg, dims)["sent"]
            measured = balanced[-1]["a2a_rows_out"] / n_moe
            tokens = base.train.batch_size * base.train.seq_len * dims.dp
            rows.append({"layout": name, "tp": tp, "ep": ep, "etp": etp, "dp": dims.dp, "edp": dims.edp,
                         "step_ms": step_s * 1e3, "tokens_per_s": tokens / step_s,
                         "dropless_rows_sent": sent, "rows_leaving": leaving,
                         "dropless_byte_ratio": sent / leaving if leaving else None,
                         "balanced_rows_sent_per_layer_measured": measured,
                         "balanced_rows_sent_per_layer_predicted": predicted,
                         "bytes_per_layer_measured": measured * cfg.model.dim * 4,
                         "bytes_per_layer_predicted": predicted * cfg.model.dim * 4})
            r = rows[-1]
            ratio = f"{r['dropless_byte_ratio']:.2f}" if r["dropless_byte_ratio"] is not None else "n/a (ep=1)"
            print(f"{name:12s} step {r['step_ms']:7.1f} ms  {r['tokens_per_s']:9,.0f} tok/s  "
                  f"rows/layer measured {measured:7.0f} predicted {predicted:7.0f}  dropless ratio {ratio}", flush=True)
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "config": args.config, "ranks": args.nproc, "steps": args.steps,
              "layouts": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"), args)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def plot(rows: list[dict], path: Path, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["layout"] for r in rows]
    a.bar(names, [r["step_ms"] for r in rows], color="tab:blue")
    a.set_ylabel("median step time (ms)")
    a.set_title(f"training step, {Path(args.config).name}, {args.nproc} CPU ranks (gloo)")
    a.tick_params(axis="x", rotation=20)
    x = range(len(rows))
    b.bar([i - 0.2 for i in x], [r["bytes_per_layer_measured"] / 1024 for r in rows], 0.4, label="measured")
    b.bar([i + 0.2 for i in x], [r["bytes_per_layer_predicted"] / 1024 for r in rows], 0.4, label="moe-dist plan")
    b.set_xticks(list(x), names, rotation=20)
    b.set_ylabel("dispatch KiB per MoE layer per rank")
    b.set_title("all-to-all bytes, balanced routing")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
