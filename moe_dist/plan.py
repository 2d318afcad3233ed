"""`moe-dist plan`: what one layout costs each rank, computed from the config alone (no process, no tensor).

Legend: T tokens of one dp rank's micro-batch (train.batch_size·train.seq_len), Ts = T/tp the slice each
tp rank routes, D model dim, F expert hidden, Fd dense hidden, Fs shared-expert hidden, E experts, K top-k,
H / Hkv / Dh attention heads / key-value heads / head dim (model.head_dim, default D/H), V vocabulary,
b bytes per activation element (2 for train.dtype=bfloat16, else 4), w bytes per weight (the same: `plan`
describes a GPU run, where bfloat16 training keeps bf16 weights), P_d / P_e the dense / expert parameters a
rank holds, s_d / s_e the optimizer-shard divisors (dp / edp when train.shard_optimizer is not none, else 1).

Every rank of a layout holds the same shapes (attention heads and dense MLPs split over tp; routed experts
split over ep as whole experts and over etp along F; router, norms, embeddings, head and shared experts
replicated), so one set of per-rank numbers describes them all. Counts are analytic, so a 47B-parameter
config plans in milliseconds; tests check them against the meta-device model of every layout.
"""
from __future__ import annotations

import dataclasses
import math
import textwrap
from dataclasses import dataclass
from typing import Any

