"""The one guarded image loader: every image ufm reads from a file or an upload goes through
:func:`open_image`.

Images come from users (a feature upload, a folder dataset), so a file may be a decompression
bomb (a tiny PNG declaring 30,000 x 30,000 pixels), carry a huge compressed text chunk, be
truncated, corrupt or not an image at all. Each of these raises one :class:`ImageError` (a
ValueError) whose message names the file and says what to do, never a Pillow traceback.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
from pathlib import Path
from typing import IO, Union

from PIL import Image, UnidentifiedImageError

from ufm.fileio import read_bounded, unreadable_message
from ufm.limits import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS

ImageSource = Union[str, os.PathLike, bytes, bytearray, IO[bytes]]

_FILTER_LOCK = threading.Lock()

SUPPORTED = "PNG, JPEG, BMP, GIF, TIFF or WebP"

# What Pillow's parsers and decoders raise on a bad file. OSError covers truncated data and
# UnidentifiedImageError; ValueError covers "Decompressed data too large" (zTXt/iCCP chunks)
# and bad modes; SyntaxError/struct.error/EOFError/IndexError come from broken headers.
_PILLOW_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, TypeError,
                  ZeroDivisionError)


class ImageError(ValueError):
    """An image file that cannot be used; the message names it and says what to do."""


def _read_bytes(source: ImageSource, max_bytes: int, what: str) -> bytes:
    too_big = (f"{what} is larger than {max_bytes / 2**20:.0f} MB: use a smaller image "
               f"(a feature or dataset image needs far fewer pixels)")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > max_bytes:
            raise ImageError(too_big)
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            data = read_bounded(path, max_bytes)
            if data is None:
                raise ImageError(too_big)
        except OSError as exc:
            raise ImageError(unreadable_message(path, exc, "image file", f"a {SUPPORTED} file")) from None
    elif hasattr(source, "read"):
        if hasattr(source, "seek"):
            try:
                source.seek(0)
            except (OSError, ValueError):
                pass  # a pipe or socket: read from where it is
        data = source.read(max_bytes + 1)
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError(f"{what} must be opened in binary mode ('rb'), got {type(data).__name__}")
    else:
        raise ImageError(f"cannot read an image from {type(source).__name__}: give a path, bytes or a binary file")
    if len(data) > max_bytes:
        raise ImageError(too_big)
    return bytes(data)


def open_image(source: ImageSource, *, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES,
               name: str | None = None) -> Image.Image:
    """Read an image from a path, bytes or a binary file-like and decode it fully.

    Args:
        source: a path, the bytes of an upload, or a file opened ``"rb"``.
        max_pixels: refuse images with more pixels (width x height) than this, before decoding.
        max_bytes: refuse files larger than this, before reading them whole.
        name: how messages call the image (default: the path, or "the image").

    Returns:
        A loaded :class:`PIL.Image.Image` (first frame of an animation), detached from any file.

    Raises:
        ImageError: too large, a decompression bomb, truncated or corrupt, a huge text chunk, or
            not an image in a supported format; the message says what to do.
    """
    what = name or (str(source) if isinstance(source, (str, os.PathLike)) else "the image")
    data = _read_bytes(source, max_bytes, what)
    if not data:
        raise ImageError(f"{what} is empty (0 bytes): upload a {SUPPORTED} file")
    try:
        # Pillow's bomb check (in Image.open) warns above its own limit; turn that warning into
        # an error here only, without touching Image.MAX_IMAGE_PIXELS. catch_warnings swaps the
        # process-wide filter list, so the lock keeps two dashboard threads from interleaving
        # their save/restore (which could leave the "error" filter behind for other code).
        with _FILTER_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:  # checked on the header, before a single pixel is decoded
            raise ImageError(_bomb_message(what, w, h, max_pixels))
        img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{what} declares too many pixels ({exc}); it may be a decompression bomb: "
                         f"use an image of at most {max_pixels / 1e6:.0f} megapixels") from None
    except UnidentifiedImageError:
        raise ImageError(f"{what} is not an image Pillow can read: use a {SUPPORTED} file") from None
    except ValueError as exc:
        if "too large" in str(exc).lower() or "too much memory" in str(exc).lower():
            raise ImageError(f"{what} carries a huge text or profile chunk ({exc}): re-save it without "
                             f"metadata (e.g. export as a plain PNG)") from None
        raise ImageError(f"{what} is corrupt ({exc}): re-save it as a {SUPPORTED} file") from None
    except _PILLOW_ERRORS as exc:
        detail = str(exc) or type(exc).__name__
        if "truncated" in detail.lower():
            raise ImageError(f"{what} is truncated ({detail}): the file is incomplete; copy or export it again") from None
        raise ImageError(f"{what} is corrupt or unsupported ({detail}): re-save it as a {SUPPORTED} file") from None
    return img


def _bomb_message(what: str, w: int, h: int, max_pixels: int) -> str:
    return (f"{what} is {w}x{h} pixels ({w * h / 1e6:.0f} megapixels), more than the limit of "
            f"{max_pixels / 1e6:.0f} megapixels (it may be a decompression bomb): scale it down first")
