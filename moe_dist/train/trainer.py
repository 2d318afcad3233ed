"""The training loop, as a class with small methods, over an engine (moe_dist.train.engine: backward,
reduction, clipping, the optimizer and its checkpoints). The parallel layout comes in as a `Topology` (one
process when None): the model holds this rank's shards, the batcher reads this dp rank's windows, and the
engine reduces gradients over the layout's groups before the optimizer step.

One optimizer step = `train.grad_accum_steps` micro-batches (micro-batch i of step s reads the batcher's
window set s·accum + i), gradients summed then reduced once. Every decision that changes control flow
(non-finite loss, SIGTERM) is taken from all-reduced values, so all ranks take it together and none hangs.
"""
from __future__ import annotations

import contextlib
import functools
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from moe_dist.config import Config, TrainConfig
from moe_dist.models.gpt import MoEGPT, ModelOutput
from moe_dist.parallel.comm import all_reduce_, where
from moe_dist.parallel.layout import check_layout, layout_warnings
from moe_dist.parallel.topology import Topology
from moe_dist.parallel.watchdog import watch_training
from moe_dist.train import checkpoint as ckpt
from moe_dist.train import preflight, run_lock
from moe_dist.train.data import Batcher, TokenDataset, check_data
from moe_dist.train.engine import Engine, EngineFactory
from moe_dist.train.metrics import MetricsLogger, check_wandb
from moe_dist.train.adamw import build_optimizer  # noqa: F401  (imported from here by callers)


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(t.steps - t.warmup_steps, 1)
    progress = min((step - t.warmup_steps) / span, 1.0)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def build_engine(cfg: Config, topo: Topology, model: MoEGPT) -> Engine:
    """The engine `train.engine` names, around `model` (already on its device)."""
    if cfg.train.engine == "deepspeed":
        # Imported only when asked for: deepspeed is an optional extra and slow to import.
        from moe_dist.train.deepspeed_engine import DeepSpeedEngine
        return DeepSpeedEngine(cfg, topo, model)
    from moe_dist.train.native_engine import NativeEngine
    return NativeEngine(cfg, topo, model)


@dataclass
class StepResult:
    step: int
    loss: float
    lm_loss: float
    aux_loss: float                          # load-balancing + z loss (what training adds to the LM loss)
    drop_fraction: float
    tokens_per_expert: list[torch.Tensor]   # per MoE layer, [E], summed over every rank
    grad_norm: float
    lr: float
    seconds: float
    a2a_rows_out: int = 0                    # rows this rank sent to other EP ranks (all MoE layers, forward)
    a2a_rows_leaving: int = 0                # its kept assignments whose expert lives on another EP rank
    z_loss: float = 0.0                      # the router z-loss part of aux_loss
    skipped: bool = False                    # non-finite loss with train.on_nonfinite=skip: no update


@dataclass
class History:
    steps: list[StepResult] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)     # (step, validation LM loss)
    skipped_steps: int = 0

    def expert_load(self) -> torch.Tensor:
        """[layers, E] assignments summed over the run (skipped steps count nothing)."""
        kept = [torch.stack(s.tokens_per_expert) for s in self.steps if s.tokens_per_expert]
        return torch.stack(kept).sum(0) if kept else torch.zeros(0, 0, dtype=torch.long)


