"""Run store: every experiment's status, progress and results in one SQLite file, plus artifacts.

Layout under the home directory (``$UFM_HOME``, else the per-user data directory, see
:func:`default_home`)::

    ufm.db                      SQLite in WAL mode: tables runs, studies, study_runs, audits
    runs/<id>/result.json       the full Result JSON (written last: its presence marks a complete set)
    runs/<id>/model.pt          best weights, a state dict of tensors
    runs/<id>/checkpoints.pt    TracIn checkpoints, when the run kept any
    runs/<id>/d_u.npy           (N,) per-image KL divergences with the unique feature, nats
    runs/<id>/d_r.npy           (R, N) the same with random features, nats
    runs/<id>/history.json      training curves, one entry per epoch

Nothing read from disk is ever unpickled: weights go through ``torch.load(weights_only=True)``
and arrays through ``np.load(allow_pickle=False)``, so a crafted file is refused, not executed.

Several processes (the dashboard, ``ufm measure`` in a terminal, a worker) may use one store at
once: SQLite's WAL mode lets readers run beside one writer, every write is a short
``BEGIN IMMEDIATE`` transaction and waits (busy timeout) rather than failing. A run whose owning
process died is marked ``failed`` by :meth:`Store.recover` the next time any store is opened; on
this machine that is decided by the owner's pid and start time alone (a paused process is alive),
heartbeats decide for owners on other machines. A result that finishes is never thrown away
(:meth:`Store.save_result` records it ``done``, with a note if it had been marked failed).

The store is private to its user: the home and ``runs/`` are 0700, ``ufm.db`` and its -wal/-shm
files 0600, artifacts 0600 (stores made by older ufm are fixed when opened). Temporary files of
artifact writes that a killed process left behind are removed when a store is opened.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import socket
import sqlite3
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from . import __version__
from .fileio import atomic_write

if TYPE_CHECKING:  # torch and the experiment module are imported lazily: `ufm runs list` stays fast
    import numpy as np
    from torch import nn

    from .experiment import ExperimentConfig, Result
    from .train import Checkpoint, EpochLog, Progress

log = logging.getLogger(__name__)

DB_NAME = "ufm.db"
STATUSES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")
FINISHED = ("done", "failed", "cancelled")
APPLICATION_ID = int.from_bytes(b"ufm1", "big")  # PRAGMA application_id: marks the file as ours
STALE_AFTER = 300.0  # seconds without a heartbeat after which an owner counts as gone
SQLITE_MAGIC = b"SQLite format 3\x00"

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

# v3: audits of models ufm did not train (ufm.audit): one row per finished audit, written whole.
_V3 = (
    """CREATE TABLE audits (
        id TEXT PRIMARY KEY,
        created REAL NOT NULL,              -- unix seconds
        model_name TEXT NOT NULL,           -- the ONNX file's name
        model_sha256 TEXT NOT NULL,         -- hash of the ONNX file
        input_spec_json TEXT NOT NULL,      -- ufm.onnx_model.InputSpec.to_dict()
        feature_json TEXT NOT NULL,         -- Feature.to_dict()
        status TEXT NOT NULL,               -- the verdict: memorised | not_shown | inconclusive
        summary_json TEXT NOT NULL,         -- M, X_u, X_r, p-values, verdict, settings
        result_json TEXT NOT NULL,          -- the full AuditResult (d_u, d_r, candidates, access)
        code_version TEXT NOT NULL
    )""",
    "CREATE INDEX audits_by_created ON audits (created)",
)

MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_statements(_V1), _statements(_V2), _statements(_V3)]
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(RuntimeError):
    """The run store cannot do what was asked; the message names the file and what to do."""


class RunNotFound(StoreError):
    """No run with that id."""


def default_home() -> Path:
    """``$UFM_HOME``, else the per-user data directory: ``$XDG_DATA_HOME/ufm`` or
    ``~/.local/share/ufm`` on Linux, ``~/Library/Application Support/ufm`` on macOS,
    ``%LOCALAPPDATA%\\ufm`` on Windows."""
    env = os.environ.get("UFM_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        xdg = os.environ.get("XDG_DATA_HOME")
        base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "ufm"


def _new_id() -> str:
    return secrets.token_hex(6)  # 12 hex digits; a clash is retried by create_run


def _pid_alive(pid: int) -> bool:
    """Is process ``pid`` on this machine still running? (A zombie counts as stopped.)

    On Windows ``os.kill(pid, 0)`` would terminate the process, so there the answer is always
    True and :meth:`Store.recover` relies on heartbeats alone.
    """
    if pid <= 0:
        return False
    if sys.platform == "win32":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:  # Linux: field 3 is the state; Z = exited but not yet reaped by its parent
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _proc_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, field 22 of ``/proc/PID/stat``), or
    None where that is unknown (not Linux, no such process). Two processes that share a pid one
    after the other have different start times."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _owner_alive(pid: int, start: int | None) -> bool:
    """Is the process that owned a run (``pid``, started at ``start``) still running here?"""
    if not _pid_alive(pid):
        return False
    if start is None:
        return True  # recorded without a start time (older ufm, not Linux): the pid is all we know
    now = _proc_start(pid)
    return now is None or now == start


def _make_private(path: Path, mode: int) -> None:
    """chmod ``path`` to ``mode`` if it exists and is ours (a folder or file of another user is
    left alone: we could not change it, and it is not ours to decide)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return
    if (st.st_mode & 0o777) != mode:
        os.chmod(path, mode)


