"""What ufm reads from an ONNX file before running it: the bytes (size-bounded), the protobuf (no
external data anywhere), the graph's image input and output, and the input spec (layout,
channels, size, normalisation) resolved from the graph and the user's statements.

Nothing here runs a model: :func:`ufm.audits.onnx_model.check_onnx` uses these checks for the web
server, which never runs one, and :func:`ufm.audits.onnx_model.load_onnx` before it starts
onnxruntime.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ufm.limits import MAX_BATCH_BYTES, MAX_INPUT_SIDE, MAX_ONNX_BYTES, image_bytes

SPEC_KEY = "ufm.input_spec"
LAYOUTS = ("NCHW", "NHWC")
_FLOAT = 1  # onnx.TensorProto.FLOAT


class OnnxModelError(ValueError):
    """An ONNX file or its outputs that cannot be audited; the message says why and what to do."""


# ------------------------------------------------------------------------------------ input spec

def _too_large(h: int | None, w: int | None) -> str:
    return (f"the model's input is {h or '?'}x{w or '?'} pixels; ufm audits inputs up to {MAX_INPUT_SIDE}x{MAX_INPUT_SIDE} "
            "(ufm.limits.MAX_INPUT_SIDE): export the model for a smaller input size")


def check_batch(batch: int | None, shape: tuple[int, int, int]) -> None:
    """A graph with a fixed batch is always fed that many images: refuse one whose batch alone
    exceeds :data:`ufm.limits.MAX_BATCH_BYTES`, before any is made."""
    if batch and batch * image_bytes(shape) > MAX_BATCH_BYTES:
        c, h, w = shape
        raise OnnxModelError(f"the model takes a fixed batch of {batch} images of {c}x{h}x{w}: "
                             f"{batch * image_bytes(shape) / 2**20:,.0f} MB per call, above the limit of "
                             f"{MAX_BATCH_BYTES / 2**20:,.0f} MB (ufm.limits.MAX_BATCH_BYTES): export it with a "
                             "dynamic or smaller batch")


def _floats(v: Sequence[float] | float | None, what: str) -> tuple[float, ...]:
    if v is None:
        return ()
    vals = (float(v),) if isinstance(v, (int, float)) else tuple(float(x) for x in v)
    if not all(math.isfinite(x) for x in vals):
        raise OnnxModelError(f"{what} must be finite numbers, got {vals}")
    return vals


@dataclass(frozen=True)
class InputSpec:
    """What the model's input is: ``(N, C, H, W)`` or ``(N, H, W, C)`` floats, normalised as
    ``(pixel - mean[c]) / std[c]`` from pixels in ``[0, 1]``.

    Attributes:
        channels: 1 (greyscale) or 3 (RGB).
        height, width: pixels.
        layout: ``"NCHW"`` or ``"NHWC"``.
        mean, std: per channel (one value = every channel); empty = no normalisation (pixels in [0, 1]).
    """

    channels: int
    height: int
    width: int
    layout: str = "NCHW"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise OnnxModelError(f"input channels must be 1 or 3, got {self.channels}: ufm audits greyscale or RGB "
                                 "image classifiers")
        if self.height < 1 or self.width < 1:
            raise OnnxModelError(f"input size must be positive, got {self.height}x{self.width}")
        if max(self.height, self.width) > MAX_INPUT_SIDE:
            raise OnnxModelError(_too_large(self.height, self.width))
        if self.layout not in LAYOUTS:
            raise OnnxModelError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        mean, std = _floats(self.mean, "mean"), _floats(self.std, "std")
        if bool(mean) != bool(std):
            raise OnnxModelError("give both mean and std for the normalisation, or neither")
        for name, v in (("mean", mean), ("std", std)):
            if len(v) not in (0, 1, self.channels):
                raise OnnxModelError(f"{name} needs 1 or {self.channels} values (one per channel), got {len(v)}")
        if any(s <= 0 for s in std):
            raise OnnxModelError(f"std values must be > 0, got {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``: the shape of the images ufm stamps and feeds."""
        return (self.channels, self.height, self.width)

    @property
    def normalised(self) -> bool:
        return bool(self.mean)

    def describe(self) -> str:
        norm = (f"normalised with mean {list(self.mean)}, std {list(self.std)}" if self.normalised
                else "pixels in [0, 1], no normalisation")
        return f"{self.layout} {self.channels}x{self.height}x{self.width}, {norm}"

    def to_dict(self) -> dict[str, Any]:
        return {"channels": self.channels, "height": self.height, "width": self.width, "layout": self.layout,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InputSpec":
        return cls(int(d["channels"]), int(d["height"]), int(d["width"]), d.get("layout", "NCHW"),
                   tuple(d.get("mean") or ()), tuple(d.get("std") or ()))

    def prepare(self, x: torch.Tensor) -> np.ndarray:
        """(N, C, H, W) pixels in [0, 1] -> the float32 array the graph takes (normalised, laid out)."""
        x = x.detach().to("cpu", torch.float32)
        if self.normalised:
            c = self.channels
            mean = torch.tensor(self.mean if len(self.mean) == c else self.mean * c).view(1, c, 1, 1)
            std = torch.tensor(self.std if len(self.std) == c else self.std * c).view(1, c, 1, 1)
            x = (x - mean) / std
        if self.layout == "NHWC":
            x = x.permute(0, 2, 3, 1)
        return np.ascontiguousarray(x.numpy())


# ------------------------------------------------------------------------------------ reading

def read_model_bytes(source: str | os.PathLike | bytes, max_bytes: int = MAX_ONNX_BYTES) -> tuple[bytes, str]:
    """The bytes of a model file or upload (size-checked before reading) and a name for messages."""
    too_big = f"is larger than {max_bytes / 2**20:.0f} MB (the limit for a model to audit)"
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > max_bytes:
            raise OnnxModelError(f"the uploaded model {too_big}")
        return bytes(source), "uploaded model"
    from ufm.fileio import read_bounded, unreadable_message

    path = Path(source)
    try:
        data = read_bounded(path, max_bytes)  # never more than max_bytes + 1, whatever the size claims
    except OSError as exc:
        raise OnnxModelError(unreadable_message(path, exc, "model file", "an .onnx file")) from None
    if data is None:
        raise OnnxModelError(f"{path} {too_big}")
    return data, path.name


def _external_tensors(msg: Any) -> Any:
    """Every TensorProto anywhere in ``msg`` that points at external data.

    The walk is generic over the protobuf's fields rather than a list of places a tensor may sit:
    initialisers, sparse initialisers, node attributes, If/Loop/Scan bodies, model-local functions
    (a Constant's value in ``ModelProto.functions``), their default attributes and training info
    all hold TensorProtos, and onnxruntime opens an external location relative to its working
    folder wherever it finds one, so one missed place is enough to read a server file.
    """
    from onnx import TensorProto

    stack = [msg]
    while stack:
        m = stack.pop()
        if isinstance(m, TensorProto):
            if m.data_location == TensorProto.EXTERNAL or len(m.external_data):
                yield m
            continue  # a TensorProto holds no nested messages that could hold tensors
        for fd, value in m.ListFields():
            if fd.type != fd.TYPE_MESSAGE:
                continue
            repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED  # protobuf < 6
            if repeated:
                stack.extend(value)
            else:
                stack.append(value)


def parse_onnx(data: bytes, what: str = "the file") -> Any:
    """The checked ``onnx.ModelProto`` of ``data``.

    Raises:
        OnnxModelError: not an ONNX model, an invalid graph, or a graph with external data.
    """
    import onnx
    from google.protobuf.message import DecodeError

    not_onnx = (f"{what} is not an ONNX model: export the classifier with torch.onnx.export (or tf2onnx, "
                "skl2onnx) and give the .onnx file")
    if not data:
        raise OnnxModelError(f"{what} is empty: {not_onnx.split(': ', 1)[1]}")
    try:
        proto = onnx.load_model_from_string(data)  # bytes: external data is never loaded
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise OnnxModelError(not_onnx) from exc
    if proto.ir_version < 1 or not proto.HasField("graph") or not proto.graph.node:
        raise OnnxModelError(not_onnx)  # protobuf parses much random data as an empty message
    ext = next(_external_tensors(proto), None)
    if ext is not None:
        raise OnnxModelError(f"{what} keeps tensor {ext.name or '(unnamed)'!r} in an external data file; ufm accepts "
                             "only self-contained models (save with onnx.save_model(..., save_as_external_data=False))")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # noqa: BLE001 - onnx raises ValidationError and C++ errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxModelError(f"{what} is not a valid ONNX model ({first[:300]}); re-export it") from exc
    return proto


def _dims(value_info: Any) -> list[int | None] | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]


