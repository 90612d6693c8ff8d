"""The shared sampler, sample.py's grid, resumable sample_ddp.py, and the latent-space pipeline with a tiny VAE."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision.utils import save_image

import checkpoint
import extract_features
import sample
import sample_ddp
from test_train import two_cpu_workers
import train

TINY = ["--image-size", "8", "--global-batch-size", "8", "--num-workers", "0", "--log-every", "1",
        "--sample-every", "0", "--ema-decay", "0.5"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A class-conditional DiT-T/4 on 8x8 digits after 2 steps."""
    run_dir = tmp_path_factory.mktemp("run")
    train.main(train.parse_args(TINY + ["--model", "DiT-T/4", "--max-steps", "2", "--run-dir", str(run_dir)]))
    return checkpoint.checkpoint_path(run_dir, 2)


class ConstantVelocity(nn.Module):
    """dx/dt = c: the ODE from t = 0 to 1 moves every sample by exactly c."""
    num_classes = 0

    def __init__(self, c):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, x, t, y=None):
        return self.c.expand_as(x)


def test_generate_integrates_the_velocity():
    z = torch.linspace(-1.2, 1.2, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    for sampler in ("euler", "heun"):
        out = sample.generate(ConstantVelocity(0.25), z, sampler=sampler, num_steps=3)
        torch.testing.assert_close(out, (z + 0.25).clamp(-1, 1))


class LinearVelocity(nn.Module):
    """v = a x through a 1x1 convolution, which bf16 autocast runs in bf16."""
    num_classes = 0

    def __init__(self, a):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        nn.init.eye_(self.conv.weight[:, :, 0, 0])
        self.conv.weight.data *= a

    def forward(self, x, t, y=None):
        return self.conv(x)


def test_generate_in_bf16_follows_the_exponential():
    """dx/dt = a x gives x(1) = e^a z; Heun with 50 steps in fp32 matches to ~1e-6, in bf16 autocast to
    bf16's ~1e-2, and the bf16 run really evaluated the network in bf16 (it differs from fp32)."""
    z = torch.linspace(-0.5, 0.5, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    model, want = LinearVelocity(0.5), z * math.exp(0.5)
    fp32 = sample.generate(model, z, sampler="heun", num_steps=50)
    bf16 = sample.generate(model, z, sampler="heun", num_steps=50, precision="bf16")
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(fp32, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bf16, want, rtol=2e-2, atol=2e-3)
    assert (bf16 - fp32).abs().max() > 1e-5
    with pytest.raises(ValueError, match="unknown sampling precision 'fp16'"):
        sample.generate(model, z, precision="fp16")


def test_to_uint8_matches_save_image(tmp_path):
    images = torch.rand(2, 3, 5, 5) * 2.2 - 1.1
    save_image(images[1], tmp_path / "one.png", normalize=True, value_range=(-1, 1))
    np.testing.assert_array_equal(sample.to_uint8(images)[1], np.array(Image.open(tmp_path / "one.png")))


def test_sample_grid_layout(tmp_path, ckpt):
    out = tmp_path / "grid.png"
    sample.main(sample.parse_args(["--ckpt", ckpt, "--out", str(out), "--num-sampling-steps", "2",
                                   "--class-labels", "1", "7", "--per-class", "3"]))
    # save_image pads 2 px around each 8x8 tile: 3 columns x 2 rows.
    assert Image.open(out).size == (3 * 10 + 2, 2 * 10 + 2)


def test_sample_ddp_writes_npz_and_resumes(tmp_path, ckpt):
    flags = ["--ckpt", ckpt, "--sample-dir", str(tmp_path), "--num-samples", "10", "--per-proc-batch-size", "4",
             "--num-sampling-steps", "2", "--sampler", "euler"]
    npz = sample_ddp.main(sample_ddp.parse_args(flags))
    with np.load(npz) as f:
        images, labels = f["arr_0"], f["labels"]
        np.testing.assert_array_equal(f["arr_1"], labels)
    assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert images.std() > 0

    folder = npz[:-len(".npz")]
    pngs = [f"{i:06d}.png" for i in range(10)]
    assert sorted(os.listdir(folder)) == pngs + [sample_ddp.RECORD]
    old = 1_000_000_000  # mark the kept files with an old mtime: a rewrite would change it
    for name in pngs:
        os.utime(os.path.join(folder, name), (old, old))
    for i in (5, 9):  # one in a partly done block, one a whole block
        os.remove(os.path.join(folder, f"{i:06d}.png"))

    sample_ddp.main(sample_ddp.parse_args(flags))
    for i, name in enumerate(pngs):
        assert (os.stat(os.path.join(folder, name)).st_mtime == old) == (i not in (5, 9))
    with np.load(npz) as f:
        np.testing.assert_array_equal(f["arr_0"], images)  # the redone samples are the same as before


def test_a_resumed_run_deals_out_only_the_unfinished_blocks(tmp_path):
    # 8 samples in blocks of 2, first dealt to 2 ranks as [0, 1], [4, 5] to rank 0 and [2, 3], [6, 7] to
    # rank 1; rank 1 stopped after writing 3. Rank 1's two unfinished blocks are now one for each rank.
    for i in (0, 1, 3, 4, 5):
        Image.new("L", (2, 2)).save(tmp_path / f"{i:06d}.png")
    todo, existing = sample_ddp.unfinished_blocks(str(tmp_path), 8, 2)
    assert todo == [range(2, 4), range(6, 8)] and existing == 5
    assert [todo[rank::2] for rank in (0, 1)] == [[range(2, 4)], [range(6, 8)]]
    # A new folder: every block, the last one shorter.
    assert sample_ddp.unfinished_blocks(str(tmp_path / "new"), 9, 4) == ([range(0, 4), range(4, 8), range(8, 9)], 0)


def test_two_workers_sample_and_resume_as_one_process(tmp_path, ckpt):
    """2 CPU workers under torchrun write the samples one process writes; after the loss of a block and a
    half (a worker's), they redo those and keep the rest."""
    flags = ["--ckpt", ckpt, "--num-samples", "8", "--per-proc-batch-size", "2", "--num-sampling-steps", "2",
             "--sampler", "euler"]
    one = sample_ddp.main(sample_ddp.parse_args(flags + ["--sample-dir", str(tmp_path / "one")]))
    two_cpu_workers("sample_ddp.py", *flags, "--sample-dir", str(tmp_path / "two"))
    two = str(tmp_path / "two" / os.path.basename(one))
    folder = two[:-len(".npz")]
    for i in (2, 6, 7):
        os.remove(os.path.join(folder, f"{i:06d}.png"))
    os.remove(two)
    two_cpu_workers("sample_ddp.py", *flags, "--sample-dir", str(tmp_path / "two"))
    with np.load(one) as a, np.load(two) as b:
        for key in ("arr_0", "labels"):
            np.testing.assert_array_equal(a[key], b[key])


def test_sample_ddp_refuses_a_folder_of_another_model(tmp_path, ckpt):
    # A run of the same folder name elsewhere, from other flags, samples into the same folder name.
    run_dir = os.path.dirname(os.path.dirname(ckpt))
    other_dir = tmp_path / os.path.basename(run_dir)
    train.main(train.parse_args(TINY + ["--model", "DiT-T/4", "--max-steps", "2", "--lr", "1e-3",
                                        "--run-dir", str(other_dir)]))
    flags = ["--sample-dir", str(tmp_path / "samples"), "--num-samples", "2", "--num-sampling-steps", "1"]
    npz = sample_ddp.main(sample_ddp.parse_args(["--ckpt", ckpt] + flags))
    with pytest.raises(ValueError, match="holds samples of .*differs from .* in training_flags"):
        sample_ddp.main(sample_ddp.parse_args(["--ckpt", checkpoint.checkpoint_path(other_dir, 2)] + flags))
    assert sample_ddp.main(sample_ddp.parse_args(["--ckpt", ckpt] + flags)) == npz  # its own model goes on


def test_sample_inputs_are_checked(tmp_path, ckpt, capsys):
    for flags in (["--per-class", "0"], ["--num-samples", "0"], ["--per-proc-batch-size", "-1"]):
        script = sample if flags[0] == "--per-class" else sample_ddp
        with pytest.raises(SystemExit):
            script.parse_args(["--ckpt", ckpt] + flags)
        assert "expected a positive integer" in capsys.readouterr().err
    for labels in (["10"], []):  # 10 classes: 0 to 9
        with pytest.raises(ValueError, match="classes 0 to 9"):
            sample.main(sample.parse_args(["--ckpt", ckpt, "--out", str(tmp_path / "grid.png"),
                                           "--num-sampling-steps", "1", "--class-labels", *labels]))


def test_latent_pipeline_with_a_local_vae(tmp_path):
    from diffusers.models import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1)
    vae.save_pretrained(tmp_path / "vae")

    # Pre-extracted latents of 16x16 digits, 8x smaller, then training and sampling on them.
    npz = extract_features.main(extract_features.parse_args(
        ["--dataset", "digits", "--image-size", "16", "--vae-path", str(tmp_path / "vae"), "--num-workers", "0",
         "--batch-size", "512", "--out", str(tmp_path / "latents.npz")]))
    with np.load(npz) as f:
        assert f["latents"].shape == (1797, 4, 2, 2) and f["latents"].dtype == np.float32
        assert f["labels"].dtype == np.int64 and f["labels"][:3].tolist() == [0, 1, 2]
    flags = ["--model", "DiT-T/1", "--image-size", "16", "--space", "latent", "--vae-path", str(tmp_path / "vae"),
             "--max-steps", "1", "--global-batch-size", "8", "--num-workers", "0", "--sample-every", "0"]
    train.main(train.parse_args(flags + ["--dataset", "npz", "--data-path", npz, "--run-dir", str(tmp_path / "a")]))
    # Encoding on the fly (grayscale digits repeated over the VAE's RGB input) builds the same network.
    train.main(train.parse_args(flags + ["--run-dir", str(tmp_path / "b")]))
    for run in ("a", "b"):
        state = checkpoint.load_checkpoint(checkpoint.checkpoint_path(tmp_path / run, 1))
        assert state["model_kwargs"]["input_size"] == 2 and state["model_kwargs"]["in_channels"] == 4

    out = tmp_path / "grid.png"
    sample.main(sample.parse_args(["--ckpt", checkpoint.checkpoint_path(tmp_path / "a", 1), "--out", str(out),
                                   "--num-sampling-steps", "1", "--class-labels", "3", "--per-class", "2"]))
    assert Image.open(out).size == (2 * 18 + 2, 18 + 2)  # decoded to 16x16 RGB


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")  # inside diffusers
def test_missing_vae_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(FileNotFoundError, match="--vae-path"):
        checkpoint.load_vae("ema", None)
    with pytest.raises(FileNotFoundError, match="--vae-path .* is not a folder"):
        checkpoint.load_vae("ema", str(tmp_path / "nowhere"))
