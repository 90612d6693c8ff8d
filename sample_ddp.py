"""
Sample many images from a train.py checkpoint in parallel, for FID and the other metrics of evaluate.py.

    torchrun --nproc_per_node=8 sample_ddp.py --ckpt results/000-PDESSM-DiT-S-2/checkpoints/0400000.pt

Sample i gets class label i % num_classes and noise seeded by (--global-seed, i), so the set does not
depend on the number of processes. Batches are fixed blocks of indices; the blocks that still lack a
PNG are dealt round-robin to the ranks, so an interrupted run resumes where it stopped, with its ranks
sharing what is left evenly, and produces exactly what one uninterrupted run would. Writes
<sample-dir>/<name>/<index:06d>.png and <sample-dir>/<name>.npz with "arr_0" uint8 (N, H, W, C) (ADM's
format) and, for a class-conditional model, the labels int64 (N,) as "arr_1" and "labels".
<name>/sampling.json records the checkpoint (step and training flags) and VAE folder the images come
from; a folder that records another model is refused rather than mixed into.
"""
import argparse
import json
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import flow
from checkpoint import atomic_write
import sample
from train import cleanup_distributed, setup_distributed


def sample_noise(seed, indices, noise_shape):
    """Noise (len(indices), *noise_shape) where row k depends only on (seed, indices[k])."""
    return torch.stack([torch.randn(noise_shape, generator=torch.Generator().manual_seed(sample.seed_for(seed, i)))
                        for i in indices])


def png_path(folder, index):
    return os.path.join(folder, f"{index:06d}.png")


def save_png(array, path):
    """Write one uint8 (H, W, C) image; the rename makes a half-written PNG impossible to mistake for a done one."""
    with atomic_write(path, durable=False) as f:
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(f, format="PNG")


def load_png(path):
    """One PNG as uint8 (H, W, C), C = 1 for grayscale."""
    array = np.array(Image.open(path))
    return array[..., None] if array.ndim == 2 else array


def unfinished_blocks(folder, num_samples, block_size):
    """The blocks of block_size consecutive sample indices (the last one shorter where block_size does not
    divide num_samples) with a PNG missing from folder, in order, and the number of PNGs present."""
    present = [os.path.isfile(png_path(folder, i)) for i in range(num_samples)]
    blocks = [range(s, min(s + block_size, num_samples)) for s in range(0, num_samples, block_size)]
    return [block for block in blocks if not all(present[i] for i in block)], sum(present)


# A sample folder's record of what its images come from beyond its name: the checkpoint's step and
# training flags, and the VAE folder that decodes them.
RECORD = "sampling.json"


def check_sample_record(folder, args, state):
    """The record of folder's samples for this checkpoint and these flags; ValueError when the folder
    already records another (its images are another model's: a run of the same folder name from other
    flags or another --results-dir, or another --vae-path)."""
    record = json.loads(json.dumps({"checkpoint": os.path.abspath(args.ckpt), "step": state["step"],
                                    "training_flags": state["args"], "vae_path": args.vae_path}))
    path = os.path.join(folder, RECORD)
    if os.path.isfile(path):
        with open(path) as f:
            held = json.load(f)
        diffs = [key for key in ("step", "training_flags", "vae_path") if held.get(key) != record[key]]
        if diffs:
            raise ValueError(f"{folder} holds samples of {held.get('checkpoint')}, which differs from {args.ckpt} "
                             f"in {', '.join(diffs)}; pass another --sample-dir, or remove the folder to sample "
                             "it anew")
    return record


def main(args):
    """Sample, save the PNGs and the npz; returns the npz path."""
    joined_before = dist.is_initialized()
    rank, world_size, device = setup_distributed()
    try:
        model, vae, state, noise_shape = sample.load_sampling_model(args.ckpt, device, args.vae_path)
        num_classes = model.num_classes
        if num_classes == 0 and args.cfg_scale != 1.0:
            raise ValueError(f"the model is unconditional (num_classes=0): pass --cfg-scale 1, got {args.cfg_scale}")
        run = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt))))
        name = (f"{run}-{state['step']:07d}-{args.sampler}-{args.num_sampling_steps}-cfg-{args.cfg_scale:g}"
                f"-seed-{args.global_seed}" + ("" if args.precision == "fp32" else f"-{args.precision}"))
        folder = os.path.join(args.sample_dir, name)
        # Every rank checks the folder's record before rank 0 may write it, so a mismatch stops them all, and
        # takes its share of the unfinished blocks before any rank writes a PNG, so all deal the same blocks.
        record = check_sample_record(folder, args, state)
        todo, existing = unfinished_blocks(folder, args.num_samples, args.per_proc_batch_size)
        if rank == 0:
            os.makedirs(folder, exist_ok=True)
            with atomic_write(os.path.join(folder, RECORD), "w", durable=False) as f:
                json.dump(record, f, indent=1)
        if dist.is_initialized():
            dist.barrier()

        for block in tqdm(todo[rank::world_size], desc=f"sampling {name}", disable=rank != 0, dynamic_ncols=True):
            missing = [i for i in block if not os.path.isfile(png_path(folder, i))]
            labels = torch.tensor([i % num_classes for i in block], device=device) if num_classes else None
            z = sample_noise(args.global_seed, block, noise_shape).to(device)
            images = sample.to_uint8(sample.generate(model, z, labels, args.cfg_scale, args.sampler,
                                                     args.num_sampling_steps, vae, precision=args.precision))
            for i in missing:
                save_png(images[i - block.start], png_path(folder, i))
        if dist.is_initialized():
            dist.barrier()

        if rank == 0:
            arrays = {"arr_0": np.stack([load_png(png_path(folder, i)) for i in range(args.num_samples)])}
            if num_classes:
                arrays["arr_1"] = arrays["labels"] = np.arange(args.num_samples, dtype=np.int64) % num_classes
            with atomic_write(folder + ".npz") as f:
                np.savez(f, **arrays)
            print(f"Kept {existing} existing and wrote {args.num_samples - existing} new samples in {folder}/; "
                  f"saved {folder}.npz with arr_0 uint8 {arrays['arr_0'].shape}"
                  + (f" and labels int64 ({args.num_samples},) as arr_1 and labels" if num_classes else ""))
        return folder + ".npz"
    finally:
        cleanup_distributed(joined_before)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=str, required=True, help="checkpoint written by train.py (its EMA weights are used)")
    parser.add_argument("--vae-path", type=str, default=None,
                        help="local VAE folder for a latent-space checkpoint (default: the VAE it was trained with)")
    parser.add_argument("--sample-dir", type=str, default="samples", help="where the sample folder and .npz go")
    parser.add_argument("--num-samples", type=sample.positive_int, default=50_000,
                        help="number of samples (50K for FID)")
    parser.add_argument("--per-proc-batch-size", type=sample.positive_int, default=32,
                        help="samples per forward batch on each process")
    parser.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (DiT's FID setting)")
    parser.add_argument("--sampler", type=str, choices=flow.METHODS, default="heun", help="ODE integrator")
    parser.add_argument("--num-sampling-steps", type=int, default=50, help="integrator steps (ignored by dopri5)")
    parser.add_argument("--global-seed", type=int, default=0, help="seed of the per-sample noise")
    parser.add_argument("--precision", type=str, choices=list(sample.PRECISIONS), default="fp32",
                        help="network precision while sampling (bf16: autocast, the precision of bf16 training; "
                             "the sample folder's name says which)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
