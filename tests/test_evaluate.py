"""evaluate.py and fmnist_classifier.py: metrics against closed forms, the npz -> JSON pipeline with a
tiny feature network registered in torch-fidelity, cached reference statistics, and clear errors."""
import json
import os
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

import datasets
import evaluate
import fmnist_classifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def closed_form_diagonal(mu1, a, mu2, b):
    """FID of N(mu1, diag a) and N(mu2, diag b): commuting covariances, tr sqrt(AB) = sum sqrt(a b)."""
    return float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())


def random_rotation(d, rng):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


# ----------------------------------------------------------------------------- Frechet distance

def test_frechet_distance_diagonal_and_rotated_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = closed_form_diagonal(mu1, a, mu2, b)
    assert evaluate.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # The same Gaussians in a rotated frame: distances are rotation invariant.
    q = random_rotation(d, rng)
    rotated = evaluate.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_non_commuting_2x2_closed_form():
    # For 2x2 matrices whose product has eigenvalues l1, l2 >= 0:
    # tr sqrt(S1 S2) = sqrt(l1) + sqrt(l2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)).
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_rank_deficient_covariances():
    rng = np.random.default_rng(1)
    d = 32
    # Diagonal with zeros in different places: singular product, still the closed form.
    a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    a[:8], b[4:12] = 0.0, 0.0
    mu = rng.normal(size=d)
    value = evaluate.frechet_distance(mu, np.diag(a), mu, np.diag(b))
    assert np.isfinite(value) and value == pytest.approx(closed_form_diagonal(mu, a, mu, b), rel=1e-9)
    # A rank-5 covariance of 32 features (like N <= D samples) against a scaled copy:
    # tr sqrt(S c^2 S) = c tr S, so FID = (1 - c)^2 tr S.
    x = rng.normal(size=(d, 5))
    s = x @ x.T
    c = 1.7
    value = evaluate.frechet_distance(np.zeros(d), s, np.zeros(d), c ** 2 * s)
    assert np.isfinite(value) and value == pytest.approx((1 - c) ** 2 * np.trace(s), rel=1e-6)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="same feature layer"):
        evaluate.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics_needs_more_images_than_features():
    with pytest.raises(ValueError, match="singular"):
        evaluate.feature_statistics(np.zeros((64, 64), np.float32))


# ----------------------------------------------------------------------------- precision, recall, KID, IS

def test_precision_recall_hand_computed_case():
    # 1-D features, k=1. Reference 0..4: every ball has radius 1. Samples 0.5 and 10: 0.5 lies in the
    # ball of 0, 10 in none -> precision 1/2. Sample balls have radius 9.5 around 0.5 -> every reference
    # point is covered -> recall 1.
    ref = np.arange(5, dtype=np.float32)[:, None]
    samples = np.array([[0.5], [10.0]], dtype=np.float32)
    assert evaluate.precision_recall(ref, samples, k=1) == (0.5, 1.0)
    # Shifted far away: nothing is on the other manifold.
    assert evaluate.precision_recall(ref, ref + 100, k=1) == (0.0, 0.0)


def test_kid_of_constant_sets_is_the_kernel_closed_form():
    # All X equal x, all Y equal y: the unbiased MMD^2 is k(x,x) + k(y,y) - 2 k(x,y) in every subset,
    # with torch-fidelity's kernel k(u, v) = (u.v / d + 1)^3.
    d = 8
    x, y = np.full(d, 0.5, np.float32), np.full(d, -0.25, np.float32)
    k = lambda u, v: (u @ v / d + 1) ** 3
    mean, std = evaluate.kernel_inception_distance(np.tile(x, (50, 1)), np.tile(y, (60, 1)), subsets=5)
    assert mean == pytest.approx(k(x, x) + k(y, y) - 2 * k(x, y), rel=1e-5)
    assert std == pytest.approx(0.0, abs=1e-6)


def test_inception_score_closed_forms():
    # Uniform predictions: p(y|x) = p(y) -> IS 1. Confident predictions spread evenly over C classes -> IS C.
    assert evaluate.inception_score(np.zeros((100, 10), np.float32))[0] == pytest.approx(1.0)
    confident = 50.0 * np.eye(10, dtype=np.float32)[np.arange(100) % 10]
    assert evaluate.inception_score(confident)[0] == pytest.approx(10.0, rel=1e-6)


# ----------------------------------------------------------------------------- the pipeline

def untrained_classifier(path, seed):
    """An untrained tiny Fashion-MNIST classifier, its weights drawn with seed, saved at path (returned):
    a deterministic small CNN feature network."""
    torch.manual_seed(seed)
    fmnist_classifier.save_classifier(fmnist_classifier.FashionMNISTClassifier(widths=(4, 8, 8)).eval(), path,
                                      test_accuracy=0.0)
    return path


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return untrained_classifier(str(tmp_path_factory.mktemp("fmnist") / "tiny.pt"), seed=0)


