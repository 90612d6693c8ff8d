"""The PDE-SSM operator against independent expectations: shifts, Fourier modes,
moments of the heat kernel, direct convolution, finite differences."""
import math

import pytest
import torch

import pde_ssm
from pde_ssm import PDESSM, diffusion_from_cholesky, pde_evolve, pde_kernel

F64 = torch.float64


def params(C, kxx=0.0, kxy=0.0, kyy=0.0, bx=0.0, by=0.0, r=0.0, dtype=F64):
    K = torch.tensor([[kxx, kxy], [kxy, kyy]], dtype=dtype).expand(C, 2, 2).clone()
    b = torch.tensor([bx, by], dtype=dtype).expand(C, 2).clone()
    return K, b, torch.full((C,), r, dtype=dtype)


def grid(H, W, dtype=F64):
    y, x = torch.meshgrid(torch.arange(H, dtype=dtype), torch.arange(W, dtype=dtype), indexing="ij")
    return y, x


@pytest.mark.parametrize("H,W", [(8, 8), (7, 5), (6, 9)])
@pytest.mark.parametrize("bx,by,tau", [(1.0, 0.0, 1.0), (0.0, 1.0, 1.0), (-2.0, 3.0, 1.0), (0.5, -1.5, 2.0)])
def test_convection_is_an_integer_shift(H, W, bx, by, tau):
    # dh/dt = b . grad h  =>  h(tau, y, x) = h0(y + tau b_y, x + tau b_x).
    h0 = torch.randn(2, 3, H, W, dtype=F64)
    out = pde_evolve(h0, *params(3, bx=bx, by=by), tau)
    expected = torch.roll(h0, shifts=(-round(tau * by), -round(tau * bx)), dims=(-2, -1))
    torch.testing.assert_close(out, expected)


def test_contract_example_roll_minus_one():
    h0 = torch.randn(1, 1, 4, 6, dtype=F64)
    out = pde_evolve(h0, *params(1, bx=1.0), 1.0)
    torch.testing.assert_close(out, torch.roll(h0, -1, dims=-1))
    torch.testing.assert_close(out[0, 0, 2, 3], h0[0, 0, 2, 4])


@pytest.mark.parametrize("H,W,m,n", [(12, 16, 3, 2), (9, 7, 2, 3), (10, 10, -1, 4)])
def test_single_fourier_mode(H, W, m, n):
    # cos(k.x) -> exp(tau (r - k^T K k)) cos(k.x + tau b.k), for any K, b, r.
    y, x = grid(H, W)
    kx, ky = 2 * math.pi * m / W, 2 * math.pi * n / H
    kxx, kxy, kyy, bx, by, r, tau = 0.7, -0.3, 0.4, 0.8, -1.3, 0.25, 0.6
    h0 = torch.cos(kx * x + ky * y)[None, None]
    out = pde_evolve(h0, *params(1, kxx, kxy, kyy, bx, by, r), tau)
    quad = kxx * kx * kx + 2 * kxy * kx * ky + kyy * ky * ky
    expected = math.exp(tau * (r - quad)) * torch.cos(kx * x + ky * y + tau * (bx * kx + by * ky))
    torch.testing.assert_close(out[0, 0], expected)


def test_tau_to_zero_is_identity_and_reaction_scales():
    h0 = torch.randn(2, 4, 9, 10, dtype=F64)
    K, b, r = params(4, 1.2, 0.4, 0.9, 2.0, -1.0, 0.7)
    torch.testing.assert_close(pde_evolve(h0, K, b, r, 0.0), h0)
    assert (pde_evolve(h0, K, b, r, 1e-7) - h0).abs().max() < 1e-5
    K0, b0, _ = params(4)
    r = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=F64)
    tau = torch.tensor([1.0, 0.5, 3.0, 0.25], dtype=F64)
    expected = torch.exp(tau * r)[None, :, None, None] * h0
    torch.testing.assert_close(pde_evolve(h0, K0, b0, r, tau), expected)


def test_linearity():
    h1, h2 = torch.randn(2, 1, 3, 8, 7, dtype=F64)
    p = params(3, 0.5, 0.1, 0.3, 0.7, 0.2, -0.1)
    lhs = pde_evolve(2.5 * h1 - 0.75 * h2, *p, 1.3)
    torch.testing.assert_close(lhs, 2.5 * pde_evolve(h1, *p, 1.3) - 0.75 * pde_evolve(h2, *p, 1.3))


