"""`moe-dist plan`: what one layout costs each rank, computed from the config alone (no process, no tensor).

Legend: T tokens of one dp rank's micro-batch (train.batch_size·train.seq_len), Ts = T/tp the slice each
tp rank routes, D model dim, F expert hidden, Fd dense hidden, Fs shared-expert hidden, E experts, K top-k,
H / Hkv / Dh attention heads / key-value heads / head dim (model.head_dim, default D/H), V vocabulary,
b bytes per activation element (2 for train.dtype=bfloat16, else 4), w bytes per weight (the same: `plan`
describes a GPU run, where bfloat16 training keeps bf16 weights), P_d / P_e the dense / expert parameters a
rank holds, s_d / s_e the optimizer-shard divisors (dp / edp when train.shard_optimizer is not none, else 1).

Inside one pipeline stage every rank holds the same shapes (attention heads and dense MLPs split over tp; routed
experts split over ep as whole experts and over etp along F; router, norms, embeddings, head and shared experts
replicated), so one set of per-rank numbers describes a stage. With parallel.pp = 1 there is one stage.

Pipeline parallelism (parallel.pp = p stages, parallel.pp_virtual = v chunks per pp rank, m =
train.grad_accum_steps micro-batches per step): pp rank r holds the layers of virtual stages
`virtual_stages_of(r, p, v)` (`moe_dist.pipeline.stages.stage_layers` splits them, parallel.pp_layers honoured);
the rank holding virtual stage 0 also holds the embedding, the rank holding the last one the final norm and the
head (with tied embeddings and p > 1 the last rank holds its own copy of the embedding as the head, its
gradient summed with the first's). The ranks of the stage with the largest memory decide whether a layout fits.
Activations: each rank keeps one micro-batch's activations per micro-batch in flight (`in_flight`):
    gpipe        m                         (every forward runs before the first backward)
    1f1b         min(p - r, m)             (warm-up of p - r - 1 forwards, then one more before the first
                                            backward; the first stage holds the most)
    interleaved  min(2·(p - r - 1) + (v - 1)·p + 1, v·m) chunk-micro-batches (Megatron-core's warm-up count
                                            plus one; v·m when m = p, where every forward runs first), forward k
                                            running local chunk (k mod p·v) // p; on the first rank about
                                            p·(1 + (p - 1)/(p·v)) micro-batches of its layers
    The counts are read off the runtime's own action lists (`in_flight`), so they are the schedule's.
P2P per step (`p2p_per_step`): each of the p·v - 1 virtual-stage boundaries carries every micro-batch's
activation [mb, S, D] forward and its gradient backward, in the weights' dtype (w bytes per element). tp ranks
hold the whole activation (no sequence parallelism outside the MoE layers), so each tp rank sends it to its peer.

Counts are analytic, so a 47B-parameter config plans in milliseconds; tests check them against the meta-device
model of every layout.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import textwrap
import types
from dataclasses import dataclass
from typing import Any

from moe_dist.config import Config, MoEConfig, ModelConfig
from moe_dist.models.gpt import is_moe_layer
from moe_dist.moe.capacity import expert_capacity
from moe_dist.parallel.layout import bubble_fraction, check_layout, layout_warnings
from moe_dist.parallel.topology import ALL_GROUP_NAMES, ParallelDims
from moe_dist.pipeline.schedules import build_schedule
from moe_dist.pipeline.stages import stage_layers, virtual_stages_of
from moe_dist.train.sharded_optimizer import BUCKET_ELEMS

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
FP32 = 4
# With train.shard_optimizer=states+grads the full-size fp32 gradient exists for one reduction bucket at a
# time: backward fills the bucket, it is reduce-scattered into the rank's shard and freed. The native engine's
# buckets hold up to this many elements, or one parameter when it alone is larger (a parameter is never split
# across buckets); `bucket_elements` bounds the largest from above.
REDUCE_BUCKET_ELEMENTS = BUCKET_ELEMS
RECOMPUTE_ORDER = ("none", "moe_act", "moe", "block")     # each keeps less for backward than the one before


@dataclass(frozen=True)
class ParamCounts:
    dense: int          # everything but the routed experts (router and shared experts included)
    expert: int         # routed-expert weights
    total: int
    active: int         # used per token: dense + expert·K/E (a rank's share under uniform routing)


@dataclass(frozen=True)
class Memory:
    """Bytes per rank (the formula is `memory_per_rank`'s docstring; `memory_terms` states it per term)."""
    weights: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations


@dataclass(frozen=True)
class Comm:
    """Per rank under uniform routing. `rows` is one MoE layer's `alltoall_rows_per_layer`; each
    `*_bytes` entry is what the rank sends in one collective (it receives as much), per layer and micro-batch."""
    rows: dict[str, float]
    alltoall_bytes: dict[str, float]   # dispatch_fwd, combine_fwd, dispatch_bwd, combine_bwd
    etp_bytes: dict[str, float]        # all-gather / reduce-scatter inside the ETP group (zeros if etp=1)
    moe_layers: int                    # on the rank (its pipeline stage's)
    micro_batches: int = 1             # train.grad_accum_steps

    def per_layer_total(self) -> float:
        return sum(self.alltoall_bytes.values()) + sum(self.etp_bytes.values())

    def per_step_total(self) -> float:
        return self.per_layer_total() * self.moe_layers * self.micro_batches


@dataclass(frozen=True)
class Stage:
    """What the ranks of one pipeline stage (pp rank) hold: its model chunks in local order c = 0..v-1 (global
    layer ranges), the embedding when it holds virtual stage 0, the final norm and head when it holds the last."""
    rank: int
    chunks: tuple[range, ...]
    first: bool
    last: bool
    virtual: tuple[int, ...] = ()          # the virtual stage of each chunk
    chunk_moe: tuple[int, ...] = ()        # MoE layers in each chunk

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(i for c in self.chunks for i in c)

    @property
    def n_layers(self) -> int:
        return sum(len(c) for c in self.chunks)

    @property
    def n_moe(self) -> int:
        return sum(self.chunk_moe)


@dataclass(frozen=True)
class P2P:
    """Pipeline point-to-point traffic of one step, per (tp, dp) coordinate (every tp rank sends its copy)."""
    activation_shape: tuple[int, int, int]  # [mb, S, D]
    transfer_bytes: int                     # one activation (or its gradient): mb·S·D·w
    boundaries: int                         # virtual-stage boundaries, p·v - 1, each between two pp ranks
    micro_batches: int
    sent_per_rank: tuple[int, ...]          # bytes each pp rank sends per step (activations + gradients)

    @property
    def per_step(self) -> int:
        """Bytes over every boundary in one step: forward activations and backward gradients."""
        return 2 * self.boundaries * self.micro_batches * self.transfer_bytes


@dataclass(frozen=True)
class StagePlan:
    stage: Stage
    params: ParamCounts
    memory: Memory
    in_flight: tuple[int, ...]              # micro-batches whose activations each chunk holds at the peak
    activation_parts: dict[str, int]


@dataclass(frozen=True)
class Plan:
    dims: ParallelDims
    groups: dict[str, list[list[int]]]     # group name → every group's ranks (Megatron-core's order)
    coords: list[dict[str, int]]           # per rank: its index on tp, dp, etp, ep, edp, pp
    local_experts: int                     # routed experts per rank: ep rank r holds [r·L, (r+1)·L)
    params_global: ParamCounts
    params_rank: ParamCounts               # the heaviest stage's ranks (every rank when pp = 1)
    memory: Memory                         # the heaviest stage's (the one that decides whether it fits)
    comm: Comm
    dtype: str
    memory_terms: dict[str, str] = dataclasses.field(default_factory=dict)   # term → its formula and inputs
    activation_parts: dict[str, int] = dataclasses.field(default_factory=dict)
    train: dict[str, Any] = dataclasses.field(default_factory=dict)          # the memory-relevant train fields
    stages: list[StagePlan] = dataclasses.field(default_factory=list)        # one per pp rank
    heaviest: int = 0                                                        # the stage `memory` describes
    p2p: P2P | None = None
    pipeline: dict[str, Any] = dataclasses.field(default_factory=dict)       # pp, virtual, schedule, bubble


def head_dim(m: ModelConfig) -> int:
    return m.head_dim or m.dim // m.n_heads


def weight_bytes(cfg: Config) -> int:
    """w: bf16 weights whenever train.dtype is bfloat16 (a GPU run; the fp32 master copy is optimizer state)."""
    return DTYPE_BYTES[cfg.train.dtype]


def _width(hidden: int, activation: str) -> int:
    """Columns of one MLP per input row: [D, 2F] (SwiGLU's fused gate|up) or [D, F] in, [F, D] out."""
    return hidden * (3 if activation == "swiglu" else 2)


def _in_width(hidden: int, activation: str) -> int:
    """Columns of the input GEMM alone: 2F for SwiGLU (gate|up), F otherwise."""
    return hidden * (2 if activation == "swiglu" else 1)


def _shared_hidden(e: MoEConfig) -> int:
    return (e.shared_expert_hidden or e.num_shared_experts * e.expert_hidden) if e.num_shared_experts else 0


def _moe_layers(m: ModelConfig) -> int:
    return sum(is_moe_layer(m, i) for i in range(m.n_layers))


def _attention_params(m: ModelConfig, tp: int) -> int:
    """One block's attention weights on a tp rank: wq [D, H·Dh], wkv [D, 2·Hkv·Dh], wo [H·Dh, D], the q/k/v
    biases (model.qkv_bias, split with their columns) and the q/k norm weights (model.qk_norm: per_head
    2·Dh replicated; full: H·Dh + Hkv·Dh, split over tp with the heads they scale)."""
    hd, kv = head_dim(m), m.n_kv_heads or m.n_heads
    q, k = m.n_heads * hd, kv * hd
    split = m.dim * (q + 2 * k) + q * m.dim + ((q + 2 * k) if m.qkv_bias else 0)
    if m.qk_norm == "full":
        split += q + k
    return split // tp + (2 * hd if m.qk_norm == "per_head" else 0)


def virtual_size(cfg: Config, dims: ParallelDims) -> int:
    """Model chunks per pp rank: parallel.pp_virtual with pipeline stages, 1 without."""
    return cfg.parallel.pp_virtual if dims.pp > 1 else 1


def schedule_name(cfg: Config, dims: ParallelDims) -> str:
    return cfg.parallel.pp_schedule if dims.pp > 1 else "none"


def stages(cfg: Config, dims: ParallelDims) -> list[Stage]:
    """One `Stage` per pp rank (a single stage holding everything when pp = 1)."""
    m, v = cfg.model, virtual_size(cfg, dims)
    layers = tuple(cfg.parallel.pp_layers) if (dims.pp > 1 and cfg.parallel.pp_layers is not None) else None
    return list(_stages(m.n_layers, m.first_dense, m.moe_every, dims.pp, v, layers))


@functools.lru_cache(maxsize=4096)
def _stages(n_layers: int, first_dense: int, moe_every: int, p: int, v: int,
            pp_layers: tuple[int, ...] | None) -> tuple[Stage, ...]:
    pattern = types.SimpleNamespace(first_dense=first_dense, moe_every=moe_every)   # what is_moe_layer reads

    def moe(r: range) -> int:
        return sum(is_moe_layer(pattern, i) for i in r)

    if p == 1 and v == 1:
        whole = range(n_layers)
        return (Stage(0, (whole,), True, True, (0,), (moe(whole),)),)
    ranges = stage_layers(n_layers, p, v, pp_layers)
    out = []
    for r in range(p):
        vs = tuple(virtual_stages_of(r, p, v))
        chunks = tuple(ranges[i] for i in vs)
        out.append(Stage(r, chunks, 0 in vs, p * v - 1 in vs, vs, tuple(moe(c) for c in chunks)))
    return tuple(out)


def _stage(cfg: Config, dims: ParallelDims, stage: int | Stage) -> Stage:
    return stage if isinstance(stage, Stage) else stages(cfg, dims)[stage]


def param_counts(cfg: Config, dims: ParallelDims, stage: int | Stage | None = None) -> ParamCounts:
    """Parameters one rank of pipeline stage `stage` holds (None: the stage holding the most; the only one when
    pp = 1); `ParallelDims(world=1)` gives the whole model."""
    if stage is None:
        return max((param_counts(cfg, dims, st) for st in stages(cfg, dims)), key=lambda c: c.total)
    st = _stage(cfg, dims, stage)
    m, e = cfg.model, cfg.moe
    attn = _attention_params(m, dims.tp)
    dense_mlp = m.dim * _width(m.dense_hidden, e.activation) // dims.tp
    shared = m.dim * _width(_shared_hidden(e), e.activation)
    gate = m.dim if (e.shared_expert_gate and e.num_shared_experts) else 0    # sigmoid gate on the shared output
    n_layers, n_moe = st.n_layers, st.n_moe
    per_layer = attn + 2 * m.dim               # two RMSNorm weights per block
    vd = m.vocab_size * m.dim
    # Embedding on the first stage; final norm and head on the last; one tied matrix when a rank holds both.
    ends = (vd if st.first else 0) + (vd + m.dim if st.last else 0)
    if st.first and st.last and m.tie_embeddings:
        ends -= vd
    dense = (n_layers * per_layer + (n_layers - n_moe) * dense_mlp
             + n_moe * (e.num_experts * m.dim + shared + gate) + ends)
    expert = n_moe * (e.num_experts // dims.ep) * m.dim * _width(e.expert_hidden // dims.etp, e.activation)
    return ParamCounts(dense, expert, dense + expert, dense + expert * e.top_k // e.num_experts)


def largest_parameter(cfg: Config, dims: ParallelDims, stage: int | Stage = 0) -> int:
    """Elements of the largest single parameter tensor on a rank of `stage` (a reduction bucket holds at least it)."""
    m, e = cfg.model, cfg.moe
    st = _stage(cfg, dims, stage)
    hd, kv = head_dim(m), m.n_kv_heads or m.n_heads
    local = e.num_experts // dims.ep
    n_moe = st.n_moe
    sizes = [m.vocab_size * m.dim if (st.first or st.last) else 0]                          # embedding, head
    if n_moe:
        sizes += [local * m.dim * _in_width(e.expert_hidden // dims.etp, e.activation),     # w_in of the experts
                  m.dim * _in_width(_shared_hidden(e), e.activation)]
    if st.n_layers > n_moe:
        sizes.append(m.dim * _in_width(m.dense_hidden, e.activation) // dims.tp)
    if st.n_layers:
        sizes += [m.dim * m.n_heads * hd // dims.tp, m.dim * 2 * kv * hd // dims.tp]
    return max(sizes)


def alltoall_rows_per_layer(cfg: Config, dims: ParallelDims) -> dict[str, float]:
    """Rows one rank moves in one MoE layer's forward dispatch, under uniform routing.

    tokens      Ts = T/tp tokens this rank routes
    assigned    Ts·K assignments
    kept        after capacity (per GShard group of Ts/G tokens, each expert keeps at most C of its
                Ts·K/(G·E)); equal to `assigned` when dropless
    sent        kept·(ep-1)/ep rows leave the rank (rows for local experts stay home; nothing padded);
                the rank receives as many, so it runs `kept` rows through its experts
    home        kept - sent
    etp_gathered (etp-1)·kept rows that the ETP all-gather brings from the other ETP members
    """
    e, t = cfg.moe, cfg.train
    tokens = t.batch_size * t.seq_len // dims.tp        # check_layout checks that tp divides them
    assigned = tokens * e.top_k
    cap = expert_capacity(tokens // e.capacity_groups, e)
    kept = assigned if cap is None else min(assigned, e.capacity_groups * e.num_experts * cap)
    sent = kept * (dims.ep - 1) / dims.ep
    return {"tokens": tokens, "assigned": assigned, "kept": kept, "sent": sent, "home": kept - sent,
            "etp_gathered": (dims.etp - 1) * kept}


def comm_per_rank(cfg: Config, dims: ParallelDims, stage: int | Stage | None = None) -> Comm:
    """Dispatch forward sends the `sent` rows; combine forward returns them; the backward of each is the
    same exchange in reverse. With etp > 1 the received rows are all-gathered over etp before the experts
    and the partial outputs reduce-scattered after; backward swaps the two. A row is D·b bytes. `moe_layers`
    counts the stage's MoE layers (None: the stage with the most). Per micro-batch."""
    rows = alltoall_rows_per_layer(cfg, dims)
    row_bytes = cfg.model.dim * DTYPE_BYTES[cfg.train.dtype]
    a2a = rows["sent"] * row_bytes
    etp = rows["etp_gathered"] * row_bytes
    sts = stages(cfg, dims) if stage is None else [_stage(cfg, dims, stage)]
    n_moe = max(st.n_moe for st in sts)
    return Comm(rows,
                {"dispatch_fwd": a2a, "combine_fwd": a2a, "dispatch_bwd": a2a, "combine_bwd": a2a},
                {"gather_fwd": etp, "scatter_fwd": etp, "gather_bwd": etp, "scatter_bwd": etp},
                n_moe, cfg.train.grad_accum_steps)


def in_flight(schedule: str, pp: int, virtual: int, micro_batches: int, rank: int,
              weights: tuple[float, ...] | None = None) -> tuple[int, ...]:
    """Micro-batches whose forward activations each local chunk of pp rank `rank` holds at the rank's peak (the
    module docstring's table), read off the rank's action list (`moe_dist.pipeline.schedules.build_schedule`, the
    order the runtime runs): the moment after a forward where sum(live_c · weights_c) is largest (weights: one
    micro-batch's bytes per chunk; None: all equal). Without pipeline stages the engine runs each micro-batch's
    forward and backward before the next: one."""
    if pp == 1:
        return (1,) * virtual
    w = weights or (1.0,) * virtual
    return max(_live_after_forwards(schedule, pp, virtual, micro_batches, rank),
               key=lambda live: sum(n * x for n, x in zip(live, w)))


@functools.lru_cache(maxsize=4096)
def _live_after_forwards(schedule: str, pp: int, virtual: int, micro_batches: int,
                         rank: int) -> tuple[tuple[int, ...], ...]:
    """The distinct per-chunk counts of live micro-batches right after each forward of the rank's schedule."""
    live, seen = [0] * virtual, {}
    for a in build_schedule(schedule, pp, virtual, micro_batches, rank):
        live[a.chunk] += 1 if a.kind == "F" else -1
        if a.kind == "F":
            seen.setdefault(tuple(live), None)
    return tuple(seen)


def p2p_per_step(cfg: Config, dims: ParallelDims) -> P2P:
    """Activations forward and their gradients backward over every virtual-stage boundary (module docstring)."""
    t, m = cfg.train, cfg.model
    p, v = dims.pp, virtual_size(cfg, dims)
    shape = (t.batch_size, t.seq_len, m.dim)
    one = t.batch_size * t.seq_len * m.dim * weight_bytes(cfg)
    micro = t.grad_accum_steps
    last = p * v - 1
    sent = []
    for st in stages(cfg, dims):
        sends = sum((vs != last) + (vs != 0) for vs in st.virtual) if p > 1 else 0
        sent.append(sends * micro * one)
    return P2P(shape, one, p * v - 1 if p > 1 else 0, micro, tuple(sent))


def schedule_bubble(cfg: Config, dims: ParallelDims) -> float:
    """The schedule's idle share of a pipelined step with equal stages (`layout.bubble_fraction`): (p - 1)/(m + p - 1)
    for gpipe and 1f1b, (p - 1)/(v·m + p - 1) for interleaved; 0 without pipeline stages."""
    if dims.pp <= 1:
        return 0.0
    v = virtual_size(cfg, dims) if cfg.parallel.pp_schedule == "interleaved" else 1
    return bubble_fraction(dims.pp, cfg.train.grad_accum_steps, v)


def _layer_bytes(cfg: Config, dims: ParallelDims) -> dict[str, float]:
    """One micro-batch's activation bytes per layer kind (`activation_parts`' docstring states each)."""
    m, e, t = cfg.model, cfg.moe, cfg.train
    b = DTYPE_BYTES[t.dtype]
    T, hd, kv = t.batch_size * t.seq_len, head_dim(m), m.n_kv_heads or m.n_heads
    rows = alltoall_rows_per_layer(cfg, dims)
    R, Ts = rows["kept"], rows["tokens"]
    return {"attn": (2 * T * m.dim + T * hd * (2 * m.n_heads + 2 * kv) / dims.tp) * b,
            "dense": T * (_in_width(m.dense_hidden, e.activation) + m.dense_hidden) / dims.tp * b,
            "act_out": R * e.expert_hidden * b,           # the routed experts' activation output
            "moe": (Ts * e.num_experts * 2 * FP32 + (R * m.dim * (2 + 2 * dims.etp)
                    + R * _width(e.expert_hidden, e.activation) + Ts * _width(_shared_hidden(e), e.activation)) * b),
            "head": (2 * T * m.dim + T * m.vocab_size) * b + T * m.vocab_size * FP32,
            "layer_input": T * m.dim * b}


def _chunk_kept(cfg: Config, dims: ParallelDims, st: Stage, lb: dict[str, float]) -> list[dict[str, float]]:
    """One micro-batch's kept bytes per local chunk of `st`, by part (`head` on the last virtual stage's chunk)."""
    mode = cfg.train.recompute
    attn, dense, moe, act_out, layer_input = lb["attn"], lb["dense"], lb["moe"], lb["act_out"], lb["layer_input"]
    head = lb["head"]
    last_virtual = dims.pp * virtual_size(cfg, dims) - 1
    out = []
    for chunk, vs, n_moe in zip(st.chunks, st.virtual, st.chunk_moe):
        n_layers = len(chunk)
        n_dense = n_layers - n_moe
        if mode == "none":
            kept = {"attention": n_layers * attn, "dense_mlp": n_dense * dense, "moe": n_moe * moe}
        elif mode == "moe_act":
            kept = {"attention": n_layers * attn, "dense_mlp": n_dense * dense, "moe": n_moe * (moe - act_out)}
        elif mode == "moe":
            kept = {"attention": n_layers * attn, "dense_mlp": n_dense * dense, "moe": n_moe * layer_input}
        else:                                             # block
            kept = {"block_inputs": n_layers * layer_input}
        kept["head"] = head if vs == last_virtual else 0
        out.append(kept)
    return out


def stage_in_flight(cfg: Config, dims: ParallelDims, stage: int | Stage) -> tuple[int, ...]:
    """`in_flight` of one stage, its chunks weighted by their activation bytes."""
    st = _stage(cfg, dims, stage)
    return _flights(cfg, dims, st, _chunk_kept(cfg, dims, st, _layer_bytes(cfg, dims)))


def _flights(cfg: Config, dims: ParallelDims, st: Stage, per_chunk: list[dict[str, float]]) -> tuple[int, ...]:
    return in_flight(schedule_name(cfg, dims), dims.pp, virtual_size(cfg, dims), cfg.train.grad_accum_steps,
                     st.rank, tuple(sum(k.values()) for k in per_chunk))


def activation_parts(cfg: Config, dims: ParallelDims, stage: int | Stage | None = None) -> dict[str, int]:
    """Bytes the forward keeps for backward, per rank, split into the parts `train.recompute` changes.
    Elements × b unless said otherwise; counts per layer, summed over the layers.

    Without recompute (train.recompute=none):
    attention   per block  2·T·D + T·Dh·(2H + 2Hkv)/tp   (RMSNorm input and output, replicated over tp; q, k,
                                                          v and the output, a fused flash-style kernel that
                                                          keeps no S×S score matrix)
    dense MLP   per layer  T·(wi + Fd)/tp                (wi = 2Fd for SwiGLU else Fd: the input GEMM's output
                                                          and the activation's output)
    MoE layer   per layer  Ts·E·2 fp32                   (router logits and probabilities)
                           + R·D·(2 + 2·etp)             (R = kept rows: permuted rows, rows received and
                                                          ETP-gathered, expert output, rows combined back)
                           + R·(wi + F)                  (expert hidden of the etp·R rows at F/etp each)
                           + Ts·(wis + Fs)               (shared experts, replicated)
    head                   T·D·2 + T·V·b + T·V fp32      (final norm, logits and their fp32 copy for the loss)

    What train.recompute changes:
    moe_act     the routed experts' activation output (R·F per MoE layer) is recomputed from the kept input
                GEMM output; the working set adds one layer's R·F back while its backward runs
    moe         each MoE layer keeps only its input [T, D]; the working set is one MoE layer's full
                activations, rebuilt in its backward
    block       each block keeps only its input [T, D]; the working set is one block's full activations
                (attention + its MLP or MoE layer), rebuilt in its backward
    The head is never recomputed. No sequence parallelism (norms and residuals are replicated over tp).

    With pipeline stages the parts are those of `stage`'s layers (None: the stage whose activations are the
    largest), each chunk's counted once per micro-batch it holds in flight (`in_flight`), the head on the chunk
    holding the last virtual stage; the working set is one layer's, counted once.
    """
    if stage is None:
        return max((activation_parts(cfg, dims, st) for st in stages(cfg, dims)), key=lambda d: sum(d.values()))
    st = _stage(cfg, dims, stage)
    mode = cfg.train.recompute
    lb = _layer_bytes(cfg, dims)
    keys = ("block_inputs", "working_set") if mode == "block" else ("attention", "dense_mlp", "moe", "working_set")
    parts = dict.fromkeys(keys, 0.0)
    per_chunk = _chunk_kept(cfg, dims, st, lb)
    flights = _flights(cfg, dims, st, per_chunk)
    head_total = 0.0
    for kept, n in zip(per_chunk, flights):
        head_total += n * kept.pop("head")
        for k, v in kept.items():
            parts[k] += n * v
    n_moe = st.n_moe
    if mode == "moe_act":
        parts["working_set"] = lb["act_out"] if n_moe else 0
    elif mode == "moe":
        parts["working_set"] = lb["moe"] if n_moe else 0
    elif mode == "block":
        parts["working_set"] = lb["attn"] + (lb["moe"] if n_moe else lb["dense"]) if st.n_layers else 0
    parts["head"] = head_total
    return {k: int(v) for k, v in parts.items()}


def activation_bytes(cfg: Config, dims: ParallelDims, stage: int | Stage | None = None) -> int:
    """Everything `activation_parts` counts."""
    return sum(activation_parts(cfg, dims, stage).values())


def shard_divisors(cfg: Config, dims: ParallelDims) -> tuple[int, int]:
    """(s_d, s_e): the optimizer state of dense parameters is split over dp, of experts over edp."""
    return (dims.dp, dims.edp) if cfg.train.shard_optimizer != "none" else (1, 1)


def shard_elements(cfg: Config, dims: ParallelDims, params: ParamCounts) -> int:
    """Elements of the rank's optimizer shard: P_d/s_d + P_e/s_e, each padded up to a multiple of its group."""
    s_d, s_e = shard_divisors(cfg, dims)
    return math.ceil(params.dense / s_d) + math.ceil(params.expert / s_e)


def bucket_elements(cfg: Config, dims: ParallelDims, params: ParamCounts, stage: int | Stage = 0) -> int:
    return min(params.total, max(REDUCE_BUCKET_ELEMENTS, largest_parameter(cfg, dims, stage)))


def heaviest_stage(cfg: Config, dims: ParallelDims) -> int:
    """The pp rank whose ranks need the most memory (0 when pp = 1): it decides whether a layout fits."""
    if dims.pp == 1:
        return 0
    totals = [memory_per_rank(cfg, dims, None, st).total for st in stages(cfg, dims)]
    return totals.index(max(totals))


def memory_per_rank(cfg: Config, dims: ParallelDims, params: ParamCounts | None = None,
                    stage: int | Stage | None = None) -> Memory:
    """The memory formula (the native engine allocates it, a multi-rank test compares the two):
    weights     w·(P_d + P_e)
    grads       4·(P_d + P_e)  fp32 accumulation buffers (with fp32 weights: the .grad tensors), for
                shard_optimizer none and states; 4·(P_d/s_d + P_e/s_e) + 4·bucket for states+grads (each bucket
                is reduce-scattered into the rank's fp32 shard as soon as backward has filled it)
    optimizer   8·(P_d/s_d + P_e/s_e)  AdamW's two fp32 moments, + 4·(P_d/s_d + P_e/s_e) fp32 master weights
                when w = 2 (with fp32 weights the rank's slice of the weights is the master: no copy)
    activations `activation_parts` (micro-batch train.batch_size, train.recompute, micro-batches in flight)
    Shards pad up to a multiple of their group size. With pipeline stages the P's are those of one rank of
    `stage` (None: the stage whose total is the largest, which decides whether the layout fits; `params` is then
    ignored); `params` must be that stage's counts (None: counted here)."""
    if stage is None and dims.pp > 1:
        return max((memory_per_rank(cfg, dims, None, st) for st in stages(cfg, dims)), key=lambda x: x.total)
    st = _stage(cfg, dims, 0 if stage is None else stage)
    params = params if params is not None else param_counts(cfg, dims, st)
    w = weight_bytes(cfg)
    shard = shard_elements(cfg, dims, params)
    if cfg.train.shard_optimizer == "states+grads":
        grads = FP32 * (shard + bucket_elements(cfg, dims, params, st))
    else:
        grads = FP32 * params.total
    optimizer = (2 * FP32 + (FP32 if w == 2 else 0)) * shard
    return Memory(w * params.total, grads, optimizer, activation_bytes(cfg, dims, st))


def memory_terms(cfg: Config, dims: ParallelDims, params: ParamCounts | None = None,
                 stage: int | None = None) -> dict[str, str]:
    """Each memory term as the formula with this layout's numbers in it, for one rank of `stage` (None: the
    heaviest stage; `params` must be that stage's counts, None: counted here)."""
    stage = heaviest_stage(cfg, dims) if stage is None else stage
    params = params if params is not None else param_counts(cfg, dims, stage)
    t, w = cfg.train, weight_bytes(cfg)
    s_d, s_e = shard_divisors(cfg, dims)
    shard = (f"(P_d/{s_d} + P_e/{s_e})" if t.shard_optimizer != "none" else "(P_d + P_e)")
    grads = (f"4 B × {shard} + 4 B × one bucket of {bucket_elements(cfg, dims, params, stage):,} (reduce-scattered "
             "into the shard as backward fills it)" if t.shard_optimizer == "states+grads"
             else "4 B × (P_d + P_e) fp32 accumulation buffers" + (" (the .grad tensors)" if w == 4 else ""))
    opt = f"8 B × {shard} AdamW moments" + (f" + 4 B × {shard} fp32 master weights" if w == 2 else
                                            " (fp32 weights are their own master)")
    parts = activation_parts(cfg, dims, stage)
    flights = ""
    if dims.pp > 1:
        n = stage_in_flight(cfg, dims, stage)
        flights = (f", {'+'.join(map(str, n))} micro-batches in flight ({cfg.parallel.pp_schedule}, "
                   f"stage {stage} of {dims.pp})")
    acts = (f"micro-batch {t.batch_size}×{t.seq_len} tokens{flights}, recompute={t.recompute}: "
            + ", ".join(f"{k} {_gib(v)}" for k, v in parts.items() if v))
    return {"weights": f"{w} B × (P_d {params.dense:,} + P_e {params.expert:,})"
                       + (" bf16" if w == 2 else " fp32"),
            "grads": grads, "optimizer": opt, "activations": acts}


def make_plan(cfg: Config, world: int) -> Plan:
    """The plan of `cfg` on `world` ranks; a layout that cannot run raises `LayoutError` (from check_layout)."""
    dims = check_layout(cfg, world)
    t = cfg.train
    sched, v = schedule_name(cfg, dims), virtual_size(cfg, dims)
    per_stage = []
    for st in stages(cfg, dims):
        params = param_counts(cfg, dims, st)
        per_stage.append(StagePlan(st, params, memory_per_rank(cfg, dims, params, st),
                                   stage_in_flight(cfg, dims, st),
                                   activation_parts(cfg, dims, st)))
    totals = [sp.memory.total for sp in per_stage]
    h = totals.index(max(totals))
    heavy = per_stage[h]
    return Plan(dims, {name: dims.rank_groups(name) for name in ALL_GROUP_NAMES},
                [dims.coords(r) for r in range(world)], cfg.moe.num_experts // dims.ep,
                param_counts(cfg, ParallelDims(world=1)), heavy.params,
                heavy.memory, comm_per_rank(cfg, dims), t.dtype,
                memory_terms(cfg, dims, heavy.params, h), heavy.activation_parts,
                {"weight_bytes": weight_bytes(cfg), "shard_optimizer": t.shard_optimizer, "recompute": t.recompute,
                 "batch_size": t.batch_size, "seq_len": t.seq_len, "grad_accum_steps": t.grad_accum_steps},
                per_stage, h, p2p_per_step(cfg, dims),
                {"pp": dims.pp, "virtual": v, "schedule": sched, "micro_batches": t.grad_accum_steps,
                 "bubble_fraction": schedule_bubble(cfg, dims), "warnings": layout_warnings(cfg, dims)})


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def to_json(plan: Plan) -> dict[str, Any]:
    """Stable keys: layout, train, groups, ranks, params{global,per_rank}, memory_bytes, memory_terms,
    activations_bytes, alltoall, pipeline. per_rank, memory_* and activations_bytes describe the heaviest pipeline
    stage (every rank when pp = 1); pipeline.stages lists each stage's."""
    d, c = plan.dims, plan.comm
    mem = dataclasses.asdict(plan.memory) | {"total": plan.memory.total}
    return {
        "layout": {"world": d.world, "tp": d.tp, "dp": d.dp, "ep": d.ep, "etp": d.etp, "edp": d.edp,
                   "pp": d.pp, "dtype": plan.dtype},
        "train": plan.train,
        "groups": plan.groups,
        "ranks": [{"rank": r, **co, "experts": _experts(plan, co)} for r, co in enumerate(plan.coords)],
        "params": {"global": dataclasses.asdict(plan.params_global),
                   "per_rank": dataclasses.asdict(plan.params_rank)},
        "memory_bytes": mem,
        "memory_terms": plan.memory_terms,
        "activations_bytes": plan.activation_parts,
        "alltoall": {"moe_layers": c.moe_layers, "micro_batches": c.micro_batches,
                     "rows_per_layer": {k: _num(v) for k, v in c.rows.items()},
                     "bytes_per_layer": {k: _num(v) for k, v in (c.alltoall_bytes | c.etp_bytes).items()},
                     "bytes_per_layer_total": _num(c.per_layer_total()),
                     "bytes_per_step_total": _num(c.per_step_total())},
        "pipeline": _pipeline_json(plan),
    }


def _pipeline_json(plan: Plan) -> dict[str, Any]:
    p2p = plan.p2p
    return plan.pipeline | {
        "heaviest_stage": plan.heaviest,
        "p2p": {"activation_shape": list(p2p.activation_shape), "bytes_per_transfer": p2p.transfer_bytes,
                "boundaries": p2p.boundaries, "bytes_per_step": p2p.per_step,
                "sent_bytes_per_rank": list(p2p.sent_per_rank)},
        "stages": [{"stage": sp.stage.rank, "virtual_stages": list(sp.stage.virtual),
                    "layers": [[c.start, c.stop - 1] if len(c) else [] for c in sp.stage.chunks],
                    "embedding": sp.stage.first, "head": sp.stage.last,
                    "params": dataclasses.asdict(sp.params),
                    "memory_bytes": dataclasses.asdict(sp.memory) | {"total": sp.memory.total},
                    "in_flight": list(sp.in_flight), "activations_bytes": sp.activation_parts}
                   for sp in plan.stages]}


def _experts(plan: Plan, coords: dict[str, int]) -> list[int]:
    """[first, last] global expert ids on the rank (each split over etp along F)."""
    return [coords["ep"] * plan.local_experts, (coords["ep"] + 1) * plan.local_experts - 1]


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.2f} MiB"


def format_memory(plan: Plan) -> list[str]:
    """The memory table, one line per term with the formula behind it."""
    d, t, m = plan.dims, plan.train, plan.memory
    shard = ("" if t["shard_optimizer"] == "none"
             else f" over dp={d.dp} (dense) and edp={d.edp} (experts)")
    where = f"the heaviest stage's ranks (stage {plan.heaviest})" if d.pp > 1 else "rank"
    out = [f"memory per {where} ({'bf16' if t['weight_bytes'] == 2 else 'fp32'} weights, fp32 grads, AdamW; "
           f"train.shard_optimizer={t['shard_optimizer']}{shard}; train.recompute={t['recompute']}; "
           f"micro-batch {t['batch_size']}×{t['seq_len']}):"]
    out += [f"  {k:<12}{_gib(getattr(m, k)):>14}   {plan.memory_terms.get(k, '')}"
            for k in ("weights", "grads", "optimizer", "activations")]
    out.append(f"  {'total':<12}{_gib(m.total):>14}")
    return out


def format_pipeline(plan: Plan) -> list[str]:
    """Per stage: its layers, what else it holds, micro-batches in flight, memory per rank; then P2P and bubble."""
    pl, p2p = plan.pipeline, plan.p2p
    v = pl["virtual"]
    out = [f"pipeline: {pl['pp']} stages × {v} chunk{'s' if v > 1 else ''}, schedule {pl['schedule']}, "
           f"{pl['micro_batches']} micro-batches per step (train.grad_accum_steps); bubble "
           f"{pl['bubble_fraction']:.1%} of the step = (p-1)/({'v·' if pl['schedule'] == 'interleaved' else ''}m+p-1)",
           f"  {'stage':<6}{'layers':<22}{'holds':<11}{'in flight':>10}{'params':>16}"
           f"{'weights':>11}{'grads':>11}{'optim':>11}{'acts':>11}{'total':>11}"]
    for sp in plan.stages:
        st, m = sp.stage, sp.memory
        layers = " ".join(f"{c.start}-{c.stop - 1}" if len(c) else "-" for c in st.chunks)
        holds = "+".join(x for x, on in (("embed", st.first), ("head", st.last)) if on) or "-"
        mark = " *" if st.rank == plan.heaviest else ""
        out.append(f"  {st.rank:<6}{layers:<22}{holds:<11}{'+'.join(map(str, sp.in_flight)):>10}"
                   f"{sp.params.total:>16,d}" + "".join(f"{x / 2**30:>11.2f}" for x in
                                                       (m.weights, m.grads, m.optimizer, m.activations, m.total))
                   + mark)
    out.append("  (GiB per rank; * the heaviest stage, which decides whether the layout fits)")
    out += [f"warning: {w}" for w in pl.get("warnings", [])]
    mb, s_, dim = p2p.activation_shape
    out.append(f"P2P per step: {p2p.boundaries} stage boundaries × {p2p.micro_batches} micro-batches × "
               f"(activation [{mb}, {s_}, {dim}] forward + its gradient backward) × {_gib(p2p.transfer_bytes)} = "
               f"{_gib(p2p.per_step)} per pipeline; sent per rank: "
               + ", ".join(f"stage {i} {_gib(b)}" for i, b in enumerate(p2p.sent_per_rank)))
    return out


def format_plan(plan: Plan, title: str = "") -> str:
    d, c = plan.dims, plan.comm
    out = [f"moe-dist plan: {title} | {d.describe()} | {plan.dtype}", "", "rank groups:"]
    for name, groups in plan.groups.items():
        if d.pp == 1 and name in ("pp", "stage", "embed"):
            continue
        text = " ".join("[" + ",".join(map(str, g)) + "]" for g in groups)
        out.append(textwrap.fill(text, 110, initial_indent=f"  {name:<10}", subsequent_indent=" " * 12))
    axes = ("tp", "dp", "etp", "ep", "edp") + (("pp",) if d.pp > 1 else ())
    out += ["", "rank  " + "  ".join(f"{a:>4}" for a in axes) + "  experts"]
    out += [f"{r:>4}  " + "  ".join(f"{co[a]:>4}" for a in axes) + "  {}-{}".format(*_experts(plan, co))
            for r, co in enumerate(plan.coords)]
    out += ["", f"{'parameters':<12}{'whole model':>18}{'per rank':>18}"
            + (f"   (the heaviest stage's, stage {plan.heaviest})" if d.pp > 1 else "")]
    for k in ("dense", "expert", "total", "active"):
        g, r = getattr(plan.params_global, k), getattr(plan.params_rank, k)
        out.append(f"  {k:<10}{g:>18,d}{r:>18,d}")
    out += ["", *format_memory(plan)]
    if d.pp > 1:
        out += ["", *format_pipeline(plan)]
    out += ["", f"all-to-all per rank, uniform routing, {c.moe_layers} MoE layers"
            + (" on the rank's stage" if d.pp > 1 else "") + f", {c.micro_batches} micro-batch"
            + ("es" if c.micro_batches > 1 else "") + " per step (rows per layer: "
            + ", ".join(f"{k} {v:,.0f}" for k, v in c.rows.items()) + ")",
            f"  {'collective':<16}{'per layer':>16}{'per step':>16}"]
    for k, v in (c.alltoall_bytes | (c.etp_bytes if d.etp > 1 else {})).items():
        out.append(f"  {k:<16}{_gib(v):>16}{_gib(v * c.moe_layers * c.micro_batches):>16}")
    out.append(f"  {'total':<16}{_gib(c.per_layer_total()):>16}{_gib(c.per_step_total()):>16}")
    return "\n".join(out)
