"""`moe-dist upcycle DENSE_DIR --experts E --top-k K --out CKPT [--granularity G]`: a dense Llama, Mistral or
Qwen2 model becomes an MoE model whose logits at step 0 equal the dense model's; it then trains like any
checkpoint.

Why the output is unchanged. Every MLP becomes E copies of itself, each optionally cut into G finer experts
along the hidden dimension (piece g holds hidden units [g·F, (g+1)·F), F = I/G, of the gate, up and down
projections); expert c·G + g is piece g of copy c: E·G experts, top-(K·G), renormalised weights.
- SwiGLU is elementwise over the hidden units, so the G pieces' outputs sum to the dense MLP's output.
- The router rows of the G pieces of one copy are equal (a random row per copy, std = the model's
  initializer_range): their logits tie, so a token's top-(K·G) is always K whole copies (the K best copies'
  pieces, never part of one, unless two copies' logits tie exactly). With renormalised weights p_c/(G·Σ p)
  per piece, the output is (1/G)·Σ_c p_c/Σ p · dense(x) = dense(x)/G; the pieces' down projections are
  therefore multiplied by G (exact for powers of two), and the MoE layer returns dense(x).
- K·G must be at least 2: at top-1 moe_dist keeps the probability as the weight (no renormalisation), which
  would scale the output by p.
The random per-copy rows (rather than zeros) give the router something to learn from at step 0 and spread
tokens over the copies; zero rows would tie every expert and send every token to the same ones.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from moe_dist.config import Config, ConfigError, DataConfig, MoEConfig, TrainConfig, validate
from moe_dist.hf import ckpt_io, families, mapping
from moe_dist.hf.importer import read_config_json
from moe_dist.hf.weights import HFWeights, check_names_and_shapes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="DENSE_HF_DIR", help="a dense Llama, Mistral or Qwen2 folder (save_pretrained)")
    p.add_argument("--experts", type=int, required=True, metavar="E", help="copies of each MLP")
    p.add_argument("--top-k", type=int, required=True, metavar="K", help="copies each token uses")
    p.add_argument("--granularity", type=int, default=1, metavar="G",
                   help="cut each copy into G finer experts along the hidden dim (E·G experts, top-(K·G))")
    p.add_argument("--aux-loss-coef", type=float, default=0.01, help="moe.aux_loss_coef of the new model")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint folder to create (checkpoint.dir)")
    p.add_argument("--config-out", default=None, metavar="FILE",
                   help="where to write the moe_dist config (default: CKPT.yaml beside the checkpoint folder)")


def moe_config(hc, where: str, experts: int, top_k: int, granularity: int, aux_loss_coef: float,
               qkv_bias: bool) -> Config:
    for name, v in (("--experts", experts), ("--top-k", top_k), ("--granularity", granularity)):
        if v < 1:
            raise ConfigError(f"{name}={v}: must be >= 1")
    if top_k > experts:
        raise ConfigError(f"--top-k={top_k} exceeds --experts={experts}; lower --top-k or add experts")
    if top_k * granularity < 2:
        raise ConfigError("--top-k=1 with --granularity=1: moe_dist keeps the router probability as the top-1 "
                          "weight, so the output would not equal the dense model's; use --top-k 2 or "
                          "--granularity 2 or more")
    inter = hc.intermediate_size
    if inter % granularity:
        raise ConfigError(f"--granularity={granularity} does not divide the MLP's intermediate_size={inter}")
    m = families.base_model(hc, where)
    m.qkv_bias, m.moe_every, m.first_dense = qkv_bias, 1, 0
    moe = MoEConfig(num_experts=experts * granularity, top_k=top_k * granularity, expert_hidden=inter // granularity,
                    activation="swiglu", score_func="softmax", renormalize=True, capacity_factor=None,
                    aux_loss_coef=aux_loss_coef)
    cfg = Config(model=m, moe=moe, train=TrainConfig(seq_len=min(TrainConfig().seq_len, m.max_seq_len)),
                 data=DataConfig())
    validate(cfg)
    return cfg


def dense_checks(hc, model_type: str, where: str) -> bool:
    """Refuse what moe_dist's attention/MLP cannot hold; returns whether q/k/v carry biases."""
    if getattr(hc, "attention_bias", False):
        raise ConfigError(f"{where}: attention_bias=true puts a bias on o_proj too; moe_dist has q/k/v biases only")
    if getattr(hc, "mlp_bias", False):
        raise ConfigError(f"{where}: mlp_bias=true: moe_dist's MLPs and experts have no biases")
    return families.DENSE_FAMILIES[model_type]


