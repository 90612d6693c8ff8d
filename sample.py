"""
Sample a grid of images from a train.py checkpoint (EMA weights) with the flow-matching ODE.

    python sample.py --ckpt results/000-PDESSM-DiT-S-2/checkpoints/0400000.pt --cfg-scale 4.0

generate() is the one sampling function of the project: sample_ddp.py and train.py's preview grids
call it too.
"""
import argparse
import os

import numpy as np
import torch
from torchvision.utils import save_image

import checkpoint
import flow


def seed_for(*keys):
    """A 64-bit seed derived from a tuple of non-negative ints (e.g. (global_seed, rank, step)); distinct
    tuples give statistically independent streams, unlike sums or products of the keys."""
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0])


# Precision of the network's evaluations while sampling; the ODE state stays float32 either way.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def positive_int(text):
    """argparse type of a count: an int of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def precision_for(training_precision):
    """The sampling precision of a model trained at training_precision: bf16 for bf16, else fp32."""
    return "bf16" if training_precision == "bf16" else "fp32"


@torch.no_grad()
def generate(model, z, labels=None, cfg_scale=1.0, sampler="heun", num_steps=50, vae=None, progress=False,
             precision="fp32"):
    """
    Integrate the learned velocity from noise z (B, C, h, w) at t = 0 to data at t = 1 (flow.sample_ode)
    and return images (B, C', H, W) in [-1, 1]; with a VAE, the latents are decoded first.
    labels (B,) condition a class-conditional model (None for an unconditional one); cfg_scale != 1
    applies classifier-free guidance to the velocity. precision "bf16" runs the network under bf16
    autocast (faster on GPUs; the precision bf16-trained models were trained in).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown sampling precision {precision!r}; choose one of {list(PRECISIONS)}")
    velocity, dtype = flow.velocity_fn(model, labels, cfg_scale), PRECISIONS[precision]

    def model_fn(x, t):
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            return velocity(x, t).to(x.dtype)

    x = flow.sample_ode(model_fn, z, num_steps=num_steps, method=sampler, progress=progress)
    if vae is not None:
        x = vae.decode(x / checkpoint.VAE_SCALE).sample
    return x.clamp(-1, 1)


def to_uint8(images):
    """Images (B, C, H, W) in [-1, 1] -> uint8 numpy (B, H, W, C), rounded as torchvision's save_image rounds."""
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def sample_grid(model, path, noise_shape, class_labels=None, per_class=8, seed=0, cfg_scale=1.0,
                sampler="heun", num_steps=50, vae=None, progress=False, precision="fp32"):
    """
    Save a PNG grid: one row of per_class samples for each label of class_labels (default: the first
    ten classes) of a class-conditional model, or eight rows of per_class unguided samples for an
    unconditional one. noise_shape (C, h, w) is what the model takes. The noise comes from a CPU generator seeded with
    seed, so a grid does not depend on the device. Returns path.
    """
    device = next(model.parameters()).device
    if model.num_classes > 0:
        class_labels = list(range(min(model.num_classes, 10))) if class_labels is None else class_labels
        if not class_labels or not all(0 <= label < model.num_classes for label in class_labels):
            raise ValueError(f"class labels must be a non-empty list of classes 0 to {model.num_classes - 1} of "
                             f"the model; got {class_labels}")
        labels = torch.tensor(class_labels, device=device).repeat_interleave(per_class)
    elif class_labels:
        raise ValueError(f"the model is unconditional (num_classes=0) and takes no class labels, got {class_labels}")
    else:
        labels, cfg_scale = None, 1.0
    num = 8 * per_class if labels is None else len(labels)
    z = torch.randn(num, *noise_shape, generator=torch.Generator().manual_seed(seed)).to(device)
    images = generate(model, z, labels, cfg_scale, sampler, num_steps, vae, progress, precision)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image(images, path, nrow=per_class, normalize=True, value_range=(-1, 1))
    return path


def load_sampling_model(ckpt, device, vae_path=None):
    """
    (model with EMA weights, its VAE or None, checkpoint state, noise shape (C, h, w)) for a checkpoint.
    A latent-space run decodes with the VAE it was trained with, or the local folder vae_path.
    """
    model, state = checkpoint.load_model(ckpt, device)
    run = state["args"]
    vae = None
    if run["space"] == "latent":
        vae = checkpoint.load_vae(run["vae"], vae_path or run["vae_path"], device)
    size = state["model_kwargs"]["input_size"]
    return model, vae, state, (model.in_channels, size, size)


def main(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, vae, state, noise_shape = load_sampling_model(args.ckpt, device, args.vae_path)
    out = args.out
    if out is None:
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt)))
        out = os.path.join(run_dir, "samples", f"{state['step']:07d}-{args.sampler}-{args.num_sampling_steps}"
                                               f"-cfg{args.cfg_scale:g}-seed{args.seed}.png")
    sample_grid(model, out, noise_shape, args.class_labels, args.per_class, args.seed, args.cfg_scale,
                args.sampler, args.num_sampling_steps, vae, progress=True, precision=args.precision)
    print(f"Saved a grid of samples from {args.ckpt} (step {state['step']}) to {out}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=str, required=True, help="checkpoint written by train.py (its EMA weights are used)")
    parser.add_argument("--out", type=str, default=None,
                        help="PNG to write (default: <run>/samples/<step>-<sampler>-<steps>-cfg<scale>-seed<seed>.png)")
    parser.add_argument("--vae-path", type=str, default=None,
                        help="local VAE folder for a latent-space checkpoint (default: the VAE it was trained with)")
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale (1 = none)")
    parser.add_argument("--sampler", type=str, choices=flow.METHODS, default="heun", help="ODE integrator")
    parser.add_argument("--num-sampling-steps", type=int, default=50, help="integrator steps (ignored by dopri5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise")
    parser.add_argument("--precision", type=str, choices=list(PRECISIONS), default="fp32",
                        help="network precision while sampling (bf16: autocast, the precision of bf16 training)")
    parser.add_argument("--class-labels", type=int, nargs="*", default=None,
                        help="one grid row per label (default: classes 0..9 of a class-conditional model)")
    parser.add_argument("--per-class", type=positive_int, default=8, help="samples per row")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
