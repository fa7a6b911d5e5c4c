"""Is the process that owns a run still alive? (pid and start time on this machine; used by
:meth:`ufm.runs.store.lifecycle.RunLifecycle.recover`.)"""

from __future__ import annotations

import os
import sys
from pathlib import Path


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
