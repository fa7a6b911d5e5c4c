"""The same quick run from the CLI and from the dashboard (3 browser sessions open), and the web
server's CPU while it waits.

Baseline: ``python -m ufm measure`` with the dashboard's Quick budget (MNIST, MLP, canary 0,
3,000 training images, at most 30 epochs, patience 5, 500 inference images, seed 0). Then a fresh
``streamlit run app.py`` (the repository's ``.streamlit/config.toml``), three headless Debian
chromium sessions on the Train page, and the same run started from the first one. Both runs are
timed by the run store (``finished - started`` of the run's own process), so the numbers compare
the training itself, not page loads. While the dashboard run trains, the server process's CPU time
(``/proc/<pid>/stat``, the server alone, not the run's process) is sampled.

Usage (on a quiet machine; prints figures, asserts nothing)::

    python benchmarks/dashboard_load.py [--data-dir ../shared/data] [--sessions 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's dashboard/ and ufm/, also when run as a script

from dashboard.testing import chromium, streamlit_server  # noqa: E402 - after the path

QUICK = ["--dataset", "mnist", "--arch", "mlp", "--canary-index", "0", "--train-size", "3000", "--epochs", "30",
         "--patience", "5", "--ood-size", "500", "--seed", "0", "--quiet"]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _run_seconds(home: Path) -> tuple[float, str]:
    from ufm.runs.store import Store

    with Store(home) as store:
        rec = store.list_runs("done", limit=1)[0]
        return rec.finished - rec.started, rec.id


def cli_run(data_dir: str) -> float:
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, UFM_HOME=home, UFM_DATA_DIR=data_dir)
        subprocess.run([sys.executable, "-m", "ufm", "measure", *QUICK], env=env, check=True, cwd=ROOT)
        return _run_seconds(Path(home))[0]


def dashboard_run(data_dir: str, sessions: int) -> tuple[float, float, float]:
    """Returns (run seconds, server CPU % of one core while the run trains, server CPU % idle-waiting)."""
    with tempfile.TemporaryDirectory() as home:
        env = {"UFM_DATA_DIR": data_dir, "UFM_AUTO_REFERENCES": "0", "UFM_PASSWORD": None}
        with streamlit_server(home, env, timeout=90) as server, chromium() as browser:
            url = server.url
            pages = [browser.new_page(viewport={"width": 1400, "height": 1600}) for _ in range(sessions)]
            for pg in pages:
                pg.goto(url + "/train")
                pg.get_by_role("button", name="Start").wait_for(timeout=120_000)
            c0, t0 = _cpu_seconds(server.pid), time.monotonic()
            time.sleep(20)
            idle = 100 * (_cpu_seconds(server.pid) - c0) / (time.monotonic() - t0)
            pages[0].get_by_role("button", name="Start").click()
            # All sessions watch the run: the other two open it through the query string.
            pages[0].wait_for_url("**run=*", timeout=60_000)
            for pg in pages[1:]:
                pg.goto(pages[0].url)
            c0, t0 = _cpu_seconds(server.pid), time.monotonic()
            pages[0].get_by_text("Result of run").wait_for(timeout=1_800_000)
            busy = 100 * (_cpu_seconds(server.pid) - c0) / (time.monotonic() - t0)
        return _run_seconds(Path(home))[0], busy, idle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("UFM_DATA_DIR") or str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--sessions", type=int, default=3)
    a = ap.parse_args()
    cli = cli_run(a.data_dir)
    print(f"CLI run: {cli:.1f} s", flush=True)
    dash, busy, idle = dashboard_run(a.data_dir, a.sessions)
    print(f"dashboard run with {a.sessions} sessions open: {dash:.1f} s = {dash / cli:.2f} x the CLI")
    print(f"web server CPU while the run trains: {busy:.1f}% of one core; with {a.sessions} idle sessions: {idle:.1f}%")


if __name__ == "__main__":
    main()
