"""
Pictures of trained runs, as PNGs:

    python visualize.py kernels  --ckpt results/001-PDESSM-DiT-S-2/checkpoints/0400000.pt --out kernels.png
    python visualize.py ssm-maps --ckpt ... --images photo.png --out ssm_maps.png
    python visualize.py curves   results/000-DiT-S-2 results/001-PDESSM-DiT-S-2 --out curves.png
    python visualize.py gradients results/000-DiT-S-2 results/001-PDESSM-DiT-S-2 --out gradients.png

kernels:  the paper's Figure 1 from learned weights: for every PDE-SSM block (one row per layer) a few
          of its Green's functions G = IFFT exp(tau lambda(k)) (pde_ssm.pde_kernel), picked from the
          most local to the most global by the receptive-field size tau tr(K).
ssm-maps: the paper's Figure 6: the norm over channels of each PDE-SSM block's output, token by token,
          when an image is fed through the network (at flow time t = 1, the clean image, by default).
curves:   the paper's Figure 3: training loss and the FID proxy over steps of one or more runs
          (their metrics.jsonl), e.g. DiT and PDE-SSM-DiT side by side, with the internal FID as floor.
gradients: the largest gradient norm of each logging interval over steps, of all parameters and of
          each parameter group of train.py (PDE coefficients, rest of the mixers, everything else), to
          see in which parameters the gradient grew at a loss spike.
"""
import argparse
import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import flow
from evaluate import load_images
from models import has_null_class
from pde_ssm import PDESSM, pde_kernel


def main(args):
    if args.command == "curves":
        plot_curves(args.runs, args.out, labels=args.labels, internal_fid=args.internal_fid)
    elif args.command == "gradients":
        plot_gradient_norms(args.runs, args.out, labels=args.labels)
    else:
        model, state = checkpoint.load_model(args.ckpt, "cpu", weights=args.weights)
        if args.command == "kernels":
            plot_kernels(model, args.out, count=args.count)
        else:
            images = load_images(args.images, args.split)[: args.num_images]
            plot_ssm_maps(model, state["args"], images, args.out, t=args.t, blocks=args.blocks)
    print(f"Wrote {args.out}")


def pdessm_blocks(model):
    """[(block index, its PDESSM)] of a DiT; ValueError for a model without PDE-SSM blocks."""
    found = [(i, block.attn) for i, block in enumerate(getattr(model, "blocks", []))
             if isinstance(block.attn, PDESSM)]
    if not found:
        raise ValueError(f"this {type(model).__name__} has no PDE-SSM blocks (attention DiT or U-Net); "
                         "kernels and ssm-maps need a PDESSM-DiT checkpoint")
    return found


#################################################################################
#                         Learned kernels (Figure 1)                            #
#################################################################################

@torch.no_grad()
def learned_kernels(mixer, grid_size, count=6):
    """
    `count` spatial Green's functions of one PDESSM's learned zeta = (K, b, r, tau) on grid_size (H, W),
    at evenly spaced quantiles of the receptive-field size tau tr(K) (sigma^2 = 2 tau K for diffusion).
    Returns kernels (count, H, W), centred, and a label per kernel ("out i <- in j", or "channel c").
    """
    K, b, r, tau = mixer.pde_parameters()
    pairs = tuple(r.shape)
    K, b, r, tau = K.reshape(-1, 2, 2), b.reshape(-1, 2), r.reshape(-1), tau.reshape(-1)
    size = tau * (K[:, 0, 0] + K[:, 1, 1])
    order = size.argsort()
    picks = order[torch.linspace(0, len(order) - 1, min(count, len(order))).round().long()]
    kernels = pde_kernel(K[picks].double(), b[picks].double(), r[picks].double(), tau[picks].double(), grid_size)
    labels = []
    for index in picks.tolist():
        if len(pairs) == 1:  # diagonal coupling: one PDE per channel
            labels.append(f"channel {index}")
        else:  # (groups, C_out / G, C_in / G): pairwise inside each group
            g, i, j = np.unravel_index(index, pairs)
            labels.append(f"out {g * pairs[1] + i} <- in {g * pairs[2] + j}")
    return kernels.float(), labels


def plot_kernels(model, out, count=6):
    """One row per PDE-SSM block, `count` learned kernels per row, on the model's token grid."""
    blocks = pdessm_blocks(model)
    fig, axes = plt.subplots(len(blocks), count, figsize=(1.8 * count, 1.9 * len(blocks)), squeeze=False)
    for row, (index, mixer) in zip(axes, blocks):
        kernels, labels = learned_kernels(mixer, model.grid_size, count)
        for ax, kernel, label in zip(row, kernels, labels):
            ax.imshow(kernel.numpy(), cmap="magma")
            ax.set_title(label, fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"block {index}", fontsize=9)
    fig.suptitle(f"Learned PDE-SSM kernels on the {model.grid_size[0]}x{model.grid_size[1]} token grid "
                 "(local to global, left to right)")
    _save(fig, out)