TMP_MAX_AGE = 60.0  # seconds: an artifact's temporary file untouched this long is a leftover


def _dumps(obj: Any) -> str:
    return json.dumps(obj, allow_nan=False, default=_json_default)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _finite(v: Any) -> Any:
    """NaN/inf -> None, so summaries stay strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def result_summary(result: "Result") -> dict[str, Any]:
    """The small part of a Result kept in the database row (the arrays live in artifacts)."""
    s = result.score
    return {k: _finite(v) for k, v in {
        "M": float(s.M), "X_u": float(s.X_u), "X_r": float(s.X_r),
        "p_value": float(s.p_value), "p_value_paired": float(s.p_value_paired),
        "exposure": float(s.exposure), "exposure_p_value": float(s.exposure_p_value), "rank": int(s.rank),
        "candidates": int(len(s.candidate_X)), "alpha": float(s.alpha), "significant": bool(s.significant),
        "significant_ttest": bool(s.significant_ttest), "verdict": s.verdict(), "status": s.status,
        "inconclusive_reason": s.inconclusive_reason, "family": s.family,
        "feature_kind": result.config.feature.kind, "learned": bool(result.learned),
        "learned_note": result.learned_note,
        "test_accuracy": float(result.test_accuracy), "epochs_trained": int(result.epochs_trained),
        "best_epoch": int(result.best_epoch), "stopped": result.stopped,
        "epsilon": None if result.epsilon is None else float(result.epsilon),
        "canary_indices": list(result.canary_indices), "canary_labels": list(result.canary_labels),
        "n_train": result.n_train, "n_val": result.n_val, "n_ood": result.n_ood,
        "device": result.device, "train_seconds": float(result.train_seconds),
        "score_seconds": float(result.score_seconds), "versions": dict(result.versions),
        "access": result.access.to_dict(), "notes": list(result.notes),
    }.items()}


@dataclass(frozen=True, eq=False)
class RunRecord:
    """One row of the ``runs`` table.

    Attributes:
        created, started, finished, heartbeat: unix seconds (None = not yet).
        config_data: the ExperimentConfig as a dict (``config`` parses it).
        summary: :func:`result_summary` of a ``done`` run, else None.
        progress: the latest :class:`ufm.train.Progress` as a dict (plus ``time``), or None.
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

    @property
    def config(self) -> "ExperimentConfig":
        from .experiment import ExperimentConfig
        return ExperimentConfig.from_dict(self.config_data)

    @property
    def M(self) -> float | None:
        return None if self.summary is None else self.summary.get("M")

    @property
    def finished_ok(self) -> bool:
        return self.status == "done"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = d.pop("config_data")
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
                   owner_start=r["owner_start"] if "owner_start" in r.keys() else None)


