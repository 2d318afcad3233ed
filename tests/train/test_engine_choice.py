"""Which engine a config asks for, and the combinations that are refused before any process starts:
`train.shard_optimizer` belongs to the native engine (DeepSpeed shards by its own `train.zero_stage`)."""
from __future__ import annotations

import pytest

from moe_dist import config
from moe_dist.config import ConfigError


def _raw(engine: str, shard: str) -> dict:
    return {"model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 16, "dense_hidden": 64},
            "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32},
            "train": {"batch_size": 2, "seq_len": 16, "steps": 2, "engine": engine, "shard_optimizer": shard}}


@pytest.mark.parametrize("shard", ["states", "states+grads"])
def test_shard_optimizer_with_deepspeed_is_refused_naming_both_fields(shard):
    cfg = config.from_dict(_raw("deepspeed", shard))
    with pytest.raises(ConfigError) as e:
        config.validate(cfg)
    msg = str(e.value)
    assert f"train.shard_optimizer={shard!r}" in msg and "train.engine='deepspeed'" in msg
    # The fix names DeepSpeed's own knob and the other way out.
    assert "set train.zero_stage (1: states, 2: states+grads)" in msg and "train.engine=native" in msg


@pytest.mark.parametrize("engine,shard", [("native", "none"), ("native", "states"), ("native", "states+grads"),
                                          ("deepspeed", "none")])
def test_accepted_engine_and_sharding_combinations(engine, shard):
    cfg = config.from_dict(_raw(engine, shard))
    config.validate(cfg)
    assert (cfg.train.engine, cfg.train.shard_optimizer) == (engine, shard)


def test_override_from_the_command_line_is_refused_too():
    """The same rule whichever way the fields arrive (a dotted override on top of a valid config)."""
    cfg = config.apply_overrides(config.from_dict(_raw("deepspeed", "none")), ["train.shard_optimizer=states"])
    with pytest.raises(ConfigError, match=r"train.shard_optimizer='states' with train.engine='deepspeed'"):
        config.validate(cfg)
