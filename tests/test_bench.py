"""bench.py as a smoke test on CPU: every system gets a row, files are written, OOM is a cell."""
import json

import pytest
import torch

import bench
import models


def run(tmp_path, benchmark, **overrides):
    args = bench.parse_args([benchmark, "--device", "cpu", "--out-dir", str(tmp_path), "--warmup", "1",
                             "--repeats", "1", "--budget", "5", "--batch", "2", "--grids", "4", "--size", "T",
                             "--images", "8", "--patches", "2", "--dim", "16", "--heads", "2"])
    for key, value in overrides.items():
        setattr(args, key, value)
    bench.main(args)
    with open(tmp_path / f"{benchmark}.json") as f:
        return json.load(f)["rows"]


def test_mixer_and_table5_smoke(tmp_path):
    for benchmark, systems in (("mixer", bench.MIXERS), ("table5", list(bench.SYSTEMS))):
        rows = run(tmp_path, benchmark)
        assert [row["system"] for row in rows] == systems
        assert all(isinstance(row["seconds"], float) and row["seconds"] > 0 for row in rows)
        assert (tmp_path / f"{benchmark}.png").stat().st_size > 0
    params = {row["system"]: float(row["params_M"]) for row in rows}
    assert params["no-mixer"] < params["attn-sdpa"] == params["attn-naive"] < params["pdessm-pairwise"]


def test_grad_checkpoint_recomputes_every_block(tmp_path, monkeypatch):
    # --grad-checkpoint reaches the models: each training step runs every block of every system
    # through torch.utils.checkpoint, and without the flag none.
    calls = []
    checkpoint = models.checkpoint
    monkeypatch.setattr(models, "checkpoint", lambda *args, **kwargs: calls.append(1) or checkpoint(*args, **kwargs))
    systems = ["attn-sdpa", "pdessm-pairwise"]
    run(tmp_path, "table5", systems=systems)
    assert calls == []
    rows = run(tmp_path, "table5", systems=systems, grad_checkpoint=True)
    depth = len(bench.build_system("T", 2, 8, "attn-sdpa", torch.device("cpu"))[0].blocks)
    assert [row["system"] for row in rows] == systems
    assert len(calls) == len(systems) * depth * 2      # warm-up and one repeat, per system


def test_no_mixer_takes_out_exactly_the_attention():
    # DiT-T/2's blocks each lose one attention: qkv (d x 3d, 3d biases) and proj (d x d, d biases).
    models = {system: bench.build_system("T", 2, 8, system, torch.device("cpu"))
              for system in ("attn-sdpa", "no-mixer")}
    (dit, dit_params), (floor, floor_params) = models["attn-sdpa"], models["no-mixer"]
    d, depth = dit.blocks[0].norm1.normalized_shape[0], len(dit.blocks)
    assert dit_params - floor_params == depth * (4 * d * d + 4 * d)
    x = torch.randn(2, 16, d)
    assert all(torch.equal(block.attn(x, (4, 4)), x) for block in floor.blocks)


def test_the_mixer_benchmark_refuses_the_no_mixer_floor(tmp_path):
    with pytest.raises(SystemExit, match="mixer times mixers alone; no-mixer is a model-table system: choose "
                                         "from attn-sdpa, attn-naive"):
        run(tmp_path, "mixer", systems=["attn-sdpa", "no-mixer"])
    assert not (tmp_path / "mixer.json").exists()


@pytest.mark.parametrize("table,lines", [
    ("scaling", ["attn-sdpa", "pdessm-pairwise"]),       # one token count per image size: a line per system
    ("table5", ["attn-sdpa, 8 px", "pdessm-pairwise, 8 px", "attn-sdpa, 16 px", "pdessm-pairwise, 16 px"])])
def test_plot_lines_follow_the_token_counts(tmp_path, monkeypatch, table, lines):
    # (The parameter is not named `benchmark`, the fixture of the pytest-benchmark plugin.)
    drawn = {}

    def plot_lines(rows, x_key, series_key, path, title, xlabel):
        for row in rows:
            drawn.setdefault(row[series_key], []).append(row[x_key])

    monkeypatch.setattr(bench, "plot_lines", plot_lines)
    run(tmp_path, table, images=[8, 16], patches=[1, 2], grids=[2, 4], systems=["attn-sdpa", "pdessm-pairwise"])
    assert list(drawn) == lines
    assert all(len(tokens) == len(set(tokens)) > 1 for tokens in drawn.values())


