"""Reference models: a calibrated, feature-specific null for the memorisation verdict.

The fast exposure test ranks the unique feature among candidate features on the *same* model, so
it assumes the model reacts to ``z_u`` like to a typical candidate unless it memorised ``z_u``. For
structured features that is not true (a letter moves a digit classifier differently from its own
pixels scattered), so the fast test can flag clean models.

The calibrated question is instead: *is the canary model's M for this feature larger than the M of
the same feature on models trained the same way without the canary?* A model trained without the
canary does not depend on the feature, so one **bank** of R clean reference models per training
setting (dataset, architecture, regularisers, train size, budget; different seeds) serves every
feature. Each reference model's M is computed with exactly the scoring procedure of the canary run
(same inference images, same random features: :func:`ufm.measure.scores.feature_effect` with the run's
seed), and the p-value is the canary model's rank among them::

    p = (1 + #{M_ref >= M_obs}) / (R + 1)        (ties count against memorisation)

Without memorisation the canary model and the R reference models are exchangeable, so
``P(p <= a) <= a`` exactly, for every feature (offline LiRA-style calibration, Carlini et al. 2022,
applied to a feature). The floor of p is ``1 / (R + 1)``: with the default R = 39 it is 0.025, so the
strict ``p < 0.05`` verdict says "memorised" only when the canary model beats all 39 references
(level 2.5%). Why 39 and not fewer: the level holds on average over banks, but a bank is trained
once and then fixed, and with a fixed bank the false-positive rate of one particular feature
varies around the level (with R = 24 it averaged 4% but reached 12-14% for two glyphs in the
calibration study); R = 39 at level 2.5% keeps every kind's measured rate under 5%. Larger R gives
smaller p-values and a steadier answer at the cost of R trainings, done once per setting and
shared by every feature, canary and seed.

Reference seeds come from their own range (:data:`REFERENCE_SEED_BASE`), never equal to the canary
model's seed (its clean twin would not be an independent draw).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

# The identity of a bank and of its reference models (no store, no torch): imported from here by many modules.
from ufm.measure.bank_keys import (DEFAULT_REFERENCES, MAX_REFERENCES, REFERENCE_SEED_BASE,  # noqa: F401
                                   bank_config, bank_configs, bank_key, check_references, reference_bank_of,
                                   reference_seeds, stored_bank_key)

SCORES_FILE = "reference_scores.json"

if TYPE_CHECKING:
    from ufm.core.experiment import ExperimentConfig
    from ufm.runs.store import RunRecord, Store

@dataclass(frozen=True)
class BankStatus:
    """Which reference models of a bank are finished (``run_ids``) and which are not (``missing``);
    ``active``: how many of the missing ones are queued or training now."""

    references: int
    run_ids: tuple[str, ...]
    missing: tuple["ExperimentConfig", ...]
    active: int = 0

    @property
    def queued(self) -> bool:
        """Every missing reference model is already queued or training: nothing to submit."""
        return bool(self.missing) and self.active >= len(self.missing)

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def done(self) -> int:
        return len(self.run_ids)


def bank_status(store: "Store", config: "ExperimentConfig", references: int = DEFAULT_REFERENCES) -> BankStatus:
    """Look the bank of ``config`` up in the run store (finished, cached runs only; the ``active``
    count: missing ones queued or running in any process)."""
    from ufm.version import __version__

    found, missing = [], []
    for cfg in bank_configs(config, references):
        hit = store.find_cached(cfg)
        if hit is None:
            missing.append(cfg)
        else:
            found.append(hit.id)
    active = 0
    if missing:
        keys = {c.key() for c in missing}
        rows = store.query("SELECT DISTINCT config_key FROM runs WHERE status IN ('queued', 'running') AND "
                           "code_version = ? AND bank = ?", (__version__, bank_key(config)))
        active = sum(r[0] in keys for r in rows)
    return BankStatus(int(references), tuple(found), tuple(missing), active)


def cancel_unneeded_bank(store: "Store", config: "ExperimentConfig | RunRecord", *, except_run: str | None = None,
                         cancel: "Callable[[str], Any] | None" = None) -> list[str]:
    """Cancel the unfinished reference models of ``config``'s bank unless another run still needs
    them; returns the ids cancelled.

    A bank is needed by a run of the same training setting (not a reference model itself, not
    ``except_run``) that is queued or running, or done with a verdict that is not final yet (no
    stored verdict, or the provisional fast test's): the bank would calibrate it. Called when the
    user cancels a run: its bank should not keep the machine busy for nobody.

    ``cancel``: how to cancel a run (the runner's ``cancel``, which also stops a running one of
    this process at once); None = ``store.request_cancel`` (any process's run, by the store's flag).
    ``config`` may be the run's record: its bank is then found without the config class (no torch).
    """
    cancel = cancel if cancel is not None else store.request_cancel
    key = run_bank_key(config.config_key, config.config_data) if hasattr(config, "config_data") else bank_key(config)
    for r in store.query("SELECT id, status, config_key, config_json, verdict_json FROM runs WHERE bank IS NULL AND "
                         "status IN ('queued', 'running', 'done') AND id IS NOT ?", (except_run,)):
        if r["status"] == "done" and r["verdict_json"] is not None and \
                json.loads(r["verdict_json"]).get("test") != "fast":
            continue  # final: calibrated, or inconclusive because the model did not learn
        try:
            needs = run_bank_key(r["config_key"], json.loads(r["config_json"])) == key
        except Exception:  # noqa: BLE001 - a config this ufm cannot read is not of this bank
            needs = False
        if needs:
            return []
    ids = [r[0] for r in store.query("SELECT id FROM runs WHERE bank = ? AND status IN ('queued', 'running')",
                                     (key,))]
    for run_id in ids:
        cancel(run_id)
    return ids


def bank_may_be_complete(store: "Store", config_key: str, config_data: dict[str, Any],
                         references: int = DEFAULT_REFERENCES) -> bool:
    """False when the bank of a run (its ``config_key`` and stored config) certainly is not
    complete: fewer than ``references`` finished reference models of its setting, by this ufm, are
    in the store. One query, where :func:`bank_status` makes R + 1; True means "look closer"."""
    from ufm.version import __version__

    key = _BANK_KEYS.get(config_key)
    if key is None:  # the config key fixes the config (data_dir aside), so it fixes the bank key
        # No bank in the store is that large: nothing to work out. (The key is worked out from the
        # stored config, without the config class, which loads torch: `ufm runs list` must not.)
        largest = store.query("SELECT MAX(n) FROM (SELECT COUNT(DISTINCT config_key) AS n FROM runs WHERE bank IS "
                              "NOT NULL AND status = 'done' AND code_version = ? GROUP BY bank)", (__version__,))[0][0]
        if int(largest or 0) < int(references):
            return False
        key = _BANK_KEYS[config_key] = run_bank_key(config_key, config_data)
    n = store.query("SELECT COUNT(DISTINCT config_key) FROM runs WHERE bank = ? AND status = 'done' AND "
                    "code_version = ?", (key, __version__))[0][0]
    return int(n) >= int(references)


_BANK_KEYS: dict[str, str] = {}  # config key -> bank key (a cache; both are hashes of the config)


def run_bank_key(config_key: str, config_data: dict[str, Any]) -> str:
    """:func:`bank_key` of a stored run (its config key and config): without the config class, which
    loads torch, for a config as this ufm writes it; with it for an older ufm's."""
    key = stored_bank_key(config_key, config_data)
    if key is None:
        from ufm.core.experiment import ExperimentConfig

        key = bank_key(ExperimentConfig.from_dict(config_data))
    return key


@functools.lru_cache(maxsize=4096)
def _setting_key(config_json: str) -> str:
    """:func:`bank_key` of a stored config (cached: the same configs are looked at again and again)."""
    from ufm.core.experiment import ExperimentConfig

    return bank_key(ExperimentConfig.from_json(config_json))


def score_key(config: "ExperimentConfig") -> str:
    """What fixes a reference model's M for a feature: the feature, the inference images and the
    scoring randomness (the canary run's seed)."""
    d = {"feature": config.feature.to_dict(), "dataset": config.dataset, "ood_source": config.ood_source,
         "ood_size": config.ood_size, "repeats": config.repeats, "random_kind": config.random_kind,
         "seed": config.seed}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def reference_scores(store: "Store", config: "ExperimentConfig", run_ids: Sequence[str], *,
                     device: str = "cpu") -> np.ndarray:
    """M of ``config``'s feature on each reference model (nats), (R,) float64.

    Scored by :func:`ufm.measure.scores.feature_effect` on ``config``'s inference images with ``config.seed``:
    the same computation as the canary run's M. Cached per reference run and score key.
    """
    from ufm.core.experiment import inference_images
    from ufm.fileio import atomic_write
    from ufm.measure.scores import feature_effect

    key = score_key(config)
    x = None
    out = []
    for run_id in run_ids:
        path = store.run_dir(run_id) / SCORES_FILE
        cache = _read_cache(path)
        if key not in cache:
            if x is None:
                x = inference_images(config).x.to(device)
            model = store.load_model(run_id, device=device)
            d_u, d_r = feature_effect(model, x, config.feature, repeats=config.repeats,
                                      random_kind=config.random_kind, seed=config.seed)
            cache[key] = float(np.mean(d_u) - np.mean(d_r))
            atomic_write(path, json.dumps(cache), private=True)
        out.append(cache[key])
    return np.asarray(out, dtype=np.float64)


def _read_cache(path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))} if isinstance(data, dict) else {}


