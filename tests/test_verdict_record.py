"""Issue 17: one verdict record per run (stored, updated when the bank completes, read by every
surface) and a fair queue (the user's runs before background reference models)."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_config
from ufm.core.canary import CanaryChoice
from ufm.core.experiment import run_experiment
from ufm.measure.bank import (DEFAULT_REFERENCES, REFERENCE_SEED_BASE, bank_config, bank_configs, bank_key, bank_status, cancel_unneeded_bank,
                           reference_bank_of)
from ufm.runs.store import BACKGROUND, FOREGROUND, SCHEMA_VERSION, Store
from ufm.runs.store.database import APPLICATION_ID, MIGRATIONS
from ufm.measure.verdict import DID_NOT_LEARN, Verdict, after_run, decide, stored_verdict

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_reference_bank_of_agrees_with_bank_key(tiny_data):
    cfg = tiny_config(tiny_data, regularisers=("dropout",))
    for ref in bank_configs(cfg, 19)[:3]:
        assert reference_bank_of(json.loads(ref.to_json())) == bank_key(cfg)
    assert reference_bank_of(json.loads(cfg.to_json())) is None  # a canary run
    clean = cfg.replace(canary=CanaryChoice("none", ()))  # a user's clean control is not a reference model
    assert reference_bank_of(json.loads(clean.to_json())) is None


def test_stored_bank_key_agrees_with_bank_key(tiny_data):
    """The torch-free key `ufm runs list` works out from a stored config is the config class's."""
    from ufm.core.dp import DPConfig
    from ufm.measure.bank_keys import stored_bank_key

    for cfg in (tiny_config(tiny_data), tiny_config(tiny_data, regularisers=("dropout", "weight-decay"), seed=7),
                tiny_config(tiny_data, canary=CanaryChoice("random", count=3), ood_size=12, repeats=2),
                tiny_config(tiny_data, regularisers=("dp-sgd",), dp=DPConfig(noise_multiplier=2.0)),
                tiny_config(tiny_data, canary=CanaryChoice("class", count=2, label=1), random_kind="uniform")):
        assert stored_bank_key(cfg.key(), json.loads(cfg.to_json())) == bank_key(cfg)
    old = json.loads(cfg.to_json())
    del old["dropout"]  # an older ufm's config: its stored key is not this ufm's; the class must work it out
    assert stored_bank_key(cfg.key(), old) is None


def _v3_store(home: Path, rows: list[tuple[str, str]]) -> None:
    """A store as ufm with schema 3 left it, holding ``rows`` (id, config JSON) queued."""
    home.mkdir(parents=True)
    (home / "runs").mkdir()
    conn = sqlite3.connect(home / "ufm.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN")
    for migrate in MIGRATIONS[:3]:
        migrate(conn)
    conn.execute("PRAGMA user_version = 3")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    for run_id, cfg_json in rows:
        conn.execute("INSERT INTO runs (id, created, status, config_json, config_key, code_version) "
                     "VALUES (?, ?, 'done', ?, 'k', '0')", (run_id, time.time(), cfg_json))
    conn.execute("COMMIT")
    conn.close()


def test_an_old_store_migrates_on_open_and_its_reference_models_are_marked(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data)
    ref = bank_configs(cfg, 19)[0]
    _v3_store(tmp_path / "home", [("aaaaaaaaaaaa", cfg.to_json()), ("bbbbbbbbbbbb", ref.to_json())])
    with Store(tmp_path / "home", recover=False) as s:
        assert s.schema_version == SCHEMA_VERSION == 4
        user, bank = s.get("aaaaaaaaaaaa"), s.get("bbbbbbbbbbbb")
        assert (user.bank, user.priority, user.verdict) == (None, FOREGROUND, None) and not user.is_reference
        assert (bank.bank, bank.priority) == (bank_key(cfg), BACKGROUND) and bank.is_reference


