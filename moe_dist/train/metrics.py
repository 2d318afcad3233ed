"""Training telemetry on rank 0: one JSON line per step, TensorBoard scalars, an optional Weights & Biases run, and
an expert-load heatmap.

Legend: L MoE layers, E experts, S logged steps.

Every figure a step produces goes to `metrics.jsonl` (scalars plus the per-layer, per-expert kept-token counts
summed over all ranks), so a run can be re-plotted without re-running it. On resume the file keeps the lines of
the steps before the resume point and drops the rest, so each step appears exactly once however often the job
restarted. The heatmap is drawn at `close()` from the counts kept in memory since this process started, plus
those read back from the file on resume.

With `train.wandb_project` set, the same scalars go to a wandb run (named after the output folder, the config as
its config; WANDB_MODE=offline keeps it on disk, WANDB_DIR chooses where, default the output folder). Each
record carries its training step as the `step` metric, the x-axis of every chart, so that evaluation and memory
records logged at a step the training records already passed still line up. A resumed run continues the same
wandb run (its id is kept in `wandb_run_id` in the output folder); wandb cannot drop history, so the steps redone
after the checkpoint appear there twice, unlike in metrics.jsonl.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from moe_dist.config import ConfigError

HEATMAP_NAME = "expert_load.png"
CURVE_NAME = "loss.png"
WANDB_ID_NAME = "wandb_run_id"
WANDB_INSTALL = "pip install moe_dist[wandb]"


def check_wandb(project: Optional[str]) -> None:
    """`train.wandb_project` set needs the wandb package: a ConfigError now, before any model is built, rather than a
    silent absence of the run (cheap: finds the package without importing it)."""
    if project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"train.wandb_project={project!r} but the wandb package is not installed; "
                          f"{WANDB_INSTALL}, or leave train.wandb_project unset")


def _finite_or_none(v: float) -> Optional[float]:
    # JSON has no NaN/Inf; a skipped non-finite step records null rather than an unparseable token.
    return v if math.isfinite(v) else None


class MetricsLogger:
    """Writes the step records of one run; every method is a no-op when `enabled` is False (non-zero ranks).

    `resume_step`: the step a resumed run starts at; earlier lines of an existing `metrics.jsonl` are kept, later
    ones (steps the interrupted run did after its last checkpoint) are dropped because they are about to be redone.
    """

    def __init__(self, out_dir: str | Path, enabled: bool, moe_layer_ids: Sequence[int] = (),
                 tensorboard: bool = True, resume_step: Optional[int] = None, wandb_project: Optional[str] = None,
                 config: Any = None):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.moe_layer_ids = list(moe_layer_ids)
        self.path = self.out_dir / "metrics.jsonl"
        self._load_steps: list[int] = []
        self._load_SLE: list[torch.Tensor] = []
        self._curves: dict[str, list[tuple[int, float]]] = {"train": [], "eval": []}
        self._tb = None
        self._file = None
        self._wandb = None
        self._wandb_kinds: set[str] = set()
        check_wandb(wandb_project)          # every rank alike: the same environment gives the same answer
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._keep_before(resume_step)
            self._file = open(self.path, "a")
        else:
            self._set_aside_earlier_run()
            self._file = open(self.path, "w")
        if tensorboard:
            self._tb = _summary_writer(self.out_dir / "tb", purge_step=resume_step)
        if wandb_project:
            self._wandb = _wandb_run(wandb_project, self.out_dir, config, resumed=resume_step is not None)

    def _set_aside_earlier_run(self) -> None:
        """A fresh run into a folder that holds an earlier run's metrics keeps them as
        metrics.<time of their last write>.jsonl instead of truncating them (their run may be unrecoverable)."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.path.stat().st_mtime))
        target = self.path.with_name(f"metrics.{stamp}.jsonl")
        n = 1
        while target.exists():
            target = self.path.with_name(f"metrics.{stamp}-{n}.jsonl")
            n += 1
        os.replace(self.path, target)

    def _keep_before(self, step: int) -> None:
        """Rewrites metrics.jsonl with the records of steps < `step` (atomically: tmp + replace)."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue              # a line cut short by the crash that forced the resume
            if rec.get("step", step) < step:
                kept.append(line)
                self._remember_loss(rec)
                if rec.get("tokens_per_expert") is not None:
                    self._load_steps.append(rec["step"])
                    self._load_SLE.append(torch.tensor(rec["tokens_per_expert"]))
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.path)

    def log_step(self, step: int, scalars: dict[str, float], tokens_per_expert_LE: Optional[torch.Tensor] = None,
                 kind: str = "train") -> None:
        """One record. `tokens_per_expert_LE` holds kept assignments per layer and expert over all ranks."""
        if not self.enabled:
            return
        rec: dict = {"step": step, "kind": kind}
        rec.update({k: _finite_or_none(float(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                    for k, v in scalars.items()})
        if tokens_per_expert_LE is not None and tokens_per_expert_LE.numel():
            counts = tokens_per_expert_LE.detach().to("cpu", torch.long)
            rec["tokens_per_expert"] = counts.tolist()
            self._load_steps.append(step)
            self._load_SLE.append(counts)
        self._remember_loss(rec)
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()        # a killed run keeps every step it finished
        if self._tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
        if self._wandb is not None:
            self._log_wandb(step, kind, scalars, tokens_per_expert_LE)

    def _log_wandb(self, step: int, kind: str, scalars: dict, tokens_per_expert_LE: Optional[torch.Tensor]) -> None:
        if kind not in self._wandb_kinds:
            self._wandb.define_metric(f"{kind}/*", step_metric="step")
            self._wandb_kinds.add(kind)
        row: dict[str, Any] = {"step": step}
        _flatten_numbers(row, kind, scalars)
        if tokens_per_expert_LE is not None and tokens_per_expert_LE.numel():
            # One line per MoE layer (the full counts are in metrics.jsonl): max/mean of the experts' loads.
            counts_LE = tokens_per_expert_LE.detach().to("cpu", torch.float)
            imbalance_L = counts_LE.amax(-1) / counts_LE.mean(-1).clamp_min(1e-9)
            for i, v in enumerate(imbalance_L.tolist()):
                lid = self.moe_layer_ids[i] if i < len(self.moe_layer_ids) else i
                row[f"{kind}/expert_imbalance/layer{lid}"] = v
        self._wandb.log(row)

    def _remember_loss(self, rec: dict) -> None:
        kind = rec.get("kind", "train")
        value = rec.get("lm_loss", rec.get("loss")) if kind == "train" else rec.get("val_loss")
        if kind in self._curves and value is not None:
            self._curves[kind].append((rec["step"], value))

    def close(self) -> Optional[Path]:
        """Closes the files and draws the loss curve (loss.png) and the expert-load heatmap; returns the
        heatmap's path (None when the model has no MoE layer or nothing was logged)."""
        if not self.enabled:
            return None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._curves["train"]:
            plot_loss_curve(self._curves["train"], self._curves["eval"], self.out_dir / CURVE_NAME)
        if not self._load_SLE:
            return None
        return plot_expert_load(torch.stack(self._load_SLE), self._load_steps, self.moe_layer_ids,
                                self.out_dir / HEATMAP_NAME)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")          # files only: ranks have no display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _summary_writer(log_dir: Path, purge_step: Optional[int]):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:       # tensorboard is optional: pip install tensorboard
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _flatten_numbers(row: dict, prefix: str, values: dict) -> None:
    """Finite numbers of `values` (nested dicts too, e.g. a memory record per component) as prefix/key entries."""
    for k, v in values.items():
        if isinstance(v, dict):
            _flatten_numbers(row, f"{prefix}/{k}", v)
        elif isinstance(v, bool):
            row[f"{prefix}/{k}"] = int(v)
        elif isinstance(v, (int, float)) and math.isfinite(v):
            row[f"{prefix}/{k}"] = v


