"""Studies: expanding a base config, storing, running and aggregating (t-intervals against scipy)."""

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from ufm.core.canary import CanaryChoice
from ufm.core.experiment import ExperimentConfig
from ufm.runs.jobs import Runner
from ufm.runs.store import Store
from ufm.runs.studies import (StudyNotFound, aggregate, create_study, delete_study, expand, get_study, list_studies,
                         run_study, runs_frame, submit_study, summary, t_interval)

from .conftest import tiny_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tiny_data, **kw) -> ExperimentConfig:
    return tiny_config(tiny_data, **kw)


# ---------------------------------------------------------------------------------- expanding

def test_regulariser_study_varies_only_regularisers_and_seeds():
    base = ExperimentConfig(train_size=500, seed=9, regularisers=("augment",))
    members = expand("regularisers", base, regularisers=["none", "dropout", "dropout+augment", ("dp-sgd",)],
                     seeds=[0, 1])
    assert [m.group for m in members] == ["none"] * 2 + ["dropout"] * 2 + ["augment+dropout"] * 2 + ["dp-sgd"] * 2
    assert [m.config.seed for m in members] == [0, 1] * 4
    assert members[0].config.regularisers == () and members[4].config.regularisers == ("augment", "dropout")
    for m in members:
        assert m.config.replace(regularisers=(), seed=0, dp=base.dp) == base.replace(regularisers=(), seed=0)
    # dp-sgd members get the shared default DP settings (not DPConfig()'s noise multiplier 1.0)
    from ufm.core.train import DEFAULT_DP, NEUTRAL_DP
    assert members[6].config.dp == DEFAULT_DP and members[0].config.dp == NEUTRAL_DP


def test_canary_and_seed_studies():
    base = ExperimentConfig(train_size=500)
    canaries = [CanaryChoice("none", ()), CanaryChoice("index", (3,)), CanaryChoice("class", (), count=10, label=2)]
    members = expand("canaries", base, canaries=canaries, seeds=[5])
    assert [m.group for m in members] == ["no canary (clean control)", "canary at index 3", "10 canaries of class 2"]
    assert [m.config.canary for m in members] == canaries
    seeds = expand("seeds", base, seeds=[0, 1, 2])
    assert {m.group for m in seeds} == {"all seeds"} and [m.config.seed for m in seeds] == [0, 1, 2]


@pytest.mark.parametrize("kw, msg", [
    (dict(kind="regularisers", regularisers=["dropout", "dropout"], seeds=[0]), "listed twice"),
    (dict(kind="regularisers", regularisers=["mixup"], seeds=[0]), "unknown regulariser"),
    (dict(kind="regularisers", seeds=[0]), "needs regularisers"),
    (dict(kind="seeds", seeds=[]), "at least one seed"),
    (dict(kind="seeds", seeds=[1, 1]), "distinct"),
    (dict(kind="architectures", seeds=[0]), "unknown study kind"),
])
def test_expand_errors_say_what_to_do(kw, msg):
    kind = kw.pop("kind")
    with pytest.raises(ValueError, match=msg):
        expand(kind, ExperimentConfig(), **kw)


# ---------------------------------------------------------------------------------- statistics

def test_t_interval_matches_scipy_and_edge_cases():
    x = [0.1, 0.4, 0.35, 0.2]
    mean, lo, hi = t_interval(x)
    ref = stats.t.interval(0.95, df=3, loc=np.mean(x), scale=stats.sem(x))
    assert mean == pytest.approx(np.mean(x)) and (lo, hi) == pytest.approx(ref)
    # by hand: mean ± t_{0.975, 3} · s / √n
    half = stats.t.ppf(0.975, 3) * np.std(x, ddof=1) / 2
    assert (lo, hi) == pytest.approx((np.mean(x) - half, np.mean(x) + half))
    assert t_interval([0.3]) == (0.3, None, None)
    assert math.isnan(t_interval([])[0])
    assert t_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    assert t_interval([1.0, float("nan"), 3.0])[0] == 2.0  # unfinished runs (NaN) are left out


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=30))
def test_t_interval_contains_the_mean_and_widens_with_level(values):
    mean, lo, hi = t_interval(values)
    assert lo <= mean + 1e-9 and mean <= hi + 1e-9
    _, lo99, hi99 = t_interval(values, level=0.99)
    assert lo99 <= lo + 1e-9 and hi <= hi99 + 1e-9


