"""Timing benchmarks: PDE-SSM against attention, side by side, in one run.

    python bench.py table5     # paper Table 5: DiT-S training step, 32/64 px, patch 2/4/8
    python bench.py table8     # paper Table 8: XL forward at 256 px, patch 8/4/2, batch 4
    python bench.py table9     # paper Table 9: S/B/L/XL forward at 256 px, patch 2, batch 4
    python bench.py scaling    # training step and peak memory against token count
    python bench.py mixer      # the mixer alone: forward + backward over grid sizes
    python bench.py symbol     # the pairwise symbol product alone: fused kernel (tf32, bf16) vs PyTorch (GPU)
    python bench.py kernels    # the fused pairwise kernels one launch at a time, bf16, any tiles (GPU)

Every table puts side by side: attention through SDPA (flash where available),
attention written out as softmax(QK^T)V (naive), and PDE-SSM with each coupling;
`symbol` puts the fused Triton kernel beside the PyTorch path it replaces, and
`kernels` times its launches one by one (for tile sweeps: --tiles).

Every cell is measured in the same process: warm-up first, then the median of
repeats, with CUDA synchronization (events) on GPU and bf16 autocast there
(`kernels`: the median of Triton's do_bench, launch by launch).
An out-of-memory cell is reported as OOM, not a crash. Results go to stdout as a
Markdown table and to --out-dir as JSON and a PNG plot.
"""
import argparse
import gc
import json
import os
import platform
import statistics
import time

import torch

import flow
import kernels
import pde_ssm
from models import Attention, DiT_models, build_model
from pde_ssm import PDESSM
from train import CUDAGraphStep


#################################################################################
#                               Measurement                                     #
#################################################################################

def start_cell(device):
    """Free what earlier cells left behind and restart CUDA's peak-memory counter.

    Call it before a cell builds its model: the peak that `measure` reports then covers
    the model, its warm-up and, with --cuda-graph, the graph capture. A replayed graph
    allocates nothing, so its step's activations are only seen while it is captured;
    a captured graph keeps its memory pool until the garbage collector frees it, and
    torch.compile's caches keep the models they compiled until they are reset.
    """
    torch._dynamo.reset()
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(step, device, warmup=3, repeats=10, budget=30.0):
    """Median seconds of step() and the peak CUDA memory in bytes since `start_cell` (None on CPU).

    Repeats are cut so one cell takes about `budget` seconds at most (one run at
    least). Returns ("OOM", None) when the step runs out of device memory.
    """
    try:
        t0 = time.perf_counter()
        for _ in range(max(1, warmup)):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        per_run = (time.perf_counter() - t0) / max(1, warmup)
        repeats = max(1, min(repeats, int(budget / max(per_run, 1e-9))))
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        return statistics.median(times), peak
    except torch.OutOfMemoryError:
        return "OOM", None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def autocast(device, cache_enabled=True):
    """bf16 autocast on GPU (the paper's and DiT's training precision); fp32 on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda",
                          cache_enabled=cache_enabled)


def environment(device):
    """What the numbers were measured on."""
    env = {"torch": torch.__version__, "device": str(device), "python": platform.python_version()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def fmt_time(t):
    return t if isinstance(t, str) else f"{t * 1e3:.2f}"


def fmt_mem(m):
    return "-" if m is None else f"{m / 2 ** 30:.2f}"


def write_results(name, rows, columns, out_dir, device, plot=None):
    """Print a Markdown table of rows (dicts) and write <name>.json (and a PNG)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    table = "\n".join(lines)
    print(table)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"environment": environment(device), "rows": rows}, f, indent=2)
    print(f"wrote {path}")
    if plot is not None:
        png = os.path.join(out_dir, f"{name}.png")
        plot(png)
        print(f"wrote {png}")
    return table


#################################################################################
#                    Whole models: DiT vs PDESSM-DiT (Tables 5, 8, 9)           #
#################################################################################

