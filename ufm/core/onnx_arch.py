"""An ONNX classifier as a *trainable* torch module: the architecture ``"onnx:<sha256>"`` of a
shadow model (:mod:`ufm.audits.shadow`), built like ufm's own architectures by
:func:`ufm.core.models.build_model`.

The architecture is read from an ONNX file kept, content-addressed, in the run store's home
(``<home>/onnx/<sha256>.onnx``, written and checked against onnxruntime by
:func:`ufm.audits.onnx_torch.keep_onnx`); :func:`build_onnx_arch` converts it again with onnx2torch
and re-initialises every weight. The kept file carries the input spec it was audited with
(normalisation, layout; key :data:`ufm.audits.onnx_input.SPEC_KEY`), so the built module takes
``(N, C, H, W)`` pixels in ``[0, 1]`` like every ufm model and normalises itself (a fixed buffer).
An operator onnx2torch cannot convert, or weights it keeps as constants, give one-line
:class:`~ufm.audits.onnx_input.OnnxModelError`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ufm.audits.onnx_input import SPEC_KEY, InputSpec, OnnxModelError

ARCH_PREFIX = "onnx:"
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


def _find(sha: str) -> bytes:
    from ufm.paths import default_home

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
