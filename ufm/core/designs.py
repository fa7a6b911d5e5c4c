"""Typed designs kept under the ufm home: ``<home>/designs/<id>.json``, one per feature and setup a
dashboard user made (so a reload or a shared link brings them back).

A design can hold private text (a patient's name typed as the feature), so each file is 0600 in a
0700 folder, and :func:`forget_designs` (``ufm designs forget``) removes them when the user no
longer wants them kept; a link to a forgotten design then says it is not stored on this server.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from ufm.fileio import atomic_write

DESIGNS = "designs"


def designs_dir(home: str | os.PathLike[str]) -> Path:
    return Path(home) / DESIGNS


def save_design(home: str | os.PathLike[str], text: str) -> str:
    """Keep the design ``text`` (JSON) privately, content-addressed; returns its id (16 hex digits)."""
    did = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = designs_dir(home) / f"{did}.json"
    if not path.exists():
        atomic_write(path, text, private=True)
    return did


def list_designs(home: str | os.PathLike[str]) -> list[Path]:
    """The kept design files, oldest first."""
    d = designs_dir(home)
    files = [p for p in d.glob("*.json") if p.is_file()] if d.is_dir() else []
    return sorted(files, key=lambda p: p.stat().st_mtime)


def forget_designs(home: str | os.PathLike[str], older_than_days: float | None = None) -> int:
    """Delete the kept designs (only those untouched for ``older_than_days`` days, if given);
    returns how many were deleted.

    Raises:
        ValueError: ``older_than_days`` is negative.
    """
    if older_than_days is not None and older_than_days < 0:
        raise ValueError(f"--older-than must be >= 0 days, got {older_than_days:g}")
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    n = 0
    for p in list_designs(home):
        try:
            if cutoff is None or p.stat().st_mtime < cutoff:
                p.unlink()
                n += 1
        except FileNotFoundError:
            continue  # forgotten by another process meanwhile
    return n
