"""Audit a model you did not train: the black-box memorisation test of an ONNX classifier.

The paper's auditor knows the unique feature but has neither the training data nor the weights.
:func:`run_model_audit` measures such a model with the *same* functions as a trained run
(:func:`ufm.measure.scores.memorisation_score` for ``d_u``, ``d_r``, M, the t-tests and the exposure test;
:func:`ufm.measure.access.access_scores` for the confidence gains): the model enters them as an
:class:`ufm.audits.onnx_model.OnnxModel`, an ``nn.Module`` whose forward runs onnxruntime. Nothing here
computes a score of its own.

The verdict. A foreign model has no bank of clean twins, so the calibrated reference test
(:mod:`ufm.measure.bank`) cannot run. The verdict is the fast exposure test with a candidate family
that the calibration study (:mod:`ufm.measure.calibration`) measured as calibrated for the feature's kind.
The study trained ufm's own architectures; for a foreign model its ``mlp`` figure
(:data:`CALIBRATION_ARCH`) is the closest published measurement, and the verdict says so. Where
the study marks every applicable family miscalibrated for the kind, or has no entry, the audit
reports the numbers but *no verdict* (``inconclusive`` with that reason). The paper's t-tests are
shown as statistics; they never decide.

Inference images come from :mod:`ufm.audits.audit_images`. The feature is stamped in pixel space
([0, 1]) before the model's normalisation. Audits are stored by :mod:`ufm.audits.model_audit_store`
and shown as HTML by :mod:`ufm.audits.model_audit_report`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ufm.audits.audit_images import audit_inference_images, labelled_images
from ufm.audits.onnx_model import OnnxModel
from ufm.core.features import Feature, FeatureError
from ufm.core.train import CancelFlag, Progress, ProgressFn, TrainingCancelled, evaluate, is_cancelled
from ufm.limits import MAX_BATCH_BYTES, MAX_CANDIDATES, MAX_OOD_SIZE, MAX_REPEATS, check_audit_images, image_bytes
from ufm.measure.access import access_scores
from ufm.measure.calibration import FastTestCalibration, fast_test_calibration
from ufm.measure.candidates import VALID_FAMILIES, default_family, resolve_family
from ufm.measure.results import AccessScores, MScore
from ufm.measure.scores import memorisation_score, model_learned
from ufm.measure.verdict import INCONCLUSIVE, Verdict

#: The architecture whose calibration measurement stands in for a foreign model.
CALIBRATION_ARCH = "mlp"


# ------------------------------------------------------------------------------------ calibration

def choose_family(feature: Feature, requested: str | None = None, arch: str = CALIBRATION_ARCH
                  ) -> tuple[str, FastTestCalibration | None, str | None]:
    """The candidate family for the audit's fast test: ``(family, its calibration, reason)``.

    ``reason`` is None when the calibration study measured ``family`` as calibrated for the
    feature's kind on ``arch``; otherwise it says why no verdict can be given (the family that is
    still used for the numbers is ``requested``, else the kind's default). With ``requested``
    None or ``"auto"``, the kind's default family is tried first, then every other family that
    applies to the feature.
    """
    kind = feature.kind
    if requested not in (None, "auto"):
        families = [resolve_family(feature, requested)]
    else:
        first = default_family(feature)
        families = [first]
        for fam in VALID_FAMILIES[kind]:
            try:
                if fam not in families and resolve_family(feature, fam) == fam:
                    families.append(fam)
            except FeatureError:
                continue
    for fam in families:
        cal = fast_test_calibration(kind, fam, arch)
        if cal is not None and not cal.miscalibrated:
            return fam, cal, None
    fam = families[0]
    cal = fast_test_calibration(kind, fam, arch)
    tried = ", ".join(families)
    if cal is not None:
        reason = (f"the calibration study found the fast test miscalibrated for {kind} features on clean {arch} models "
                  f"with every applicable candidate family ({tried}): {cal.text()} A model you did not train has no "
                  "reference models, so no calibrated verdict is possible")
    elif not any(fast_test_calibration(k, f, arch) for k in VALID_FAMILIES for f in VALID_FAMILIES[k]):
        reason = (f"the fast test is not calibrated for this architecture: the calibration study measured none of "
                  f"ufm's {arch} models (the nearest of ufm's architectures to this graph), so its false-positive "
                  "rate is unknown; give --shadow-data or --references-from for a calibrated verdict")
    else:
        reason = (f"the calibration study has no measurement of the fast test for {kind} features with {tried} "
                  f"candidates on {arch} models, so its false-positive rate is unknown; a model you did not train has "
                  "no reference models, so no calibrated verdict is possible")
    return fam, cal, reason


# ------------------------------------------------------------------------------------ the audit

@dataclass(frozen=True)
class ModelAuditConfig:
    """What to measure on a foreign model.

    Attributes:
        feature: the unique feature (pixels, offset, intensity), stamped in pixel space.
        ood: the inference images (see :func:`audit_inference_images`); ood_size: how many.
        labelled: optional in-domain labelled images (see :func:`labelled_images`) for the white-
            and grey-box gains and for checking that the model learned; canary_label: the class the
            feature's training images had, if known (white box).
        repeats, candidates, family, random_kind, alpha, seed: as for
            :func:`ufm.measure.scores.memorisation_score`; ``family="auto"`` = a calibrated family for the
            feature's kind (:func:`choose_family`).
        data_dir: where benchmark datasets live.
        classes: the model's class names, if known (their number must be the model's K).
    """

    feature: Feature
    ood: str
    ood_size: int = 1000
    labelled: str | None = None
    canary_label: int | None = None
    repeats: int = 1
    candidates: int = 99
    family: str = "auto"
    random_kind: str | None = None
    alpha: float = 0.05
    seed: int = 0
    data_dir: str | None = None
    batch_size: int = 1024
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.feature, Feature):
            raise ValueError("feature must be a ufm.core.features.Feature")
        if not self.ood:
            raise ValueError("ood (the inference images) is required: a dataset name, a folder of images or an .npz")
        if not 2 <= self.ood_size <= MAX_OOD_SIZE:
            raise ValueError(f"ood_size (inference images) must be between 2 and {MAX_OOD_SIZE}, got {self.ood_size}")
        if not 1 <= self.candidates <= MAX_CANDIDATES:
            raise ValueError(f"candidates K must be between 1 and {MAX_CANDIDATES}, got {self.candidates}")
        if not 1 <= self.repeats <= MAX_REPEATS:
            raise ValueError(f"repeats R must be between 1 and {MAX_REPEATS}, got {self.repeats}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.canary_label is not None and self.canary_label < 0:
            raise ValueError(f"canary_label must be a class number >= 0, got {self.canary_label}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["feature"] = self.feature.to_dict()
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelAuditConfig":
        d = dict(d)
        d["feature"] = Feature.from_dict(d["feature"])
        d["classes"] = tuple(d.get("classes") or ())
        return cls(**d)


@dataclass
class ModelAuditResult:
    """One audit: the model's identity, the numbers (same types as a trained run's) and the verdict."""

    config: ModelAuditConfig
    model_name: str
    model_sha256: str
    input_spec: dict[str, Any]
    output_kind: str
    num_classes: int
    score: MScore
    access: AccessScores
    verdict: Verdict
    family_reason: str | None
    n_ood: int
    test_accuracy: float | None = None
    learned: bool | None = None
    learned_note: str = ""
    score_seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)
    reference: dict[str, Any] | None = None  # the rank test among shadow/supplied models (ufm.audits.shadow)

    @property
    def status(self) -> str:
        return self.verdict.status

    def summary(self) -> dict[str, Any]:
        """The small, strict-JSON part shown in lists (NaN -> None)."""
        s = self.score.to_dict()
        fin = lambda v: None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v  # noqa: E731
        return {"M": fin(s["M"]), "X_u": fin(s["X_u"]), "X_r": fin(s["X_r"]), "p_value": s["p_value"],
                "p_value_paired": s["p_value_paired"], "exposure": s["exposure"],
                "exposure_p_value": s["exposure_p_value"], "rank": s["rank"], "candidates": len(self.score.candidate_X),
                "family": self.score.family, "feature_kind": self.config.feature.kind, "status": self.status,
                "headline": self.verdict.headline, "verdict": self.verdict.text, "calibration": self.verdict.calibration,
                "output_kind": self.output_kind, "num_classes": self.num_classes, "n_ood": self.n_ood,
                "test_accuracy": self.test_accuracy, "learned": self.learned, "ood": self.config.ood,
                "feature": self.config.feature.name}

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "model_name": self.model_name, "model_sha256": self.model_sha256,
                "input_spec": self.input_spec, "output_kind": self.output_kind, "num_classes": self.num_classes,
                "score": self.score.to_dict(), "access": self.access.to_dict(), "verdict": self.verdict.to_dict(),
                "family_reason": self.family_reason, "n_ood": self.n_ood, "test_accuracy": self.test_accuracy,
                "learned": self.learned, "learned_note": self.learned_note, "score_seconds": self.score_seconds,
                "versions": self.versions, "summary": self.summary(),
                **({"reference": self.reference} if self.reference is not None else {})}

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelAuditResult":
        return cls(ModelAuditConfig.from_dict(d["config"]), d["model_name"], d["model_sha256"], d["input_spec"],
                   d["output_kind"], d["num_classes"], MScore.from_dict(d["score"]),
                   AccessScores.from_dict(d["access"]), Verdict.from_dict(d["verdict"]), d.get("family_reason"), d["n_ood"],
                   d.get("test_accuracy"), d.get("learned"), d.get("learned_note", ""), d.get("score_seconds", 0.0),
                   d.get("versions", {}), d.get("reference"))


def ignores_input(clean_out: torch.Tensor, score: MScore) -> str | None:
    """Why a model's numbers cannot speak about memorisation, or None.

    A model whose output ignores its input (a constant graph, a dead network) has M = 0, X_u =
    X_r = 0 and NaN t-test p-values; the exposure test then ranks X_u among ties and would call
    it "not shown". That is no evidence either way, with or without labelled data.

    Args:
        clean_out: the model's scores on (some of) the clean inference images.
    """
    if len(clean_out) > 1 and bool(torch.all(clean_out == clean_out[:1])):
        return (f"the model gives the same scores to all {len(clean_out)} images it was shown: its output does not "
                "depend on its input, so no test can show what it memorised")
    moved = np.concatenate([np.ravel(score.d_u), np.ravel(score.d_r), np.ravel(score.candidate_X)])
    if not np.any(moved != 0):
        return ("neither the feature nor any random feature or candidate changes the model's outputs (X_u = X_r = 0): "
                "the model ignores the feature's place in the image, so the test has nothing to compare")
    if not (math.isfinite(score.p_value) and math.isfinite(score.p_value_paired)):
        return "the t-test p-values are not numbers (no spread in d_u or d_r): the model's outputs barely move"
    return None


def _decide(score: MScore, cal: FastTestCalibration | None, reason: str | None, learned: bool | None,
            learned_note: str, dead: str | None = None) -> Verdict:
    """The audit's verdict from the fast test and its calibration (never from the t-tests)."""
    # The texts never start with the headline: every surface prints "headline. text".
    if dead is not None:
        return Verdict(INCONCLUSIVE, "none", None, f"{_capital(dead)}. The numbers are shown as measurements, "
                       "not as a verdict.")
    if learned is False:
        return Verdict(INCONCLUSIVE, "none", None, f"{_capital(learned_note)}. A model that did not learn says "
                       "nothing about memorisation either way.", learned=False)
    if reason is not None:
        return Verdict(INCONCLUSIVE, "none", None,
                       f"{_capital(reason)}. The numbers are shown as measurements, not as a verdict.",
                       cal.text() if cal is not None else None)
    assert cal is not None
    note = (f"{cal.text()} Measured on ufm's {cal.arch} models, the nearest of ufm's architectures to this graph: "
            "the closest published figure for a model you did not train; --shadow-data or --references-from give a calibrated "
            "verdict.")
    if score.status == INCONCLUSIVE:
        return Verdict(INCONCLUSIVE, "fast", None, score.verdict(), note)
    return Verdict(score.status, "fast", score.exposure_p_value,
                   f"{score.verdict()} A model you did not train has no reference models; the fast test "
                   "is used where the calibration study found it calibrated for this kind of feature.", note)


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def run_model_audit(model: OnnxModel, config: ModelAuditConfig, *, x_ood: torch.Tensor | None = None,
                    progress: ProgressFn | None = None, cancel: CancelFlag = None) -> ModelAuditResult:
    """Measure memorisation of ``config.feature`` by a model ufm did not train.

    Args:
        model: the ONNX classifier (:func:`ufm.audits.onnx_model.load_onnx`).
        x_ood: the inference images, if already loaded (else read from ``config.ood``).
        progress: called with :class:`ufm.core.train.Progress` at each phase.
        cancel: a ``threading.Event`` or callable checked between forward passes.

    Raises:
        FeatureError: the feature does not fit the model's images (or the family does not apply).
        OnnxModelError: the model rejects the images or outputs NaN.
        DataUnavailable: the images cannot be read.
        TrainingCancelled: cancelled.
    """
    report = progress or (lambda p: None)
    shape = model.spec.shape
    config.feature.check_fits(shape)
    check_audit_images(min(config.ood_size, len(x_ood)) if x_ood is not None else config.ood_size, shape)
    # Each forward call gets at most MAX_BATCH_BYTES of images, however large the images are.
    batch_size = max(1, min(config.batch_size, MAX_BATCH_BYTES // image_bytes(shape)))
    report(Progress("data", message=f"loading inference images from {config.ood}"))
    x = (x_ood if x_ood is not None
         else audit_inference_images(config.ood, shape, config.ood_size, data_dir=config.data_dir))
    x = x[:config.ood_size]
    if tuple(x.shape[1:]) != shape:
        raise ValueError(f"inference images are {tuple(x.shape[1:])} but the model takes {shape} (C, H, W)")
    family, cal, reason = choose_family(config.feature, config.family, getattr(model, "nearest_arch", CALIBRATION_ARCH))
    model.probe(x)
    with torch.no_grad():
        clean_out = model(x[:256])
    if config.classes and len(config.classes) != model.num_classes:
        raise ValueError(f"{len(config.classes)} class names given but the model outputs {model.num_classes} class "
                         "scores: list exactly one name per output, in the model's order")
    if is_cancelled(cancel):
        raise TrainingCancelled("cancelled before scoring")

    x_lab, y_lab = None, None
    test_acc, learned, learned_note = None, None, ""
    if config.labelled:
        report(Progress("data", message=f"loading labelled images from {config.labelled}"))
        x_lab, y_lab = labelled_images(config.labelled, shape, data_dir=config.data_dir, limit=10_000)
        if len(y_lab) and int(y_lab.max()) >= (model.num_classes or 0):
            raise ValueError(f"labelled images have class {int(y_lab.max())} but the model has {model.num_classes} "
                             "classes: give labels 0..K-1 in the model's class order")
        from ufm.core.data import ImageData
        _, test_acc = evaluate(model, ImageData(x_lab, y_lab, tuple(str(k) for k in range(model.num_classes or 2)),
                                                "labelled"))
        learned, learned_note = model_learned(test_acc, y_lab, model.num_classes or 2)
    if config.canary_label is not None and config.canary_label >= (model.num_classes or 0):
        raise ValueError(f"canary_label {config.canary_label} is not a class of this model (0..{model.num_classes - 1})")

    report(Progress("score", message=f"scoring {len(x)} images with {config.candidates} candidates ({family})"))
    t0 = time.perf_counter()
    with torch.no_grad():
        score = memorisation_score(model, x, config.feature, repeats=config.repeats, random_kind=config.random_kind,
                                   candidates=config.candidates, family=family, seed=config.seed,
                                   alpha=config.alpha, batch_size=batch_size, cancel=cancel)
        c, h, w = shape
        access = access_scores(model, config.feature,
                               x_test=x_lab if x_lab is not None else torch.zeros(0, c, h, w),
                               y_test=y_lab if y_lab is not None else torch.zeros(0, dtype=torch.long),
                               x_ood=x, canary_label=config.canary_label if x_lab is not None else None,
                               candidates=config.candidates, family=family, seed=config.seed,
                               batch_size=batch_size, cancel=cancel)
    seconds = time.perf_counter() - t0
    dead = ignores_input(clean_out, score)
    verdict = _decide(score, cal, reason, learned, learned_note, dead)
    report(Progress("done", message=f"M = {score.M:.4g}: {verdict.headline}"))
    from ufm.core.experiment import versions
    import onnxruntime
    return ModelAuditResult(config=config, model_name=model.name,
                            model_sha256=model.sha256, input_spec=model.spec.to_dict(), output_kind=model.output_kind or "",
                            num_classes=int(model.num_classes or 0), score=score, access=access, verdict=verdict,
                            family_reason=reason, n_ood=int(len(x)), test_accuracy=test_acc, learned=learned,
                            learned_note=learned_note, score_seconds=seconds,
                            versions={**versions(), "onnxruntime": onnxruntime.__version__})


def stamped_examples(x: torch.Tensor, feature: Feature, n: int = 4) -> np.ndarray:
    """The first ``n`` inference images with the feature stamped, (n, C, H, W) in [0, 1], to check
    placement and scale by eye."""
    from ufm.core.canary import stamp_feature
    return stamp_feature(x[:n], feature).numpy()