#################################################################################
#                              SSM maps (Figure 6)                              #
#################################################################################

def model_input(images, model, train_args):
    """
    uint8 images (B, H, W, C) -> what the network takes: [-1, 1] pixels at the training size and channel
    count, or, for latent-space runs, their VAE latents.
    """
    image_size = train_args["image_size"]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    channels = 3 if train_args.get("space") == "latent" else model.in_channels
    x = x.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1) if x.shape[1] != channels else x
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    if train_args.get("space") == "latent":
        vae = checkpoint.load_vae(train_args.get("vae", "ema"), train_args.get("vae_path"))
        x = vae.encode(x).latent_dist.mean * checkpoint.VAE_SCALE
    return x


@torch.no_grad()
def ssm_maps(model, x, t=1.0, y=None, blocks=None):
    """
    Per-token norm over channels of the PDE-SSM outputs of `blocks` (default: all) for inputs x (B, C, H, W)
    at flow time t (1 = data, flow.py's convention). Returns {block index: (B, H / p, W / p)}.
    """
    mixers = dict(pdessm_blocks(model))
    blocks = sorted(mixers) if blocks is None else blocks
    unknown = set(blocks) - set(mixers)
    if unknown:
        raise ValueError(f"blocks {sorted(unknown)} are not PDE-SSM blocks; choose from {sorted(mixers)}")
    grid = (x.shape[2] // model.patch_size, x.shape[3] // model.patch_size)
    maps = {}

    def keep(index):
        def hook(module, inputs, output):
            maps[index] = output.norm(dim=-1).reshape(len(x), *grid)
        return hook

    hooks = [mixers[i].register_forward_hook(keep(i)) for i in blocks]
    try:
        model(x, flow.network_time(torch.full((len(x),), float(t))), y)
    finally:
        for hook in hooks:
            hook.remove()
    return maps


def plot_ssm_maps(model, train_args, images, out, t=1.0, blocks=None):
    """One row per image: the image, then the SSM map of each chosen block."""
    y = None
    if model.num_classes > 0:  # the null class where there is one: what the block makes of the image alone
        y = torch.full((len(images),), model.num_classes if has_null_class(model) else 0, dtype=torch.long)
    maps = ssm_maps(model, model_input(images, model, train_args), t, y, blocks)
    fig, axes = plt.subplots(len(images), 1 + len(maps), figsize=(1.9 * (1 + len(maps)), 2.0 * len(images)),
                             squeeze=False)
    for b, row in enumerate(axes):
        row[0].imshow(images[b].squeeze(-1) if images.shape[-1] == 1 else images[b], cmap="gray")
        row[0].set_title("input" if b == 0 else "", fontsize=8)
        for ax, (index, energy) in zip(row[1:], maps.items()):
            ax.imshow(energy[b].numpy(), cmap="inferno")
            ax.set_title(f"block {index}" if b == 0 else "", fontsize=8)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"PDE-SSM output norm per token (t = {t:g})")
    _save(fig, out)


#################################################################################
#                         Training curves (Figure 3)                            #
#################################################################################

def read_metrics(run):
    """
    The records of a run's metrics.jsonl (`run` is the run folder or the file itself), in step order. A
    run resumed from a checkpoint logs again the steps after it that an interrupted process had logged
    already: a training record (one with a loss) whose step is not above the last training record's
    drops the earlier records from its step on, so every step keeps the records of the process that
    went on. (The FID proxy's record of a step follows the training record of the same step.)
    """
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; expected a run folder of train.py holding metrics.jsonl")
    records, last_trained = [], None
    with open(path) as f:
        for record in (json.loads(line) for line in f if line.strip()):
            if "loss" in record:
                if last_trained is not None and record["step"] <= last_trained:
                    records = [r for r in records if r["step"] < record["step"]]
                last_trained = record["step"]
            records.append(record)
    return records


