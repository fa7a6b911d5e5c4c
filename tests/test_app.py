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
    mp.delenv("UFM_PASSWORD", raising=False)
    mp.setenv("UFM_AUTO_REFERENCES", "0")  # no background banks of 24 models in the tests
    from streamlit import config as st_config
    address = st_config.get_option("server.address")
    st_config.set_option("server.address", "localhost")  # whatever the working directory's config says
    st.cache_resource.clear()
    st.cache_data.clear()
    yield root
    from dashboard import state
    state.runner().shutdown(cancel=True, wait=True, timeout=30)
    st.cache_resource.clear()
    st.cache_data.clear()
    st_config.set_option("server.address", address)
    mp.undo()


def _app() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception
    return at


def _gallery_index(at: AppTest, position: int) -> int:
    """The training-image index of the gallery's image at ``position`` (its "use" button's key)."""
    keys = [b.key for b in at.button if b.key and b.key.startswith("tr_use_")]
    return int(keys[position].removeprefix("tr_use_"))


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


def test_clinical_demo_needs_its_chest_xray_data_and_says_where(app_env):
    at = _app()
    assert any("chest-xray copy is not in" in i.value and "train.npz" in i.value for i in at.info)
    assert at.button(key="demo_clinical").disabled and not at.button(key="demo_teaching").disabled


def _tiny_plan(data_dir: str):
    """The teaching demo's shape on the tests' 3-class blobs: two rungs, a 39-model bank of 2-epoch MLPs."""
    from ufm.core.canary import CanaryChoice
    from ufm.measure.demos import ATYPICAL, TYPICAL, DemoPlan, Rung
    from ufm.measure.memorisation_map import DemoChoice, Setting
    from ufm.core.features import glyph
    from ufm.core.experiment import ExperimentConfig
    setting = Setting("mlp", "mnist", 240, "quick")
    # 3 epochs: a training setting of its own, so its bank is not the one other tests expect to be missing
    base = ExperimentConfig(feature=glyph("A"), dataset="mnist", data_dir=data_dir, epochs=3, patience=1, ood_size=40,
                            candidates=9, canary=CanaryChoice("none", ()))
    rungs = (Rung(TYPICAL, 1, CanaryChoice("index", (3,))), Rung(ATYPICAL, 1, CanaryChoice("index", (7,))))
    from .test_memorisation_map import cell
    cells = (cell(setting, "bottom", "glyph", 1, index=3), cell(setting, "top", "glyph", 10, index=7))
    return DemoPlan("teaching", DemoChoice(setting, setting, "a test setting"), glyph("A"), base, rungs, cells)


def test_demo_turns_calibrated_when_its_bank_lands_without_a_reload(app_env, monkeypatch):
    from dashboard import demos, state
    plan = _tiny_plan(str(app_env / "data"))
    monkeypatch.setattr(demos, "plan", lambda key: plan)
    at = _app()
    at.button(key="demo_teaching").click().run()
    assert not at.exception
    key, name, _ = at.session_state[demos.DEMO_KEY]
    assert key == "teaching"
    from ufm.measure.bank import bank_status
    from ufm.runs.studies import runs_frame
    runs = runs_frame(state.store(), name)
    assert list(runs["group"]) == [r.label for r in plan.rungs]
    assert any("Waiting for the reference models" in i.value for i in at.info)  # never a provisional verdict
    for rid in list(runs["run_id"]) + list(state.runner().active()):
        _wait_done(rid)
    assert bank_status(state.store(), plan.base).complete  # the demo queued its own bank
    at.run()  # what the fragment's timer does in the browser (the browser test checks the timer itself)
    assert not at.exception
    assert any("the calibrated verdict after" in c.value for c in at.caption)
    assert not any("Waiting for the reference models" in i.value for i in list(at.info) + list(at.warning))
    assert any("Measured for this setting" in c.value and "10 of 10" in c.value for c in at.caption)
    assert at.session_state["feature"].name == plan.feature.name  # the demo's feature is the current one


def _map_hint(at: AppTest) -> str:
    hints = [i.value for i in at.info if "detected by the calibrated verdict in" in i.value]
    assert len(hints) == 1, [i.value for i in at.info]
    return hints[0]


