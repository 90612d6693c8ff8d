"""Fused pairwise PDE-SSM symbol product in Triton, forward and backward.

The operator is `pde_ssm._GroupedSpectralProduct`, its reference and specification:
for channel groups g, frequencies f of the rfft2 grid, output channels i, input
channels j and batch entries b,

    y[g, f, i, b] = sum_j S[g, f, i, j] x[g, f, j, b],
    S[g, f, i, j] = exp(phi_re[f] . a_re[g, i, j] + 1j phi_im[f] . a_im[g, i, j])  (Eq. 9-10).

The reference builds S chunk by chunk in device memory. Here each program makes
tiles of S in registers from the six exponent coefficients of its channel pairs
and the six wavenumber features of its frequencies, and contracts them on the
tensor cores, so S never reaches device memory and memory stays O(B N C + C^2):

  y      = S x      one program per (row tile, frequency block, group and batch
  grad_x = S^H dy   tile), looping over the contracted channels; the adjoint is the
                    same kernel on a transposed copy of the coefficients (6 C^2
                    floats) with the phase features negated
                    (conj S = exp(... - 1j phi_im . a_im));
  grad_a            dE = (dy x^H) * conj(S) per frequency, grad_a_re = sum_f Re(dE)
                    phi_re[f], grad_a_im = sum_f Im(dE) phi_im[f]: one program per
                    (channel-pair tile, group, frequency split), looping over
                    frequencies; the splits' partial sums are added afterwards.

At small batches the products are bound by the special functions that make S (exp2,
sin, cos per entry). On the rows of the rfft2 grid the exponent is quadratic in the
column, so `_row_contract_kernel` makes S exactly at a program's first column and
multiplies it along the row by a ratio that is itself multiplied by a constant (no
special function after the first column), or, where those products could leave
float32's range, steps the log magnitude by its differences (one exp2 a column) and
the phase by a rotation. A program steps 16 columns (or 4 or 8), so that the exact
symbol of its first column, and the coefficients loaded for it, serve all of them; each
column's dots add into sums of its own. The last column of rows of 16m + 1 (8m + 1, 4m
+ 1) frequencies, Nyquist's on even grid sides, is stepped the same way down the
column, from k_y = 0 outwards, rather than taking a segment of its own whose other
columns are masked.
The coefficient gradient of bf16 spectra (and of tf32 products at batches of 5 to
16) walks whole rows the latter way (ROW_STEPS): S exact at each row's start, then
one exp2 and one rotation a column.

Spectra are read and written as float32 or bf16 (re, im) views of any strides:
interleaved complex (torch.view_as_real) or planar, the imaginary plane an offset
away from the real one. The real and imaginary parts of an operand tile are loaded
as two strided tiles, except in the row kernel's bf16 products of up to 4 batch
entries, whose tile holds both parts of each entry side by side (PAIRED; a spectrum
whose batch entries and parts are no single axis is copied into one first). For
float32 spectra a complex matrix product A B is three real dots (Gauss's scheme),
three quarters of the tensor-core work of the four dots A_re B_re, A_im B_im, A_re
B_im, A_im B_re:

    t1 = A_re B_re,  t2 = A_im B_im,  t3 = (A_re + A_im)(B_re + B_im),
    Re(A B) = t1 - t2,  Im(A B) = t3 - t1 - t2.

Each t accumulates over the whole contraction and the parts are formed once at
the end. Im(A B) is then a difference of terms that can be larger than itself:
the error stays within a small factor of that of four dots relative to the norm
of the result (Higham, "Stability of a method for multiplying complex matrices
with three real matrix multiplications", 1992), which tests/test_kernels.py
bounds against the float64 reference in each dot mode. bf16 spectra (bf16 autocast)
take the four dots in bf16 with float32 sums (`_complex_dots`), and the row kernel's
PAIRED tiles two: S_re and S_im times the tile of both parts.
"""

import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

_LOG2E = tl.constexpr(1.4426950408889634)

# Triton's interpreter (TRITON_INTERPRET=1, read when Triton starts) runs the kernels
# in NumPy, which has no special-function unit: there the tf32 mode keeps the polynomial.
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
# Its bf16 dots return garbage (Triton 3.8), so there the "bf16" mode's dots take the
# bf16 operands as float32: the same exact products and float32 sums.
_DOT_BF16_AS_FLOAT32 = tl.constexpr(INTERPRETER)


#################################################################################
#                          Building blocks in registers                         #
#################################################################################

@triton.jit
def _sincos(theta):
    """(sin theta, cos theta) from one reduction theta = q pi/2 + r, |r| <= pi/4, and
    Taylor polynomials in r (truncation below 3e-8): float32 accuracy for the phases
    of grid shifts (|theta| < 6000), sharing one reduction between sin and cos."""
    q = tl.floor(theta * 0.6366197723675814 + 0.5)
    # pi/2 in three parts with short mantissas, so q * part is exact for |q| < 2^12
    # and r carries no rounding from the large theta (Cody-Waite reduction).
    r = theta - q * 1.5703125
    r = r - q * 4.837512969970703e-04
    r = r - q * 7.549790126404332e-08
    r2 = r * r
    s = r + r * r2 * (-0.16666666666666666 + r2 * (0.008333333333333333
                      + r2 * (-0.0001984126984126984 + r2 * 2.7557319223985893e-06)))
    c = 1.0 + r2 * (-0.5 + r2 * (0.041666666666666664
                    + r2 * (-0.001388888888888889 + r2 * 2.48015873015873e-05)))
    # Quadrant n = q mod 4: sin theta = (s, c, -s, -c)[n], cos theta = (c, -s, -c, s)[n].
    n = q.to(tl.int32)
    odd = (n & 1) != 0
    sin = tl.where(odd, c, s)
    cos = tl.where(odd, s, c)
    sin = tl.where((n & 2) != 0, -sin, sin)
    cos = tl.where(((n + 1) & 2) != 0, -cos, cos)
    return sin, cos


@triton.jit
def _sincos_special(theta):
    """(sin theta, cos theta) from the special-function unit (__sinf, __cosf: absolute
    error below 2^-21.4 on [-pi, pi]) after reducing theta by 2 pi to that range, in two
    parts so that q * 6.28125 is exact for |q| < 2^16. Four instructions and two
    special-function ones instead of `_sincos`'s two dozen; for the tf32 dots, which
    cut the symbol to 11 significant bits anyway."""
    q = tl.floor(theta * 0.15915494309189535 + 0.5)
    r = theta - q * 6.28125
    r = r - q * 1.9353071795864769e-03
    return libdevice.fast_sinf(r), libdevice.fast_cosf(r)


@triton.jit
def _load(ptrs, mask):
    """tl.load of ptrs, 0 where mask is False; mask None loads every entry, unpredicated."""
    if mask is None:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _load_coefficients(coef_ptr, plane_stride, offs, mask):
    """The six exponent-coefficient planes (a_re's 4, then a_im's 2) at the 2D tile
    offsets offs; masked pairs get 0 (a finite symbol, 1); mask None: no pair masked."""
    c0 = _load(coef_ptr + offs, mask)
    c1 = _load(coef_ptr + plane_stride + offs, mask)
    c2 = _load(coef_ptr + 2 * plane_stride + offs, mask)
    c3 = _load(coef_ptr + 3 * plane_stride + offs, mask)
    c4 = _load(coef_ptr + 4 * plane_stride + offs, mask)
    c5 = _load(coef_ptr + 5 * plane_stride + offs, mask)
    return c0, c1, c2, c3, c4, c5


@triton.jit
def _coefficient_tile(coef_ptr, coef_s6, coef_sr, coef_sk, offs_r, mask_r, k, mask_k):
    """The products' (R, K) tiles of the six planes at rows offs_r and contracted channels k;
    mask_k None: the tile is whole (its rows too), loaded without masks."""
    if mask_k is None:
        mask = None
    else:
        mask = mask_r[:, None] & mask_k[None, :]
    return _load_coefficients(coef_ptr, coef_s6, offs_r[:, None] * coef_sr + k[None, :] * coef_sk, mask)


@triton.jit
def _load_features(phi_re_ptr, phi_im_ptr, offs_f, mask_f):
    """Rows offs_f of phi_re (F, 4) and phi_im (F, 2) as six (BLOCK_F, 1, 1) columns."""
    p0 = tl.load(phi_re_ptr + 4 * offs_f, mask=mask_f, other=0.0)[:, None, None]
    p1 = tl.load(phi_re_ptr + 4 * offs_f + 1, mask=mask_f, other=0.0)[:, None, None]
    p2 = tl.load(phi_re_ptr + 4 * offs_f + 2, mask=mask_f, other=0.0)[:, None, None]
    p3 = tl.load(phi_re_ptr + 4 * offs_f + 3, mask=mask_f, other=0.0)[:, None, None]
    p4 = tl.load(phi_im_ptr + 2 * offs_f, mask=mask_f, other=0.0)[:, None, None]
    p5 = tl.load(phi_im_ptr + 2 * offs_f + 1, mask=mask_f, other=0.0)[:, None, None]
    return p0, p1, p2, p3, p4, p5


@triton.jit
def _rotation(theta, SPECIAL_SINCOS: tl.constexpr):
    """(cos theta, sin theta) by `_sincos_special` or `_sincos`."""
    if SPECIAL_SINCOS:
        sin, cos = _sincos_special(theta)
    else:
        sin, cos = _sincos(theta)
    return cos, sin


@triton.jit
def _symbol(c0, c1, c2, c3, c4, c5, p0, p1, p2, p3, p4, p5, SPECIAL_SINCOS: tl.constexpr):
    """S = exp(sum_k c_k p_k, k < 4) e^(1j (c4 p4 + c5 p5)) (Eq. 10), the magnitude as exp2
    of features scaled by log2 e, elementwise over coefficients and features that
    broadcast together: (1, R, K) tiles and (F, 1, 1) columns -> (F, R, K), or (R, K)
    tiles and scalars -> (R, K). The phase's sin and cos from `_sincos_special` or, for
    the float32-exact modes, `_sincos`."""
    p0, p1, p2, p3 = p0 * _LOG2E, p1 * _LOG2E, p2 * _LOG2E, p3 * _LOG2E
    mag = tl.exp2(c0 * p0 + c1 * p1 + c2 * p2 + c3 * p3)
    cos, sin = _rotation(c4 * p4 + c5 * p5, SPECIAL_SINCOS)
    return mag * cos, mag * sin


