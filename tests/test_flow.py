"""Flow matching (flow.py) against closed forms: Gaussian data has an exact velocity field and flow map."""
import pytest
import torch
from torch import nn

import flow

# Gaussian data N(m, S) on image-shaped tensors (1, 2, 2); noise is N(0, I).
SHAPE = (1, 2, 2)
M = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
_A = torch.tensor([[1.0, 0.3, 0.0, 0.2], [0.0, 0.8, -0.4, 0.0], [0.5, 0.0, 0.6, 0.1], [0.0, 0.2, 0.0, 0.5]],
                  dtype=torch.float64)
S = _A @ _A.T + 0.2 * torch.eye(4, dtype=torch.float64)


EVALS, EVECS = torch.linalg.eigh(S)


def gaussian_velocity(seen_t=None):
    """
    The exact marginal velocity E[x1 - x0 | x_t] for x1 ~ N(M, S), x0 ~ N(0, I), x_t = t x1 + (1-t) x0.
    x_t ~ N(t M, Sigma_t) with Sigma_t = t^2 S + (1-t)^2 I and Cov(x1 - x0, x_t) = t S - (1-t) I, so by
    Gaussian conditioning E[x1 - x0 | x_t] = M + (t S - (1-t) I) Sigma_t^{-1} (x_t - t M). Both matrices
    are functions of S, so in its eigenbasis (eigenvalues lam) the gain is diag((t lam - (1-t)) / (t^2 lam + (1-t)^2)).
    """
    def model_fn(x, t):
        assert t.shape == (x.shape[0],) and t.dtype == x.dtype and t.device == x.device
        if seen_t is not None:
            seen_t.append(t.clone())
        tt = t.double()[:, None]
        gain = (tt * EVALS - (1 - tt)) / (tt ** 2 * EVALS + (1 - tt) ** 2)
        centered = (x.double().reshape(x.shape[0], 4) - tt * M) @ EVECS
        v = M + (gain * centered) @ EVECS.T
        return v.reshape(x.shape).to(x.dtype)
    return model_fn


def exact_flow_map(z):
    """x(1) = M + S^{1/2} z: S and I share eigenvectors, so x(t) = t M + Sigma_t^{1/2} z solves the ODE."""
    sqrt_s = EVECS @ torch.diag(EVALS.sqrt()) @ EVECS.T
    return (M + z.double().reshape(z.shape[0], 4) @ sqrt_s).reshape(z.shape)


@pytest.mark.parametrize("method,num_steps", [("euler", 100), ("heun", 20), ("dopri5", 1)])
def test_samplers_recover_gaussian_mean_and_covariance(method, num_steps):
    z = torch.randn(20000, *SHAPE, generator=torch.Generator().manual_seed(0))
    seen_t = []
    x = flow.sample_ode(gaussian_velocity(seen_t), z, num_steps=num_steps, method=method)
    assert x.shape == z.shape and x.dtype == z.dtype
    flat = x.double().reshape(-1, 4)
    # Standard errors at 20000 samples: mean <= 0.008, covariance entries <= 0.013 (about 5 of them here).
    torch.testing.assert_close(flat.mean(0), M, atol=0.04, rtol=0)
    torch.testing.assert_close(torch.cov(flat.T), S, atol=0.08, rtol=0)
    seen = torch.cat(seen_t)
    assert seen.min() >= 0 and seen.max() <= 1


def terminal_error(method, num_steps, z):
    x = flow.sample_ode(gaussian_velocity(), z, num_steps=num_steps, method=method)
    return (x - exact_flow_map(z)).abs().max().item()


