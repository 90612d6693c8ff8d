"""train.py: exact resume, atomic and validated checkpoints, clear failures, and DDP with a dying worker."""
import contextlib
import datetime
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

import checkpoint
import models
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "DiT-T/4", "--image-size", "8", "--global-batch-size", "8", "--num-workers", "0",
        "--log-every", "1", "--sample-every", "0", "--ema-decay", "0.9", "--lr", "1e-3", "--ckpt-every", "3"]


@pytest.fixture(scope="module")
def npz_data(tmp_path_factory):
    """20 random RGB 8x8 images in 10 classes: 2 batches of 8 per epoch, so 6 steps cross 3 epochs."""
    path = tmp_path_factory.mktemp("data") / "images.npz"
    rng = np.random.default_rng(0)
    np.savez(path, rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), labels=np.arange(20) % 10)
    return str(path)


def run(run_dir, *flags, data=None):
    data_flags = ["--dataset", "npz", "--data-path", data] if data else []
    return train.main(train.parse_args(TINY + data_flags + ["--run-dir", str(run_dir), *flags]))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, npz_data):
    """6 uninterrupted steps, checkpoints at 3 and 6."""
    run_dir = tmp_path_factory.mktemp("straight")
    run(run_dir, "--max-steps", "6", data=npz_data)
    return run_dir


def fingerprint(folder):
    """{path: (sha256, mtime)} of every file under folder, to prove nothing was touched."""
    return {p: (hashlib.sha256(open(p, "rb").read()).hexdigest(), os.stat(p).st_mtime_ns)
            for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if os.path.isfile(p)}


def assert_same_state(a, b):
    for key in ("model", "ema"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=0, msg=f"{key}.{name}")
    for p, q in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        for name in p:
            torch.testing.assert_close(p[name], q[name], rtol=0, atol=0)
    assert (a["step"], a["epoch"], a["batch_in_epoch"]) == (b["step"], b["epoch"], b["batch_in_epoch"])


def step_losses(run_dir):
    """{step: logged loss} from a run's metrics.jsonl (log-every 1: one record per step)."""
    records = map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_resume_continues_exactly(tmp_path, npz_data, straight_run):
    run(tmp_path, "--max-steps", "3", data=npz_data)
    mid = checkpoint.load_checkpoint(checkpoint.checkpoint_path(tmp_path, 3))
    assert (mid["step"], mid["epoch"], mid["batch_in_epoch"]) == (3, 1, 1)  # resumes mid-epoch
    run(tmp_path, "--max-steps", "6", "--resume", "auto", data=npz_data)

    full = checkpoint.load_checkpoint(checkpoint.checkpoint_path(straight_run, 6))
    resumed = checkpoint.load_checkpoint(checkpoint.checkpoint_path(tmp_path, 6))
    assert full["step"] == 6 and full["epoch"] == 2 and full["batch_in_epoch"] == 2
    assert not torch.equal(mid["model"]["final_layer.linear.weight"], full["model"]["final_layer.linear.weight"])
    assert_same_state(full, resumed)
    # The losses of steps 4..6 agree too: data order, noise, times and label dropout continued.
    full_losses, resumed_losses = step_losses(straight_run), step_losses(tmp_path)
    assert [resumed_losses[s] for s in (4, 5, 6)] == [full_losses[s] for s in (4, 5, 6)]


def test_resume_takes_the_optimizer_settings_from_the_flags(tmp_path, npz_data, straight_run):
    # AdamW's moments and step counts come from the checkpoint, its learning rate from --lr.
    shutil.copytree(os.path.join(straight_run, "checkpoints"), tmp_path / "checkpoints")
    os.remove(checkpoint.checkpoint_path(tmp_path, 6))
    run(tmp_path, "--max-steps", "4", "--resume", "auto", "--lr", "2.5e-4", data=npz_data)
    saved, resumed = (checkpoint.load_checkpoint(checkpoint.checkpoint_path(d, s))
                      for d, s in ((straight_run, 3), (tmp_path, 4)))
    assert saved["opt"]["param_groups"][0]["lr"] == 1e-3 and resumed["opt"]["param_groups"][0]["lr"] == 2.5e-4
    assert [s["step"].item() for s in resumed["opt"]["state"].values()] == [4.0] * len(resumed["opt"]["state"])


