"""An ONNX classifier as a *trainable* torch module: the architecture of a shadow model.

A shadow bank (:mod:`ufm.audits.shadow`) trains models of the audited model's architecture
without the feature. The architecture is read from the ONNX graph by onnx2torch, checked, and
kept in the run store's home as a content-addressed file ``<home>/onnx/<sha256>.onnx``; a run's
config names it as the architecture ``"onnx:<sha256>"`` (:func:`onnx_arch`), and
:func:`ufm.core.models.build_model` builds that architecture by converting the file again and
re-initialising every weight (:func:`build_onnx_arch`). The kept file carries the input spec it
was audited with (normalisation, layout; key :data:`ufm.audits.onnx_model.SPEC_KEY`), so the built
module takes ``(N, C, H, W)`` pixels in ``[0, 1]`` like every ufm model and applies the
normalisation itself (a fixed buffer, never trained).

Checks, each a one-line :class:`OnnxModelError`: an operator onnx2torch cannot convert, a graph
with a fixed batch (training needs any batch size), weights the converter keeps as constants
(they would not be trained, so a shadow would not be trained like the target), and outputs of
the converted module that differ from onnxruntime's by more than :data:`MATCH_TOL` (:func:`verify`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ufm.audits.onnx_model import SPEC_KEY, InputSpec, OnnxModel, OnnxModelError

ARCH_PREFIX = "onnx:"
MATCH_TOL = 1e-4  # largest |converted - onnxruntime| output difference accepted
_ARCH_RE = re.compile(r"^onnx:[0-9a-f]{64}$")
#: Folders searched for ``<sha256>.onnx`` besides ``<default home>/onnx`` (a store opened with --home adds its own).
ONNX_DIRS: list[Path] = []


def is_onnx_arch(arch: str) -> bool:
    """True for an architecture name ``"onnx:<64 hex digits>"``."""
    return isinstance(arch, str) and bool(_ARCH_RE.match(arch))


def onnx_arch(sha256: str) -> str:
    return ARCH_PREFIX + sha256


def onnx_dir(home: str | Path) -> Path:
    return Path(home) / "onnx"


class ShadowNet(nn.Module):
    """A converted ONNX graph behind the audited model's input spec: ``(N, C, H, W)`` pixels in
    ``[0, 1]`` -> ``(N, K)`` logits (``log p`` for a graph that outputs probabilities, so training's
    cross-entropy and the scorer's softmax see the model's own probabilities)."""

    def __init__(self, graph: nn.Module, spec: InputSpec, probabilities: bool) -> None:
        super().__init__()
        self.graph, self.layout, self.probabilities = graph, spec.layout, bool(probabilities)
        c = spec.channels
        mean = spec.mean if len(spec.mean) == c else spec.mean * c
        std = spec.std if len(spec.std) == c else spec.std * c
        self.normalised = spec.normalised
        self.register_buffer("mean", torch.tensor(mean or (0.0,) * c, dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(std or (1.0,) * c, dtype=torch.float32).view(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalised:
            x = (x - self.mean) / self.std
        if self.layout == "NHWC":
            x = x.permute(0, 2, 3, 1)
        out = self.graph(x)
        return out.clamp_min(1e-30).log() if self.probabilities else out


def _convert_graph(data: bytes, what: str) -> nn.Module:
    """onnx2torch's module of the graph in ``data``; unsupported operators -> one-line error."""
    import onnx
    from onnx2torch import convert

    proto = onnx.load_model_from_string(data)
    try:
        return convert(proto)
    except NotImplementedError as exc:
        op = re.search(r"operation_type='([^']+)'.*?version=(\d+)", str(exc))
        name = f"{op.group(1)} (opset {op.group(2)})" if op else str(exc).splitlines()[0][:200]
        raise OnnxModelError(f"{what} uses the operator {name}, which ufm cannot convert into a trainable model "
                             "(onnx2torch); shadow models need it: re-export the model with standard layers, or "
                             "give --references-from with models you trained yourself") from None
    except Exception as exc:  # noqa: BLE001 - the converter's errors are of many kinds; each ends here in one line
        raise OnnxModelError(f"{what} cannot be converted into a trainable model ({type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else 'no message'})"
                             ) from None


def _check_trainable(graph: nn.Module, what: str) -> None:
    """Refuse a conversion that leaves weights as constants (they would never be trained)."""
    trained = sum(p.numel() for p in graph.parameters())
    init = getattr(graph, "initializers", None)
    frozen = sum(b.numel() for b in init.buffers() if b.is_floating_point()) if isinstance(init, nn.Module) else 0
    if trained == 0 or frozen > 0.01 * (trained + frozen):
        raise OnnxModelError(f"converting {what} leaves {frozen:,} of {trained + frozen:,} weights as constants that "
                             "training would not change (e.g. a MatMul with a constant instead of Gemm); re-export "
                             "it with nn.Linear/nn.Conv2d layers, or give --references-from")


def reinitialise(module: nn.Module) -> int:
    """Draw fresh weights: ``reset_parameters()`` of every submodule that has one (torch's own
    initialisation, from torch's global RNG: seed it first). Returns how many were reset."""
    n = 0
    for m in module.modules():
        fn = getattr(m, "reset_parameters", None)
        if m is not module and callable(fn):
            fn()
            n += 1
    return n


def to_torch(data: bytes, spec: InputSpec, probabilities: bool, what: str = "the model") -> ShadowNet:
    """The converted module with the graph's *own* weights (for :func:`verify`)."""
    graph = _convert_graph(data, what)
    _check_trainable(graph, what)
    return ShadowNet(graph, spec, probabilities)