def test_train_page_quotes_the_memorisation_map_before_start(app_env):
    """Before Start the page quotes the shipped map's rate of the nearest measured cell, for the
    setting chosen now; a setting measured only on a GPU says so on a CPU."""
    from ufm.core.experiment import ExperimentConfig
    from ufm.measure.memorisation_map import Setting, find_cell, load_cells, nearest_cell
    at = _app().switch_page("app_pages/train.py").run()
    assert not at.exception
    s = at.session_state["setup"]
    config = ExperimentConfig(feature=at.session_state["feature"], dataset=s["dataset"], arch=s["arch"],
                              train_size=s["train_size"], epochs=s["epochs"], patience=s["patience"], canary=s["canary"])
    assert nearest_cell(config, "cpu").cell.sentence() in _map_hint(at)
    at.selectbox(key="tr_device").set_value("cpu").run()  # what follows holds on a machine with a GPU too
    at.number_input(key="tr_size").set_value(500).run()  # exactly a measured CPU setting: the A on a random digit
    cell = find_cell(load_cells(), Setting("mlp", "mnist", 500, "quick"), "random", "glyph")
    assert _map_hint(at).startswith(f"In this setting {cell.sentence()}.")
    assert f"in {cell.detected} of {cell.models} models" in _map_hint(at)
    at.selectbox(key="tr_arch").set_value("cnn1").run()  # cnn1 was measured on a GPU only
    gpu = find_cell(load_cells(), Setting("cnn1", "mnist", 500, "quick", "cuda"), "random", "glyph")
    hint = _map_hint(at)
    assert gpu.sentence() in hint and "measured on cuda" in hint and "In the nearest measured setting" in hint


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
    pick = _gallery_index(at, 1)  # the gallery spreads over the classes: use the second image shown
    at.button(key=f"tr_use_{pick}").click().run()
    assert at.number_input(key="tr_index").value == pick
    at.number_input(key="tr_epochs").set_value(3).run()
    at.number_input(key="tr_ood").set_value(60).run()
    at.button(key="tr_start").click().run()
    assert not at.exception
    run_id = at.session_state["run_id"]
    _wait_done(run_id)
    at.run()
    labels = {m.label: m.value for m in at.metric}
    assert "M = X_u - X_r (nats)" in labels and "fast test p (provisional)" in labels and "test accuracy" in labels
    from dashboard import state
    rec = state.store().get(run_id)
    assert rec.status == "done" and labels["M = X_u - X_r (nats)"] == f"{rec.summary['M']:.4g}"
    assert rec.config.canary.indices == (pick,) and rec.config.epochs == 3
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


def test_compare_and_influence_pages_run_small_studies(app_env):
    at = _app().switch_page("app_pages/train.py").run()
    at.number_input(key="tr_epochs").set_value(2).run()
    at.number_input(key="tr_ood").set_value(40).run()
    at.switch_page("app_pages/compare.py").run()
    at.multiselect(key="cmp_regs").set_value(["none", "dropout"])
    at.number_input(key="cmp_seeds").set_value(2)
    at.button(key="FormSubmitter:cmp_form-Run the comparison").click().run()
    assert not at.exception
    from dashboard import background, state
    for rid in state.runner().active():
        _wait_done(rid)
    at.run()
    assert not at.exception and len(at.dataframe) >= 1
    columns = [c for d in at.dataframe for c in d.value.columns]  # the group table and "All runs of this study"
    assert {"ttest_p_paper", "memorised", "verdict_headline", "share_memorised"} <= set(columns)
    assert not [c for c in columns if "significant" in c or c == "p_value"]  # labels: see its column_config
    at.switch_page("app_pages/influence.py").run()
    at.button(key="inf_start").click().run()
    deadline = time.time() + 240
    from ufm.attribution.sweep import ranking_config
    key = ranking_config(state.config_from_setup(at.session_state["setup"])).key() if "setup" in at.session_state else None
    while time.time() < deadline and background.tasks().status(key)[0] in ("running", "none"):
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
    at = _app().switch_page("app_pages/train.py").run()
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


def _parked_run(status: str) -> str:
    """A run recorded in the store but never trained: ``queued`` (no worker takes it) or ``cancelled``."""
    from dashboard import state
    from ufm.core.canary import CanaryChoice
    from ufm.core.experiment import ExperimentConfig
    from ufm.core.features import glyph

    state.runner()  # first, so its start-up recovery has already looked at the store
    cfg = ExperimentConfig(feature=glyph("A"), dataset="mnist", canary=CanaryChoice("index", (0,)), epochs=1,
                           seed=int(time.time() * 1000) % 10_000)
    run_id = state.store().create_run(cfg, status="queued")
    if status == "cancelled":
        state.store().mark_cancelled(run_id)
    return run_id


