"""visualize.py: training curves from metrics.jsonl, learned kernels and SSM maps of a tiny PDESSM-DiT checkpoint."""
import argparse
import json
import math

import matplotlib.axes
import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import evaluate
import models
import visualize

MODEL_KWARGS = dict(input_size=8, in_channels=1, num_classes=3, learn_sigma=False)


def write_run(folder, records):
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(folder)


def read_png(path):
    with Image.open(path) as image:
        return image.format, image.size


def test_curves_plot_the_logged_loss_and_fid(tmp_path, monkeypatch):
    dit = write_run(tmp_path / "dit", [{"step": 100, "loss": 0.9}, {"step": 200, "loss": 0.7},
                                       {"step": 200, "fid": 80.0}, {"step": 300, "loss": 0.6},
                                       {"step": 400, "fid": 40.0}])
    ssm = write_run(tmp_path / "ssm", [{"step": 100, "loss": 0.8}, {"step": 200, "loss": 0.65}])
    drawn = []
    real_plot = matplotlib.axes.Axes.plot
    def spy(self, *args, **kwargs):
        drawn.append((self.get_title(), kwargs.get("label"), list(args[0]), list(args[1])))
        return real_plot(self, *args, **kwargs)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    out = tmp_path / "curves.png"
    visualize.plot_curves([dit, ssm], str(out), labels=["DiT", "PDE-SSM-DiT"], internal_fid=5.0)
    assert read_png(out)[0] == "PNG"
    # Axes are titled after plotting; the loss curves come first, in run order.
    assert [d[1:] for d in drawn] == [("DiT", [100, 200, 300], [0.9, 0.7, 0.6]), ("DiT", [200, 400], [80.0, 40.0]),
                                      ("PDE-SSM-DiT", [100, 200], [0.8, 0.65])]
    # evaluate.py --plot-curves draws with the same function.
    evaluate.main(argparse.Namespace(plot_curves=[dit, ssm], out=str(tmp_path / "via_evaluate.png")))
    assert read_png(tmp_path / "via_evaluate.png")[0] == "PNG"
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        visualize.plot_curves([str(tmp_path / "missing")], str(out))


def test_gradient_norms_plot_each_group_of_each_run(tmp_path, monkeypatch):
    def record(step, total, **groups):
        return {"step": step, "loss": 0.5, "grad_norm": 0.1, "grad_norm_max": total, "grad_norm_max_by_group": groups}
    dit = write_run(tmp_path / "dit", [record(100, 2.0, mixer=1.0, other=1.5), {"step": 100, "fid": 9.0},
                                       record(200, 3.0, mixer=2.5, other=0.5)])
    ssm = write_run(tmp_path / "ssm", [record(100, 4.0, pde=0.1, mixer=3.0, other=2.0),
                                       record(200, 5.0, pde=0.2, mixer=1.0, other=4.0)])
    old = write_run(tmp_path / "old", [{"step": 100, "loss": 0.5, "grad_norm": 0.1, "grad_norm_max": 7.0}])
    drawn = []
    real_plot = matplotlib.axes.Axes.plot
    def spy(self, *args, **kwargs):
        drawn.append((self, kwargs.get("label"), list(args[0]), list(args[1])))
        return real_plot(self, *args, **kwargs)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    out = tmp_path / "gradients.png"
    visualize.plot_gradient_norms([dit, ssm, old], str(out), labels=["DiT", "PDE-SSM-DiT", "before groups"])
    assert read_png(out)[0] == "PNG"
    panels = {}
    for ax, label, steps, values in drawn:
        panels.setdefault(ax.get_title(), []).append((label, steps, values))
    # Groups in the order they first appear; a run without a group has no line in its panel.
    assert list(panels) == ["all parameters", "rest of the spatial mixers", "everything else",
                            "PDE coefficients (K, b, r, tau)"]
    assert panels["all parameters"] == [("DiT", [100, 200], [2.0, 3.0]), ("PDE-SSM-DiT", [100, 200], [4.0, 5.0]),
                                        ("before groups", [100], [7.0])]
    assert panels["rest of the spatial mixers"] == [("DiT", [100, 200], [1.0, 2.5]),
                                                    ("PDE-SSM-DiT", [100, 200], [3.0, 1.0])]
    assert panels["PDE coefficients (K, b, r, tau)"] == [("PDE-SSM-DiT", [100, 200], [0.1, 0.2])]
    assert [visualize.logs_gradient_groups(run) for run in (dit, ssm, old)] == [True, True, False]
    visualize.main(argparse.Namespace(command="gradients", runs=[ssm], labels=None, out=str(tmp_path / "cli.png")))
    assert read_png(tmp_path / "cli.png")[0] == "PNG"
    with pytest.raises(ValueError, match="grad_norm_max_by_group"):
        visualize.plot_gradient_norms([old], str(out))


