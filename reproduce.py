"""
Reproduce the paper's side-by-side comparisons as one command each, on data we can run.

    python reproduce.py table1 --dataset fashion-mnist --max-steps 20000 --ema-decay 0.999 --eval-every 2000
    python reproduce.py table7 --dataset fashion-mnist --max-steps 20000 --ema-decay 0.999
    torchrun --nproc_per_node=8 reproduce.py table1 --dataset cifar10 --data-path data/cifar10

table1: Table 1 with Figures 2 and 3. DiT-S/2, UNet-S and PDESSM-DiT-S/2 (the "legs") are trained by
        train.py with one recipe (the paper's Table 6: hidden 384, 12 layers, 6 heads, batch 64,
        learning rate 5e-4, 32 px, flow matching; 400K steps is the full recipe) and the same seed,
        then sample the same images (sample_ddp.py: same sampler, labels i % 10, per-image noise
        seeds) and are evaluated: #Params, the paper's MSE (flow.eval_mse on held-out test images,
        fixed seed), Inception FID (where Inception's weights are available), and on Fashion-MNIST
        FID-FMNIST (FID on our Fashion-MNIST classifier's 64 features) and the classifier's accuracy on
        the class-conditional samples; plus training step time and peak GPU memory.
table7: Table 7, the PDE-term ablation of PDESSM-DiT-S/2 under the same recipe: all terms, diffusion +
        reaction, diffusion + convection, convection, diffusion, reaction (a removed term is zero and
        frozen); FID on 64 features of the first 256 samples, as the paper (which used Oxford-Flowers),
        and with --num-samples a multiple of --fid-set-size the mean and SD of the FIDs of the disjoint
        sets of that size, the noise of one such FID.

Everything goes to <results-dir>/<table>-<dataset>/: a folder per leg (train.py's run folder with
checkpoints/, metrics.jsonl and log.txt; samples/ from sample_ddp.py; result.json once evaluated),
and table.md / table.json, samples.png (real | DiT | U-Net | PDE-SSM-DiT) and curves.png (training
loss and FID proxy over steps with the internal-FID floor) for table1; table7.md / table7.json,
samples.png and curves.png for table7; for both, gradients.png (each leg's largest gradient norm per
log interval, of all parameters and of each parameter group: where a loss spike starts).

Long studies can be cut into short commands: a leg whose result.json matches the flags is not
redone; an interrupted leg resumes from its newest checkpoint (train.py --resume auto) and its
sampling from the images already written; raising --max-steps continues training, and --train-only
stops after training so intermediate commands do not sample. --legs runs a subset, so legs can run
as parallel processes; run --report-only once before them: it trains (or loads) the Fashion-MNIST
classifier and caches the reference statistics that the processes then only read. The table and
figures are rebuilt from the finished legs after every command. --model-scale tiny swaps in the
tiny registry configs (DiT-T/2, UNet-T, PDESSM-DiT-T/2) for CPU demos and tests.
"""
import argparse
import functools
import json
import os
import statistics

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torchvision.utils import make_grid

import checkpoint
import datasets
import evaluate
import flow
import fmnist_classifier
import sample
import sample_ddp
import train
from pde_ssm import TERMS
from visualize import logs_gradient_groups, plot_curves, plot_gradient_norms, read_metrics


# The three systems of Table 1: leg -> (row label, model at each --model-scale).
TABLE1_LEGS = {
    "dit": ("DiT", {"paper": "DiT-S/2", "tiny": "DiT-T/2"}),
    "unet": ("U-Net", {"paper": "UNet-S", "tiny": "UNet-T"}),
    "pdessm-dit": ("PDE-SSM-DiT", {"paper": "PDESSM-DiT-S/2", "tiny": "PDESSM-DiT-T/2"}),
}
# The variants of Table 7 in the paper's column order: leg -> (column label, PDE terms kept).
TABLE7_LEGS = {
    "full": ("Baseline", TERMS),
    "diffusion-reaction": ("Diffusion + Reaction", ("diffusion", "reaction")),
    "diffusion-convection": ("Diffusion + Convection", ("diffusion", "convection")),
    "convection": ("Convection", ("convection",)),
    "diffusion": ("Diffusion", ("diffusion",)),
    "reaction": ("Reaction", ("reaction",)),
}
TABLE7_MODEL = {"paper": "PDESSM-DiT-S/2", "tiny": "PDESSM-DiT-T/2"}
# Defaults per table: the paper's training length and sample count.
DEFAULT_STEPS = {"table1": 400_000, "table7": 60_000}
DEFAULT_SAMPLES = {"table1": 10_000, "table7": 256}
DEFAULT_EVAL_SAMPLES = {"fmnist": 1000, "inception": 5000}  # FID proxy: more samples than features
TABLE7_FEATURE_DIM = 64  # the paper's Table 7: FID on 64 features
# train.py's flags that decide what a leg trains: a leg's checkpoint made with other values is another run's.
RECIPE_FLAGS = ("model", "pdessm_terms", "dataset", "image_size", "global_batch_size", "lr", "ema_decay",
                "max_grad_norm", "global_seed", "precision")

