"""The MoE layer: route → capacity → dispatch → experts → combine (+ shared experts).
Legend: B sequences, S positions, T = B·S tokens, D model dim, E experts, K top-k, N permuted rows.

Each step is a public method that `forward` composes, so a benchmark or a test can run (and time) the same
steps one by one; the state of one forward passes between them as values (`Routing`, `CapacityResult`, the
dispatcher's metadata), never through `self`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from moe_dist.config import MoEConfig
from moe_dist.moe import losses
from moe_dist.moe.capacity import CapacityResult, apply_capacity, expert_capacity
from moe_dist.moe.dispatch import (AllToAllDispatcher, AllToAllMeta, DispatchMeta, Dispatcher, LocalDispatcher,
                                  keep_connected)
from moe_dist.moe.experts import GroupedExperts, resolve_backend, rows_backend
from moe_dist.moe.router import Router
from moe_dist.parallel.comm import all_reduce_, gather_rows, split_rows
from moe_dist.parallel.tensor_parallel import ParallelMLP, Shard
from moe_dist.parallel.topology import Topology


@dataclass(frozen=True)
class Routing:
    """The router's decision for this rank's tokens, with the losses it contributes (`MoELayer.route`)."""
    weights_TK: torch.Tensor          # fp32 combine weights of the chosen experts
    indices_TK: torch.Tensor          # int64 expert ids
    probs_TE: torch.Tensor            # fp32 probabilities over all experts
    logits_TE: torch.Tensor           # fp32 router logits
    counts_E: torch.Tensor            # int64 assignments per expert, before capacity drops
    aux_loss: torch.Tensor            # scaled by moe.aux_loss_coef, joined to the graph
    z_loss: torch.Tensor              # scaled by moe.z_loss_coef, joined to the graph


@dataclass(frozen=True)
class MoEStats:
    """One layer's forward, as a value. Counts are per expert over this process's tokens."""
    tokens_per_expert: torch.Tensor   # int64 [E] assignments processed (after drops)
    dropped: torch.Tensor             # int64 [E] assignments dropped by capacity
    aux_loss: torch.Tensor            # scaled by moe.aux_loss_coef, joined to the graph
    z_loss: torch.Tensor              # scaled by moe.z_loss_coef, joined to the graph
    entropy: torch.Tensor             # mean router entropy (nats), detached
    num_tokens: int                   # tokens this rank routed (its 1/tp slice under tensor parallelism)
    capacity: Optional[int]
    a2a_rows_out: int = 0             # rows this rank sent to other EP ranks in the dispatch
    a2a_rows_in: int = 0              # rows it received from them
    # bool [] on the device: every router logit of this rank was finite (read only when the loss is not,
    # to name the layer that produced the NaN/Inf; no host sync otherwise)
    router_finite: Optional[torch.Tensor] = None

    @property
    def drop_fraction(self) -> float:
        total = int(self.tokens_per_expert.sum() + self.dropped.sum())
        return float(self.dropped.sum()) / total if total else 0.0


class MoELayer(nn.Module):
    """`topo` is the parallel layout (single process when None). With tensor parallelism each tp rank
    routes a contiguous 1/tp of its (replicated) tokens and the outputs are all-gathered back, so every
    token is routed once; the router and shared experts then see partial gradients over tp
    (`MoEGPT.tp_partial_parameters`)."""

    def __init__(self, cfg: MoEConfig, dim: int, topo: Optional[Topology] = None,
                 dispatcher: Optional[Dispatcher] = None, recompute_activation: bool = False):
        super().__init__()
        self.cfg = cfg
        self.topo = topo = topo or Topology.single()
        self.router = Router(cfg, dim)
        hidden = cfg.expert_hidden // topo.etp.size      # etp divides it: judged by check_layout
        backend = resolve_backend(cfg.backend, dim, hidden)
        # The rows move on Triton with backend=triton, and with backend=auto on a CUDA GPU (rows_backend says why).
        rows = rows_backend(cfg.backend)
        if dispatcher is None:
            if topo.ep.size * topo.etp.size > 1:
                dispatcher = AllToAllDispatcher(cfg.num_experts, topo.ep, topo.etp, rows)
            else:
                dispatcher = LocalDispatcher(cfg.num_experts, pad_to_capacity=cfg.pad_to_capacity, backend=rows)
        self.dispatcher = dispatcher
        # recompute_activation (train.recompute=moe_act): the experts keep their first GEMM's output and
        # recompute the activation in backward instead of keeping its output.
        self.experts = GroupedExperts(self.dispatcher.num_local_experts, dim, hidden, cfg.activation, backend,
                                      recompute_activation=recompute_activation)
        shared_hidden = cfg.shared_expert_hidden or cfg.num_shared_experts * cfg.expert_hidden
        # Shared experts run on this rank's token slice, unsplit (a group of one).
        self.shared = (ParallelMLP(dim, shared_hidden, cfg.activation, Topology.single().tp)
                       if cfg.num_shared_experts else None)
        if cfg.shared_expert_gate and self.shared is None:
            raise ValueError("moe.shared_expert_gate=True gates the shared experts, but moe.num_shared_experts=0; "
                             "add shared experts or set shared_expert_gate false")
        # Qwen2-MoE's gate: `shared_gate.weight` [1, D], no bias; the shared output is scaled per token by
        # sigmoid(x · w). Replicated over tp and fed by this rank's token slice, like the router.
        self.shared_gate = nn.Linear(dim, 1, bias=False) if cfg.shared_expert_gate else None
        # Statistics of the load-balancing loss: over the dp rank's micro-batch (its tp ranks hold slices
        # of it) or over the whole global batch (every rank of the pipeline stage that runs this layer: the
        # whole world without pipeline parallelism).
        self.stats_group = topo.stage if cfg.balance_over == "global_batch" else topo.tp
        self.stats_shards = topo.dims.dp if cfg.balance_over == "global_batch" else 1

    @property
    def param_shards(self) -> dict[str, tuple[Shard, ...]]:
        chunks = 2 if self.cfg.activation == "swiglu" else 1
        sh = {"experts.w_in_EDF2": [Shard(0, "ep")], "experts.w_out_EFD": [Shard(0, "ep")]}
        if self.topo.etp.size > 1:
            sh["experts.w_in_EDF2"].append(Shard(2, "etp", chunks))
            sh["experts.w_out_EFD"].append(Shard(1, "etp"))
        return {k: tuple(v) for k, v in sh.items() if self.topo.ep.size > 1 or len(v) > 1}

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        tp = self.topo.tp
        B, S, D = x_BSD.shape
        x_TD = split_rows(x_BSD.reshape(B * S, D), tp)
        routing = self.route(x_TD, B // tp.size, S)
        cap = self.capacity(routing)
        x_ND, offsets_E, meta = self.dispatch(x_TD, routing, cap)
        y_ND = self.run_experts(x_ND, offsets_E)
        y_TD = self.shared_experts(x_TD, self.combine(y_ND, meta))
        y_TD = gather_rows(y_TD, tp)
        return y_TD.view(B, S, D), self.stats(routing, cap, meta)

    # ------------------------------------------------------------------ the steps of forward, in order

    def route(self, x_TD: torch.Tensor, B: int, S: int) -> Routing:
        """Router, load-balancing loss and z-loss on this rank's tokens x_TD, which hold B sequences of S
        positions (under tensor parallelism: this tp rank's slice of the micro-batch)."""
        cfg, tp = self.cfg, self.topo.tp
        r = self.router(x_TD)
        counts_E = torch.bincount(r.indices_TK.reshape(-1), minlength=cfg.num_experts)
        aux = self._aux_loss(r.probs_TE, r.indices_TK, counts_E, B, S)
        if cfg.z_loss_coef > 0:
            # Each tp rank holds 1/tp of the micro-batch: the slices' losses sum to its mean over tp ranks.
            zl = losses.z_loss(r.logits_TE, cfg.z_loss_coef) / tp.size
        else:
            zl = x_TD.new_zeros((), dtype=torch.float32)
        return Routing(r.weights_TK, r.indices_TK, r.probs_TE, r.logits_TE, counts_E, aux, zl)

    def capacity(self, routing: Routing) -> CapacityResult:
        """Which assignments each expert keeps. Capacity per GShard group of T/G consecutive tokens
        (G = moe.capacity_groups): expert e of group g is the virtual expert g·E + e."""
        cfg, G, E = self.cfg, self.cfg.capacity_groups, self.cfg.num_experts
        indices_TK = routing.indices_TK
        T = indices_TK.shape[0]
        if T % G:
            raise ValueError(f"{T} tokens do not split into moe.capacity_groups={G} groups")
        cap = expert_capacity(T // G, cfg)
        if cap is None:                                    # dropless: nothing to rank or drop
            return CapacityResult(None, torch.zeros(E, dtype=torch.long, device=indices_TK.device), None)
        group_T1 = (torch.arange(T, device=indices_TK.device) // max(T // G, 1)).unsqueeze(1)
        res = apply_capacity(indices_TK + group_T1 * E, routing.weights_TK, G * E, cap, cfg.drop_policy)
        return CapacityResult(res.keep_TK, res.dropped_E.view(G, E).sum(0), cap)

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, cap: CapacityResult
                 ) -> tuple[torch.Tensor, torch.Tensor, DispatchMeta | AllToAllMeta]:
        """The kept rows grouped by local expert (x_ND), their int32 offsets, and the metadata `combine`
        takes back (with expert parallelism: the all-to-all, one host sync for its splits)."""
        return self.dispatcher.dispatch(x_TD, routing.indices_TK, routing.weights_TK, cap.keep_TK, cap.capacity)

    def run_experts(self, x_ND: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """The local experts on their rows. Named apart from `self.experts`, the module that owns the weights."""
        return keep_connected(self.experts(x_ND, offsets_E), x_ND)

    def combine(self, y_ND: torch.Tensor, meta: DispatchMeta | AllToAllMeta,
                weights_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The expert rows back in token order, weighted and summed over each token's K choices: y_TD.
        `weights_TK` replaces the router weights that `dispatch` stored (the benchmark passes a leaf
        tensor there to time the unpermute's weight gradient on its own)."""
        if weights_TK is not None:
            meta = meta.with_weights(weights_TK)
        return self.dispatcher.combine(y_ND, meta)

    def shared_experts(self, x_TD: torch.Tensor, y_TD: torch.Tensor) -> torch.Tensor:
        """y_TD plus the shared experts' output on x_TD (y_TD itself when the layer has none), scaled per
        token by sigmoid(x_TD · w_gate) when the layer has a shared-expert gate."""
        if self.shared is None:
            return y_TD
        shared_TD = self.shared(x_TD)
        if self.shared_gate is not None:
            shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
        return y_TD + shared_TD

    def stats(self, routing: Routing, cap: CapacityResult, meta: DispatchMeta | AllToAllMeta) -> MoEStats:
        rows_out = rows_in = 0
        if isinstance(meta, AllToAllMeta):
            rows_out, rows_in = meta.rows_out(self.topo.ep.rank), meta.rows_in(self.topo.ep.rank)
        return MoEStats(tokens_per_expert=(routing.counts_E - cap.dropped_E).detach(),
                        dropped=cap.dropped_E, aux_loss=routing.aux_loss, z_loss=routing.z_loss,
                        entropy=losses.router_entropy(routing.probs_TE), num_tokens=routing.indices_TK.shape[0],
                        capacity=cap.capacity, a2a_rows_out=rows_out, a2a_rows_in=rows_in,
                        router_finite=torch.isfinite(routing.logits_TE.detach()).all())

    def _aux_loss(self, probs_TE, indices_TK, counts_E, B, S) -> torch.Tensor:
        cfg = self.cfg
        if cfg.aux_loss_coef == 0:
            return probs_TE.new_zeros(())
        if cfg.aux_loss_type == "seq":
            # Whole sequences per rank (validated); each slice's share of the dp rank's mean over sequences.
            seq_of_token = torch.arange(B * S, device=probs_TE.device).repeat_interleave(cfg.top_k) // S
            counts_BE = torch.zeros(B, cfg.num_experts, dtype=torch.long, device=probs_TE.device)
            counts_BE.index_put_((seq_of_token, indices_TK.reshape(-1)),
                                 torch.ones_like(seq_of_token), accumulate=True)
            return losses.seq_load_balancing_loss(probs_TE.view(B, S, cfg.num_experts), counts_BE, cfg.top_k,
                                                  cfg.aux_loss_coef) / self.topo.tp.size
        # f_i from the counts of the whole statistics group; P_i from this rank's share. The loss on each
        # rank is its part of the group's loss, scaled so that gradient averaging over dp recovers it.
        counts_tokens = torch.cat([counts_E, counts_E.new_tensor([probs_TE.shape[0]])])
        all_reduce_(counts_tokens, self.stats_group)
        return self.stats_shards * losses.load_balancing_loss(probs_TE, counts_tokens[:-1], cfg.top_k,
                                                              cfg.aux_loss_coef, num_tokens=counts_tokens[-1])

