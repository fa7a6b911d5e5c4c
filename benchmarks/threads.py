"""Thread settings of a run's process: a small MLP's training steps alone and beside a busy process.

    python benchmarks/threads.py [--steps 300] [--batch 128]

Four figures per setting: seconds for ``--steps`` Adam steps of a 784-256-10 MLP on a
(batch, 784) tensor, alone and beside one busy process (``while True: pass``), and their ratio.

- default: a fresh interpreter with torch's defaults (one intra-op thread per core, OpenMP's
  default wait policy: waiting threads spin), OMP_NUM_THREADS and OMP_WAIT_POLICY unset.
- default + PASSIVE: the same with only ``OMP_WAIT_POLICY=PASSIVE`` set (the wait policy alone).
- worker: a process of :mod:`ufm.runs.worker` as a Runner starts it for one run at a time
  (``threads_per_run(1)`` threads, ``OMP_WAIT_POLICY=PASSIVE`` set before torch loads).
- worker, 1 thread: the same with one thread (what two concurrent runs on 2 cores get).

Prints figures only (timings depend on the machine and its load); no asserts.

Measured 2026-11-25 on the 2-core build machine (torch CPU, 300 steps; the machine was shared,
load average 4-6, so "alone" is never quite alone; three runs, seconds):

| setting | threads | alone | beside one busy process |
| --- | ---: | ---: | ---: |
| default (spinning OpenMP threads) | 2 | 13.5, 4.3, 25.8 | 24.9, 28.6, 11.3 |
| default + OMP_WAIT_POLICY=PASSIVE | 2 | 0.78 | 0.77 |
| worker process | 2 | 2.98, 1.10, 2.11 | 0.82, 0.83, 0.78 |
| worker process, 1 thread | 1 | 1.08, 0.67, 0.96 | 2.46, 1.35, 2.02 |

The wait policy is what matters on a busy machine: 2 spinning threads were 5-30x slower than 2
passive ones.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step_loop(report, steps: int, batch: int) -> None:
    """``steps`` training steps; reports ``"<seconds> <threads> <OMP_WAIT_POLICY>"``."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.rand(batch, 784), torch.randint(0, 10, (batch,))
    for _ in range(20):  # warm-up: the thread pool starts here
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    report(f"{time.perf_counter() - t0:.3f} {torch.get_num_threads()} {os.environ.get('OMP_WAIT_POLICY', 'unset')}")


def _default(steps: int, batch: int, policy: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import threads; "
            f"threads.step_loop(print, {steps}, {batch})")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def _worker(steps: int, batch: int, threads: int | None) -> str:
    from ufm.runs import worker

    seen: list[str] = []
    worker.run_task(step_loop, (steps, batch), report=seen.append, threads=threads)
    return seen[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    # The worker's own choices, not this shell's (the forkserver copies this environment).
    os.environ.pop("OMP_NUM_THREADS", None)
    os.environ.pop("OMP_WAIT_POLICY", None)
    sys.path.insert(0, str(ROOT))
    from ufm.runs import worker

    print(f"{worker.cores()} cores; {args.steps} steps of a 784-256-10 MLP, batch {args.batch}")
    settings = [("default", lambda: _default(args.steps, args.batch)),
                ("default + PASSIVE", lambda: _default(args.steps, args.batch, "PASSIVE")),
                ("worker", lambda: _worker(args.steps, args.batch, None)),
                ("worker, 1 thread", lambda: _worker(args.steps, args.batch, 1))]
    _worker(1, 8, 1)  # start the forkserver (imports torch) before timing anything
    print(f"{'setting':18} {'threads':>7} {'wait policy':>11} {'alone s':>8} {'beside busy s':>13} {'ratio':>6}")
    for name, fn in settings:
        alone = fn().split()
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.5)
            beside = fn().split()
        finally:
            busy.kill()
            busy.wait()
        a, b = float(alone[0]), float(beside[0])
        print(f"{name:18} {alone[1]:>7} {alone[2]:>11} {a:8.2f} {b:13.2f} {b / a:6.1f}")


if __name__ == "__main__":
    main()
