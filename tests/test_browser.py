"""Real browser end to end: Debian's chromium driven by Playwright against `streamlit run app.py`.

Types a feature, runs a quick experiment on ../shared/data and checks that the histogram and M
appear. Screenshots go to $UFM_SCREENSHOTS (default: the test's tmp folder).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import HAS_MNIST, SHARED

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)"),
    pytest.mark.skipif(not HAS_MNIST, reason=f"real dataset subsets not found at {SHARED}"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    port = _free_port()
    env = dict(os.environ, UFM_DATA_DIR=str(SHARED), UFM_HOME=str(home), STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    log = open(home / "streamlit.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((home / "streamlit.log").read_text())
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("streamlit did not start within 90 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = Path(os.environ.get("UFM_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1800})
        pg.goto(server)
        yield pg
        browser.close()


def _nav(page, title: str) -> None:
    page.get_by_role("link", name=title).first.click()
    page.wait_for_load_state("networkidle")


def test_type_a_feature_train_and_see_m(page, shots):
    page.get_by_text("Guided demos").wait_for(timeout=60_000)
    page.screenshot(path=str(shots / "home.png"), full_page=True)

    _nav(page, "Feature")
    page.get_by_text("Text", exact=True).click()
    box = page.get_by_label("text (a name, an ID number)")
    box.wait_for(timeout=30_000)
    box.fill("JD")
    box.press("Enter")
    page.get_by_text("In use: text 'JD'").wait_for(timeout=30_000)
    page.screenshot(path=str(shots / "feature.png"), full_page=True)

    _nav(page, "Train & measure")
    page.get_by_text("Feature: text 'JD'").wait_for(timeout=30_000)
    page.get_by_role("button", name="Start").click()
    page.get_by_text("M = X_u - X_r (nats)").wait_for(timeout=600_000)
    hist = page.locator(".js-plotly-plot", has_text="unique feature z_u")
    hist.first.wait_for(timeout=30_000)
    assert hist.count() >= 1
    page.wait_for_timeout(1500)  # let plotly finish drawing before the picture
    page.screenshot(path=str(shots / "train.png"), full_page=True)
    value = page.locator('[data-testid="stMetric"]', has_text="M = X_u - X_r").first.inner_text()
    assert any(ch.isdigit() for ch in value)

    for title, name in (("Explain", "explain"), ("Runs", "runs"), ("Compare", "compare"), ("Influence", "influence")):
        _nav(page, title)
        page.wait_for_timeout(2500)
        assert page.locator('[data-testid="stException"]').count() == 0, title
        page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def test_audit_page_upload_run_verdict(page, shots, tmp_path):
    """Upload an ONNX export of a positive control (the feature on 100 MNIST images of class 0),
    audit it on CIFAR-10 and see the verdict and M."""
    from ufm.cli import main

    home = tmp_path / "home"
    assert main(["measure", "--dataset", "mnist", "--data-dir", str(SHARED), "--train-size", "2000", "--epochs", "8",
                 "--canary-class", "0", "--canaries", "100", "--ood-size", "100", "--candidates", "19",
                 "--device", "cpu", "--quiet", "--home", str(home)]) == 0
    from ufm.store import Store
    with Store(home) as s:
        run_id = s.list_runs()[0].id
    model = tmp_path / "mnist-positive.onnx"
    assert main(["runs", "export", run_id, "--format", "onnx", "--out", str(model), "--home", str(home)]) == 0

    _nav(page, "Audit a model")
    page.get_by_text("Upload an .onnx file to begin").wait_for(timeout=30_000)
    page.locator('input[type="file"]').first.set_input_files(str(model))
    page.get_by_text("NCHW 1x28x28").first.wait_for(timeout=60_000)
    page.locator('[data-testid="stSelectbox"]', has_text="dataset (its test split)").click()
    page.get_by_role("option", name="cifar10").click()
    page.get_by_role("button", name="Run audit").click()
    page.get_by_text("M = X_u - X_r (nats)").wait_for(timeout=300_000)
    headline = page.get_by_text("Memorised").or_(page.get_by_text("Not shown to be memorised")).or_(
        page.get_by_text("Inconclusive"))
    assert headline.count() >= 1
    assert page.locator('[data-testid="stException"]').count() == 0
    page.locator(".js-plotly-plot", has_text="unique feature z_u").first.wait_for(timeout=30_000)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(shots / "audit.png"), full_page=True)