def blobs(n, seed):
    """n 32x32 one-channel uint8 images: a bright Gaussian blob at a random place and width."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    cy, cx, w = rng.uniform(8, 24, (3, n, 1, 1))
    w = 2 + w / 4
    images = 220 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * w ** 2)) + rng.uniform(0, 30, (n, 32, 32))
    return images.astype(np.uint8)[..., None]


def test_fmnist_extractor_is_registered_and_used_by_torch_fidelity(tiny_weights):
    assert FEATURE_EXTRACTORS_REGISTRY[fmnist_classifier.EXTRACTOR_NAME] is fmnist_classifier.FeatureExtractorFMNIST

    class Images(torch.utils.data.Dataset):
        def __init__(self, images):
            self.images = torch.from_numpy(images).permute(0, 3, 1, 2).expand(-1, 3, -1, -1)
        def __len__(self):
            return len(self.images)
        def __getitem__(self, i):
            return self.images[i]

    a = blobs(150, 0)
    b = np.clip(a.astype(int) + 60, 0, 255).astype(np.uint8)
    kwargs = dict(fid=True, feature_extractor=fmnist_classifier.EXTRACTOR_NAME, feature_extractor_weights_path=tiny_weights,
                  cuda=False, cache=False, verbose=False, save_cpu_ram=True, batch_size=50)
    same = torch_fidelity.calculate_metrics(input1=Images(a), input2=Images(a), **kwargs)[torch_fidelity.KEY_METRIC_FID]
    # torch-fidelity's own FID (eigenvalues of the product) against ours on our feature extraction.
    theirs = torch_fidelity.calculate_metrics(input1=Images(a), input2=Images(b), **kwargs)[torch_fidelity.KEY_METRIC_FID]
    extractor = evaluate.build_extractor("fmnist", None, tiny_weights, "cpu")
    fa, fb = (evaluate.extract_features(x, extractor)["features"] for x in (a, b))
    ours = evaluate.frechet_distance(*evaluate.feature_statistics(fa), *evaluate.feature_statistics(fb))
    assert abs(same) < 1e-6 * theirs
    assert ours == pytest.approx(theirs, rel=1e-3)


def test_self_comparison_is_perfect_and_a_shift_is_worse(tmp_path, tiny_weights):
    images = blobs(200, 2)
    shifted = np.clip(images.astype(int) + 60, 0, 255).astype(np.uint8)
    for name, array in (("ref.npz", images), ("shifted.npz", shifted)):
        np.savez(tmp_path / name, arr_0=array)
    ref = str(tmp_path / "ref.npz")
    same = evaluate.evaluate(ref, ref, features="fmnist", weights=tiny_weights)
    worse = evaluate.evaluate(str(tmp_path / "shifted.npz"), ref, features="fmnist", weights=tiny_weights)
    # The untrained net's features are small, so FID and KID are judged relative to the shifted set's.
    assert worse["fid"] > 0 and abs(same["fid"]) < 1e-8 * worse["fid"]
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert worse["precision"] < 0.5 and worse["recall"] < 0.5
    assert abs(same["kid"]) < 0.05 * worse["kid"]
    # Internal FID of the reference halves: above zero, far below the shifted set's, reproducible.
    internal = evaluate.internal_fid(ref, features="fmnist", weights=tiny_weights)
    assert 0 < internal["fid"] < worse["fid"]
    assert internal["num_samples"] == internal["num_reference"] == 100
    assert evaluate.internal_fid(ref, features="fmnist", weights=tiny_weights)["fid"] == internal["fid"]


def test_reference_statistics_are_cached_once_and_reused(tmp_path, tiny_weights, monkeypatch):
    np.savez(tmp_path / "samples.npz", arr_0=blobs(120, 3))
    np.savez(tmp_path / "ref.npz", arr_0=blobs(150, 4))
    calls = []
    real_extract = evaluate.extract_features
    monkeypatch.setattr(evaluate, "extract_features", lambda images, *a, **k: calls.append(len(images)) or
                        real_extract(images, *a, **k))
    args = (str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"))
    first = evaluate.evaluate(*args, features="fmnist", weights=tiny_weights)
    cache = first["reference_statistics"]
    assert cache == str(tmp_path / "ref.npz") + ".fmnist-classifier-64.stats.npz" and os.path.isfile(cache)
    assert sorted(calls) == [120, 150]
    mtime = os.stat(cache).st_mtime_ns
    second = evaluate.evaluate(*args, features="fmnist", weights=tiny_weights)
    assert calls[2:] == [120]  # only the samples were measured again
    assert os.stat(cache).st_mtime_ns == mtime
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-9)
    # Other weights: the cache is stale and recomputed.
    other = untrained_classifier(str(tmp_path / "other.pt"), seed=1)
    evaluate.evaluate(*args, features="fmnist", weights=other)
    assert calls[3:] == [120, 150]


def test_image_folder_statistics_follow_the_images_in_subfolders(tmp_path, tiny_weights, monkeypatch):
    def write(folder, images):
        os.makedirs(folder, exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(image[..., 0]).save(os.path.join(folder, f"{i:03d}.png"))
    ref = tmp_path / "ref"
    write(ref / "a", blobs(70, 7))
    extractor = evaluate.build_extractor("fmnist", weights=tiny_weights)
    first, cache = evaluate.reference_statistics(str(ref), extractor)
    assert first["num_images"] == 70
    # Images replaced and added inside a class folder leave the top folder's own time as it was.
    mtime = os.stat(ref).st_mtime_ns
    write(ref / "a", blobs(90, 8))
    os.utime(ref, ns=(mtime, mtime))
    second, _ = evaluate.reference_statistics(str(ref), extractor)
    assert second["num_images"] == 90 and not np.allclose(second["mu"], first["mu"])

    # A read-only reference folder: the cache goes under results/, named by the reference's full path.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluate.os, "access", lambda path, mode: False)
    paths = {evaluate.stats_cache_path(str(tmp_path / where / "ref.npz"), "net") for where in ("x", "y")}
    assert len(paths) == 2 and all(p.startswith(os.path.join("results", "ref_stats")) for p in paths)


def test_statistics_file_reference_gives_fid_and_nulls(tmp_path, tiny_weights):
    np.savez(tmp_path / "samples.npz", arr_0=blobs(140, 5))  # > 128: the 128 layer is allowed too
    np.savez(tmp_path / "ref.npz", arr_0=blobs(150, 6))
    full = evaluate.evaluate(str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), features="fmnist",
                             weights=tiny_weights)
    with np.load(full["reference_statistics"]) as data:
        np.savez(tmp_path / "stats.npz", mu=data["mu"], sigma=data["sigma"])
    only = evaluate.evaluate(str(tmp_path / "samples.npz"), str(tmp_path / "stats.npz"), features="fmnist",
                             weights=tiny_weights)
    assert only["fid"] == pytest.approx(full["fid"], rel=1e-9)
    for name in ("precision", "recall", "kid"):
        assert only[name] is None and "statistics file" in only["null_reasons"][name]
    assert only["sfid"] is None and "sfid" in only["null_reasons"]
    with pytest.raises(ValueError, match="64 features"):  # statistics of another feature layer
        evaluate.evaluate(str(tmp_path / "samples.npz"), str(tmp_path / "stats.npz"), features="fmnist",
                          feature_dim=128, weights=tiny_weights)
    # The cache, which records the weights it was measured with, passed as the reference itself:
    # taken with those weights, refused with others of the same network.
    cached = evaluate.evaluate(str(tmp_path / "samples.npz"), full["reference_statistics"], features="fmnist",
                               weights=tiny_weights)
    assert cached["fid"] == pytest.approx(full["fid"], rel=1e-9)
    other = untrained_classifier(str(tmp_path / "other.pt"), seed=1)
    with pytest.raises(ValueError, match="other weights of fmnist-classifier-64"):
        evaluate.evaluate(str(tmp_path / "samples.npz"), full["reference_statistics"], features="fmnist",
                          weights=other)


def test_command_line_writes_json_and_reports_errors_without_traceback(tmp_path, tiny_weights):
    images = blobs(100, 7)
    labels = np.arange(100) % 10
    np.savez(tmp_path / "samples.npz", arr_0=images, arr_1=labels)
    np.savez(tmp_path / "ref.npz", arr_0=blobs(110, 8))
    np.savez(tmp_path / "bad.npz", arr_0=images.astype(np.float32))
    run = lambda samples, out: subprocess.run(
        [sys.executable, "evaluate.py", "--samples", str(tmp_path / samples), "--ref", str(tmp_path / "ref.npz"),
         "--features", "fmnist", "--weights", tiny_weights, "--out", str(tmp_path / out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    good = run("samples.npz", "results.json")
    assert good.returncode == 0, good.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_samples"] == 100 and results["num_reference"] == 110
    assert results["feature_net"] == "fmnist-classifier-64"
    for key in ("fid", "is", "precision", "recall", "kid"):
        assert isinstance(results[key], float)
    assert results["sfid"] is None
    assert sum(results["class_accuracy"]["count"]) == 100  # labels were read from arr_1
    assert "FID" in good.stdout
    bad = run("bad.npz", "bad.json")
    assert bad.returncode != 0 and "uint8" in bad.stderr and "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("array, message", [
    (np.zeros((4, 32, 32, 3), np.float32), "dtype float32"),
    (np.zeros((4, 3, 32, 32), np.uint8), "NCHW"),
    (np.zeros((4, 32, 32), np.uint8), "3-D"),
])
def test_bad_npz_is_a_clear_error(tmp_path, array, message):
    np.savez(tmp_path / "bad.npz", arr_0=array)
    with pytest.raises(ValueError, match=message):
        evaluate.load_images(str(tmp_path / "bad.npz"))


def test_npz_without_images_and_too_few_samples(tmp_path, tiny_weights):
    np.savez(tmp_path / "nothing.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="no arr_0"):
        evaluate.load_images(str(tmp_path / "nothing.npz"))
    np.savez(tmp_path / "few.npz", arr_0=blobs(64, 9))
    with pytest.raises(ValueError, match="64 images for 64 features"):
        evaluate.evaluate(str(tmp_path / "few.npz"), str(tmp_path / "few.npz"), features="fmnist",
                          weights=tiny_weights)


def test_missing_inception_weights_offline_is_a_clear_message(tmp_path, monkeypatch):
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("network unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub_dir = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(FileNotFoundError) as error:
            evaluate.build_extractor("inception", 2048, None, "cpu")
        # With HF_HUB_OFFLINE no download is tried at all.
        monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("download attempted"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
            evaluate.ensure_inception_weights()
    finally:
        torch.hub.set_dir(hub_dir)
    message = str(error.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in message and "network unreachable" in message
    assert str(tmp_path / "hub" / "checkpoints") in message and "TORCH_HOME" in message


# ----------------------------------------------------------------------------- the Fashion-MNIST network

def test_classifier_input_conversion():
    gray = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    x = fmnist_classifier.to_classifier_input(gray)
    assert x.shape == (2, 1, 32, 32)
    assert torch.all(x[..., :2, :] == -1) and torch.all(x[..., :, -2:] == -1)  # black padding
    assert torch.allclose(x[..., 2:30, 2:30], gray.float() / 127.5 - 1)
    assert torch.equal(fmnist_classifier.to_classifier_input(gray.expand(-1, 3, -1, -1)), x)  # gray stored as RGB
    with pytest.raises(ValueError, match="uint8"):
        fmnist_classifier.to_classifier_input(gray.float())


def test_class_accuracy_per_class():
    class Brightness(fmnist_classifier.FashionMNISTClassifier):
        """Predicts class 1 for bright images, class 0 otherwise."""
        def forward(self, x):
            bright = (x.mean(dim=(1, 2, 3)) > 0).long()
            return torch.nn.functional.one_hot(bright, 10).float()

    images = np.zeros((6, 32, 32, 1), np.uint8)
    images[3:] = 255
    labels = np.array([0, 0, 1, 1, 1, 2])  # right: 0, 0, -, 1, 1, -
    result = fmnist_classifier.class_accuracy(images, labels, Brightness(widths=(4, 8, 8)))
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["per_class"][:3] == [1.0, pytest.approx(2 / 3), 0.0] and result["per_class"][3] is None
    assert result["count"][:4] == [2, 3, 1, 0]


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, fmnist_classifier.DEFAULT_CHECKPOINT)),
                    reason="no trained classifier in results/ (python fmnist_classifier.py trains it)")
@pytest.mark.skipif(not os.path.isdir(datasets.FASHION_MNIST_PATH),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_trained_classifier_accuracy_on_test_images():
    images, labels = datasets.load_fashion_mnist(split="test")
    model = fmnist_classifier.load_classifier(os.path.join(ROOT, fmnist_classifier.DEFAULT_CHECKPOINT))
    result = fmnist_classifier.class_accuracy(images[:2000, ..., None], labels[:2000], model)
    assert result["accuracy"] >= 0.9


def test_inception_spatial_features_have_adm_layout(monkeypatch):
    # Randomly initialized Inception (its weights cannot be downloaded here): shapes and layer only.
    monkeypatch.setattr(evaluate, "ensure_inception_weights", lambda: None)
    monkeypatch.setattr(torch_fidelity.feature_extractor_inceptionv3, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(torch_fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    extractor = evaluate.build_extractor.__wrapped__("inception", 64, None, "cpu")  # bypass the cache
    features = evaluate.extract_features(blobs(2, 10), extractor)
    assert features["features"].shape == (2, 64) and features["logits"].shape == (2, 1008)
    # ADM's sFID: 7 channels of the 17x17 mixed_6/conv map, after its ReLU.
    assert features["spatial"].shape == (2, 7 * 17 * 17) and (features["spatial"] >= 0).all()
    assert "mu_s" not in evaluate.summarize({"features": np.random.rand(100, 4), "spatial": features["spatial"]})