def test_queue_order_is_priority_then_submission(tiny_data, tmp_path):
    with Store(tmp_path / "home") as s:
        bank = [s.create_run(c, priority=BACKGROUND) for c in bank_configs(tiny_config(tiny_data), 19)[:3]]
        mine = s.create_run(tiny_config(tiny_data, seed=1))
        later = s.create_run(tiny_config(tiny_data, seed=2))
        assert s.queue_ahead(mine) == []  # submitted after the bank, starts before it
        assert [r.id for r in s.queue_ahead(later)] == [mine]
        assert [r.id for r in s.queue_ahead(bank[2])] == [mine, later, bank[0], bank[1]]
        assert s.get(bank[0]).is_reference and not s.get(mine).is_reference
        s.mark_cancelled(mine)
        assert s.queue_ahead(later) == [] and s.queue_ahead(mine) == []


@pytest.fixture(scope="module")
def clean_result(tmp_path_factory):
    """One trained clean model of the tiny setting (copied below as every reference model of a bank)."""
    from tests.conftest import blob_images, write_split

    root = tmp_path_factory.mktemp("cleandata")
    rng = np.random.default_rng(0)
    write_split(root / "tiny", *blob_images(rng, 300, 12), "train")
    write_split(root / "tiny", *blob_images(rng, 120, 12), "test")
    write_split(root / "noise", rng.integers(0, 255, (60, 12, 12)).astype(np.uint8), rng.integers(0, 3, 60), "test")
    write_split(root / "noise", rng.integers(0, 255, (60, 12, 12)).astype(np.uint8), rng.integers(0, 3, 60), "train")
    data = {"train": root / "tiny", "ood": root / "noise"}
    base = tiny_config(data)
    return data, run_experiment(bank_configs(base, DEFAULT_REFERENCES)[0])


def fill_bank(store: Store, config, clean, n: int | None = None) -> list[str]:
    """Record the bank of ``config`` as finished (the first ``n`` of its reference models): every
    one is the same trained clean model, recorded under its own reference config. Training 39
    models would take minutes; the verdict only needs their stored weights."""
    cfgs = bank_configs(config, DEFAULT_REFERENCES)[:n]
    return [store.add_result(dataclasses.replace(clean, config=c)) for c in cfgs]


def test_the_verdict_is_stored_and_turns_calibrated_when_the_bank_completes(clean_result, tmp_path):
    from ufm.runs.jobs import measure

    data, clean = clean_result
    with Store(tmp_path / "home") as s:
        run_id, _, _ = measure(s, tiny_config(data, seed=3))
        rec = s.get(run_id)
        assert rec.verdict is not None and rec.verdict["test"] == "fast"  # stored when the run finished
        first = Verdict.from_dict(rec.verdict)
        assert first.provisional and stored_verdict(s, rec) == first  # bank incomplete: read as stored
        ids = fill_bank(s, rec.config, clean)
        assert bank_status(s, rec.config).complete
        assert s.get(run_id).verdict["test"] == "fast"  # add_result does not update it ...
        assert after_run(s, ids[-1]) == [run_id]  # ... the worker's hook for the last reference model does
        v = Verdict.from_dict(s.get(run_id).verdict)
        assert v.test == "reference" and v.final and v.p_value is not None
        assert stored_verdict(s, s.get(run_id)) == v
        # a store that missed the hook (a killed process): the first read brings it up to date
        s.set_verdict(run_id, first.to_dict())
        assert stored_verdict(s, s.get(run_id)) == v and s.get(run_id).verdict["test"] == "reference"


def test_a_model_that_did_not_learn_says_so_in_its_headline_once():
    summary = {"status": "not_shown", "verdict": "No evidence ...", "exposure_p_value": 0.4, "learned": False,
               "learned_note": "the model did not learn: test accuracy 50.0% is not clearly above the 50.0% of always "
                               "answering the most common class"}
    v = decide(summary)
    assert v.headline == DID_NOT_LEARN == "Inconclusive: did not learn" and v.final and not v.provisional
    assert v.sentence.count("Inconclusive") == 1 and "Inconclusive. Inconclusive" not in v.sentence
    assert v.sentence.startswith("Inconclusive: did not learn. The model's test accuracy 50.0%")
    assert Verdict.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    fast_inconclusive = decide({"status": "inconclusive", "verdict": "No verdict from the fast exposure test: why",
                                "learned": True})
    assert fast_inconclusive.sentence == "Inconclusive. No verdict from the fast exposure test: why"