from moe_dist.config import Config, MoEConfig, ModelConfig
from moe_dist.models.gpt import is_moe_layer
from moe_dist.moe.capacity import expert_capacity
from moe_dist.parallel.layout import check_layout
from moe_dist.parallel.topology import GROUP_NAMES, ParallelDims
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
    `*_bytes` entry is what the rank sends in one collective (it receives as much), per layer."""
    rows: dict[str, float]
    alltoall_bytes: dict[str, float]   # dispatch_fwd, combine_fwd, dispatch_bwd, combine_bwd
    etp_bytes: dict[str, float]        # all-gather / reduce-scatter inside the ETP group (zeros if etp=1)
    moe_layers: int

    def per_layer_total(self) -> float:
        return sum(self.alltoall_bytes.values()) + sum(self.etp_bytes.values())

    def per_step_total(self) -> float:
        return self.per_layer_total() * self.moe_layers


@dataclass(frozen=True)
class Plan:
    dims: ParallelDims
    groups: dict[str, list[list[int]]]     # group name → every group's ranks (Megatron-core's order)
    coords: list[dict[str, int]]           # per rank: its index on tp, dp, etp, ep, edp
    local_experts: int                     # routed experts per rank: ep rank r holds [r·L, (r+1)·L)
    params_global: ParamCounts
    params_rank: ParamCounts
    memory: Memory
    comm: Comm
    dtype: str
    memory_terms: dict[str, str] = dataclasses.field(default_factory=dict)   # term → its formula and inputs
    activation_parts: dict[str, int] = dataclasses.field(default_factory=dict)
    train: dict[str, Any] = dataclasses.field(default_factory=dict)          # the memory-relevant train fields


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


def param_counts(cfg: Config, dims: ParallelDims) -> ParamCounts:
    """Parameters one rank holds; `ParallelDims(world=1)` gives the whole model."""
    m, e = cfg.model, cfg.moe
    attn = _attention_params(m, dims.tp)
    dense_mlp = m.dim * _width(m.dense_hidden, e.activation) // dims.tp
    shared = m.dim * _width(_shared_hidden(e), e.activation)
    gate = m.dim if (e.shared_expert_gate and e.num_shared_experts) else 0    # sigmoid gate on the shared output
    n_moe = _moe_layers(m)
    per_layer = attn + 2 * m.dim               # two RMSNorm weights per block
    dense = (m.n_layers * per_layer + (m.n_layers - n_moe) * dense_mlp
             + n_moe * (e.num_experts * m.dim + shared + gate)
             + m.vocab_size * m.dim * (1 if m.tie_embeddings else 2) + m.dim)
    expert = n_moe * (e.num_experts // dims.ep) * m.dim * _width(e.expert_hidden // dims.etp, e.activation)
    return ParamCounts(dense, expert, dense + expert, dense + expert * e.top_k // e.num_experts)


def largest_parameter(cfg: Config, dims: ParallelDims) -> int:
    """Elements of the largest single parameter tensor on a rank (a reduction bucket holds at least it)."""
    m, e = cfg.model, cfg.moe
    hd, kv = head_dim(m), m.n_kv_heads or m.n_heads
    local = e.num_experts // dims.ep
    return max(local * m.dim * _in_width(e.expert_hidden // dims.etp, e.activation),      # w_in of the experts
               m.vocab_size * m.dim,                                                        # embedding, head
               m.dim * m.n_heads * hd // dims.tp, m.dim * 2 * kv * hd // dims.tp,
               m.dim * _in_width(m.dense_hidden, e.activation) // dims.tp,
               m.dim * _in_width(_shared_hidden(e), e.activation))


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


def comm_per_rank(cfg: Config, dims: ParallelDims) -> Comm:
    """Dispatch forward sends the `sent` rows; combine forward returns them; the backward of each is the
    same exchange in reverse. With etp > 1 the received rows are all-gathered over etp before the experts
    and the partial outputs reduce-scattered after; backward swaps the two. A row is D·b bytes."""
    rows = alltoall_rows_per_layer(cfg, dims)
    row_bytes = cfg.model.dim * DTYPE_BYTES[cfg.train.dtype]
    a2a = rows["sent"] * row_bytes
    etp = rows["etp_gathered"] * row_bytes
    return Comm(rows,
                {"dispatch_fwd": a2a, "combine_fwd": a2a, "dispatch_bwd": a2a, "combine_bwd": a2a},
                {"gather_fwd": etp, "scatter_fwd": etp, "gather_bwd": etp, "scatter_bwd": etp},
                _moe_layers(cfg.model))


def activation_parts(cfg: Config, dims: ParallelDims) -> dict[str, int]:
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
    """
    m, e, t = cfg.model, cfg.moe, cfg.train
    b = DTYPE_BYTES[t.dtype]
    T, hd, kv = t.batch_size * t.seq_len, head_dim(m), m.n_kv_heads or m.n_heads
    rows = alltoall_rows_per_layer(cfg, dims)
    R, Ts = rows["kept"], rows["tokens"]
    n_moe = _moe_layers(m)
    n_dense = m.n_layers - n_moe
    attn = (2 * T * m.dim + T * hd * (2 * m.n_heads + 2 * kv) / dims.tp) * b
    dense = T * (_in_width(m.dense_hidden, e.activation) + m.dense_hidden) / dims.tp * b
    act_out = R * e.expert_hidden * b                     # the routed experts' activation output
    moe = (Ts * e.num_experts * 2 * FP32 + (R * m.dim * (2 + 2 * dims.etp)
           + R * _width(e.expert_hidden, e.activation) + Ts * _width(_shared_hidden(e), e.activation)) * b)
    head = (2 * T * m.dim + T * m.vocab_size) * b + T * m.vocab_size * FP32
    layer_input = T * m.dim * b
    mode = t.recompute
    if mode == "none":
        parts = {"attention": m.n_layers * attn, "dense_mlp": n_dense * dense, "moe": n_moe * moe, "working_set": 0}
    elif mode == "moe_act":
        parts = {"attention": m.n_layers * attn, "dense_mlp": n_dense * dense, "moe": n_moe * (moe - act_out),
                 "working_set": act_out if n_moe else 0}
    elif mode == "moe":
        parts = {"attention": m.n_layers * attn, "dense_mlp": n_dense * dense, "moe": n_moe * layer_input,
                 "working_set": moe if n_moe else 0}
    else:                                                 # block
        parts = {"block_inputs": m.n_layers * layer_input, "working_set": attn + (moe if n_moe else dense)}
    parts["head"] = head
    return {k: int(v) for k, v in parts.items()}


def activation_bytes(cfg: Config, dims: ParallelDims) -> int:
    """Everything `activation_parts` counts."""
    return sum(activation_parts(cfg, dims).values())


def shard_divisors(cfg: Config, dims: ParallelDims) -> tuple[int, int]:
    """(s_d, s_e): the optimizer state of dense parameters is split over dp, of experts over edp."""
    return (dims.dp, dims.edp) if cfg.train.shard_optimizer != "none" else (1, 1)


