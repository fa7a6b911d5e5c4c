"""Stamping features onto images, random features ``z_r`` and the choice of canaries.

All functions are pure over tensors. Images are float ``(N, C, H, W)`` in ``[0, 1]``; patches
are ``(h, w)`` (same on every channel), ``(C, h, w)``, or per image ``(N, 1, h, w)`` /
``(N, C, h, w)``. Stamping is opaque: the patch replaces the pixels under it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ufm.core.canary_words import describe_canaries
from ufm.core.features import Feature

RANDOM_KINDS = ("bernoulli", "uniform")
# Candidate families of the exposure test (ufm.measure.candidates.FAMILIES) plus "auto" = by feature kind.
CANDIDATE_KINDS = ("auto", "permute", "strings", "strokes", "shift", "bernoulli", "uniform")
CANARY_MODES = ("index", "random", "class", "none")


def stamp(images: torch.Tensor, patch: torch.Tensor | np.ndarray, offset: tuple[int, int]) -> torch.Tensor:
    """Return a copy of ``images`` with ``patch`` pasted opaquely at ``offset = (row, col)``.

    Args:
        images: (N, C, H, W) float.
        patch: (h, w) or (C, h, w) for one patch on every image, or (N, 1, h, w) / (N, C, h, w)
            for one patch per image. A patch without channels (or with 1) goes on every channel.
        offset: top-left (row, col) of the patch.

    Returns:
        (N, C, H, W) tensor; ``images`` is not modified.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    p = torch.as_tensor(patch, dtype=images.dtype, device=images.device)
    ph, pw = p.shape[-2:]
    r, col = offset
    if r < 0 or col < 0 or r + ph > h or col + pw > w:
        raise ValueError(f"a {ph}x{pw} patch at (row {r}, col {col}) does not fit {h}x{w} images")
    if p.ndim == 2:
        p = p.expand(n, c, ph, pw)
    elif p.ndim == 3:
        if p.shape[0] not in (1, c):
            raise ValueError(f"a (C, h, w) patch must have 1 or {c} channels, got {tuple(p.shape)}; "
                             "pass per-image patches as (N, 1, h, w)")
        p = p.unsqueeze(0).expand(n, c, ph, pw)
    elif p.ndim == 4:
        if p.shape[0] != n or p.shape[1] not in (1, c):
            raise ValueError(f"per-image patches must be ({n}, 1 or {c}, h, w), got {tuple(p.shape)}")
        p = p.expand(n, c, ph, pw)
    else:
        raise ValueError(f"patch must have 2 to 4 dimensions, got shape {tuple(p.shape)}")
    out = images.clone()
    out[:, :, r:r + ph, col:col + pw] = p
    return out


def stamp_feature(images: torch.Tensor, feature: Feature) -> torch.Tensor:
    """Stamp ``feature`` (its pixels times its intensity) at its offset on every image."""
    feature.check_fits(images.shape)
    return stamp(images, torch.from_numpy(feature.array()), feature.offset)


def random_patches(n: int, shape: tuple[int, ...], *, kind: str = "bernoulli", intensity: float = 1.0,
                   generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` independent random features, shape ``(n, *shape)``, drawn afresh for every image.

    ``kind="bernoulli"``: each pixel is ``intensity`` with probability 0.5, else 0 (the paper's
    ``z_r`` for a binary feature); ``"uniform"``: ``intensity * U[0, 1]``. Drawn on the CPU with
    ``generator`` so the draws are the same on every device.
    """
    if kind not in RANDOM_KINDS:
        raise ValueError(f"unknown random feature kind {kind!r}; choose one of {', '.join(RANDOM_KINDS)}")
    u = torch.rand((n, *shape), generator=generator)
    z = (u < 0.5).float() if kind == "bernoulli" else u
    return (z * intensity).to(device)


def permuted_patches(patch: torch.Tensor | np.ndarray, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` random rearrangements of ``patch``'s own pixels, shape ``(n, *patch.shape)``.

    Each candidate has exactly the feature's ink (same multiset of pixel values), so it differs
    from ``z_u`` only in *where* the ink is. For a colour patch the pixel positions are permuted
    and each pixel keeps its colour.
    """
    p = torch.as_tensor(patch, dtype=torch.float32)
    h, w = p.shape[-2:]
    flat = p.reshape(-1, h * w) if p.ndim == 3 else p.reshape(1, h * w)
    perms = torch.argsort(torch.rand((n, h * w), generator=generator), dim=1)
    out = flat[:, perms].permute(1, 0, 2)  # (n, channels, h*w)
    return out.reshape(n, *p.shape)


@dataclass(frozen=True)
class CanaryChoice:
    """Which training images carry the feature.

    Attributes:
        mode: ``"index"`` (the images in ``indices``), ``"random"`` (``count`` images drawn with
            ``seed``), ``"class"`` (``count`` random images of class ``label``) or ``"none"``
            (the clean control: no canary).
        indices: training-set indices for ``mode="index"``.
        count: the canary frequency for ``random`` / ``class``.
        label: the class for ``mode="class"``.
    """

    mode: str = "index"
    indices: tuple[int, ...] = (0,)
    count: int = 1
    label: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in CANARY_MODES:
            raise ValueError(f"unknown canary mode {self.mode!r}; choose one of {', '.join(CANARY_MODES)}")
        object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))
        if self.mode == "index" and not self.indices:
            raise ValueError("canary mode 'index' needs at least one index (or use mode 'none' for the control)")
        if self.mode in ("random", "class") and self.count < 1:
            raise ValueError(f"canary count must be at least 1, got {self.count}")
        if self.mode == "class" and self.label is None:
            raise ValueError("canary mode 'class' needs a label (the class whose images carry the feature)")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "indices": list(self.indices), "count": self.count, "label": self.label}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CanaryChoice":
        return cls(mode=d["mode"], indices=tuple(d.get("indices", ())), count=d.get("count", 1), label=d.get("label"))

    def describe(self) -> str:
        return describe_canaries(self.mode, self.indices, self.count, self.label)


def choose_canaries(choice: CanaryChoice, labels: torch.Tensor | np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Training-set indices (sorted, int64) of the images that carry the feature.

    Args:
        labels: (N,) int labels of the training set the indices refer to.
        seed: draws for ``random`` / ``class`` modes.
    """
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    n = len(y)
    rng = np.random.default_rng(seed)
    if choice.mode == "none":
        return np.zeros(0, dtype=np.int64)
    if choice.mode == "index":
        idx = np.array(sorted(set(choice.indices)), dtype=np.int64)
        bad = idx[(idx < 0) | (idx >= n)]
        if bad.size:
            raise ValueError(f"canary index {int(bad[0])} is outside the training set of {n} images (0..{n - 1})")
        return idx
    pool = np.arange(n) if choice.mode == "random" else np.flatnonzero(y == choice.label)
    if choice.mode == "class" and pool.size == 0:
        raise ValueError(f"class {choice.label} has no training images; labels present: {sorted(set(y.tolist()))}")
    if choice.count > pool.size:
        raise ValueError(f"asked for {choice.count} canaries but only {pool.size} images are eligible")
    return np.sort(rng.choice(pool, size=choice.count, replace=False)).astype(np.int64)