def test_cancelling_a_run_cancels_its_bank_unless_another_run_needs_it(tiny_data, tmp_path):
    from ufm.runs.jobs import Runner

    cfg = tiny_config(tiny_data)
    with Store(tmp_path / "home") as s:
        runner = Runner(s)
        try:
            mine = s.create_run(cfg)  # parked: no worker takes runs created on the store directly
            bank = [s.create_run(c, priority=BACKGROUND) for c in bank_configs(cfg, 19)[:2]]
            other = s.create_run(cfg.replace(seed=9))  # another run of the same setting, still queued
            runner.cancel(mine)
            assert cancel_unneeded_bank(s, cfg, except_run=mine, cancel=runner.cancel) == []  # `other` needs it
            assert {s.get(b).status for b in bank} == {"queued"}
            runner.cancel(other)
            assert sorted(cancel_unneeded_bank(s, cfg, except_run=other, cancel=runner.cancel)) == sorted(bank)
            assert {s.get(b).status for b in bank} == {"cancelled"}
            unrelated = [s.create_run(c, priority=BACKGROUND)
                         for c in bank_configs(cfg.replace(regularisers=("dropout",)), 19)[:1]]
            assert cancel_unneeded_bank(s, cfg) == [] and s.get(unrelated[0]).status == "queued"
        finally:
            runner.shutdown()


def _surfaces(store: Store, home: Path, run_id: str, capsys) -> dict[str, str]:
    """What each surface prints for run ``run_id``: ``ufm runs show``, ``ufm runs list``, the HTML
    and CSV exports, and a Compare table (a study holding the run)."""
    import html
    import io

    import pandas as pd

    from ufm.cli import main
    from ufm.reports.run_report import run_html, run_json, runs_csv
    from ufm.runs.studies import StudyMember, attach_run, create_study, runs_frame

    h = ["--home", str(home)]
    capsys.readouterr()
    assert main(["runs", "show", run_id, *h]) == 0
    show = capsys.readouterr().out
    assert main(["runs", "list", *h]) == 0
    listed = capsys.readouterr().out
    row = pd.read_csv(io.StringIO(runs_csv(store))).set_index("id").loc[run_id]
    rec = store.get(run_id)
    name = f"study of {run_id}"
    create_study(store, name, "custom", rec.config, [StudyMember("g", rec.config)], replace=True)
    attach_run(store, name, 0, run_id)
    frame = runs_frame(store, name).iloc[0]
    return {"show": show, "list": listed, "html": html.unescape(run_html(store, run_id)),
            "json": json.loads(run_json(store, run_id))["run"]["verdict"]["sentence"],
            "csv_text": row["verdict_text"], "csv_headline": row["verdict"], "csv_p": row["verdict_p"],
            "compare_text": frame["verdict_text"], "compare_p": frame["verdict_p_text"],
            "compare_headline": frame["verdict_headline"]}


def _same_everywhere(v: Verdict, s: dict) -> None:
    assert v.sentence in s["show"] and f"{v.p_label} = {v.p_text}" in s["show"]
    assert v.headline in s["list"]
    assert v.sentence in s["html"] and f"<th>{v.p_label}</th><td>{v.p_text}</td>" in s["html"]
    assert s["json"] == s["csv_text"] == s["compare_text"] == v.sentence
    assert s["csv_headline"] == s["compare_headline"] == v.headline
    assert s["compare_p"] == v.p_text
    if v.p_value is None:
        assert np.isnan(s["csv_p"])
    else:
        assert f"{s['csv_p']:.3g}" == v.p_text
    # the paper's t-test is never called significant
    assert "significant" not in s["show"] and "the paper's statistics (never decide): t-test p" in s["show"]


