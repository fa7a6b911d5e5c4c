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
  ties (to a relative ``TIE_RTOL``) counted against memorisation.

The verdict uses the exposure p-value. The t-tests treat every image as an independent sample of
the *feature's* effect, but all images share one ``z_u``: a model that is, by chance, more
sensitive to that one pattern than to an average random pattern gives a tiny p-value with no
memorisation at all (reported in this project's issue tracker for an MNIST MLP with *no* canary:
M = 0.0024, t-test p = 0.0003, exposure p = 0.29). Under no memorisation ``z_u`` is just another
pattern, so its rank among candidate patterns is uniform, which is exactly what the exposure
p-value assumes. ``benchmarks/exposure_power.py`` measured both on 10 clean MNIST MLPs: the t-test
called 3 "significant" (p down to 6e-11), the exposure test none.

Every KL divergence, for ``z_u``, ``z_r`` and every candidate, comes from one float64 code path
(:func:`_Forward.kl`): logits -> float64 -> log_softmax, each forward pass the same shape (a group
of stamped copies of the inference set, padded with clean copies), so a candidate whose stamped
images equal ``x_u`` gives exactly ``X_u``, not ``X_u`` plus float32 rounding noise. Ties are then
real ties and count against memorisation. The candidates come from :mod:`ufm.measure.candidates`; when the
family cannot give K distinct candidates that differ from ``z_u`` (a solid feature, a tiny
feature), the fast test is *inconclusive*, never a verdict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from scipy import stats
from torch import nn

from ufm.core.canary import random_patches, stamp
from ufm.measure.candidates import CandidatesUnavailable, CandidateSet, candidate_set, derived_generator, resolve_family
from ufm.core.features import Feature
from ufm.core.models import predict_logits
from ufm.core.train import CancelFlag, TrainingCancelled, is_cancelled

PROB_FLOOR = 1e-12  # probabilities are clamped to this so KL stays finite
#: Relative tolerance of a tie in the rank tests: a candidate statistic within
#: ``TIE_RTOL * max(|a|, |b|, 1e-300)`` of the feature's counts as a tie, and ties count against
#: memorisation. Differences that small are float64 rounding, not evidence.
TIE_RTOL = 1e-9
STATUSES = ("memorised", "not_shown", "inconclusive")


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = PROB_FLOOR) -> torch.Tensor:
    """Row-wise ``KL(p || q) = sum_k p_k (log p_k - log q_k)`` in nats.

    Args:
        p, q: (N, K) probability vectors. Both are clamped to ``[eps, 1]`` first (so a 0 in q
            where p > 0 gives a large finite number, not inf) and computed in float64.

    Returns:
        (N,) float64, >= 0 up to rounding.

    >>> kl_divergence(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])).round(decimals=4)
    tensor([0.5108], dtype=torch.float64)
    """
    if p.shape != q.shape or p.ndim != 2:
        raise ValueError(f"p and q must both be (N, K), got {tuple(p.shape)} and {tuple(q.shape)}")
    return kl_from_log_probs(p.double().clamp(min=eps).log(), q.double().clamp(min=eps).log(), eps)


def kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor, eps: float = PROB_FLOOR) -> torch.Tensor:
    """Row-wise KL from (N, K) log-probabilities, float64; both clamped below at ``log(eps)``."""
    floor = math.log(eps)
    lp = log_p.double().clamp(min=floor)
    lq = log_q.double().clamp(min=floor)
    return (lp.exp() * (lp - lq)).sum(dim=1)


