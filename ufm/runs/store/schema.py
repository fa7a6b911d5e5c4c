"""The run database's schema: the tables as migrations (``MIGRATIONS[v]`` takes a database at
``PRAGMA user_version`` v to v + 1), applied on open by :class:`ufm.runs.store.database.Database`, so
stores made by any older ufm open; and the queue priorities the schema records."""

from __future__ import annotations

import sqlite3
from typing import Callable, Sequence

# Schema migrations: MIGRATIONS[v] takes a database at user_version v to v + 1. Append, never edit.
# (Statements run one by one inside one transaction: executescript() would commit halfway.)
_V1 = (
    """CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        created REAL NOT NULL,              -- unix seconds
        started REAL,
        finished REAL,
        status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
        config_json TEXT NOT NULL,          -- ExperimentConfig.to_json()
        config_key TEXT NOT NULL,           -- ExperimentConfig.key()
        code_version TEXT NOT NULL,         -- ufm.__version__ of the code that ran it
        error TEXT,
        summary_json TEXT,                  -- M, X_u, X_r, p-values, exposure, verdict, accuracy, ...
        progress_json TEXT,                 -- the latest Progress (phase, epoch, losses)
        model_json TEXT,                    -- {"input_shape": [C, H, W], "num_classes": K} to rebuild the model
        owner_pid INTEGER,
        owner_host TEXT,
        heartbeat REAL,                     -- unix seconds of the owner's latest sign of life
        cancel_requested INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX runs_by_key ON runs (config_key, code_version, status)",
    "CREATE INDEX runs_by_created ON runs (created)",
    """CREATE TABLE studies (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        base_config_json TEXT NOT NULL,
        created REAL NOT NULL
    )""",
    """CREATE TABLE study_runs (
        study TEXT NOT NULL REFERENCES studies (name) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        grp TEXT NOT NULL,
        config_json TEXT NOT NULL,
        config_key TEXT NOT NULL,
        run_id TEXT REFERENCES runs (id) ON DELETE SET NULL,
        PRIMARY KEY (study, position)
    )""",
)


def _statements(stmts: Sequence[str]) -> Callable[[sqlite3.Connection], None]:
    def migrate(conn: sqlite3.Connection) -> None:
        for s in stmts:
            conn.execute(s)
    return migrate


# v2: the owner's process start time (clock ticks since boot, Linux), so a pid reused by another
# process after the owner died is not taken for the owner.
_V2 = ("ALTER TABLE runs ADD COLUMN owner_start INTEGER",)

# v3: audits of models ufm did not train (ufm.audits.model_audit): one row per finished audit, written whole.
_V3 = (
    """CREATE TABLE audits (
        id TEXT PRIMARY KEY,
        created REAL NOT NULL,              -- unix seconds
        model_name TEXT NOT NULL,           -- the ONNX file's name
        model_sha256 TEXT NOT NULL,         -- hash of the ONNX file
        input_spec_json TEXT NOT NULL,      -- ufm.audits.onnx_model.InputSpec.to_dict()
        feature_json TEXT NOT NULL,         -- Feature.to_dict()
        status TEXT NOT NULL,               -- the verdict: memorised | not_shown | inconclusive
        summary_json TEXT NOT NULL,         -- M, X_u, X_r, p-values, verdict, settings
        result_json TEXT NOT NULL,          -- the full AuditResult (d_u, d_r, candidates, access)
        code_version TEXT NOT NULL
    )""",
    "CREATE INDEX audits_by_created ON audits (created)",
)

FOREGROUND = 0   # queue priority of the runs a user starts (Train, Compare, demos, CLI)
BACKGROUND = 10  # queue priority of reference models queued for a calibrated verdict

# v4 (issue 17): a fair queue and one verdict record.
# - priority: lower runs first (like nice); the user's own runs are FOREGROUND (0), reference models
#   queued in the background BACKGROUND (10), so a bank never starves the run someone waits for.
# - verdict_json: the run's verdict as computed by ufm.measure.verdict (calibrated / provisional /
#   inconclusive), written when it changes, read by every surface (dashboard, CLI, exports, studies).
# - bank: the bank key of a reference model (NULL for every other run): hides them from the runs
#   table and groups them by bank.
_V4 = (
    "ALTER TABLE runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE runs ADD COLUMN verdict_json TEXT",
    "ALTER TABLE runs ADD COLUMN bank TEXT",
    "CREATE INDEX runs_by_queue ON runs (status, priority, created)",
)


def _v4(conn: sqlite3.Connection) -> None:
    _statements(_V4)(conn)
    # Reference models recorded by an older ufm: recognised by their config (see
    # ufm.measure.bank_keys.reference_bank_of, plain JSON, no torch), marked with their bank and, if still
    # queued, moved to the background.
    import json

    from ufm.measure.bank_keys import reference_bank_of

    rows = conn.execute("SELECT id, config_json FROM runs").fetchall()
    for run_id, config_json in rows:
        bank = reference_bank_of(json.loads(config_json))
        if bank is not None:
            conn.execute("UPDATE runs SET bank = ?, priority = ? WHERE id = ?", (bank, BACKGROUND, run_id))


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_statements(_V1), _statements(_V2), _statements(_V3), _v4]
SCHEMA_VERSION = len(MIGRATIONS)
