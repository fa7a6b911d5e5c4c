"""AppTest of issue 17's settings paths: settings that cannot work are refused before Start, one
DP-SGD configuration on every page, the feature survives kind switches and links, and the smaller
dashboard fixes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from tests.test_app import app_env  # noqa: F401 - the dashboard fixture (tiny 'mnist', 240 training images)

ROOT = Path(__file__).resolve().parents[1]


def _app() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    assert not at.exception
    return at


def _train_size(at: AppTest, n: int) -> AppTest:
    at.switch_page("app_pages/train.py").run()
    at.number_input(key="tr_size").set_value(n).run()
    assert at.session_state["setup"]["train_size"] == n
    return at


# ------------------------------------------------------------------ item 3: audit canaries the set cannot hold

def test_audit_canary_limit_is_the_clis_rule():
    from ufm.audits.privacy_audit import audit_canary_limit, check_audit_canaries

    assert audit_canary_limit(200, 0.1) == 179  # 20 held out for validation, one image left without a canary
    assert audit_canary_limit(3, 0.1) == 2 and audit_canary_limit(2, 0.1) == 1 and audit_canary_limit(0, 0.1) == 0
    check_audit_canaries(179, 200, 0.1)
    with pytest.raises(ValueError, match="use at most 179 canaries or a larger --train-size"):
        check_audit_canaries(200, 200, 0.1)
    with pytest.raises(ValueError, match=r"^audit canaries 200 .* use at most 179 canaries or more images$"):
        check_audit_canaries(200, 200, 0.1, name="audit canaries", more_images="more images")


def test_compare_audit_on_a_200_image_set_is_clamped_and_refused_before_start(app_env):
    from dashboard import state
    from ufm.runs.studies import list_studies

    at = _train_size(_app(), 200)
    at.switch_page("app_pages/compare.py").run()
    assert not at.exception
    box = at.number_input(key="cmp_audit_m")
    assert box.value == 179 and box.max == 179  # the default 200 does not fit: lowered before Start
    assert any("At most 179 audit canaries" in c.value and "200 training images" in c.value for c in at.caption)
    # the box kept from a larger setup: the limit then shrinks behind the form (another tab of the session
    # changes the training images); Start re-checks and refuses, and nothing is stored or queued
    at = _train_size(at, 240)
    at.switch_page("app_pages/compare.py").run()
    assert at.number_input(key="cmp_audit_m").max == 215
    at.checkbox(key="cmp_audit").check()
    at.number_input(key="cmp_audit_m").set_value(210)
    at.text_input(key="cmp_name").input("too many canaries")
    at.session_state["setup"] = dict(at.session_state["setup"], train_size=200)
    before = len(list_studies(state.store()))
    at.button(key="FormSubmitter:cmp_form-Run the comparison").click().run()
    assert not at.exception
    assert [e.value for e in at.error] == ["audit canaries 210 is larger than the training set allows: 200 images, 20 "
                                           "of them held out for validation; use at most 179 canaries or more training "
                                           "images (Train & measure, Advanced)"]
    assert len(list_studies(state.store())) == before


def test_audit_privacy_page_bounds_canaries_by_the_training_set(app_env):
    at = _train_size(_app(), 200)
    at.switch_page("app_pages/privacy.py").run()
    assert not at.exception
    assert at.number_input(key="pa_m").value == 179 and at.number_input(key="pa_m").max == 179
    assert any("at most **179** audit canaries" in c.value for c in at.caption)


# ------------------------------------------------------------------ item 5: one DP configuration

def _dp_values(at: AppTest, prefix: str) -> tuple:
    return (at.radio(key=f"{prefix}_dp_how").value, at.number_input(key=f"{prefix}_dp_eps").value,
            at.number_input(key=f"{prefix}_dp_noise").value, at.number_input(key=f"{prefix}_dp_clip").value,
            at.number_input(key=f"{prefix}_dp_delta").value)


def test_dp_defaults_are_the_same_on_train_compare_and_audit_privacy(app_env):
    from ufm.core.train import DEFAULT_DP, DEFAULT_NOISE_MULTIPLIER

    expected = ("target epsilon", DEFAULT_DP.target_epsilon, DEFAULT_NOISE_MULTIPLIER, DEFAULT_DP.max_grad_norm,
                DEFAULT_DP.delta)
    at = _app().switch_page("app_pages/train.py").run()
    at.multiselect(key="tr_regs").set_value(["dp-sgd"]).run()
    assert _dp_values(at, "tr") == expected
    fresh = _app()
    fresh.switch_page("app_pages/compare.py").run()
    assert _dp_values(fresh, "cmp") == expected
    fresh.switch_page("app_pages/privacy.py").run()
    assert _dp_values(fresh, "pa") == expected


def test_compare_dp_members_use_the_shared_default_not_noise_one(app_env):
    from dashboard import state
    from ufm.runs.studies import get_study
    from ufm.core.train import DEFAULT_DP, NEUTRAL_DP

    at = _app().switch_page("app_pages/train.py").run()
    at.number_input(key="tr_epochs").set_value(1).run()
    at.switch_page("app_pages/compare.py").run()
    at.multiselect(key="cmp_regs").set_value(["none", "dp-sgd"])
    at.number_input(key="cmp_seeds").set_value(1)
    at.text_input(key="cmp_name").input("dp default")
    at.button(key="FormSubmitter:cmp_form-Run the comparison").click().run()
    assert not at.exception and not at.error
    study = get_study(state.store(), "dp default")
    dp = {e.group: e.config.dp for e in study.entries}
    assert dp["dp-sgd"] == DEFAULT_DP and dp["none"] == NEUTRAL_DP  # a setting a run does not use leaves its key alone
    for e in study.entries:
        if e.run_id:
            state.runner().cancel(e.run_id)


def test_cli_dp_default_is_the_dashboards():
    from ufm.cli import build_parser, config_from_args
    from ufm.core.train import DEFAULT_DP, NEUTRAL_DP

    def cfg(*argv):
        return config_from_args(build_parser().parse_args(["measure", *argv]))

    assert cfg("--regulariser", "dp-sgd").dp == DEFAULT_DP
    assert cfg("--regulariser", "dp-sgd", "--dp-noise", "2").dp.noise_multiplier == 2.0
    assert cfg().dp == NEUTRAL_DP and cfg("--dp-epsilon", "3").dp == NEUTRAL_DP  # not used: not in the key


def test_models_that_did_not_learn_are_marked_and_never_counted_as_not_memorised():
    from dashboard.compare_ui import learned_column, not_learned_note
    from ufm.runs.studies import aggregate

    runs = pd.DataFrame({
        "group": ["none", "none", "dp-sgd", "dp-sgd", "dp-sgd"],
        "status": ["done"] * 5,
        "M": [0.5, 0.4, 0.0, 0.001, 0.2],
        "significant": [True, False, False, False, False],
        "verdict": ["memorised", "not_shown", "inconclusive", "inconclusive", "not_shown"],
        "verdict_test": ["fast"] * 5,
        "test_accuracy": [0.9, 0.9, 0.5, 0.5, 0.8],
        "epsilon": [np.nan, np.nan, 31.1, 30.9, 8.0],
        "learned": [True, True, False, False, True],
    })
    agg = aggregate(runs).set_index("group")
    none, dp = agg.loc["none"], agg.loc["dp-sgd"]
    assert none.share_significant == 0.5 and none.n_not_learned == 0 and math.isnan(none.mean_epsilon)
    # two DP models at chance: inconclusive, not "not memorised"; the share is over the one that learned
    assert dp.n_not_learned == 2 and dp.n_inconclusive == 2 and dp.share_significant == 0.0 and dp.n_significant == 0
    assert dp.mean_epsilon == pytest.approx((31.1 + 30.9 + 8.0) / 3)
    only_chance = aggregate(runs[runs["learned"] == False]).iloc[0]  # noqa: E712
    assert math.isnan(only_chance.share_significant)  # no answer at all, never 0% memorised
    marks = learned_column(aggregate(runs))
    assert marks == ["yes", "NO: 2 of 3 at chance (inconclusive)"]
    assert "dp-sgd (2 of 3)" in not_learned_note(aggregate(runs))


def test_study_html_marks_models_that_did_not_learn_and_shows_epsilon():
    from types import SimpleNamespace

    from ufm.reports.run_report import _share_cell

    r = SimpleNamespace(done=3, n_inconclusive=2, n_not_learned=2, n_significant=0)
    assert _share_cell(r) == "0 of 1; 2 did not learn (inconclusive)"
    assert _share_cell(SimpleNamespace(done=0, n_inconclusive=0, n_not_learned=0, n_significant=0)) == "–"


# ------------------------------------------------------------------ item 6: the feature survives

def _draw_one_pixel(at: AppTest, r: int = 2, c: int = 2) -> None:
    at.radio(key="feat_kind").set_value("Draw").run()
    at.checkbox(key=f"px_{r}_{c}").check().run()
    assert at.session_state["feature"].name == "drawn" and at.session_state["feature"].array().sum() == 1


def test_clicking_text_alone_keeps_the_feature_in_use(app_env):
    at = _app().switch_page("app_pages/feature.py").run()
    _draw_one_pixel(at)
    drawing = at.session_state["feature"]
    at.radio(key="feat_kind").set_value("Text").run()
    assert not at.exception
    assert at.session_state["feature"] == drawing  # not "JD"
    assert any("stays in use" in i.value for i in at.info) and at.button(key="feat_use")
    at.button(key="feat_use").click().run()  # an explicit choice makes the default text the feature
    assert at.session_state["feature"].name == "text 'JD'"


def test_draw_text_upload_draw_keeps_the_drawing_and_each_kind_its_value(app_env):
    at = _app().switch_page("app_pages/feature.py").run()
    _draw_one_pixel(at, 1, 3)
    drawing = at.session_state["feature"]
    at.radio(key="feat_kind").set_value("Text").run()
    at.text_input(key="text_value").input("KO").run()
    assert at.session_state["feature"].name == "text 'KO'"
    assert any(c.value.startswith("Kept in this session") and "Draw: drawn" in c.value for c in at.caption)
    at.radio(key="feat_kind").set_value("Upload").run()
    assert at.session_state["feature"].name == "text 'KO'"  # no file yet: the text stays in use
    at.radio(key="feat_kind").set_value("Draw").run()
    assert not at.exception
    assert at.checkbox(key="px_1_3").value and sum(c.value for c in at.checkbox if c.key.startswith("px_")) == 1
    assert at.session_state["feature"].array().tolist() == drawing.array().tolist()  # the drawing, not the A
    assert any("Text: text 'KO'" in c.value for c in at.caption if c.value.startswith("Kept"))  # the switch's undo
    at.radio(key="feat_kind").set_value("Text").run()
    assert at.text_input(key="text_value").value == "KO" and at.session_state["feature"].name == "text 'KO'"


def test_a_new_drawing_starts_blank_so_the_canvas_reset_clears_it(app_env):
    at = _app().switch_page("app_pages/feature.py").run()
    at.radio(key="feat_kind").set_value("Draw").run()
    assert not at.exception and not at.error  # a blank grid is not an error until the user draws
    assert sum(c.value for c in at.checkbox if c.key.startswith("px_")) == 0
    assert at.session_state["_canvas_init"]["objects"] == []  # what the toolbar's Reset returns to
    assert at.session_state["feature"].name == "glyph A"  # still in use until something is drawn


def _stored_run(feature) -> str:
    from dashboard import state
    from ufm.core.canary import CanaryChoice
    from ufm.core.experiment import ExperimentConfig

    state.runner()
    cfg = ExperimentConfig(feature=feature, dataset="mnist", canary=CanaryChoice("index", (3,)), epochs=1, seed=77,
                           train_size=200)
    run_id = state.store().create_run(cfg, status="queued")
    state.store().mark_cancelled(run_id)
    return run_id


def test_a_run_link_without_design_keeps_the_browsers_feature(app_env, monkeypatch):
    from dashboard import access, state
    from ufm.core.features import text_feature

    at = _app().switch_page("app_pages/feature.py").run()
    at.radio(key="feat_kind").set_value("Text").run()
    at.text_input(key="text_value").input("KO").run()
    did = at.session_state[state._DESIGN_ID]
    run_id = _stored_run(text_feature("ZZ"))
    # a new session (a typed link, a new tab) with this browser's cookie: the feature it worked with
    monkeypatch.setattr(access, "browser_cookie", lambda name: did if name == state.DESIGN_COOKIE else None)
    link = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    link.query_params["run"] = run_id
    link.switch_page("app_pages/train.py").run()
    assert not link.exception
    assert link.session_state["feature"].name == "text 'KO'"
    assert any(c.value.startswith("Feature for the next run: text 'KO'") for c in link.caption)
    link.switch_page("app_pages/audit.py").run()
    assert not link.exception and link.session_state["feature"].name == "text 'KO'"


def test_a_run_link_in_a_fresh_browser_takes_the_runs_feature_not_the_a(app_env, monkeypatch):
    from dashboard import access
    from ufm.core.features import text_feature

    monkeypatch.setattr(access, "browser_cookie", lambda name: None)
    run_id = _stored_run(text_feature("ZZ"))
    link = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    link.query_params["run"] = run_id
    link.switch_page("app_pages/train.py").run()
    assert not link.exception
    assert link.session_state["feature"].name == "text 'ZZ'"
    assert link.session_state["setup"]["canary"].indices == (3,)
    assert "design" in link.query_params  # and the design rides in the URL from now on


# ------------------------------------------------------------------ item 7: the smaller fixes

def test_spread_indices_show_every_class_of_a_class_sorted_set():
    from ufm.core.sampling import spread_indices

    y = np.array([0] * 150 + [1] * 50)  # sorted by class, like the chest X-rays
    idx = spread_indices(y, 24, seed=0)
    assert len(idx) == len(set(idx.tolist())) == 24 and set(y[idx]) == {0, 1}
    assert list(y[idx[:4]]) == [0, 1, 0, 1]  # interleaved
    assert spread_indices(y, 24, seed=0).tolist() == idx.tolist() != spread_indices(y, 24, seed=1).tolist()
    assert len(spread_indices(np.array([0, 1, 1]), 24)) == 3


def test_canary_gallery_spans_the_classes_and_the_index_is_bounded_by_the_set(app_env):
    at = _train_size(_app(), 200)
    at.radio(key="tr_canary_mode").set_value("pick an image").run()
    keys = [b.key for b in at.button if b.key and b.key.startswith("tr_use_")]
    assert len(keys) == 24 and keys != [f"tr_use_{i}" for i in range(24)]
    from dashboard import state
    x, y, _ = state.training_images("mnist", state.data_dir(), 200, tuple(int(k[7:]) for k in keys))
    assert len(set(y.tolist())) == 3  # all three classes of the tiny set
    box = at.number_input(key="tr_index")
    assert box.max == 199  # 200 images: 0..199, not 59,999


def test_explain_gives_no_delta_badge_for_a_change_that_rounds_to_zero():
    from dashboard.explain_ui import delta_text

    assert delta_text(0.1234, 0.1236) is None and delta_text(0.5, 0.5) is None  # no red "-0.000"
    assert delta_text(0.2, 0.1) == "+0.100" and delta_text(0.1, 0.2) == "-0.100"


def test_compare_and_audit_forms_start_only_from_their_button(app_env):
    at = _app().switch_page("app_pages/compare.py").run()
    forms = [f for f in at.get("form")]
    assert forms and all(f.proto.form.enter_to_submit is False for f in forms)  # Enter in a field does not submit
    at.switch_page("app_pages/privacy.py").run()
    assert all(f.proto.form.enter_to_submit is False for f in at.get("form"))


def test_rank_test_note_names_only_the_family_used():
    from dashboard.views import disagreement_note

    note = disagreement_note({"M": 0.5, "X_r": 1.0, "exposure_p_value": 0.9, "family": "strings"})
    assert "random strings" in note and "strokes" not in note and "rearrange" not in note
    shifted = disagreement_note({"M": 0.5, "X_r": 1.0, "exposure_p_value": 0.9, "family": "shift"})
    assert "stamped at other places" in shifted and "strings" not in shifted


def test_figure_titles_sit_below_the_plotly_toolbar():
    from ufm.attribution.heatmap_figures import overlay_grid
    from ufm.reports.plots import (MODEBAR_PX, TITLE_PX, histogram_figure, histogram_grid, image_figure, ladder_figure,
                           m_bar_figure, pattern_figure, zoom_figure)

    rng = np.random.default_rng(0)
    img = rng.random((1, 12, 12))
    figs = [histogram_figure(rng.random(20), rng.random(20)), image_figure(img, title="canary"),
            zoom_figure(img, (2, 2, 3, 3), title="zoom"), pattern_figure(np.eye(5)),
            m_bar_figure(["a", "b"], [0.1, 0.2], [0.0, 0.1], [0.2, 0.3]),
            ladder_figure(["1", "3"], [0.1, None], ["not_shown", None]),
            histogram_grid({"a": (rng.random(20), rng.random(20)), "b": None}),
            overlay_grid([img], [rng.random((12, 12))], ["x"], None, title="GradCAM")]
    for fig in figs:
        t = fig.layout.title
        assert t.text and t.yref == "container" and t.yanchor == "top" and t.y == 1, t
        assert t.pad.t >= MODEBAR_PX >= 28  # the toolbar's row stays free
        assert fig.layout.margin.t >= MODEBAR_PX + TITLE_PX  # and the title fits above the plot


def test_audit_defaults_to_the_papers_ood_set_and_says_why():
    from ufm.audits.audit_images import default_inference_source

    assert default_inference_source(1)[0] == "cifar10" and default_inference_source(3)[0] == "mnist"
    src, why = default_inference_source(1, "mnist")
    assert src == "cifar10" and "trained on mnist" in why
    assert default_inference_source(3, "cifar10")[0] == "mnist"
    assert "not comparable" in default_inference_source(1)[1]


def test_run_details_give_class_counts(app_env):
    from dashboard import state
    from .test_app import _wait_done

    at = _train_size(_app(), 60)
    at.number_input(key="tr_epochs").set_value(1).run()
    at.number_input(key="tr_ood").set_value(20).run()
    at.button(key="tr_start").click().run()
    run_id = at.session_state["run_id"]
    _wait_done(run_id)
    at.run()
    assert not at.exception
    counts = state.class_counts("mnist", state.data_dir(), 60)
    assert sum(n for _, n in counts) == 60 and len(counts) == 3
    text = next(c.value for c in at.caption if c.value.startswith("Training set: 60 images"))
    assert "54 trained on, 6 for validation" in text
    assert "per class: " + ", ".join(f"{c} {n}" for c, n in counts) in text


def test_a_child_process_importing_app_py_does_not_run_the_dashboard(monkeypatch):
    """multiprocessing re-executes the server's __main__ (Streamlit registers app.py as it) in every
    run and task process, as "__mp_main__": that must not run the gate, the navigation and a page
    (12 "missing ScriptRunContext" warnings per process)."""
    import runpy

    import streamlit as st

    def refuse(*a, **k):
        raise AssertionError("the dashboard ran in a child process")

    monkeypatch.setattr(st, "set_page_config", refuse)
    monkeypatch.setattr(st, "navigation", refuse)
    ns = runpy.run_path(str(ROOT / "app.py"), run_name="__mp_main__")
    assert callable(ns["main"])


def test_runs_table_marks_a_model_that_did_not_learn_and_shows_epsilon():
    from types import SimpleNamespace

    from ufm.reports.run_report import RUN_TABLE_COLUMNS, run_row

    rec = SimpleNamespace(id="abc", status="done", created=0.0, finished=1.0, started=0.5, progress=None,
                          config_data={"dataset": "mnist", "regularisers": ["dp-sgd"]}, config_key="k",
                          code_version="v", error=None, verdict=None, bank=None,
                          summary={"M": 0.0, "learned": False, "test_accuracy": 0.5, "epsilon": 31.1})
    row = run_row(rec)
    assert row["learned"] is False and row["epsilon"] == 31.1 and set(row) == set(RUN_TABLE_COLUMNS)
    assert RUN_TABLE_COLUMNS.index("learned") < RUN_TABLE_COLUMNS.index("dataset")  # on screen without scrolling


def test_clearing_a_drawing_can_be_undone(app_env):
    at = _app().switch_page("app_pages/feature.py").run()
    _draw_one_pixel(at, 0, 4)
    assert at.button(key="draw_undo").disabled
    at.button(key="draw_clear").click().run()
    assert sum(c.value for c in at.checkbox if c.key.startswith("px_")) == 0
    at.button(key="draw_undo").click().run()
    assert at.checkbox(key="px_0_4").value and sum(c.value for c in at.checkbox if c.key.startswith("px_")) == 1
    assert at.session_state["feature"].array()[0, 4] == 1