@torch.no_grad()
def verify(net: ShadowNet, model: OnnxModel, x: torch.Tensor, tol: float = MATCH_TOL) -> float:
    """Largest |converted - onnxruntime| difference of the raw graph outputs on images ``x``
    (``(N, C, H, W)`` pixels in [0, 1], N >= 2: a batch, not one image).

    Raises:
        OnnxModelError: the difference exceeds ``tol`` (the conversion changed the model).
    """
    if len(x) < 2:
        raise ValueError("verify the conversion on a batch of at least 2 images")
    arr = model.spec.prepare(x)
    ref = model._run(arr).astype(np.float64)
    net.eval()
    out = net.graph(torch.from_numpy(arr)).double().numpy()
    if out.shape != ref.shape:
        raise OnnxModelError(f"the converted model outputs shape {out.shape} where onnxruntime gives {ref.shape}; "
                             "ufm cannot train shadows of this model: give --references-from")
    diff = float(np.max(np.abs(out - ref))) if out.size else 0.0
    if not np.isfinite(diff) or diff > tol:
        raise OnnxModelError(f"the converted model's outputs differ from onnxruntime's by up to {diff:.3g} "
                             f"(more than {tol:g}) on {len(x)} images, so its shadows would not be the same "
                             "architecture; give --references-from with models you trained yourself")
    return diff


def keep_onnx(home: str | Path, data: bytes, model: OnnxModel, x: torch.Tensor) -> str:
    """Check that ``data`` (the audited model's ONNX bytes) converts and matches onnxruntime on
    images ``x``, and keep it with its input spec as ``<home>/onnx/<sha256>.onnx``. Returns the
    architecture name ``"onnx:<sha256>"`` of its shadows (the hash of the kept file)."""
    import onnx

    from ufm.fileio import atomic_write

    if model.batch:
        raise OnnxModelError(f"{model.name} takes a fixed batch of {model.batch} images; training shadow models "
                             "needs any batch size: re-export it with a dynamic batch axis, or give --references-from")
    probs = model.probe(x) == "probabilities"
    verify(to_torch(data, model.spec, probs, model.name), model, x[:64])
    proto = onnx.load_model_from_string(data)
    kept = [p for p in proto.metadata_props if p.key != SPEC_KEY]
    del proto.metadata_props[:]
    for p in kept:
        proto.metadata_props.add(key=p.key, value=p.value)
    proto.metadata_props.add(key=SPEC_KEY, value=json.dumps(
        {**model.spec.to_dict(), "output": "probabilities" if probs else "logits"}, sort_keys=True))
    out = proto.SerializeToString(deterministic=True)
    sha = hashlib.sha256(out).hexdigest()
    path = onnx_dir(home) / f"{sha}.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, out, private=True)
    if onnx_dir(home) not in ONNX_DIRS:
        ONNX_DIRS.append(onnx_dir(home))
    return onnx_arch(sha)


def _find(sha: str) -> bytes:
    from ufm.runs.store.database import default_home

    for d in [*ONNX_DIRS, onnx_dir(default_home())]:
        p = d / f"{sha}.onnx"
        if p.is_file():
            data = p.read_bytes()
            if hashlib.sha256(data).hexdigest() == sha:
                return data
    raise OnnxModelError(f"the shadow architecture onnx:{sha[:12]}... is not in this store ({onnx_dir(default_home())}); "
                         "audit the model again with --shadow-data to keep it")


def build_onnx_arch(arch: str, in_channels: int, image_size: tuple[int, int], num_classes: int) -> nn.Module:
    """The module of architecture ``"onnx:<sha256>"`` with fresh weights (torch's global RNG:
    :func:`ufm.core.experiment.run_experiment` seeds it with the run's seed before building).

    Raises:
        OnnxModelError: the file is not kept here, or its shape/classes differ from the data's.
    """
    import onnx

    sha = arch[len(ARCH_PREFIX):]
    data = _find(sha)
    proto = onnx.load_model_from_string(data)
    meta = {p.key: p.value for p in proto.metadata_props}
    d: dict[str, Any] = json.loads(meta[SPEC_KEY])
    spec = InputSpec.from_dict(d)
    if spec.shape != (int(in_channels), *map(int, image_size)):
        raise OnnxModelError(f"the shadow data's images are {in_channels}x{image_size[0]}x{image_size[1]} but the "
                             f"model takes {spec.channels}x{spec.height}x{spec.width} (C x H x W)")
    # The converter builds layers (drawing from the RNG); restoring the state makes the fresh
    # weights depend on the seed alone, as for ufm's architectures (same layers, same draws).
    state = torch.get_rng_state()
    net = to_torch(data, spec, d.get("output") == "probabilities", f"onnx:{sha[:12]}")
    torch.set_rng_state(state)
    reinitialise(net.graph)
    with torch.no_grad():
        k = net(torch.zeros(2, *spec.shape)).shape[1]
    if k != num_classes:
        raise OnnxModelError(f"the shadow data has {num_classes} classes but the model outputs {k} class scores: give "
                             "labelled images of the model's own classes, labels 0..K-1 in its order")
    return net


def nearest_arch(proto: Any) -> str:
    """The one of ufm's architectures nearest to an ONNX graph, by its convolutions: none -> mlp,
    1-3 -> cnn1 (2 convs), 4-6 -> cnn2 (4 convs), more -> densenet100 (99 convs). It picks the
    calibration study's row that stands in for a model ufm did not train."""
    ops = [n.op_type for n in proto.graph.node]
    for f in getattr(proto, "functions", ()):
        ops += [n.op_type for n in f.node]
    convs = sum(op in ("Conv", "ConvTranspose", "QLinearConv", "ConvInteger") for op in ops)
    return "mlp" if convs == 0 else "cnn1" if convs <= 3 else "cnn2" if convs <= 6 else "densenet100"