@pytest.mark.parametrize("bad", ["zzz", "0123456789ab", "'; DROP TABLE runs; --", "deleted"])
def test_train_page_survives_a_bad_run_in_the_url(app_env, bad):
    from dashboard import state
    if bad == "deleted":
        bad = _parked_run("cancelled")
        state.store().delete_run(bad)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.query_params["run"] = bad
    at.switch_page("app_pages/train.py").run()
    assert not at.exception and not at.error
    assert [w.value for w in at.warning if "Run not found" in w.value]
    assert all(bad not in w.value and "runs.sqlite" not in w.value for w in at.warning)  # no echo, no db path
    assert at.button(key="tr_start").label == "Start"  # the form still renders
    assert "run" not in at.query_params and state.RUN not in at.session_state
    at.run()  # and stays healthy
    assert not at.warning and at.button(key="tr_start")


def test_train_page_refuses_data_outside_the_allowed_folders(app_env, tmp_path):
    (tmp_path / "private").mkdir()
    at = _app().switch_page("app_pages/train.py").run()
    own = at.selectbox(key="tr_dataset").options[-1]
    at.selectbox(key="tr_dataset").set_value(own).run()
    for typed in (str(tmp_path / "private"), str(tmp_path / "absent"), str(app_env / "data" / ".." / "home")):
        at.text_input(key="tr_path").input(typed).run()
        assert not at.exception
        msgs = [e.value for e in at.error]
        assert msgs == [f"{typed} is outside the allowed data folders; ask the operator to add it to "
                        "UFM_ALLOWED_DATA"], msgs
        assert at.selectbox(key="tr_arch").value == "mlp"  # the rest of the form is still there
    at.text_input(key="tr_path").input(str(app_env / "data" / "mnist")).run()  # inside: accepted and loaded
    assert not at.exception and not at.error and at.button(key="tr_start")


def test_runs_page_asks_before_deleting(app_env):
    from dashboard import state
    run_id = _parked_run("cancelled")
    at = _app().switch_page("app_pages/runs.py").run()
    at.selectbox(key="runs_pick").set_value(run_id).run()
    at.button(key="runs_delete").click().run()
    assert any("cannot be undone" in w.value for w in at.warning)
    assert state.store().get(run_id).status == "cancelled"  # only asked
    at.button(key="runs_delete_no").click().run()
    assert not any("cannot be undone" in w.value for w in at.warning)
    at.button(key="runs_delete").click().run()
    at.button(key="runs_delete_yes").click().run()
    assert not at.exception
    from ufm.runs.store import RunNotFound
    with pytest.raises(RunNotFound):
        state.store().get(run_id)


def test_cancelling_a_run_of_another_session_asks_first(app_env):
    from dashboard import state
    run_id = _parked_run("queued")
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.query_params["run"] = run_id
    at.switch_page("app_pages/train.py").run()
    assert any("queued" in i.value for i in at.info)
    at.button(key=f"cancel_{run_id}").click().run()
    assert any("not started in this session" in w.value for w in at.warning)
    assert state.store().get(run_id).status == "queued"
    at.button(key=f"cancel_{run_id}_yes").click().run()
    assert not at.exception and state.store().get(run_id).status == "cancelled"
    at.run()
    assert any("was cancelled" in w.value for w in at.warning)


def test_own_run_is_cancelled_without_asking(app_env):
    from dashboard import access, state
    run_id = _parked_run("queued")
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.session_state[state.RUN] = run_id
    at.session_state[access.STARTED_KEY] = {run_id}
    at.switch_page("app_pages/train.py").run()
    at.button(key=f"cancel_{run_id}").click().run()
    assert not at.exception and state.store().get(run_id).status == "cancelled"