def test_auto_resume_skips_a_truncated_newest_checkpoint(tmp_path, npz_data, straight_run):
    os.makedirs(tmp_path / "checkpoints")
    shutil.copy(checkpoint.checkpoint_path(straight_run, 3), checkpoint.checkpoint_path(tmp_path, 3))
    good = open(checkpoint.checkpoint_path(straight_run, 6), "rb").read()
    with open(checkpoint.checkpoint_path(tmp_path, 6), "wb") as f:
        f.write(good[: len(good) // 2])

    with pytest.warns(UserWarning) as warned:
        run(tmp_path, "--max-steps", "6", "--resume", "auto", data=npz_data)
    messages = [str(w.message) for w in warned]
    assert any("skipping" in m and "0000006.pt" in m for m in messages)
    assert any("0000006.pt existed and was moved to" in m for m in messages)
    assert_same_state(checkpoint.load_checkpoint(checkpoint.checkpoint_path(straight_run, 6)),
                      checkpoint.load_checkpoint(checkpoint.checkpoint_path(tmp_path, 6)))
    kept = glob.glob(str(tmp_path / "checkpoints" / "0000006.pt.*.bak"))
    assert len(kept) == 1 and open(kept[0], "rb").read() == good[: len(good) // 2]  # moved aside, not deleted


def test_backups_within_one_second_keep_every_file(tmp_path, monkeypatch):
    # Three saves to one path within the same second: the two files replaced are both kept.
    monkeypatch.setattr(checkpoint.time, "strftime", lambda fmt: "20260101-000000")
    path = str(tmp_path / "0000003.pt")
    for value in range(3):
        with pytest.warns(UserWarning, match="existed and was moved to") if value else contextlib.nullcontext():
            checkpoint.save_checkpoint({"value": value}, path)
    kept = sorted(glob.glob(path + ".*.bak"))
    assert [os.path.basename(p) for p in kept] == ["0000003.pt.20260101-000000-1.bak", "0000003.pt.20260101-000000.bak"]
    assert [torch.load(p)["value"] for p in kept] == [1, 0] and torch.load(path)["value"] == 2


def test_bad_resume_fails_and_touches_nothing(tmp_path, npz_data, straight_run):
    before = fingerprint(straight_run)
    ckpt6 = checkpoint.checkpoint_path(straight_run, 6)
    with pytest.raises(ValueError, match="model: checkpoint 'DiT-T/4', flags 'DiT-T/2'"):
        run(straight_run, "--resume", ckpt6, "--model", "DiT-T/2", data=npz_data)
    with pytest.raises(ValueError, match="image_size: checkpoint 8, flags 16"):
        run(straight_run, "--resume", ckpt6, "--image-size", "16", data=npz_data)
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume auto"):
        run(straight_run, "--max-steps", "9", data=npz_data)

    # The data order continues only with the data, seed and global batch it was drawn with.
    with pytest.raises(ValueError, match="global_seed: checkpoint 0, flags 7"):
        run(straight_run, "--resume", ckpt6, "--global-seed", "7", data=npz_data)
    with pytest.raises(ValueError, match="global_batch_size: checkpoint 8, flags 4"):
        run(straight_run, "--resume", ckpt6, "--global-batch-size", "4", data=npz_data)
    with pytest.raises(ValueError, match="dataset: checkpoint 'npz', flags 'digits'"):
        run(straight_run, "--resume", ckpt6)

    truncated = tmp_path / "0000006.pt"
    truncated.write_bytes(open(ckpt6, "rb").read()[:1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        run(tmp_path / "run", "--resume", str(truncated), data=npz_data)
    assert truncated.stat().st_size == 1000 and not (tmp_path / "run").exists()
    assert fingerprint(straight_run) == before


def test_resume_takes_the_pde_defaults_as_given():
    args = train.parse_args(TINY + ["--model", "PDESSM-DiT-T/4"])
    state = {"model_kwargs": dict(mixer=None, input_size=8), "args": vars(args)}
    for terms in (("reaction", "diffusion", "convection"), None):
        train.check_resumable(state, "x.pt", args, dict(mixer=None, input_size=8, pdessm_terms=terms))
    with pytest.raises(ValueError, match=r"pdessm_terms: checkpoint None, flags \('diffusion',\)"):
        train.check_resumable(state, "x.pt", args, dict(mixer=None, input_size=8, pdessm_terms=("diffusion",)))
    # A checkpoint that does not name its coupling was pairwise.
    train.check_resumable(state, "x.pt", args, dict(mixer=None, input_size=8, pdessm_coupling="pairwise"))
    with pytest.raises(ValueError, match=r"pdessm_coupling: checkpoint 'pairwise', flags 'diagonal'"):
        train.check_resumable(state, "x.pt", args, dict(mixer=None, input_size=8, pdessm_coupling="diagonal"))
    # A heads checkpoint that left the groups out has DiT-T's 4 attention heads, whether given or not.
    heads = dict(mixer=None, input_size=8, pdessm_coupling="heads")
    state = {"model_kwargs": heads, "args": vars(args)}
    for given in ({}, {"pdessm_heads": 4}):
        train.check_resumable(state, "x.pt", args, dict(heads, **given))
    with pytest.raises(ValueError, match=r"pdessm_heads: checkpoint 4, flags 2"):
        train.check_resumable(state, "x.pt", args, dict(heads, pdessm_heads=2))


def test_coupling_flags_reach_the_checkpoint_and_bind_the_resume(tmp_path, npz_data):
    # 2 channel groups of 32 in every block of the tiny model (64 channels), as the sampling scripts rebuild it.
    run(tmp_path, "--model", "PDESSM-DiT-T/4", "--pdessm-coupling", "heads", "--pdessm-heads", "2", "--max-steps",
        "3", data=npz_data)
    model, state = checkpoint.load_model(checkpoint.checkpoint_path(tmp_path, 3), "cpu")
    mixers = [block.attn for block in model.blocks]
    assert all((m.coupling, m.num_heads) == ("heads", 2) for m in mixers)
    assert mixers[0].pde_parameters()[0].shape == (2, 32, 32, 2, 2)  # K of each group: 32 x 32 pairs
    assert state["model_kwargs"]["pdessm_coupling"] == "heads" and state["model_kwargs"]["pdessm_heads"] == 2
    with pytest.raises(ValueError, match=r"pdessm_coupling: checkpoint 'heads', flags 'pairwise'"):
        run(tmp_path, "--model", "PDESSM-DiT-T/4", "--max-steps", "6", "--resume", "auto", data=npz_data)
    # Left out, the groups would be the config's 4: refused before the weights fail to load.
    with pytest.raises(ValueError, match=r"pdessm_heads: checkpoint 2, flags 4"):
        run(tmp_path, "--model", "PDESSM-DiT-T/4", "--pdessm-coupling", "heads", "--max-steps", "6", "--resume",
            "auto", data=npz_data)


@pytest.mark.parametrize("flags,message", [
    (["--model", "DiT-T/4", "--pdessm-coupling", "diagonal"],
     "--pdessm-coupling configures PDE-SSM mixers, and DiT-T/4 has none; pass a PDESSM-DiT model or --mixer pdessm"),
    (["--model", "PDESSM-DiT-T/4", "--mixer", "attn", "--pdessm-terms", "diffusion"],
     "--pdessm-terms configures PDE-SSM mixers, and PDESSM-DiT-T/4 with --mixer attn has none"),
    (["--model", "PDESSM-DiT-T/4", "--pdessm-heads", "2"],
     "--pdessm-heads 2 sets the channel groups of --pdessm-coupling heads; got --pdessm-coupling pairwise"),
    (["--model", "PDESSM-DiT-T/4", "--pdessm-coupling", "heads", "--pdessm-heads", "3"],
     "hidden_dim 64 is not divisible by num_heads 3"),
])
def test_pdessm_flags_the_model_cannot_take_fail_before_any_file(tmp_path, npz_data, flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        run(tmp_path / "run", *flags, "--max-steps", "1", data=npz_data)
    assert not (tmp_path / "run").exists()


def test_new_runs_are_numbered_past_the_highest(tmp_path):
    for name in ("000-DiT-T-4", "004-DiT-T-4", "notes.txt"):  # 001 to 003 were deleted
        (tmp_path / name).mkdir()
    args = train.parse_args(TINY + ["--results-dir", str(tmp_path)])
    assert train.pick_run_dir(args) == str(tmp_path / "005-DiT-T-4")
    # A checkpoint outside a run's checkpoints/ folder starts a new run rather than writing beside it.
    args = train.parse_args(TINY + ["--results-dir", str(tmp_path), "--resume", str(tmp_path / "pretrained.pt")])
    assert train.pick_run_dir(args) == str(tmp_path / "005-DiT-T-4")
    args.resume = str(tmp_path / "004-DiT-T-4" / "checkpoints" / "0000003.pt")
    assert train.pick_run_dir(args) == str(tmp_path / "004-DiT-T-4")
    # Runs of one model with another coupling are named apart, so --resume auto finds each its own.
    for flags, name in ((["--pdessm-coupling", "diagonal"], "005-PDESSM-DiT-T-4-diagonal"),
                        (["--pdessm-coupling", "heads", "--pdessm-heads", "2"], "005-PDESSM-DiT-T-4-heads2")):
        args = train.parse_args(TINY + ["--results-dir", str(tmp_path), "--model", "PDESSM-DiT-T/4", *flags])
        assert train.pick_run_dir(args) == str(tmp_path / name)


def test_atomic_writes_get_the_permissions_of_open(tmp_path):
    umask = os.umask(0o022)
    try:
        with checkpoint.atomic_write(tmp_path / "atomic.bin") as f:
            f.write(b"x")
        with open(tmp_path / "plain.bin", "wb") as f:
            f.write(b"x")
    finally:
        os.umask(umask)
    modes = [os.stat(tmp_path / name).st_mode & 0o777 for name in ("atomic.bin", "plain.bin")]
    assert modes == [0o644, 0o644]


@pytest.fixture(scope="module")
def proxy_flags(tmp_path_factory):
    """The FID proxy's flags: 65 samples against 100 random gray 8x8 images, through an untrained tiny
    Fashion-MNIST classifier (64 features)."""
    import fmnist_classifier
    folder = tmp_path_factory.mktemp("proxy")
    ref = str(folder / "ref.npz")
    np.savez(ref, np.random.default_rng(1).integers(0, 256, (100, 8, 8, 1), dtype=np.uint8))
    torch.manual_seed(0)
    classifier = str(folder / "classifier.pt")
    fmnist_classifier.save_classifier(fmnist_classifier.FashionMNISTClassifier(widths=(4, 8, 8)), classifier,
                                      test_accuracy=0.0)
    return ["--eval-samples", "65", "--eval-ref", ref, "--eval-features", "fmnist", "--eval-weights", classifier]


def test_fid_proxy_records_and_pdessm_terms(tmp_path, monkeypatch, proxy_flags):
    import evaluate
    calls = []

    def fake_proxy_distance(features, reference):
        calls.append((features.shape, reference["mu"].shape))
        return 10.0 * len(calls)

    monkeypatch.setattr(evaluate, "proxy_distance", fake_proxy_distance)
    run(tmp_path, "--model", "PDESSM-DiT-T/4", "--pdessm-terms", "diffusion", "reaction", "--max-steps", "4",
        "--eval-every", "2", *proxy_flags, "--eval-split", "test")
    # 65 samples' fmnist features against the reference's, measured once at start-up and cached beside it
    assert calls == [((65, 64), (64,))] * 2
    assert os.path.isfile(evaluate.stats_cache_path(proxy_flags[3], "fmnist-classifier-64"))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["fid"]) for r in records if "fid" in r] == [(2, 10.0), (4, 20.0)]
    state = checkpoint.load_checkpoint(checkpoint.checkpoint_path(tmp_path, 4))
    assert state["model_kwargs"]["pdessm_terms"] == ("diffusion", "reaction")
    checkpoint.load_model(checkpoint.checkpoint_path(tmp_path, 4), "cpu")  # rebuilds with the same terms

    with pytest.raises(ValueError, match="--eval-ref"):
        run(tmp_path / "other", "--eval-every", "2")


def test_too_few_fid_proxy_samples_fail_before_training(tmp_path, npz_data):
    flags = ["--eval-every", "1", "--eval-ref", npz_data, "--eval-features", "fmnist", "--eval-samples", "64"]
    with pytest.raises(ValueError, match="--eval-samples 64 is too few for the 64 features"):
        run(tmp_path / "run", *flags, data=npz_data)
    with pytest.raises(ValueError, match="--eval-samples 100 is too few for the 128 features"):
        run(tmp_path / "run", *flags, "--eval-samples", "100", "--eval-feature-dim", "128", data=npz_data)
    assert not (tmp_path / "run").exists()


def test_missing_data_exits_nonzero_without_files(tmp_path):
    cmd = [sys.executable, "train.py", *TINY, "--dataset", "npz", "--data-path", str(tmp_path / "missing.npz"),
           "--run-dir", str(tmp_path / "run")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "missing.npz not found; pass --data-path" in result.stderr
    assert not (tmp_path / "run").exists()

    with pytest.raises(SystemExit):
        train.parse_args(["--dataset", "mnist"])


def torchrun_two_cpu_workers(run_dir, *flags):
    """train.py under torchrun with 2 workers on the CPU (gloo; GPUs hidden) and up to one restart."""
    two_cpu_workers("train.py", *TINY, "--run-dir", str(run_dir), *flags)


def two_cpu_workers(script, *flags):
    """A script of this repository under torchrun with 2 workers on the CPU and up to one restart."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           script, *flags]
    # torch shares the rendezvous store with restarted workers, which may then read the dead ones'
    # addresses; the opt-out gives every restart a fresh store (see train.py's docstring).
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", CUDA_VISIBLE_DEVICES="")
    # A session of its own, so a timeout kills the workers with the launcher instead of orphaning them.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]


def test_torchrun_two_workers_survive_a_dying_worker(tmp_path):
    """torchrun, 2 CPU workers (this tests a dying worker, not GPUs): rank 1 dies at step 3 on the first
    attempt; the restart resumes from the step-2 checkpoint and finishes at step 6 with identical weights
    on both ranks."""
    torchrun_two_cpu_workers(tmp_path, "--dataset", "digits", "--max-steps", "6", "--ckpt-every", "2",
                             "--resume", "auto", "--fail-at-step", "3")

    log = open(tmp_path / "log.txt").read()
    assert log.count("Run folder") == 2  # the first attempt and the restart
    assert "Resumed from" in log and "0000002.pt at step 2" in log
    steps = sorted(checkpoint.load_checkpoint(p)["step"] for p in glob.glob(str(tmp_path / "checkpoints" / "*.pt")))
    assert steps == [2, 4, 6]
    digests = log.split("Weights SHA-256 per rank: ")[-1].split()
    assert len(digests) == 2 and digests[0] == digests[1]
    final = checkpoint.load_checkpoint(checkpoint.checkpoint_path(tmp_path, 6))
    model, _ = checkpoint.load_model(checkpoint.checkpoint_path(tmp_path, 6), "cpu", weights="model")
    assert train.weights_digest(model) == digests[0] and final["args"]["model"] == "DiT-T/4"


def test_proxy_noise_is_each_samples_own():
    batch = train.proxy_noise(torch.arange(3, 8), (2, 3, 5), seed=7)
    torch.testing.assert_close(train.proxy_noise(torch.tensor([5]), (2, 3, 5), seed=7)[0], batch[2], rtol=0, atol=0)
    assert not torch.equal(batch[0], batch[1])
    assert not torch.equal(batch, train.proxy_noise(torch.arange(3, 8), (2, 3, 5), seed=8))


def test_torchrun_workers_share_the_fid_proxy(tmp_path, proxy_flags):
    """2 CPU workers take the FID proxy's batches (4 samples each) in turn and rank 0 logs the FID of them
    all: the same as one process measures in batches of 8 for the same EMA weights, the checkpoint's."""
    import evaluate
    flags = ["--dataset", "digits", "--max-steps", "2", "--ckpt-every", "2", "--eval-every", "2", *proxy_flags]
    torchrun_two_cpu_workers(tmp_path, *flags)
    logged, = [r["fid"] for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "fid" in r]

    ema, _ = checkpoint.load_model(checkpoint.checkpoint_path(tmp_path, 2), "cpu")
    args = train.parse_args(TINY + flags)
    extractor = evaluate.build_extractor("fmnist", None, args.eval_weights, "cpu")
    reference, _ = evaluate.reference_statistics(args.eval_ref, extractor, with_features=False)
    one_process = train.fid_proxy(args, ema, None, (1, 8, 8), args.global_batch_size, extractor, reference)
    assert logged == pytest.approx(one_process, rel=1e-4)


def rank_zero_work_outlasting_the_deadline(rank, folder):
    """One of 2 gloo processes whose default group gives up after 2 s: rank 0 works 4 s in on_rank_zero, fails
    in it, then works 4 s before a plain barrier. Writes (on_rank_zero's result, the failure each rank saw,
    how the plain barrier ended) to <rank>.json."""
    open(os.path.join(folder, f"ready{rank}"), "w").close()  # start the 2 s deadlines together
    while not os.path.exists(os.path.join(folder, f"ready{1 - rank}")):
        time.sleep(0.01)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(folder, "store"), rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=2))
    result = train.on_rank_zero(rank, lambda: time.sleep(4) or "measured")

    def fail():
        raise FileNotFoundError("reference ref.npz not found")
    try:
        train.on_rank_zero(rank, fail)
        failure = None
    except Exception as e:
        failure = f"{type(e).__name__}: {e}"
    try:
        if rank == 0:
            time.sleep(4)
        dist.barrier()
        plain = "passed"
    except RuntimeError:
        plain = "timed out"
    with open(os.path.join(folder, f"{rank}.json"), "w") as f:
        json.dump([result, failure, plain], f)


def test_ranks_wait_for_rank_zero_past_the_default_groups_deadline(tmp_path):
    """While rank 0 works longer than the process group's deadline (NCCL's 10 minutes, 2 s here), the others
    wait in on_rank_zero and go on with it, or fail with it; at the default group's barrier they give up."""
    torch.multiprocessing.spawn(rank_zero_work_outlasting_the_deadline, args=(str(tmp_path),), nprocs=2)
    results = [json.load(open(tmp_path / f"{rank}.json")) for rank in (0, 1)]
    missing = "FileNotFoundError: reference ref.npz not found"
    assert results[0][:2] == ["measured", missing]
    assert results[1] == [None, f"RuntimeError: rank 0 failed while the other ranks waited for it: {missing}",
                          "timed out"]


def test_more_processes_per_node_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert train.process_device(0, 1) == torch.device("cuda", 0)
    for local_rank in (0, 1):  # every process refuses, not only the one without a GPU
        with pytest.raises(ValueError, match=r"started 2 processes per node, but this node has 1 visible CUDA "
                                             r"device\(s\).*--nproc_per_node to at most 1.*CUDA_VISIBLE_DEVICES="):
            train.process_device(local_rank, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.process_device(1, 2) == torch.device("cpu")


def test_update_ema_is_the_convex_combination():
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.9 * e.detach().clone() + 0.1 * p.detach() for e, p in zip(ema.parameters(), model.parameters())]
    train.update_ema(ema, model, 0.9)
    for e, want in zip(ema.parameters(), expected):
        torch.testing.assert_close(e.detach(), want)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_gradients_matches_clip_grad_norm(max_norm):
    """Clipping from the norm computed once (`gradient_norm`) scales the gradients as torch's
    clip_grad_norm_ does, which computes it itself: down to max_norm when above it (0.5 against a
    norm of 4.5), unchanged when below (100)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in [(3, 4), (5,), (2, 2, 2)]]
    for p in params:
        p.grad = torch.randn_like(p)
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for r, p in zip(reference, params):
        r.grad = p.grad.clone()
    norm = torch.nn.utils.clip_grad_norm_(reference, max_norm)
    train.clip_gradients(params, max_norm, train.gradient_norm(params))
    for p, r in zip(params, reference):
        torch.testing.assert_close(p.grad, r.grad)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    assert clipped.item() == pytest.approx(min(max_norm, norm.item()), rel=1e-5)


def test_gradient_clipping_shrinks_the_first_adam_step(tmp_path, npz_data):
    """AdamW's first step moves every weight with a gradient by about lr (m / sqrt(v) = sign g); a
    gradient clipped to norm 1e-9 is far below Adam's eps = 1e-8, so the step shrinks to a small
    fraction of lr. The logged norm is that of the unclipped gradient."""
    moves = {}
    for clip in ("0", "1e-9"):
        run_dir = tmp_path / f"clip-{clip}"
        run(run_dir, "--max-steps", "1", "--max-grad-norm", clip, data=npz_data)
        state = checkpoint.load_checkpoint(checkpoint.checkpoint_path(run_dir, 1))
        torch.manual_seed(0)
        initial = models.build_model(state["args"]["model"], **state["model_kwargs"]).state_dict()
        moves[clip] = max((state["model"][k] - v).abs().max().item() for k, v in initial.items())
        record = json.loads(open(os.path.join(run_dir, "metrics.jsonl")).readline())
        assert record["grad_norm"] == pytest.approx(record["grad_norm_max"]) and record["grad_norm"] > 1e-3
    assert moves["0"] == pytest.approx(1e-3, rel=0.05)
    assert moves["1e-9"] < 0.2e-3


@pytest.mark.parametrize("model, groups", [("DiT-T/4", {"mixer", "other"}),
                                           ("PDESSM-DiT-T/4", {"pde", "mixer", "other"})])
def test_gradient_groups_partition_the_gradient_norm(tmp_path, npz_data, model, groups):
    """The groups' gradient norms (one step per record, so each maximum is that step's norm) add up in
    squares to the whole gradient's norm, as disjoint groups covering every parameter must. DiT starts
    with a zero output layer and zero adaLN gates, so the mixers get gradients from the third step on.
    The PDE coefficients are K's Cholesky factor, b, r and log tau of each block."""
    run(tmp_path, "--model", model, "--max-steps", "3", data=npz_data)
    records = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    for record in records:
        by_group = record["grad_norm_max_by_group"]
        assert set(by_group) == groups
        assert sum(v * v for v in by_group.values()) ** 0.5 == pytest.approx(record["grad_norm"], rel=1e-5)
    first, _, third = (r["grad_norm_max_by_group"] for r in records)
    assert first["other"] > 0 and all(first[g] == 0 for g in groups - {"other"})
    assert min(third.values()) > 0
    if "pde" in groups:
        model = models.build_model(model, input_size=8, num_classes=10)
        pde = {id(p) for p in train.gradient_groups(model)["pde"]}
        names = [n for n, p in model.named_parameters() if id(p) in pde]
        assert sorted({n.split(".")[-1] for n in names}) == ["b", "chol", "log_tau", "r"]
        assert len(names) == 4 * len(model.blocks)


def test_cuda_graph_needs_one_cuda_process(tmp_path, npz_data):
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="--cuda-graph needs one process on a CUDA device"):
            run(tmp_path, "--max-steps", "1", "--cuda-graph", "--precision", "fp16", data=npz_data)
    else:
        with pytest.raises(ValueError, match="--cuda-graph needs one process on a CUDA device"):
            run(tmp_path, "--max-steps", "1", "--cuda-graph", data=npz_data)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused AdamW runs on CUDA only")
@pytest.mark.parametrize("model", ["DiT-T/4", "PDESSM-DiT-T/4"])
def test_fp16_steps_the_fused_adamw_through_the_gradient_scaler(tmp_path, npz_data, model):
    """On CUDA AdamW is fused, and under --precision fp16 the gradient scaler unscales the gradients
    (for the clipping) before it steps the optimizer: the run follows the fp32 run's losses to fp16's
    rounding, every step updates the weights (no step found an overflow and was skipped), and the
    checkpoint keeps the scaler's state."""
    flags = ["--max-steps", "6", "--model", model, "--max-grad-norm", "0.05"]
    fp32 = run(tmp_path / "fp32", *flags, data=npz_data)
    fp16 = run(tmp_path / "fp16", *flags, "--precision", "fp16", data=npz_data)
    want, got = step_losses(fp32), step_losses(fp16)
    assert sorted(got) == list(range(1, 7))
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=2e-2), f"step {s}"
    state = checkpoint.load_checkpoint(checkpoint.checkpoint_path(fp16, 6))
    assert state["opt"]["param_groups"][0]["fused"] is True
    assert all(int(p["step"]) == 6 for p in state["opt"]["state"].values())
    assert state["scaler"]["scale"] == 2.0 ** 16  # the initial scale: no overflow halved it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("model,clip,compile", [("DiT-T/4", "0", False), ("PDESSM-DiT-T/4", "0.05", False),
                                                ("PDESSM-DiT-T/4", "0.05", True)])
