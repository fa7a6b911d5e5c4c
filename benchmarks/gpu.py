"""Benchmark: a paper-scale CNN-2 run on CIFAR-10 and a 30-canary MLP sweep on MNIST.

Usage (from the repository root):

    python benchmarks/gpu.py                          # CUDA if present: the paper's budgets
    python benchmarks/gpu.py --device cpu --quick     # a CPU check of the same code paths (minutes)
    python benchmarks/gpu.py --sweep-executor ray     # the sweep's 30 models as Ray tasks

1. CNN-2 on CIFAR-10 (the paper's Table 2 setup: all 45,000 training images after the 10%
   validation split, at most 500 epochs with patience 10, 1,000 OOD images, K = 99 candidates):
   ``ufm.run_experiment`` end to end; prints training images per second (epochs x training
   images / training seconds), training and scoring seconds.
2. The paper's figure 4 sweep (MLP, MNIST): a reference model, TracIn self-influence of every
   training image, then one model per top-15 / bottom-15 canary (:func:`ufm.attribution.sweep.sweep_canaries`,
   in a fresh store under a temporary folder, so nothing is cached); prints the seconds of each
   part and the training images per second over the 30 models.

``--quick`` shrinks both (2,000 training images, 2 epochs, 100 OOD images and K = 19 for CNN-2;
1,000 images, 3 epochs and 3 + 3 canaries for the sweep) so the script runs anywhere; its figures then say nothing about a
GPU. Data from ``--data-dir`` (default ``$UFM_SHARED_DATA`` or ``../shared/data``).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ufm.core.canary import CanaryChoice  # noqa: E402
from ufm.core.experiment import ExperimentConfig, run_experiment  # noqa: E402
from ufm.core.features import glyph  # noqa: E402
from ufm.runs.store import Store  # noqa: E402
from ufm.attribution.sweep import sweep_canaries  # noqa: E402
from ufm.core.train import resolve_device  # noqa: E402

print = functools.partial(print, flush=True)  # noqa: A001


def default_data_dir() -> Path:
    env = os.environ.get("UFM_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def device_name(device: str) -> str:
    dev = resolve_device(device)
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"{dev.type} ({torch.get_num_threads()} torch threads)"


def cnn2_run(data_dir: str, device: str, quick: bool) -> None:
    cfg = ExperimentConfig(feature=glyph("A"), dataset="cifar10", data_dir=data_dir, arch="cnn2",
                           canary=CanaryChoice("index", (0,)), device=device,
                           epochs=2 if quick else 500, patience=10, train_size=2000 if quick else None,
                           ood_size=100 if quick else 1000, candidates=19 if quick else 99)
    print(f"CNN-2 on CIFAR-10: {'quick' if quick else 'paper'} budget, epochs <= {cfg.epochs}, patience "
          f"{cfg.patience}, train_size {cfg.train_size or 'all'}")
    t0 = time.perf_counter()
    res = run_experiment(cfg)
    wall = time.perf_counter() - t0
    rate = res.epochs_trained * res.n_train / res.train_seconds
    print(f"  {res.n_train} training images x {res.epochs_trained} epochs in {res.train_seconds:.1f} s: "
          f"{rate:,.0f} img/s; scoring {res.score_seconds:.1f} s; wall {wall:.1f} s; test accuracy "
          f"{res.test_accuracy:.3f}; M = {res.M:.4g}")


def mlp_sweep(data_dir: str, device: str, quick: bool, executor: str) -> None:
    top = bottom = 3 if quick else 15
    cfg = ExperimentConfig(feature=glyph("A"), dataset="mnist", data_dir=data_dir, arch="mlp", device=device,
                           epochs=3 if quick else 500, patience=10, train_size=1000 if quick else None,
                           ood_size=200 if quick else 1000, candidates=99)
    print(f"MLP sweep on MNIST: top-{top} + bottom-{bottom} canaries, epochs <= {cfg.epochs}, train_size "
          f"{cfg.train_size or 'all'}, executor {executor}")
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "home") as store:
        ex = None
        if executor != "thread":
            from ufm.runs.executors import make_executor
            ex = make_executor(executor, store)
        try:
            t0 = time.perf_counter()
            from ufm.attribution.sweep import cached_influence
            cached_influence(store.home, cfg)
            t1 = time.perf_counter()
            res = sweep_canaries(cfg, Path(tmp) / "out", store=store, top=top, bottom=bottom, executor=ex)
            t2 = time.perf_counter()
        finally:
            if ex is not None:
                ex.shutdown()
        imgs = sum(store.get(r).summary["n_train"] * store.get(r).summary["epochs_trained"]
                   for r in res.table["run_id"])
        train_s = sum(store.get(r).summary["train_seconds"] for r in res.table["run_id"])
    print(f"  reference model + self-influence: {t1 - t0:.1f} s; {len(res.table)} canary models: {t2 - t1:.1f} s "
          f"({(t2 - t1) / max(1, len(res.table)):.1f} s each); training {imgs / train_s:,.0f} img/s; "
          f"{res.summary()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    ap.add_argument("--quick", action="store_true", help="small budgets: a functional check, not a GPU figure")
    ap.add_argument("--data-dir", default=str(default_data_dir()))
    ap.add_argument("--only", choices=["cnn2", "sweep"], default=None, help="run one part only")
    ap.add_argument("--sweep-executor", choices=["thread", "local", "ray"], default="thread",
                    help="thread: one model after the other in this process (default); local: a process per "
                         "model; ray: a Ray task per model")
    a = ap.parse_args(argv)
    print(f"device: {device_name(a.device)}; torch {torch.__version__}")
    if a.only in (None, "cnn2"):
        cnn2_run(a.data_dir, a.device, a.quick)
    if a.only in (None, "sweep"):
        mlp_sweep(a.data_dir, a.device, a.quick, a.sweep_executor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
