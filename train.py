"""
Train DiT or PDE-SSM-DiT with flow matching (paper Eq. 11) using PyTorch DDP.

    python train.py                                            # one process: PDESSM-DiT-S/2 on digits
    torchrun --nproc_per_node=8 train.py --model PDESSM-DiT-S/2 --dataset imagefolder --data-path ...

A run lives in <results-dir>/<NNN>-<model>/ (or --run-dir): log.txt, metrics.jsonl (one JSON line per
log interval), checkpoints/<step>.pt and samples/<step>.png.

With `torchrun --max-restarts=K ... --resume auto` a run recovers from a dying worker by itself. Set
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun: by default it hands its rendezvous store, with the
dead workers' addresses still in it, to the restarted ones, which may then fail to connect.
"""
import argparse
import datetime
import glob
import hashlib
import itertools
import json
import logging
import os
import re
import sys
import time
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import checkpoint
import datasets
import flow
import models
import sample
from pde_ssm import COUPLINGS, PDESSM, TERMS


AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


#################################################################################
#                             Training Helper Functions                         #
#################################################################################

@torch.no_grad()
def update_ema(ema_model, model, decay):
    """ema <- decay * ema + (1 - decay) * model for every parameter (DiT's EMA), as two batched kernels."""
    ema_params = list(ema_model.parameters())
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, [p.detach() for p in model.parameters()], alpha=1 - decay)


class CUDAGraphStep:
    """
    Runs step(*inputs) -> tensor as one CUDA graph replay after `warmup` eager calls.

    Small models at small batch are bound by kernel launches, not by the GPU (a DiT-S step at 16 tokens
    launches thousands of kernels that each run for microseconds); a graph replays the whole step,
    forward, backward, optimizer and EMA, with one launch. The eager warm-up calls (on a side stream,
    as CUDA graph capture requires) are real steps: they initialize the optimizer state, cuFFT plans
    and Triton kernels. Then the step is captured once and every later call copies its inputs into the
    captured buffers and replays. Random draws inside the step follow the generator's seed at replay
    time, so torch.manual_seed before a call works as in eager mode.

    The step must keep the same input shapes, run no host synchronization (no .item(), no data-dependent
    Python branches) and use optimizers built with capturable=True and autocast with cache_enabled=False.
    """

    # The side stream of the warm-up calls and the capture, one for all instances: cuBLAS keeps a
    # workspace for every stream it has run on, so a new stream per call or per step would add one each time.
    side_stream = None

    def __init__(self, step, warmup=3):
        self.step, self.warmup, self.graph, self.calls = step, warmup, None, 0
        if CUDAGraphStep.side_stream is None:
            CUDAGraphStep.side_stream = torch.cuda.Stream()

    def __call__(self, *inputs):
        side = CUDAGraphStep.side_stream
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.static_inputs = [x.clone() for x in inputs]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=side):
                self.static_out = self.step(*self.static_inputs)
        for static, x in zip(self.static_inputs, inputs):
            if static.shape != x.shape:
                raise ValueError(f"a CUDA-graph step was captured for inputs of shape {tuple(static.shape)}; "
                                 f"got {tuple(x.shape)} (every batch must have the same shape)")
            static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_out


