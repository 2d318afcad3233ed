"""DeepSpeed-MoE as the reference `bench layer` times ours against: its layer in this process on a world-1 gloo
group, given our router and expert weights, and the GShard einsum dispatch its MOELayer used up to v0.18.
Legend: T tokens, D model dim, E experts, K top-k, C capacity.

How both route alike. DeepSpeed's gate (`TopKGate`) takes fp32 logits from the router weight we copy in, a
softmax over the E experts, and picks the same experts as our softmax router at every K: argmax at K=1;
argmax and then the argmax of the rest at K=2 (`top2gating`, its Gumbel sampling of the second expert turned
off); `torch.topk` at K > 2 (`topkgating`). Capacity is the same, max(ceil(K·T/E·cf), min_capacity), and
every policy keeps min(load, C) assignments per expert, so the experts see the same loads (`kept_per_expert`
checks it). Two things differ, neither in the work done: which assignments an over-full expert drops (K=1:
random token selection; K=2: first choices first, in token order; K > 2: highest softmax probability; ours:
highest renormalised weight), and the weights of a token that lost an assignment (DeepSpeed renormalises
over the kept ones, ours over all K chosen). In dropless mode (`drop_tokens=False`: C = the largest load,
every expert padded to it) nothing drops and the outputs equal ours.

Imports of deepspeed stay inside the functions: `moe-dist` commands that do not time DeepSpeed never pay them.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

# The gate's options the benchmark fixes (recorded in its JSON).
OPTIONS = {"ep_size": 1, "use_rts": True, "top2_2nd_expert_sampling": False,
           "noisy_gate_policy": None, "use_tutel": False}

_READY = False


def init_world1(device: str) -> None:
    """DeepSpeed-MoE asks its `groups` module for an expert-parallel group, which needs deepspeed.comm
    initialised: a world-1 group in this process (ep_size=1, so no message is ever sent). Once per process."""
    global _READY
    if _READY:
        return
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist
    if not dist.is_initialized():
        from moe_dist.parallel.spawn import free_port
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", verbose=False)
    _READY = True


def deepspeed_layer(expert: nn.Module, dim: int, num_experts: int, top_k: int, capacity_factor: float,
                    min_capacity: int, drop_tokens: bool, dtype: torch.dtype, device: str) -> nn.Module:
    """`deepspeed.moe.layer.MoE` with ep_size=1 around `expert` (copied once per expert by DeepSpeed)."""
    init_world1(device)
    import logging
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import logger
    logger.setLevel(logging.WARNING)
    layer = MoE(dim, expert, num_experts=num_experts, ep_size=OPTIONS["ep_size"], k=top_k,
                capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor,
                min_capacity=min_capacity, drop_tokens=drop_tokens, use_rts=OPTIONS["use_rts"],
                noisy_gate_policy=OPTIONS["noisy_gate_policy"], use_tutel=OPTIONS["use_tutel"],
                # Deterministic second choice, as ours (its default samples it with Gumbel noise).
                top2_2nd_expert_sampling=OPTIONS["top2_2nd_expert_sampling"]).to(device, dtype)
    layer.set_deepspeed_parallelism()
    return layer


def copy_weights(ds: nn.Module, ours: nn.Module) -> None:
    """Give DeepSpeed's layer our router and expert weights (`ours` is a single-process `MoELayer`; the
    experts are modules with `w_in_DF2` and `w_out_FD`): both then pick the same experts for every token, so
    the timing compares the implementations, not two routings."""
    moe = ds.deepspeed_moe
    with torch.no_grad():
        moe.gate.wg.weight.copy_(ours.router.weight_ED)
        for e, expert in enumerate(moe.experts.deepspeed_experts):
            expert.w_in_DF2.copy_(ours.experts.w_in_EDF2[e])
            expert.w_out_FD.copy_(ours.experts.w_out_EFD[e])


def _gating(gate, logits_TE: torch.Tensor):
    """(l_aux, combine_TEC, dispatch_mask_TEC, counts_E) from the gating function DeepSpeed's gate calls for
    its K, in the dense form (sparse_routes=False) that the einsum dispatch takes."""
    from deepspeed.moe.sharded_moe import top1gating, top2gating, topkgating
    if gate.k == 1:
        return top1gating(logits_TE, gate.capacity_factor, gate.min_capacity, None, None, gate.drop_tokens,
                          gate.use_rts, None, sparse_routes=False)
    if gate.k == 2:
        return top2gating(logits_TE, gate.capacity_factor, gate.min_capacity, gate.drop_tokens, None,
                          gate.top2_2nd_expert_sampling, sparse_routes=False)
    return topkgating(logits_TE, gate.k, gate.capacity_factor, gate.min_capacity, gate.drop_tokens, None,
                      sparse_routes=False)


class EinsumMoE:
    """DeepSpeed-MoE's layer as it was before its sparse dispatch (MOELayer.forward up to v0.18, ep_size=1):
    its gating functions build dense [T, E, C] combine weights and a dispatch mask, and two einsums move
    the tokens ("sec,sm->ecm" into the capacity-padded expert buffer, "sec,ecm->sm" back). Same gate weights,
    gating function and experts as the installed layer `ds`, which it wraps; only the dispatch differs.
    Every K: `topkgating` returns the same dense form for K > 2. O(T·E·C·D) work and T·E·C memory, so keep
    T small."""

    def __init__(self, ds: nn.Module):
        self.ds = ds

    def parameters(self):
        return self.ds.parameters()

    def __call__(self, x):
        import torch.nn.functional as F
        moe = self.ds.deepspeed_moe
        d = x.shape[-1]
        x_TD = x.reshape(-1, d)
        logits_TE = F.linear(x_TD.float(), moe.gate.wg.weight.float())
        l_aux, combine_TEC, mask_TEC, counts_E = _gating(moe.gate, logits_TE)
        E = combine_TEC.shape[1]
        dispatched_ECD = torch.einsum("sec,sm->ecm", mask_TEC.type_as(x_TD), x_TD)
        out_ECD = moe.experts(dispatched_ECD.reshape(1, E, -1, d)).reshape(E, -1, d)
        y_TD = torch.einsum("sec,ecm->sm", combine_TEC.type_as(x_TD), out_ECD)
        return y_TD.reshape(x.shape), l_aux, counts_E


def loss(layer, x: torch.Tensor, aux_loss_coef: float) -> torch.Tensor:
    """The scalar the benchmark differentiates: the output's sum plus the gate's balancing loss, weighted
    by our aux_loss_coef (as our layer's loss is)."""
    y, l_aux, _ = layer(x)
    return y.float().sum() + aux_loss_coef * l_aux


@torch.no_grad()
def kept_per_expert(ds: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """int64 [E]: the assignments DeepSpeed's gate keeps per expert on tokens x, after its capacity drops
    (its sparse routes flag a dropped one with expert -1)."""
    gate = ds.deepspeed_moe.gate
    routes = gate(x.reshape(-1, x.shape[-1]), None, True)
    indices = routes[3].reshape(-1).long()                       # [K·T]
    return torch.bincount(indices[indices >= 0], minlength=routes[2])
