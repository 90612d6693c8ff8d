"""
FID and friends for ADM-format sample batches: the numbers of ADM's evaluator (FID, sFID, IS,
precision, recall) plus KID, on torch-fidelity's port of the TensorFlow Inception network (it
reproduces the TF FID numbers) or on our Fashion-MNIST classifier (fmnist_classifier.py).

    python evaluate.py --samples samples/run.npz --ref VIRTUAL_imagenet256_labeled.npz
    python evaluate.py --samples samples/run.npz --ref /usr/share/datasets/fashion-mnist --split test --features fmnist
    python evaluate.py --internal /usr/share/datasets/fashion-mnist --features fmnist
    python evaluate.py --plot-curves results/000-DiT-S-2 results/001-PDESSM-DiT-S-2 --out curves.png

--samples is an npz with arr_0 uint8 (N, H, W, C) (what sample_ddp.py writes; arr_1 or labels, when
present, are class labels), or any image source that --ref takes (a data set folder gives its train
split, so --samples DIR --ref DIR --split test compares a data set's train and test splits).
--ref is an npz of the same kind (e.g. ADM's reference batches), a folder of images, a CIFAR-10 folder
(torchvision's cifar-10-batches-py layout), a Fashion-MNIST folder (the IDX files), or a statistics
file (.npz with mu and sigma). The reference's statistics and features are computed once and cached
beside it as <ref>.<feature net>-<layer>.stats.npz (under results/ref_stats/ where that folder is
read-only). A statistics file alone supports FID only (and sFID when it holds mu_s, sigma_s); the
metrics that need reference features are then reported as null with the reason.
"""
import argparse
import functools
import glob
import hashlib
import json
import math
import os
import socket

import numpy as np
import torch
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_isc import isc_features_to_metric, KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD
from torch_fidelity.metric_kid import kid_features_to_metric, KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torchvision.datasets import CIFAR10
from tqdm import tqdm

import fmnist_classifier
from checkpoint import atomic_write
from datasets import load_fashion_mnist, pad_fashion_mnist


# Our names for the feature networks -> their names in torch-fidelity's registry, and the layers
# usable for FID (pytorch-fid's 64/192/768/2048 for Inception; the paper's Table 7 uses 64).
EXTRACTORS = {"inception": "inception-v3-compat", "fmnist": fmnist_classifier.EXTRACTOR_NAME}
FEATURE_LAYERS = {"inception": ("64", "192", "768", "2048"), "fmnist": ("64", "128")}
INCEPTION_WEIGHTS = os.path.basename(URL_INCEPTION_V3)
SPATIAL_CHANNELS = 7  # ADM's sFID: the first 7 channels of mixed_6/conv, 17x17 -> 2023 features
IS_SPLIT_SIZE = 5000  # ADM computes IS over chunks of 5,000 samples
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def main(args):
    if args.plot_curves:
        from visualize import plot_curves  # matplotlib only for this job
        out = args.out or os.path.join("results", "curves.png")
        plot_curves(args.plot_curves, out)
        print(f"Wrote {out}")
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = dict(features=args.features, feature_dim=args.feature_dim, split=args.split, weights=args.weights,
                   batch_size=args.batch_size, seed=args.seed, device=device)
    if args.internal:
        results = internal_fid(args.internal, **options)
        out = args.out or stats_cache_path(args.internal, results["feature_net"], args.split).replace(
            ".stats.npz", ".internal.json")
    elif args.samples and args.ref:
        results = evaluate(args.samples, args.ref, **options)
        out = args.out or os.path.splitext(args.samples)[0] + ".metrics.json"
    else:
        raise ValueError("give --samples and --ref, or --internal REF, or --plot-curves RUN...")
    print(format_table(results))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"Wrote {out}")


