"""A one-run privacy audit with many unique features: a lower bound on epsilon.

One canary can only be "detected" or not; many canaries in ONE training run give a lower bound on
the differential-privacy parameter epsilon (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with
One (1) Training Run", NeurIPS; arXiv:2305.08846).

The bound and its correction are in :mod:`ufm.audits.bounds`.

The audit job (:func:`run_audit`)
---------------------------------
m distinct unique features (distinct random binary ``S x S`` patterns with half the pixels set,
or distinct random typed strings ``S`` pixels tall), each at its own random place by default, on
m distinct training images; each canary IN with probability 1/2
(seeded). IN: the image carries its feature; OUT: the image stays clean (``out_mode="clean"``,
neighbouring datasets differ by *replacing* one image) or is left out of training
(``out_mode="removed"``, add/remove neighbours, the adjacency of DP-SGD's accountant). All m
images are excluded from the validation split whatever their draw, so the draw changes only the
m images. ONE model is trained; then every feature is scored from the model's outputs on the
out-of-distribution images alone (black-box), never reading the IN/OUT draw (only the count of
correct guesses does). Two scores (``score``):

* ``"label-gain"`` (default): how far stamping feature j moves the outputs towards its canary's
  class ``y_j``: the mean log-probability gain of ``y_j`` minus the other classes' mean gain
  (:func:`ufm.measure.scores.log_prob_gains`, :func:`ufm.measure.scores.class_gain`). The auditor planted the
  canaries, so knows their labels; a model that learnt "this pattern means class y_j" from the
  one IN image shows it as a gain aimed at y_j, whereas M's KL counts a move towards any class,
  most of which is the model's generic reaction to ink. Measured on the README's setup (MLP,
  500 MNIST images, 100 canaries, 8 seeds): IN vs OUT AUC 0.77-0.88, against 0.58-0.73 for M.
* ``"M"``: the paper's black-box ``M_j = X_u - X_r`` of feature j (:func:`ufm.measure.scores.feature_effect`),
  which needs no label. M rather than the exposure rank: the rank against K candidates is capped
  at K + 1 levels and needs K forward passes per feature; the guesses need a continuous order.

The score is part of the configuration, fixed before training: picking the better of two scores
after seeing both would need its own correction.
"""

from __future__ import annotations

import hashlib
import json
import math
import string
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ufm.audits.bounds import DEFAULT_CONFIDENCE, DEFAULT_DELTA, AuditBound, audit_bound, score_auc

FEATURE_KINDS = ("random", "text")
OUT_MODES = ("clean", "removed")
PLACEMENTS = ("fixed", "random")
SCORES = ("label-gain", "M")
SCORE_UNITS = {"label-gain": "gain of the canary's class over the others' mean, nats",
               "M": "M = X_u - X_r of the canary's feature, nats"}
MAX_AUDIT_CANARIES = 10_000


# ----------------------------------------------------------------------------------- the features