# The systems of every table: the DiT mixer and, for PDE-SSM, its coupling; and, in the
# model tables only, "no-mixer": DiT with every block's mixer taken out (`NoMixer`).
SYSTEMS = {
    "attn-sdpa": dict(mixer="attn"),
    "attn-naive": dict(mixer="attn", naive=True),
    "pdessm-diagonal": dict(mixer="pdessm", pdessm_coupling="diagonal"),
    "pdessm-heads": dict(mixer="pdessm", pdessm_coupling="heads"),
    "pdessm-pairwise": dict(mixer="pdessm", pdessm_coupling="pairwise"),
    "no-mixer": dict(mixer="attn", no_mixer=True),
}
MIXERS = [system for system in SYSTEMS if system != "no-mixer"]


class NoMixer(torch.nn.Module):
    """A block's spatial mixer replaced by the identity (its projections go too): the model
    tables' floor. A step of this model costs everything but the mixing, so no mixer,
    however fast, makes a step faster than this one; step minus floor is the mixer's share."""

    def forward(self, x, grid_size):
        return x


def build_system(size, patch, image_size, system, device, num_classes=10, channels=3, compile=False,
                 grad_checkpoint=False):
    """A DiT-<size>/<patch> with the mixer of `system`, in pixel space, on device; grad_checkpoint
    recomputes every block's activations in the backward (train.py --grad-checkpoint)."""
    options = dict(SYSTEMS[system])
    naive, no_mixer = options.pop("naive", False), options.pop("no_mixer", False)
    model = build_model(f"DiT-{size}/{patch}", input_size=image_size, in_channels=channels,
                        num_classes=num_classes, learn_sigma=False, grad_checkpoint=grad_checkpoint,
                        **options).to(device)
    for block in model.blocks:
        if naive:
            block.attn.naive = True
        if no_mixer:
            block.attn = NoMixer()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (torch.compile(model) if compile else model), params


def timed_step(step, inputs, cuda_graph):
    """step(*inputs) as a no-argument callable; with cuda_graph=True, warmed up and captured here
    (before any timing) and replayed as one CUDA graph."""
    if cuda_graph:
        step = CUDAGraphStep(step)
        for _ in range(step.warmup + 1):
            step(*inputs)
    return lambda: step(*inputs)


