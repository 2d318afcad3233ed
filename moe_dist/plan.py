"""`moe-dist plan`: what one layout costs each rank, computed from the config alone (no process, no tensor).

Legend: T tokens of one dp rank's micro-batch (train.batch_size·train.seq_len), Ts = T/tp the slice each
tp rank routes, D model dim, F expert hidden, Fd dense hidden, Fs shared-expert hidden, E experts, K top-k,
H / Hkv / Dh attention heads / key-value heads / head dim, V vocabulary, b bytes per element of train.dtype.

Every rank of a layout holds the same shapes (attention heads and dense MLPs split over tp; routed experts
split over ep as whole experts and over etp along F; router, norms, embeddings, head and shared experts
replicated), so one set of per-rank numbers describes them all. Counts are analytic, so a 47B-parameter
config plans in milliseconds; tests check them against the meta-device model of every layout.
"""
from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass
from typing import Any

from moe_dist.config import Config, MoEConfig, ModelConfig
from moe_dist.models.gpt import is_moe_layer
from moe_dist.moe.capacity import expert_capacity
from moe_dist.parallel.layout import check_layout
from moe_dist.parallel.topology import GROUP_NAMES, ParallelDims

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
FP32 = 4


@dataclass(frozen=True)
class ParamCounts:
    dense: int          # everything but the routed experts (router and shared experts included)
    expert: int         # routed-expert weights
    total: int
    active: int         # used per token: dense + expert·K/E (a rank's share under uniform routing)


@dataclass(frozen=True)
class Memory:
    """Bytes per rank. Optimizer state is AdamW's two fp32 moments, plus an fp32 master copy of the weights
    when train.dtype is bfloat16; nothing is sharded over data parallelism (no ZeRO)."""
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


def _width(hidden: int, activation: str) -> int:
    """Columns of one MLP per input row: [D, 2F] (SwiGLU's fused gate|up) or [D, F] in, [F, D] out."""
    return hidden * (3 if activation == "swiglu" else 2)


def _shared_hidden(e: MoEConfig) -> int:
    return (e.shared_expert_hidden or e.num_shared_experts * e.expert_hidden) if e.num_shared_experts else 0


def _moe_layers(m: ModelConfig) -> int:
    return sum(is_moe_layer(m, i) for i in range(m.n_layers))