def _wandb_run(project: str, out_dir: Path, config: Any, resumed: bool):
    """A wandb run named after the output folder; on resume the run this folder logged to before, when known."""
    import wandb
    id_file = out_dir / WANDB_ID_NAME
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    # The run's files beside its metrics unless WANDB_DIR says otherwise; read here, at each run, because wandb
    # reads its environment once per process.
    run_dir = os.environ.get("WANDB_DIR") or str(out_dir)
    try:
        run = wandb.init(project=project, name=out_dir.resolve().name, config=config, id=run_id,
                         resume="allow" if run_id else None,
                         # console="off": the trainer's own stdout/stderr stay untouched (no wrapping).
                         settings=wandb.Settings(console="off"), dir=run_dir)
    except Exception as e:          # wandb raises several types (no API key, no network, bad project name)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"train.wandb_project={project!r}: wandb could not start a run ({first}); log in with "
                          "`wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to keep the run on "
                          "disk") from None
    tmp = id_file.with_name(id_file.name + ".tmp")
    tmp.write_text(run.id + "\n")
    os.replace(tmp, id_file)
    return run


def load_records(path: str | Path, kind: str = "train") -> list[dict]:
    """The records of `kind` in a metrics.jsonl, in file order."""
    out = []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind", "train") == kind:
            out.append(rec)
    return out


