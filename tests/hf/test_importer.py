"""`moe-dist import-hf`: tiny random models of every family (fp32) give the same logits in moe_dist as in
transformers; sharded safetensors and weights-only .bin files read; bad input is refused in one line, naming
what is wrong, and nothing is written; the imported checkpoint trains."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from checkpoint_helpers import G, GlobalBatcher, corpus  # noqa: F401  (corpus: a fixture)
from hf_helpers import FAMILIES, hf_logits, random_model, save, tokens
from moe_dist import cli, config
from moe_dist.config import ConfigError
from moe_dist.hf import ckpt_io, importer

ATOL = 1e-4


def _import(src, root, **kw):
    return importer.convert(src, root, say=lambda *a: None, **kw)


def _ours_logits(root, cfg_path, tok):
    model, _, _ = ckpt_io.load_weights(root, config.load(cfg_path))
    model.eval()
    with torch.no_grad():
        return model(tok).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (transformers model, its save_pretrained folder)."""
    out = {}
    for fam in FAMILIES:
        model = random_model(fam)
        out[fam] = model, save(model, tmp_path_factory.mktemp(fam) / "hf")
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(family, saved, tmp_path):
    hf, src = saved[family]
    step_dir, cfg_path = _import(src, tmp_path / "ckpt")
    assert step_dir == tmp_path / "ckpt" / "step_000000" and cfg_path == tmp_path / "ckpt.yaml"
    tok = tokens()
    want = hf_logits(hf, tok)
    assert want.abs().max() > 1.0                     # large enough that a wrong mapping shows
    torch.testing.assert_close(_ours_logits(tmp_path / "ckpt", cfg_path, tok), want, atol=ATOL, rtol=0)


def test_family_fields_map(saved, tmp_path):
    """Each family's distinctive fields land in the moe_dist config."""
    got = {}
    for fam in FAMILIES:
        _, cfg_path = _import(saved[fam][1], tmp_path / fam)
        got[fam] = config.load(cfg_path)
    mx, q2, q3, ol = (got[f] for f in FAMILIES)
    assert mx.moe.renormalize and mx.model.n_kv_heads == 2 and mx.model.rope_theta == 1e4
    assert (q2.model.qkv_bias, q2.moe.num_shared_experts, q2.moe.shared_expert_gate, q2.moe.shared_expert_hidden) \
        == (True, 1, True, 24)
    assert (q2.model.first_dense, q2.model.moe_every, q2.model.dense_hidden, q2.moe.renormalize) == (1, 1, 40, False)
    assert (q3.model.qk_norm, q3.model.head_dim, q3.model.moe_every, q3.moe.top_k) == ("per_head", 12, 2, 3)
    assert (ol.model.qk_norm, ol.moe.expert_hidden, ol.model.norm_eps) == ("full", 16, 1e-6)
    # router_aux_loss_coef · K / L: Mixtral 0.001 · 2 / 3 MoE layers.
    assert mx.moe.aux_loss_coef == pytest.approx(0.001 * 2 / 3)
    assert mx.checkpoint.dir == str(tmp_path / "mixtral") and mx.moe.capacity_factor is None
    record = json.loads((tmp_path / "qwen3_moe" / ckpt_io.RECORD).read_text())
    assert record["family"] == "qwen3_moe" and record["config_json"]["model_type"] == "qwen3_moe"


def test_sharded_safetensors_index(tmp_path):
    hf = random_model("mixtral")
    src = save(hf, tmp_path / "hf", max_shard_size="30KB")
    assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 2
    _, cfg_path = _import(src, tmp_path / "ckpt")
    tok = tokens()
    torch.testing.assert_close(_ours_logits(tmp_path / "ckpt", cfg_path, tok), hf_logits(hf, tok), atol=ATOL, rtol=0)


def _to_bin(src):
    """Replace model.safetensors by pytorch_model.bin (torch.save of the same tensors)."""
    from safetensors.torch import load_file
    sd = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    torch.save(sd, src / "pytorch_model.bin")
    return sd