#################################################################################
#                              Metrics (pure functions)                         #
#################################################################################

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """
    Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2) (FID on features):
        ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2}).
    mu: (D,), sigma: (D, D) symmetric positive semi-definite. The trace term is computed as
    sum_i sqrt(lambda_i(A sigma2 A)) with A = sigma1^{1/2}: A sigma2 A is similar to sigma1 sigma2 but
    symmetric, so its eigenvalues are real and >= 0 up to rounding (clipped), and rank-deficient
    covariances need neither the eps offset nor the complex square root of the sqrtm route.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}; both sides must come from the same feature layer")
    evals, evecs = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T
    inner = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def feature_statistics(features):
    """Mean (D,) and covariance (D, D) of features (N, D), in float64; N <= D is a ValueError."""
    n, d = features.shape
    if n <= d:
        raise ValueError(f"{n} images for {d} features: the covariance of N <= D feature vectors is singular "
                         f"and FID is meaningless. Use more than {d} images or a smaller feature layer "
                         "(--feature-dim, e.g. 64)")
    features = features.astype(np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _reduce_distances(a, b, reduce, block_elements=2**26):
    """
    reduce(D) for row blocks D of the Euclidean distance matrix between the rows of a (N, F) and b (M, F),
    concatenated: (N, ...) without holding all N x M distances (50K x 50K for ADM's batches). On the GPU
    where there is one.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.from_numpy(a).float().to(device), torch.from_numpy(b).float().to(device)
    rows = max(1, block_elements // max(1, len(b)))
    return torch.cat([reduce(torch.cdist(block, b)) for block in a.split(rows)]).cpu().numpy()


def manifold_radii(features, k=3):
    """
    ADM's (Kynkaanniemi et al.'s) manifold estimate: the radius of the ball around each feature vector
    (N, D) is the distance to its k-th nearest neighbour in the same set, itself excluded. Returns (N,).
    """
    if len(features) <= k:
        raise ValueError(f"the k-NN manifold estimate needs more than k={k} feature vectors, got {len(features)}")
    return _reduce_distances(features, features, lambda d: d.kthvalue(k + 1, dim=1).values)


def manifold_coverage(features, radii, queries):
    """Fraction of the query vectors (M, D) inside at least one ball (features_j, radii_j)."""
    radii = torch.from_numpy(radii)
    inside = _reduce_distances(queries, features, lambda d: (d <= radii.to(d.device)[None, :]).any(dim=1))
    return float(inside.mean())


def precision_recall(ref_features, sample_features, k=3):
    """
    Improved precision and recall (ADM's evaluator, k=3): precision is the fraction of samples on the
    reference manifold, recall the fraction of reference images on the samples' manifold.
    """
    precision = manifold_coverage(ref_features, manifold_radii(ref_features, k), sample_features)
    recall = manifold_coverage(sample_features, manifold_radii(sample_features, k), ref_features)
    return precision, recall


def inception_score(logits):
    """IS of class logits (N, C): exp E[KL(p(y|x) || p(y))] over ceil(N / 5,000) equal chunks, (mean, std);
    ADM's chunks of 5,000 where N is a multiple of 5,000 (its 50K samples)."""
    splits = max(1, math.ceil(len(logits) / IS_SPLIT_SIZE))
    out = isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=False)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def kernel_inception_distance(features1, features2, seed=0, subsets=100, subset_size=1000):
    """KID: unbiased MMD^2 with the cubic polynomial kernel, mean and std over random subsets (torch-fidelity)."""
    subset_size = min(subset_size, len(features1), len(features2))
    out = kid_features_to_metric(torch.from_numpy(features1), torch.from_numpy(features2), kid_subsets=subsets,
                                 kid_subset_size=subset_size, rng_seed=seed, verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


#################################################################################
#                                    Images                                     #
#################################################################################

def check_images(images, source):
    """The uint8 (N, H, W, C) batch `images`, C in {1, 3}, or a ValueError that says what is wrong."""
    expected = "expected uint8 images of shape (N, H, W, C) with C = 1 or 3 (ADM's format)"
    if images.dtype != np.uint8:
        raise ValueError(f"{source}: images have dtype {images.dtype}; {expected}. Convert [-1, 1] floats with "
                         "((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)")
    if images.ndim != 4:
        raise ValueError(f"{source}: images have shape {images.shape} ({images.ndim}-D); {expected}")
    if images.shape[-1] not in (1, 3):
        hint = (" This looks like NCHW: transpose with images.transpose(0, 2, 3, 1)."
                if images.shape[1] in (1, 3) else "")
        raise ValueError(f"{source}: images have shape {images.shape}; {expected}.{hint}")
    if len(images) == 0:
        raise ValueError(f"{source}: no images")
    return images


def _cifar10_root(path):
    """torchvision's root for a CIFAR-10 folder (the folder holding cifar-10-batches-py, or that folder), or None."""
    if os.path.isdir(os.path.join(path, "cifar-10-batches-py")):
        return path
    if os.path.basename(os.path.normpath(path)) == "cifar-10-batches-py":
        return os.path.dirname(os.path.normpath(path))
    return None


def _is_fashion_mnist(path):
    """Whether `path` holds Fashion-MNIST IDX files in one of the layouts datasets.load_fashion_mnist reads."""
    folders = (path, os.path.join(path, "FashionMNIST", "raw"), os.path.join(path, "raw"))
    return any(glob.glob(os.path.join(folder, "*-images-idx3-ubyte*")) for folder in folders)


def _read_image_folder(path):
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder or below")
    images = [np.asarray(Image.open(f).convert("RGB")) for f in tqdm(files, desc=f"reading {path}", leave=False)]
    sizes = {im.shape for im in images}
    if len(sizes) > 1:
        raise ValueError(f"{path}: images of different sizes {sorted(sizes)[:4]}; resize them to one size first")
    return np.stack(images)


def load_images(path, split="train"):
    """
    uint8 images (N, H, W, C) from an npz (arr_0), a CIFAR-10 folder or a Fashion-MNIST folder
    (split "train" or "test"; Fashion-MNIST padded to 32x32 like datasets.py), a folder of images
    or one image file.
    """
    if os.path.isdir(path):
        if _cifar10_root(path) is not None:
            if split not in ("train", "test"):
                raise ValueError(f"CIFAR-10 has splits 'train' and 'test', got {split!r}")
            images = CIFAR10(_cifar10_root(path), train=split == "train", download=False).data
        elif _is_fashion_mnist(path):
            images = pad_fashion_mnist(load_fashion_mnist(path, split)[0])[..., None]
        else:
            images = _read_image_folder(path)
    elif os.path.isfile(path) and path.lower().endswith(IMAGE_EXTENSIONS):
        images = np.asarray(Image.open(path).convert("RGB"))[None]
    elif os.path.isfile(path) and path.endswith(".npz"):
        with np.load(path) as data:
            if "arr_0" not in data:
                raise ValueError(f"{path} has no arr_0 (keys: {', '.join(data.files)}); expected ADM's sample "
                                 "format, np.savez(path, arr_0=uint8 images (N, H, W, C))")
            images = data["arr_0"]
    elif not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    else:
        raise ValueError(f"{path}: expected an .npz file, an image file or a folder")
    return check_images(images, path)


def load_labels(path):
    """Class labels stored with an ADM npz (arr_1, or labels), or None."""
    if not (os.path.isfile(path) and path.endswith(".npz")):
        return None
    with np.load(path) as data:
        key = next((k for k in ("arr_1", "labels") if k in data), None)
        return None if key is None else data[key].astype(np.int64)


#################################################################################
#                               Feature networks                                #
#################################################################################

def inception_weights_path():
    """Where torch-fidelity's Inception weights live: torch hub's checkpoints folder ($TORCH_HOME/hub/checkpoints)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS)


def ensure_inception_weights(timeout=20):
    """
    The path of the Inception weights, downloaded first if missing. Without network the attempt fails
    within `timeout` seconds (a blackholed connection would otherwise hang), and with HF_HUB_OFFLINE=1
    it is not made: a FileNotFoundError names the file and where to put it.
    """
    path = inception_weights_path()
    if os.path.isfile(path):
        return path

    def missing(reason):
        return FileNotFoundError(
            f"Inception weights {INCEPTION_WEIGHTS} are not at {path} and cannot be downloaded ({reason}). "
            f"Fetch {URL_INCEPTION_V3} on a machine with network and copy it to {path} (torch hub's "
            "checkpoints folder; set TORCH_HOME to move it), or pass --weights PATH.")

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise missing("HF_HUB_OFFLINE is set")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        torch.hub.download_url_to_file(URL_INCEPTION_V3, path)
    except OSError as e:  # URLError, timeouts, refused connections, SSL errors
        raise missing(e) from e
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return path


def fid_feature_dim(features="inception", feature_dim=None):
    """The size of the FID feature layer that build_extractor takes for features and feature_dim (None:
    the network's default); ValueError for an unknown network or layer."""
    if features not in EXTRACTORS:
        raise ValueError(f"unknown feature network {features!r}; choose from {', '.join(EXTRACTORS)}")
    cls = FEATURE_EXTRACTORS_REGISTRY[EXTRACTORS[features]]
    layer = cls.get_default_feature_layer_for_metric("fid") if feature_dim is None else str(feature_dim)
    if layer not in FEATURE_LAYERS[features]:
        raise ValueError(f"{features} has feature layers {', '.join(FEATURE_LAYERS[features])}, not {layer}")
    return int(layer)


@functools.lru_cache(maxsize=4)
def build_extractor(features="inception", feature_dim=None, weights=None, device="cpu"):
    """
    The torch-fidelity feature extractor `features` ("inception" or "fmnist") on `device`, asked for two
    outputs: the FID feature layer (feature_dim, default the extractor's: 2048 for Inception, 64 for
    fmnist) and the class logits for IS. weights: a weights file (default: torch hub's Inception weights,
    results/fmnist_classifier.pt). Cached, so a training loop builds it once.
    """
    cls = FEATURE_EXTRACTORS_REGISTRY[EXTRACTORS[features]]
    layer = str(fid_feature_dim(features, feature_dim))
    if features == "inception" and weights is None:
        weights = ensure_inception_weights()
    extractor = cls(EXTRACTORS[features], [layer, cls.get_default_feature_layer_for_metric("isc")],
                    feature_extractor_weights_path=weights)
    return extractor.to(device).eval()


def feature_net_name(extractor):
    """e.g. "inception-v3-compat-2048": the network and its FID layer, in file names and results."""
    return f"{extractor.get_name()}-{extractor.get_requested_features_list()[0]}"


def weights_fingerprint(extractor):
    """A short hash of the extractor's weights: cached statistics are reused only with the same network."""
    digest = hashlib.sha1()
    for name, tensor in extractor.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def extract_features(images, extractor, batch_size=100, progress=True):
    """
    Features of uint8 images (N, H, W, C) -> {"features": (N, D), "logits": (N, classes)} as float32,
    plus for Inception "spatial": (N, 2023), ADM's sFID features. progress: a progress bar.
    """
    layer, logits_layer = extractor.get_requested_features_list()
    device = next(extractor.parameters()).device
    outputs = {"features": [], "logits": [], "spatial": []}
    hook = None
    if isinstance(extractor, FeatureExtractorInceptionV3):
        # ADM's sFID reads TF's mixed_6/conv: the (ReLU) output of the 1x1 branch of the third 17x17 block,
        # Mixed_6d.branch1x1 in torch-fidelity's port; first 7 channels, flattened in NHWC order like ADM.
        def keep_spatial(module, inputs, output):
            outputs["spatial"].append(output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1).float().cpu())
        hook = extractor.Mixed_6d.branch1x1.register_forward_hook(keep_spatial)
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="features", leave=False, disable=not progress):
            x = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).to(device)
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # torch-fidelity's extractors take RGB
            features = extractor.convert_features_tuple_to_dict(extractor(x))
            outputs["features"].append(features[layer].cpu())
            outputs["logits"].append(features[logits_layer].cpu())
    finally:
        if hook is not None:
            hook.remove()
    return {k: torch.cat(v).float().numpy() for k, v in outputs.items() if v}