def test_the_same_verdict_text_and_p_on_every_surface(clean_result, tmp_path, capsys):
    from ufm.runs.jobs import measure

    data, clean = clean_result
    home = tmp_path / "home"
    with Store(home) as s:
        run_id, _, _ = measure(s, tiny_config(data, seed=5))
        provisional = Verdict.from_dict(s.get(run_id).verdict)
        assert provisional.provisional
        _same_everywhere(provisional, _surfaces(s, home, run_id, capsys))
        ids = fill_bank(s, s.get(run_id).config, clean)
        after_run(s, ids[-1])
        calibrated = Verdict.from_dict(s.get(run_id).verdict)
        assert calibrated.test == "reference" and calibrated != provisional
        surfaces = _surfaces(s, home, run_id, capsys)
        _same_everywhere(calibrated, surfaces)
        assert "calibrated p (reference models) = " in surfaces["show"]
        # `ufm runs list` hides the 39 reference models and summarises their bank in one line
        assert run_id in surfaces["list"] and not any(i in surfaces["list"] for i in ids)
        assert "bank " in surfaces["list"] and "39 done" in surfaces["list"]
        capsys.readouterr()
        from ufm.cli import main
        assert main(["runs", "list", "--all", "--home", str(home)]) == 0
        out = capsys.readouterr().out
        assert all(i in out for i in ids)


def test_a_model_that_did_not_learn_is_inconclusive_on_every_surface(clean_result, tmp_path, capsys):
    data, clean = clean_result
    home = tmp_path / "home"
    dead = dataclasses.replace(clean, config=tiny_config(data, seed=6), learned=False, epsilon=31.1,
                               learned_note="the model did not learn: test accuracy 33.3% is not clearly above the "
                                            "33.3% of always answering the most common class")
    with Store(home) as s:
        run_id = s.add_result(dead)  # recorded by an older path: no verdict stored yet; the first read stores it
        assert s.get(run_id).verdict is None
        surfaces = _surfaces(s, home, run_id, capsys)
        v = Verdict.from_dict(s.get(run_id).verdict)
        assert v.headline == "Inconclusive: did not learn" and v.p_value is None
        _same_everywhere(v, surfaces)
        assert "No evidence of memorisation" not in surfaces["show"]
        # `ufm runs list` marks it and shows the epsilon DP-SGD spent, as every table does
        head, row = [line for line in surfaces["list"].splitlines() if line.startswith(("id ", run_id))]
        assert "eps spent" in head and "31.1" in row and "Inconclusive: did not learn" in row
        assert "Inconclusive. Inconclusive" not in surfaces["show"] + surfaces["html"]


