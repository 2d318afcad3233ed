"""Model features that Hugging Face MoE families need (moe_dist.models.gpt, moe_dist.moe.layer): model.head_dim,
model.qkv_bias, model.qk_norm (per_head: Qwen3-MoE; full: OLMoE), moe.shared_expert_gate (Qwen2-MoE), and the
top-k renormalisation of each family's router. Each feature is checked against a hand-written PyTorch formula,
changes the output when on, has the documented parameter names and shapes, and matches one process on 2 gloo
ranks (tp=2, and ep=2 for the gate). fp32 throughout."""
from __future__ import annotations

import copy
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from distributed import run_ranks
from moe_dist import config
from moe_dist.config import Config, ModelConfig, MoEConfig
from moe_dist.models.gpt import Attention, MoEGPT, count_parameters
from moe_dist.moe.router import Router
from moe_dist.parallel.grads import reduce_gradients
from moe_dist.parallel.layout import check_layout
from moe_dist.parallel.tensor_parallel import global_shape, local_slice
from moe_dist.parallel.topology import Topology

from layer_helpers import D, make_layer

ATTN_CASES = {
    "plain_gqa": dict(n_kv_heads=2),
    "head_dim": dict(head_dim=12),                           # H·Dh = 48 ≠ dim = 32
    "qkv_bias": dict(qkv_bias=True, n_kv_heads=2),
    "per_head": dict(qk_norm="per_head", head_dim=6, n_kv_heads=2),
    "full": dict(qk_norm="full", n_kv_heads=2),
    "full_bias_head_dim": dict(qk_norm="full", qkv_bias=True, head_dim=10),
}


def model_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=16, dense_hidden=32, norm_eps=1e-6)
    base.update(kw)
    return ModelConfig(**base)