def summarize(features):
    """
    What metrics need from one side: FID statistics mu, sigma (and mu_s, sigma_s of the spatial features
    where there are more images than the 2023 spatial features), the features themselves (precision,
    recall, KID) and the image count.
    """
    mu, sigma = feature_statistics(features["features"])
    stats = {"mu": mu, "sigma": sigma, "features": features["features"], "num_images": len(features["features"])}
    spatial = features.get("spatial")
    if spatial is not None and len(spatial) > spatial.shape[1]:
        stats["mu_s"], stats["sigma_s"] = feature_statistics(spatial)
    return stats


#################################################################################
#                         Reference statistics (cached)                         #
#################################################################################

def _is_statistics_file(path):
    if not (os.path.isfile(path) and path.endswith(".npz")):
        return False
    with np.load(path) as data:
        return "arr_0" not in data and "mu" in data and "sigma" in data


def stats_cache_path(ref, net_name, split="train"):
    """
    <ref>.<net>.stats.npz beside the reference (with the split for CIFAR-10 and Fashion-MNIST folders),
    or under results/ref_stats/ when the reference's folder is read-only.
    """
    base = os.path.normpath(ref)
    if os.path.isdir(ref) and (_cifar10_root(ref) is not None or _is_fashion_mnist(ref)):
        base += f".{split}"
    path = f"{base}.{net_name}.stats.npz"
    if not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        # Named by the reference's full path as well, so that references of one name do not share it.
        where = hashlib.sha1(os.path.abspath(ref).encode()).hexdigest()[:8]
        path = os.path.join("results", "ref_stats", f"{where}-{os.path.basename(path)}")
    return path


