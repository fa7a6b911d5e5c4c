"""Atomic file writes: readers see the old file or the whole new one, never half of it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

# Read once at import (single-threaded then): os.umask can only be read by setting it.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike[str], data: str | bytes | Callable[[IO[bytes]], Any], *,
                 private: bool = False) -> Path:
    """Write ``data`` (text, bytes, or a callback given the binary file) to ``path`` atomically.

    The data goes to a temporary file in the same folder, is fsynced, and is renamed over
    ``path``. ``private`` keeps the file readable by its owner only (0600): run artifacts can
    show a private feature, e.g. a patient's name; otherwise the usual umask applies.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if not private:
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_writable(path: str | os.PathLike[str], *, what: str = "--out") -> Path:
    """Refuse, before any work is done, an output file that :func:`atomic_write` could not write.

    ``path`` must not be a folder, its folder must exist and be writable (the temporary file
    goes there). Checked up front so a long training run does not fail at its very end.

    Raises:
        ValueError: the message names ``what`` and the problem, e.g. ``--out: results/ is a folder``.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{what}: {path} is a folder; give a file name inside it, e.g. {p / 'result.json'}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{what}: the folder {parent} does not exist; create it first or choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: cannot write in the folder {parent} (permission denied); choose another path")
    return p
