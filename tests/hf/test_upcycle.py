"""`moe-dist upcycle`: a dense Llama, Mistral or Qwen2 model becomes an MoE model whose step-0 logits equal the
dense model's (fp32), plain copies and fine-grained pieces alike; the result trains, and an upcycled Llama
exports as Mixtral; what cannot keep the output is refused."""
from __future__ import annotations

import pytest
import torch

from checkpoint_helpers import G, GlobalBatcher
from hf_helpers import VOCAB, hf_logits, random_model, save, tokens
from moe_dist import cli, config
from moe_dist.config import ConfigError
from moe_dist.hf import ckpt_io, exporter, upcycle

ATOL = 1e-4
DENSE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3)


def dense_model(kind: str, seed: int = 0, **over):
    import transformers as tf
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[kind]
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cls(**{**DENSE, **over})).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def _up(src, root, E, K, Gr=1):
    return upcycle.convert(src, root, E, K, Gr, say=lambda *a: None)


def _logits(root, cfg_path, tok):
    model, _, _ = ckpt_io.load_weights(root, config.load(cfg_path))
    with torch.no_grad():
        return model.eval()(tok).logits


@pytest.mark.parametrize("kind,E,K,Gr", [("llama", 4, 2, 1), ("llama", 4, 1, 2), ("llama", 2, 2, 3),
                                         ("llama", 3, 2, 4), ("mistral", 3, 2, 4), ("qwen2", 3, 2, 4)])
def test_step0_logits_equal_the_dense_model(kind, E, K, Gr, tmp_path):
    dense = dense_model(kind)
    _, cfg_path = _up(save(dense, tmp_path / "hf"), tmp_path / "ckpt", E, K, Gr)
    cfg = config.load(cfg_path)
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_hidden) == (E * Gr, K * Gr, 48 // Gr)
    assert cfg.model.qkv_bias == (kind == "qwen2") and cfg.moe.renormalize
    tok = tokens()
    want = hf_logits(dense, tok)
    assert want.abs().max() > 1.0
    torch.testing.assert_close(_logits(tmp_path / "ckpt", cfg_path, tok), want, atol=ATOL, rtol=0)


def test_tokens_spread_over_copies_and_take_whole_copies(tmp_path):
    """The random per-copy router rows send tokens to different copies, always all G pieces of each chosen copy."""
    _, cfg_path = _up(save(dense_model("llama"), tmp_path / "hf"), tmp_path / "ckpt", 4, 2, 2)
    model, _, _ = ckpt_io.load_weights(tmp_path / "ckpt", config.load(cfg_path))
    with torch.no_grad():
        out = model.eval()(tokens(batch=4, seq=32))
    for st in out.stats:
        per_expert = st.tokens_per_expert.view(4, 2)            # [copy, piece]
        assert torch.equal(per_expert[:, 0], per_expert[:, 1])   # both pieces of a copy, always together
        assert (per_expert[:, 0] > 0).sum() >= 3                  # more than the two copies a tie would give


def test_router_rows_repeat_per_copy_and_down_projections_scale():
    W1, W3, W2 = torch.randn(8, 4), torch.randn(8, 4), torch.randn(4, 8)
    w_in, w_out = upcycle.upcycled_experts(W1, W3, W2, E=2, G=2)
    assert w_in.shape == (4, 4, 8) and w_out.shape == (4, 4, 4)
    torch.testing.assert_close(w_in[3], torch.cat([W1[4:], W3[4:]], 0).t())
    torch.testing.assert_close(w_out[1], 2 * W2[:, 4:].t())
    r = upcycle.upcycled_router(4, 3, 2, 0.02, seed=1, layer=0)
    assert torch.equal(r[0], r[1]) and torch.equal(r[4], r[5]) and not torch.equal(r[1], r[2])


def test_upcycled_model_trains_and_exports_as_mixtral(tmp_path):
    from moe_dist.train.trainer import Trainer
    dense = dense_model("llama")
    _, cfg_path = _up(save(dense, tmp_path / "hf"), tmp_path / "ckpt", 4, 2, 2)
    tok = tokens()
    # Step 0 exported as Mixtral: transformers computes the dense model's logits with 8 experts.
    exporter.export(tmp_path / "ckpt", tmp_path / "out0", say=lambda *a: None)
    from transformers import AutoModelForCausalLM
    moe0 = AutoModelForCausalLM.from_pretrained(tmp_path / "out0").float().eval()
    assert type(moe0).__name__ == "MixtralForCausalLM" and moe0.config.num_local_experts == 8
    torch.testing.assert_close(hf_logits(moe0, tok), hf_logits(dense, tok), atol=ATOL, rtol=0)
    cfg = config.load(cfg_path, [f"--train.out_dir={tmp_path / 'run'}", "--train.steps=2", "--train.batch_size=2",
                                 "--train.seq_len=16", "--train.tensorboard=false"])
    hist = Trainer(cfg, batcher=GlobalBatcher(G, 16, 0, 1)).fit(progress=False)
    assert [s.step for s in hist.steps] == [0, 1] and all(torch.isfinite(torch.tensor(s.loss)) for s in hist.steps)
    model, _, step = ckpt_io.load_weights(tmp_path / "ckpt", cfg)
    assert step == 2
    r = model.blocks[0].mlp.router.weight_ED.detach()
    assert not torch.equal(r[0], r[1])               # training separates the pieces of a copy


@pytest.mark.parametrize("E,K,Gr,match", [
    (4, 1, 1, "--top-k=1 with --granularity=1"),
    (4, 5, 1, "--top-k=5 exceeds --experts=4"),
    (4, 2, 5, "--granularity=5 does not divide the MLP's intermediate_size=48"),
    (0, 1, 2, "--experts=0: must be >= 1"),
])
def test_arguments_that_cannot_keep_the_output_are_refused(E, K, Gr, match, tmp_path):
    src = save(dense_model("llama"), tmp_path / "hf")
    with pytest.raises(ConfigError, match=match):
        _up(src, tmp_path / "ckpt", E, K, Gr)
    assert not (tmp_path / "ckpt").exists()


def test_moe_and_unknown_models_are_refused(tmp_path, capsys):
    src = save(random_model("mixtral"), tmp_path / "moe")
    with pytest.raises(ConfigError, match="it is an MoE model already: use `moe-dist import-hf`"):
        _up(src, tmp_path / "ckpt", 4, 2)
    src = save(dense_model("llama", mlp_bias=True), tmp_path / "biased")
    with pytest.raises(ConfigError, match="mlp_bias=true"):
        _up(src, tmp_path / "ckpt", 4, 2)
    capsys.readouterr()
    rc = cli.main(["upcycle", str(tmp_path / "moe"), "--experts", "4", "--top-k", "2", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == cli.EXIT_BAD_INPUT and len(err) == 1 and err[0].startswith("moe-dist: config error: ")
    assert "dense families supported: llama, mistral, qwen2" in err[0]


def test_scaled_rope_is_refused(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}
    src = save(dense_model("llama", rope_parameters=rope), tmp_path / "hf")
    with pytest.raises(ConfigError, match="rope_type='llama3': moe_dist implements plain rotary embeddings only"):
        _up(src, tmp_path / "ckpt", 4, 2)
