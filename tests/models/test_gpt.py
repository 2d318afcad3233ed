"""The MoE GPT (moe_dist.models.gpt): layer placement, parameter bookkeeping, outputs and losses, causality,
published sizes. Training runs whose loss must fall are in tests/train/test_training_runs.py."""
import math

import pytest
import torch

from moe_dist import config
from moe_dist.config import Config, ModelConfig, MoEConfig
from moe_dist.models.gpt import MoEGPT, count_parameters, is_moe_layer


def tiny(**moe) -> Config:
    return Config(model=ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=2, max_seq_len=32, dense_hidden=64),
                  moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, **moe))


@pytest.mark.parametrize("n_layers,moe_every,first_dense,expected", [
    (4, 1, 0, [0, 1, 2, 3]),          # Mixtral: every layer
    (4, 2, 0, [1, 3]),                # GLaM: every other layer
    (4, 1, 1, [1, 2, 3]),             # DeepSeek: first layer dense
    (6, 2, 1, [2, 4]),
])
def test_moe_layer_placement(n_layers, moe_every, first_dense, expected):
    m = ModelConfig(n_layers=n_layers, moe_every=moe_every, first_dense=first_dense)
    assert [i for i in range(n_layers) if is_moe_layer(m, i)] == expected


def test_expert_and_dense_parameters_partition_the_model():
    cfg = tiny(num_shared_experts=1)
    model = MoEGPT(cfg)
    expert, dense = model.expert_parameters(), model.dense_parameters()
    ids = [id(p) for p in model.parameters()]
    assert sorted(ids) == sorted(id(p) for p in expert + dense)
    assert not {id(p) for p in expert} & {id(p) for p in dense}
    # Routed experts only: router weights and shared experts are dense (reduced over all data-parallel ranks).
    assert all(p.dim() == 3 and p.shape[0] == 4 for p in expert)
    assert len(expert) == 2 * cfg.model.n_layers


def test_output_losses_and_stats():
    torch.manual_seed(0)
    cfg = tiny(z_loss_coef=1e-3)
    model = MoEGPT(cfg)
    x = torch.randint(0, 256, (3, 16))
    out = model(x, x)
    assert out.logits.shape == (3, 16, 256)
    assert len(out.stats) == 2
    expected_aux = sum(s.aux_loss + s.z_loss for s in out.stats)
    assert torch.allclose(out.aux_loss, expected_aux)
    assert torch.allclose(out.loss, out.lm_loss + out.aux_loss)
    for s in out.stats:
        assert int(s.tokens_per_expert.sum()) == 3 * 16 * 2        # dropless: every assignment processed
        assert s.z_loss > 0 and s.aux_loss > 0
    # Near-uniform router at init: the LM loss is about log(vocab).
    assert abs(out.lm_loss.item() - math.log(256)) < 0.5
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_causal_model_ignores_future_tokens():
    torch.manual_seed(0)
    model = MoEGPT(tiny()).eval()
    x = torch.randint(0, 256, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 256
    # Dropless routing is per token, so the prefix's logits cannot depend on later tokens.
    assert torch.allclose(model(x).logits[:, :8], model(y).logits[:, :8], atol=1e-5)


@pytest.mark.parametrize("path,total,active,tol", [
    ("configs/mixtral-8x7b.yaml", 46.7e9, 12.9e9, 0.005),
    ("configs/switch-base-128.yaml", 7.4e9, None, 0.01),
])
def test_published_parameter_counts(path, total, active, tol):
    cfg = config.load(path)
    with torch.device("meta"):
        model = MoEGPT(cfg)
    counts = count_parameters(model, cfg)
    assert abs(counts["total"] - total) / total < tol
    if active is not None:
        assert abs(counts["active"] - active) / active < tol