def setup_distributed():
    """
    (rank, world_size, device). Under torchrun (RANK set) this joins the process group, unless a caller
    (e.g. reproduce.py) already did: NCCL with one GPU per process, gloo on CPU. A plain
    `python script.py` is rank 0 of 1 with no process group.
    """
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = process_device(int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def process_device(local_rank, local_world_size):
    """
    The device of process local_rank of the local_world_size that torchrun started on this node: GPU
    local_rank where CUDA is available, else the CPU. Every process refuses a launch with more processes
    than visible GPUs, before any of them touches CUDA or the process group.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    gpus = torch.cuda.device_count()
    if local_world_size > gpus:
        raise ValueError(f"torchrun started {local_world_size} processes per node, but this node has {gpus} visible "
                         f"CUDA device(s) and each process needs its own: lower --nproc_per_node to at most {gpus}, "
                         f"or hide the GPUs with CUDA_VISIBLE_DEVICES= to run every process on the CPU (gloo)")
    return torch.device("cuda", local_rank)


def on_rank_zero(rank, work):
    """
    work() on rank 0 while the other ranks wait for it, however long it takes: its result on rank 0, None on
    the others. They wait on a gloo group with a deadline of a day rather than on an NCCL collective, which
    gives up after PyTorch's 10 minutes: measuring a large image reference, training reproduce.py's
    classifier on one GPU or writing a large checkpoint to a slow disk can take longer. When work() raises,
    rank 0 raises it and the others a RuntimeError that names it, so no rank waits on.
    """
    if not dist.is_initialized():
        return work()
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
    result, error = None, None
    if rank == 0:
        try:
            result = work()
        except Exception as e:
            error = e
    failure = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(failure, src=0, group=group)  # the others wait here for rank 0's outcome
    dist.destroy_process_group(group)
    if error is not None:
        raise error
    if failure[0] is not None:
        raise RuntimeError(f"rank 0 failed while the other ranks waited for it: {failure[0]}")
    return result


def cleanup_distributed(joined_before=False):
    """Leave the process group, unless it was joined before setup_distributed (by the caller, who leaves it)."""
    if dist.is_initialized() and not joined_before:
        dist.destroy_process_group()


def create_logger(run_dir, rank):
    """Rank 0 logs to stdout and <run_dir>/log.txt (appended, so a resumed run continues it); others stay quiet."""
    logger = logging.getLogger("train")
    for handler in logger.handlers[:]:  # a second run in the same process (demo.py) gets fresh handlers
        handler.close()
        logger.removeHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if rank == 0:
        formatter = logging.Formatter("[\033[34m%(asctime)s\033[0m] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(run_dir, "log.txt"))):
            handler.setFormatter(formatter)
            logger.addHandler(handler)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose epoch can start after its first start_index indices, so a resumed run
    skips exactly the batches it already trained on and the data order continues unchanged."""
    start_index = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start_index, None)

    def __len__(self):
        return self.num_samples - self.start_index


def run_name(args):
    """Folder name of a run: the model with "/" -> "-" (DiT's), plus a mixer override and a PDE-SSM coupling
    (with its groups) given by flag, so that --resume auto tells such runs of one model apart."""
    return (args.model.replace("/", "-") + (f"-{args.mixer}" if args.mixer else "")
            + (f"-{args.pdessm_coupling}" if args.pdessm_coupling else "")
            + (str(args.pdessm_heads) if args.pdessm_heads else ""))


def pick_run_dir(args):
    """
    The run folder: --run-dir; else for an explicit --resume the run holding that file (a file outside
    a run's checkpoints/ starts a new run); else for --resume auto the latest run of this model that
    has checkpoints; else a new folder numbered one past the highest number in --results-dir.
    """
    if args.run_dir is not None:
        return args.run_dir
    if args.resume not in (None, "auto"):
        folder = os.path.dirname(os.path.abspath(args.resume))
        if os.path.basename(folder) == "checkpoints":
            return os.path.dirname(folder)
    if args.resume == "auto":
        runs = sorted(glob.glob(os.path.join(args.results_dir, f"[0-9][0-9][0-9]-{glob.escape(run_name(args))}")))
        for run_dir in reversed(runs):
            if glob.glob(os.path.join(run_dir, "checkpoints", "*.pt")):
                return run_dir
    names = os.listdir(args.results_dir) if os.path.isdir(args.results_dir) else []
    index = 1 + max((int(name[:3]) for name in names if re.match(r"\d{3}-", name)), default=-1)
    return os.path.join(args.results_dir, f"{index:03d}-{run_name(args)}")


# Flags a resumed run must share with its checkpoint besides the model: the data, and the seed and
# global batch that place the data sampler where the checkpoint left it.
RESUME_FLAGS = ("image_size", "space", "dataset", "global_seed", "global_batch_size")


