"""Real browser end to end: Debian's chromium driven by Playwright against `streamlit run app.py`.

On a freshly started server: direct links open with the proper navigation and the wide layout;
a stroke drawn with mouse events on the canvas becomes the feature in use; a canary picked from
the Train page's gallery is the one the run trains; a quick run shows M. Screenshots go to
$UFM_SCREENSHOTS (default: the test's tmp folder).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from dashboard.testing import CHROMIUM, chromium, fill_numbers

from .conftest import HAS_MNIST, SHARED

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)"),
    pytest.mark.skipif(not HAS_MNIST, reason=f"real dataset subsets not found at {SHARED}"),
]


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = Path(os.environ.get("UFM_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def browser(server):
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def page(browser, server):
    pg = browser.new_page(viewport={"width": 1400, "height": 1800})
    pg.goto(server)
    yield pg
    pg.close()


def _nav(page, title: str) -> None:
    page.get_by_role("link", name=title).first.click()
    page.wait_for_load_state("networkidle")


def _check_navigation_and_wide_layout(pg) -> None:
    nav = pg.locator('[data-testid="stSidebarNav"]')
    nav.wait_for(timeout=60_000)
    links = [t.strip().splitlines()[-1].strip() for t in nav.get_by_role("link").all_inner_texts()]  # after the icon
    assert {"Home", "Feature", "Train & measure", "Compare", "Runs"} <= set(links), links
    assert not {"app", "feature", "train"} & set(links), links  # no raw file names
    main = pg.locator('[data-testid="stMainBlockContainer"]')
    assert main.bounding_box()["width"] > 900  # the wide layout (centred is at most 736 px)


def test_direct_links_on_a_fresh_server_keep_navigation_and_layout(browser, server, shots):
    """Must run first in this module: the server has not yet served a page."""
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.goto(server + "/feature")
    pg.get_by_text("Design the unique feature").wait_for(timeout=60_000)
    _check_navigation_and_wide_layout(pg)
    pg.screenshot(path=str(shots / "direct-link-feature.png"))
    pg.goto(server + "/train?run=0123456789abcdef")
    pg.get_by_text("Run not found").wait_for(timeout=60_000)
    _check_navigation_and_wide_layout(pg)
    pg.close()


def _pixel_grid(page, m: int) -> np.ndarray:
    """The tick grid's state as an (m, m) 0/1 array (the expander must be open)."""
    return np.array([[float(page.get_by_label(f"pixel {r},{c}", exact=True).is_checked()) for c in range(m)]
                     for r in range(m)])


def test_draw_a_stroke_with_the_mouse(page, shots):
    page.get_by_text("Guided demos").wait_for(timeout=60_000)
    page.screenshot(path=str(shots / "home.png"), full_page=True)
    _nav(page, "Feature")
    page.get_by_text("Draw", exact=True).click()
    page.get_by_text("Precise editor: one tick box per pixel").click()  # open the grid
    page.get_by_role("button", name="Clear").click()
    # a new drawing starts blank; the feature in use (the A) stays until something is drawn
    page.get_by_text("Draw on the canvas or tick pixels").wait_for(timeout=30_000)
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1500)  # Clear remounts the canvas (blank); the old one may linger a moment
    canvas = page.locator("canvas.upper-canvas").last
    canvas.wait_for(timeout=30_000)
    box = canvas.bounding_box()
    x = box["x"] + box["width"] / 2  # the middle column of the 5x5 feature
    page.mouse.move(x, box["y"] + 10)
    page.mouse.down()
    for k in range(1, 21):
        page.mouse.move(x, box["y"] + 10 + k * (box["height"] - 20) / 20)
    page.mouse.up()
    page.get_by_text("In use: drawn").wait_for(timeout=30_000)
    page.wait_for_timeout(1500)
    grid = _pixel_grid(page, 5)
    assert grid[:, 2].sum() >= 4 and grid[:, [0, 1, 3, 4]].sum() == 0, grid  # one column band of ink
    page.screenshot(path=str(shots / "feature-canvas.png"), full_page=True)