# The paper's numbers (CIFAR-10, 400K steps; Table 7 on Oxford-Flowers, 60K steps), printed for reference.
PAPER_TABLE1 = {"dit": (29.6, 3.82e-2, 4.25), "unet": (32.6, 3.78e-2, 4.19), "pdessm-dit": (34.2, 3.76e-2, 4.18)}
PAPER_TABLE7 = {"full": 1.108, "diffusion-reaction": 1.441, "diffusion-convection": 1.015, "convection": 1.065,
                "diffusion": 0.711, "reaction": 0.617}
DATA_PATHS = {"fashion-mnist": datasets.FASHION_MNIST_PATH, "cifar10": datasets.CIFAR10_PATH}


def main(args):
    """Run the legs of args.table that are not done, then (rank 0) write its table and figures."""
    legs = TABLE1_LEGS if args.table == "table1" else TABLE7_LEGS
    unknown = set(args.legs or ()) - set(legs)
    if unknown:
        raise ValueError(f"unknown legs {sorted(unknown)} for {args.table}; choose from {', '.join(legs)}")
    args.max_steps = args.max_steps or DEFAULT_STEPS[args.table]
    args.num_samples = args.num_samples or DEFAULT_SAMPLES[args.table]
    if args.table == "table7":
        for flag, value in (("--fid-set-size", args.fid_set_size), ("--num-samples", args.num_samples)):
            if value <= TABLE7_FEATURE_DIM:
                raise ValueError(f"{flag} must exceed the {TABLE7_FEATURE_DIM} features of Table 7's FID "
                                 f"(FID needs more samples than features), got {value}")
        args.fid_set_size = min(args.fid_set_size, args.num_samples)  # fewer samples: one set of them all
    features = feature_network(args)[0]
    args.eval_samples = args.eval_samples or DEFAULT_EVAL_SAMPLES[features]
    proxy_dim = evaluate.fid_feature_dim(features)
    if args.eval_every and args.eval_samples <= proxy_dim:
        raise ValueError(f"--eval-samples must exceed the {proxy_dim} features of the FID proxy on {args.dataset} "
                         f"(FID needs more samples than features), got {args.eval_samples}")
    out_dir = os.path.join(args.results_dir, f"{args.table}-{args.dataset}")
    # TF32 matmuls and convolutions on Ampere and newer GPUs, as DiT's train.py and sample.py allow.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rank, _, device = train.setup_distributed()
    try:
        train.on_rank_zero(rank, lambda: prepare(args, out_dir, device))
        run_legs = [] if args.report_only else (args.legs or list(legs))
        for leg in run_legs:
            run_leg(args, leg, out_dir, rank, device)
        report = write_table1 if args.table == "table1" else write_table7
        train.on_rank_zero(rank, lambda: report(args, out_dir, device))
    finally:
        train.cleanup_distributed()


#################################################################################
#                                    One leg                                    #
#################################################################################

def data_path(args):
    return args.data_path or DATA_PATHS[args.dataset]


def leg_model(args, leg):
    """(registry model name, PDE terms or None) of a leg."""
    if args.table == "table1":
        return TABLE1_LEGS[leg][1][args.model_scale], None
    return TABLE7_MODEL[args.model_scale], TABLE7_LEGS[leg][1]


