"""The fused Triton spectral product (kernels/spectral_product.py) against its
reference and specification, pde_ssm._GroupedSpectralProduct in float64: values
and the gradients of x, a_re and a_im; and the fused diagonal product
(kernels/diagonal_product.py) against complex multiplication in float64. Without
CUDA the kernels run in Triton's interpreter on the CPU at small shapes; with CUDA
they run compiled, also at model sizes, and pde_evolve and dense_mix must pick them."""
import copy
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import kernels  # noqa: E402
import pde_ssm  # noqa: E402
from kernels import spectral_product as sp  # noqa: E402
from kernels import diagonal_product as dp  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Without CUDA the kernels need Triton's interpreter, which Triton chooses when it is
# first imported: test_in_triton_interpreter reruns this file in a child process.
INTERPRETER = sp.INTERPRETER
runs_here = pytest.mark.skipif(not (CUDA or INTERPRETER),
                               reason="no CUDA: runs in the Triton interpreter (test_in_triton_interpreter)")
needs_cuda = pytest.mark.skipif(not CUDA, reason="model sizes need a CUDA GPU (too slow in the interpreter)")

# Tiles small enough to give several tiles along every axis of small shapes (and
# frequency splits), valid for compiled float32 dots (contracted sizes BLOCK_K and
# BLOCK_B of the gradient >= 16). The products run 2D dots for BLOCK_F = 1 and 2 and
# 3D dots for the shapes' own tiles at small batches (BLOCK_F = 8).
SMALL_TILES = dict(BLOCK_F=2, BLOCK_R=4, BLOCK_K=16, BLOCK_B=16, BLOCK_O=4, BLOCK_I=8, SPLITS=3, num_warps=2)
SMALL_2D_TILES = dict(SMALL_TILES, BLOCK_F=1, BLOCK_R=16, BLOCK_O=16)


def relative_error(out, ref):
    return ((out.to(ref.dtype) - ref).abs().norm() / ref.abs().norm()).item()


def coefficients(groups, c_out, c_in, device):
    """Exponent coefficients of random valid PDE parameters (K symmetric PSD, tau > 0)
    at the scales PDESSM initializes: Gaussian widths of 0.5 to 8 tokens, shifts of a
    few tokens (phases up to tens of radians), gains around 1."""
    shape = (groups, c_out, c_in)
    L = torch.randn(shape + (2, 2), dtype=torch.float64).tril() * 0.7
    K = L @ L.transpose(-1, -2)
    b = 3.0 * torch.randn(shape + (2,), dtype=torch.float64)
    r = 0.3 * torch.randn(shape, dtype=torch.float64)
    tau = torch.rand(shape, dtype=torch.float64) + 0.5
    return [t.to(device) for t in pde_ssm.exponent_coefficients(K, b, r, tau)]


def forward_backward(product, x, a_re, a_im, phi_re, phi_im, weight):
    """y and the gradients of the real loss sum(Re(y * weight)) for x, a_re, a_im."""
    x, a_re, a_im = (t.detach().requires_grad_() for t in (x, a_re, a_im))
    y = product(x, a_re, a_im, phi_re, phi_im)
    (y * weight).real.sum().backward()
    return y.detach(), x.grad, a_re.grad, a_im.grad