def param_counts(cfg: Config, dims: ParallelDims) -> ParamCounts:
    """Parameters one rank holds; `ParallelDims(world=1)` gives the whole model."""
    m, e = cfg.model, cfg.moe
    hd, kv = m.dim // m.n_heads, m.n_kv_heads or m.n_heads
    attn = (m.dim * (m.n_heads + 2 * kv) * hd + m.n_heads * hd * m.dim) // dims.tp
    dense_mlp = m.dim * _width(m.dense_hidden, e.activation) // dims.tp
    shared = m.dim * _width(_shared_hidden(e), e.activation)
    n_moe = _moe_layers(m)
    per_layer = attn + 2 * m.dim               # two RMSNorm weights per block
    dense = (m.n_layers * per_layer + (m.n_layers - n_moe) * dense_mlp + n_moe * (e.num_experts * m.dim + shared)
             + m.vocab_size * m.dim * (1 if m.tie_embeddings else 2) + m.dim)
    expert = n_moe * (e.num_experts // dims.ep) * m.dim * _width(e.expert_hidden // dims.etp, e.activation)
    return ParamCounts(dense, expert, dense + expert, dense + expert * e.top_k // e.num_experts)


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
    tokens = t.batch_size * t.seq_len // dims.tp        # config.validate checks that tp divides them
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


def activation_bytes(cfg: Config, dims: ParallelDims) -> int:
    """Estimate of what the forward keeps for backward, per rank (elements × b unless said otherwise):

    every block        2·T·D                          (RMSNorm input and output; replicated over tp)
    attention          T·Dh·(2H + 2Hkv)/tp            (q, k, v and the output; a fused flash-style kernel
                                                       that keeps no S×S score matrix)
    dense MLP          T·(w + Fd)/tp                  (w = 2Fd for SwiGLU else Fd: input GEMM output,
                                                       activation output)
    MoE layer          Ts·E·2·4 bytes                 (router logits and probabilities, fp32)
                       + R·D·(2 + 2·etp)              (R = kept rows: permuted rows, rows received and
                                                       ETP-gathered, expert output, rows combined back)
                       + R·(w + F)                    (expert hidden of the etp·R rows at F/etp each)
                       + Ts·(ws + Fs)                 (shared experts, replicated)
    head               T·D·2 + T·V·(b + 4)            (final norm, logits and their fp32 copy for the loss)
    No activation checkpointing, no sequence parallelism.
    """
    m, e, t = cfg.model, cfg.moe, cfg.train
    b = DTYPE_BYTES[t.dtype]
    T, hd, kv = t.batch_size * t.seq_len, m.dim // m.n_heads, m.n_kv_heads or m.n_heads

    rows = alltoall_rows_per_layer(cfg, dims)
    R, Ts = rows["kept"], rows["tokens"]
    per_block = 2 * T * m.dim + T * hd * (2 * m.n_heads + 2 * kv) / dims.tp
    dense = T * _width(m.dense_hidden, e.activation) / dims.tp
    moe = R * m.dim * (2 + 2 * dims.etp) + R * _width(e.expert_hidden, e.activation) + Ts * _width(_shared_hidden(e), e.activation)
    n_moe = _moe_layers(m)
    elements = (m.n_layers * per_block + (m.n_layers - n_moe) * dense + n_moe * moe + 2 * T * m.dim
                + T * m.vocab_size)
    return int(elements * b + n_moe * Ts * e.num_experts * 2 * FP32 + T * m.vocab_size * FP32)


def memory_per_rank(cfg: Config, dims: ParallelDims, params: ParamCounts) -> Memory:
    b = DTYPE_BYTES[cfg.train.dtype]
    moments = 2 * FP32 + (FP32 if b != FP32 else 0)     # AdamW exp_avg, exp_avg_sq (+ fp32 master weights)
    return Memory(params.total * b, params.total * b, params.total * moments, activation_bytes(cfg, dims))


def make_plan(cfg: Config, world: int) -> Plan:
    """The plan of `cfg` on `world` ranks; a layout that cannot run raises `LayoutError` (from check_layout)."""
    dims = check_layout(cfg, world)
    params = param_counts(cfg, dims)
    return Plan(dims, {name: dims.rank_groups(name) for name in GROUP_NAMES},
                [dims.coords(r) for r in range(world)], cfg.moe.num_experts // dims.ep,
                param_counts(cfg, ParallelDims(world=1)), params,
                memory_per_rank(cfg, dims, params), comm_per_rank(cfg, dims), cfg.train.dtype)


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def to_json(plan: Plan) -> dict[str, Any]:
    """Stable keys: layout, groups, ranks, params{global,per_rank}, memory_bytes, alltoall."""
    d, c = plan.dims, plan.comm
    mem = dataclasses.asdict(plan.memory) | {"total": plan.memory.total}
    return {
        "layout": {"world": d.world, "tp": d.tp, "dp": d.dp, "ep": d.ep, "etp": d.etp, "edp": d.edp,
                   "dtype": plan.dtype},
        "groups": plan.groups,
        "ranks": [{"rank": r, **co, "experts": _experts(plan, co)} for r, co in enumerate(plan.coords)],
        "params": {"global": dataclasses.asdict(plan.params_global),
                   "per_rank": dataclasses.asdict(plan.params_rank)},
        "memory_bytes": mem,
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
    m = plan.memory
    out += ["", "memory per rank (AdamW: 2 fp32 moments" + (", fp32 master weights" if plan.dtype != "float32" else "")
            + "; no ZeRO; activations estimated, no checkpointing):"]
    out += [f"  {k:<12}{_gib(getattr(m, k)):>16}" for k in ("weights", "grads", "optimizer", "activations", "total")]
    out += ["", f"all-to-all per rank, uniform routing, {c.moe_layers} MoE layers (rows per layer: "
            + ", ".join(f"{k} {v:,.0f}" for k, v in c.rows.items()) + ")",
            f"  {'collective':<16}{'per layer':>16}{'per step':>16}"]
    for k, v in (c.alltoall_bytes | (c.etp_bytes if d.etp > 1 else {})).items():
        out.append(f"  {k:<16}{_gib(v):>16}{_gib(v * c.moe_layers):>16}")
    out.append(f"  {'total':<16}{_gib(c.per_layer_total()):>16}{_gib(c.per_step_total()):>16}")
    return "\n".join(out)
