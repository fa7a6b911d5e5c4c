"""A privacy audit's model is a run in the run store: listed (store, ``ufm runs list``, Runs page),
cancellable (store flag, ``ufm runs cancel``), reused when identical; its numbers are those of the
code before audits were runs (pinned); audits saved as files by that code still open."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import tiny_config
from tests.test_app import app_env  # noqa: F401 - the dashboard fixture
from ufm.audits.bounds import audit_bound
from ufm.audits.privacy_audit import PrivacyAuditConfig, run_privacy_audit
from ufm.audits.privacy_audit_store import (legacy_audit_dir, list_privacy_audits, load_privacy_audit,
                                            study_audit_table, attach_study_audits)
from ufm.runs.store import Store

from .conftest import needs_shared

PINS = Path(__file__).parent / "fixtures" / "privacy_audit_0_pre_engine"


def _audit(tiny_data, **kw) -> PrivacyAuditConfig:
    exp = tiny_config(tiny_data, epochs=kw.pop("epochs", 2), patience=kw.pop("patience", 2))
    return PrivacyAuditConfig(exp, canaries=kw.pop("canaries", 20), feature_size=3, offset=(0, 0), **kw)


def test_audit_is_a_run_in_the_store_and_is_reused(tiny_data, one_torch_thread, tmp_path, monkeypatch, capsys):
    from ufm.cli import main
    from ufm.core import experiment

    store = Store(tmp_path / "home")
    cfg = _audit(tiny_data)
    res = run_privacy_audit(cfg, store=store)
    (rec,) = store.list_runs()
    assert rec.id == res.run_id and rec.status == "done" and rec.is_privacy_audit
    assert rec.config.audit == cfg.canary_spec() and rec.M is None
    s = rec.summary
    assert s["kind"] == "privacy audit" and s["audit_canaries"] == 20 and s["audit_in"] == sum(res.is_in)
    assert s["audit_epsilon_lb"] == audit_bound(res.scores, res.is_in).epsilon == res.epsilon
    from ufm.measure.verdict import stored_verdict

    assert stored_verdict(store, rec) is None  # a privacy audit has a bound, not a memorisation verdict

    def no_training(*a, **k):
        raise AssertionError("an identical audit trained again")

    monkeypatch.setattr(experiment, "run_experiment", no_training)
    again = run_privacy_audit(cfg.replace(confidence=0.9), store=store)  # the bound's settings: same run
    assert again.run_id == res.run_id and again.scores == res.scores and len(store.list_runs()) == 1
    assert again.bound.confidence == 0.9
    assert again.epsilon == audit_bound(res.scores, res.is_in, confidence=0.9).epsilon
    assert [a.run_id for a in list_privacy_audits(store)] == [res.run_id]

    assert main(["runs", "list", "--home", str(store.home)]) == 0
    out = capsys.readouterr().out
    assert rec.id in out and "privacy audit: 20 canaries" in out and "epsilon >=" in out
    assert main(["runs", "show", rec.id, "--home", str(store.home)]) == 0
    out = capsys.readouterr().out
    assert "privacy audit: 20 canaries" in out and "M =" not in out
    from ufm.reports.run_report import run_html

    assert "Privacy audit" in run_html(store, rec.id)


def test_cancelling_the_audit_run_through_the_store_stops_it(tiny_data, one_torch_thread, tmp_path):
    from ufm.core.train import TrainingCancelled

    store = Store(tmp_path / "home")
    cfg = _audit(tiny_data, epochs=5000, patience=5000)
    ended: list = []

    def audit() -> None:
        try:
            ended.append(run_privacy_audit(cfg, store=Store(store.home)))
        except BaseException as e:  # noqa: BLE001 - the test looks at what ended it
            ended.append(e)

    t = threading.Thread(target=audit, daemon=True)
    t.start()
    deadline = time.time() + 120
    while time.time() < deadline and not any(r.status == "running" and (r.progress or {}).get("phase") == "train"
                                             for r in store.list_runs()):
        time.sleep(0.1)
    (rec,) = store.list_runs()
    assert store.request_cancel(rec.id) == "running"
    t.join(60)
    assert not t.is_alive() and isinstance(ended[0], TrainingCancelled)
    rec = store.get(rec.id)
    assert rec.status == "cancelled" and (rec.progress or {}).get("epoch", 0) < 5000
    assert load_privacy_audit(store, cfg) is None


@needs_shared
def test_numbers_identical_to_the_audit_before_it_was_a_run(shared_data, one_torch_thread, tmp_path):
    """Pins written by ``generate.py`` with the code at commit 65f0a2f (``run_audit``, its own
    training loop): same draw, same training, same scores, same bound, bit for bit."""
    pins = json.loads((PINS / "pins.json").read_text())
    store = Store(tmp_path / "home")
    for name in ("gain_clean", "m_removed"):
        p = pins[name]
        d = dict(p["config"], experiment=dict(p["config"]["experiment"], data_dir=str(shared_data)))
        cfg = PrivacyAuditConfig.from_dict(d)
        assert cfg.key() == p["audit_key"]  # the name the old code saved it under
        res = run_privacy_audit(cfg, store=store)
        for k in ("scores", "is_in", "indices", "labels", "feature_names", "test_accuracy", "epochs_trained",
                  "n_train"):
            assert getattr(res, k) == p[k], (name, k)
        assert res.bound.to_dict() == p["bound"]


def test_audit_saved_as_a_file_before_still_opens(tmp_path):
    saved = json.loads((PINS / "saved_audit_gain.json").read_text())
    store = Store(tmp_path / "home")
    cfg = PrivacyAuditConfig.from_dict(saved["config"])
    folder = legacy_audit_dir(store.home)
    folder.mkdir(parents=True)
    shutil.copy(PINS / "saved_audit_gain.json", folder / f"{cfg.key()}.json")
    res = load_privacy_audit(store, cfg)
    assert res is not None and res.run_id is None
    assert res.scores == saved["scores"] and res.epsilon == saved["epsilon_lower_bound"]
    assert res.bound.to_dict() == saved["bound"] and res.auc == saved["auc"]
    assert any("earlier ufm" in n for n in res.notes)
    assert [a.config.key() for a in list_privacy_audits(store)] == [cfg.key()]
    attach_study_audits(store.home, "old study", [("none", cfg)])
    table = study_audit_table(store, "old study")
    assert table["audits_done"].tolist() == [1] and table["eps_lower_bound"].tolist() == [saved["epsilon_lower_bound"]]


# ----------------------------------------------------------------------------- dashboard

def _wait(store, run_id: str, statuses=("done", "failed", "cancelled"), timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline and store.get(run_id).status not in statuses:
        time.sleep(0.5)
    return store.get(run_id)


def test_audit_page_trains_a_run_shown_on_the_runs_page(app_env):
    from dashboard import privacy_ui, state
    from tests.test_app import _app

    at = _app().switch_page("app_pages/privacy.py").run()
    assert not at.exception
    assert any("No audit yet" in i.value for i in at.info)
    at.number_input(key="pa_m").set_value(20)
    at.number_input(key="pa_size").set_value(3)
    at.button(key="FormSubmitter:pa_form-Audit privacy").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    run_id = at.session_state[privacy_ui.AUDIT]
    assert state.store().get(run_id).is_privacy_audit
    assert _wait(state.store(), run_id).status == "done"
    at.run()
    assert not at.exception
    assert any(m.label == "epsilon lower bound (95%)" for m in at.metric)
    fresh = _app().switch_page("app_pages/privacy.py").run()  # a reload: a new session
    assert not fresh.exception and any(m.label == "guesses correct" for m in fresh.metric)
    runs = _app().switch_page("app_pages/runs.py").run()
    assert not runs.exception
    table = runs.dataframe[0].value
    row = table[table["id"] == run_id]
    assert row["canary"].tolist() == ["privacy audit: 20 canaries"] and row["verdict"].str.startswith("epsilon").all()
    runs.selectbox(key="runs_pick").set_value(run_id).run()
    assert not runs.exception and any(m.label == "epsilon lower bound (95%)" for m in runs.metric)


def test_audit_page_run_is_cancelled_by_ufm_runs_cancel(app_env):
    from dashboard import privacy_ui, state
    from tests.test_app import _app

    at = _app()
    at.session_state[state.SETUP] = dict(state.default_setup(), epochs=5000, patience=5000)  # still training
    at = at.switch_page("app_pages/privacy.py").run()  # when the cancel comes
    at.number_input(key="pa_m").set_value(30)
    at.number_input(key="pa_size").set_value(3)
    at.number_input(key="pa_seed").set_value(7)  # not the audit the other page test trained
    at.button(key="FormSubmitter:pa_form-Audit privacy").click().run()
    run_id = at.session_state[privacy_ui.AUDIT]
    bars = at.get("progress")  # the live view of the run's record, with its Cancel button
    assert bars and f"run {state.short(run_id)}" in bars[0].proto.text and at.button(key="pa_cancel") is not None
    # `ufm runs cancel` in its own process, as a user runs it (UFM_HOME: the dashboard's store)
    done = subprocess.run([sys.executable, "-m", "ufm", "runs", "cancel", run_id], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[1])
    assert done.returncode == 0 and run_id in done.stdout, done.stderr
    assert _wait(state.store(), run_id).status == "cancelled"
    at.run()
    assert not at.exception and not at.error
    assert any("was cancelled" in i.value for i in at.info)
    assert at.button(key="FormSubmitter:pa_form-Audit privacy") is not None


def test_audit_page_cancel_button_cancels_the_run(app_env):
    from dashboard import privacy_ui, state
    from tests.test_app import _app

    at = _app()
    at.session_state[state.SETUP] = dict(state.default_setup(), epochs=5000, patience=5000)
    at = at.switch_page("app_pages/privacy.py").run()
    at.number_input(key="pa_m").set_value(30)
    at.number_input(key="pa_size").set_value(3)
    at.number_input(key="pa_seed").set_value(8)
    at.button(key="FormSubmitter:pa_form-Audit privacy").click().run()
    run_id = at.session_state[privacy_ui.AUDIT]
    at.button(key="pa_cancel").click().run()
    assert not at.exception
    assert _wait(state.store(), run_id).status == "cancelled"


def test_compare_page_audit_column(app_env):
    from dashboard import state
    from tests.test_app import _app
    from ufm.audits.privacy_audit_store import audit_run, study_audits

    at = _app().switch_page("app_pages/compare.py").run()
    at.multiselect(key="cmp_regs").set_value(["none"])
    at.number_input(key="cmp_seeds").set_value(1)
    at.text_input(key="cmp_name").set_value("audited study")
    at.checkbox(key="cmp_audit").check()
    at.number_input(key="cmp_audit_m").set_value(10)
    at.button(key="FormSubmitter:cmp_form-Run the comparison").click().run()
    assert not at.exception
    audits = study_audits(state.store().home, "audited study")
    assert len(audits) == 1 and audits[0][1].canaries == 10
    rec = audit_run(state.store(), audits[0][1])
    assert rec is not None and rec.is_privacy_audit  # the audit is a run too
    assert _wait(state.store(), rec.id).status == "done", [(r.id, r.status, r.error, r.progress, r.summary and r.summary.get("kind")) for r in state.store().list_runs()]
    table = study_audit_table(state.store(), "audited study")
    assert table["audits_done"].tolist() == [1] and table["eps_lower_bound"].notna().all()
    at.selectbox(key="cmp_study").set_value("audited study")
    at.run()
    assert not at.exception
    assert any("eps_lower_bound" in df.value.columns for df in at.dataframe)


def test_compare_without_audit_keeps_its_columns(app_env):
    from dashboard.compare_ui import with_audits
    import pandas as pd

    agg = pd.DataFrame({"group": ["none"], "mean_M": [0.1]})
    out, cols = with_audits("never audited", agg)
    assert cols == [] and out.equals(agg)