def run_labels(runs, labels=None):
    """The legend names of runs: labels (one per run) or the run folders' names."""
    labels = labels or [os.path.basename(os.path.normpath(run)) for run in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    return labels


def plot_curves(runs, out, labels=None, internal_fid=None):
    """
    Training loss (left) and FID proxy (right, log scale) over steps for each run, from the "loss" and
    "fid" keys of their metrics.jsonl records; internal_fid draws the data's own floor.
    """
    labels = run_labels(runs, labels)
    fig, (ax_loss, ax_fid) = plt.subplots(1, 2, figsize=(11, 4))
    any_fid = False
    for n, (run, label) in enumerate(zip(runs, labels)):
        records = read_metrics(run)
        for ax, key in ((ax_loss, "loss"), (ax_fid, "fid")):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:  # one colour per run in both panels, even when a run logged no FID
                ax.plot(*zip(*points), label=label, color=f"C{n}", marker="o" if key == "fid" else None, markersize=3)
                any_fid |= key == "fid"
    if internal_fid is not None:
        ax_fid.axhline(internal_fid, color="gray", linestyle="--", label="internal FID")
    if any_fid or internal_fid is not None:
        ax_fid.set_yscale("log")
        ax_fid.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        # Label minor ticks only on axes spanning about a decade or less (else they overlap).
        ax_fid.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
        ax_fid.legend()
    else:
        ax_fid.text(0.5, 0.5, "no FID proxy logged\n(train.py --eval-every)", ha="center", va="center",
                    transform=ax_fid.transAxes)
    ax_loss.set(xlabel="step", ylabel="training loss", title="Flow-matching loss")
    ax_fid.set(xlabel="step", ylabel="FID proxy", title="FID proxy")
    ax_loss.legend()
    _save(fig, out)


# Panel titles of train.py's gradient groups (metrics.jsonl "grad_norm_max_by_group").
GRADIENT_GROUP_TITLES = {"pde": "PDE coefficients (K, b, r, tau)", "mixer": "rest of the spatial mixers",
                         "other": "everything else"}


def logs_gradient_groups(run):
    """Whether the run's metrics.jsonl has per-group gradient maxima (train.py's gradient groups)."""
    return any("grad_norm_max_by_group" in record for record in read_metrics(run))


def plot_gradient_norms(runs, out, labels=None):
    """
    The largest gradient norm of every logging interval (before clipping) over steps, log scale: of all
    parameters (metrics.jsonl "grad_norm_max") and of each parameter group ("grad_norm_max_by_group"),
    one panel each, one colour per run. A group that a run lacks (DiT has no PDE coefficients) has no
    line in that panel.
    """
    labels = run_labels(runs, labels)
    records = [read_metrics(run) for run in runs]
    groups = list(dict.fromkeys(name for rs in records for r in rs for name in r.get("grad_norm_max_by_group", {})))
    if not groups:
        raise ValueError(f"no gradient-group maxima in the metrics.jsonl of {runs}: train.py logs "
                         "grad_norm_max_by_group per log interval")
    fig, axes = plt.subplots(1, 1 + len(groups), figsize=(4.2 * (1 + len(groups)), 3.8), sharex=True, sharey=True)
    for ax, group in zip(axes, [None] + groups):
        for n, (rs, label) in enumerate(zip(records, labels)):
            trained = [r for r in rs if "loss" in r]
            maxima = [r.get("grad_norm_max") if group is None else r.get("grad_norm_max_by_group", {}).get(group)
                      for r in trained]
            points = [(r["step"], m) for r, m in zip(trained, maxima) if m is not None]
            if points:
                ax.plot(*zip(*points), label=label, color=f"C{n}", linewidth=1)
        ax.set(xlabel="step", yscale="log",
               title="all parameters" if group is None else GRADIENT_GROUP_TITLES.get(group, group))
    axes[0].set_ylabel("largest gradient norm per log interval")
    axes[0].legend(fontsize="small")
    _save(fig, out)


def _save(fig, out):
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="PNG figures of trained runs: kernels, SSM maps, training curves, gradient norms.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("kernels", "learned PDE-SSM kernels, one row per block (Figure 1)"),
                            ("ssm-maps", "what each PDE-SSM block makes of input images (Figure 6)")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--ckpt", type=str, required=True, help="a train.py checkpoint of a PDESSM-DiT")
        sub.add_argument("--weights", type=str, choices=["ema", "model"], default="ema",
                         help="which weights of the checkpoint to use")
        sub.add_argument("--out", type=str, default=f"{name}.png", help="PNG to write")
    kernels = commands.choices["kernels"]
    kernels.add_argument("--count", type=int, default=6, help="kernels per block")
    maps = commands.choices["ssm-maps"]
    maps.add_argument("--images", type=str, required=True,
                      help="an image file, image folder, npz (arr_0) or CIFAR-10/Fashion-MNIST folder")
    maps.add_argument("--split", type=str, choices=["train", "test"], default="test",
                      help="split of a CIFAR-10 or Fashion-MNIST folder")
    maps.add_argument("--num-images", type=int, default=2, help="how many of the images to show, one per row")
    maps.add_argument("--t", type=float, default=1.0, help="flow time the image is given at (1 = clean data)")
    maps.add_argument("--blocks", type=int, nargs="+", default=None, help="block indices (default: all)")
    for name, help_text in (("curves", "loss and FID proxy over steps of runs (Figure 3)"),
                            ("gradients", "largest gradient norm per log interval, by parameter group")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("runs", type=str, nargs="+", help="run folders (or metrics.jsonl files)")
        sub.add_argument("--labels", type=str, nargs="+", default=None, help="legend names (default: folder names)")
        sub.add_argument("--out", type=str, default=f"{name}.png", help="PNG to write")
    commands.choices["curves"].add_argument("--internal-fid", type=float, default=None,
                                            help="the data's internal FID (evaluate.py --internal), drawn as the floor")
    main(parser.parse_args())