@dataclass(frozen=True)
class GraphInput:
    """The one image input of a graph as declared: name, rank-4 dims (None = dynamic), the layout
    they suggest, and the first output."""

    name: str
    dims: tuple[int | None, int | None, int | None, int | None]
    layout: str
    output_name: str
    output_dims: tuple[int | None, ...] | None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def batch(self) -> int | None:
        return self.dims[0]

    def chw(self, layout: str | None = None) -> tuple[int | None, int | None, int | None]:
        """(C, H, W) of the declared dims read in ``layout`` (default: the detected one)."""
        _, a, b, c = self.dims
        return (c, a, b) if (layout or self.layout) == "NHWC" else (a, b, c)


def graph_input(proto: Any, what: str = "the model") -> GraphInput:
    """Read the image input of ``proto``: exactly one float input of rank 4, NCHW or NHWC.

    The layout is NHWC when the last dimension is 1 or 3 and the second is not, else NCHW.

    Raises:
        OnnxModelError: several inputs, a non-float or non-image input, no output.
    """
    g = proto.graph
    inits = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1:
        raise OnnxModelError(f"{what} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); ufm audits "
                             "image classifiers with exactly one input, the image batch")
    inp = inputs[0]
    elem = inp.type.tensor_type.elem_type
    if not inp.type.HasField("tensor_type") or elem != _FLOAT:
        raise OnnxModelError(f"{what}'s input {inp.name!r} is not a float32 tensor (ONNX type {elem}); ufm feeds "
                             "float32 images: export the model with a float32 input")
    dims = _dims(inp)
    if dims is None or len(dims) != 4:
        rank = "an unknown rank" if dims is None else f"rank {len(dims)}"
        raise OnnxModelError(f"{what}'s input {inp.name!r} has {rank}; ufm needs an image batch of rank 4, "
                             "(N, C, H, W) or (N, H, W, C)")
    if not g.output:
        raise OnnxModelError(f"{what} has no output")
    out = g.output[0]
    out_dims = _dims(out)
    if out_dims is not None and len(out_dims) != 2:
        raise OnnxModelError(f"{what}'s output {out.name!r} has rank {len(out_dims)}; ufm needs class scores of "
                             "shape (N, K): one logit or probability per class")
    layout = "NHWC" if dims[3] in (1, 3) and dims[1] not in (1, 3) else "NCHW"
    # Bounded here, before any image is made or a page offers the size: the graph's word is all
    # a 276-byte file needs to ask for 9.6 GB.
    _, n_h, n_w = (dims[3], dims[1], dims[2]) if layout == "NHWC" else (dims[1], dims[2], dims[3])
    if max(n_h or 0, n_w or 0) > MAX_INPUT_SIDE:
        raise OnnxModelError(_too_large(n_h, n_w))
    if None not in dims[1:]:
        check_batch(dims[0], (dims[3], dims[1], dims[2]) if layout == "NHWC" else tuple(dims[1:]))
    meta = {p.key: p.value for p in proto.metadata_props}
    return GraphInput(inp.name, tuple(dims), layout, out.name,  # type: ignore[arg-type]
                      tuple(out_dims) if out_dims else None, meta)