@pytest.mark.parametrize("method,steps,ratio", [("euler", (16, 32, 64), 2.0), ("heun", (16, 32, 64), 4.0)])
def test_fixed_step_order_of_convergence(method, steps, ratio):
    z = torch.randn(16, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    errors = [terminal_error(method, n, z) for n in steps]
    for coarse, fine in zip(errors, errors[1:]):
        assert 0.8 * ratio < coarse / fine < 1.2 * ratio, errors


def test_dopri5_matches_exact_flow_map_and_counts_evaluations():
    z = torch.randn(16, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x, nfe = flow.sample_ode(gaussian_velocity(), z, method="dopri5", atol=1e-9, rtol=1e-9, return_nfe=True)
    torch.testing.assert_close(x, exact_flow_map(z), atol=1e-6, rtol=0)
    assert nfe > 0


def test_dopri5_keeps_time_in_unit_interval_for_slow_fields():
    # A tiny constant velocity makes the solver's initial-step heuristic guess a step far beyond t = 1.
    seen_t = []

    def constant_velocity(x, t):
        seen_t.append(t)
        return torch.full_like(x, 1e-4)

    z = torch.randn(4, *SHAPE, dtype=torch.float64)
    torch.testing.assert_close(flow.sample_ode(constant_velocity, z, method="dopri5"), z + 1e-4)
    seen = torch.cat(seen_t)
    assert seen.min() >= 0 and seen.max() <= 1


@pytest.mark.parametrize("method,per_step", [("euler", 1), ("heun", 2)])
def test_fixed_step_nfe_counts_model_calls(method, per_step):
    calls = []
    velocity = gaussian_velocity(calls)
    _, nfe = flow.sample_ode(velocity, torch.randn(4, *SHAPE), num_steps=7, method=method, return_nfe=True)
    assert nfe == len(calls) == 7 * per_step


@pytest.mark.parametrize("method", ["heun", "dopri5"])
def test_reversed_t_span_maps_data_back_to_noise(method):
    z = torch.randn(16, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    back = flow.sample_ode(gaussian_velocity(), exact_flow_map(z), num_steps=200, method=method,
                           atol=1e-9, rtol=1e-9, t_span=(1.0, 0.0))
    torch.testing.assert_close(back, z, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kwargs,match", [(dict(method="rk4"), "euler"), (dict(num_steps=0), "num_steps"),
                                          (dict(t_span=(0.0, 1.5)), r"\[0, 1\]"),
                                          (dict(t_span=(-0.1, 1.0)), r"\[0, 1\]")])
def test_sample_ode_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flow.sample_ode(gaussian_velocity(), torch.randn(2, *SHAPE), **kwargs)


def test_denoised_recovers_data_from_exact_velocity():
    x0, x1 = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    x_t = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
    torch.testing.assert_close(flow.denoised(x_t, x1 - x0, t), x1)


class Recorder(nn.Module):
    """Returns `output(x, t)` and records what the network was given."""

    def __init__(self, output):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.output = output
        self.inputs = []

    def forward(self, x, t, y=None):
        self.inputs.append(dict(x=x, t=t, y=y, training=self.training, grad=torch.is_grad_enabled()))
        return self.output(x, t) + self.weight


def test_training_loss_is_zero_for_the_exact_target():
    x1, x0 = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    out = flow.training_losses(Recorder(lambda x, t: x1 - x0), x1, noise=x0)
    torch.testing.assert_close(out["loss"], torch.zeros(6))


def test_training_loss_of_zero_model_is_mean_squared_velocity():
    x1, x0 = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    loss = flow.training_losses(Recorder(lambda x, t: torch.zeros_like(x)), x1, noise=x0)["loss"]
    assert loss.shape == (6,)
    torch.testing.assert_close(loss, ((x1 - x0) ** 2).mean(dim=(1, 2, 3)))


def test_time_convention_and_network_time_scale():
    x1, x0 = torch.full((3, 1, 2, 2), 4.0), torch.full((3, 1, 2, 2), -4.0)
    net = Recorder(lambda x, t: torch.zeros_like(x))
    y = torch.tensor([3, 1, 2])
    flow.training_losses(net, x1, dict(y=y), noise=x0, t=torch.tensor([1.0, 0.0, 0.25]))
    seen = net.inputs[0]
    # t = 1 is data, t = 0 is noise, t = 0.25 is 0.25 * 4 + 0.75 * (-4) = -2.
    torch.testing.assert_close(seen["x"][:, 0, 0, 0], torch.tensor([4.0, -4.0, -2.0]))
    torch.testing.assert_close(seen["t"], torch.tensor([1000.0, 0.0, 250.0]))
    assert flow.TIME_SCALE == 1000.0 and torch.equal(seen["y"], y)


@pytest.mark.parametrize("t_dist", ["uniform", "logit_normal"])
def test_training_time_distributions(t_dist):
    net = Recorder(lambda x, t: torch.zeros_like(x))
    torch.manual_seed(0)
    flow.training_losses(net, torch.zeros(50000, 1), t_dist=t_dist, logit_mean=0.5, logit_std=0.8)
    t = net.inputs[0]["t"] / flow.TIME_SCALE
    assert t.min() >= 0 and t.max() <= 1
    if t_dist == "uniform":
        assert abs(t.mean() - 0.5) < 0.01 and abs(t.var() - 1 / 12) < 0.005
    else:
        logit = torch.log(t / (1 - t))
        assert abs(logit.mean() - 0.5) < 0.02 and abs(logit.std() - 0.8) < 0.02


@pytest.mark.parametrize("kwargs,match", [(dict(t_dist="beta"), "t_dist"),
                                          (dict(noise=torch.zeros(2, 3)), "noise shape"),
                                          (dict(t=torch.tensor([0.5, 1.5])), r"\[0, 1\]"),
                                          (dict(t=torch.tensor([0.5])), "shape")])
def test_training_losses_rejects_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flow.training_losses(Recorder(lambda x, t: x), torch.zeros(2, 4), **kwargs)


def test_training_losses_rejects_learn_sigma_output():
    with pytest.raises(ValueError, match="learn_sigma"):
        flow.training_losses(Recorder(lambda x, t: torch.cat([x, x], 1)), torch.zeros(2, 4, 2, 2))


class GuidedNet(Recorder):
    """A conditional fake with a guided path that differs from the plain one."""

    def forward_with_cfg(self, x, t, y, cfg_scale):
        self.inputs.append(dict(x=x, t=t, y=y, cfg_scale=cfg_scale))
        return torch.full_like(x, cfg_scale)


def test_velocity_fn_plain_call_scales_time():
    net = GuidedNet(lambda x, t: 2 * x + t.view(-1, 1))
    x, t, y = torch.randn(3, 2), torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0, 1, 2])
    v = flow.velocity_fn(net, y)(x, t)
    torch.testing.assert_close(v, 2 * x + torch.tensor([[0.0], [500.0], [1000.0]]))
    assert torch.equal(net.inputs[0]["y"], y) and "cfg_scale" not in net.inputs[0]
    flow.velocity_fn(net)(x, t)
    assert net.inputs[1]["y"] is None