def test_a_user_run_submitted_after_a_queued_bank_starts_first(tiny_data, tmp_path):
    """One slot, busy; then two background reference models, then the user's run: the user's run
    starts next. A reference model the user asks for in the foreground moves up. Start after
    Cancel queues a new run instead of showing the cancelled one."""
    from ufm.runs.jobs import Runner, queue_estimate

    cfg = tiny_config(tiny_data)
    with Store(tmp_path / "home") as s, Runner(s, progress_interval=0.0) as runner:
        long = cfg.replace(epochs=100000, patience=100000, seed=1)
        blocker = runner.submit(long)
        deadline = time.monotonic() + 60
        while s.get(blocker).status != "running":
            assert time.monotonic() < deadline, s.get(blocker)
            time.sleep(0.05)
        bank = [runner.submit(c, priority=BACKGROUND) for c in bank_configs(cfg, 19)[:2]]
        mine = runner.submit(cfg.replace(seed=2))
        assert runner.in_flight(long) == blocker and runner.in_flight(cfg.replace(seed=2)) == mine
        assert runner.in_flight(cfg.replace(seed=99)) is None
        est = queue_estimate(s, mine)
        assert (est.position, est.background_ahead, est.running) == (1, 0, 1)
        assert "next in the queue" in est.text() and "1 run is training now" in est.text()
        assert queue_estimate(s, bank[1]).position == 3
        assert runner.submit(bank_configs(cfg, 19)[1]) == bank[1]  # asked for in the foreground: moves up
        assert s.get(bank[1]).priority == FOREGROUND and queue_estimate(s, bank[1]).position == 1  # queued first
        assert queue_estimate(s, mine).position == 2 and queue_estimate(s, bank[0]).position == 3

        again = cfg.replace(seed=3)
        cancelled = runner.submit(again)
        runner.cancel(cancelled)
        assert runner.in_flight(again) is None  # a cancelled run never disables Start
        restarted = runner.submit(again)  # Start after Cancel
        assert restarted != cancelled and s.get(restarted).status == "queued"

        runner.cancel(blocker)  # running: it stops within seconds; Start at once must not get it back
        assert (again_long := runner.submit(long)) != blocker
        runner.cancel(again_long)
        for r in (mine, *bank, restarted):
            assert runner.wait(r, timeout=240).status == "done", s.get(r)
        assert runner.in_flight(cfg.replace(seed=2)) is None  # finished: nothing in flight
        started = {r: s.get(r).started for r in (mine, *bank, restarted)}
        assert started[bank[1]] < started[mine] < started[restarted] < started[bank[0]]
        assert s.get(cancelled).status == "cancelled"


def test_queue_estimate_sums_typical_durations_of_the_runs_ahead(clean_result, tmp_path):
    from ufm.runs.jobs import queue_estimate

    data, clean = clean_result
    with Store(tmp_path / "home") as s:
        for seed, seconds in ((10, 100.0), (11, 300.0), (12, 200.0)):  # median 200 s for this setting
            rid = s.add_result(dataclasses.replace(clean, config=tiny_config(data, seed=seed)))
            s._update("UPDATE runs SET started = ?, finished = ? WHERE id = ?", (1000.0, 1000.0 + seconds, rid))
        running = s.create_run(tiny_config(data, seed=20), status="running")
        s._update("UPDATE runs SET started = ? WHERE id = ?", (time.time() - 50, running))
        for i in range(2):  # two queued runs ahead
            s.create_run(tiny_config(data, seed=21 + i))
        mine = s.create_run(tiny_config(data, seed=30))
        est = queue_estimate(s, mine)
        assert (est.position, est.ahead, est.running) == (3, 2, 1)
        assert est.seconds == pytest.approx(2 * 200 + 150, abs=2)  # two typical runs + the rest of the running one
        assert "same settings" in est.basis and "about 9 min" in est.text()
        assert queue_estimate(s, mine, slots=2).seconds == pytest.approx(est.seconds / 2, abs=1)
        assert queue_estimate(s, running) is None


def test_ufm_runs_cancel_also_cancels_the_bank_queued_for_the_run(tiny_data, tmp_path, capsys):
    from ufm.cli import main

    cfg = tiny_config(tiny_data, seed=4)
    with Store(tmp_path / "home") as s:
        mine = s.create_run(cfg)
        bank = [s.create_run(c, priority=BACKGROUND) for c in bank_configs(cfg, 19)[:2]]
    capsys.readouterr()
    assert main(["runs", "cancel", mine, "--home", str(tmp_path / "home")]) == 0
    assert "also cancelled the 2 unfinished reference models" in capsys.readouterr().out
    with Store(tmp_path / "home") as s:
        assert [s.get(r).status for r in (mine, *bank)] == ["cancelled"] * 3