def plot_loss_curve(train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]],
                    path: str | Path, title: str = "LM loss") -> Path:
    """Training LM loss per step (raw and a moving average) with validation points."""
    plt = _pyplot()

    steps = [s for s, _ in train]
    loss = torch.tensor([v for _, v in train], dtype=torch.float64)
    w = max(1, min(25, len(loss) // 10))
    smooth = torch.nn.functional.avg_pool1d(loss.view(1, 1, -1), w, stride=1).view(-1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss.numpy(), lw=0.6, alpha=0.4, label="train (per step)")
    ax.plot(steps[w - 1:], smooth.numpy(), lw=1.6, label=f"train ({w}-step mean)")
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", ms=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_expert_load(counts_SLE: torch.Tensor, steps: Sequence[int], layer_ids: Sequence[int],
                     path: str | Path, max_columns: int = 200) -> Path:
    """Heatmap per MoE layer: expert (rows) × step (columns), colour = the expert's share of the layer's
    assignments at that step; a last column per layer gives max/mean imbalance over time as a line.

    Steps are averaged into at most `max_columns` bins so long runs stay readable."""
    plt = _pyplot()

    S, L, E = counts_SLE.shape
    share_SLE = counts_SLE.float() / counts_SLE.float().sum(-1, keepdim=True).clamp_min(1)
    bins = min(S, max_columns)
    edges = torch.linspace(0, S, bins + 1).round().long()
    binned_BLE = torch.stack([share_SLE[a:b].mean(0) for a, b in zip(edges[:-1].tolist(), edges[1:].tolist())])
    step_t = torch.tensor(list(steps), dtype=torch.float)
    bin_steps = [float(step_t[a:b].mean()) for a, b in zip(edges[:-1].tolist(), edges[1:].tolist())]
    imbalance_SL = (counts_SLE.float().amax(-1) / counts_SLE.float().mean(-1).clamp_min(1e-9))

    fig, axes = plt.subplots(L, 2, figsize=(11, 1.0 + 0.22 * E * L + 0.6 * L), squeeze=False,
                             gridspec_kw={"width_ratios": [4, 1]})
    vmax = float(binned_BLE.max()) if binned_BLE.numel() else 1.0
    for i in range(L):
        ax, ax_imb = axes[i]
        im = ax.imshow(binned_BLE[:, i].T.numpy(), aspect="auto", origin="lower", cmap="viridis",
                       vmin=0.0, vmax=vmax, interpolation="nearest",
                       extent=(bin_steps[0] - 0.5, bin_steps[-1] + 0.5, -0.5, E - 0.5))
        name = f"layer {layer_ids[i]}" if i < len(layer_ids) else f"MoE layer {i}"
        ax.set_ylabel(f"{name}\nexpert")
        ax.axhline(-0.5, color="k", lw=0.5)
        fig.colorbar(im, ax=ax, label="share of assignments", pad=0.01)
        ax_imb.plot(list(steps), imbalance_SL[:, i].numpy(), lw=1)
        ax_imb.axhline(1.0, color="grey", lw=0.5, ls="--")
        ax_imb.set_ylabel("max/mean")
        if i == L - 1:
            ax.set_xlabel("step")
            ax_imb.set_xlabel("step")
    axes[0][0].set_title(f"Expert load over training (uniform share = 1/{E} = {1 / E:.1%})")
    axes[0][1].set_title("imbalance")
    return _save(fig, path)
