"""The Hugging Face model families moe_dist reads and writes, and their configs in both directions.

A family is a `model_type` of config.json whose model moe_dist computes exactly (fp32): the same attention,
norms, rotary embedding, router and experts. `to_config` maps a family's config.json onto a moe_dist `Config`
and refuses, naming the field, what moe_dist cannot compute; `to_hf` does the reverse for export and refuses a
moe_dist config that the family cannot express, naming the moe_dist field.

Router and loss conventions (README: "Start from a Hugging Face model"):
- every family: softmax over all experts, then top-k; weights renormalised to sum to 1 when the family says so
  (Mixtral always; Qwen2-MoE, Qwen3-MoE and OLMoE by `norm_topk_prob`). transformers computes the router logits
  in the model dtype and the softmax in fp32; moe_dist computes both in fp32, so in bf16 a near-tie may pick
  another expert (in fp32 the two agree).
- load balancing: transformers adds `router_aux_loss_coef` times ONE Switch loss over the routing of all MoE
  layers pooled, E·Σ f_i·P_i with f_i the assignments per token (K at balance), and only when the config's
  `output_router_logits` is true; moe_dist sums one loss per MoE layer with f_i the share of assignments (1 at
  balance). moe.aux_loss_coef = router_aux_loss_coef · K / L (L MoE layers) gives the same value at balance
  and the same gradient for each layer's probabilities; export inverts it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from moe_dist.config import Config, ConfigError, DataConfig, ModelConfig, MoEConfig, TrainConfig, validate
from moe_dist.models.gpt import is_moe_layer


@dataclass(frozen=True)
class Family:
    name: str                   # what --family takes and the README's table names
    model_type: str             # config.json's model_type
    architecture: str           # the transformers class export writes into config.json
    moe_prefix: str             # the MoE block's module name inside a layer
    expert_keys: tuple[str, str, str]    # (gate, up, down) projection names of one routed expert
    shared_expert: bool         # Qwen2-MoE: a shared expert with a sigmoid gate
    qk_norm: str                # moe_dist model.qk_norm the family uses


FAMILIES = {f.name: f for f in [
    Family("mixtral", "mixtral", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"), False, "none"),
    Family("qwen2_moe", "qwen2_moe", "Qwen2MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), True,
           "none"),
    Family("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), False,
           "per_head"),
    Family("olmoe", "olmoe", "OlmoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), False, "full"),
]}
BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}
SUPPORTED = ", ".join(f"{f.name} ({f.architecture})" for f in FAMILIES.values())

# Dense families `upcycle` reads: model_type -> whether q/k/v carry biases by construction.
DENSE_FAMILIES = {"llama": False, "mistral": False, "qwen2": True}

# Families known by name that moe_dist cannot compute, with the reason (the rest are refused generically).
KNOWN_UNSUPPORTED = {
    "deepseek_v3": "its multi-head latent attention (MLA) does not exist in moe_dist",
    "deepseek_v2": "its multi-head latent attention (MLA) does not exist in moe_dist",
    "qwen3_next": "its gated delta-net (linear attention) layers do not exist in moe_dist",
    "llama4": "its chunked attention and interleaved no-rope layers do not exist in moe_dist",
    "gpt_oss": "its attention sinks and clamped SwiGLU experts do not exist in moe_dist",
    "dbrx": "its fused, clipped qkv projection does not exist in moe_dist",
}


def family_of(raw: dict[str, Any], where: str) -> Family:
    """The family of a parsed config.json, or a ConfigError naming its model_type and the supported ones."""
    mt = raw.get("model_type")
    if mt in BY_MODEL_TYPE:
        return BY_MODEL_TYPE[mt]
    arch = ", ".join(raw.get("architectures") or []) or "no architectures field"
    why = KNOWN_UNSUPPORTED.get(mt, "moe_dist has no mapping for it")
    raise ConfigError(f"{where}: model_type {mt!r} ({arch}) is not supported ({why}); supported families: "
                      f"{SUPPORTED}")


# ----------------------------------------------------------------------------------------- config.json -> ours

def hf_config_object(raw: dict[str, Any], where: str):
    """transformers' config class for the model_type, filled from the parsed JSON (its defaults for absent
    fields, e.g. Qwen2-MoE's qkv_bias=True). No remote code: only the built-in class of a known model_type."""
    try:
        from transformers import CONFIG_MAPPING
    except ImportError:
        raise ConfigError("Hugging Face conversion needs transformers; pip install 'moe-dist[hf]'") from None
    try:
        return CONFIG_MAPPING[raw["model_type"]].from_dict(dict(raw))
    except Exception as e:           # transformers' own validation of the values
        raise ConfigError(f"{where}: transformers refuses this config ({str(e).splitlines()[0]}); fix config.json"
                          ) from None


