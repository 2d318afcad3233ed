"""AdamW over flat buckets with fp32 master weights, optionally sharded over the data-parallel groups.

`train.shard_optimizer`:
- `none`          (used with bf16 weights): every rank keeps whole fp32 gradient buffers, master weights and
                  moments; gradients are all-reduced.
- `states`        ZeRO-1: whole fp32 gradient buffers; after the last micro-batch each bucket is reduce-scattered
                  so that a rank gets the reduced gradient of its shard only (kept in the buffer's shard region:
                  from then on the parameters' .grad views hold reduced values there only); master weights and
                  moments exist for that shard only.
- `states+grads`  ZeRO-2: no whole gradient buffer. A bucket is reduce-scattered as soon as backward has produced
                  every gradient in it, every micro-batch, into the rank's fp32 shard accumulator, and the
                  parameters' gradients are freed. One staging buffer (the largest bucket) is reused.

Buckets. Parameters are grouped by how their gradient is reduced and how the norm counts them:
`dense` (averaged over dp), `tp_partial` (router and shared experts under tp: summed over tp, then averaged over
dp), `expert` (summed over edp, divided by dims.dp), dense parameters split over tp (`dense_tp`, averaged
over dp, their squares summed over tp in the norm), and, with pipeline parallelism, the tied embedding's copy on
the first and on the last stage (`tied`: summed over topo.embed, then averaged over dp; counted in the norm on
the first stage only). Each kind is cut into flat buckets of at most `bucket_elems`
elements, taken in reverse parameter order (the order backward produces them), each padded to a multiple of its
group's size; rank r of the group owns the contiguous r-th shard of every bucket. The model's parameters become
views into the buckets' flat weight buffers, so a shard of the weights is a slice of one tensor.

Weights. With fp32 weights the rank's slice of the weight buffer is its master (no copy); with bf16 weights a
separate fp32 master shard is updated and copied back to bf16. Updated shards are all-gathered into the weight
buffers. The update is torch's own AdamW (`torch.optim.adamw.adamw`, the functional form of torch.optim.AdamW)
applied to each parameter's piece of the shard, with the groups of `native_engine.adamw_groups` (matrices decay,
vectors do not): element for element the same arithmetic as torch.optim.AdamW on whole parameters.

ZeRO-2 and collective order: gradient hooks fire in backward's order, which is the same on every rank (the same
graph), but a bucket is issued only after every bucket before it in the fixed bucket list, so the collectives'
order never depends on hook timing. A gradient backward did not produce by its end counts as zero, and that
parameter is still updated (decay, moment decay): torch's AdamW would skip a parameter whose .grad is None. Our
models give every parameter a gradient every step, so the two agree here.

Checkpoints stay layout-free: `checkpoint_tensors` rebuilds every parameter's whole (this rank's tp/ep shard)
master weight and moments from the flat shards (all-gathered over the shard group, on the CPU), and
`restore_checkpoint_tensors` slices this rank's shard back out: the entries are those of torch's AdamW.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.optim.adamw import adamw as adamw_functional

from moe_dist.config import TrainConfig
from moe_dist.parallel.comm import all_gather_into_tensor_, all_reduce_, reduce_scatter_tensor_
from moe_dist.parallel.grads import norm_from_squares
from moe_dist.parallel.topology import Group, Topology
from moe_dist.train.adamw import ADAMW_BETAS, ADAMW_EPS, adamw_groups

BUCKET_ELEMS = 1 << 24          # 16M elements: 64 MiB of fp32 gradient per reduce-scatter
KINDS = ("dense", "dense_tp", "tp_partial", "expert", "tied")


@dataclass
class Slot:
    """One parameter inside a bucket: elements [start, start + numel) of the flat buffers."""
    name: str
    param: nn.Parameter
    start: int
    numel: int
    weight_decay: float


@dataclass
class Bucket:
    kind: str
    group: Group                 # the reduction group (dp or edp)
    shard_group: Group           # `group` when sharded, else this rank alone
    scale: float                 # applied after the sum: 1/dp (dense) or 1/dims.dp (experts)
    slots: list[Slot]
    padded: int                  # flat length, a multiple of shard_group.size
    weights: torch.Tensor = None           # [padded] in the weights' dtype; the parameters are views into it
    grad_full: Optional[torch.Tensor] = None    # [padded] fp32 (none / states)
    grad_acc: Optional[torch.Tensor] = None     # [shard] fp32 accumulator (states+grads)
    master: torch.Tensor = None            # [shard] fp32 (a view of `weights` when they are fp32)
    exp_avg: torch.Tensor = None
    exp_avg_sq: torch.Tensor = None
    pending: int = 0                       # ZeRO-2: parameters whose gradient this micro-batch still lacks
    flushed: bool = False                  # ZeRO-2: reduced in this micro-batch
    segments: list[tuple[Slot, int, int]] = field(default_factory=list)   # (slot, lo, hi) in shard coordinates

    @property
    def shard(self) -> int:
        return self.padded // self.shard_group.size

    @property
    def lo(self) -> int:
        return self.shard_group.rank * self.shard


def _alone(rank: int) -> Group:
    return Group((rank,), 0, None)


class FlatAdamW:
    """See the module docstring. `shard`: train.shard_optimizer. `weights_dtype`: the dtype the model's
    parameters get (default: the one they have); the fp32 master starts from their values before the cast."""

    def __init__(self, model, topo: Topology, t: TrainConfig, shard: str = "none", bucket_elems: int = BUCKET_ELEMS,
                 weights_dtype: Optional[torch.dtype] = None):
        if shard not in ("none", "states", "states+grads"):
            raise ValueError(f"train.shard_optimizer={shard!r}: use none, states or states+grads")
        self.model, self.topo, self.t, self.mode = model, topo, t, shard
        self.sharded = shard != "none"
        self.zero2 = shard == "states+grads"
        first = next(model.parameters())
        self.device, self.wdtype = first.device, weights_dtype or first.dtype
        # Each parameter's weight decay from the native engine's AdamW groups (one rule for both optimizers).
        self._decay = {id(p): g["weight_decay"] for g in adamw_groups(model, t) for p in g["params"]}
        self.buckets = self._make_buckets(bucket_elems)
        self.steps = {s.name: torch.zeros((), dtype=torch.float32) for b in self.buckets for s in b.slots}
        self._local_names = {s.name for b in self.buckets for s, _, _ in b.segments}
        self._staging: Optional[torch.Tensor] = None     # ZeRO-2's one reduction bucket
        self._next = 0                                   # ZeRO-2: the next bucket to issue this micro-batch
        self._micro = 0                                  # micro-batches reduced since zero_grad
        self._grads: Optional[list[torch.Tensor]] = None   # per bucket, the reduced shard gradient
        self._hooks = []
        if self.zero2 or self.wdtype != torch.float32:
            for b in self.buckets:
                for s in b.slots:
                    self._hooks.append(s.param.register_post_accumulate_grad_hook(self._make_hook(b, s)))
        self.zero_grad()

    # ------------------------------------------------------------------------------------------ layout

    def _kind_of(self) -> dict[int, str]:
        m, shards = self.model, self.model.param_shards
        kinds = {id(p): "expert" for p in m.expert_parameters()}
        kinds.update({id(p): "tp_partial" for p in m.tp_partial_parameters()})
        kinds.update({id(p): "tied" for p in m.tied_parameters()})
        for name, p in m.named_parameters():
            if id(p) not in kinds:
                kinds[id(p)] = "dense_tp" if any(s.axis == "tp" for s in shards.get(name, ())) else "dense"
        return kinds

    def _make_buckets(self, cap: int) -> list[Bucket]:
        """Reverse parameter order, one open bucket per kind; the list is ordered by each bucket's last
        parameter, i.e. by when backward completes it."""
        kinds = self._kind_of()
        named = list(self.model.named_parameters())[::-1]       # backward produces the last layers first
        open_: dict[str, list[tuple[str, nn.Parameter]]] = {}
        last: dict[str, int] = {}
        closed: list[tuple[int, str, list]] = []                 # (position of its last parameter, kind, params)
        for pos, (name, p) in enumerate(named):
            k = kinds[id(p)]
            cur = open_.setdefault(k, [])
            if cur and sum(q.numel() for _, q in cur) + p.numel() > cap:
                closed.append((last[k], k, cur))
                cur = open_[k] = []
            cur.append((name, p))
            last[k] = pos
        closed += [(last[k], k, ps) for k, ps in open_.items() if ps]
        closed.sort(key=lambda c: c[0])
        return [self._bucket(k, ps) for _, k, ps in closed]

    def _bucket(self, kind: str, params: list[tuple[str, nn.Parameter]]) -> Bucket:
        topo = self.topo
        group = topo.edp if kind == "expert" else topo.dp
        scale = 1.0 / (topo.dims.dp if kind == "expert" else topo.dp.size)
        shard_group = group if self.sharded else _alone(topo.rank)
        slots, n = [], 0
        for name, p in params:
            slots.append(Slot(name, p, n, p.numel(), self._decay[id(p)]))
            n += p.numel()
        g = shard_group.size
        b = Bucket(kind, group, shard_group, scale, slots, padded=-(-n // g) * g)
        # The weights move into one flat buffer; each parameter becomes a view of its slot.
        full = torch.zeros(b.padded, dtype=torch.float32, device=self.device)
        for s in slots:
            full[s.start:s.start + s.numel].copy_(s.param.detach().reshape(-1))
        b.weights = full if self.wdtype == torch.float32 else full.to(self.wdtype)
        for s in slots:
            s.param.data = b.weights[s.start:s.start + s.numel].view(s.param.shape)
        lo, hi = b.lo, b.lo + b.shard
        # fp32 weights: the rank's slice of the weights is the master. bf16: an fp32 copy of the values
        # before the cast (the initialisation is not rounded to bf16).
        b.master = b.weights[lo:hi] if self.wdtype == torch.float32 else full[lo:hi].clone()
        del full
        b.exp_avg = torch.zeros(b.shard, dtype=torch.float32, device=self.device)
        b.exp_avg_sq = torch.zeros_like(b.exp_avg)
        if self.zero2:
            b.grad_acc = torch.zeros_like(b.exp_avg)
        else:
            b.grad_full = torch.zeros(b.padded, dtype=torch.float32, device=self.device)
        for s in slots:
            a, z = max(s.start, lo), min(s.start + s.numel, hi)
            if a < z:
                b.segments.append((s, a - lo, z - lo))
        return b

    # ------------------------------------------------------------------------------------- gradients

    def zero_grad(self) -> None:
        for b in self.buckets:
            if b.grad_full is not None:
                b.grad_full.zero_()
            if b.grad_acc is not None:
                b.grad_acc.zero_()
            for s in b.slots:
                if b.grad_full is not None and self.wdtype == torch.float32:
                    # fp32 weights: backward accumulates straight into the flat buffer (no hook, no copy).
                    s.param.grad = b.grad_full[s.start:s.start + s.numel].view(s.param.shape)
                else:
                    s.param.grad = None
        self._micro = 0
        self._grads = None
        self._start_micro()

    def _start_micro(self) -> None:
        self._next = 0
        for b in self.buckets:
            b.pending, b.flushed = len(b.slots), False

    def _make_hook(self, b: Bucket, s: Slot):
        def hook(p: nn.Parameter) -> None:
            if not self.zero2:
                # bf16 weights: add into the fp32 buffer and free the bf16 gradient.
                b.grad_full[s.start:s.start + s.numel].add_(p.grad.reshape(-1))
                p.grad = None
                return
            if b.flushed:
                raise RuntimeError(f"{s.name}: a second gradient arrived after its bucket was reduced in this "
                                   "micro-batch (a parameter used by two separate backward passes); train with "
                                   "train.shard_optimizer=states")
            b.pending -= 1
            self._issue_ready()
        return hook

    def _issue_ready(self, force: bool = False) -> None:
        """ZeRO-2: reduce buckets in list order while the next one is complete (or, at the end, regardless)."""
        while self._next < len(self.buckets):
            b = self.buckets[self._next]
            if b.pending > 0 and not force:
                return
            self._flush(b)
            self._next += 1

    def _flush(self, b: Bucket) -> None:
        if self._staging is None:
            self._staging = torch.empty(max(x.padded for x in self.buckets), dtype=torch.float32,
                                        device=self.device)
        flat = self._staging[:b.padded]
        flat.zero_()
        for s in b.slots:
            if s.param.grad is not None:
                flat[s.start:s.start + s.numel].copy_(s.param.grad.reshape(-1))
                s.param.grad = None                    # the whole gradient is freed as soon as it is reduced
        if b.kind == "tp_partial":
            all_reduce_(flat, self.topo.tp)
        if self._micro == 0:
            reduce_scatter_tensor_(b.grad_acc, flat, b.group)
        else:
            b.grad_acc.add_(reduce_scatter_tensor_(torch.empty_like(b.grad_acc), flat, b.group))
        b.flushed = True

    def after_backward(self) -> None:
        """The end of one micro-batch's backward."""
        if self.zero2:
            self._issue_ready(force=True)
            self._micro += 1
            self._start_micro()

    def _reduced_grads(self) -> list[torch.Tensor]:
        out = []
        for b in self.buckets:
            if self.zero2:
                g = b.grad_acc
            else:
                if b.kind == "tp_partial":
                    all_reduce_(b.grad_full, self.topo.tp)
                if b.kind == "tied":
                    all_reduce_(b.grad_full, self.topo.embed)
                if self.sharded:
                    # Reduced into a transient shard, then kept in the buffer's own shard region (the rest of
                    # the buffer is not read again this step): no second gradient buffer stays allocated.
                    reduced = reduce_scatter_tensor_(torch.empty(b.shard, dtype=torch.float32, device=self.device),
                                                     b.grad_full, b.group)
                    g = b.grad_full[b.lo:b.lo + b.shard].copy_(reduced)
                    del reduced
                else:
                    g = all_reduce_(b.grad_full, b.group)
            if b.scale != 1.0:
                g.mul_(b.scale)
            out.append(g)
        return out

    def reduce_and_clip(self, max_norm: float) -> float:
        """Reduce every bucket into this rank's shard, the exact global norm, clip; returns the pre-clip norm."""
        self._grads = self._reduced_grads()
        norm = self._global_norm(self._grads)
        if max_norm > 0:
            coef = min(max_norm / (norm + 1e-6), 1.0)       # clip_grad_norm_'s rule, as parallel.grads
            if coef < 1.0:
                for g in self._grads:
                    g.mul_(coef)
        return norm

    def _global_norm(self, grads: list[torch.Tensor]) -> float:
        """Each element once (parallel.grads' rule): sharded, a shard's squares are summed over its group."""
        sq = dict.fromkeys(KINDS, 0.0)
        for b, g in zip(self.buckets, grads):
            sq[b.kind] = sq[b.kind] + g.float().pow(2).sum()
        # tp-partial parameters are replicated over tp once reduced: counted like replicated dense ones. The
        # tied embedding's two copies are equal once reduced: the first stage counts it.
        replicated = sq["dense"] + sq["tp_partial"] + (sq["tied"] if self.model.holds_first else 0.0)
        return norm_from_squares(replicated, sq["dense_tp"], sq["expert"], self.topo, dp_sharded=self.sharded)

    # ------------------------------------------------------------------------------------------ update

    def step(self, lr: float) -> None:
        if self._grads is None:
            raise RuntimeError("FlatAdamW.step before reduce_and_clip")
        by_decay: dict[float, tuple[list, list, list, list, list]] = {}
        for b, g in zip(self.buckets, self._grads):
            for s, lo, hi in b.segments:
                lists = by_decay.setdefault(s.weight_decay, ([], [], [], [], []))
                for lst, x in zip(lists, (b.master[lo:hi], g[lo:hi], b.exp_avg[lo:hi], b.exp_avg_sq[lo:hi],
                                          self.steps[s.name])):
                    lst.append(x)
        for wd, (params, grads, m, v, steps) in by_decay.items():
            adamw_functional(params, grads, m, v, [], steps, amsgrad=False, beta1=ADAMW_BETAS[0],
                             beta2=ADAMW_BETAS[1], lr=lr, weight_decay=wd, eps=ADAMW_EPS, maximize=False)
        for name, st in self.steps.items():
            if name not in self._local_names:          # no element of it in this rank's shards
                st += 1
        self._grads = None
        self._publish()

    def _publish(self) -> None:
        """The updated master shards into every rank's weights."""
        for b in self.buckets:
            mine = b.master.to(self.wdtype) if self.wdtype != torch.float32 else b.master.clone()
            if self.sharded:
                all_gather_into_tensor_(b.weights, mine, b.shard_group)
            elif self.wdtype != torch.float32:
                b.weights.copy_(mine)

    # ----------------------------------------------------------------------------------- checkpoints

    def _full(self, shard: torch.Tensor, b: Bucket) -> torch.Tensor:
        """The whole flat bucket of a shard tensor, on the CPU (one bucket on the device at a time)."""
        if not self.sharded:
            return shard.detach().to("cpu", torch.float32, copy=True)
        out = torch.empty(b.padded, dtype=shard.dtype, device=shard.device)
        return all_gather_into_tensor_(out, shard.contiguous(), b.shard_group).cpu()

    def checkpoint_tensors(self, fill: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        """name → {"weight" (fp32 master), "exp_avg", "exp_avg_sq", "step"}: each of the parameter's shape
        (this rank's tp/ep shard of the global tensor), on the CPU. fill=False: zeros to load into (no
        collective)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for b in self.buckets:
            if fill:
                flats = {k: self._full(getattr(b, a), b) for k, a in
                         (("weight", "master"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq"))}
            else:
                flats = {k: torch.zeros(b.padded, dtype=torch.float32) for k in ("weight", "exp_avg", "exp_avg_sq")}
            for s in b.slots:
                out[s.name] = {k: f[s.start:s.start + s.numel].view(s.param.shape) for k, f in flats.items()}
                out[s.name]["step"] = self.steps[s.name].clone() if fill else torch.zeros((), dtype=torch.float32)
        return out

    @torch.no_grad()
    def restore_checkpoint_tensors(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        """Load what `checkpoint_tensors` describes: weights whole, master and moments for this rank's shard."""
        for b in self.buckets:
            lo, hi = b.lo, b.lo + b.shard
            for key in ("weight", "exp_avg", "exp_avg_sq"):
                flat = torch.zeros(b.padded, dtype=torch.float32)
                for s in b.slots:
                    flat[s.start:s.start + s.numel] = tensors[s.name][key].reshape(-1)
                if key == "weight":
                    b.weights.copy_(flat)
                    if self.wdtype != torch.float32:
                        b.master.copy_(flat[lo:hi])
                else:
                    getattr(b, key).copy_(flat[lo:hi])
            for s in b.slots:
                self.steps[s.name].copy_(tensors[s.name]["step"])

    # ------------------------------------------------------------------------------------------ memory

    def memory(self) -> dict[str, int]:
        """Bytes of the tensors this rank holds (padding included; step counters left out)."""
        def nbytes(t):
            return 0 if t is None else t.numel() * t.element_size()
        weights = sum(nbytes(b.weights) for b in self.buckets)
        grads = sum(nbytes(b.grad_full) + nbytes(b.grad_acc) for b in self.buckets)
        if self.zero2:
            grads += 4 * max(b.padded for b in self.buckets)     # the staging bucket (allocated at the first flush)
        moments = sum(nbytes(b.exp_avg) + nbytes(b.exp_avg_sq) for b in self.buckets)
        master = 0 if self.wdtype == torch.float32 else sum(nbytes(b.master) for b in self.buckets)
        return {"weights": weights, "grads": grads, "optimizer": moments + master}
