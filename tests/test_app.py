"""AppTest: every page renders without an exception, key widgets exist, a quick run completes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from .conftest import blob_images, write_split

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["feature", "train", "influence", "explain", "compare", "runs"]


@pytest.fixture(scope="module")
def app_env(tmp_path_factory):
    """A data folder with a tiny 'mnist' (28x28, 3 classes) and 'cifar10' test split, and a fresh home."""
    root = tmp_path_factory.mktemp("appdata")
    rng = np.random.default_rng(0)
    write_split(root / "data" / "mnist", *blob_images(rng, 240, 28), "train")
    write_split(root / "data" / "mnist", *blob_images(rng, 90, 28), "test")
    write_split(root / "data" / "cifar10", rng.integers(0, 255, (600, 32, 32, 3)).astype(np.uint8),
                rng.integers(0, 10, 600), "test")
    mp = pytest.MonkeyPatch()
    mp.setenv("UFM_DATA_DIR", str(root / "data"))
    mp.setenv("UFM_HOME", str(root / "home"))
    st.cache_resource.clear()
    st.cache_data.clear()
    yield root
    from dashboard import state
    state.runner().shutdown(cancel=True, wait=True, timeout=30)
    st.cache_resource.clear()
    st.cache_data.clear()
    mp.undo()


def _app() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception
    return at


def _wait_done(run_id: str, timeout: float = 240) -> None:
    from dashboard import state
    state.runner().wait(run_id, timeout=timeout)


def test_every_page_renders(app_env):
    at = _app()
    assert {b.key for b in at.button} >= {"demo_teaching", "demo_clinical"}
    assert any("Datasets available offline" in m.value for m in at.markdown)
    for page in PAGES:
        at.switch_page(f"app_pages/{page}.py").run()
        assert not at.exception, (page, at.exception)


def test_clinical_demo_falls_back_to_pneumoniamnist_and_says_so(app_env):
    at = _app()
    assert any("chest X-ray copy is not in the data folder" in i.value and "PneumoniaMNIST" in i.value
               for i in at.info)
    from dashboard.demos import DEMOS
    demo = DEMOS["clinical"].resolved([])
    assert demo.setup["dataset"] == "pneumoniamnist" and demo.feature.name == "text 'DOE'"
    demo.feature.check_fits((1, 28, 28))
    assert DEMOS["clinical"].resolved(["chest-xray"]).setup["dataset"] == "chest-xray"
    DEMOS["clinical"].feature.check_fits((1, 64, 64))


def test_feature_page_kinds_and_bad_input(app_env):
    at = _app().switch_page("app_pages/feature.py").run()
    assert at.radio(key="feat_kind").options == ["Glyph", "Draw", "Text", "Upload"]
    at.radio(key="feat_kind").set_value("Draw").run()
    assert len([c for c in at.checkbox if c.key and c.key.startswith("px_")]) == 25
    at.checkbox(key="px_0_0").check().run()
    assert at.session_state["feature"].pattern[0][0] == 1.0 and at.session_state["feature"].name == "drawn"
    at.slider(key="draw_size").set_value(16).run()
    assert len([c for c in at.checkbox if c.key and c.key.startswith("px_")]) == 256
    at.button(key="draw_clear").click().run()
    assert any("empty" in e.value for e in at.error)  # an empty grid is refused ...
    assert at.session_state["feature"].name == "drawn"  # ... and the last good feature is kept
    at.radio(key="feat_kind").set_value("Text").run()
    at.text_input(key="text_value").input("JANE ROE").run()  # 46 px wide: cannot fit 28x28 images
    assert any("larger than the 28x28 images" in e.value for e in at.error)
    at.text_input(key="text_value").input("JD").run()
    assert at.session_state["feature"].name == "text 'JD'"
    at.number_input(key="feat_row").set_value(27).run()
    assert any("runs off the 28x28 image" in e.value for e in at.error)
    assert at.session_state["feature"].offset != (27, 1)
    at.radio(key="feat_kind").set_value("Upload").run()
    assert any("Upload an image" in i.value for i in at.info)


def test_quick_run_from_train_page_shows_numbers(app_env):
    at = _app().switch_page("app_pages/train.py").run()
    assert at.selectbox(key="tr_dataset").value == "mnist" and at.selectbox(key="tr_arch").value == "mlp"
    assert at.multiselect(key="tr_regs").options[-1] == "dp-sgd"
    assert at.radio(key="tr_budget").value.startswith("Quick") and at.button(key="tr_start").label == "Start"
    at.radio(key="tr_canary_mode").set_value("pick an image").run()
    at.button(key="tr_use_5").click().run()
    assert at.number_input(key="tr_index").value == 5
    at.number_input(key="tr_epochs").set_value(3).run()
    at.number_input(key="tr_ood").set_value(60).run()
    at.button(key="tr_start").click().run()
    assert not at.exception
    run_id = at.session_state["run_id"]
    _wait_done(run_id)
    at.run()
    labels = {m.label: m.value for m in at.metric}
    assert "M = X_u - X_r (nats)" in labels and "exposure p" in labels and "test accuracy" in labels
    from dashboard import state
    rec = state.store().get(run_id)
    assert rec.status == "done" and labels["M = X_u - X_r (nats)"] == f"{rec.summary['M']:.4g}"
    assert rec.config.canary.indices == (5,) and rec.config.epochs == 3
    # the result is in the store: a new session (a reload) finds it through the query string
    at2 = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at2.query_params["run"] = run_id
    at2.switch_page("app_pages/train.py").run()
    assert {m.label for m in at2.metric} >= {"M = X_u - X_r (nats)"}
    # the other pages now have something to show
    at.switch_page("app_pages/explain.py").run()
    assert not at.exception and any(m.label.startswith("box share") for m in at.metric)
    at.switch_page("app_pages/runs.py").run()
    assert not at.exception and at.selectbox(key="runs_pick").value == run_id


def test_teaching_demo_ends_on_result(app_env):
    at = _app()
    at.button(key="demo_teaching").click().run()
    assert not at.exception
    run_id = at.session_state["run_id"]
    _wait_done(run_id)
    at.switch_page("app_pages/train.py").run()
    assert any(m.label == "M = X_u - X_r (nats)" for m in at.metric)


def test_compare_and_influence_pages_run_small_studies(app_env):
    at = _app().switch_page("app_pages/train.py").run()
    at.number_input(key="tr_epochs").set_value(2).run()
    at.number_input(key="tr_ood").set_value(40).run()
    at.switch_page("app_pages/compare.py").run()
    at.multiselect(key="cmp_regs").set_value(["none", "dropout"])
    at.number_input(key="cmp_seeds").set_value(2)
    at.button(key="FormSubmitter:cmp_form-Run the comparison").click().run()
    assert not at.exception
    from dashboard import state
    for rid in state.runner().active():
        _wait_done(rid)
    at.run()
    assert not at.exception and len(at.dataframe) >= 1
    at.switch_page("app_pages/influence.py").run()
    at.button(key="inf_start").click().run()
    deadline = time.time() + 240
    from ufm.sweep import reference_config
    key = reference_config(state.config_from_setup(at.session_state["setup"])).key() if "setup" in at.session_state else None
    while time.time() < deadline and state.tasks().status(key)[0] in ("running", "none"):
        time.sleep(1)
    at.run()
    assert not at.exception and any(s.value.startswith("Most self-influential") for s in at.subheader)
    at.number_input(key="inf_top").set_value(2)
    at.number_input(key="inf_bottom").set_value(1)
    at.button(key="inf_sweep").click().run()
    assert not at.exception
    for rid in state.runner().active():
        _wait_done(rid)
    at.run()
    assert not at.exception
    assert any(m.label == "Pearson r (self-influence, M)" for m in at.metric)
    assert any("3 of 3 canary models finished" in p.proto.text for p in at.get("progress"))


def test_train_page_dp_sgd_settings_reach_the_run(app_env):
    at = _app().switch_page("pages/train.py").run()
    assert at.number_input(key="tr_epochs").disabled is False
    assert not any(r.key == "tr_dp_how" for r in at.radio)  # hidden without dp-sgd
    at.multiselect(key="tr_regs").set_value(["dp-sgd"]).run()
    assert not at.exception and at.number_input(key="tr_epochs").disabled
    at.radio(key="tr_dp_how").set_value("target epsilon").run()
    at.number_input(key="tr_dp_eps").set_value(4.0).run()
    at.number_input(key="tr_dp_clip").set_value(2.0).run()
    at.number_input(key="tr_dp_epochs").set_value(2).run()
    at.number_input(key="tr_ood").set_value(40).run()
    at.radio(key="tr_canary_mode").set_value("pick an image").run()
    at.button(key="tr_start").click().run()
    assert not at.exception
    run_id = at.session_state["run_id"]
    _wait_done(run_id)
    from dashboard import state
    rec = state.store().get(run_id)
    cfg = rec.config
    assert rec.status == "done", rec.error
    assert cfg.regularisers == ("dp-sgd",) and cfg.epochs == 2
    assert cfg.dp.target_epsilon == 4.0 and cfg.dp.noise_multiplier is None and cfg.dp.max_grad_norm == 2.0
    assert rec.summary["epochs_trained"] == 2 and rec.summary["epsilon"] == pytest.approx(4.0, rel=0.1)
    # DP settings do not leak into the config (and cache key) of a run without dp-sgd
    setup = dict(at.session_state["setup"], regularisers=[])
    assert state.config_from_setup(setup).dp == state.config_from_setup(dict(setup, dp=None)).dp
