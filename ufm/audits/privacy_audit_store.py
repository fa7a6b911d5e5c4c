"""Where privacy audits are found: their training runs in the run store, the audits saved as JSON
files by ufm before audits were runs (read, never written), and the audits of a Compare study.

An audit's model is a run (:func:`ufm.audits.privacy_audit.run_privacy_audit`); its bound is
computed from the run's stored scores whenever it is read, with the delta, confidence and guess
counts of the :class:`~ufm.audits.privacy_audit.PrivacyAuditConfig` asked for.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ufm.audits.privacy_audit import PrivacyAuditConfig, PrivacyAuditResult, audit_from_result

if TYPE_CHECKING:
    from ufm.runs.store import RunRecord, Store

LEGACY_NOTE = ("saved as a file by an earlier ufm, before privacy audits were runs: its model is not in the run "
               "store ({path})")


# ----------------------------------------------------------------------------------- audits saved as files

def legacy_audit_dir(home: str | Path) -> Path:
    """The folder where ufm before the run-store audits kept each audit as ``<config key>.json``."""
    return Path(home) / "privacy_audits"


def _read_legacy(path: Path) -> PrivacyAuditResult | None:
    try:
        res = PrivacyAuditResult.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    res.notes.append(LEGACY_NOTE.format(path=path))
    return res


def load_legacy_audit(home: str | Path, config: PrivacyAuditConfig) -> PrivacyAuditResult | None:
    """The audit of ``config`` saved as a file by an earlier ufm (with a note saying so), or None."""
    return _read_legacy(legacy_audit_dir(home) / f"{config.key()}.json")


def list_legacy_audits(home: str | Path) -> list[PrivacyAuditResult]:
    """Every audit saved as a file under ``home`` by an earlier ufm, newest file first."""
    folder = legacy_audit_dir(home)
    if not folder.is_dir():
        return []
    paths = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [r for r in map(_read_legacy, paths) if r is not None]


# ----------------------------------------------------------------------------------- audits that are runs

def audit_run(store: "Store", config: PrivacyAuditConfig) -> "RunRecord | None":
    """The newest run of ``config``'s training run (any status: queued, running, done, failed,
    cancelled), or None when it was never submitted."""
    rows = store.query("SELECT id FROM runs WHERE config_key = ? ORDER BY created DESC, rowid DESC LIMIT 1",
                       (config.run_config().key(),))
    return store.get(rows[0]["id"]) if rows else None


def load_privacy_audit(store: "Store", config: PrivacyAuditConfig) -> PrivacyAuditResult | None:
    """The audit of ``config``: from its finished run in ``store`` (this ufm version's, as runs are
    reused), else from a file saved by an earlier ufm under the store's home; None when neither."""
    hit = store.find_cached(config.run_config())
    if hit is not None:
        return audit_from_result(config, store.load_result(hit.id), hit.id)
    return load_legacy_audit(store.home, config)


def audit_of_run(store: "Store", record: "RunRecord", **bound) -> PrivacyAuditResult:
    """The audit of a finished audit run, with the bound settings ``bound`` (default: the defaults)."""
    return audit_from_result(PrivacyAuditConfig.from_run_config(record.config, **bound),
                             store.load_result(record.id), record.id)


def list_privacy_audits(store: "Store") -> list[PrivacyAuditResult]:
    """Every finished audit: the audit runs in ``store`` (newest first, bound at the default delta
    and confidence), then the audits saved as files by an earlier ufm (each with a note)."""
    out = [audit_of_run(store, rec) for rec in store.list_runs("done") if rec.is_privacy_audit]
    return out + list_legacy_audits(store.home)


# ----------------------------------------------------------------------------------- studies

def _study_file(home: str | Path, study: str) -> Path:
    return legacy_audit_dir(home) / "studies" / f"{hashlib.sha256(study.encode()).hexdigest()[:16]}.json"


def attach_study_audits(home: str | Path, study: str, audits: Sequence[tuple[str, PrivacyAuditConfig]]) -> Path:
    """Record which audits (group, config) belong to ``study`` (the Compare page's epsilon column)."""
    from ufm.fileio import atomic_write

    path = _study_file(home, study)
    atomic_write(path, json.dumps({"study": study, "audits": [{"group": g, "config": c.to_dict()} for g, c in audits]}),
                 private=True)
    return path


def study_audits(home: str | Path, study: str) -> list[tuple[str, PrivacyAuditConfig]]:
    """The (group, config) audits recorded for ``study``; empty when none were asked for."""
    try:
        d = json.loads(_study_file(home, study).read_text())
        return [(a["group"], PrivacyAuditConfig.from_dict(a["config"])) for a in d["audits"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def study_audit_table(store: "Store", study: str):
    """Per group of ``study``: audits asked for and done, epsilon lower bound mean / min / max over
    the finished ones, and the DP-SGD accountant's mean claim. None when the study has no audits."""
    import pandas as pd

    audits = study_audits(store.home, study)
    if not audits:
        return None
    rows = []
    for group in dict.fromkeys(g for g, _ in audits):
        done = [r for g, c in audits if g == group for r in [load_privacy_audit(store, c)] if r is not None]
        eps = [r.epsilon for r in done]
        claims = [r.claimed_epsilon for r in done if r.claimed_epsilon is not None]
        rows.append({"group": group, "audits": sum(g == group for g, _ in audits), "audits_done": len(done),
                     "eps_lower_bound": float(np.mean(eps)) if eps else None,
                     "eps_lb_min": min(eps) if eps else None, "eps_lb_max": max(eps) if eps else None,
                     "claimed_epsilon": float(np.mean(claims)) if claims else None})
    return pd.DataFrame(rows)
