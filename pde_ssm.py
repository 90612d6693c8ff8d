"""PDE-SSM: spatial mixing by a learnable convection-diffusion-reaction PDE.

Gal, Eliasof, Rout, Haber, "PDE-SSM: A Spectral State Space Approach to Spatial
Mixing in Diffusion Transformers". On the H x W token grid (unit spacing,
periodic boundary) a state h evolves by

    dh/dt = div(K grad h) + b . grad h + r h                          (Eq. 2)

and is solved exactly in the Fourier domain (Eq. 7-10):

    h(tau) = IFFT[ exp(tau * lambda(k)) * FFT h(0) ],
    lambda(k) = -k^T K k + r + i b.k,

with k = (k_x, k_y), k_x = 2 pi fftfreq(W) along the width (last) axis and
k_y = 2 pi fftfreq(H) along the height axis. Vectors are ordered (x, y). So pure
convection with tau * b = (1, 0) moves content by one token towards -x:
h(y, x) = h0(y, x + 1), i.e. torch.roll(h0, -1, dims=-1).

This file is the specification of the operator:
  - `pde_symbol`, `apply_symbol`, `pde_evolve`, `pde_kernel`: the functional core;
  - `dft_matrices`, `dft_factors`, `dense_mix`: the module's transforms as dense
    matrix products, taken on CUDA;
  - `PDESSM`: the module of the paper's Algorithm 1 (projection R, embedding
    B_gamma of Eq. 6, evolution with zeta = (K, b, r, tau), output projection).

Channel coupling (section 2.2): "diagonal" gives every channel its own scalar
PDE; "pairwise" gives every (output, input) channel pair its own scalar Green's
function and sums over input channels like a multi-channel convolution;
"grouped" (the module's "heads") is pairwise inside channel groups and
block-diagonal across them.

Real inputs use rfft2/irfft2. The result equals the real part of the complex
IFFT in the contract above (at the Nyquist frequencies of even grid sides the
symbol acts through its Hermitian part, as a real output requires).
"""
import argparse
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

# Budget of complex symbol entries the pairwise path materializes at once
# (groups x C_out x C_in x frequencies of one chunk). Memory stays
# O(B N C + C^2 + budget) instead of O(N C^2), forward and backward (plus a saved
# symbol of at most PAIRWISE_SAVED_SYMBOL_ELEMENTS entries per layer, below).
PAIRWISE_CHUNK_ELEMENTS = 1 << 24

# On the CPU the chunks are smaller: a chunk's symbol (2 MiB in complex64) and the
# products made from it stay in cache across the few passes over them, where one
# large chunk streams (and first page-faults in) tens of MiB of fresh memory per pass.
PAIRWISE_CPU_CHUNK_ELEMENTS = 1 << 18

# A symbol of at most this many complex entries (128 MiB per layer in complex64) is
# kept from the forward for the backward, which then skips generating it again;
# larger ones are regenerated chunk by chunk, so memory stays bounded either way.
PAIRWISE_SAVED_SYMBOL_ELEMENTS = 1 << 24

# The symbol products run as the fused Triton kernels of kernels/ (True), as the PyTorch
# references below (False: `_GroupedSpectralProduct` for the pairwise/grouped product,
# `_diagonal_product`'s own for the diagonal one of `dense_mix`), or, when None, fused
# wherever they apply (complex64, or its float32 or bf16 view, on CUDA with Triton).
FUSED_SPECTRAL_PRODUCT = None

# The mixer's transforms as dense matrix products (True: `dense_mix`, from the tokens
# to the spectrum in the layout the fused product reads, and back) or as rfft2/irfft2
# (False). None (default) takes the dense products on CUDA: for the diagonal coupling,
# and for the pairwise and heads couplings where the fused product runs.
DENSE_TRANSFORMS = None
# The dense transforms as one product each way over all N tokens (False, `dft_matrices`)
# or as one product along each grid axis (True, `dft_factors`): O(N^1.5 C) instead of
# O(N^2 C), one more intermediate spectrum each way. None (default) takes the full
# products on grids of at most FULL_TRANSFORM_MAX_TOKENS tokens, the separable ones above
# (DiT-S training steps on an H200: the full ones faster at 16 to 256 tokens, the
# separable ones at 1,024; compiled and captured on an H100 at 256 tokens, 15.92 against
# 16.63 ms; BENCHMARKS.md).
SEPARABLE_TRANSFORMS = None
FULL_TRANSFORM_MAX_TOKENS = 256

TERMS = ("diffusion", "convection", "reaction")
COUPLINGS = ("pairwise", "diagonal", "heads")


#################################################################################
#                    Wavenumbers and the symbol (Eq. 7-10)                      #
#################################################################################

def wavenumbers(grid_size, device=None, dtype=torch.float32):
    """Angular wavenumbers of the rfft2 grid of an (H, W) field.

    Returns k_x of shape (1, W // 2 + 1) = 2 pi rfftfreq(W) (width, last axis)
    and k_y of shape (H, 1) = 2 pi fftfreq(H) (height axis).
    """
    H, W = grid_size
    kx = 2 * math.pi * torch.fft.rfftfreq(W, device=device, dtype=dtype)
    ky = 2 * math.pi * torch.fft.fftfreq(H, device=device, dtype=dtype)
    return kx[None, :], ky[:, None]


def exponent_coefficients(K, b, r, tau):
    """Coefficients of tau * lambda(k) as linear forms in the wavenumbers.

    tau * lambda(k) = A_re . (k_x^2, k_x k_y, k_y^2, 1) + i A_im . (k_x, k_y), with
    A_re = tau (-K_xx, -2 K_xy, -K_yy, r) and A_im = tau (b_x, b_y)     (Eq. 8, 10).
    K (*P, 2, 2), b (*P, 2), r (*P), tau (*P) -> A_re (*P, 4), A_im (*P, 2).
    Only the products tau K, tau b, tau r enter the symbol.
    """
    a_re = torch.stack([-K[..., 0, 0], -2 * K[..., 0, 1], -K[..., 1, 1], r], dim=-1)
    return tau[..., None] * a_re, tau[..., None] * b


