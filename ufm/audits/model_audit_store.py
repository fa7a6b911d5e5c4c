"""Model audits in the run store's ``audits`` table: one row per finished audit, written whole in one
transaction (:func:`save_model_audit`), so a failed or cancelled audit leaves nothing behind; and
the background task that runs one (:func:`model_audit_task`).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ufm.audits.model_audit import ModelAuditConfig, ModelAuditResult, run_model_audit
from ufm.version import __version__

if TYPE_CHECKING:
    from ufm.runs.store import Store


@dataclass(frozen=True)
class ModelAuditRecord:
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


def new_model_audit_id() -> str:
    return secrets.token_hex(6)


def save_model_audit(store: "Store", result: ModelAuditResult, audit_id: str | None = None) -> str:
    """Record a finished audit (one INSERT: all or nothing). Returns its id (12 hex digits;
    ``audit_id`` when given, e.g. drawn by the dashboard before the audit started)."""
    import sqlite3

    from ufm.runs.store import StoreError

    payload = result.to_json()
    fixed = audit_id is not None
    for _ in range(1 if fixed else 5):
        aid = audit_id if fixed else new_model_audit_id()
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


def model_audit_task(report: Any, model_path: str, config: dict[str, Any], spec: dict[str, Any], home: str,
                     audit_id: str, cancel_path: str | None = None) -> None:
    """A background audit (``ufm.runs.worker.run_task`` / the dashboard's tasks): load the model from
    ``model_path`` with the spec statements ``spec`` (``input_size``, ``channels``, ``layout``,
    ``mean``, ``std``), run :func:`run_model_audit` and record it under ``audit_id`` in the store at
    ``home``. Cancelled when the file ``cancel_path`` appears; nothing is stored then."""
    from ufm.audits.onnx_model import load_onnx
    from ufm.runs.store import Store

    model = load_onnx(model_path, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items()})
    cancel = (lambda: Path(cancel_path).exists()) if cancel_path else None
    result = run_model_audit(model, ModelAuditConfig.from_dict(config), progress=lambda p: report(p.message), cancel=cancel)
    with Store(home) as store:
        save_model_audit(store, result, audit_id)
    report(f"done: {result.verdict.headline}")


def _record(r: Any) -> ModelAuditRecord:
    return ModelAuditRecord(r["id"], r["created"], r["model_name"], r["model_sha256"], json.loads(r["input_spec_json"]),
                            json.loads(r["feature_json"]), r["status"], json.loads(r["summary_json"]), r["code_version"])


def list_model_audits(store: "Store", limit: int | None = None) -> list[ModelAuditRecord]:
    """Audits, newest first."""
    sql = ("SELECT id, created, model_name, model_sha256, input_spec_json, feature_json, status, summary_json, "
           "code_version FROM audits ORDER BY created DESC")
    rows = store.query(sql + (" LIMIT ?" if limit else ""), (int(limit),) if limit else ())
    return [_record(r) for r in rows]


def load_model_audit(store: "Store", audit_id: str) -> ModelAuditResult:
    rows = store.query("SELECT result_json FROM audits WHERE id = ?", (audit_id,))
    if not rows:
        from ufm.runs.store import StoreError
        raise StoreError(f"no audit {audit_id!r}")
    return ModelAuditResult.from_dict(json.loads(rows[0][0]))


def delete_model_audit(store: "Store", audit_id: str) -> None:
    with store.transaction() as c:
        c.execute("DELETE FROM audits WHERE id = ?", (audit_id,))
