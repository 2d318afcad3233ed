"""`train.engine: deepspeed` set-up (moe_dist.train.deepspeed_engine), no process started: the generated
DeepSpeed JSON, the user's file over it, and what is refused."""
from __future__ import annotations

import json

import pytest

from deepspeed_helpers import tiny
from moe_dist import config
from moe_dist.config import ConfigError

pytest.importorskip("deepspeed")


def _cfg(tmp_path, **train) -> config.Config:
    raw = tiny(tmp_path, tmp_path / "none.bin", ep=2, stage=2)
    raw["train"].update(train)
    cfg = config.from_dict(raw)
    config.validate(cfg)
    return cfg


def test_generated_config_follows_ours(tmp_path):
    from moe_dist.train.deepspeed_engine import deepspeed_config
    ds = deepspeed_config(_cfg(tmp_path, grad_accum_steps=3, zero_stage=1), dp=4)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 2 * 3 * 4
    assert ds["zero_optimization"]["stage"] == 1 and ds["gradient_clipping"] == 0.05
    assert ds["zero_allow_untested_optimizer"] is True and ds["bf16"]["enabled"] is False
    # Stage 0: DeepSpeed's clip would use a per-rank norm, so the engine clips itself and DeepSpeed must not.
    assert deepspeed_config(_cfg(tmp_path, zero_stage=0), dp=2)["gradient_clipping"] == 0.0


def test_user_file_overrides_key_by_key(tmp_path):
    from moe_dist.train.deepspeed_engine import deepspeed_config
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 0.5,
                                "train_micro_batch_size_per_gpu": 2}))        # repeating our value is fine
    ds = deepspeed_config(_cfg(tmp_path, deepspeed_config=str(user)), dp=2)
    assert ds["zero_optimization"] == {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True,
                                       "overlap_comm": False, "reduce_bucket_size": 1000}
    assert ds["gradient_clipping"] == 0.5


@pytest.mark.parametrize("user,message", [
    ({"train_micro_batch_size_per_gpu": 4}, "sets train_micro_batch_size_per_gpu=4 but our config gives 2; "
                                            "remove the key and set train.batch_size instead"),
    ({"gradient_accumulation_steps": 2}, "set train.grad_accum_steps instead"),
    ({"train_batch_size": 64}, "set train.batch_size × train.grad_accum_steps × data-parallel ranks instead"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3; use 0, 1 or 2"),
    ({"fp16": {"enabled": True}}, "enables fp16"),
    ({"use_data_before_expert_parallelism": True}, "our rank order is ep fastest, then data"),
    ([1, 2], "must hold a JSON object"),
])
def test_user_file_conflicts_are_refused_naming_the_field(tmp_path, user, message):
    from moe_dist.train.deepspeed_engine import deepspeed_config
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    with pytest.raises(ConfigError, match="train.deepspeed_config") as e:
        deepspeed_config(_cfg(tmp_path, deepspeed_config=str(path)), dp=2)
    assert message in str(e.value)


def test_missing_or_broken_user_file_is_refused(tmp_path):
    from moe_dist.train.deepspeed_engine import deepspeed_config
    with pytest.raises(ConfigError, match=r"train.deepspeed_config='.*nope.json' does not exist"):
        deepspeed_config(_cfg(tmp_path, deepspeed_config=str(tmp_path / "nope.json")), dp=2)
    (tmp_path / "bad.json").write_text("{stage: 2")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        deepspeed_config(_cfg(tmp_path, deepspeed_config=str(tmp_path / "bad.json")), dp=2)


class _NoBatches:
    def get_batch(self, i):
        raise AssertionError("the engine must refuse the config before any step")


def test_zero_stage_0_with_deepspeed_bf16_is_refused_before_deepspeed_starts(tmp_path):
    """Through the user's path: Trainer builds the engine train.engine names, which refuses before
    deepspeed.initialize (no process group exists here, so DeepSpeed starting would fail differently). On the
    CPU the generated config keeps bf16 off, so the user's file turns it on."""
    from moe_dist.train.trainer import Trainer
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"bf16": {"enabled": True}}))
    cfg = _cfg(tmp_path, zero_stage=0, deepspeed_config=str(user))
    cfg.parallel.ep = 1                     # one process: the layout must fit a world of 1
    with pytest.raises(ConfigError, match="train.zero_stage=0 with DeepSpeed's bf16 .* is not supported"):
        Trainer(cfg, batcher=_NoBatches())
