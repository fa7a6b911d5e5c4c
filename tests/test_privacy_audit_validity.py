"""Validity of the privacy audit that can fail (DP-SGD models at claims the audit could exceed,
each with a planted over-count that must be caught) and the reconstruction audit end to end."""

from __future__ import annotations

import pytest

from ufm.audits.bounds import count_bound, default_grid
from ufm.audits.privacy_audit import PrivacyAuditConfig, PrivacyAuditResult, run_privacy_audit
from ufm.audits.privacy_audit_figure import audit_histogram
from ufm.audits.privacy_audit_store import load_privacy_audit

from .conftest import needs_shared, tiny_config
from .test_app import app_env  # noqa: F401 - the dashboard fixture


DP_CLAIMS = (0.5, 1.0)
DP_CANARIES = 1000


def _dp_audits(shared_data, store, target):
    """DP-SGD audits of the MLP on 1,200 MNIST images with 1,000 canaries, OUT images left out
    (the accountant's add/remove adjacency); trained once per claim (the store reuses the run)."""
    from ufm.core.experiment import ExperimentConfig
    from ufm.core.train import DPConfig

    exp = ExperimentConfig(dataset="mnist", data_dir=str(shared_data), arch="mlp", train_size=1200, epochs=2,
                           patience=2, ood_size=100, seed=0, device="cpu", lr=1e-2, regularisers=("dp-sgd",),
                           dp=DPConfig(noise_multiplier=None, target_epsilon=target))
    return run_privacy_audit(PrivacyAuditConfig(exp, canaries=DP_CANARIES, out_mode="removed"), store=store)


@pytest.fixture(scope="module")
def dp_store(tmp_path_factory):
    from ufm.runs.store import Store

    with Store(tmp_path_factory.mktemp("dp-home")) as store:
        yield store


def test_the_dp_claims_are_within_the_audits_reach():
    """The validity test below could fail: with 1,000 canaries and the Bonferroni grid, every
    analysis can reach far above the claims (all guesses of the best pair right)."""
    grid = default_grid(DP_CANARIES)
    for analysis in ("steinke", "fdp-approx", "fdp-gaussian"):
        reach = max(count_bound(DP_CANARIES, kp + km, kp + km, analysis=analysis, beta=0.05 / len(grid))
                    for kp, km in grid)
        assert reach > 4 * max(DP_CLAIMS)


@needs_shared
@pytest.mark.parametrize("target", DP_CLAIMS)
def test_dp_sgd_audit_never_exceeds_the_claim(shared_data, one_torch_thread, dp_store, target):
    """Validity: no analysis bounds a DP-SGD model above its accountant's epsilon."""
    res = _dp_audits(shared_data, dp_store, target)
    assert res.claimed_epsilon == pytest.approx(target, rel=0.05)
    assert set(res.bounds) == {"steinke", "fdp-approx", "fdp-gaussian"}
    for b in res.bounds.values():
        assert 0 <= b.epsilon <= res.claimed_epsilon, b.analysis