def pde_symbol(K, b, r, tau, grid_size):
    """Green's function symbol G(k) = exp(tau (-k^T K k + r + i b.k))      (Eq. 10).

    K (*P, 2, 2), b (*P, 2), r (*P), tau (*P) -> complex (*P, H, W // 2 + 1) on the
    rfft2 grid of grid_size = (H, W).
    """
    kx, ky = wavenumbers(grid_size, K.device, K.dtype)
    a_re, a_im = exponent_coefficients(K, b, r, tau)
    a_re, a_im = a_re[..., None, None, :], a_im[..., None, None, :]
    re = a_re[..., 0] * kx ** 2 + a_re[..., 1] * kx * ky + a_re[..., 2] * ky ** 2 + a_re[..., 3]
    im = a_im[..., 0] * kx + a_im[..., 1] * ky
    return torch.polar(torch.exp(re), im)


def _frequency_features(grid_size, device, dtype):
    """(F, 4) and (F, 2) wavenumber features matching `exponent_coefficients`."""
    kx, ky = wavenumbers(grid_size, device, dtype)
    kx, ky = torch.broadcast_tensors(kx, ky)
    kx, ky = kx.reshape(-1), ky.reshape(-1)
    phi_re = torch.stack([kx * kx, kx * ky, ky * ky, torch.ones_like(kx)], dim=-1)
    return phi_re, torch.stack([kx, ky], dim=-1)


class _GroupedSpectralProduct(torch.autograd.Function):
    """Y[g, f, i, b] = sum_j G[g, f, i, j] X[g, f, j, b], G = exp(phi_re A_re + i phi_im A_im).

    x complex (G, F, Ci, B), a_re (G, Co, Ci, 4), a_im (G, Co, Ci, 2), phi_re (F, 4),
    phi_im (F, 2) -> complex (G, F, Co, B); `chunk` frequencies at a time; `width` as in
    `_symbol_chunks` (apply_symbol passes the rfft2 grid's W // 2 + 1).
    The symbol is generated chunk by chunk over frequencies f (`_symbol_chunks`). With
    save_symbol the forward keeps the chunks for the backward (`apply_symbol` allows
    that up to PAIRWISE_SAVED_SYMBOL_ELEMENTS entries); otherwise the backward
    generates them again and the (groups, F, C_out, C_in) tensor is never held whole.
    Gradients follow PyTorch's conjugate-Wirtinger convention: dX = G^H dY,
    dG = dY X^H, and for E = log G, dE = dG * conj(G), so dA_re = Re(dE) phi_re and
    dA_im = Im(dE) phi_im (summed over f).
    """

    @staticmethod
    def forward(ctx, x, a_re, a_im, phi_re, phi_im, chunk, save_symbol=False, width=None):
        y, symbol = [], []
        for f, s in _symbol_chunks(a_re, a_im, phi_re, phi_im, chunk, width):
            # Y = G X as Y^T = X^T G^T, and below G^H dY as (dY^H G)^H: the same products,
            # which CPU BLAS runs several times faster with the few batch columns on the left.
            y.append((x[:, f].mT @ s.mT).mT)
            if save_symbol:
                symbol.append(s)
        ctx.save_for_backward(x, a_re, a_im, phi_re, phi_im, *symbol)
        ctx.chunk, ctx.width = chunk, width
        return torch.cat(y, dim=1)

    @staticmethod
    def backward(ctx, grad_out):
        x, a_re, a_im, phi_re, phi_im, *symbol = ctx.saved_tensors
        # The gradient arrives as a permuted view; the matrix products batched over
        # frequencies need dense (Co, B) blocks, or they run one frequency at a time.
        grad_out = grad_out.contiguous()
        groups, c_out, c_in = a_re.shape[:3]
        F, B = x.shape[1], x.shape[-1]
        # conj(dG)_ij = sum_b conj(dY_ib) X_jb = <dY_i, X_j> + i <dY_i, -i X_j> with the real
        # inner product <u, v> = Re sum_b conj(u_b) v_b: one real matrix product of dY's
        # (Re, Im) columns (Co, 2B) with the (Re, Im) rows of X and -i X (2B, Ci x 2) gives
        # conj(dG) as interleaved complex. Then conj(dE) = conj(dG) * G.
        dy = torch.cat([grad_out.real, grad_out.imag], dim=-1)
        xx = torch.view_as_real(torch.stack([x, -1j * x], dim=-1))            # (G, F, Ci, B, 2, 2)
        xx = xx.permute(0, 1, 5, 3, 2, 4).reshape(groups, F, 2 * B, 2 * c_in)
        phi = torch.cat([phi_re, phi_im], dim=1)
        if symbol:
            chunks = zip(_frequency_chunks(F, ctx.chunk), symbol)
        else:
            chunks = _symbol_chunks(a_re, a_im, phi_re, phi_im, ctx.chunk, ctx.width)
        grad_x, grad_a = [], 0
        for f, s in chunks:
            grad_x.append((grad_out[:, f].mH @ s).mH)
            conj_de = torch.view_as_complex((dy[:, f] @ xx[:, f]).view(s.shape + (2,))).mul_(s)
            # (6, Fc) @ (Fc, Co Ci x (Re, Im)): every feature against both parts, read once.
            grad_a = grad_a + phi[f].T @ torch.view_as_real(conj_de).reshape(groups, s.shape[1], -1)
        grad_a = grad_a.view(groups, 6, c_out, c_in, 2).permute(0, 2, 3, 1, 4)
        grad_re, grad_im = grad_a[..., :4, 0], -grad_a[..., 4:, 1]        # Im(dE) = -Im(conj(dE))
        return torch.cat(grad_x, dim=1), grad_re, grad_im, None, None, None, None, None


def _frequency_chunks(num_frequencies, chunk):
    """Slices of `chunk` consecutive frequencies covering range(num_frequencies)."""
    return [slice(f0, f0 + chunk) for f0 in range(0, num_frequencies, chunk)]


