"""
Encode a dataset with the VAE once, so latent-space training reads latents instead of encoding every step.

    python extract_features.py --dataset imagefolder --data-path /data/imagenet/train --image-size 256
    python train.py --dataset npz --data-path data/imagefolder-train-256-latents.npz --space latent --image-size 256

Writes one .npz with "latents" float32 (N, C, image-size/8, image-size/8), already multiplied by the
VAE scale 0.18215, and "labels" int64 (N,). Each latent is one draw of the VAE posterior from a
generator seeded with --seed; no random flips are applied.
"""
import argparse
import os

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import checkpoint
import datasets


def main(args):
    """Encode and save; returns the npz path."""
    if args.image_size % 8:
        raise ValueError(f"--image-size {args.image_size} must be divisible by 8 (the VAE downsamples 8x)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dataset = datasets.build_dataset(args.dataset, args.data_path, args.image_size, split=args.split,
                                     download=args.download, flip=False)
    if isinstance(dataset, datasets.LatentDataset):
        raise ValueError(f"{args.data_path} already holds latents")
    vae = checkpoint.load_vae(args.vae, args.vae_path, device)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    generator = torch.Generator(device).manual_seed(args.seed)
    latents, labels = [], []
    for x, y in tqdm(loader, desc=f"encoding {args.dataset}", dynamic_ncols=True):
        latents.append(checkpoint.encode(vae, x.to(device), generator).float().cpu().numpy())
        labels.append(y.numpy())
    out = args.out or os.path.join("data", f"{args.dataset}-{args.split}-{args.image_size}-latents.npz")
    with checkpoint.atomic_write(out) as f:  # a long encoding never leaves half a file
        np.savez(f, latents=np.concatenate(latents), labels=np.concatenate(labels).astype(np.int64))
    print(f"Saved {len(dataset):,} latents of shape {latents[0].shape[1:]} with labels to {out}")
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=str, choices=datasets.DATASETS, default="imagefolder", help="data source")
    parser.add_argument("--data-path", type=str, default=None, help="where the dataset lives (see train.py)")
    parser.add_argument("--download", action="store_true", help="download CIFAR-10 into --data-path if missing")
    parser.add_argument("--split", type=str, choices=["train", "test"], default="train", help="dataset split")
    parser.add_argument("--image-size", type=int, default=256, help="image side in pixels (latents are 1/8 of it)")
    parser.add_argument("--vae", type=str, choices=["ema", "mse"], default="ema", help="stabilityai/sd-vae-ft-{ema,mse}")
    parser.add_argument("--vae-path", type=str, default=None, help="local folder of the VAE (no network needed)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per VAE batch")
    parser.add_argument("--num-workers", type=int, default=4, help="data loader workers")
    parser.add_argument("--seed", type=int, default=0, help="seed of the posterior draws")
    parser.add_argument("--out", type=str, default=None,
                        help="output .npz (default: data/<dataset>-<split>-<image-size>-latents.npz)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
