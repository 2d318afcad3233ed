"""`moe-dist export-hf`: an imported checkpoint goes back to a folder that transformers loads as the same family
with the same logits; a trained checkpoint exports its trained weights; a natively trained model exports under
--family when the family can express it, and is refused naming the field when not; the folder appears whole."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from checkpoint_helpers import G, GlobalBatcher
from hf_helpers import FAMILIES, hf_logits, random_model, save, tokens
from moe_dist import cli, config
from moe_dist.config import ConfigError
from moe_dist.hf import ckpt_io, exporter, families, importer

ATOL = 1e-4


def _load_hf(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder).float().eval()


def _export(root, out, **kw):
    return exporter.export(root, out, say=lambda *a: None, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_loads_as_the_family_with_equal_logits(family, tmp_path):
    hf = random_model(family)
    importer.convert(save(hf, tmp_path / "hf"), tmp_path / "ckpt", say=lambda *a: None)
    _export(tmp_path / "ckpt", tmp_path / "out")
    back = _load_hf(tmp_path / "out")
    assert type(back).__name__ == families.FAMILIES[family].architecture
    assert back.config.model_type == family
    tok = tokens()
    torch.testing.assert_close(hf_logits(back, tok), hf_logits(hf, tok), atol=ATOL, rtol=0)
    assert (tmp_path / "out" / "generation_config.json").is_file()      # carried from the import
    assert json.loads((tmp_path / "out" / "moe_dist_export.json").read_text())["step"] == 0


def test_trained_checkpoint_exports_its_trained_weights(tmp_path):
    """After a training step, transformers' logits from the export equal moe_dist's from the checkpoint."""
    from moe_dist.train.trainer import Trainer
    _, cfg_path = importer.convert(save(random_model("qwen3_moe"), tmp_path / "hf"), tmp_path / "ckpt",
                                   say=lambda *a: None)
    cfg = config.load(cfg_path, [f"--train.out_dir={tmp_path / 'run'}", "--train.steps=1", "--train.batch_size=2",
                                 "--train.seq_len=16", "--train.tensorboard=false", "--train.lr=0.01"])
    Trainer(cfg, batcher=GlobalBatcher(G, 16, 0, 1)).fit(progress=False)
    model, path, step = ckpt_io.load_weights(tmp_path / "ckpt", cfg)
    assert step == 1
    _export(tmp_path / "ckpt", tmp_path / "out", max_shard_size="40KB")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    tok = tokens()
    with torch.no_grad():
        ours = model.eval()(tok).logits
    first, _, _ = ckpt_io.load_weights(tmp_path / "ckpt", cfg, step=0)
    with torch.no_grad():
        assert (first.eval()(tok).logits - ours).abs().max() > 1e-3      # the step changed the model
    torch.testing.assert_close(hf_logits(_load_hf(tmp_path / "out"), tok), ours, atol=ATOL, rtol=0)


def _native(tmp_path, **moe):
    """A natively trained (here: freshly initialised) tiny model's checkpoint and its config file."""
    from moe_dist.models.gpt import MoEGPT
    raw = {"model": {"vocab_size": 256, "dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32,
                     "dense_hidden": 48}, "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 16,
                                                  "renormalize": True, **moe},
           "train": {"seq_len": 16}, "checkpoint": {"dir": str(tmp_path / "ckpt")}}
    cfg = config.from_dict(raw)
    config.validate(cfg)
    torch.manual_seed(0)
    model = MoEGPT(cfg)
    ckpt_io.write_step0(model, cfg, tmp_path / "ckpt", {"family": None})
    (tmp_path / "ckpt.yaml").write_text(yaml.safe_dump(raw))
    return model


