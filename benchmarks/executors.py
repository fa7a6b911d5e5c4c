"""Benchmark: the same 12-run study on the local executor and on Ray; wall time and speed-up.

Usage (from the repository root; best on a quiet machine):

    python benchmarks/executors.py                       # 12 MLP runs on MNIST, Ray with all cores
    python benchmarks/executors.py --runs 12 --train-size 3000 --epochs 10 --ray-cpus 2

The study: ``--runs`` MLP models on the first ``--train-size`` MNIST images, the letter A on
image 0, seeds 0..runs-1 (every run is a different config, so nothing is cached). Each backend
gets a fresh store under a temporary folder. ``local`` is :class:`ufm.runs.executors.LocalExecutor`
with one slot per device (the dashboard's and CLI's default: runs one after the other, each in
its own process); ``ray`` is :class:`ufm.runs.executors.RayExecutor` on a local Ray instance with
``--ray-cpus`` CPUs, one CPU per run. Both train each run on one torch thread, so the numbers
agree (checked) and the speed-up is what running runs side by side buys. Ray's start-up is
timed separately and not counted in its study time.
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

from ufm.core.canary import CanaryChoice  # noqa: E402
from ufm.runs.executors import LocalExecutor, RayExecutor  # noqa: E402
from ufm.core.experiment import ExperimentConfig  # noqa: E402
from ufm.core.features import glyph  # noqa: E402
from ufm.runs.store import Store  # noqa: E402
from ufm.runs.studies import create_study, runs_frame, seed_members, submit_study  # noqa: E402
from ufm.runs.worker import cores  # noqa: E402

print = functools.partial(print, flush=True)  # noqa: A001


def default_data_dir() -> Path:
    env = os.environ.get("UFM_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def timed_study(executor, base: ExperimentConfig, runs: int) -> tuple[float, list[float]]:
    create_study(executor.store, "bench", "seeds", base, seed_members(base, range(runs)))
    t0 = time.perf_counter()
    ids = submit_study(executor, "bench")
    recs = executor.wait(ids)
    wall = time.perf_counter() - t0
    bad = [r for r in recs if r.status != "done"]
    if bad:
        raise SystemExit(f"{len(bad)} runs did not finish: {bad[0].error}")
    return wall, runs_frame(executor.store, "bench", references=0)["M"].tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--train-size", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--ray-cpus", type=int, default=cores())
    ap.add_argument("--data-dir", default=str(default_data_dir()))
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    base = ExperimentConfig(feature=glyph("A"), dataset="mnist", data_dir=a.data_dir, arch="mlp",
                            canary=CanaryChoice("index", (0,)), epochs=a.epochs, patience=a.epochs,
                            train_size=a.train_size, ood_size=500, candidates=99, device="auto")
    print(f"{a.runs} runs: MLP, {a.train_size} MNIST images, {a.epochs} epochs; {cores()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        with Store(Path(tmp) / "local") as store, LocalExecutor(store) as ex:
            local, m_local = timed_study(ex, base, a.runs)
        print(f"local (a process per run, one at a time): {local:.1f} s")
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=a.ray_cpus, include_dashboard=False, log_to_driver=False)
        start = time.perf_counter() - t0
        try:
            with Store(Path(tmp) / "ray") as store:
                ex = RayExecutor(store)
                try:
                    remote, m_ray = timed_study(ex, base, a.runs)
                finally:
                    ex.shutdown()
        finally:
            ray.shutdown()
    print(f"ray ({a.ray_cpus} CPUs, one per run): {remote:.1f} s (+ {start:.1f} s to start Ray)")
    print(f"speed-up of Ray over local: {local / remote:.2f}x ({local / (remote + start):.2f}x counting Ray's start)")
    print("identical M on both backends:", m_local == m_ray)
    return 0


if __name__ == "__main__":
    sys.exit(main())