def check_against_reference(groups, c_out, c_in, grid_size, batch, tol, x_layout=None, product=None, exponent=None,
                            **options):
    """Fused float32 on DEVICE (sp.spectral_product, or product) vs the reference in
    float64: y, grad_x, grad_a_re, grad_a_im; the exponent's coefficients (a_re, a_im) from
    `coefficients` unless given."""
    product = product or sp.spectral_product
    H, W = grid_size
    F = H * (W // 2 + 1)
    a_re, a_im = exponent or coefficients(groups, c_out, c_in, DEVICE)
    phi_re, phi_im = pde_ssm._frequency_features(grid_size, DEVICE, torch.float64)
    x = torch.randn(groups, F, c_in, batch, dtype=torch.complex128, device=DEVICE)
    weight = torch.randn(groups, F, c_out, batch, dtype=torch.complex128, device=DEVICE)

    def reference(*args):
        return pde_ssm._GroupedSpectralProduct.apply(*args, 5)

    expected = forward_backward(reference, x, a_re, a_im, phi_re, phi_im, weight)
    x32 = x.to(torch.complex64)
    if x_layout is not None:
        x32 = x_layout(x32)
    got = forward_backward(lambda *args: product(*args, **options), x32, a_re.float(),
                           a_im.float(), phi_re.float(), phi_im.float(), weight.to(torch.complex64))
    for name, out, ref in zip(("y", "grad_x", "grad_a_re", "grad_a_im"), got, expected):
        assert out.shape == ref.shape and torch.isfinite(out).all(), name
        assert relative_error(out, ref) < tol, (name, relative_error(out, ref))


@triton.jit
def _sincos_kernel(theta_ptr, sin_ptr, cos_ptr, N: tl.constexpr, SPECIAL: tl.constexpr):
    offs = tl.arange(0, N)
    if SPECIAL:
        sin, cos = sp._sincos_special(tl.load(theta_ptr + offs))
    else:
        sin, cos = sp._sincos(tl.load(theta_ptr + offs))
    tl.store(sin_ptr + offs, sin)
    tl.store(cos_ptr + offs, cos)


# The polynomial is float32-accurate; the special-function unit's __sinf and __cosf
# are documented to 2^-21.41 (3.6e-7) on [-pi, pi], and compile only for CUDA.
@pytest.mark.parametrize("special,tol", [
    (False, 2e-7), pytest.param(True, 5e-7, marks=pytest.mark.skipif(not CUDA, reason="PTX only: needs CUDA"))])
@runs_here
def test_sincos_accuracy(special, tol):
    theta = torch.cat([torch.linspace(-1000, 1000, 4096), torch.linspace(-7, 7, 4093),
                       torch.tensor([0.0, math.pi / 4, -math.pi / 4])]).to(DEVICE)
    sin, cos = torch.empty_like(theta), torch.empty_like(theta)
    _sincos_kernel[(1,)](theta, sin, cos, N=theta.numel(), SPECIAL=special)
    exact = theta.double()
    assert (sin.double() - exact.sin()).abs().max() < tol
    assert (cos.double() - exact.cos()).abs().max() < tol


@runs_here
@pytest.mark.parametrize("groups,c_out,c_in,grid_size,batch,tiles", [
    (2, 6, 20, (3, 2), 20, SMALL_TILES),      # several tiles on every axis, ragged edges
    (1, 20, 6, (2, 3), 5, SMALL_2D_TILES),
    (1, 5, 3, (5, 3), 3, None),               # tiles from the shapes, one partial tile each
    (3, 16, 16, (4, 4), 1, None),
    (1, 130, 40, (2, 3), 33, None),           # a large batch's 2D tiles, ragged rows and columns
    (2, 6, 20, (3, 2), 20, dict(SMALL_TILES, RANK1=True)),     # the gradient's rank-1 updates at any batch,
    (1, 20, 6, (2, 3), 5, dict(SMALL_2D_TILES, RANK1=False)),  # and its dots at a small one
])
def test_matches_reference(groups, c_out, c_in, grid_size, batch, tiles):
    check_against_reference(groups, c_out, c_in, grid_size, batch, 2e-5, tiles=tiles, input_precision="ieee")


@runs_here
def test_strided_input_and_conjugate_gradient():
    # x as a strided view (the (B, C, F) layout of an rfft2 spectrum seen as (G, F, C, B));
    # the loss Re(y * w) hands the backward a gradient that may carry a lazy conjugation.
    def strided(x):
        return x.permute(3, 0, 2, 1).contiguous().permute(1, 3, 2, 0)

    check_against_reference(2, 3, 5, (2, 3), 3, 2e-5, x_layout=strided, tiles=SMALL_TILES,
                            input_precision="ieee")


@runs_here
def test_planar_real_input_and_output():
    # x as the float32 planar layout of `pde_ssm.dense_mix`, (B, re/im, F, G, C) in memory
    # and seen as (G, F, C, B, re/im): y comes back in that layout, the gradient of x too.
    def planar_product(x, *args, **options):
        planar = torch.view_as_real(x).permute(3, 4, 1, 0, 2).contiguous().permute(3, 2, 4, 0, 1)
        y = sp.spectral_product(planar, *args, **options)
        assert y.dtype == torch.float32 and y.permute(3, 4, 1, 0, 2).is_contiguous()
        planar.register_hook(lambda grad: assert_planar(grad))
        return torch.view_as_complex(y.contiguous())

    def assert_planar(grad):
        assert grad.permute(3, 4, 1, 0, 2).is_contiguous()

    check_against_reference(2, 3, 5, (2, 3), 3, 2e-5, product=planar_product, tiles=SMALL_TILES,
                            input_precision="ieee")


@runs_here
@pytest.mark.parametrize("groups,c_out,c_in,grid_size,batch,tiles", [
    (2, 6, 20, (3, 2), 20, SMALL_TILES),
    (1, 20, 6, (2, 3), 5, dict(SMALL_2D_TILES, RANK1=False, ROW_STEPS=False)),   # the gradient's exact symbol
    (1, 5, 3, (5, 3), 3, None),               # the shapes' own tiles (the gradient's row steps)
    (1, 20, 6, (3, 4), 10, None),             # a larger batch's own tiles: 4 frequencies, ragged everywhere
    (1, 5, 3, (5, 3), 3, dict(RANK1=True)),   # rank-1 gradient updates on bf16 loads
    (2, 6, 20, (3, 10), 3, dict(ROW_STEPS=True, BLOCK_F=8)),   # the row kernel, 8 columns a segment
    (1, 6, 20, (8, 8), 3, dict(ROW_STEPS=True, BLOCK_F=4)),    # rows of 5: the last column in segments of 4 rows
    (1, 6, 20, (32, 32), 3, dict(ROW_STEPS=True, BLOCK_F=16)),  # rows of 17: 16 columns, then 16 rows of the last
    (1, 6, 20, (2, 22), 6, dict(ROW_STEPS=True, BLOCK_F=16)),   # 6 entries: each part its own tile, four dots
    (1, 6, 20, (2, 22), 1, dict(ROW_STEPS=True, BLOCK_F=16)),   # 1 entry: its two parts in a tile of 8
    (1, 16, 32, (32, 32), 4, dict(ROW_STEPS=True, BLOCK_F=16)),  # whole tiles, no masks (EVEN), both parts in one
    (1, 16, 20, (32, 32), 4, dict(ROW_STEPS=True, BLOCK_F=16)),  # whole but for the contracted channels: masked
    (1, 32, 16, (32, 32), 8, dict(ROW_STEPS=True, BLOCK_F=16)),  # whole tiles, each part its own
])
def test_bf16_planar_spectra(groups, c_out, c_in, grid_size, batch, tiles):
    # The row kernel takes batches of up to 4 as one tile of both parts (PAIRED), larger ones
    # as two tiles; shapes of whole tiles load them unmasked (EVEN).
    check_bf16_against_reference(groups, c_out, c_in, grid_size, batch, tiles)


@runs_here
@pytest.mark.parametrize("batch", [3, 1])
def test_bf16_row_kernel_on_parts_planes_apart(batch):
    # Spectra whose real and imaginary planes lie outermost, (re/im, B, F, G, C) in memory:
    # the batch entries and parts are no single axis, so the row kernel reads a copy
    # (`_contract`), but for a single entry, whose two parts it reads where they are; y
    # comes back in that memory order.
    check_bf16_against_reference(1, 6, 20, (2, 22), batch, dict(ROW_STEPS=True, BLOCK_F=16), parts_outer=True)


def spy_on_row_kernel(monkeypatch, on_launch):
    """Have `_contract` call on_launch(args, options) before each launch of the row kernel."""
    kernel = sp._row_contract_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **options):
                on_launch(args, options)
                return kernel[grid](*args, **options)
            return launch

    monkeypatch.setattr(sp, "_row_contract_kernel", Spy())


