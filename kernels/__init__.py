"""Kernels for the MoE layer, installed as ``moe_dist.kernels``.

``reference`` holds the PyTorch twins of every kernel contract (permute, unpermute, grouped GEMM); they
run everywhere and define the semantics. Triton kernels join them under the same signatures.
"""
from moe_dist.kernels.reference import PermuteMap, grouped_gemm, make_permute_map, permute, unpermute

__all__ = ["PermuteMap", "make_permute_map", "permute", "unpermute", "grouped_gemm"]