def default_device() -> torch.device:
    """The GPU the bootstrap selected (nccl sets the local rank's device), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class Trainer:
    """One loop over any engine (moe_dist.train.engine): `train_step`, `fit` (resume, checkpoints, SIGTERM,
    evaluation, metrics), `evaluate`."""
    resumed_from: Optional[Path] = None      # the checkpoint folder `fit` resumed from
    stopped_at: Optional[int] = None         # steps done when SIGTERM stopped the run
    last_checkpoint: Optional[Path] = None
    wall_seconds: float = 0.0

    def __init__(self, cfg: Config, model: Optional[MoEGPT] = None, batcher: Optional[Batcher] = None,
                 topo: Optional[Topology] = None, engine: Optional[EngineFactory] = None):
        """`engine` builds the engine around the model (default: the one train.engine names)."""
        self._init_run(cfg, topo, model, batcher)
        self.model.to(default_device())
        self.engine: Engine = (engine or build_engine)(cfg, self.topo, self.model)
        # The native engine's torch optimizer (None when the optimizer state lives in flat shards).
        self.optimizer = getattr(self.engine, "optimizer", None)

    def _init_run(self, cfg: Config, topo: Optional[Topology], model: Optional[MoEGPT],
                  batcher: Optional[Batcher]) -> None:
        """Everything but the engine: layout check, pre-flight, seeds, model, batcher."""
        self.cfg = cfg
        self.topo = topo = topo or Topology.single()
        check_layout(cfg, topo.dims)
        for warning in layout_warnings(cfg, topo.dims):
            self._say(f"layout warning: {warning}")
        # Paths and data before the model: a wrong folder or a token file too small fails now, not at the
        # first save or the final evaluation.
        # Only rank 0 probes the run locks: another rank's probe could collide with rank 0's own lock.
        preflight.check_outputs(cfg, check_locks=topo.rank == 0)
        check_wandb(cfg.train.wandb_project)
        if batcher is None:
            check_data(cfg)
        # Seeds: weights come from (train.seed, name) whatever the layout (MoEGPT.reset_parameters); the global
        # RNG (router jitter) differs per rank like per micro-batch, and is saved per rank in checkpoints.
        torch.manual_seed(cfg.train.seed + topo.rank)
        self.model = model or MoEGPT(cfg, topo)
        self.batcher = batcher or Batcher(
            TokenDataset(cfg.data.path, cfg.train.seq_len, "train", cfg.data.val_fraction),
            cfg.train.batch_size, cfg.train.seed, rank=topo.dp.rank, world=topo.dp.size)
        self.history = History()
        self.checkpoint_root = Path(cfg.checkpoint.dir or Path(cfg.train.out_dir) / "checkpoints")
        self._stop_requested = False             # set by the SIGTERM handler while `fit` runs
        self._said_no_validation = False

    @property
    def is_logger(self) -> bool:
        return self.topo.rank == 0

    def _say(self, *args, **kwargs) -> None:
        if self.is_logger:
            print(*args, **kwargs, flush=True)

    # ---------------------------------------------------------------------------------------- one step

    def _global_loss_terms(self, outs: list[ModelOutput]) -> tuple[float, float, float]:
        """(LM, load-balancing, z) losses of the global batch, averaged over the micro-batches: LM is replicated
        over tp and averaged over dp; each rank's aux and z losses are its share of its group's loss, so the
        world sum over dp gives the mean. With pipeline parallelism only the last stage has an LM loss (the
        others report zero) and every stage adds its own layers' aux and z losses, so the same world sum gives
        one process's totals. One all-reduce for all micro-batches (the sum is linear)."""
        local = []
        for out in outs:
            z = sum((s.z_loss.detach().float() for s in out.stats), torch.zeros((), device=out.aux_loss.device))
            lm = out.lm_loss.detach().float() if out.lm_loss is not None else torch.zeros_like(z)
            local.append(torch.stack([lm / self.topo.tp.size, out.aux_loss.detach().float() - z, z]))
        v = torch.stack(local).mean(0)
        all_reduce_(v, self.topo.world)
        v = (v / self.topo.dims.dp).tolist()     # host sync: logging and the non-finite decision
        return v[0], v[1], v[2]

    def train_step(self, step: int) -> StepResult:
        t0 = time.perf_counter()
        t = self.cfg.train
        engine = self.engine
        engine.train()
        lr = lr_at(step, t)
        engine.zero_grad()
        device = next(self.model.parameters()).device
        # Every stage reads the step's micro-batches (the first needs the ids, the last the targets).
        micro_batches = [tuple(b.to(device) for b in self.batcher.get_batch(step * t.grad_accum_steps + micro))
                         for micro in range(t.grad_accum_steps)]
        # Mean over micro-batches: the LM loss (a mean over equal-sized micro-batches) and the z-loss (a mean
        # over tokens) equal those of one batch of accum× the size; the load-balancing loss does not (f_i·P_i is
        # computed per micro-batch, as Megatron and DeepSpeed do), nor does capacity dropping (capacity is per
        # micro-batch).
        outs = engine.forward_backward(micro_batches)
        norm = engine.reduce_and_clip(t.grad_clip)
        lm, aux, z = self._global_loss_terms(outs)
        a2a_out = sum(s.a2a_rows_out for o in outs for s in o.stats)
        # Every rank holds the same all-reduced losses and norm, so every rank takes this branch together.
        if not math.isfinite(lm + aux + z + (0.0 if norm is None else norm)):
            return self._nonfinite(step, outs, lm, aux, z, norm, lr, t0)
        after = engine.step(lr)
        if norm is None:
            # The engine computes the norm inside its step; a non-finite one means it did not update.
            norm = after
            if not math.isfinite(norm):
                return self._nonfinite(step, outs, lm, aux, z, norm, lr, t0)
        counts, drop_fraction, leaving = self._expert_counts(outs)
        return StepResult(step=step, loss=lm + aux + z, lm_loss=lm, aux_loss=aux + z, z_loss=z,
                          drop_fraction=drop_fraction, tokens_per_expert=counts, grad_norm=norm, lr=lr,
                          seconds=time.perf_counter() - t0, a2a_rows_out=a2a_out, a2a_rows_leaving=leaving)

    def _expert_counts(self, outs: list[ModelOutput]) -> tuple[list[torch.Tensor], float, int]:
        """Per-expert kept counts over every rank's tokens and micro-batches (the bias rule and the load report
        see the global batch), the drop fraction, and this rank's rows leaving for other EP ranks. The counts
        are a [every MoE layer of the model, 2, E] table placed by global layer index: a stage fills its own
        layers' rows, so the world sum is, for each layer, the sum over the ranks of the stage that runs it."""
        E = self.cfg.moe.num_experts
        device = next(self.model.parameters()).device
        kept_dropped = torch.zeros(len(self.model.all_moe_layer_ids), 2, E, dtype=torch.long, device=device)
        for row, s in self._stats_by_row(outs):
            kept_dropped[row, 0] += s.tokens_per_expert
            kept_dropped[row, 1] += s.dropped
        leaving = self._rows_leaving(kept_dropped[:, 0])
        all_reduce_(kept_dropped, self.topo.world)
        counts = list(kept_dropped[:, 0].cpu())
        self.model.update_expert_bias(list(kept_dropped[:, 0]))
        dropped = int(kept_dropped[:, 1].sum())
        routed = dropped + int(kept_dropped[:, 0].sum())
        return counts, dropped / routed if routed else 0.0, leaving

    def _nonfinite(self, step, outs, lm, aux, z, norm, lr, t0) -> StepResult:
        """Raise naming the first MoE layer whose router produced NaN/Inf (on any rank), or skip the update."""
        where = self._first_nonfinite_router(outs)
        what = f"step {step}: loss {lm + aux + z} (LM {lm}, aux {aux}, z {z}), gradient norm {norm}"
        if self.cfg.train.on_nonfinite == "raise":
            raise FloatingPointError(f"{what}; {where}. Lower train.lr, raise moe.z_loss_coef, check the data, or "
                                     "set train.on_nonfinite=skip to skip such steps")
        self.engine.skip()                             # no optimizer update and no expert-bias update
        self.history.skipped_steps += 1
        self._say(f"{what}; {where}; step skipped (train.on_nonfinite=skip, "
                  f"{self.history.skipped_steps} skipped so far)")
        return StepResult(step=step, loss=lm + aux + z, lm_loss=lm, aux_loss=aux + z, z_loss=z, drop_fraction=0.0,
                          tokens_per_expert=[], grad_norm=norm, lr=lr, seconds=time.perf_counter() - t0,
                          skipped=True)

    def _stats_by_row(self, outs: list[ModelOutput]):
        """(row in the whole model's MoE-layer table, stats) of each MoE layer this rank ran, per micro-batch."""
        for o in outs:
            for lid, s in zip(o.moe_layer_ids, o.stats):
                yield self.model.moe_layer_row[lid], s

    def _first_nonfinite_router(self, outs: list[ModelOutput]) -> str:
        """Named by global layer index: each rank flags its own layers (the others' stay 1) and the world's
        minimum says, on every rank, which routers went non-finite on any rank."""
        layer_ids = list(self.model.all_moe_layer_ids)
        if not layer_ids:
            return "the model has no MoE router"
        ok = torch.ones(len(layer_ids), dtype=torch.int32, device=next(self.model.parameters()).device)
        for row, s in self._stats_by_row(outs):
            ok[row] &= s.router_finite.to(torch.int32)
        all_reduce_(ok, self.topo.world, op=torch.distributed.ReduceOp.MIN)   # the same answer on every rank
        bad = [lid for lid, flag in zip(layer_ids, ok.tolist()) if not flag]
        if not bad:
            return "every router's logits were finite (the NaN/Inf arose elsewhere)"
        return f"the router of layer {bad[0]} (blocks.{bad[0]}.mlp.router) produced non-finite logits first"

    def _rows_leaving(self, kept_LE: torch.Tensor) -> int:
        """This rank's kept assignments to experts on other EP ranks, counted from the routing alone, to check
        that dispatch sends exactly these rows (no padding)."""
        ep, E = self.topo.ep, self.cfg.moe.num_experts
        local = slice(ep.rank * E // ep.size, (ep.rank + 1) * E // ep.size)
        return int(kept_LE.sum() - kept_LE[:, local].sum())     # host sync: one scalar for the log

    # ------------------------------------------------------------------------------------ checkpoints

    def resume(self) -> int:
        """Load the checkpoint that checkpoint.resume asks for; returns the step to continue from (0: fresh)."""
        c = self.cfg.checkpoint
        root = self.engine.checkpoint_root(self.checkpoint_root)
        if c.resume == "never":
            ckpt.check_fresh_start(root, self.topo)      # a folder with another run's checkpoints is refused
            return 0
        found = ckpt.find_on_rank0(root, c.fallback, self.topo, say=self._say)
        if found is None:
            if c.resume == "must":
                raise ckpt.CheckpointError(f"checkpoint.resume=must but {root} holds no checkpoint; "
                                           "set checkpoint.resume=auto to start fresh")
            return 0
        path, meta = found
        for note in ckpt.check_compatible(meta, self.cfg, path):
            self._say(f"checkpoint note: {note}")
        rng = self.engine.load(path, meta)
        step = int(meta["step"])
        if not rng:
            # Another layout: ranks do not map one to one, so each draws a fresh stream keyed by (seed, step, rank).
            torch.manual_seed(self.cfg.train.seed * 1_000_003 + step * 1009 + self.topo.rank)
        self.resumed_from = path
        saved = ckpt.describe_layout(meta["layout"])
        now = ckpt.describe_layout(ckpt.layout_of(self.topo, self.cfg))
        how = f"saved with {saved}" + ("" if saved == now else f", resharded to {now}")
        self._say(f"resumed from {path} (step {step}, {how})")
        return step

    def save_checkpoint(self, step: int) -> Optional[Path]:
        """Collective: every rank calls it with the number of steps done."""
        root = self.engine.checkpoint_root(self.checkpoint_root)
        self.last_checkpoint = self.engine.save(root, step, keep=self.cfg.checkpoint.keep)
        return self.last_checkpoint

    def _agree_to_stop(self) -> bool:
        """True on every rank when any rank received SIGTERM (one small all-reduce per step)."""
        flag = torch.tensor([int(self._stop_requested)], dtype=torch.int32)
        if self.topo.is_distributed:
            if torch.distributed.get_backend(self.topo.world.handle) == "nccl":
                flag = flag.to(default_device())
            all_reduce_(flag, self.topo.world, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    @contextlib.contextmanager
    def _sigterm_sets_flag(self):
        """SIGTERM (preemption, scancel, torchrun shutting down) only sets a flag: the step finishes, all ranks
        save, and `fit` returns. Signal handlers exist in the main thread only; elsewhere nothing changes."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self._stop_requested = True
        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    # ------------------------------------------------------------------------------------------- loop

    def fit(self, steps: Optional[int] = None, progress: bool = True,
            on_step: Optional[Callable[[StepResult], None]] = None) -> History:
        """Train until `steps` optimizer steps are done (default train.steps), resuming first per
        checkpoint.resume; saves every checkpoint.every steps, at the end, and on SIGTERM. Rank 0 holds the
        locks of the output folder and of the checkpoint folder throughout: a second run into either is refused,
        naming this one. The watchdog (parallel.stall_warn_s) and parallel.debug_sync run for the whole fit."""
        p = self.cfg.parallel
        with run_lock.hold_run(self.cfg, enabled=self.is_logger), \
                watch_training(self.model, self.topo, p.stall_warn_s, p.timeout_s, p.debug_sync):
            return self._fit(steps, progress, on_step)

    def _fit(self, steps: Optional[int], progress: bool,
             on_step: Optional[Callable[[StepResult], None]]) -> History:
        steps = steps or self.cfg.train.steps
        t, c = self.cfg.train, self.cfg.checkpoint
        start = self.resume()
        tokens_per_step = t.batch_size * t.seq_len * self.topo.dp.size * t.grad_accum_steps   # the global batch
        progress = progress and self.is_logger
        moe_ids = list(self.model.all_moe_layer_ids)          # every stage's: the counts cover the whole model
        log = MetricsLogger(t.out_dir, enabled=self.is_logger, moe_layer_ids=moe_ids, tensorboard=t.tensorboard,
                            resume_step=start if self.resumed_from else None, wandb_project=t.wandb_project,
                            config=self.cfg)
        tty = progress and sys.stderr.isatty()
        bar = tqdm(total=steps, initial=min(start, steps), disable=not tty, dynamic_ncols=True, desc="train")
        t_start = time.perf_counter()
        try:
            with self._sigterm_sets_flag():
                for step in range(start, steps):
                    with where(step=step):         # names the step in watchdog and debug-sync reports
                        r = self.train_step(step)
                    self.history.steps.append(r)
                    self._log(log, r, tokens_per_step, steps, progress, tty, bar)
                    if step == start:
                        self._log_memory(log, step)
                    done = step + 1
                    if t.eval_every and (done % t.eval_every == 0 or done == steps):   # the last step too: the curve ends
                        self._log_eval(log, done)
                    if on_step:
                        on_step(r)
                    stop = self._agree_to_stop()
                    if stop or (c.every and done % c.every == 0) or done == steps:
                        self.save_checkpoint(done)
                    if stop:
                        self.stopped_at = done
                        self._say(f"\nSIGTERM: stopped after step {done} of {steps}; checkpoint "
                                  f"{self.last_checkpoint}; run the same command again to resume")
                        break
        finally:
            bar.close()
            log.close()
        self.wall_seconds = time.perf_counter() - t_start
        return self.history

    def _log(self, log: MetricsLogger, r: StepResult, tokens_per_step: int, steps: int, progress: bool,
             tty: bool, bar) -> None:
        tps = tokens_per_step / r.seconds
        counts = torch.stack(r.tokens_per_expert) if r.tokens_per_expert else None
        log.log_step(r.step, {"loss": r.loss, "lm_loss": r.lm_loss, "aux_loss": r.aux_loss, "z_loss": r.z_loss,
                              "drop_fraction": r.drop_fraction, "grad_norm": r.grad_norm, "lr": r.lr,
                              "tokens_per_s": tps, "step_s": r.seconds, "a2a_rows_out": r.a2a_rows_out,
                              "a2a_rows_leaving": r.a2a_rows_leaving, "skipped": r.skipped,
                              "skipped_total": self.history.skipped_steps}, counts)
        bar.update(1)
        bar.set_postfix(loss=f"{r.lm_loss:.3f}", aux=f"{r.aux_loss - r.z_loss:.4f}", z=f"{r.z_loss:.4f}",
                        tok_s=f"{tps:,.0f}", drop=f"{r.drop_fraction:.1%}", step_ms=f"{1e3 * r.seconds:.0f}")
        if progress and not tty and (r.step % self.cfg.train.log_every == 0 or r.step == steps - 1):
            print(f"step {r.step:5d}/{steps} loss {r.lm_loss:.4f} aux {r.aux_loss - r.z_loss:.4f} z {r.z_loss:.4f} "
                  f"drop {r.drop_fraction:.2%} {tps:,.0f} tok/s {1e3 * r.seconds:.0f} ms/step lr {r.lr:.2e}"
                  + (f" skipped {self.history.skipped_steps}" if self.history.skipped_steps else ""), flush=True)

    def _log_memory(self, log: MetricsLogger, step: int) -> None:
        """One "memory" record after the first step of the run: rank 0's bytes at the top level and every
        rank's under "per_rank" (one all-reduce of a [world, fields] table; a collective, every rank calls it)."""
        mine = self.engine.memory()
        keys = sorted(mine)
        table = torch.zeros(self.topo.dims.world, len(keys), dtype=torch.float64)
        table[self.topo.rank] = torch.tensor([float(mine[k]) for k in keys], dtype=torch.float64)
        if self.topo.is_distributed:
            if torch.distributed.get_backend(self.topo.world.handle) == "nccl":
                table = table.to(default_device())
            all_reduce_(table, self.topo.world)
        rows = table.cpu().long().tolist()             # host sync: the record is written now
        per_rank = [dict(zip(keys, row)) for row in rows]
        log.log_step(step, {**mine, "per_rank": per_rank}, kind="memory")

    def _log_eval(self, log: MetricsLogger, done: int) -> None:
        if not self.has_validation:
            if not self._said_no_validation:
                self._say("evaluation skipped: no validation split (data.val_fraction=0)")
                self._said_no_validation = True
            return
        val = self.evaluate(self.cfg.train.eval_batches)     # every rank joins: the model's collectives
        self.history.evals.append((done, val))
        log.log_step(done, {"val_loss": val}, kind="eval")
        self._say(f"step {done:5d} validation LM loss {val:.4f}")

    @functools.cached_property
    def _val_batcher(self) -> Batcher:
        # Fixed windows (seed 0) so that runs compare; memory-mapped once.
        return Batcher(TokenDataset(self.cfg.data.path, self.cfg.train.seq_len, "val", self.cfg.data.val_fraction),
                       self.cfg.train.batch_size, seed=0, rank=self.topo.dp.rank, world=self.topo.dp.size)

    @property
    def has_validation(self) -> bool:
        return self.cfg.data.val_fraction > 0

    @torch.no_grad()
    def evaluate(self, batches: int = 8) -> Optional[float]:
        """Mean LM loss on the validation split (fixed windows, so runs compare); None when data.val_fraction=0
        leaves no validation split."""
        if not self.has_validation:
            return None
        device = next(self.model.parameters()).device
        self.model.eval()
        # The batches go through as the micro-batches of one forward-only pass (a pipeline's run_forward with
        # parallel.pp > 1); the mean over them is the mean of the per-batch global losses.
        micro_batches = [tuple(b.to(device) for b in self._val_batcher.get_batch(i)) for i in range(batches)]
        lm = self._global_loss_terms(self.engine.forward_only(micro_batches))[0]
        self.model.train()
        return lm


def format_expert_load(load_LE: torch.Tensor, moe_layer_ids: list[int]) -> str:
    """A table of each MoE layer's share of assignments per expert, with max/mean imbalance."""
    E = load_LE.shape[1]
    head = "layer | " + " ".join(f"e{e:<4d}" for e in range(E)) + " | max/mean"
    lines = [head, "-" * len(head)]
    for lid, row in zip(moe_layer_ids, load_LE.float()):
        share = row / row.sum().clamp_min(1)
        imb = float(row.max() / row.mean().clamp_min(1e-9))
        lines.append(f"{lid:5d} | " + " ".join(f"{s:5.1%}"[:5].ljust(5) for s in share.tolist()) + f" | {imb:.2f}")
    return "\n".join(lines)
