"""
Checkpoints and the networks built from them: the one reader and writer shared by train.py,
sample.py and sample_ddp.py, and the VAE of latent-space runs.

A checkpoint is DiT's dict {"model", "ema", "opt", "args"} plus:
    "step"            optimizer steps taken
    "epoch"           the data epoch the next step draws from
    "batch_in_epoch"  batches of that epoch already consumed (skipped on resume)
    "model_kwargs"    the keyword arguments that rebuild the network with models.build_model(args["model"], ...)
    "scaler"          the fp16 GradScaler state (None for fp32/bf16)
"args" is the training flags as a plain dict, so checkpoints load with torch.load(weights_only=True).
"""
import contextlib
import os
import re
import socket
import tempfile
import time
import warnings
from urllib.parse import urlparse

import torch

import models


VAE_SCALE = 0.18215  # Stable Diffusion's latent scale (DiT's 0.18215): latents of unit variance
CHECKPOINT_KEYS = ("model", "ema", "opt", "args", "step", "epoch", "batch_in_epoch", "model_kwargs")
CHECKPOINT_NAME = re.compile(r"^\d{7}\.pt$")


def checkpoint_path(run_dir, step):
    """<run_dir>/checkpoints/<step:07d>.pt, DiT's naming."""
    return os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")


@contextlib.contextmanager
def atomic_write(path, mode="wb", durable=True):
    """
    Open a hidden temporary file beside `path` for writing; when the block ends without error it is
    renamed to `path` (after an fsync when durable), else removed. Readers in other processes and
    interrupted writers never leave or see a half-written `path`. `path` gets the permissions that
    open() would give a new file (mkstemp's own are owner-only).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path), suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, mode) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(state, path):
    """
    Write `state` to `path` atomically (see atomic_write), durably on disk. A file already at `path`
    (say an unreadable checkpoint that a resumed run skipped) is kept as <path>.<time>.bak (<time>-<n>
    for a second one within the same second), never deleted.
    """
    if os.path.exists(path):
        stamp = time.strftime('%Y%m%d-%H%M%S')
        backup, n = f"{path}.{stamp}.bak", 1
        while os.path.exists(backup):
            backup, n = f"{path}.{stamp}-{n}.bak", n + 1
        os.replace(path, backup)
        warnings.warn(f"{path} existed and was moved to {backup}")
    with atomic_write(path) as f:
        torch.save(state, f)
    # The rename itself is durable only once the folder's entry is on disk.
    folder = os.path.dirname(os.path.abspath(path))
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path):
    """Load a training checkpoint on the CPU; ValueError when the file is truncated, corrupt or foreign."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for damaged files
        raise ValueError(f"checkpoint {path} cannot be read (truncated or corrupt?): {e}") from e
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is not a training checkpoint of train.py (missing {', '.join(missing)})")
    return state


def latest_checkpoint(run_dir):
    """
    The newest checkpoint of run_dir that loads cleanly, as (path, state), or (None, None) when there
    is none. Newer files that fail to load are skipped with a warning and left in place.
    """
    folder = os.path.join(run_dir, "checkpoints")
    names = sorted(n for n in os.listdir(folder) if CHECKPOINT_NAME.match(n)) if os.path.isdir(folder) else []
    for name in reversed(names):
        path = os.path.join(folder, name)
        try:
            return path, load_checkpoint(path)
        except ValueError as e:
            warnings.warn(f"skipping {path}: {e}")
    return None, None


def load_model(path, device, weights="ema"):
    """
    Rebuild the network of checkpoint `path` with its "ema" (default) or "model" weights, in eval
    mode on `device`. Returns (model, state) where state is the whole checkpoint.
    """
    state = load_checkpoint(path)
    model = models.build_model(state["args"]["model"], **state["model_kwargs"])
    model.load_state_dict(state[weights])
    return model.to(device).eval(), state


@torch.no_grad()
def encode(vae, x, generator=None):
    """Images (B, C, H, W) in [-1, 1] -> scaled latents (B, c, H/8, W/8), one posterior draw.
    Grayscale images are repeated over the VAE's input channels."""
    if x.shape[1] == 1 and vae.config.in_channels != 1:
        x = x.expand(-1, vae.config.in_channels, -1, -1)
    return vae.encode(x).latent_dist.sample(generator) * VAE_SCALE


def _hub_reachable(timeout=5.0):
    """Whether the Hugging Face Hub answers on its port; a machine without network fails here in seconds
    instead of in the hub client's retries."""
    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_vae(vae="ema", vae_path=None, device="cpu"):
    """
    diffusers' AutoencoderKL in eval mode: from the local folder vae_path when given (a folder written
    by save_pretrained: config.json and the weights), else stabilityai/sd-vae-ft-{vae} from the local
    Hugging Face cache or, where there is network, the Hub. Encode with encode(), decode with
    vae.decode(z / VAE_SCALE).
    """
    from diffusers.models import AutoencoderKL
    if vae_path is not None:
        if not os.path.isdir(vae_path):
            raise FileNotFoundError(f"--vae-path {vae_path} is not a folder; expected a folder with the "
                                    "VAE's config.json and weights (AutoencoderKL.save_pretrained)")
        return AutoencoderKL.from_pretrained(vae_path).to(device).eval()
    name = f"stabilityai/sd-vae-ft-{vae}"
    try:
        return AutoencoderKL.from_pretrained(name, local_files_only=True).to(device).eval()
    except OSError as cache_miss:
        error = cache_miss
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if not offline and _hub_reachable():
        try:
            return AutoencoderKL.from_pretrained(name).to(device).eval()
        except OSError as e:
            error = e
    raise FileNotFoundError(
        f"cannot load the VAE {name}: it is not in the local Hugging Face cache and the Hub cannot be "
        f"reached ({error}). Pass --vae-path to a local copy of the VAE (a folder with config.json and "
        "diffusion_pytorch_model.safetensors), or run once with network to fill the cache.") from error