def test_plot_of_model_sizes_follows_the_parameter_counts(tmp_path, monkeypatch):
    # Table 9's cells share one token count and differ in model size: each system's line runs
    # over its own models' parameter counts (two sizes here, as table9's four at 256 px).
    drawn = {}

    def plot_lines(rows, x_key, series_key, path, title, xlabel):
        for row in rows:
            drawn.setdefault(row[series_key], []).append(row[x_key])

    monkeypatch.setattr(bench, "plot_lines", plot_lines)
    args = bench.parse_args(["table9", "--device", "cpu", "--out-dir", str(tmp_path), "--warmup", "0",
                             "--repeats", "1", "--batch", "1", "--systems", "attn-sdpa", "pdessm-pairwise"])
    cpu = torch.device("cpu")
    bench.bench_models(args, cpu, [("T", 2, 8), ("S", 2, 8)], bench.forward_pass, "table9", "t", by_params=True)
    expected = {system: [bench.build_system(size, 2, 8, system, cpu)[1] for size in ("T", "S")]
                for system in args.systems}
    assert drawn == expected


def test_table9_takes_one_size_on_request(monkeypatch):
    # --size times table9's one model (a compiled run of all four can outlast a job's time limit).
    seen = []
    monkeypatch.setattr(bench, "bench_models", lambda args, device, cells, *rest, **options: seen.append(cells))
    for flags in ([], ["--size", "L"]):
        bench.bench_table9(bench.parse_args(["table9", *flags]), torch.device("cpu"))
    assert seen == [[("S", 2, 256), ("B", 2, 256), ("L", 2, 256), ("XL", 2, 256)], [("L", 2, 256)]]


def test_out_of_memory_is_reported_not_raised():
    def step():
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    assert bench.measure(step, torch.device("cpu")) == ("OOM", None)


def test_median_of_repeats():
    calls = []
    assert bench.measure(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=5)[0] >= 0
    assert len(calls) == 7


