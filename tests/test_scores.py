import json
import math

import numpy as np
import pytest
import torch
from scipy import special, stats
from torch import nn

from ufm.measure.candidates import FAMILIES, candidate_set, derived_generator
from ufm.core.canary import random_patches
from ufm.core.features import FeatureError, glyph, grid_feature, text_feature
from ufm.measure.access import access_scores
from ufm.measure.results import AccessScores, GainStat, MScore
from ufm.measure.scores import feature_effect, memorisation_score, model_learned
from ufm.measure.stamped_kl import StampedForward, feature_stamp, kl_from_log_probs
from ufm.core.train import TrainingCancelled

from .conftest import tiny_config


def test_kl_matches_scipy_entropy():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(10), size=50)
    q = rng.dirichlet(np.ones(10), size=50)
    ours = kl_from_log_probs(torch.tensor(p).log(), torch.tensor(q).log()).numpy()
    ref = np.array([stats.entropy(a, b) for a, b in zip(p, q)])
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
    assert np.allclose(kl_from_log_probs(torch.tensor(p).log(), torch.tensor(p).log()).numpy(), 0)


def test_kl_stays_finite_at_zero():
    p = torch.tensor([[1.0, 0.0]])
    q = torch.tensor([[0.0, 1.0]])
    v = kl_from_log_probs(p.log(), q.log()).item()  # log 0 = -inf is clamped to log(1e-12)
    assert math.isfinite(v) and v == pytest.approx(math.log(1 / 1e-12), rel=1e-6)


def _linear_model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(36, 4))
    with torch.no_grad():
        m[1].weight.mul_(6)
    return m.eval()


def _np_probs(model, x):
    w = model[1].weight.detach().double().numpy()
    b = model[1].bias.detach().double().numpy()
    return special.softmax(x.reshape(len(x), -1) @ w.T + b, axis=1)