def test_torch_bin_reads_weights_only(tmp_path):
    hf = random_model("olmoe")
    src = save(hf, tmp_path / "hf")
    _to_bin(src)
    _, cfg_path = _import(src, tmp_path / "ckpt")
    tok = tokens()
    torch.testing.assert_close(_ours_logits(tmp_path / "ckpt", cfg_path, tok), hf_logits(hf, tok), atol=ATOL, rtol=0)


def test_sharded_torch_bin_index(tmp_path):
    hf = random_model("qwen2_moe")
    src = save(hf, tmp_path / "hf")
    sd = _to_bin(src)
    (src / "pytorch_model.bin").unlink()
    names = sorted(sd)
    parts = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for fname, keys in parts.items():
        torch.save({k: sd[k] for k in keys}, src / fname)
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in parts.items() for k in keys}}))
    _, cfg_path = _import(src, tmp_path / "ckpt")
    tok = tokens()
    torch.testing.assert_close(_ours_logits(tmp_path / "ckpt", cfg_path, tok), hf_logits(hf, tok), atol=ATOL, rtol=0)
    (src / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(ConfigError, match="lists pytorch_model-00002-of-00002.bin, which .* lacks; download every shard"):
        _import(src, tmp_path / "ckpt2")


class _Exploit:
    def __reduce__(self):
        return (print, ("code ran",))


def test_torch_bin_with_code_is_refused(tmp_path):
    src = save(random_model("mixtral"), tmp_path / "hf")
    sd = _to_bin(src)
    sd["extra"] = _Exploit()
    torch.save(sd, src / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="pytorch_model.bin: refused by weights-only loading"):
        _import(src, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


# ----------------------------------------------------------------------------------------------- bad input

def _edit_config(src, **changes):
    f = src / "config.json"
    raw = json.loads(f.read_text())
    raw.update(changes)
    f.write_text(json.dumps(raw))


def _rewrite_tensors(src, fn):
    from safetensors.torch import load_file, save_file
    sd = load_file(src / "model.safetensors")
    fn(sd)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})


def _refused(src, root, match):
    with pytest.raises(ConfigError, match=match) as e:
        _import(src, root)
    assert "\n" not in str(e.value)                              # one line
    assert not root.exists() and not root.with_name(root.name + ".yaml").exists()   # nothing written
    return str(e.value)


@pytest.fixture
def mixtral_dir(tmp_path):
    return save(random_model("mixtral"), tmp_path / "hf")


def test_unsupported_architecture_names_it_and_the_supported_ones(mixtral_dir, tmp_path):
    _edit_config(mixtral_dir, model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"])
    msg = _refused(mixtral_dir, tmp_path / "ckpt", "model_type 'deepseek_v3' \\(DeepseekV3ForCausalLM\\)")
    assert "multi-head latent attention" in msg
    for arch in ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM"):
        assert arch in msg


def test_missing_tensor_is_named_with_its_shape(mixtral_dir, tmp_path):
    _rewrite_tensors(mixtral_dir, lambda sd: sd.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    _refused(mixtral_dir, tmp_path / "ckpt", r"lacks 1 tensor\(s\).*model\.layers\.1\.block_sparse_moe\.experts\.2"
                                             r"\.w3\.weight \[24, 32\]")


def test_unexpected_tensor_is_named(mixtral_dir, tmp_path):
    _rewrite_tensors(mixtral_dir, lambda sd: sd.update({"model.layers.0.extra.weight": torch.zeros(3, 4)}))
    _refused(mixtral_dir, tmp_path / "ckpt", r"holds 1 tensor\(s\) that .* does not have: "
                                             r"model\.layers\.0\.extra\.weight \[3, 4\]")


def test_misshaped_tensor_is_named_with_both_shapes(mixtral_dir, tmp_path):
    _rewrite_tensors(mixtral_dir, lambda sd: sd.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 30)}))
    _refused(mixtral_dir, tmp_path / "ckpt", r"model\.layers\.0\.self_attn\.q_proj\.weight is \[32, 30\], expected "
                                             r"\[32, 32\]")