@torch.no_grad()
def randomise_vectors(model: MoEGPT, topo: Topology, seed: int = 11) -> None:
    """Biases and norm weights are 0 and 1 at init, which would hide a wrong bias or weight: draw every vector
    of the global model from a generator seeded by its name and keep this rank's shard (the same values
    whatever the layout)."""
    shards = model.param_shards
    for name, p in model.named_parameters():
        if p.dim() == 1:
            spec = shards.get(name, ())
            g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
            full = 1.0 + 0.5 * torch.randn(global_shape(p.shape, spec, topo), generator=g)
            p.copy_(local_slice(full, spec, topo))


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def reference_attention(attn: Attention, m: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """The attention of Qwen2-MoE / Qwen3-MoE / OLMoE / Mixtral written out: projections (+ bias), q/k norm
    before rotary (whole projection for `full`, each head for `per_head`), rotary with rotate_half on full-width
    cos/sin tables, grouped-query heads repeated per key/value head, causal softmax(q·kᵀ/√Dh)·v, output
    projection."""
    B, S, _ = x.shape
    H, Hkv = m.n_heads, m.n_kv_heads or m.n_heads
    Dh = m.head_dim or m.dim // m.n_heads
    q = x @ attn.wq.weight.t()
    kv = x @ attn.wkv.weight.t()
    if m.qkv_bias:
        q, kv = q + attn.wq.bias, kv + attn.wkv.bias
    k, v = kv.split(Hkv * Dh, dim=-1)
    if m.qk_norm == "full":
        q, k = rms(q, attn.q_norm.weight, m.norm_eps), rms(k, attn.k_norm.weight, m.norm_eps)
    q, k, v = q.view(B, S, H, Dh), k.view(B, S, Hkv, Dh), v.view(B, S, Hkv, Dh)
    if m.qk_norm == "per_head":
        q, k = rms(q, attn.q_norm.weight, m.norm_eps), rms(k, attn.k_norm.weight, m.norm_eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    inv = 1.0 / m.rope_theta ** (torch.arange(0, Dh, 2).float() / Dh)
    ang = torch.outer(torch.arange(S).float(), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.softmax(scores, -1) @ v
    return y.transpose(1, 2).reshape(B, S, H * Dh) @ attn.wo.weight.t()


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_equals_the_written_out_formula(case):
    m = model_cfg(**ATTN_CASES[case])
    model = MoEGPT(Config(model=m, moe=MoEConfig(num_experts=4, expert_hidden=16)))
    randomise_vectors(model, model.topo)
    attn = model.blocks[0].attn
    x = torch.randn(2, 7, m.dim, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = attn(x, model.rope_cos[:7], model.rope_sin[:7])
    ref = reference_attention(attn, m, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    gy = torch.randn_like(y)
    params = [x] + list(attn.parameters())
    for a, b in zip(torch.autograd.grad((y * gy).sum(), params), torch.autograd.grad((ref * gy).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_parameter_names_shapes_and_initial_values():
    """The documented names and shapes (the Hugging Face mapping relies on them); biases start at 0 and norm
    weights at 1; matrices are drawn per name (two models agree; a different seed differs)."""
    m = model_cfg(head_dim=10, qkv_bias=True, qk_norm="full", n_kv_heads=2)
    cfg = Config(model=m, moe=MoEConfig(num_experts=4, expert_hidden=16, num_shared_experts=1,
                                        shared_expert_gate=True))
    model = MoEGPT(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["blocks.0.attn.wq.weight"] == (40, 32) and shapes["blocks.0.attn.wq.bias"] == (40,)
    assert shapes["blocks.0.attn.wkv.weight"] == (40, 32) and shapes["blocks.0.attn.wkv.bias"] == (40,)
    assert shapes["blocks.0.attn.wo.weight"] == (32, 40)
    assert shapes["blocks.0.attn.q_norm.weight"] == (40,) and shapes["blocks.0.attn.k_norm.weight"] == (20,)
    assert shapes["blocks.1.mlp.shared_gate.weight"] == (1, 32)
    assert model.rope_cos.shape == (16, 5)                   # rotary over head_dim, not dim // n_heads
    params = dict(model.named_parameters())
    assert all(not params[n].any() for n in shapes if n.endswith(".bias"))
    assert all((params[n] == 1).all() for n in shapes if n.endswith("_norm.weight"))
    again = dict(MoEGPT(cfg).named_parameters())
    assert all(torch.equal(params[n], again[n]) for n in shapes)
    other = copy.deepcopy(cfg)
    other.train.seed += 1
    assert not torch.equal(params["blocks.1.mlp.shared_gate.weight"],
                           dict(MoEGPT(other).named_parameters())["blocks.1.mlp.shared_gate.weight"])
    # count_parameters counts them: attention is 2·(H·Dh·D) + 2·(Hkv·Dh·D) + biases + norms.
    plain = MoEGPT(Config(model=model_cfg(head_dim=10, n_kv_heads=2),
                          moe=MoEConfig(num_experts=4, expert_hidden=16, num_shared_experts=1)))
    extra = m.n_layers * (40 + 40 + 40 + 20 + 32)       # per layer: wq.bias, wkv.bias, q/k norms, the gate
    assert count_parameters(model, cfg)["total"] == count_parameters(plain, plain.cfg)["total"] + extra
    per_head = MoEGPT(Config(model=model_cfg(qk_norm="per_head", head_dim=6), moe=cfg.moe))
    assert tuple(per_head.blocks[0].attn.q_norm.weight.shape) == (6,)


@pytest.mark.parametrize("feature", [dict(head_dim=12), dict(qkv_bias=True), dict(qk_norm="per_head"),
                                     dict(qk_norm="full"), "shared_expert_gate"],
                         ids=["head_dim", "qkv_bias", "per_head", "full", "shared_expert_gate"])
def test_each_feature_changes_the_output(feature):
    moe = dict(num_experts=4, expert_hidden=16, num_shared_experts=1)
    base = Config(model=model_cfg(), moe=MoEConfig(**moe))
    on = (Config(model=model_cfg(), moe=MoEConfig(**moe, shared_expert_gate=True)) if feature == "shared_expert_gate"
          else Config(model=model_cfg(**feature), moe=MoEConfig(**moe)))
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    outs = []
    for cfg in (base, on):
        model = MoEGPT(cfg)
        randomise_vectors(model, model.topo)    # nonzero biases: a bias that is added shows
        outs.append(model(x).logits)
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_shared_expert_gate_equals_the_formula():
    """routed + sigmoid(x·w_gate)·shared(x) (Qwen2-MoE), output and every gradient."""
    layer = make_layer(seed=2, num_shared_experts=1, shared_expert_gate=True, renormalize=False)
    ungated = make_layer(seed=2, num_shared_experts=1, renormalize=False)
    ungated.load_state_dict({k: v for k, v in layer.state_dict().items() if "shared_gate" not in k})
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3))
    y, _ = layer(x)
    x_TD = x.reshape(-1, D)
    h = x_TD @ layer.shared.w_in.weight.t()
    gate, up = h.chunk(2, -1)
    shared = (F.silu(gate) * up) @ layer.shared.w_out.weight.t()
    routed = ungated(x)[0].reshape(-1, D) - shared
    ref = routed + torch.sigmoid(x_TD @ layer.shared_gate.weight.t()) * shared
    torch.testing.assert_close(y.reshape(-1, D), ref, rtol=1e-5, atol=1e-5)
    g, = torch.autograd.grad(y.sum(), layer.shared_gate.weight)
    s = torch.sigmoid(x_TD @ layer.shared_gate.weight.t()).detach()
    g_ref = (s * (1 - s) * shared.detach().sum(-1, keepdim=True)).t() @ x_TD     # Σ_t σ'(x_t·w)·Σ_d shared_td·x_t
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_shared_expert_gate_without_shared_experts_is_refused():
    with pytest.raises(ValueError, match="moe.shared_expert_gate=True.*num_shared_experts=0"):
        make_layer(shared_expert_gate=True)


# ---------------------------------------------------------------------- routers of the Hugging Face families

def _hf_router(family: str, norm_topk_prob: bool):
    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralTopKRouter
        return MixtralTopKRouter(MixtralConfig(hidden_size=D, num_local_experts=8, num_experts_per_tok=2))
    if family == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeConfig, Qwen2MoeTopKRouter
        return Qwen2MoeTopKRouter(Qwen2MoeConfig(hidden_size=D, num_experts=8, num_experts_per_tok=2,
                                                 norm_topk_prob=norm_topk_prob))
    if family == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeTopKRouter
        return Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=D, num_experts=8, num_experts_per_tok=2,
                                                 norm_topk_prob=norm_topk_prob))
    from transformers.models.olmoe.modeling_olmoe import OlmoeConfig, OlmoeTopKRouter
    return OlmoeTopKRouter(OlmoeConfig(hidden_size=D, num_experts=8, num_experts_per_tok=2,
                                       norm_topk_prob=norm_topk_prob))


@pytest.mark.parametrize("family,norm_topk_prob", [("mixtral", True), ("qwen2_moe", False), ("qwen2_moe", True),
                                                   ("qwen3_moe", True), ("olmoe", False)])
def test_router_matches_the_hugging_face_family(family, norm_topk_prob):
    """softmax over all experts → top-k → renormalise iff the family does (Mixtral always; Qwen2-MoE, Qwen3-MoE
    and OLMoE by norm_topk_prob): our router with moe.renormalize=norm_topk_prob picks the same experts with the
    same weights as the family's own router class."""
    pytest.importorskip("transformers")
    hf = _hf_router(family, norm_topk_prob)
    ours = Router(MoEConfig(num_experts=8, top_k=2, renormalize=norm_topk_prob), D)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(8, D, generator=torch.Generator().manual_seed(4)))
        ours.weight_ED.copy_(hf.weight)
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(5))
    _, hf_w, hf_idx = hf(x)
    r = ours(x)
    assert torch.equal(r.indices_TK, hf_idx)
    torch.testing.assert_close(r.weights_TK, hf_w.float(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------ 2 ranks vs one process

def _raw(tp=1, ep=1, model=None, **moe) -> dict:
    return {"model": {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 8,
                      "dense_hidden": 32, "first_dense": 1, **(model or {})},
            "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 16, "aux_loss_coef": 0.01,
                    "balance_over": "global_batch", "num_shared_experts": 1, "shared_expert_gate": True, **moe},
            "parallel": {"tp": tp, "ep": ep},
            "train": {"batch_size": 2, "seq_len": 8}}


PARITY = {
    "tp2_full_bias_head_dim": _raw(tp=2, model={"qk_norm": "full", "qkv_bias": True, "head_dim": 12}),
    "tp2_per_head": _raw(tp=2, model={"qk_norm": "per_head", "head_dim": 6}),
    "ep2_gate": _raw(ep=2, model={"qk_norm": "full", "qkv_bias": True}),
}


def _tokens(B: int):
    t = torch.randint(0, 64, (B, 9), generator=torch.Generator().manual_seed(3))
    return t[:, :-1], t[:, 1:]


def _step(cfg: Config, topo: Topology, x, y) -> dict:
    model = MoEGPT(cfg, topo)
    randomise_vectors(model, topo)
    out = model(x, y)
    out.loss.backward()
    reduce_gradients(model, topo)
    return {"logits": out.logits.detach(), "lm_loss": float(out.lm_loss.detach()),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def _parity_worker(rank, world, cases):
    res = {}
    for name, raw in cases.items():
        cfg = config.from_dict(raw)
        config.validate(cfg)
        topo = Topology.build(check_layout(cfg, world), timeout_s=60)
        x, y = _tokens(cfg.train.batch_size * topo.dims.dp)
        rows = slice(topo.dp.rank * cfg.train.batch_size, (topo.dp.rank + 1) * cfg.train.batch_size)
        res[name] = _step(cfg, topo, x[rows], y[rows])
    return res


@pytest.fixture(scope="module")
def parity_runs():
    return run_ranks(_parity_worker, 2, PARITY, timeout=300)


@pytest.mark.parametrize("case", list(PARITY))
def test_two_ranks_match_one_process(parity_runs, case):
    """Logits, LM loss and every gradient (after the tp-partial and data-parallel reductions, each rank's shard
    of the one-process gradient): the sharded biases and full q/k norms, the tp-partial per-head norms and gate."""
    raw = copy.deepcopy(PARITY[case])
    cfg = config.from_dict(raw)
    dims = check_layout(cfg, 2)
    raw["parallel"] = {}
    raw["train"]["batch_size"] *= dims.dp
    ref_cfg = config.from_dict(raw)
    x, y = _tokens(ref_cfg.train.batch_size)
    ref = _step(ref_cfg, Topology.single(), x, y)
    B = cfg.train.batch_size
    assert sum(r[case]["lm_loss"] for r in parity_runs) / 2 == pytest.approx(ref["lm_loss"], rel=1e-5)
    for rank, r in enumerate(parity_runs):
        topo = Topology.virtual(dims, rank)
        rows = slice(topo.dp.rank * B, (topo.dp.rank + 1) * B)
        torch.testing.assert_close(r[case]["logits"], ref["logits"][rows], rtol=1e-4, atol=1e-5)
        shards = _shards(cfg, topo)
        assert r[case]["grads"].keys() == ref["grads"].keys()
        for n, g in r[case]["grads"].items():
            torch.testing.assert_close(g, local_slice(ref["grads"][n], shards.get(n, ()), topo),
                                       rtol=1e-4, atol=1e-6, msg=f"{case} rank {rank}: {n}")


def _shards(cfg: Config, topo: Topology):
    with torch.device("meta"):
        return MoEGPT(cfg, topo).param_shards