def rope_theta(hc, where: str) -> float:
    rp = getattr(hc, "rope_parameters", None) or {}
    kind = rp.get("rope_type", "default")
    if kind != "default":
        raise ConfigError(f"{where}: rope_parameters.rope_type={kind!r}: moe_dist implements plain rotary embeddings "
                          "only (rope_type 'default'); scaled variants (linear, dynamic, yarn, llama3) are not "
                          "supported")
    theta = rp.get("rope_theta", getattr(hc, "rope_theta", None))
    if theta is None:
        raise ConfigError(f"{where}: no rope_theta (rope_parameters.rope_theta); add it to config.json")
    return float(theta)


def max_seq_len(hc) -> int:
    """Sliding-window attention equals full causal attention on sequences no longer than the window, so a
    windowed model is imported with max_seq_len capped at its window (training never sees a longer one)."""
    n = int(hc.max_position_embeddings)
    window = getattr(hc, "sliding_window", None)
    if getattr(hc, "use_sliding_window", True) and window:
        n = min(n, int(window))
    return n


def base_model(hc, where: str) -> ModelConfig:
    """The fields every family (and the dense ones) share: sizes, norms, rotary, tying."""
    if hc.hidden_act != "silu":
        raise ConfigError(f"{where}: hidden_act={hc.hidden_act!r}: moe_dist's MLPs are SwiGLU (silu); no other "
                          "activation maps")
    n_heads, n_kv = hc.num_attention_heads, hc.num_key_value_heads or hc.num_attention_heads
    head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // n_heads
    return ModelConfig(
        vocab_size=hc.vocab_size, dim=hc.hidden_size, n_layers=hc.num_hidden_layers, n_heads=n_heads,
        n_kv_heads=None if n_kv == n_heads else n_kv, max_seq_len=max_seq_len(hc),
        dense_hidden=hc.intermediate_size, norm_eps=float(hc.rms_norm_eps), rope_theta=rope_theta(hc, where),
        tie_embeddings=bool(hc.tie_word_embeddings), init_std=float(getattr(hc, "initializer_range", 0.02)),
        head_dim=None if head_dim * n_heads == hc.hidden_size else head_dim)


def moe_layers_of(fam: Family, hc) -> list[int]:
    """The layers transformers builds as MoE blocks."""
    n = hc.num_hidden_layers
    if fam.name in ("mixtral", "olmoe"):
        return list(range(n))
    step, dense = hc.decoder_sparse_step, set(hc.mlp_only_layers or [])
    return [i for i in range(n) if i not in dense and hc.num_experts > 0 and (i + 1) % step == 0]


def placement(moe_ids: list[int], n_layers: int, where: str) -> tuple[int, int]:
    """(model.first_dense, model.moe_every) that make exactly `moe_ids` MoE, or a ConfigError."""
    for first in range(n_layers):
        for every in range(1, n_layers + 1):
            m = ModelConfig(n_layers=n_layers, first_dense=first, moe_every=every)
            if [i for i in range(n_layers) if is_moe_layer(m, i)] == moe_ids:
                return first, every
    raise ConfigError(f"{where}: MoE layers {moe_ids} (from decoder_sparse_step and mlp_only_layers) are not "
                      "'every k-th layer after the first d dense ones', the only placement moe_dist has "
                      "(model.moe_every, model.first_dense)")


