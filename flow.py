"""
Flow matching for PDE-SSM-DiT: the interpolant, the training loss, the ODE samplers and the MSE metric.

Paper convention (Eq. 11-13): t = 1 is data x1, t = 0 is Gaussian noise x0,
    x_t = t * x1 + (1 - t) * x0,        target velocity  x1 - x0,
and sampling integrates dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data).

This file owns every time convention; the networks in models.py never rescale t (see TIME_SCALE).
"""
import torch
from torchdiffeq import odeint
from tqdm import tqdm


# DiT's sinusoidal timestep embedder (max_period 10000) was designed for the integer DDPM steps
# 0..999: its frequencies run from 1 down to 1e-4 per unit of time. On flow time t in [0, 1] every
# phase stays below one radian and the embedding barely changes with t; on 1000 * t it spans the range
# the embedder was built for. So the network sees network_time(t), the only place t is scaled.
TIME_SCALE = 1000.0

T_DISTS = ("uniform", "logit_normal")
METHODS = ("euler", "heun", "dopri5")


def network_time(t):
    """Flow time t in [0, 1], shape (B,) -> the time the network is given, shape (B,)."""
    return t * TIME_SCALE


def _per_sample(t, x):
    """Reshape t (B,) to (B, 1, ..., 1) so it broadcasts against x (B, ...) in x's dtype."""
    return t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def interpolate(x0, x1, t):
    """Eq. 12: x_t = t * x1 + (1 - t) * x0. x0 noise and x1 data (B, ...), t (B,)."""
    t = _per_sample(t, x1)
    return t * x1 + (1 - t) * x0


def denoised(x_t, v, t):
    """Eq. 13: the clean-image estimate x1 ~= x_t + (1 - t) * v. x_t, v (B, ...), t (B,)."""
    return x_t + (1 - _per_sample(t, x_t)) * v


def sample_t(batch_size, device, t_dist="uniform", logit_mean=0.0, logit_std=1.0):
    """Training times (batch_size,): U[0, 1], or sigmoid(N(logit_mean, logit_std^2)) for "logit_normal"."""
    if t_dist == "uniform":
        return torch.rand(batch_size, device=device)
    if t_dist == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn(batch_size, device=device))
    raise ValueError(f"unknown t_dist {t_dist!r}; expected one of {T_DISTS}")


def _check_t(t, batch_size):
    if t.shape != (batch_size,):
        raise ValueError(f"t must have shape ({batch_size},), got {tuple(t.shape)}")
    if not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"t must lie in [0, 1], got values in [{t.min().item():g}, {t.max().item():g}]")


def training_losses(model, x1, model_kwargs=None, t_dist="uniform", noise=None, t=None,
                    logit_mean=0.0, logit_std=1.0):
    """
    The flow-matching loss of Eq. 11 for a batch of data x1 (B, ...), in the shape of DiT's training_losses.

    model(x_t, network_time(t), **model_kwargs) predicts the velocity x1 - x0. noise (x0) and t (B,)
    are drawn here (t from t_dist) unless given. Returns {"loss": (B,)}, the squared error averaged
    over all non-batch dimensions.
    """
    model_kwargs = {} if model_kwargs is None else model_kwargs
    if noise is None:
        noise = torch.randn_like(x1)
    elif noise.shape != x1.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} must equal data shape {tuple(x1.shape)}")
    if t is None:
        t = sample_t(x1.shape[0], x1.device, t_dist, logit_mean, logit_std)
    else:
        _check_t(t, x1.shape[0])

    x_t = interpolate(noise, x1, t)
    v = model(x_t, network_time(t), **model_kwargs)
    if v.shape != x1.shape:
        raise ValueError(f"model output shape {tuple(v.shape)} must equal input shape {tuple(x1.shape)} "
                         "(a velocity model predicts no variance: build it with learn_sigma=False)")
    # Reduce in float32: under bf16 autocast the network's output is bf16.
    loss = (v.float() - (x1 - noise).float()).pow(2).mean(dim=tuple(range(1, x1.ndim)))
    return {"loss": loss}


def velocity_fn(model, y=None, cfg_scale=1.0):
    """
    The sampler's model_fn(x, t) -> velocity, for t (B,) in [0, 1].

    y (B,) holds the class labels (None for an unconditional model). With cfg_scale != 1 the
    velocity is guided through model.forward_with_cfg, which adds the null-class half itself.
    """
    if cfg_scale != 1.0 and y is None:
        raise ValueError(f"classifier-free guidance (cfg_scale={cfg_scale}) needs class labels y, got None")

    def model_fn(x, t):
        if cfg_scale == 1.0:
            return model(x, network_time(t), y)
        return model.forward_with_cfg(x, network_time(t), y, cfg_scale)

    return model_fn


