"""The one-run privacy audit: the bound against an independent brute-force computation, known
answers, the Bonferroni correction, the audit job (a run in the store: listed, cancellable, reused;
numbers pinned to the code before audits were runs; validity under DP-SGD, bad input), audits saved
as files by an earlier ufm, the CLI and the pages."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from tests.conftest import tiny_config
from ufm.core.features import FeatureError
from ufm.audits.bounds import audit_bound, default_grid, epsilon_lower_bound, make_guesses, p_value
from ufm.measure.stats import score_auc
from ufm.audits.privacy_audit import PrivacyAuditConfig, PrivacyAuditResult, audit_features, run_privacy_audit
from ufm.audits.privacy_audit_figure import audit_histogram
from ufm.audits.privacy_audit_store import list_privacy_audits, load_privacy_audit
from ufm.measure.access import class_gain, log_prob_gains

from .conftest import needs_shared


# ----------------------------------------------------------------------------- brute force

def _tail(r: int, k: int, q: Fraction) -> Fraction:
    """P[Binomial(r, q) >= k], exactly, by summing the terms."""
    return sum((Fraction(math.comb(r, j)) * q ** j * (1 - q) ** (r - j) for j in range(max(k, 0), r + 1)), Fraction(0))


def _brute_p(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The paper's bound written out independently: exact rationals, the max over i = 1..m taken
    directly from f(v - i) - f(v) (no running sum)."""
    q = Fraction(1) / (1 + Fraction(math.exp(-eps)))
    fv = _tail(r, v, q)
    worst = max(((_tail(r, v - i, q) - fv) / i for i in range(1, m + 1)), default=Fraction(0))
    return min(1.0, float(fv + 2 * m * Fraction(delta) * worst))


