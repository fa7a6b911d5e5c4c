import json
import math

import numpy as np
import pytest
import torch
from scipy import special, stats
from torch import nn

from ufm.candidates import candidate_set, derived_generator
from ufm.canary import random_patches
from ufm.features import glyph, grid_feature
from ufm.scores import (MScore, access_scores, confidence_gain, exposure_test, kl_divergence,
                        memorisation_score, ttests)


def test_kl_matches_scipy_entropy():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(10), size=50)
    q = rng.dirichlet(np.ones(10), size=50)
    ours = kl_divergence(torch.tensor(p), torch.tensor(q)).numpy()
    ref = np.array([stats.entropy(a, b) for a, b in zip(p, q)])
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
    assert np.allclose(kl_divergence(torch.tensor(p), torch.tensor(p)).numpy(), 0)


def test_kl_stays_finite_at_zero():
    p = torch.tensor([[1.0, 0.0]])
    q = torch.tensor([[0.0, 1.0]])
    v = kl_divergence(p, q).item()
    assert math.isfinite(v) and v == pytest.approx(math.log(1 / 1e-12), rel=1e-6)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        kl_divergence(torch.ones(3), torch.ones(3))


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

    res = memorisation_score(Const(), torch.rand(20, 1, 8, 8), glyph("A"), candidates=19)
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

    res = memorisation_score(Detector(), torch.rand(50, 1, 8, 8) * 0.1, glyph("A"), candidates=49)
    assert res.M > 0 and res.rank == 1 and res.significant and res.p_value < 1e-6
    assert "Memorised" in res.verdict()


def test_exposure_known_answers():
    assert exposure_test(0.5, np.array([0.1, 0.2, 0.3])) == (1, 2.0, 0.25)
    rank, exp, p = exposure_test(0.2, np.array([0.1, 0.2, 0.3]))
    assert rank == 3 and p == 0.75 and exp == pytest.approx(math.log2(4 / 3))
    with pytest.raises(ValueError):
        exposure_test(0.1, np.array([]))


def test_ttests_nan_when_no_variance_and_json_round_trip():
    t, p, tp, pp = ttests(np.zeros(5), np.zeros((1, 5)))
    assert math.isnan(p) and math.isnan(pp)
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
    g = confidence_gain(Detector(), x, glyph("A"), 2)
    pc = Detector()(x).softmax(1)[:, 2]
    from ufm.canary import stamp_feature
    pu = Detector()(stamp_feature(x, glyph("A"))).softmax(1)[:, 2]
    assert g.gain == pytest.approx((pu - pc).mean().item(), rel=1e-5) and g.p_value_paper < 1e-6
    assert math.isnan(g.p_value)  # calibration needs candidates: access_scores
    y = torch.arange(30) % 3
    acc = access_scores(Detector(), glyph("A"), x_test=x, y_test=y, x_ood=x, canary_label=2)
    assert acc.white_box.label == 2 and acc.grey_box.label == 2 and acc.grey_box_points_at_canary
    assert acc.black_box_gain.label == 2 and acc.white_box.gain > 0.1
    none = access_scores(Detector(), glyph("A"), x_test=x, y_test=y, x_ood=x, canary_label=None)
    assert none.white_box is None and none.grey_box_points_at_canary is None
    assert json.loads(json.dumps(acc.to_dict()))["grey_box"]["label"] == 2