def leg_config(args, leg):
    """
    Everything that determines a leg's numbers, as result.json stores it (JSON types); a leg whose
    result.json holds another config is sampled and evaluated again, after training on where --max-steps
    grew (another training recipe is refused: check_recipe).
    """
    model, terms = leg_model(args, leg)
    config = dict(model=model, pdessm_terms=terms and list(terms), dataset=args.dataset, data_path=data_path(args),
                  image_size=args.image_size, max_steps=args.max_steps, global_batch_size=args.global_batch_size,
                  lr=args.lr, ema_decay=args.ema_decay, max_grad_norm=args.max_grad_norm, seed=args.seed,
                  precision=precision(args),
                  num_samples=args.num_samples, sampler=args.sampler, num_sampling_steps=args.num_sampling_steps,
                  sample_precision=sample_precision(args),
                  cfg_scale=args.cfg_scale, mse_images=args.mse_images, ref_split=args.ref_split,
                  classifier=args.classifier if args.dataset == "fashion-mnist" else None)
    if args.table == "table7":  # table7 only, so that finished table1 legs stay done
        config["fid_set_size"] = args.fid_set_size
    return config


def precision(args):
    return args.precision or ("bf16" if torch.cuda.is_available() else "fp32")


def sample_precision(args):
    """Sampling evaluates the networks at their training precision unless told otherwise."""
    return args.sample_precision or sample.precision_for(precision(args))


def train_flags(args, leg, run_dir):
    """train.py's flags for a leg: the shared recipe, a pinned run folder and automatic resume."""
    model, terms = leg_model(args, leg)
    flags = ["--model", model, "--dataset", args.dataset, "--data-path", data_path(args), "--run-dir", run_dir,
             "--resume", "auto", "--image-size", str(args.image_size), "--max-steps", str(args.max_steps),
             "--global-batch-size", str(args.global_batch_size), "--lr", str(args.lr),
             "--ema-decay", str(args.ema_decay), "--max-grad-norm", str(args.max_grad_norm),
             "--global-seed", str(args.seed), "--precision", precision(args),
             "--num-workers", str(args.num_workers), "--log-every", str(args.log_every),
             "--ckpt-every", str(args.ckpt_every), "--sample-every", "0"]
    if terms is not None:
        flags += ["--pdessm-terms", *terms]
    if args.eval_every:  # Figure 3's FID proxy, on the feature network and reference of the internal FID
        features, weights = feature_network(args)
        flags += ["--eval-every", str(args.eval_every), "--eval-samples", str(args.eval_samples),
                  "--eval-ref", data_path(args), "--eval-split", args.ref_split, "--eval-features", features]
        flags += ["--eval-weights", weights] if weights else []
    flags += ["--compile"] if args.compile else []
    flags += ["--cuda-graph"] if args.cuda_graph else []
    return flags


def sample_flags(args, ckpt, run_dir):
    """sample_ddp.py's flags: the same sampler, count, labels and noise seeds for every leg."""
    return ["--ckpt", ckpt, "--sample-dir", os.path.join(run_dir, "samples"), "--num-samples", str(args.num_samples),
            "--per-proc-batch-size", str(args.eval_batch_size), "--cfg-scale", str(args.cfg_scale),
            "--sampler", args.sampler, "--num-sampling-steps", str(args.num_sampling_steps),
            "--global-seed", str(args.seed), "--precision", sample_precision(args)]


def run_leg(args, leg, out_dir, rank, device):
    """Train (or resume), sample and evaluate one leg unless its result.json matches the flags."""
    run_dir = os.path.join(out_dir, leg)
    result_path = os.path.join(run_dir, "result.json")
    config = leg_config(args, leg)
    done = read_json(result_path)
    if done is not None and done["config"] == config:
        if rank == 0:
            print(f"[{args.table}] {leg}: done already ({result_path}); skipped")
        return
    train_args = train.parse_args(train_flags(args, leg, run_dir))
    check_recipe(run_dir, train_args)
    ckpt = checkpoint.checkpoint_path(run_dir, args.max_steps)
    if not os.path.isfile(ckpt):
        if device.type == "cuda":  # train.py logs the peak since this reset: this leg's, not an earlier leg's
            torch.cuda.reset_peak_memory_stats(device)
        train.main(train_args)
    if args.train_only:
        if rank == 0:
            print(f"[{args.table}] {leg}: trained {config['model']} to step {args.max_steps} in {run_dir}/ "
                  "(checkpoints/, metrics.jsonl, log.txt); sampling and evaluation left for a call without --train-only")
        return
    if not os.path.isfile(ckpt):
        raise ValueError(f"{run_dir} has no checkpoint at step {args.max_steps} (it was trained past it, or "
                         "stopped by --epochs); pass the --max-steps of its newest checkpoint, or another --results-dir")
    npz = sample_ddp.main(sample_ddp.parse_args(sample_flags(args, ckpt, run_dir)))

    def evaluate_leg():
        metrics = (evaluate_table1_leg if args.table == "table1" else evaluate_table7_leg)(args, ckpt, npz, device)
        write_json(result_path, {"leg": leg, "config": config, "checkpoint": ckpt, "samples": npz,
                                 "training": training_summary(run_dir), **metrics})
        print(f"[{args.table}] {leg}: trained {config['model']} for {args.max_steps} steps in {run_dir}/ "
              f"(checkpoints/, metrics.jsonl, log.txt), sampled {args.num_samples} images to {npz}, "
              f"wrote its metrics to {result_path}")
    train.on_rank_zero(rank, evaluate_leg)