def test_heat_kernel_moments():
    # Green's function of Eq. 2 from a delta: mass exp(tau r), mean -tau b,
    # covariance 2 tau K (the continuum Gaussian; the grid is large enough).
    H = W = 64
    kxx, kxy, kyy, bx, by, r, tau = 2.0, 0.6, 1.0, 1.5, -2.5, -0.3, 1.5
    kernel = pde_kernel(*params(1, kxx, kxy, kyy, bx, by, r), tau, (H, W), centered=False)[0]
    y, x = grid(H, W)
    x, y = (x + W // 2) % W - W // 2, (y + H // 2) % H - H // 2    # signed offsets from the origin
    mass = kernel.sum()
    assert abs(mass - math.exp(tau * r)) < 1e-10
    p = kernel / mass
    mx, my = (p * x).sum(), (p * y).sum()
    assert abs(mx + tau * bx) < 1e-6 and abs(my + tau * by) < 1e-6
    cov = [[(p * (x - mx) ** 2).sum(), (p * (x - mx) * (y - my)).sum()],
           [(p * (x - mx) * (y - my)).sum(), (p * (y - my) ** 2).sum()]]
    torch.testing.assert_close(torch.tensor(cov, dtype=F64), 2 * tau * torch.tensor([[kxx, kxy], [kxy, kyy]], dtype=F64),
                               atol=1e-5, rtol=0)


def test_evolve_equals_direct_circular_convolution_with_kernel():
    H, W = 6, 5
    h0 = torch.randn(1, 2, H, W, dtype=F64)
    K, b, r = params(2, 0.4, 0.15, 0.3, 0.35, -0.6, 0.1)
    tau = torch.tensor([0.7, 1.4], dtype=F64)
    g = pde_kernel(K, b, r, tau, (H, W), centered=False)
    direct = torch.zeros_like(h0)
    for y in range(H):
        for x in range(W):
            for dy in range(H):
                for dx in range(W):
                    direct[0, :, y, x] += g[:, dy, dx] * h0[0, :, (y - dy) % H, (x - dx) % W]
    torch.testing.assert_close(pde_evolve(h0, K, b, r, tau), direct)


def random_pairwise(Co, Ci, dtype=F64, groups=None):
    shape = (Co, Ci) if groups is None else (groups, Co, Ci)
    chol = 0.3 * torch.randn(shape + (3,), dtype=dtype)
    return (diffusion_from_cholesky(chol), torch.randn(shape + (2,), dtype=dtype),
            0.3 * torch.randn(shape, dtype=dtype), torch.rand(shape, dtype=dtype) + 0.2)


def test_pairwise_sums_per_pair_green_functions():
    # out_i = sum_j G_ij * h0_j, each G_ij evolved on its own by the diagonal path.
    h0 = torch.randn(2, 3, 7, 6, dtype=F64)
    K, b, r, tau = random_pairwise(4, 3)
    out = pde_evolve(h0, K, b, r, tau)
    assert out.shape == (2, 4, 7, 6)
    for i in range(4):
        expected = pde_evolve(h0, K[i], b[i], r[i], tau[i]).sum(dim=1)
        torch.testing.assert_close(out[:, i], expected)


def test_pairwise_with_zeroed_cross_pairs_equals_diagonal():
    h0 = torch.randn(2, 3, 8, 5, dtype=F64)
    K, b, r, tau = random_pairwise(3, 3)
    tau = torch.ones(3, 3, dtype=F64)
    off = ~torch.eye(3, dtype=torch.bool)
    r = r.masked_fill(off, -80.0)         # exp(-80) ~ 1e-35: the cross pairs vanish
    diag = torch.arange(3)
    expected = pde_evolve(h0, K[diag, diag], b[diag, diag], r[diag, diag], tau[diag, diag])
    torch.testing.assert_close(pde_evolve(h0, K, b, r, tau), expected)


def test_grouped_is_block_diagonal_pairwise():
    h0 = torch.randn(2, 6, 5, 8, dtype=F64)
    K, b, r, tau = random_pairwise(2, 3, groups=2)
    out = pde_evolve(h0, K, b, r, tau)
    for g in range(2):
        ref = pde_evolve(h0[:, 3 * g:3 * g + 3], K[g], b[g], r[g], tau[g])
        torch.testing.assert_close(out[:, 2 * g:2 * g + 2], ref)


def keep_symbol(monkeypatch, saved):
    """The pairwise backward reuses the forward's symbol (saved) or generates it again."""
    monkeypatch.setattr(pde_ssm, "PAIRWISE_SAVED_SYMBOL_ELEMENTS", 10 ** 12 if saved else 0)


def test_pairwise_chunking_and_saved_symbol_do_not_change_values_or_gradients(monkeypatch):
    h0 = torch.randn(2, 3, 6, 7, dtype=F64, requires_grad=True)
    K, b, r, tau = (p.requires_grad_() for p in random_pairwise(2, 3))
    results = []
    for saved in (False, True):
        keep_symbol(monkeypatch, saved)
        # One frequency per chunk ... the CPU default ... all at once.
        for chunk_elements in (1, 7, None, 10 ** 9):
            out = pde_evolve(h0, K, b, r, tau, chunk_elements=chunk_elements)
            grads = torch.autograd.grad((out * out.detach().cos()).sum(), (h0, K, b, r, tau))
            results.append((out, grads))
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0])
        for g, g0 in zip(grads, results[0][1]):
            torch.testing.assert_close(g, g0)