def to_config(fam: Family, hc, where: str) -> Config:
    """The moe_dist config of a family's model; refuses what moe_dist would compute differently."""
    m = base_model(hc, where)
    top_k = hc.num_experts_per_tok
    if fam.name == "mixtral":
        experts, hidden, renorm = hc.num_local_experts, hc.intermediate_size, True
    else:
        experts, renorm = hc.num_experts, bool(hc.norm_topk_prob)
        hidden = hc.intermediate_size if fam.name == "olmoe" else hc.moe_intermediate_size
    if renorm and top_k == 1:
        raise ConfigError(f"{where}: num_experts_per_tok=1 with renormalised top-k weights (weight 1.0): moe_dist "
                          "keeps the router probability as the top-1 weight; not convertible")
    moe_ids = moe_layers_of(fam, hc)
    if not moe_ids:
        raise ConfigError(f"{where}: no MoE layer (num_experts / decoder_sparse_step / mlp_only_layers); a dense "
                          "model is upcycled with `moe-dist upcycle` instead")
    m.first_dense, m.moe_every = placement(moe_ids, m.n_layers, where)
    if fam.name in ("qwen3_moe", "olmoe") and getattr(hc, "attention_bias", False):
        raise ConfigError(f"{where}: attention_bias=true puts a bias on o_proj too; moe_dist has q/k/v biases only "
                          "(model.qkv_bias)")
    if fam.name == "olmoe" and getattr(hc, "clip_qkv", None) is not None:
        raise ConfigError(f"{where}: clip_qkv={hc.clip_qkv}: moe_dist does not clamp q/k/v; set it to null only "
                          "if the model was trained without it")
    m.qkv_bias = fam.name == "qwen2_moe" and bool(getattr(hc, "qkv_bias", True))
    m.qk_norm = fam.qk_norm
    moe = MoEConfig(num_experts=experts, top_k=top_k, expert_hidden=hidden, activation="swiglu",
                    score_func="softmax", renormalize=renorm, capacity_factor=None,
                    aux_loss_coef=float(hc.router_aux_loss_coef) * top_k / len(moe_ids),
                    jitter_eps=float(getattr(hc, "router_jitter_noise", 0.0) or 0.0))
    if fam.shared_expert:
        moe.num_shared_experts, moe.shared_expert_gate = 1, True
        moe.shared_expert_hidden = hc.shared_expert_intermediate_size
    cfg = Config(model=m, moe=moe, train=TrainConfig(seq_len=min(TrainConfig().seq_len, m.max_seq_len)),
                 data=DataConfig())
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: maps to an invalid moe_dist config ({e})") from None
    return cfg


# ----------------------------------------------------------------------------------------- ours -> config.json

def _refuse(fam: Family, field: str, value: Any, need: str) -> ConfigError:
    return ConfigError(f"{field}={value!r} cannot be expressed as {fam.name} ({fam.architecture}): it needs {need}")


