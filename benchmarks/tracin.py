"""Benchmark: ufm.attribution.tracin.self_influence against captum's TracInCP.self_influence.

Usage (from the repository root):

    python benchmarks/tracin.py                      # mlp and cnn1, 5,000 images, 10 checkpoints
    python benchmarks/tracin.py --arch cnn1 --n 2000 --captum-n 200

Checkpoints: a model of the chosen architecture is trained for one epoch (Adam, the paper's
learning rate and batch size) on the first ``--n`` MNIST training images, and its weights are
saved at ``--checkpoints`` evenly spaced steps, the initial weights included; every checkpoint
gets that learning rate. Both libraries then score the same images on the same checkpoint files,
over all parameters, with cross-entropy, in eval mode.

captum is timed on the first ``--captum-n`` images only (its default per-example loop is slow)
and its per-example rate is extrapolated to ``--n``; the output says so. Its opt-in
``sample_wise_grads_per_batch=True`` mode is timed as well. The two libraries' scores are
compared on the captum subset. The time to score all 60,000 MNIST training images with the
``--checkpoints`` checkpoints is measured for the mlp (``--no-60k`` to skip it).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ufm.attribution.tracin import self_influence  # noqa: E402
from ufm.core.models import DEFAULT_BATCH, DEFAULT_LR, build_model  # noqa: E402

print = functools.partial(print, flush=True)  # noqa: A001  (progress shows up in logs)


def default_data_dir() -> Path:
    env = os.environ.get("UFM_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def load_mnist(data_dir: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    path = data_dir / "mnist" / "train.npz"
    if not path.is_file():
        raise SystemExit(f"MNIST not found at {path}; pass --data-dir pointing at the folder "
                         "that holds mnist/train.npz (or set UFM_SHARED_DATA)")
    blob = np.load(path)
    x = torch.from_numpy(blob["x"][:n]).float()[:, None] / 255.0
    return x, torch.from_numpy(blob["y"][:n]).long()


def train_checkpoints(arch: str, x: torch.Tensor, y: torch.Tensor, k: int,
                      folder: Path) -> tuple[nn.Module, list[Path], float]:
    """One epoch of training; the weights at k evenly spaced steps (step 0 = init), saved."""
    torch.manual_seed(0)
    model = build_model(arch, 1, (28, 28), 10)
    lr, bs = DEFAULT_LR[arch], DEFAULT_BATCH[arch]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batches = torch.randperm(x.shape[0]).split(bs)
    save_at = set(np.round(np.linspace(0, len(batches), k)).astype(int).tolist())
    paths: list[Path] = []

    def save(step: int) -> None:
        path = folder / f"{arch}_step{step:04d}.pt"
        torch.save(model.state_dict(), path)
        paths.append(path)

    model.train()
    for step, idx in enumerate(batches):
        if step in save_at:
            save(step)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    if len(batches) in save_at:
        save(len(batches))
    return model.eval(), paths, lr


def time_captum(model: nn.Module, paths: list[Path], lr: float, x: torch.Tensor,
                y: torch.Tensor, *, sample_wise: bool) -> tuple[torch.Tensor, float]:
    """captum's TracInCP.self_influence on the same checkpoint files, at its fastest batch size.

    The default mode computes one ``autograd.grad`` per example over the whole batch's graph,
    so it is fastest with batches of one (captum's default ``batch_size=1``); the opt-in
    sample-wise trick was fastest at 16 on this machine (measured: 16 > 64 > 128).
    """
    import warnings

    from captum.influence import TracInCP

    # captum's sample-wise mode warns that it set requires_grad on the inputs; harmless here.
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require")

    def load(m: nn.Module, path: str) -> float:
        m.load_state_dict(torch.load(path, weights_only=True))
        return lr

    bs = 16 if sample_wise else 1
    data = torch.utils.data.TensorDataset(x, y)
    loss = nn.CrossEntropyLoss(reduction="sum" if sample_wise else "none")
    tracin = TracInCP(model, data, [str(p) for p in paths], checkpoints_load_func=load,
                      loss_fn=loss, batch_size=bs, sample_wise_grads_per_batch=sample_wise)
    start = time.perf_counter()
    scores = tracin.self_influence(torch.utils.data.DataLoader(data, batch_size=bs),
                                   outer_loop_by_checkpoints=True)
    return scores, time.perf_counter() - start


def bench(arch: str, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> None:
    k = args.checkpoints
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model, paths, lr = train_checkpoints(arch, x, y, k, Path(tmp))
        print(f"\n== {arch}: {x.shape[0]} MNIST images, {len(paths)} checkpoints from one "
              f"epoch of training ({time.perf_counter() - t0:.1f} s), lr {lr:g}, "
              f"{torch.get_num_threads()} torch threads on {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.2f} (other processes slow both libraries down)")
        states = [torch.load(p, weights_only=True) for p in paths]
        lrs = [lr] * len(states)

        self_influence(model, states[:1], x[:64], y[:64])  # warm-up (allocator, kernels)
        start = time.perf_counter()
        ours = self_influence(model, states, x, y, learning_rates=lrs,
                              batch_size=args.batch_size)
        t_ufm = time.perf_counter() - start
        rate_ufm = x.shape[0] / t_ufm
        print(f"ufm    self_influence      : {t_ufm:8.2f} s for {x.shape[0]} images  "
              f"{rate_ufm:9.1f} images/s  {rate_ufm * len(states):10.1f} example-checkpoints/s"
              f"  (measured, batch_size {args.batch_size})")

        m = min(args.captum_n, x.shape[0])
        for sample_wise in (False, True):
            theirs, t_cap = time_captum(model, paths, lr, x[:m], y[:m], sample_wise=sample_wise)
            rate_cap = m / t_cap
            mode = "sample-wise (bs16)" if sample_wise else "default loop (bs1)"
            rel = ((ours[:m] - theirs.double()).abs().max() / theirs.abs().max()).item()
            print(f"captum {mode}   : {t_cap:8.2f} s for {m} images  {rate_cap:9.1f} images/s  "
                  f"{rate_cap * len(states):10.1f} example-checkpoints/s  (measured on {m}, "
                  f"extrapolated {x.shape[0] / rate_cap:.1f} s for {x.shape[0]})")
            print(f"       ufm / captum {mode.strip():17s}: {rate_ufm / rate_cap:6.1f}x faster; "
                  f"max |difference| / max score = {rel:.1e}")

        if arch == "mlp" and args.full_60k:
            xa, ya = load_mnist(args.data_dir, 60000)
            start = time.perf_counter()
            self_influence(model, states, xa, ya, learning_rates=lrs, batch_size=args.batch_size)
            t_all = time.perf_counter() - start
            print(f"ufm    all {xa.shape[0]} MNIST training images x {len(states)} checkpoints "
                  f"(mlp): {t_all:.1f} s (measured)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["mlp", "cnn1"], choices=["mlp", "cnn1"])
    parser.add_argument("--n", type=int, default=5000, help="training images to score")
    parser.add_argument("--checkpoints", type=int, default=10, help="checkpoints (paper: 10)")
    parser.add_argument("--captum-n", type=int, default=500,
                        help="images captum is timed on (its rate is extrapolated)")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="ufm batch size (default: self_influence's own default, 128)")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(),
                        help="folder holding mnist/train.npz")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice, one per core)")
    parser.add_argument("--no-60k", dest="full_60k", action="store_false",
                        help="skip timing all 60,000 MNIST images (mlp)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.checkpoints < 2 or args.captum_n < 1:
        parser.error("need --n >= 1, --checkpoints >= 2 and --captum-n >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    x, y = load_mnist(args.data_dir, args.n)
    for arch in args.arch:
        bench(arch, args, x, y)


if __name__ == "__main__":
    main()
