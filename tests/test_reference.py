"""Reference models: the calibrated verdict's bank, its seeds, its scores and the rank test."""

from __future__ import annotations

import stat

import numpy as np
import pytest

from tests.conftest import tiny_config
from ufm.core.canary import CanaryChoice
from ufm.core.features import glyph
from ufm.measure.bank import (DEFAULT_REFERENCES, REFERENCE_SEED_BASE, SCORES_FILE, ReferenceTest, bank_config,
                           bank_configs, bank_key, bank_status, check_references, rank_test,
                           reference_scores, reference_seeds, reference_test)
from ufm.measure.verdict import decide
from ufm.runs.banks import build_bank


def test_reference_seeds_skip_the_canary_runs_seed(tiny_data):
    cfg = tiny_config(tiny_data, seed=REFERENCE_SEED_BASE + 3)
    seeds = reference_seeds(cfg, 19)
    assert len(seeds) == len(set(seeds)) == 19
    assert cfg.seed not in seeds
    assert seeds == [REFERENCE_SEED_BASE + i for i in range(20) if i != 3]
    assert len(reference_seeds(tiny_config(tiny_data), DEFAULT_REFERENCES)) == DEFAULT_REFERENCES


@pytest.mark.parametrize("bad", [0, 5, 18, 201])
def test_too_few_or_too_many_references_are_refused(bad):
    with pytest.raises(ValueError, match="between 19 and"):
        check_references(bad)


def test_one_bank_serves_every_feature_and_scoring_choice(tiny_data):
    a = tiny_config(tiny_data)
    b = a.replace(feature=glyph("X", size=3, offset=(2, 2)), candidates=17, ood_size=12, repeats=2, seed=7,
                  canary=CanaryChoice("index", (5,)))
    assert bank_key(a) == bank_key(b)
    assert bank_configs(a, 19)[1] == bank_configs(b, 19)[1]  # neither seed is in the reference range
    assert bank_key(a) != bank_key(a.replace(regularisers=("dropout",)))
    assert bank_key(a) != bank_key(a.replace(train_size=100))
    ref = bank_config(b, 123)
    assert ref.canary.mode == "none" and ref.seed == 123
    assert (ref.epochs, ref.lr, ref.batch_size, ref.dataset) == (b.epochs, b.lr, b.batch_size, b.dataset)


def test_rank_test_counts_ties_against_memorisation():
    above = rank_test(1.0, np.array([0.1] * 24))
    assert (above.rank, above.p_value, above.memorised) == (1, 1 / 25, True)
    tie = rank_test(0.5, np.array([0.5] + [0.1] * 23))
    assert (tie.rank, tie.memorised) == (2, False)
    below = rank_test(-1.0, np.linspace(0, 1, 24))
    assert below.p_value == 1.0 and not below.memorised
    assert ReferenceTest.from_dict(above.to_dict()) == above


@pytest.mark.usefixtures("one_torch_thread")
def test_bank_scores_equal_the_canary_runs_own_computation(tiny_data, tmp_path):
    """A reference model's M for a feature is computed exactly as a run's own M (same images,
    same random features): scoring the canary model itself through the bank path gives its M."""
    from ufm.runs.jobs import measure
    from ufm.runs.store import Store

    store = Store(tmp_path / "home")
    cfg = tiny_config(tiny_data, seed=3)
    assert reference_test(store, cfg, 0.0, 19) is None  # no bank yet
    ids = build_bank(store, cfg, 19)
    assert len(ids) == 19 and bank_status(store, cfg, 19).complete
    run_id, result, _ = measure(store, cfg)
    own = reference_scores(store, cfg, [run_id])
    assert own[0] == result.score.M  # bit-identical: one code path
    test = reference_test(store, cfg, result.score.M, 19)
    assert test is not None and test.references == 19 and test.run_ids == tuple(ids)
    cache = store.run_dir(ids[0]) / SCORES_FILE
    assert cache.is_file() and stat.S_IMODE(cache.stat().st_mode) == 0o600
    again = reference_scores(store, cfg, ids)  # from the cache
    assert np.array_equal(again, np.asarray(test.reference_M))


def test_verdict_precedence():
    summary = {"status": "memorised", "significant": True, "verdict": "fast says so.", "exposure_p_value": 0.01,
               "learned": True, "feature_kind": "glyph", "family": "strokes"}
    fast = decide(summary, None, arch="mlp")
    assert fast.provisional and fast.status == "memorised" and "needs reference models" in fast.text
    assert fast.headline == "Memorised (provisional)"
    ref = decide(summary, rank_test(0.0, np.linspace(0.1, 1, 24)), arch="mlp")
    assert ref.test == "reference" and ref.status == "not_shown" and not ref.provisional
    dead = decide(dict(summary, learned=False, learned_note="the model did not learn: accuracy 10%"), None)
    assert dead.status == "inconclusive" and dead.headline == "Inconclusive: did not learn" and "10%" in dead.text
    old = decide({"significant": False, "verdict": "old text", "exposure_p_value": 0.3})
    assert old.status == "not_shown" and "uncalibrated" in old.calibration
