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
