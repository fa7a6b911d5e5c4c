"""The members of a study: which configs a study of each kind holds, in which groups.

:func:`expand` builds a study's members from a base config (:mod:`ufm.runs.studies` stores and runs them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from ufm.core.canary import CanaryChoice
    from ufm.core.experiment import ExperimentConfig

STUDY_KINDS = ("regularisers", "canaries", "seeds", "custom")


@dataclass(frozen=True)
class StudyMember:
    """One config of a study and the group it belongs to (e.g. ``"dropout"``)."""

    group: str
    config: "ExperimentConfig"


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("a study needs at least one seed, e.g. seeds=[0, 1, 2]")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    return seeds


def regulariser_label(regularisers: Sequence[str]) -> str:
    """``()`` -> ``"none"``, ``("augment", "dropout")`` -> ``"augment+dropout"``."""
    return "+".join(regularisers) if regularisers else "none"


def regulariser_members(base: "ExperimentConfig", regularisers: Sequence[str | Sequence[str]],
                        seeds: Sequence[int]) -> list[StudyMember]:
    """One group per regulariser setting, each over ``seeds``; all else as in ``base``.

    Args:
        regularisers: settings; each a name (``"dropout"``), a ``+``/``,``-joined combination
            (``"dropout+augment"``), a sequence of names, or ``"none"``.
    """
    from ufm.core.train import DEFAULT_DP

    seeds = _check_seeds(seeds)
    members, seen = [], set()
    for r in regularisers:
        names = [x.strip() for x in r.replace(",", "+").split("+")] if isinstance(r, str) else list(r)
        names = [x for x in names if x and x != "none"]
        # validates and sorts the names; a dp-sgd member gets the base's DP settings, else the shared
        # default (never DPConfig()'s noise multiplier 1.0, which spent epsilon ~31 in a quick run)
        cfg0 = base.replace(regularisers=tuple(names)).with_dp(
            base.dp if "dp-sgd" in base.regularisers else DEFAULT_DP)
        label = regulariser_label(cfg0.regularisers)
        if label in seen:
            raise ValueError(f"regulariser setting {label!r} is listed twice")
        seen.add(label)
        members += [StudyMember(label, cfg0.replace(seed=s)) for s in seeds]
    if not members:
        raise ValueError("list at least one regulariser setting (e.g. ['none', 'dropout', 'dp-sgd'])")
    return members


def canary_members(base: "ExperimentConfig", canaries: Sequence["CanaryChoice"],
                   seeds: Sequence[int]) -> list[StudyMember]:
    """One group per canary choice (placement, frequency, or none = the clean control)."""
    seeds = _check_seeds(seeds)
    members, seen = [], set()
    for c in canaries:
        label = c.describe()
        if label in seen:
            raise ValueError(f"canary choice {label!r} is listed twice")
        seen.add(label)
        members += [StudyMember(label, base.replace(canary=c, seed=s)) for s in seeds]
    if not members:
        raise ValueError("list at least one canary choice")
    return members


def seed_members(base: "ExperimentConfig", seeds: Sequence[int], *, group: str = "all seeds") -> list[StudyMember]:
    """``base`` repeated over ``seeds``: one group."""
    return [StudyMember(group, base.replace(seed=s)) for s in _check_seeds(seeds)]


def expand(kind: str, base: "ExperimentConfig", *, seeds: Sequence[int],
           regularisers: Sequence[str | Sequence[str]] | None = None,
           canaries: Sequence["CanaryChoice"] | None = None) -> list[StudyMember]:
    """The members of a study of ``kind`` built from ``base`` (see the ``*_members`` helpers)."""
    if kind == "regularisers":
        if regularisers is None:
            raise ValueError("a regulariser study needs regularisers=[...], e.g. ['none', 'dropout', 'dp-sgd']")
        return regulariser_members(base, regularisers, seeds)
    if kind == "canaries":
        if canaries is None:
            raise ValueError("a canary study needs canaries=[CanaryChoice(...), ...]")
        return canary_members(base, canaries, seeds)
    if kind == "seeds":
        return seed_members(base, seeds)
    raise ValueError(f"unknown study kind {kind!r}; expand() builds {', '.join(STUDY_KINDS[:3])} "
                     "(for 'custom', pass your own members to create_study)")