def test_gallery_canary_is_the_one_trained_and_m_appears(page, shots):
    _nav(page, "Train & measure")
    page.get_by_text("Feature for the next run: drawn").wait_for(timeout=30_000)
    page.get_by_text("Pick from a gallery of training images").click()
    # the gallery is spread over every class (seeded): its 11th image is this training image
    from ufm.core.data import load_split
    from ufm.core.sampling import spread_indices
    want = int(spread_indices(load_split("mnist", "train", data_dir=SHARED, limit=3000, stratified=True).y, 24)[10])
    use = page.get_by_role("button", name="use", exact=True)
    use.nth(10).wait_for(timeout=30_000)
    use.nth(10).click()
    page.keyboard.press("Escape")
    index = page.locator('input[aria-label="canary image index"]')
    page.wait_for_function("() => [...document.querySelectorAll('input')].some("
                           f"i => i.getAttribute('aria-label') === 'canary image index' && i.value === '{want}')",
                           timeout=30_000)
    assert index.input_value() == str(want)
    page.get_by_text("Advanced").click()
    fill_numbers(page, {"max epochs": "3", "inference images": "100"})
    page.get_by_role("button", name="Start").click()
    page.get_by_text("M = X_u - X_r (nats)").wait_for(timeout=600_000)
    page.get_by_text(f"canary at index {want}").first.wait_for(timeout=30_000)  # the run's own caption
    hist = page.locator(".js-plotly-plot", has_text="unique feature z_u")
    hist.first.wait_for(timeout=30_000)
    page.wait_for_timeout(1500)  # let plotly finish drawing before the picture
    page.screenshot(path=str(shots / "train.png"), full_page=True)
    value = page.locator('[data-testid="stMetric"]', has_text="M = X_u - X_r").first.inner_text()
    assert any(ch.isdigit() for ch in value)


def test_type_a_feature_train_and_see_m(page, shots):
    _nav(page, "Feature")
    page.get_by_text("Text", exact=True).click()
    box = page.get_by_label("text (a name, an ID number)", exact=True)
    box.wait_for(timeout=30_000)
    box.fill("JD")
    box.press("Enter")
    # JD is the Text kind's default: shown, not yet in use, until the user says so
    page.get_by_role("button", name="Use this feature").click()
    page.get_by_text("In use: text 'JD'").wait_for(timeout=30_000)
    page.screenshot(path=str(shots / "feature.png"), full_page=True)

    _nav(page, "Train & measure")
    page.get_by_text("Feature for the next run: text 'JD'").wait_for(timeout=30_000)

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
    from ufm.runs.store import Store
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


@pytest.mark.skipif(not (SHARED / "chest-xray" / "train.npz").is_file(), reason="no chest-xray copy in the shared data")
def test_demos_reach_their_calibrated_verdict_without_a_reload(page, shots):
    """Click each demo, then only wait: the page's own timer brings the rungs, the bank's progress
    and the calibrated verdict (the settings are the memorisation map's, measured to show it)."""
    for key, title, expect in (("teaching", "Teaching demo", "memorised the letter A from the one atypical digit"),
                               ("clinical", "Clinical demo", "Detected: the model memorised the name")):
        _nav(page, "Home")
        page.get_by_role("button", name=f"Run the {key} demo").click()
        page.get_by_text(title, exact=True).wait_for(timeout=60_000)
        page.get_by_text("reference models (").first.wait_for(timeout=60_000)  # the bank's progress is shown
        # The demo's own calibrated sentence first: until the clinical demo's rerun has drawn every
        # element, the teaching demo's "the calibrated verdict after" caption can still be in the page.
        page.get_by_text(expect).first.wait_for(timeout=900_000)
        page.get_by_text("the calibrated verdict after").wait_for(timeout=30_000)
        assert page.locator('[data-testid="stException"]').count() == 0
        page.wait_for_timeout(1500)
        page.screenshot(path=str(shots / f"demo-{key}.png"), full_page=True)
