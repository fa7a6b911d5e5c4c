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
(:meth:`Store.save_result` records it ``done``, with a note if it had been marked failed, and
again if its record was deleted meanwhile); a failed run whose owner may still be working on it
is not deleted without ``force``.

The store is private to its user: the home and ``runs/`` are 0700, ``ufm.db`` and its -wal/-shm
files 0600, artifacts 0600 (stores made by older ufm are fixed when opened). Temporary files of
artifact writes that a killed process left behind, and run folders without a run record
(orphans), are removed when a store is opened. The folders ufm keeps beside ``runs/``
(``HOME_FOLDERS``: designs, audits, influence tables, privacy audits) are made private on open too
(folders 0700, files 0600).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from ufm.runs.store.artifacts import Artifacts
from ufm.runs.store.database import (APPLICATION_ID, BACKGROUND, DB_NAME, FOREGROUND, MIGRATIONS, SCHEMA_VERSION,
                       TMP_MAX_AGE, Database, RunNotFound, StoreError, default_home)
from ufm.runs.store.lifecycle import ACTIVE, FINISHED, STALE_AFTER, STATUSES, RunLifecycle, RunRecord, result_summary
from ufm.runs.store.lifecycle import _data_shape  # noqa: F401 - for ufm.runs.executors

__all__ = ["ACTIVE", "APPLICATION_ID", "BACKGROUND", "DB_NAME", "FINISHED", "FOREGROUND", "MIGRATIONS", "SCHEMA_VERSION",
           "STALE_AFTER", "STATUSES", "TMP_MAX_AGE", "Artifacts", "Database", "RunLifecycle", "RunNotFound",
           "RunRecord", "Store", "StoreError", "default_home", "result_summary"]


class Store(Database, RunLifecycle, Artifacts):
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
        self.stale_after = float(stale_after)
        self._host = socket.gethostname()
        super().__init__(home, busy_timeout=busy_timeout)
        if recover:
            self.recover()
        self.remove_leftover_tmp()
        self.remove_orphans()

    @classmethod
    def open(cls, home: str | os.PathLike[str] | None = None, **kwargs: Any) -> "Store":
        """Same as ``Store(home, **kwargs)``: open (or create) the store and recover dead runs."""
        return cls(home, **kwargs)

    def __repr__(self) -> str:
        return f"Store({str(self.home)!r})"
