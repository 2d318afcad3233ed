"""A decoder-only MoE transformer: RMSNorm, rotary causal attention (optionally grouped-query, with its own
head size, q/k/v biases and q/k norms, as the Hugging Face MoE families need), and an MLP that is the MoE layer
on the layers `ModelConfig` marks, a dense MLP elsewhere.
Legend: B sequences, S positions, D model dim, V vocabulary, H heads, Hkv key/value heads, Dh head dim.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import functools
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from moe_dist.config import Config, ModelConfig
from moe_dist.moe.layer import MoELayer, MoEStats
from moe_dist.parallel.tensor_parallel import (ColumnParallelLinear, ParallelMLP, RowParallelLinear, Shard,
                                               ShardedRMSNorm, global_shape, local_slice, rms_norm_over_group)
from moe_dist.parallel.topology import Group, Topology
from moe_dist.pipeline.stages import stage_layers, virtual_stages_of


def is_moe_layer(cfg: ModelConfig, i: int) -> bool:
    """GLaM: moe_every=2 makes every other layer MoE; DeepSeek: first_dense=k keeps the first k dense."""
    return i >= cfg.first_dense and (i - cfg.first_dense) % cfg.moe_every == cfg.moe_every - 1


def rotary_tables(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()


def apply_rotary(x_BHSDh: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHSDh.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos_SD - x2 * sin_SD, x1 * sin_SD + x2 * cos_SD], dim=-1)
    return out.type_as(x_BHSDh)


def head_dim(cfg: ModelConfig) -> int:
    """The per-head size: model.head_dim, or dim // n_heads when it is null."""
    return cfg.head_dim or cfg.dim // cfg.n_heads


