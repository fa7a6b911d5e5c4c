"""The memorisation score M and its tests (SPEC section 2).

Per out-of-distribution image ``x_c[i]``:

    d_u[i] = KL(f(x_c[i]) || f(x_u[i]))        x_u = x_c with the unique feature z_u
    d_r[i] = KL(f(x_c[i]) || f(x_r[i]))        x_r = x_c with a fresh random feature z_r

``X_u = mean(d_u)``, ``X_r = mean(d_r)`` (over images and R random draws), ``M = X_u - X_r``.

Two kinds of significance are reported:

* the paper's statistics: a one-tailed Welch t-test (``d_u`` vs all ``d_r``) and a one-tailed
  paired t-test (``d_u[i]`` vs ``mean_r d_r[i]``, which share ``x_c[i]``);
* the calibrated **exposure** test (Carlini et al. 2019): K fixed candidate features, each stamped
  on every image, give ``X_1..X_K``; the empirical p-value is ``(1 + #{X_j >= X_u}) / (K + 1)``.

The verdict uses the exposure p-value. The t-tests treat every image as an independent sample of
the *feature's* effect, but all images share one ``z_u``: a model that is, by chance, more
sensitive to that one pattern than to an average random pattern gives a tiny p-value with no
memorisation at all (reported in this project's issue tracker for an MNIST MLP with *no* canary:
M = 0.0024, t-test p = 0.0003, exposure p = 0.29). Under no memorisation ``z_u`` is just another
pattern, so its rank among candidate patterns is uniform, which is exactly what the exposure
p-value assumes. ``benchmarks/exposure_power.py`` measured both on 10 clean MNIST MLPs: the t-test
called 3 "significant" (p down to 6e-11), the exposure test none.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

from .canary import candidate_patches, random_patches, stamp, stamp_feature
from .features import Feature
from .models import predict_logits

PROB_FLOOR = 1e-12  # probabilities are clamped to this so KL stays finite


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
    p = p.double().clamp(min=eps)
    q = q.double().clamp(min=eps)
    return (p * (p.log() - q.log())).sum(dim=1)


def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Softmax outputs ``f(x)``, (N, K) float32, batched, in eval mode."""
    return predict_logits(model, x, batch_size).softmax(dim=1)