def training_step(model, batch, image_size, device, num_classes=10, channels=3, cuda_graph=False):
    """One flow-matching training step: forward, backward, AdamW update (bf16 autocast on GPU)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, capturable=cuda_graph,
                            fused=torch.device(device).type == "cuda")  # as train.py
    x = torch.randn(batch, channels, image_size, image_size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    model.train()

    def step(x, y):
        with autocast(device, cache_enabled=not cuda_graph):
            loss = flow.training_losses(model, x, dict(y=y))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()
    return timed_step(step, (x, y), cuda_graph)


def forward_pass(model, batch, image_size, device, num_classes=10, channels=3, cuda_graph=False):
    """One inference forward pass (eval mode, no autograd, bf16 autocast on GPU)."""
    x = torch.randn(batch, channels, image_size, image_size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    t = flow.network_time(torch.rand(batch, device=device))
    model.eval()

    def step(x, t, y):
        with torch.no_grad(), autocast(device, cache_enabled=not cuda_graph):
            return model(x, t, y)
    return timed_step(step, (x, t, y), cuda_graph)


def check_cells(name, cells):
    """Refuse, before timing anything, a (size, patch, image) cell that models.py has no DiT for."""
    for size, patch, _ in cells:
        if f"DiT-{size}/{patch}" not in DiT_models:
            configs = [config[len("DiT-"):].split("/") for config in DiT_models if config.startswith("DiT-")]
            sizes = ", ".join(s for s, p in configs if p == str(patch))
            patches = ", ".join(p for s, p in configs if s == size)
            raise ValueError(f"bench.py {name} needs DiT-{size}/{patch}, which models.py does not define: patch "
                             f"{patch} comes in sizes {sizes}, size {size} in patches {patches}; choose another "
                             f"--size (or --patches, for table5)")


def bench_models(args, device, cells, make_step, name, title, by_params=False):
    """Time every (size, patch, image) cell for every system; ratios against SDPA DiT. The plot
    puts time against token counts, or with by_params (cells of one token count and several
    model sizes) against each system's parameter count."""
    check_cells(name, cells)
    rows = []
    for size, patch, image_size in cells:
        base = None
        for system in args.systems:
            start_cell(device)
            try:
                model, params = build_system(size, patch, image_size, system, device, compile=args.compile,
                                             grad_checkpoint=args.grad_checkpoint)
                step = make_step(model, args.batch, image_size, device, cuda_graph=args.cuda_graph)
                t, mem = measure(step, device, args.warmup, args.repeats, args.budget)
            except torch.OutOfMemoryError:
                t, mem, params = "OOM", None, locals().get("params", "-")
            model = step = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            base = t if system == "attn-sdpa" else base
            ratio = f"{base / t:.2f}" if isinstance(t, float) and isinstance(base, float) else "-"
            tokens = (image_size // patch) ** 2
            rows.append({"model": f"{size}/{patch}", "image": image_size, "tokens": tokens, "system": system,
                         "params_M": f"{params / 1e6:.2f}" if isinstance(params, int) else params,
                         "ms": fmt_time(t), "peak_GiB": fmt_mem(mem), "speedup_vs_sdpa": ratio, "seconds": t,
                         "peak_bytes": mem, "params": params if isinstance(params, int) else None})
            print(f"  {size}/{patch} {image_size}px {system:16s} {fmt_time(t)} ms  {fmt_mem(mem)} GiB", flush=True)

    def plot(path):
        if by_params:
            lines = [dict(row, line=row["system"]) for row in rows if row["params"] is not None]
            return plot_lines(lines, "params", "line", path, title, "parameters")
        # One line per system over the token counts; table5, whose patch sizes give each image size
        # several token counts, one per system and image size.
        images = {row["image"] for row in rows}
        per_image = len(images) > 1 and len({(row["image"], row["tokens"]) for row in rows}) > len(images)
        lines = [dict(row, line=row["system"] + (f", {row['image']} px" if per_image else "")) for row in rows]
        plot_lines(lines, "tokens", "line", path, title, "tokens")

    columns = ["model", "image", "tokens", "system", "params_M", "ms", "peak_GiB", "speedup_vs_sdpa"]
    return write_results(name, rows, columns, args.out_dir, device, plot)


def bench_table5(args, device):
    """Paper Table 5: training-step time of DiT vs PDESSM-DiT, 32 and 64 px, patch 2/4/8."""
    cells = [(args.size or "S", p, img) for img in args.images for p in args.patches]
    return bench_models(args, device, cells, training_step, "table5",
                        f"Table 5: training step, DiT-{args.size or 'S'}, batch {args.batch}")


def bench_table8(args, device):
    """Paper Table 8: forward time of XL at 256 px, patch 8/4/2, batch 4."""
    cells = [(args.size or "XL", p, 256) for p in (8, 4, 2)]
    return bench_models(args, device, cells, forward_pass, "table8",
                        f"Table 8: forward, DiT-{args.size or 'XL'} at 256 px, batch {args.batch}")


def bench_table9(args, device):
    """Paper Table 9: forward time of S/B/L/XL (or --size alone) at 256 px, patch 2, batch 4."""
    cells = [(size, 2, 256) for size in ([args.size] if args.size else ["S", "B", "L", "XL"])]
    return bench_models(args, device, cells, forward_pass, "table9",
                        f"Table 9: forward at 256 px, patch 2, batch {args.batch}", by_params=True)


def bench_scaling(args, device):
    """Training step and peak memory against token count (grids 16^2 .. 256^2), patch 2."""
    cells = [(args.size or "S", 2, 2 * grid) for grid in args.grids]
    return bench_models(args, device, cells, training_step, "scaling",
                        f"training step vs tokens, DiT-{args.size or 'S'}/2, batch {args.batch}")


#################################################################################
#                               The mixer alone                                 #
#################################################################################

def build_mixer(system, dim, heads):
    """The spatial mixer of `system` alone: attention (SDPA or naive) or PDE-SSM."""
    options = SYSTEMS[system]
    if options["mixer"] == "attn":
        module = Attention(dim, heads)
        module.naive = options.get("naive", False)
        return module
    coupling = options["pdessm_coupling"]
    return PDESSM(dim, coupling=coupling, num_heads=heads if coupling == "heads" else 1)


def bench_mixer(args, device):
    """Forward + backward of one mixer on (batch, grid^2, dim) tokens."""
    others = [system for system in args.systems if system not in MIXERS]
    if others:
        raise SystemExit(f"bench.py mixer times mixers alone; {', '.join(others)} is a model-table system: "
                         f"choose from {', '.join(MIXERS)}")
    rows = []
    for grid in args.grids:
        base = None
        for name in args.systems:
            start_cell(device)
            module = build_mixer(name, args.dim, args.heads).to(device)
            x = torch.randn(args.batch, grid * grid, args.dim, device=device, requires_grad=True)

            def step():
                with autocast(device):
                    out = module(x, (grid, grid))
                out.float().square().mean().backward()

            t, mem = measure(step, device, args.warmup, args.repeats)
            del module, x
            base = t if name == "attn-sdpa" else base
            ratio = base / t if isinstance(t, float) and isinstance(base, float) else "-"
            rows.append({"grid": f"{grid}x{grid}", "tokens": grid * grid, "system": name, "ms": fmt_time(t),
                         "peak_GiB": fmt_mem(mem), "speedup_vs_sdpa": ratio if ratio == "-" else f"{ratio:.2f}",
                         "seconds": t, "peak_bytes": mem})
            print(f"  {name:16s} grid {grid:4d}: {fmt_time(t)} ms", flush=True)

    def plot(path):
        plot_lines(rows, "tokens", "system", path, f"mixer forward+backward, batch {args.batch}, dim {args.dim}",
                   "tokens (grid^2)")

    columns = ["grid", "tokens", "system", "ms", "peak_GiB", "speedup_vs_sdpa"]
    return write_results("mixer", rows, columns, args.out_dir, device, plot)


#################################################################################
#                    The pairwise symbol product alone                          #
#################################################################################

def with_gradients(fn, inputs, cotangent):
    """[fn(*leaves)] of detached copies of inputs, and given a cotangent for the output,
    the output detached and the leaves' gradients for it."""
    leaves = [t.detach().requires_grad_(cotangent is not None) for t in inputs]
    with torch.set_grad_enabled(cotangent is not None):
        out = fn(*leaves)
    if cotangent is None:
        return [out]
    return [out.detach(), *torch.autograd.grad(out, leaves, cotangent)]


def symbol_product(spectrum, params, grid, cotangent=None, fused=False):
    """`pde_ssm.apply_symbol` of spectrum (B, C, grid, grid // 2 + 1) with pairwise parameters
    (K, b, r, tau), through the fused kernel or the PyTorch path. Returns the output and,
    given a cotangent, the gradients of spectrum, K, b, r and tau for it."""
    def product(*leaves):
        previous, pde_ssm.FUSED_SPECTRAL_PRODUCT = pde_ssm.FUSED_SPECTRAL_PRODUCT, fused
        try:
            return pde_ssm.apply_symbol(leaves[0], *leaves[1:], (grid, grid))
        finally:
            pde_ssm.FUSED_SPECTRAL_PRODUCT = previous

    return with_gradients(product, (spectrum, *params), cotangent)


def planar_symbol_product(planar, params, grid, cotangent=None, tiles=None):
    """The pairwise product of the planar (B, re/im, F, C) spectrum that `pde_ssm.dense_mix`
    hands it, in bf16 (as under bf16 autocast) through the fused kernel, with its tile
    overrides, or in float64 through the PyTorch path. Returns as `symbol_product`, the
    output and the spectrum's gradient planar."""
    B, _, F, C = planar.shape

    def product(*leaves):
        a_re, a_im, phi_re, phi_im = pde_ssm._grouped_operands(*leaves[1:], (grid, grid))
        x = leaves[0].view(B, 2, F, 1, C).permute(3, 2, 4, 0, 1)                 # (G, F, C, B, re/im)
        if planar.dtype == torch.float64:
            y = pde_ssm._grouped_product(x, a_re, a_im, phi_re, phi_im, grid // 2 + 1)
        else:
            from kernels.spectral_product import spectral_product  # imports Triton only when used
            y = spectral_product(x, a_re, a_im, phi_re, phi_im, tiles=tiles, width=grid // 2 + 1)
        return y.permute(3, 4, 1, 0, 2).reshape(B, 2, F, C)

    return with_gradients(product, (planar, *params), cotangent)


def relative_error(got, expected):
    """The largest norm-wise relative error over matching tensors."""
    return max(((g.to(e.dtype) - e).abs().norm() / e.abs().norm()).item() for g, e in zip(got, expected))


def bench_symbol(args, device):
    """The pairwise symbol product (Eq. 9 at every frequency, C x C per frequency) alone:
    the PyTorch path against the fused Triton kernel, forward and forward + backward at a
    PDESSM's initialization, each with its error against the PyTorch path in float64.
    Paths: pytorch and fused on the complex64 rfft2 spectrum (the kernel's tf32 dots);
    fused-bf16 on the planar bf16 spectrum of training under bf16 autocast, and
    fused-bf16-unstepped, the same with the symbol made at every frequency (tiles
    ROW_STEPS=False: `_contract_kernel` where fused-bf16 takes `_row_contract_kernel`,
    at batches of up to 8 on grids of 32 and more, and the coefficient gradient without
    its row steps)."""
    if device.type != "cuda" or not kernels.HAS_TRITON:
        raise SystemExit("bench.py symbol times the fused Triton kernel: it needs a CUDA device and Triton")
    rows = []
    for grid in args.grids:
        params = [p.detach() for p in PDESSM(args.dim, coupling="pairwise").to(device).pde_parameters()]
        spectrum = torch.fft.rfft2(torch.randn(args.batch, args.dim, grid, grid, device=device))
        cotangent = torch.randn_like(spectrum)
        frequencies = grid * (grid // 2 + 1)
        flops = 8 * frequencies * args.dim ** 2 * args.batch  # one complex product; forward + backward: three
        cells = []
        for path, fused in (("pytorch", False), ("fused", True)):
            start_cell(device)
            forward, _ = measure(lambda: symbol_product(spectrum, params, grid, fused=fused), device, args.warmup,
                                 args.repeats, args.budget)
            both, mem = measure(lambda: symbol_product(spectrum, params, grid, cotangent, fused), device,
                                args.warmup, args.repeats, args.budget)
            cells.append((path, fused, forward, both, mem))
        # The bf16 paths on the planar layout of dense_mix, (B, C, H, W // 2 + 1) -> (B, re/im, F, C) in
        # memory (reshape alone would keep rfft2's strides: channels outermost, re and im interleaved).
        planar, planar_cotangent = (torch.view_as_real(t).permute(0, 4, 2, 3, 1).reshape(args.batch, 2, -1, args.dim)
                                    .contiguous().bfloat16() for t in (spectrum, cotangent))
        for path, tiles in (("fused-bf16", None), ("fused-bf16-unstepped", dict(ROW_STEPS=False))):
            start_cell(device)
            forward, _ = measure(lambda: planar_symbol_product(planar, params, grid, tiles=tiles), device,
                                 args.warmup, args.repeats, args.budget)
            both, mem = measure(lambda: planar_symbol_product(planar, params, grid, planar_cotangent, tiles), device,
                                args.warmup, args.repeats, args.budget)
            cells.append((path, tiles, forward, both, mem))
        # The float64 products only after the timings, so that no peak includes them; the bf16
        # paths' on the same bf16 values.
        params64 = [p.double() for p in params]
        expected = symbol_product(spectrum.to(torch.complex128), params64, grid, cotangent.to(torch.complex128))
        expected_planar = planar_symbol_product(planar.double(), params64, grid, planar_cotangent.double())
        for path, option, forward, both, mem in cells:
            error = None
            if isinstance(both, float) and path in ("pytorch", "fused"):  # else out of memory, or bf16
                error = relative_error(symbol_product(spectrum, params, grid, cotangent, option), expected)
            elif isinstance(both, float):
                error = relative_error(planar_symbol_product(planar, params, grid, planar_cotangent, option),
                                       expected_planar)
            rows.append({"grid": f"{grid}x{grid}", "frequencies": frequencies, "path": path,
                         "fwd_ms": fmt_time(forward), "fwd_bwd_ms": fmt_time(both),
                         "fwd_bwd_TFLOPs": "-" if error is None else f"{3 * flops / both / 1e12:.1f}",
                         "peak_GiB": fmt_mem(mem), "rel_error": "-" if error is None else f"{error:.1e}",
                         "seconds": both, "peak_bytes": mem, "error": error})
            print(f"  {path:8s} grid {grid:4d}: {fmt_time(forward)} / {fmt_time(both)} ms", flush=True)
        del expected, expected_planar

    def plot(path):
        plot_lines(rows, "frequencies", "path", path, f"pairwise symbol product forward+backward, batch "
                   f"{args.batch}, C = {args.dim}", "frequencies (grid x (grid / 2 + 1))")

    columns = ["grid", "frequencies", "path", "fwd_ms", "fwd_bwd_ms", "fwd_bwd_TFLOPs", "peak_GiB", "rel_error"]
    return write_results("symbol", rows, columns, args.out_dir, device, plot)


def bench_kernels(args, device):
    """The fused pairwise kernels one launch at a time, as BENCHMARKS.md's kernel tables
    time them: the product (`kernels.spectral_product._contract`), its adjoint (the
    spectrum's gradient) and the coefficient gradient, on the planar bf16 spectrum of
    training under bf16 autocast, at a PDESSM's initialization, each the median GPU time
    of `triton.testing.do_bench` (which clears the L2 cache between launches) with its
    error against the PyTorch path in float64 on the same bf16 values. --tiles overrides
    the kernels' tiles (`spectral_product`'s tiles: each kernel takes the names it has);
    the "symbol" column says whether the launch stepped the symbol along the grid rows
    (the row kernels) or made it exactly at every frequency."""
    if device.type != "cuda" or not kernels.HAS_TRITON:
        raise SystemExit("bench.py kernels times the fused Triton kernels: it needs a CUDA device and Triton")
    import triton
    from kernels import spectral_product as sp
    try:
        sp.check_tiles(args.tiles)
    except ValueError as error:
        raise SystemExit(f"bench.py kernels --tiles: {error}")
    rows = []
    for grid in args.grids:
        params = [p.detach() for p in PDESSM(args.dim, coupling="pairwise").to(device).pde_parameters()]
        width, frequencies = grid // 2 + 1, grid * (grid // 2 + 1)
        x, dy = (torch.randn(args.batch, 2, frequencies, args.dim, device=device).bfloat16() for _ in range(2))
        a_re, a_im, phi_re, phi_im = pde_ssm._grouped_operands(*params, (grid, grid))
        planes = sp._coefficient_planes(a_re, a_im)
        # The (G, F, C, B, re/im) views of the planar spectra that dense_mix hands the kernels.
        xv, dyv = (t.view(args.batch, 2, frequencies, 1, args.dim).permute(3, 2, 4, 0, 1) for t in (x, dy))
        launches = {
            "product": lambda: sp._contract(xv, planes, phi_re, phi_im, width, False, "bf16", args.tiles),
            "adjoint": lambda: sp._contract(dyv, planes, phi_re, phi_im, width, True, "bf16", args.tiles),
            "gradient": lambda: sp._grad_coefficients(xv, dyv, planes, phi_re, phi_im, width, "bf16", args.tiles)}
        # In float64 on the same values: the product, and by autograd with dy as cotangent its adjoint
        # applied to dy and the gradient of the coefficient planes.
        a_re64, a_im64, phi_re64, phi_im64 = pde_ssm._grouped_operands(*[p.double() for p in params], (grid, grid))
        y64, dx64, da_re64, da_im64 = with_gradients(
            lambda v, re, im: pde_ssm._grouped_product(v, re, im, phi_re64, phi_im64, width),
            (xv.double(), a_re64, a_im64), dyv.double())
        expected = {"product": y64, "adjoint": dx64, "gradient": sp._coefficient_planes(da_re64, da_im64)}
        for kernel, launch in launches.items():
            ms = triton.testing.do_bench(launch, warmup=25, rep=200, return_mode="median")
            stepped = sp._row_steps(args.batch, width, "bf16", args.tiles, gradient=kernel == "gradient")
            error = relative_error([launch()], [expected[kernel]])
            rows.append({"grid": f"{grid}x{grid}", "frequencies": frequencies, "kernel": kernel,
                         "symbol": "row steps" if stepped else "exact", "ms": f"{ms:.3f}",
                         "rel_error": f"{error:.1e}", "seconds": ms / 1e3, "error": error})
            print(f"  {kernel:8s} grid {grid:4d}: {ms:.3f} ms", flush=True)

    def plot(path):
        plot_lines(rows, "frequencies", "kernel", path, f"fused pairwise kernels, bf16, batch {args.batch}, C = "
                   f"{args.dim}" + (f", tiles {sp._tiles_key(args.tiles)}" if args.tiles else ""),
                   "frequencies (grid x (grid / 2 + 1))")

    columns = ["grid", "frequencies", "kernel", "symbol", "ms", "rel_error"]
    return write_results("kernels", rows, columns, args.out_dir, device, plot)


def parse_tiles(text):
    """--tiles NAME=INT,NAME=INT,... -> a dict (the names are checked by the kernels' module)."""
    tiles = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if not name.strip() or not value.strip().lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"{item!r} is not NAME=INT; expected e.g. BLOCK_F=2,BLOCK_R=16")
        tiles[name.strip()] = int(value)
    return tiles


def plot_lines(rows, x_key, series_key, path, title, xlabel):
    """Log-log plot of seconds against x_key, one line per series (OOM cells left out)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for series in dict.fromkeys(r[series_key] for r in rows):
        pts = sorted((r[x_key], r["seconds"]) for r in rows
                     if r[series_key] == series and isinstance(r["seconds"], float))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=series)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("seconds")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


#################################################################################
#                                   CLI                                         #
#################################################################################

BENCHMARKS = {"table5": bench_table5, "table8": bench_table8, "table9": bench_table9,
              "scaling": bench_scaling, "mixer": bench_mixer, "symbol": bench_symbol, "kernels": bench_kernels}

# Per-benchmark defaults for batch size, grids and width, used where the flag is not given.
DEFAULTS = {"table5": dict(batch=64), "table8": dict(batch=4), "table9": dict(batch=4),
            "scaling": dict(batch=4, grids=[16, 32, 64, 128, 256]),
            "mixer": dict(batch=2, grids=[16, 32, 64, 128], dim=64),
            "symbol": dict(batch=64, grids=[16, 32, 64], dim=384),
            "kernels": dict(batch=64, grids=[16, 32, 64], dim=384)}


def main(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for key, value in DEFAULTS[args.benchmark].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.systems is None:
        args.systems = MIXERS if args.benchmark == "mixer" else list(SYSTEMS)
    if args.cuda_graph and (device.type != "cuda" or args.benchmark in ("mixer", "symbol", "kernels")):
        raise SystemExit("bench.py: --cuda-graph needs a CUDA device and a model table (not mixer, symbol or kernels)")
    if args.transforms != "auto":
        pde_ssm.DENSE_TRANSFORMS = args.transforms != "fft"
        pde_ssm.SEPARABLE_TRANSFORMS = args.transforms == "separable"
    print(f"{args.benchmark} on {environment(device)}")
    BENCHMARKS[args.benchmark](args, device)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS), help="which table to measure")
    parser.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out-dir", type=str, default="results/bench", help="folder for the JSON and PNG outputs")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before timing each cell")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per cell (the median is reported)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds one cell may take (fewer repeats if slow)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size (default: 64 for table5, symbol and kernels, 4 for table8/table9/scaling, "
                             "2 for mixer)")
    parser.add_argument("--grids", type=int, nargs="+", default=None,
                        help="scaling, mixer, symbol and kernels: token grid sides (default 16 .. 256 for scaling, "
                             "16 .. 128 for mixer, 16 .. 64 for symbol and kernels)")
    parser.add_argument("--size", choices=["T", "S", "B", "L", "XL"], default=None,
                        help="model size for table5/scaling (default S), table8 (default XL; its patches 8, 4, 2 "
                             "need S or larger) and table9 (default S, B, L and XL in turn; one size alone keeps a "
                             "compiled run short); T is the tiny CPU config (patches 1, 2, 4)")
    parser.add_argument("--images", type=int, nargs="+", default=[32, 64], help="table5: image sizes in pixels")
    parser.add_argument("--patches", type=int, nargs="+", default=[2, 4, 8], help="table5: patch sizes")
    parser.add_argument("--systems", nargs="+", default=None, choices=list(SYSTEMS),
                        help="which systems to time: mixers, or DiT models with that mixer (default: all); "
                             "the model tables also take no-mixer, DiT without any spatial mixer, the floor of "
                             "every step")
    parser.add_argument("--compile", action="store_true",
                        help="model tables: torch.compile every model (inductor fuses the elementwise work; "
                             "with --cuda-graph the compiled step is captured)")
    parser.add_argument("--grad-checkpoint", action="store_true",
                        help="training tables (table5, scaling): recompute every block's activations in the "
                             "backward (train.py --grad-checkpoint), trading a second forward for memory")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="model tables: replay every step as one CUDA graph (train.py --cuda-graph), "
                             "which removes the kernel-launch overhead of small models")
    parser.add_argument("--dim", type=int, default=None,
                        help="mixer, symbol and kernels: token width, channels (default 64 for mixer, 384 for "
                             "symbol and kernels: DiT-S)")
    parser.add_argument("--heads", type=int, default=4, help="mixer: attention heads and PDE-SSM channel groups")
    parser.add_argument("--tiles", type=parse_tiles, default=None,
                        help="kernels: tile overrides for the fused kernels, NAME=INT,... (e.g. BLOCK_F=2,BLOCK_R=16; "
                             "the names of kernels.spectral_product.TILE_NAMES, each kernel taking its own; "
                             "default: the tiles the kernels choose from the shapes)")
    parser.add_argument("--transforms", choices=["auto", "fft", "dense", "separable"], default="auto",
                        help="the PDE-SSM mixers' spectral transforms: auto (pde_ssm's default: dense matrix "
                             "products on CUDA, one each way on grids of at most "
                             "pde_ssm.FULL_TRANSFORM_MAX_TOKENS tokens, one along each grid axis above; "
                             "rfft2/irfft2 on the CPU), fft (always rfft2/irfft2), dense (one matrix product "
                             "each way on every grid) or separable (one product along each grid axis each way, "
                             "on every grid)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