def symmetric(kxx, kxy, kyy):
    return torch.stack([torch.stack([kxx, kxy], -1), torch.stack([kxy, kyy], -1)], -2)


@pytest.mark.parametrize("layout,saved", [("diagonal", None), ("pairwise", False), ("pairwise", True),
                                          ("grouped", False), ("grouped", True)])
def test_gradcheck_float64(monkeypatch, layout, saved):
    keep_symbol(monkeypatch, saved)
    torch.manual_seed(0)
    shape = {"diagonal": (3,), "pairwise": (2, 3), "grouped": (3, 1, 1)}[layout]
    h0 = torch.randn(1, 3, 3, 4, dtype=F64, requires_grad=True)
    kxx = (torch.rand(shape, dtype=F64) + 0.5).requires_grad_()
    kyy = (torch.rand(shape, dtype=F64) + 0.5).requires_grad_()
    kxy = (0.2 * torch.rand(shape, dtype=F64)).requires_grad_()
    b = torch.randn(shape + (2,), dtype=F64, requires_grad=True)
    r = torch.randn(shape, dtype=F64, requires_grad=True)
    tau = (torch.rand(shape, dtype=F64) + 0.3).requires_grad_()

    def f(h0, kxx, kxy, kyy, b, r, tau):
        return pde_evolve(h0, symmetric(kxx, kxy, kyy), b, r, tau, chunk_elements=4)

    assert torch.autograd.gradcheck(f, (h0, kxx, kxy, kyy, b, r, tau))


