"""Start the dashboard for a browser: ``streamlit run app.py`` on a free port, and Debian's chromium.

Used by the browser test (tests/test_browser.py), the README screenshots (assets/make_screenshots.py)
and the dashboard benchmark (benchmarks/dashboard_load.py). It lives in the dashboard package, not in
tests/, because the two scripts are not tests and import it too (from the repository root on
``sys.path``); the app itself never imports it. Importing it loads neither Streamlit nor Playwright.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app.py"
CHROMIUM = "/usr/bin/chromium"  # Debian's: never `playwright install`
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
START_TIMEOUT = 90.0  # seconds until /_stcore/health answers (a cold start on a busy machine takes ~20 s)
LOG_TAIL_LINES = 40


class ServerDidNotStart(RuntimeError):
    """The Streamlit server exited, or did not answer its health check in time; the message ends
    with the tail of its log."""


@dataclass(frozen=True)
class RunningServer:
    """A started dashboard: ``url`` (http://127.0.0.1:PORT, no trailing slash), the server's process
    id (the benchmark samples its CPU time) and its log file (stdout and stderr together)."""

    url: str
    pid: int
    log: Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT) -> None:
    """Wait until ``url``/_stcore/health answers. Raises :class:`ServerDidNotStart` with the log's tail
    when ``proc`` exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=2)
            return
        except OSError:
            pass
        if proc.poll() is not None:
            raise ServerDidNotStart(f"the Streamlit server exited with status {proc.returncode} before it "
                                    f"answered {url}/_stcore/health; the end of {log}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise ServerDidNotStart(f"the Streamlit server did not answer {url}/_stcore/health within {timeout:.0f} s;"
                                    f" the end of {log}:\n{log_tail(log)}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Terminate ``proc``; kill it if it has not exited after ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def streamlit_server(home: Path | str, env: Mapping[str, str | None] | None = None, *, log: Path | None = None,
                     timeout: float = START_TIMEOUT, app: Path = APP) -> Iterator[RunningServer]:
    """Run ``streamlit run app.py`` (the repository's .streamlit/config.toml applies: cwd is the
    repository root) with ``UFM_HOME=home`` on a free port of 127.0.0.1, and stop it on exit.

    Args:
        home: the run store's folder (UFM_HOME).
        env: added to this process's environment; a value of None removes that variable
            (e.g. ``{"UFM_PASSWORD": None}``).
        log: where the server's output goes (default ``home/streamlit.log``).
        timeout: seconds to wait for the health check; then :class:`ServerDidNotStart` is raised
            with the log's tail (also when the server exits first).
    """
    home = Path(home)
    log = Path(log) if log is not None else home / "streamlit.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ, UFM_HOME=str(home), STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(app), "--server.headless", "true",
                                 "--server.port", str(port), "--server.address", "127.0.0.1"],
                                cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, proc, log, timeout)
            yield RunningServer(url, proc.pid, log)
        finally:
            stop(proc)


@contextmanager
def chromium() -> Iterator["Browser"]:
    """Debian's headless chromium driven by Playwright (its own browser download is never used)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"{CHROMIUM} not found: apt-get install chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def fill_numbers(page: "Page", values: Mapping[str, str]) -> None:
    """Type each value into the number input labelled by its key and press Enter, one at a time
    (Streamlit reruns on each; 0.8 s lets the rerun land before the next field is touched)."""
    for label, value in values.items():
        field = page.get_by_label(label, exact=True)
        field.fill(value)
        field.press("Enter")
        page.wait_for_timeout(800)
