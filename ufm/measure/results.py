"""The records the memorisation scores are kept as: :class:`MScore` (the paper's M and the
exposure test) and :class:`GainStat` / :class:`AccessScores` (the 2023 access settings), with
their JSON forms (NaN stored as null; 0.2 and 0.3 records still load).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

STATUSES = ("memorised", "not_shown", "inconclusive")


def _none_if_nan(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _nan_if_none(v: float | None) -> float:
    return float("nan") if v is None else float(v)


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