def upcycled_experts(W1: torch.Tensor, W3: torch.Tensor, W2: torch.Tensor, E: int, G: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_in [E·G, D, 2F], w_out [E·G, F, D]) from the dense gate W1 [I, D], up W3 [I, D], down W2 [D, I]."""
    gates, ups, downs = W1.chunk(G, 0), W3.chunk(G, 0), W2.chunk(G, 1)
    w_in = torch.stack([torch.cat([gates[g], ups[g]], 0).t() for _ in range(E) for g in range(G)])
    w_out = torch.stack([(downs[g] * G).t() for _ in range(E) for g in range(G)])
    return w_in, w_out


def upcycled_router(D: int, E: int, G: int, std: float, seed: int, layer: int) -> torch.Tensor:
    """[E·G, D]: one random row per copy, repeated for its G pieces."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (layer + 1))
    return torch.randn(E, D, generator=gen).mul_(std).repeat_interleave(G, dim=0)


def convert(model_dir: str | Path, out: str | Path, experts: int, top_k: int, granularity: int = 1,
            aux_loss_coef: float = 0.01, config_out: str | Path | None = None, say=print) -> tuple[Path, Path]:
    src, root = Path(model_dir), Path(out)
    raw = read_config_json(src)
    where = str(src / "config.json")
    mt = raw.get("model_type")
    if mt not in families.DENSE_FAMILIES:
        hint = "; it is an MoE model already: use `moe-dist import-hf`" if mt in families.BY_MODEL_TYPE else ""
        raise ConfigError(f"{where}: model_type {mt!r} cannot be upcycled{hint}; dense families supported: "
                          f"{', '.join(sorted(families.DENSE_FAMILIES))}")
    hc = families.hf_config_object(raw, where)
    qkv_bias = dense_checks(hc, mt, where)
    cfg = moe_config(hc, where, experts, top_k, granularity, aux_loss_coef, qkv_bias)
    cfg.checkpoint.dir = str(root)
    cfg_path = Path(config_out) if config_out else ckpt_io.default_config_path(root)
    ckpt_io.refuse_used_root(root, cfg_path)
    m, E, G = cfg.model, experts, granularity
    D, inter = m.dim, hc.intermediate_size
    # Attention, norms, embeddings: the same tensors as in an MoE family's files (Mixtral's names are Llama's).
    rules = [r for r in mapping.rules(families.FAMILIES["mixtral"], cfg) if ".mlp." not in r.ours]
    want = {k: s for r in rules for k, s in zip(r.theirs, r.shapes)}
    for i in range(m.n_layers):
        p = f"model.layers.{i}.mlp"
        want.update({f"{p}.gate_proj.weight": (inter, D), f"{p}.up_proj.weight": (inter, D),
                     f"{p}.down_proj.weight": (D, inter)})
    optional: tuple[str, ...] = ()
    if m.tie_embeddings:
        want["lm_head.weight"], optional = (m.vocab_size, D), ("lm_head.weight",)
    weights = HFWeights(src)
    check_names_and_shapes(weights.shapes, want, str(src), f"the dense {mt} model config.json describes",
                           optional=optional)
    model = ckpt_io.empty_model(cfg)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for r in rules:
            params[r.ours].copy_(r.join([weights.get(k) for k in r.theirs]))
        for i in range(m.n_layers):
            p, o = f"model.layers.{i}.mlp", f"blocks.{i}.mlp"
            w_in, w_out = upcycled_experts(weights.get(f"{p}.gate_proj.weight"), weights.get(f"{p}.up_proj.weight"),
                                           weights.get(f"{p}.down_proj.weight"), E, G)
            params[f"{o}.experts.w_in_EDF2"].copy_(w_in)
            params[f"{o}.experts.w_out_EFD"].copy_(w_out)
            params[f"{o}.router.weight_ED"].copy_(upcycled_router(D, E, G, m.init_std, cfg.train.seed, i))
    covered = {r.ours for r in rules} | {f"blocks.{i}.mlp.{n}" for i in range(m.n_layers)
                                         for n in ("experts.w_in_EDF2", "experts.w_out_EFD", "router.weight_ED")}
    if covered != set(params):
        raise RuntimeError(f"upcycle does not fill {sorted(set(params) - covered)[:4]}: mapping out of date")
    tokens = {k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in raw}
    record = {"family": None if qkv_bias else "mixtral", "source": str(src.resolve()), "config_json": tokens,
              "upcycled": {"from": mt, "experts": E, "top_k": top_k, "granularity": G}}
    header = (f"moe_dist config of an MoE model upcycled from the dense {mt} model in {src} by `moe-dist upcycle`\n"
              f"({E} copies of each MLP x {G} pieces = {E * G} experts, top-{top_k * G}). Train: moe-dist train "
              f"{cfg_path} --data.path=TOKENS")
    return ckpt_io.publish(model, cfg, root, record, src, cfg_path, header,
                           f"upcycle: {mt} -> {families.config_summary(cfg)}", say)


def run(args) -> int:
    return ckpt_io.reporting_checkpoint_errors(lambda: convert(
        args.model_dir, args.out, args.experts, args.top_k, args.granularity, args.aux_loss_coef, args.config_out))