def test_m_score_against_independent_scipy_computation():
    model = _linear_model()
    feat = glyph("A", offset=(1, 0))
    x = torch.rand(40, 1, 6, 6)
    res = memorisation_score(model, x, feat, repeats=2, candidates=9, candidate_kind="bernoulli", seed=3)

    xn = x.double().numpy()
    pc = _np_probs(model, xn)
    xu = xn.copy()
    xu[:, :, 1:6, 0:5] = feat.array()
    d_u = np.array([stats.entropy(a, b) for a, b in zip(pc, _np_probs(model, xu))])
    gen = derived_generator(3, "z_r")  # z_r and candidates come from separate streams of the seed
    d_r = []
    for _ in range(2):
        z = random_patches(40, (5, 5), generator=gen).double().numpy()
        xr = xn.copy()
        xr[:, 0, 1:6, 0:5] = z
        d_r.append([stats.entropy(a, b) for a, b in zip(pc, _np_probs(model, xr))])
    d_r = np.array(d_r)
    cs = candidate_set(feat, 9, "bernoulli", x.shape, derived_generator(3, "candidates"))
    assert cs.offsets == [feat.offset] * 9
    cands = cs.patches.double().numpy()
    cand_x = []
    for c in cands:
        xc = xn.copy()
        xc[:, 0, 1:6, 0:5] = c
        cand_x.append(np.mean([stats.entropy(a, b) for a, b in zip(pc, _np_probs(model, xc))]))

    np.testing.assert_allclose(res.d_u, d_u, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(res.d_r, d_r, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(res.candidate_X, cand_x, rtol=1e-4, atol=1e-7)
    assert res.X_u == pytest.approx(d_u.mean(), rel=1e-4)
    assert res.X_r == pytest.approx(d_r.mean(), rel=1e-4)
    assert res.M == pytest.approx(d_u.mean() - d_r.mean(), rel=1e-3, abs=1e-7)
    # Welch t by hand
    a, b = d_u, d_r.ravel()
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    assert res.t_stat == pytest.approx(t, rel=1e-3)
    assert res.p_value == pytest.approx(stats.t.sf(t, dof), rel=1e-3, abs=1e-12)
    diff = d_u - d_r.mean(0)
    tp = diff.mean() / (diff.std(ddof=1) / math.sqrt(len(diff)))
    assert res.p_value_paired == pytest.approx(stats.t.sf(tp, len(diff) - 1), rel=1e-3, abs=1e-12)
    rank = 1 + sum(c >= d_u.mean() for c in cand_x)
    assert res.rank == rank and res.exposure_p_value == pytest.approx(rank / 10)


def test_random_kind_follows_the_feature():
    model = _linear_model()
    x = torch.rand(10, 1, 6, 6)
    assert memorisation_score(model, x, glyph("A"), candidates=2).random_kind == "bernoulli"
    grey = grid_feature([[0.2, 0.9], [0.5, 0.1]])
    assert memorisation_score(model, x, grey, candidates=2).random_kind == "uniform"


def test_insensitive_model_gives_zero_m_and_no_verdict():
    class Const(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 3) + torch.tensor([1.0, 2.0, 3.0])

    res = memorisation_score(Const(), torch.rand(20, 1, 8, 8), glyph("A"), candidates=19, family="strokes")
    assert res.M == 0 and res.X_u == 0 and not res.significant
    assert res.rank == 20 and res.exposure_p_value == 1.0  # ties count against memorisation
    assert "No evidence" in res.verdict()


def test_model_that_reads_the_feature_is_detected():
    """Positive control at the scorer level: a model whose logit 0 is the A-detector's output."""
    a = torch.from_numpy(glyph("A").array())
    template = torch.zeros(1, 8, 8)
    template[0, 1:6, 1:6] = 2 * a - 1

    class Detector(nn.Module):
        def forward(self, x):
            s = (x * template).sum((1, 2, 3))
            return torch.stack([s, torch.zeros_like(s), torch.zeros_like(s)], 1)

    res = memorisation_score(Detector(), torch.rand(50, 1, 8, 8) * 0.1, glyph("A"), candidates=49, family="strokes")
    assert res.M > 0 and res.rank == 1 and res.significant and res.p_value < 1e-6
    assert "Memorised" in res.verdict()


def test_mscore_json_round_trip():
    model = _linear_model()
    res = memorisation_score(model, torch.rand(12, 1, 6, 6), glyph("A"), repeats=3, candidates=5)
    back = MScore.from_dict(json.loads(json.dumps(res.to_dict())))
    np.testing.assert_array_equal(back.d_r, res.d_r)
    assert back.d_r.shape == (3, 12) and back.M == res.M and back.significant == res.significant


def test_confidence_gain_and_access_settings():
    a = torch.from_numpy(glyph("A").array())
    template = torch.zeros(1, 8, 8)
    template[0, 1:6, 1:6] = 2 * a - 1

    class Detector(nn.Module):  # the A pushes class 2 up
        def forward(self, x):
            s = (x * template).sum((1, 2, 3))
            return torch.stack([torch.zeros_like(s), torch.zeros_like(s), s], 1)

    x = torch.rand(30, 1, 8, 8) * 0.1
    pc = Detector()(x).softmax(1)[:, 2]
    from ufm.core.canary import stamp_feature
    pu = Detector()(stamp_feature(x, glyph("A"))).softmax(1)[:, 2]
    y = torch.arange(30) % 3
    acc = access_scores(Detector(), glyph("A"), x_test=x, y_test=y, x_ood=x, canary_label=2)
    g = acc.black_box_gain  # class 2 on all 30 images
    assert g.gain == pytest.approx((pu - pc).mean().item(), rel=1e-5) and g.p_value_paper < 1e-6
    assert acc.white_box.label == 2 and acc.grey_box.label == 2 and acc.grey_box_points_at_canary
    assert acc.black_box_gain.label == 2 and acc.white_box.gain > 0.1
    none = access_scores(Detector(), glyph("A"), x_test=x, y_test=y, x_ood=x, canary_label=None)
    assert none.white_box is None and none.grey_box_points_at_canary is None
    assert json.loads(json.dumps(acc.to_dict()))["grey_box"]["label"] == 2


# ----------------------------------------------------------------------------- issue 8: verdicts you can trust


def _mlp(seed, side=8, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(side * side, 16), nn.ReLU(), nn.Linear(16, classes)).eval()


def test_solid_feature_is_inconclusive_for_every_family(one_torch_thread):
    """The audit's case: a 2x2 all-ones feature on untrained models was 'Memorised' (p=0.01) in 3/5 seeds."""
    solid = grid_feature([[1, 1], [1, 1]], offset=(2, 2))
    x = torch.rand(20, 1, 8, 8)
    for seed in range(5):
        for fam in ("permute", "strokes", "shift", "bernoulli", "uniform"):
            res = memorisation_score(_mlp(seed), x, solid, candidates=99, family=fam, seed=seed)
            assert res.status == "inconclusive" and not res.significant
            assert "solid" in res.inconclusive_reason and "No verdict from the fast exposure test" in res.verdict()
            assert res.candidate_X.size == 0 and res.rank == 0 and math.isnan(res.exposure_p_value)
            assert math.isfinite(res.M)  # M and the paper's t-tests are still reported


def test_tiny_permutation_space_inconclusive_when_k_exceeds_it(one_torch_thread):
    """3x3 with 5 ones: C(9, 5) = 126 arrangements, 125 differ from z_u."""
    small = grid_feature([[1, 0, 1], [0, 1, 0], [1, 0, 1]], offset=(1, 1))
    x = torch.rand(20, 1, 8, 8)
    for fam in ("permute", "strokes"):
        res = memorisation_score(_mlp(0), x, small, candidates=126, family=fam)
        assert res.status == "inconclusive" and "only 125 distinct" in res.inconclusive_reason
        assert "fewer" in res.inconclusive_reason  # says what to change
    # K = 125 uses every other arrangement exactly once: the rank is exact, no duplicate, no copy of z_u
    res = memorisation_score(_mlp(0), x, small, candidates=125, family="permute")
    assert res.status in ("memorised", "not_shown") and len(set(res.candidate_X.tolist())) == 125


def test_tiny_feature_on_untrained_models_is_calibrated(one_torch_thread):
    """K = 99 of the 125 other arrangements: on untrained models the p-values are not systematically small."""
    small = grid_feature([[1, 0, 1], [0, 1, 0], [1, 0, 1]], offset=(1, 1))
    x = torch.rand(20, 1, 8, 8)
    ps = [memorisation_score(_mlp(s), x, small, candidates=99, seed=s).exposure_p_value for s in range(6)]
    assert np.mean(ps) > 0.2 and min(ps) > 1 / 100


def test_float64_path_identical_inputs_give_identical_kl(one_torch_thread):
    model = _mlp(1)
    x = torch.rand(30, 1, 8, 8)
    feat = glyph("A", size=3, offset=(0, 0))
    fwd = StampedForward(model, x, batch_size=100)  # 3 stamped sets per forward pass
    other = (torch.rand(3, 3), (2, 2))
    kl = fwd.kl([feature_stamp(feat, "cpu"), other, other, feature_stamp(feat, "cpu"), other, other, other,
                 feature_stamp(feat, "cpu")])
    assert kl.dtype == np.float64 and kl.shape == (8, 30)
    np.testing.assert_array_equal(kl[0], kl[3])  # other slot, other forward pass: bit for bit
    np.testing.assert_array_equal(kl[0], kl[7])
    res = memorisation_score(model, x, feat, candidates=9, batch_size=100)
    assert res.X_u == float(np.mean(res.d_u)) and res.d_u.dtype == np.float64
    np.testing.assert_array_equal(res.d_u, kl[0])


@pytest.mark.filterwarnings("ignore:Precision loss")  # the t-tests on identical d_u values
def test_shifted_copies_tie_exactly_on_a_translation_invariant_model():
    """The model sums the pixels; on black images the pattern stamped anywhere gives the same logits,
    so every shift candidate equals X_u exactly and ranks against memorisation: p = 1, not 1/(K+1)."""
    class Sum(nn.Module):
        def forward(self, x):
            s = x.sum((1, 2, 3))
            return torch.stack([s, torch.zeros_like(s), -s], 1)

    res = memorisation_score(Sum(), torch.zeros(10, 1, 10, 10), glyph("A"), candidates=19, family="shift")
    assert res.X_u > 0 and np.all(res.candidate_X == res.X_u)
    assert res.rank == 20 and res.exposure_p_value == 1.0 and res.status == "not_shown"


def test_feature_effect_reproduces_m_exactly_and_streams_are_separate(one_torch_thread):
    model = _mlp(2)
    x = torch.rand(25, 1, 8, 8)
    feat = glyph("A", size=4, offset=(2, 1))
    res = memorisation_score(model, x, feat, repeats=3, candidates=7, seed=11)
    d_u, d_r = feature_effect(model, x, feat, repeats=3, seed=11)
    np.testing.assert_array_equal(d_u, res.d_u)
    np.testing.assert_array_equal(d_r, res.d_r)
    assert float(np.mean(d_u)) - float(np.mean(d_r)) == res.M
    # z_r does not depend on K; the candidates do not depend on N or R
    other = memorisation_score(model, x, feat, repeats=3, candidates=15, seed=11)
    np.testing.assert_array_equal(other.d_r, res.d_r)
    np.testing.assert_array_equal(other.candidate_X[:7], res.candidate_X)
    fewer = memorisation_score(model, x[:10], feat, repeats=1, candidates=7, seed=11)
    full_on_10 = [float(np.mean(row)) for row in StampedForward(model, x[:10], 1024).kl(
        [(p, o) for p, o in zip(*_candidates(feat, 7, 11))])]
    np.testing.assert_array_equal(fewer.candidate_X, full_on_10)
    assert feature_effect(model, x, feat, seed=12)[1].tolist() != d_r[:1].tolist()


def _candidates(feat, k, seed):
    cs = candidate_set(feat, k, None, (1, 8, 8), derived_generator(seed, "candidates"))
    return list(cs.patches), cs.offsets


def test_family_choice_and_validation():
    x = torch.rand(4, 1, 12, 60)
    model = nn.Sequential(nn.Flatten(), nn.Linear(720, 3))
    assert memorisation_score(model, x, glyph("A"), candidates=3).family == "shift"
    res = memorisation_score(model, x, text_feature("AB 1", offset=(1, 1)), candidates=3)
    assert res.family == res.candidate_kind == "strings"
    assert memorisation_score(model, x, glyph("A"), candidates=3, candidate_kind="permute").family == "permute"
    with pytest.raises(FeatureError, match="permute, strokes, shift, bernoulli, uniform"):
        memorisation_score(model, x, glyph("A"), candidates=3, family="strings")
    with pytest.raises(FeatureError, match="binary"):
        memorisation_score(model, x, grid_feature([[0.2, 0.9], [0.5, 0.1]]), candidates=3, family="strokes")
    assert set(FAMILIES) <= {"permute", "strings", "strokes", "shift", "bernoulli", "uniform"}


def test_cancel_is_checked_between_candidate_batches():
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3  # let the clean, d_u and first candidate passes through

    with pytest.raises(TrainingCancelled):
        memorisation_score(_mlp(0), torch.rand(50, 1, 8, 8), glyph("A"), candidates=99, batch_size=100,
                           family="strokes", cancel=cancel)
    assert len(calls) == 4


def test_old_mscore_and_access_dicts_still_load():
    old = {"d_u": [0.1, 0.2], "d_r": [[0.1, 0.1]], "X_u": 0.15, "X_r": 0.1, "M": 0.05, "p_value": 0.2,
           "p_value_paired": None, "t_stat": 1.0, "t_stat_paired": None, "candidate_X": [0.0, 0.01, 0.02],
           "candidate_kind": "permute", "rank": 1, "exposure": 2.0, "exposure_p_value": 0.25,
           "random_kind": "bernoulli", "alpha": 0.3, "significant": True}
    s = MScore.from_dict(old)
    assert s.status == "memorised" and s.family == "permute" and s.significant and s.inconclusive_reason is None
    assert MScore.from_dict({**old, "alpha": 0.05}).status == "not_shown"
    g = GainStat.from_dict({"label": 2, "gain": 0.1, "p_value": 1e-9, "n": 30})  # 0.2: p_value was the t-test
    assert g.p_value_paper == 1e-9 and math.isnan(g.p_value)
    acc = AccessScores.from_dict({"white_box": None, "grey_box": {"label": 2, "gain": 0.1, "p_value": 0.5, "n": 3},
                                  "grey_box_per_class": [], "black_box_gain": {"label": 0, "gain": 0.0,
                                                                               "p_value": None, "n": 3},
                                  "canary_label": None})
    assert acc.family == "" and acc.candidates == 0 and acc.grey_box.p_value_paper == 0.5


def test_inconclusive_score_round_trips():
    res = memorisation_score(_mlp(0), torch.rand(6, 1, 8, 8), grid_feature([[1, 1], [1, 1]]), candidates=5)
    back = MScore.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.status == "inconclusive" and back.inconclusive_reason == res.inconclusive_reason
    assert not back.significant and back.verdict() == res.verdict()
    assert res.to_dict()["exposure_p_value"] is None


def test_calibrated_access_p_values_on_clean_models(one_torch_thread):
    """Untrained models never saw the feature: the paper's t-tests are tiny, the calibrated ranks are not."""
    calibrated, paper = [], []
    for seed in range(5):
        torch.manual_seed(100 + seed)
        xt, yt, xo = torch.rand(60, 1, 12, 12), torch.arange(60) % 3, torch.rand(40, 1, 12, 12)
        model = _mlp(seed, side=12)
        a = access_scores(model, glyph("A", size=4, offset=(1, 1)), x_test=xt, y_test=yt, x_ood=xo,
                          canary_label=0, candidates=19, family="strokes", seed=seed, max_per_class=15)
        assert a.candidates == 19 and a.family == "strokes" and a.white_box.n == 15
        calibrated.append([a.white_box.p_value, a.grey_box.p_value, a.black_box_gain.p_value])
        paper.append([a.grey_box.p_value_paper, a.black_box_gain.p_value_paper])
    calibrated = np.array(calibrated)
    assert np.all(calibrated >= 1 / 20) and np.all(calibrated.mean(axis=0) > 0.2)
    assert np.median(paper) < 1e-3  # the paper's statistic flags clean models


def test_calibrated_access_p_values_on_briefly_trained_clean_models(tiny_data, one_torch_thread):
    """Clean models trained a few epochs (no canary): the black-box t-test flags them, the rank does not."""
    from ufm.core.canary import CanaryChoice
    from ufm.core.experiment import run_experiment

    cal, paper = [], []
    for seed in range(4):
        res = run_experiment(tiny_config(tiny_data, canary=CanaryChoice("none", ()), seed=seed, candidates=19,
                                         epochs=4, feature=glyph("A", size=4, offset=(1, 1)),
                                         candidate_kind="strokes"))
        assert res.test_accuracy > 0.9 and res.score.status != "memorised"
        assert res.access.family == "strokes" and res.access.candidates == 19
        cal.append([res.access.grey_box.p_value, res.access.black_box_gain.p_value])
        paper.append(res.access.black_box_gain.p_value_paper)
    assert np.all(np.array(cal).mean(axis=0) > 0.2) and np.max(paper) < 0.01


def test_access_p_value_is_the_rank_among_candidates():
    a_pat = torch.from_numpy(glyph("A").array())
    template = torch.zeros(1, 8, 8)
    template[0, 1:6, 1:6] = 2 * a_pat - 1

    class Detector(nn.Module):
        def forward(self, x):
            s = (x * template).sum((1, 2, 3))
            return torch.stack([torch.zeros_like(s), torch.zeros_like(s), s], 1)

    x = torch.rand(30, 1, 8, 8) * 0.1
    acc = access_scores(Detector(), glyph("A"), x_test=x, y_test=torch.arange(30) % 3, x_ood=x, canary_label=2,
                        candidates=19, family="strokes")
    assert acc.white_box.p_value == acc.grey_box.p_value == acc.black_box_gain.p_value == pytest.approx(1 / 20)
    solid = access_scores(Detector(), grid_feature([[1, 1], [1, 1]]), x_test=x, y_test=torch.arange(30) % 3,
                          x_ood=x, canary_label=2, candidates=19)
    assert math.isnan(solid.grey_box.p_value) and "solid" in solid.inconclusive_reason
    assert math.isfinite(solid.grey_box.p_value_paper)


def test_model_learned_known_answers():
    y = np.array([0] * 50 + [1] * 30 + [2] * 20)  # majority rate 0.5
    ok, why = model_learned(0.9, y, 3)
    assert ok and "50.0%" in why
    ok, why = model_learned(0.5, y, 3)
    assert not ok and "did not learn" in why
    ok, why = model_learned(0.55, y, 3)  # 55/100 vs 0.5: binomial p = 0.18 > 0.01
    assert not ok and "p = 0.18" in why
    assert model_learned(0.63, y, 3)[0]  # 63/100: p = 0.006
    assert not model_learned(0.34, torch.arange(99) % 3, 3)[0]
    with pytest.raises(ValueError, match="num_classes"):
        model_learned(0.5, [0, 3], 3)
