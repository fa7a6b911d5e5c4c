"""The data of one experiment: the cached splits and inference set, the checks made before a run is
recorded, and the tensors a run trains on (canaries stamped, validation split off).

:func:`prepare_data` for a memorisation run (one feature on the chosen canaries);
:func:`ufm.core.audit_canaries.prepare_audit_data` for a privacy-audit run builds on the same caches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ufm.core.audit_canaries import AuditDraw, check_audit_canaries, draw
from ufm.core.canary import choose_canaries, stamp_feature
from ufm.core.data import ImageData, check_same_classes, load_ood, load_split
from ufm.core.sampling import train_val_split

if TYPE_CHECKING:
    from ufm.core.experiment_config import ExperimentConfig


@functools.lru_cache(maxsize=8)
def _cached_split(dataset: str, split: str, data_dir: str | None, limit: int | None,
                  stratified: bool = False) -> ImageData:
    return load_split(dataset, split, data_dir=data_dir, limit=limit, stratified=stratified)


@functools.lru_cache(maxsize=4)
def _cached_ood(dataset: str, shape: tuple[int, int, int], n: int, source: str | None,
                data_dir: str | None) -> ImageData:
    return load_ood(dataset, shape, n, source=source, data_dir=data_dir)


def training_split(config: ExperimentConfig) -> ImageData:
    """The clean training images of ``config`` (``train_size`` of them, every class kept in proportion:
    :func:`ufm.core.data.stratified_indices`), on the CPU; cached, do not modify."""
    return _cached_split(config.dataset, "train", config.data_dir, config.train_size, True)


def inference_images(config: ExperimentConfig, n: int | None = None) -> ImageData:
    """The first ``n`` (default ``ood_size``) out-of-distribution images of ``config``, in the
    model's input shape, on the CPU; cached, do not modify."""
    n = config.ood_size if n is None else n
    shape = training_split(config).image_shape
    return _cached_ood(config.dataset, shape, max(n, config.ood_size), config.ood_source, config.data_dir).subset(slice(0, n))


def check_data(config: ExperimentConfig) -> None:
    """Refuse, before a run is recorded or trained, what the data cannot give: more training
    images than the dataset has (a run would silently use fewer), more inference images than the
    OOD source has, a feature that does not fit the images, canaries the training set cannot give
    (an index beyond it, a class without images, more than it holds). What it loads is cached for the run
    that follows in this process.

    Raises:
        ValueError, DataUnavailable: one line saying what to change.
    """
    full = training_split(config)
    if config.train_size is not None and len(full) < config.train_size:
        raise ValueError(f"--train-size {config.train_size} is more than the {len(full)} training images of "
                         f"{config.dataset}: give at most {len(full)}, or leave it out to use them all")
    config.feature.check_fits(full.x.shape)
    choose_canaries(config.canary, full.y, seed=config.seed)  # an index beyond the set, a class without images
    check_audit(config)
    _cached_ood(config.dataset, full.image_shape, config.ood_size, config.ood_source, config.data_dir)


def check_audit(config: ExperimentConfig) -> None:
    """For a privacy-audit run: refuse more canaries than the training set holds and features that
    do not fit the images (nothing for other runs). Part of :func:`check_data`.

    Raises:
        ValueError, FeatureError, DataUnavailable: one line saying what to change.
    """
    if config.audit is not None:
        full = training_split(config)
        check_audit_canaries(config.audit.canaries, len(full), config.val_fraction)
        draw(config.audit, full.image_shape, full.y, config.seed)


@dataclass
class PreparedData:
    """The tensors of one experiment, on its device: training set with canaries stamped, etc."""

    train: ImageData
    val: ImageData
    test: ImageData
    ood: ImageData
    canary_indices: np.ndarray  # indices into the (first train_size) training set
    train_indices: np.ndarray   # which of those images are trained on (the rest is validation)
    canary_labels: list[int]
    notes: list[str] = field(default_factory=list)  # see Result.notes
    audit: AuditDraw | None = None  # the drawn canaries of a privacy-audit run


def prepare_data(config: ExperimentConfig, device: torch.device | str = "cpu") -> PreparedData:
    """Load the data of ``config``, stamp the canaries and split off the validation set."""
    if config.audit is not None:
        return prepare_audit_data(config, device)
    full = training_split(config)
    test = _cached_split(config.dataset, "test", config.data_dir, None)
    config.feature.check_fits(full.x.shape)
    if test.image_shape != full.image_shape:
        raise ValueError(f"train images are {full.image_shape} but test images are {test.image_shape}")
    check_same_classes(full, test)
    notes = []
    if config.train_size is not None and len(full) < config.train_size:
        notes.append(f"train_size {config.train_size} asked for more images than {config.dataset} has: "
                     f"used all {len(full)} (training + validation)")
    ood = _cached_ood(config.dataset, full.image_shape, config.ood_size, config.ood_source, config.data_dir)
    canaries = choose_canaries(config.canary, full.y, seed=config.seed)
    x = full.x.clone()
    if canaries.size:
        x[canaries] = stamp_feature(full.x[canaries], config.feature)
    train_idx, val_idx = train_val_split(len(full), config.val_fraction, exclude=canaries, seed=config.seed)
    stamped = ImageData(x, full.y, full.classes, full.name)
    return PreparedData(stamped.subset(train_idx).to(device), stamped.subset(val_idx).to(device),
                        test.to(device), ood.to(device), canaries, train_idx,
                        full.y[torch.as_tensor(canaries, dtype=torch.long)].tolist(), notes)


def prepare_audit_data(config: ExperimentConfig, device: torch.device | str = "cpu") -> PreparedData:
    """The data of a privacy-audit run (``config.audit`` set): the m canaries drawn
    (:func:`ufm.core.audit_canaries.draw`), the IN ones stamped with their own feature, all m images
    kept out of validation whatever their draw (the draw changes only them), and with
    ``out_mode="removed"`` the OUT images left out of training.

    Raises:
        ValueError / FeatureError / DataUnavailable: m larger than the training set allows,
            features that do not fit; the message says what to do.
    """
    spec = config.audit
    full = training_split(config)
    test = _cached_split(config.dataset, "test", config.data_dir, None)
    check_same_classes(full, test)
    n = len(full)
    check_audit_canaries(spec.canaries, n, config.val_fraction)
    canaries = draw(spec, full.image_shape, full.y, config.seed)
    idx = canaries.indices
    x = full.x.clone()
    for j in np.flatnonzero(canaries.is_in):
        x[idx[j]:idx[j] + 1] = stamp_feature(full.x[idx[j]:idx[j] + 1], canaries.stamped(j))
    train_idx, val_idx = train_val_split(n, config.val_fraction, exclude=idx, seed=config.seed)
    if spec.out_mode == "removed":
        train_idx = np.setdiff1d(train_idx, idx[~canaries.is_in])
    notes = []
    if config.train_size is not None and n < config.train_size:
        notes.append(f"train_size {config.train_size} asked for more images than {config.dataset} has: "
                     f"used all {n} (training + validation)")
    stamped = ImageData(x, full.y, full.classes, full.name)
    return PreparedData(stamped.subset(train_idx).to(device), stamped.subset(val_idx).to(device), test.to(device),
                        inference_images(config).to(device), idx, train_idx, [int(v) for v in canaries.labels],
                        notes, canaries)