def test_metrics_of_a_resumed_run_keep_the_process_that_went_on(tmp_path):
    # Logged to step 5 (FID at 4), killed, resumed from the step-3 checkpoint and run to 6.
    first = [{"step": s, "loss": 1.0} for s in (1, 2, 3, 4)] + [{"step": 4, "fid": 9.0}, {"step": 5, "loss": 1.0}]
    second = [{"step": 4, "loss": 2.0}, {"step": 4, "fid": 8.0}, {"step": 5, "loss": 2.0}, {"step": 6, "loss": 2.0}]
    run = write_run(tmp_path / "run", first + second)
    assert [(r["step"], r.get("loss"), r.get("fid")) for r in visualize.read_metrics(run)] == [
        (1, 1.0, None), (2, 1.0, None), (3, 1.0, None), (4, 2.0, None), (4, None, 8.0), (5, 2.0, None),
        (6, 2.0, None)]
    # Killed after logging step 5, resumed from the step-4 checkpoint: the new process logs step 5 again.
    third = [{"step": 5, "loss": 3.0}, {"step": 6, "loss": 3.0}]
    run = write_run(tmp_path / "again", first + third)
    assert [(r["step"], r.get("loss"), r.get("fid")) for r in visualize.read_metrics(run)] == [
        (1, 1.0, None), (2, 1.0, None), (3, 1.0, None), (4, 1.0, None), (4, None, 9.0), (5, 3.0, None),
        (6, 3.0, None)]


@pytest.fixture
def pdessm_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = models.build_model("PDESSM-DiT-T/2", **MODEL_KWARGS)
    mixer = model.blocks[1].attn
    with torch.no_grad():
        # Every kernel of block 1 narrow except out 5 <- in 7: K = e^-4 I versus e^2 I (tau = 1), no shift.
        mixer.chol.copy_(torch.tensor([-2.0, 0.0, -2.0]).expand_as(mixer.chol))
        mixer.chol[0, 5, 7] = torch.tensor([1.0, 0.0, 1.0])
        mixer.log_tau.zero_()
        mixer.b.zero_()
    state = {"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "step": 0, "epoch": 0,
             "batch_in_epoch": 0, "model_kwargs": MODEL_KWARGS,
             "args": {"model": "PDESSM-DiT-T/2", "image_size": 8, "space": "pixel"}}
    path = str(tmp_path / "0000000.pt")
    checkpoint.save_checkpoint(state, path)
    return path


def test_learned_kernels_order_labels_and_mass(pdessm_checkpoint):
    model, _ = checkpoint.load_model(pdessm_checkpoint, "cpu")
    mixer = model.blocks[1].attn
    kernels, labels = visualize.learned_kernels(mixer, model.grid_size, count=5)
    assert kernels.shape == (5, 4, 4) and len(labels) == 5
    assert labels[-1] == "out 5 <- in 7"  # the widest receptive field comes last
    # The kernel's mass is the symbol at k = 0: sum_x G(x) = exp(tau r).
    _, _, r, tau = mixer.pde_parameters()
    for kernel, label in zip(kernels, labels):
        i, j = (int(s) for s in label.replace("out ", "").split(" <- in "))
        assert kernel.sum().item() == pytest.approx(math.exp(tau[0, i, j].item() * r[0, i, j].item()), rel=1e-5)
    # The wide kernel spreads its mass; the narrow ones keep it at the centre (2, 2) of the 4x4 grid.
    assert kernels[-1].max() < 0.5 * kernels[-1].sum() and kernels[0][2, 2] > 0.8 * kernels[0].sum()


def test_kernels_and_ssm_maps_write_pngs(pdessm_checkpoint, tmp_path):
    images = np.zeros((3, 8, 8, 1), np.uint8)
    images[0, 2:6, 2:6] = 255
    images[1, :, :4] = 200
    np.savez(tmp_path / "images.npz", arr_0=images)
    common = dict(ckpt=pdessm_checkpoint, weights="ema")
    visualize.main(argparse.Namespace(command="kernels", out=str(tmp_path / "kernels.png"), count=4, **common))
    visualize.main(argparse.Namespace(command="ssm-maps", out=str(tmp_path / "maps.png"), images=str(tmp_path / "images.npz"),
                                      split="test", num_images=2, t=1.0, blocks=[0, 3], **common))
    for name in ("kernels.png", "maps.png"):
        assert read_png(tmp_path / name)[0] == "PNG"
    model, state = checkpoint.load_model(pdessm_checkpoint, "cpu")
    x = visualize.model_input(images, model, state["args"])
    assert x.shape == (3, 1, 8, 8) and x.min() == -1 and x.max() == 1
    maps = visualize.ssm_maps(model, x, t=1.0, y=torch.tensor([3, 3, 3]))
    assert sorted(maps) == [0, 1, 2, 3]
    assert all(m.shape == (3, 4, 4) and torch.isfinite(m).all() and (m >= 0).all() for m in maps.values())
    assert not torch.allclose(maps[0][0], maps[0][1])  # different images, different maps
    with pytest.raises(ValueError, match="not PDE-SSM blocks"):
        visualize.ssm_maps(model, x, blocks=[7])


def test_attention_model_has_no_kernels():
    model = models.build_model("DiT-T/2", **MODEL_KWARGS)
    with pytest.raises(ValueError, match="no PDE-SSM blocks"):
        visualize.pdessm_blocks(model)
