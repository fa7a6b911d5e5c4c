"""The canaries of a privacy audit, as a setting of the one training path.

A privacy audit (:mod:`ufm.audits.privacy_audit`) trains ONE model with m audit canaries: m
distinct unique features on m distinct training images, each IN (stamped) or OUT with probability
1/2. :class:`AuditCanaries` is that draw, frozen; an :class:`ufm.core.experiment.ExperimentConfig`
carrying one (its ``audit`` field) is an audit run: :mod:`ufm.core.experiment_data` stamps the IN
canaries and keeps all m images out of validation, :func:`ufm.core.experiment.run_experiment`
trains the model as it trains any other and then scores every feature (:func:`score_audit`).
Every draw is seeded by the experiment's seed and a purpose (:func:`_rng`), so the same config
draws the same features, images and IN/OUT split on any machine.
"""

from __future__ import annotations

import hashlib
import math
import string
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

FEATURE_KINDS = ("random", "text")
OUT_MODES = ("clean", "removed")
PLACEMENTS = ("fixed", "random")
SCORES = ("label-gain", "M")
SCORE_UNITS = {"label-gain": "gain of the canary's class over the others' mean, nats",
               "M": "M = X_u - X_r of the canary's feature, nats"}
MAX_AUDIT_CANARIES = 10_000


GUESSES = ("membership", "reconstruction")
MAX_CHOICES = 100
MAX_AUDIT_FEATURES = 20_000


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


def audit_canary_limit(n_images: int, val_fraction: float) -> int:
    """The most audit canaries a training set of ``n_images`` allows (0 when it allows none).

    The canaries are kept out of the validation split (:func:`draw`), so they must fit in the
    training part, ``n_images - round(val_fraction * n_images)`` images, and leave at least one
    image that is not a canary (otherwise every image is IN or OUT and the model has no clean
    training image to learn the task from). Capped at :data:`MAX_AUDIT_CANARIES`.
    """
    n_val = int(round(val_fraction * n_images))
    return max(0, min(MAX_AUDIT_CANARIES, n_images - n_val - 1))


