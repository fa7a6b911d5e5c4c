"""Training: Adam + cross-entropy, early stopping on validation loss, regularisers, DP-SGD.

The training set lives on the device as one tensor; mini-batches are index slices of it, and
augmentation is a pure batch function, so an epoch of MNIST on an MLP is a few dozen kernel
launches rather than a DataLoader with worker processes. DP-SGD goes through Opacus, which needs a
DataLoader (Poisson sampling is part of its privacy accounting).
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn
import torch.nn.functional as F

from ufm.core.dp import DEFAULT_DP, DEFAULT_NOISE_MULTIPLIER, NEUTRAL_DP, DPConfig  # noqa: F401
from ufm.core.data import ImageData
from ufm.core.models import has_batchnorm, predict_logits

# Opacus warns that its noise is seeded ("secure RNG turned off"): deliberate, results must be
# reproducible; and that its backward hooks fire although the inputs need no grad: harmless.
# Filters set once here (warnings.catch_warnings is not thread-safe; runs train in threads).
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")

REGULARISERS = ("none", "dropout", "augment", "batchnorm", "weight-decay", "dp-sgd")
# TracIn compares checkpoint losses, so all are measured alike: eval-mode mean cross-entropy on
# one fixed, seeded subset of the training images (all of them when fewer), at the checkpoint.
CHECKPOINT_LOSS_IMAGES = 2048


class TrainingCancelled(RuntimeError):
    """Raised when the cancel flag was set; nothing of the run is kept."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says what to change."""


# DP-SGD settings live in ufm.core.dp (torch-free, so the CLI's parser needs no torch); re-exported here.


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Units: ``lr`` per Adam step, ``max_epochs``/``patience`` in epochs.

    Attributes:
        augment: random translations of up to ``shift`` pixels (and horizontal flips when
            ``hflip``), applied to every image including the canary.
        checkpoint_every: keep a copy of the weights every this many optimiser steps for TracIn
            (plus the initial weights); 0 keeps none, -1 keeps one per epoch.
        max_checkpoints: memory bound on kept checkpoints; when exceeded, every other one is
            dropped and the interval doubles, so the kept ones stay evenly spaced.
        deterministic: ask torch for deterministic kernels (slower on some GPUs).
    """

    lr: float = 1e-4
    batch_size: int = 128
    max_epochs: int = 500
    patience: int = 10
    weight_decay: float = 0.0
    augment: bool = False
    shift: int = 2
    hflip: bool = False
    dp: DPConfig | None = None
    checkpoint_every: int = 0
    max_checkpoints: int = 64
    seed: int = 0
    deterministic: bool = True

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.max_epochs < 1:
            raise ValueError(f"max epochs must be >= 1, got {self.max_epochs}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1 epoch, got {self.patience}")
        if self.weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.shift < 0:
            raise ValueError(f"augmentation shift must be >= 0 pixels, got {self.shift}")
        if self.max_checkpoints < 2:
            raise ValueError(f"max_checkpoints must be >= 2, got {self.max_checkpoints}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        if d.get("dp") is not None:
            d["dp"] = DPConfig(**d["dp"])
        return cls(**d)


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    seconds: float


@dataclass
class Checkpoint:
    """Weights kept for TracIn: after ``step`` optimiser steps (0 = initial weights).

    ``train_loss``: eval-mode mean cross-entropy (nats) of these weights on a fixed subset of
    :data:`CHECKPOINT_LOSS_IMAGES` training images, the same for every checkpoint of a run.
    """

    step: int
    epoch: float
    lr: float
    train_loss: float
    state_dict: dict[str, torch.Tensor] = field(repr=False)


@dataclass
class Progress:
    """One progress report: phase ("train", "score", ...), epoch counters and the latest numbers."""

    phase: str
    epoch: int = 0
    max_epochs: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    val_acc: float | None = None
    message: str = ""


@dataclass
class TrainResult:
    model: nn.Module
    history: list[EpochLog]
    best_epoch: int
    epochs_trained: int
    stopped: str  # "early_stopping" | "max_epochs" (DP-SGD always trains max_epochs)
    checkpoints: list[Checkpoint]
    epsilon: float | None
    seconds: float


ProgressFn = Callable[[Progress], None]
CancelFlag = Callable[[], bool] | threading.Event | None


def is_cancelled(cancel: CancelFlag) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks cuda, then mps, then cpu; anything else is checked and returned."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for but no CUDA GPU is visible; use --device cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for but MPS is not available; use --device cpu or auto")
    return dev


def describe_device(device: torch.device | str = "auto") -> str:
    """A human description of a device: the GPU's name, or the CPU with its thread count."""
    dev = resolve_device(device) if isinstance(device, str) else device
    if dev.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(dev)}"
    if dev.type == "mps":
        return "Apple GPU (MPS)"
    return f"CPU ({torch.get_num_threads()} threads; no GPU found)"


