"""The memorisation score M and its tests (SPEC section 2).

Per out-of-distribution image ``x_c[i]``:

    d_u[i] = KL(f(x_c[i]) || f(x_u[i]))        x_u = x_c with the unique feature z_u
    d_r[i] = KL(f(x_c[i]) || f(x_r[i]))        x_r = x_c with a fresh random feature z_r

``X_u = mean(d_u)``, ``X_r = mean(d_r)`` (over images and R random draws), ``M = X_u - X_r``.

Two kinds of significance are reported:

* the paper's statistics: a one-tailed Welch t-test (``d_u`` vs all ``d_r``) and a one-tailed
  paired t-test (``d_u[i]`` vs ``mean_r d_r[i]``, which share ``x_c[i]``);
* the calibrated **exposure** test (Carlini et al. 2019): K fixed candidate features, each stamped
  on every image, give ``X_1..X_K``; the empirical p-value is ``(1 + #{X_j >= X_u}) / (K + 1)``,
  ties (to a relative :data:`ufm.measure.stats.TIE_RTOL`) counted against memorisation.

The verdict uses the exposure p-value. The t-tests treat every image as an independent sample of
the *feature's* effect, but all images share one ``z_u``: a model that is, by chance, more
sensitive to that one pattern than to an average random pattern gives a tiny p-value with no
memorisation at all (reported in this project's issue tracker for an MNIST MLP with *no* canary:
M = 0.0024, t-test p = 0.0003, exposure p = 0.29). Under no memorisation ``z_u`` is just another
pattern, so its rank among candidate patterns is uniform, which is exactly what the exposure
p-value assumes. ``benchmarks/exposure_power.py`` measured both on 10 clean MNIST MLPs: the t-test
called 3 "significant" (p down to 6e-11), the exposure test none.

Every KL divergence, for ``z_u``, ``z_r`` and every candidate, comes from one float64 code path
(:class:`ufm.measure.stamped_kl.StampedForward`): logits -> float64 -> log_softmax, each forward pass the same shape (a group
of stamped copies of the inference set, padded with clean copies), so a candidate whose stamped
images equal ``x_u`` gives exactly ``X_u``, not ``X_u`` plus float32 rounding noise. Ties are then
real ties and count against memorisation. The candidates come from :mod:`ufm.measure.candidates`; when the
family cannot give K distinct candidates that differ from ``z_u`` (a solid feature, a tiny
feature), the fast test is *inconclusive*, never a verdict.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ufm.core.features import Feature
from ufm.core.train import CancelFlag
from ufm.measure.candidates import CandidatesUnavailable, candidate_set, derived_generator, resolve_family
from ufm.measure.results import MScore
from ufm.measure.stamped_kl import StampedForward, candidate_stamps, feature_stamp, random_stamps
from ufm.measure.stats import binomial_p_greater, exposure_test, ttests


def _effects(fwd: StampedForward, feature: Feature, repeats: int, random_kind: str,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
    dev = fwd.x.device
    kl = fwd.kl([feature_stamp(feature, dev)] + random_stamps(feature, fwd.n, repeats, random_kind, seed, dev))
    return kl[0], kl[1:]


def _check_inputs(x_clean: torch.Tensor, feature: Feature, repeats: int, random_kind: str | None) -> str:
    if repeats < 1:
        raise ValueError(f"repeats R must be >= 1, got {repeats}")
    if x_clean.ndim != 4 or x_clean.shape[0] < 2:
        raise ValueError(f"need (N, C, H, W) inference images with N >= 2 for the t-tests, got {tuple(x_clean.shape)}")
    feature.check_fits(x_clean.shape)
    random_kind = random_kind or ("bernoulli" if feature.binary else "uniform")
    if random_kind not in ("bernoulli", "uniform"):
        raise ValueError(f"unknown random feature kind {random_kind!r}; choose one of bernoulli, uniform")
    return random_kind


def feature_effect(model: nn.Module, x_clean: torch.Tensor, feature: Feature, *, repeats: int = 1,
                   random_kind: str | None = None, seed: int = 0,
                   batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per-image KL of the feature and of random features: ``(d_u (N,), d_r (R, N))``, float64 nats.

    Exactly the arrays :func:`memorisation_score` computes for the same arguments (same code path,
    same ``z_r`` draws for the same ``seed``), so ``d_u.mean() - d_r.mean()`` is its ``M``.
    """
    random_kind = _check_inputs(x_clean, feature, repeats, random_kind)
    return _effects(StampedForward(model, x_clean, batch_size), feature, repeats, random_kind, seed)


