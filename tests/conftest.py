"""Test-wide environment: CPU DeepSpeed accelerator and a repository-local extension cache.

Set at import time, before any test imports deepspeed or torch.utils.cpp_extension, which read
these variables once. TRITON_INTERPRET=1 runs the Triton kernels in triton's CPU interpreter; triton reads
it when a kernel is decorated, so it must be set before `moe_dist.kernels.ops` is first imported.

pytest runs in its default prepend import mode and tests/ has no __init__.py (a tests/kernels package would
shadow the repository's kernels/): this file's folder, tests/, goes on sys.path, so the helper modules here
(distributed.py, layer_helpers.py, trainer_helpers.py, checkpoint_helpers.py, deepspeed_helpers.py) import by
their plain names from every subfolder, and every test file's basename must be unique across tests/.
"""
import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("TRITON_INTERPRET", "1")


# `@pytest.mark.slow`: runs of minutes (e.g. every family config for 100 steps on 4 ranks), kept out of the
# default suite so it stays under 10 minutes; `pytest --run-slow` (or `make test PYTEST_ARGS=--run-slow`) runs them.
def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (minutes each)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes-long run, skipped unless pytest is given --run-slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    import pytest
    skip = pytest.mark.skip(reason="slow: pass --run-slow to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
