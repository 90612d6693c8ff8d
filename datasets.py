"""
The one data factory: every script gets its images through build_dataset.

Each dataset yields (image, label): image a float tensor (C, H, W) in [-1, 1], label a long
(0 where a dataset has no labels). Pre-extracted VAE latents (an npz with a "latents" key, written
by extract_features.py) are the exception: they are yielded as stored, already scaled.

    imagefolder    class sub-folders of images; DiT's ADM-style center crop to image_size
    cifar10        torchvision's CIFAR-10 folder (cifar-10-batches-py/), --download where there is internet
    npz            "arr_0" uint8 (N, H, W, C) (ADM's format) with optional "labels"/"arr_1",
                   or "latents" float (N, C, h, w) with optional "labels"
    digits         scikit-learn's 1,797 real 8x8 handwritten digits (values 0..16), 10 classes, no download
    fashion-mnist  the four IDX files of Fashion-MNIST (Debian: apt-get install dataset-fashion-mnist),
                   28x28 padded to 32x32 with background zeros, 10 classes, train/test splits

Random horizontal flips (DiT's augmentation) are applied by default to the train split of natural
images (imagefolder, cifar10, npz images), never to digits or Fashion-MNIST, whose orientation is
part of the class.
"""
import functools
import gzip
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import CIFAR10, ImageFolder


DATASETS = ("imagefolder", "cifar10", "npz", "digits", "fashion-mnist")
FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"  # where the Debian package puts the files
CIFAR10_PATH = os.path.join("data", "cifar10")

# IDX format (LeCun's MNIST files): two zero bytes, a type code, the number of dimensions,
# then one big-endian uint32 per dimension and the data in row-major order.
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


#################################################################################
#                              Array-backed datasets                            #
#################################################################################

class ArrayDataset(Dataset):
    """
    Images held in memory as an array (N, C, H, W) with values in [0, max_value], labels (N,).
    Each item is scaled to [-1, 1], resized bilinearly to image_size when that differs from the
    stored size, and flipped horizontally with probability 1/2 when flip is set.
    """

    def __init__(self, images, labels, max_value=255, image_size=None, flip=False):
        if images.ndim != 4 or images.shape[2] != images.shape[3]:
            raise ValueError(f"expected square images of shape (N, C, H, H), got {tuple(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = torch.as_tensor(images)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.max_value = max_value
        self.image_size = images.shape[2] if image_size is None else image_size
        self.flip = flip
        self.classes = list(range(int(self.labels.max()) + 1)) if len(labels) else []

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        x = self.images[index].float() * (2.0 / self.max_value) - 1.0
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x[None], size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)[0]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[index]


class LatentDataset(Dataset):
    """Pre-extracted VAE latents (N, C, h, w), already multiplied by the VAE scale, with labels (N,)."""

    def __init__(self, latents, labels):
        if len(labels) != len(latents):
            raise ValueError(f"{len(latents)} latents but {len(labels)} labels")
        self.latents = torch.as_tensor(latents, dtype=torch.float32)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.classes = list(range(int(self.labels.max()) + 1)) if len(labels) else []

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, index):
        return self.latents[index], self.labels[index]


#################################################################################
#                               File formats                                    #
#################################################################################

def read_idx(path):
    """
    Read an IDX file (gzip-compressed or raw) into a numpy array of the shape its header gives.
    Raises ValueError naming the file for a wrong magic number, an unknown type code, or a data
    size that does not match the header (a truncated download).
    """
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # a truncated gzip stream
        raise ValueError(f"{path}: cannot decompress ({e}); the file is damaged, download it again") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic number {data[:4].hex() or 'missing'}, "
                         "expected 0000 followed by a type code and the number of dimensions)")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}; expected one of "
                         f"{', '.join(f'0x{c:02x}' for c in IDX_DTYPES)}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: header announces {ndim} dimensions but the file ends after {len(data)} bytes")
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[code])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: header gives shape {shape} ({expected} bytes) but the file has "
                         f"{len(data)} bytes; the file is truncated or damaged")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(data_path, name):
    """The path of IDX file `name` (e.g. train-images-idx3-ubyte) under data_path, or None."""
    for folder in (data_path, os.path.join(data_path, "FashionMNIST", "raw"), os.path.join(data_path, "raw")):
        for filename in (name + ".gz", name):
            if os.path.isfile(os.path.join(folder, filename)):
                return os.path.join(folder, filename)
    return None


def pad_fashion_mnist(images):
    """(N, 28, 28) uint8 -> (N, 32, 32): two pixels of the zero background on every side."""
    return np.pad(images, ((0, 0), (2, 2), (2, 2)))


