"""The run database: the ufm home and its SQLite file (checks before opening, private modes, WAL,
schema migrations), transactions and queries, and the cleanup of leftover temporary files.

:class:`Database` is the base of :class:`ufm.runs.store.Store`; the tables' rows are read and written by
:class:`~ufm.runs.store.lifecycle.RunLifecycle` (runs), :mod:`ufm.runs.studies` and :mod:`ufm.audits.model_audit`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Self, Sequence

log = logging.getLogger("ufm.runs.store")  # the name of the one module the store was

DB_NAME = "ufm.db"
APPLICATION_ID = int.from_bytes(b"ufm1", "big")  # PRAGMA application_id: marks the file as ours

from ufm.paths import default_home  # noqa: F401 - the store's home; imported from here by many
from ufm.runs.store.schema import BACKGROUND, FOREGROUND, MIGRATIONS, SCHEMA_VERSION  # noqa: E402,F401 - re-exported

class StoreError(RuntimeError):
    """The run store cannot do what was asked; the message names the file and what to do."""


class RunNotFound(StoreError):
    """No run with that id."""


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


# What ufm keeps under its home besides the database: run artifacts, the dashboard's designs,
# ONNX audits (models, uploaded images, cancel files), influence tables, privacy audits, the kept
# shadow architectures (onnx/) and shadow data (shadow_data/). Add a
# folder here when code starts keeping one: the store makes these private when it opens.
HOME_FOLDERS = ("runs", "designs", "audits", "influence", "privacy_audits", "onnx", "shadow_data")

TMP_MAX_AGE = 60.0  # seconds: an artifact's temporary file untouched this long is a leftover


class Database:
    """The SQLite file ``home/ufm.db`` and the ``runs/`` folder beside it, opened (created if
    missing) and migrated to :data:`SCHEMA_VERSION`. One connection shared by all threads.

    Args:
        home: the ufm home directory (created if missing); None = :func:`default_home`.
        busy_timeout: seconds to wait for another process's write to finish before giving up.

    Raises:
        StoreError: see :class:`ufm.runs.store.Store`.
    """

    def __init__(self, home: str | os.PathLike[str] | None = None, *, busy_timeout: float = 30.0) -> None:
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.db_path = self.home / DB_NAME
        self.runs_dir = self.home / "runs"
        self.busy_timeout = float(busy_timeout)
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

    def __enter__(self) -> Self:
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
        # Only SQLite opens the file: a plain open() and close() of it would drop every POSIX lock this
        # process's other connections hold on it (fcntl locks belong to the process and the inode),
        # and a live runner in this process would then share the file unguarded. A read-only
        # connection never checkpoints or writes, so a foreign file stays as it was.
        ro = None
        try:
            ro = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=self.busy_timeout)
            app_id = ro.execute("PRAGMA application_id").fetchone()[0]
            version = ro.execute("PRAGMA user_version").fetchone()[0]
            tables = sorted(r[0] for r in ro.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        except sqlite3.OperationalError as e:
            if "unable to open" in str(e):
                raise StoreError(f"cannot read {p}: {e}; check its permissions") from e
            raise self._untouched(f"cannot be read as a database ({e}); it may be corrupt") from e
        except sqlite3.DatabaseError as e:
            if "not a database" in str(e):
                raise self._untouched("is not an SQLite database (it may be corrupt, or a file of another "
                                      "program)") from e
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
        """Stores made by older ufm were world-readable (0644): make what ufm keeps under the home
        private on open (folders 0700, files 0600). Only ufm's own entries are walked: a home given
        with --home may be a folder that also holds the user's other files."""
        from ufm.fileio import make_tree_private

        try:
            for suffix in ("", "-wal", "-shm"):
                _make_private(self.db_path.with_name(DB_NAME + suffix), 0o600)
            for name in HOME_FOLDERS:
                if (self.home / name).is_dir() and not (self.home / name).is_symlink():
                    make_tree_private(self.home / name)
        except OSError as e:  # e.g. a read-only file system: the store still works
            log.warning("could not make everything ufm keeps under %s private: %s", self.home, e)

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

    def remove_orphans(self, max_age: float = TMP_MAX_AGE) -> list[Path]:
        """Delete ``runs/<id>/`` folders that no run record has (left by a delete that crashed
        between the row and the files, or by older ufm when a deleted run's process finished);
        return them. A folder touched less than ``max_age`` seconds ago is left: its run may be
        writing its artifacts just before recording itself again (see ``save_result``)."""
        import shutil

        known = {r[0] for r in self.query("SELECT id FROM runs")}
        removed, now = [], time.time()
        for d in self.runs_dir.iterdir():
            if d.name in known or not d.is_dir() or d.is_symlink() or len(d.name) != 12 or \
                    any(ch not in "0123456789abcdef" for ch in d.name):
                continue  # not a run folder of ours: left alone
            try:
                newest = max([d.stat().st_mtime] + [f.stat().st_mtime for f in d.iterdir()])
                if now - newest < max_age:
                    continue
                shutil.rmtree(d)
            except FileNotFoundError:
                continue
            except OSError as e:
                log.warning("could not remove the orphan run folder %s: %s", d, e)
                continue
            removed.append(d)
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

    def _update(self, sql: str, params: Sequence[Any]) -> int:
        with self.transaction() as c:
            return c.execute(sql, params).rowcount