def test_symbol_benchmark_needs_a_gpu_with_triton():
    with pytest.raises(SystemExit, match="symbol times the fused Triton kernel: it needs a CUDA device and Triton"):
        bench.main(bench.parse_args(["symbol", "--device", "cpu"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernel needs a CUDA GPU")
def test_symbol_benchmark_rows_and_errors_against_float64(tmp_path):
    # Every path against the product in float64: the PyTorch path in float32 to rounding, the kernel
    # to tf32, and on bf16 spectra (the float64 product on the same bf16 values) to the symbol's
    # rounding to bf16, with the row kernel (the 32x32 grid) and without it.
    rows = run(tmp_path, "symbol", device="cuda", batch=4, dim=48, grids=[4, 32])
    paths = ["pytorch", "fused", "fused-bf16", "fused-bf16-unstepped"]
    assert [(row["grid"], row["path"]) for row in rows] == [(grid, path) for grid in ("4x4", "32x32") for path in paths]
    tolerance = {"pytorch": 1e-5, "fused": 5e-3, "fused-bf16": 1e-2, "fused-bf16-unstepped": 1e-2}
    assert all(row["error"] < tolerance[row["path"]] for row in rows)
    assert all(row["seconds"] > 0 and row["peak_bytes"] > 0 for row in rows)


def test_kernels_benchmark_needs_a_gpu_with_triton():
    with pytest.raises(SystemExit, match="kernels times the fused Triton kernels: it needs a CUDA device and Triton"):
        bench.main(bench.parse_args(["kernels", "--device", "cpu"]))


def test_tiles_flag_takes_name_int_pairs(capsys):
    assert bench.parse_args(["kernels", "--tiles", "BLOCK_F=2,BLOCK_R=16,"]).tiles == {"BLOCK_F": 2, "BLOCK_R": 16}
    for bad in ("BLOCK_F", "BLOCK_F=two", "=4"):
        with pytest.raises(SystemExit):
            bench.parse_args(["kernels", "--tiles", bad])
        assert f"{bad!r} is not NAME=INT; expected e.g. BLOCK_F=2,BLOCK_R=16" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels need a CUDA GPU")
def test_kernels_benchmark_rows_and_errors_against_float64(tmp_path):
    # Each launch against the float64 product, adjoint and coefficient gradient on the same bf16 values
    # (to the symbol's rounding to bf16). At batch 4 the products step the symbol along the rows of
    # grids of 32 and more, the gradient on every grid; ROW_STEPS=0 makes it exactly everywhere.
    rows = run(tmp_path, "kernels", device="cuda", batch=4, dim=48, grids=[4, 32])
    assert [(row["grid"], row["kernel"], row["symbol"]) for row in rows] == [
        ("4x4", "product", "exact"), ("4x4", "adjoint", "exact"), ("4x4", "gradient", "row steps"),
        ("32x32", "product", "row steps"), ("32x32", "adjoint", "row steps"), ("32x32", "gradient", "row steps")]
    assert all(row["error"] < 1e-2 and row["seconds"] > 0 for row in rows)
    rows = run(tmp_path, "kernels", device="cuda", batch=4, dim=48, grids=[32], tiles=dict(ROW_STEPS=0))
    assert [row["symbol"] for row in rows] == ["exact"] * 3 and all(row["error"] < 1e-2 for row in rows)
    with pytest.raises(SystemExit, match="--tiles: tiles BLOCK_M: no kernel takes these"):
        run(tmp_path, "kernels", device="cuda", batch=4, dim=48, grids=[4], tiles=dict(BLOCK_M=16))


def test_cuda_graph_needs_a_cuda_model_table():
    with pytest.raises(SystemExit, match="--cuda-graph needs a CUDA device"):
        bench.main(bench.parse_args(["mixer", "--device", "cpu", "--cuda-graph"]))


def test_a_model_table_refuses_a_size_without_its_patches(tmp_path):
    # table8 times patches 8, 4 and 2; the tiny size T has patches 1, 2 and 4 only.
    with pytest.raises(ValueError, match=r"needs DiT-T/8, .* patch 8 comes in sizes XL, L, B, S, size T in "
                                         r"patches 1, 2, 4; choose another --size"):
        run(tmp_path, "table8")
    assert not (tmp_path / "table8.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_model_tables_replay_cuda_graphs(tmp_path):
    # table5 at T/2 on 8 px; table8 at 256 px in its patches 8, 4 and 2, which start at size S.
    for benchmark, size, cells in (("table5", "T", 1), ("table8", "S", 3)):
        rows = run(tmp_path, benchmark, device="cuda", cuda_graph=True, size=size)
        assert [row["system"] for row in rows] == list(bench.SYSTEMS) * cells
        assert all(isinstance(row["seconds"], float) and row["seconds"] > 0 for row in rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_compiled_model_tables_replay_cuda_graphs(tmp_path):
    # torch.compile's graphs (the fused product's launches among them) captured into the step's CUDA graph.
    systems = ["attn-sdpa", "pdessm-pairwise"]
    rows = run(tmp_path, "table5", device="cuda", cuda_graph=True, compile=True, systems=systems)
    assert [row["system"] for row in rows] == systems
    assert all(isinstance(row["seconds"], float) and row["seconds"] > 0 for row in rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak CUDA memory needs a CUDA GPU")
def test_cuda_graph_cells_report_the_peak_of_their_own_step(tmp_path):
    # A replayed graph allocates nothing: its activations show only while it is captured, after the
    # same eager warm-up steps that an eager cell runs. So a graph cell's peak is at least the eager
    # cell's, and the third cell, a repeat of the first, finds the memory of the first two freed.
    systems = ["attn-sdpa", "pdessm-pairwise", "attn-sdpa"]
    options = dict(device="cuda", size="T", images=[32], batch=32, systems=systems)
    eager = [row["peak_bytes"] for row in run(tmp_path, "table5", **options)]
    graph = [row["peak_bytes"] for row in run(tmp_path, "table5", cuda_graph=True, **options)]
    for peaks in (eager, graph):
        assert peaks[2] == pytest.approx(peaks[0], rel=0.05)
    for e, g in zip(eager, graph):
        assert e * 0.9 <= g <= e * 2.5