class Store:
    """The run database and artifact folders under ``home``. Thread-safe; many processes may share it.

    Args:
        home: the ufm home directory (created if missing); None = :func:`default_home`.
        recover: mark runs whose owner process is gone as ``failed`` (see :meth:`recover`).
        stale_after: seconds without a heartbeat after which an owner counts as gone.
        busy_timeout: seconds to wait for another process's write to finish before giving up.

    Raises:
        StoreError: the home is not writable, or the file at ``home/ufm.db`` is not a ufm
            database (corrupt, another program's, or from a newer ufm). The file is left as it was.
    """

    def __init__(self, home: str | os.PathLike[str] | None = None, *, recover: bool = True,
                 stale_after: float = STALE_AFTER, busy_timeout: float = 30.0) -> None:
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.db_path = self.home / DB_NAME
        self.runs_dir = self.home / "runs"
        self.stale_after = float(stale_after)
        self.busy_timeout = float(busy_timeout)
        self._host = socket.gethostname()
        # One connection shared by all threads, serialised by this lock: simpler than one per
        # thread (Streamlit starts a thread per script run, which would leak connections).
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        try:
            # Private: artifacts and the database can show a private feature (a patient's name).
            self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.runs_dir.mkdir(exist_ok=True, mode=0o700)
            _make_private(self.home, 0o700)
            _make_private(self.runs_dir, 0o700)
        except OSError as e:
            raise StoreError(f"cannot create the ufm home {self.home}: {e.strerror or e}; set UFM_HOME "
                             "(or --home) to a writable folder") from e
        self._check_file()
        self._create_private_db()
        self._conn = self._connect()
        self._fix_modes()
        self._migrate()
        if recover:
            self.recover()
        self.remove_leftover_tmp()

    @classmethod
    def open(cls, home: str | os.PathLike[str] | None = None, **kwargs: Any) -> "Store":
        """Same as ``Store(home, **kwargs)``: open (or create) the store and recover dead runs."""
        return cls(home, **kwargs)

    def __repr__(self) -> str:
        return f"Store({str(self.home)!r})"

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ------------------------------------------------------------------ opening
    def _untouched(self, what: str) -> StoreError:
        return StoreError(f"{self.db_path} {what}. ufm left the file untouched. Move it away to start a new run "
                          f"database there, or use another folder with --home or UFM_HOME.")

    def _check_file(self) -> None:
        """Refuse, without writing a byte, a file at the database path that is not ours."""
        p = self.db_path
        if p.is_dir():
            raise self._untouched("is a folder, not a database file")
        if not p.exists() or p.stat().st_size == 0:
            return  # new, or created empty by a process that died at once: safe to initialise
        try:
            with open(p, "rb") as f:
                head = f.read(len(SQLITE_MAGIC))
        except OSError as e:
            raise StoreError(f"cannot read {p}: {e.strerror or e}; check its permissions") from e
        if head != SQLITE_MAGIC:
            raise self._untouched("is not an SQLite database (it may be corrupt, or a file of another program)")
        # A read-only connection: never checkpoints, never writes, so a foreign file stays as it was.
        ro = None
        try:
            ro = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=self.busy_timeout)
            app_id = ro.execute("PRAGMA application_id").fetchone()[0]
            version = ro.execute("PRAGMA user_version").fetchone()[0]
            tables = sorted(r[0] for r in ro.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        except sqlite3.DatabaseError as e:
            raise self._untouched(f"cannot be read as a database ({e}); it may be corrupt") from e
        finally:
            if ro is not None:
                ro.close()
        if app_id == APPLICATION_ID:
            if version > SCHEMA_VERSION:
                raise StoreError(f"{p} was written by a newer ufm (schema {version}, this ufm knows up to "
                                 f"{SCHEMA_VERSION}); upgrade ufm, or use another folder with --home or UFM_HOME")
            return
        if app_id == 0 and not tables:
            return  # an empty SQLite file
        shown = ", ".join(tables[:6]) + (" ..." if len(tables) > 6 else "")
        raise self._untouched(f"is an SQLite database of another program (tables: {shown or 'none'}; "
                              f"application id {app_id}), not a ufm run database")

    def _create_private_db(self) -> None:
        """Create the database file 0600 before SQLite does (SQLite gives its -wal and -shm files
        the database file's mode), so it is never readable by others, not even for a moment."""
        try:
            fd = os.open(self.db_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        except OSError as e:
            raise StoreError(f"cannot create {self.db_path}: {e.strerror or e}; set UFM_HOME (or --home) to a "
                             "writable folder") from e
        os.close(fd)

    def _fix_modes(self) -> None:
        """Stores made by older ufm were world-readable (0644): make ours private on open."""
        for suffix in ("", "-wal", "-shm"):
            try:
                _make_private(self.db_path.with_name(DB_NAME + suffix), 0o600)
            except OSError as e:  # e.g. a read-only file system: the store still works
                log.warning("could not make %s private: %s", self.db_path.name + suffix, e)

    def remove_leftover_tmp(self, max_age: float = TMP_MAX_AGE) -> list[Path]:
        """Delete temporary files of artifact writes that never finished (the writer was killed);
        return them. A file is left while it may still be written: its run is active and it was
        touched less than ``max_age`` seconds ago."""
        active = {r[0] for r in self.query("SELECT id FROM runs WHERE status IN ('queued', 'running')")}
        removed, now = [], time.time()
        for tmp in self.runs_dir.glob("*/*.tmp"):
            try:
                if tmp.parent.name in active and now - tmp.stat().st_mtime < max_age:
                    continue
                tmp.unlink()
            except FileNotFoundError:
                continue  # renamed into place or removed by its writer meanwhile
            except OSError as e:
                log.warning("could not remove the leftover %s: %s", tmp, e)
                continue
            removed.append(tmp)
        return removed

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit transactions; writes use explicit BEGIN IMMEDIATE.
            conn = sqlite3.connect(self.db_path, timeout=self.busy_timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            mode = self._set_wal(conn)
            # WAL + NORMAL: a crashed process never corrupts the file; a power cut may lose the
            # last commits. Good enough for results that can be recomputed.
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.DatabaseError as e:
            raise self._untouched(f"cannot be opened ({e})") from e
        if str(mode).lower() != "wal":
            conn.close()
            raise StoreError(f"{self.db_path}: SQLite refused WAL mode (got {mode!r}); network file systems do not "
                             "support it: put UFM_HOME on a local disk")
        return conn

    def _set_wal(self, conn: sqlite3.Connection) -> str:
        """Switch to WAL, retrying while another process holds the lock: the switch needs an
        exclusive lock and SQLite does not call the busy handler for it, so two processes creating
        the same new database at once would otherwise fail with "database is locked" at once."""
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _migrate(self) -> None:
        with self.transaction() as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.db_path} was written by a newer ufm (schema {version}); upgrade ufm")
            for v in range(version, SCHEMA_VERSION):
                MIGRATIONS[v](c)
            if version < SCHEMA_VERSION:
                c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                c.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    @property
    def schema_version(self) -> int:
        return int(self.query("PRAGMA user_version")[0][0])

    # ------------------------------------------------------------------ low-level access
    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"the store at {self.home} is closed; open it again with Store({str(self.home)!r})")
        return self._conn

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.IntegrityError:
            raise  # a constraint (e.g. a duplicate id): the caller decides
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise StoreError(f"{self.db_path} stayed locked by another process for {self.busy_timeout:g} s; "
                                 "try again when it has finished writing") from e
            raise StoreError(f"database error in {self.db_path}: {e}") from e
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.db_path} is damaged ({e}); move it away (ufm will start a new one) or "
                             "restore a copy") from e

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``: takes the write lock at once, so it waits
        for other writers up to the busy timeout instead of failing halfway). For modules that own
        tables in this database (studies)."""
        with self._lock, self._guard():
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Run a read-only statement and return all rows."""
        with self._lock, self._guard():
            return self._connection().execute(sql, params).fetchall()

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check``: ``"ok"`` or the problems found."""
        return "\n".join(str(r[0]) for r in self.query("PRAGMA integrity_check"))

    # ------------------------------------------------------------------ runs: reading
    def get(self, run_id: str) -> RunRecord:
        rows = self.query("SELECT * FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise RunNotFound(f"no run {run_id!r} in {self.db_path}; 'ufm runs list' shows the runs")
        return RunRecord._from_row(rows[0])

    def resolve(self, prefix: str) -> str:
        """The id of the one run whose id is ``prefix`` or starts with it (like git's short hashes)."""
        prefix = prefix.strip()
        if not prefix:
            raise RunNotFound("empty run id; 'ufm runs list' shows the runs")
        if self.query("SELECT 1 FROM runs WHERE id = ?", (prefix,)):
            return prefix
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self.query("SELECT id FROM runs WHERE id LIKE ? ESCAPE '\\' LIMIT 6", (escaped + "%",))
        if not rows:
            raise RunNotFound(f"no run with id {prefix!r} in {self.db_path}; 'ufm runs list' shows the runs")
        if len(rows) > 1:
            raise StoreError(f"run id {prefix!r} is ambiguous ({', '.join(r[0] for r in rows)}); give more digits")
        return str(rows[0][0])

    def list_runs(self, status: str | Sequence[str] | None = None, *, limit: int | None = None,
                  newest_first: bool = True) -> list[RunRecord]:
        """Runs, newest first by default; ``status`` filters (one status or several)."""
        sql, params = "SELECT * FROM runs", []
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            bad = [s for s in wanted if s not in STATUSES]
            if bad:
                raise ValueError(f"unknown run status {bad[0]!r}; choose from {', '.join(STATUSES)}")
            sql += f" WHERE status IN ({', '.join('?' * len(wanted))})"
            params += wanted
        sql += f" ORDER BY created {'DESC' if newest_first else 'ASC'}, rowid {'DESC' if newest_first else 'ASC'}"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [RunRecord._from_row(r) for r in self.query(sql, params)]

    def find_cached(self, config: "ExperimentConfig", *, code_version: str = __version__) -> RunRecord | None:
        """The newest ``done`` run with ``config``'s key made by ``code_version``, whose
        artifacts are complete; None if there is none (then the config must be trained)."""
        rows = self.query("SELECT * FROM runs WHERE config_key = ? AND code_version = ? AND status = 'done' "
                          "ORDER BY finished DESC", (config.key(), code_version))
        for r in rows:
            rec = RunRecord._from_row(r)
            # A run whose folder was deleted by hand cannot stand in for a new one.
            if (self.run_dir(rec.id) / "result.json").is_file():
                return rec
        return None

    def cancel_requested(self, run_id: str) -> bool:
        rows = self.query("SELECT cancel_requested FROM runs WHERE id = ?", (run_id,))
        return bool(rows and rows[0][0])

    # ------------------------------------------------------------------ runs: writing
    def create_run(self, config: "ExperimentConfig", *, status: str = "queued") -> str:
        """Add a run for ``config`` owned by this process and return its id.

        ``status`` is ``queued`` (a worker will start it) or ``running`` (the caller starts now).
        """
        if status not in ACTIVE:
            raise ValueError(f"a new run starts as 'queued' or 'running', not {status!r}")
        now = time.time()
        for _ in range(5):
            run_id = _new_id()
            try:
                with self.transaction() as c:
                    c.execute("INSERT INTO runs (id, created, started, status, config_json, config_key, code_version, "
                              "owner_pid, owner_host, owner_start, heartbeat) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                              (run_id, now, now if status == "running" else None, status, config.to_json(),
                               config.key(), __version__, os.getpid(), self._host, _proc_start(os.getpid()), now))
                return run_id
            except sqlite3.IntegrityError:
                continue  # id clash (1 in 2^48): draw another
        raise StoreError("could not draw a fresh run id in 5 tries; the runs table looks damaged")

    def _update(self, sql: str, params: Sequence[Any]) -> int:
        with self.transaction() as c:
            return c.execute(sql, params).rowcount

    def _require(self, run_id: str) -> RunRecord:
        return self.get(run_id)  # raises RunNotFound

    def mark_running(self, run_id: str) -> bool:
        """queued -> running, owned by this process. False if the run is no longer queued
        (cancelled meanwhile): the caller must not start it."""
        now = time.time()
        n = self._update("UPDATE runs SET status = 'running', started = ?, owner_pid = ?, owner_host = ?, "
                         "owner_start = ?, heartbeat = ? WHERE id = ? AND status = 'queued'",
                         (now, os.getpid(), self._host, _proc_start(os.getpid()), now, run_id))
        if n == 0:
            self._require(run_id)
        return n == 1

    def update_progress(self, run_id: str, progress: "Progress | dict[str, Any]") -> None:
        """Record the latest progress of a running run (and count it as a heartbeat)."""
        d = dict(progress) if isinstance(progress, dict) else asdict(progress)
        now = time.time()
        d["time"] = now
        self._update("UPDATE runs SET progress_json = ?, heartbeat = ? WHERE id = ? AND status = 'running'",
                     (_dumps({k: _finite(v) for k, v in d.items()}), now, run_id))

    def heartbeat(self) -> int:
        """Mark every queued/running run owned by this process as alive; returns how many."""
        return self._update("UPDATE runs SET heartbeat = ? WHERE owner_pid = ? AND owner_host = ? AND "
                            "status IN ('queued', 'running')", (time.time(), os.getpid(), self._host))

    def request_cancel(self, run_id: str) -> str:
        """Ask for a run to stop. A queued run becomes ``cancelled`` at once; a running one is
        flagged and its owner (in any process) stops it at the next batch. Returns the status."""
        with self.transaction() as c:
            row = c.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise RunNotFound(f"no run {run_id!r} in {self.db_path}")
            status = row[0]
            if status == "queued":
                c.execute("UPDATE runs SET status = 'cancelled', finished = ?, error = ? WHERE id = ?",
                          (time.time(), "cancelled before it started", run_id))
                return "cancelled"
            if status == "running":
                c.execute("UPDATE runs SET cancel_requested = 1 WHERE id = ?", (run_id,))
            return status

    def mark_cancelled(self, run_id: str, reason: str = "cancelled by the user") -> bool:
        """queued/running -> cancelled. False if the run had already finished."""
        return self._finish(run_id, "cancelled", reason)

    def mark_failed(self, run_id: str, error: str) -> bool:
        """queued/running -> failed with ``error``. False if the run had already finished."""
        return self._finish(run_id, "failed", error)

    def _finish(self, run_id: str, status: str, error: str) -> bool:
        n = self._update("UPDATE runs SET status = ?, finished = ?, error = ? WHERE id = ? AND status IN "
                         "('queued', 'running')", (status, time.time(), error, run_id))
        if n == 0:
            self._require(run_id)
        return n == 1

    def save_result(self, run_id: str, result: "Result", *, input_shape: Sequence[int] | None = None,
                    num_classes: int | None = None) -> None:
        """Write the artifacts of a running run, then mark it ``done`` with its summary.

        A result that finished is never thrown away: a run that was meanwhile marked ``failed``
        (another process took its owner for dead, e.g. while it was paused) or ``cancelled`` (the
        cancel came too late to stop it) is recorded ``done`` all the same, with a note in its
        ``error`` field saying what it had been marked and why. Its numbers are those of its
        config: the run trained to the end.

        Args:
            input_shape, num_classes: the model's input ``(C, H, W)`` and classes, kept to rebuild
                the model in :meth:`load_model`. None = read from the run's training data (already
                in memory after :func:`ufm.run_experiment` in this process).

        Raises:
            StoreError: the run is ``queued`` or already ``done``; the artifacts stay on disk.
        """
        meta = None
        if result.model is not None:
            if input_shape is None or num_classes is None:
                input_shape, num_classes = _data_shape(result.config)
            meta = {"input_shape": [int(v) for v in input_shape], "num_classes": int(num_classes)}
        self._write_artifacts(run_id, result)
        summary, model_json = _dumps(result_summary(result)), None if meta is None else _dumps(meta)
        with self.transaction() as c:
            row = c.execute("SELECT status, error FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise RunNotFound(f"no run {run_id!r} in {self.db_path}; its result was written to "
                                  f"{self.run_dir(run_id)} but not recorded")
            status, error = row[0], row[1]
            if status not in ("running", "failed", "cancelled"):
                raise StoreError(f"run {run_id} is {status}, not running ({error or 'no reason given'}); its result "
                                 f"was written to {self.run_dir(run_id)} but not recorded as done")
            note = None if status == "running" else (f"finished and recorded after it had been marked {status} "
                                                     f"({error or 'no reason given'})")
            now = time.time()
            c.execute("UPDATE runs SET status = 'done', finished = ?, error = ?, summary_json = ?, model_json = ?, "
                      "heartbeat = ? WHERE id = ?", (now, note, summary, model_json, now, run_id))

    def add_result(self, result: "Result", **kwargs: Any) -> str:
        """Record a result computed elsewhere as a new ``done`` run; returns its id."""
        run_id = self.create_run(result.config, status="running")
        try:
            self.save_result(run_id, result, **kwargs)
        except BaseException as e:
            self.mark_failed(run_id, f"saving the result failed: {e}")
            raise
        return run_id

    def delete_run(self, run_id: str) -> None:
        """Remove a finished run's row and its artifact folder (study members keep a gap)."""
        rec = self.get(run_id)
        if rec.status in ACTIVE:
            raise StoreError(f"run {run_id} is {rec.status}; cancel it first ('ufm runs cancel {run_id}')")
        self._update("DELETE FROM runs WHERE id = ? AND status NOT IN ('queued', 'running')", (run_id,))
        # Row first, files second: a crash in between leaves only an orphan folder, never a
        # 'done' row without its artifacts.
        if self.run_dir(run_id).exists():
            shutil.rmtree(self.run_dir(run_id))

    def recover(self) -> list[str]:
        """Mark queued/running runs whose owner process is gone as ``failed``; return their ids.

        On this machine the process decides: a run whose owner is alive is never failed, however
        old its heartbeat (a paused process, a slow epoch), and one whose owner pid is gone, or now
        belongs to another process (a different start time), is failed at once. Heartbeats older
        than ``stale_after`` seconds decide only for owners on other machines (or without a pid).
        """
        now = time.time()
        failed = []
        for r in self.query("SELECT id, status, owner_pid, owner_host, owner_start, heartbeat FROM runs "
                            "WHERE status IN ('queued', 'running')"):
            pid, host, beat = r["owner_pid"], r["owner_host"], r["heartbeat"]
            verb = "running it" if r["status"] == "running" else "that queued it"
            reason = None
            if host == self._host and pid is not None:
                if not _owner_alive(pid, r["owner_start"]):
                    reason = f"the process {verb} stopped (pid {pid})"
            elif beat is not None and now - beat > self.stale_after:
                reason = (f"the process {verb} (pid {pid} on {host}) stopped sending heartbeats "
                          f"{now - beat:.0f} s ago")
            if reason is None:
                continue
            # Only if nothing changed since we looked: the owner may have just finished it.
            n = self._update("UPDATE runs SET status = 'failed', finished = ?, error = ? WHERE id = ? AND status = ? "
                             "AND heartbeat IS ? AND owner_pid IS ?", (now, reason, r["id"], r["status"], beat, pid))
            if n:
                failed.append(r["id"])
        return failed

    # ------------------------------------------------------------------ artifacts
    def run_dir(self, run_id: str) -> Path:
        if not run_id or any(ch not in "0123456789abcdef" for ch in run_id):
            raise RunNotFound(f"{run_id!r} is not a run id (12 hex digits)")
        return self.runs_dir / run_id

    def _write_artifacts(self, run_id: str, result: "Result") -> None:
        import numpy as np
        import torch

        d = self.run_dir(run_id)
        d.mkdir(parents=True, exist_ok=True)
        if result.model is not None:
            inner = getattr(result.model, "_module", result.model)
            state = {k: v.detach().to("cpu") for k, v in inner.state_dict().items()}
            _atomic_write(d / "model.pt", lambda f: torch.save(state, f))
        if result.checkpoints:
            cps = [{"step": int(c.step), "epoch": float(c.epoch), "lr": float(c.lr), "train_loss": float(c.train_loss),
                    "state_dict": {k: v.detach().to("cpu") for k, v in c.state_dict.items()}}
                   for c in result.checkpoints]
            _atomic_write(d / "checkpoints.pt", lambda f: torch.save(cps, f))
        _atomic_write(d / "d_u.npy", lambda f: np.save(f, np.asarray(result.score.d_u, np.float64), allow_pickle=False))
        _atomic_write(d / "d_r.npy", lambda f: np.save(f, np.asarray(result.score.d_r, np.float64), allow_pickle=False))
        _atomic_write(d / "history.json", lambda f: f.write(json.dumps([asdict(h) for h in result.history]).encode()))
        _atomic_write(d / "result.json", lambda f: f.write(result.to_json().encode()))

    def artifact(self, run_id: str, name: str) -> Path:
        """The path of artifact ``name`` of a run (``result.json``, ``model.pt``, ...).

        Raises:
            StoreError: the file does not exist; the message says why (unfinished run, deleted).
        """
        p = self.run_dir(run_id) / name
        if not p.is_file():
            rec = self.get(run_id)
            why = (f"the run is {rec.status}" if rec.status != "done"
                   else "the file is missing (deleted by hand?); rerun with force=True / --force")
            raise StoreError(f"run {run_id} has no {name} at {p}: {why}")
        return p

    def load_result(self, run_id: str, *, with_model: bool = False) -> "Result":
        """The full :class:`ufm.experiment.Result` of a done run (``model`` attached if asked)."""
        from .experiment import Result

        p = self.artifact(run_id, "result.json")
        try:
            result = Result.from_json(p.read_text())
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{p} is not a readable ufm result ({e}); delete the run and rerun it") from e
        if with_model:
            result.model = self.load_model(run_id)
        return result

    def load_scores(self, run_id: str) -> tuple["np.ndarray", "np.ndarray"]:
        """``(d_u, d_r)``: (N,) and (R, N) float64 KL divergences (nats) of a done run."""
        d_u = _load_npy(self.artifact(run_id, "d_u.npy"))
        d_r = _load_npy(self.artifact(run_id, "d_r.npy"))
        if d_u.ndim != 1 or d_r.ndim != 2 or d_r.shape[1] != d_u.shape[0]:
            raise StoreError(f"run {run_id}: d_u {d_u.shape} and d_r {d_r.shape} do not match ((N,) and (R, N)); "
                             "delete the run and rerun it")
        return d_u, d_r

    def load_history(self, run_id: str) -> list["EpochLog"]:
        from .train import EpochLog

        p = self.artifact(run_id, "history.json")
        try:
            return [EpochLog(**h) for h in json.loads(p.read_text())]
        except (ValueError, TypeError) as e:
            raise StoreError(f"{p} is not a readable training history ({e})") from e

    def load_model(self, run_id: str, *, device: str = "cpu") -> "nn.Module":
        """Rebuild the trained model of a done run (architecture from its config, shape from the
        saved data shape) and load its best weights. Returns it in eval mode on ``device``."""
        from .models import build_model

        rec = self.get(run_id)
        if rec.status != "done":
            raise StoreError(f"run {run_id} is {rec.status}; only finished (done) runs have weights")
        if not rec.model_meta:
            raise StoreError(f"run {run_id} was recorded without its weights (no model.pt); rerun it to get a model")
        p = self.artifact(run_id, "model.pt")
        state = _load_tensors(p)
        if not isinstance(state, dict) or not all(isinstance(k, str) and _is_tensor(v) for k, v in state.items()):
            raise StoreError(f"{p} is not a state dict (a mapping of names to tensors); delete the run and rerun it")
        cfg = rec.config
        c, h, w = rec.model_meta["input_shape"]
        model = build_model(cfg.arch, c, (h, w), rec.model_meta["num_classes"],
                            dropout=cfg.dropout if "dropout" in cfg.regularisers else 0.0,
                            batchnorm="batchnorm" in cfg.regularisers)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise StoreError(f"{p} does not fit a {cfg.arch} for {c}x{h}x{w} images: "
                             f"{str(e).splitlines()[0]}; delete the run and rerun it") from e
        return model.to(device).eval()

    def load_checkpoints(self, run_id: str) -> list["Checkpoint"]:
        """The TracIn checkpoints of a done run (empty if it kept none)."""
        from .train import Checkpoint

        p = self.run_dir(run_id) / "checkpoints.pt"
        if not p.is_file():
            self.artifact(run_id, "result.json")  # a clear error for unfinished runs
            return []
        raw = _load_tensors(p)
        try:
            return [Checkpoint(int(c["step"]), float(c["epoch"]), float(c["lr"]), float(c["train_loss"]),
                               dict(c["state_dict"])) for c in raw]
        except (TypeError, KeyError, ValueError) as e:
            raise StoreError(f"{p} is not a list of ufm checkpoints ({e}); delete the run and rerun it") from e


def _data_shape(config: "ExperimentConfig") -> tuple[tuple[int, int, int], int]:
    from .experiment import training_split  # the split run_experiment just loaded: a cache hit

    data = training_split(config)
    return data.image_shape, data.num_classes


def _is_tensor(v: Any) -> bool:
    import torch
    return isinstance(v, torch.Tensor)


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Artifacts are written atomically and kept private (0600): they can show a private feature,
    e.g. a patient's name."""
    atomic_write(path, write, private=True)


def _load_tensors(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers: a pickle that would run code
    is refused by torch's weights-only unpickler before anything in it executes."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear StoreError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StoreError(f"refused to load {path}: it is not a plain tensor file written by ufm ({first}). Nothing in "
                         "it was executed. Delete the run ('ufm runs delete ID') and rerun it.") from e


def _load_npy(path: Path) -> "np.ndarray":
    import numpy as np

    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise StoreError(f"refused to load {path}: not a plain numeric .npy file ({e}). Nothing in it was "
                         "executed. Delete the run and rerun it.") from e
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        raise StoreError(f"{path} does not hold a numeric array; delete the run and rerun it")
    return arr.astype(np.float64, copy=False)