def _symbol_chunks(a_re, a_im, phi_re, phi_im, chunk, width=None):
    """The symbol exp(phi_re A_re + i phi_im A_im), `chunk` frequencies at a time.

    a_re (G, Co, Ci, 4), a_im (G, Co, Ci, 2), phi_re (F, 4), phi_im (F, 2)
    -> yields (slice of frequencies, complex (G, Fc, Co, Ci)).
    The phase factors over the columns of phi_im (Eq. 10):
    exp(i tau b.k) = exp(i tau b_x k_x) exp(i tau b_y k_y), and on the rfft2 grid k_x
    and k_y take only W // 2 + 1 and H distinct values (`_phase_axes`). So cos and sin
    run on those small tables, and each entry costs one real exp of the whole real
    exponent (never a factor of it: only the sum is bounded, by tau r, for K positive
    semidefinite) and two complex products with gathered table rows.
    """
    groups, c_out, c_in = a_re.shape[:3]
    a_re = a_re.reshape(groups, -1, 4).transpose(1, 2)                        # (G, 4, Co Ci)
    tables = []
    for (values, index), a in zip(_phase_axes(phi_im, width), a_im.unbind(-1)):  # k_x, then k_y
        angle = values[:, None] * a.reshape(groups, 1, -1)                    # (G, distinct k, Co Ci)
        tables.append((torch.polar(torch.ones_like(angle), angle), index))
    (phase_x, index_x), (phase_y, index_y) = tables
    for f in _frequency_chunks(phi_re.shape[0], chunk):
        s = phase_x[:, index_x[f]] * phase_y[:, index_y[f]]
        s.mul_((phi_re[f] @ a_re).exp_())
        yield f, s.view(groups, -1, c_out, c_in)


