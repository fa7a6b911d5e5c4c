"""Which images: seeded index choices over a labelled set (the train/validation split, the
stratified subset ``--train-size`` keeps, the class-interleaved order of a gallery).

NumPy on label arrays (a tensor of labels is read on the CPU), so the choices can be tested without
images and are the same on any device.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def train_val_split(n: int, val_fraction: float, *, exclude: Sequence[int] | np.ndarray = (), seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into (train, validation) indices, both sorted.

    The validation set is the first ``round(val_fraction * n)`` entries of a seeded permutation
    of all ``n`` indices, skipping those in ``exclude`` (the canaries, which must be trained on).
    So the split depends only on ``seed`` except where a canary is *displaced* from the
    validation set (the next permuted index takes its place): a clean model and a canary model
    whose canary lies in the clean training part have identical splits, and two such canary
    models' training sets differ only in their stamped images.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {val_fraction}")
    excluded = np.zeros(n, dtype=bool)
    ex = np.asarray(exclude, dtype=np.int64).reshape(-1)
    if ex.size and (ex.min() < 0 or ex.max() >= n):
        raise ValueError(f"exclude holds indices outside 0..{n - 1}: {ex[(ex < 0) | (ex >= n)][:5].tolist()}")
    excluded[ex] = True
    n_val = int(round(val_fraction * n))
    if n_val < 1 or n_val >= n - int(excluded.sum()):
        raise ValueError(f"cannot take a validation split of {val_fraction:.0%} from {n} images; use more images")
    perm = np.random.default_rng(seed).permutation(n)
    val = np.sort(perm[~excluded[perm]][:n_val])
    return np.setdiff1d(np.arange(n), val), val


def stratified_indices(y: np.ndarray | torch.Tensor | Sequence[int], n: int, *, seed: int = 0) -> np.ndarray:
    """``n`` indices of ``y`` that keep every class in proportion (seeded), sorted ascending.

    What ``--train-size N`` keeps: the first N images of a set stored sorted by class (the chest
    X-rays) would all be of one class. Each class gets ``round(n * share)`` images (at least
    one; the rounding remainder goes to the largest shares), drawn without replacement by a
    permutation seeded with ``seed``. ``n >= len(y)`` keeps everything.

    Raises:
        ValueError: ``n`` is smaller than the number of classes (some class would be lost), or
            ``y`` holds a single class (a classifier needs two; the message says what to do).
    """
    labels = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y, dtype=np.int64).reshape(-1)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"the training images hold a single class ({classes.tolist()}): a classifier needs at "
                         "least two; use a dataset (or folder) with images of two or more classes")
    if n >= len(labels):
        return np.arange(len(labels))
    if n < len(classes):
        raise ValueError(f"train size {n} is smaller than the {len(classes)} classes: every class must keep at "
                         f"least one image; use a train size of at least {len(classes)}")
    share = counts / counts.sum() * n
    quota = np.maximum(1, np.floor(share).astype(np.int64))
    quota = np.minimum(quota, counts)
    # hand out what rounding down left over (or take back what "at least one" added), largest remainders first
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    k = 0
    while quota.sum() != n:
        c = order[k % len(order)]
        if quota.sum() < n and quota[c] < counts[c]:
            quota[c] += 1
        elif quota.sum() > n and quota[c] > 1:
            quota[c] -= 1
        k += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


def spread_indices(y: np.ndarray | torch.Tensor | Sequence[int], n: int, *, seed: int = 0) -> np.ndarray:
    """``n`` indices of ``y`` taken in turn from each class (seeded within a class), for galleries.

    The first indices of a set stored sorted by class (the chest X-rays: all "normal" first) show
    one class only; this shows every class, as evenly as the counts allow, in class-interleaved
    order (class 0, class 1, ..., class 0, ...). Fewer than ``n`` when ``y`` is shorter.
    """
    labels = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y, dtype=np.int64).reshape(-1)
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    out: list[int] = []
    while len(out) < min(n, len(labels)):
        for q in queues:
            if q and len(out) < n:
                out.append(int(q.pop(0)))
    return np.asarray(out, dtype=np.int64)