def reference_fingerprint(ref):
    """A short hash of the size and modification time of the file ref, or of every file under the folder
    ref with its path: cached statistics are reused only while no image of the reference changed."""
    files = [ref] if os.path.isfile(ref) else sorted(
        os.path.join(folder, name) for folder, _, names in os.walk(ref) for name in names)
    digest = hashlib.sha1()
    for file in files:
        info = os.stat(file)
        digest.update(f"{os.path.relpath(file, ref)}:{info.st_size}:{info.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def read_statistics_file(path, extractor):
    """mu, sigma (and mu_s, sigma_s, features when present) of a statistics file, checked against the
    extractor: its network and layer, and, in a file that records them (the caches this module writes),
    the network's weights."""
    with np.load(path) as data:
        stats = {k: data[k] for k in data.files}
    layer_dim = int(extractor.get_requested_features_list()[0])
    recorded = str(stats.get("feature_net", ""))
    if (recorded and recorded != feature_net_name(extractor)) or stats["mu"].shape != (layer_dim,):
        held = recorded or f"{len(stats['mu'])} features"
        raise ValueError(f"{path} holds statistics of {held}, but the "
                         f"samples are measured with {feature_net_name(extractor)}; choose --features/--feature-dim "
                         "to match, or pass the reference images instead")
    if "cache_key" in stats:
        made_with, measuring_with = str(stats["cache_key"]).split(":")[0], weights_fingerprint(extractor)
        if made_with != measuring_with:
            raise ValueError(f"{path} holds statistics measured with other weights of {feature_net_name(extractor)} "
                             f"(weights {made_with}; the network here has weights {measuring_with}); pass the "
                             "--weights they were measured with, or the reference images instead")
    return stats


def reference_statistics(ref, extractor, split="train", batch_size=100, with_features=True):
    """
    Statistics of the reference `ref` under `extractor` (see summarize) and the file they came from.
    A statistics file is read as is; images are measured once and cached (stats_cache_path), and the
    cache is reused while the reference and the network's weights are unchanged.
    with_features=False skips the (large) reference features when only FID is needed.
    """
    if _is_statistics_file(ref):
        return read_statistics_file(ref, extractor), ref
    path = stats_cache_path(ref, feature_net_name(extractor), split)
    if not os.path.exists(ref):
        raise FileNotFoundError(f"reference {ref} not found")
    key = f"{weights_fingerprint(extractor)}:{reference_fingerprint(ref)}"
    if os.path.isfile(path):
        with np.load(path) as data:
            if str(data["cache_key"]) == key:
                print(f"Using cached reference statistics {path}")
                keep = [k for k in data.files if with_features or k != "features"]
                return {k: data[k] for k in keep}, path
        print(f"Reference statistics {path} are stale (other weights or reference); recomputing")
    stats = summarize(extract_features(load_images(ref, split), extractor, batch_size))
    with atomic_write(path) as f:  # a reader in another process never sees half a file
        np.savez(f, **stats, feature_net=feature_net_name(extractor), cache_key=key)
    print(f"Cached reference statistics of {stats['num_images']} images in {path}")
    return stats, path


#################################################################################
#                                  Evaluation                                   #
#################################################################################

def compute_metrics(samples, reference, seed=0):
    """
    Metrics of the sample side against the reference side, both from summarize() (reference possibly
    from a statistics file). Metrics that the reference cannot support are None, with the reason under
    "null_reasons".
    """
    results = {"fid": frechet_distance(samples["mu"], samples["sigma"], reference["mu"], reference["sigma"])}
    reasons = {}
    if "mu_s" in samples and "mu_s" in reference:
        results["sfid"] = frechet_distance(samples["mu_s"], samples["sigma_s"], reference["mu_s"], reference["sigma_s"])
    else:
        results["sfid"] = None
        reasons["sfid"] = ("sFID is defined on Inception's spatial features and needs more than "
                           f"{SPATIAL_CHANNELS * 17 * 17} images on both sides")
    results["is"], results["is_std"] = inception_score(samples["logits"])
    if "features" in reference:
        results["precision"], results["recall"] = precision_recall(reference["features"], samples["features"])
        results["kid"], results["kid_std"] = kernel_inception_distance(samples["features"], reference["features"],
                                                                        seed=seed)
    else:
        for name in ("precision", "recall", "kid", "kid_std"):
            results[name] = None
            reasons[name] = "the reference is a statistics file without features; pass the reference images"
    results["num_samples"] = int(samples["num_images"])
    results["num_reference"] = int(reference["num_images"]) if "num_images" in reference else None
    results["null_reasons"] = reasons
    return results


def _sample_side(images, extractor, batch_size):
    features = extract_features(images, extractor, batch_size)
    return {**summarize(features), "logits": features["logits"]}


def evaluate(samples, ref, features="inception", feature_dim=None, split="train", weights=None, batch_size=100,
             seed=0, device="cpu"):
    """
    All metrics of `samples` (an npz, or anything load_images reads, at its train split) against the
    reference `ref` (see the module docstring); a dict ready for JSON. With the fmnist network and labels
    in the npz, also the class accuracy.
    """
    images = load_images(samples)
    extractor = build_extractor(features, feature_dim, weights, device)
    sample_side = _sample_side(images, extractor, batch_size)
    reference, reference_source = reference_statistics(ref, extractor, split, batch_size)
    results = compute_metrics(sample_side, reference, seed)
    labels = load_labels(samples)
    if features == "fmnist" and labels is not None:
        results["class_accuracy"] = fmnist_classifier.class_accuracy(images, labels, extractor.classifier)
    return {**results, "features": features, "feature_net": feature_net_name(extractor),
            "samples": samples, "reference": ref, "reference_statistics": reference_source}


def internal_fid(ref, features="inception", feature_dim=None, split="train", weights=None, batch_size=100, seed=0,
                 device="cpu"):
    """
    The metrics between two disjoint random halves of the reference (seeded): the floor a generator
    can reach with this many images (the internal FID line of the paper's Figure 3).
    """
    images = load_images(ref, split)
    extractor = build_extractor(features, feature_dim, weights, device)
    order = np.random.RandomState(seed).permutation(len(images))
    first, second = np.sort(order[: len(images) // 2]), np.sort(order[len(images) // 2:])
    reference = summarize(extract_features(images[second], extractor, batch_size))
    results = compute_metrics(_sample_side(images[first], extractor, batch_size), reference, seed)
    return {**results, "features": features, "feature_net": feature_net_name(extractor),
            "reference": ref, "internal": f"two random halves (seed {seed}) of the {split} images"}


def fid_proxy(images, ref, features="inception", feature_dim=None, split="train", weights=None, batch_size=100,
              device="cpu"):
    """
    Training-time FID proxy: FID of a small batch of samples, uint8 (N, H, W, C), against the reference
    `ref` (any REF of this script; its statistics are computed on the first call and cached). The
    feature network is built once per process. N must exceed the feature dimension (e.g. 2048 for
    Inception, 64 for fmnist); a small-N FID is biased upwards, so compare proxies only at equal N.
    """
    extractor = build_extractor(features, feature_dim, weights, device)
    images = check_images(np.asarray(images), "samples")
    reference, _ = reference_statistics(ref, extractor, split, batch_size, with_features=False)
    return proxy_distance(extract_features(images, extractor, batch_size)["features"], reference)


def proxy_distance(features, reference):
    """
    The last step of fid_proxy: the FID of sample features (N, D) against `reference`, the statistics
    (mu, sigma) of the same network's features of the reference (reference_statistics), for features
    measured apart (as train.py's ranks measure them).
    """
    mu, sigma = feature_statistics(features)
    return frechet_distance(mu, sigma, reference["mu"], reference["sigma"])


def format_table(results):
    """The results as a small two-column table."""
    def value(name, std=None):
        if results.get(name) is None:
            return "n/a (" + results["null_reasons"].get(name, "not computed") + ")"
        return f"{results[name]:.4f}" + (f" +- {results[std]:.4f}" if std else "")
    rows = [("FID", value("fid")), ("sFID", value("sfid")), ("IS", value("is", "is_std")),
            ("Precision", value("precision")), ("Recall", value("recall")), ("KID", value("kid", "kid_std")),
            ("samples", str(results["num_samples"])), ("reference images", str(results["num_reference"])),
            ("feature net", results["feature_net"])]
    if "class_accuracy" in results:
        rows.append(("class accuracy", f"{results['class_accuracy']['accuracy']:.4f}"))
    return "\n".join(f"{name:<18}{text}" for name, text in rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="FID, sFID, IS, precision, recall and KID of ADM-format samples.")
    parser.add_argument("--samples", type=str, default=None,
                        help="npz with arr_0 uint8 (N, H, W, C) samples (or an image source like --ref, train split)")
    parser.add_argument("--ref", type=str, default=None,
                        help="reference: npz (arr_0), image folder, CIFAR-10 or Fashion-MNIST folder, or stats npz")
    parser.add_argument("--internal", type=str, default=None, metavar="REF",
                        help="instead of --samples/--ref: metrics between two random halves of REF")
    parser.add_argument("--plot-curves", type=str, nargs="+", default=None, metavar="RUN",
                        help="instead: plot loss and FID proxy of these run folders (metrics.jsonl) to --out")
    parser.add_argument("--features", type=str, choices=list(EXTRACTORS), default="inception",
                        help="feature network: torch-fidelity's Inception, or our Fashion-MNIST classifier")
    parser.add_argument("--feature-dim", type=int, default=None,
                        help="FID feature layer: 64, 192, 768, 2048 (Inception, default 2048) or 64, 128 "
                             "(fmnist, default 64)")
    parser.add_argument("--split", type=str, choices=["train", "test"], default="train",
                        help="split of a CIFAR-10 or Fashion-MNIST reference folder")
    parser.add_argument("--weights", type=str, default=None,
                        help="feature network weights (default: torch hub's Inception weights file, "
                             "results/fmnist_classifier.pt)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per feature-network batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the internal split and the KID subsets")
    parser.add_argument("--out", type=str, default=None,
                        help="JSON results (default: beside the samples) or the PNG of --plot-curves")
    args = parser.parse_args()
    try:
        main(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: the message, not a traceback
        raise SystemExit(f"evaluate.py: error: {e}")