class Attention(nn.Module):
    """Heads split over tp: q and [k | v] are column parallel, the output projection row parallel.

    Parameters (names are stable: checkpoints and the Hugging Face mapping use them):
        wq.weight   [H·Dh, D]        wq.bias   [H·Dh]     (model.qkv_bias)
        wkv.weight  [2·Hkv·Dh, D]    wkv.bias  [2·Hkv·Dh] (model.qkv_bias); rows are [k | v], split per block
        wo.weight   [D, H·Dh]
        q_norm.weight, k_norm.weight (model.qk_norm): [Dh] each for `per_head` (one norm shared by the heads,
            applied to each head: Qwen3-MoE), [H·Dh] and [Hkv·Dh] for `full` (over the whole projection before
            the head split: OLMoE). Both run before rotary, as in those models.
    Under tp the per-head norms are replicated and see only this rank's heads (their gradients are partial:
    `MoEGPT.tp_partial_parameters`); the full norms are split with their projection's rows and add their
    sums of squares over tp (`rms_norm_over_group`).
    """

    def __init__(self, cfg: ModelConfig, tp: Group):
        super().__init__()
        n_kv = cfg.n_kv_heads or cfg.n_heads      # both divide by tp: judged by check_layout
        self.tp = tp
        self.n_heads, self.n_kv = cfg.n_heads // tp.size, n_kv // tp.size
        self.head_dim = Dh = head_dim(cfg)
        self.wq = ColumnParallelLinear(cfg.dim, cfg.n_heads * Dh, tp, bias=cfg.qkv_bias)
        self.wkv = ColumnParallelLinear(cfg.dim, 2 * n_kv * Dh, tp, chunks=2, bias=cfg.qkv_bias)
        self.wo = RowParallelLinear(cfg.n_heads * Dh, cfg.dim, tp)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "per_head":
            self.q_norm = nn.RMSNorm(Dh, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(Dh, eps=cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = ShardedRMSNorm(cfg.n_heads * Dh, tp, cfg.norm_eps)
            self.k_norm = ShardedRMSNorm(n_kv * Dh, tp, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q = self.wq(x_BSD)
        k, v = self.wkv(x_BSD).view(B, S, 2, self.n_kv * self.head_dim).unbind(2)
        if self.qk_norm == "full":
            q, k = rms_norm_over_group([(self.q_norm, q), (self.k_norm, k)], self.tp)
        q = q.view(B, S, self.n_heads, self.head_dim)
        k = k.reshape(B, S, self.n_kv, self.head_dim)
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.reshape(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))

    def tp_partial_parameters(self) -> list[nn.Parameter]:
        """Replicated over tp but fed by this rank's heads only: the per-head q/k norms."""
        return list(self.q_norm.parameters()) + list(self.k_norm.parameters()) if self.qk_norm == "per_head" else []


class Block(nn.Module):
    """Pre-norm attention then MLP. `train.recompute` decides what backward recomputes instead of keeping:
    `moe_act` the routed experts' activation (moe/experts.py), `moe` the whole MoE layer here, `block` the
    whole block (`MoEGPT.forward`)."""

    def __init__(self, cfg: Config, layer_id: int, topo: Topology):
        super().__init__()
        m = cfg.model
        self.attn_norm = nn.RMSNorm(m.dim, eps=m.norm_eps)
        self.attn = Attention(m, topo.tp)
        self.mlp_norm = nn.RMSNorm(m.dim, eps=m.norm_eps)
        self.is_moe = is_moe_layer(m, layer_id)
        self.mlp = (MoELayer(cfg.moe, m.dim, topo, recompute_activation=cfg.train.recompute == "moe_act")
                    if self.is_moe else ParallelMLP(m.dim, m.dense_hidden, cfg.moe.activation, topo.tp))
        self.recompute_moe = self.is_moe and cfg.train.recompute == "moe"

    def forward(self, x, cos, sin) -> tuple[torch.Tensor, Optional[MoEStats]]:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        h = self.mlp_norm(x)
        if not self.is_moe:
            return x + self.mlp(h), None
        if self.recompute_moe and self.training and torch.is_grad_enabled():
            # Keep only the layer's input; backward reruns router, dispatch (its all-to-alls and the split
            # exchange: every rank of the group reruns the same layer at the same point of its backward, so
            # the collectives stay in lockstep), experts and combine, with the forward's RNG state (router
            # jitter) restored, so routing and capacity drops are the same.
            out, stats = torch.utils.checkpoint.checkpoint(self.mlp, h, use_reentrant=False)
        else:
            out, stats = self.mlp(h)
        return x + out, stats


@dataclass(frozen=True)
class ModelOutput:
    logits: Optional[torch.Tensor]       # None where they are not kept (training steps, pipeline stages)
    lm_loss: Optional[torch.Tensor]      # mean next-token cross-entropy, when targets are given; under pipeline
                                         # parallelism a zero off the last stage
    aux_loss: torch.Tensor               # Σ over this rank's MoE layers of load-balancing + z losses (scaled)
    stats: list[MoEStats]                # one per MoE layer this rank ran, in layer order
    moe_layer_ids: tuple[int, ...]       # the global layer index of each entry of `stats`

    @property
    def loss(self) -> torch.Tensor:
        """What training minimises."""
        return self.lm_loss + self.aux_loss


class LayerDict(nn.ModuleDict):
    """The blocks this rank holds, keyed by their GLOBAL layer index (parameter names `blocks.<i>.…` are the same
    in every pipeline layout, so checkpoints and the Hugging Face mapping see one set of names). Indexing takes
    the int or its string; iterate `.values()` or `.items()`."""

    def __getitem__(self, key: int | str) -> nn.Module:
        return super().__getitem__(str(key))

    def __contains__(self, key: int | str) -> bool:
        return super().__contains__(str(key))


def all_moe_layer_ids(cfg: ModelConfig) -> tuple[int, ...]:
    """The global indices of the model's MoE layers (every stage's)."""
    return tuple(i for i in range(cfg.n_layers) if is_moe_layer(cfg, i))


def chunk_layers(cfg: Config, topo: Topology) -> tuple[list[int], list[range]]:
    """This rank's model chunks: (their virtual stages, their layers), in model order. One chunk of every layer
    without pipeline parallelism."""
    pp = topo.dims.pp
    if pp == 1:
        return [0], [range(cfg.model.n_layers)]
    p = cfg.parallel
    stages = stage_layers(cfg.model.n_layers, pp, p.pp_virtual, p.pp_layers)
    mine = list(virtual_stages_of(topo.pp.rank, pp, p.pp_virtual))
    return mine, [stages[v] for v in mine]


class MoEGPT(nn.Module):
    """`topo` is the parallel layout (one process when None); the module holds this rank's shards.
    Every layout draws the same global weights (`reset_parameters`), so N ranks start where one
    process does.

    Pipeline parallelism (topo.dims.pp > 1): the rank holds only the layers of its virtual stages
    (`chunk_layers`; `self.blocks` is keyed by global layer index in every layout), the embedding on the rank
    of virtual stage 0, the final norm and head on the rank of the last one (None elsewhere). With tied
    embeddings the last stage holds an `embed` too, only as the home of the shared weight (Megatron's
    approach): its name stays `embed.weight`, it starts from the same draw, and its gradient is summed over
    topo.embed (`tied_parameters`). `forward` runs the whole model (one stage); the pipeline's chunks
    (moe_dist.pipeline.model) compose `embed_tokens`, `run_layers` and `head_loss`."""

    def __init__(self, cfg: Config, topo: Optional[Topology] = None):
        super().__init__()
        self.cfg = cfg
        self.topo = topo = topo or Topology.single()
        m = cfg.model
        self.chunk_stages, self.chunk_layers = chunk_layers(cfg, topo)
        self.n_virtual = topo.dims.pp * len(self.chunk_layers)      # virtual stages of the whole pipeline
        self.holds_first = 0 in self.chunk_stages
        self.holds_last = self.n_virtual - 1 in self.chunk_stages
        self.embed = (nn.Embedding(m.vocab_size, m.dim)
                      if self.holds_first or (m.tie_embeddings and self.holds_last) else None)
        self.blocks = LayerDict({str(i): Block(cfg, i, topo) for layers in self.chunk_layers for i in layers})
        self.norm = nn.RMSNorm(m.dim, eps=m.norm_eps) if self.holds_last else None
        self.head = nn.Linear(m.dim, m.vocab_size, bias=False) if self.holds_last else None
        if m.tie_embeddings and self.holds_last:
            self.head.weight = self.embed.weight
        cos, sin = rotary_tables(m.max_seq_len, head_dim(m), m.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @property
    def param_shards(self) -> dict[str, tuple[Shard, ...]]:
        """Name → how the parameter is split over ranks; names absent here are replicated."""
        out = {}
        for mod_name, mod in self.named_modules():
            if mod is self:
                continue
            for pname, shards in getattr(mod, "param_shards", {}).items():
                out[f"{mod_name}.{pname}" if mod_name else pname] = shards
        return out

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each matrix is drawn whole from a generator seeded by (train.seed, its name), then sliced to this
        rank's shard: the weights are the same whatever the layout, and no global RNG is consumed. Vectors
        are biases (zero) or norm weights (one)."""
        if next(self.parameters()).is_meta:
            return
        std = self.cfg.model.init_std
        # GPT-2 style: projections that write into the residual stream are scaled down with depth.
        out_std = std / (2 * self.cfg.model.n_layers) ** 0.5
        shards = self.param_shards
        for name, p in self.named_parameters():
            if p.dim() < 2:
                p.fill_(0.0 if name.endswith(".bias") else 1.0)
                continue
            scaled = name.endswith(("wo.weight", "w_out.weight", "w_out_EFD"))
            gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + zlib.crc32(name.encode()))
            spec = shards.get(name, ())
            full = torch.empty(global_shape(p.shape, spec, self.topo)).normal_(0.0, out_std if scaled else std,
                                                                           generator=gen)
            p.copy_(local_slice(full, spec, self.topo))

    def tp_partial_parameters(self) -> list[nn.Parameter]:
        """Replicated over tp but fed by only this rank's token slice (router, shared experts and their gate)
        or only this rank's heads (per-head q/k norms): their gradients are summed over tp before the
        data-parallel reduction."""
        if self.topo.tp.size == 1:
            return []
        moe = [p for layer in self.moe_layers for m in (layer.router, layer.shared, layer.shared_gate)
               if m is not None for p in m.parameters()]
        return [p for b in self.blocks.values() for p in b.attn.tp_partial_parameters()] + moe

    def tied_parameters(self) -> list[nn.Parameter]:
        """The embedding shared with the head when the first and the last stage are different ranks: each holds
        a copy fed by its own use, so the gradient is summed over topo.embed before the data-parallel reduction
        (then both copies are equal). Empty without pipeline parallelism or tied embeddings."""
        if self.topo.dims.pp > 1 and self.cfg.model.tie_embeddings and self.embed is not None:
            return [self.embed.weight]
        return []

    def norm_skipped_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradient another rank counts in the global norm: the last stage's copy of a tied
        embedding (the first stage counts it)."""
        return [] if self.holds_first else self.tied_parameters()

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [b.mlp for b in self.blocks.values() if b.is_moe]

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """The global index of each of this rank's MoE layers (`moe_layers`' order)."""
        return tuple(int(i) for i, b in self.blocks.items() if b.is_moe)

    @property
    def all_moe_layer_ids(self) -> tuple[int, ...]:
        """The global indices of every MoE layer of the model, this rank's or not."""
        return all_moe_layer_ids(self.cfg.model)

    @functools.cached_property
    def moe_layer_row(self) -> dict[int, int]:
        """Global layer index → its row in a table over every MoE layer of the model (`all_moe_layer_ids`'
        order): where a stage puts its own layers' counts and flags before the world sums them."""
        return {lid: n for n, lid in enumerate(self.all_moe_layer_ids)}

    def expert_parameters(self) -> list[nn.Parameter]:
        """Routed-expert weights: sharded over expert parallelism, reduced over the expert-data group."""
        return [p for layer in self.moe_layers for p in layer.experts.parameters()]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Everything else (router and shared experts included): reduced over the data-parallel group."""
        expert = {id(p) for p in self.expert_parameters()}
        return [p for p in self.parameters() if id(p) not in expert]

    def forward(self, idx_BS: torch.Tensor, targets_BS: Optional[torch.Tensor] = None) -> ModelOutput:
        """The whole model; under pipeline parallelism the stages run through moe_dist.pipeline instead."""
        if not (self.holds_first and self.holds_last and len(self.chunk_layers) == 1):
            raise RuntimeError(f"this rank holds layers {list(self.blocks)} of a {self.topo.dims.pp}-stage pipeline; "
                               "run the model through moe_dist.pipeline (the engine's forward_backward)")
        x = self.embed_tokens(idx_BS)
        x, stats, ids = self.run_layers(x, self.chunk_layers[0])
        logits, lm_loss = self.head_loss(x, targets_BS)
        return ModelOutput(logits, lm_loss, aux_sum(stats, x.device), stats, ids)

    def embed_tokens(self, idx_BS: torch.Tensor) -> torch.Tensor:
        """Token ids → the residual stream (the first stage's input)."""
        S = idx_BS.shape[1]
        if S > self.cfg.model.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len={self.cfg.model.max_seq_len}")
        return self.embed(idx_BS)

    def run_layers(self, x_BSD: torch.Tensor, layers: Iterable[int]
                   ) -> tuple[torch.Tensor, list[MoEStats], tuple[int, ...]]:
        """The blocks `layers` (global indices, held by this rank) in order: (output, the MoE layers' stats,
        their global indices)."""
        S = x_BSD.shape[1]
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        stats: list[MoEStats] = []
        ids: list[int] = []
        recompute = self.cfg.train.recompute == "block" and self.training and torch.is_grad_enabled()
        x = x_BSD
        for i in layers:
            block = self.blocks[i]
            if recompute:
                # Keep only the block's input; backward reruns its forward (same RNG state, and the MoE layer's
                # collectives again, in the same order on every rank) before its backward.
                x, st = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x, st = block(x, cos, sin)
            if st is not None:
                stats.append(st)
                ids.append(i)
        return x, stats, tuple(ids)

    def head_loss(self, x_BSD: torch.Tensor, targets_BS: Optional[torch.Tensor]
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Final norm and head (the last stage's end): (logits, mean next-token cross-entropy or None)."""
        logits = self.head(self.norm(x_BSD))
        lm_loss = None
        if targets_BS is not None:
            lm_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets_BS.reshape(-1))
        return logits, lm_loss

    @torch.no_grad()
    def update_expert_bias(self, counts_LE: Sequence[torch.Tensor]) -> None:
        """Apply DeepSeek-V3's bias rule to this rank's MoE layers that have an expert bias; `counts_LE` holds
        one [E] count per MoE layer of the whole model (`all_moe_layer_ids`' order)."""
        for lid, layer in zip(self.moe_layer_ids, self.moe_layers):
            if layer.router.expert_bias_E is not None:
                layer.router.update_expert_bias(counts_LE[self.moe_layer_row[lid]])


def aux_sum(stats: Sequence[MoEStats], device) -> torch.Tensor:
    """Σ of the load-balancing and z losses of `stats` (a zero scalar for none)."""
    return sum((s.aux_loss + s.z_loss for s in stats), torch.zeros((), device=device))


def count_parameters(model: nn.Module, cfg: Config) -> dict[str, int]:
    """Total and active (per token) parameter counts; works on the meta device."""
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for p in model.expert_parameters()) if isinstance(model, MoEGPT) else 0
    active = total - routed + routed * cfg.moe.top_k // cfg.moe.num_experts
    return {"total": total, "active": active, "routed_expert": routed, "dense": total - routed}