def test_config_that_contradicts_the_weights_is_refused(mixtral_dir, tmp_path):
    _edit_config(mixtral_dir, intermediate_size=20)
    _refused(mixtral_dir, tmp_path / "a", r"do not match .*experts\.0\.w1\.weight is \[24, 32\], expected \[20, "
                                          r"32\].*config\.json contradicts the weights")
    _edit_config(mixtral_dir, intermediate_size=24, num_local_experts=6)
    _refused(mixtral_dir, tmp_path / "b", r"lacks 18 tensor\(s\).*experts\.4\.w1\.weight \[24, 32\]")


@pytest.mark.parametrize("family,changes,match", [
    ("mixtral", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("mixtral", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0,
                                     "original_max_position_embeddings": 32}}, "rope_type='yarn'"),
    ("qwen3_moe", {"attention_bias": True}, "attention_bias=true puts a bias on o_proj"),
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv=8.0"),
    ("qwen2_moe", {"mlp_only_layers": [1]}, r"MoE layers \[0, 2\]"),
    ("mixtral", {"num_experts_per_tok": 1}, "num_experts_per_tok=1 with renormalised"),
])
def test_config_moe_dist_cannot_compute_is_refused(family, changes, match, tmp_path):
    src = save(random_model(family), tmp_path / "hf")
    _edit_config(src, **changes)
    _refused(src, tmp_path / "ckpt", match)


def test_missing_config_and_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", tmp_path / "ckpt", "has no config.json")
    src = save(random_model("mixtral"), tmp_path / "hf")
    (src / "model.safetensors").unlink()
    _refused(src, tmp_path / "ckpt", "holds no weights")


