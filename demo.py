"""
The demo behind `make demo`: the tiny DiT and the tiny PDE-SSM-DiT, trained the same way (config, seed,
steps) on scikit-learn's 1,797 real 8x8 handwritten digits resized to 16x16, on a CPU in about ten
minutes together, then compared on class-conditional samples from the shared sampler:

    (a) the accuracy of a classifier trained on real digits (an SVM on 8x8 pixels) on the samples of
        each conditioning class: does a sample of class k look like a k?
    (b) the Frechet distance between generated and real digits in pixel space (16x16 = 256 features).

Writes to results/demo/: <model>.png sample grids (one row per class), loss.png (both training curves),
results.md (the side-by-side table, also printed), and the two run folders train.py made. Running it
again continues from the runs' checkpoints instead of starting over.
"""
import argparse
import os
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC
from torchvision.utils import save_image

import checkpoint
import datasets
import sample
import train
from evaluate import frechet_distance
from visualize import read_metrics

MODELS = ("DiT-T/2", "PDESSM-DiT-T/2")
IMAGE_SIZE = 16
NUM_CLASSES = 10


def main(args):
    # One thread: these small kernels gain little from a second one, and on a busy machine threads that
    # wait for each other slow training down many times over. The run time stays predictable.
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    real = datasets.build_dataset("digits", image_size=IMAGE_SIZE)
    real_images = torch.stack([real[i][0] for i in range(len(real))])
    real_labels = real.labels
    classifier, real_accuracy = fit_classifier(real_images, real_labels, args.seed)
    # The floor of (b): two disjoint halves of the real digits are this far apart at this sample size.
    halves = torch.randperm(len(real_images), generator=torch.Generator().manual_seed(args.seed)).chunk(2)
    real_fd = pixel_frechet_distance(real_images[halves[0]], real_images[halves[1]])

    results = {}
    for name in MODELS:
        start = time.time()
        run_dir = train.main(train.parse_args([
            "--model", name, "--dataset", "digits", "--image-size", str(IMAGE_SIZE), "--num-classes", str(NUM_CLASSES),
            "--max-steps", str(args.steps), "--global-batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--ema-decay", str(args.ema_decay), "--global-seed", str(args.seed), "--num-workers", "0",
            "--log-every", str(log_every(args)), "--ckpt-every", str(max(args.steps // 4, 1)), "--sample-every", "0",
            "--run-dir", os.path.join(args.out, name.replace("/", "-")), "--resume", "auto"]))
        train_time = time.time() - start
        model, state = checkpoint.load_model(checkpoint.checkpoint_path(run_dir, args.steps), "cpu")

        labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
        z = torch.randn(len(labels), 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(args.seed))
        print(f"Sampling {len(labels)} digits from {name} ({args.sampler}, {args.num_sampling_steps} steps)")
        start = time.time()
        images = torch.cat([sample.generate(model, zb, yb, args.cfg_scale, args.sampler, args.num_sampling_steps,
                                            progress=True) for zb, yb in zip(z.split(250), labels.split(250))])
        sample_time = time.time() - start

        grid = images.reshape(NUM_CLASSES, args.per_class, 1, IMAGE_SIZE, IMAGE_SIZE)[:, :10].flatten(0, 1)
        grid_path = os.path.join(args.out, name.replace("/", "-") + ".png")
        # Up to ten per class, one row per digit, each pixel shown as 4x4 so the 16x16 samples are visible.
        save_image(F.interpolate(grid, scale_factor=4, mode="nearest"), grid_path, nrow=min(args.per_class, 10),
                   padding=4, normalize=True, value_range=(-1, 1))
        predicted = classifier.predict(pooled(images))
        results[name] = dict(
            params=sum(p.numel() for p in model.parameters()), steps=state["step"], train_time=train_time,
            recipe=state["args"],  # the flags its checkpoint was trained with, which a rerun may not repeat
            sample_time=sample_time, grid=grid_path, run_dir=run_dir,
            accuracy=[float(np.mean(predicted[labels.numpy() == k] == k)) for k in range(NUM_CLASSES)],
            overall=float(np.mean(predicted == labels.numpy())), fd=pixel_frechet_distance(images, real_images))
        print(f"{name}: wrote {grid_path}")

    plot_losses(results, os.path.join(args.out, "loss.png"), log_every(args))
    table = results_table(results, real_accuracy, real_fd, args)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"Wrote {args.out}/results.md, {args.out}/loss.png and the sample grids "
          + ", ".join(r["grid"] for r in results.values()))


def pooled(images):
    """(N, 1, 16, 16) images in [-1, 1] -> (N, 64): averaged back to the digits' native 8x8 grid."""
    return F.avg_pool2d(images, IMAGE_SIZE // 8).flatten(1).numpy()


def fit_classifier(images, labels, seed):
    """An RBF SVM on the 8x8 pooled real digits; returns it refit on all of them, and its held-out accuracy."""
    x, y = pooled(images), labels.numpy()
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    held_out = SVC(C=10, gamma="scale").fit(x_train, y_train).score(x_test, y_test)
    return SVC(C=10, gamma="scale").fit(x, y), float(held_out)


def pixel_frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to two image sets (N, C, H, W), one feature per pixel."""
    a, b = a.flatten(1).double().numpy(), b.flatten(1).double().numpy()
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def log_every(args):
    """Training steps between logged losses: 25, or every step of a shorter run."""
    return max(1, min(25, args.steps))


def plot_losses(results, path, interval):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, r in results.items():
        points = [(rec["step"], rec["loss"]) for rec in read_metrics(r["run_dir"]) if "loss" in rec]
        ax.plot(*zip(*points), label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"flow-matching loss (mean of {interval} steps)")
    ax.set_title("Training on digits (16x16)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_table(results, real_accuracy, real_fd, args):
    names = list(results)
    rows = [("parameters", [f"{results[n]['params']:,}" for n in names], "")]
    rows.append(("training steps", [str(results[n]["steps"]) for n in names], ""))
    rows += [(label, [fmt.format(results[n]["recipe"][key]) for n in names], "")
             for label, key, fmt in (("batch", "global_batch_size", "{}"), ("learning rate", "lr", "{:g}"),
                                     ("EMA decay", "ema_decay", "{:g}"))]
    rows.append(("training time (this call)", [f"{results[n]['train_time'] / 60:.1f} min" for n in names], ""))
    rows.append((f"sampling time ({NUM_CLASSES * args.per_class} samples)",
                 [f"{results[n]['sample_time']:.0f} s" for n in names], ""))
    rows.append(("**classifier accuracy, all classes** (higher is better)",
                 [f"**{results[n]['overall']:.3f}**" for n in names], f"{real_accuracy:.3f} (held-out real)"))
    rows += [(f"accuracy, class {k}", [f"{results[n]['accuracy'][k]:.2f}" for n in names], "")
             for k in range(NUM_CLASSES)]
    rows.append(("**Frechet distance, pixels** (lower is better)", [f"**{results[n]['fd']:.2f}**" for n in names],
                 f"{real_fd:.2f} (real half vs half)"))
    lines = [f"| | {' | '.join(names)} | real digits |", "|---" * (len(names) + 2) + "|"]
    lines += [f"| {label} | {' | '.join(values)} | {ref} |" for label, values, ref in rows]
    setup = (f"Class-conditional samples: {args.per_class} per class, {args.sampler} with {args.num_sampling_steps} "
             f"steps, guidance scale {args.cfg_scale:g}, seed {args.seed}; EMA weights.")
    return "\n".join(lines) + "\n\n" + setup + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=str, default=os.path.join("results", "demo"), help="output folder")
    parser.add_argument("--steps", type=int, default=800, help="training steps of each model")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay (short runs need a short EMA)")
    parser.add_argument("--per-class", type=int, default=50, help="generated samples per class for the metrics")
    parser.add_argument("--sampler", type=str, default="heun", help="ODE integrator (euler, heun, dopri5)")
    parser.add_argument("--num-sampling-steps", type=int, default=10, help="integrator steps")
    parser.add_argument("--cfg-scale", type=float, default=2.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="seed of training, sampling and the data split")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