def _rng(seed: int, purpose: str) -> np.random.Generator:
    digest = hashlib.sha256(f"ufm-audit:{int(seed)}:{purpose}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def audit_features(kind: str, m: int, size: int, image_shape: Sequence[int], *, offset: tuple[int, int] = (1, 1),
                   text_length: int = 3, seed: int = 0, placement: str = "fixed") -> list:
    """``m`` distinct unique features that fit images of ``image_shape`` (C, H, W).

    ``kind="random"``: ``size x size`` binary patterns with exactly ``floor(size^2 / 2)`` pixels
    set (at random pixels), all distinct. The ink is fixed because a pattern's effect on the
    outputs grows with its ink: with Bernoulli(0.5) pixels the spread of ink between features
    would add score variance that has nothing to do with memorisation. ``kind="text"``: distinct
    random strings of ``text_length`` capital letters rendered ``size`` pixels tall (:func:`ufm.core.features.text_feature`), distinct as pixels.
    ``placement="fixed"``: every feature at ``offset``; ``"random"``: each at its own seeded
    random position on the image (the feature is then unique in pattern *and* place).

    Raises:
        FeatureError: a feature does not fit the images, or ``size`` cannot give m distinct ones.
    """
    from ufm.core.features import FeatureError, grid_feature, text_feature

    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown audit feature kind {kind!r}; choose one of {', '.join(FEATURE_KINDS)}")
    c, h, w = (int(v) for v in image_shape[-3:])
    if placement == "random":
        offset = (0, 0)  # checked at the corner, placed afterwards (_place)
    if size < 1:
        raise FeatureError(f"feature size must be >= 1 pixel, got {size}")
    rng = _rng(seed, "features")
    out, seen = [], set()
    if kind == "random":
        if size + offset[0] > h or size + offset[1] > w:
            raise FeatureError(f"a {size}x{size} feature at offset (row {offset[0]}, col {offset[1]}) does not fit "
                               f"the {h}x{w} images: use --feature-size <= {min(h - offset[0], w - offset[1])}")
        ink = max(1, size * size // 2)
        available = math.comb(size * size, ink)
        if m > available:
            raise FeatureError(f"{size}x{size} binary patterns with {ink} pixels set give only {available} distinct "
                               "features, "
                               f"fewer than the {m} canaries: use a larger --feature-size")
        while len(out) < m:
            bits = np.zeros(size * size, dtype=bool)
            bits[rng.choice(size * size, size=ink, replace=False)] = True
            bits = bits.reshape(size, size)
            key = bits.tobytes()
            if key in seen:
                continue
            seen.add(key)
            out.append(grid_feature(bits.astype(np.float64), offset=offset, name=f"random {size}x{size} #{len(out)}"))
        return _place(out, placement, (h, w), rng)
    if not 3 <= size <= 64:
        raise FeatureError(f"text height (--feature-size) must be between 3 and 64 pixels, got {size}")
    if text_length < 1:
        raise FeatureError(f"text length must be >= 1 character, got {text_length}")
    letters = np.array(list(string.ascii_uppercase))
    if m > 26 ** text_length:
        raise FeatureError(f"{text_length}-letter strings give only {26 ** text_length} distinct texts, "
                           f"fewer than the {m} canaries: use longer strings")
    tries, strings = 0, set()
    while len(out) < m:
        tries += 1
        if tries > 20 * m + 100:
            raise FeatureError(f"could not render {m} distinct {text_length}-letter strings at height {size}: "
                               "the rendered pixels coincide; use a larger --feature-size")
        text = "".join(rng.choice(letters, text_length))
        if text in strings:
            continue
        strings.add(text)
        f = text_feature(text, height=size, offset=offset)
        key = np.asarray(f.pattern).tobytes()
        if key in seen:
            continue
        try:  # the width grows with the text: say so rather than clip it
            f.check_fits((c, h, w))
        except FeatureError as exc:
            raise FeatureError(f"{exc} (audit text features: {text_length} letters at height {size} are "
                               f"{f.size[1]} px wide; use fewer letters, --text-length, or a smaller "
                               "--feature-size)") from None
        seen.add(key)
        out.append(f)
    return _place(out, placement, (h, w), rng)


def _place(feats: list, placement: str, hw: tuple[int, int], rng: np.random.Generator) -> list:
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    if placement == "fixed":
        return feats
    out = []
    for f in feats:
        fh, fw = f.size
        out.append(f.with_offset(int(rng.integers(0, hw[0] - fh + 1)), int(rng.integers(0, hw[1] - fw + 1))))
    return out


# ----------------------------------------------------------------------------------- what a training set allows

def audit_canary_limit(n_images: int, val_fraction: float) -> int:
    """The most audit canaries a training set of ``n_images`` allows (0 when it allows none).

    The canaries are kept out of the validation split (:func:`run_audit`), so they must fit in the
    training part, ``n_images - round(val_fraction * n_images)`` images, and leave at least one
    image that is not a canary (otherwise every image is IN or OUT and the model has no clean
    training image to learn the task from). Capped at :data:`MAX_AUDIT_CANARIES`.
    """
    n_val = int(round(val_fraction * n_images))
    return max(0, min(MAX_AUDIT_CANARIES, n_images - n_val - 1))


def check_audit_canaries(m: int, n_images: int, val_fraction: float, *, name: str = "--canaries",
                         more_images: str = "a larger --train-size") -> None:
    """Refuse ``m`` audit canaries that a training set of ``n_images`` cannot hold; the one check the
    CLI (through :func:`run_audit`), the Audit privacy page and Compare's "also audit privacy" share.

    Args:
        name, more_images: how the message names the setting and the way to get more images (the
            CLI's flags by default; a page passes its own widget labels).

    Raises:
        ValueError: ``m`` is above :func:`audit_canary_limit`; the message gives the limit and both fixes.
    """
    limit = audit_canary_limit(n_images, val_fraction)
    if m > limit:
        n_val = int(round(val_fraction * n_images))
        fix = f"use at most {limit} canaries or {more_images}" if limit >= 2 else f"use {more_images}"
        raise ValueError(f"{name} {m} is larger than the training set allows: {n_images} images, {n_val} of them held "
                         f"out for validation; {fix}")


def training_set_size(experiment: Any) -> int:
    """How many training images ``experiment`` uses (its ``train_size``, or fewer when the dataset
    has fewer); loads the set without keeping it (``run_audit`` loads its own cached copy).

    Raises:
        DataUnavailable: the dataset cannot be read (the message says what to do).
    """
    from ufm.core.data import load_split

    return len(load_split(experiment.dataset, "train", data_dir=experiment.data_dir, limit=experiment.train_size,
                          stratified=True))


# ----------------------------------------------------------------------------------- the job

@dataclass(frozen=True)
class AuditConfig:
    """Everything that determines one audit.

    Attributes:
        experiment: dataset, model, regularisers, budget, inference set, seed and device (its
            feature and canary are not used: the audit draws its own).
        canaries: m, the number of audit canaries (distinct features on distinct images).
        features: ``"random"`` (binary patterns) or ``"text"`` (random capital-letter strings).
        feature_size: pattern side, or text height, in pixels.
        text_length: letters per string for ``features="text"``.
        offset: where every feature sits (row, col) with ``placement="fixed"``.
        placement: ``"random"`` (each feature at its own seeded place; the default: measured on
            MNIST it separates IN from OUT better than one shared corner, where the model learns
            to ignore the many patterns that share it) or ``"fixed"`` (all at ``offset``).
        out_mode: ``"clean"`` (OUT image trained on without its feature) or ``"removed"``.
        delta, confidence: of the bound.
        k_plus, k_minus: fixed guess counts, or None for the Bonferroni grid.
        score: ``"label-gain"`` or ``"M"`` (module docstring: what each measures, and why the
            label gain is the default).
    """

    experiment: Any = None
    canaries: int = 100
    features: str = "random"
    feature_size: int = 7
    text_length: int = 3
    offset: tuple[int, int] = (1, 1)
    placement: str = "random"
    out_mode: str = "clean"
    delta: float = DEFAULT_DELTA
    confidence: float = DEFAULT_CONFIDENCE
    k_plus: int | None = None
    k_minus: int | None = None
    score: str = "label-gain"

    def __post_init__(self) -> None:
        from ufm.core.canary import CanaryChoice
        from ufm.core.experiment import ExperimentConfig
        from ufm.core.features import glyph

        exp = self.experiment if self.experiment is not None else ExperimentConfig()
        if not isinstance(exp, ExperimentConfig):
            raise ValueError("experiment must be an ufm.core.experiment.ExperimentConfig")
        # The audit draws its own features and canaries: the experiment's are set to fixed values
        # so that the same audit asked for from the CLI or any page has the same key.
        object.__setattr__(self, "experiment", exp.replace(canary=CanaryChoice("none", ()), feature=glyph("A")))
        if isinstance(self.canaries, bool) or not isinstance(self.canaries, (int, np.integer)):
            raise ValueError(f"canaries must be a whole number, got {self.canaries!r}")
        if self.canaries < 2:
            raise ValueError(f"an audit needs at least 2 canaries (--canaries), got {self.canaries}: one canary can "
                             "only be detected, never bound epsilon; use 100 or more")
        if self.canaries > MAX_AUDIT_CANARIES:
            raise ValueError(f"at most {MAX_AUDIT_CANARIES} canaries (--canaries), got {self.canaries}")
        object.__setattr__(self, "canaries", int(self.canaries))
        if self.features not in FEATURE_KINDS:
            raise ValueError(f"unknown audit features {self.features!r}; choose one of {', '.join(FEATURE_KINDS)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; choose one of {', '.join(PLACEMENTS)}")
        if self.score not in SCORES:
            raise ValueError(f"unknown audit score {self.score!r}; choose one of {', '.join(SCORES)}")
        if self.out_mode not in OUT_MODES:
            raise ValueError(f"unknown out_mode {self.out_mode!r}; choose one of {', '.join(OUT_MODES)}")
        if not 0 <= self.delta < 1:
            raise ValueError(f"delta must be in [0, 1), got {self.delta}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {self.confidence}")
        if (self.k_plus is None) != (self.k_minus is None):
            raise ValueError("give both k_plus and k_minus or neither (then the Bonferroni grid is used)")
        if self.k_plus is not None and (self.k_plus < 0 or self.k_minus < 0
                                        or not 0 < self.k_plus + self.k_minus <= self.canaries):
            raise ValueError(f"k_plus + k_minus must be between 1 and canaries = {self.canaries}, "
                             f"got {self.k_plus} and {self.k_minus}")
        if len(self.offset) != 2 or any(int(o) != o or o < 0 for o in self.offset):
            raise ValueError(f"offset must be two non-negative integers (row, col), got {self.offset}")
        object.__setattr__(self, "offset", (int(self.offset[0]), int(self.offset[1])))

    @property
    def seed(self) -> int:
        return self.experiment.seed

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["experiment"] = self.experiment.to_dict()
        d["offset"] = list(self.offset)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AuditConfig":
        from ufm.core.experiment import ExperimentConfig

        d = dict(d)
        d["experiment"] = ExperimentConfig.from_dict(d["experiment"])
        d["offset"] = tuple(d.get("offset", (1, 1)))
        d.setdefault("score", "M")  # audits saved before the score was a choice were scored by M
        return cls(**d)

    def key(self) -> str:
        """A hash of everything that changes the numbers (data_dir excluded)."""
        d = self.to_dict()
        d["experiment"].pop("data_dir")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> "AuditConfig":
        return replace(self, **changes)


@dataclass
class AuditResult:
    """One audit: the bound, the per-canary scores and draw, the model's accuracy and DP claim."""

    config: AuditConfig
    bound: AuditBound
    scores: list[float]
    is_in: list[bool]
    indices: list[int]           # training-set image of each canary
    labels: list[int]            # its class
    feature_names: list[str]
    test_accuracy: float
    claimed_epsilon: float | None  # DP-SGD accountant (Opacus RDP, add/remove neighbours)
    claimed_delta: float | None
    epochs_trained: int
    n_train: int
    train_seconds: float
    score_seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def epsilon(self) -> float:
        return self.bound.epsilon

    @property
    def auc(self) -> float:
        """IN vs OUT separation of the scores (:func:`score_auc`); computed with the draw, after the
        bound, so it only describes the audit."""
        return score_auc(self.scores, self.is_in)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["config"] = self.config.to_dict()
        d["bound"] = self.bound.to_dict()
        d["epsilon_lower_bound"] = self.bound.epsilon
        d["auc"] = self.auc
        return d

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AuditResult":
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kw["config"] = AuditConfig.from_dict(d["config"])
        kw["bound"] = AuditBound.from_dict(d["bound"])
        return cls(**kw)

    @classmethod
    def from_json(cls, s: str) -> "AuditResult":
        return cls.from_dict(json.loads(s))

    def summary_lines(self) -> list[str]:
        b = self.bound
        lines = [f"epsilon lower bound {b.epsilon:.3f} at {b.confidence:.0%} confidence (delta {b.delta:g}; "
                 f"{b.correction})",
                 f"guesses: {b.guesses} of {b.m} canaries (k+ = {b.k_plus} IN, k- = {b.k_minus} OUT), {b.correct} correct",
                 f"IN canaries: {sum(self.is_in)}  mean score IN {_mean(self.scores, self.is_in, True):.4g}  "
                 f"OUT {_mean(self.scores, self.is_in, False):.4g} ({SCORE_UNITS[self.config.score]}); "
                 f"IN vs OUT AUC {self.auc:.2f}",
                 f"test accuracy {100 * self.test_accuracy:.2f}%  epochs {self.epochs_trained}  "
                 f"trained on {self.n_train} images"]
        if self.claimed_epsilon is not None:
            lines.append(f"DP-SGD accountant claims epsilon {self.claimed_epsilon:.3g} at delta {self.claimed_delta:g} "
                         "(add/remove neighbours)")
        lines += [f"note: {n}" for n in self.notes]
        return lines


def _mean(scores: Sequence[float], is_in: Sequence[bool], which: bool) -> float:
    vals = [s for s, i in zip(scores, is_in) if bool(i) == which]
    return float(np.mean(vals)) if vals else float("nan")


def run_audit(config: AuditConfig, progress: Callable[[Any], None] | None = None, cancel: Any = None) -> AuditResult:
    """Draw the canaries, train ONE model with the IN canaries, score every feature, bound epsilon.

    Raises:
        ValueError / FeatureError / DataUnavailable: bad input (m larger than the training set,
            features that do not fit); the message says what to do.
        TrainingCancelled, TrainingDiverged.
    """
    import torch

    from ufm.core.canary import stamp_feature
    from ufm.core.data import ImageData, check_same_classes, train_val_split
    from ufm.core.experiment import _cached_split, inference_images, training_split
    from ufm.core.models import build_model
    from ufm.measure.scores import class_gain, feature_effect, log_prob_gains
    from ufm.core.train import Progress, TrainingCancelled, evaluate, is_cancelled, resolve_device, train

    report = progress or (lambda p: None)
    exp = config.experiment
    m = config.canaries
    device = resolve_device(exp.device)
    report(Progress("data", message=f"loading {exp.dataset}"))
    full = training_split(exp)
    test = _cached_split(exp.dataset, "test", exp.data_dir, None)
    check_same_classes(full, test)
    n = len(full)
    check_audit_canaries(m, n, exp.val_fraction)
    feats = audit_features(config.features, m, config.feature_size, full.image_shape, offset=config.offset,
                           text_length=config.text_length, seed=exp.seed, placement=config.placement)
    idx = np.sort(_rng(exp.seed, "images").choice(n, size=m, replace=False)).astype(np.int64)
    is_in = _rng(exp.seed, "draw").random(m) < 0.5
    x = full.x.clone()
    for j in np.flatnonzero(is_in):
        x[idx[j]:idx[j] + 1] = stamp_feature(full.x[idx[j]:idx[j] + 1], feats[j])
    # All m images are kept out of validation whatever their draw: the draw changes only them.
    train_idx, val_idx = train_val_split(n, exp.val_fraction, exclude=idx, seed=exp.seed)
    if config.out_mode == "removed":
        train_idx = np.setdiff1d(train_idx, idx[~is_in])
    stamped = ImageData(x, full.y, full.classes, full.name)
    train_data, val_data = stamped.subset(train_idx).to(device), stamped.subset(val_idx).to(device)
    ood = inference_images(exp).to(device)
    if is_cancelled(cancel):
        raise TrainingCancelled("cancelled before training")

    def fit(data: ImageData):
        torch.manual_seed(exp.seed)
        c, h, w = data.image_shape
        model = build_model(exp.arch, c, (h, w), data.num_classes,
                            dropout=exp.dropout if "dropout" in exp.regularisers else 0.0,
                            batchnorm="batchnorm" in exp.regularisers).to(device)
        return train(model, data, val_data, exp.train_config(hflip=exp.dataset == "cifar10"),
                     progress=report, cancel=cancel)

    labels = full.y[torch.as_tensor(idx)].numpy()

    def score_all(model, what: str) -> list[float]:
        if config.score == "label-gain":
            report(Progress("score", 0, exp.epochs, message=f"{what}: scoring {m} features"))
            return class_gain(log_prob_gains(model, ood.x, feats, cancel=cancel), labels).tolist()
        out = []
        for j, f in enumerate(feats):
            if is_cancelled(cancel):
                raise TrainingCancelled("cancelled while scoring")
            # The same z_r draws for every feature (same seed): the baselines differ only by the
            # feature's shape, and the M of equal-shape features are compared on equal terms.
            d_u, d_r = feature_effect(model, ood.x, f, repeats=exp.repeats, seed=exp.seed)
            out.append(float(np.mean(d_u) - np.mean(d_r)))
            if (j + 1) % max(1, m // 5) == 0:
                report(Progress("score", 0, exp.epochs, message=f"{what}: scored {j + 1} of {m} features"))
        return out

    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        trained = fit(train_data)
        model = trained.model
        _, test_acc = evaluate(model, test.to(device))
        t0 = time.perf_counter()
        scores = score_all(model, "audit model")
        score_seconds = time.perf_counter() - t0
    finally:
        torch.use_deterministic_algorithms(prev_det)
    bound = audit_bound(scores, is_in, delta=config.delta, confidence=config.confidence,
                        k_plus=config.k_plus, k_minus=config.k_minus)
    notes = []
    claimed_delta = exp.dp.delta if "dp-sgd" in exp.regularisers else None
    if trained.epsilon is not None:
        if claimed_delta != config.delta:
            notes.append(f"the audit's delta {config.delta:g} differs from the accountant's {claimed_delta:g}: "
                         "the two epsilons are not directly comparable")
        if config.out_mode == "clean":
            notes.append("the accountant's epsilon is for adding/removing one image; the audit replaces images "
                         "(out_mode clean), for which group privacy guarantees (2 epsilon, (1 + e^epsilon) delta); "
                         "use out_mode removed to audit the accountant's own claim")
    report(Progress("done", trained.epochs_trained, exp.epochs, message=f"epsilon >= {bound.epsilon:.3f}"))
    return AuditResult(config=config, bound=bound, scores=scores, is_in=[bool(b) for b in is_in],
                       indices=[int(i) for i in idx], labels=[int(v) for v in labels],
                       feature_names=[f.name for f in feats], test_accuracy=float(test_acc),
                       claimed_epsilon=None if trained.epsilon is None else float(trained.epsilon),
                       claimed_delta=claimed_delta, epochs_trained=trained.epochs_trained,
                       n_train=len(train_data), train_seconds=float(trained.seconds),
                       score_seconds=score_seconds, notes=notes)


# ----------------------------------------------------------------------------------- persistence

def audit_dir(home: str | Path) -> Path:
    return Path(home) / "privacy_audits"


def audit_path(home: str | Path, config: AuditConfig) -> Path:
    """Where the audit of ``config`` is kept under the ufm home (survives reloads and restarts)."""
    return audit_dir(home) / f"{config.key()}.json"


def save_audit(home: str | Path, result: AuditResult) -> Path:
    from ufm.fileio import atomic_write

    path = audit_path(home, result.config)
    atomic_write(path, result.to_json(indent=1), private=True)  # it names the feature (private text)
    return path


def load_audit(home: str | Path, config: AuditConfig) -> AuditResult | None:
    """The saved audit of ``config``, or None (none yet, or unreadable)."""
    path = audit_path(home, config)
    try:
        return AuditResult.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cached_audit(home: str | Path, config: AuditConfig, progress: Callable[[Any], None] | None = None,
                 cancel: Any = None) -> AuditResult:
    """The saved audit of ``config`` or, when there is none, a new one (then saved)."""
    done = load_audit(home, config)
    if done is not None:
        return done
    res = run_audit(config, progress, cancel)
    save_audit(home, res)
    return res


def list_audits(home: str | Path) -> list[AuditResult]:
    """Every saved audit under ``home``, newest file first."""
    folder = audit_dir(home)
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            out.append(AuditResult.from_json(p.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def audit_histogram(result: AuditResult, bins: int = 30):
    """Plotly figure: the scores M of IN vs OUT canaries, overlaid on shared bins."""
    import plotly.graph_objects as go

    from ufm.reports.plots import COLOURS, _layout

    s = np.asarray(result.scores, dtype=np.float64)
    inn = np.asarray(result.is_in, dtype=bool)
    lo, hi = float(s.min()), float(s.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-12, bins + 1)
    fig = go.Figure()
    for mask, name, colour in ((~inn, f"OUT canaries ({int((~inn).sum())}, feature never seen)", COLOURS["z_r"]),
                               (inn, f"IN canaries ({int(inn.sum())}, feature trained on)", COLOURS["z_u"])):
        counts, _ = np.histogram(s[mask], bins=edges)
        fig.add_bar(x=(edges[:-1] + edges[1:]) / 2, y=counts, width=np.diff(edges), name=name,
                    marker_color=colour, opacity=0.6)
    b = result.bound
    title = (f"Scores of IN vs OUT canaries: epsilon >= {b.epsilon:.2f} at {b.confidence:.0%} "
             f"({b.correct}/{b.guesses} guesses right)")
    return _layout(fig, title, f"score: {SCORE_UNITS[result.config.score]}", "canaries",
                   barmode="overlay", bargap=0)


# ----------------------------------------------------------------------------------- studies

def _study_file(home: str | Path, study: str) -> Path:
    return audit_dir(home) / "studies" / f"{hashlib.sha256(study.encode()).hexdigest()[:16]}.json"


def attach_study_audits(home: str | Path, study: str, audits: Sequence[tuple[str, AuditConfig]]) -> Path:
    """Record which audits (group, config) belong to ``study`` (the Compare page's epsilon column)."""
    from ufm.fileio import atomic_write

    path = _study_file(home, study)
    atomic_write(path, json.dumps({"study": study, "audits": [{"group": g, "config": c.to_dict()} for g, c in audits]}),
                 private=True)
    return path


def study_audits(home: str | Path, study: str) -> list[tuple[str, AuditConfig]]:
    """The (group, config) audits recorded for ``study``; empty when none were asked for."""
    try:
        d = json.loads(_study_file(home, study).read_text())
        return [(a["group"], AuditConfig.from_dict(a["config"])) for a in d["audits"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def study_audit_table(home: str | Path, study: str):
    """Per group of ``study``: audits asked for and done, epsilon lower bound mean / min / max over
    the finished ones, and the DP-SGD accountant's mean claim. None when the study has no audits."""
    import pandas as pd

    audits = study_audits(home, study)
    if not audits:
        return None
    rows = []
    for group in dict.fromkeys(g for g, _ in audits):
        done = [r for g, c in audits if g == group for r in [load_audit(home, c)] if r is not None]
        eps = [r.epsilon for r in done]
        claims = [r.claimed_epsilon for r in done if r.claimed_epsilon is not None]
        rows.append({"group": group, "audits": sum(g == group for g, _ in audits), "audits_done": len(done),
                     "eps_lower_bound": float(np.mean(eps)) if eps else None,
                     "eps_lb_min": min(eps) if eps else None, "eps_lb_max": max(eps) if eps else None,
                     "claimed_epsilon": float(np.mean(claims)) if claims else None})
    return pd.DataFrame(rows)