def test_live_curve_is_rebuilt_only_when_an_epoch_arrives(app_env, monkeypatch):
    from dashboard import state, views
    run_id = _parked_run("queued")
    store = state.store()
    assert store.mark_running(run_id)
    built = []
    real = views.loss_curve_figure
    monkeypatch.setattr(views, "loss_curve_figure", lambda rows, **kw: built.append(len(rows)) or real(rows, **kw))

    def epoch(e: int) -> None:
        store.update_progress(run_id, dict(phase="train", epoch=e, max_epochs=10, train_loss=1.0 / e,
                                           val_loss=1.1 / e, val_acc=0.5))

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.query_params["run"] = run_id
    epoch(1)
    at.switch_page("app_pages/train.py").run()
    epoch(2)
    at.run()
    at.run()  # a tick without a new epoch
    assert not at.exception and built == [2]
    assert any(m.label == "validation accuracy" for m in at.metric)
    assert [c.key for c in at.get("plotly_chart") if c.key.startswith("live_")] == [f"live_{run_id}"]
    epoch(3)
    at.run()
    assert built == [2, 3]
    store.mark_cancelled(run_id)


# ------------------------------------------------------------------ the silent-wrong-experiment paths (issue 12)

def test_feature_survives_page_changes_and_reloads(app_env):
    at = _app().switch_page("app_pages/feature.py").run()
    assert at.radio(key="feat_kind").value == "Glyph"
    at.radio(key="feat_kind").set_value("Text").run()
    assert at.text_input(key="text_value").value == "JD"  # the default fits the default 28x28 dataset
    at.text_input(key="text_value").input("KO").run()
    at.number_input(key="feat_row").set_value(3).run()
    assert at.session_state["feature"].name == "text 'KO'" and at.session_state["feature"].offset == (3, 1)
    at.switch_page("app_pages/train.py").run()
    assert any("Feature for the next run: text 'KO'" in c.value for c in at.caption)
    at.switch_page("app_pages/feature.py").run()  # coming back does not reset the kind to Glyph / the letter A
    assert at.radio(key="feat_kind").value == "Text" and at.text_input(key="text_value").value == "KO"
    assert at.session_state["feature"].name == "text 'KO'" and at.session_state["feature"].offset == (3, 1)
    design = at.query_params["design"]
    design = design[0] if isinstance(design, list) else design
    # a reload is a new session with the same URL
    again = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    again.query_params["design"] = design
    again.run()
    again.switch_page("app_pages/feature.py").run()
    assert not again.exception and again.session_state["feature"].name == "text 'KO'"
    assert again.radio(key="feat_kind").value == "Text" and again.number_input(key="feat_row").value == 3
    bad = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    bad.query_params["design"] = "../../etc/passwd"
    bad.run()
    bad.switch_page("app_pages/feature.py").run()
    assert not bad.exception and any("not a design id" in w.value for w in bad.warning)
    assert bad.session_state["feature"].name == "glyph A"


def test_drawn_feature_survives_a_page_change_and_grid_and_canvas_share_it(app_env):
    at = _app().switch_page("app_pages/feature.py").run()
    at.radio(key="feat_kind").set_value("Draw").run()
    at.button(key="draw_clear").click().run()
    at.checkbox(key="px_2_2").check().run()
    assert at.session_state["feature"].array().sum() == 1 and at.session_state["feature"].name == "drawn"
    # the tick went onto the canvas as one white square of the 5x5 grid
    init = at.session_state["_canvas_init"]
    assert [(o["left"], o["top"]) for o in init["objects"]] == [(128.0, 128.0)]
    at.switch_page("app_pages/runs.py").run()
    at.switch_page("app_pages/feature.py").run()
    assert at.radio(key="feat_kind").value == "Draw" and at.checkbox(key="px_2_2").value
    assert at.session_state["feature"].array().sum() == 1


def test_gallery_canary_reaches_the_run_and_survives_a_page_change(app_env):
    at = _app().switch_page("app_pages/train.py").run()
    at.radio(key="tr_canary_mode").set_value("pick an image").run()
    pick = _gallery_index(at, 2)
    at.button(key=f"tr_use_{pick}").click().run()
    assert at.number_input(key="tr_index").value == pick
    assert at.session_state["setup"]["canary"].indices == (pick,)
    at.switch_page("app_pages/compare.py").run()
    assert any(f"canary at index {pick}" in c.value for c in at.caption)  # the study would use the same canary
    at.switch_page("app_pages/train.py").run()
    assert at.number_input(key="tr_index").value == pick
    at.number_input(key="tr_epochs").set_value(2).run()
    at.number_input(key="tr_ood").set_value(40).run()
    at.button(key="tr_start").click().run()
    from dashboard import state
    rec = state.store().get(at.session_state["run_id"])
    assert rec.config.canary.indices == (pick,)


