"""One experiment end to end: stamp the canary, train, measure memorisation.

:class:`ExperimentConfig` holds every choice (frozen, hashable, JSON round-trip, seed included);
:func:`run_experiment` turns it into a :class:`Result`. Nothing else decides a number: the CLI,
the run store and the dashboard all go through here.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ufm.version import __version__
from ufm.core.audit_canaries import score_audit
# ExperimentConfig is imported from here by many modules.
from ufm.core.experiment_config import ExperimentConfig  # noqa: F401
# The data of a run lives in experiment_data; these names are imported from here by many modules.
from ufm.core.experiment_data import (_cached_ood, _cached_split, check_data,  # noqa: F401
                                      inference_images, prepare_data, training_split)
from ufm.core.models import build_model_for
from ufm.measure.access import AccessScores, access_scores
from ufm.measure.scores import MScore, memorisation_score, model_learned
from ufm.core.train import (CancelFlag, Checkpoint, EpochLog, Progress, ProgressFn, TrainingCancelled, evaluate,
                            is_cancelled, resolve_device, train)

# cuBLAS needs this set before the first CUDA call to run deterministically.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@dataclass
class Result:
    """Everything measured by one experiment. ``model`` and ``checkpoints`` are not serialised.

    A privacy-audit run (``config.audit`` set) has no ``score`` and ``access`` (None): its
    measurement is ``audit``, one entry per canary: ``scores`` (float), ``is_in`` (bool),
    ``indices`` (training-set image), ``labels`` (its class) and ``feature_names`` (lists of m).
    """

    config: ExperimentConfig
    score: MScore | None
    access: AccessScores | None
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
    audit: dict[str, list] | None = None

    @property
    def M(self) -> float | None:
        return None if self.score is None else self.score.M

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"config": self.config.to_dict()}
        s = None if self.score is None else self.score.to_dict()
        if s is not None:  # the same keys, in the same order, as before audit runs existed
            d.update({"M": s["M"], "X_u": s["X_u"], "X_r": s["X_r"],
                      "p_value": s["p_value"], "p_value_paired": s["p_value_paired"],
                      "exposure": s["exposure"], "exposure_p_value": s["exposure_p_value"],
                      "significant": s["significant"], "verdict": self.score.verdict(),
                      "d_u": s["d_u"], "d_r": s["d_r"]})
        d.update({
            "canary_indices": self.canary_indices, "canary_labels": self.canary_labels,
            "test_accuracy": self.test_accuracy, "epochs_trained": self.epochs_trained,
            "best_epoch": self.best_epoch, "stopped": self.stopped, "epsilon": self.epsilon,
            "score": s, "access": None if self.access is None else self.access.to_dict(),
            "history": [asdict(h) for h in self.history],
            "device": self.device, "train_seconds": self.train_seconds, "score_seconds": self.score_seconds,
            "n_train": self.n_train, "n_val": self.n_val, "n_ood": self.n_ood, "versions": self.versions,
            "notes": list(self.notes), "learned": self.learned, "learned_note": self.learned_note,
        })
        if self.audit is not None:
            d["audit"] = self.audit
        return d

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Result":
        return cls(config=ExperimentConfig.from_dict(d["config"]),
                   score=None if d["score"] is None else MScore.from_dict(d["score"]),
                   access=None if d["access"] is None else AccessScores.from_dict(d["access"]), canary_indices=list(d["canary_indices"]),
                   canary_labels=list(d["canary_labels"]), test_accuracy=d["test_accuracy"],
                   epochs_trained=d["epochs_trained"], best_epoch=d["best_epoch"], stopped=d["stopped"],
                   history=[EpochLog(**h) for h in d["history"]], epsilon=d["epsilon"], device=d["device"],
                   train_seconds=d["train_seconds"], score_seconds=d["score_seconds"], n_train=d["n_train"],
                   n_val=d["n_val"], n_ood=d["n_ood"], versions=d["versions"],
                   notes=list(d.get("notes", [])), learned=bool(d.get("learned", True)),
                   learned_note=str(d.get("learned_note", "")), audit=d.get("audit"))

    @classmethod
    def from_json(cls, s: str) -> "Result":
        return cls.from_dict(json.loads(s))


def versions() -> dict[str, str]:
    return {"ufm": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def run_experiment(config: ExperimentConfig, progress: ProgressFn | None = None,
                   cancel: CancelFlag = None) -> Result:
    """Train one model with the canary of ``config`` and measure memorisation of its feature; for a
    privacy-audit run (``config.audit``), train it with the IN audit canaries and score every one.

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
        model = build_model_for(config, data.train.image_shape, data.train.num_classes).to(device)
        hflip = config.dataset == "cifar10"  # mirror-symmetric classes only; digits and text are not
        trained = train(model, data.train, data.val, config.train_config(hflip=hflip), progress=report, cancel=cancel)
        model = trained.model
        _, test_acc = evaluate(model, data.test)
        learned, learned_note = model_learned(test_acc, data.test.y, data.train.num_classes)

        t0 = time.perf_counter()
        score = access = audit = None
        if data.audit is not None:
            audit_scores = score_audit(model, data.ood.x, config.audit, data.audit, repeats=config.repeats,
                                       seed=config.seed, progress=report, cancel=cancel,
                                       epoch=trained.epochs_trained, max_epochs=config.epochs)
            audit = {"scores": audit_scores, "is_in": [bool(b) for b in data.audit.is_in],
                     "indices": [int(i) for i in data.audit.indices], "labels": [int(v) for v in data.audit.labels],
                     "feature_names": [f.name for f in data.audit.features]}
            if data.audit.choice is not None:
                audit["choice"] = [int(c) for c in data.audit.choice]
        else:
            report(Progress("score", trained.epochs_trained, config.epochs, message="measuring memorisation"))
            score = memorisation_score(model, data.ood.x, config.feature, repeats=config.repeats,
                                       random_kind=config.random_kind, candidates=config.candidates,
                                       family=config.candidate_kind, seed=config.seed, alpha=config.alpha,
                                       cancel=cancel)
            canary_label = _majority(data.canary_labels) if data.canary_labels else config.canary.label
            access = access_scores(model, config.feature, x_test=data.test.x, y_test=data.test.y, x_ood=data.ood.x,
                                   canary_label=canary_label, candidates=config.candidates,
                                   family=config.candidate_kind, seed=config.seed, cancel=cancel)
        score_seconds = time.perf_counter() - t0
    finally:
        torch.use_deterministic_algorithms(prev_det)
    done = f"M = {score.M:.4g}" if score is not None else f"scored {len(audit['scores'])} audit canaries"
    report(Progress("done", trained.epochs_trained, config.epochs, message=done))
    return Result(config=config, score=score, access=access, canary_indices=[int(i) for i in data.canary_indices],
                  canary_labels=data.canary_labels, test_accuracy=test_acc, epochs_trained=trained.epochs_trained,
                  best_epoch=trained.best_epoch, stopped=trained.stopped, history=trained.history,
                  epsilon=trained.epsilon, device=str(device), train_seconds=trained.seconds,
                  score_seconds=score_seconds, n_train=len(data.train), n_val=len(data.val), n_ood=len(data.ood),
                  versions=versions(), notes=list(data.notes), learned=learned, learned_note=learned_note,
                  model=model, checkpoints=trained.checkpoints, audit=audit)


def _majority(labels: list[int]) -> int:
    vals, counts = np.unique(labels, return_counts=True)
    return int(vals[np.argmax(counts)])