@runs_here
@pytest.mark.parametrize("c_out,c_in,batch,parts_outer,paired,even,copied", [
    (6, 20, 3, False, True, False, False),      # ragged rows and contracted channels
    (16, 32, 4, False, True, True, False),      # whole tiles
    (16, 20, 4, False, True, False, False),     # contracted channels ragged
    (16, 32, 2, False, True, False, False),     # 4 of the tile's 8 columns used
    (32, 16, 8, False, False, True, False),     # 8 entries: each part a tile of its own
    (16, 32, 6, False, False, False, False),
    (16, 32, 4, True, True, True, True),        # parts planes apart: read from a copy
    (16, 32, 1, True, True, False, False),      # but a single entry's two parts are read in place
])
def test_row_kernel_modes(monkeypatch, c_out, c_in, batch, parts_outer, paired, even, copied):
    # Which way `_contract` launches the row kernel on a bf16 spectrum of a 32x32 grid: both
    # parts of the batch in one tile (PAIRED) for up to 4 entries, whose parts it then reads
    # one stride apart (a copy where they are not, for more than one entry), and unmasked
    # loads (EVEN) where every tile is whole. The values of each mode are checked against
    # the reference above.
    launches = []
    spy_on_row_kernel(monkeypatch, lambda args, options: launches.append((args, options)))
    a_re, a_im = coefficients(1, c_out, c_in, DEVICE)
    phi_re, phi_im = pde_ssm._frequency_features((32, 32), DEVICE, torch.float32)
    F = phi_re.shape[0]
    lead, from_memory = ((2, batch), (3, 2, 4, 1, 0)) if parts_outer else ((batch, 2), (3, 2, 4, 0, 1))
    x = torch.randn(*lead, F, 1, c_in, device=DEVICE).bfloat16().permute(from_memory)
    sp.spectral_product(x, a_re.float(), a_im.float(), phi_re, phi_im, tiles=dict(ROW_STEPS=True, BLOCK_F=16),
                        width=17)
    (args, options), = launches
    assert (options["PAIRED"], options["EVEN"]) == (paired, even)
    src = args[1]
    assert (src.data_ptr() != x.data_ptr()) == copied
    if paired and batch > 1:
        assert src.stride(3) == 2 * src.stride(4)


@pytest.mark.skipif(not INTERPRETER, reason="checks the addresses of every load in Triton's interpreter "
                                            "(test_in_triton_interpreter)")
@pytest.mark.parametrize("batch", [4, 8])     # the paired tile, and the two tiles of 8 entries
def test_row_kernel_loads_and_stores_stay_inside_their_tensors(monkeypatch, batch):
    # Every address the row kernel loads from without a mask lies inside a tensor it reads,
    # and every one it stores to inside its output. Rows of 17 columns in segments of 16 (a 9x32 grid: no segments down the last
    # column) leave each row's second segment one column, and its second half of 8 lanes
    # none: that half's loads must all be masked, or the last row's would read past the
    # spectrum, whose frequencies are its outermost axis here.
    from triton.runtime import interpreter
    builder = interpreter.interpreter_builder
    masked_load, masked_store = builder.create_masked_load, builder.create_masked_store
    reads, writes, stray = [], [], []

    def check(ptrs, mask, extents):
        addresses = ptrs.data[mask.data.astype(bool)].astype("int64")
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        inside = torch.zeros(addresses.shape, dtype=torch.bool)
        for start, end in extents:
            inside |= torch.from_numpy((addresses >= start) & (addresses + size <= end))
        if not inside.all():
            stray.append(int((~inside).sum()))

    def checked_load(ptrs, mask, other, *args):
        check(ptrs, mask, reads)
        return masked_load(ptrs, mask, other, *args)

    def checked_store(ptrs, value, mask, *args):
        check(ptrs, mask, writes)
        return masked_store(ptrs, value, mask, *args)

    def extent(t):
        return t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes()

    def extents(args, options):
        writes[:] = [extent(args[0])]
        reads[:] = [extent(t) for t in args[1:] if isinstance(t, torch.Tensor)]

    monkeypatch.setattr(builder, "create_masked_load", checked_load)
    monkeypatch.setattr(builder, "create_masked_store", checked_store)
    spy_on_row_kernel(monkeypatch, extents)
    grid_size = (9, 32)
    a_re, a_im = coefficients(1, 16, 16, DEVICE)
    phi_re, phi_im = pde_ssm._frequency_features(grid_size, DEVICE, torch.float32)
    x = torch.randn(1, phi_re.shape[0], 16, batch, 2, device=DEVICE).bfloat16()   # frequencies outermost
    sp.spectral_product(x, a_re.float(), a_im.float(), phi_re, phi_im, tiles=dict(ROW_STEPS=True, BLOCK_F=16),
                        width=17)
    assert reads and writes and not stray, f"{sum(stray)} loads or stores outside the kernel's tensors"


