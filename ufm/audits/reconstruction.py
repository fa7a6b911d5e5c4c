"""The reconstruction variant of the one-run audit: each of ``m`` canary slots carries ONE of its
``k`` candidate features, drawn uniformly (seeded); the auditor guesses which, from the model.

All ``m * k`` candidates are distinct unique features (:func:`ufm.audits.privacy_audit.audit_features`,
each at its own random place); slot ``j``'s image is always stamped, with candidate
``c_j``. Neighbouring datasets therefore differ by *replacing* one slot's feature by another
(substitution), which is what the k-ary analysis (:mod:`ufm.audits.fdp`) bounds. The score of each
candidate is the same black-box label gain as the membership audit's (its slot's class, gain over
the other classes' mean), so ``scores`` is ``(m, k)``; the bound comes from
:func:`ufm.audits.selection.reconstruction_bound` (argmax guesses, abstention by margin).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np


def reconstruction_scores(exp: Any, m: int, k: int, *, feature_size: int = 7, progress: Callable[[Any], None] | None = None,
                          cancel: Any = None) -> dict[str, Any]:
    """Train ONE model on ``exp``'s training set with ``m`` slots of ``k`` candidates each and
    score every candidate.

    Returns:
        dict with ``scores`` ((m, k) float64, nats), ``truth`` ((m,) int, the drawn candidate of
        each slot), ``indices`` (m,), ``labels`` (m,), ``feature_names`` (m * k), ``test_accuracy``,
        ``claimed_epsilon`` (DP-SGD's accountant, else None), ``epochs_trained``, ``n_train``,
        ``train_seconds``, ``score_seconds``.
    """
    import torch

    from ufm.core.audit_canaries import _rng, audit_features, check_audit_canaries
    from ufm.core.canary import stamp_feature
    from ufm.core.data import ImageData, check_same_classes, train_val_split
    from ufm.core.experiment import _cached_split, inference_images, training_split
    from ufm.core.models import build_model
    from ufm.core.train import Progress, resolve_device, train, evaluate
    from ufm.measure.scores import class_gain, log_prob_gains

    if k < 2:
        raise ValueError(f"reconstruction needs at least 2 choices per slot (--choices), got {k}")
    report = progress or (lambda p: None)
    device = resolve_device(exp.device)
    full = training_split(exp)
    test = _cached_split(exp.dataset, "test", exp.data_dir, None)
    check_same_classes(full, test)
    n = len(full)
    check_audit_canaries(m, n, exp.val_fraction)
    feats = audit_features("random", m * k, feature_size, full.image_shape, seed=exp.seed, placement="random")
    idx = np.sort(_rng(exp.seed, "images").choice(n, size=m, replace=False)).astype(np.int64)
    truth = _rng(exp.seed, "reconstruction-draw").integers(0, k, size=m)
    x = full.x.clone()
    for j in range(m):
        x[idx[j]:idx[j] + 1] = stamp_feature(full.x[idx[j]:idx[j] + 1], feats[j * k + int(truth[j])])
    train_idx, val_idx = train_val_split(n, exp.val_fraction, exclude=idx, seed=exp.seed)
    stamped = ImageData(x, full.y, full.classes, full.name)
    train_data, val_data = stamped.subset(train_idx).to(device), stamped.subset(val_idx).to(device)
    ood = inference_images(exp).to(device)
    labels = full.y[torch.as_tensor(idx)].numpy()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        torch.manual_seed(exp.seed)
        c, h, w = train_data.image_shape
        model = build_model(exp.arch, c, (h, w), train_data.num_classes,
                            dropout=exp.dropout if "dropout" in exp.regularisers else 0.0,
                            batchnorm="batchnorm" in exp.regularisers).to(device)
        trained = train(model, train_data, val_data, exp.train_config(hflip=exp.dataset == "cifar10"),
                        progress=report, cancel=cancel)
        _, test_acc = evaluate(trained.model, test.to(device))
        t0 = time.perf_counter()
        report(Progress("score", 0, exp.epochs, message=f"scoring {m * k} candidate features"))
        gains = log_prob_gains(trained.model, ood.x, feats, cancel=cancel)
        scores = class_gain(gains, np.repeat(labels, k)).reshape(m, k)
        score_seconds = time.perf_counter() - t0
    finally:
        torch.use_deterministic_algorithms(prev_det)
    return {"scores": scores, "truth": truth, "indices": idx, "labels": labels,
            "feature_names": [f.name for f in feats], "test_accuracy": float(test_acc),
            "claimed_epsilon": None if trained.epsilon is None else float(trained.epsilon),
            "epochs_trained": trained.epochs_trained, "n_train": len(train_data),
            "train_seconds": float(trained.seconds), "score_seconds": score_seconds}
