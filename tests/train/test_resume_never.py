"""checkpoint.resume=never into a folder that already holds checkpoints is refused (store.check_fresh_start,
called by the Trainer's resume): a fresh run there would mix its steps with the other run's, point `latest`
backwards and let pruning delete the other run's checkpoints.

Skipped until Trainer.resume calls `check_fresh_start` (the trainer is being refactored separately); the store
function itself is tested in test_store_robustness.py.
"""
from __future__ import annotations

import inspect
import re

import pytest

from checkpoint_helpers import GlobalBatcher, make_cfg, tiny
from moe_dist.train.checkpoint import CheckpointError
from moe_dist.train.trainer import Trainer

pytestmark = pytest.mark.skipif("check_fresh_start" not in inspect.getsource(Trainer.resume),
                                reason="Trainer.resume does not call store.check_fresh_start yet")


def _trainer(tmp_path, resume: str, steps: int) -> Trainer:
    raw = tiny(ckpt_dir=str(tmp_path / "ck"), steps=steps)
    raw["checkpoint"]["resume"] = resume
    return Trainer(make_cfg(raw), batcher=GlobalBatcher(2, 8, 0, 1))


def test_resume_never_into_a_folder_with_checkpoints_is_refused(tmp_path):
    _trainer(tmp_path, "auto", 3).fit(progress=False)
    ck = tmp_path / "ck"
    before = sorted(p.name for p in ck.iterdir())
    trainer = _trainer(tmp_path, "never", 1)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint.resume=never but {ck} already holds 1 "
                                                        "checkpoint(s) of another run (newest step_000003, step 3)")
                       + ".*checkpoint.resume=auto.*checkpoint.dir"):
        trainer.fit(progress=False)
    assert sorted(p.name for p in ck.iterdir()) == before and not trainer.history.steps
    assert (ck / "latest").read_text().strip() == "step_000003"
    _trainer(tmp_path / "fresh", "never", 1).fit(progress=False)        # an empty folder: a fresh start
