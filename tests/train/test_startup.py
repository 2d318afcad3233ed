"""moe_dist.train.startup: the node's checks before any process group, each a CommandError naming the field."""
from __future__ import annotations

import pytest

from moe_dist.config import Config
from moe_dist.errors import CommandError
from moe_dist.parallel.bootstrap import LaunchInfo
from moe_dist.parallel.layout import check_layout
from moe_dist.plan import param_counts
from moe_dist.train import startup

ONE = LaunchInfo("none", 0, 1, 0, None, None)


def test_weights_that_fit_pass_and_those_that_do_not_are_refused_naming_the_sizes():
    cfg = Config()
    dims = check_layout(cfg, 1)
    weights = param_counts(cfg, dims).total * 4
    startup.check_memory(cfg, dims, ONE, ranks_here=1, available=weights)        # exactly fits
    with pytest.raises(CommandError) as info:
        startup.check_memory(cfg, dims, ONE, ranks_here=2, available=weights)    # two ranks share it
    e = info.value
    assert (e.kind, e.code) == ("memory", 2)
    assert "on each of 2 rank(s) here" in e.message and "model.dim=128" in e.message
    assert e.message.endswith(startup.MEMORY_FIX)


def test_bfloat16_weights_count_two_bytes():
    cfg = Config()
    cfg.train.dtype = "bfloat16"
    dims = check_layout(cfg, 1)
    startup.check_memory(cfg, dims, ONE, ranks_here=1, available=param_counts(cfg, dims).total * 2)


def test_host_memory_is_read_and_an_unknown_amount_refuses_nothing(monkeypatch):
    import torch
    assert startup.available_memory() > 0                   # /proc/meminfo on Linux
    cfg = Config()
    cfg.model.dim = 10**7
    dims = check_layout(cfg, 1)
    with pytest.raises(CommandError, match="model.dim=10000000"):
        startup.check_memory(cfg, dims, ONE, ranks_here=1)
    monkeypatch.setattr(startup, "available_memory", lambda: None)
    if not torch.cuda.is_available():
        startup.check_memory(cfg, dims, ONE, ranks_here=1)


@pytest.mark.parametrize("field", ["train.out_dir", "data.path", "checkpoint.dir"])
def test_an_empty_path_is_refused(field, tmp_path):
    cfg = Config()
    cfg.train.out_dir, cfg.data.path = str(tmp_path / "run"), str(tmp_path / "tok.bin")
    section, name = field.split(".")
    setattr(getattr(cfg, section), name, " ")
    with pytest.raises(CommandError, match=rf"{field} is empty; give a path"):
        startup.check_node(cfg, check_layout(cfg, 1), ONE)