def shard_elements(cfg: Config, dims: ParallelDims, params: ParamCounts) -> int:
    """Elements of the rank's optimizer shard: P_d/s_d + P_e/s_e, each padded up to a multiple of its group."""
    s_d, s_e = shard_divisors(cfg, dims)
    return math.ceil(params.dense / s_d) + math.ceil(params.expert / s_e)


def bucket_elements(cfg: Config, dims: ParallelDims, params: ParamCounts) -> int:
    return min(params.total, max(REDUCE_BUCKET_ELEMENTS, largest_parameter(cfg, dims)))


def memory_per_rank(cfg: Config, dims: ParallelDims, params: ParamCounts) -> Memory:
    """The memory formula (the native engine allocates it, a multi-rank test compares the two):
    weights     w·(P_d + P_e)
    grads       4·(P_d + P_e)  fp32 accumulation buffers (with fp32 weights: the .grad tensors), for
                shard_optimizer none and states; 4·(P_d/s_d + P_e/s_e) + 4·bucket for states+grads (each bucket
                is reduce-scattered into the rank's fp32 shard as soon as backward has filled it)
    optimizer   8·(P_d/s_d + P_e/s_e)  AdamW's two fp32 moments, + 4·(P_d/s_d + P_e/s_e) fp32 master weights
                when w = 2 (with fp32 weights the rank's slice of the weights is the master: no copy)
    activations `activation_parts` (micro-batch train.batch_size, train.recompute)
    Shards pad up to a multiple of their group size."""
    w = weight_bytes(cfg)
    shard = shard_elements(cfg, dims, params)
    if cfg.train.shard_optimizer == "states+grads":
        grads = FP32 * (shard + bucket_elements(cfg, dims, params))
    else:
        grads = FP32 * params.total
    optimizer = (2 * FP32 + (FP32 if w == 2 else 0)) * shard
    return Memory(w * params.total, grads, optimizer, activation_bytes(cfg, dims))


def memory_terms(cfg: Config, dims: ParallelDims, params: ParamCounts) -> dict[str, str]:
    """Each memory term as the formula with this layout's numbers in it."""
    t, w = cfg.train, weight_bytes(cfg)
    s_d, s_e = shard_divisors(cfg, dims)
    shard = (f"(P_d/{s_d} + P_e/{s_e})" if t.shard_optimizer != "none" else "(P_d + P_e)")
    grads = (f"4 B × {shard} + 4 B × one bucket of {bucket_elements(cfg, dims, params):,} (reduce-scattered "
             "into the shard as backward fills it)" if t.shard_optimizer == "states+grads"
             else "4 B × (P_d + P_e) fp32 accumulation buffers" + (" (the .grad tensors)" if w == 4 else ""))
    opt = f"8 B × {shard} AdamW moments" + (f" + 4 B × {shard} fp32 master weights" if w == 2 else
                                            " (fp32 weights are their own master)")
    parts = activation_parts(cfg, dims)
    acts = (f"micro-batch {t.batch_size}×{t.seq_len} tokens, recompute={t.recompute}: "
            + ", ".join(f"{k} {_gib(v)}" for k, v in parts.items() if v))
    return {"weights": f"{w} B × (P_d {params.dense:,} + P_e {params.expert:,})"
                       + (" bf16" if w == 2 else " fp32"),
            "grads": grads, "optimizer": opt, "activations": acts}


