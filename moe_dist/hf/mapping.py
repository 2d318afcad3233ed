"""Which Hugging Face tensors make each moe_dist parameter, and how: one `Rule` per parameter, used both ways.

moe_dist keeps a routed expert's weights as [E, D, 2F] ([gate | up], input-major) and [E, F, D]; transformers
files keep one [F, D] matrix per expert and projection (`experts.<e>.w1/w3/w2` in Mixtral, `gate_proj/up_proj/
down_proj` elsewhere), which is also what transformers 5 writes and converts on load. Attention keys and values
are one [k; v] matrix here. Rotary embeddings use the same half-split convention (rotate_half) on both sides, so
q and k need no permutation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from moe_dist.config import Config
from moe_dist.hf.families import Family
from moe_dist.models.gpt import is_moe_layer

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Rule:
    ours: str                                   # moe_dist parameter name (global tensor)
    theirs: tuple[str, ...]                     # Hugging Face tensor names, in the order join takes them
    shapes: tuple[tuple[int, ...], ...]         # their shapes, as config.json implies them
    join: Callable[[Tensors], torch.Tensor]     # theirs -> ours
    split: Callable[[torch.Tensor], Tensors]    # ours -> theirs


def _same(name: str, hf: str, shape: tuple[int, ...]) -> Rule:
    return Rule(name, (hf,), (shape,), lambda ts: ts[0], lambda t: [t])


def _cat(name: str, hfs: tuple[str, ...], shapes: tuple[tuple[int, ...], ...]) -> Rule:
    sizes = [s[0] for s in shapes]
    return Rule(name, hfs, shapes, lambda ts: torch.cat(ts, 0), lambda t: list(t.split(sizes, 0)))


def _experts_in(name: str, keys: list[tuple[str, str]], D: int, F: int) -> Rule:
    """[E, D, 2F] from per-expert (gate [F, D], up [F, D])."""
    flat = tuple(k for pair in keys for k in pair)

    def join(ts: Tensors) -> torch.Tensor:
        return torch.stack([torch.cat([g, u], 0).t() for g, u in zip(ts[0::2], ts[1::2])])

    def split(t: torch.Tensor) -> Tensors:
        return [part.contiguous() for e in range(t.shape[0]) for part in t[e].t().chunk(2, 0)]

    return Rule(name, flat, ((F, D),) * len(flat), join, split)


def _experts_out(name: str, keys: list[str], D: int, F: int) -> Rule:
    """[E, F, D] from per-expert down [D, F]."""
    return Rule(name, tuple(keys), ((D, F),) * len(keys), lambda ts: torch.stack([d.t() for d in ts]),
                lambda t: [t[e].t().contiguous() for e in range(t.shape[0])])


def _mlp(ours: str, theirs: str, names: tuple[str, str, str], D: int, F: int) -> list[Rule]:
    """A dense SwiGLU MLP (a dense layer or a shared expert): w_in = [gate; up] rows, w_out = down."""
    g, u, d = (f"{theirs}.{n}.weight" for n in names)
    return [_cat(f"{ours}.w_in.weight", (g, u), ((F, D), (F, D))), _same(f"{ours}.w_out.weight", d, (D, F))]


def _fused_experts(o: str, b: str, E: int, D: int, F: int) -> list[Rule]:
    """transformers 5's in-memory layout (save_pretrained(save_original_format=False) writes it): gate_up_proj
    [E, 2F, D] with rows [gate | up], down_proj [E, D, F]."""
    return [Rule(f"{o}.mlp.experts.w_in_EDF2", (f"{b}.experts.gate_up_proj",), ((E, 2 * F, D),),
                 lambda ts: ts[0].transpose(1, 2), lambda t: [t.transpose(1, 2).contiguous()]),
            Rule(f"{o}.mlp.experts.w_out_EFD", (f"{b}.experts.down_proj",), ((E, D, F),),
                 lambda ts: ts[0].transpose(1, 2), lambda t: [t.transpose(1, 2).contiguous()])]


def is_fused(names) -> bool:
    """Whether a file set holds the fused expert layout rather than one matrix per expert."""
    return any(n.endswith(".experts.gate_up_proj") for n in names)


def rules(fam: Family, cfg: Config, dense_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
          fused: bool = False) -> list[Rule]:
    """Every moe_dist parameter of cfg's model as a function of `fam`'s tensors (per-expert files, the format of
    released checkpoints and of save_pretrained, or with `fused` transformers 5's in-memory layout)."""
    m, moe = cfg.model, cfg.moe
    D, V, E, F = m.dim, m.vocab_size, moe.num_experts, moe.expert_hidden
    Dh = m.head_dim or m.dim // m.n_heads
    H, Hkv = m.n_heads, m.n_kv_heads or m.n_heads
    out = [_same("embed.weight", "model.embed_tokens.weight", (V, D)), _same("norm.weight", "model.norm.weight", (D,))]
    if not m.tie_embeddings:
        out.append(_same("head.weight", "lm_head.weight", (V, D)))
    for i in range(m.n_layers):
        p, o = f"model.layers.{i}", f"blocks.{i}"
        a = f"{p}.self_attn"
        out += [_same(f"{o}.attn_norm.weight", f"{p}.input_layernorm.weight", (D,)),
                _same(f"{o}.mlp_norm.weight", f"{p}.post_attention_layernorm.weight", (D,)),
                _same(f"{o}.attn.wq.weight", f"{a}.q_proj.weight", (H * Dh, D)),
                _cat(f"{o}.attn.wkv.weight", (f"{a}.k_proj.weight", f"{a}.v_proj.weight"),
                     ((Hkv * Dh, D), (Hkv * Dh, D))),
                _same(f"{o}.attn.wo.weight", f"{a}.o_proj.weight", (D, H * Dh))]
        out += attention_extras(m, o, a, D, Dh, H, Hkv)
        if not is_moe_layer(m, i):
            out += _mlp(f"{o}.mlp", f"{p}.mlp", dense_names, D, m.dense_hidden)
            continue
        b = f"{p}.mlp" if fused else f"{p}.{fam.moe_prefix}"
        gate, up, down = fam.expert_keys
        out.append(_same(f"{o}.mlp.router.weight_ED", f"{b}.gate.weight", (E, D)))
        if fused:
            out += _fused_experts(o, b, E, D, F)
        else:
            out += [_experts_in(f"{o}.mlp.experts.w_in_EDF2",
                                [(f"{b}.experts.{e}.{gate}.weight", f"{b}.experts.{e}.{up}.weight")
                                 for e in range(E)], D, F),
                    _experts_out(f"{o}.mlp.experts.w_out_EFD", [f"{b}.experts.{e}.{down}.weight" for e in range(E)],
                                 D, F)]
        if fam.shared_expert:
            Fs = moe.shared_expert_hidden or moe.num_shared_experts * F
            out += _mlp(f"{o}.mlp.shared", f"{b}.shared_expert", ("gate_proj", "up_proj", "down_proj"), D, Fs)
            out += shared_gate(o, b, D)
    return out


def attention_extras(m, o: str, a: str, D: int, Dh: int, H: int, Hkv: int) -> list[Rule]:
    """q/k/v biases and q/k norms, when the model has them."""
    out: list[Rule] = []
    if m.qkv_bias:
        out += [_same(f"{o}.attn.wq.bias", f"{a}.q_proj.bias", (H * Dh,)),
                _cat(f"{o}.attn.wkv.bias", (f"{a}.k_proj.bias", f"{a}.v_proj.bias"), ((Hkv * Dh,), (Hkv * Dh,)))]
    if m.qk_norm == "per_head":
        out += [_same(f"{o}.attn.q_norm.weight", f"{a}.q_norm.weight", (Dh,)),
                _same(f"{o}.attn.k_norm.weight", f"{a}.k_norm.weight", (Dh,))]
    elif m.qk_norm == "full":
        out += [_same(f"{o}.attn.q_norm.weight", f"{a}.q_norm.weight", (H * Dh,)),
                _same(f"{o}.attn.k_norm.weight", f"{a}.k_norm.weight", (Hkv * Dh,))]
    return out


def shared_gate(o: str, b: str, D: int) -> list[Rule]:
    """Qwen2-MoE's shared-expert gate: a Linear(D, 1) on both sides."""
    return [_same(f"{o}.mlp.shared_gate.weight", f"{b}.shared_expert_gate.weight", (1, D))]


def check_covers(rule_list: list[Rule], model: torch.nn.Module) -> None:
    """The rules name every parameter of the model with its shape (a mismatch is a bug in this module)."""
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    named = {r.ours for r in rule_list}
    if set(params) != named:
        raise RuntimeError(f"Hugging Face mapping out of date with the model: parameters without a rule "
                           f"{sorted(set(params) - named)[:4]}, rules without a parameter {sorted(named - set(params))[:4]}")