def test_train_caption_describes_the_run_not_the_current_feature(app_env):
    from dashboard import state
    from ufm.core.features import text_feature
    at = _app().switch_page("app_pages/train.py").run()
    at.number_input(key="tr_epochs").set_value(2).run()
    at.number_input(key="tr_ood").set_value(40).run()
    at.button(key="tr_start").click().run()
    run_id = at.session_state["run_id"]
    _wait_done(run_id)
    fresh = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    fresh.query_params["run"] = run_id
    fresh.run()
    fresh.session_state["feature"] = text_feature("JD")
    fresh.switch_page("app_pages/train.py").run()
    assert not fresh.exception
    run_caption = next(c.value for c in fresh.caption if "seed" in c.value and "·" in c.value)
    assert "glyph A" in run_caption and "JD" not in run_caption
    assert any(c.value.startswith("Feature for the next run: text 'JD'") for c in fresh.caption)


def test_compare_shows_the_new_study_at_once_and_reruns_by_name_or_replace(app_env):
    at = _app().switch_page("app_pages/train.py").run()
    at.number_input(key="tr_epochs").set_value(1).run()
    at.number_input(key="tr_ood").set_value(20).run()
    at.switch_page("app_pages/compare.py").run()
    at.multiselect(key="cmp_regs").set_value(["none"])
    at.number_input(key="cmp_seeds").set_value(1)
    at.text_input(key="cmp_name").input("first")
    at.button(key="FormSubmitter:cmp_form-Run the comparison").click().run()
    assert not at.exception and at.selectbox(key="cmp_study").value == "first"
    assert at.text_input(key="cmp_name").value != "first"  # a second press makes a new study
    at.multiselect(key="cmp_regs").set_value(["dropout"])
    at.button(key="FormSubmitter:cmp_form-Run the comparison").click().run()
    second = at.selectbox(key="cmp_study").value
    assert second not in ("first", None)
    at.text_input(key="cmp_name").input("first")
    at.button(key="FormSubmitter:cmp_form-Run the comparison").click().run()
    assert any("exists" in e.value and "replace" in e.value for e in at.error)
    assert at.selectbox(key="cmp_study").value == second
    at.text_input(key="cmp_name").input("first")
    at.checkbox(key="cmp_replace").check()
    at.button(key="FormSubmitter:cmp_form-Run the comparison").click().run()
    assert not at.error and at.selectbox(key="cmp_study").value == "first"
    from dashboard import state
    for rid in state.runner().active():
        _wait_done(rid)
    at.run()
    assert any("n = 1" in w.value for w in at.warning)  # one seed: no interval, said so


def test_canvas_drawing_is_area_averaged_into_the_feature_grid():
    from PIL import Image, ImageDraw

    from dashboard.feature_ui import CANVAS_PX, canvas_to_pattern, pattern_to_drawing
    img = Image.new("RGBA", (CANVAS_PX, CANVAS_PX), (0, 0, 0, 255))
    ImageDraw.Draw(img).line([(160, 20), (160, 300)], fill=(255, 255, 255, 255), width=64)  # a vertical stroke
    p = canvas_to_pattern(np.asarray(img), 5)
    assert p[:, 2].sum() >= 4 and p[:, [0, 1, 3, 4]].sum() == 0  # ink in one column band only
    grey = canvas_to_pattern(np.asarray(img), 10, threshold=None)
    assert 0 < grey.max() <= 1 and set(np.flatnonzero(grey.sum(0))) <= {4, 5, 6}  # 64 px = 2 of 32-px cells (+edges)
    transparent = np.zeros((CANVAS_PX, CANVAS_PX, 4), np.uint8)  # an untouched transparent canvas is no ink
    assert canvas_to_pattern(transparent, 5).sum() == 0
    # a pattern drawn onto the canvas as squares reads back as itself (the grid <-> canvas round trip)
    pattern = (np.random.default_rng(0).random((7, 7)) > 0.5).astype(float)
    back = Image.new("RGB", (CANVAS_PX, CANVAS_PX))
    d = ImageDraw.Draw(back)
    for o in pattern_to_drawing(pattern)["objects"]:
        d.rectangle([o["left"], o["top"], o["left"] + o["width"] - 1, o["top"] + o["height"] - 1], fill=(255, 255, 255))
    assert np.array_equal(canvas_to_pattern(np.asarray(back), 7, threshold=0.5), pattern)
    with pytest.raises(ValueError, match="between"):
        canvas_to_pattern(np.asarray(img), 40)
    with pytest.raises(ValueError, match="canvas image"):
        canvas_to_pattern(np.zeros((5, 5)), 5)