def augment_batch(x: torch.Tensor, *, shift: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (zero fill) and optional horizontal flip.

    ``x``: (N, C, H, W). Offsets are drawn per image on the CPU with ``generator`` (so the same
    seed gives the same augmentation on every device) and applied with one gather.
    """
    n, c, h, w = x.shape
    out = x
    if shift > 0:
        d = torch.randint(0, 2 * shift + 1, (2, n), generator=generator).to(x.device)
        padded = F.pad(x, (shift, shift, shift, shift))
        rows = (torch.arange(h, device=x.device)[None, :] + d[0][:, None])  # (N, H)
        cols = (torch.arange(w, device=x.device)[None, :] + d[1][:, None])  # (N, W)
        nidx = torch.arange(n, device=x.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[nidx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out.contiguous()


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy (nats) and accuracy of ``model`` on ``data``, in eval mode."""
    if len(data) == 0:
        return float("nan"), float("nan")
    logits = predict_logits(model, data.x, batch_size)
    loss = F.cross_entropy(logits, data.y).item()
    acc = (logits.argmax(1) == data.y).float().mean().item()
    return loss, acc


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    # Under DP-SGD ``model`` is Opacus' wrapper; keys must be those of the plain module.
    inner = getattr(model, "_module", model)
    return {k: v.detach().to("cpu", copy=True) for k, v in inner.state_dict().items()}


def train(model: nn.Module, train_data: ImageData, val_data: ImageData, cfg: TrainConfig, *,
          progress: ProgressFn | None = None, cancel: CancelFlag = None) -> TrainResult:
    """Train ``model`` in place and return it with its best weights (lowest validation loss).

    With ``cfg.dp`` (DP-SGD) there is no early stopping: exactly ``cfg.max_epochs`` run, so a
    ``target_epsilon`` calibrates the noise for the steps actually taken, and the *last*
    weights are returned, because they are what the reported epsilon (spent over all those
    steps) describes; restoring an earlier epoch would measure a model trained to another,
    unreported privacy level. ``epsilon`` is the spent epsilon (Opacus' RDP accountant).

    ``train_data`` and ``val_data`` must already be on the model's device. ``progress`` is
    called after every epoch; ``cancel`` (an Event or a callable) is checked between batches.

    Raises:
        TrainingCancelled: the cancel flag was set.
        TrainingDiverged: the loss became NaN or infinite.
        ValueError: incompatible settings (e.g. DP-SGD with batch norm).
    """
    t0 = time.perf_counter()
    device = train_data.x.device
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(train_data)
    engine = None
    dp_loader = None
    if cfg.dp is not None:
        model, opt, dp_loader, engine = _make_private(model, opt, train_data, cfg, gen)

    checkpoints: list[Checkpoint] = []
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    every = steps_per_epoch if cfg.checkpoint_every == -1 else cfg.checkpoint_every
    if every:
        loss_idx = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 2))[:CHECKPOINT_LOSS_IMAGES]
        loss_data = train_data.subset(loss_idx.sort().values)
        checkpoints.append(Checkpoint(0, 0.0, cfg.lr, evaluate(model, loss_data)[0], _state_copy(model)))

    best = (float("inf"), 0, _state_copy(model))
    history: list[EpochLog] = []
    stopped = "max_epochs"
    step = 0
    for epoch in range(1, cfg.max_epochs + 1):
        te = time.perf_counter()
        model.train()
        tot_loss = torch.zeros((), device=device)
        tot_correct = torch.zeros((), device=device)
        seen = 0
        batches = dp_loader if dp_loader is not None else _index_batches(n, cfg.batch_size, gen, device)
        for batch in batches:
            if is_cancelled(cancel):
                raise TrainingCancelled("training was cancelled")
            if dp_loader is not None:
                xb, yb = batch
                if xb.shape[0] == 0:  # Poisson sampling can draw an empty batch
                    continue
            else:
                xb, yb = train_data.x[batch], train_data.y[batch]
            if cfg.augment:
                xb = augment_batch(xb, shift=cfg.shift, hflip=cfg.hflip, generator=gen)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            with torch.no_grad():
                tot_loss += loss.detach() * xb.shape[0]
                tot_correct += (logits.argmax(1) == yb).sum()
            seen += xb.shape[0]
            if every and step % every == 0:
                checkpoints.append(Checkpoint(step, step / steps_per_epoch, cfg.lr, evaluate(model, loss_data)[0],
                                              _state_copy(model)))
                if len(checkpoints) > cfg.max_checkpoints:
                    checkpoints = checkpoints[::2]
                    every *= 2
        train_loss = (tot_loss / max(seen, 1)).item()
        if not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"the training loss became {train_loss} in epoch {epoch}: lower the learning rate "
                f"(now {cfg.lr:g}), or for DP-SGD the noise multiplier / clipping norm")
        val_loss, val_acc = evaluate(model, val_data)
        history.append(EpochLog(epoch, train_loss, (tot_correct / max(seen, 1)).item(), val_loss, val_acc,
                                time.perf_counter() - te))
        if progress is not None:
            progress(Progress("train", epoch, cfg.max_epochs, train_loss, val_loss, val_acc))
        if engine is not None:
            continue  # DP-SGD: the fixed epoch budget, last weights (see the docstring)
        if val_loss < best[0]:
            best = (val_loss, epoch, _state_copy(model))
        elif epoch - best[1] >= cfg.patience:
            stopped = "early_stopping"
            break

    epsilon = engine.get_epsilon(cfg.dp.delta) if engine is not None else None
    if engine is not None:
        model = _unwrap(model)
        best = (history[-1].val_loss, len(history), None)
    else:
        model.load_state_dict(best[2])
    model.eval()
    return TrainResult(model, history, best[1], len(history), stopped, checkpoints, epsilon,
                       time.perf_counter() - t0)


