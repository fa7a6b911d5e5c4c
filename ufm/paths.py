"""Which folders a dashboard user may read data from.

The dashboard's "path to your data" box runs on the server with the server user's rights, so a
typed path must stay inside folders the operator chose: the data folder (``$UFM_DATA_DIR``, else
``~/.cache/ufm/data``) and the folders listed in ``$UFM_ALLOWED_DATA`` (separated by
``os.pathsep``). The refusal never says whether the path exists, so the box cannot be used to probe
the server's file system.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ALLOWED_ENV = "UFM_ALLOWED_DATA"


class PathNotAllowed(ValueError):
    """A user-typed data path lies outside the allowed data folders (or is not a usable path)."""


def _resolve(path: str | Path) -> Path:
    # strict=False: a missing path resolves as far as it exists, so the answer does not depend on
    # existence; symlinks and ".." are followed exactly as open() would follow them.
    return Path(path).expanduser().resolve(strict=False)


def allowed_roots() -> list[Path]:
    """The data folder and the operator's ``$UFM_ALLOWED_DATA`` folders, resolved, without duplicates."""
    from ufm.core.data import default_data_dir

    roots: list[str | Path] = [default_data_dir()]
    roots += [p.strip() for p in os.environ.get(ALLOWED_ENV, "").split(os.pathsep) if p.strip()]
    out: list[Path] = []
    for r in roots:
        try:
            resolved = _resolve(r)
        except (OSError, RuntimeError, ValueError):
            continue  # an operator typo (a symlink loop) allows nothing rather than crashing every page
        if resolved not in out:
            out.append(resolved)
    return out


def is_allowed(path: Path, roots: list[Path]) -> bool:
    """True when the resolved ``path`` is one of ``roots`` or inside one (whole path components:
    /data2 is not inside /data)."""
    return any(path == r or path.is_relative_to(r) for r in roots)


def check_user_path(text: str) -> Path:
    """The resolved path of a user-typed data location, if it lies inside :func:`allowed_roots`.

    ``~`` is expanded; a relative path is taken relative to the data folder (not the server's
    working directory); symlinks and ``..`` are resolved before the check, so neither can escape.

    Raises:
        PathNotAllowed: empty text, or the resolved path is outside every allowed folder. The
            message is the same whether or not the path exists.
    """
    text = (text or "").strip()
    if not text:
        raise PathNotAllowed("path to your data is empty: type a folder inside the allowed data folders")
    outside = PathNotAllowed(f"{text} is outside the allowed data folders; ask the operator to add it to "
                             f"{ALLOWED_ENV}")
    roots = allowed_roots()
    raw = Path(text).expanduser()
    if not raw.is_absolute():
        if not roots:
            raise outside
        raw = roots[0] / raw
    try:
        resolved = _resolve(raw)
    except (OSError, RuntimeError, ValueError):  # symlink loop, NUL byte: same answer as outside
        raise outside from None
    if not is_allowed(resolved, roots):
        raise outside
    return resolved


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
