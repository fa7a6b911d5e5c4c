"""A one-run privacy audit with many unique features: a lower bound on epsilon.

One canary can only be "detected" or not; many canaries in ONE training run give a lower bound on
the differential-privacy parameter epsilon (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with
One (1) Training Run", NeurIPS; arXiv:2305.08846).

Every analysis that applies is computed side by side (:mod:`ufm.audits.privacy_audit_bounds`).
``guess="reconstruction"``: each slot carries one of ``choices`` candidate features, the guess is
which (MNIST MLP, 500 images, 100 slots, K = 10, 8 seeds: eps >= 2.27 by the (eps, delta) f-DP
analysis, 3.33 by the Gaussian one; membership by Steinke's: 1.02).

The audit job (:func:`run_privacy_audit`)
-----------------------------------------
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

The model is a run in the run store like any other (an ExperimentConfig whose ``audit`` field holds
the canaries, :mod:`ufm.core.audit_canaries`): listed, cancellable, counted by the pending cap and
reused when identical. Only the bound is computed here, from the stored scores: audits that differ
in delta, confidence or the guess counts share one trained model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ufm.audits.bounds import DEFAULT_CONFIDENCE, DEFAULT_DELTA, AuditBound
from ufm.measure.stats import score_auc
from ufm.audits.privacy_audit_bounds import PRIMARY, audit_bounds, guess_accuracy
from ufm.core.audit_canaries import (FEATURE_KINDS, MAX_AUDIT_CANARIES, OUT_MODES, PLACEMENTS,  # noqa: F401
                                     SCORE_UNITS, SCORES, AuditCanaries, audit_canary_limit, audit_features,
                                     check_audit_canaries)

if TYPE_CHECKING:
    from ufm.core.experiment import ExperimentConfig, Result
    from ufm.runs.engine import Executor
    from ufm.runs.store import Store


def training_set_size(experiment: Any) -> int:
    """How many training images ``experiment`` uses (its ``train_size``, or fewer when the dataset
    has fewer); loads the set without keeping it (the audit run loads its own cached copy).

    Raises:
        DataUnavailable: the dataset cannot be read (the message says what to do).
    """
    from ufm.core.data import load_split

    return len(load_split(experiment.dataset, "train", data_dir=experiment.data_dir, limit=experiment.train_size,
                          stratified=True))


# ----------------------------------------------------------------------------------- the configuration

@dataclass(frozen=True)
class PrivacyAuditConfig:
    """Everything that determines one privacy audit: the run (experiment + audit canaries) and the bound.

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
        guess, choices: ``"membership"`` (k = 2) or ``"reconstruction"`` among ``choices``
            candidate features per slot (:class:`ufm.core.audit_canaries.AuditCanaries`).
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
    guess: str = "membership"
    choices: int = 2

    def __post_init__(self) -> None:
        from ufm.core.canary import CanaryChoice
        from ufm.core.experiment import ExperimentConfig
        from ufm.core.features import glyph

        exp = self.experiment if self.experiment is not None else ExperimentConfig()
        if not isinstance(exp, ExperimentConfig):
            raise ValueError("experiment must be an ufm.core.experiment.ExperimentConfig")
        # The audit draws its own features and canaries: the experiment's are set to fixed values
        # so that the same audit asked for from the CLI or any page has the same key.
        object.__setattr__(self, "experiment", exp.replace(canary=CanaryChoice("none", ()), feature=glyph("A"),
                                                           audit=None))
        spec = self.canary_spec()  # checks m, the features, placement, out_mode, score and offset
        object.__setattr__(self, "canaries", spec.canaries)
        object.__setattr__(self, "offset", spec.offset)
        object.__setattr__(self, "choices", spec.choices)
        if self.guess == "reconstruction" and self.k_minus not in (None, 0):
            raise ValueError("a reconstruction audit makes no OUT guesses: give k_minus 0 (k_plus = the guess count)")
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

    @property
    def seed(self) -> int:
        return self.experiment.seed

    def canary_spec(self) -> AuditCanaries:
        """The audit canaries of this audit (everything the training run needs besides the experiment)."""
        return AuditCanaries(canaries=self.canaries, features=self.features, feature_size=self.feature_size,
                             text_length=self.text_length, offset=tuple(self.offset), placement=self.placement,
                             out_mode=self.out_mode, score=self.score, guess=self.guess, choices=self.choices)

    def run_config(self) -> "ExperimentConfig":
        """The ExperimentConfig of the audit's training run (the run store's key; no bound settings:
        audits that differ only in delta, confidence or guess counts share the run)."""
        return self.experiment.replace(audit=self.canary_spec())

    @classmethod
    def from_run_config(cls, config: "ExperimentConfig", **bound: Any) -> "PrivacyAuditConfig":
        """The audit of an audit run's config, with the bound settings ``bound`` (default: the defaults)."""
        if config.audit is None:
            raise ValueError("not a privacy-audit run: its config has no audit canaries")
        spec = config.audit
        return cls(config.replace(audit=None), canaries=spec.canaries, features=spec.features,
                   feature_size=spec.feature_size, text_length=spec.text_length, offset=spec.offset,
                   placement=spec.placement, out_mode=spec.out_mode, score=spec.score, guess=spec.guess,
                   choices=spec.choices, **bound)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["experiment"] = self.experiment.to_dict()
        d["offset"] = list(self.offset)
        if self.guess == "membership":  # the keys (and key()) membership audits had before reconstruction
            del d["guess"], d["choices"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PrivacyAuditConfig":
        from ufm.core.experiment import ExperimentConfig

        d = dict(d)
        d["experiment"] = ExperimentConfig.from_dict(d["experiment"])
        d["offset"] = tuple(d.get("offset", (1, 1)))
        d.setdefault("score", "M")  # audits saved before the score was a choice were scored by M
        return cls(**d)

    def key(self) -> str:
        """A hash of everything that changes the numbers (data_dir excluded); the name of an audit
        saved as a file by ufm before audits were runs."""
        d = self.to_dict()
        d["experiment"].pop("data_dir")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> "PrivacyAuditConfig":
        return replace(self, **changes)


# ----------------------------------------------------------------------------------- the result

@dataclass
class PrivacyAuditResult:
    """One audit: the bound, the per-canary scores and draw, the model's accuracy and DP claim.

    ``run_id`` is the audit's training run in the store (None for an audit saved as a file by an
    earlier ufm); it is left out of :meth:`to_dict` when None.
    """

    config: PrivacyAuditConfig
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
    run_id: str | None = None
    bounds: dict[str, AuditBound] = field(default_factory=dict)  # every analysis that applies, side by side
    choice: list[int] | None = None  # reconstruction: the drawn candidate of each slot

    @property
    def epsilon(self) -> float:
        return self.bound.epsilon

    @property
    def guess_accuracy(self) -> float | None:
        """Reconstruction: share of slots whose best-scored candidate is the drawn one; else None."""
        if self.choice is None:
            return None
        return guess_accuracy({"scores": self.scores, "choice": self.choice}, self.config.choices)

    @property
    def auc(self) -> float:
        """IN vs OUT separation of the scores (:func:`score_auc`); computed with the draw, after the
        bound, so it only describes the audit."""
        if self.choice is not None:  # reconstruction: each slot's drawn candidate vs its other candidates
            k = self.config.choices
            drawn = np.zeros(len(self.scores), dtype=bool)
            drawn[np.arange(len(self.choice)) * k + np.asarray(self.choice)] = True
            return score_auc(self.scores, drawn)
        return score_auc(self.scores, self.is_in)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if d["run_id"] is None:
            del d["run_id"]
        if d["choice"] is None:
            del d["choice"]
        d["config"] = self.config.to_dict()
        d["bound"] = self.bound.to_dict()
        d["bounds"] = {a: b.to_dict() for a, b in self.bounds.items()}
        d["epsilon_lower_bound"] = self.bound.epsilon
        d["auc"] = self.auc
        return d

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PrivacyAuditResult":
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kw["config"] = PrivacyAuditConfig.from_dict(d["config"])
        kw["bound"] = AuditBound.from_dict(d["bound"])
        kw["bounds"] = {a: AuditBound.from_dict(b) for a, b in d.get("bounds", {}).items()}
        return cls(**kw)

    @classmethod
    def from_json(cls, s: str) -> "PrivacyAuditResult":
        return cls.from_dict(json.loads(s))

    def summary_lines(self) -> list[str]:
        b = self.bound
        lines = [f"epsilon lower bound {b.epsilon:.3f} at {b.confidence:.0%} confidence (delta {b.delta:g}; "
                 f"{b.correction}; {b.analysis_label})"]
        for other in self.bounds.values():
            if other.analysis != b.analysis:
                lines.append(f"  beside it: {other.epsilon:.3f} by {other.analysis_label} "
                             f"({other.correct} of {other.guesses} guesses right)")
        if self.choice is not None:
            lines += [f"guesses: {b.guesses} of {b.m} slots, {b.correct} correct (which of {self.config.choices} "
                      f"candidates; chance {1 / self.config.choices:.0%})",
                      f"best-scored candidate right on {self.guess_accuracy:.0%} of slots "
                      f"({SCORE_UNITS[self.config.score]})"]
        else:
            lines += [f"guesses: {b.guesses} of {b.m} canaries (k+ = {b.k_plus} IN, k- = {b.k_minus} OUT), "
                      f"{b.correct} correct",
                      f"IN canaries: {sum(self.is_in)}  mean score IN {_mean(self.scores, self.is_in, True):.4g}  "
                      f"OUT {_mean(self.scores, self.is_in, False):.4g} ({SCORE_UNITS[self.config.score]}); "
                      f"IN vs OUT AUC {self.auc:.2f}"]
        lines += [
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


# ----------------------------------------------------------------------------------- the job

def audit_from_result(config: PrivacyAuditConfig, result: "Result", run_id: str | None = None) -> PrivacyAuditResult:
    """The audit of ``config`` from its finished training run ``result`` (trained now or read from
    the store): the bound of the stored scores (:func:`ufm.audits.bounds.audit_bound`).

    Raises:
        ValueError: ``result`` is not the run of ``config`` (another audit, or not an audit run).
    """
    if result.audit is None or result.config.audit != config.canary_spec():
        raise ValueError("this run is not the training run of this privacy audit")
    a = result.audit
    bounds = audit_bounds(a, guess=config.guess, choices=config.choices, delta=config.delta,
                          confidence=config.confidence, k_plus=config.k_plus, k_minus=config.k_minus)
    bound = bounds[PRIMARY[config.guess]]
    exp = config.experiment
    notes = list(result.notes)
    claimed_delta = exp.dp.delta if "dp-sgd" in exp.regularisers else None
    if result.epsilon is not None:
        if claimed_delta != config.delta:
            notes.append(f"the audit's delta {config.delta:g} differs from the accountant's {claimed_delta:g}: "
                         "the two epsilons are not directly comparable")
        if config.out_mode == "clean":
            notes.append("the accountant's epsilon is for adding/removing one image; the audit replaces images "
                         "(out_mode clean), for which group privacy guarantees (2 epsilon, (1 + e^epsilon) delta); "
                         "use out_mode removed to audit the accountant's own claim")
    return PrivacyAuditResult(config=config, bound=bound, scores=[float(s) for s in a["scores"]],
                              is_in=[bool(b) for b in a["is_in"]], indices=[int(i) for i in a["indices"]],
                              labels=[int(v) for v in a["labels"]], feature_names=list(a["feature_names"]),
                              test_accuracy=float(result.test_accuracy),
                              claimed_epsilon=None if result.epsilon is None else float(result.epsilon),
                              claimed_delta=claimed_delta, epochs_trained=int(result.epochs_trained),
                              n_train=int(result.n_train), train_seconds=float(result.train_seconds),
                              score_seconds=float(result.score_seconds), notes=notes, run_id=run_id, bounds=bounds,
                              choice=None if "choice" not in a else [int(c) for c in a["choice"]])


def run_privacy_audit(config: PrivacyAuditConfig, progress: Callable[[Any], None] | None = None, cancel: Any = None,
                      *, store: "Store | None" = None, force: bool = False,
                      executor: "Executor | None" = None) -> PrivacyAuditResult:
    """Train the audit's ONE model as a run of the store, then bound epsilon; an identical finished run
    is reused (nothing trained) unless ``force``.

    Args:
        store: the run store (default: the one of ``$UFM_HOME``, or the executor's).
        executor: where the run trains (any :class:`ufm.runs.engine.Executor`, waited on by
            :func:`ufm.runs.engine.wait_for`); None: in this thread (:func:`ufm.runs.jobs.measure`).
        progress, cancel: as :func:`ufm.core.experiment.run_experiment`; ``ufm runs cancel`` stops it too.

    Raises:
        ValueError / FeatureError / DataUnavailable: bad input (m larger than the training set,
            features that do not fit), before any run is recorded; the message says what to do.
        TrainingCancelled (the run is recorded cancelled), TrainingDiverged (failed).
    """
    from ufm.runs import jobs
    from ufm.runs.store import Store

    if executor is not None:
        from ufm.runs.engine import wait_for

        run_cfg = config.run_config()
        if force:
            raise ValueError("force retrains in this thread only: leave out the executor to force a new run")
        from ufm.core.experiment_data import check_data

        check_data(run_cfg)  # bad sizes end here, not in a failed run record
        run_id = executor.submit(run_cfg)
        rec = wait_for(executor, [run_id], progress=progress, cancel=cancel)[0]
        if rec.status != "done":
            raise RuntimeError(f"the audit's run {run_id} ended {rec.status}: {rec.error or 'no error recorded'}")
        return audit_from_result(config, executor.store.load_result(run_id), run_id)
    if store is None:
        with Store() as own:
            return run_privacy_audit(config, progress, cancel, store=own, force=force)
    run_id, result, _ = jobs.measure(store, config.run_config(), force=force, progress=progress, cancel=cancel)
    return audit_from_result(config, result, run_id)
