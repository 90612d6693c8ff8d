"""demo.py (`make demo`) in miniature: both models trained a few steps, grids, curves and the table; a
rerun reports the recipe the checkpoints were trained with, not the new flags."""
import os

from PIL import Image

import demo


def table_row(text, label):
    """The cells after the label of the results table's row `label`."""
    row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in row.strip("|").split("|")][1:]


def test_demo_runs_short_and_reports_its_recipe(tmp_path):
    flags = ["--out", str(tmp_path), "--steps", "3", "--batch-size", "8", "--per-class", "3",
             "--num-sampling-steps", "1", "--sampler", "euler"]
    demo.main(demo.parse_args(flags))   # fewer steps than the usual log interval of 25
    for name in ("DiT-T-2.png", "PDESSM-DiT-T-2.png", "loss.png", "results.md"):
        assert os.path.isfile(tmp_path / name)
    # One row per class of 3 samples each: 16x16 digits shown 4x, 4 pixels of padding.
    assert Image.open(tmp_path / "DiT-T-2.png").size == (3 * 68 + 4, 10 * 68 + 4)
    table = open(tmp_path / "results.md").read()
    assert table_row(table, "training steps") == ["3", "3", ""]
    assert table_row(table, "learning rate") == ["0.001", "0.001", ""]

    # The checkpoints are done: a rerun with another learning rate trains nothing and says so in its table.
    demo.main(demo.parse_args(flags + ["--lr", "0.5"]))
    assert table_row(open(tmp_path / "results.md").read(), "learning rate") == ["0.001", "0.001", ""]
