"""The configuration of one experiment: every choice that determines a result (frozen, hashable,
JSON round-trip, seed included). Its own module so that the data preparation
(:mod:`ufm.core.experiment_data`) and the run (:mod:`ufm.core.experiment`) both build on it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from ufm.core.audit_canaries import AuditCanaries
from ufm.core.config_hash import config_hash
from ufm.core.canary import CANDIDATE_KINDS, RANDOM_KINDS, CanaryChoice
from ufm.core.features import Feature, glyph
from ufm.core.models import ARCHITECTURES, DEFAULT_BATCH, DEFAULT_LR
from ufm.core.train import REGULARISERS, DPConfig, NEUTRAL_DP, TrainConfig
from ufm.limits import MAX_CANDIDATES, MAX_OOD_SIZE, MAX_REPEATS


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
        audit: None for a memorisation run; the canaries of a privacy-audit run
            (:class:`ufm.core.audit_canaries.AuditCanaries`: then ``canary`` must be ``none``, and the
            run scores every audit feature instead of measuring ``feature``). Left out of
            :meth:`to_dict` and :meth:`key` when None, so every other run keeps its key.
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
    audit: AuditCanaries | None = None

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
        if self.audit is not None and self.canary.mode != "none":
            raise ValueError("a privacy-audit run draws its own canaries: give canary mode 'none'")

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
        if self.audit is None:
            del d["audit"]
        else:
            d["audit"] = self.audit.to_dict()
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
        if d.get("audit") is not None:
            d["audit"] = AuditCanaries.from_dict(d["audit"])
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "ExperimentConfig":
        return cls.from_dict(json.loads(s))

    def key(self) -> str:
        """A hash of everything that changes the numbers (data_dir excluded), for caching."""
        d = self.to_dict()
        d.pop("data_dir")
        return config_hash(d)

    def replace(self, **changes: Any) -> "ExperimentConfig":
        return replace(self, **changes)

    def with_dp(self, dp: DPConfig | None) -> "ExperimentConfig":
        """This config with ``dp`` as its DP-SGD settings when ``dp-sgd`` is on (None keeps its own), and
        with the neutral ``DPConfig()`` when it is off: settings a run does not use must not change its
        key, or a study's "none" member would not reuse the identical run trained elsewhere."""
        if "dp-sgd" not in self.regularisers:
            return replace(self, dp=NEUTRAL_DP)
        return self if dp is None else replace(self, dp=dp)