def pdessm_kwargs(args):
    """
    The PDE-SSM flags given, as model keywords (a checkpoint records the choices made, not the defaults).
    ValueError for PDE-SSM flags on a model without a PDE-SSM mixer, or --pdessm-heads without the heads
    coupling.
    """
    kwargs = {}
    if args.pdessm_terms is not None:
        kwargs["pdessm_terms"] = tuple(args.pdessm_terms)
    if args.pdessm_coupling is not None:
        kwargs["pdessm_coupling"] = args.pdessm_coupling
    if args.pdessm_heads is not None:
        if args.pdessm_coupling != "heads":
            raise ValueError(f"--pdessm-heads {args.pdessm_heads} sets the channel groups of --pdessm-coupling heads; "
                             f"got --pdessm-coupling {args.pdessm_coupling or 'pairwise (the default)'}")
        kwargs["pdessm_heads"] = args.pdessm_heads
    mixer = args.mixer or ("pdessm" if args.model.startswith("PDESSM-") else "attn")
    if kwargs and mixer != "pdessm":
        flags = ", ".join("--" + name.replace("_", "-") for name in kwargs)
        raise ValueError(f"{flags} {'configures' if len(kwargs) == 1 else 'configure'} PDE-SSM mixers, and {args.model}"
                         f"{' with --mixer attn' if args.mixer else ''} has none; pass a PDESSM-DiT model or "
                         "--mixer pdessm")
    return kwargs


def check_resumable(state, path, args, model_kwargs):
    """ValueError when checkpoint `state` was trained with another model or RESUME_FLAGS than the flags
    (flags that older checkpoints did not save are not compared; a checkpoint without a coupling was
    pairwise, and a heads coupling without a group count has the config's attention heads)."""
    def model_config(kwargs, model):
        # PDE terms given as all of them are the default, as when not given; so is the pairwise coupling.
        terms, coupling, heads = kwargs.get("pdessm_terms"), kwargs.get("pdessm_coupling", "pairwise"), None
        if coupling == "heads":
            heads = kwargs.get("pdessm_heads")
            if heads is None:
                with torch.device("meta"):
                    heads = models.build_model(model).num_heads
        return dict(kwargs, model=model, pdessm_terms=None if terms is None or set(terms) == set(TERMS) else
                    tuple(sorted(terms)), pdessm_coupling=coupling, pdessm_heads=heads)
    saved = dict(model_config(state["model_kwargs"], state["args"]["model"]),
                 **{k: state["args"][k] for k in RESUME_FLAGS if k in state["args"]})
    current = dict(model_config(model_kwargs, args.model), **{k: getattr(args, k) for k in RESUME_FLAGS})
    diffs = [f"{k}: checkpoint {saved[k]!r}, flags {v!r}" for k, v in current.items() if k in saved and saved[k] != v]
    if diffs:
        raise ValueError(f"checkpoint {path} does not match the flags ({'; '.join(diffs)}); --resume continues "
                         "a run where it stopped (model, optimizer, data order): pass the flags it was trained "
                         "with, or leave out --resume for a new run")


def gradient_groups(model):
    """
    The parameters whose gradient norms are logged apart, so that a loss spike shows where it starts:
    "pde" the PDE coefficients of every PDE-SSM mixer (K's Cholesky factor, b, r, log tau), "mixer" the
    rest of the blocks' spatial mixers (attention, or PDE-SSM's projections and Gamma embeddings),
    "other" everything else. Empty groups are left out.
    """
    pde = {id(p) for m in model.modules() if isinstance(m, PDESSM)
           for name, p in m.named_parameters(recurse=False) if name in PDESSM.COEFFICIENTS}
    mixer = {id(p) for m in model.modules() if isinstance(m, models.DiTBlock) for p in m.attn.parameters()}
    groups = {"pde": [], "mixer": [], "other": []}
    for p in model.parameters():
        if p.requires_grad:
            groups["pde" if id(p) in pde else "mixer" if id(p) in mixer else "other"].append(p)
    return {name: params for name, params in groups.items() if params}


def gradient_norm(params):
    """The 2-norm of the gradients of params (a device tensor, no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def clip_gradients(params, max_norm, total_norm):
    """Scale the gradients of params in place so that their 2-norm, total_norm (a device tensor,
    computed already), is at most max_norm, as torch.nn.utils.clip_grad_norm_ does without
    computing the norm again (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (total_norm + 1e-6), max=1.0))