def _phase_axes(phi_im, width=None):
    """For each column of phi_im (k_x, then k_y): its distinct values and, per frequency,
    the index of its value there. phi_im (F, 2) -> [(values, long (F,))] * 2.

    With `width`, phi_im is the rfft2 grid of `_frequency_features`, row by row, `width`
    frequencies a row: k_x is that of column f % width, k_y that of row f // width, so
    the sizes follow from the grid alone, as torch.compile (fullgraph) needs. Other
    features go through torch.unique, whose output size depends on the values.
    """
    if width is None:
        return [torch.unique(k, return_inverse=True) for k in phi_im.unbind(1)]
    f = torch.arange(phi_im.shape[0], device=phi_im.device)
    return [(phi_im[:width, 0], f % width), (phi_im[::width, 1], f // width)]


def apply_symbol(h_hat, K, b, r, tau, grid_size, chunk_elements=None):
    """Multiply an rfft2 spectrum by the PDE-SSM symbol (Eq. 9), any coupling.

    h_hat: complex (B, C, H, W // 2 + 1), the rfft2 of a real (B, C, H, W) field.
    Coupling is chosen by K's rank (parameters already validated):
      diagonal  K (C, 2, 2),            b (C, 2),            r, tau (C,)
      pairwise  K (Co, C, 2, 2),        b (Co, C, 2),        r, tau (Co, C)
      grouped   K (G, Co/G, C/G, 2, 2), b (G, Co/G, C/G, 2), r, tau (G, Co/G, C/G)
    Returns (B, C or Co, H, W // 2 + 1): out_i(k) = sum_j G_ij(k) h_j(k).
    """
    if K.dim() == 3:
        return pde_symbol(K, b, r, tau, grid_size) * h_hat
    a_re, a_im, phi_re, phi_im = _grouped_operands(K, b, r, tau, grid_size)
    groups, c_out, c_in = a_re.shape[:3]
    B, _, H, Wr = h_hat.shape
    # (B, G*Ci, H, Wr) -> (G, F, Ci, B): one small matrix product per frequency.
    x = h_hat.reshape(B, groups, c_in, H * Wr).permute(1, 3, 2, 0).contiguous()
    y = _grouped_product(x, a_re, a_im, phi_re, phi_im, Wr, chunk_elements)
    return y.permute(3, 0, 2, 1).reshape(B, groups * c_out, H, Wr)


def _grouped_operands(K, b, r, tau, grid_size):
    """Pairwise (K (Co, Ci, 2, 2), ...) or grouped (K (G, Co, Ci, 2, 2), ...) parameters ->
    a_re (G, Co, Ci, 4), a_im (G, Co, Ci, 2), phi_re (F, 4), phi_im (F, 2): the operands
    of the grouped product (pairwise is one group)."""
    if K.dim() == 4:
        K, b, r, tau = K[None], b[None], r[None], tau[None]
    a_re, a_im = exponent_coefficients(K, b, r, tau)
    return (a_re, a_im) + _cached_frequency_features(grid_size, K.device, K.dtype)


def _fused(x):
    """Whether a symbol product of spectrum x runs as a fused kernel (FUSED_SPECTRAL_PRODUCT)."""
    return kernels.fused_spectral_product_applies(x) if FUSED_SPECTRAL_PRODUCT is None else FUSED_SPECTRAL_PRODUCT


def _grouped_product(x, a_re, a_im, phi_re, phi_im, width, chunk_elements=None):
    """Y[g, f, i, b] = sum_j S[g, f, i, j] X[g, f, j, b] for x complex (G, F, Ci, B), or its
    real (re, im) view (G, F, Ci, B, 2) of any strides, on the rfft2 grid `width`
    (W // 2 + 1) frequencies wide: the fused kernel or the reference
    `_GroupedSpectralProduct` (chunk_elements as in `apply_symbol`) -> Y of x's kind and
    dtype, (G, F, Co, B) (the fused kernel writes a real view in x's memory order).
    A bf16 real view goes to the fused kernel as it is (bf16 dots, `spectral_product`);
    elsewhere 16-bit views are multiplied in float32."""
    if not x.is_complex() and x.dtype in (torch.bfloat16, torch.float16) and not (
            x.dtype == torch.bfloat16 and _fused(x)):
        return _grouped_product(x.float(), a_re, a_im, phi_re, phi_im, width, chunk_elements).to(x.dtype)
    if _fused(x):
        from kernels.spectral_product import spectral_product  # imports Triton only when used
        return spectral_product(x, a_re, a_im, phi_re, phi_im, width=width)
    real_view = not x.is_complex()
    if real_view:
        x = torch.view_as_complex(x.contiguous())
    pairs = math.prod(a_re.shape[:3])
    budget = chunk_elements or (PAIRWISE_CPU_CHUNK_ELEMENTS if x.device.type == "cpu" else PAIRWISE_CHUNK_ELEMENTS)
    chunk = max(1, budget // pairs)
    save_symbol = (pairs * x.shape[1] <= PAIRWISE_SAVED_SYMBOL_ELEMENTS and torch.is_grad_enabled()
                   and any(t.requires_grad for t in (x, a_re, a_im)))
    y = _GroupedSpectralProduct.apply(x, a_re, a_im, phi_re, phi_im, chunk, save_symbol, width)
    return torch.view_as_real(y) if real_view else y


def _irfft_weights(W, device=None):
    """(W // 2 + 1,) float64: how often each rfft column counts in an inverse transform of
    length W: once for k_x = 0 and (W even) Nyquist, twice, for its conjugate, otherwise."""
    weight = torch.full((W // 2 + 1,), 2.0, dtype=torch.float64, device=device)
    weight[0] = 1.0
    if W % 2 == 0:
        weight[-1] = 1.0
    return weight


def dft_matrices(grid_size, device=None, dtype=torch.float32):
    """Algorithm 1's embedding and rfft2, and the irfft2, as real matrices over row-major tokens.

    Returns M (2, F, N, 3) and M_inv (N, 2, F), N = H W tokens, F = H (W // 2 + 1)
    frequencies of the rfft2 grid of grid_size = (H, W). For the three real fields
    u[:, s] (N, 3) of one channel (u_0, u_x, u_y of Eq. 6),
        v = rfft2(u_0) + i k_x rfft2(u_x) + i k_y rfft2(u_y)                 (Eq. 6)
    is Re v[f] = sum_{n, s} M[0, f, n, s] u[n, s], Im v[f] = sum_{n, s} M[1, f, n, s] u[n, s];
    for any half spectrum y (F,) complex, irfft2(y)[n] = sum_f M_inv[n, 0, f] Re y[f]
    + M_inv[n, 1, f] Im y[f] (columns other than k_x = 0 and Nyquist count twice, for
    their conjugates; irfft2 drops the imaginary parts that a real output cannot hold).
    """
    H, W = grid_size
    Wr = W // 2 + 1
    # Phases 2 pi (f_y y / H + f_x x / W) from integer products reduced modulo the grid,
    # in float64: exact up to the final rounding whatever the grid size.
    fy, y = torch.arange(H, device=device), torch.arange(H, device=device)
    fx, x = torch.arange(Wr, device=device), torch.arange(W, device=device)
    turns = (((fy[:, None, None, None] * y[None, None, :, None]) % H).double() / H
             + ((fx[None, :, None, None] * x[None, None, None, :]) % W).double() / W)
    theta = (2 * math.pi * turns).reshape(H * Wr, H * W)                   # (F, N)
    cos, sin = theta.cos(), theta.sin()
    kx, ky = (k.expand(H, Wr).reshape(-1, 1) for k in wavenumbers(grid_size, device, torch.float64))
    M = torch.stack([torch.stack([cos, kx * sin, ky * sin], dim=-1),
                     torch.stack([-sin, kx * cos, ky * cos], dim=-1)])
    weight = _irfft_weights(W, device).repeat(H)[:, None] / (H * W)
    M_inv = torch.stack([weight * cos, -weight * sin], dim=1).permute(2, 1, 0)
    return M.to(dtype), M_inv.to(dtype)


def dft_factors(grid_size, device=None, dtype=torch.float32):
    """The products of `dft_matrices` split into one product along each grid axis.

    Returns (M_x (2, 2, Wr, W, 3), M_y (2, H, H, 2, 2)) and (N_y (H, 2, 2, H),
    N_x (W, 2, Wr)), Wr = W // 2 + 1. Forward, for the fields u (H, W, 3) of one
    channel (u_0, u_x, u_y of Eq. 6): along x, per row y,
        a = F_x u_0 + i k_x F_x u_x,  c = F_x u_2,  (re, im) x (a, c) = M_x . u[y]
    (F_x the rfft along x), then along y, per frequency k_x,
        v = F_y a + i k_y F_y c = M_y contracted with (a, c) over (y, re/im, a/c),
    v as in `dft_matrices`, laid out (re/im, k_y, k_x). Inverse, for y (re/im, k_y, k_x):
    the inverse FFT along y, z = N_y . y over (re/im, k_y) per k_x, then irfft along x,
    h = N_x . z over (re/im, k_x) per row.
    """
    H, W = grid_size
    Wr = W // 2 + 1

    def phases(n, frequencies):
        # 2 pi f t / n from integer products reduced modulo n, in float64: (frequencies, n)
        f, t = torch.arange(frequencies, device=device), torch.arange(n, device=device)
        theta = 2 * math.pi * ((f[:, None] * t[None, :]) % n).double() / n
        return theta.cos(), theta.sin()

    kx, ky = (k.reshape(-1) for k in wavenumbers(grid_size, device, torch.float64))
    cx, sx = phases(W, Wr)                                      # (Wr, W)
    cy, sy = phases(H, H)                                       # (H, H): [k_y, y]
    zero = torch.zeros_like(cx)
    kxc, kxs = kx[:, None] * cx, kx[:, None] * sx
    # M_x[re/im, a/c, k_x, x, s]: Re a = sum cx u0 + kx sx u1, Im a = sum -sx u0 + kx cx u1;
    # Re c = sum cx u2, Im c = sum -sx u2.
    M_x = torch.stack([torch.stack([torch.stack([cx, kxs, zero], -1), torch.stack([zero, zero, cx], -1)]),
                       torch.stack([torch.stack([-sx, kxc, zero], -1), torch.stack([zero, zero, -sx], -1)])])
    # M_y[re/im, k_y, y, re/im of (a, c), a/c]: F_y z = sum (cy Re z + sy Im z) + i (cy Im z - sy Re z);
    # i k_y F_y c adds -k_y Im F_y c to Re v and k_y Re F_y c to Im v.
    kyc, kys = ky[:, None] * cy, ky[:, None] * sy
    M_y = torch.stack([torch.stack([torch.stack([cy, kys], -1), torch.stack([sy, -kyc], -1)], -2),
                       torch.stack([torch.stack([-sy, kyc], -1), torch.stack([cy, kys], -1)], -2)])
    # Inverse FFT along y: Re z = sum (cy Re y - sy Im y) / H, Im z = sum (sy Re y + cy Im y) / H,
    # N_y[y, re/im of z, re/im of y, k_y].
    N_y = torch.stack([torch.stack([cy.T, -sy.T], 1), torch.stack([sy.T, cy.T], 1)], 1) / H
    weight = _irfft_weights(W, device)[:, None]
    N_x = torch.stack([weight * cx, -weight * sx]).permute(2, 0, 1) / W
    return (M_x.to(dtype), M_y.to(dtype)), (N_y.to(dtype), N_x.to(dtype))


def _planar_symbol(K, b, r, tau, grid_size):
    """`pde_symbol` (Eq. 10) of the diagonal coupling as one (2, F, C) tensor, its real and
    imaginary parts with the frequencies row by row on the rfft2 grid, as `dense_mix`
    multiplies it into the planar spectrum. K (C, 2, 2), b (C, 2), r (C), tau (C). Real
    elementwise arithmetic only: no complex tensor, no transpose, and no matrix product
    that autocast would round."""
    a_re, a_im = exponent_coefficients(K, b, r, tau)                        # (C, 4), (C, 2)
    phi_re, phi_im = _cached_frequency_features(grid_size, K.device, K.dtype)
    exponent = (phi_re[:, 0, None] * a_re[:, 0] + phi_re[:, 1, None] * a_re[:, 1]
                + phi_re[:, 2, None] * a_re[:, 2] + a_re[:, 3])
    phase = phi_im[:, 0, None] * a_im[:, 0] + phi_im[:, 1, None] * a_im[:, 1]
    magnitude = torch.exp(exponent)
    return torch.stack([magnitude * torch.cos(phase), magnitude * torch.sin(phase)])


def _diagonal_product(v, s):
    """y = s v, complex, at every frequency and channel of every image (Eq. 9 with the
    diagonal coupling), on planar spectra: v (B, 2, F, C) of any float dtype, s (2, F, C)
    as `_planar_symbol` makes it -> y (B, 2, F, C) in v's dtype, multiplied in s's.
    Where the fused kernels run (`_fused`) the Triton kernel of kernels/diagonal_product.py,
    which makes no copy of v and reads the symbol once for all images; this is its reference."""
    if s.dtype == torch.float32 and _fused(v):
        from kernels.diagonal_product import diagonal_product  # imports Triton only when used
        return diagonal_product(v, s)
    w = v.to(s.dtype)
    return torch.stack([s[0] * w[:, 0] - s[1] * w[:, 1], s[0] * w[:, 1] + s[1] * w[:, 0]], 1).to(v.dtype)


def dense_mix(u, K, b, r, tau, grid_size):
    """Steps 2-3 of Algorithm 1 with the transforms as dense matrix products
    (`dft_matrices`, or `dft_factors` on larger grids: SEPARABLE_TRANSFORMS) instead of
    rfft2/irfft2.

    u (B, N, 3C): the fields u_0, u_x, u_y of Eq. 6 as channel blocks of C, tokens
    row-major on grid_size; K, b, r, tau of any coupling as in `apply_symbol` ->
    h (B, N, Co) = irfft2(S v) with v as in `dft_matrices`. The matrix products run
    at u's dtype (autocast's) and the symbol product in float32 (float64 for float64),
    but for the fused pairwise and heads product on a bf16 spectrum (bf16 autocast),
    which reads and writes it in bf16 and multiplies in bf16 dots with float32 sums,
    as autocast runs matrix products (`_grouped_product`); the diagonal product
    multiplies in float32 and hands back u's dtype (`_diagonal_product`). The spectrum
    goes from one product to the next in the (B, re/im, F, C) layout, which the fused
    products read and write as it is: no transposes, casts to complex or complex
    elementwise passes (nor, under bf16 autocast, casts to float32). The products cost
    O(N^2 C) per image, or O(N^1.5 C) separable, against O(N log N C) for the FFTs, but
    they run on the tensor cores in autocast's dtype; on an H200 the separable ones were
    faster than the FFT route on every grid measured, up to 256 x 256 tokens
    (BENCHMARKS.md).
    """
    B, N, C3 = u.shape
    H, W = grid_size
    Wr = W // 2 + 1
    F, C = H * Wr, C3 // 3
    separable = N > FULL_TRANSFORM_MAX_TOKENS if SEPARABLE_TRANSFORMS is None else SEPARABLE_TRANSFORMS
    if separable:
        (M_x, M_y), (N_y, N_x) = _cached_dft_factors(grid_size, u.device, u.dtype)
        v = M_x @ u.reshape(B * H, 3 * W, C)                                  # (BH, (re/im, a/c, Wr), C)
        v = M_y @ v.reshape(B, 4 * H, Wr * C)                                 # (B, 2F, C)
    else:
        M, M_inv = _cached_dft_matrices(grid_size, u.device, u.dtype)
        v = M @ u.reshape(B, 3 * N, C)                                        # (B, 2F, C)
    v = v.view(B, 2, F, C)
    if K.dim() == 3:  # diagonal: each channel's spectrum times its own symbol
        y = _diagonal_product(v, _planar_symbol(K, b, r, tau, grid_size))    # (B, 2, F, C)
    else:
        a_re, a_im, phi_re, phi_im = _grouped_operands(K, b, r, tau, grid_size)
        groups, c_out, c_in = a_re.shape[:3]
        x = v.view(B, 2, F, groups, c_in).permute(3, 2, 4, 0, 1)            # (G, F, Ci, B, re/im)
        y = _grouped_product(x, a_re, a_im, phi_re, phi_im, Wr)              # (G, F, Co, B, re/im)
        # The fused product writes y planar like x, so this is a view; the reference's y is copied.
        y = y.permute(3, 4, 1, 0, 2)
    y = y.reshape(B, 2 * F, -1).to(u.dtype)
    c_out = y.shape[-1]
    if separable:
        z = N_y @ y.reshape(B, 2 * H, Wr * c_out)                             # (B, (H, re/im), Wr Co)
        return (N_x @ z.reshape(B * H, 2 * Wr, c_out)).reshape(B, N, c_out)
    return M_inv @ y


def _constant(build):
    """build(grid_size, device, dtype), a pure function of its arguments, as a cached
    constant: made once per grid, device and dtype (as ordinary tensors even when first
    asked for under inference mode, so that a product saves them for its backward).
    Under torch.compile dynamo calls it while tracing and puts what it returns into the
    graph as constants, so a compiled model does not make them again on every call."""
    cached = functools.lru_cache(maxsize=16)(build)

    @torch.compiler.assume_constant_result
    @functools.wraps(build)
    def constant(grid_size, device, dtype):
        with torch.inference_mode(False):
            return cached(tuple(grid_size), device, dtype)
    return constant


@_constant
def _cached_frequency_features(grid_size, device, dtype):
    """`_frequency_features` as a `_constant`."""
    return _frequency_features(grid_size, device, dtype)


@_constant
def _cached_dft_matrices(grid_size, device, dtype):
    """`dft_matrices` as (2F, 3N) and (N, 2F) matrices, a `_constant`."""
    M, M_inv = dft_matrices(grid_size, device, dtype)
    return M.reshape(M.shape[1] * 2, -1), M_inv.reshape(M_inv.shape[0], -1)


@_constant
def _cached_dft_factors(grid_size, device, dtype):
    """`dft_factors` as matrices ((4 Wr, 3W), (2H, 4H)) and ((2H, 2H), (W, 2 Wr)), a `_constant`."""
    (M_x, M_y), (N_y, N_x) = dft_factors(grid_size, device, dtype)
    H, W = grid_size
    return ((M_x.reshape(-1, 3 * W), M_y.reshape(2 * H, 4 * H)), (N_y.reshape(2 * H, 2 * H), N_x.reshape(W, -1)))


def _dense_transforms(x, coupling):
    """Whether a PDESSM forward on tokens x takes `dense_mix` (DENSE_TRANSFORMS): by default
    for the diagonal coupling on CUDA, for the others where the fused product runs."""
    if DENSE_TRANSFORMS is not None:
        return DENSE_TRANSFORMS
    if coupling == "diagonal":
        return x.is_cuda
    return _fused(x.new_empty(0, dtype=_float32_fft_dtype(x)))  # what the product would get


#################################################################################
#                        The functional operator                                #
#################################################################################

def _shape_error(name, tensor, expected):
    return ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {expected}")


def _check_parameters(h0, K, b, r, tau):
    """Validate shapes and values; return tau broadcast to r's shape."""
    for name, value in (("K", K), ("b", b), ("r", r)):
        if not torch.is_tensor(value):
            raise ValueError(f"{name} must be a tensor; got {type(value).__name__}")
    if not torch.is_tensor(h0) or h0.dim() != 4 or not h0.is_floating_point():
        shape = tuple(h0.shape) if torch.is_tensor(h0) else type(h0).__name__
        raise ValueError(f"h0 must be a real floating tensor of shape (B, C, H, W); got {shape}")
    C = h0.shape[1]
    if K.dim() == 3:
        pairs = (C,)
        layout = "diagonal: K (C, 2, 2)"
    elif K.dim() == 4:
        pairs = (K.shape[0], C)
        layout = "pairwise: K (C_out, C_in, 2, 2)"
    elif K.dim() == 5:
        groups = K.shape[0]
        if C % groups:
            raise ValueError(f"K has {groups} groups, which do not divide the {C} channels of h0")
        pairs = (groups, K.shape[1], C // groups)
        layout = "grouped: K (G, C_out/G, C_in/G, 2, 2)"
    else:
        raise _shape_error("K", K, "(C, 2, 2) diagonal, (C_out, C_in, 2, 2) pairwise or "
                                   "(G, C_out/G, C_in/G, 2, 2) grouped")
    expected = {"K": pairs + (2, 2), "b": pairs + (2,), "r": pairs}
    for name, value in (("K", K), ("b", b), ("r", r)):
        if tuple(value.shape) != expected[name]:
            raise _shape_error(name, value, f"{expected[name]} for {layout} and h0 with {C} channels")
    tau = torch.as_tensor(tau, dtype=K.dtype, device=K.device)
    if tau.dim() != 0 and tuple(tau.shape) != pairs:
        raise _shape_error("tau", tau, f"a scalar or {pairs} for {layout}")
    tau = tau.expand(pairs)
    if torch.compiler.is_compiling():
        return tau
    for name, value in (("K", K), ("b", b), ("r", r), ("tau", tau)):
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    scale = K.abs().amax().item() + 1.0
    tol = 1e-6 * scale if K.dtype == torch.float64 else 1e-4 * scale
    if not torch.allclose(K[..., 0, 1], K[..., 1, 0], atol=tol, rtol=0):
        raise ValueError("K must be symmetric ([[Kxx, Kxy], [Kxy, Kyy]]); K[..., 0, 1] != K[..., 1, 0]")
    det = K[..., 0, 0] * K[..., 1, 1] - K[..., 0, 1] * K[..., 1, 0]
    if (K[..., 0, 0] < -tol).any() or (K[..., 1, 1] < -tol).any() or (det < -tol * scale).any():
        raise ValueError("K must be positive semidefinite (Kxx >= 0, Kyy >= 0, Kxx Kyy - Kxy^2 >= 0): "
                         "a negative diffusion makes the evolution unstable")
    if (tau < 0).any():
        raise ValueError("tau must be >= 0 (the evolution runs forward in time)")
    return tau


def _float32_fft_dtype(x):
    """FFTs run in float32 (float64 stays float64) whatever the autocast dtype."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def pde_evolve(h0, K, b, r, tau, chunk_elements=None):
    """Evolve h0 by Eq. 2 for time tau: h(tau) = IFFT[exp(tau lambda(k)) FFT h0] (Eq. 9).

    h0: real (B, C, H, W), any H and W, periodic boundary, unit grid spacing.
    Coupling is chosen by K's rank:
      diagonal (depthwise):  K (C, 2, 2) symmetric PSD [[Kxx, Kxy], [Kxy, Kyy]],
                             b (C, 2) = (b_x, b_y), r (C,), tau (C,) or scalar
                             -> (B, C, H, W)
      pairwise (section 2.2): K (C_out, C_in, 2, 2), b (C_out, C_in, 2),
                             r (C_out, C_in), tau (C_out, C_in) or scalar
                             -> (B, C_out, H, W), out_i = sum_j G_ij * h0_j
      grouped (heads):       K (G, C_out/G, C_in/G, 2, 2) etc.: pairwise inside
                             G channel groups, block-diagonal across them.
    Differentiable in h0, K, b, r and tau. Raises ValueError on wrong shapes, a K
    that is not symmetric PSD, tau < 0 or non-finite parameters. chunk_elements
    bounds the symbol entries the pairwise path makes at once (default
    PAIRWISE_CPU_CHUNK_ELEMENTS on the CPU, PAIRWISE_CHUNK_ELEMENTS elsewhere).
    """
    tau = _check_parameters(h0, K, b, r, tau)
    grid_size = h0.shape[-2:]
    with torch.autocast(h0.device.type, enabled=False):
        dtype = _float32_fft_dtype(h0)
        params = [p.to(dtype) for p in (K, b, r, tau)]
        h_hat = torch.fft.rfft2(h0.to(dtype))
        out = apply_symbol(h_hat, *params, grid_size, chunk_elements)
        return torch.fft.irfft2(out, s=grid_size).to(h0.dtype)


def pde_kernel(K, b, r, tau, grid_size, centered=True):
    """Spatial Green's function on a grid: the inverse FFT of the symbol (Eq. 5, 10).

    K (*P, 2, 2), b (*P, 2), r (*P), tau (*P) or scalar -> real (*P, H, W) with
    pde_evolve(h0) equal to the circular convolution of h0 with this kernel (for a
    pairwise coupling, kernel [i, j] maps input channel j to output channel i).
    centered=True rolls the origin to the middle (H // 2, W // 2) for display.
    """
    tau = torch.as_tensor(tau, dtype=K.dtype, device=K.device).expand(r.shape)
    kernel = torch.fft.irfft2(pde_symbol(K, b, r, tau, grid_size), s=tuple(grid_size))
    if centered:
        kernel = torch.roll(kernel, (grid_size[0] // 2, grid_size[1] // 2), dims=(-2, -1))
    return kernel


#################################################################################
#                    The PDE-SSM module (Algorithm 1)                           #
#################################################################################

def diffusion_from_cholesky(chol):
    """K = L L^T from L = [[exp(l_0), 0], [l_1, exp(l_2)]]: symmetric positive definite
    whatever the optimizer does. chol (*P, 3) -> K (*P, 2, 2)."""
    l00, l10, l11 = chol[..., 0].exp(), chol[..., 1], chol[..., 2].exp()
    kxx, kxy, kyy = l00 * l00, l00 * l10, l10 * l10 + l11 * l11
    return torch.stack([torch.stack([kxx, kxy], -1), torch.stack([kxy, kyy], -1)], -2)


class PDESSM(nn.Module):
    """PDE-SSM spatial mixer (paper Algorithm 1), a drop-in for self-attention.

    x (B, N, dim) tokens in row-major order of grid_size = (H, W) -> (B, N, dim):
      1. u' = R u: 1x1 channel projection to hidden_dim = C channels (Eq. 6).
      2. v = B_gamma u' = (Gamma_0 + Gamma_x d/dx + Gamma_y d/dy) u', C x C
         matrices, derivatives spectral (i k_x, i k_y) (Eq. 6; Alg. 1 step 1).
         Gamma_* R are folded into one real-space projection dim -> 3C, so in
         frequency space only elementwise factors i k_x, i k_y remain.
      3. h = G_zeta * v with zeta = (K, b, r, tau) (Eq. 9-10; Alg. 1 step 2),
         coupling "pairwise" (paper default: one Green's function per channel
         pair), "diagonal" (per channel) or "heads" (pairwise inside num_heads
         channel groups, block-diagonal across them).
      4. Output projection C -> dim.

    Parametrization (stability, section 2.2): K = L L^T with L lower triangular
    with exp-positive diagonal (symmetric PD), tau = exp(log_tau) > 0.
    Initialization: each channel (pair) gets an anisotropic Gaussian receptive
    field whose width sigma = sqrt(2 tau K) is spread log-uniformly over
    `sigma_range` tokens (from local to global), with a random orientation and
    axis ratio in [1/4, 1]; a small random shift tau b ~ N(0, 0.5^2) tokens; and a
    gain exp(tau r) = 1 / sqrt(C_in) per pair, so a sum over C_in inputs keeps the
    variance (1 for the diagonal coupling). Gamma_0 = I, Gamma_x, Gamma_y small.
    `terms` keeps a subset of ("diffusion", "convection", "reaction"); a removed
    term is zero and frozen (a buffer, not a parameter): the ablation of Table 7.
    """

    def __init__(self, dim, hidden_dim=None, coupling="pairwise", num_heads=1, terms=TERMS,
                 sigma_range=(0.5, 8.0)):
        super().__init__()
        if coupling not in COUPLINGS:
            raise ValueError(f"unknown coupling {coupling!r}; choose one of {COUPLINGS}")
        unknown = set(terms) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown PDE terms {sorted(unknown)}; choose from {TERMS}")
        C = hidden_dim or dim
        heads = num_heads if coupling == "heads" else 1
        if C % heads:
            raise ValueError(f"hidden_dim {C} is not divisible by num_heads {heads}")
        self.dim, self.hidden_dim, self.coupling, self.num_heads = dim, C, coupling, heads
        self.terms = tuple(t for t in TERMS if t in terms)
        if coupling == "diagonal":
            pairs, fan_in = (C,), 1
        else:
            pairs, fan_in = (heads, C // heads, C // heads), C // heads

        self.R = nn.Linear(dim, C)
        self.gamma_0 = nn.Parameter(torch.eye(C))
        self.gamma_x = nn.Parameter(torch.randn(C, C) * 0.02 / math.sqrt(C))
        self.gamma_y = nn.Parameter(torch.randn(C, C) * 0.02 / math.sqrt(C))
        self.proj = nn.Linear(C, dim)

        n = math.prod(pairs)
        log_sigma = torch.empty(n).uniform_(math.log(sigma_range[0]), math.log(sigma_range[1]))
        ratio = torch.empty(n).uniform_(0.25, 1.0)
        angle = torch.empty(n).uniform_(0, math.pi)
        d1 = 0.5 * torch.exp(2 * log_sigma)              # principal diffusivities at tau = 1
        d2 = d1 * ratio
        c, s = angle.cos(), angle.sin()
        K = torch.stack([torch.stack([d1 * c * c + d2 * s * s, (d1 - d2) * c * s], -1),
                         torch.stack([(d1 - d2) * c * s, d1 * s * s + d2 * c * c], -1)], -2)
        L = torch.linalg.cholesky(K)
        chol = torch.stack([L[:, 0, 0].log(), L[:, 1, 0], L[:, 1, 1].log()], -1).reshape(pairs + (3,))
        self._term("diffusion", "chol", chol, None)
        self._term("convection", "b", 0.5 * torch.randn(pairs + (2,)), torch.zeros(pairs + (2,)))
        self._term("reaction", "r", torch.full(pairs, -0.5 * math.log(fan_in)), torch.zeros(pairs))
        self.log_tau = nn.Parameter(torch.zeros(pairs))

    # The parameters of zeta = (K, b, r, tau): K's Cholesky factor, b, r, log tau (a removed term has none).
    COEFFICIENTS = ("chol", "b", "r", "log_tau")

    def _term(self, term, name, init, off):
        """A PDE term is a parameter when kept, a frozen buffer ("off") when removed."""
        if term in self.terms:
            setattr(self, name, nn.Parameter(init))
        elif off is not None:
            self.register_buffer(name, off)

    def pde_parameters(self):
        """zeta = (K, b, r, tau) in the layout `apply_symbol` takes for this coupling."""
        tau = self.log_tau.exp()
        if "diffusion" in self.terms:
            K = diffusion_from_cholesky(self.chol)
        else:
            K = tau.new_zeros(tau.shape + (2, 2))
        return K, self.b, self.r, tau

    def forward(self, x, grid_size):
        B, N, D = x.shape
        H, W = grid_size
        if N != H * W or D != self.dim:
            raise ValueError(f"PDESSM got x of shape {tuple(x.shape)}; expected (B, {H * W}, {self.dim}) "
                             f"for grid_size {(H, W)} and dim {self.dim}")
        C = self.hidden_dim
        gammas = torch.cat([self.gamma_0, self.gamma_x, self.gamma_y], dim=0)  # (3C, C)
        weight, bias = gammas @ self.R.weight, gammas @ self.R.bias
        u = F.linear(x, weight.to(x.dtype), bias.to(x.dtype))                  # (B, N, 3C)
        if _dense_transforms(u, self.coupling):
            # h comes in u's dtype (autocast's): proj takes it as it is, with no round trip through x's.
            return self.proj(dense_mix(u, *self.pde_parameters(), (H, W)))
        u = u.transpose(1, 2).reshape(B, 3 * C, H, W)
        with torch.autocast(x.device.type, enabled=False):
            dtype = _float32_fft_dtype(u)
            u_hat = torch.fft.rfft2(u.to(dtype))
            kx, ky = wavenumbers((H, W), x.device, dtype)
            v_hat = u_hat[:, :C] + 1j * (kx * u_hat[:, C:2 * C] + ky * u_hat[:, 2 * C:])
            h_hat = apply_symbol(v_hat, *(p.to(dtype) for p in self.pde_parameters()), (H, W))
            h = torch.fft.irfft2(h_hat, s=(H, W))
        h = h.to(x.dtype).reshape(B, C, N).transpose(1, 2)
        return self.proj(h)

    def extra_repr(self):
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, coupling={self.coupling!r}, "
                f"num_heads={self.num_heads}, terms={self.terms}")


#################################################################################
#                          Figure 1: a row of kernels                           #
#################################################################################

def plot_kernels(path, size=33):
    """Draw kernels like the paper's Figure 1: localized, anisotropic diffusion,
    convection shift, and all terms combined."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def K(kxx, kxy, kyy):
        return torch.tensor([[kxx, kxy], [kxy, kyy]], dtype=torch.float64)

    panels = [
        ("localized", K(0.6, 0.0, 0.6), (0.0, 0.0), 0.0),
        ("anisotropic diffusion", K(6.0, 3.5, 2.5), (0.0, 0.0), 0.0),
        ("convection (shift)", K(0.6, 0.0, 0.6), (-6.0, 4.0), 0.0),
        ("combined", K(4.0, -2.0, 1.5), (5.0, 3.0), -0.2),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (title, k, b, r) in zip(axes, panels):
        kernel = pde_kernel(k, torch.tensor(b, dtype=torch.float64), torch.tensor(r, dtype=torch.float64),
                            1.0, (size, size))
        ax.imshow(kernel.numpy(), cmap="magma", extent=(-(size // 2) - .5, size // 2 + .5,
                                                        size // 2 + .5, -(size // 2) - .5))
        ax.set_title(f"{title}\nb=({b[0]:g}, {b[1]:g}), r={r:g}", fontsize=9)
        ax.set_xlabel("x (tokens)")
    axes[0].set_ylabel("y (tokens)")
    fig.suptitle("PDE-SSM Green's functions G = IFFT exp(tau lambda(k)), tau = 1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args):
    plot_kernels(args.plot_kernels)
    print(f"wrote {args.plot_kernels}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="PDE-SSM operator utilities.")
    parser.add_argument("--plot-kernels", type=str, default="kernels.png",
                        help="write a PNG row of example Green's functions (paper Figure 1) here")
    main(parser.parse_args())