def check_audit_canaries(m: int, n_images: int, val_fraction: float, *, name: str = "--canaries",
                         more_images: str = "a larger --train-size") -> None:
    """Refuse ``m`` audit canaries that a training set of ``n_images`` cannot hold; the one check the
    CLI (through :func:`ufm.core.experiment_data.check_data`), the Audit privacy page and Compare's "also audit privacy" share.

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


@dataclass(frozen=True)
class AuditCanaries:
    """The canaries of one privacy-audit run (the ``audit`` field of an ExperimentConfig).

    Attributes:
        canaries: m, the number of audit canaries (distinct features on distinct images).
        features: ``"random"`` (binary patterns) or ``"text"`` (random capital-letter strings).
        feature_size: pattern side, or text height, in pixels.
        text_length: letters per string for ``features="text"``.
        offset: where every feature sits (row, col) with ``placement="fixed"``.
        placement: ``"random"`` (each feature at its own seeded place) or ``"fixed"`` (all at ``offset``).
        out_mode: ``"clean"`` (an OUT image is trained on without its feature) or ``"removed"``
            (left out of training).
        score: ``"label-gain"`` or ``"M"`` (:mod:`ufm.audits.privacy_audit`: what each measures).
        guess: ``"membership"`` (each canary IN or OUT) or ``"reconstruction"`` (each of the m
            slots always carries ONE of its ``choices`` candidate features, drawn uniformly;
            random features, label-gain score and out_mode clean only).
        choices: k, candidates per slot (2 for membership).
    """

    canaries: int = 100
    features: str = "random"
    feature_size: int = 7
    text_length: int = 3
    offset: tuple[int, int] = (1, 1)
    placement: str = "random"
    out_mode: str = "clean"
    score: str = "label-gain"
    guess: str = "membership"
    choices: int = 2

    def __post_init__(self) -> None:
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
        if len(self.offset) != 2 or any(int(o) != o or o < 0 for o in self.offset):
            raise ValueError(f"offset must be two non-negative integers (row, col), got {self.offset}")
        object.__setattr__(self, "offset", (int(self.offset[0]), int(self.offset[1])))
        object.__setattr__(self, "feature_size", int(self.feature_size))
        object.__setattr__(self, "text_length", int(self.text_length))
        if self.guess not in GUESSES:
            raise ValueError(f"unknown guess {self.guess!r} (--guess); choose one of {', '.join(GUESSES)}")
        if isinstance(self.choices, bool) or not isinstance(self.choices, (int, np.integer)):
            raise ValueError(f"choices must be a whole number, got {self.choices!r}")
        object.__setattr__(self, "choices", int(self.choices))
        if self.guess == "membership" and self.choices != 2:
            raise ValueError(f"a membership audit has 2 choices (IN or OUT), got --choices {self.choices}: "
                             "use --guess reconstruction for more")
        if self.guess == "reconstruction":
            if not 2 <= self.choices <= MAX_CHOICES:
                raise ValueError(f"--choices must be between 2 and {MAX_CHOICES}, got {self.choices}")
            if self.canaries * self.choices > MAX_AUDIT_FEATURES:
                raise ValueError(f"{self.canaries} slots x {self.choices} choices = {self.canaries * self.choices} "
                                 f"features, more than {MAX_AUDIT_FEATURES}: use fewer --canaries or --choices")
            if (self.features, self.score, self.out_mode) != ("random", "label-gain", "clean"):
                raise ValueError("a reconstruction audit uses random features, the label-gain score and out_mode "
                                 "clean (every slot carries one of its candidates)")

    def to_dict(self) -> dict[str, Any]:
        d = {"canaries": self.canaries, "features": self.features, "feature_size": self.feature_size,
             "text_length": self.text_length, "offset": list(self.offset), "placement": self.placement,
             "out_mode": self.out_mode, "score": self.score}
        if self.guess != "membership":  # membership runs keep the keys they had before reconstruction
            d.update(guess=self.guess, choices=self.choices)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AuditCanaries":
        d = dict(d)
        d["offset"] = tuple(d.get("offset", (1, 1)))
        return cls(**d)


@dataclass
class AuditDraw:
    """The drawn canaries of one audit run on a training set of n images.

    Attributes:
        features: the m Feature objects, in canary order.
        indices: (m,) int64, sorted training-set indices of the canary images.
        is_in: (m,) bool, the IN/OUT draw (IN: the image carries its feature).
        labels: (m,) int64, each canary image's class.
    """

    features: list
    indices: np.ndarray
    is_in: np.ndarray
    labels: np.ndarray
    choice: np.ndarray | None = None  # reconstruction: (m,) the drawn candidate of each slot

    def stamped(self, j: int):
        """The feature canary ``j``'s image carries when stamped (IN, or reconstruction's drawn
        candidate: ``features`` then holds the m * k candidates slot by slot)."""
        if self.choice is None:
            return self.features[j]
        k = len(self.features) // len(self.indices)
        return self.features[j * k + int(self.choice[j])]


def draw(spec: AuditCanaries, image_shape: Sequence[int], y: Any, seed: int) -> AuditDraw:
    """Draw the features, the m images (of the n labels ``y``) and the IN/OUT split of ``spec``."""
    import torch

    n = len(y)
    k = spec.choices if spec.guess == "reconstruction" else 1
    feats = audit_features(spec.features, spec.canaries * k, spec.feature_size, image_shape, offset=spec.offset,
                           text_length=spec.text_length, seed=seed, placement=spec.placement)
    idx = np.sort(_rng(seed, "images").choice(n, size=spec.canaries, replace=False)).astype(np.int64)
    labels = y[torch.as_tensor(idx)].numpy()
    if spec.guess == "reconstruction":
        choice = _rng(seed, "reconstruction-draw").integers(0, k, size=spec.canaries)
        return AuditDraw(feats, idx, np.ones(spec.canaries, dtype=bool), labels, choice)
    is_in = _rng(seed, "draw").random(spec.canaries) < 0.5
    return AuditDraw(feats, idx, is_in, labels)


def score_audit(model: Any, ood_x: Any, spec: AuditCanaries, canaries: AuditDraw, *, repeats: int, seed: int,
                progress: Any = None, cancel: Any = None, epoch: int = 0, max_epochs: int = 0) -> list[float]:
    """One score per canary feature from the model's outputs on the inference images ``ood_x``
    (black-box; the IN/OUT draw is never read): ``spec.score`` is ``"label-gain"`` (nats gained by
    the canary's class over the others' mean) or ``"M"`` (``X_u - X_r``, nats, ``repeats`` baselines).

    Raises:
        TrainingCancelled: ``cancel`` was set while scoring.
    """
    from ufm.core.train import Progress, TrainingCancelled, is_cancelled
    from ufm.measure.access import class_gain, log_prob_gains
    from ufm.measure.scores import feature_effect

    report = progress or (lambda p: None)
    m = spec.canaries
    if spec.score == "label-gain":
        # reconstruction: every candidate of slot j scored for slot j's class; (m * k,) slot by slot
        labels = np.repeat(canaries.labels, len(canaries.features) // m)
        report(Progress("score", epoch, max_epochs, message=f"audit model: scoring {len(labels)} features"))
        return class_gain(log_prob_gains(model, ood_x, canaries.features, cancel=cancel), labels).tolist()
    out = []
    for j, f in enumerate(canaries.features):
        if is_cancelled(cancel):
            raise TrainingCancelled("cancelled while scoring")
        # The same z_r draws for every feature (same seed): the baselines differ only by the
        # feature's shape, and the M of equal-shape features are compared on equal terms.
        d_u, d_r = feature_effect(model, ood_x, f, repeats=repeats, seed=seed)
        out.append(float(np.mean(d_u) - np.mean(d_r)))
        if (j + 1) % max(1, m // 5) == 0:
            report(Progress("score", epoch, max_epochs, message=f"audit model: scored {j + 1} of {m} features"))
    return out
