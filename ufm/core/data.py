"""Datasets as tensors: benchmark sets, a user's own images, and the out-of-distribution set.

Every image set is an :class:`ImageData` holding float ``(N, C, H, W)`` pixels in ``[0, 1]``
and int64 labels, resident on one device. Preprocessing is the same for training and inference
images (divide by 255, nothing else), so a feature stamped with value 1.0 is white on both.

Where data comes from, in order:

1. ``<data-dir>/<name>/{train,test}.npz`` (arrays ``x`` uint8, ``y`` int64, ``classes``): the
   offline copies, e.g. ``../shared/data``;
2. torchvision's downloader (MNIST, Fashion-MNIST, CIFAR-10), once, into
   ``<data-dir>/torchvision``;
3. a path: a folder holding ``train.npz`` and ``test.npz``, or a folder of class sub-folders of
   images (optionally split into ``train/`` and ``test/``).

``<data-dir>`` is ``--data-dir``, else ``$UFM_DATA_DIR``, else ``~/.cache/ufm/data``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ufm.core.sampling import stratified_indices
from ufm.imageio import ImageError, open_image


BENCHMARKS = ("mnist", "fashion-mnist", "cifar10", "chest-xray", "pneumoniamnist")
_DOWNLOADABLE = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}
# MedMNIST v2's PneumoniaMNIST (Yang et al. 2023, CC BY 4.0): 28x28 paediatric chest X-rays,
# normal vs pneumonia, for users without the 64x64 chest-xray copy.
PNEUMONIAMNIST = dict(url="https://zenodo.org/record/6496656/files/pneumoniamnist.npz?download=1",
                      filename="pneumoniamnist.npz", md5="28209eda62fecd6e6a2d98b1501bb15f")
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

# Paper's inference sets: greyscale CIFAR-10 for the greyscale digit/clothing models, MNIST made
# 3-channel for CIFAR-10 models. Any other training set gets CIFAR-10 (it is OOD for all of them).
DEFAULT_OOD = {"mnist": "cifar10", "fashion-mnist": "cifar10", "cifar10": "mnist", "chest-xray": "cifar10",
               "pneumoniamnist": "cifar10"}


class DataUnavailable(RuntimeError):
    """Data that is neither on disk nor downloadable; the message names the directory and the fixes."""


@dataclass
class ImageData:
    """Images and labels on one device.

    Attributes:
        x: (N, C, H, W) float32 in [0, 1].
        y: (N,) int64 class labels.
        classes: class names, indexed by label.
        name: where the data came from ("mnist", a path, ...).
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]
    name: str

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device: torch.device | str) -> "ImageData":
        return ImageData(self.x.to(device), self.y.to(device), self.classes, self.name)

    def subset(self, idx: torch.Tensor | np.ndarray | Sequence[int] | slice) -> "ImageData":
        if not isinstance(idx, slice):
            idx = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=self.x.device)
        return ImageData(self.x[idx], self.y[idx], self.classes, self.name)


