"""Fused GPU kernels behind pde_ssm.py.

Each kernel is reached only through pde_ssm.py, whose readable PyTorch code is its
reference and specification; tests/test_kernels.py compares the two. Triton is
imported only when a kernel runs, so machines without it use the reference.
"""
import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def fused_spectral_product_applies(x):
    """Whether the fused symbol products (`kernels.spectral_product.spectral_product`,
    `kernels.diagonal_product.diagonal_product`) can take the spectrum x: complex64 or its
    float32 or bf16 (re, im) view on a CUDA device, with Triton installed."""
    return HAS_TRITON and x.is_cuda and x.dtype in (torch.complex64, torch.float32, torch.bfloat16)