def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Softmax outputs ``f(x)``, (N, K) float32, batched, in eval mode."""
    return predict_logits(model, x, batch_size).softmax(dim=1)


def _none_if_nan(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _nan_if_none(v: float | None) -> float:
    return float("nan") if v is None else float(v)


# ------------------------------------------------------------------------- one float64 code path

Stamp = tuple[torch.Tensor, tuple[int, int]] | None  # (patch, offset); None = the clean images


class _Forward:
    """Log-probabilities of stamped copies of one image set, every forward pass the same shape.

    Each stamped set (the N images with one patch) goes through the model on its own, chunked by
    ``batch_size``: every set meets the same kernels in the same call shapes, so identical stamped
    images give bit-identical float64 log-probabilities, and no image is computed twice. (Stacking
    several sets per call and padding the last group to a fixed shape gives the same guarantee but
    multiplies the work of single sets by up to batch_size / N: 20x for 50 inference images.)
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, batch_size: int, cancel: CancelFlag = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.x, self.batch_size, self.cancel = model, x, batch_size, cancel
        self.n = int(x.shape[0])
        self.group = 1
        self.clean = self.log_probs([None])[0]

    def _stamped(self, s: Stamp) -> torch.Tensor:
        return self.x if s is None else stamp(self.x, s[0], s[1])

    def log_probs(self, sets: Sequence[Stamp]) -> list[torch.Tensor]:
        """(N, K) float64 log-probabilities for each stamped set."""
        out: list[torch.Tensor] = []
        for g in range(0, len(sets), self.group):
            if is_cancelled(self.cancel):
                raise TrainingCancelled("cancelled while scoring")
            chunk = list(sets[g:g + self.group])
            padded = chunk + [None] * (self.group - len(chunk))
            x = torch.cat([self._stamped(s) for s in padded])
            lp = predict_logits(self.model, x, self.batch_size).double().log_softmax(dim=1)
            out.extend(lp[i * self.n:(i + 1) * self.n] for i in range(len(chunk)))
        return out

    def kl(self, sets: Sequence[Stamp]) -> np.ndarray:
        """(P, N) float64 ``KL(f(x_c[i]) || f(stamped_p[i]))``, nats."""
        if not sets:
            return np.zeros((0, self.n))
        return np.stack([kl_from_log_probs(self.clean, lp).cpu().numpy() for lp in self.log_probs(sets)])


def _feature_stamp(feature: Feature, device: torch.device | str) -> Stamp:
    return torch.from_numpy(feature.array()).to(device), feature.offset


def _random_stamps(feature: Feature, n: int, repeats: int, random_kind: str, seed: int,
                   device: torch.device | str) -> list[Stamp]:
    gen = derived_generator(seed, "z_r")
    shape = tuple(feature.array().shape)
    out: list[Stamp] = []
    for _ in range(repeats):
        z = random_patches(n, shape, kind=random_kind, intensity=feature.intensity, generator=gen, device=device)
        out.append((z.unsqueeze(1) if z.ndim == 3 else z, feature.offset))  # one fresh patch per image
    return out


def _candidate_stamps(cs: CandidateSet, device: torch.device | str) -> list[Stamp]:
    return [(cs.patches[j].to(device), cs.offsets[j]) for j in range(len(cs))]