def test_a_reference_model_is_never_scored_against_its_own_bank(clean_result, tmp_path, monkeypatch):
    """Listing runs must stay cheap: a reference model's verdict is its fast test, stored once."""
    import ufm.measure.bank

    data, clean = clean_result
    with Store(tmp_path / "home") as s:
        cfg = tiny_config(data)
        ids = fill_bank(s, cfg, clean)
        # one more: now the first reference model (seed BASE) has 39 others, a complete "bank" of its own
        s.add_result(dataclasses.replace(clean, config=bank_config(cfg, REFERENCE_SEED_BASE + DEFAULT_REFERENCES)))
        assert bank_status(s, s.get(ids[0]).config).complete
        monkeypatch.setattr(ufm.measure.bank, "reference_scores", lambda *a, **k: pytest.fail("scored a bank"))
        for rid in ids[:3]:
            v = stored_verdict(s, s.get(rid))
            assert v.test in ("fast", "none") and s.get(rid).verdict == v.to_dict()


def test_an_audit_verdict_never_repeats_its_headline():
    from ufm.audits.model_audit import _decide

    dead = _decide(None, None, None, False, "the model did not learn: test accuracy 10.0% is at chance")
    assert dead.sentence == ("Inconclusive: did not learn. The model did not learn: test accuracy 10.0% is at chance. "
                             "A model that did not learn says nothing about memorisation either way.")
    odd = _decide(None, None, "the fast test is miscalibrated here", True, "")
    assert odd.sentence.startswith("Inconclusive. The fast test is miscalibrated here.")
    assert Verdict.from_dict(json.loads(json.dumps(dead.to_dict()))) == dead


def test_no_export_or_cli_table_calls_anything_significant(clean_result, tmp_path, capsys):
    """The paper's t-test is "the paper's statistic", never "significant": not in `ufm runs show/list`
    (text or JSON), the run's JSON/HTML export, the runs CSV, nor a study's `show`, CSV, JSON and
    HTML. The fast test's fields in a JSON export are named as the fast test's, beside the verdict
    record; an older store's summary key `significant_ttest` is exported under the t-test's name."""
    import html

    from ufm.cli import main
    from ufm.reports.run_report import run_html, run_json, runs_csv
    from ufm.runs.jobs import measure
    from ufm.runs.studies import StudyMember, attach_run, create_study

    data, _ = clean_result
    home = tmp_path / "home"
    h = ["--home", str(home)]
    with Store(home) as s:
        run_id, _, _ = measure(s, tiny_config(data, seed=8))
        rec = s.get(run_id)
        create_study(s, "sig", "custom", rec.config, [StudyMember("g", rec.config)])
        attach_run(s, "sig", 0, run_id)
        texts = {"json": run_json(s, run_id), "html": html.unescape(run_html(s, run_id)), "csv": runs_csv(s)}
        exported = json.loads(texts["json"])
        assert "fast_test_verdict" in exported["result"] and "fast_test_memorised" in exported["result"]["score"]
        assert exported["run"]["summary"]["paper_ttest_p_below_alpha"] in (True, False)
        s._update("UPDATE runs SET summary_json = ? WHERE id = ?",  # as an older ufm stored it
                  (json.dumps({**rec.summary, "significant_ttest": True}), run_id))
        old = json.loads(run_json(s, run_id))["run"]["summary"]
        assert old["paper_ttest_p_below_alpha"] is True and "significant_ttest" not in old
    capsys.readouterr()
    for argv in (["runs", "show", run_id], ["runs", "show", run_id, "--json"], ["runs", "list"],
                 ["runs", "list", "--json"], ["runs", "list", "--csv"], ["studies", "show", "sig"],
                 ["studies", "show", "sig", "--json"]):
        assert main([*argv, *h]) == 0
        texts[" ".join(argv)] = capsys.readouterr().out
    for fmt in ("csv", "json", "html"):
        out = tmp_path / f"study.{fmt}"
        assert main(["studies", "export", "sig", "--format", fmt, "--out", str(out), *h]) == 0
        texts[f"study {fmt}"] = html.unescape(out.read_text())
    for where, text in texts.items():
        assert "significant" not in text.lower(), where
    assert "ttest_p_paper" in texts["study csv"] and "memorised" in texts["study csv"]
    assert "share_memorised" in texts["studies show sig"]
