"""Gradient reduction and the global gradient norm for one layout; each gradient is reduced exactly once.

After backward on every rank:
- tp-partial parameters (router, shared experts: replicated over tp but fed by one token slice each)
  are summed over tp;
- dense parameters are averaged over dp (each dp rank's loss is the mean over its own tokens);
- expert parameters are summed over edp and divided by dp: the copies of an expert on the edp ranks
  together saw every token of the global batch exactly once, each weighted by 1/(its dp rank's tokens).
With pipeline parallelism every group above lies inside one stage; a tied embedding's two copies (first and
last stage) are first summed over topo.embed, and the norm adds the stages' sums of squares over topo.pp.
"""
from __future__ import annotations

import math

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moe_dist.parallel.comm import all_reduce_
from moe_dist.parallel.topology import Group, Topology


def _reduce(params: list[torch.nn.Parameter], group: Group, scale: float) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if group.handle is not None:
        # One flat buffer per call: a single collective instead of one per tensor.
        flat = all_reduce_(_flatten_dense_tensors(grads), group)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)
    if scale != 1.0:
        for g in grads:
            g.mul_(scale)


def reduce_gradients(model, topo: Topology) -> None:
    """`model` provides dense_parameters(), expert_parameters(), tp_partial_parameters() and
    tied_parameters()."""
    _reduce(model.tied_parameters(), topo.embed, 1.0)
    _reduce(model.tp_partial_parameters(), topo.tp, 1.0)
    _reduce(model.dense_parameters(), topo.dp, 1.0 / topo.dp.size)
    _reduce(model.expert_parameters(), topo.edp, 1.0 / topo.dims.dp)


def global_grad_norm(model, topo: Topology) -> float:
    """The L2 norm of the whole model's gradient, each element counted once: tp-sharded dense
    parameters summed over tp, expert shards over ep×etp, replicated parameters taken once, stages summed
    (a tied embedding counted on the first stage only)."""
    shards = model.param_shards
    expert = {id(p) for p in model.expert_parameters()}
    skipped = {id(p) for p in model.norm_skipped_parameters()}
    replicated = tp_sharded = experts = 0.0
    for name, p in model.named_parameters():
        if p.grad is None or id(p) in skipped:
            continue
        sq = p.grad.detach().float().pow(2).sum()
        if id(p) in expert:
            experts = experts + sq
        elif any(s.axis == "tp" for s in shards.get(name, ())):
            tp_sharded = tp_sharded + sq
        else:
            replicated = replicated + sq
    return norm_from_squares(replicated, tp_sharded, experts, topo)


def norm_from_squares(replicated, tp_sharded, experts, topo: Topology, dp_sharded: bool = False) -> float:
    """The global norm from this rank's sums of squares of three classes of gradient elements: dense ones
    replicated over tp, dense ones split over tp, expert ones (split over ep×etp). `dp_sharded`: each rank holds
    only its shard of every gradient (a sharded optimizer: dense over dp, experts over edp), so the shards are
    summed over those groups first; otherwise the data-parallel copies are equal and taken once. With pipeline
    parallelism the result so far is this stage's (the same on all its ranks), and the stages' add up over
    topo.pp (one rank per stage)."""
    # On the gradients' device (nccl reduces device tensors only); a class without elements is a Python 0.0.
    device = next((x.device for x in (replicated, tp_sharded, experts) if isinstance(x, torch.Tensor)), "cpu")

    def t(x):
        return torch.as_tensor(x, dtype=torch.float32, device=device)
    dense = torch.stack([t(replicated), t(tp_sharded)])
    ex = t(experts).reshape(1)
    if dp_sharded:
        all_reduce_(dense, topo.dp)
        all_reduce_(ex, topo.edp)
    tp_part = all_reduce_(dense[1:2].clone(), topo.tp)
    ex_part = all_reduce_(ex.clone(), topo.expert_mp)
    stage = (dense[0] + tp_part[0] + ex_part[0]).reshape(1)
    if topo.dims.pp > 1:
        all_reduce_(stage, topo.pp)
    return math.sqrt(float(stage[0]))   # host sync: the clip factor needs it


def clip_gradients(model, topo: Topology, max_norm: float) -> float:
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)), torch.nn.utils.clip_grad_norm_'s rule;
    returns the norm before clipping."""
    norm = global_grad_norm(model, topo)
    if max_norm > 0:
        coef = min(max_norm / (norm + 1e-6), 1.0)
        if coef < 1.0:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
    return norm