@needs_shared
@pytest.mark.parametrize("target", DP_CLAIMS)
def test_the_dp_check_catches_a_planted_over_count(shared_data, one_torch_thread, dp_store, target, monkeypatch):
    """The same check, on the same trained models, with a planted bug that counts one correct guess
    in four more than there were: it must fail (some analysis goes above the claim)."""
    import ufm.audits.bounds as bounds_mod

    real = bounds_mod.count_bound
    monkeypatch.setattr(bounds_mod, "count_bound", lambda m, r, v, **kw: real(m, r, min(r, v + r // 4), **kw))
    res = _dp_audits(shared_data, dp_store, target)
    assert max(b.epsilon for b in res.bounds.values()) > res.claimed_epsilon


@needs_shared
def test_dp_sgd_reconstruction_audit_never_exceeds_the_substitution_claim(shared_data, one_torch_thread, dp_store):
    """Reconstruction replaces one slot's feature by another: neighbours by substitution, for which
    an add/remove (eps, delta) claim guarantees (2 eps, (1 + e^eps) delta) (group privacy of two).
    Neither f-DP analysis bounds eps above that, at that delta; and both could (reach check)."""
    import math

    from ufm.core.experiment import ExperimentConfig
    from ufm.audits.selection import guess_count_grid
    from ufm.core.train import DPConfig

    target, m, k = 0.5, 500, 10
    exp = ExperimentConfig(dataset="mnist", data_dir=str(shared_data), arch="mlp", train_size=1200, epochs=2,
                           patience=2, ood_size=100, seed=1, device="cpu", lr=1e-2, regularisers=("dp-sgd",),
                           dp=DPConfig(noise_multiplier=None, target_epsilon=target))
    delta = (1 + math.exp(target)) * exp.dp.delta
    res = run_privacy_audit(PrivacyAuditConfig(exp, canaries=m, guess="reconstruction", choices=k, delta=delta),
                            store=dp_store)
    claim = 2 * res.claimed_epsilon
    assert set(res.bounds) == {"fdp-approx", "fdp-gaussian"} and len(res.scores) == m * k
    for b in res.bounds.values():
        assert b.choices == k and 0 <= b.epsilon <= claim, b.analysis
        assert count_bound(m, 20, 20, k=k, analysis=b.analysis, delta=delta,
                           beta=0.05 / len(guess_count_grid(m))) > 2 * claim


# ----------------------------------------------------------------------------- reconstruction

def test_reconstruction_audit_round_trips_and_keeps_membership_keys(tiny_data, one_torch_thread, tmp_path):
    from ufm.runs.store import Store

    store = Store(tmp_path / "home")
    base = PrivacyAuditConfig(tiny_config(tiny_data, epochs=3), canaries=20, feature_size=3, offset=(0, 0))
    assert "guess" not in base.to_dict() and "guess" not in base.canary_spec().to_dict()  # keys as before
    cfg = base.replace(guess="reconstruction", choices=4)
    res = run_privacy_audit(cfg, store=store)
    assert len(res.scores) == 80 and len(res.choice) == 20 and res.bound.analysis == "fdp-approx"
    assert set(res.bounds) == {"fdp-approx", "fdp-gaussian"} and all(b.choices == 4 for b in res.bounds.values())
    back = PrivacyAuditResult.from_json(res.to_json())
    assert back.to_dict() == res.to_dict() and back.guess_accuracy == res.guess_accuracy
    assert load_privacy_audit(store, cfg).to_dict() == res.to_dict()
    fig = audit_histogram(res)
    assert sum(fig.data[0].y) == 60 and sum(fig.data[1].y) == 20  # the other candidates vs the drawn ones
    with pytest.raises(ValueError, match="needs --guess reconstruction|2 choices"):
        PrivacyAuditConfig(tiny_config(tiny_data), canaries=20, choices=4)
    with pytest.raises(ValueError, match="random features, the label-gain score"):
        PrivacyAuditConfig(tiny_config(tiny_data), canaries=20, guess="reconstruction", choices=4, score="M")


def test_audit_page_reconstruction_shows_the_analyses(app_env):
    from dashboard import privacy_ui, state
    from tests.test_app import _app
    from tests.test_privacy_audit_runs import _wait

    at = _app().switch_page("app_pages/privacy.py").run()
    at.number_input(key="pa_m").set_value(20)
    at.number_input(key="pa_size").set_value(3)
    at.selectbox(key="pa_guess").set_value("reconstruction")
    at.number_input(key="pa_choices").set_value(4)
    at.button(key="FormSubmitter:pa_form-Audit privacy").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    run_id = at.session_state[privacy_ui.AUDIT]
    assert _wait(state.store(), run_id).status == "done"
    at.run()
    assert not at.exception
    assert any("Analysis used: **f-DP, (eps, delta) curve" in c.value for c in at.caption)
    table = at.dataframe[0].value
    assert len(table) == 2 and table["analysis"].str.contains("Gaussian curve").any()


def test_cli_reconstruction(tiny_data, one_torch_thread, tmp_path, capsys):
    import json

    from ufm.cli import main

    from .test_privacy_audit import _cli_args

    out = tmp_path / "rec.json"
    assert main(_cli_args(tiny_data, "--canaries", "10", "--feature-size", "3", "--guess", "reconstruction",
                          "--choices", "3", "--out", str(out))) == 0
    d = json.loads(out.read_text())
    assert d["config"]["guess"] == "reconstruction" and len(d["scores"]) == 30 and len(d["choice"]) == 10
    assert set(d["bounds"]) == {"fdp-approx", "fdp-gaussian"} and d["bound"]["analysis"] == "fdp-approx"
    assert "which of 3 candidates" in capsys.readouterr().out
    assert main(_cli_args(tiny_data, "--canaries", "10", "--choices", "3")) == 2
    assert "needs --guess reconstruction" in capsys.readouterr().err