def test_disagreement_note_only_when_m_and_the_rank_test_point_different_ways():
    from dashboard.views import disagreement_note
    note = disagreement_note({"M": -1.93, "X_r": 2.0, "exposure_p_value": 0.048})
    assert note and "negative" in note and "disagree" in note and "-1.93" in note
    assert "p = 0.048" in note  # formatted, never 000...0002
    assert disagreement_note({"M": 0.5, "X_r": 1.0, "exposure_p_value": 0.9})  # positive M, rank finds nothing
    assert disagreement_note({"M": 0.5, "X_r": 1.0, "exposure_p_value": 0.01}) is None  # agree
    assert disagreement_note({"M": -0.1, "X_r": 1.0, "exposure_p_value": 0.6}) is None  # agree
    assert disagreement_note({"M": float("nan"), "exposure_p_value": 0.01}) is None


# ------------------------------------------------------------------ one verdict, live; a fair queue (issue 17)

def test_result_page_turns_calibrated_when_the_bank_completes_without_a_reload(app_env):
    """The result page of a provisional run follows its bank: its button is disabled once the bank
    is queued, and when the bank finishes (recorded as the worker records it) the next run of the
    page script (the fragment's tick or any rerun: no reload, same session) shows the calibrated
    verdict with the p-value every other surface shows. Then the Runs page hides the 39 reference
    models unless asked."""
    import dataclasses

    from dashboard import state
    from ufm.core.canary import CanaryChoice
    from ufm.core.experiment import ExperimentConfig, run_experiment
    from ufm.core.features import glyph
    from ufm.runs.jobs import measure
    from ufm.measure.bank import bank_configs
    from ufm.runs.store import BACKGROUND
    from ufm.measure.verdict import Verdict, after_run

    store = state.store()
    state.runner()  # first, so its start-up recovery has already looked at the store
    cfg = ExperimentConfig(feature=glyph("A"), dataset="mnist", data_dir=state.data_dir(), epochs=2, patience=1,
                           ood_size=40, candidates=9, canary=CanaryChoice("index", (0,)), seed=4242)
    run_id, _, _ = measure(store, cfg)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.query_params["run"] = run_id
    at.switch_page("app_pages/train.py").run()
    assert not at.exception
    boxes = [b.value for b in [*at.error, *at.success, *at.warning, *at.info] if b.value.startswith("**")]
    assert len(boxes) == 1 and "(provisional)" in boxes[0]
    assert any("0 of 39 finished" in i.value for i in at.info)
    assert not at.button(key=f"bank_{run_id}").disabled

    refs = bank_configs(cfg)
    parked = [store.create_run(c, priority=BACKGROUND) for c in refs]  # queued (e.g. by another session)
    at.run()
    assert at.button(key=f"bank_{run_id}").disabled
    assert any("0 of 39 finished, 39 queued or training" in i.value for i in at.info)

    clean = run_experiment(refs[0])  # one clean model stands in for all 39 (their weights are what counts)
    for c, rid in zip(refs, parked):
        assert store.mark_running(rid)
        store.save_result(rid, dataclasses.replace(clean, config=c))
    after_run(store, parked[-1])  # what the worker does after the last reference model
    at.run()
    assert not at.exception
    v = Verdict.from_dict(store.get(run_id).verdict)
    assert v.test == "reference"
    boxes = [b.value for b in [*at.error, *at.success, *at.warning, *at.info] if b.value.startswith("**")]
    assert boxes == [f"**{v.headline}.** {v.text}"] and "provisional" not in boxes[0]
    assert {m.label: m.value for m in at.metric}["calibrated p (reference models)"] == v.p_text
    assert not any("Reference models for this setting" in i.value for i in at.info)
    assert not [b for b in at.button if b.key == f"bank_{run_id}"]

    at.switch_page("app_pages/runs.py").run()
    assert not at.exception
    listed = set(at.dataframe[0].value["id"])
    assert run_id in listed and not listed & set(parked)  # reference models hidden by default ...
    assert any(e.label.startswith("Reference models: ") for e in at.expander)  # ... summarised per bank
    at.toggle(key="runs_refs").set_value(True).run()
    assert set(parked) <= set(at.dataframe[0].value["id"])  # ... and shown when asked