def _index_batches(n: int, batch_size: int, gen: torch.Generator, device: torch.device):
    perm = torch.randperm(n, generator=gen).to(device)
    return perm.split(batch_size)


def _make_private(model: nn.Module, opt: torch.optim.Optimizer, data: ImageData, cfg: TrainConfig,
                  gen: torch.Generator):
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    if has_batchnorm(model):
        raise ValueError(
            "DP-SGD cannot train a model with batch normalisation: batch norm mixes the examples of a "
            "batch, so per-example gradients (and the privacy guarantee) are undefined. Drop the "
            "batchnorm regulariser, or pick mlp/cnn1/cnn2 instead of densenet100.")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"DP-SGD (Opacus) cannot train this model: {errors[0]}")
    dataset = torch.utils.data.TensorDataset(data.x, data.y)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    engine = PrivacyEngine(accountant="rdp")
    noise_gen = torch.Generator(device=data.x.device).manual_seed(cfg.seed + 1)
    common = dict(module=model, optimizer=opt, data_loader=loader, max_grad_norm=cfg.dp.max_grad_norm,
                  noise_generator=noise_gen)
    if cfg.dp.target_epsilon is not None:
        model, opt, loader = engine.make_private_with_epsilon(
            target_epsilon=cfg.dp.target_epsilon, target_delta=cfg.dp.delta, epochs=cfg.max_epochs, **common)
    else:
        model, opt, loader = engine.make_private(noise_multiplier=cfg.dp.noise_multiplier, **common)
    return model, opt, loader, engine


def _unwrap(model: nn.Module) -> nn.Module:
    """Opacus wraps the model in a GradSampleModule with hooks; give back the plain module."""
    inner = getattr(model, "_module", model)
    if hasattr(model, "_close"):
        model._close()
    return inner