def check_recipe(run_dir, train_args):
    """
    ValueError when the newest checkpoint in run_dir was trained with other RECIPE_FLAGS than train_args
    (another seed, learning rate, ...): continuing it, or sampling it, would record its numbers under a
    recipe it was not trained with. Flags that older checkpoints did not save are not compared.
    """
    path, state = checkpoint.latest_checkpoint(run_dir)
    if state is None:
        return
    wanted = vars(train_args)
    diffs = [f"{k}: checkpoint {state['args'][k]!r}, flags {wanted[k]!r}" for k in RECIPE_FLAGS
             if k in state["args"] and state["args"][k] != wanted[k]]
    if diffs:
        raise ValueError(f"{path} was trained with another recipe than these flags ({'; '.join(diffs)}); pass "
                         "the flags it was trained with, or another --results-dir for this recipe")


#################################################################################
#                                   Evaluation                                  #
#################################################################################

def held_out_images(args, count=None):
    """The first `count` (default all) test images (N, C, H, W) in [-1, 1] at training size, and labels (N,)."""
    dataset = datasets.build_dataset(args.dataset, data_path(args), args.image_size, split="test")
    items = [dataset[i] for i in range(len(dataset) if count is None else min(count, len(dataset)))]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


@functools.lru_cache(maxsize=1)
def inception_available():
    """Whether Inception's weights are in torch hub's cache (or can be fetched); says why not, once."""
    try:
        evaluate.ensure_inception_weights()
        return True
    except FileNotFoundError as e:
        print(f"Inception FID skipped: {e}")
        return False


def evaluate_table1_leg(args, ckpt, npz, device):
    """#Params, MSE (paper's eval), Inception FID where possible, and on Fashion-MNIST FID-FMNIST and class accuracy."""
    model, _ = checkpoint.load_model(ckpt, device)
    images, labels = held_out_images(args, args.mse_images)
    mse = flow.eval_mse(model, images, labels if model.num_classes else None, seed=args.seed,
                        batch_size=args.eval_batch_size)
    metrics = {"params": sum(p.numel() for p in model.parameters() if p.requires_grad), "mse": mse,
               "inception": None, "fmnist": None}
    options = dict(split=args.ref_split, batch_size=args.eval_batch_size, seed=args.seed, device=str(device))
    if inception_available():
        metrics["inception"] = evaluate.evaluate(npz, data_path(args), features="inception", **options)
    if args.dataset == "fashion-mnist":
        metrics["fmnist"] = evaluate.evaluate(npz, data_path(args), features="fmnist", weights=args.classifier,
                                              **options)
    return metrics