def expressible(fam: Family, cfg: Config) -> Optional[ConfigError]:
    """None when `fam` can express cfg's model exactly, else the error naming the first field that stops it."""
    m, moe = cfg.model, cfg.moe
    checks: list[tuple[bool, str, Any, str]] = [
        (moe.activation == "swiglu", "moe.activation", moe.activation, "swiglu"),
        (moe.score_func == "softmax", "moe.score_func", moe.score_func, "softmax"),
        (not moe.expert_bias, "moe.expert_bias", moe.expert_bias, "no expert bias"),
        (moe.num_groups == 1, "moe.num_groups", moe.num_groups, "ungrouped routing (1)"),
        (moe.route_scale == 1.0, "moe.route_scale", moe.route_scale, "1.0"),
        (m.qk_norm == fam.qk_norm, "model.qk_norm", m.qk_norm, repr(fam.qk_norm)),
        (not (m.qkv_bias and fam.name != "qwen2_moe"), "model.qkv_bias", m.qkv_bias, "false"),
        (moe.top_k > 1 or not moe.renormalize, "moe.top_k", moe.top_k, "> 1 with moe.renormalize"),
    ]
    if fam.name == "mixtral":
        checks.append((moe.renormalize or moe.top_k == 1, "moe.renormalize", moe.renormalize, "true"))
    if fam.name in ("mixtral", "olmoe"):
        checks.append((m.first_dense == 0 and m.moe_every == 1, "model.moe_every/first_dense",
                       (m.moe_every, m.first_dense), "every layer MoE (1, 0)"))
    if fam.shared_expert:
        checks.append((moe.num_shared_experts == 1 and moe.shared_expert_gate, "moe.num_shared_experts/"
                       "shared_expert_gate", (moe.num_shared_experts, moe.shared_expert_gate), "one gated shared "
                       "expert (1, true)"))
    else:
        checks.append((moe.num_shared_experts == 0, "moe.num_shared_experts", moe.num_shared_experts, "0"))
    if fam.name in ("olmoe", "qwen2_moe"):         # their configs have no head_dim field
        checks.append((m.head_dim in (None, m.dim // m.n_heads), "model.head_dim", m.head_dim, "dim // n_heads"))
    for ok, field, value, need in checks:
        if not ok:
            return _refuse(fam, field, value, need)
    return None


def to_hf(fam: Family, cfg: Config, base: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """config.json values (before transformers' own defaults) for cfg's model as `fam`. `base` is the config.json
    recorded at import: its other fields (token ids, ...) are kept."""
    err = expressible(fam, cfg)
    if err:
        raise err
    m, moe = cfg.model, cfg.moe
    moe_ids = [i for i in range(m.n_layers) if is_moe_layer(m, i)]
    out = {k: v for k, v in (base or {}).items() if k not in ("architectures", "transformers_version")}
    rope = dict(out.get("rope_parameters") or {})
    rope.update(rope_type="default", rope_theta=m.rope_theta)
    out.pop("rope_theta", None)
    out.update(
        model_type=fam.model_type, architectures=[fam.architecture], vocab_size=m.vocab_size, hidden_size=m.dim,
        num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads or m.n_heads,
        head_dim=m.head_dim or m.dim // m.n_heads, hidden_act="silu", max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps, rope_parameters=rope, tie_word_embeddings=m.tie_embeddings,
        initializer_range=m.init_std, num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.aux_loss_coef * len(moe_ids) / moe.top_k)
    if fam.name == "mixtral":
        out.update(num_local_experts=moe.num_experts, intermediate_size=moe.expert_hidden, sliding_window=None,
                   router_jitter_noise=moe.jitter_eps)
    elif fam.name == "olmoe":
        out.update(num_experts=moe.num_experts, intermediate_size=moe.expert_hidden, norm_topk_prob=moe.renormalize,
                   attention_bias=False, clip_qkv=None)
        out.pop("head_dim")
    else:
        dense = [i for i in range(m.n_layers) if i not in moe_ids]
        out.update(num_experts=moe.num_experts, moe_intermediate_size=moe.expert_hidden,
                   intermediate_size=m.dense_hidden, norm_topk_prob=moe.renormalize, decoder_sparse_step=1,
                   mlp_only_layers=dense, use_sliding_window=False)
        if fam.name == "qwen2_moe":
            out.update(qkv_bias=m.qkv_bias, shared_expert_intermediate_size=(
                moe.shared_expert_hidden or moe.num_shared_experts * moe.expert_hidden))
            out.pop("head_dim")
        else:
            out.update(attention_bias=False)
    return out


def config_summary(cfg: Config) -> str:
    m, moe = cfg.model, cfg.moe
    return (f"{m.n_layers} layers, dim {m.dim}, {moe.num_experts} experts top-{moe.top_k}, expert hidden "
            f"{moe.expert_hidden}")