def test_velocity_fn_guides_through_forward_with_cfg():
    net = GuidedNet(lambda x, t: x)
    x, t, y = torch.randn(3, 2), torch.tensor([0.2, 0.4, 0.6]), torch.tensor([0, 1, 2])
    v = flow.velocity_fn(net, y, cfg_scale=4.0)(x, t)
    torch.testing.assert_close(v, torch.full_like(x, 4.0))
    seen = net.inputs[0]
    assert seen["cfg_scale"] == 4.0 and torch.equal(seen["y"], y)
    torch.testing.assert_close(seen["t"], torch.tensor([200.0, 400.0, 600.0]))
    with pytest.raises(ValueError, match="labels"):
        flow.velocity_fn(net, None, cfg_scale=4.0)


class TinyNet(nn.Module):
    """A small conditional velocity net whose output depends on x, t and y."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.label = nn.Embedding(4, 3)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x, t, y):
        h = self.conv(x) * torch.cos(t / 300).view(-1, 1, 1, 1) + self.label(y)[:, :, None, None]
        return self.dropout(h)


def test_eval_mse_is_deterministic_across_calls_batch_sizes_and_global_rng():
    images = torch.randn(23, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    labels = torch.arange(23) % 4
    net = TinyNet()
    values = []
    for batch_size, global_seed in [(256, 0), (256, 1), (5, 2), (1, 3)]:
        torch.manual_seed(global_seed)
        values.append(flow.eval_mse(net, images, labels, num_t=4, seed=7, batch_size=batch_size))
    assert all(isinstance(v, float) for v in values)
    assert max(values) - min(values) < 1e-6 * values[0]
    assert abs(flow.eval_mse(net, images, labels, num_t=4, seed=8) - values[0]) > 1e-4


def test_eval_mse_of_zero_model_is_data_power_plus_one():
    # Zero velocity: E|x1 - x0|^2 per pixel = mean(x1^2) + 1 for unit Gaussian noise x0.
    images = 2 * torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(5)) - 1
    mse = flow.eval_mse(Recorder(lambda x, t: torch.zeros_like(x)), images)
    assert abs(mse - (images.pow(2).mean().item() + 1)) < 0.03


def test_eval_mse_grid_mode_and_labels():
    net = Recorder(lambda x, t: torch.zeros_like(x)).train()
    labels = torch.arange(6)
    flow.eval_mse(net, torch.zeros(6, 1, 2, 2), labels, num_t=5, batch_size=4)
    assert net.training  # restored
    assert all(not seen["training"] and not seen["grad"] for seen in net.inputs)
    grid = torch.unique(torch.cat([seen["t"] for seen in net.inputs])) / flow.TIME_SCALE
    torch.testing.assert_close(grid, torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9]))
    torch.testing.assert_close(torch.cat([seen["y"] for seen in net.inputs[:2]]), labels)
    net.eval()
    flow.eval_mse(net, torch.zeros(6, 1, 2, 2), num_t=1)
    assert not net.training and net.inputs[-1]["y"] is None


@pytest.mark.parametrize("args,kwargs", [((torch.zeros(4),), {}), ((torch.zeros(0, 3),), {}),
                                         ((torch.zeros(4, 3), torch.zeros(3, dtype=torch.long)), {}),
                                         ((torch.zeros(4, 3),), dict(num_t=0)),
                                         ((torch.zeros(4, 3),), dict(batch_size=0))])
def test_eval_mse_rejects_bad_inputs(args, kwargs):
    with pytest.raises(ValueError):
        flow.eval_mse(Recorder(lambda x, t: x), *args, **kwargs)
