"""reproduce.py end to end on a tiny Fashion-MNIST-format dataset with the tiny model configs: Table 1
with all three rows, skipping finished legs, continuing a leg when --max-steps grows, and Table 7."""
import glob
import gzip
import json
import os
import re
import struct

import numpy as np
import pytest
import torch

import datasets
import evaluate
import fmnist_classifier
import models
import reproduce
from pde_ssm import PDESSM

NUM_TEST = 80
# 8 px images, 2 steps at batch 8, 70 samples (FID needs more than its 64 features) with one Euler step.
TINY = ["--model-scale", "tiny", "--image-size", "8", "--global-batch-size", "8", "--num-workers", "0",
        "--log-every", "1", "--ckpt-every", "100", "--num-samples", "70", "--sampler", "euler",
        "--num-sampling-steps", "1", "--mse-images", str(NUM_TEST), "--eval-batch-size", "80"]


def write_idx_gz(path, array):
    """A gzipped IDX file of uint8 data: bytes 0, 0, type code 0x08, ndim, then big-endian dims and the data."""
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """
    Fashion-MNIST's four IDX files with 100 train and 80 test images (class k: a bar at row 2 + 2k) and
    an untrained tiny classifier. The test split has a mid-gray background and the train split a black
    one, so the MSE tells which split it was measured on.
    """
    folder = tmp_path_factory.mktemp("fashion-mnist")
    rng = np.random.default_rng(0)
    for prefix, count, background in (("train", 100, 0), ("t10k", NUM_TEST, 128)):
        labels = np.arange(count, dtype=np.uint8) % 10
        images = (background + rng.integers(0, 20, (count, 28, 28))).astype(np.uint8)
        for image, k in zip(images, labels):
            image[2 + 2 * k: 6 + 2 * k, 4:24] = 250
        write_idx_gz(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx_gz(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    torch.manual_seed(0)
    classifier = str(folder / "classifier.pt")
    fmnist_classifier.save_classifier(fmnist_classifier.FashionMNISTClassifier(widths=(4, 8, 8)), classifier,
                                      test_accuracy=0.0)
    return str(folder), classifier


def run(table, data, results_dir, *flags, monkeypatch):
    # No Inception weights here: the offline switch makes evaluate.py say so at once instead of trying the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reproduce.inception_available.cache_clear()
    folder, classifier = data
    reproduce.main(reproduce.parse_args([table, "--data-path", folder, "--classifier", classifier,
                                         "--results-dir", str(results_dir), *TINY, *flags]))
    return os.path.join(results_dir, f"{table}-fashion-mnist")


def table_rows(path):
    """{first cell: [cells]} of the first Markdown table in a file."""
    rows = {}
    for line in open(path).read().split("\n\n")[1].splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def leg_mtimes(out, legs=("dit", "unet", "pdessm-dit")):
    """{path: mtime} of every file in the leg folders (the tables and figures are rewritten on every call)."""
    return {path: os.stat(path).st_mtime_ns for leg in legs
            for path in glob.glob(os.path.join(out, leg, "**", "*"), recursive=True) if os.path.isfile(path)}


def test_report_only_writes_an_empty_table_and_trains_nothing(tmp_path, data, monkeypatch):
    out = run("table1", data, tmp_path, "--report-only", monkeypatch=monkeypatch)
    rows = table_rows(os.path.join(out, "table.md"))
    assert list(rows) == ["DiT", "U-Net", "PDE-SSM-DiT"]
    assert all(cells[0] == "not run yet" for cells in rows.values())
    assert sorted(os.listdir(out)) == ["internal_fid.json", "table.json", "table.md"]


def test_fid_proxy_samples_are_checked_before_any_leg(tmp_path):
    args = ["table1", "--dataset", "cifar10", "--results-dir", str(tmp_path), "--eval-every", "100"]
    with pytest.raises(ValueError, match="exceed the 2048 features of the FID proxy on cifar10"):
        reproduce.main(reproduce.parse_args(args + ["--eval-samples", "2000"]))
    assert os.listdir(tmp_path) == []


def test_internal_fid_is_kept_for_its_own_feature_network(tmp_path, data, monkeypatch):
    folder, classifier = data
    torch.manual_seed(1)
    other = str(tmp_path / "other.pt")
    fmnist_classifier.save_classifier(fmnist_classifier.FashionMNISTClassifier(widths=(4, 8, 8)), other,
                                      test_accuracy=0.0)
    fids = []
    for weights in (classifier, other, classifier):
        run("table1", data, tmp_path, "--report-only", "--classifier", weights, monkeypatch=monkeypatch)
        with open(os.path.join(tmp_path, "table1-fashion-mnist", "internal_fid.json")) as f:
            fids.append(json.load(f)["fid"])
    assert fids[0] != fids[1] and fids[2] == fids[0]


def test_table1_three_rows_skip_finished_legs_and_continue_one(tmp_path, data, monkeypatch, capsys):
    # EMA decay 1 keeps the EMA at the initial weights, where a DiT predicts exactly zero (adaLN-Zero):
    # its MSE is then E||x1 - x0||^2 per pixel = mean(x1^2) + 1 over the test images.
    out = run("table1", data, tmp_path, "--max-steps", "2", "--ema-decay", "1", monkeypatch=monkeypatch)
    rows = table_rows(os.path.join(out, "table.md"))
    assert list(rows) == ["DiT", "U-Net", "PDE-SSM-DiT"]
    folder, _ = data
    test_x = torch.stack([x for x, _ in datasets.build_dataset("fashion-mnist", folder, 8, split="test")])
    for label, leg, model in (("DiT", "dit", "DiT-T/2"), ("U-Net", "unet", "UNet-T"),
                              ("PDE-SSM-DiT", "pdessm-dit", "PDESSM-DiT-T/2")):
        params, mse, fid, fid_fmnist, accuracy, step_time, memory, steps = rows[label]
        net = models.build_model(model, input_size=8, in_channels=1, num_classes=10, learn_sigma=False)
        assert float(params) == pytest.approx(sum(p.numel() for p in net.parameters() if p.requires_grad) / 1e6,
                                              abs=0.05)
        if label != "U-Net":
            assert float(mse) == pytest.approx(test_x.pow(2).mean().item() + 1, abs=0.06)
        assert fid == "n/a (no Inception weights)" and float(fid_fmnist) >= 0
        assert 0 <= float(accuracy.rstrip("%")) <= 100
        assert float(step_time) > 0 and steps == "2"
        # Peak memory is measured on CUDA only; each leg's log names the device it trained on.
        device = re.search(r"process\(es\) on (\w+)", open(os.path.join(out, leg, "log.txt")).read()).group(1)
        assert (float(memory) > 0) if device == "cuda" else (memory == "n/a (CPU)"), (device, memory)
    assert test_x.pow(2).mean() < 0.5  # the gray test split, not the black train split (mean(x1^2) near 1)
    for name in ("samples.png", "curves.png", "gradients.png", "table.json", "internal_fid.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    samples = np.load(reproduce.read_json(os.path.join(out, "dit", "result.json"))["samples"])
    assert samples["arr_0"].shape == (70, 8, 8, 1)

    # The same command again: every leg is done, nothing is retrained, resampled or re-evaluated.
    before = leg_mtimes(out)
    capsys.readouterr()
    run("table1", data, tmp_path, "--max-steps", "2", "--ema-decay", "1", monkeypatch=monkeypatch)
    assert capsys.readouterr().out.count("done already") == 3
    assert leg_mtimes(out) == before

    # More steps for one leg: it continues from its checkpoint; the other legs stay as they were.
    others = leg_mtimes(out, ("unet", "pdessm-dit"))
    run("table1", data, tmp_path, "--max-steps", "4", "--ema-decay", "1", "--legs", "dit", monkeypatch=monkeypatch)
    dit = os.path.join(out, "dit")
    assert sorted(os.listdir(os.path.join(dit, "checkpoints"))) == ["0000002.pt", "0000004.pt"]
    assert re.search(r"Resumed from .*0000002\.pt at step 2", open(os.path.join(dit, "log.txt")).read())
    assert [r["step"] for r in reproduce.read_metrics(dit) if "loss" in r] == [1, 2, 3, 4]
    rows = table_rows(os.path.join(out, "table.md"))
    assert (rows["DiT"][-1], rows["U-Net"][-1], rows["PDE-SSM-DiT"][-1]) == ("4", "2", "2")
    assert leg_mtimes(out, ("unet", "pdessm-dit")) == others


def test_table7_six_variants_with_removed_terms_frozen(tmp_path, data, monkeypatch, capsys):
    out = run("table7", data, tmp_path, "--max-steps", "1", monkeypatch=monkeypatch)
    capsys.readouterr()
    run("table7", data, tmp_path, "--max-steps", "1", monkeypatch=monkeypatch)
    assert capsys.readouterr().out.count("done already") == 6
    text = open(os.path.join(out, "table7.md")).read()
    header = text.split("\n\n")[1].splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")][1:] == [
        "Baseline", "Diffusion + Reaction", "Diffusion + Convection", "Convection", "Diffusion", "Reaction"]
    rows = table_rows(os.path.join(out, "table7.md"))
    name, cells = next(iter(rows.items()))
    assert name.startswith("FID (fmnist-64, first 70 samples)")
    assert len(cells) == 6 and all(float(c) >= 0 for c in cells)
    assert rows["Training steps"] == ["1"] * 6
    # One step: its logged loss is both the final loss and the largest after the first tenth.
    logged = [f"{reproduce.read_metrics(os.path.join(out, leg))[0]['loss']:.3f}" for leg in reproduce.TABLE7_LEGS]
    assert rows["Training loss, mean of the last tenth of the steps"] == logged
    assert rows["Largest logged training loss after the first tenth (spikes)"] == logged
    assert os.path.getsize(os.path.join(out, "samples.png")) and os.path.getsize(os.path.join(out, "curves.png"))
    # The diffusion-only variant was trained with convection and reaction removed: zero buffers, not parameters.
    result = reproduce.read_json(os.path.join(out, "diffusion", "result.json"))
    model, _ = reproduce.checkpoint.load_model(result["checkpoint"], "cpu")
    mixers = [m for m in model.modules() if isinstance(m, PDESSM)]
    assert mixers and all(m.terms == ("diffusion",) for m in mixers)
    for mixer in mixers:
        parameters = dict(mixer.named_parameters())
        assert "b" not in parameters and "r" not in parameters and "chol" in parameters
        assert not mixer.b.any() and not mixer.r.any()


def test_table7_fid_over_disjoint_sample_sets(tmp_path, data, monkeypatch):
    out = run("table7", data, tmp_path, "--max-steps", "1", "--legs", "full", "--num-samples", "140",
              "--fid-set-size", "70", monkeypatch=monkeypatch)
    result = reproduce.read_json(os.path.join(out, "full", "result.json"))
    assert result["set_size"] == 70 and len(result["fid_sets"]) == 2 and result["fid"] == result["fid_sets"][0]
    # Each set's FID computed directly on its slice of the samples.
    folder, classifier = data
    images = evaluate.load_images(result["samples"])
    for fid, part in zip(result["fid_sets"], (images[:70], images[70:140])):
        expected = evaluate.fid_proxy(part, folder, features="fmnist", feature_dim=64, split="test", weights=classifier)
        assert fid == pytest.approx(expected, rel=1e-6)
    rows = table_rows(os.path.join(out, "table7.md"))
    first, spread = rows["FID (fmnist-64, first 70 samples)"], rows["FID mean ± SD over 2 sets of 70"]
    fids = np.array(result["fid_sets"])
    assert first[0] == f"{fids[0]:.3f}" and spread[0] == f"{fids.mean():.3f} ± {fids.std(ddof=1):.3f}"
    assert first[1:] == spread[1:] == ["not run yet"] * 5

    # A result.json written before the sets were taken (one FID of all its samples) still reports: its FID in
    # the first row, and no mean-and-SD row, since it has one set.
    old = {k: v for k, v in result.items() if k not in ("fid_sets", "set_size")}
    os.makedirs(os.path.join(out, "reaction"))
    reproduce.write_json(os.path.join(out, "reaction", "result.json"), dict(old, leg="reaction", fid=7.5))
    run("table7", data, tmp_path, "--max-steps", "1", "--num-samples", "140", "--fid-set-size", "70",
        "--report-only", monkeypatch=monkeypatch)
    rows = table_rows(os.path.join(out, "table7.md"))
    assert list(rows)[:2] == ["FID (fmnist-64, first 70 samples)", "Training steps"]
    assert rows["FID (fmnist-64, first 70 samples)"] == [f"{fids[0]:.3f}"] + ["not run yet"] * 4 + ["7.500"]
    assert rows["Training steps"] == ["1", "", "", "", "", "1"]
    # The hand-written leg has no metrics.jsonl: its loss cells stay empty.
    assert rows["Training loss, mean of the last tenth of the steps"][1:] == [""] * 5


def test_loss_summary_of_a_resumed_run(tmp_path):
    # 100 steps logged every 5: loss 1 at first, a spike of 3 at step 40, 0.2 from step 90 on. A resumed
    # process logged steps 85 to 100 again (0.1 from step 90 on); its records replace the first ones.
    records = [dict(step=s, loss=3.0 if s == 40 else 0.2 if s >= 90 else 1.0) for s in range(5, 101, 5)]
    records += [dict(step=s, loss=0.1 if s >= 90 else 1.0) for s in range(85, 101, 5)]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in records))
    final, spike = reproduce.loss_summary(str(tmp_path), 100)
    assert final == pytest.approx(0.1) and spike == 3.0       # steps 95 and 100; the largest after step 10
    assert reproduce.loss_summary(str(tmp_path), 40) == (3.0, 3.0)   # a shorter run: only steps 40 and 5-40
    assert reproduce.loss_summary(str(tmp_path / "missing"), 100) == (None, None)