def load_fashion_mnist(data_path=None, split="train"):
    """
    Fashion-MNIST as (images uint8 (N, 28, 28), labels int64 (N,)): N = 60,000 for split "train",
    10,000 for "test". data_path holds the four IDX files (.gz or raw), directly or in torchvision's
    FashionMNIST/raw layout; default FASHION_MNIST_PATH.
    """
    data_path = FASHION_MNIST_PATH if data_path is None else data_path
    if split not in ("train", "test"):
        raise ValueError(f"Fashion-MNIST has splits 'train' and 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    paths = [_find_idx(data_path, f"{prefix}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    if None in paths:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files ({prefix}-images-idx3-ubyte.gz, {prefix}-labels-idx1-ubyte.gz) "
            f"not found in {data_path} (nor in its FashionMNIST/raw/). Install them with "
            "`apt-get install dataset-fashion-mnist` (they go to /usr/share/datasets/fashion-mnist) "
            "or pass --data-path to the folder that holds them.")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise ValueError(f"{paths[0]} and {paths[1]}: expected images (N, 28, 28) and labels (N,), "
                         f"got {images.shape} and {labels.shape}")
    return images, labels.astype(np.int64)


def center_crop_arr(pil_image, image_size):
    """
    ADM's center crop (used by DiT): halve with a box filter while the short side is at least twice
    image_size, resize bicubically so the short side equals image_size, then crop the center square.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


def _npz_dataset(data_path, image_size, flip):
    """An npz of uint8 images (ADM's arr_0, NHWC) or of float latents ("latents", NCHW), labels optional."""
    if not os.path.isfile(data_path):
        raise FileNotFoundError(f"npz file {data_path} not found; pass --data-path to an .npz file")
    with np.load(data_path) as f:
        labels = f["labels"] if "labels" in f else f["arr_1"] if "arr_1" in f else None
        if "latents" in f:
            latents = f["latents"]
            if latents.ndim != 4:
                raise ValueError(f"{data_path}: 'latents' must be (N, C, h, w), got shape {latents.shape}")
            if image_size is not None and latents.shape[-1] * 8 != image_size:
                raise ValueError(f"{data_path} holds {latents.shape[-1]}x{latents.shape[-1]} latents, i.e. "
                                 f"{latents.shape[-1] * 8}px images, but image_size is {image_size}")
            return LatentDataset(latents, np.zeros(len(latents)) if labels is None else labels)
        if "arr_0" not in f:
            raise ValueError(f"{data_path} has keys {list(f.keys())}; expected 'arr_0' (uint8 images, N x H x W x C) "
                             "or 'latents' (from extract_features.py)")
        images = f["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{data_path}: 'arr_0' must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    labels = np.zeros(len(images)) if labels is None else labels
    return ArrayDataset(np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels, 255, image_size, flip)


#################################################################################
#                                 The factory                                   #
#################################################################################

def build_dataset(name, data_path=None, image_size=None, split="train", download=False, flip=None):
    """
    The dataset `name` (one of DATASETS) as a torch Dataset of (image (C, H, W) in [-1, 1], label).

    image_size None keeps the native size (digits 8, cifar10 32, fashion-mnist 32 after padding,
    npz as stored); imagefolder needs it. split is "train" or "test" (digits has only "train").
    flip None applies DiT's random horizontal flip to the train split of natural images.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    natural = name in ("imagefolder", "cifar10", "npz")
    flip = (natural and split == "train") if flip is None else flip
    if name in ("imagefolder", "npz") and data_path is None:
        raise ValueError(f"dataset {name!r} needs --data-path")

    if name == "digits":
        from sklearn.datasets import load_digits
        if split != "train":
            raise ValueError(f"digits has a single split 'train' (all 1,797 images), got {split!r}")
        digits = load_digits()
        return ArrayDataset(digits.images[:, None].astype(np.float32), digits.target, 16, image_size, flip)

    if name == "fashion-mnist":
        images, labels = load_fashion_mnist(data_path, split)
        return ArrayDataset(pad_fashion_mnist(images)[:, None], labels, 255, image_size, flip)

    if name == "npz":
        return _npz_dataset(data_path, image_size, flip)

    if name == "imagefolder" and image_size is None:
        raise ValueError("dataset 'imagefolder' needs image_size (--image-size)")
    steps = [transforms.RandomHorizontalFlip()] if flip else []
    steps += [transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]
    if name == "imagefolder":
        if not os.path.isdir(data_path):
            raise FileNotFoundError(f"image folder {data_path} not found; pass --data-path to a folder "
                                    "with one sub-folder of images per class")
        crop = transforms.Lambda(functools.partial(center_crop_arr, image_size=image_size))
        return ImageFolder(data_path, transform=transforms.Compose([crop] + steps))

    data_path = CIFAR10_PATH if data_path is None else data_path
    if image_size not in (None, 32):
        steps.insert(0, transforms.Resize(image_size))
    try:
        return CIFAR10(data_path, train=split == "train", download=download, transform=transforms.Compose(steps))
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
        raise FileNotFoundError(f"CIFAR-10 not found in {data_path} (expected {data_path}/cifar-10-batches-py/); "
                                "pass --data-path to the folder that holds it, or --download where there "
                                "is internet") from e