@dataclass(frozen=True)
class ReferenceTest:
    """The calibrated verdict's numbers.

    Attributes:
        observed_M: the canary model's M (nats).
        reference_M: (R,) the reference models' M for the same feature (nats).
        rank: 1 + number of reference models with M >= observed (ties within tolerance included).
        p_value: rank / (R + 1).
        alpha: level of the verdict (memorised when p < alpha).
    """

    observed_M: float
    reference_M: tuple[float, ...]
    rank: int
    p_value: float
    alpha: float
    run_ids: tuple[str, ...] = ()

    @property
    def references(self) -> int:
        return len(self.reference_M)

    @property
    def memorised(self) -> bool:
        return self.p_value < self.alpha

    def text(self) -> str:
        r = self.references
        beaten = r + 1 - self.rank
        if self.memorised:
            return (f"Memorised at the {self.alpha:.0%} level: the model's M for this feature is larger than on all "
                    f"{r} reference models trained the same way without the canary (calibrated p = {self.p_value:.2g}).")
        return (f"No evidence of memorisation at the {self.alpha:.0%} level: the model's M for this feature exceeds "
                f"{beaten} of {r} reference models trained without the canary (calibrated p = {self.p_value:.2g}). "
                f"This does not prove the feature was not memorised: one canary can only be detected or not.")

    def to_dict(self) -> dict[str, Any]:
        return {"observed_M": self.observed_M, "reference_M": list(self.reference_M), "rank": self.rank,
                "p_value": self.p_value, "alpha": self.alpha, "references": self.references,
                "memorised": self.memorised, "run_ids": list(self.run_ids)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReferenceTest":
        return cls(float(d["observed_M"]), tuple(float(v) for v in d["reference_M"]), int(d["rank"]),
                   float(d["p_value"]), float(d["alpha"]), tuple(d.get("run_ids", ())))


def rank_test(observed: float, reference: np.ndarray, alpha: float = 0.05,
              run_ids: Sequence[str] = ()) -> ReferenceTest:
    """Rank ``observed`` among ``reference`` with the exposure test's tie rule."""
    from ufm.measure.scores import exposure_test

    rank, _, p = exposure_test(float(observed), np.asarray(reference, dtype=np.float64))
    return ReferenceTest(float(observed), tuple(float(v) for v in reference), rank, p, float(alpha), tuple(run_ids))


def reference_test(store: "Store", config: "ExperimentConfig", observed_M: float,
                   references: int = DEFAULT_REFERENCES, *, device: str = "cpu") -> ReferenceTest | None:
    """The calibrated test of a finished canary run of ``config`` with M = ``observed_M``, or None
    while the bank is incomplete (see :func:`bank_status`)."""
    status = bank_status(store, config, references)
    if not status.complete:
        return None
    refs = reference_scores(store, config, status.run_ids, device=device)
    return rank_test(observed_M, refs, config.alpha, status.run_ids)