def test_fid_set_size_and_sample_count_must_exceed_the_features(tmp_path, data, monkeypatch):
    with pytest.raises(ValueError, match="--fid-set-size must exceed the 64 features.*got 64"):
        run("table7", data, tmp_path, "--fid-set-size", "64", monkeypatch=monkeypatch)
    with pytest.raises(ValueError, match="--num-samples must exceed the 64 features.*got 64"):
        run("table7", data, tmp_path, "--num-samples", "64", "--max-steps", "1", "--legs", "full",
            monkeypatch=monkeypatch)


def test_a_leg_trained_with_another_recipe_is_refused_and_left_as_it_was(tmp_path, data, monkeypatch):
    out = run("table7", data, tmp_path, "--max-steps", "1", "--legs", "full", monkeypatch=monkeypatch)
    leg = os.path.join(out, "full")
    finished = open(os.path.join(leg, "result.json")).read()
    # Another seed in the same results folder: sampling the seed-0 checkpoint would record it as seed 1's.
    with pytest.raises(ValueError, match=r"0000001\.pt was trained with another recipe.*"
                                         r"global_seed: checkpoint 0, flags 1.*another --results-dir"):
        run("table7", data, tmp_path, "--max-steps", "1", "--legs", "full", "--seed", "1", monkeypatch=monkeypatch)
    # More steps with another learning rate: the run is not continued under the new one.
    with pytest.raises(ValueError, match="lr: checkpoint 0.0005, flags 0.001"):
        run("table7", data, tmp_path, "--max-steps", "2", "--legs", "full", "--lr", "1e-3", monkeypatch=monkeypatch)
    assert os.listdir(os.path.join(leg, "checkpoints")) == ["0000001.pt"]
    assert open(os.path.join(leg, "result.json")).read() == finished
    # Sampling flags alone may change: the same checkpoint is sampled and evaluated again.
    run("table7", data, tmp_path, "--max-steps", "1", "--legs", "full", "--num-samples", "140",
        monkeypatch=monkeypatch)
    result = reproduce.read_json(os.path.join(leg, "result.json"))
    assert result["config"]["num_samples"] == 140 and result["checkpoint"].endswith("0000001.pt")
    assert os.listdir(os.path.join(leg, "checkpoints")) == ["0000001.pt"]


def test_unknown_leg_is_a_clear_error(tmp_path, data, monkeypatch):
    with pytest.raises(ValueError, match="unknown legs.*choose from dit, unet, pdessm-dit"):
        run("table1", data, tmp_path, "--legs", "transformer", monkeypatch=monkeypatch)