def test_native_model_exports_with_family_flag(tmp_path):
    ours = _native(tmp_path)
    with pytest.raises(ConfigError, match=r"no family is recorded; pass --family \(families that can express this "
                                          r"config: mixtral\)"):
        _export(tmp_path / "ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _export(tmp_path / "ckpt", tmp_path / "out", family="mixtral")
    tok = tokens()
    with torch.no_grad():
        want = ours.eval()(tok).logits
    torch.testing.assert_close(hf_logits(_load_hf(tmp_path / "out"), tok), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family,moe,match", [
    ("mixtral", {"num_shared_experts": 1}, r"moe\.num_shared_experts=1 cannot be expressed as mixtral"),
    ("mixtral", {"score_func": "sigmoid"}, r"moe\.score_func='sigmoid' cannot be expressed as mixtral"),
    ("qwen2_moe", {}, r"moe\.num_shared_experts/shared_expert_gate=\(0, False\) cannot be expressed as qwen2_moe"),
    ("qwen3_moe", {}, r"model\.qk_norm='none' cannot be expressed as qwen3_moe"),
    ("olmoe", {"route_scale": 2.0}, r"moe\.route_scale=2\.0 cannot be expressed as olmoe"),
])
def test_config_no_family_can_express_is_refused_naming_the_field(family, moe, match, tmp_path):
    _native(tmp_path, **moe)
    with pytest.raises(ConfigError, match=match):
        _export(tmp_path / "ckpt", tmp_path / "out", family=family)
    assert not (tmp_path / "out").exists()


def test_bfloat16_export_and_cli(tmp_path, capsys):
    hf = random_model("mixtral")
    importer.convert(save(hf, tmp_path / "hf"), tmp_path / "ckpt", say=lambda *a: None)
    rc = cli.main(["export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--dtype", "bfloat16"])
    assert rc == 0 and "as mixtral (MixtralForCausalLM, bfloat16)" in capsys.readouterr().out
    from safetensors import safe_open
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    tok = tokens()
    torch.testing.assert_close(hf_logits(_load_hf(tmp_path / "out"), tok), hf_logits(hf, tok), atol=0.5, rtol=0.05)
    capsys.readouterr()
    # A non-empty destination is refused in one line, exit 2, and left as it was.
    rc = cli.main(["export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == cli.EXIT_BAD_INPUT and err == [f"moe-dist: config error: --out {tmp_path / 'out'} exists and is not "
                                                "empty; choose a new folder"]


def test_missing_config_and_checkpoint_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="is not a checkpoint folder"):
        _export(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ConfigError, match=r"ckpt\.yaml does not exist; pass --config FILE"):
        _export(tmp_path / "ckpt", tmp_path / "out")
    _native(tmp_path)
    with pytest.raises(ConfigError, match="no checkpoint of step 7"):
        _export(tmp_path / "ckpt", tmp_path / "out", family="mixtral", step=7)
    assert not (tmp_path / "out").exists()


def test_tied_embeddings_round_trip(tmp_path):
    """tie_word_embeddings: save_pretrained drops lm_head.weight; the import ties, the export drops it again."""
    hf = random_model("qwen3_moe", tie_word_embeddings=True)
    _, cfg_path = importer.convert(save(hf, tmp_path / "hf"), tmp_path / "ckpt", say=lambda *a: None)
    assert config.load(cfg_path).model.tie_embeddings
    _export(tmp_path / "ckpt", tmp_path / "out")
    from safetensors import safe_open
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    tok = tokens()
    torch.testing.assert_close(hf_logits(_load_hf(tmp_path / "out"), tok), hf_logits(hf, tok), atol=ATOL, rtol=0)


def test_corrupt_checkpoint_is_a_checkpoint_error(tmp_path, capsys):
    importer.convert(save(random_model("olmoe"), tmp_path / "hf"), tmp_path / "ckpt", say=lambda *a: None)
    shard = next((tmp_path / "ckpt" / "step_000000").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    capsys.readouterr()
    rc = cli.main(["export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == cli.EXIT_BAD_INPUT and len(err) == 1
    assert err[0].startswith(f"moe-dist: checkpoint error: checkpoint {tmp_path / 'ckpt' / 'step_000000'} is "
                             "corrupt") and shard.name in err[0]
    assert not (tmp_path / "out").exists()