def grouped_product_node(out):
    """The autograd node of the pairwise product behind out. Keep out alive while reading the
    node's saved tensors: torch 2.11 frees them with the graph once out is gone, though Python
    still holds the node (2.14 keeps them as long as the node lives)."""
    todo, seen = [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        if node.name() == "_GroupedSpectralProductBackward":
            return node
        seen.add(node)
        todo += [parent for parent, _ in node.next_functions]
    raise AssertionError("no pairwise product in the graph")


def test_pairwise_keeps_the_symbol_only_within_its_budget(monkeypatch):
    # 2 x 3 channel pairs on the 6 x 4 rfft2 grid of a 6 x 7 field: 144 symbol entries.
    h0 = torch.randn(2, 3, 6, 7, dtype=F64, requires_grad=True)
    p = random_pairwise(2, 3)
    for budget, chunks in ((144, 5), (143, 0)):
        monkeypatch.setattr(pde_ssm, "PAIRWISE_SAVED_SYMBOL_ELEMENTS", budget)
        out = pde_evolve(h0, *p, chunk_elements=30)                              # 5 frequencies a chunk
        symbol = grouped_product_node(out).saved_tensors[5:]  # after x, A_re, A_im, phi_re, phi_im
        assert len(symbol) == chunks and sum(s.numel() for s in symbol) == (144 if chunks else 0)


@pytest.mark.parametrize("saved", [False, True])
@pytest.mark.parametrize("grid", [False, True])
def test_grouped_product_matches_its_formula(saved, grid):
    # Y = G X with G = exp(phi_re A_re + i phi_im A_im), written with a complex exp: values
    # and the gradients of x, A_re and A_im. Features are either arbitrary, repeating some
    # values and not others, or the rfft2 grid of a 3 x 6 field passed with its width.
    torch.manual_seed(0)
    groups, c_out, c_in, B = 2, 3, 4, 2
    if grid:
        phi_re, phi_im = pde_ssm._frequency_features((3, 6), "cpu", F64)
        width = 4
    else:
        phi_re, phi_im = torch.randn(11, 4, dtype=F64), torch.randn(11, 2, dtype=F64)
        phi_im[::3, 0], phi_im[1::2, 1] = 0.7, -2.0
        width = None
    F = phi_re.shape[0]
    x = torch.randn(groups, F, c_in, B, dtype=torch.complex128, requires_grad=True)
    a_re = (0.3 * torch.randn(groups, c_out, c_in, 4, dtype=F64)).requires_grad_()
    a_im = (2.0 * torch.randn(groups, c_out, c_in, 2, dtype=F64)).requires_grad_()
    weight = torch.randn(groups, F, c_out, B, dtype=torch.complex128)
    exponent = torch.einsum("fm,gijm->gfij", phi_re, a_re) + 1j * torch.einsum("fm,gijm->gfij", phi_im, a_im)
    expected = torch.exp(exponent) @ x
    out = pde_ssm._GroupedSpectralProduct.apply(x, a_re, a_im, phi_re, phi_im, 5, saved, width)  # chunks cross rows
    torch.testing.assert_close(out, expected)
    grads = [torch.autograd.grad((y * weight).real.sum(), (x, a_re, a_im)) for y in (out, expected)]
    for g, g0 in zip(*grads):
        torch.testing.assert_close(g, g0)


def test_pairwise_float32_stays_finite_under_strong_cross_diffusion():
    # tau K = [[40, 39.9], [39.9, 40]] is PSD, so tau (r - k^T K k) <= tau r, but its
    # cross term alone, exp(-2 tau K_xy k_x k_y), reaches e^787 at k_x = -k_y = pi: the
    # symbol must come from the whole exponent. Against the diagonal path in float64.
    h0 = torch.randn(2, 1, 16, 16, dtype=F64)
    K = torch.tensor([[[[40.0, 39.9], [39.9, 40.0]]], [[[40.0, -39.9], [-39.9, 40.0]]]], dtype=F64)
    b, r = torch.tensor([[[30.0, -20.0]], [[-7.0, 3.0]]], dtype=F64), torch.tensor([[0.5], [-0.2]], dtype=F64)
    out = pde_evolve(h0.float(), K.float(), b.float(), r.float(), 1.0)
    assert torch.isfinite(out).all()
    for i in range(2):
        expected = pde_evolve(h0, K[i], b[i], r[i], 1.0)
        torch.testing.assert_close(out[:, i:i + 1].double(), expected, atol=1e-5, rtol=1e-4)


def test_float32_matches_float64():
    h0 = torch.randn(2, 3, 9, 8, dtype=F64)
    p = random_pairwise(4, 3)
    ref = pde_evolve(h0, *p)
    out = pde_evolve(h0.float(), *(t.float() for t in p))
    assert out.dtype == torch.float32
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-5


#################################################################################
#                                 Bad input                                     #
#################################################################################

@pytest.mark.parametrize("change,message", [
    (lambda h0, K, b, r, tau: (h0[0], K, b, r, tau), "h0"),
    (lambda h0, K, b, r, tau: (h0, K, b[:, :1], r, tau), "b has shape"),
    (lambda h0, K, b, r, tau: (h0, K, b, r[:2], tau), "r has shape"),
    (lambda h0, K, b, r, tau: (h0, K[:2], b, r, tau), "K has shape"),
    (lambda h0, K, b, r, tau: (h0, K, b, r, torch.ones(2)), "tau has shape"),
    (lambda h0, K, b, r, tau: (h0, K, b, r, -1.0), "tau must be >= 0"),
    (lambda h0, K, b, r, tau: (h0, K, b, r * float("nan"), tau), "r contains non-finite"),
    (lambda h0, K, b, r, tau: (h0, K + torch.tensor([[0.0, 0.5], [0.0, 0.0]]), b, r, tau), "symmetric"),
    (lambda h0, K, b, r, tau: (h0, K - 2 * torch.eye(2), b, r, tau), "positive semidefinite"),
    (lambda h0, K, b, r, tau: (h0, K.expand(3, 3, 2, 2)[:, :2], b, r, tau), "K has shape"),
    (lambda h0, K, b, r, tau: (h0, K.tolist(), b, r, tau), "K must be a tensor"),
])
def test_bad_input_raises_clear_value_error(change, message):
    h0 = torch.randn(1, 3, 4, 4)
    K, b, r = params(3, 1.0, 0.0, 1.0, dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        pde_evolve(*change(h0, K, b, r, 1.0))


#################################################################################
#                                The module                                     #
#################################################################################

def test_module_embedding_is_a_spectral_derivative():
    # With R = I, Gamma_x = I, Gamma_0 = Gamma_y = 0, G = 1 and proj = I the module
    # returns d/dx of its input: sin(k x) -> k cos(k x).
    H, W, C = 6, 8, 2
    m = PDESSM(C, coupling="diagonal").double()
    with torch.no_grad():
        for lin in (m.R, m.proj):
            lin.weight.copy_(torch.eye(C))
            lin.bias.zero_()
        m.gamma_0.zero_(), m.gamma_y.zero_(), m.gamma_x.copy_(torch.eye(C))
        m.chol.copy_(torch.tensor([-40.0, 0.0, -40.0])), m.b.zero_(), m.r.zero_(), m.log_tau.zero_()
    y, x = grid(H, W)
    k = 2 * math.pi * 3 / W
    u = torch.stack([torch.sin(k * x), torch.sin(k * x + 2 * math.pi * y / H)], -1).reshape(1, H * W, C)
    expected = torch.stack([k * torch.cos(k * x), k * torch.cos(k * x + 2 * math.pi * y / H)], -1)
    torch.testing.assert_close(m(u, (H, W)), expected.reshape(1, H * W, C))


@pytest.mark.parametrize("coupling,heads", [("pairwise", 1), ("diagonal", 1), ("heads", 4)])
def test_module_matches_functional_evolution(coupling, heads):
    # The module = output projection of pde_evolve applied to the embedded state.
    torch.manual_seed(1)
    H, W, D, C = 5, 6, 8, 12
    m = PDESSM(D, hidden_dim=C, coupling=coupling, num_heads=heads).double()
    x = torch.randn(2, H * W, D, dtype=F64)
    with torch.no_grad():
        m.gamma_x.zero_(), m.gamma_y.zero_()
        u = (x @ m.R.weight.T + m.R.bias) @ m.gamma_0.T
        K, b, r, tau = m.pde_parameters()
        if coupling == "pairwise":
            K, b, r, tau = K[0], b[0], r[0], tau[0]
        h = pde_evolve(u.transpose(1, 2).reshape(2, C, H, W), K, b, r, tau)
        expected = m.proj(h.reshape(2, C, H * W).transpose(1, 2))
        torch.testing.assert_close(m(x, (H, W)), expected)


def test_module_parametrization_stays_stable():
    m = PDESSM(8, coupling="pairwise")
    with torch.no_grad():
        for p in (m.chol, m.log_tau):
            p.copy_(5 * torch.randn_like(p))
    K, _, _, tau = m.pde_parameters()
    assert (tau > 0).all()
    torch.testing.assert_close(K, K.transpose(-1, -2))
    assert (torch.linalg.eigvalsh(K.double()) >= -1e-6 * K.abs().amax()).all()


def test_module_initial_receptive_fields_spread():
    m = PDESSM(64, coupling="diagonal", sigma_range=(0.5, 8.0))
    K, _, _, tau = m.pde_parameters()
    sigma = (2 * tau[:, None] * torch.linalg.eigvalsh(K.double())[:, 1]).sqrt()
    assert sigma.min() >= 0.5 - 1e-4 and sigma.max() <= 8.0 + 1e-4
    assert sigma.max() / sigma.min() > 5           # local and global fields both present


def test_module_removed_terms_are_zero_and_frozen():
    m = PDESSM(8, coupling="pairwise", terms=("convection",))
    names = {n for n, _ in m.named_parameters()}
    assert "b" in names and "chol" not in names and "r" not in names
    K, b, r, _ = m.pde_parameters()
    assert K.abs().max() == 0 and r.abs().max() == 0
    # With only convection, a delta token moves without spreading or losing mass.
    d = PDESSM(2, coupling="diagonal", terms=("convection",)).double()
    with torch.no_grad():
        d.b.copy_(torch.tensor([[1.0, 0.0], [0.0, -2.0]]))
    K, b, r, tau = d.pde_parameters()
    h0 = torch.randn(1, 2, 6, 6, dtype=F64)
    expected = torch.stack([torch.roll(h0[0, 0], -1, -1), torch.roll(h0[0, 1], 2, -2)])[None]
    torch.testing.assert_close(pde_evolve(h0, K, b, r, tau), expected)


@pytest.mark.parametrize("dense", [False, True])
def test_module_under_bf16_autocast(monkeypatch, dense):
    # dense: the transforms as matrix products in bf16, whose bf16 spectrum the PyTorch
    # product (the CPU's) multiplies in float32.
    monkeypatch.setattr(pde_ssm, "DENSE_TRANSFORMS", dense)
    torch.manual_seed(0)
    m = PDESSM(32, coupling="pairwise")
    x = torch.randn(2, 8 * 8, 32)
    ref = m(x, (8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, (8, 8))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert ((out.float() - ref).norm() / ref.norm()) < 3e-2
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_module_gradients_reach_every_parameter():
    for coupling in ("pairwise", "diagonal", "heads"):
        m = PDESSM(8, hidden_dim=8, coupling=coupling, num_heads=2)
        m(torch.randn(2, 20, 8), (4, 5)).pow(2).sum().backward()
        for name, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (coupling, name)


def test_module_bad_input():
    m = PDESSM(8)
    with pytest.raises(ValueError, match="expected"):
        m(torch.randn(2, 20, 8), (4, 4))
    with pytest.raises(ValueError, match="coupling"):
        PDESSM(8, coupling="full")
    with pytest.raises(ValueError, match="divisible"):
        PDESSM(8, coupling="heads", num_heads=3)
    with pytest.raises(ValueError, match="terms"):
        PDESSM(8, terms=("advection",))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fused,tol", [(False, 1e-5), (True, 3e-3)])   # the fused kernel's dots run in tf32
def test_cuda_matches_cpu(monkeypatch, fused, tol):
    import pde_ssm
    torch.manual_seed(0)
    h0 = torch.randn(2, 6, 16, 12)
    p = random_pairwise(4, 6, dtype=torch.float32)
    ref = pde_evolve(h0.double(), *(t.double() for t in p))
    monkeypatch.setattr(pde_ssm, "FUSED_SPECTRAL_PRODUCT", fused)
    out = pde_evolve(h0.cuda(), *(t.cuda() for t in p)).cpu().double()
    assert ((out - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("grid_size", [(4, 4), (5, 6), (3, 7)])
def test_dft_matrices_are_the_embedded_rfft2_and_the_irfft2(grid_size):
    H, W = grid_size
    torch.manual_seed(0)
    M, M_inv = pde_ssm.dft_matrices(grid_size, dtype=F64)
    u = torch.randn(H * W, 3, dtype=F64)
    kx, ky = pde_ssm.wavenumbers(grid_size, dtype=F64)
    u0, ux, uy = (torch.fft.rfft2(u[:, s].reshape(H, W)) for s in range(3))
    v = torch.einsum("rfns,ns->rf", M, u)
    torch.testing.assert_close(torch.complex(v[0], v[1]), (u0 + 1j * (kx * ux + ky * uy)).reshape(-1))
    # Any half spectrum, Hermitian or not: irfft2 drops the parts a real output cannot hold.
    y = torch.randn(H, W // 2 + 1, dtype=torch.complex128).reshape(-1)
    torch.testing.assert_close(M_inv[:, 0] @ y.real + M_inv[:, 1] @ y.imag,
                               torch.fft.irfft2(y.reshape(H, -1), s=grid_size).reshape(-1))


@pytest.mark.parametrize("grid_size", [(4, 4), (5, 6), (3, 7)])
def test_dft_factors_are_the_embedded_rfft2_and_the_irfft2(grid_size):
    H, W = grid_size
    torch.manual_seed(0)
    (M_x, M_y), (N_y, N_x) = pde_ssm.dft_factors(grid_size, dtype=F64)
    u = torch.randn(H, W, 3, dtype=F64)
    kx, ky = pde_ssm.wavenumbers(grid_size, dtype=F64)
    u0, ux, uy = (torch.fft.rfft2(u[..., s]) for s in range(3))
    rows = torch.einsum("rtkxs,yxs->yrtk", M_x, u)             # along x, per row
    v = torch.einsum("pqyrt,yrtk->pqk", M_y, rows)             # along y, per k_x
    torch.testing.assert_close(torch.complex(v[0], v[1]), u0 + 1j * (kx * ux + ky * uy))
    y = torch.randn(H, W // 2 + 1, dtype=torch.complex128)
    z = torch.einsum("yrpq,pqk->yrk", N_y, torch.stack([y.real, y.imag]))
    torch.testing.assert_close(torch.einsum("xrk,yrk->yx", N_x, z), torch.fft.irfft2(y, s=grid_size))


@pytest.mark.parametrize("separable", [False, True])
@pytest.mark.parametrize("coupling,heads,grid_size", [("pairwise", 1, (4, 5)), ("heads", 2, (6, 3)),
                                                       ("diagonal", 1, (5, 4))])
def test_module_dense_transforms_match_the_fft_path(monkeypatch, coupling, heads, grid_size, separable):
    monkeypatch.setattr(pde_ssm, "SEPARABLE_TRANSFORMS", separable)
    torch.manual_seed(0)
    m = PDESSM(8, 6, coupling=coupling, num_heads=heads).double()
    x = torch.randn(3, grid_size[0] * grid_size[1], 8, dtype=F64)
    weight = torch.randn(3, grid_size[0] * grid_size[1], 8, dtype=F64)
    results = []
    for dense in (False, True):
        monkeypatch.setattr(pde_ssm, "DENSE_TRANSFORMS", dense)
        m.zero_grad()
        leaf = x.clone().requires_grad_()
        out = m(leaf, grid_size)
        (out * weight).sum().backward()
        results.append([out.detach(), leaf.grad] + [p.grad for p in m.parameters()])
    for got, expected in zip(*results[::-1]):
        torch.testing.assert_close(got, expected)
    # The automatic choice: rfft2/irfft2 on the CPU, where the fused product does not run.
    monkeypatch.setattr(pde_ssm, "DENSE_TRANSFORMS", None)
    assert not pde_ssm._dense_transforms(x.float(), coupling)


def test_dense_transforms_go_separable_above_the_full_size(monkeypatch):
    # By default (SEPARABLE_TRANSFORMS None) grids above FULL_TRANSFORM_MAX_TOKENS take
    # the per-axis factors, smaller ones the full matrices.
    taken = []
    for name in ("_cached_dft_matrices", "_cached_dft_factors"):
        original = getattr(pde_ssm, name)
        monkeypatch.setattr(pde_ssm, name, lambda *args, f=original, n=name: taken.append(n) or f(*args))
    monkeypatch.setattr(pde_ssm, "DENSE_TRANSFORMS", True)
    monkeypatch.setattr(pde_ssm, "FULL_TRANSFORM_MAX_TOKENS", 20)
    m = PDESSM(8, 6).double()
    for grid_size in [(4, 5), (5, 5)]:
        m(torch.randn(2, grid_size[0] * grid_size[1], 8, dtype=F64), grid_size)
    assert taken == ["_cached_dft_matrices", "_cached_dft_factors"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("separable,side", [(False, 16), (True, 16), (None, 48)])
@pytest.mark.parametrize("coupling", ["pairwise", "diagonal"])
def test_cuda_dense_transforms_under_bf16_autocast(monkeypatch, separable, side, coupling):
    # DiT-S's width on the 16 x 16 grid of 32 px images at patch 2, and on a 48 x 48 grid
    # (above FULL_TRANSFORM_MAX_TOKENS: separable by default): the dense transforms in
    # bf16 against float64, next to the rfft2 path under the same autocast.
    monkeypatch.setattr(pde_ssm, "SEPARABLE_TRANSFORMS", separable)
    torch.manual_seed(0)
    m = PDESSM(384, coupling=coupling).cuda()
    x = torch.randn(8 if side == 16 else 2, side * side, 384, device="cuda")
    assert pde_ssm._dense_transforms(x, coupling)
    monkeypatch.setattr(pde_ssm, "DENSE_TRANSFORMS", False)
    ref = m.double()(x.double(), (side, side))
    m.float()
    errors = {}
    for dense in (False, True):
        monkeypatch.setattr(pde_ssm, "DENSE_TRANSFORMS", dense)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x, (side, side))
        errors[dense] = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"relative error against float64: rfft2 {errors[False]:.2e}, dense {errors[True]:.2e}")
    assert errors[True] < 3e-2 and errors[True] < 3 * errors[False]
