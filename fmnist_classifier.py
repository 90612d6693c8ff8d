"""
A small CNN classifier for Fashion-MNIST, and its features as a torch-fidelity feature extractor.

Inception was trained on 299 px ImageNet photographs; on 28x28 grayscale clothes its features say
little, and its weights cannot be downloaded everywhere. This net is trained here, with a fixed seed,
on the Fashion-MNIST train split (never downloaded), and cached. Its head is ...->128->64->10, so two
feature layers exist: "128" and the penultimate "64" (the paper's Table 7 reports FID on 64 features).
evaluate.py uses it as `--features fmnist`; `class_accuracy` checks class-conditional samples.

    python fmnist_classifier.py --data-path /usr/share/datasets/fashion-mnist

trains (about ten minutes on two CPU cores), reports the test accuracy and writes
results/fmnist_classifier.pt; a second run reads the cached file instead of training again.
"""
import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from tqdm import tqdm

from datasets import load_fashion_mnist


DEFAULT_CHECKPOINT = os.path.join("results", "fmnist_classifier.pt")
EXTRACTOR_NAME = "fmnist-classifier"
IMAGE_SIZE = 32


def main(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.time()
    model, accuracy = ensure_classifier(args.out, args.data_path, epochs=args.epochs, batch_size=args.batch_size,
                                        lr=args.lr, seed=args.seed, device=device)
    print(f"Fashion-MNIST classifier {args.out}: test accuracy {100 * accuracy:.2f}% "
          f"({sum(p.numel() for p in model.parameters()):,} parameters, {time.time() - start:.0f} s)")


#################################################################################
#                                   The network                                 #
#################################################################################

def to_classifier_input(images):
    """
    uint8 images (B, C, H, W), C in {1, 3}, to the classifier's input (B, 1, 32, 32) in [-1, 1].

    The datasets.py convention for Fashion-MNIST: one channel, 28x28 padded with black to 32x32.
    RGB becomes gray by the channel mean (exact for gray images stored as three equal channels);
    other sizes are resized to 32x32.
    """
    if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.dim() == 4
            and images.shape[1] in (1, 3)):
        raise ValueError(f"expected uint8 images of shape (B, 1 or 3, H, W), got "
                         f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")
    x = images.float().mean(dim=1, keepdim=True)
    if x.shape[-2:] == (28, 28):
        x = F.pad(x, (2, 2, 2, 2), value=0.0)
    elif x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x / 127.5 - 1.0


def conv_bn_relu(c_in, c_out):
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class FashionMNISTClassifier(nn.Module):
    """
    Conv trunk (32 -> 16 -> 8 -> 4 px) and a head flatten -> 128 -> 64 -> 10.

    `features` returns the 128- and 64-wide layers after their batch norm and before the ReLU: no unit
    is constantly zero, so feature covariances stay full rank, and every feature has about unit
    variance on real data, so FID and KID have a fixed scale (the polynomial kernel of KID explodes on
    features of arbitrary size).
    """
    def __init__(self, widths=(16, 32, 64), num_classes=10, dropout=0.25):
        super().__init__()
        c1, c2, c3 = widths
        self.trunk = nn.Sequential(
            *conv_bn_relu(1, c1), nn.MaxPool2d(2),
            *conv_bn_relu(c1, c2), *conv_bn_relu(c2, c2), nn.MaxPool2d(2),
            *conv_bn_relu(c2, c3), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.fc128 = nn.Sequential(nn.Linear(c3 * (IMAGE_SIZE // 8) ** 2, 128, bias=False), nn.BatchNorm1d(128))
        self.fc64 = nn.Sequential(nn.Linear(128, 64, bias=False), nn.BatchNorm1d(64))
        self.head = nn.Linear(64, num_classes)
        self.dropout = nn.Dropout(dropout)
        self.widths = tuple(widths)

    def features(self, x):
        """x: (B, 1, 32, 32) in [-1, 1] -> {"128": (B, 128), "64": (B, 64), "logits": (B, 10)}."""
        f128 = self.fc128(self.dropout(self.trunk(x)))
        f64 = self.fc64(self.dropout(F.relu(f128)))
        return {"128": f128, "64": f64, "logits": self.head(F.relu(f64))}

    def forward(self, x):
        return self.features(x)["logits"]


def load_classifier(path=DEFAULT_CHECKPOINT, device="cpu"):
    """The cached classifier at `path`, in eval mode; a FileNotFoundError says how to make it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no Fashion-MNIST classifier at {path}; train it once with "
            f"`python fmnist_classifier.py --data-path DIR --out {path}` (DIR holds the Fashion-MNIST IDX files, "
            f"`apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist)")
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    model = FashionMNISTClassifier(widths=checkpoint["widths"]).to(device)
    model.load_state_dict(checkpoint["model"])
    return model.eval().requires_grad_(False)


def save_classifier(model, path, **info):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save({"model": model.state_dict(), "widths": model.widths, **info}, path)


#################################################################################
#                                    Training                                   #
#################################################################################

def random_shift_flip(x, generator, max_shift=2):
    """Per-image random translation by up to max_shift px (black fill) and horizontal flip; x (B, C, H, W)."""
    B, _, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    rows = torch.randint(0, 2 * max_shift + 1, (B, 1), generator=generator) + torch.arange(H)
    cols = torch.randint(0, 2 * max_shift + 1, (B, 1), generator=generator) + torch.arange(W)
    flip = torch.rand(B, 1, generator=generator) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)
    # Advanced indices split by a slice put the broadcast dims first: (B, H, W, C).
    out = padded[torch.arange(B)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def train_classifier(data_path=None, epochs=10, batch_size=128, lr=3e-3, seed=0, device="cpu"):
    """Train on the train split with a fixed seed (AdamW, one-cycle schedule); returns the model in eval mode."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_fashion_mnist(data_path, split="train")
    x, y = to_classifier_input(torch.from_numpy(images)[:, None]), torch.from_numpy(labels)
    # channels_last makes the CPU convolutions about twice as fast.
    model = FashionMNISTClassifier().to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(y) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        progress = tqdm(order.split(batch_size), desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        for idx in progress:
            xb = random_shift_flip(x[idx], generator).to(device, memory_format=torch.channels_last)
            loss = F.cross_entropy(model(xb), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            progress.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval().requires_grad_(False)


def ensure_classifier(path=DEFAULT_CHECKPOINT, data_path=None, device="cpu", **train_kwargs):
    """
    The classifier cached at `path`, trained first if the file does not exist.
    Returns (model, test accuracy); the accuracy is measured once, on the t10k split, and stored.
    """
    if os.path.isfile(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        print(f"Using the cached Fashion-MNIST classifier {path}")
        return load_classifier(path, device), saved["test_accuracy"]
    model = train_classifier(data_path, device=device, **train_kwargs)
    images, labels = load_fashion_mnist(data_path, split="test")
    test_accuracy = class_accuracy(images[..., None], labels, model)["accuracy"]
    save_classifier(model, path, test_accuracy=test_accuracy, **train_kwargs)
    print(f"Saved the Fashion-MNIST classifier to {path}")
    return model, test_accuracy


@torch.no_grad()
def class_accuracy(images, labels, classifier, batch_size=500):
    """
    How often a class-conditional sample of class k is classified as k.

    images: uint8 (N, H, W, C), C in {1, 3} (the layout of sample npz files); labels: (N,) ints.
    Returns {"accuracy": float, "per_class": [accuracy of class k, None where no sample has k],
    "count": [samples of class k]}.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or labels.shape != images.shape[:1]:
        raise ValueError(f"expected images (N, H, W, 1 or 3) and labels (N,), got {images.shape} and {labels.shape}")
    device = next(classifier.parameters()).device
    batches = torch.from_numpy(images).permute(0, 3, 1, 2).split(batch_size)
    predicted = torch.cat([classifier(to_classifier_input(b.to(device))).argmax(1).cpu() for b in batches]).numpy()
    correct = predicted == labels
    num_classes = classifier.head.out_features
    count = [int((labels == k).sum()) for k in range(num_classes)]
    per_class = [float(correct[labels == k].mean()) if count[k] else None for k in range(num_classes)]
    return {"accuracy": float(correct.mean()), "per_class": per_class, "count": count}


#################################################################################
#                         torch-fidelity feature extractor                      #
#################################################################################

class FeatureExtractorFMNIST(FeatureExtractorBase):
    """
    torch-fidelity feature extractor on the classifier: uint8 (B, C, H, W) images in, features
    "64" (penultimate, the default for FID, KID and precision/recall), "128" and "logits" (for IS) out.
    feature_extractor_weights_path: a checkpoint written by this script (default results/fmnist_classifier.pt).
    """
    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.classifier = load_classifier(feature_extractor_weights_path or DEFAULT_CHECKPOINT)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images):
        features = self.classifier.features(to_classifier_input(images))
        return tuple(features[name].float() for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "64", "128", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "64", "kid": "64", "prc": "64"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)


# Importing this module twice (e.g. as a script and as a module) must not register the name twice.
if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(EXTRACTOR_NAME, FeatureExtractorFMNIST)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Train (once) the Fashion-MNIST feature network and report its "
                                                 "test accuracy.")
    parser.add_argument("--data-path", type=str, default=None,
                        help="folder with the Fashion-MNIST IDX files (default: datasets.py's default, "
                             "/usr/share/datasets/fashion-mnist)")
    parser.add_argument("--out", type=str, default=DEFAULT_CHECKPOINT,
                        help="checkpoint to write; if it exists it is read instead of training again")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs over the 60,000 train images")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialization, shuffling and augmentation")
    main(parser.parse_args())