@triton.jit
def _batched_dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b for (F, M, K) a and (F, K, N) b. Triton's 3D dot spreads the warps
    over F only, which suits F >= num_warps; F = 1 and F = 2 run as 2D dots, whose
    warps tile M and N (and take Hopper's warpgroup MMA). 2D a and b: one 2D dot."""
    if len(a.shape) == 2:
        return tl.dot(a, b, acc, input_precision=PRECISION)
    elif a.shape[0] == 1:
        acc2 = tl.dot(tl.reshape(a, (a.shape[1], a.shape[2])), tl.reshape(b, (b.shape[1], b.shape[2])),
                      tl.reshape(acc, (acc.shape[1], acc.shape[2])), input_precision=PRECISION)
        return tl.reshape(acc2, (1, acc.shape[1], acc.shape[2]))
    elif a.shape[0] == 2:
        a0, a1 = tl.split(tl.permute(a, (1, 2, 0)))
        b0, b1 = tl.split(tl.permute(b, (1, 2, 0)))
        acc0, acc1 = tl.split(tl.permute(acc, (1, 2, 0)))
        acc0 = tl.dot(a0, b0, acc0, input_precision=PRECISION)
        acc1 = tl.dot(a1, b1, acc1, input_precision=PRECISION)
        return tl.permute(tl.join(acc0, acc1), (2, 0, 1))
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _bf16_operand(t):
    """t rounded to bf16 for the "bf16" dots (in the interpreter, whose bf16 dots fail,
    as the float32 of those bf16 values: the same exact products)."""
    t = t.to(tl.bfloat16)
    if _DOT_BF16_AS_FLOAT32:
        t = t.to(tl.float32)
    return t


@triton.jit
def _complex_dots(a_re, a_im, b_re, b_im, t1, t2, t3, PRECISION: tl.constexpr, NEGATE_B: tl.constexpr = False):
    """One step of the complex product sum A B, batched as `_batched_dot`. In the
    float32 modes Gauss's three real dots (module docstring): t1 += a_re b_re,
    t2 += a_im b_im, t3 += (a_re + a_im)(b_re + b_im). In "bf16" the four real dots on
    bf16 operands with float32 sums, t1 += a_re b_re - a_im b_im, t2 += a_re b_im +
    a_im b_re (t3 unused): a bf16 sum a_re + a_im would be rounded, and four bf16 dots
    take two thirds of the tensor-core time of Gauss's three in tf32. NEGATE_B puts the
    minus sign of a_im b_im on b_im (for a small b against an a that reaches the dots
    through shared memory, where a negated copy of a_im costs a round trip of its own).
    `_complex_parts` makes Re and Im of the sum of the steps."""
    if PRECISION == "bf16":
        a_re, a_im, b_re, b_im = _bf16_operand(a_re), _bf16_operand(a_im), _bf16_operand(b_re), _bf16_operand(b_im)
        t1 = _batched_dot(a_re, b_re, t1, "ieee")
        if NEGATE_B:
            t1 = _batched_dot(a_im, -b_im, t1, "ieee")
        else:
            t1 = _batched_dot(-a_im, b_im, t1, "ieee")
        t2 = _batched_dot(a_re, b_im, t2, "ieee")
        t2 = _batched_dot(a_im, b_re, t2, "ieee")
    else:
        t1 = _batched_dot(a_re, b_re, t1, PRECISION)
        t2 = _batched_dot(a_im, b_im, t2, PRECISION)
        t3 = _batched_dot(a_re + a_im, b_re + b_im, t3, PRECISION)
    return t1, t2, t3


@triton.jit
def _complex_sums(shape, PRECISION: tl.constexpr):
    """Zeroed sums t1, t2, t3 of `_complex_dots` for results of `shape` (t3 a
    placeholder in "bf16", which does not use it)."""
    t1 = tl.zeros(shape, dtype=tl.float32)
    t2 = tl.zeros(shape, dtype=tl.float32)
    if PRECISION == "bf16":
        t3 = tl.zeros((1, 1, 1), dtype=tl.float32)
    else:
        t3 = tl.zeros(shape, dtype=tl.float32)
    return t1, t2, t3


@triton.jit
def _complex_parts(t1, t2, t3, PRECISION: tl.constexpr):
    """(Re, Im) of a complex product from the sums t1, t2, t3 of `_complex_dots`."""
    if PRECISION == "bf16":
        return t1, t2
    else:
        return t1 - t2, t3 - t1 - t2


@triton.jit
def _magnitude_features(phi_re_ptr, f, F, SCALE: tl.constexpr):
    """phi_re[f] times SCALE (1, or log2 e for an exponent of exp2), as four scalars (0 past F)."""
    p0 = tl.load(phi_re_ptr + 4 * f, mask=f < F, other=0.0) * SCALE
    p1 = tl.load(phi_re_ptr + 4 * f + 1, mask=f < F, other=0.0) * SCALE
    p2 = tl.load(phi_re_ptr + 4 * f + 2, mask=f < F, other=0.0) * SCALE
    p3 = tl.load(phi_re_ptr + 4 * f + 3, mask=f < F, other=0.0) * SCALE
    return p0, p1, p2, p3


@triton.jit
def _phase_features(phi_im_ptr, f, F, ADJOINT: tl.constexpr):
    """phi_im[f], negated for the adjoint, as two scalars (0 past F)."""
    p4 = tl.load(phi_im_ptr + 2 * f, mask=f < F, other=0.0)
    p5 = tl.load(phi_im_ptr + 2 * f + 1, mask=f < F, other=0.0)
    if ADJOINT:
        p4, p5 = -p4, -p5
    return p4, p5


@triton.jit
def _row_features(phi_re_ptr, phi_im_ptr, f0, step, cols, F, ADJOINT: tl.constexpr):
    """The features along a line of the rfft2 grid, the frequencies f0, f0 + step, ...
    (step 1: a row; the row's width: a column), cols of them left, as scalars: phi_re
    scaled by log2 e at f0 (a0..a3), its first and second differences there (d0..d3,
    e0..e3: phi_re is quadratic along a line on which the wavenumbers are linear), and
    phi_im at f0, negated for the adjoint (a4, a5), with its first difference (d4, d5:
    phi_im is linear). Differences that would reach past the line's end are 0, so
    nothing is read from the next one."""
    f1 = f0 + tl.minimum(cols - 1, 1) * step
    a0, a1, a2, a3 = _magnitude_features(phi_re_ptr, f0, F, _LOG2E)
    d0, d1, d2, d3 = _magnitude_features(phi_re_ptr, f1, F, _LOG2E)
    e0, e1, e2, e3 = _magnitude_features(phi_re_ptr, f0 + 2 * step, F, _LOG2E)
    d0, d1, d2, d3 = d0 - a0, d1 - a1, d2 - a2, d3 - a3
    e0, e1, e2, e3 = (tl.where(cols > 2, e0 - a0 - 2 * d0, 0.0), tl.where(cols > 2, e1 - a1 - 2 * d1, 0.0),
                      tl.where(cols > 2, e2 - a2 - 2 * d2, 0.0), tl.where(cols > 2, e3 - a3 - 2 * d3, 0.0))
    a4, a5 = _phase_features(phi_im_ptr, f0, F, ADJOINT)
    d4, d5 = _phase_features(phi_im_ptr, f1, F, ADJOINT)
    return a0, a1, a2, a3, d0, d1, d2, d3, e0, e1, e2, e3, a4, a5, d4 - a4, d5 - a5


@triton.jit
def _batch_tile_dots(dy_f, x_f, b_row, b_col, mask_o, mask_i, B, dy_sb, dy_si, x_sb, x_si, t1, t2, t3,
                     PRECISION: tl.constexpr):
    """`_complex_dots` of the (O, B) tile of dy and the (B, I) tile of x_im + 1j x_re, each with
    any leading axes of size 1: the rows of dy at dy_f (..., O, 1) and the columns of x at
    x_f (..., 1, I), the batch entries b_row (..., 1, B) and b_col (..., B, 1) (the gradient
    kernel's dy x^H, up to a factor -1j)."""
    dy_offs = dy_f + b_row.to(tl.int64) * dy_sb
    mask_dy = mask_o & (b_row < B)
    x_offs = x_f + b_col.to(tl.int64) * x_sb
    mask_x = (b_col < B) & mask_i
    return _complex_dots(tl.load(dy_offs, mask=mask_dy, other=0.0), tl.load(dy_offs + dy_si, mask=mask_dy, other=0.0),
                         tl.load(x_offs + x_si, mask=mask_x, other=0.0), tl.load(x_offs, mask=mask_x, other=0.0),
                         t1, t2, t3, PRECISION)


@triton.jit
def _lane_tree(z0, z1, z2, z3):
    """Four (R, B) tiles as one (R, B, 2, 2) tile whose row-major lane 2a + b holds
    z_(2a + b). Each join adds a minor axis that every thread holds: no data moves."""
    return tl.join(tl.join(z0, z2), tl.join(z1, z3))


@triton.jit
def _dot_layout_zeros(M: tl.constexpr, N: tl.constexpr, PRECISION: tl.constexpr):
    """(M, N) zeros made by a dot of PRECISION's operands, so in the register layout of its
    results. Values computed from them (zeros + a * b + ...) keep that layout, which for
    the bf16 dots of one warp is also their A operands' layout: a symbol made that way
    reaches its dots without moving between threads."""
    a = tl.zeros((M, 16), dtype=tl.float32)
    b = tl.zeros((16, N), dtype=tl.float32)
    if PRECISION == "bf16":
        a, b = a.to(tl.bfloat16), b.to(tl.bfloat16)
        if _DOT_BF16_AS_FLOAT32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _column_sums(s_re, s_im, x_ptrs, mask, cols, N: tl.constexpr, in_si, t1, t2, t3, PRECISION: tl.constexpr,
                 PAIRED: tl.constexpr):
    """One grid column's share of a contracted tile: the sums t1, t2, t3 of `_complex_dots`
    plus the symbol s_re + 1j s_im (R, K) times the (K, B) spectrum tile at x_ptrs, the
    segment's column N (of a half, for 16 lanes), cols columns left in its row from the
    half's first column (0 or fewer: the half lies past the row's end): under mask, and
    masked to 0 where N >= cols (mask None: the tile and the column are whole, and the
    loads unmasked). PAIRED
    ("bf16" only): the tile's columns are the batch entries' real and imaginary parts
    side by side (`_row_contract_kernel`), and the sums are t1 += s_re x, t2 += s_im x, two
    dots instead of four. A column past its row's end comes with its spectrum masked to
    0; its symbol, the row's extrapolated, may overflow there, making its sums (never
    stored) inf or nan."""
    if mask is not None:
        mask = mask & (cols > N)
    if PAIRED:
        x = _bf16_operand(_load(x_ptrs, mask))
        t1 = _batched_dot(_bf16_operand(s_re), x, t1, "ieee")
        t2 = _batched_dot(_bf16_operand(s_im), x, t2, "ieee")
        return t1, t2, t3
    return _complex_dots(s_re, s_im, _load(x_ptrs, mask), _load(x_ptrs + in_si, mask), t1, t2, t3, PRECISION, True)


@triton.jit
def _column_symbol(u0, u1, u2, u3, u4, u5, u6, PRODUCTS: tl.constexpr):
    """The symbol at the current column of a segment's state (`_next_column`)."""
    if PRODUCTS:
        return u0, u1
    else:
        mag = tl.exp2(u0)
        return mag * u3, mag * u4


@triton.jit
def _next_column(u0, u1, u2, u3, u4, u5, u6, PRODUCTS: tl.constexpr):
    """The state of a segment of a grid row one column on. PRODUCTS: (S, R, q) as
    (s_re, s_im, r_re, r_im, q, -, -), S_(n+1) = S_n R_n and R_(n+1) = R_n q, six
    multiplications an entry. Otherwise (lm, st, cu, w_re, w_im, rot_re, rot_im): the
    log2 magnitude by its differences, the phase factor w by one rotation (S = 2^lm w)."""
    if PRODUCTS:
        return u0 * u2 - u1 * u3, u0 * u3 + u1 * u2, u2 * u4, u3 * u4, u4, u5, u6
    else:
        return u0 + u1, u1 + u2, u2, u3 * u5 - u4 * u6, u3 * u6 + u4 * u5, u5, u6


@triton.jit
def _column(u0, u1, u2, u3, u4, u5, u6, x, mask, cols, N: tl.constexpr, in_si, t1, t2, t3, PRODUCTS: tl.constexpr,
            PRECISION: tl.constexpr, PAIRED: tl.constexpr):
    """A segment's column N's sums t1, t2, t3 plus its share (`_column_sums`, its spectrum tile
    at x) from the segment's state there, and the state one column on (`_next_column`)."""
    s_re, s_im = _column_symbol(u0, u1, u2, u3, u4, u5, u6, PRODUCTS)
    t1, t2, t3 = _column_sums(s_re, s_im, x, mask, cols, N, in_si, t1, t2, t3, PRECISION, PAIRED)
    u0, u1, u2, u3, u4, u5, u6 = _next_column(u0, u1, u2, u3, u4, u5, u6, PRODUCTS)
    return u0, u1, u2, u3, u4, u5, u6, t1, t2, t3


@triton.jit
def _lane_leaves(t):
    """The four (R, B) tiles z0, z1, z2, z3 of a `_lane_tree` (its inverse: no data moves)."""
    z02, z13 = tl.split(t)
    z0, z2 = tl.split(z02)
    z1, z3 = tl.split(z13)
    return z0, z1, z2, z3


@triton.jit
def _lanes(t, LANES: tl.constexpr):
    """The LANES (4 or 8) (R, B) tiles of `_join_lanes`' layout, in column order (4 lanes: the
    four again after them, unused)."""
    if LANES == 4:
        z0, z1, z2, z3 = _lane_leaves(t)
        return z0, z1, z2, z3, z0, z1, z2, z3
    else:
        even, odd = tl.split(t)
        z0, z2, z4, z6 = _lane_leaves(even)
        z1, z3, z5, z7 = _lane_leaves(odd)
        return z0, z1, z2, z3, z4, z5, z6, z7


@triton.jit
def _join_lanes(z0, z1, z2, z3, z4, z5, z6, z7, LANES: tl.constexpr):
    """The inverse of `_lanes`: the columns' (R, B) tiles as one tile whose lanes are the
    columns (`_lane_tree`; 8 lanes: even columns 4a + 2b at [a, b, 0], odd ones at [a, b, 1];
    4 lanes take z0..z3 alone)."""
    if LANES == 4:
        return _lane_tree(z0, z1, z2, z3)
    else:
        return tl.join(_lane_tree(z0, z2, z4, z6), _lane_tree(z1, z3, z5, z7))


@triton.jit
def _columns(u0, u1, u2, u3, u4, u5, u6, x, mask, cols, in_sf, in_si, t1, t2, t3, PRODUCTS: tl.constexpr,
             LANES: tl.constexpr, PRECISION: tl.constexpr, PAIRED: tl.constexpr):
    """`_segment_sums` of 4 or 8 LANES, and the state one column past them."""
    p1_0, p1_1, p1_2, p1_3, p1_4, p1_5, p1_6, p1_7 = _lanes(t1, LANES)
    p2_0, p2_1, p2_2, p2_3, p2_4, p2_5, p2_6, p2_7 = _lanes(t2, LANES)
    if PRECISION == "bf16":
        p3_0, p3_1, p3_2, p3_3, p3_4, p3_5, p3_6, p3_7 = t3, t3, t3, t3, t3, t3, t3, t3
    else:
        p3_0, p3_1, p3_2, p3_3, p3_4, p3_5, p3_6, p3_7 = _lanes(t3, LANES)
    u0, u1, u2, u3, u4, u5, u6, p1_0, p2_0, p3_0 = _column(u0, u1, u2, u3, u4, u5, u6, x, mask, cols, 0, in_si,
                                                           p1_0, p2_0, p3_0, PRODUCTS, PRECISION, PAIRED)
    u0, u1, u2, u3, u4, u5, u6, p1_1, p2_1, p3_1 = _column(u0, u1, u2, u3, u4, u5, u6, x + in_sf, mask, cols, 1,
                                                           in_si, p1_1, p2_1, p3_1, PRODUCTS, PRECISION, PAIRED)
    u0, u1, u2, u3, u4, u5, u6, p1_2, p2_2, p3_2 = _column(u0, u1, u2, u3, u4, u5, u6, x + 2 * in_sf,
                                                           mask, cols, 2, in_si, p1_2, p2_2, p3_2, PRODUCTS,
                                                           PRECISION, PAIRED)
    u0, u1, u2, u3, u4, u5, u6, p1_3, p2_3, p3_3 = _column(u0, u1, u2, u3, u4, u5, u6, x + 3 * in_sf,
                                                           mask, cols, 3, in_si, p1_3, p2_3, p3_3, PRODUCTS,
                                                           PRECISION, PAIRED)
    if LANES == 8:
        u0, u1, u2, u3, u4, u5, u6, p1_4, p2_4, p3_4 = _column(u0, u1, u2, u3, u4, u5, u6, x + 4 * in_sf,
                                                               mask, cols, 4, in_si, p1_4, p2_4, p3_4, PRODUCTS,
                                                               PRECISION, PAIRED)
        u0, u1, u2, u3, u4, u5, u6, p1_5, p2_5, p3_5 = _column(u0, u1, u2, u3, u4, u5, u6, x + 5 * in_sf,
                                                               mask, cols, 5, in_si, p1_5, p2_5, p3_5, PRODUCTS,
                                                               PRECISION, PAIRED)
        u0, u1, u2, u3, u4, u5, u6, p1_6, p2_6, p3_6 = _column(u0, u1, u2, u3, u4, u5, u6, x + 6 * in_sf,
                                                               mask, cols, 6, in_si, p1_6, p2_6, p3_6, PRODUCTS,
                                                               PRECISION, PAIRED)
        u0, u1, u2, u3, u4, u5, u6, p1_7, p2_7, p3_7 = _column(u0, u1, u2, u3, u4, u5, u6, x + 7 * in_sf,
                                                               mask, cols, 7, in_si, p1_7, p2_7, p3_7, PRODUCTS,
                                                               PRECISION, PAIRED)
    t1 = _join_lanes(p1_0, p1_1, p1_2, p1_3, p1_4, p1_5, p1_6, p1_7, LANES)
    t2 = _join_lanes(p2_0, p2_1, p2_2, p2_3, p2_4, p2_5, p2_6, p2_7, LANES)
    if PRECISION != "bf16":
        t3 = _join_lanes(p3_0, p3_1, p3_2, p3_3, p3_4, p3_5, p3_6, p3_7, LANES)
    return u0, u1, u2, u3, u4, u5, u6, t1, t2, t3


@triton.jit
def _split_sums(t1, t2, t3, PRECISION: tl.constexpr):
    """The two halves along the last axis of the sums of `_complex_dots` (t3, bf16's
    placeholder, stays whole there)."""
    t1a, t1b = tl.split(t1)
    t2a, t2b = tl.split(t2)
    if PRECISION == "bf16":
        t3a, t3b = t3, t3
    else:
        t3a, t3b = tl.split(t3)
    return t1a, t2a, t3a, t1b, t2b, t3b


@triton.jit
def _segment_sums(u0, u1, u2, u3, u4, u5, u6, x, mask, cols, in_sf, in_si, t1, t2, t3, PRODUCTS: tl.constexpr,
                  LANES: tl.constexpr, PRECISION: tl.constexpr, PAIRED: tl.constexpr):
    """The sums t1, t2, t3 of `_complex_dots` plus the LANES (4, 8 or 16) columns of a
    segment of a grid row, from the state at its first column (`_next_column`). The sums
    are one tile each whose lanes are the columns (`_join_lanes`; 16 columns as the 8-lane
    tiles of their two halves joined, the half the last axis: `_lane_columns`), and each
    column's dots add into its own lane. x points at the first column's spectrum tile,
    the next ones in_sf apart; mask is the tile's (None: whole tiles, `_row_sums`' EVEN),
    cols the columns left in the row. In "bf16" t3 is `_complex_sums`' placeholder and
    passes through; PAIRED sums are those of `_column_sums`."""
    if LANES == 16:
        t1a, t2a, t3a, t1b, t2b, t3b = _split_sums(t1, t2, t3, PRECISION)
        u0, u1, u2, u3, u4, u5, u6, t1a, t2a, t3a = _columns(u0, u1, u2, u3, u4, u5, u6, x, mask, cols, in_sf,
                                                             in_si, t1a, t2a, t3a, PRODUCTS, 8, PRECISION, PAIRED)
        u0, u1, u2, u3, u4, u5, u6, t1b, t2b, t3b = _columns(u0, u1, u2, u3, u4, u5, u6, x + 8 * in_sf, mask,
                                                             cols - 8, in_sf, in_si, t1b, t2b, t3b, PRODUCTS, 8,
                                                             PRECISION, PAIRED)
        t1, t2 = tl.join(t1a, t1b), tl.join(t2a, t2b)
        if PRECISION != "bf16":
            t3 = tl.join(t3a, t3b)
    else:
        u0, u1, u2, u3, u4, u5, u6, t1, t2, t3 = _columns(u0, u1, u2, u3, u4, u5, u6, x, mask, cols, in_sf, in_si,
                                                          t1, t2, t3, PRODUCTS, LANES, PRECISION, PAIRED)
    return t1, t2, t3


@triton.jit
def _lane_columns(LANES: tl.constexpr):
    """The column of each lane of `_segment_sums`' sums in row-major order of their lane
    axes: lane 2 n + h of 16 is column 8 h + n; 4 and 8 lanes are in column order."""
    lanes = tl.arange(0, LANES)
    if LANES == 16:
        return (lanes % 2) * 8 + lanes // 2
    else:
        return lanes


@triton.jit
def _products_in_range(low_ptr, high_ptr, QUAD, ROW, LANES: tl.constexpr):
    """Whether the products of `_next_column` (PRODUCTS) hold for every pair on segments of
    LANES columns of the rfft2 grid's rows of ROW columns, from the extremes over the pairs
    of a_re's first three planes, low (min c0, min c1, min c2) and high (max c0, ...), with
    QUAD = 0. Along a row
    the features (k_x^2, k_x k_y, k_y^2, 1) change by ((2n + 1) dk^2, dk k_y, 0, 0) from
    column n to n + 1, with dk <= pi / (ROW - 1) and |k_y| <= pi, so the exponent's first
    differences st = log2(e) (c0 (2n + 1) dk^2 + c1 dk k_y) and second ones cu = log2(e) 2 c0
    dk^2 have bounds in those extremes. Along the last column (k_x = pi) of a grid of 2
    (ROW - 1) rows, walked from k_y = 0 outwards within either half of its k_y (the
    features change by (0, +-dk pi, (2n + 1) dk^2, 0)), the same holds with k_y's plane
    c2 for c0: QUAD = 2. The products stay within float32 rounding while
    S, the ratios R = 2^st e^(1j ...) and q = 2^cu are normal floats: |st| and |cu| at
    most 120 keep R and q so, and (LANES - 1) st at most 85 means that S, lost below
    2^-126, cannot grow back past 2^-41 within a segment. (S past 2^128 is inf on every
    path.) A PDESSM at its initialization is within these in segments of 16 columns on
    grids of 128 tokens a side (of 8 from 64, of 4 from 32); a diffusion or convection
    grown large, or the default 16 columns on smaller grids, take the exp2 steps."""
    c0_low, c1_low = tl.load(low_ptr + QUAD), tl.load(low_ptr + 1)
    c0_high, c1_high = tl.load(high_ptr + QUAD), tl.load(high_ptr + 1)
    dk = 3.141592653589793 / tl.maximum(ROW - 1, 1)
    square = tl.maximum(2 * ROW - 3, 0) * dk * dk      # the largest change of k_x^2
    cross = tl.maximum(c1_high, -c1_low) * 3.141592653589793 * dk
    st_high = _LOG2E * (tl.maximum(c0_high * square, 0.0) + cross)
    st_low = _LOG2E * (tl.minimum(c0_low * square, 0.0) - cross)
    cu = _LOG2E * 2 * dk * dk * tl.maximum(c0_high, -c0_low)
    return ((LANES - 1) * st_high <= 85.0) & (st_low >= -120.0) & (cu <= 120.0)


@triton.jit
def _row_sums(coef_ptr, x_ptrs, offs_r, offs_k, mask_r, mask_b, cols, INNER, in_sf, in_sk, in_si,
              coef_s6, coef_sr, coef_sk, a0, a1, a2, a3, b0, b1, b2, e0, e2, a4, a5, b4, b5,
              PRODUCTS: tl.constexpr, LANES: tl.constexpr, PRECISION: tl.constexpr, SPECIAL_SINCOS: tl.constexpr,
              PAIRED: tl.constexpr, EVEN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
              BLOCK_B: tl.constexpr):
    """`_row_contract_kernel`'s loop over the contracted tiles: the sums t1, t2, t3 of
    `_complex_dots` (PAIRED: of `_column_sums`) for its segment, laid out as
    `_segment_sums` keeps them, the symbol of
    each tile made from the segment's features (`_row_features`: a, b, e) by products
    or by steps of the log2 magnitude (PRODUCTS, `_next_column`). EVEN: every tile is
    whole (rows, contracted channels, batch columns, and the segment's columns), and its
    loads take no masks."""
    if LANES == 4:
        t1, t2, t3 = _complex_sums((BLOCK_R, BLOCK_B, 2, 2), PRECISION)
    elif LANES == 8:
        t1, t2, t3 = _complex_sums((BLOCK_R, BLOCK_B, 2, 2, 2), PRECISION)
    else:
        t1, t2, t3 = _complex_sums((BLOCK_R, BLOCK_B, 2, 2, 2, 2), PRECISION)
    zeros = _dot_layout_zeros(BLOCK_R, BLOCK_K, PRECISION)
    for k0 in range(0, INNER, BLOCK_K):
        k = k0 + offs_k
        if EVEN:
            mask_k, mask = None, None
        else:
            mask_k = k < INNER
            mask = mask_k[:, None] & mask_b[None, :]
        c0, c1, c2, c3, c4, c5 = _coefficient_tile(coef_ptr, coef_s6, coef_sr, coef_sk, offs_r, mask_r, k, mask_k)
        # log2 |S| at the first column, its first and second differences; the phase and its step.
        # Along a row or the last column the constant feature's differences (b3, e3) and the
        # second ones of the linear k_x k_y (e1) are 0: their terms are left out, and
        # `_row_contract_kernel` does not pass them.
        lm = zeros + c0 * a0 + c1 * a1 + c2 * a2 + c3 * a3
        st = zeros + c0 * b0 + c1 * b1 + c2 * b2
        cu = zeros + c0 * e0 + c2 * e2
        w_re, w_im = _rotation(zeros + c4 * a4 + c5 * a5, SPECIAL_SINCOS)
        rot_re, rot_im = _rotation(zeros + c4 * b4 + c5 * b5, SPECIAL_SINCOS)
        x = x_ptrs + k0 * in_sk
        if PRODUCTS:
            mag, ratio = tl.exp2(lm), tl.exp2(st)
            t1, t2, t3 = _segment_sums(mag * w_re, mag * w_im, ratio * rot_re, ratio * rot_im, tl.exp2(cu), cu, cu,
                                       x, mask, cols, in_sf, in_si, t1, t2, t3, True, LANES, PRECISION, PAIRED)
        else:
            t1, t2, t3 = _segment_sums(lm, st, cu, w_re, w_im, rot_re, rot_im, x, mask, cols, in_sf, in_si, t1, t2,
                                       t3, False, LANES, PRECISION, PAIRED)
    return t1, t2, t3


#################################################################################
#                                  Kernels                                      #
#################################################################################

@triton.jit
def _contract_kernel(out_ptr, in_ptr, coef_ptr, phi_re_ptr, phi_im_ptr,
                     F, B, ROWS, INNER,
                     in_sg, in_sf, in_sk, in_sb, in_si, out_sg, out_sf, out_sr, out_sb, out_si,
                     coef_s6, coef_sg, coef_sr, coef_sk,
                     ADJOINT: tl.constexpr, PRECISION: tl.constexpr, SPECIAL_SINCOS: tl.constexpr,
                     BLOCK_F: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    """out[g, f, r, b] = sum_k M[g, f, r, k] in[g, f, k, b] with M = S (r output, k input
    channels) or, ADJOINT, M = S^H (r input, k output channels; phase negated). The
    coefficients are read at (r, k): the adjoint's are the transposed planes, so that
    both load their tiles contiguous along k, in vectorized loads."""
    pid_r, pid_f, pid_gb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b_tiles = tl.cdiv(B, BLOCK_B)
    g, pid_b = pid_gb // b_tiles, pid_gb % b_tiles
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    mask_f, mask_r, mask_b = offs_f < F, offs_r < ROWS, offs_b < B

    p0, p1, p2, p3, p4, p5 = _load_features(phi_re_ptr, phi_im_ptr, offs_f, mask_f)
    if ADJOINT:
        p4, p5 = -p4, -p5
    coef_ptr += g * coef_sg
    in_ptr += g.to(tl.int64) * in_sg
    # Input tiles (F, K, B): the real parts at the offsets of the float32 view, the
    # imaginary parts in_si further (1 for interleaved complex).
    in_fb = offs_f.to(tl.int64)[:, None, None] * in_sf + offs_b.to(tl.int64)[None, None, :] * in_sb
    mask_fb = mask_f[:, None, None] & mask_b[None, None, :]

    t1, t2, t3 = _complex_sums((BLOCK_F, BLOCK_R, BLOCK_B), PRECISION)
    for k0 in range(0, INNER, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < INNER
        c0, c1, c2, c3, c4, c5 = _coefficient_tile(coef_ptr, coef_s6, coef_sr, coef_sk, offs_r, mask_r, k, mask_k)
        m_re, m_im = _symbol(c0[None, :, :], c1[None, :, :], c2[None, :, :], c3[None, :, :], c4[None, :, :],
                             c5[None, :, :], p0, p1, p2, p3, p4, p5, SPECIAL_SINCOS)
        x_offs = in_ptr + in_fb + k[None, :, None] * in_sk
        mask_x = mask_fb & mask_k[None, :, None]
        x_re = tl.load(x_offs, mask=mask_x, other=0.0)
        x_im = tl.load(x_offs + in_si, mask=mask_x, other=0.0)
        t1, t2, t3 = _complex_dots(m_re, m_im, x_re, x_im, t1, t2, t3, PRECISION)

    out_ptr += g.to(tl.int64) * out_sg
    out_offs = (offs_f.to(tl.int64)[:, None, None] * out_sf + offs_r[None, :, None] * out_sr
                + offs_b.to(tl.int64)[None, None, :] * out_sb)
    mask = mask_f[:, None, None] & mask_r[None, :, None] & mask_b[None, None, :]
    y_re, y_im = _complex_parts(t1, t2, t3, PRECISION)
    tl.store(out_ptr + out_offs[:, :, :, None] + tl.arange(0, 2) * out_si,
             tl.join(y_re, y_im).to(out_ptr.dtype.element_ty), mask=mask[:, :, :, None])


@triton.jit
def _row_contract_kernel(out_ptr, in_ptr, coef_ptr, phi_re_ptr, phi_im_ptr, low_ptr, high_ptr,
                         F, B, ROWS, INNER, ROW, COLS,
                         in_sg, in_sf, in_sk, in_sb, in_si, out_sg, out_sf, out_sr, out_sb, out_si,
                         coef_s6, coef_sg, coef_sr, coef_sk,
                         ADJOINT: tl.constexpr, PRECISION: tl.constexpr, SPECIAL_SINCOS: tl.constexpr,
                         PAIRED: tl.constexpr, EVEN: tl.constexpr, LANES: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    """`_contract_kernel` with the symbol stepped along the rows of the rfft2 grid, ROW
    frequencies a row, along which phi_re is quadratic and phi_im linear in the column.
    A program takes a segment of LANES (4, 8 or 16) consecutive columns among the first COLS
    of one row, or, the programs past those along axis 1, a segment of LANES rows of
    the last column (`_contract`), along which phi_re is quadratic and phi_im linear
    too within either half of the rows. For each
    contracted tile it makes the symbol S_0 exactly at the first column, the ratio R_0 =
    S_1 / S_0 and the ratio's own factor q = R_1 / R_0 (real: the phase is linear in the
    column), five special functions an entry, and multiplies along the segment: S_(n+1)
    = S_n R_n, R_(n+1) = R_n q, six multiplications an entry a column and no special
    function. That needs the ratios within float32's range (`_products_in_range`, from
    the extremes of the coefficients at low_ptr and high_ptr); otherwise the symbol steps
    its log2 magnitude by its differences, with one exp2 an entry a column, and its phase
    factor by a rotation. The symbol is made in the layout of the dots' results
    (`_dot_layout_zeros`), which for the bf16 dots is their operands' too. Each column
    has its own 2D dots, which add into its own sums; the columns' sums ride along as
    one tile with minor lane axes (`_segment_sums`). Columns past the row's end are
    masked (a branch around their work was slower).
    PAIRED (bf16): the spectrum's batch and (re, im) axes are one axis of 2B entries,
    in_si apart (in_sb = 2 in_si), and a tile's BLOCK_B columns are those entries: both
    parts of BLOCK_B / 2 batch entries in one load, and two dots a column, t1 += S_re
    x and t2 += S_im x, instead of four dots on BLOCK_B batch entries' two tiles. The
    parts are formed at the end: Re y_b = t1[2b] - t2[2b + 1], Im y_b = t1[2b + 1] +
    t2[2b]. EVEN: every tile whole (`_contract`), the loop's loads take no masks."""
    pid_r, pid_f, pid_gb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b_tiles = tl.cdiv(2 * B if PAIRED else B, BLOCK_B)
    g, pid_b = pid_gb // b_tiles, pid_gb % b_tiles
    col_tiles = tl.cdiv(COLS, LANES)
    row_segments = F // ROW * col_tiles
    if pid_f < row_segments:
        col0 = (pid_f % col_tiles) * LANES
        f0 = (pid_f // col_tiles) * ROW + col0
        cols = COLS - col0          # columns of this row from col0 on; the lanes past them are masked
        step, line, quad = 1, ROW, 0
    else:
        # The last column from k_y = 0 outwards in each half (|k_y| grows along a segment, as
        # k_x does along the rows): rows 0, 1, ... and rows H - 1, H - 2, ...
        half = F // ROW // 2
        seg = pid_f - row_segments
        if seg * LANES < half:
            row0, step = seg * LANES, ROW
        else:
            row0, step = 2 * half - 1 - (seg * LANES - half), -ROW
        f0 = row0 * ROW + ROW - 1
        cols = LANES                # `_contract` takes this only where LANES divides either half
        line, quad = half + 1, 2
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    mask_r = offs_r < ROWS
    if PAIRED:
        mask_b, b_stride = offs_b < 2 * B, in_si
    else:
        mask_b, b_stride = offs_b < B, in_sb

    coef_ptr += g * coef_sg
    x_ptrs = (in_ptr + g.to(tl.int64) * in_sg + f0.to(tl.int64) * in_sf + offs_k[:, None] * in_sk
              + offs_b.to(tl.int64)[None, :] * b_stride)
    lane_sf = in_sf * step
    a0, a1, a2, a3, b0, b1, b2, b3, e0, e1, e2, e3, a4, a5, b4, b5 = _row_features(phi_re_ptr, phi_im_ptr, f0, step,
                                                                                   cols, F, ADJOINT)
    if _products_in_range(low_ptr, high_ptr, quad, line, LANES):
        t1, t2, t3 = _row_sums(coef_ptr, x_ptrs, offs_r, offs_k, mask_r, mask_b, cols, INNER, lane_sf, in_sk, in_si,
                               coef_s6, coef_sr, coef_sk, a0, a1, a2, a3, b0, b1, b2, e0, e2, a4, a5, b4, b5, True,
                               LANES, PRECISION, SPECIAL_SINCOS, PAIRED, EVEN, BLOCK_R, BLOCK_K, BLOCK_B)
    else:
        t1, t2, t3 = _row_sums(coef_ptr, x_ptrs, offs_r, offs_k, mask_r, mask_b, cols, INNER, lane_sf, in_sk, in_si,
                               coef_s6, coef_sr, coef_sk, a0, a1, a2, a3, b0, b1, b2, e0, e2, a4, a5, b4, b5, False,
                               LANES, PRECISION, SPECIAL_SINCOS, PAIRED, EVEN, BLOCK_R, BLOCK_K, BLOCK_B)

    lanes = _lane_columns(LANES)
    if PAIRED:
        # Sums (R, BLOCK_B, lane axes) -> (R, BLOCK_B / 2, LANES) for each part i of x (tile column 2 b + i).
        t1_re, t1_im = tl.split(tl.permute(tl.reshape(t1, (BLOCK_R, BLOCK_B // 2, 2, LANES)), (0, 1, 3, 2)))
        t2_re, t2_im = tl.split(tl.permute(tl.reshape(t2, (BLOCK_R, BLOCK_B // 2, 2, LANES)), (0, 1, 3, 2)))
        y = tl.join(t1_re - t2_im, t1_im + t2_re)
        offs_b = pid_b * (BLOCK_B // 2) + tl.arange(0, BLOCK_B // 2)
        mask_b = offs_b < B
    else:
        y_re, y_im = _complex_parts(t1, t2, t3, PRECISION)
        y = tl.join(tl.reshape(y_re, (BLOCK_R, BLOCK_B, LANES)), tl.reshape(y_im, (BLOCK_R, BLOCK_B, LANES)))
    out_offs = (g.to(tl.int64) * out_sg + (f0 + lanes * step).to(tl.int64)[None, None, :] * out_sf
                + offs_r[:, None, None] * out_sr + offs_b.to(tl.int64)[None, :, None] * out_sb)
    mask = mask_r[:, None, None] & mask_b[None, :, None] & (lanes < cols)[None, None, :]
    tl.store(out_ptr + out_offs[:, :, :, None] + tl.arange(0, 2) * out_si, y.to(out_ptr.dtype.element_ty),
             mask=mask[:, :, :, None])


@triton.jit
def _conj_outer(dy_f, x_f, b_row, b_col, mask_o, mask_i, B, dy_sb, dy_si, x_sb, x_si, shape,
                PRECISION: tl.constexpr, RANK1: tl.constexpr, ONE_BATCH_TILE: tl.constexpr):
    """dG = dy x^H at one frequency, re and im of `shape` ((O, I) with any leading axes of
    size 1), from the rows of dy at dy_f and the columns of x at x_f (real parts there,
    imaginary parts dy_si and x_si further), as `_batch_tile_dots` takes them: RANK1, one
    rank-1 update per batch entry on the CUDA cores; otherwise the complex product
    q = dy (x_im + 1j x_re)^T of `_complex_dots` over batch tiles (one, ONE_BATCH_TILE,
    which lets the loads pipeline across frequencies), as conj(x) = -1j (x_im + 1j x_re)
    makes dG = -1j q."""
    if RANK1:
        dg_re = tl.zeros(shape, dtype=tl.float32)
        dg_im = tl.zeros(shape, dtype=tl.float32)
        for b in range(0, B):
            dy_b, x_b = dy_f + b * dy_sb, x_f + b * x_sb
            dy_re = tl.load(dy_b, mask=mask_o, other=0.0).to(tl.float32)
            dy_im = tl.load(dy_b + dy_si, mask=mask_o, other=0.0).to(tl.float32)
            x_re = tl.load(x_b, mask=mask_i, other=0.0).to(tl.float32)
            x_im = tl.load(x_b + x_si, mask=mask_i, other=0.0).to(tl.float32)
            dg_re += dy_re * x_re + dy_im * x_im
            dg_im += dy_im * x_re - dy_re * x_im
    else:
        t1, t2, t3 = _complex_sums(shape, PRECISION)
        if ONE_BATCH_TILE:
            t1, t2, t3 = _batch_tile_dots(dy_f, x_f, b_row, b_col, mask_o, mask_i, B, dy_sb, dy_si, x_sb, x_si,
                                          t1, t2, t3, PRECISION)
        else:
            for b0 in range(0, B, b_row.shape[-1]):
                t1, t2, t3 = _batch_tile_dots(dy_f, x_f, b0 + b_row, b0 + b_col, mask_o, mask_i, B, dy_sb, dy_si,
                                              x_sb, x_si, t1, t2, t3, PRECISION)
        q_re, q_im = _complex_parts(t1, t2, t3, PRECISION)
        dg_re, dg_im = q_im, -q_re
    return dg_re, dg_im


@triton.jit
def _accumulate(acc0, acc1, acc2, acc3, acc4, acc5, dg_re, dg_im, s_re, s_im, p0, p1, p2, p3, p4, p5):
    """The six sums of `_grad_coefficients_kernel` after one more frequency, (O, I) tiles:
    dE = dG * conj(S) (dG and S of any leading axes of size 1), acc_k += Re(dE) p_k (k < 4)
    and Im(dE) p_k (k = 4, 5), the p_k broadcast against the sums."""
    de_re = tl.reshape(dg_re * s_re + dg_im * s_im, acc0.shape)
    de_im = tl.reshape(dg_im * s_re - dg_re * s_im, acc0.shape)
    return (acc0 + de_re * p0, acc1 + de_re * p1, acc2 + de_re * p2, acc3 + de_re * p3, acc4 + de_im * p4,
            acc5 + de_im * p5)


@triton.jit
def _grad_coefficients_kernel(grad_ptr, x_ptr, dy_ptr, coef_ptr, phi_re_ptr, phi_im_ptr,
                              F, B, C_OUT, C_IN, SPLITS, F_PER_SPLIT, ROW,
                              x_sg, x_sf, x_sc, x_sb, x_si, dy_sg, dy_sf, dy_sc, dy_sb, dy_si,
                              coef_s6, coef_sg, grad_split,
                              PRECISION: tl.constexpr, SPECIAL_SINCOS: tl.constexpr, RANK1: tl.constexpr,
                              ROW_STEPS: tl.constexpr, ONE_BATCH_TILE: tl.constexpr,
                              BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_B: tl.constexpr):
    """For the pair tile (o, i) of group g over one split of the frequencies:
    dE[f] = (dy[f] x[f]^H) * conj(S[f]); grad[k] = sum_f Re dE[f] phi_re[f, k] (k < 4) and
    grad[4 + k] = sum_f Im dE[f] phi_im[f, k], written to grad[split, :, g, o, i].
    dG = dy[f] x[f]^H by `_conj_outer`. ROW_STEPS: the frequencies are the rows of the
    rfft2 grid, ROW a row (the splits whole rows), along which phi_re is quadratic and phi_im
    linear in the column n. Each row then starts from S exact at n = 0 and the exponent's
    expansion log2 |S| = l0 + n (l1 + n l2), and steps the phase factor by one rotation a
    column: one exp2 an entry instead of exp2, sin and cos."""
    pid_o, pid_i, pid_gs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g, split = pid_gs // SPLITS, pid_gs % SPLITS
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_b = tl.arange(0, BLOCK_B)
    mask_o, mask_i = offs_o < C_OUT, offs_i < C_IN
    pair_offs = offs_o[:, None] * C_IN + offs_i[None, :]
    pair_mask = mask_o[:, None] & mask_i[None, :]
    coef_ptr += g * coef_sg
    dy_ptr += g.to(tl.int64) * dy_sg
    x_ptr += g.to(tl.int64) * x_sg

    acc0 = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    acc4 = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    acc5 = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    f_begin = split * F_PER_SPLIT
    f_end = tl.minimum(f_begin + F_PER_SPLIT, F)
    if ROW_STEPS:
        # (O, I) tiles.
        dy_o, x_i = offs_o[:, None] * dy_sc, offs_i[None, :] * x_sc
        for f0 in range(f_begin, f_end, ROW):
            # The magnitude's features p(n) = p(0) + n (d - e / 2) + n^2 e / 2 in the column n, d and e
            # their first and second differences at the row's start.
            a0, a1, a2, a3, d0, d1, d2, d3, e0, e1, e2, e3, a4, a5, d4, d5 = _row_features(phi_re_ptr, phi_im_ptr, f0,
                                                                                           1, ROW, F, False)
            c0, c1, c2, c3, c4, c5 = _load_coefficients(coef_ptr, coef_s6, pair_offs, pair_mask)
            l0 = c0 * a0 + c1 * a1 + c2 * a2 + c3 * a3
            l2 = 0.5 * (c0 * e0 + c1 * e1 + c2 * e2 + c3 * e3)
            l1 = c0 * d0 + c1 * d1 + c2 * d2 + c3 * d3 - l2
            w_re, w_im = _rotation(c4 * a4 + c5 * a5, SPECIAL_SINCOS)
            r_re, r_im = _rotation(c4 * d4 + c5 * d5, SPECIAL_SINCOS)
            for n in range(0, ROW):
                f = tl.cast(f0 + n, tl.int64)
                dg_re, dg_im = _conj_outer(dy_ptr + f * dy_sf + dy_o, x_ptr + f * x_sf + x_i, offs_b[None, :],
                                           offs_b[:, None], mask_o[:, None], mask_i[None, :], B, dy_sb, dy_si, x_sb,
                                           x_si, (BLOCK_O, BLOCK_I), PRECISION, RANK1, ONE_BATCH_TILE)
                mag = tl.exp2(l0 + n * (l1 + n * l2))
                p0, p1, p2, p3 = _magnitude_features(phi_re_ptr, f, F, 1.0)
                p4, p5 = _phase_features(phi_im_ptr, f, F, False)
                acc0, acc1, acc2, acc3, acc4, acc5 = _accumulate(acc0, acc1, acc2, acc3, acc4, acc5, dg_re, dg_im,
                                                                 mag * w_re, mag * w_im, p0, p1, p2, p3, p4, p5)
                w_re, w_im = w_re * r_re - w_im * r_im, w_re * r_im + w_im * r_re
    else:
        # (1, O, I) tiles, the symbol made as `_contract_kernel` makes it for one frequency: the
        # layouts Triton picks for these kept tf32 at large batches fast (in 2D tiles this loop
        # spilled its sums and took up to 1.5x longer at batch 64).
        dy_o, x_i = offs_o[None, :, None] * dy_sc, offs_i[None, None, :] * x_sc
        c0, c1, c2, c3, c4, c5 = _load_coefficients(coef_ptr, coef_s6, pair_offs, pair_mask)
        for f in range(f_begin, f_end):
            offs_f = f + tl.arange(0, 1)
            dg_re, dg_im = _conj_outer(dy_ptr + offs_f.to(tl.int64)[:, None, None] * dy_sf + dy_o,
                                       x_ptr + offs_f.to(tl.int64)[:, None, None] * x_sf + x_i, offs_b[None, None, :],
                                       offs_b[None, :, None], mask_o[None, :, None], mask_i[None, None, :], B, dy_sb,
                                       dy_si, x_sb, x_si, (1, BLOCK_O, BLOCK_I), PRECISION, RANK1, ONE_BATCH_TILE)
            p0, p1, p2, p3, p4, p5 = _load_features(phi_re_ptr, phi_im_ptr, offs_f, offs_f < F)
            s_re, s_im = _symbol(c0[None, :, :], c1[None, :, :], c2[None, :, :], c3[None, :, :], c4[None, :, :],
                                 c5[None, :, :], p0, p1, p2, p3, p4, p5, SPECIAL_SINCOS)
            acc0, acc1, acc2, acc3, acc4, acc5 = _accumulate(
                acc0, acc1, acc2, acc3, acc4, acc5, dg_re, dg_im, s_re, s_im, tl.reshape(p0, (1, 1)),
                tl.reshape(p1, (1, 1)), tl.reshape(p2, (1, 1)), tl.reshape(p3, (1, 1)), tl.reshape(p4, (1, 1)),
                tl.reshape(p5, (1, 1)))

    grad_ptr += split.to(tl.int64) * grad_split + g * coef_sg + pair_offs
    tl.store(grad_ptr, acc0, mask=pair_mask)
    tl.store(grad_ptr + coef_s6, acc1, mask=pair_mask)
    tl.store(grad_ptr + 2 * coef_s6, acc2, mask=pair_mask)
    tl.store(grad_ptr + 3 * coef_s6, acc3, mask=pair_mask)
    tl.store(grad_ptr + 4 * coef_s6, acc4, mask=pair_mask)
    tl.store(grad_ptr + 5 * coef_s6, acc5, mask=pair_mask)


#################################################################################
#                      Tile choices, launches and autograd                      #
#################################################################################

# The coefficient gradient's batch contraction dy x^H of float32 spectra runs as rank-1
# updates on the CUDA cores for batches of at most this many (see `_grad_tiles`), as
# dots above; bf16 spectra take dots at every batch.
RANK1_MAX_BATCH = 4

# Products of bf16 spectra of at most ROW_MAX_BATCH batch entries on grids of at least
# ROW_MIN_WIDTH rfft2 columns (32 tokens wide) take `_row_contract_kernel`. Up to 8 entries
# a column's sums are one 8-wide MMA's accumulators (4 registers a thread for each of the
# two sums), so 16 columns of them take 128 of a thread's 255 registers; 16 entries would
# need 256. Up to 4 entries the MMA's 8 columns hold both parts of each (PAIRED); both
# parts of 8 entries in a 16-wide tile spilled the sums (14.5 against 9.6 ms at C = 1152,
# batch 8, 128x128). The bounds were set with the first row kernel (H200, bf16, 16 rows on one warp,
# 8 columns, the symbol stepped by exp2 and rotations), against `_contract_kernel`: 11.63
# against 15.48 ms at C = 1152, batch 4, 128x128 grid, 3.29 against 3.95 on 64x64, 1.35
# against 1.75 at C = 384, batch 4, 128x128, 0.408 against 0.447 at batch 8 on 64x64;
# 0.136 against 0.140 at batch 8 on 32x32 (4 columns), 0.559 against 0.568 at batch 16 on
# 64x64, and 0.052 against 0.050 at batch 4 on 16x16. In tf32 it gained at most 8% (1.85
# against 2.01 ms at C = 384, batch 4, 128x128) and lost at 32x32. Its products, segments
# of 16 columns (`_row_tiles`) and paired parts have since taken C = 1152, batch 4, 128x128
# from 11.5 to 6.2 ms (H100). At batch 64 (C = 384, H100, forward) the best row tiles tried
# (4 columns of 32 rows by 64 entries on 4 warps; 8 columns, 16 or 64 rows, 1 to 4 warps were
# slower) took 0.315 ms on 32x32 and 0.105 on 16x16, against `_contract_kernel`'s 0.330 and
# 0.106 with its tiles then (0.259 and 0.079 with its three-stage tiles since, `_contract_tiles`):
# too little to move the bound. Against the three-stage tiles (H100, forward) the row kernel still
# wins at batch 8 (0.704 against 0.984 ms at C = 1152 on 32x32, 2.40 against 3.64 on 64x64) and
# loses at 16 (0.785 against 0.538 at C = 384 on 64x64).
ROW_MAX_BATCH = 8
ROW_MIN_WIDTH = 17

# The coefficient gradient of float32 spectra in tf32 dots steps the symbol along the grid
# rows from RANK1_MAX_BATCH (exclusive) to this many batch entries (see `_grad_tiles`).
TF32_GRAD_ROW_MAX_BATCH = 16


def _special_sincos(precision):
    """The tf32 and bf16 dots take the symbol's phase from the special-function unit
    (compiled only)."""
    return precision in ("tf32", "bf16") and not INTERPRETER


def _pow2_between(n, low, high):
    return min(high, max(low, triton.next_power_of_2(n)))


def _contract_tiles(B, rows, precision):
    """Every symbol entry made serves all BLOCK_B batch columns, so in the float32 modes
    a large batch takes 2D tiles (one frequency, warpgroup MMA over BLOCK_R x BLOCK_B)
    and a small batch takes BLOCK_F frequencies, one or two per warp (3D dots); bf16
    spectra take BLOCK_F frequencies at every batch (below).

    Registers per thread (ptxas for sm_90, Triton 3.6; 255 at most) bound the tiles:
    the three sums of `_complex_dots` take 3 BLOCK_F BLOCK_R BLOCK_B floats and the
    symbol tile (re, im, their sum) 3 BLOCK_F BLOCK_R BLOCK_K, over 32 num_warps
    threads. The programs are latency-bound (one 8-warp program of 128 rows per
    multiprocessor waits on shared memory three quarters of its cycles, Nsight
    Compute), so the tf32 tiles are 64 rows by 64 batch columns on one warpgroup of
    4 warps with BLOCK_K = 32 (254 registers, no spill): two programs fit on a
    multiprocessor and each makes twice the symbol per pass. On an H200 (C = 384,
    batch 64) that took the forward from 0.215 to 0.145 ms on a 16x16 grid and from
    0.673 to 0.456 ms on 32x32 against 128 x 64 tiles on 8 warps with BLOCK_K = 16.
    The float32-exact modes run FMA dots, whose operands take more registers:
    64-row tiles, BLOCK_K = 16, 8 warps (about 180). At small batches 4 frequencies
    of 32 rows on 4 warps took 4.94 ms where 8 of 16 rows on 8 warps took 6.67
    (C = 1152, batch 4, 64x64 grid).

    The bf16 dots keep two sums instead of three and take 3D tiles at every batch:
    32 rows on 4 warps for 8 frequencies up to batch 8 (3.92 against 4.16 ms with 4,
    C = 1152, batch 4, 64x64) and 4 beyond, their loads over three stages. With the
    tf32 tiles above, the bf16 product at batch 64 (C = 384, 16x16 grid, H100) held 2
    programs of 4 warps a multiprocessor (registers), and each issued instruction
    waited 6.7 cycles, 2.5 of them on loads, with L2 46% busy (Nsight Compute): four
    frequencies now share each coefficient tile loaded, and the third stage hides
    the loads. `_contract` alone on an H100, forward / adjoint ms, tf32 tiles (or at
    batches up to 16 the 3D tiles over two stages) -> these:
    C = 384, batch 64, 16x16 0.105 / 0.114 -> 0.079 / 0.091, and 32x32 0.330 / 0.338
    -> 0.259 / 0.274; batch 128, 16x16 0.182 / 0.191 -> 0.147 / 0.163; batch 4, 16x16
    0.074 / 0.101 -> 0.045 / 0.056; C = 1152 on 16x16: batch 32 0.614 / 0.683 -> 0.415 /
    0.484, batch 16 0.417 / 0.484 -> 0.345 / 0.413, batch 4 0.294 / 0.359 -> 0.278 /
    0.341. 2 or 8 frequencies, 16 or 64 rows, batch tiles of 32, BLOCK_K = 32 and four
    stages were no better across these shapes (BLOCK_K = 32 within 5% either way)."""
    block_b = _pow2_between(B, 8, 64)
    if precision == "bf16":
        return dict(BLOCK_F=8 if block_b == 8 else 4, BLOCK_R=32, BLOCK_K=16, BLOCK_B=block_b, num_warps=4,
                    num_stages=3, maxnreg=None)
    if block_b < 32:
        return dict(BLOCK_F=4, BLOCK_R=32, BLOCK_K=16, BLOCK_B=block_b, num_warps=4, num_stages=2, maxnreg=None)
    if precision == "tf32":
        return dict(BLOCK_F=1, BLOCK_R=_pow2_between(rows, 16, 64), BLOCK_K=32, BLOCK_B=block_b, num_warps=4,
                    num_stages=2, maxnreg=None)
    return dict(BLOCK_F=1, BLOCK_R=_pow2_between(rows, 16, 64), BLOCK_K=16, BLOCK_B=block_b, num_warps=8,
                num_stages=2, maxnreg=None)


def _grad_tiles(B, c_out, c_in, groups, F, device, precision, steps):
    """One warpgroup of 4 warps per program, two programs per multiprocessor: the
    program waits at the barriers around each frequency's small dots (44% of its
    stalls, Nsight Compute), which a second program hides better than larger tiles.
    At a large batch pair tiles of 64 x 32 hold the coefficients, six gradient
    accumulators and the three dG sums of `_complex_dots` (with some spilling); at batch
    64 (C = 384, H200) they took 0.364 ms on a 16x16 grid and 1.316 on 32x32, against
    0.416 and 1.531 for 64 x 32 on 8 warps with `_sincos` before. 64 x 16 tiles were
    0.464 against 0.385 ms in one process and 0.358 against 0.363 in another host's, so
    the two are about even; 128-row tiles and pipelined loads were slower. Small
    batches take 64 x 16 tiles with the loads pipelined over two stages: 20.3 ms, 21.0
    without the pipelining, 25.4 before (C = 1152, batch 4, 64x64 grid).
    The 64 rows stay when c_out is smaller: they make the dots warpgroup MMAs, where a
    32-row tile takes Triton's older MMA layout, which repeats the accumulators over
    the warps and spills them. Frequency splits give at least two programs per
    multiprocessor (their partial sums are added afterwards). Batch tiles of up to 64
    columns.

    Batches of up to RANK1_MAX_BATCH take dG as rank-1 updates instead (RANK1), in
    exact float32: the dots pad them to 16 columns. On an H200 at batch 4 (C = 1152,
    64x64 grid) that took 18.9 ms against 21.4 with the dots (relative error 4.8e-7
    against 8.3e-4); at batch 8 (C = 384, 32x32) 1.18 against 1.04 ms, at 16 2.25
    against 1.00. 64 x 16 tiles on 4 warps were the fastest of those tried for it.

    bf16 spectra (precision "bf16") keep two dG sums instead of three and load half the
    bytes, and their dots multiply exactly, so they take no rank-1 updates; their loads
    pipeline over stages. On an H200: at batch 64 (C = 384) 64 x 32 tiles over two
    stages took 0.211 ms on 16x16 and 0.741 on 32x32 (one stage: 0.253 and 0.940; tf32:
    0.395 and 1.433). At small batches 64 x 32 tiles over three stages took 13.05 ms at
    batch 4 with C = 1152 on 64x64, against 16.25 for 64 x 16 over two and 20.1 as
    rank-1 updates (tf32: 18.4), but 0.58 against 0.38 ms at batch 8 with C = 384 on
    32x32: the wider tiles where they give at least four programs per multiprocessor
    (C = 1152: 648 on 132), the narrower ones below. Their frequency splits aim at
    eight programs per multiprocessor instead of two: at batch 64 (C = 384) 16 splits
    took 0.175 ms on 16x16 and 0.526 on 32x32 against 0.211 and 0.741 with 4, at batch 8
    0.330 against 0.386 ms with 2 (8 splits took 0.177 and 0.584 ms at batch 64, 32
    splits 0.356 at batch 8); the extra partial sums are added in that time.

    bf16 spectra on the grid step the symbol along its rows (steps): one exp2 and a
    rotation per entry instead of exp2, sin and cos, and (O, I) tiles whose loads
    pipeline across the frequencies. There 64 x 16 tiles over three stages, capped at
    168 registers (three programs per multiprocessor; compiled by Triton 3.8 for sm_90,
    the spills fall outside the loop over a row's columns), were the fastest tried at
    every batch. On an H100 (ms, before -> after): C = 1152, batch 4, 64x64 10.05 ->
    6.79 and 128x128 40.27 -> 25.72; C = 384, batch 4, 128x128 4.20 -> 2.78, batch 8,
    32x32 0.311 -> 0.227, batch 64, 32x32 0.510 -> 0.352 and 16x16 0.167 -> 0.141;
    C = 1152, batch 64, 16x16 1.073 -> 0.960. Against that, with the steps: 64 x 32 tiles 7.0 ms and 0.308 (C = 1152,
    batch 4, 64x64; C = 384, batch 8), no register cap 6.45 and 0.247, caps of 144 and
    128 registers 6.51 and 7.45 at C = 1152, 8 warps 10.3.

    tf32 dots (float32 spectra) take the same steps and tiles between the rank-1 batches
    and TF32_GRAD_ROW_MAX_BATCH (H100, ms, exact symbol -> steps): C = 384, batch 8,
    32x32 0.938 -> 0.698 and 64x64 3.66 -> 2.55, batch 16, 32x32 0.993 -> 0.804;
    C = 1152, batch 8, 32x32 4.98 -> 4.64, batch 16, 64x64 21.67 -> 19.99. At batch 32
    the exact symbol's 64 x 32 tiles were faster (0.983 against 1.33 ms at C = 384,
    32x32); at batch 4 the steps' tf32 dots beat the rank-1 updates (15.80 against 19.47
    ms at C = 1152, 64x64) but round to tf32 what those keep exact, so those stay."""
    block_b = _pow2_between(B, 16, 64)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    bf16 = precision == "bf16"
    rank1 = B <= RANK1_MAX_BATCH and not bf16
    maxnreg = None
    if steps and precision in ("bf16", "tf32"):
        block_o, block_i, stages, maxnreg = 64, 16, 3, 168
    elif block_b >= 32:
        block_o, block_i, stages = 64, 32, 2 if bf16 else 1
    elif bf16 and groups * triton.cdiv(c_out, 64) * triton.cdiv(c_in, 32) >= 4 * sms:
        block_o, block_i, stages = 64, 32, 3
    else:
        block_o, block_i, stages = 64, 16, 1 if rank1 else 2
    programs = groups * triton.cdiv(c_out, block_o) * triton.cdiv(c_in, block_i)
    splits = max(1, min(F, triton.cdiv((8 if bf16 else 2) * sms, programs)))
    return dict(BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_B=block_b, SPLITS=splits, RANK1=rank1, num_warps=4,
                num_stages=stages, maxnreg=maxnreg)


def _row_tiles(B):
    """Tiles of `_row_contract_kernel`: BLOCK_F (its LANES) = 16 grid columns of BLOCK_R = 16
    rows on one warp, whose 2D dots are one MMA tall, over two load stages. The symbol made
    exactly at a segment's first column (five special functions an entry, and the loads of
    six coefficient planes) serves 16 columns instead of 8. On an H100 (bf16, batch 4,
    `_contract` alone, ms, 8 columns of the kernel before -> 16 columns): 128x128 grid, C =
    1152 9.1 -> 7.9-8.6, C = 1024 6.98 -> 6.17, C = 768 3.97 -> 3.49, C = 384 1.06 -> 0.94;
    64x64 2.33 -> 2.32 (C = 1152) and 0.29 -> 0.30 (C = 384); 32x32 (4 columns before)
    0.81 -> 0.72 (C = 1152). Three stages were 15-18% slower at 128x128. Earlier, with 8
    columns, on an H200 (C = 1152, batch 4, 64x64 grid) 16 rows on one warp took 3.32 ms
    against 3.60 for 32 rows on 2 warps and 5.43 for 64 rows on 4.
    With both parts of the batch in one tile (PAIRED) and unmasked whole tiles (EVEN), a
    program's shared memory is 20 KB instead of 28, so registers (255) bound the
    occupancy at 8 warps a multiprocessor instead of 7; the tiles above stayed the
    fastest (C = 1024, batch 4, 128x128, ms: 4.88; 32 rows on 2 warps 4.90, three stages
    5.81, one 7.52, BLOCK_K = 32 6.77)."""
    return dict(BLOCK_F=16, BLOCK_R=16, BLOCK_K=16, BLOCK_B=_pow2_between(B, 8, 64), num_warps=1, num_stages=2,
                maxnreg=None)


def _with_overrides(defaults, tiles, contracted):
    """The defaults, with the entries of tiles that this kernel takes. The block named
    contracted (None: no dots) is the dots' inner size, which float32 tl.dot needs to be
    at least 16 (Triton 3.6; 3.8 takes 8)."""
    cfg = {name: (tiles or {}).get(name, value) for name, value in defaults.items()}
    if contracted is not None and cfg[contracted] < 16:
        raise ValueError(f"tiles[{contracted!r}] = {cfg[contracted]} is too small: the real dots contract "
                         f"{contracted} columns and float32 tl.dot needs at least 16; expected a power of two "
                         ">= 16")
    return cfg


def _memory_order(t):
    """t's dimensions from outermost to innermost by stride; dimensions of size 1 or
    stride 0 (broadcast) count as outermost."""
    return sorted(range(t.dim()), key=lambda d: -t.stride(d) if t.shape[d] > 1 and t.stride(d) else -math.inf)


def _empty_like_layout(like, rows):
    """An empty spectrum of like's dtype and shape (G, F, K, B, 2) with K = rows, whose
    dimensions lie in memory in like's `_memory_order` (so the output of a product on
    a planar (B, 2, F, G, K) input is planar too, and on interleaved complex input
    interleaved)."""
    order = _memory_order(like)
    shape = list(like.shape)
    shape[2] = rows
    out = torch.empty([shape[d] for d in order], dtype=like.dtype, device=like.device)
    return out.permute([order.index(d) for d in range(like.dim())])


def _row_steps(B, width, precision, tiles, gradient=False):
    """Whether a kernel steps the symbol along the rows of the rfft2 grid (width > 0
    frequencies a row): by default for bf16 spectra, in the products of at most
    ROW_MAX_BATCH batch entries on rows of at least ROW_MIN_WIDTH, in the coefficient
    gradient (gradient=True) on any grid, and there for tf32 too between RANK1_MAX_BATCH
    and TF32_GRAD_ROW_MAX_BATCH batch entries; tiles ROW_STEPS overrides."""
    if gradient:
        default = width > 0 and (precision == "bf16" or precision == "tf32"
                                 and RANK1_MAX_BATCH < B <= TF32_GRAD_ROW_MAX_BATCH)
    else:
        default = precision == "bf16" and B <= ROW_MAX_BATCH and width >= ROW_MIN_WIDTH
    steps = bool((tiles or {}).get("ROW_STEPS", default))
    if steps and width < 1:
        raise ValueError("the symbol's steps along the grid rows (tiles ROW_STEPS) need the grid's width: pass "
                         "spectral_product's width")
    return steps


def _contract(src, coef, phi_re, phi_im, width, adjoint, precision, tiles):
    """S src (adjoint=False: src (G, F, Ci, B, 2) -> (G, F, Co, B, 2)) or S^H src
    (adjoint=True: src (G, F, Co, B, 2) -> (G, F, Ci, B, 2)); float32 or bf16 (re, im)
    views of any strides, the output in src's dtype and memory order. width > 0: the
    features are the rfft2 grid, width frequencies a row (`spectral_product`): bf16
    products of small batches on wide grids take `_row_contract_kernel` (ROW_MAX_BATCH,
    ROW_MIN_WIDTH; tiles ROW_STEPS overrides the choice)."""
    G, F, inner, B, _ = src.shape
    c_out, c_in = coef.shape[2:]
    rows = c_in if adjoint else c_out
    assert inner == (c_out if adjoint else c_in)
    dst = _empty_like_layout(src, rows)
    steps = _row_steps(B, width, precision, tiles)
    if adjoint:
        coef = coef.transpose(2, 3).contiguous()     # (6, G, Ci, Co): S^H's rows are S's columns
    sizes = (F, B, rows, inner)
    strides = (*src.stride(), *dst.stride(), *coef.stride())
    options = dict(ADJOINT=adjoint, PRECISION=precision, SPECIAL_SINCOS=_special_sincos(precision))
    if steps:
        cfg = _with_overrides(_row_tiles(B), tiles, "BLOCK_K")
        lanes = cfg.pop("BLOCK_F")
        if lanes not in (4, 8, 16):
            raise ValueError(f"the symbol's steps along the grid rows (tiles ROW_STEPS) take BLOCK_F 4, 8 or 16 grid "
                             f"columns; got BLOCK_F {lanes}")
        # On rows of a multiple of lanes plus one columns (the last is Nyquist's, on even grid
        # sides) that last column would take a segment of its own, lanes - 1 columns of it
        # masked: where the rows' halves are multiples of lanes too, segments along the
        # column take it instead, in the same launch.
        height = F // width
        column = width > lanes and width % lanes == 1 and height % (2 * lanes) == 0
        cols = width - 1 if column else width
        segments = height * triton.cdiv(cols, lanes) + (height // lanes if column else 0)
        # The extremes over all pairs of a_re's planes of k_x^2, k_x k_y and k_y^2 (`_products_in_range`).
        low, high = torch.aminmax(coef[:3].reshape(3, -1), dim=1)
        # bf16 batches whose real and imaginary parts fit one batch tile take it as both
        # (PAIRED), which needs the two parts of each entry in_si apart and the entries 2 in_si
        # (a single entry: its parts alone).
        # EVEN: every tile whole, its loads unmasked.
        paired = precision == "bf16" and 2 * B <= cfg["BLOCK_B"]
        if paired and B > 1 and src.stride(3) != 2 * src.stride(4):
            src = src.contiguous()
            strides = (*src.stride(), *dst.stride(), *coef.stride())
        batch_columns = 2 * B if paired else B
        even = rows % cfg["BLOCK_R"] == 0 and inner % cfg["BLOCK_K"] == 0 and batch_columns % cfg["BLOCK_B"] == 0 \
            and cols % lanes == 0
        grid = (triton.cdiv(rows, cfg["BLOCK_R"]), segments, G * triton.cdiv(batch_columns, cfg["BLOCK_B"]))
        _row_contract_kernel[grid](dst, src, coef, phi_re, phi_im, low, high, *sizes, width, cols, *strides,
                                   PAIRED=paired, EVEN=even, LANES=lanes, **options, **cfg)
    else:
        cfg = _with_overrides(_contract_tiles(B, rows, precision), tiles, "BLOCK_K")
        grid = (triton.cdiv(rows, cfg["BLOCK_R"]), triton.cdiv(F, cfg["BLOCK_F"]), G * triton.cdiv(B, cfg["BLOCK_B"]))
        _contract_kernel[grid](dst, src, coef, phi_re, phi_im, *sizes, *strides, **options, **cfg)
    return dst


def _grad_coefficients(x, dy, coef, phi_re, phi_im, width, precision, tiles):
    """x (G, F, Ci, B, 2), dy (G, F, Co, B, 2) float32 or bf16 (re, im) views -> (6, G, Co, Ci)
    float32 gradients of the coefficient planes (d/d a_re, then d/d a_im). width as in
    `_contract`: the same rule (and tiles ROW_STEPS) steps the symbol along the grid rows."""
    G, F, c_in, B, _ = x.shape
    c_out = dy.shape[2]
    steps = _row_steps(B, width, precision, tiles, gradient=True)
    defaults = _grad_tiles(B, c_out, c_in, G, F, x.device, precision, steps)
    rank1 = (tiles or {}).get("RANK1", defaults["RANK1"])
    cfg = _with_overrides(defaults, tiles, None if rank1 else "BLOCK_B")
    splits = cfg.pop("SPLITS")
    if steps:
        f_per_split = triton.cdiv(F // width, splits) * width    # whole rows
    else:
        f_per_split = triton.cdiv(F, splits)
    splits = triton.cdiv(F, f_per_split)
    partial = torch.empty((splits,) + coef.shape, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(c_out, cfg["BLOCK_O"]), triton.cdiv(c_in, cfg["BLOCK_I"]), G * splits)
    _grad_coefficients_kernel[grid](partial, x, dy, coef, phi_re, phi_im, F, B, c_out, c_in,
                                    splits, f_per_split, max(width, 1), *x.stride(), *dy.stride(),
                                    coef.stride(0), coef.stride(1), partial.stride(0),
                                    PRECISION=precision, SPECIAL_SINCOS=_special_sincos(precision),
                                    ROW_STEPS=steps, ONE_BATCH_TILE=steps and B <= cfg["BLOCK_B"], **cfg)
    return partial.sum(0)


def _coefficient_planes(a_re, a_im):
    """a_re (G, Co, Ci, 4), a_im (G, Co, Ci, 2) -> the (6, G, Co, Ci) planes the kernels read."""
    return torch.cat([a_re, a_im], dim=-1).permute(3, 0, 1, 2).contiguous()


# The entries tiles may set (`spectral_product` says which kernel takes which).
TILE_NAMES = ("BLOCK_F", "BLOCK_R", "BLOCK_K", "BLOCK_B", "BLOCK_O", "BLOCK_I", "SPLITS", "RANK1", "ROW_STEPS",
              "num_warps", "num_stages", "maxnreg")


def check_tiles(tiles):
    """Refuse tiles whose names no kernel takes (each kernel reads only its own, so a
    misspelt name would otherwise change nothing)."""
    unknown = sorted(set(tiles or {}) - set(TILE_NAMES))
    if unknown:
        raise ValueError(f"tiles {', '.join(unknown)}: no kernel takes these; expected names among "
                         f"{', '.join(TILE_NAMES)}")


def _tiles_key(tiles):
    """tiles (a dict of ints and bools, or None) as the string the custom operators take;
    an entry of None keeps the default."""
    return ",".join(f"{name}={int(value)}" for name, value in sorted((tiles or {}).items()) if value is not None)


def _tiles_from_key(key):
    return {name: int(value) for name, value in (item.split("=") for item in key.split(",") if item)} or None


# The launches as custom operators, so that torch.compile (fullgraph too) and AOTAutograd
# take each one as a single opaque node and compile the work around them. Spectra are
# (G, F, C, B, 2) float32 or bf16 views, coef the (6, G, Co, Ci) planes of a_re and a_im.

@torch.library.custom_op("pdessm::spectral_product", mutates_args=())
def _product_op(x: torch.Tensor, coef: torch.Tensor, phi_re: torch.Tensor, phi_im: torch.Tensor, width: int,
                precision: str, tiles: str) -> torch.Tensor:
    """y = S x, in x's dtype and memory order."""
    return _contract(x, coef, phi_re, phi_im, width, False, precision, _tiles_from_key(tiles))


@torch.library.custom_op("pdessm::spectral_product_adjoint", mutates_args=())
def _adjoint_op(dy: torch.Tensor, coef: torch.Tensor, phi_re: torch.Tensor, phi_im: torch.Tensor, width: int,
                precision: str, tiles: str) -> torch.Tensor:
    """S^H dy, in dy's dtype and memory order."""
    return _contract(dy, coef, phi_re, phi_im, width, True, precision, _tiles_from_key(tiles))


@torch.library.custom_op("pdessm::spectral_product_coefficient_grad", mutates_args=())
def _coefficient_grad_op(x: torch.Tensor, dy: torch.Tensor, coef: torch.Tensor, phi_re: torch.Tensor,
                         phi_im: torch.Tensor, width: int, precision: str, tiles: str) -> torch.Tensor:
    """The (6, G, Co, Ci) float32 gradient of the coefficient planes."""
    return _grad_coefficients(x, dy, coef, phi_re, phi_im, width, precision, _tiles_from_key(tiles))


@_product_op.register_fake
def _(x, coef, phi_re, phi_im, width, precision, tiles):
    return _empty_like_layout(x, coef.shape[2])


@_adjoint_op.register_fake
def _(dy, coef, phi_re, phi_im, width, precision, tiles):
    return _empty_like_layout(dy, coef.shape[3])


@_coefficient_grad_op.register_fake
def _(x, dy, coef, phi_re, phi_im, width, precision, tiles):
    return coef.new_empty(coef.shape, dtype=torch.float32)


def _product_setup_context(ctx, inputs, output):
    x, coef, phi_re, phi_im, width, precision, tiles = inputs
    ctx.save_for_backward(x, coef, phi_re, phi_im)
    ctx.width, ctx.precision, ctx.tiles = width, precision, tiles


def _product_backward(ctx, grad_y):
    x, coef, phi_re, phi_im = ctx.saved_tensors
    grad_x = grad_coef = None
    if ctx.needs_input_grad[0]:
        # S^H reads grad_y in any memory order and writes in grad_y's; x's gradient goes back in x's.
        grad_x = _reorder_like(_adjoint_op(grad_y, coef, phi_re, phi_im, ctx.width, ctx.precision, ctx.tiles), x)
    if ctx.needs_input_grad[1]:
        grad_coef = _coefficient_grad_op(x, grad_y, coef, phi_re, phi_im, ctx.width, ctx.precision, ctx.tiles)
    return grad_x, grad_coef, None, None, None, None, None


_product_op.register_autograd(_product_backward, setup_context=_product_setup_context)


def _reorder_like(t, like):
    """t with like's memory order (a copy only where the orders differ)."""
    if _memory_order(t) == _memory_order(like):
        return t
    return _empty_like_layout(like, t.shape[2]).copy_(t)


def spectral_product(x, a_re, a_im, phi_re, phi_im, input_precision="tf32", tiles=None, width=None):
    """Fused `pde_ssm._GroupedSpectralProduct`: y[g, f, i, b] = sum_j S[g, f, i, j] x[g, f, j, b]
    with S = exp(phi_re a_re + 1j phi_im a_im), S made tile by tile in registers.

    x complex64 (G, F, Ci, B), or a float32 or bf16 (re, im) view (G, F, Ci, B, 2), any
    strides (so planar re and im planes too); a_re (G, Co, Ci, 4), a_im (G, Co, Ci, 2),
    phi_re (F, 4), phi_im (F, 2) float32 -> y of x's kind and dtype, (G, F, Co, B)
    complex64 or (G, F, Co, B, 2) laid out in memory like x. Differentiable in x, a_re
    and a_im (conjugate-Wirtinger gradients, as the reference).
    input_precision is tl.dot's mode for the complex products of float32 spectra: "tf32"
    (tensor cores, relative error about 1e-3), "tf32x3" (about float32, three times the
    tensor-core work) or "ieee" (float32 FMA). A bf16 spectrum (bf16 autocast) is read
    and written in bf16 and multiplied by the symbol rounded to bf16, in bf16 dots with
    float32 sums (`_complex_dots`); its coefficient gradient sums exact products of the
    bf16 spectra and gradients. tiles overrides the tile sizes chosen from the
    shapes: keys BLOCK_F, BLOCK_R, BLOCK_K, BLOCK_B of the products, BLOCK_O, BLOCK_I,
    BLOCK_B, SPLITS and RANK1 (dy x^H as rank-1 updates, no dots) of the coefficient
    gradient (powers of two; the contracted BLOCK_K, and the gradient's BLOCK_B without
    RANK1, at least 16), and Triton's num_warps, num_stages, maxnreg.
    width: phi_re and phi_im are the rfft2 grid of `pde_ssm._frequency_features`, row by
    row, width (W // 2 + 1) frequencies a row. Then the products of bf16 spectra of at
    most ROW_MAX_BATCH batch entries on rows of at least ROW_MIN_WIDTH step the symbol
    along the rows (`_row_contract_kernel`: at most 1.5 special functions per symbol
    entry instead of three, and an error of about 1e-6 more), and so does the coefficient
    gradient of bf16 spectra on any grid and of tf32 products at batches over
    RANK1_MAX_BATCH up to TF32_GRAD_ROW_MAX_BATCH (one exp2 and a rotation per entry,
    rows restarted exactly; an error of about 1e-5 relative on 65-column rows, against
    the bf16 inputs' 4e-3 and tf32's 1e-3); tiles ROW_STEPS=1 asks for both in any
    mode, batch and width, ROW_STEPS=0 for neither.
    """
    check_tiles(tiles)
    is_complex = x.dtype == torch.complex64
    real_view = x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 5 and x.shape[-1] == 2
    if not (is_complex or real_view) or any(t.dtype != torch.float32 for t in (a_re, a_im, phi_re, phi_im)):
        raise ValueError(f"spectral_product takes complex64 x (or its float32 or bf16 (..., 2) view) and float32 "
                         f"coefficients and features; got x {x.dtype} of shape {tuple(x.shape)}, {a_re.dtype}, "
                         f"{a_im.dtype}, {phi_re.dtype}, {phi_im.dtype} (float64 runs the PyTorch reference in "
                         "pde_ssm.py)")
    G, F, c_in, _ = x.shape[:4]
    c_out = a_re.shape[1]
    assert [t.shape for t in (a_re, a_im, phi_re, phi_im)] == [(G, c_out, c_in, 4), (G, c_out, c_in, 2), (F, 4),
                                                               (F, 2)]
    if width is not None and (width < 1 or F % width):
        raise ValueError(f"width {width} does not divide the {F} frequencies into rows: expected W // 2 + 1 of "
                         "the rfft2 grid whose features phi_re and phi_im are")
    planes = _coefficient_planes(a_re, a_im)
    view = x if real_view else torch.view_as_real(x.resolve_conj())
    precision = "bf16" if view.dtype == torch.bfloat16 else input_precision
    y = _product_op(view, planes, phi_re.contiguous(), phi_im.contiguous(), width or 0, precision,
                    _tiles_key(tiles))
    return y if real_view else torch.view_as_complex(y)