def _float_p(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """As :func:`_brute_p` in floats (math.comb and math.fsum), fast enough to scan."""
    q = 1 / (1 + math.exp(-eps))
    pmf = [math.comb(r, j) * q ** j * (1 - q) ** (r - j) for j in range(r + 1)]
    tail = [math.fsum(pmf[max(k, 0):]) for k in range(-m, r + 2)]  # tail[k + m] = P[W >= k]
    fv = tail[v + m]
    worst = max((tail[v - i + m] - fv) / i for i in range(1, m + 1))
    return min(1.0, fv + 2 * m * delta * worst)


def _brute_eps(m: int, r: int, v: int, delta: float, beta: float, step: float = 0.002) -> float:
    """Largest eps on a grid of ``step`` whose p-value is below beta: a coarse scan (0.05) to find
    the last rejected point, then a fine one past it (no bisection)."""
    coarse = [k * 0.05 for k in range(0, 241)]
    rejected = [e for e in coarse if _float_p(m, r, v, e, delta) < beta]
    if not rejected:
        return 0.0
    start = max(rejected)
    fine = [start + k * step for k in range(0, int(0.1 / step) + 1)]
    return max(e for e in fine if _float_p(m, r, v, e, delta) < beta)


@pytest.mark.parametrize("m,r,v,eps,delta", [(10, 10, 10, 0.0, 0.0), (20, 12, 9, 0.7, 1e-3), (50, 40, 38, 2.0, 1e-5),
                                             (30, 30, 15, 0.0, 1e-2), (8, 3, 0, 1.0, 1e-5)])
def test_p_value_matches_brute_force(m, r, v, eps, delta):
    assert p_value(m, r, v, eps, delta) == pytest.approx(_brute_p(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("m,r,v,delta", [(10, 10, 10, 1e-5), (40, 20, 18, 1e-5), (60, 30, 27, 1e-3), (60, 30, 27, 1e-2)])
def test_epsilon_matches_brute_force_scan(m, r, v, delta):
    got = epsilon_lower_bound(m, r, v, delta=delta, beta=0.05)
    want = _brute_eps(m, r, v, delta, 0.05)
    assert want <= got + 1e-6 and got - want < 0.003  # the scan lands at most one grid step below
    if got > 0:
        assert p_value(m, r, v, got, delta) < 0.05 <= p_value(m, r, v, got + 1e-4, delta)
    else:  # 2 m delta = 1.2: the delta term alone exceeds beta
        assert p_value(m, r, v, 0.0, delta) >= 0.05


def test_known_answers():
    assert epsilon_lower_bound(100, 100, 100, delta=1e-5, beta=0.05) == pytest.approx(3.49, abs=0.01)
    assert epsilon_lower_bound(10, 10, 10, delta=1e-5, beta=0.05) == pytest.approx(1.05, abs=0.01)
    assert epsilon_lower_bound(1, 1, 1) == 0.0
    assert epsilon_lower_bound(2, 2, 2) == 0.0
    # pure DP closed form: q^r = beta  ->  eps = log(q / (1 - q))
    q = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(100, 100, 100, delta=0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)
    # the delta term costs something: a larger delta gives a smaller bound
    assert epsilon_lower_bound(100, 100, 95, delta=1e-2) < epsilon_lower_bound(100, 100, 95, delta=1e-5)


def test_monotone_in_correct_guesses_and_confidence():
    bounds = [epsilon_lower_bound(100, 100, v) for v in range(0, 101)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))
    assert bounds[50] == 0.0 and bounds[-1] > 3
    assert epsilon_lower_bound(100, 100, 90, beta=0.01) < epsilon_lower_bound(100, 100, 90, beta=0.05)


def test_bad_counts():
    with pytest.raises(ValueError, match="v <= guesses r <= canaries m"):
        p_value(10, 5, 6, 1.0)
    with pytest.raises(ValueError, match="beta"):
        epsilon_lower_bound(10, 10, 10, beta=0)


# ----------------------------------------------------------------------------- guesses and correction

def test_guesses_use_scores_only():
    s = np.array([0.3, -1.0, 2.0, 0.0, 5.0])
    assert make_guesses(s, 2, 1).tolist() == [0, -1, 1, 0, 1]
    assert make_guesses(s, 0, 0).tolist() == [0] * 5
    with pytest.raises(ValueError, match="k_plus"):
        make_guesses(s, 4, 2)


def test_fixed_counts_need_no_correction_and_grid_is_bonferroni():
    s = np.arange(100.0)
    truth = s >= 50  # a perfect separator
    fixed = audit_bound(s, truth, k_plus=50, k_minus=50)
    assert fixed.grid_size == 1 and fixed.correct == fixed.guesses == 100
    assert fixed.epsilon == pytest.approx(epsilon_lower_bound(100, 100, 100), abs=1e-6)
    grid = audit_bound(s, truth)
    g = len(default_grid(100))
    assert grid.grid_size == g and "Bonferroni" in grid.correction
    # the best pair is tested at beta / G: the same counts give a smaller bound than uncorrected
    assert grid.epsilon == pytest.approx(epsilon_lower_bound(100, grid.guesses, grid.correct, beta=0.05 / g), abs=1e-6)
    assert 0 < grid.epsilon < fixed.epsilon


def test_random_scores_give_no_bound_at_the_nominal_rate():
    """Scores independent of the draw (eps = 0 truly): the corrected bound is > 0 in at most 5% of
    audits, as the README states (200 draws of 200 canaries). Every analysis and guess kind, and
    the planted over-count this check catches: tests/test_fdp.py."""
    rng = np.random.default_rng(1)
    positive = sum(audit_bound(rng.normal(size=200), rng.random(200) < 0.5).epsilon > 0 for _ in range(200))
    assert positive / 200 <= 0.05


def test_bound_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 canaries"):
        audit_bound([1.0], [True])
    with pytest.raises(ValueError, match="one entry per canary"):
        audit_bound([1.0, 2.0], [True])


def test_default_grid():
    assert default_grid(10) == [(1, 0), (2, 0), (5, 0), (10, 0), (1, 1), (2, 2), (5, 5)]


# ----------------------------------------------------------------------------- features

def test_random_features_are_distinct_and_deterministic():
    a = audit_features("random", 50, 3, (1, 12, 12), offset=(0, 0), seed=3)
    b = audit_features("random", 50, 3, (1, 12, 12), offset=(0, 0), seed=3)
    assert [f.pattern for f in a] == [f.pattern for f in b]
    assert len({f.pattern for f in a}) == 50
    assert all(np.asarray(f.pattern).max() == 1 for f in a)


def test_text_features_are_distinct_strings():
    fs = audit_features("text", 10, 7, (1, 64, 64), seed=0)
    assert len({f.pattern for f in fs}) == 10 and all(f.kind == "text" for f in fs)


def test_features_that_do_not_fit():
    with pytest.raises(FeatureError, match="does not fit"):
        audit_features("random", 10, 13, (1, 12, 12))
    with pytest.raises(FeatureError, match="only 6 distinct"):
        audit_features("random", 100, 2, (1, 12, 12))
    with pytest.raises(FeatureError, match="--text-length"):
        audit_features("text", 5, 7, (1, 12, 12))


# ----------------------------------------------------------------------------- the audit job

def test_config_bad_input(tiny_data):
    exp = tiny_config(tiny_data)
    with pytest.raises(ValueError, match="at least 2 canaries"):
        PrivacyAuditConfig(exp, canaries=1)
    with pytest.raises(ValueError, match="both k_plus and k_minus"):
        PrivacyAuditConfig(exp, canaries=10, k_plus=3)
    with pytest.raises(ValueError, match="out_mode"):
        PrivacyAuditConfig(exp, canaries=10, out_mode="gone")


def test_more_canaries_than_training_images(tiny_data, one_torch_thread, tmp_path):
    from ufm.runs.store import Store

    store = Store(tmp_path / "home")
    with pytest.raises(ValueError, match="larger than the training set"):
        run_privacy_audit(PrivacyAuditConfig(tiny_config(tiny_data), canaries=290, feature_size=3, offset=(0, 0)),
                          store=store)
    assert store.list_runs() == []  # refused before a run was recorded


def test_audit_runs_is_deterministic_and_round_trips(tiny_data, one_torch_thread, tmp_path):
    from ufm.runs.store import Store

    store = Store(tmp_path / "home")
    cfg = PrivacyAuditConfig(tiny_config(tiny_data, epochs=3), canaries=40, feature_size=3, offset=(0, 0))
    a, b = run_privacy_audit(cfg, store=store), run_privacy_audit(cfg, store=store, force=True)
    assert a.run_id != b.run_id  # force: trained twice
    assert a.scores == b.scores and a.is_in == b.is_in and a.indices == b.indices
    assert len(set(a.indices)) == 40 and 5 < sum(a.is_in) < 35
    assert a.n_train == 270 and a.claimed_epsilon is None
    back = load_privacy_audit(store, cfg)
    assert back is not None and back.to_dict() == PrivacyAuditResult.from_json(b.to_json()).to_dict() == b.to_dict()
    fig = audit_histogram(a)
    assert len(fig.data) == 2 and sum(fig.data[0].y) + sum(fig.data[1].y) == 40
    removed = run_privacy_audit(cfg.replace(out_mode="removed"), store=store)
    assert removed.n_train == 270 - (40 - sum(removed.is_in))


# ----------------------------------------------------------------------------- the scores

def test_log_prob_gains_known_answer():
    """A linear model with hand-set weights: the gains equal float64 log-softmax differences
    computed by hand, image by image, for each feature."""
    import torch
    from torch import nn

    from ufm.core.features import grid_feature

    torch.manual_seed(0)
    lin = nn.Linear(16, 3).double()
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    feats = [grid_feature(np.array([[1.0, 0.0], [0.0, 1.0]]), offset=(0, 0)),
             grid_feature(np.array([[1.0, 1.0]]), offset=(3, 2))]
    got = log_prob_gains(model, x, feats, batch_size=2)
    w, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()

    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    xs = x.numpy().reshape(5, 16)
    clean = log_softmax(xs @ w.T + b)
    for j, f in enumerate(feats):
        stamped = x.numpy().copy()
        r, c = f.offset
        h, wd = f.size
        stamped[:, 0, r:r + h, c:c + wd] = f.array()
        want = (log_softmax(stamped.reshape(5, 16) @ w.T + b) - clean).mean(axis=0)
        np.testing.assert_allclose(got[j], want, rtol=1e-10, atol=1e-12)
    assert log_prob_gains(model, x, []).shape == (0, 3)


def test_class_gain_known_answer_and_bad_input():
    g = np.array([[0.3, -0.1, 0.1], [0.0, 0.0, 0.9]])
    np.testing.assert_allclose(class_gain(g, [0, 1]), [0.3 - 0.0, 0.0 - 0.45])
    # a shift common to every class is not a gain towards one
    np.testing.assert_allclose(class_gain(g + 5.0, [0, 1]), class_gain(g, [0, 1]))
    with pytest.raises(ValueError, match="labels must be classes"):
        class_gain(g, [0, 3])
    with pytest.raises(ValueError, match="gains and F labels"):
        class_gain(g, [0])


def test_score_auc_matches_pair_counting():
    rng = np.random.default_rng(3)
    s = np.round(rng.normal(size=40), 1)  # rounded: ties occur
    t = rng.random(40) < 0.5
    pairs = [(a > b) + 0.5 * (a == b) for a in s[t] for b in s[~t]]
    assert score_auc(s, t) == pytest.approx(sum(pairs) / len(pairs))
    assert score_auc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert math.isnan(score_auc([1.0, 2.0], [True, True]))


def test_score_is_part_of_the_config():
    exp = PrivacyAuditConfig().experiment
    assert PrivacyAuditConfig(exp).score == "label-gain"
    assert PrivacyAuditConfig(exp, score="M").key() != PrivacyAuditConfig(exp).key()
    assert PrivacyAuditConfig(exp, score="M").run_config().key() != PrivacyAuditConfig(exp).run_config().key()
    with pytest.raises(ValueError, match="unknown audit score"):
        PrivacyAuditConfig(exp, score="loss")
    old = PrivacyAuditConfig(exp, score="M").to_dict()
    del old["score"]  # saved before the score was a choice: those audits were scored by M
    assert PrivacyAuditConfig.from_dict(old).score == "M"


@needs_shared
@pytest.mark.slow
def test_power_plain_mlp_on_mnist_gives_a_bound(shared_data, one_torch_thread):
    """The acceptance's power case: an MLP on MNIST without regularisation, 100 canaries, gives a
    lower bound above 0 at 95% with the default score (README: every one of 8 seeds does); M on
    the same model separates IN from OUT less well."""
    from ufm.core.experiment import ExperimentConfig

    exp = ExperimentConfig(dataset="mnist", data_dir=str(shared_data), arch="mlp", train_size=500, epochs=80,
                           patience=10, ood_size=500, seed=0, device="cpu")
    gain = run_privacy_audit(PrivacyAuditConfig(exp, canaries=100))
    assert gain.epsilon > 0.5 and gain.auc > 0.75
    assert gain.test_accuracy > 0.8
    by_m = run_privacy_audit(PrivacyAuditConfig(exp, canaries=100, score="M"))
    assert by_m.auc < gain.auc


# ----------------------------------------------------------------------------- CLI

def _cli_args(tiny_data, *extra):
    return ["privacy-audit", "--dataset", str(tiny_data["train"]), "--ood-source", str(tiny_data["ood"]),
            "--ood-size", "30", "--epochs", "2", "--patience", "2", "--lr", "1e-3", "--batch-size", "32",
            "--device", "cpu", "--offset", "0", "0", "--quiet", *extra]


def test_cli_writes_the_audit(tiny_data, one_torch_thread, tmp_path, capsys):
    from ufm.cli import main

    out = tmp_path / "audit.json"
    assert main(_cli_args(tiny_data, "--canaries", "20", "--feature-size", "3", "--out", str(out))) == 0
    d = json.loads(out.read_text())
    assert d["bound"]["m"] == 20 and len(d["scores"]) == 20 and "epsilon_lower_bound" in d
    assert d["config"]["score"] == "label-gain" and 0 <= d["auc"] <= 1
    by_m = tmp_path / "audit-m.json"
    assert main(_cli_args(tiny_data, "--canaries", "20", "--feature-size", "3", "--score", "M", "--out", str(by_m))) == 0
    dm = json.loads(by_m.read_text())
    assert dm["config"]["score"] == "M" and dm["is_in"] == d["is_in"] and dm["scores"] != d["scores"]
    assert "epsilon lower bound" in capsys.readouterr().out


@pytest.mark.parametrize("extra,msg", [(["--canaries", "1"], "at least 2 canaries"),
                                       (["--canaries", "500", "--feature-size", "3"], "larger than the training set"),
                                       (["--canaries", "10", "--feature-size", "13"], "does not fit"),
                                       (["--canaries", "10", "--features", "glyphs"], "invalid choice")])
def test_cli_bad_input_exits_2(tiny_data, one_torch_thread, capsys, extra, msg):
    from ufm.cli import main

    assert main(_cli_args(tiny_data, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("ufm: error:") and msg in err and "Traceback" not in err
