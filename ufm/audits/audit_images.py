"""The images a model audit reads: inference (out-of-distribution) images and labelled images.

Inference images (:func:`audit_inference_images`): a benchmark's test split, an ``.npz`` (array
``x``, uint8), or a folder of images, converted to the model's input size and channels exactly as
training images are (:func:`ufm.core.data.convert_images`). Uploaded ``.npz`` files are checked
before they are kept (:func:`check_npz_images`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ufm.core.data import BENCHMARKS, DataUnavailable, convert_images, load_ood, load_split, to_float_images
from ufm.imageio import ImageError, open_image
from ufm.limits import MAX_OOD_SIZE

_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _from_uint8(x: np.ndarray, shape: tuple[int, int, int], n: int, what: str) -> torch.Tensor:
    if x.dtype != np.uint8:
        raise DataUnavailable(f"{what}: images x must be uint8 (0..255), got {x.dtype}")
    if x.ndim == 4 and x.shape[-1] not in (1, 3) and x.shape[1] in (1, 3):
        x = np.transpose(x, (0, 2, 3, 1))  # stored (N, C, H, W)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    try:
        t = to_float_images(x[:n])
        return convert_images(t, shape[0], shape[1:])
    except ValueError as exc:
        raise DataUnavailable(f"{what}: {exc}; use greyscale (N, H, W) or RGB (N, H, W, 3) uint8 images") from None


def _folder_images(folder: Path, shape: tuple[int, int, int], n: int) -> torch.Tensor:
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in _IMAGE_EXTS)[:n]
    if not files:
        raise DataUnavailable(f"no images ({', '.join(sorted(_IMAGE_EXTS))}) in {folder}")
    mode = "L" if shape[0] == 1 else "RGB"
    out = []
    for f in files:
        try:
            im = open_image(f)  # guarded: bombs, corrupt files
        except ImageError as exc:
            raise DataUnavailable(f"{exc}; or remove {f} from the folder") from None
        out.append(convert_images(to_float_images(np.asarray(im.convert(mode), dtype=np.uint8)[None]),
                                  shape[0], shape[1:]))
    return torch.cat(out)


def default_inference_source(channels: int, trained_on: str | None = None) -> tuple[str, str]:
    """The inference set an audit starts from, and why: the paper's out-of-distribution set.

    ``trained_on`` (a ufm export records it): that dataset's OOD set (:data:`ufm.core.data.DEFAULT_OOD`),
    the one its runs were measured on, so the audit's M is comparable with the run's. Otherwise by
    the model's channels: greyscale CIFAR-10 for a one-channel model, MNIST (as 3 channels) for a
    colour one. Never the model's own kind of images: in-distribution images give a different,
    usually larger, M (an MNIST run's 0.0013 read 0.0086 on MNIST test images), not comparable.
    """
    from ufm.core.data import DEFAULT_OOD

    if trained_on in DEFAULT_OOD:
        src = DEFAULT_OOD[trained_on]
        return src, (f"the paper's out-of-distribution set for a model trained on {trained_on} (the file says so): "
                     f"{'greyscale ' if src == 'cifar10' else ''}{src} test images, as its runs were measured")
    src = "mnist" if int(channels) == 3 else "cifar10"
    what = "MNIST digits as 3 channels" if src == "mnist" else "greyscale CIFAR-10 photos"
    return src, (f"the paper's out-of-distribution set for a {int(channels)}-channel model: {what}. Images like "
                 "the model's own training images (e.g. MNIST test images for a digit classifier) measure "
                 "something else and give a different M, not comparable with a ufm run's")


def audit_inference_images(source: str, shape: Sequence[int], n: int, *, data_dir: str | None = None) -> torch.Tensor:
    """The first ``n`` inference images of ``source`` as ``(n, C, H, W)`` float32 in [0, 1], in ``shape``.

    Args:
        source: a benchmark name (its test split, as :func:`ufm.core.data.load_ood` reads it for a
            trained run, so the same ``n`` gives the same images), a folder holding ``test.npz``,
            an ``.npz`` file (uint8 ``x``), or a folder of image files (sorted by path).
        shape: the model's ``(C, H, W)``.

    Raises:
        DataUnavailable: the source is missing or unreadable, or holds fewer than 2 images.
    """
    c, h, w = (int(v) for v in shape)
    if not 2 <= n <= MAX_OOD_SIZE:
        raise ValueError(f"number of inference images must be between 2 and {MAX_OOD_SIZE}, got {n}")
    path = Path(source).expanduser()
    if source in BENCHMARKS or (path.is_dir() and (path / "test.npz").is_file()):
        try:
            x = load_ood("audited model", (c, h, w), n, source=source, data_dir=data_dir).x
        except ValueError as exc:
            raise DataUnavailable(str(exc)) from None
    elif path.is_file() and path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                if "x" not in f.files:
                    raise DataUnavailable(f"{path} has no array x (uint8 images); it holds {', '.join(f.files)}")
                x = _from_uint8(f["x"], (c, h, w), n, str(path))
        except (OSError, ValueError) as exc:
            raise DataUnavailable(f"could not read {path}: {exc}") from None
    elif path.is_dir():
        x = _folder_images(path, (c, h, w), n)
    else:
        raise DataUnavailable(f"inference images {source!r} not found: give one of {', '.join(BENCHMARKS)}, a folder "
                              "of images, or an .npz file with uint8 images x")
    if len(x) < 2:
        raise DataUnavailable(f"{source} holds {len(x)} image(s); the audit needs at least 2 inference images")
    return x


def check_npz_images(name: str, data: bytes, shape: Sequence[int] | None = None) -> None:
    """Check an uploaded ``.npz`` of inference images before it is kept: readable without pickle,
    an array ``x`` of at most :data:`ufm.limits.MAX_AUDIT_IMAGE_BYTES` (its declared size, read
    before it is decompressed), uint8, and convertible to ``shape`` (C, H, W) when given.
    Messages name the upload (``name``), never a server path.

    Raises:
        DataUnavailable: one line saying what is wrong with the upload.
    """
    import io
    import zipfile

    from ufm.limits import MAX_AUDIT_IMAGE_BYTES

    try:
        f = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):  # a bare .npy: an array, not an archive
            raise DataUnavailable(f"{name} is a single .npy array, not an .npz archive; save it with "
                                  "numpy.savez(path, x=images)")
        with f:
            if "x" not in f.files:
                raise DataUnavailable(f"{name} has no array x (uint8 images); it holds {', '.join(f.files) or 'nothing'}")
            declared = f.zip.getinfo("x.npy").file_size
            if declared > MAX_AUDIT_IMAGE_BYTES:
                raise DataUnavailable(f"{name}: its array x unpacks to {declared / 2**20:,.0f} MB, above the limit of "
                                      f"{MAX_AUDIT_IMAGE_BYTES / 2**20:,.0f} MB: keep fewer images in it")
            x = f["x"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataUnavailable(f"{name} is not a readable .npz of uint8 images x ({type(exc).__name__}); save it with "
                              "numpy.savez(path, x=images)") from None
    if x.dtype != np.uint8:
        raise DataUnavailable(f"{name}: images x must be uint8 (0..255), got {x.dtype}")
    if len(x) < 2:
        raise DataUnavailable(f"{name} holds {len(x)} image(s); the audit needs at least 2 inference images")
    if shape is not None:
        _from_uint8(x[:2], tuple(int(v) for v in shape), 2, name)  # the same conversion the audit does


def labelled_images(source: str, shape: Sequence[int], *, data_dir: str | None = None,
                    limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """In-domain labelled images for the white- and grey-box gains: ``(x (N, C, H, W), y (N,))``.

    ``source``: a benchmark or folder (its test split), or an ``.npz`` with ``x`` (uint8) and ``y``.
    """
    c, h, w = (int(v) for v in shape)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                if not {"x", "y"} <= set(f.files):
                    raise DataUnavailable(f"{path} needs arrays x (uint8 images) and y (int labels)")
                x = _from_uint8(f["x"], (c, h, w), limit or len(f["x"]), str(path))
                y = torch.as_tensor(np.asarray(f["y"][:len(x)]).astype(np.int64))
        except (OSError, ValueError) as exc:
            raise DataUnavailable(f"could not read {path}: {exc}") from None
        return x, y
    d = load_split(source, "test", data_dir=data_dir, limit=limit)
    return convert_images(d.x, c, (h, w)), d.y