def default_data_dir() -> Path:
    env = os.environ.get("UFM_DATA_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "ufm" / "data"


def to_float_images(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images ``(N, H, W)`` or ``(N, H, W, C)`` -> float32 ``(N, C, H, W)`` in [0, 1]."""
    t = torch.as_tensor(np.asarray(x))
    if t.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (0..255), got {t.dtype}")
    if t.ndim == 3:
        t = t.unsqueeze(1)
    elif t.ndim == 4:
        t = t.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C), got shape {tuple(t.shape)}")
    return t.float().div_(255.0).contiguous()


def _keep(y: np.ndarray | Sequence[int], limit: int | None, stratified: bool) -> slice | np.ndarray:
    """Which images ``limit`` keeps: the first ones, or a stratified seeded subset (see
    :func:`ufm.core.sampling.stratified_indices`, which also refuses a single-class set)."""
    if stratified:
        y = np.asarray(y).reshape(-1)
        return stratified_indices(y, len(y) if limit is None else limit)
    return slice(None, limit)


def _from_arrays(x: np.ndarray, y: np.ndarray, classes: Sequence[str] | None, name: str,
                 limit: int | None, stratified: bool = False) -> ImageData:
    if limit is not None or stratified:
        if len(x) != len(y):
            raise DataUnavailable(f"{name}: {len(x)} images but {len(y)} labels")
        keep = _keep(y, limit, stratified)
        x, y = x[keep], np.asarray(y)[keep]
    if len(x) != len(y):
        raise DataUnavailable(f"{name}: {len(x)} images but {len(y)} labels")
    y = check_labels(y, classes, name)
    if classes is None or len(classes) == 0:
        classes = [str(c) for c in range(int(y.max()) + 1 if len(y) else 0)]
    return ImageData(to_float_images(x), torch.as_tensor(y, dtype=torch.long), tuple(str(c) for c in classes), name)


def check_labels(y: np.ndarray | Sequence[int], classes: Sequence[str] | None, name: str) -> np.ndarray:
    """Labels ``y`` (N,) as int64, checked to be integers in ``0..len(classes) - 1``.

    A label outside the class list would crash training (or silently train a class the test set
    does not have), so it is refused here with the first offending value and its position.
    Without ``classes`` the labels only need to be non-negative integers.

    Raises:
        DataUnavailable: labels that are not whole numbers, negative, or past the class list.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataUnavailable(f"{name}: labels y must be a 1-D array (one label per image), got shape {y.shape}")
    if y.dtype.kind not in "iub":
        whole = y.dtype.kind == "f" and bool(np.all(np.isfinite(y))) and bool(np.all(y == np.round(y)))
        if not whole:
            raise DataUnavailable(f"{name}: labels y must be integers (class numbers 0, 1, ...), got dtype {y.dtype}; "
                                  "store y as int64")
    y = y.astype(np.int64)
    k = len(classes) if classes is not None and len(classes) else None
    bad = (y < 0) if k is None else (y < 0) | (y >= k)
    if bad.any():
        i = int(np.argmax(bad))
        allowed = "non-negative integers" if k is None else f"0..{k - 1} (classes {', '.join(map(str, classes))})"
        raise DataUnavailable(f"{name}: label {int(y[i])} at index {i} ({int(bad.sum())} bad in all) is outside "
                              f"{allowed}; fix y, or list every class in 'classes' so label c names classes[c]")
    return y


def check_same_classes(train: ImageData, test: ImageData) -> None:
    """Refuse a test split whose class list differs from the training split's: label c must name
    the same class in both, or test accuracy (and a folder's extra class) would be meaningless."""
    if tuple(train.classes) != tuple(test.classes):
        raise DataUnavailable(
            f"the test split of {test.name} has classes [{', '.join(test.classes)}] but the training split has "
            f"[{', '.join(train.classes)}]: give both splits the same classes in the same order "
            "(for class folders: the same sub-folder names under train/ and test/)")


def _load_npz(path: Path, name: str, limit: int | None, stratified: bool = False) -> ImageData:
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"x", "y"} - set(f.files)
            if missing:
                raise DataUnavailable(f"{path} lacks the arrays {sorted(missing)}; it needs x (uint8 images) and y (int labels)")
            classes = [str(c) for c in f["classes"]] if "classes" in f.files else None
            return _from_arrays(f["x"], f["y"], classes, name, limit, stratified)
    except (OSError, ValueError) as exc:
        raise DataUnavailable(f"could not read {path}: {exc}") from None


def _download_message(name: str, root: Path, reason: str) -> str:
    return (f"{name} is not in {root} (looked for {root / name / 'train.npz'} and torchvision's files in "
            f"{root / 'torchvision'}) and could not be downloaded: {reason}. Either connect to the internet "
            f"and run again (it is downloaded once into {root / 'torchvision'}), or put train.npz/test.npz "
            f"(x uint8, y int64, classes) in {root / name}/ and point --data-dir or UFM_DATA_DIR at {root}.")


def _torchvision(name: str, split: str, root: Path, download: bool, limit: int | None,
                 stratified: bool = False) -> ImageData:
    from torchvision import datasets  # imported lazily: only the download path needs it

    cls = getattr(datasets, _DOWNLOADABLE[name])
    try:
        ds = cls(root=str(root / "torchvision"), train=(split == "train"), download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found. You can use download=True ..."
        raise DataUnavailable(_download_message(name, root, "downloading is switched off" if not download
                                                else str(exc))) from None
    except Exception as exc:  # URLError, socket errors, HTTP errors: no internet
        raise DataUnavailable(_download_message(name, root, f"{type(exc).__name__}: {exc}")) from None
    x = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    y = np.asarray(ds.targets)
    return _from_arrays(x, y, list(ds.classes), name, limit, stratified)


def _medmnist(split: str, root: Path, download: bool, limit: int | None, stratified: bool = False) -> ImageData:
    """PneumoniaMNIST from MedMNIST's own ``.npz`` (keys ``train_images``, ``train_labels`` (N, 1), ...),
    downloaded once with torchvision's checksummed downloader. Its ``val`` split is not used."""
    path = root / "pneumoniamnist" / PNEUMONIAMNIST["filename"]
    if not path.is_file():
        if not download:
            raise DataUnavailable(_download_message("pneumoniamnist", root, "downloading is switched off"))
        from torchvision.datasets.utils import download_url
        try:
            download_url(PNEUMONIAMNIST["url"], str(path.parent), PNEUMONIAMNIST["filename"], PNEUMONIAMNIST["md5"])
        except Exception as exc:  # URLError, socket errors, HTTP errors, checksum: no usable file
            raise DataUnavailable(_download_message("pneumoniamnist", root, f"{type(exc).__name__}: {exc}")) from None
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f[f"{split}_images"], f[f"{split}_labels"].reshape(-1)
    except (OSError, ValueError, KeyError) as exc:
        raise DataUnavailable(f"could not read {path} as MedMNIST data ({exc}); delete it to download again") from None
    return _from_arrays(x, y.astype(np.int64), ["normal", "pneumonia"], "pneumoniamnist", limit, stratified)


def _folder(path: Path, split: str, limit: int | None, seed: int, stratified: bool = False) -> ImageData:
    """A folder of class sub-folders; with ``train/`` and ``test/`` inside, those are the splits,
    otherwise a seeded 80/20 split of all images."""
    from PIL import Image

    base = path / split if (path / "train").is_dir() and (path / "test").is_dir() else path
    class_dirs = sorted(d for d in base.iterdir() if d.is_dir())
    if len(class_dirs) < 2:
        raise DataUnavailable(f"{base} needs at least two class sub-folders of images (e.g. normal/ and pneumonia/)")
    files, labels = [], []
    for label, d in enumerate(class_dirs):
        fs = sorted(f for f in d.iterdir() if f.suffix.lower() in _IMAGE_EXTS)
        files += fs
        labels += [label] * len(fs)
    if not files:
        raise DataUnavailable(f"no images ({', '.join(sorted(_IMAGE_EXTS))}) under {base}")
    if base is path:
        order = np.random.default_rng(seed).permutation(len(files))
        cut = int(round(0.8 * len(files)))
        keep = order[:cut] if split == "train" else order[cut:]
        files, labels = [files[i] for i in sorted(keep)], [labels[i] for i in sorted(keep)]
    if limit is not None or stratified:  # before decoding: only the kept images are read
        keep = _keep(labels, limit, stratified)
        keep = range(len(files))[keep] if isinstance(keep, slice) else keep
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    mode, size = None, None
    arrays = []
    for f in files:
        try:
            im = open_image(f)  # guarded: bombs, truncated or corrupt files, the first one included
        except ImageError as exc:
            raise DataUnavailable(f"{exc}; or remove {f} from the dataset") from None
        if mode is None:  # the first image decides the mode and size of all
            mode = "L" if im.mode in ("L", "1", "I", "I;16", "LA") else "RGB"
            size = im.size
        arrays.append(np.asarray(im.convert(mode).resize(size, Image.Resampling.LANCZOS), dtype=np.uint8))
    return _from_arrays(np.stack(arrays), np.array(labels), [d.name for d in class_dirs], str(path), None)


def load_split(dataset: str, split: str, *, data_dir: str | Path | None = None, download: bool = True,
               limit: int | None = None, seed: int = 0, stratified: bool = False) -> ImageData:
    """Load ``split`` ("train" or "test") of a benchmark dataset or of a path, on the CPU.

    Args:
        dataset: one of :data:`BENCHMARKS`, or a path (folder with train.npz/test.npz, or a folder
            of class sub-folders).
        data_dir: where offline copies and downloads live (default :func:`default_data_dir`).
        download: allow torchvision to download a missing benchmark.
        limit: keep only the first ``limit`` images (official order); with ``stratified`` a
            subset of ``limit`` images that keeps every class in proportion (seeded, sorted).
        seed: the 80/20 split of a class-folder dataset without train/ and test/.
        stratified: how ``limit`` picks (what ``--train-size`` uses); it also refuses a split that
            holds a single class.

    Raises:
        DataUnavailable: the data is missing and cannot be fetched; the message says what to do.
        ValueError: with ``stratified``: one class only, or ``limit`` below the number of classes.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if dataset in BENCHMARKS:
        local = root / dataset / f"{split}.npz"
        if local.is_file():
            return _load_npz(local, dataset, limit, stratified)
        if dataset == "pneumoniamnist":
            return _medmnist(split, root, download, limit, stratified)
        if dataset not in _DOWNLOADABLE:
            raise DataUnavailable(
                f"{dataset} is not in {root} (looked for {local}) and cannot be downloaded automatically. "
                f"Put its train.npz/test.npz in {root / dataset}/ and point --data-dir or UFM_DATA_DIR at "
                f"{root}, or use a folder of your own images (one sub-folder per class) as the dataset.")
        return _torchvision(dataset, split, root, download, limit, stratified)
    path = Path(dataset).expanduser()
    if path.is_file() and path.suffix == ".npz":
        path = path.parent
    if (path / f"{split}.npz").is_file():
        return _load_npz(path / f"{split}.npz", str(path), limit, stratified)
    if path.is_dir():
        return _folder(path, split, limit, seed, stratified)
    raise DataUnavailable(f"unknown dataset {dataset!r}: use one of {', '.join(BENCHMARKS)}, a folder with "
                          "train.npz and test.npz, or a folder with one sub-folder of images per class")


def convert_images(x: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """Bring images ``(N, C, H, W)`` to ``channels`` and ``size`` = (H', W').

    RGB -> grey uses ITU-R 601 luma (as Pillow's "L"); grey -> RGB repeats the channel; resizing
    is bilinear with antialiasing.
    """
    c = x.shape[1]
    if c != channels:
        if c == 3 and channels == 1:
            w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * w).sum(1, keepdim=True)
        elif c == 1:
            x = x.expand(-1, channels, -1, -1)
        else:
            raise ValueError(f"cannot convert {c}-channel images to {channels} channels")
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0, 1).contiguous()


def load_ood(train_dataset: str, image_shape: tuple[int, int, int], n: int, *, source: str | None = None,
             data_dir: str | Path | None = None, download: bool = True) -> ImageData:
    """The out-of-distribution inference set ``D_c``: ``n`` images in the model's input shape.

    Default ``source`` follows the paper: greyscale CIFAR-10 for MNIST / Fashion-MNIST (and other
    datasets), MNIST as 3 channels for CIFAR-10. Images are the first ``n`` of the source's test
    split, converted with :func:`convert_images`.
    """
    if n < 2:
        raise ValueError(f"the inference set needs at least 2 images, got {n}")
    source = source or DEFAULT_OOD.get(train_dataset, "cifar10")
    if source == train_dataset:
        raise ValueError(f"the inference set must be out of distribution: {source!r} is the training set itself")
    data = load_split(source, "test", data_dir=data_dir, download=download, limit=n)
    if len(data) < n:
        raise ValueError(f"asked for {n} inference images but {source} has only {len(data)} test images")
    c, h, w = image_shape
    return ImageData(convert_images(data.x, c, (h, w)), data.y, data.classes, f"{source} (OOD)")


def available_offline(data_dir: str | Path | None = None) -> list[str]:
    """Benchmarks whose train.npz and test.npz are in ``data_dir`` (usable without a download)."""
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    have = [n for n in BENCHMARKS if (root / n / "train.npz").is_file() and (root / n / "test.npz").is_file()]
    if "pneumoniamnist" not in have and (root / "pneumoniamnist" / PNEUMONIAMNIST["filename"]).is_file():
        have.append("pneumoniamnist")
    return have