def _none_if_nan(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


@dataclass
class MScore:
    """Result of :func:`memorisation_score`.

    Attributes:
        d_u: (N,) KL divergences with the unique feature, nats.
        d_r: (R, N) KL divergences with random features, nats.
        X_u, X_r, M: means and their difference, nats.
        p_value: one-tailed Welch t-test, alternative X_u > X_r (the paper's test).
        p_value_paired: one-tailed paired t-test on d_u[i] - mean_r d_r[i].
        candidate_X: (K,) X for each candidate feature of the exposure test.
        rank: 1 + number of candidates with X_j >= X_u.
        exposure: log2(K + 1) - log2(rank), bits.
        exposure_p_value: rank / (K + 1); the verdict's test.
        alpha: significance level of the verdict.
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

    @property
    def significant(self) -> bool:
        """Memorised at level ``alpha`` by the calibrated exposure test."""
        return self.exposure_p_value < self.alpha

    @property
    def significant_ttest(self) -> bool:
        return self.p_value < self.alpha

    def verdict(self) -> str:
        k = len(self.candidate_X)
        pct = f"{self.alpha:.0%}"
        if self.significant:
            return (f"Memorised at the {pct} level: the model reacts more to the unique feature than to "
                    f"{k + 1 - self.rank} of {k} random candidate features (exposure p = {self.exposure_p_value:.3g}).")
        return (f"No evidence of memorisation at the {pct} level: the unique feature ranks {self.rank} of "
                f"{k + 1} among random candidate features (exposure p = {self.exposure_p_value:.3g}). "
                f"This does not prove the feature was not memorised; a stronger test needs more candidates "
                f"or inference images.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["d_u"] = self.d_u.tolist()
        d["d_r"] = self.d_r.tolist()
        d["candidate_X"] = self.candidate_X.tolist()
        for k in ("p_value", "p_value_paired", "t_stat", "t_stat_paired"):
            d[k] = _none_if_nan(d[k])
        d["significant"] = self.significant
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MScore":
        d = {k: v for k, v in d.items() if k != "significant"}
        for k in ("p_value", "p_value_paired", "t_stat", "t_stat_paired"):
            d[k] = float("nan") if d[k] is None else d[k]
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


def exposure_test(x_u: float, candidate_x: np.ndarray) -> tuple[int, float, float]:
    """Rank of ``x_u`` among candidates, its exposure (bits) and empirical p-value.

    ``rank = 1 + #{X_j >= X_u}`` (ties count against memorisation), ``p = rank / (K + 1)``,
    ``exposure = log2(K + 1) - log2(rank)``.

    >>> exposure_test(0.5, np.array([0.1, 0.2, 0.3]))
    (1, 2.0, 0.25)
    """
    k = int(candidate_x.size)
    if k < 1:
        raise ValueError("the exposure test needs at least one candidate feature")
    rank = 1 + int(np.sum(candidate_x >= x_u))
    return rank, math.log2(k + 1) - math.log2(rank), rank / (k + 1)


def _mean_kl(model: nn.Module, p_clean: torch.Tensor, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return kl_divergence(p_clean, predict_proba(model, x, batch_size))


def memorisation_score(model: nn.Module, x_clean: torch.Tensor, feature: Feature, *, repeats: int = 1,
                       random_kind: str | None = None, candidates: int = 99, candidate_kind: str = "permute",
                       seed: int = 0, alpha: float = 0.05, batch_size: int = 1024) -> MScore:
    """Black-box memorisation score of ``feature`` for ``model`` on inference images ``x_clean``.

    Args:
        model: classifier returning logits; put in eval mode for scoring.
        x_clean: (N, C, H, W) out-of-distribution images ``D_c`` on the model's device.
        feature: the unique feature ``z_u`` (pattern, offset, intensity).
        repeats: R, independent random features per image for ``X_r``.
        random_kind: ``"bernoulli"`` or ``"uniform"`` for ``z_r``; default Bernoulli(0.5) for a
            binary feature, uniform for a grey one.
        candidates: K fixed candidate features for the exposure test.
        candidate_kind: ``"permute"`` (rearrangements of the feature's own pixels, same ink),
            ``"bernoulli"`` or ``"uniform"``.
        seed: all random features and candidates.
        alpha: level of the verdict.

    Returns:
        :class:`MScore`.
    """
    if repeats < 1:
        raise ValueError(f"repeats R must be >= 1, got {repeats}")
    if x_clean.shape[0] < 2:
        raise ValueError("need at least 2 inference images for the t-tests")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    random_kind = random_kind or ("bernoulli" if feature.binary else "uniform")
    feature.check_fits(x_clean.shape)
    gen = torch.Generator().manual_seed(seed)
    n, c = x_clean.shape[:2]
    p_clean = predict_proba(model, x_clean, batch_size)

    d_u = _mean_kl(model, p_clean, stamp_feature(x_clean, feature), batch_size)
    pattern_shape = tuple(feature.array().shape)
    d_r = []
    for _ in range(repeats):
        z = random_patches(n, pattern_shape, kind=random_kind, intensity=feature.intensity, generator=gen,
                           device=x_clean.device)
        z = z.unsqueeze(1) if z.ndim == 3 else z  # (N, 1 or 3, h, w): one fresh patch per image
        d_r.append(_mean_kl(model, p_clean, stamp(x_clean, z, feature.offset), batch_size))
    d_u_np = d_u.cpu().numpy()
    d_r_np = torch.stack(d_r).cpu().numpy()

    cand = candidate_patches(feature, candidates, kind=candidate_kind, generator=gen)
    cand_x = np.array([_mean_kl(model, p_clean, stamp(x_clean, cand[j].to(x_clean.device), feature.offset),
                                batch_size).mean().item() for j in range(candidates)])

    x_u, x_r = float(d_u_np.mean()), float(d_r_np.mean())
    t_w, p_w, t_p, p_p = ttests(d_u_np, d_r_np)
    rank, exposure, p_exp = exposure_test(x_u, cand_x)
    return MScore(d_u_np, d_r_np, x_u, x_r, x_u - x_r, p_w, p_p, t_w, t_p, cand_x, candidate_kind, rank,
                  exposure, p_exp, random_kind, alpha)


# ------------------------------------------------------------------------- access settings (2023)

@dataclass
class GainStat:
    """Confidence gain ``g_k = mean(f(x_u)[k] - f(x_c)[k])`` with a paired one-tailed t-test (g > 0)."""

    label: int
    gain: float
    p_value: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "gain": self.gain, "p_value": _none_if_nan(self.p_value), "n": self.n}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GainStat":
        return cls(d["label"], d["gain"], float("nan") if d["p_value"] is None else d["p_value"], d["n"])


def confidence_gain(model: nn.Module, x_clean: torch.Tensor, feature: Feature, label: int,
                    batch_size: int = 1024) -> GainStat:
    """Gain in the probability of class ``label`` when ``feature`` is stamped on ``x_clean`` (N, C, H, W)."""
    if x_clean.shape[0] < 2:
        return GainStat(int(label), float("nan"), float("nan"), int(x_clean.shape[0]))
    pc = predict_proba(model, x_clean, batch_size)[:, label].double().cpu().numpy()
    pu = predict_proba(model, stamp_feature(x_clean, feature), batch_size)[:, label].double().cpu().numpy()
    with np.errstate(all="ignore"):
        p = stats.ttest_1samp(pu - pc, 0.0, alternative="greater").pvalue
    return GainStat(int(label), float(np.mean(pu - pc)), float(p), int(x_clean.shape[0]))


@dataclass
class AccessScores:
    """Statistics for the three access settings of the 2023 follow-up.

    Attributes:
        white_box: gain of the canary's class on held-out images of that class (label known);
            None when there is no canary label (the clean control without a class).
        grey_box: max over classes k of g_k computed on held-out images of class k (label unknown).
        grey_box_per_class: every g_k.
        black_box_gain: max over k of g_k on all out-of-distribution images.
    """

    white_box: GainStat | None
    grey_box: GainStat
    grey_box_per_class: list[GainStat]
    black_box_gain: GainStat
    canary_label: int | None = None

    @property
    def grey_box_points_at_canary(self) -> bool | None:
        return None if self.canary_label is None else self.grey_box.label == self.canary_label

    def to_dict(self) -> dict[str, Any]:
        return {"white_box": self.white_box.to_dict() if self.white_box else None,
                "grey_box": self.grey_box.to_dict(),
                "grey_box_per_class": [g.to_dict() for g in self.grey_box_per_class],
                "black_box_gain": self.black_box_gain.to_dict(), "canary_label": self.canary_label,
                "grey_box_points_at_canary": self.grey_box_points_at_canary}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AccessScores":
        return cls(GainStat.from_dict(d["white_box"]) if d.get("white_box") else None,
                   GainStat.from_dict(d["grey_box"]), [GainStat.from_dict(g) for g in d["grey_box_per_class"]],
                   GainStat.from_dict(d["black_box_gain"]), d.get("canary_label"))


def access_scores(model: nn.Module, feature: Feature, *, x_test: torch.Tensor, y_test: torch.Tensor,
                  x_ood: torch.Tensor, canary_label: int | None, batch_size: int = 1024) -> AccessScores:
    """White-, grey- and black-box confidence-gain statistics.

    Args:
        x_test, y_test: held-out images of the training domain (N, C, H, W) and labels (N,).
        x_ood: out-of-distribution images (M, C, H, W).
        canary_label: the canary's class, if known.
    """
    num_classes = int(predict_logits(model, x_ood[:1]).shape[1])
    per_class = [confidence_gain(model, x_test[y_test == k], feature, k, batch_size) for k in range(num_classes)]
    valid = [g for g in per_class if not math.isnan(g.gain)]
    grey = max(valid, key=lambda g: g.gain) if valid else per_class[0]
    white = per_class[canary_label] if canary_label is not None else None
    pc = predict_proba(model, x_ood, batch_size).double()
    pu = predict_proba(model, stamp_feature(x_ood, feature), batch_size).double()
    k_best = int((pu - pc).mean(0).argmax())
    black = confidence_gain(model, x_ood, feature, k_best, batch_size)
    return AccessScores(white, grey, per_class, black, canary_label)
