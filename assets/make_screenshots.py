"""Regenerate the README screenshots: fill a fresh run store, start the app, photograph each page.

    UFM_DATA_DIR=../shared/data python assets/make_screenshots.py

Runs, with the dashboard's Quick budget on MNIST (MLP, 3,000 images): a quick run from the Train page, a
regulariser comparison (none / dropout / dp-sgd, 2 seeds), the self-influence ranking and a
3 + 3 canary sweep; then drives Debian's chromium through every page (never `playwright install`), ending with
an audit of the teaching run's model exported to ONNX, a privacy audit with 100 canaries, a plus sign drawn on the Feature page's
canvas with mouse strokes, and both guided demos from Home until their calibrated verdicts (timed).
``python assets/make_screenshots.py HOME privacy demos`` photographs just those pages.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's dashboard/ and ufm/, also when run as a script

from dashboard.testing import chromium, streamlit_server  # noqa: E402 - after the path

OUT = ROOT / "assets" / "screenshots"


def fill_store(home: Path) -> None:
    from dashboard.state import QUICK
    from ufm.core.canary import CanaryChoice
    from ufm.core.experiment import ExperimentConfig
    from ufm.fileio import atomic_write
    from ufm.runs.jobs import Runner
    from ufm.runs.store import Store
    from ufm.runs.studies import create_study, regulariser_members, submit_study
    from ufm.attribution.sweep import influence_scores, ranking_config

    store = Store(home)
    base = ExperimentConfig(dataset="mnist", data_dir=os.environ.get("UFM_DATA_DIR"), arch="mlp",
                            canary=CanaryChoice("index", (0,)), seed=0, **QUICK)
    with Runner(store) as runner:
        runner.wait(runner.submit(base))
        create_study(store, "regularisers on MNIST", "regularisers", base,
                     regulariser_members(base, ["none", "dropout", "dp-sgd"], [0, 1]))
        for rid in submit_study(runner, "regularisers on MNIST"):
            runner.wait(rid)
    infl = influence_scores(base)
    atomic_write(home / "influence" / f"{ranking_config(base).key()}.csv", infl.table().to_csv(index=False))


def demos_shot(page) -> None:
    """Both guided demos from Home, each photographed once its calibrated verdict is in (timed)."""
    for key in ("teaching", "clinical"):
        page.get_by_role("link", name="Home").first.click()
        page.get_by_role("button", name=f"Run the {key} demo").click()
        t0 = time.time()
        page.get_by_text("the calibrated verdict after").wait_for(timeout=900_000)
        print(f"{key} demo: calibrated verdict {time.time() - t0:.0f} s after the click", flush=True)
        page.wait_for_timeout(2500)
        page.get_by_text(f"{key.capitalize()} demo", exact=True).scroll_into_view_if_needed()
        page.screenshot(path=str(OUT / f"{key}.png"), full_page=True)


def audit_shot(page, home: Path) -> None:
    """The Audit a model page on the teaching run's model, exported to ONNX and audited on CIFAR-10."""
    from ufm.audits.onnx_model import export_run
    from ufm.runs.store import Store

    with Store(home) as store:
        first = store.list_runs("done")[-1].id  # the teaching demo's run: one canary, MNIST MLP
        model = home / "mnist-mlp.onnx"
        model.write_bytes(export_run(store, first))
    page.get_by_role("link", name="Audit a model").first.click()
    page.get_by_text("Upload an .onnx file to begin").wait_for(timeout=60_000)
    page.locator('input[type="file"]').first.set_input_files(str(model))
    page.get_by_text("NCHW 1x28x28").first.wait_for(timeout=60_000)
    page.locator('[data-testid="stSelectbox"]', has_text="dataset (its test split)").click()
    page.get_by_role("option", name="cifar10").click()
    page.get_by_role("button", name="Run audit").click()
    page.get_by_text("M = X_u - X_r (nats)").wait_for(timeout=300_000)
    page.wait_for_timeout(2500)
    page.screenshot(path=str(OUT / "audit.png"), full_page=True)


def privacy_shot(page) -> None:
    """The Audit privacy page: 100 canaries on the Quick MNIST MLP, run from the form."""
    page.get_by_role("link", name="Audit privacy").first.click()
    page.get_by_text("How private is it, in numbers?").wait_for(timeout=60_000)
    m = page.get_by_role("spinbutton", name="canaries m")
    m.fill("100")
    m.press("Enter")
    page.get_by_role("button", name="Audit privacy").click()
    page.get_by_text("guesses correct").wait_for(timeout=600_000)
    page.wait_for_timeout(2500)
    page.screenshot(path=str(OUT / "privacy.png"), full_page=True)


