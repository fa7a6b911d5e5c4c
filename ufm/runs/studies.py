"""Studies: named groups of runs that answer one question, and their aggregated results.

Kinds (what varies between groups; every group repeats the same seeds):

* ``regularisers`` — same feature, canary and seeds, different regularisers (does DP-SGD help?);
* ``canaries`` — canary sweeps: placement, frequency, the clean control;
* ``seeds`` — one setting over many seeds (how stable is M?);
* ``custom`` — any list of (group, config) members.

A study lives in the run store (tables ``studies`` and ``study_runs``); each member is a config,
linked to the run that measured it once submitted. :func:`summary` gives per group the mean M
with a 95% t-interval over seeds, the share of runs whose verdict record says memorised, and the
mean test accuracy.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import pandas as pd

from ufm.measure.stats import t_interval

from ufm.measure.bank import DEFAULT_REFERENCES
from ufm.runs.store import ACTIVE, RunNotFound, Store, StoreError
from ufm.measure.verdict import stored_verdict
from ufm.runs.study_members import (STUDY_KINDS, StudyMember, canary_members, expand, regulariser_label,  # noqa: F401
                                    regulariser_members, seed_members)

if TYPE_CHECKING:
    from ufm.core.experiment import ExperimentConfig
    from ufm.runs.engine import Executor
    from ufm.core.train import ProgressFn

LEVEL = 0.95  # confidence level of the intervals over seeds


class StudyNotFound(StoreError):
    """No study of that name in the store."""


@dataclass(frozen=True)
class StudyEntry:
    """A stored member: its position in the study, group, config and run (None = not submitted)."""

    position: int
    group: str
    config: "ExperimentConfig"
    run_id: str | None


@dataclass(frozen=True)
class Study:
    """A stored study. ``created`` is in unix seconds."""

    name: str
    kind: str
    description: str
    base_config: "ExperimentConfig"
    created: float
    entries: tuple[StudyEntry, ...]

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(e.group for e in self.entries))


# ---------------------------------------------------------------------------------- storing

def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 200 or any(ch in name for ch in "\r\n\t"):
        raise ValueError(f"a study name must be 1-200 characters on one line, got {name!r}")
    return name.strip()


def create_study(store: Store, name: str, kind: str, base: "ExperimentConfig", members: Sequence[StudyMember], *,
                 description: str = "", replace: bool = False) -> Study:
    """Store a study (nothing is trained yet: see :func:`submit_study` / :func:`run_study`).

    Raises:
        ValueError: bad name or kind, no members, two members with the same config, or the name
            is taken (``replace=True`` overwrites that study; its runs are kept).
    """
    name = _check_name(name)
    if kind not in STUDY_KINDS:
        raise ValueError(f"unknown study kind {kind!r}; choose one of {', '.join(STUDY_KINDS)}")
    if not members:
        raise ValueError("a study needs at least one member")
    keys: dict[str, str] = {}
    for m in members:
        k = m.config.key()
        if k in keys:
            raise ValueError(f"groups {keys[k]!r} and {m.group!r} contain the same config (seed {m.config.seed}); "
                             "each member must differ")
        keys[k] = m.group
    with store.transaction() as c:
        if c.execute("SELECT 1 FROM studies WHERE name = ?", (name,)).fetchone():
            if not replace:
                raise ValueError(f"a study named {name!r} exists; pick another name or pass replace=True")
            c.execute("DELETE FROM studies WHERE name = ?", (name,))
        c.execute("INSERT INTO studies (name, kind, description, base_config_json, created) VALUES (?, ?, ?, ?, ?)",
                  (name, kind, description, base.to_json(), time.time()))
        c.executemany("INSERT INTO study_runs (study, position, grp, config_json, config_key) VALUES (?, ?, ?, ?, ?)",
                      [(name, i, m.group, m.config.to_json(), m.config.key()) for i, m in enumerate(members)])
    return get_study(store, name)


def ensure_study(store: Store, name: str, kind: str, base: "ExperimentConfig", members: Sequence[StudyMember], *,
                 description: str = "") -> str:
    """Create study ``name``, or keep the one that exists with the same members (same configs in
    the same order: its finished runs count); one with other members (e.g. a recomputed ranking)
    is replaced. Returns the name. Runs are not started here."""
    try:
        if [e.config.key() for e in get_study(store, name).entries] == [m.config.key() for m in members]:
            return name
        replace = True
    except StudyNotFound:
        replace = False
    create_study(store, name, kind, base, members, description=description, replace=replace)
    return name


def get_study(store: Store, name: str) -> Study:
    from ufm.core.experiment import ExperimentConfig

    rows = store.query("SELECT * FROM studies WHERE name = ?", (name,))
    if not rows:
        known = [r[0] for r in store.query("SELECT name FROM studies ORDER BY created")]
        raise StudyNotFound(f"no study named {name!r} in {store.db_path}"
                         + (f"; studies: {', '.join(known)}" if known else "; there are no studies yet"))
    s = rows[0]
    entries = tuple(StudyEntry(r["position"], r["grp"], ExperimentConfig.from_json(r["config_json"]), r["run_id"])
                    for r in store.query("SELECT * FROM study_runs WHERE study = ? ORDER BY position", (name,)))
    return Study(s["name"], s["kind"], s["description"], ExperimentConfig.from_json(s["base_config_json"]),
                 s["created"], entries)


def list_studies(store: Store) -> pd.DataFrame:
    """One row per study: name, kind, description, created (unix s), members, groups, done."""
    rows = store.query(
        "SELECT s.name, s.kind, s.description, s.created, COUNT(m.position) AS members, "
        "COUNT(DISTINCT m.grp) AS groups, SUM(CASE WHEN r.status = 'done' THEN 1 ELSE 0 END) AS done "
        "FROM studies s LEFT JOIN study_runs m ON m.study = s.name LEFT JOIN runs r ON r.id = m.run_id "
        "GROUP BY s.name ORDER BY s.created")
    return pd.DataFrame([dict(r) for r in rows],
                        columns=["name", "kind", "description", "created", "members", "groups", "done"])


def delete_study(store: Store, name: str) -> None:
    """Forget a study; its runs stay in the store."""
    get_study(store, name)
    with store.transaction() as c:
        c.execute("DELETE FROM studies WHERE name = ?", (name,))


def attach_run(store: Store, name: str, position: int, run_id: str) -> None:
    """Link member ``position`` of study ``name`` to run ``run_id``."""
    store.get(run_id)
    with store.transaction() as c:
        n = c.execute("UPDATE study_runs SET run_id = ? WHERE study = ? AND position = ?",
                      (run_id, name, position)).rowcount
    if n != 1:
        raise StoreError(f"study {name!r} has no member {position}")


def needs_run(store: Store, entry: StudyEntry, force: bool = False) -> bool:
    """Whether member ``entry`` still needs a run: none attached, its run is gone, failed or
    cancelled (or ``force``); never while its run is queued or running."""
    if entry.run_id is None:
        return True
    try:
        status = store.get(entry.run_id).status
    except RunNotFound:
        return True
    if status in ACTIVE:
        return False  # already on its way (maybe in another process); never start it twice
    return force or status != "done"


def submit_study(executor: "Executor", name: str, *, force: bool = False,
                 before: "Callable[[int, int, StudyEntry], None] | None" = None,
                 after: "Callable[[str], None] | None" = None) -> list[str]:
    """Submit every member of ``name`` that has no finished run to ``executor`` (any
    :class:`ufm.runs.engine.Executor`: the local pool, Ray, or inline); returns the run ids in
    member order. Finished identical runs are reused (the run cache) unless ``force``, so a
    study whose driver was killed resumes with the missing runs only. ``before(k, n, entry)`` is
    called before member ``k`` of ``n`` is submitted, ``after(run_id)`` once its run is attached."""
    ids = []
    entries = get_study(executor.store, name).entries
    for k, e in enumerate(entries):
        if needs_run(executor.store, e, force):
            if before is not None:
                before(k, len(entries), e)
            attach_run(executor.store, name, e.position, run_id := executor.submit(e.config, force=force))
            ids.append(run_id)
            if after is not None:
                after(run_id)
        else:
            ids.append(e.run_id)  # type: ignore[arg-type]
    return ids


def run_study(store: Store, name: str, *, force: bool = False, progress: "ProgressFn | None" = None) -> list[str]:
    """Like :func:`submit_study` but one member after the other in the calling thread
    (:class:`ufm.runs.engine.InlineExecutor`)."""
    from ufm.runs.engine import InlineExecutor

    return submit_study(InlineExecutor(store, progress=progress), name, force=force)


# ---------------------------------------------------------------------------------- results

RUN_COLUMNS = ["position", "group", "seed", "run_id", "status", "M", "X_u", "X_r", "p_value", "p_value_paired",
               "exposure", "exposure_p_value", "verdict", "verdict_test", "verdict_p", "significant", "test_accuracy",
               "epsilon", "learned", "error", "verdict_headline", "verdict_p_text", "verdict_text"]


def runs_frame(store: Store, name: str, references: int = DEFAULT_REFERENCES) -> pd.DataFrame:
    """One row per member of study ``name``: its group, seed, run and the run's numbers
    (NaN until the run is done). M, X_u, X_r in nats; exposure in bits; ``p_value`` and
    ``p_value_paired`` are the paper's t-tests (statistics; they never decide).

    The verdict columns are the run's verdict record (:func:`ufm.measure.verdict.stored_verdict`, brought
    up to date: calibrated once the bank of ``references`` clean models of the member's setting is
    complete): ``verdict`` its status, ``verdict_test`` which test decided, ``verdict_p`` the deciding
    p-value, ``significant`` whether it says memorised, ``verdict_headline`` / ``verdict_p_text`` /
    ``verdict_text`` the words every other surface prints for the run."""
    rows = []
    for e in get_study(store, name).entries:
        rec = None
        if e.run_id is not None:
            try:
                rec = store.get(e.run_id)
            except RunNotFound:
                rec = None
        s = (rec.summary if rec is not None else None) or {}
        v = stored_verdict(store, rec, references=references) if rec is not None else None
        rows.append({"position": e.position, "group": e.group, "seed": e.config.seed, "run_id": e.run_id,
                     "status": rec.status if rec is not None else "not run",
                     **{k: s.get(k, np.nan) for k in ("M", "X_u", "X_r", "p_value", "p_value_paired", "exposure",
                                                     "exposure_p_value", "test_accuracy")},
                     "verdict": v.status if v else None, "verdict_test": v.test if v else None,
                     "verdict_p": v.p_value if v else np.nan, "significant": v.memorised if v else np.nan,
                     "epsilon": s.get("epsilon", np.nan),
                     # False only when the run says its model did not learn (accuracy at chance)
                     "learned": (s.get("learned") is not False) if s else None,
                     "error": rec.error if rec is not None else None,
                     "verdict_headline": v.headline if v else None, "verdict_p_text": v.p_text if v else None,
                     "verdict_text": v.sentence if v else None})
    df = pd.DataFrame(rows, columns=RUN_COLUMNS)
    for col in ("M", "X_u", "X_r", "p_value", "p_value_paired", "exposure", "exposure_p_value", "verdict_p",
                "test_accuracy", "epsilon"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    return df


SUMMARY_COLUMNS = ["group", "members", "done", "failed", "pending", "mean_M", "sd_M", "ci_low", "ci_high",
                   "interval", "share_significant", "n_significant", "n_calibrated", "mean_test_accuracy",
                   "n_not_learned", "n_inconclusive", "mean_epsilon"]


def aggregate(runs: pd.DataFrame, level: float = LEVEL) -> pd.DataFrame:
    """Per group (in first-seen order) over its ``done`` runs: mean and sd of M (nats), its
    ``level`` t-interval (``ci_low``/``ci_high``, NaN with the reason in ``interval`` when
    n < 2), the share of runs the verdict calls memorised (``n_calibrated`` of them decided by the
    reference test, the rest by the provisional fast test), and the mean test accuracy (0-1).
    ``runs`` has the columns of :func:`runs_frame`."""
    out = []
    for group, g in runs.groupby("group", sort=False):
        done = g[g["status"] == "done"]
        n = len(done)
        mean, lo, hi = t_interval(done["M"].to_numpy(), level)
        if n == 0:
            note = "no finished runs yet"
        elif n == 1:
            note = "n = 1: no interval (needs at least 2 seeds)"
        elif n == 2:
            note = f"{level:.0%} t-interval over only 2 seeds: very wide, run at least 3"
        else:
            note = f"{level:.0%} t-interval over {n} seeds"
        sig = done["significant"].astype(bool) if n else pd.Series([], dtype=bool)
        # The share is over runs with an answer: an inconclusive run (a model that did not learn,
        # accuracy at chance) is neither memorised nor "not memorised", so it is left out of both
        # counts and reported on its own (n_not_learned, n_inconclusive).
        if "verdict" in done:
            conclusive = done["verdict"].isin(["memorised", "not_shown"])
        else:  # a frame without verdicts (older callers): every finished run counts
            conclusive = pd.Series(True, index=done.index)
        n_answered = int(conclusive.sum())
        eps = done["epsilon"].dropna() if "epsilon" in done else pd.Series([], dtype=float)
        not_learned = int((done["learned"] == False).sum()) if "learned" in done else 0  # noqa: E712 (None is not False)
        out.append({"group": group, "members": len(g), "done": n, "failed": int((g["status"] == "failed").sum()),
                    "pending": int(g["status"].isin(["queued", "running", "not run"]).sum()),
                    "mean_M": mean, "sd_M": float(done["M"].std(ddof=1)) if n >= 2 else math.nan,
                    "ci_low": math.nan if lo is None else lo, "ci_high": math.nan if hi is None else hi,
                    "interval": note,
                    "share_significant": float(sig[conclusive].mean()) if n_answered else math.nan,
                    "n_significant": int(sig[conclusive].sum()) if n else 0,
                    "n_calibrated": int((done["verdict_test"] == "reference").sum()),
                    "mean_test_accuracy": float(done["test_accuracy"].mean()) if n else math.nan,
                    "n_not_learned": not_learned,
                    "n_inconclusive": n - n_answered, "mean_epsilon": float(eps.mean()) if len(eps) else math.nan})
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)


def summary(store: Store, name: str, level: float = LEVEL) -> pd.DataFrame:
    """:func:`aggregate` of study ``name``'s runs: one row per group."""
    return aggregate(runs_frame(store, name), level)


def study_to_dict(study: Study) -> dict[str, Any]:
    """JSON-ready description of a study (configs included)."""
    return {"name": study.name, "kind": study.kind, "description": study.description, "created": study.created,
            "base_config": study.base_config.to_dict(),
            "members": [{"position": e.position, "group": e.group, "run_id": e.run_id,
                         "config": json.loads(e.config.to_json())} for e in study.entries]}