@runs_here
@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # NumPy on the masked columns' overflow (never stored)
@pytest.mark.parametrize("grid_size,lanes", [
    ((4, 8), 4),     # rows of 5 frequencies in tiles of 4: the second tile holds one column (4 rows:
                     # too few for segments of 4 down the last column in either half)
    ((8, 8), 4),     # the same on 8 rows: the fifth column in segments of 4 rows from k_y = 0 outwards
    ((16, 16), 8),   # rows of 9 in tiles of 8, the ninth column in segments of 8 rows
    ((3, 10), 8),    # rows of 6 in tiles of 8: two columns masked past every row's end
    ((5, 2), 8),     # rows of 2
    ((2, 64), 8),    # rows of 33: the coefficient gradient steps 32 columns from each row's start
    ((32, 32), 16),  # rows of 17 in tiles of 16 (two halves of 8), the 17th column in segments of 16 rows
    ((2, 22), 16),   # rows of 12: the second half of the tile holds 4 columns
    ((2, 40), 16),   # rows of 21: the second tile's 5 columns all in its first half
])
def test_row_steps_match_reference(grid_size, lanes):
    # The symbol stepped along the rows of the rfft2 grid, in float32 dots: the products
    # (`_row_contract_kernel`, exact at each tile's first column; the adjoint steps too) and the
    # coefficient gradient (exact at each row's first column), within float32 accuracy of the
    # float64 reference.
    check_against_reference(2, 6, 20, grid_size, 3, 2e-5, tiles=dict(BLOCK_F=lanes, ROW_STEPS=True),
                            input_precision="ieee", width=grid_size[1] // 2 + 1)


@runs_here
@pytest.mark.parametrize("lanes", [4, 8, 16])
def test_row_products_out_of_range_take_exp2_steps(lanes):
    # tau K = 100 [[1, -1], [-1, 1]] (a diffusion along the diagonal) on a 16x16 grid: on the
    # row k_y = m dk, |S| peaks at column m and is below 2^-126 four columns before it, so
    # the products along a segment would lose it (S_0 flushed to 0 stays 0). The row
    # kernel must see that (`_products_in_range`) and step the log2 magnitude instead (the
    # products give nan here: 0 times an overflowed ratio). The exponent's terms reach a
    # few thousand and cancel along the diagonal, which float32 resolves to about 1e-4 in
    # the coefficient gradient.
    shape = (1, 2, 2)
    K = 100.0 * torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64).expand(shape + (2, 2))
    b = torch.randn(shape + (2,), dtype=torch.float64)
    r = 0.1 * torch.randn(shape, dtype=torch.float64)
    exponent = [t.to(DEVICE) for t in pde_ssm.exponent_coefficients(K, b, r, torch.ones(shape, dtype=torch.float64))]
    check_against_reference(1, 2, 2, (16, 16), 3, 1e-3, exponent=exponent, tiles=dict(BLOCK_F=lanes, ROW_STEPS=True),
                            input_precision="ieee", width=9)


@triton.jit
def _products_in_range_kernel(low_ptr, high_ptr, out_ptr, QUAD, ROW, LANES: tl.constexpr):
    tl.store(out_ptr, sp._products_in_range(low_ptr, high_ptr, QUAD, ROW, LANES).to(tl.int32))


def products_in_range(a_re, quad, line, lanes):
    """`sp._products_in_range` for the exponent coefficients a_re (..., 4), from the extremes of
    their planes as `_contract` takes them: quad 0 and line the row's width for the rows, quad 2
    and line H / 2 + 1 for the last column."""
    low, high = torch.aminmax(a_re.float().movedim(-1, 0)[:3].reshape(3, -1), dim=1)
    out = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    _products_in_range_kernel[(1,)](low, high, out, quad, line, LANES=lanes)
    return bool(out.item())