def draw_plus(page) -> None:
    """A plus sign drawn with two mouse strokes on the Feature page's canvas (7x7 feature)."""
    page.get_by_role("link", name="Feature").first.click()
    page.get_by_text("Draw", exact=True).click()
    page.get_by_text("Precise editor: one tick box per pixel").click()
    page.get_by_role("button", name="Clear").click()
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(2000)
    canvas = page.locator("canvas.upper-canvas").last
    canvas.wait_for(state="visible", timeout=60_000)
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    x0, y0, w = box["x"], box["y"], box["width"]
    for (ax, ay), (bx, by) in (((w / 2, 15), (w / 2, w - 15)), ((15, w / 2), (w - 15, w / 2))):
        page.mouse.move(x0 + ax, y0 + ay)
        page.mouse.down()
        for k in range(1, 21):
            page.mouse.move(x0 + ax + (bx - ax) * k / 20, y0 + ay + (by - ay) * k / 20)
        page.mouse.up()
        page.wait_for_timeout(2000)
    page.get_by_text("In use: drawn").wait_for(timeout=60_000)
    page.wait_for_timeout(2500)
    page.screenshot(path=str(OUT / "feature-canvas.png"))


PAGES_WITHOUT_A_FILLED_STORE = {"privacy": privacy_shot, "demos": demos_shot}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("home", nargs="?", type=Path,
                    help="run store to use (UFM_HOME); an already filled one is reused (default: a new temp folder)")
    ap.add_argument("only", nargs="*", metavar="PAGE",
                    help=f"photograph just these pages, which need no filled store: "
                         f"{', '.join(PAGES_WITHOUT_A_FILLED_STORE)}")
    a = ap.parse_args()
    unknown = [name for name in a.only if name not in PAGES_WITHOUT_A_FILLED_STORE]
    if unknown:
        ap.error(f"unknown page(s) {', '.join(unknown)}: choose from {', '.join(PAGES_WITHOUT_A_FILLED_STORE)}")
    home = a.home or Path(tempfile.mkdtemp(prefix="ufm-shots-"))
    only = a.only
    t0 = time.time()
    if not only and not (home / "ufm.db").exists():
        fill_store(home)
        print(f"store filled in {time.time() - t0:.0f} s", flush=True)
    env = {"UFM_AUTO_REFERENCES": "0"}  # no reference banks behind the demos
    # the server's output goes to HOME/streamlit.log; its tail is raised if it does not start
    with streamlit_server(home, env, timeout=180) as server, chromium() as browser:
        url = server.url
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(url)
        page.get_by_text("Guided demos").wait_for(timeout=60_000)
        if only:
            for name in only:
                PAGES_WITHOUT_A_FILLED_STORE[name](page)
            return
        page.screenshot(path=str(OUT / "home.png"))

        def visit(title: str, name: str, wait_text: str) -> None:
            page.get_by_role("link", name=title).first.click()
            page.get_by_text(wait_text).first.wait_for(timeout=600_000)
            page.wait_for_timeout(2500)
            page.screenshot(path=str(OUT / f"{name}.png"))

        page.get_by_role("link", name="Train & measure").first.click()
        page.get_by_role("button", name="Start").click()  # the quick run: the A on MNIST image 0
        page.get_by_text("M = X_u - X_r (nats)").wait_for(timeout=300_000)
        page.wait_for_timeout(2500)
        page.screenshot(path=str(OUT / "train.png"))
        visit("Feature", "feature", "In use:")
        visit("Compare", "compare", "Export the study report (HTML)")
        visit("Influence", "influence", "Most self-influential")
        page.get_by_role("button", name="Run the sweep (one model per canary)").click()
        page.get_by_text("6 of 6 canary models finished").wait_for(timeout=900_000)
        page.wait_for_timeout(2500)
        page.mouse.wheel(0, 1400)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(OUT / "influence.png"))
        visit("Explain", "explain", "box share, canary with feature")
        visit("Runs", "runs", "Export all runs (CSV)")
        audit_shot(page, home)
        privacy_shot(page)
        draw_plus(page)
        demos_shot(page)
    print(f"wrote {sorted(p.name for p in OUT.glob('*.png'))} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
