"""Training runs on real text (Python's standard library as bytes): the LM loss must fall, and the expert
bias moves by exactly its rate per step."""
import pytest

from moe_dist import config
from moe_dist.train.data import prepare
from moe_dist.train.trainer import Trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "stdlib.bin"
    prepare(None, out, max_bytes=400_000)
    return out


@pytest.mark.parametrize("family", ["tiny-cpu", "deepseek-tiny"])
def test_loss_falls_on_real_text(corpus, tmp_path, family):
    """200 steps of Python source: the LM loss must fall clearly (by > 1.2 nats from ~5.5)."""
    cfg = config.load(f"configs/{family}.yaml", [
        "--model.dim=64", "--model.n_layers=2", "--model.n_heads=2", "--model.max_seq_len=64",
        "--moe.expert_hidden=64", "--train.steps=200", "--train.batch_size=4", "--train.seq_len=64",
        "--train.warmup_steps=10", f"--data.path={corpus}", f"--train.out_dir={tmp_path}"])
    trainer = Trainer(cfg)
    hist = trainer.fit(progress=False)
    losses = [s.lm_loss for s in hist.steps]
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert first > 4.5 and last < first - 1.2, (first, last)
    assert trainer.evaluate(batches=2) < first - 1.0
    load = hist.expert_load()
    assert int(load.sum()) == 200 * 4 * 64 * cfg.moe.top_k * len(trainer.model.moe_layers)


def test_expert_bias_moves_towards_balance(corpus, tmp_path):
    cfg = config.load("configs/deepseek-tiny.yaml", [
        "--model.dim=64", "--model.n_layers=2", "--model.n_heads=2", "--model.max_seq_len=32",
        "--train.steps=5", "--train.batch_size=2", "--train.seq_len=32", "--moe.bias_update_rate=0.01",
        f"--data.path={corpus}", f"--train.out_dir={tmp_path}"])
    trainer = Trainer(cfg)
    hist = trainer.fit(progress=False)
    bias = trainer.model.moe_layers[0].router.expert_bias_E
    # Every step moves each bias by exactly ±rate (or 0): after 5 steps |bias| <= 5·rate, and not all zero.
    assert bias.abs().max() <= 5 * 0.01 + 1e-6 and bias.abs().sum() > 0
