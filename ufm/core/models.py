"""The paper's architectures (SPEC section 5), sized from the data.

All models take float images of shape ``(N, C, H, W)`` with pixel values in ``[0, 1]`` and
return *logits* of shape ``(N, num_classes)``; the softmax is applied by the scorer, never
inside the model, so cross-entropy and KL see the same numbers.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torchvision.models import DenseNet

ARCHITECTURES = ("mlp", "cnn1", "cnn2", "densenet100")

# Paper's learning rates and batch sizes (appendix A); densenet follows the usual
# DenseNet-BC CIFAR recipe as used by the reference Keras implementation.
DEFAULT_LR = {"mlp": 1e-4, "cnn1": 3e-4, "cnn2": 3e-4, "densenet100": 1e-3}
DEFAULT_BATCH = {"mlp": 128, "cnn1": 128, "cnn2": 512, "densenet100": 64}


def _dense(n_in: int, n_out: int, *, dropout: float, batchnorm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Linear(n_in, n_out)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(n_out))
    layers.append(nn.ReLU())
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return layers


def _conv(c_in: int, c_out: int, *, batchnorm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=3)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(c_out))
    return layers


def _mlp(c: int, h: int, w: int, k: int, dropout: float, batchnorm: bool) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        *_dense(c * h * w, 512, dropout=dropout, batchnorm=batchnorm),
        *_dense(512, 256, dropout=dropout, batchnorm=batchnorm),
        nn.Linear(256, k),
    )


def _cnn1(c: int, h: int, w: int, k: int, dropout: float, batchnorm: bool) -> nn.Module:
    # Conv 32 3x3 -> ReLU -> Conv 64 3x3 -> MaxPool 2 -> ReLU -> Dense 128 -> Dense 128 -> C
    fh, fw = (h - 4) // 2, (w - 4) // 2
    if fh < 1 or fw < 1:
        raise ValueError(f"cnn1 needs images of at least 6x6 pixels, got {h}x{w}")
    return nn.Sequential(
        *_conv(c, 32, batchnorm=batchnorm),
        nn.ReLU(),
        *_conv(32, 64, batchnorm=batchnorm),
        nn.MaxPool2d(2),
        nn.ReLU(),
        *([nn.Dropout(dropout)] if dropout > 0 else []),
        nn.Flatten(),
        *_dense(64 * fh * fw, 128, dropout=dropout, batchnorm=batchnorm),
        *_dense(128, 128, dropout=dropout, batchnorm=batchnorm),
        nn.Linear(128, k),
    )


def _cnn2(c: int, h: int, w: int, k: int, dropout: float, batchnorm: bool) -> nn.Module:
    # VGG-style: (Conv 32 -> Conv 32 -> Pool) -> (Conv 64 -> Conv 64 -> Pool) -> Dense 1024 -> C
    fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
    if fh < 1 or fw < 1:
        raise ValueError(f"cnn2 needs images of at least 14x14 pixels, got {h}x{w}")
    drop = [nn.Dropout(dropout)] if dropout > 0 else []
    return nn.Sequential(
        *_conv(c, 32, batchnorm=batchnorm), nn.ReLU(),
        *_conv(32, 32, batchnorm=batchnorm), nn.ReLU(),
        nn.MaxPool2d(2), *drop,
        *_conv(32, 64, batchnorm=batchnorm), nn.ReLU(),
        *_conv(64, 64, batchnorm=batchnorm), nn.ReLU(),
        nn.MaxPool2d(2), *drop,
        nn.Flatten(),
        *_dense(64 * fh * fw, 1024, dropout=dropout, batchnorm=batchnorm),
        nn.Linear(1024, k),
    )


def _densenet100(c: int, h: int, w: int, k: int, dropout: float, batchnorm: bool) -> nn.Module:
    """DenseNet-BC (depth 100, growth 12, compression 0.5) with a CIFAR-style stem.

    (100 - 4) / 6 = 16 bottleneck layers per block. torchvision's ImageNet stem (7x7 stride-2
    conv + max-pool) would shrink a 32x32 image to 8x8 before the first block, so it is
    replaced by one 3x3 conv with 2 * growth channels, as in Huang et al.'s CIFAR models.
    Batch norm is intrinsic to DenseNet, so the ``batchnorm`` switch cannot turn it off.
    """
    if min(h, w) < 8:
        raise ValueError(f"densenet100 needs images of at least 8x8 pixels, got {h}x{w}")
    net = DenseNet(growth_rate=12, block_config=(16, 16, 16), num_init_features=24,
                   bn_size=4, drop_rate=dropout, num_classes=k)
    net.features.conv0 = nn.Conv2d(c, 24, kernel_size=3, padding=1, bias=False)
    net.features.norm0 = nn.Identity()
    net.features.relu0 = nn.Identity()
    net.features.pool0 = nn.Identity()
    return net


_BUILDERS = {"mlp": _mlp, "cnn1": _cnn1, "cnn2": _cnn2, "densenet100": _densenet100}


def build_model(arch: str, in_channels: int, image_size: tuple[int, int], num_classes: int,
                *, dropout: float = 0.0, batchnorm: bool = False) -> nn.Module:
    """Build one of :data:`ARCHITECTURES`.

    Args:
        arch: ``"mlp"``, ``"cnn1"``, ``"cnn2"`` or ``"densenet100"``.
        in_channels: image channels C (1 for MNIST, 3 for CIFAR-10).
        image_size: ``(H, W)`` in pixels.
        num_classes: number of output logits.
        dropout: drop probability after every hidden dense layer (and after the pooling
            stages of the CNNs); 0 disables it.
        batchnorm: insert batch normalisation after every conv / hidden dense layer.

    Returns:
        An ``nn.Module`` mapping ``(N, C, H, W)`` floats to ``(N, num_classes)`` logits.
    """
    if arch.startswith("onnx:"):  # a shadow model: the converted graph of an audited ONNX file (issue 20)
        from ufm.core.onnx_arch import build_onnx_arch
        return build_onnx_arch(arch, in_channels, image_size, num_classes)
    if arch not in _BUILDERS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if in_channels < 1 or num_classes < 2:
        raise ValueError(f"need at least 1 channel and 2 classes, got {in_channels} and {num_classes}")
    h, w = image_size
    return _BUILDERS[arch](in_channels, h, w, num_classes, dropout, batchnorm)


def last_conv_layer(model: nn.Module) -> nn.Conv2d | None:
    """The last ``nn.Conv2d`` in module order (GradCAM's default layer), or None for an MLP."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def gradcam_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers worth explaining with GradCAM, the default first, as ``(label, module)`` pairs.

    The label starts with the module's name in ``model.named_modules()`` and says what it is,
    e.g. ``"features.norm5 (final feature map, 342 ch)"``. DenseNet: the final feature map
    (``features.norm5``, whose output goes through ReLU and global pooling to the classifier),
    then each earlier dense block's output (concatenated features, before its transition).
    Other models: every ``nn.Conv2d``, last first. An MLP has none (an empty list).
    """
    if isinstance(model, DenseNet):
        feats = model.features
        out = [(f"features.norm5 (final feature map, {feats.norm5.num_features} ch)", feats.norm5)]
        blocks = [name for name, _ in feats.named_children() if name.startswith("denseblock")]
        for k, name in reversed(list(enumerate(blocks[:-1], start=1))):
            trans = getattr(feats, f"transition{k}", None)
            ch = f", {trans.norm.num_features} ch" if trans is not None else ""
            out.append((f"features.{name} (output of dense block {k}{ch})", getattr(feats, name)))
        return out
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    out = []
    for k, (name, m) in reversed(list(enumerate(named, start=1))):
        what = "last conv" if k == len(named) else f"conv {k} of {len(named)}"
        out.append((f"{name} ({what}, {m.out_channels} ch)", m))
    return out


def default_gradcam_layer(model: nn.Module) -> nn.Module | None:
    """GradCAM's default layer: the final feature map of a DenseNet, else the last ``Conv2d``;
    None for a model without convolutions (an MLP)."""
    layers = gradcam_layers(model)
    return layers[0][1] if layers else None


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Batched inference in eval mode. ``x``: (N, C, H, W) on the model's device -> (N, K)."""
    was_training = model.training
    model.eval()
    try:
        outs = [model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def build_model_for(config: Any, image_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The model an :class:`ufm.core.experiment.ExperimentConfig` trains: its ``arch``, with dropout
    (``config.dropout``) and batch norm where its ``regularisers`` list them; the one place the
    regulariser flags become model arguments.

    Args:
        image_shape: ``(C, H, W)`` of the images.
        num_classes: number of output logits.
    """
    c, h, w = (int(v) for v in image_shape)
    regs = set(config.regularisers)
    return build_model(config.arch, c, (h, w), int(num_classes),
                       dropout=config.dropout if "dropout" in regs else 0.0, batchnorm="batchnorm" in regs)
