"""Atomic file writes: readers see the old file or the whole new one, never half of it; bounded
reads of regular files."""

from __future__ import annotations

import errno
import os
import stat
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
    show a private feature, e.g. a patient's name; otherwise the usual umask applies. With
    ``private`` the folders it has to create are private too (0700, see :func:`private_dir`).
    """
    path = Path(path)
    if private:
        private_dir(path.parent)
    else:
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


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create folder ``path`` and any missing parents readable by their owner only (0700).

    ``Path.mkdir(mode=...)`` gives the mode to the last folder only (parents get the umask's
    0755), so each missing level is made here. An existing folder is left as it is: the store
    makes everything under its home private when it opens (:func:`make_tree_private`).
    """
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made by another process meanwhile
        os.chmod(d, 0o700)  # mkdir's mode is masked by the umask; 0700 is what we promise
    return path


def make_tree_private(root: str | os.PathLike[str]) -> int:
    """chmod every folder under ``root`` (and ``root``) to 0700 and every file to 0600, where it is
    ours and not already so; symlinks are neither followed nor changed. Returns how many changed.

    For the ufm home, whose files can show a private feature (a patient's name typed as text): a
    home written by an older ufm, or by code that forgot, is made private when a store opens it.
    """
    uid = os.getuid() if hasattr(os, "getuid") else None
    changed = 0

    def fix(p: str, mode: int) -> None:
        nonlocal changed
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return  # removed meanwhile (a temporary file renamed into place)
        if (uid is not None and st.st_uid != uid) or os.path.islink(p) or (st.st_mode & 0o777) == mode:
            return
        os.chmod(p, mode)
        changed += 1

    fix(os.fspath(root), 0o700)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            fix(os.path.join(dirpath, d), 0o700)
        for f in filenames:
            fix(os.path.join(dirpath, f), 0o600)
    return changed


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


def check_out_dir(path: str | os.PathLike[str], *, what: str = "--out") -> Path:
    """Refuse, before any work is done, an output folder that could not be created or written.

    ``path`` may exist (a folder we can write in) or not (its nearest existing parent must be a
    folder we can write in: the missing levels are created at the end).

    Raises:
        ValueError: the message names ``what`` and the problem, e.g. ``--out: /etc/passwd is a file``.
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what}: {path} is a file, not a folder; give a folder (created if missing), e.g. "
                         f"{p.with_suffix('')}-out")
    probe = p
    while not probe.exists():
        if probe == probe.parent:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{what}: {probe} is a file, so the folder {path} cannot be made; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: cannot write in the folder {probe} (permission denied); choose another path")
    return p


class NotAFile(OSError):
    """A path that is a device, pipe or socket: reading it could block or never end."""


def read_bounded(path: str | os.PathLike[str], max_bytes: int) -> bytes | None:
    """The bytes of the regular file ``path``, or None when it holds more than ``max_bytes``
    (at most ``max_bytes + 1`` bytes are ever read, whatever its size claims).

    A device (``/dev/zero`` reports 0 bytes and never ends), a pipe (opening one blocks until a
    writer comes) or a socket is refused before it is opened.

    Raises:
        FileNotFoundError, IsADirectoryError, NotAFile, OSError (e.g. permission denied).
    """
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
    if not stat.S_ISREG(st.st_mode):
        raise NotAFile(errno.EINVAL, "not a regular file (a device, pipe or socket)", str(path))
    if st.st_size > max_bytes:
        return None
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    return None if len(data) > max_bytes else data


def unreadable_message(path: str | os.PathLike[str], exc: OSError, kind: str, wanted: str) -> str:
    """One line for a file :func:`read_bounded` could not read: what is wrong with ``path`` and
    what to give instead. ``kind`` names the file ("model file"), ``wanted`` what would do ("an
    .onnx file")."""
    if isinstance(exc, FileNotFoundError):
        return f"{kind} {path} does not exist: check the path"
    if isinstance(exc, IsADirectoryError):
        return f"{path} is a folder: give the path of {wanted}"
    if isinstance(exc, NotAFile):
        return f"{path} is not a regular file (a device, pipe or socket): give the path of {wanted}"
    return f"could not read {path} ({exc.strerror or exc}): check its permissions"