def test_aggregate_known_answer():
    runs = pd.DataFrame({
        "group": ["a", "a", "a", "b", "b", "c"],
        "status": ["done", "done", "done", "done", "failed", "queued"],
        "M": [1.0, 2.0, 3.0, 0.5, np.nan, np.nan],
        "significant": [True, False, True, False, np.nan, np.nan],
        "verdict_test": ["reference", "fast", "reference", "fast", None, None],
        "test_accuracy": [0.9, 0.8, 0.7, 0.95, np.nan, np.nan],
    })
    agg = aggregate(runs).set_index("group")
    assert list(agg.index) == ["a", "b", "c"]
    a, b, c = agg.loc["a"], agg.loc["b"], agg.loc["c"]
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)  # sd of 1, 2, 3 is 1
    assert (a.mean_M, a.ci_low, a.ci_high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert a.share_significant == pytest.approx(2 / 3) and a.n_significant == 2 and a.n_calibrated == 2
    assert a.mean_test_accuracy == pytest.approx(0.8) and a.sd_M == pytest.approx(1.0)
    assert "95% t-interval over 3 seeds" == a.interval
    assert b.mean_M == 0.5 and math.isnan(b.ci_low) and b.interval.startswith("n = 1: no interval")
    assert (b.done, b.failed, b.members) == (1, 1, 2)
    assert c.done == 0 and c.pending == 1 and math.isnan(c.mean_M) and c.interval == "no finished runs yet"


# ---------------------------------------------------------------------------------- stored studies

def test_study_stored_submitted_aggregated_and_rerun(tiny_data, tmp_path):
    base = _cfg(tiny_data)
    members = expand("regularisers", base, regularisers=["none", "dropout"], seeds=[0, 1])
    with Store(tmp_path / "home") as store:
        study = create_study(store, "dropout?", "regularisers", base, members, description="does dropout help")
        assert study.groups == ["none", "dropout"] and all(e.run_id is None for e in study.entries)
        assert get_study(store, "dropout?") == study
        assert list(runs_frame(store, "dropout?")["status"]) == ["not run"] * 4
        with pytest.raises(ValueError, match="exists"):
            create_study(store, "dropout?", "regularisers", base, members)
        with pytest.raises(ValueError, match="same config"):
            create_study(store, "dup", "custom", base, [members[0], members[0]])

        with Runner(store) as runner:
            ids = submit_study(runner, "dropout?")
            recs = [runner.wait(i, timeout=120) for i in ids]
            assert [r.status for r in recs] == ["done"] * 4
            assert submit_study(runner, "dropout?") == ids  # finished members are not run again
        assert [e.run_id for e in get_study(store, "dropout?").entries] == ids

        frame = runs_frame(store, "dropout?")
        assert list(frame["seed"]) == [0, 1, 0, 1] and frame["M"].notna().all()
        agg = summary(store, "dropout?").set_index("group")
        for g in ("none", "dropout"):
            m = frame.loc[frame.group == g, "M"].to_numpy()
            ref = stats.t.interval(0.95, df=1, loc=m.mean(), scale=stats.sem(m))
            assert agg.loc[g, "mean_M"] == pytest.approx(m.mean())
            assert (agg.loc[g, "ci_low"], agg.loc[g, "ci_high"]) == pytest.approx(ref)
            assert 0 <= agg.loc[g, "share_significant"] <= 1 and 0 <= agg.loc[g, "mean_test_accuracy"] <= 1
        listed = list_studies(store)
        assert list(listed["name"]) == ["dropout?"] and listed["done"].iloc[0] == 4

        # a deleted run leaves a gap that run_study fills (in this thread)
        store.delete_run(ids[1])
        assert runs_frame(store, "dropout?")["status"].iloc[1] == "not run"
        again = run_study(store, "dropout?")
        assert again[0] == ids[0] and again[1] != ids[1] and store.get(again[1]).status == "done"

        delete_study(store, "dropout?")
        with pytest.raises(StudyNotFound, match="no study named"):
            get_study(store, "dropout?")
        assert store.get(ids[0]).status == "done"  # runs outlive their study