def resolve_spec(gi: GraphInput, *, input_size: tuple[int, int] | None = None, channels: int | None = None,
                 layout: str | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> InputSpec:
    """The input spec from the graph, the file's ufm metadata and the user's statements.

    A stated value must agree with a fixed graph dimension; a dynamic dimension must be stated.
    Normalisation: the user's ``mean``/``std``, else the file's ufm metadata, else none.

    Raises:
        OnnxModelError: a statement contradicts the graph, or a dynamic dimension is not stated.
    """
    meta: dict[str, Any] = {}
    if SPEC_KEY in gi.metadata:
        try:
            meta = json.loads(gi.metadata[SPEC_KEY])
        except ValueError:
            meta = {}
    if layout is not None and layout not in LAYOUTS:
        raise OnnxModelError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    lay = layout or gi.layout
    gc, gh, gw = gi.chw(lay)
    stated = {"channels": channels, "height": input_size[0] if input_size else None,
              "width": input_size[1] if input_size else None}
    graph = {"channels": gc, "height": gh, "width": gw}
    flag = {"channels": "--channels", "height": "--input-size", "width": "--input-size"}
    vals: dict[str, int] = {}
    for k in ("channels", "height", "width"):
        if stated[k] is not None and graph[k] is not None and stated[k] != graph[k]:
            raise OnnxModelError(f"the model's input {gi.name!r} takes {k} {graph[k]} ({lay}) but {flag[k]} says "
                                 f"{stated[k]}: the images would not match the model; drop {flag[k]} or fix it")
        v = stated[k] if stated[k] is not None else graph[k]
        if v is None:
            raise OnnxModelError(f"the model's input {gi.name!r} has a dynamic {k}; state it with {flag[k]} "
                                 f"({'1 or 3' if k == 'channels' else 'H W, the size the model was trained on'})")
        vals[k] = int(v)
    if mean is None and std is None and meta.get("mean"):
        mean, std = meta.get("mean"), meta.get("std")
    return InputSpec(vals["channels"], vals["height"], vals["width"], lay, tuple(mean or ()), tuple(std or ()))


def nearest_arch(proto: Any) -> str:
    """The one of ufm's architectures nearest to an ONNX graph, by its convolutions: none -> mlp,
    1-3 -> cnn1 (2 convs), 4-6 -> cnn2 (4 convs), more -> densenet100 (99 convs). It picks the
    calibration study's row that stands in for a model ufm did not train."""
    ops = [n.op_type for n in proto.graph.node]
    for f in getattr(proto, "functions", ()):
        ops += [n.op_type for n in f.node]
    convs = sum(op in ("Conv", "ConvTranspose", "QLinearConv", "ConvInteger") for op in ops)
    return "mlp" if convs == 0 else "cnn1" if convs <= 3 else "cnn2" if convs <= 6 else "densenet100"
