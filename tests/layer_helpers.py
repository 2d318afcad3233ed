"""Shared by the MoE layer's unit tests (tests/moe/) and the kernels-in-the-layer tests (tests/kernels/):
small fp32 layers with O(1) weights, a forward+backward that returns every gradient, and the dense reference
(every expert on every token, weighted by the gates)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_dist.config import MoEConfig
from moe_dist.moe.layer import MoELayer

D = 16   # model dim; multiple of 4 so grouped_mm accepts fp32
FH = 16  # expert hidden


def make_cfg(**kw) -> MoEConfig:
    base = dict(num_experts=4, top_k=2, expert_hidden=FH, aux_loss_coef=0.0, min_capacity=0)
    base.update(kw)
    return MoEConfig(**base)


def make_layer(seed: int = 0, dim: int = D, **kw) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(make_cfg(**kw), dim)
    # Larger weights than the 0.02 init so outputs and gradients are O(1) and 1e-5 tolerances mean something.
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.5)
    return layer


def clone_layer(layer: MoELayer, strict: bool = True, **kw) -> MoELayer:
    cfg = dict(vars(layer.cfg))
    cfg.update(kw)
    other = MoELayer(MoEConfig(**cfg), layer.router.weight_ED.shape[1])
    other.load_state_dict(layer.state_dict(), strict=strict)
    return other


def run_fwd_bwd(layer: MoELayer, x: torch.Tensor, gy: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y, stats = layer(x)
    loss = (y * gy).sum() + stats.aux_loss + stats.z_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    grads["input"] = x.grad.clone()
    return y.detach(), stats, grads


def dominant_router(layer: MoELayer, expert: int = 0) -> None:
    """Every token with positive features picks `expert` first (its logit is ≫ the others)."""
    with torch.no_grad():
        layer.router.weight_ED[expert] = 5.0


def dense_reference(layer: MoELayer, x_BSD: torch.Tensor) -> torch.Tensor:
    cfg = layer.cfg
    x = x_BSD.reshape(-1, x_BSD.shape[-1])
    W = layer.router.weight_ED
    logits = x @ W.t()
    if cfg.score_func == "softmax":
        scores = torch.softmax(logits, -1)
    else:
        scores = torch.sigmoid(logits)
    sel = scores.detach()
    if layer.router.expert_bias_E is not None:
        sel = sel + layer.router.expert_bias_E
    idx = sel.topk(cfg.top_k, dim=-1).indices
    w = scores.gather(1, idx)
    if cfg.renormalize and cfg.top_k > 1:
        w = w / w.sum(-1, keepdim=True)
    w = w * cfg.route_scale
    gates = torch.zeros_like(scores).scatter(1, idx, w)            # [T, E]
    Fh = cfg.expert_hidden
    out = torch.zeros_like(x)
    for e in range(cfg.num_experts):
        h = x @ layer.experts.w_in_EDF2[e]
        if cfg.activation == "swiglu":
            h = F.silu(h[:, :Fh]) * h[:, Fh:]
        else:
            h = F.gelu(h)
        out = out + gates[:, e:e + 1] * (h @ layer.experts.w_out_EFD[e])
    if layer.shared is not None:
        h = x @ layer.shared.w_in.weight.t()
        if cfg.activation == "swiglu":
            h = F.silu(h[:, :h.shape[1] // 2]) * h[:, h.shape[1] // 2:]
        else:
            h = F.gelu(h)
        out = out + h @ layer.shared.w_out.weight.t()
    return out.view_as(x_BSD)


DENSE_CASES = {
    "softmax_swiglu_k2": dict(num_experts=4, top_k=2, renormalize=True),
    "softmax_swiglu_k3_E6": dict(num_experts=6, top_k=3, renormalize=True),
    "softmax_gelu_k2": dict(num_experts=4, top_k=2, renormalize=True, activation="gelu"),
    "softmax_norenorm_k2": dict(num_experts=4, top_k=2, renormalize=False),
    "sigmoid_bias_scale": dict(num_experts=8, top_k=2, renormalize=True, score_func="sigmoid",
                               expert_bias=True, route_scale=2.5),
    "shared_experts": dict(num_experts=4, top_k=2, renormalize=True, num_shared_experts=2),
    "shared_experts_gelu_hidden": dict(num_experts=4, top_k=2, renormalize=True, num_shared_experts=1,
                                       shared_expert_hidden=8, activation="gelu"),
}
