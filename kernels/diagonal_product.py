"""Fused diagonal PDE-SSM symbol product in Triton, forward and backward.

The operator is `pde_ssm._diagonal_product`, its reference and specification: with the
diagonal coupling every channel c of every image b is multiplied, at every frequency f
of the rfft2 grid, by its own symbol (Eq. 9-10),

    y[b, f, c] = s[f, c] v[b, f, c]   (complex),

on planar spectra: v and y (B, 2, F, C), real parts at index 0 of the second axis and
imaginary parts at index 1; s (2, F, C) float32 likewise. Compiled, the reference's
elementwise product became a kernel that made the symbol's exp, cos and sin again for
every image and for both parts of the product (inductor recomputes a small elementwise
result where it is broadcast; BENCHMARKS.md). Here s is made once, by whatever
computes it, and each program loads a block of it and walks the images,
reading and writing the spectra in their own dtype (bf16 under autocast) with float32
arithmetic:

  y      = s v                        `_diagonal_kernel`
  grad_v = conj(s) grad_y             `_diagonal_kernel` with CONJ
  grad_s = sum_b grad_y conj(v_b)     `_symbol_grad_kernel` (float32)

Memory is one pass over the spectra each way; the symbol's gradient is a (2, F, C) sum
over the images, which the code around it takes back to K, b, r and tau by autograd.
"""

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _diagonal_kernel(y_ptr, v_ptr, s_ptr, B, FC, CONJ: tl.constexpr, BLOCK: tl.constexpr):
    """y[b] = s v[b] (conj(s) v[b] with CONJ) for the BLOCK frequency-channel entries of this program."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < FC
    s_re = tl.load(s_ptr + offs, mask=mask)
    s_im = tl.load(s_ptr + FC + offs, mask=mask)
    if CONJ:
        s_im = -s_im
    v_ptrs, y_ptrs = v_ptr + offs, y_ptr + offs
    for _ in range(B):  # one image after the other: the pointers step by 2 F C (64-bit, unlike b * 2 F C)
        v_re = tl.load(v_ptrs, mask=mask).to(tl.float32)
        v_im = tl.load(v_ptrs + FC, mask=mask).to(tl.float32)
        tl.store(y_ptrs, (s_re * v_re - s_im * v_im).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_ptrs + FC, (s_re * v_im + s_im * v_re).to(y_ptr.dtype.element_ty), mask=mask)
        v_ptrs += 2 * FC
        y_ptrs += 2 * FC


@triton.jit
def _symbol_grad_kernel(grad_s_ptr, grad_y_ptr, v_ptr, B, FC, BLOCK: tl.constexpr):
    """grad_s = sum_b grad_y[b] conj(v[b]) for the BLOCK frequency-channel entries of this program."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < FC
    acc_re = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_im = tl.zeros((BLOCK,), dtype=tl.float32)
    g_ptrs, v_ptrs = grad_y_ptr + offs, v_ptr + offs
    for _ in range(B):
        g_re = tl.load(g_ptrs, mask=mask).to(tl.float32)
        g_im = tl.load(g_ptrs + FC, mask=mask).to(tl.float32)
        v_re = tl.load(v_ptrs, mask=mask).to(tl.float32)
        v_im = tl.load(v_ptrs + FC, mask=mask).to(tl.float32)
        acc_re += g_re * v_re + g_im * v_im
        acc_im += g_im * v_re - g_re * v_im
        g_ptrs += 2 * FC
        v_ptrs += 2 * FC
    tl.store(grad_s_ptr + offs, acc_re, mask=mask)
    tl.store(grad_s_ptr + FC + offs, acc_im, mask=mask)


def _multiply(v, s, conj):
    v = v.contiguous()
    y = torch.empty_like(v)
    FC = s[0].numel()
    _diagonal_kernel[(triton.cdiv(FC, BLOCK),)](y, v, s, v.shape[0], FC, CONJ=conj, BLOCK=BLOCK)
    return y


# The launches as custom operators, so that torch.compile takes each as one opaque node:
# the symbol, their input, is then made once in a kernel of its own.

@torch.library.custom_op("pdessm::diagonal_product", mutates_args=())
def _product_op(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """y = s v, in v's dtype."""
    return _multiply(v, s, conj=False)


@torch.library.custom_op("pdessm::diagonal_product_adjoint", mutates_args=())
def _adjoint_op(grad_y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """conj(s) grad_y, in grad_y's dtype."""
    return _multiply(grad_y, s, conj=True)


@torch.library.custom_op("pdessm::diagonal_product_symbol_grad", mutates_args=())
def _symbol_grad_op(grad_y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The (2, F, C) float32 gradient of the symbol, summed over the images."""
    grad_y, v = grad_y.contiguous(), v.contiguous()
    grad_s = grad_y.new_empty(grad_y.shape[1:], dtype=torch.float32)
    FC = grad_s[0].numel()
    _symbol_grad_kernel[(triton.cdiv(FC, BLOCK),)](grad_s, grad_y, v, v.shape[0], FC, BLOCK=BLOCK)
    return grad_s


@_product_op.register_fake
def _(v, s):
    return torch.empty_like(v, memory_format=torch.contiguous_format)


@_adjoint_op.register_fake
def _(grad_y, s):
    return torch.empty_like(grad_y, memory_format=torch.contiguous_format)


@_symbol_grad_op.register_fake
def _(grad_y, v):
    return grad_y.new_empty(grad_y.shape[1:], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    v, s = inputs
    ctx.save_for_backward(v, s)


def _backward(ctx, grad_y):
    v, s = ctx.saved_tensors
    grad_v = _adjoint_op(grad_y, s).to(v.dtype) if ctx.needs_input_grad[0] else None
    grad_s = _symbol_grad_op(grad_y, v) if ctx.needs_input_grad[1] else None
    return grad_v, grad_s


_product_op.register_autograd(_backward, setup_context=_setup_context)


def diagonal_product(v, s):
    """Fused `pde_ssm._diagonal_product`: y = s v on planar spectra, v (B, 2, F, C) float32
    or bf16, s (2, F, C) float32 -> y (B, 2, F, C) in v's dtype, contiguous.
    Differentiable in v and s (the gradients of the reference's real arithmetic)."""
    if v.dim() != 4 or v.shape[1] != 2 or v.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"diagonal_product takes a planar spectrum v (B, 2, F, C) in float32 or bf16; got "
                         f"{v.dtype} of shape {tuple(v.shape)} (float64 runs the PyTorch reference in pde_ssm.py)")
    if s.shape != v.shape[1:] or s.dtype != torch.float32:
        raise ValueError(f"diagonal_product takes a float32 symbol s of shape {tuple(v.shape[1:])} for v of shape "
                         f"{tuple(v.shape)}; got {s.dtype} of shape {tuple(s.shape)}")
    return _product_op(v, s.contiguous())
