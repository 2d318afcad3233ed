"""Kernels for the MoE layer, installed as ``moe_dist.kernels``.

``reference`` holds the PyTorch twins of every kernel contract (permute, unpermute, grouped GEMM); they
run everywhere and define the semantics. Triton kernels join them under the same signatures.

How a checkout resolves this folder: setup.py maps the package ``moe_dist.kernels`` to the top-level
``kernels/`` folder (``package_dir={"moe_dist.kernels": "kernels"}``), so code imports ``moe_dist.kernels``
and never a top-level ``kernels`` (that name exists only in the source tree, not once installed). In an
editable install (``pip install -e .``) the same mapping makes ``moe_dist.kernels`` point at this folder, so
edits here take effect without reinstalling.
"""
from moe_dist.kernels.reference import PermuteMap, grouped_gemm, make_permute_map, permute, unpermute

__all__ = ["PermuteMap", "make_permute_map", "permute", "unpermute", "grouped_gemm"]