@runs_here
@pytest.mark.parametrize("line", ["row", "column"])
@pytest.mark.parametrize("size,lanes", [(32, 4), (64, 8), (128, 8), (128, 16)])
def test_products_in_range_bounds_the_grid(size, lanes, line):
    # `_products_in_range` bounds the exponent's differences in closed form, along the rows
    # and along the last column (k_x = pi) from k_y = 0 outwards in either half, which the
    # row kernel steps too. Where it says in range, the differences computed on the grid
    # (float64) are within its limits; it says so for a PDESSM at initialization (sigma up
    # to 8 tokens; 16 columns, the default, from 128x128 on) and for the tests' coefficients,
    # and not for those grown 30 times.
    width = size // 2 + 1
    phi_re, _ = pde_ssm._frequency_features((size, size), DEVICE, torch.float64)
    quad, extent = (0, width) if line == "row" else (2, size // 2 + 1)

    def in_range(a_re):
        return products_in_range(a_re, quad, extent, lanes)

    def on_grid(a_re):
        log2_mag = (a_re.reshape(-1, 4).double() @ phi_re.T).reshape(-1, size, width) * math.log2(math.e)
        if line == "row":
            st = log2_mag.diff(dim=-1)
        else:   # the last column from k_y = 0 outwards: rows 0 to H/2 - 1, and H - 1 down to H/2
            halves = log2_mag[..., -1].unflatten(-1, (2, size // 2))
            st = torch.stack([halves[..., 0, :], halves[..., 1, :].flip(-1)]).diff(dim=-1)
        cu = st.diff(dim=-1)
        return (lanes - 1) * st.max() <= 85 and st.min() >= -120 and cu.abs().max() <= 120

    torch.manual_seed(0)
    module = pde_ssm.PDESSM(64, coupling="pairwise")
    initial = pde_ssm.exponent_coefficients(*(p.double() for p in module.pde_parameters()))[0].detach().to(DEVICE)
    tests = coefficients(1, 16, 16, DEVICE)[0]
    assert in_range(initial) and in_range(tests)
    assert not in_range(30 * tests)
    for scale in (1, 3, 10, 30, 100):
        for a_re in (scale * initial, scale * tests):
            if in_range(a_re):
                assert on_grid(a_re), scale


@runs_here
def test_last_column_steps_from_ky_zero_outwards():
    # tau K = diag(0.5, 20) on a 16x16 grid: down the last column (k_x = pi) |S| falls from
    # about 2^-7 at k_y = 0 to 2^-292 at k_y = -pi, flushed to 0 in float32. Its segments of 8
    # rows must start at the row nearest k_y = 0 and step outwards: started at k_y = -pi, the
    # products would carry that 0 up to k_y = -pi / 8, where |S| is about 2^-11.6. The grid
    # is within `_products_in_range` (checked), so the products run.
    grid_size, lanes = (16, 16), 8
    shape = (1, 2, 2)
    K = torch.tensor([[0.5, 0.0], [0.0, 20.0]], dtype=torch.float64).expand(shape + (2, 2))
    b = 0.5 * torch.randn(shape + (2,), dtype=torch.float64)
    r = 0.1 * torch.randn(shape, dtype=torch.float64)
    exponent = [t.to(DEVICE) for t in pde_ssm.exponent_coefficients(K, b, r, torch.ones(shape, dtype=torch.float64))]
    width = grid_size[1] // 2 + 1
    assert products_in_range(exponent[0], 0, width, lanes)                    # the rows
    assert products_in_range(exponent[0], 2, grid_size[0] // 2 + 1, lanes)   # the last column
    check_against_reference(1, 2, 2, grid_size, 3, 2e-5, exponent=exponent, tiles=dict(BLOCK_F=lanes, ROW_STEPS=True),
                            input_precision="ieee", width=width)


@runs_here
@pytest.mark.parametrize("bf16", [False, True])
def test_custom_operators(bf16):
    # Schema, fake (meta) outputs of the kernels' shapes, dtypes and strides, autograd
    # registration and AOTAutograd tracing, on a planar spectrum as dense_mix hands it.
    groups, c_out, c_in, grid_size, batch = 2, 5, 3, (3, 4), 3
    F = grid_size[0] * (grid_size[1] // 2 + 1)
    a_re, a_im = (t.float() for t in coefficients(groups, c_out, c_in, DEVICE))
    coef = sp._coefficient_planes(a_re, a_im).requires_grad_()
    phi_re, phi_im = pde_ssm._frequency_features(grid_size, DEVICE, torch.float32)
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = torch.randn(batch, 2, F, groups, c_in, device=DEVICE, dtype=dtype).permute(3, 2, 4, 0, 1)
    dy = torch.randn(batch, 2, F, groups, c_out, device=DEVICE, dtype=dtype).permute(3, 2, 4, 0, 1)
    precision = "bf16" if bf16 else "ieee"
    tiles = sp._tiles_key(dict(SMALL_TILES, ROW_STEPS=True, BLOCK_F=4) if bf16 else SMALL_TILES)  # bf16: the row steps
    width = grid_size[1] // 2 + 1
    rest = (phi_re, phi_im, width, precision, tiles)
    for op, args in [(sp._product_op, (x.requires_grad_(), coef, *rest)), (sp._adjoint_op, (dy, coef.detach(), *rest)),
                     (sp._coefficient_grad_op, (x.detach(), dy, coef.detach(), *rest))]:
        torch.library.opcheck(op, args)


def test_tiles_pass_through_the_operators_as_strings():
    # The custom operators take no dicts: the overrides travel as a string and come back as ints
    # (RANK1's bool as 1); None keeps a default, and no overrides at all is None.
    key = sp._tiles_key(dict(BLOCK_F=2, RANK1=True, num_warps=4, maxnreg=None))
    assert key == "BLOCK_F=2,RANK1=1,num_warps=4"
    assert sp._tiles_from_key(key) == dict(BLOCK_F=2, RANK1=1, num_warps=4)
    assert sp._tiles_key(None) == "" and sp._tiles_from_key("") is None


@runs_here
def test_torch_compile_fullgraph():
    # The fused product traces into one graph (the launches as custom operators) and the
    # compiled values and gradients still match the float64 reference, on the planar layout.
    torch._dynamo.reset()
    compiled = torch.compile(sp.spectral_product, fullgraph=True, backend="inductor" if CUDA else "aot_eager")

    def planar_product(x, *args, **options):
        planar = torch.view_as_real(x).permute(3, 4, 1, 0, 2).contiguous().permute(3, 2, 4, 0, 1)
        return torch.view_as_complex(compiled(planar, *args, **options).contiguous())

    check_against_reference(2, 3, 5, (2, 3), 3, 2e-5, product=planar_product, tiles=SMALL_TILES,
                            input_precision="ieee")


# The coefficient gradient steps along the grid's rows in each (64 x 16 tiles over three stages).
@needs_cuda
@pytest.mark.parametrize("c,grid_size,batch", [
    (384, (32, 32), 64),    # 3D product tiles of 4 frequencies and 64 batch columns, three stages
    (1152, (16, 16), 16),   # 3D product tiles of 16 batch columns
    (384, (32, 32), 8),     # the row kernel's 16 columns and 16 rows of the last
    (1152, (16, 16), 4),    # 3D product tiles of 8 frequencies (a grid too narrow for the row kernel)
    (384, (64, 64), 4),     # the row kernel's 16 columns, two segments a row
])
def test_bf16_model_size_on_cuda(c, grid_size, batch):
    check_bf16_against_reference(1, c, c, grid_size, batch, None)


def check_bf16_against_reference(groups, c_out, c_in, grid_size, batch, tiles, parts_outer=False):
    """A bf16 planar spectrum (dense_mix under bf16 autocast; parts_outer: its real and
    imaginary planes outermost): y and grad_x come back in bf16, made with the symbol
    rounded to bf16 (relative 2^-9) and rounded to bf16 themselves; the coefficient
    gradient sums exact products of the bf16 x and dy in float32. Against the float64
    reference on the same bf16 values of x and of the cotangent. The features come with
    their grid's width, as pde_ssm hands them."""
    H, W = grid_size
    F = H * (W // 2 + 1)
    a_re, a_im = coefficients(groups, c_out, c_in, DEVICE)
    phi_re, phi_im = pde_ssm._frequency_features(grid_size, DEVICE, torch.float64)
    # memory (B, re/im, F, G, C), or (re/im, B, F, G, C), seen as (G, F, C, B, re/im) and back
    if parts_outer:
        lead, from_memory, to_memory = (2, batch), (3, 2, 4, 1, 0), (4, 3, 1, 0, 2)
    else:
        lead, from_memory, to_memory = (batch, 2), (3, 2, 4, 0, 1), (3, 4, 1, 0, 2)
    planar = torch.randn(*lead, F, groups, c_in, device=DEVICE).bfloat16()
    weight = torch.randn(*lead, F, groups, c_out, device=DEVICE).bfloat16()

    def run(x, a_re, a_im, phi_re, phi_im, w, product):
        x, a_re, a_im = (t.detach().requires_grad_() for t in (x, a_re, a_im))
        y = product(x.permute(from_memory), a_re, a_im, phi_re, phi_im)       # (G, F, C, B, re/im)
        (y.permute(to_memory) * w).sum().backward()
        return y.detach(), x.grad, a_re.grad, a_im.grad

    def reference(x, *args):
        return torch.view_as_real(pde_ssm._GroupedSpectralProduct.apply(
            torch.view_as_complex(x.contiguous()), *args, 5))

    expected = run(planar.double(), a_re, a_im, phi_re, phi_im, weight.double(), reference)
    got = run(planar, a_re.float(), a_im.float(), phi_re.float(), phi_im.float(), weight,
              lambda *args: sp.spectral_product(*args, tiles=tiles, width=W // 2 + 1))
    assert got[0].dtype == got[1].dtype == torch.bfloat16 and got[0].permute(to_memory).is_contiguous()
    for name, out, ref, tol in zip(("y", "grad_x", "grad_a_re", "grad_a_im"), got, expected,
                                   (8e-3, 8e-3, 2e-5, 2e-5)):
        assert out.shape == ref.shape and torch.isfinite(out).all(), name
        assert relative_error(out, ref) < tol, (name, relative_error(out, ref))


@runs_here
@pytest.mark.parametrize("separable,autocast", [(False, False), (True, False), (False, True)])
def test_dense_mix_takes_the_fused_product(monkeypatch, separable, autocast):
    """PDESSM on a small grid takes the dense transforms with the fused product on the planar
    spectrum (forced on the CPU, where the kernels run in the interpreter) and matches the
    float64 rfft2 path, gradients included; under bf16 autocast the spectrum stays bf16."""
    calls, fused = [], sp.spectral_product

    def counted(*args, **kwargs):
        calls.append((args[0].dtype, args[0].dim()))
        return fused(*args, **kwargs)

    monkeypatch.setattr(sp, "spectral_product", counted)
    monkeypatch.setattr(pde_ssm, "SEPARABLE_TRANSFORMS", separable)
    torch.manual_seed(0)
    mixer = pde_ssm.PDESSM(12, 8, coupling="heads", num_heads=2).double()
    x = torch.randn(3, 20, 12, dtype=torch.float64)
    weight = torch.randn(3, 20, 12, dtype=torch.float64)

    def run(dtype, device):
        net = copy.deepcopy(mixer).to(device, dtype)
        leaf = x.detach().to(device, dtype).requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast and dtype == torch.float32):
            out = net(leaf, (4, 5))
        (out.to(dtype) * weight.to(device, dtype)).sum().backward()
        return [out.detach().cpu(), leaf.grad.cpu()] + [p.grad.cpu() for p in net.parameters()]

    monkeypatch.setattr(pde_ssm, "DENSE_TRANSFORMS", False)
    expected = run(torch.float64, "cpu")
    monkeypatch.setattr(pde_ssm, "DENSE_TRANSFORMS", None)
    if not CUDA:
        monkeypatch.setattr(pde_ssm, "DENSE_TRANSFORMS", True)
        monkeypatch.setattr(pde_ssm, "FUSED_SPECTRAL_PRODUCT", True)
    got = run(torch.float32, DEVICE)
    assert calls == [(torch.bfloat16 if autocast else torch.float32, 5)]
    tol = 3e-2 if autocast else 3e-3 if CUDA else 1e-5
    for out, ref in zip(got, expected):
        assert relative_error(out, ref) < tol


def test_rejects_float64():
    x = torch.zeros(1, 2, 3, 4, dtype=torch.complex128)
    a_re, a_im = torch.zeros(1, 3, 3, 4), torch.zeros(1, 3, 3, 2)
    with pytest.raises(ValueError, match="complex64"):
        sp.spectral_product(x, a_re, a_im, torch.zeros(2, 4), torch.zeros(2, 2))


def test_rejects_row_steps_without_grid_rows():
    # The row kernel needs the grid's rows (a width that divides the frequencies) and 4 or 8 columns.
    x = torch.zeros(1, 6, 3, 4, dtype=torch.complex64)
    a_re, a_im = torch.zeros(1, 3, 3, 4), torch.zeros(1, 3, 3, 2)
    phi_re, phi_im = torch.zeros(6, 4), torch.zeros(6, 2)
    with pytest.raises(ValueError, match="width 4 does not divide the 6 frequencies"):
        sp.spectral_product(x, a_re, a_im, phi_re, phi_im, width=4)
    for tiles, width in [(dict(ROW_STEPS=True), 0), (dict(ROW_STEPS=True, BLOCK_F=2), 3)]:
        with pytest.raises(ValueError, match="ROW_STEPS"):
            sp._contract(torch.view_as_real(x), sp._coefficient_planes(a_re, a_im), phi_re, phi_im, width, False,
                         "bf16", tiles)


def test_rejects_tiles_too_small_for_dots():
    # BLOCK_K = 8 contracts 8 columns; Triton 3.6's float32 dots need 16.
    x = torch.zeros(1, 2, 3, 4, dtype=torch.complex64)
    a_re, a_im = torch.zeros(1, 3, 3, 4), torch.zeros(1, 3, 3, 2)
    with pytest.raises(ValueError, match="BLOCK_K"):
        sp.spectral_product(x, a_re, a_im, torch.zeros(2, 4), torch.zeros(2, 2), tiles=dict(BLOCK_K=8))


def test_rejects_tile_names_no_kernel_takes():
    # A misspelt name (BLOCK_M for BLOCK_R) would otherwise be ignored by every kernel.
    x = torch.zeros(1, 2, 3, 4, dtype=torch.complex64)
    a_re, a_im = torch.zeros(1, 3, 3, 4), torch.zeros(1, 3, 3, 2)
    with pytest.raises(ValueError, match=r"tiles BLOCK_M, warps: no kernel takes these; expected names among "
                                         r"BLOCK_F, BLOCK_R"):
        sp.spectral_product(x, a_re, a_im, torch.zeros(2, 4), torch.zeros(2, 2),
                            tiles=dict(BLOCK_R=16, BLOCK_M=16, warps=2))


@runs_here
def test_pde_evolve_dispatch(monkeypatch):
    """pde_evolve takes the fused product where it applies (forced here on the CPU, where
    the kernels run in the interpreter) and matches the float64 reference, gradients
    included; on CPU tensors the automatic choice is the reference."""
    calls, fused = [], sp.spectral_product

    def counted(*args, **kwargs):
        calls.append(args[0].device.type)
        return fused(*args, **kwargs)

    monkeypatch.setattr(sp, "spectral_product", counted)
    groups, c, grid_size, batch = 2, 6, (6, 5), 3
    a_re, a_im = coefficients(groups, c // groups, c // groups, "cpu")
    # Parameters whose exponent coefficients are a_re, a_im: tau = 1, K from -a_re, b = a_im.
    K = torch.stack([torch.stack([-a_re[..., 0], -a_re[..., 1] / 2], -1),
                     torch.stack([-a_re[..., 1] / 2, -a_re[..., 2]], -1)], -2)
    params = [K, a_im, a_re[..., 3], torch.ones(a_re.shape[:3], dtype=torch.float64)]
    h0 = torch.randn(batch, c, *grid_size, dtype=torch.float64)
    weight = torch.randn(batch, c, *grid_size, dtype=torch.float64)

    def run(dtype, device):
        leaves = [t.detach().to(device, dtype).requires_grad_() for t in [h0] + params]
        out = pde_ssm.pde_evolve(*leaves)
        (out * weight.to(device, dtype)).sum().backward()
        return [out.detach().cpu()] + [t.grad.cpu() for t in leaves]

    monkeypatch.setattr(pde_ssm, "FUSED_SPECTRAL_PRODUCT", None)
    expected = run(torch.float64, "cpu")
    run(torch.float32, "cpu")
    assert calls == [] and not kernels.fused_spectral_product_applies(torch.zeros(1, dtype=torch.complex64))
    if not CUDA:
        monkeypatch.setattr(pde_ssm, "FUSED_SPECTRAL_PRODUCT", True)
    got = run(torch.float32, DEVICE)
    assert calls == [DEVICE]
    # tf32 tensor-core products on CUDA; exact float32 dots in the interpreter.
    tol = 3e-3 if CUDA else 1e-5
    for out, ref in zip(got, expected):
        assert relative_error(out, ref) < tol


# tf32 dots see float32 operands cut to 10 mantissa bits. Emulating that cut on the
# CPU at these shapes gives 8.3e-4 for the three products of Gauss's scheme (7.7e-4
# for four products; the GPU measured about 8e-4 for those); ieee about 3.5e-7.
@needs_cuda
@pytest.mark.parametrize("input_precision,tol", [("tf32", 3e-3), ("ieee", 2e-5)])
@pytest.mark.parametrize("groups", [1, 6])
@pytest.mark.parametrize("batch", [8, 32])   # the batched (3D) and the 2D tiles
def test_model_size_on_cuda(groups, batch, input_precision, tol):
    # DiT-S width 384 on a 32 x 32 token grid: one pairwise group, or 6 heads of 64.
    c = 384 // groups
    check_against_reference(groups, c, c, (32, 32), batch, tol, input_precision=input_precision)


@needs_cuda
def test_memory_is_linear_in_frequencies():
    # O(B N C + C^2): the complex (F, C, C) symbol of this size (641 MB) must never exist.
    groups, c, grid_size, batch = 1, 384, (32, 32), 8
    F = grid_size[0] * (grid_size[1] // 2 + 1)
    a_re, a_im = (t.float().requires_grad_() for t in coefficients(groups, c, c, DEVICE))
    phi_re, phi_im = pde_ssm._frequency_features(grid_size, DEVICE, torch.float32)
    x = torch.randn(groups, F, c, batch, dtype=torch.complex64, device=DEVICE, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y = sp.spectral_product(x, a_re, a_im, phi_re, phi_im)
    y.abs().sum().backward()
    torch.cuda.synchronize()
    # Ten spectra of x's size: about a fifth of the symbol.
    assert torch.cuda.max_memory_allocated() - base < 10 * x.numel() * 8


#################################################################################
#                            The diagonal product                               #
#################################################################################

def as_complex(planar):
    """(..., 2, F, C) real and imaginary planes -> (..., F, C) complex128."""
    return torch.complex(planar.select(-3, 0).double(), planar.select(-3, 1).double())


def check_diagonal_product(product, B, F, C, dtype, tol):
    """product(v, s) with v (B, 2, F, C) of dtype and s (2, F, C) float32 on DEVICE against
    complex multiplication in float64 of the same values: y and the gradients of v and s for
    the real loss sum(Re(y * weight))."""
    torch.manual_seed(0)
    v = torch.randn(B, 2, F, C, device=DEVICE).to(dtype).requires_grad_()
    s = torch.randn(2, F, C, device=DEVICE).requires_grad_()
    weight = torch.randn(B, F, C, dtype=torch.complex128, device=DEVICE)
    y = product(v, s)
    assert y.dtype == dtype and y.shape == v.shape
    (as_complex(y) * weight).real.sum().backward()
    v64, s64 = (t.detach().double().requires_grad_() for t in (v, s))
    expected = as_complex(s64) * as_complex(v64)
    (expected * weight).real.sum().backward()
    assert relative_error(as_complex(y), expected) < tol
    assert v.grad.dtype == dtype and relative_error(v.grad, v64.grad) < tol
    assert s.grad.dtype == torch.float32 and relative_error(s.grad, s64.grad) < tol


@runs_here
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("compiled", [False, True])
def test_diagonal_product_is_complex_multiplication(dtype, tol, compiled):
    # F C = 1100: two programs of 1024 entries, the second mostly masked; 3 images each.
    product = dp.diagonal_product
    if compiled:  # the launches are custom operators: one graph, the same values
        torch._dynamo.reset()
        product = torch.compile(dp.diagonal_product, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    check_diagonal_product(product, 3, 20, 55, dtype, tol)


@needs_cuda
def test_diagonal_product_at_model_size():
    # DiT-L/2 at 256 px: 4 images, 128 x 65 frequencies, 1024 channels, bf16 spectra.
    check_diagonal_product(dp.diagonal_product, 4, 128 * 65, 1024, torch.bfloat16, 1e-2)


def test_diagonal_product_refuses_other_layouts():
    v = torch.zeros(2, 2, 3, 4)
    with pytest.raises(ValueError, match=r"planar spectrum v \(B, 2, F, C\).*float64"):
        dp.diagonal_product(v.double(), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"symbol s of shape \(2, 3, 4\).*\(2, 4, 3\)"):
        dp.diagonal_product(v, torch.zeros(2, 4, 3))


@runs_here
def test_dense_mix_takes_the_fused_diagonal_product(monkeypatch):
    # The diagonal coupling's dense_mix multiplies by the symbol in the fused kernel where the
    # fused kernels run, with the values and gradients of its float64 reference.
    calls = []
    original = dp._product_op
    monkeypatch.setattr(dp, "_product_op", lambda v, s: calls.append(v.device.type) or original(v, s))
    monkeypatch.setattr(pde_ssm, "DENSE_TRANSFORMS", True)
    torch.manual_seed(0)
    m = pde_ssm.PDESSM(8, 6, coupling="diagonal").to(DEVICE)
    x = torch.randn(3, 20, 8, device=DEVICE)
    weight = torch.randn(3, 20, 8, device=DEVICE)
    results = []
    for fused, dtype in ((False, torch.float64), (None if CUDA else True, torch.float32)):
        monkeypatch.setattr(pde_ssm, "FUSED_SPECTRAL_PRODUCT", fused)
        m.to(dtype).zero_grad()
        leaf = x.to(dtype).requires_grad_()
        out = m(leaf, (4, 5))
        (out * weight.to(dtype)).sum().backward()
        results.append([out.detach(), leaf.grad] + [p.grad for p in m.parameters()])
    assert calls == [DEVICE]
    for got, expected in zip(results[1], results[0]):
        assert relative_error(got, expected) < 1e-5


@pytest.mark.skipif(CUDA or INTERPRETER, reason="runs the kernels compiled on CUDA, or is the interpreter run")
def test_in_triton_interpreter():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