def evaluate_table7_leg(args, ckpt, npz, device):
    """
    Table 7's FID: 64 features (Fashion-MNIST classifier, else Inception) of each disjoint set of
    --fid-set-size consecutive samples against the reference; "fid" is the first set's, the paper's protocol.
    """
    features, weights = feature_network(args)
    images, size = evaluate.load_images(npz), args.fid_set_size
    fids = [evaluate.fid_proxy(images[i * size:(i + 1) * size], data_path(args), features=features,
                               feature_dim=TABLE7_FEATURE_DIM, split=args.ref_split, weights=weights,
                               batch_size=args.eval_batch_size, device=str(device))
            for i in range(len(images) // size)]
    return {"fid": fids[0], "fid_sets": fids, "set_size": size, "features": f"{features}-{TABLE7_FEATURE_DIM}"}


def training_summary(run_dir):
    """Median seconds per step and peak GPU memory (GB, None on CPU) over a run's metrics.jsonl records."""
    records = [r for r in read_metrics(run_dir) if r.get("steps_per_sec")]
    memory = [r["mem_gb"] for r in records if r.get("mem_gb") is not None]
    return {"sec_per_step": statistics.median(1 / r["steps_per_sec"] for r in records) if records else None,
            "peak_mem_gb": max(memory) if memory else None}


def feature_network(args):
    """(features, weights) of the FIDs: our classifier on Fashion-MNIST, Inception elsewhere."""
    if args.dataset == "fashion-mnist":
        return "fmnist", args.classifier
    return "inception", None


def prepare(args, out_dir, device):
    """
    Before any leg: the Fashion-MNIST classifier (trained on first use, a few minutes) and the reference
    statistics the evaluations read (cached by evaluate.py), so that legs in parallel processes only read
    them; for table1 also the internal FID.
    """
    if args.dataset == "fashion-mnist":
        fmnist_classifier.ensure_classifier(args.classifier, data_path(args), device=device)
    if args.table == "table1":
        internal_fid(args, out_dir, device)
    else:
        features, weights = feature_network(args)
        extractor = evaluate.build_extractor(features, TABLE7_FEATURE_DIM, weights, str(device))
        evaluate.reference_statistics(data_path(args), extractor, args.ref_split, args.eval_batch_size)


def internal_fid(args, out_dir, device):
    """
    FID between the train and the test split (the floor of Figure 3) on the FID feature network, kept in
    <out_dir>/internal_fid.json after the first call and reused for the same data and network (name and
    weights); None for Inception without its weights.
    """
    features, weights = feature_network(args)
    if features == "inception" and not inception_available():
        return None
    extractor = evaluate.build_extractor(features, None, weights, str(device))
    key = dict(data_path=data_path(args), features=evaluate.feature_net_name(extractor),
               weights=evaluate.weights_fingerprint(extractor))
    path = os.path.join(out_dir, "internal_fid.json")
    cached = read_json(path)
    if cached is not None and all(cached.get(k) == v for k, v in key.items()):
        return cached["fid"]
    train_stats, test_stats = (evaluate.reference_statistics(data_path(args), extractor, split, args.eval_batch_size,
                                                             with_features=False)[0] for split in ("train", "test"))
    fid = evaluate.frechet_distance(train_stats["mu"], train_stats["sigma"], test_stats["mu"], test_stats["sigma"])
    write_json(path, {"fid": fid, **key, "between": "train and test split"})
    return fid


#################################################################################
#                                Tables and figures                             #
#################################################################################

def write_table1(args, out_dir, device):
    """table.md and table.json in Table 1's layout, samples.png (Figure 2) and curves.png (Figure 3)."""
    results = {leg: read_json(os.path.join(out_dir, leg, "result.json")) for leg in TABLE1_LEGS}
    features, _ = feature_network(args)
    floor = internal_fid(args, out_dir, device)
    header = ["Method", "#Params (M)", "MSE ↓", "FID ↓", "FID-FMNIST ↓", "Class acc. ↑", "Step time (s/step)",
              "Peak mem (GB)", "Steps"]
    rows = []
    for leg, (label, _) in TABLE1_LEGS.items():
        r = results[leg]
        if r is None:
            rows.append([label] + ["not run yet"] + [""] * (len(header) - 2))
            continue
        fmnist = r["fmnist"]
        rows.append([label, f"{r['params'] / 1e6:.1f}", f"{r['mse']:.3e}",
                     f"{r['inception']['fid']:.3g}" if r["inception"] else "n/a (no Inception weights)",
                     f"{fmnist['fid']:.3g}" if fmnist else "n/a (Fashion-MNIST only)",
                     f"{100 * fmnist['class_accuracy']['accuracy']:.1f}%" if fmnist else "n/a (Fashion-MNIST only)",
                     fmt(r["training"]["sec_per_step"], "{:.4f}"), fmt(r["training"]["peak_mem_gb"], "{:.2f}", "n/a (CPU)"),
                     str(r["config"]["max_steps"])])
    first = next((r["config"] for r in results.values() if r is not None), None)
    lines = [f"# Table 1 on {args.dataset}", "", markdown_table(header, rows), ""]
    if first is not None:
        clip = f"gradient norm clipped at {first['max_grad_norm']:g}" if first.get("max_grad_norm") else "no clipping"
        lines += [f"Recipe: batch {first['global_batch_size']}, lr {first['lr']:g}, EMA {first['ema_decay']:g}, {clip}, "
                  f"{first['image_size']} px, {first['precision']}, seed {first['seed']}. Sampling: "
                  f"{first['num_samples']} samples, {first['sampler']} with {first['num_sampling_steps']} steps "
                  f"(network in {first.get('sample_precision', 'fp32')}), "
                  f"cfg scale {first['cfg_scale']:g}, labels i % 10. MSE: flow.eval_mse on {first['mse_images']} "
                  f"test images (EMA weights). FIDs against the {first['ref_split']} split"
                  + ("; FID-FMNIST on the 64 features of the Fashion-MNIST classifier, which also gives the class "
                     "accuracy" if args.dataset == "fashion-mnist" else "")
                  + ". Step time: the median over the logged training intervals (legs sharing a GPU slow each "
                    "other down).", ""]
    if floor is not None:
        lines += [f"Internal FID ({features} features, train vs test split): {floor:.3g}. The FID proxy of "
                  "curves.png uses fewer samples, and small-sample FID is biased upwards.", ""]
    lines += ["Paper (CIFAR-10, 400K steps), for reference:", "",
              markdown_table(["Method", "#Params (M)", "MSE ↓", "FID (50K) ↓"],
                             [[TABLE1_LEGS[leg][0], f"{p:.1f}", f"{m:.2e}", f"{f:.2f}"]
                              for leg, (p, m, f) in PAPER_TABLE1.items()]), ""]
    write_text(os.path.join(out_dir, "table.md"), "\n".join(lines))
    write_json(os.path.join(out_dir, "table.json"), {"results": results, "internal_fid": floor, "features": features})
    written = [os.path.join(out_dir, "table.md"), os.path.join(out_dir, "table.json")]

    written += write_figures(args, out_dir, results, TABLE1_LEGS, internal_fid=floor)
    finished = sum(r is not None for r in results.values())
    print(f"[table1] {finished} of {len(TABLE1_LEGS)} legs finished; wrote {', '.join(written)}")


def fid_sets(result):
    """(FIDs of the disjoint sample sets, set size) of a table7 leg's result; a result.json written before
    the sets were taken holds one FID, of all its samples."""
    if "fid_sets" in result:
        return result["fid_sets"], result["set_size"]
    return [result["fid"]], result["config"]["num_samples"]


def loss_summary(run_dir, max_steps):
    """(mean of the logged training losses over the last tenth of max_steps, largest logged loss after
    the first tenth) of a run: the loss it ended at, and the spikes it had on the way (None where the
    run logged none there)."""
    records = read_metrics(run_dir) if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")) else []
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r and r["step"] <= max_steps]
    last = [loss for step, loss in losses if step > 0.9 * max_steps]
    after = [loss for step, loss in losses if step > 0.1 * max_steps]
    return statistics.mean(last) if last else None, max(after) if after else None


def write_table7(args, out_dir, device):
    """
    table7.md and table7.json: a row of FIDs across the six variants, the paper's layout, when every
    finished variant has several sets of samples a row of their FIDs' mean and standard deviation, a
    row of each variant's training steps, and two of its training loss (`loss_summary`).
    """
    results = {leg: read_json(os.path.join(out_dir, leg, "result.json")) for leg in TABLE7_LEGS}
    labels = [label for label, _ in TABLE7_LEGS.values()]
    finished = {leg: r for leg, r in results.items() if r is not None}
    first = next(iter(finished.values()), None)
    sets = {leg: fid_sets(r) for leg, r in finished.items()}
    first_sets, size = fid_sets(first) if first else (None, None)
    name = f"FID ({first['features']}, first {size} samples)" if first else "FID"
    rows = [[name] + [f"{r['fid']:.3f}" if r else "not run yet" for r in results.values()]]
    spread = finished and all(len(fids) > 1 for fids, _ in sets.values())
    if spread:
        rows.append([f"FID mean ± SD over {len(first_sets)} sets of {size}"]
                    + [f"{statistics.mean(sets[leg][0]):.3f} ± {statistics.stdev(sets[leg][0]):.3f}" if leg in sets
                       else "not run yet" for leg in results])
    # Each leg's own length, as Table 1's Steps column: legs of one table can come from commands with other flags.
    rows.append(["Training steps"] + [str(r["config"]["max_steps"]) if r else "" for r in results.values()])
    losses = {leg: loss_summary(os.path.join(out_dir, leg), r["config"]["max_steps"]) for leg, r in finished.items()}
    for index, name in enumerate(("Training loss, mean of the last tenth of the steps",
                                  "Largest logged training loss after the first tenth (spikes)")):
        rows.append([name] + [fmt(losses[leg][index], "{:.3f}", "") if leg in losses else "" for leg in results])
    lines = [f"# Table 7 (PDE-term ablation) on {args.dataset}", "", markdown_table([""] + labels, rows), ""]
    if spread:
        lines += [f"Each set is a disjoint set of {size} consecutive samples, so the SD shows the "
                  f"noise of a single {size}-sample FID.", ""]
    if first is not None:
        config = first["config"]
        lines += [f"{config['model']}, {config['max_steps']} steps at batch {config['global_batch_size']}, "
                  f"lr {config['lr']:g}, seed {config['seed']}; {config['sampler']} with "
                  f"{config['num_sampling_steps']} steps, cfg scale {config['cfg_scale']:g}; FID against the "
                  f"{config['ref_split']} split. A removed term is zero and frozen.", ""]
    lines += ["Paper (Oxford-Flowers, 60K steps, 64 features, 256 samples), for reference:", "",
              markdown_table([""] + labels, [["FID"] + [f"{v:.3f}" for v in PAPER_TABLE7.values()]]), ""]
    write_text(os.path.join(out_dir, "table7.md"), "\n".join(lines))
    write_json(os.path.join(out_dir, "table7.json"), {"results": results, "columns": labels})
    written = [os.path.join(out_dir, "table7.md"), os.path.join(out_dir, "table7.json")]
    written += write_figures(args, out_dir, results, TABLE7_LEGS)
    done = sum(r is not None for r in results.values())
    print(f"[table7] {done} of {len(TABLE7_LEGS)} variants finished; wrote {', '.join(written)}")


def write_figures(args, out_dir, results, legs, internal_fid=None):
    """
    samples.png (Figure 2: the finished legs' samples beside real images), curves.png (Figure 3: the
    training curves of every leg that has logged) and gradients.png (their largest gradient norms by
    parameter group, where logged), for the legs so far; returns the paths written.
    """
    written = []
    finished = {leg: r for leg, r in results.items() if r is not None}
    if finished:
        written.append(os.path.join(out_dir, "samples.png"))
        plot_sample_panels(args, [(legs[leg][0], r) for leg, r in finished.items()], written[-1])
    runs = [leg for leg in legs if os.path.isfile(os.path.join(out_dir, leg, "metrics.jsonl"))]
    if runs:
        written.append(os.path.join(out_dir, "curves.png"))
        folders, labels = [os.path.join(out_dir, leg) for leg in runs], [legs[leg][0] for leg in runs]
        plot_curves(folders, written[-1], labels=labels, internal_fid=internal_fid)
        if any(logs_gradient_groups(folder) for folder in folders):
            written.append(os.path.join(out_dir, "gradients.png"))
            plot_gradient_norms(folders, written[-1], labels=labels)
    return written


def plot_sample_panels(args, results, out, count=50):
    """
    Figure 2: real test images beside the first `count` samples of each (title, result) in `results`, one
    grid per panel with ten columns, so column k holds class k (sample i has label i % 10) in every panel.
    """
    images, labels = held_out_images(args)
    count = min(count, min(r["config"]["num_samples"] for _, r in results))
    by_class = [np.flatnonzero(labels.numpy() == k) for k in range(10)]
    real = sample.to_uint8(images[[by_class[i % 10][i // 10] for i in range(count)]])
    panels = [("real", real)] + [(title, evaluate.load_images(r["samples"])[:count]) for title, r in results]
    rows, cols = -(-count // 10), min(len(panels), 4)  # at most four panels side by side
    lines = -(-len(panels) // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(3.3 * cols, (0.33 * rows + 0.5) * lines), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, grid_images) in zip(axes.flat, panels):
        grid = make_grid(torch.from_numpy(grid_images).permute(0, 3, 1, 2), nrow=10, padding=1, pad_value=255)
        ax.imshow(grid.permute(1, 2, 0).numpy())
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def fmt(value, spec, missing="n/a"):
    return missing if value is None else spec.format(value)


#################################################################################
#                                     Files                                     #
#################################################################################

def read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_text(path, text):
    """Atomically: parallel processes (--legs) never see half a file."""
    with checkpoint.atomic_write(path, "w", durable=False) as f:
        f.write(text)


def write_json(path, data):
    write_text(path, json.dumps(data, indent=2) + "\n")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=["table1", "table7"], help="which comparison of the paper to reproduce")
    parser.add_argument("--dataset", type=str, choices=list(DATA_PATHS), default="fashion-mnist",
                        help="Fashion-MNIST (Debian package dataset-fashion-mnist) or CIFAR-10 (the paper's Table 1)")
    parser.add_argument("--data-path", type=str, default=None,
                        help=f"folder with the data (default: {DATA_PATHS['fashion-mnist']} for fashion-mnist, "
                             f"{DATA_PATHS['cifar10']} for cifar10)")
    parser.add_argument("--results-dir", type=str, default=os.path.join("results", "reproduce"),
                        help="the study goes to <results-dir>/<table>-<dataset>/")
    parser.add_argument("--legs", type=str, nargs="+", default=None,
                        help=f"run only these legs (table1: {', '.join(TABLE1_LEGS)}; table7: {', '.join(TABLE7_LEGS)}); "
                             "default all")
    parser.add_argument("--train-only", action="store_true",
                        help="train the legs to --max-steps and stop: for the intermediate commands of a study "
                             "cut into short commands, whose last command samples and evaluates")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: prepare the shared caches and write the table from the finished legs")
    parser.add_argument("--model-scale", type=str, choices=["paper", "tiny"], default="paper",
                        help="paper: DiT-S/2, UNet-S, PDESSM-DiT-S/2 (Table 6); tiny: DiT-T/2, UNet-T, "
                             "PDESSM-DiT-T/2 for CPU demos and tests")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="training steps per leg (default: the paper's 400,000 for table1, 60,000 for table7); "
                             "raising it on a later call continues the legs")
    parser.add_argument("--global-batch-size", type=int, default=64, help="batch over all processes (Table 6: 64)")
    parser.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (Table 6: 5e-4)")
    parser.add_argument("--ema-decay", type=float, default=0.9999,
                        help="EMA decay per step (DiT's 0.9999, meant for 400K steps: after S steps the EMA "
                             "still holds decay^S of the initial weights, so use about 0.999 for runs of 20K steps)")
    parser.add_argument("--max-grad-norm", type=float, default=0.0,
                        help="clip gradients to this global norm (train.py --max-grad-norm; 0: none, as Table 6)")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels (Table 6: 32)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of every leg's initialization, data order, sampling noise and MSE noise")
    parser.add_argument("--precision", type=str, choices=list(train.AMP_DTYPES), default=None,
                        help="training autocast precision (default: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models during training")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="train with train.py --cuda-graph (one CUDA graph per step; one GPU process per leg)")
    parser.add_argument("--num-workers", type=int, default=4, help="data loader workers per training process")
    parser.add_argument("--log-every", type=int, default=100, help="training steps between log lines and metrics records")
    parser.add_argument("--ckpt-every", type=int, default=2000,
                        help="training steps between checkpoints: the most a killed command loses")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="training steps between FID-proxy evaluations (train.py --eval-every; 0: none), "
                             "plotted in curves.png against the internal FID")
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="samples of each FID-proxy evaluation (default 1,000 on Fashion-MNIST's 64 features, "
                             "5,000 on Inception's 2,048; compare proxies only at equal counts)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="samples per leg (default 10,000 for table1, compared with the 10,000 test images; "
                             "the paper's FID uses 50,000; 256 for table7, as the paper, and at least 65 there)")
    parser.add_argument("--fid-set-size", type=int, default=256,
                        help="table7: samples per FID, as the paper (256); with --num-samples a multiple of it, "
                             "the table adds the mean and standard deviation over the disjoint sets")
    parser.add_argument("--sampler", type=str, choices=flow.METHODS, default="heun", help="ODE integrator")
    parser.add_argument("--num-sampling-steps", type=int, default=50, help="integrator steps (ignored by dopri5)")
    parser.add_argument("--sample-precision", type=str, choices=list(sample.PRECISIONS), default=None,
                        help="network precision while sampling (default: bf16 for bf16-trained legs, else fp32)")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    parser.add_argument("--eval-batch-size", type=int, default=250,
                        help="images per forward batch when sampling (per process) and evaluating")
    parser.add_argument("--mse-images", type=int, default=10_000,
                        help="test images for the MSE of the paper's Table 1 (default: the whole test split)")
    parser.add_argument("--ref-split", type=str, choices=["train", "test"], default="test",
                        help="split the samples are compared with for FID")
    parser.add_argument("--classifier", type=str, default=fmnist_classifier.DEFAULT_CHECKPOINT,
                        help="Fashion-MNIST classifier (FID-FMNIST, class accuracy); trained here if missing")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, FileNotFoundError) as e:  # user errors: the message, not a traceback
        raise SystemExit(f"reproduce.py: error: {e}")