@torch.no_grad()
def sample_ode(model_fn, z, num_steps=50, method="heun", atol=1e-5, rtol=1e-5, return_nfe=False,
               progress=False, t_span=(0.0, 1.0)):
    """
    Integrate dx/dt = model_fn(x, t) from x = z at t_span[0] to t_span[1] (noise to data by default).

    model_fn(x, t) receives t as a (B,) tensor in [0, 1] of x's dtype and device. "euler" and "heun"
    take num_steps equal steps (1 and 2 evaluations per step; Heun's second one lands on the grid,
    never past t_span[1]), with a tqdm bar if progress; "dopri5" is adaptive (torchdiffeq) with
    tolerances atol, rtol and ignores num_steps. t_span=(1, 0) maps data back to noise.
    Returns x at t_span[1], or (x, nfe) with the number of model_fn evaluations.
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; expected one of {METHODS}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    t0, t1 = (float(s) for s in t_span)
    if not (0.0 <= t0 <= 1.0 and 0.0 <= t1 <= 1.0) or t0 == t1:
        raise ValueError(f"t_span must hold two different times in [0, 1], got {tuple(t_span)}")
    lo, hi = min(t0, t1), max(t0, t1)
    nfe = 0

    def velocity(t, x):
        nonlocal nfe
        nfe += 1
        # dopri5's initial-step heuristic probes a guessed step that can reach far past t = 1 when
        # the velocity is small; it only sizes the first step, and the network is defined on [0, 1].
        t = min(max(float(t), lo), hi)
        return model_fn(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))

    if method == "dopri5":
        # step_t makes the solver land on t1 instead of stepping past it and interpolating back.
        x = odeint(velocity, z, torch.tensor([t0, t1], dtype=torch.float64, device=z.device),
                   method="dopri5", atol=atol, rtol=rtol, options={"step_t": [t1]})[-1]
    else:
        ts = torch.linspace(t0, t1, num_steps + 1, dtype=torch.float64).tolist()
        x = z
        for i in tqdm(range(num_steps), desc=f"{method} sampling", disable=not progress):
            h = ts[i + 1] - ts[i]
            v = velocity(ts[i], x)
            x_next = x + h * v
            if method == "heun":  # explicit trapezoidal rule
                x_next = x + 0.5 * h * (v + velocity(ts[i + 1], x_next))
            x = x_next
    return (x, nfe) if return_nfe else x


@torch.no_grad()
def eval_mse(model, images, labels=None, num_t=10, seed=0, batch_size=256):
    """
    The paper's MSE metric (Tables 1, 4): the flow-matching loss of Eq. 11 on held-out images (N, ...),
    averaged over the fixed grid t_j = (j + 0.5) / num_t (midpoints of num_t equal bins) and all images.

    The noise comes from a CPU generator seeded with `seed`, drawn per grid point for all N images,
    so the value depends neither on the global RNG nor on batch_size (the noise of one grid point
    takes as much memory as the images). The model runs in eval mode under no_grad;
    its train/eval mode is restored afterwards. Returns a float.
    """
    if not torch.is_tensor(images) or images.ndim < 2 or images.shape[0] == 0:
        raise ValueError("images must be a non-empty tensor of shape (N, ...)")
    if labels is not None and (not torch.is_tensor(labels) or labels.shape != images.shape[:1]):
        raise ValueError(f"labels must be a tensor of shape ({images.shape[0]},) to match the images")
    if num_t < 1 or batch_size < 1:
        raise ValueError(f"num_t and batch_size must be at least 1, got {num_t} and {batch_size}")
    param = next(model.parameters(), None)
    device = images.device if param is None else param.device

    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        total = 0.0
        for j in range(num_t):
            noise = torch.randn(images.shape, generator=generator)
            for start in range(0, images.shape[0], batch_size):
                x1 = images[start:start + batch_size].to(device)
                y = None if labels is None else labels[start:start + batch_size].to(device)
                t = torch.full((x1.shape[0],), (j + 0.5) / num_t, device=device)
                loss = training_losses(model, x1, dict(y=y), noise=noise[start:start + batch_size].to(x1),
                                       t=t)["loss"]
                total += loss.double().sum().item()
    finally:
        model.train(was_training)
    return total / (num_t * images.shape[0])
