"""One experiment end to end: stamp the canary, train, measure memorisation.

:class:`ExperimentConfig` holds every choice (frozen, hashable, JSON round-trip, seed included);
:func:`run_experiment` turns it into a :class:`Result`. Nothing else decides a number: the CLI,
the run store and the dashboard all go through here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from ufm.version import __version__
from ufm.core.canary import CANDIDATE_KINDS, RANDOM_KINDS, CanaryChoice, choose_canaries, stamp_feature
from ufm.core.data import ImageData, check_same_classes, load_ood, load_split, train_val_split
from ufm.core.features import Feature, glyph
from ufm.limits import MAX_CANDIDATES, MAX_OOD_SIZE, MAX_REPEATS
from ufm.core.models import ARCHITECTURES, DEFAULT_BATCH, DEFAULT_LR, build_model
from ufm.measure.scores import AccessScores, MScore, access_scores, memorisation_score, model_learned
from ufm.core.train import (REGULARISERS, CancelFlag, Checkpoint, DPConfig, EpochLog, NEUTRAL_DP, Progress, ProgressFn,
                    TrainConfig, TrainingCancelled, evaluate, is_cancelled, resolve_device, train)

# cuBLAS needs this set before the first CUDA call to run deterministically.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that determines one result.

    Attributes:
        feature: the unique feature (pixels, offset, intensity).
        dataset: a benchmark name or a path (see :func:`ufm.core.data.load_split`).
        data_dir: where datasets live; not part of the result's identity (:meth:`key`).
        arch: one of :data:`ufm.core.models.ARCHITECTURES`.
        regularisers: any of ``dropout, augment, batchnorm, weight-decay, dp-sgd`` (empty = none).
        dropout: drop probability used when ``dropout`` is on.
        weight_decay: Adam's weight decay used when ``weight-decay`` is on.
        dp: DP-SGD settings used when ``dp-sgd`` is on.
        canary: which training images carry the feature.
        epochs, patience: maximum epochs and early-stopping patience (epochs).
        lr, batch_size: None = the paper's value for ``arch``.
        train_size: keep the first N training images (None = all).
        val_fraction: share of the training images held out for early stopping.
        ood_source, ood_size: the inference set (None = the paper's choice) and its size.
        repeats, candidates, candidate_kind, random_kind, alpha: see
            :func:`ufm.measure.scores.memorisation_score`; ``candidate_kind`` is its ``family`` (``"auto"``
            = :func:`ufm.measure.candidates.default_family` of the feature's kind).
        checkpoint_every: keep weights every N steps for TracIn (0 none, -1 per epoch).
        seed: model init, data order, augmentation, canary draw, random features.
        device: ``auto``, ``cpu``, ``cuda``, ``mps``.
    """

    feature: Feature = field(default_factory=lambda: glyph("A"))
    dataset: str = "mnist"
    data_dir: str | None = None
    arch: str = "mlp"
    regularisers: tuple[str, ...] = ()
    dropout: float = 0.5
    weight_decay: float = 5e-4
    dp: DPConfig = field(default_factory=DPConfig)
    canary: CanaryChoice = field(default_factory=CanaryChoice)
    epochs: int = 500
    patience: int = 10
    lr: float | None = None
    batch_size: int | None = None
    train_size: int | None = None
    val_fraction: float = 0.1
    ood_source: str | None = None
    ood_size: int = 1000
    repeats: int = 1
    candidates: int = 99
    candidate_kind: str = "auto"
    random_kind: str | None = None
    alpha: float = 0.05
    checkpoint_every: int = 0
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES and not (self.arch.startswith("onnx:") and self.lr and self.batch_size):
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        regs = tuple(sorted(set(r for r in self.regularisers if r != "none")))
        bad = [r for r in regs if r not in REGULARISERS]
        if bad:
            raise ValueError(f"unknown regulariser {bad[0]!r}; choose from {', '.join(REGULARISERS)}")
        if "dp-sgd" in regs and "batchnorm" in regs:
            raise ValueError("DP-SGD cannot be combined with batch norm (per-example gradients are undefined "
                             "when examples share batch statistics); drop one of them")
        if "dp-sgd" in regs and self.arch == "densenet100":
            raise ValueError("DP-SGD cannot train densenet100, whose batch norm mixes examples; use mlp, cnn1 or cnn2")
        object.__setattr__(self, "regularisers", regs)
        if self.epochs < 1 or self.patience < 1:
            raise ValueError(f"epochs and patience must be >= 1, got {self.epochs} and {self.patience}")
        if self.train_size is not None and self.train_size < 20:
            raise ValueError(f"train size must be at least 20 images, got {self.train_size}")
        if not 2 <= self.ood_size <= MAX_OOD_SIZE:
            raise ValueError(f"ood_size (inference images) must be between 2 and {MAX_OOD_SIZE}, got {self.ood_size}")
        if not 1 <= self.candidates <= MAX_CANDIDATES:
            raise ValueError(f"candidates K must be between 1 and {MAX_CANDIDATES}, got {self.candidates} "
                             "(K = 99 gives p-values down to 0.01)")
        if not 1 <= self.repeats <= MAX_REPEATS:
            raise ValueError(f"repeats R must be between 1 and {MAX_REPEATS}, got {self.repeats}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))  # a numpy integer would not serialise to JSON
        if self.candidate_kind not in CANDIDATE_KINDS:
            raise ValueError(f"unknown candidate kind {self.candidate_kind!r}; choose one of {', '.join(CANDIDATE_KINDS)}")
        if self.random_kind is not None and self.random_kind not in RANDOM_KINDS:
            raise ValueError(f"unknown random feature kind {self.random_kind!r}; choose one of {', '.join(RANDOM_KINDS)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    # ------------------------------------------------------------------ derived settings
    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.arch]

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size if self.batch_size is not None else DEFAULT_BATCH[self.arch]

    def train_config(self, hflip: bool = False) -> TrainConfig:
        regs = set(self.regularisers)
        return TrainConfig(lr=self.learning_rate, batch_size=self.effective_batch_size, max_epochs=self.epochs,
                           patience=self.patience,
                           weight_decay=self.weight_decay if "weight-decay" in regs else 0.0,
                           augment="augment" in regs, hflip=hflip,
                           dp=self.dp if "dp-sgd" in regs else None,
                           checkpoint_every=self.checkpoint_every, seed=self.seed)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["feature"] = self.feature.to_dict()
        d["canary"] = self.canary.to_dict()
        d["dp"] = asdict(self.dp)
        d["regularisers"] = list(self.regularisers)
        return d

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
        d = dict(d)
        if "feature" in d:
            d["feature"] = Feature.from_dict(d["feature"])
        if "canary" in d:
            d["canary"] = CanaryChoice.from_dict(d["canary"])
        if "dp" in d:
            d["dp"] = DPConfig(**d["dp"])
        if "regularisers" in d:
            d["regularisers"] = tuple(d["regularisers"])
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "ExperimentConfig":
        return cls.from_dict(json.loads(s))

    def key(self) -> str:
        """A hash of everything that changes the numbers (data_dir excluded), for caching."""
        d = self.to_dict()
        d.pop("data_dir")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> "ExperimentConfig":
        return replace(self, **changes)

    def with_dp(self, dp: DPConfig | None) -> "ExperimentConfig":
        """This config with ``dp`` as its DP-SGD settings when ``dp-sgd`` is on (None keeps its own), and
        with the neutral ``DPConfig()`` when it is off: settings a run does not use must not change its
        key, or a study's "none" member would not reuse the identical run trained elsewhere."""
        if "dp-sgd" not in self.regularisers:
            return replace(self, dp=NEUTRAL_DP)
        return self if dp is None else replace(self, dp=dp)


@dataclass
class Result:
    """Everything measured by one experiment. ``model`` and ``checkpoints`` are not serialised."""

    config: ExperimentConfig
    score: MScore
    access: AccessScores
    canary_indices: list[int]
    canary_labels: list[int]
    test_accuracy: float
    epochs_trained: int
    best_epoch: int
    stopped: str
    history: list[EpochLog]
    epsilon: float | None
    device: str
    train_seconds: float
    score_seconds: float
    n_train: int
    n_val: int
    n_ood: int
    versions: dict[str, str]
    # What the run did differently from what the config asked, e.g. fewer training images than
    # train_size because the dataset is smaller (n_train + n_val is what was used).
    notes: list[str] = field(default_factory=list)
    # False when the model did not learn (test accuracy not above the majority class): then its
    # reaction to the feature says nothing about memorisation and the verdict is inconclusive.
    learned: bool = True
    learned_note: str = ""
    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)
    checkpoints: list[Checkpoint] = field(default_factory=list, repr=False, compare=False)

    @property
    def M(self) -> float:
        return self.score.M

    def to_dict(self) -> dict[str, Any]:
        s = self.score.to_dict()
        return {
            "config": self.config.to_dict(),
            "M": s["M"], "X_u": s["X_u"], "X_r": s["X_r"],
            "p_value": s["p_value"], "p_value_paired": s["p_value_paired"],
            "exposure": s["exposure"], "exposure_p_value": s["exposure_p_value"],
            "significant": s["significant"], "verdict": self.score.verdict(),
            "d_u": s["d_u"], "d_r": s["d_r"],
            "canary_indices": self.canary_indices, "canary_labels": self.canary_labels,
            "test_accuracy": self.test_accuracy, "epochs_trained": self.epochs_trained,
            "best_epoch": self.best_epoch, "stopped": self.stopped, "epsilon": self.epsilon,
            "score": s, "access": self.access.to_dict(),
            "history": [asdict(h) for h in self.history],
            "device": self.device, "train_seconds": self.train_seconds, "score_seconds": self.score_seconds,
            "n_train": self.n_train, "n_val": self.n_val, "n_ood": self.n_ood, "versions": self.versions,
            "notes": list(self.notes), "learned": self.learned, "learned_note": self.learned_note,
        }

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Result":
        return cls(config=ExperimentConfig.from_dict(d["config"]), score=MScore.from_dict(d["score"]),
                   access=AccessScores.from_dict(d["access"]), canary_indices=list(d["canary_indices"]),
                   canary_labels=list(d["canary_labels"]), test_accuracy=d["test_accuracy"],
                   epochs_trained=d["epochs_trained"], best_epoch=d["best_epoch"], stopped=d["stopped"],
                   history=[EpochLog(**h) for h in d["history"]], epsilon=d["epsilon"], device=d["device"],
                   train_seconds=d["train_seconds"], score_seconds=d["score_seconds"], n_train=d["n_train"],
                   n_val=d["n_val"], n_ood=d["n_ood"], versions=d["versions"],
                   notes=list(d.get("notes", [])), learned=bool(d.get("learned", True)),
                   learned_note=str(d.get("learned_note", "")))

    @classmethod
    def from_json(cls, s: str) -> "Result":
        return cls.from_dict(json.loads(s))


