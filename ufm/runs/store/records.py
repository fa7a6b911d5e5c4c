"""A run's record: one row of the ``runs`` table (:class:`RunRecord`) and the statuses a run goes through."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ufm.runs.store.database import FOREGROUND

if TYPE_CHECKING:
    from ufm.core.experiment import ExperimentConfig

STATUSES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")
FINISHED = ("done", "failed", "cancelled")


# What a finished run's summary and result dicts call their fields, and what an export calls them:
# "verdict" and "significant" there are the fast exposure test's (the verdict people see is the
# run's verdict record), "significant_ttest" (summaries stored by an older ufm) the paper's t-test.
_EXPORT_KEYS = {"verdict": "fast_test_verdict", "significant": "fast_test_memorised",
                "significant_ttest": "paper_ttest_p_below_alpha"}


def export_keys(d: dict[str, Any]) -> dict[str, Any]:
    """A copy of a run's summary or result dict (and its ``score``) for a JSON export: the fast test's
    ``verdict``/``significant`` named as the fast test's, the paper's t-test never "significant"."""
    out = {_EXPORT_KEYS.get(k, k): v for k, v in d.items()}
    if isinstance(out.get("score"), dict):
        out["score"] = export_keys(out["score"])
    return out


@dataclass(frozen=True, eq=False)
class RunRecord:
    """One row of the ``runs`` table.

    Attributes:
        created, started, finished, heartbeat: unix seconds (None = not yet).
        config_data: the ExperimentConfig as a dict (``config`` parses it).
        summary: :func:`result_summary` of a ``done`` run, else None.
        progress: the latest :class:`ufm.core.train.Progress` as a dict (plus ``time``), or None.
        model_meta: ``{"input_shape": [C, H, W], "num_classes": K}`` when weights were saved.
    """

    id: str
    status: str
    created: float
    started: float | None
    finished: float | None
    config_data: dict[str, Any]
    config_key: str
    code_version: str
    error: str | None
    summary: dict[str, Any] | None
    progress: dict[str, Any] | None
    model_meta: dict[str, Any] | None
    owner_pid: int | None
    owner_host: str | None
    heartbeat: float | None
    cancel_requested: bool
    owner_start: int | None = None
    priority: int = FOREGROUND
    verdict: dict[str, Any] | None = None
    bank: str | None = None

    @property
    def is_reference(self) -> bool:
        """A reference model of a bank (trained without the canary for the calibrated verdict)."""
        return self.bank is not None

    @property
    def config(self) -> "ExperimentConfig":
        from ufm.core.experiment import ExperimentConfig
        return ExperimentConfig.from_dict(self.config_data)

    @property
    def M(self) -> float | None:
        return None if self.summary is None else self.summary.get("M")

    @property
    def is_privacy_audit(self) -> bool:
        """A privacy-audit run: its config carries audit canaries, and it has no M and no verdict."""
        return self.config_data.get("audit") is not None

    @property
    def finished_ok(self) -> bool:
        return self.status == "done"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = d.pop("config_data")
        if d["summary"]:
            d["summary"] = export_keys(d["summary"])
        return d

    @classmethod
    def _from_row(cls, r: sqlite3.Row) -> "RunRecord":
        def js(v: str | None) -> Any:
            return None if v is None else json.loads(v)
        return cls(id=r["id"], status=r["status"], created=r["created"], started=r["started"],
                   finished=r["finished"], config_data=json.loads(r["config_json"]), config_key=r["config_key"],
                   code_version=r["code_version"], error=r["error"], summary=js(r["summary_json"]),
                   progress=js(r["progress_json"]), model_meta=js(r["model_json"]), owner_pid=r["owner_pid"],
                   owner_host=r["owner_host"], heartbeat=r["heartbeat"], cancel_requested=bool(r["cancel_requested"]),
                   owner_start=r["owner_start"] if "owner_start" in r.keys() else None,
                   priority=r["priority"] if "priority" in r.keys() else FOREGROUND,
                   verdict=js(r["verdict_json"]) if "verdict_json" in r.keys() else None,
                   bank=r["bank"] if "bank" in r.keys() else None)
