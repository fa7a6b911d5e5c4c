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
from ufm.canary import CanaryChoice
from ufm.experiment import run_experiment
from ufm.reference import (DEFAULT_REFERENCES, bank_configs, bank_key, bank_status, cancel_unneeded_bank,
                           reference_bank_of)
from ufm.store import BACKGROUND, FOREGROUND, SCHEMA_VERSION, Store
from ufm.store.database import APPLICATION_ID, MIGRATIONS
from ufm.verdict import DID_NOT_LEARN, Verdict, after_run, decide, stored_verdict

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_reference_bank_of_agrees_with_bank_key(tiny_data):
    cfg = tiny_config(tiny_data, regularisers=("dropout",))
    for ref in bank_configs(cfg, 19)[:3]:
        assert reference_bank_of(json.loads(ref.to_json())) == bank_key(cfg)
    assert reference_bank_of(json.loads(cfg.to_json())) is None  # a canary run
    clean = cfg.replace(canary=CanaryChoice("none", ()))  # a user's clean control is not a reference model
    assert reference_bank_of(json.loads(clean.to_json())) is None


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
    from ufm.jobs import measure

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
    from ufm.jobs import Runner

    cfg = tiny_config(tiny_data)
    with Store(tmp_path / "home") as s:
        runner = Runner(s)
        try:
            mine = s.create_run(cfg)  # parked: no worker takes runs created on the store directly
            bank = [s.create_run(c, priority=BACKGROUND) for c in bank_configs(cfg, 19)[:2]]
            other = s.create_run(cfg.replace(seed=9))  # another run of the same setting, still queued
            runner.cancel(mine)
            assert cancel_unneeded_bank(runner, cfg, except_run=mine) == []  # `other` still needs it
            assert {s.get(b).status for b in bank} == {"queued"}
            runner.cancel(other)
            assert sorted(cancel_unneeded_bank(runner, cfg, except_run=other)) == sorted(bank)
            assert {s.get(b).status for b in bank} == {"cancelled"}
            unrelated = [s.create_run(c, priority=BACKGROUND)
                         for c in bank_configs(cfg.replace(regularisers=("dropout",)), 19)[:1]]
            assert cancel_unneeded_bank(runner, cfg) == [] and s.get(unrelated[0]).status == "queued"
        finally:
            runner.shutdown()
