"""Wall time of the guided demos as the dashboard runs them: first result and calibrated answer.

Each demo is queued exactly as the Home page's button does it (its study's runs, then its
setting's 39 reference models, on the dashboard's background :class:`ufm.runs.jobs.Runner` (the local executor), in a fresh
store), and timed until its first rung is trained (the first result on the page) and until every
rung has its calibrated verdict (bank complete and scored). ``--busy`` starts one process that
keeps a core busy beside it (a Python loop), as another user's job would.

    python benchmarks/demo_times.py [--demo teaching clinical] [--busy]

Rows are appended to ``benchmarks/results/demo-times.jsonl`` with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def time_demo(key: str, data_dir: str | None) -> dict:
    from ufm.measure.demos import plan_demo
    from ufm.runs.engine import wait_for
    from ufm.runs.jobs import Runner
    from ufm.measure.bank import bank_status, reference_test
    from ufm.runs.banks import submit_bank
    from ufm.runs.store import Store

    with tempfile.TemporaryDirectory() as home:
        store = Store(home)
        runner = Runner(store)
        plan = plan_demo(key, "cpu", data_dir)
        t0 = time.perf_counter()
        load0 = os.getloadavg()[0]
        ids = [runner.submit(cfg) for cfg in plan.configs()]
        bank = submit_bank(runner, plan.base)
        wait_for(runner, ids[:1])
        first = time.perf_counter() - t0
        wait_for(runner, ids + bank)
        if not bank_status(store, plan.base).complete:
            raise RuntimeError(f"demo {key}: the bank did not complete ({bank_status(store, plan.base).done} done)")
        verdicts = []
        for rid, cfg in zip(ids, plan.configs()):
            rec = store.get(rid)
            verdicts.append(reference_test(store, cfg, float(rec.summary["M"])).memorised)
        calibrated = time.perf_counter() - t0
        runner.shutdown()
        return {"demo": key, "first_result_s": round(first, 1), "calibrated_s": round(calibrated, 1),
                "memorised": verdicts, "rungs": [r.label for r in plan.rungs], "load_start": load0,
                "load_end": os.getloadavg()[0], "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", nargs="+", default=["teaching", "clinical"], choices=["teaching", "clinical"])
    ap.add_argument("--busy", action="store_true", help="time beside one process that keeps a core busy")
    ap.add_argument("--data-dir", default=os.environ.get("UFM_DATA_DIR"))
    args = ap.parse_args()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        for key in args.demo:
            row = dict(time_demo(key, args.data_dir), busy=bool(busy))
            print(json.dumps(row), flush=True)
            RESULTS.mkdir(parents=True, exist_ok=True)
            with (RESULTS / "demo-times.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
    finally:
        if busy is not None:
            busy.kill()


if __name__ == "__main__":
    main()
