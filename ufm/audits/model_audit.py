"""Audit a model you did not train: the black-box memorisation test of an ONNX classifier.

The paper's auditor knows the unique feature but has neither the training data nor the weights.
:func:`run_audit` measures such a model with the *same* functions as a trained run
(:func:`ufm.measure.scores.memorisation_score` for ``d_u``, ``d_r``, M, the t-tests and the exposure test;
:func:`ufm.measure.scores.access_scores` for the confidence gains): the model enters them as an
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

Inference images (:func:`inference_images`): a benchmark's test split, an ``.npz`` (array ``x``,
uint8), or a folder of images, converted to the model's input size and channels exactly as
training images are (:func:`ufm.core.data.convert_images`). The feature is stamped in pixel space
([0, 1]) before the model's normalisation.

Audits are stored whole, in one transaction, in the run store's ``audits`` table
(:func:`save_audit`): a failed or cancelled audit leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ufm.version import __version__
from ufm.measure.calibration import FastTestCalibration, fast_test_calibration
from ufm.measure.candidates import VALID_FAMILIES, default_family, resolve_family
from ufm.core.data import BENCHMARKS, DataUnavailable, convert_images, load_ood, load_split, to_float_images
from ufm.core.features import Feature, FeatureError
from ufm.imageio import ImageError, open_image
from ufm.limits import MAX_BATCH_BYTES, MAX_CANDIDATES, MAX_OOD_SIZE, MAX_REPEATS, check_audit_images, image_bytes
from ufm.audits.onnx_model import OnnxModel
from ufm.measure.scores import AccessScores, MScore, access_scores, memorisation_score, model_learned
from ufm.core.train import CancelFlag, Progress, ProgressFn, TrainingCancelled, evaluate, is_cancelled
from ufm.measure.verdict import INCONCLUSIVE, Verdict

if TYPE_CHECKING:
    from ufm.runs.store import Store

#: The architecture whose calibration measurement stands in for a foreign model.
CALIBRATION_ARCH = "mlp"
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


# ------------------------------------------------------------------------------------ images

def _from_uint8(x: np.ndarray, shape: tuple[int, int, int], n: int, what: str) -> torch.Tensor:
    if x.dtype != np.uint8:
        raise DataUnavailable(f"{what}: images x must be uint8 (0..255), got {x.dtype}")
    if x.ndim == 4 and x.shape[-1] not in (1, 3) and x.shape[1] in (1, 3):
        x = np.transpose(x, (0, 2, 3, 1))  # stored (N, C, H, W)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    try:
        t = to_float_images(x[:n])
        return convert_images(t, shape[0], shape[1:])
    except ValueError as exc:
        raise DataUnavailable(f"{what}: {exc}; use greyscale (N, H, W) or RGB (N, H, W, 3) uint8 images") from None


def _folder_images(folder: Path, shape: tuple[int, int, int], n: int) -> torch.Tensor:
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in _IMAGE_EXTS)[:n]
    if not files:
        raise DataUnavailable(f"no images ({', '.join(sorted(_IMAGE_EXTS))}) in {folder}")
    mode = "L" if shape[0] == 1 else "RGB"
    out = []
    for f in files:
        try:
            im = open_image(f)  # guarded: bombs, corrupt files
        except ImageError as exc:
            raise DataUnavailable(f"{exc}; or remove {f} from the folder") from None
        out.append(convert_images(to_float_images(np.asarray(im.convert(mode), dtype=np.uint8)[None]),
                                  shape[0], shape[1:]))
    return torch.cat(out)


def default_inference_source(channels: int, trained_on: str | None = None) -> tuple[str, str]:
    """The inference set an audit starts from, and why: the paper's out-of-distribution set.

    ``trained_on`` (a ufm export records it): that dataset's OOD set (:data:`ufm.core.data.DEFAULT_OOD`),
    the one its runs were measured on, so the audit's M is comparable with the run's. Otherwise by
    the model's channels: greyscale CIFAR-10 for a one-channel model, MNIST (as 3 channels) for a
    colour one. Never the model's own kind of images: in-distribution images give a different,
    usually larger, M (an MNIST run's 0.0013 read 0.0086 on MNIST test images), not comparable.
    """
    from ufm.core.data import DEFAULT_OOD

    if trained_on in DEFAULT_OOD:
        src = DEFAULT_OOD[trained_on]
        return src, (f"the paper's out-of-distribution set for a model trained on {trained_on} (the file says so): "
                     f"{'greyscale ' if src == 'cifar10' else ''}{src} test images, as its runs were measured")
    src = "mnist" if int(channels) == 3 else "cifar10"
    what = "MNIST digits as 3 channels" if src == "mnist" else "greyscale CIFAR-10 photos"
    return src, (f"the paper's out-of-distribution set for a {int(channels)}-channel model: {what}. Images like "
                 "the model's own training images (e.g. MNIST test images for a digit classifier) measure "
                 "something else and give a different M, not comparable with a ufm run's")


def inference_images(source: str, shape: Sequence[int], n: int, *, data_dir: str | None = None) -> torch.Tensor:
    """The first ``n`` inference images of ``source`` as ``(n, C, H, W)`` float32 in [0, 1], in ``shape``.

    Args:
        source: a benchmark name (its test split, as :func:`ufm.core.data.load_ood` reads it for a
            trained run, so the same ``n`` gives the same images), a folder holding ``test.npz``,
            an ``.npz`` file (uint8 ``x``), or a folder of image files (sorted by path).
        shape: the model's ``(C, H, W)``.

    Raises:
        DataUnavailable: the source is missing or unreadable, or holds fewer than 2 images.
    """
    c, h, w = (int(v) for v in shape)
    if not 2 <= n <= MAX_OOD_SIZE:
        raise ValueError(f"number of inference images must be between 2 and {MAX_OOD_SIZE}, got {n}")
    path = Path(source).expanduser()
    if source in BENCHMARKS or (path.is_dir() and (path / "test.npz").is_file()):
        try:
            x = load_ood("audited model", (c, h, w), n, source=source, data_dir=data_dir).x
        except ValueError as exc:
            raise DataUnavailable(str(exc)) from None
    elif path.is_file() and path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                if "x" not in f.files:
                    raise DataUnavailable(f"{path} has no array x (uint8 images); it holds {', '.join(f.files)}")
                x = _from_uint8(f["x"], (c, h, w), n, str(path))
        except (OSError, ValueError) as exc:
            raise DataUnavailable(f"could not read {path}: {exc}") from None
    elif path.is_dir():
        x = _folder_images(path, (c, h, w), n)
    else:
        raise DataUnavailable(f"inference images {source!r} not found: give one of {', '.join(BENCHMARKS)}, a folder "
                              "of images, or an .npz file with uint8 images x")
    if len(x) < 2:
        raise DataUnavailable(f"{source} holds {len(x)} image(s); the audit needs at least 2 inference images")
    return x


def check_npz_images(name: str, data: bytes, shape: Sequence[int] | None = None) -> None:
    """Check an uploaded ``.npz`` of inference images before it is kept: readable without pickle,
    an array ``x`` of at most :data:`ufm.limits.MAX_AUDIT_IMAGE_BYTES` (its declared size, read
    before it is decompressed), uint8, and convertible to ``shape`` (C, H, W) when given.
    Messages name the upload (``name``), never a server path.

    Raises:
        DataUnavailable: one line saying what is wrong with the upload.
    """
    import io
    import zipfile

    from ufm.limits import MAX_AUDIT_IMAGE_BYTES

    try:
        f = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):  # a bare .npy: an array, not an archive
            raise DataUnavailable(f"{name} is a single .npy array, not an .npz archive; save it with "
                                  "numpy.savez(path, x=images)")
        with f:
            if "x" not in f.files:
                raise DataUnavailable(f"{name} has no array x (uint8 images); it holds {', '.join(f.files) or 'nothing'}")
            declared = f.zip.getinfo("x.npy").file_size
            if declared > MAX_AUDIT_IMAGE_BYTES:
                raise DataUnavailable(f"{name}: its array x unpacks to {declared / 2**20:,.0f} MB, above the limit of "
                                      f"{MAX_AUDIT_IMAGE_BYTES / 2**20:,.0f} MB: keep fewer images in it")
            x = f["x"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataUnavailable(f"{name} is not a readable .npz of uint8 images x ({type(exc).__name__}); save it with "
                              "numpy.savez(path, x=images)") from None
    if x.dtype != np.uint8:
        raise DataUnavailable(f"{name}: images x must be uint8 (0..255), got {x.dtype}")
    if len(x) < 2:
        raise DataUnavailable(f"{name} holds {len(x)} image(s); the audit needs at least 2 inference images")
    if shape is not None:
        _from_uint8(x[:2], tuple(int(v) for v in shape), 2, name)  # the same conversion the audit does


def labelled_images(source: str, shape: Sequence[int], *, data_dir: str | None = None,
                    limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """In-domain labelled images for the white- and grey-box gains: ``(x (N, C, H, W), y (N,))``.

    ``source``: a benchmark or folder (its test split), or an ``.npz`` with ``x`` (uint8) and ``y``.
    """
    c, h, w = (int(v) for v in shape)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                if not {"x", "y"} <= set(f.files):
                    raise DataUnavailable(f"{path} needs arrays x (uint8 images) and y (int labels)")
                x = _from_uint8(f["x"], (c, h, w), limit or len(f["x"]), str(path))
                y = torch.as_tensor(np.asarray(f["y"][:len(x)]).astype(np.int64))
        except (OSError, ValueError) as exc:
            raise DataUnavailable(f"could not read {path}: {exc}") from None
        return x, y
    d = load_split(source, "test", data_dir=data_dir, limit=limit)
    return convert_images(d.x, c, (h, w)), d.y


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
class AuditConfig:
    """What to measure on a foreign model.

    Attributes:
        feature: the unique feature (pixels, offset, intensity), stamped in pixel space.
        ood: the inference images (see :func:`inference_images`); ood_size: how many.
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
    def from_dict(cls, d: dict[str, Any]) -> "AuditConfig":
        d = dict(d)
        d["feature"] = Feature.from_dict(d["feature"])
        d["classes"] = tuple(d.get("classes") or ())
        return cls(**d)


@dataclass
class AuditResult:
    """One audit: the model's identity, the numbers (same types as a trained run's) and the verdict."""

    config: AuditConfig
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
    def from_dict(cls, d: dict[str, Any]) -> "AuditResult":
        return cls(AuditConfig.from_dict(d["config"]), d["model_name"], d["model_sha256"], d["input_spec"],
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


def run_audit(model: OnnxModel, config: AuditConfig, *, x_ood: torch.Tensor | None = None,
              progress: ProgressFn | None = None, cancel: CancelFlag = None) -> AuditResult:
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
    x = x_ood if x_ood is not None else inference_images(config.ood, shape, config.ood_size, data_dir=config.data_dir)
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
    return AuditResult(config=config, model_name=model.name,
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


# ------------------------------------------------------------------------------------ the store

@dataclass(frozen=True)
class AuditRecord:
    """One row of the store's ``audits`` table."""

    id: str
    created: float
    model_name: str
    model_sha256: str
    input_spec: dict[str, Any]
    feature: dict[str, Any]
    status: str
    summary: dict[str, Any]
    code_version: str

    def to_row(self) -> dict[str, Any]:
        s = self.summary
        return {"id": self.id, "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(self.created)),
                "model": self.model_name, "sha256": self.model_sha256[:12], "feature": self.feature.get("name"),
                "verdict": s.get("headline"), "M": s.get("M"), "exposure_p_value": s.get("exposure_p_value"),
                "family": s.get("family"), "inference images": s.get("n_ood"), "ood": s.get("ood")}


def new_audit_id() -> str:
    return secrets.token_hex(6)


def save_audit(store: "Store", result: AuditResult, audit_id: str | None = None) -> str:
    """Record a finished audit (one INSERT: all or nothing). Returns its id (12 hex digits;
    ``audit_id`` when given, e.g. drawn by the dashboard before the audit started)."""
    import sqlite3

    from ufm.runs.store import StoreError

    payload = result.to_json()
    fixed = audit_id is not None
    for _ in range(1 if fixed else 5):
        aid = audit_id if fixed else new_audit_id()
        try:
            with store.transaction() as c:
                c.execute("INSERT INTO audits (id, created, model_name, model_sha256, input_spec_json, feature_json, "
                          "status, summary_json, result_json, code_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          (aid, time.time(), result.model_name, result.model_sha256,
                           json.dumps(result.input_spec), json.dumps(result.config.feature.to_dict()), result.status,
                           json.dumps(result.summary(), allow_nan=False), payload, __version__))
            return aid  # type: ignore[return-value]
        except sqlite3.IntegrityError:
            continue  # an id clash: draw again
    raise StoreError(f"audit id {audit_id} is already taken" if fixed else "could not draw a fresh audit id")


def audit_task(report: Any, model_path: str, config: dict[str, Any], spec: dict[str, Any], home: str,
               audit_id: str, cancel_path: str | None = None) -> None:
    """A background audit (``ufm.runs.worker.run_task`` / the dashboard's tasks): load the model from
    ``model_path`` with the spec statements ``spec`` (``input_size``, ``channels``, ``layout``,
    ``mean``, ``std``), run :func:`run_audit` and record it under ``audit_id`` in the store at
    ``home``. Cancelled when the file ``cancel_path`` appears; nothing is stored then."""
    from ufm.audits.onnx_model import load_onnx
    from ufm.runs.store import Store

    model = load_onnx(model_path, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items()})
    cancel = (lambda: Path(cancel_path).exists()) if cancel_path else None
    result = run_audit(model, AuditConfig.from_dict(config), progress=lambda p: report(p.message), cancel=cancel)
    with Store(home) as store:
        save_audit(store, result, audit_id)
    report(f"done: {result.verdict.headline}")


def _record(r: Any) -> AuditRecord:
    return AuditRecord(r["id"], r["created"], r["model_name"], r["model_sha256"], json.loads(r["input_spec_json"]),
                       json.loads(r["feature_json"]), r["status"], json.loads(r["summary_json"]), r["code_version"])


def list_audits(store: "Store", limit: int | None = None) -> list[AuditRecord]:
    """Audits, newest first."""
    sql = ("SELECT id, created, model_name, model_sha256, input_spec_json, feature_json, status, summary_json, "
           "code_version FROM audits ORDER BY created DESC")
    rows = store.query(sql + (" LIMIT ?" if limit else ""), (int(limit),) if limit else ())
    return [_record(r) for r in rows]


def resolve_audit(store: "Store", prefix: str) -> str:
    """The id of the one audit whose id starts with ``prefix``."""
    from ufm.runs.store import StoreError
    prefix = (prefix or "").strip().lower()
    if not prefix or any(ch not in "0123456789abcdef" for ch in prefix):
        raise StoreError(f"{prefix!r} is not an audit id (hex digits); 'ufm audit --list' shows them")
    ids = [r[0] for r in store.query("SELECT id FROM audits WHERE id LIKE ?", (prefix + "%",))]
    if len(ids) != 1:
        raise StoreError(f"{'no' if not ids else len(ids)} audits match {prefix!r}; 'ufm audit --list' shows them")
    return ids[0]


def load_audit(store: "Store", audit_id: str) -> AuditResult:
    rows = store.query("SELECT result_json FROM audits WHERE id = ?", (audit_id,))
    if not rows:
        from ufm.runs.store import StoreError
        raise StoreError(f"no audit {audit_id!r}")
    return AuditResult.from_dict(json.loads(rows[0][0]))


def delete_audit(store: "Store", audit_id: str) -> None:
    with store.transaction() as c:
        c.execute("DELETE FROM audits WHERE id = ?", (audit_id,))


# ------------------------------------------------------------------------------------ report

def audit_html(result: AuditResult, audit_id: str | None = None) -> str:
    """A self-contained HTML report: verdict, numbers, d_u vs d_r histogram, access gains, settings."""
    from ufm.reports.plots import histogram_figure
    from ufm.reports.run_report import _esc, _figure_html, _kv_table, _page, _table, fmt

    s = result.summary()
    spec = result.input_spec
    title = f"ufm audit of {result.model_name}" + (f" ({audit_id})" if audit_id else "")
    acc = result.access
    gains = [(name, g.label, g.gain, g.p_value, g.p_value_paper, g.n) for name, g in
             (("white-box (label known)", acc.white_box), ("grey-box (max over classes)", acc.grey_box),
              ("black-box (max over classes, inference images)", acc.black_box_gain)) if g is not None]
    body = [f"<h1>{_esc(title)}</h1>",
            f'<p class="verdict"><b>{_esc(result.verdict.headline)}.</b> {_esc(result.verdict.text)}</p>',
            f'<p class="note">{_esc(result.verdict.calibration or "")}</p>',
            "<h2>Memorisation</h2>",
            _kv_table([("M = X_u - X_r (nats)", s["M"]), ("X_u (nats)", s["X_u"]), ("X_r (nats)", s["X_r"]),
                       ("exposure p (fast test)", s["exposure_p_value"]), ("exposure (bits)", s["exposure"]),
                       ("candidate family", s["family"]), ("candidates K", s["candidates"]),
                       ("t-test p (Welch, one-tailed; the paper's statistic, not the verdict)", s["p_value"]),
                       ("paired t-test p (the paper's statistic)", s["p_value_paired"]),
                       ("inference images", s["n_ood"]), ("test accuracy on labelled images",
                                                          None if s["test_accuracy"] is None else s["test_accuracy"])]),
            _figure_html(histogram_figure(result.score.d_u, result.score.d_r), "fig-hist", 420),
            "<h2>Confidence gain (access settings)</h2>",
            _table(["setting", "class", "gain", "calibrated p", "paper's t-test p", "images"], gains),
            "<h2>Model</h2>",
            _kv_table([("file", result.model_name), ("sha256", result.model_sha256),
                       ("input", f"{spec['layout']} {spec['channels']}x{spec['height']}x{spec['width']}"),
                       ("normalisation", f"mean {spec['mean']}, std {spec['std']}" if spec["mean"] else "none"),
                       ("outputs", result.output_kind), ("classes", result.num_classes)]),
            "<h2>Settings</h2>",
            _kv_table([(k, fmt(v)) for k, v in result.config.to_dict().items() if k != "feature"]
                      + [("feature", f"{result.config.feature.name} {result.config.feature.size} at "
                                     f"{result.config.feature.offset}")])]
    return _page(title, body)