def test_out_folder_with_checkpoints_is_refused(mixtral_dir, tmp_path):
    _import(mixtral_dir, tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        _import(mixtral_dir, tmp_path / "ckpt", config_out=tmp_path / "other.yaml")


def test_cli_reports_one_line_and_exit_2(mixtral_dir, tmp_path, capsys):
    _edit_config(mixtral_dir, model_type="deepseek_v3")
    rc = cli.main(["import-hf", str(mixtral_dir), "--out", str(tmp_path / "ckpt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == cli.EXIT_BAD_INPUT and len(err) == 1
    assert err[0].startswith("moe-dist: config error: ") and "deepseek_v3" in err[0]


def test_cli_import_writes_config_where_asked(mixtral_dir, tmp_path, capsys):
    rc = cli.main(["import-hf", str(mixtral_dir), "--out", str(tmp_path / "ckpt"), "--config-out",
                   str(tmp_path / "cfg" / "m.yaml")])
    assert rc == 0 and "import-hf: mixtral" in capsys.readouterr().out
    raw = yaml.safe_load((tmp_path / "cfg" / "m.yaml").read_text())
    assert raw["model"]["dim"] == 32 and raw["checkpoint"]["dir"] == str(tmp_path / "ckpt")


# ------------------------------------------------------------------------------------------------ training

def test_one_training_step_from_an_imported_checkpoint(saved, tmp_path, corpus):
    from moe_dist.train.trainer import Trainer
    _, cfg_path = _import(saved["qwen2_moe"][1], tmp_path / "ckpt")
    cfg = config.load(cfg_path, [f"--data.path={corpus}", f"--train.out_dir={tmp_path / 'run'}", "--train.steps=1",
                                 "--train.batch_size=2", "--train.seq_len=16", "--train.tensorboard=false"])
    before, _, _ = ckpt_io.load_weights(tmp_path / "ckpt", cfg)
    trainer = Trainer(cfg, batcher=GlobalBatcher(G, 16, 0, 1))
    hist = trainer.fit(progress=False)
    assert str(trainer.resumed_from).endswith("step_000000")
    assert [s.step for s in hist.steps] == [0] and torch.isfinite(torch.tensor(hist.steps[0].loss))
    # The first step's loss is the imported model's loss on that batch.
    x, y = GlobalBatcher(G, 16, 0, 1).get_batch(0)
    with torch.no_grad():
        assert hist.steps[0].lm_loss == pytest.approx(before(x, y).lm_loss.item(), rel=1e-5)
    after = dict(trainer.model.named_parameters())
    changed = [n for n, p in before.named_parameters() if not torch.equal(p, after[n].detach())]
    assert "blocks.1.mlp.experts.w_in_EDF2" in changed and "blocks.1.mlp.shared_gate.weight" in changed


def test_train_command_resumes_from_the_import(saved, tmp_path, corpus, capsys):
    """`moe-dist train CONFIG --checkpoint.dir=CKPT` in one process starts from the imported step 0."""
    _, cfg_path = _import(saved["olmoe"][1], tmp_path / "ckpt")
    rc = cli.main(["train", str(cfg_path), f"--checkpoint.dir={tmp_path / 'ckpt'}", f"--data.path={corpus}",
                   "--train.steps=1", "--train.batch_size=2", "--train.seq_len=16", "--train.eval_batches=1",
                   f"--train.out_dir={tmp_path / 'run'}", "--train.tensorboard=false", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"resumed from {tmp_path / 'ckpt' / 'step_000000'} (step 0" in out
    assert (tmp_path / "ckpt" / "step_000001").is_dir()


def test_out_that_is_a_file_is_refused_before_any_work(mixtral_dir, tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ConfigError, match="--out='.*taken' is an existing file, not a folder"):
        _import(mixtral_dir, tmp_path / "taken")
    assert not (tmp_path / "taken.yaml").exists()


def test_bfloat16_weights_import_as_their_fp32_values(tmp_path):
    """Released models are mostly bf16: the checkpoint holds their exact values in fp32."""
    hf = random_model("mixtral").to(torch.bfloat16)
    src = save(hf, tmp_path / "hf")
    _, cfg_path = _import(src, tmp_path / "ckpt")
    model, _, _ = ckpt_io.load_weights(tmp_path / "ckpt", config.load(cfg_path))
    w = model.blocks[1].mlp.experts.w_in_EDF2
    assert w.dtype == torch.float32
    want = hf.model.layers[1].mlp.experts.gate_up_proj[2].t().float()     # transformers' fused [gate | up] of expert 2
    assert torch.equal(w[2], want)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_fused_expert_layout_imports(family, tmp_path):
    """save_pretrained(save_original_format=False) writes transformers 5's fused experts (gate_up_proj, down_proj)."""
    hf = random_model(family)
    src = save(hf, tmp_path / "hf", save_original_format=False)
    from safetensors import safe_open
    with safe_open(src / "model.safetensors", framework="pt") as f:
        assert "model.layers.1.mlp.experts.gate_up_proj" in f.keys()
    _, cfg_path = _import(src, tmp_path / "ckpt")
    tok = tokens()
    torch.testing.assert_close(_ours_logits(tmp_path / "ckpt", cfg_path, tok), hf_logits(hf, tok), atol=ATOL, rtol=0)


def test_checkpoint_holds_zero_moments_at_step_0(mixtral_dir, tmp_path):
    """The optimizer state a resume loads is AdamW's starting state: zero moments, step 0."""
    from moe_dist.train.trainer import Trainer
    _, cfg_path = _import(mixtral_dir, tmp_path / "ckpt")
    cfg = config.load(cfg_path, [f"--train.out_dir={tmp_path / 'run'}", "--train.seq_len=16"])
    trainer = Trainer(cfg, batcher=GlobalBatcher(G, 16, 0, 1))
    assert trainer.resume() == 0
    states = list(trainer.optimizer.state.values())
    assert len(states) == len(list(trainer.model.parameters()))
    for st in states:
        assert float(st["step"]) == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
        # The trainer's own tensors were filled (not the checkpoint's stride-0 views, which AdamW cannot update).
        assert st["exp_avg"].stride() != (0,) * st["exp_avg"].dim() or st["exp_avg"].numel() <= 1