def _effects(fwd: _Forward, feature: Feature, repeats: int, random_kind: str,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
    dev = fwd.x.device
    kl = fwd.kl([_feature_stamp(feature, dev)] + _random_stamps(feature, fwd.n, repeats, random_kind, seed, dev))
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
    return _effects(_Forward(model, x_clean, batch_size), feature, repeats, random_kind, seed)


# ------------------------------------------------------------------------- the score and its tests

@dataclass
class MScore:
    """Result of :func:`memorisation_score`.

    Attributes:
        d_u: (N,) KL divergences with the unique feature, nats.
        d_r: (R, N) KL divergences with random features, nats.
        X_u, X_r, M: means and their difference, nats.
        p_value: one-tailed Welch t-test, alternative X_u > X_r (the paper's test).
        p_value_paired: one-tailed paired t-test on d_u[i] - mean_r d_r[i].
        candidate_X: (K,) X for each candidate feature of the exposure test (empty when inconclusive).
        candidate_kind: the candidate family (the 0.2 name of :attr:`family`).
        rank: 1 + number of candidates with X_j >= X_u (ties within ``TIE_RTOL``); 0 when inconclusive.
        exposure: log2(K + 1) - log2(rank), bits (NaN when inconclusive).
        exposure_p_value: rank / (K + 1); the fast test's p-value (NaN when inconclusive).
        alpha: significance level of the verdict.
        status: ``"memorised"`` (exposure p < alpha), ``"not_shown"`` or ``"inconclusive"`` (the
            fast test could not run; see ``inconclusive_reason``).
        family: the candidate family.
    """

    d_u: np.ndarray
    d_r: np.ndarray
    X_u: float
    X_r: float
    M: float
    p_value: float
    p_value_paired: float
    t_stat: float
    t_stat_paired: float
    candidate_X: np.ndarray
    candidate_kind: str
    rank: int
    exposure: float
    exposure_p_value: float
    random_kind: str
    alpha: float = 0.05
    status: str = ""
    inconclusive_reason: str | None = None
    family: str = ""

    def __post_init__(self) -> None:
        if not self.status:  # a result stored before 0.3: the exposure test always ran
            self.status = "memorised" if self.exposure_p_value < self.alpha else "not_shown"
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {self.status!r}")
        self.family = self.family or self.candidate_kind

    @property
    def significant(self) -> bool:
        """Memorised at level ``alpha`` by the fast exposure test (``status == "memorised"``)."""
        return self.status == "memorised"

    @property
    def inconclusive(self) -> bool:
        return self.status == "inconclusive"

    @property
    def significant_ttest(self) -> bool:
        return self.p_value < self.alpha

    def verdict(self) -> str:
        k = len(self.candidate_X)
        pct = f"{self.alpha:.0%}"
        if self.status == "inconclusive":
            # no "Inconclusive:" prefix: ufm.measure.verdict puts the headline in front of this text
            return f"No verdict from the fast exposure test: {self.inconclusive_reason}"
        if self.status == "memorised":
            return (f"Memorised at the {pct} level by the fast exposure test: the model reacts more to the unique "
                    f"feature than to {k + 1 - self.rank} of {k} candidate features ({self.family}) "
                    f"(exposure p = {self.exposure_p_value:.3g}).")
        return (f"No evidence of memorisation at the {pct} level from the fast exposure test: the unique feature "
                f"ranks {self.rank} of {k + 1} among candidate features ({self.family}) "
                f"(exposure p = {self.exposure_p_value:.3g}). This does not prove the feature was not memorised; "
                f"a stronger test needs more candidates or inference images.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["d_u"] = self.d_u.tolist()
        d["d_r"] = self.d_r.tolist()
        d["candidate_X"] = self.candidate_X.tolist()
        for k in ("p_value", "p_value_paired", "t_stat", "t_stat_paired", "exposure", "exposure_p_value"):
            d[k] = _none_if_nan(d[k])
        d["significant"] = self.significant
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MScore":
        """Inverse of :meth:`to_dict`; also loads 0.2 dicts (no status/family: derived)."""
        d = {k: v for k, v in d.items() if k != "significant"}
        for k in ("p_value", "p_value_paired", "t_stat", "t_stat_paired", "exposure", "exposure_p_value"):
            d[k] = _nan_if_none(d.get(k))
        d["d_u"] = np.asarray(d["d_u"], dtype=np.float64)
        d["d_r"] = np.asarray(d["d_r"], dtype=np.float64).reshape(-1, len(d["d_u"]))
        d["candidate_X"] = np.asarray(d["candidate_X"], dtype=np.float64)
        return cls(**d)


def ttests(d_u: np.ndarray, d_r: np.ndarray) -> tuple[float, float, float, float]:
    """(t, p) of the one-tailed Welch test and of the paired test, alternative d_u > d_r.

    ``d_u``: (N,); ``d_r``: (R, N). Returns ``(t_welch, p_welch, t_paired, p_paired)``.
    """
    d_r = np.atleast_2d(d_r)
    with np.errstate(all="ignore"):
        welch = stats.ttest_ind(d_u, d_r.ravel(), equal_var=False, alternative="greater")
        paired = stats.ttest_rel(d_u, d_r.mean(axis=0), alternative="greater")
    return float(welch.statistic), float(welch.pvalue), float(paired.statistic), float(paired.pvalue)


def rank_against(x_u: float, candidate_x: np.ndarray, rtol: float = TIE_RTOL) -> int:
    """``1 + #{j : X_j >= X_u - rtol * max(|X_u|, |X_j|, 1e-300)}``: ties count against ``x_u``."""
    c = np.asarray(candidate_x, dtype=np.float64)
    scale = np.maximum(np.maximum(abs(x_u), np.abs(c)), 1e-300)
    return 1 + int(np.sum(c >= x_u - rtol * scale))


def exposure_test(x_u: float, candidate_x: np.ndarray, rtol: float = TIE_RTOL) -> tuple[int, float, float]:
    """Rank of ``x_u`` among candidates, its exposure (bits) and empirical p-value.

    ``rank = 1 + #{X_j >= X_u - rtol * max(|X_u|, |X_j|, 1e-300)}``: exact ties, and differences
    within the relative tolerance ``rtol`` (default ``TIE_RTOL = 1e-9``, far below any real effect
    and far above float64 rounding of a mean KL), count against memorisation.
    ``p = rank / (K + 1)``, ``exposure = log2(K + 1) - log2(rank)``.

    >>> exposure_test(0.5, np.array([0.1, 0.2, 0.3]))
    (1, 2.0, 0.25)
    >>> exposure_test(0.5, np.array([0.5 * (1 - 1e-12), 0.2, 0.3]))[0]  # a near-tie counts against
    2
    """
    k = int(np.asarray(candidate_x).size)
    if k < 1:
        raise ValueError("the exposure test needs at least one candidate feature")
    rank = rank_against(x_u, candidate_x, rtol)
    return rank, math.log2(k + 1) - math.log2(rank), rank / (k + 1)


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
    fwd = _Forward(model, x_clean, batch_size, cancel)
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
    kl = fwd.kl(_candidate_stamps(cs, x_clean.device))
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
    p = float(stats.binomtest(correct, n, majority, alternative="greater").pvalue) if majority < 1 else 1.0
    if test_accuracy <= majority or p > max_p:
        return False, (f"the model did not learn: test accuracy {test_accuracy:.1%} is not clearly above the "
                       f"{majority:.1%} of always answering the most common class (binomial p = {p:.2g}, "
                       f"n = {n}); train longer or on more data before reading memorisation")
    return True, f"test accuracy {test_accuracy:.1%} vs {majority:.1%} majority class (binomial p = {p:.2g})"


# ------------------------------------------------------------------------- access settings (2023)

@dataclass
class GainStat:
    """Confidence gain ``g_k = mean(f(x_u)[k] - f(x_c)[k])`` of class ``label`` on ``n`` images.

    Attributes:
        p_value: calibrated: ``rank / (K + 1)`` of the feature's statistic among the same statistic
            for the K candidate features on the same images (ties against); NaN when not computed.
        p_value_paper: the paper's one-tailed paired t-test (g > 0); it treats the images as
            independent samples of one pattern's effect and flags clean models.
    """

    label: int
    gain: float
    p_value: float
    n: int
    p_value_paper: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "gain": _none_if_nan(self.gain), "p_value": _none_if_nan(self.p_value),
                "n": self.n, "p_value_paper": _none_if_nan(self.p_value_paper)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GainStat":
        if "p_value_paper" not in d:  # 0.2 stored only the t-test, under p_value
            return cls(d["label"], _nan_if_none(d["gain"]), float("nan"), d["n"], _nan_if_none(d["p_value"]))
        return cls(d["label"], _nan_if_none(d["gain"]), _nan_if_none(d["p_value"]), d["n"],
                   _nan_if_none(d["p_value_paper"]))


def _paper_p(diff: np.ndarray) -> float:
    if diff.size < 2:
        return float("nan")
    with np.errstate(all="ignore"):
        return float(stats.ttest_1samp(diff, 0.0, alternative="greater").pvalue)


def confidence_gain(model: nn.Module, x_clean: torch.Tensor, feature: Feature, label: int,
                    batch_size: int = 1024) -> GainStat:
    """Gain in the probability of class ``label`` when ``feature`` is stamped on ``x_clean`` (N, C, H, W),
    with the paper's t-test (``p_value_paper``); ``p_value`` is NaN (calibration needs candidates,
    see :func:`access_scores`)."""
    if x_clean.shape[0] < 2:
        return GainStat(int(label), float("nan"), float("nan"), int(x_clean.shape[0]))
    fwd = _Forward(model, x_clean, batch_size)
    pu = fwd.log_probs([_feature_stamp(feature, x_clean.device)])[0].exp()
    diff = (pu - fwd.clean.exp())[:, label].cpu().numpy()
    return GainStat(int(label), float(np.mean(diff)), float("nan"), int(x_clean.shape[0]), _paper_p(diff))


def log_prob_gains(model: nn.Module, x_clean: torch.Tensor, features: Sequence[Feature], *,
                   batch_size: int = 1024, cancel: CancelFlag = None) -> np.ndarray:
    """Mean log-probability gain of every class when each feature is stamped on ``x_clean``.

    ``G[j, k] = mean_i (log f(x_i + z_j)[k] - log f(x_i)[k])`` over the N images, float64 nats
    (the label-known variant of the 2022 reference code, ``mean(-log f(x_r)[y]) -
    mean(-log f(x_u)[y])``, read against the clean images). The clean pass is made once for all
    features, each stamped set through the same code path as :func:`feature_effect`.

    Args:
        x_clean: (N, C, H, W) images on the model's device.
        features: F features that fit the images.

    Returns:
        (F, K) float64.
    """
    for f in features:
        f.check_fits(x_clean.shape)
    fwd = _Forward(model, x_clean, batch_size, cancel)
    rows = [(lp - fwd.clean).mean(dim=0).cpu().numpy()
            for f in features for lp in fwd.log_probs([_feature_stamp(f, x_clean.device)])]
    return np.stack(rows) if rows else np.zeros((0, int(fwd.clean.shape[1])))


def class_gain(gains: np.ndarray, labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """How much each feature moves the model towards its own class: ``G[j, y_j]`` minus the mean
    of ``G[j, k]`` over the other classes ``k != y_j`` (nats). Stamping ink shifts every class's
    log-probability in the same direction by a feature-dependent amount (a white patch makes
    most digit classifiers favour one class); subtracting the other classes' mean leaves the
    part aimed at ``y_j``.

    Args:
        gains: (F, K) from :func:`log_prob_gains`.
        labels: (F,) a class per feature.

    Returns:
        (F,) float64.
    """
    g = np.asarray(gains, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).ravel()
    if g.ndim != 2 or g.shape[0] != y.size or g.shape[1] < 2:
        raise ValueError(f"need (F, K >= 2) gains and F labels, got {g.shape} and {y.size}")
    if y.size and (y.min() < 0 or y.max() >= g.shape[1]):
        raise ValueError(f"labels must be classes 0..{g.shape[1] - 1}")
    own = g[np.arange(y.size), y]
    return own - (g.sum(axis=1) - own) / (g.shape[1] - 1)


@dataclass
class AccessScores:
    """Statistics for the three access settings of the 2023 follow-up.

    Attributes:
        white_box: gain of the canary's class on held-out images of that class (label known);
            None when there is no canary label (the clean control without a class).
        grey_box: max over classes k of g_k computed on held-out images of class k (label unknown);
            its calibrated p-value ranks that maximum among the candidates' maxima.
        grey_box_per_class: every g_k, each calibrated on its own.
        black_box_gain: max over k of g_k on all out-of-distribution images.
        candidates, family: the K candidate features the p-values are calibrated against.
        inconclusive_reason: why calibrated p-values are NaN (the family cannot give K candidates).
    """

    white_box: GainStat | None
    grey_box: GainStat
    grey_box_per_class: list[GainStat]
    black_box_gain: GainStat
    canary_label: int | None = None
    candidates: int = 0
    family: str = ""
    inconclusive_reason: str | None = None

    @property
    def grey_box_points_at_canary(self) -> bool | None:
        return None if self.canary_label is None else self.grey_box.label == self.canary_label

    def to_dict(self) -> dict[str, Any]:
        return {"white_box": self.white_box.to_dict() if self.white_box else None,
                "grey_box": self.grey_box.to_dict(),
                "grey_box_per_class": [g.to_dict() for g in self.grey_box_per_class],
                "black_box_gain": self.black_box_gain.to_dict(), "canary_label": self.canary_label,
                "grey_box_points_at_canary": self.grey_box_points_at_canary, "candidates": self.candidates,
                "family": self.family, "inconclusive_reason": self.inconclusive_reason}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AccessScores":
        return cls(GainStat.from_dict(d["white_box"]) if d.get("white_box") else None,
                   GainStat.from_dict(d["grey_box"]), [GainStat.from_dict(g) for g in d["grey_box_per_class"]],
                   GainStat.from_dict(d["black_box_gain"]), d.get("canary_label"), d.get("candidates", 0),
                   d.get("family", ""), d.get("inconclusive_reason"))


def _calibrated_p(u: float, cand: np.ndarray | None) -> float:
    if cand is None or math.isnan(u):
        return float("nan")
    return rank_against(u, cand) / (len(cand) + 1)


def access_scores(model: nn.Module, feature: Feature, *, x_test: torch.Tensor, y_test: torch.Tensor,
                  x_ood: torch.Tensor, canary_label: int | None, candidates: int = 99, family: str | None = None,
                  seed: int = 0, max_per_class: int = 100, batch_size: int = 1024,
                  cancel: CancelFlag = None) -> AccessScores:
    """White-, grey- and black-box confidence-gain statistics with calibrated p-values.

    Each statistic (white: ``g_y`` on held-out images of the canary's class; grey: ``max_k g_k``
    with ``g_k`` on held-out images of class k; black: ``max_k g_k`` on the OOD images) is ranked
    among the same statistic for the K candidate features of the exposure test (same family, same
    ``seed``, so the same candidates) on the same images; ties count against. The paper's t-test
    stays as ``p_value_paper``.

    Args:
        x_test, y_test: held-out images of the training domain (N, C, H, W) and labels (N,); the
            first ``max_per_class`` images of each class are used, which bounds the cost.
        x_ood: out-of-distribution images (M, C, H, W).
        canary_label: the canary's class, if known.
        candidates, family, seed: as for :func:`memorisation_score`.
        cancel: checked between forward passes; raises :class:`ufm.core.train.TrainingCancelled`.
    """
    if max_per_class < 2:
        raise ValueError(f"max_per_class must be >= 2 (the t-test needs two images), got {max_per_class}")
    feature.check_fits(x_ood.shape)
    family = resolve_family(feature, family)
    num_classes = int(predict_logits(model, x_ood[:1]).shape[1])
    y = y_test.to(x_test.device)
    idx = torch.cat([torch.nonzero(y == k).flatten()[:max_per_class] for k in range(num_classes)])
    x_h, y_h = x_test[idx], y[idx].cpu().numpy()
    counts = np.bincount(y_h, minlength=num_classes)
    valid = counts >= 2
    try:
        cs: CandidateSet | None = candidate_set(feature, candidates, family, tuple(x_ood.shape),
                                                derived_generator(seed, "candidates"))
        reason = None
    except CandidatesUnavailable as exc:
        cs, reason = None, str(exc)
    dev = x_test.device
    sets = [_feature_stamp(feature, dev)] + (_candidate_stamps(cs, dev) if cs is not None else [])
    onehot = np.eye(num_classes)[y_h]  # (n, classes): picks g_k of image i's own class k

    # per-class gains on held-out images: (P, classes); per-image diffs of z_u kept for the t-test
    per_class_gain, diffs_u = [], None
    if len(x_h):
        fwd = _Forward(model, x_h, batch_size, cancel)
        p_c = fwd.clean.exp()
        for j, lp in enumerate(fwd.log_probs(sets)):
            d = ((lp.exp() - p_c).cpu().numpy() * onehot).sum(1)  # g of each image's own class
            if j == 0:
                diffs_u = d
            sums = np.bincount(y_h, weights=d, minlength=num_classes)
            with np.errstate(all="ignore"):
                per_class_gain.append(np.where(valid, sums / np.maximum(counts, 1), np.nan))
    gains = np.array(per_class_gain) if per_class_gain else np.full((len(sets), num_classes), np.nan)
    cand_gains = gains[1:] if cs is not None else None

    per_class = []
    for k in range(num_classes):
        g = float(gains[0, k])
        paper = _paper_p(diffs_u[y_h == k]) if diffs_u is not None and valid[k] else float("nan")
        per_class.append(GainStat(k, g, _calibrated_p(g, None if cand_gains is None else cand_gains[:, k]),
                                  int(counts[k]), paper))
    if valid.any():
        grey_stat = np.nanmax(gains[:, valid], axis=1)  # (P,) the statistic for z_u and each candidate
        k_grey = int(np.flatnonzero(valid)[np.nanargmax(gains[0, valid])])
        grey = GainStat(k_grey, float(grey_stat[0]), _calibrated_p(float(grey_stat[0]),
                        grey_stat[1:] if cs is not None else None), int(counts[k_grey]),
                        per_class[k_grey].p_value_paper)
    else:
        grey = GainStat(0, float("nan"), float("nan"), 0)
    white = per_class[canary_label] if canary_label is not None else None

    fwd_o = _Forward(model, x_ood, batch_size, cancel)
    p_o = fwd_o.clean.exp()
    ood_gains, diff_best = [], None
    for j, lp in enumerate(fwd_o.log_probs(sets)):
        diff = (lp.exp() - p_o).cpu().numpy()
        ood_gains.append(diff.mean(axis=0))
        if j == 0:
            diff_best = diff
    ood = np.array(ood_gains)  # (P, classes)
    k_best = int(np.argmax(ood[0]))
    black_stat = ood.max(axis=1)
    black = GainStat(k_best, float(black_stat[0]), _calibrated_p(float(black_stat[0]),
                     black_stat[1:] if cs is not None else None), int(x_ood.shape[0]),
                     _paper_p(diff_best[:, k_best]))
    return AccessScores(white, grey, per_class, black, canary_label, len(cs) if cs is not None else 0, family, reason)