def weights_digest(model):
    """SHA-256 of every parameter and buffer, to check that all DDP ranks hold the same weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


#################################################################################
#                                  Training Loop                                #
#################################################################################

def main(args):
    """Train; returns the run folder."""
    joined_before = dist.is_initialized()
    rank, world_size, device = setup_distributed()
    try:
        return train(args, rank, world_size, device)
    finally:
        cleanup_distributed(joined_before)


def train(args, rank, world_size, device):
    if args.global_batch_size % world_size:
        raise ValueError(f"--global-batch-size {args.global_batch_size} must be divisible by the world size {world_size}")
    if args.space == "latent" and args.image_size % 8:
        raise ValueError(f"--image-size {args.image_size} must be divisible by 8 for the VAE's latent space")
    local_batch = args.global_batch_size // world_size
    if args.cuda_graph and (device.type != "cuda" or world_size > 1 or args.precision == "fp16"):
        raise ValueError("--cuda-graph needs one process on a CUDA device and --precision fp32 or bf16 (the fp16 "
                         f"gradient scaler synchronizes with the host); got device {device}, {world_size} "
                         f"process(es), --precision {args.precision}")

    # Data, VAE and checkpoint are checked before anything is written: a wrong flag leaves no files behind.
    dataset = datasets.build_dataset(args.dataset, args.data_path, args.image_size, download=args.download)
    latent_data = isinstance(dataset, datasets.LatentDataset)
    if latent_data and args.space != "latent":
        raise ValueError(f"{args.data_path} holds VAE latents (from extract_features.py); pass --space latent")
    classes = getattr(dataset, "classes", None)
    if args.num_classes > 0 and classes and len(classes) > args.num_classes:
        raise ValueError(f"the dataset has {len(classes)} classes but --num-classes is {args.num_classes}")
    # The VAE encodes images on the fly, and decodes the preview grids and FID-proxy samples of latent-space runs.
    vae = None
    if args.space == "latent" and (not latent_data or args.sample_every > 0 or args.eval_every):
        vae = checkpoint.load_vae(args.vae, args.vae_path, device).requires_grad_(False)
    in_channels = vae.config.latent_channels if args.space == "latent" and not latent_data else dataset[0][0].shape[0]
    input_size = args.image_size // 8 if args.space == "latent" else args.image_size
    model_kwargs = dict(mixer=args.mixer, input_size=input_size, in_channels=in_channels,
                        num_classes=args.num_classes, learn_sigma=False, **pdessm_kwargs(args))
    with torch.device("meta"):  # options the model refuses fail here, before any file is written
        models.build_model(args.model, **model_kwargs)
    if args.eval_every:
        import evaluate  # only runs that evaluate need the feature networks
        if args.eval_ref is None:
            raise ValueError("--eval-every needs --eval-ref, the reference images of the FID proxy (see evaluate.py)")
        dim = evaluate.fid_feature_dim(args.eval_features, args.eval_feature_dim)
        if args.eval_samples <= dim:
            raise ValueError(f"--eval-samples {args.eval_samples} is too few for the {dim} features of the FID proxy "
                             f"({args.eval_features}): FID needs more samples than features; raise --eval-samples "
                             "or choose a smaller --eval-feature-dim")
        # Every rank measures its share of the samples with it; a feature network that does not load fails here.
        extractor = evaluate.build_extractor(args.eval_features, args.eval_feature_dim, args.eval_weights, device)

    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.global_seed)
    steps_per_epoch = len(sampler) // local_batch
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset has {len(dataset)} items, fewer than one batch of {local_batch} per process")
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", drop_last=True)

    # Rank 0 picks the run folder (a new one is numbered from what exists) and tells the others.
    run_dir = [pick_run_dir(args) if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(run_dir, src=0)
    run_dir = run_dir[0]
    if args.resume == "auto":
        resume_path, state = checkpoint.latest_checkpoint(run_dir)
    elif args.resume is not None:
        resume_path, state = args.resume, checkpoint.load_checkpoint(args.resume)
    else:
        resume_path, state = None, None
    if state is not None:
        check_resumable(state, resume_path, args, model_kwargs)
    elif glob.glob(os.path.join(run_dir, "checkpoints", "*.pt")):
        raise ValueError(f"{run_dir} already holds checkpoints{' but none of them loads' if args.resume else ''}; "
                         "pass --resume auto to continue that run, or another --run-dir")

    # Rank 0 measures the FID proxy's reference once, now (or reads it from its cache beside the reference), so
    # a reference that does not load fails before the run writes anything, and no evaluation re-reads it.
    reference = None
    if args.eval_every:
        reference = on_rank_zero(rank, lambda: evaluate.reference_statistics(
            args.eval_ref, extractor, args.eval_split, with_features=False)[0])

    if rank == 0:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    logger = create_logger(run_dir, rank)
    logger.info(f"Run folder {run_dir}; {world_size} process(es) on {device}; "
                f"{len(dataset):,} {args.dataset} items, {steps_per_epoch} steps per epoch")

    # Model, EMA and optimizer (DiT: AdamW with no weight decay, EMA of the weights after every step).
    torch.manual_seed(args.global_seed)  # the same initial weights on every rank
    model = models.build_model(args.model, **model_kwargs, **({"grad_checkpoint": True} if args.grad_checkpoint else {}))
    ema = deepcopy(model).requires_grad_(False).eval()
    model.to(device)
    ema.to(device)
    # On CUDA the fused AdamW: one kernel a step where foreach runs one pass per operation (BENCHMARKS.md).
    settings = dict(lr=args.lr, weight_decay=0, capturable=args.cuda_graph, fused=device.type == "cuda")
    opt = torch.optim.AdamW(model.parameters(), **settings)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    if state is None:
        step, epoch, batch_in_epoch = 0, 0, 0
    else:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        # The moments and step counts from the checkpoint, the settings (learning rate, fused, capturable) from
        # the flags: a run saved without --cuda-graph can go on with it, or with another --lr.
        saved = state["opt"]
        opt.load_state_dict(dict(saved, param_groups=[dict(group, **settings) for group in saved["param_groups"]]))
        if state["scaler"] is not None and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        logger.info(f"Resumed from {resume_path} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    logger.info(f"{args.model} parameters: {sum(p.numel() for p in model.parameters()):,}")
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if dist.is_initialized() else model
    train_model = torch.compile(ddp) if args.compile else ddp
    model.train()  # enables label dropout for classifier-free guidance
    amp_dtype = AMP_DTYPES[args.precision]

    def save(step):
        def write():  # rank 0 writes; a slow disk or a failed write holds or stops every rank
            state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                     "args": vars(args), "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                     "model_kwargs": model_kwargs, "scaler": scaler.state_dict() if scaler.is_enabled() else None}
            path = checkpoint.checkpoint_path(run_dir, step)
            checkpoint.save_checkpoint(state, path)
            logger.info(f"Saved checkpoint to {path}")
        on_rank_zero(rank, write)

    groups = gradient_groups(model)

    def train_step(x, y):
        """One optimizer step on the batch (x, y); returns (loss, gradient norm, the norm of each of
        `groups`) as one device tensor (no host sync)."""
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None,
                            cache_enabled=not args.cuda_graph):
            loss = flow.training_losses(train_model, x, dict(y=y if args.num_classes > 0 else None),
                                        t_dist=args.t_dist)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # the clipped and logged norms are those of the true gradient
        group_norms = [gradient_norm(params) for params in groups.values()]
        grad_norm = torch.linalg.vector_norm(torch.stack(group_norms))   # the groups partition the gradient
        if args.max_grad_norm:
            clip_gradients(model.parameters(), args.max_grad_norm, grad_norm)
        scaler.step(opt)
        scaler.update()
        update_ema(ema, model, args.ema_decay)
        return torch.stack([loss.detach(), grad_norm, *group_norms])

    if args.cuda_graph:
        train_step = CUDAGraphStep(train_step)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    first_step, log_steps, start = step, 0, time.time()
    running_sum = torch.zeros(2, device=device)      # (loss, gradient norm) summed over the interval
    grad_norm_max = torch.zeros(1 + len(groups), device=device)  # the gradient norm and its groups' maxima
    bar = tqdm(total=args.max_steps, initial=step, desc=run_name(args), disable=rank != 0, dynamic_ncols=True)
    while step < args.max_steps and epoch < args.epochs:
        sampler.set_epoch(epoch)
        sampler.start_index = batch_in_epoch * local_batch
        batches = iter(loader)
        for _ in range(len(loader)):
            if step >= args.max_steps:
                break
            if (step == args.fail_at_step and rank == world_size - 1
                    and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
                os._exit(1)  # fault injection for tests: this worker dies without cleanup
            # One seed per (rank, step) for flips, noise, t and label dropout: a resumed run draws
            # exactly what the uninterrupted run would have drawn.
            torch.manual_seed(sample.seed_for(args.global_seed, rank, step))
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if args.space == "latent" and not latent_data:
                x = checkpoint.encode(vae, x)
            stats = train_step(x, y)
            running_sum += stats[:2]
            torch.maximum(grad_norm_max, stats[1:], out=grad_norm_max)

            step += 1
            batch_in_epoch += 1
            log_steps += 1
            bar.update(1)
            if step % args.log_every == 0:
                maxima = grad_norm_max.tolist()
                log_metrics(logger, metrics_path, rank, device, step, running_sum / log_steps, maxima[0],
                            dict(zip(groups, maxima[1:])), log_steps / (time.time() - start),
                            args.global_batch_size, bar)
                log_steps, start = 0, time.time()
                running_sum.zero_()
                grad_norm_max.zero_()
            if step % args.ckpt_every == 0:
                save(step)
            if args.sample_every and step % args.sample_every == 0 and rank == 0:
                path = sample.sample_grid(ema, os.path.join(run_dir, "samples", f"{step:07d}.png"),
                                          (in_channels, input_size, input_size), cfg_scale=args.cfg_scale,
                                          seed=args.global_seed, vae=vae)
                logger.info(f"Saved preview samples to {path}")
            if args.eval_every and step % args.eval_every == 0:
                fid = fid_proxy(args, ema, vae, (in_channels, input_size, input_size), local_batch, extractor,
                                reference, rank, world_size)
                if rank == 0:
                    record = dict(step=step, fid=fid, fid_samples=args.eval_samples, fid_features=args.eval_features)
                    logger.info(f"(step={step:07d}) FID proxy ({args.eval_samples} samples, {args.eval_features}): "
                                f"{fid:.3f}")
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
        else:
            epoch, batch_in_epoch = epoch + 1, 0
    bar.close()
    if step > first_step and step % args.ckpt_every:
        save(step)

    digests = [None] * world_size
    if dist.is_initialized():
        dist.all_gather_object(digests, weights_digest(model))
    else:
        digests = [weights_digest(model)]
    logger.info(f"Done at step {step}. Weights SHA-256 per rank: {' '.join(digests)}")
    return run_dir


def proxy_noise(indices, noise_shape, seed):
    """The FID proxy's noise (len(indices), *noise_shape): each sample's from a generator of its own, seeded by
    seed and its index, so a sample gets the same noise at every evaluation, in any batch and on any rank."""
    generator = torch.Generator()
    return torch.stack([torch.randn(noise_shape, generator=generator.manual_seed(seed * 2**24 + int(i)))
                        for i in indices])


def fid_proxy(args, ema, vae, noise_shape, batch_size, extractor, reference, rank=0, world_size=1):
    """
    The training-time FID proxy of the paper's Figure 3: --eval-samples unguided samples of the EMA model
    (labels i % num_classes, noise from `proxy_noise`), measured by the feature network `extractor` against
    the statistics `reference` of --eval-ref, as evaluate.fid_proxy measures them. The ranks take the
    batches of batch_size samples in turn and measure their features; rank 0 gathers them and returns the
    FID (the other ranks None, and only rank 0 needs `reference`). A bf16 run samples with its network in
    bf16 too.
    """
    import evaluate  # only runs that evaluate need the feature networks
    device = next(ema.parameters()).device
    precision = sample.precision_for(args.precision)
    images = []
    for start in range(rank * batch_size, args.eval_samples, world_size * batch_size):
        indices = torch.arange(start, min(start + batch_size, args.eval_samples))
        z = proxy_noise(indices, noise_shape, args.global_seed).to(device)
        labels = (indices % args.num_classes).to(device) if args.num_classes > 0 else None
        images.append(sample.to_uint8(sample.generate(ema, z, labels, vae=vae, precision=precision)))
    features = None
    if images:
        images = evaluate.check_images(np.concatenate(images), "FID-proxy samples")
        features = evaluate.extract_features(images, extractor, progress=rank == 0)["features"]
    parts = [features]
    if world_size > 1:
        parts = [None] * world_size if rank == 0 else None
        dist.gather_object(features, parts, dst=0)
    if rank != 0:
        return None
    return evaluate.proxy_distance(np.concatenate([part for part in parts if part is not None]), reference)


def log_metrics(logger, metrics_path, rank, device, step, means, grad_norm_max, group_max, steps_per_sec,
                global_batch, bar):
    """
    Log the interval's mean loss (averaged over ranks) and gradient norm (mean and max: a spike shows
    in the max first; `group_max` holds the maxima of the `gradient_groups`) with the throughput and
    peak GPU memory; append them to metrics.jsonl.
    """
    if dist.is_initialized():
        dist.all_reduce(means, op=dist.ReduceOp.SUM)
        means = means / dist.get_world_size()
    loss, grad_norm = means.tolist()
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    record = dict(step=step, loss=loss, grad_norm=grad_norm, grad_norm_max=grad_norm_max,
                  grad_norm_max_by_group=group_max, steps_per_sec=steps_per_sec,
                  images_per_sec=steps_per_sec * global_batch, mem_gb=mem)
    groups = ", ".join(f"{name} {value:.3f}" for name, value in group_max.items())
    logger.info(f"(step={step:07d}) Train Loss: {loss:.4f}, Grad Norm: {grad_norm:.3f} (max "
                f"{grad_norm_max:.3f}; {groups}), Train Steps/Sec: {steps_per_sec:.2f}, "
                f"Images/Sec: {record['images_per_sec']:.1f}, Max GPU Mem: {'n/a' if mem is None else f'{mem:.2f} GB'}")
    bar.set_postfix(loss=f"{loss:.4f}")
    if rank == 0:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=str, choices=datasets.DATASETS, default="digits",
                        help="data source (digits: scikit-learn's 8x8 digits, no download)")
    parser.add_argument("--data-path", type=str, default=None,
                        help="image folder, .npz file, CIFAR-10 folder or Fashion-MNIST folder "
                             "(default: data/cifar10 for cifar10, /usr/share/datasets/fashion-mnist for fashion-mnist)")
    parser.add_argument("--download", action="store_true", help="download CIFAR-10 into --data-path if missing")
    parser.add_argument("--results-dir", type=str, default="results", help="where numbered run folders are made")
    parser.add_argument("--run-dir", type=str, default=None,
                        help="use this run folder instead of a new numbered one (restarts and tests pin it)")
    parser.add_argument("--model", type=str, choices=list(models.DiT_models), default="PDESSM-DiT-S/2",
                        help="model config (the paper's Table 6: DiT-S size, 12 layers, hidden 384, 6 heads)")
    parser.add_argument("--mixer", type=str, choices=["attn", "pdessm"], default=None,
                        help="override the token mixer of a DiT config")
    parser.add_argument("--pdessm-terms", type=str, nargs="+", choices=["diffusion", "convection", "reaction"],
                        default=None, help="PDE terms PDE-SSM keeps (the Table 7 ablation; default: all three)")
    parser.add_argument("--pdessm-coupling", type=str, choices=list(COUPLINGS), default=None,
                        help="PDE-SSM's channel coupling (section 2.2): pairwise (default, the paper's: every channel "
                             "pair its own PDE), diagonal (one scalar PDE per channel) or heads (pairwise inside "
                             "channel groups, --pdessm-heads)")
    parser.add_argument("--pdessm-heads", type=int, default=None,
                        help="channel groups of --pdessm-coupling heads (default: as many as the config's "
                             "attention heads, 6 for S)")
    parser.add_argument("--space", type=str, choices=["pixel", "latent"], default="pixel",
                        help="train on pixels, or on VAE latents (image size / 8)")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels (the paper: 32 for CIFAR-10)")
    parser.add_argument("--num-classes", type=int, default=10, help="number of classes; 0 trains unconditionally")
    parser.add_argument("--epochs", type=int, default=1400, help="stop after this many epochs (or --max-steps)")
    parser.add_argument("--max-steps", type=int, default=400_000, help="stop after this many steps (the paper: 400K)")
    parser.add_argument("--global-batch-size", type=int, default=64, help="batch over all processes (the paper: 64)")
    parser.add_argument("--global-seed", type=int, default=0, help="seed of initialization, data order and noise")
    parser.add_argument("--lr", type=float, default=5e-4,
                        help="AdamW learning rate (the paper's Table 6: 5e-4; DiT used 1e-4); with --resume "
                             "the flag's, not the checkpoint's")
    parser.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay per step (DiT's 0.9999)")
    parser.add_argument("--max-grad-norm", type=float, default=0.0,
                        help="clip the gradient to this global norm (0: no clipping, as DiT and the paper); "
                             "the norm is logged either way")
    parser.add_argument("--t-dist", type=str, choices=flow.T_DISTS, default="uniform",
                        help="distribution of the training times t")
    parser.add_argument("--precision", type=str, choices=list(AMP_DTYPES), default="fp32",
                        help="autocast precision (fp16 with a gradient scaler)")
    parser.add_argument("--grad-checkpoint", action="store_true", help="recompute block activations in the backward pass")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (with --cuda-graph, the compiled step is captured)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay each training step (forward, backward, AdamW, EMA) as one CUDA graph after "
                             "3 eager steps: much faster for small models, where kernel launches dominate "
                             "(one GPU process, fp32 or bf16)")
    parser.add_argument("--vae", type=str, choices=["ema", "mse"], default="ema",
                        help="stabilityai/sd-vae-ft-{ema,mse} for --space latent")
    parser.add_argument("--vae-path", type=str, default=None,
                        help="local folder of the VAE (no network needed); recorded for sampling")
    parser.add_argument("--num-workers", type=int, default=4, help="data loader workers per process")
    parser.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    parser.add_argument("--ckpt-every", type=int, default=50_000, help="steps between checkpoints (and one at the end)")
    parser.add_argument("--sample-every", type=int, default=10_000, help="steps between preview grids (0: none)")
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale of the preview grids")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="steps between FID-proxy evaluations, logged to metrics.jsonl as \"fid\" (0: none); "
                             "every rank samples a share")
    parser.add_argument("--eval-samples", type=int, default=1000, help="samples of each FID-proxy evaluation")
    parser.add_argument("--eval-ref", type=str, default=None,
                        help="reference images of the FID proxy (any reference evaluate.py reads)")
    parser.add_argument("--eval-split", type=str, choices=["train", "test"], default="train",
                        help="split of a CIFAR-10 or Fashion-MNIST reference")
    parser.add_argument("--eval-features", type=str, choices=["inception", "fmnist"], default="inception",
                        help="feature network of the FID proxy")
    parser.add_argument("--eval-feature-dim", type=int, default=None,
                        help="feature layer of the FID proxy (inception: 64, 192, 768 or 2048; fmnist: 64 or 128; "
                             "default the network's FID layer, 2048 and 64); --eval-samples must exceed it")
    parser.add_argument("--eval-weights", type=str, default=None,
                        help="weights of the feature network (the fmnist classifier's checkpoint)")
    parser.add_argument("--resume", type=str, default=None,
                        help="checkpoint to continue from, or 'auto' for the newest good one of the run "
                             "(model, EMA, optimizer, step and data order continue; random flips exactly "
                             "so only with --num-workers 0); the model, --image-size, --space, --dataset, "
                             "--global-seed and --global-batch-size must be the checkpoint's")
    parser.add_argument("--fail-at-step", type=int, default=-1,
                        help="fault injection for tests: the last rank exits abruptly at this step on "
                             "torchrun's first attempt (-1: never)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
