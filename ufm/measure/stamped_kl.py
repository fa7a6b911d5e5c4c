"""The one float64 code path of every KL divergence and confidence gain ufm computes.

Every KL divergence, for ``z_u``, ``z_r`` and every candidate, comes from :class:`StampedForward`:
logits -> float64 -> log_softmax, each stamped set of images through the model on its own, so a
candidate whose stamped images equal ``x_u`` gives exactly ``X_u``, not ``X_u`` plus float32
rounding noise; ties are then real ties (see :mod:`ufm.measure.scores`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ufm.core.canary import random_patches, stamp
from ufm.core.features import Feature
from ufm.core.models import predict_logits
from ufm.core.train import CancelFlag, TrainingCancelled, is_cancelled
from ufm.measure.candidates import CandidateSet, derived_generator

PROB_FLOOR = 1e-12  # probabilities are clamped to this so KL stays finite


def kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor, eps: float = PROB_FLOOR) -> torch.Tensor:
    """Row-wise ``KL(p || q) = sum_k p_k (log p_k - log q_k)`` in nats, from (N, K) log-probabilities.

    Both are clamped below at ``log(eps)`` first (so a 0 in q where p > 0 gives a large finite
    number, not inf) and computed in float64. Returns (N,) float64, >= 0 up to rounding.
    """
    floor = math.log(eps)
    lp = log_p.double().clamp(min=floor)
    lq = log_q.double().clamp(min=floor)
    return (lp.exp() * (lp - lq)).sum(dim=1)


Stamp = tuple[torch.Tensor, tuple[int, int]] | None  # (patch, offset); None = the clean images


class StampedForward:
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


def feature_stamp(feature: Feature, device: torch.device | str) -> Stamp:
    return torch.from_numpy(feature.array()).to(device), feature.offset


def random_stamps(feature: Feature, n: int, repeats: int, random_kind: str, seed: int,
                  device: torch.device | str) -> list[Stamp]:
    gen = derived_generator(seed, "z_r")
    shape = tuple(feature.array().shape)
    out: list[Stamp] = []
    for _ in range(repeats):
        z = random_patches(n, shape, kind=random_kind, intensity=feature.intensity, generator=gen, device=device)
        out.append((z.unsqueeze(1) if z.ndim == 3 else z, feature.offset))  # one fresh patch per image
    return out


def candidate_stamps(cs: CandidateSet, device: torch.device | str) -> list[Stamp]:
    return [(cs.patches[j].to(device), cs.offsets[j]) for j in range(len(cs))]
