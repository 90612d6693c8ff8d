"""The data factory: the IDX reader, Fashion-MNIST, and that every dataset name builds with the documented items."""
import gzip
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import datasets


def write_idx(path, array, code=0x08, compress=False):
    """An IDX file written by hand from the format's definition: 0, 0, type code, ndim, big-endian dims, data."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    payload = header + array.astype({0x08: ">u1", 0x0C: ">i4"}[code]).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_uint8_and_int32(tmp_path, compress):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    write_idx(tmp_path / "images", images, compress=compress)
    out = datasets.read_idx(tmp_path / "images")
    assert out.dtype == np.uint8 and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, images)

    # Big-endian int32: 258 is stored as bytes 00 00 01 02, so a little-endian misread gives 33619968.
    values = np.array([258, -1, 7])
    write_idx(tmp_path / "values", values, code=0x0C, compress=compress)
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "values"), [258, -1, 7])


def test_read_idx_rejects_bad_files(tmp_path):
    write_idx(tmp_path / "good", np.zeros((2, 3, 3), np.uint8))
    good = (tmp_path / "good").read_bytes()

    (tmp_path / "magic").write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(ValueError, match="magic"):
        datasets.read_idx(tmp_path / "magic")

    (tmp_path / "code").write_bytes(good[:2] + b"\x42" + good[3:])
    with pytest.raises(ValueError, match="type code"):
        datasets.read_idx(tmp_path / "code")

    (tmp_path / "short").write_bytes(good[:-5])
    with pytest.raises(ValueError, match="short.*truncated"):
        datasets.read_idx(tmp_path / "short")

    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(good)
    (tmp_path / "cut.gz").write_bytes((tmp_path / "short.gz").read_bytes()[:-12])
    with pytest.raises(ValueError, match="cut.gz"):
        datasets.read_idx(tmp_path / "cut.gz")


def test_fashion_mnist_torchvision_layout_and_padding(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.full((4, 28, 28), 255, np.uint8)
    images[:, 0, 0] = 0
    write_idx(raw / "t10k-images-idx3-ubyte.gz", images, compress=True)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.array([3, 1, 4, 1], np.uint8))  # raw, not gzipped

    loaded, labels = datasets.load_fashion_mnist(tmp_path, split="test")
    assert loaded.shape == (4, 28, 28) and labels.dtype == np.int64
    dataset = datasets.build_dataset("fashion-mnist", data_path=tmp_path, split="test")
    x, y = dataset[2]
    assert x.shape == (1, 32, 32) and y.item() == 4
    # Two background (zero -> -1) pixels pad each side; the original pixel (0, 0) lands at (2, 2).
    assert (x[0, :2] == -1).all() and (x[0, :, -2:] == -1).all()
    assert x[0, 2, 2] == -1 and x[0, 2, 3] == 1 and x[0, 29, 29] == 1

    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*--data-path"):
        datasets.build_dataset("fashion-mnist", data_path=tmp_path, split="train")


@pytest.mark.skipif(not os.path.isdir(datasets.FASHION_MNIST_PATH),
                    reason=f"Fashion-MNIST not installed in {datasets.FASHION_MNIST_PATH} "
                           "(apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_files():
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = datasets.load_fashion_mnist(split=split)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        np.testing.assert_array_equal(np.bincount(labels), [n // 10] * 10)  # balanced classes
        assert labels[0] == 9  # both splits begin with an ankle boot


def test_digits_native_and_resized():
    from sklearn.datasets import load_digits
    digits = load_digits()
    native = datasets.build_dataset("digits")
    assert len(native) == 1797 and native.classes == list(range(10))
    x, y = native[17]
    np.testing.assert_allclose(x[0].numpy(), digits.images[17] / 8 - 1, atol=1e-6)
    assert y.item() == digits.target[17]

    # Bilinear upsampling blends neighbours: the values stay within the native image's range.
    resized = datasets.build_dataset("digits", image_size=16)
    up = resized[17][0]
    assert up.shape == (1, 16, 16) and resized[17][1] == y
    assert up.min() >= x.min() - 1e-6 and up.max() <= x.max() + 1e-6 and up.max() > x.max() - 0.5
    with pytest.raises(ValueError, match="single split"):
        datasets.build_dataset("digits", split="test")


def test_npz_images_and_latents(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", images, labels=np.array([0, 1, 2, 1, 0]))
    dataset = datasets.build_dataset("npz", data_path=tmp_path / "images.npz", flip=False)
    x, y = dataset[3]
    np.testing.assert_allclose(x.numpy(), images[3].transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    assert y.item() == 1 and len(dataset) == 5

    latents = rng.standard_normal((4, 4, 2, 2)).astype(np.float32)
    np.savez(tmp_path / "latents.npz", latents=latents, labels=np.arange(4))
    dataset = datasets.build_dataset("npz", data_path=tmp_path / "latents.npz", image_size=16)
    assert isinstance(dataset, datasets.LatentDataset)
    np.testing.assert_array_equal(dataset[2][0].numpy(), latents[2])
    with pytest.raises(ValueError, match="8x8|image_size is 32"):
        datasets.build_dataset("npz", data_path=tmp_path / "latents.npz", image_size=32)

    np.savez(tmp_path / "other.npz", something=np.zeros(3))
    with pytest.raises(ValueError, match="arr_0"):
        datasets.build_dataset("npz", data_path=tmp_path / "other.npz")


def test_imagefolder_center_crop(tmp_path):
    # A wide image: red | green | blue thirds. The center crop to a square keeps only green.
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        arr = np.zeros((16, 48, 3), np.uint8)
        arr[:, :16, 0] = arr[:, 16:32, 1] = arr[:, 32:, 2] = 255
        Image.fromarray(arr).save(tmp_path / cls / "a.png")
    dataset = datasets.build_dataset("imagefolder", data_path=tmp_path, image_size=8, flip=False)
    assert len(dataset) == 2 and dataset.classes == ["cats", "dogs"]
    x, y = dataset[1]
    assert x.shape == (3, 8, 8) and y == 1
    torch.testing.assert_close(x, torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 8, 8))

    with pytest.raises(ValueError, match="image_size"):
        datasets.build_dataset("imagefolder", data_path=tmp_path)


def test_missing_and_unknown(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*--download"):
        datasets.build_dataset("cifar10", data_path=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="--data-path"):
        datasets.build_dataset("imagefolder", data_path=tmp_path / "nowhere", image_size=8)
    with pytest.raises(ValueError, match="needs --data-path"):
        datasets.build_dataset("npz")
    with pytest.raises(ValueError, match="imagefolder, cifar10, npz, digits, fashion-mnist"):
        datasets.build_dataset("mnist")