def versions() -> dict[str, str]:
    return {"ufm": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


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
    OOD source has, a feature that does not fit the images. What it loads is cached for the run
    that follows in this process.

    Raises:
        ValueError, DataUnavailable: one line saying what to change.
    """
    full = training_split(config)
    if config.train_size is not None and len(full) < config.train_size:
        raise ValueError(f"--train-size {config.train_size} is more than the {len(full)} training images of "
                         f"{config.dataset}: give at most {len(full)}, or leave it out to use them all")
    config.feature.check_fits(full.x.shape)
    _cached_ood(config.dataset, full.image_shape, config.ood_size, config.ood_source, config.data_dir)


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


def prepare_data(config: ExperimentConfig, device: torch.device | str = "cpu") -> PreparedData:
    """Load the data of ``config``, stamp the canaries and split off the validation set."""
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


def run_experiment(config: ExperimentConfig, progress: ProgressFn | None = None,
                   cancel: CancelFlag = None) -> Result:
    """Train one model with the canary of ``config`` and measure memorisation of its feature.

    Args:
        progress: called with :class:`ufm.core.train.Progress` after each epoch and at phase changes.
        cancel: a ``threading.Event`` or a callable; when set, :class:`TrainingCancelled` is raised.

    Raises:
        DataUnavailable, FeatureError, ValueError: bad input; the message says what to do.
        TrainingCancelled, TrainingDiverged.
    """
    report = progress or (lambda p: None)
    device = resolve_device(config.device)
    report(Progress("data", message=f"loading {config.dataset}"))
    data = prepare_data(config, device)
    for note in data.notes:
        report(Progress("data", message=f"note: {note}"))
    if is_cancelled(cancel):
        raise TrainingCancelled("cancelled before training")

    torch.manual_seed(config.seed)
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        c, h, w = data.train.image_shape
        model = build_model(config.arch, c, (h, w), data.train.num_classes,
                            dropout=config.dropout if "dropout" in config.regularisers else 0.0,
                            batchnorm="batchnorm" in config.regularisers).to(device)
        hflip = config.dataset == "cifar10"  # mirror-symmetric classes only; digits and text are not
        trained = train(model, data.train, data.val, config.train_config(hflip=hflip), progress=report, cancel=cancel)
        model = trained.model
        _, test_acc = evaluate(model, data.test)
        learned, learned_note = model_learned(test_acc, data.test.y, data.train.num_classes)

        report(Progress("score", trained.epochs_trained, config.epochs, message="measuring memorisation"))
        t0 = time.perf_counter()
        score = memorisation_score(model, data.ood.x, config.feature, repeats=config.repeats,
                                   random_kind=config.random_kind, candidates=config.candidates,
                                   family=config.candidate_kind, seed=config.seed, alpha=config.alpha,
                                   cancel=cancel)
        canary_labels = data.canary_labels
        canary_label = _majority(canary_labels) if canary_labels else config.canary.label
        access = access_scores(model, config.feature, x_test=data.test.x, y_test=data.test.y, x_ood=data.ood.x,
                               canary_label=canary_label, candidates=config.candidates,
                               family=config.candidate_kind, seed=config.seed, cancel=cancel)
        score_seconds = time.perf_counter() - t0
    finally:
        torch.use_deterministic_algorithms(prev_det)
    report(Progress("done", trained.epochs_trained, config.epochs, message=f"M = {score.M:.4g}"))
    return Result(config=config, score=score, access=access, canary_indices=[int(i) for i in data.canary_indices],
                  canary_labels=canary_labels, test_accuracy=test_acc, epochs_trained=trained.epochs_trained,
                  best_epoch=trained.best_epoch, stopped=trained.stopped, history=trained.history,
                  epsilon=trained.epsilon, device=str(device), train_seconds=trained.seconds,
                  score_seconds=score_seconds, n_train=len(data.train), n_val=len(data.val), n_ood=len(data.ood),
                  versions=versions(), notes=list(data.notes), learned=learned, learned_note=learned_note, model=model, checkpoints=trained.checkpoints)


def _majority(labels: list[int]) -> int:
    vals, counts = np.unique(labels, return_counts=True)
    return int(vals[np.argmax(counts)])