def test_cancelling_a_run_cancels_the_bank_queued_for_it(app_env):
    from dashboard import access, state
    from ufm.core.canary import CanaryChoice
    from ufm.core.experiment import ExperimentConfig
    from ufm.core.features import glyph
    from ufm.measure.bank import bank_configs
    from ufm.runs.store import BACKGROUND

    state.runner()
    store = state.store()
    cfg = ExperimentConfig(feature=glyph("A"), dataset="mnist", data_dir=state.data_dir(), epochs=7,
                           canary=CanaryChoice("index", (0,)), seed=77)
    run_id = store.create_run(cfg)  # parked: no worker takes it
    bank = [store.create_run(c, priority=BACKGROUND) for c in bank_configs(cfg)[:3]]
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.session_state[state.RUN] = run_id
    at.session_state[access.STARTED_KEY] = {run_id}
    at.switch_page("app_pages/train.py").run()
    assert any("in the queue" in i.value for i in at.info)  # its queue position, not "behind the runs ahead"
    at.button(key=f"cancel_{run_id}").click().run()
    assert not at.exception and store.get(run_id).status == "cancelled"
    assert {store.get(b).status for b in bank} == {"cancelled"}


def test_start_after_cancel_always_starts_a_new_run(app_env):
    """Start, Cancel, Start with the same choices: the second Start queues a new run (it used to
    get the cancelled run back while that run was still in the runner's queue)."""
    from dashboard import state
    at = _app().switch_page("app_pages/train.py").run()
    at.number_input(key="tr_seed").set_value(9191).run()  # a setting no other test trains
    at.number_input(key="tr_ood").set_value(30).run()
    at.button(key="tr_start").click().run()
    first = at.session_state[state.RUN]
    at.button(key=f"cancel_{first}").click().run()
    assert not at.exception and state.store().get(first).status in ("cancelled", "running")
    at.button(key="tr_start").click().run()
    second = at.session_state[state.RUN]
    assert second != first and state.store().get(second).status in ("queued", "running")
    assert not any("was cancelled" in w.value for w in at.warning)
    state.runner().cancel(second)
    _wait_done(second)
    _wait_done(first)


def test_controls_for_work_already_queued_are_disabled(app_env, monkeypatch):
    """Start is disabled (with the reason) while the identical run is queued or running, and enabled
    again with "train again" ticked or once it is cancelled; a demo's button is disabled while its
    models are queued. One slot, kept busy by a long run, so what is queued stays queued."""
    from dashboard import demos, state
    plan = _tiny_plan(str(app_env / "data"))
    monkeypatch.setattr(demos, "plan", lambda key: plan)
    runner = state.runner()
    asked = []
    real = runner.in_flight
    monkeypatch.setattr(runner, "in_flight", lambda cfg: asked.append(cfg) or real(cfg))
    at = _app().switch_page("app_pages/train.py").run()
    assert not at.exception and not at.button(key="tr_start").disabled
    page_config = asked[-1]  # the config Start would queue
    blocker = runner.submit(plan.base.replace(epochs=100000, patience=100000, seed=77))
    queued = runner.submit(page_config, force=True)  # force: an earlier test may have trained it
    assert runner.in_flight(page_config) == queued
    at.run()
    assert at.button(key="tr_start").disabled
    assert any(queued in c.value and "already queued or running" in c.value for c in at.caption)
    at.checkbox(key="tr_force").check().run()
    assert not at.button(key="tr_start").disabled  # a deliberate second run stays possible
    at.checkbox(key="tr_force").uncheck().run()
    runner.cancel(queued)
    at.run()
    assert not at.button(key="tr_start").disabled  # Start after Cancel

    at.switch_page("app_pages/home.py").run()
    assert not at.button(key="demo_teaching").disabled
    rung = runner.submit(plan.configs()[0], force=True)  # the demo's own run (an earlier test finished one)
    at.run()
    assert at.button(key="demo_teaching").disabled
    assert any("queued or training" in c.value for c in at.caption)
    runner.cancel(rung)
    runner.cancel(blocker)
    at.run()
    assert not at.button(key="demo_teaching").disabled
