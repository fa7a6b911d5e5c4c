"""The identity of a reference bank and of its models, from configs alone (no store, no torch):
which seeds a bank trains, the clean config of each reference model, the bank's key, and whether a
stored config is a reference model (:func:`reference_bank_of`, which the run store uses to mark
them). The bank's measurement is :mod:`ufm.measure.bank`; training one is :mod:`ufm.runs.banks`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ufm.core.config_hash import config_hash
from ufm.limits import MAX_REFERENCES

if TYPE_CHECKING:
    from ufm.core.experiment_config import ExperimentConfig

DEFAULT_REFERENCES = 39
REFERENCE_SEED_BASE = 1_000_000


def check_references(references: int) -> int:
    """Validate R: at least 19 (so that ``p`` can reach 0.05) and at most :data:`MAX_REFERENCES`."""
    r = int(references)
    if not 19 <= r <= MAX_REFERENCES:
        raise ValueError(f"the number of reference models R must be between 19 and {MAX_REFERENCES}, got {references}: "
                         f"the smallest p-value is 1/(R + 1), so R < 19 can never reach 0.05")
    return r


def reference_seeds(config: "ExperimentConfig", references: int = DEFAULT_REFERENCES) -> list[int]:
    """The R training seeds of the bank for ``config``: a fixed range, skipping the canary run's seed."""
    r = check_references(references)
    seeds = [REFERENCE_SEED_BASE + i for i in range(r + 1) if REFERENCE_SEED_BASE + i != config.seed]
    return seeds[:r]


def bank_config(config: "ExperimentConfig", seed: int) -> "ExperimentConfig":
    """The clean reference model of ``config``'s training setting with training seed ``seed``.

    Everything that changes training is kept; the canary is removed; everything that only changes
    scoring is set to one canonical value, so the same bank serves every feature and scoring choice
    (each reference model is re-scored for a feature by :func:`reference_scores`).
    """
    from ufm.core.canary import CanaryChoice  # here, not at the top: the verdict's readers (ufm runs list) need no torch

    return config.replace(canary=CanaryChoice("none", ()), seed=int(seed), feature=_canonical_feature(), **_CANONICAL)


# What bank_config fixes for every reference model, as in the stored config JSON: a run whose config
# has these values and a seed from the reference range is a reference model.
_CANONICAL = {"ood_size": 2, "repeats": 1, "candidates": 1, "random_kind": None, "checkpoint_every": 0}


def reference_bank_of(config: dict[str, Any]) -> str | None:
    """The bank key (:func:`bank_key`) of a reference model, from its config as stored (plain JSON
    data, as ``json.loads(config.to_json())``); None for every other run.

    Works on the dict so the store can mark the reference models of an older store when it
    migrates it. For a config written by this ufm the key equals :func:`bank_key`.
    """
    try:
        seed = int(config.get("seed", -1))
        canary = config.get("canary") or {}
    except (TypeError, ValueError, AttributeError):
        return None
    if seed < REFERENCE_SEED_BASE or canary.get("mode") != "none":
        return None
    if any(config.get(k, v) != v for k, v in _CANONICAL.items()):
        return None
    if config.get("feature") != _canonical_feature_data():
        return None
    d = {k: v for k, v in config.items() if k != "data_dir"}
    d["seed"] = 0
    return config_hash(d)


# CanaryChoice("none", ()).to_dict(), written out: the canary module loads torch
_NO_CANARY = {"mode": "none", "indices": [], "count": 1, "label": None}


def stored_bank_key(config_key: str, config: dict[str, Any]) -> str | None:
    """:func:`bank_key` of a run from its stored config and config key, without the config class
    (which loads torch; ``ufm runs list`` and ``ufm runs cancel`` must not).

    Exact only for a config stored as this ufm writes it, which its own key proves: None when the
    config does not hash to ``config_key`` (an older ufm's config; ask :func:`bank_key`).
    """
    d = {k: v for k, v in config.items() if k != "data_dir"}
    if config_hash(d) != config_key:
        return None
    d.update(_CANONICAL, canary=dict(_NO_CANARY), seed=0, feature=_canonical_feature_data())
    return config_hash(d)


def _canonical_feature():
    from ufm.core.features import glyph

    return glyph("A", size=2, offset=(0, 0))


def _canonical_feature_data() -> dict[str, Any]:
    """:func:`_canonical_feature` as a stored config holds it (JSON data)."""
    return json.loads(json.dumps(_canonical_feature().to_dict()))


def bank_configs(config: "ExperimentConfig", references: int = DEFAULT_REFERENCES) -> list["ExperimentConfig"]:
    return [bank_config(config, s) for s in reference_seeds(config, references)]


def bank_key(config: "ExperimentConfig") -> str:
    """One key per training setting (the bank's identity; seed-independent)."""
    return bank_config(config, 0).replace(seed=0).key()
