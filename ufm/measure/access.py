"""Confidence-gain statistics of the three access settings of the 2023 follow-up (white, grey and
black box), each calibrated against the exposure test's candidate features, and the per-class
log-probability gains the privacy audit scores features by.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ufm.core.features import Feature
from ufm.core.models import predict_logits
from ufm.core.train import CancelFlag
from ufm.measure.candidates import CandidatesUnavailable, CandidateSet, candidate_set, derived_generator, resolve_family
from ufm.measure.results import AccessScores, GainStat
from ufm.measure.stamped_kl import StampedForward, candidate_stamps, feature_stamp
from ufm.measure.stats import one_sample_t_p, rank_p_value


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
    fwd = StampedForward(model, x_clean, batch_size, cancel)
    rows = [(lp - fwd.clean).mean(dim=0).cpu().numpy()
            for f in features for lp in fwd.log_probs([feature_stamp(f, x_clean.device)])]
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
    sets = [feature_stamp(feature, dev)] + (candidate_stamps(cs, dev) if cs is not None else [])
    onehot = np.eye(num_classes)[y_h]  # (n, classes): picks g_k of image i's own class k

    # per-class gains on held-out images: (P, classes); per-image diffs of z_u kept for the t-test
    per_class_gain, diffs_u = [], None
    if len(x_h):
        fwd = StampedForward(model, x_h, batch_size, cancel)
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
        paper = one_sample_t_p(diffs_u[y_h == k]) if diffs_u is not None and valid[k] else float("nan")
        per_class.append(GainStat(k, g, rank_p_value(g, None if cand_gains is None else cand_gains[:, k]),
                                  int(counts[k]), paper))
    if valid.any():
        grey_stat = np.nanmax(gains[:, valid], axis=1)  # (P,) the statistic for z_u and each candidate
        k_grey = int(np.flatnonzero(valid)[np.nanargmax(gains[0, valid])])
        grey = GainStat(k_grey, float(grey_stat[0]), rank_p_value(float(grey_stat[0]),
                        grey_stat[1:] if cs is not None else None), int(counts[k_grey]),
                        per_class[k_grey].p_value_paper)
    else:
        grey = GainStat(0, float("nan"), float("nan"), 0)
    white = per_class[canary_label] if canary_label is not None else None

    fwd_o = StampedForward(model, x_ood, batch_size, cancel)
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
    black = GainStat(k_best, float(black_stat[0]), rank_p_value(float(black_stat[0]),
                     black_stat[1:] if cs is not None else None), int(x_ood.shape[0]),
                     one_sample_t_p(diff_best[:, k_best]))
    return AccessScores(white, grey, per_class, black, canary_label, len(cs) if cs is not None else 0, family, reason)
