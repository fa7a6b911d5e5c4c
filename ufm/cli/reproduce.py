"""``ufm reproduce``: the paper's tables and figure 4, side by side with ufm's numbers."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ufm.cli.common import check_out_dir, open_store


def register(sub: Any) -> None:
    from ufm.reports.reproduce import SCALES, TARGETS

    p = sub.add_parser(
        "reproduce", help="reproduce the paper's Table 1/2/3 or Figure 4 and write them beside the paper's numbers",
        description="Build the study of a paper result (canaries by self-influence, one model per canary), run it "
                    "locally or on Ray, and write <target>.csv/.md/.html (paper vs ufm) and <target>-canaries.csv. "
                    "Runs finished earlier (same config) are reused: an interrupted reproduction resumes. Scales: "
                    + "; ".join(f"{k}: {v.about}" for k, v in SCALES.items()) + ".")
    p.add_argument("target", choices=[*TARGETS, "all"])
    p.add_argument("--scale", choices=list(SCALES), default="smoke")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default reproduce-<scale>)")
    # = ufm.runs.executors.EXECUTORS, spelt out: importing it imports torch, and every verb builds this parser
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: a process per run on this machine; ray: a Ray task per run (pip install 'ufm[ray]')")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster to join (e.g. auto, ray://head:10001); default $UFM_RAY_ADDRESS, else a local "
                        "Ray instance")
    p.add_argument("--data-dir", default=None, help="where datasets live (default $UFM_DATA_DIR or ~/.cache/ufm/data)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--seed", type=int, default=0, help="training seed of every model (default 0)")
    p.add_argument("--home", default=None, metavar="DIR",
                   help="ufm home holding the run database (default $UFM_HOME, else ~/.local/share/ufm)")
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(a: argparse.Namespace) -> int:
    from ufm.runs.executors import make_executor
    from ufm.reports.reproduce import reproduce

    if a.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {a.seed}")

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    out = a.out or f"reproduce-{a.scale}"
    check_out_dir(out)  # before the store, the executor and hours of training
    with open_store(a) as store:
        executor = make_executor(a.executor, store, address=a.ray_address)
        try:
            done = reproduce(executor, a.target, a.scale, out, data_dir=a.data_dir, device=a.device, seed=a.seed,
                             say=say)
        finally:
            executor.shutdown()
    for r in done:
        sys.stdout.write(r.files[1].read_text() + "\n")
        say(f"{r.target}: {len(r.canaries)} canary models, {r.seconds:.0f} s; wrote "
            + ", ".join(str(f) for f in r.files))
    return 0