def memorisation_score(model: nn.Module, x_clean: torch.Tensor, feature: Feature, *, repeats: int = 1,
                       random_kind: str | None = None, candidates: int = 99, family: str | None = None,
                       candidate_kind: str | None = None, seed: int = 0, alpha: float = 0.05,
                       batch_size: int = 1024, cancel: CancelFlag = None) -> MScore:
    """Black-box memorisation score of ``feature`` for ``model`` on inference images ``x_clean``.

    Args:
        model: classifier returning logits; put in eval mode for scoring.
        x_clean: (N, C, H, W) out-of-distribution images ``D_c`` on the model's device.
        feature: the unique feature ``z_u`` (pattern, offset, intensity).
        repeats: R, independent random features per image for ``X_r``.
        random_kind: ``"bernoulli"`` or ``"uniform"`` for ``z_r``; default Bernoulli(0.5) for a
            binary feature, uniform for a grey one.
        candidates: K candidate features for the exposure test.
        family: candidate family (:data:`ufm.measure.candidates.FAMILIES`); None or ``"auto"`` =
            :func:`ufm.measure.candidates.default_family`. ``candidate_kind`` is its 0.2 name.
        seed: ``z_r`` and the candidates, from separate streams (:func:`derived_generator`), so
            ``z_r`` does not depend on K and the candidates not on N or R.
        alpha: level of the verdict (memorised when exposure p < alpha).
        cancel: a ``threading.Event`` or callable checked between forward passes; raises
            :class:`ufm.core.train.TrainingCancelled`.

    Returns:
        :class:`MScore`; ``status="inconclusive"`` when the family cannot give K distinct
        candidates that differ from the feature.

    Raises:
        FeatureError: the family does not apply to the feature, or the feature does not fit.
    """
    if candidate_kind is not None and family is not None and candidate_kind != family:
        raise ValueError(f"family={family!r} and candidate_kind={candidate_kind!r} disagree; pass only family")
    if candidates < 1:
        raise ValueError(f"candidates K must be >= 1, got {candidates}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    random_kind = _check_inputs(x_clean, feature, repeats, random_kind)
    family = resolve_family(feature, family if family is not None else candidate_kind)
    fwd = StampedForward(model, x_clean, batch_size, cancel)
    d_u, d_r = _effects(fwd, feature, repeats, random_kind, seed)
    x_u, x_r = float(np.mean(d_u)), float(np.mean(d_r))
    t_w, p_w, t_p, p_p = ttests(d_u, d_r)
    common = dict(d_u=d_u, d_r=d_r, X_u=x_u, X_r=x_r, M=x_u - x_r, p_value=p_w, p_value_paired=p_p, t_stat=t_w,
                  t_stat_paired=t_p, candidate_kind=family, random_kind=random_kind, alpha=alpha, family=family)
    try:
        cs = candidate_set(feature, candidates, family, tuple(x_clean.shape), derived_generator(seed, "candidates"))
    except CandidatesUnavailable as exc:
        return MScore(candidate_X=np.zeros(0), rank=0, exposure=float("nan"), exposure_p_value=float("nan"),
                      status="inconclusive", inconclusive_reason=str(exc), **common)
    kl = fwd.kl(candidate_stamps(cs, x_clean.device))
    cand_x = np.array([float(np.mean(row)) for row in kl])  # the same reduction as X_u, row by row
    rank, exposure, p_exp = exposure_test(x_u, cand_x)
    return MScore(candidate_X=cand_x, rank=rank, exposure=exposure, exposure_p_value=p_exp,
                  status="memorised" if p_exp < alpha else "not_shown", **common)


def model_learned(test_accuracy: float, y_test: torch.Tensor | np.ndarray | Sequence[int],
                  num_classes: int, max_p: float = 0.01) -> tuple[bool, str]:
    """Whether the model clearly beats always answering the test set's most common class.

    One-sided binomial test of ``round(test_accuracy * n)`` correct of ``n`` against the
    majority-class rate of ``y_test``. Returns ``(False, reason)`` when the accuracy is not above
    that rate or ``p > max_p``; ``(True, summary)`` otherwise. A model that did not learn says
    nothing about memorisation: its verdict is inconclusive.

    >>> model_learned(0.12, [0] * 10 + [1] * 90, 2)[0]
    False
    """
    y = np.asarray(y_test.cpu() if isinstance(y_test, torch.Tensor) else y_test, dtype=np.int64).ravel()
    n = int(y.size)
    if n == 0:
        raise ValueError("y_test is empty: need the test labels to judge whether the model learned")
    if num_classes < 2 or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"y_test labels must lie in 0..{num_classes - 1} with num_classes >= 2")
    if not 0 <= test_accuracy <= 1 or math.isnan(test_accuracy):
        raise ValueError(f"test_accuracy must be in [0, 1], got {test_accuracy}")
    majority = float(np.bincount(y, minlength=num_classes).max() / n)
    correct = int(round(test_accuracy * n))
    p = binomial_p_greater(correct, n, majority)
    if test_accuracy <= majority or p > max_p:
        return False, (f"the model did not learn: test accuracy {test_accuracy:.1%} is not clearly above the "
                       f"{majority:.1%} of always answering the most common class (binomial p = {p:.2g}, "
                       f"n = {n}); train longer or on more data before reading memorisation")
    return True, f"test accuracy {test_accuracy:.1%} vs {majority:.1%} majority class (binomial p = {p:.2g})"