def make_plan(cfg: Config, world: int) -> Plan:
    """The plan of `cfg` on `world` ranks; a layout that cannot run raises `LayoutError` (from check_layout)."""
    dims = check_layout(cfg, world)
    params = param_counts(cfg, dims)
    t = cfg.train
    return Plan(dims, {name: dims.rank_groups(name) for name in GROUP_NAMES},
                [dims.coords(r) for r in range(world)], cfg.moe.num_experts // dims.ep,
                param_counts(cfg, ParallelDims(world=1)), params,
                memory_per_rank(cfg, dims, params), comm_per_rank(cfg, dims), t.dtype,
                memory_terms(cfg, dims, params), activation_parts(cfg, dims),
                {"weight_bytes": weight_bytes(cfg), "shard_optimizer": t.shard_optimizer, "recompute": t.recompute,
                 "batch_size": t.batch_size, "seq_len": t.seq_len, "grad_accum_steps": t.grad_accum_steps})


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def to_json(plan: Plan) -> dict[str, Any]:
    """Stable keys: layout, train, groups, ranks, params{global,per_rank}, memory_bytes, memory_terms,
    activations_bytes, alltoall."""
    d, c = plan.dims, plan.comm
    mem = dataclasses.asdict(plan.memory) | {"total": plan.memory.total}
    return {
        "layout": {"world": d.world, "tp": d.tp, "dp": d.dp, "ep": d.ep, "etp": d.etp, "edp": d.edp,
                   "dtype": plan.dtype},
        "train": plan.train,
        "groups": plan.groups,
        "ranks": [{"rank": r, **co, "experts": _experts(plan, co)} for r, co in enumerate(plan.coords)],
        "params": {"global": dataclasses.asdict(plan.params_global),
                   "per_rank": dataclasses.asdict(plan.params_rank)},
        "memory_bytes": mem,
        "memory_terms": plan.memory_terms,
        "activations_bytes": plan.activation_parts,
        "alltoall": {"moe_layers": c.moe_layers,
                     "rows_per_layer": {k: _num(v) for k, v in c.rows.items()},
                     "bytes_per_layer": {k: _num(v) for k, v in (c.alltoall_bytes | c.etp_bytes).items()},
                     "bytes_per_layer_total": _num(c.per_layer_total()),
                     "bytes_per_step_total": _num(c.per_step_total())},
    }


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
    out = [f"memory per rank ({'bf16' if t['weight_bytes'] == 2 else 'fp32'} weights, fp32 grads, AdamW; "
           f"train.shard_optimizer={t['shard_optimizer']}{shard}; train.recompute={t['recompute']}; "
           f"micro-batch {t['batch_size']}×{t['seq_len']}):"]
    out += [f"  {k:<12}{_gib(getattr(m, k)):>14}   {plan.memory_terms.get(k, '')}"
            for k in ("weights", "grads", "optimizer", "activations")]
    out.append(f"  {'total':<12}{_gib(m.total):>14}")
    return out


def format_plan(plan: Plan, title: str = "") -> str:
    d, c = plan.dims, plan.comm
    out = [f"moe-dist plan: {title} | {d.describe()} | {plan.dtype}", "", "rank groups:"]
    for name, groups in plan.groups.items():
        text = " ".join("[" + ",".join(map(str, g)) + "]" for g in groups)
        out.append(textwrap.fill(text, 110, initial_indent=f"  {name:<10}", subsequent_indent=" " * 12))
    axes = ("tp", "dp", "etp", "ep", "edp")
    out += ["", "rank  " + "  ".join(f"{a:>4}" for a in axes) + "  experts"]
    out += [f"{r:>4}  " + "  ".join(f"{co[a]:>4}" for a in axes) + "  {}-{}".format(*_experts(plan, co))
            for r, co in enumerate(plan.coords)]
    out += ["", f"{'parameters':<12}{'whole model':>18}{'per rank':>18}"]
    for k in ("dense", "expert", "total", "active"):
        g, r = getattr(plan.params_global, k), getattr(plan.params_rank, k)
        out.append(f"  {k:<10}{g:>18,d}{r:>18,d}")
    out += ["", *format_memory(plan)]
    out += ["", f"all-to-all per rank, uniform routing, {c.moe_layers} MoE layers (rows per layer: "
            + ", ".join(f"{k} {v:,.0f}" for k, v in c.rows.items()) + ")",
            f"  {'collective':<16}{'per layer':>16}{'per step':>16}"]
    for k, v in (c.alltoall_bytes | (c.etp_bytes if d.etp > 1 else {})).items():
        out.append(f"  {k:<16}{_gib(v):>16}{_gib(v * c.moe_layers):>16}")
    out.append(f"  {'total':<16}{_gib(c.per_layer_total()):>16}{_gib(c.per_step_total()):>16}")
    return "\n".join(out)
