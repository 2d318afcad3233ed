"""Shared by the Hugging Face tests (tests/hf/): tiny random models of each family, saved with save_pretrained,
with weights large enough (initializer_range 0.3) that a wrong mapping moves the logits far beyond tolerance."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 256          # the byte-level corpus of checkpoint_helpers fits it

COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, initializer_range=0.3, rms_norm_eps=1e-6)


def family_config(family: str, **over):
    """A tiny config of `family` that uses its distinctive features."""
    import transformers as tf
    if family == "mixtral":
        return tf.MixtralConfig(**{**COMMON, "intermediate_size": 24, "num_local_experts": 4,
                                   "num_experts_per_tok": 2, "rope_theta": 1e4, **over})
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**{**COMMON, "intermediate_size": 40, "moe_intermediate_size": 16,
                                    "shared_expert_intermediate_size": 24, "num_experts": 6, "num_experts_per_tok": 2,
                                    "norm_topk_prob": False, "mlp_only_layers": [0], "qkv_bias": True, **over})
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**{**COMMON, "head_dim": 12, "intermediate_size": 40, "moe_intermediate_size": 16,
                                    "num_experts": 6, "num_experts_per_tok": 3, "norm_topk_prob": True,
                                    "decoder_sparse_step": 2, **over})
    if family == "olmoe":
        return tf.OlmoeConfig(**{**COMMON, "pad_token_id": 1, "eos_token_id": 2, "intermediate_size": 16, "num_experts": 6, "num_experts_per_tok": 2,
                                 "norm_topk_prob": False, **over})
    raise ValueError(family)


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def random_model(family: str, seed: int = 0, **over):
    """An fp32 transformers model of `family` with random weights (norms too, so their mapping is checked)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, **over)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight")) or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def save(model, folder: Path, **kw) -> Path:
    model.save_pretrained(folder, **kw)
    return folder


def tokens(seed: int = 1, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, tok: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tok).logits.float()