def test_cuda_graph_training_follows_the_eager_run(tmp_path, npz_data, model, clip, compile):
    """8 steps, the last 5 replayed from one CUDA graph, against 8 steps without the graph from the same
    seed (both of the torch.compile'd model with compile): the same losses at every step (the graph's
    random draws follow the per-step seeds) and the same weights, up to float rounding, with and without
    gradient clipping; then a graph run resumed from the eager run's step-3 checkpoint (saved by an optimizer
    that was not capturable) ends at the graph run's weights.
    (A compiled run ends farther from an uncompiled one than rounding: AdamW turns inductor's different
    rounding of the near-zero early gradients of the zero-initialized adaLN layers into full steps.)"""
    flags = ["--max-steps", "8", "--model", model, "--max-grad-norm", clip] + (["--compile"] if compile else [])
    eager = run(tmp_path / "eager", *flags, data=npz_data)
    graph = run(tmp_path / "graph", *flags, "--cuda-graph", data=npz_data)
    want, got = step_losses(eager), step_losses(graph)
    assert sorted(got) == list(range(1, 9))
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=1e-3), f"step {s}"
    final = [checkpoint.load_checkpoint(checkpoint.checkpoint_path(d, 8)) for d in (eager, graph)]
    for key in ("model", "ema"):
        for name, value in final[0][key].items():
            torch.testing.assert_close(final[1][key][name], value, rtol=1e-3, atol=1e-4, msg=f"{key}.{name}")

    resumed = tmp_path / "resumed"
    shutil.copytree(os.path.join(eager, "checkpoints"), resumed / "checkpoints")
    os.remove(checkpoint.checkpoint_path(resumed, 6))
    os.remove(checkpoint.checkpoint_path(resumed, 8))
    run(resumed, *flags, "--cuda-graph", "--resume", "auto", data=npz_data)
    again = checkpoint.load_checkpoint(checkpoint.checkpoint_path(resumed, 8))
    for name, value in final[1]["model"].items():
        torch.testing.assert_close(again["model"][name], value, rtol=1e-3, atol=1e-4, msg=name)
