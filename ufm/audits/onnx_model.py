"""A model you did not train, as an ONNX file run by onnxruntime, and the export of ufm's own models.

The audit (:mod:`ufm.audits.model_audit`) scores a foreign model with the very functions that score a trained
run. :class:`OnnxModel` makes that possible: it is an ``nn.Module`` whose ``forward`` takes
``(N, C, H, W)`` float images with pixels in ``[0, 1]`` (the space every ufm image and feature
lives in), applies the user's normalisation, feeds onnxruntime, and returns ``(N, K)`` float64
scores the scorer treats as logits: the model's logits, or ``log p`` when the model outputs
probabilities (``softmax(log p) == p``, so the KL divergences are those of the model's own
probabilities).

Safety: the file is parsed as an ONNX protobuf and run by onnxruntime, never unpickled and never
run as TorchScript. A model with a tensor in an external data file anywhere (initialisers,
attributes, subgraphs, model-local functions: it would make the server read arbitrary paths) is
refused, as is any file larger than :data:`ufm.limits.MAX_ONNX_BYTES`; onnxruntime gets the bytes,
never a path. Sizes are bounded before anything is allocated: the declared input side
(:data:`ufm.limits.MAX_INPUT_SIDE`) and the images of one forward call
(:data:`ufm.limits.MAX_BATCH_BYTES`). :func:`check_onnx` does every check without opening the
model, for the web server, which never runs one.

Input spec: layout (NCHW or NHWC), channels and size come from the graph where its dimensions are
fixed; a dynamic dimension must be stated by the user (``input_size``/``channels``). Normalisation
cannot be read from a graph; the user states it, or a file exported by :func:`export_onnx` carries
it in its metadata (key :data:`SPEC_KEY`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ufm.limits import MAX_BATCH_BYTES, MAX_INPUT_SIDE, MAX_ONNX_BYTES, image_bytes

SPEC_KEY = "ufm.input_spec"
LAYOUTS = ("NCHW", "NHWC")
OUTPUT_KINDS = ("logits", "probabilities")
PROB_SUM_TOL = 1e-3  # rows within this of 1 (and every value in [0, 1]) are probabilities
_FLOAT = 1  # onnx.TensorProto.FLOAT


class OnnxModelError(ValueError):
    """An ONNX file or its outputs that cannot be audited; the message says why and what to do."""


# ------------------------------------------------------------------------------------ input spec

def _too_large(h: int | None, w: int | None) -> str:
    return (f"the model's input is {h or '?'}x{w or '?'} pixels; ufm audits inputs up to {MAX_INPUT_SIDE}x{MAX_INPUT_SIDE} "
            "(ufm.limits.MAX_INPUT_SIDE): export the model for a smaller input size")


def _check_batch(batch: int | None, shape: tuple[int, int, int]) -> None:
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
    path = Path(source)
    try:
        if path.stat().st_size > max_bytes:
            raise OnnxModelError(f"{path} {too_big}")
        return path.read_bytes(), path.name
    except FileNotFoundError:
        raise OnnxModelError(f"model file {path} does not exist: check the path") from None
    except IsADirectoryError:
        raise OnnxModelError(f"{path} is a folder: give the path of an .onnx file") from None
    except OSError as exc:
        raise OnnxModelError(f"could not read {path} ({exc.strerror or exc}): check its permissions") from None


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
        _check_batch(dims[0], (dims[3], dims[1], dims[2]) if layout == "NHWC" else tuple(dims[1:]))
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


# ------------------------------------------------------------------------------------ the model

def _ort_errors() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as s
    return (s.Fail, s.InvalidArgument, s.InvalidGraph, s.NotImplemented, s.RuntimeException, s.InvalidProtobuf,
            s.NoSuchFile, s.NoModel, s.EngineError, RuntimeError)


class OnnxModel(nn.Module):
    """An ONNX classifier as an ``nn.Module``: ``(N, C, H, W)`` pixels in [0, 1] -> ``(N, K)`` float64
    logits (or log-probabilities for a model with a probability output). Has no parameters.

    Build it with :func:`load_onnx`. ``output_kind`` is decided on the first batch it sees (or by
    :meth:`probe`): rows of values in [0, 1] summing to 1 are probabilities, anything else logits.

    Attributes:
        spec: the :class:`InputSpec`.
        sha256: hash of the model file; name: its file name.
        batch: the graph's fixed batch size, or None (any batch).
    """

    def __init__(self, session: Any, spec: InputSpec, gi: GraphInput, sha256: str, name: str, size: int) -> None:
        super().__init__()
        self.session, self.spec, self.graph_input = session, spec, gi
        self.sha256, self.name, self.size_bytes = sha256, name, size
        self.batch = gi.batch
        _check_batch(self.batch, spec.shape)
        self.output_kind: str | None = None
        self.num_classes: int | None = None

    def _run(self, arr: np.ndarray) -> np.ndarray:
        n = arr.shape[0]
        step = self.batch or max(n, 1)
        outs = []
        for i in range(0, n, step):
            chunk = arr[i:i + step]
            real = chunk.shape[0]
            if self.batch and real < self.batch:  # a fixed batch: pad with copies of the first row
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], self.batch - real, axis=0)])
            try:
                out = self.session.run([self.graph_input.output_name], {self.graph_input.name: chunk})[0]
            except _ort_errors() as exc:
                first = str(exc).strip().splitlines()[0][:300]
                raise OnnxModelError(f"the model rejected images of shape {tuple(chunk.shape)} "
                                     f"({self.spec.describe()}): {first}. Check --input-size, --channels and the "
                                     "layout against what the model was trained on") from None
            out = np.asarray(out)
            if out.ndim != 2 or out.shape[0] != chunk.shape[0] or out.shape[1] < 2:
                raise OnnxModelError(f"the model's output has shape {out.shape} for {chunk.shape[0]} images; ufm "
                                     "needs (N, K) class scores with K >= 2 (a single sigmoid output is not supported: "
                                     "export both class scores)")
            outs.append(out[:real])
        return np.concatenate(outs) if outs else np.zeros((0, self.num_classes or 2))

    def probe(self, x: torch.Tensor) -> str:
        """Decide (once) whether the outputs are logits or probabilities, from images ``x``."""
        if self.output_kind is None:
            self.forward(x[:64])
        return self.output_kind  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.spec.shape:
            raise OnnxModelError(f"images of shape {tuple(x.shape[1:])} do not match the model's input "
                                 f"{self.spec.shape} (C, H, W)")
        # Chunks of at most MAX_BATCH_BYTES: the caller's batch (1024 images by default) of large
        # images would otherwise be normalised and fed whole (12 GB at 3x1024x1024).
        rows = self.batch or max(1, MAX_BATCH_BYTES // image_bytes(self.spec.shape))
        out = np.concatenate([self._run(self.spec.prepare(x[i:i + rows])) for i in range(0, len(x), rows)]
                             ) if len(x) else self._run(self.spec.prepare(x))
        out = out.astype(np.float64)
        bad = ~np.isfinite(out).all(axis=1)
        if bad.any():
            raise OnnxModelError(f"the model's outputs contain NaN or infinite values for {int(bad.sum())} of "
                                 f"{len(out)} images; check the normalisation (--mean/--std) and that the model works "
                                 "on these inputs. Nothing was stored")
        if self.output_kind is None:
            probs = bool(len(out)) and out.min() >= 0 and out.max() <= 1 and \
                bool(np.all(np.abs(out.sum(axis=1) - 1) <= PROB_SUM_TOL))
            self.output_kind = "probabilities" if probs else "logits"
            self.num_classes = int(out.shape[1])
        elif out.shape[1] != self.num_classes:
            raise OnnxModelError(f"the model gave {out.shape[1]} class scores, earlier {self.num_classes}")
        t = torch.from_numpy(out)
        if self.output_kind == "probabilities":
            t = t.clamp_min(1e-300).log()  # softmax(log p) = p: the scorer sees the model's probabilities
        return t.to(x.device)


@dataclass(frozen=True)
class CheckedModel:
    """An ONNX file that passed every check, with its input spec resolved, but not opened: what a
    page needs to describe the model without running it in the web server's process."""

    name: str
    graph_input: GraphInput
    spec: InputSpec
    sha256: str
    size_bytes: int


def check_onnx(source: str | os.PathLike | bytes, *, input_size: tuple[int, int] | None = None,
               channels: int | None = None, layout: str | None = None, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, max_bytes: int = MAX_ONNX_BYTES,
               name: str | None = None) -> CheckedModel:
    """Read and check an ONNX classifier and resolve its input spec, without opening it in
    onnxruntime (see :func:`load_onnx` for the arguments).

    Raises:
        OnnxModelError: every problem with the file or the spec, in one message.
    """
    return _checked(source, max_bytes, name, dict(input_size=input_size, channels=channels, layout=layout,
                                                  mean=mean, std=std))[1]


def _checked(source: str | os.PathLike | bytes, max_bytes: int, name: str | None,
             statements: dict[str, Any]) -> tuple[bytes, CheckedModel]:
    data, default_name = read_model_bytes(source, max_bytes)
    what = name or default_name
    gi = graph_input(parse_onnx(data, what), what)
    spec = resolve_spec(gi, **statements)
    _check_batch(gi.batch, spec.shape)
    return data, CheckedModel(what, gi, spec, hashlib.sha256(data).hexdigest(), len(data))


def load_onnx(source: str | os.PathLike | bytes, *, input_size: tuple[int, int] | None = None,
              channels: int | None = None, layout: str | None = None, mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None, threads: int | None = None,
              max_bytes: int = MAX_ONNX_BYTES, name: str | None = None) -> OnnxModel:
    """Read, check and open an ONNX classifier for auditing.

    onnxruntime gets the file's bytes, never its path: a model opened from bytes has no folder to
    resolve external data against (and :func:`parse_onnx` has refused any external data already).

    Args:
        source: a path or the file's bytes (an upload).
        input_size, channels, layout: state what the graph leaves dynamic (must agree where it is fixed).
        mean, std: the model's input normalisation (default: the file's ufm metadata, else none).
        threads: onnxruntime intra-op threads (default: torch's thread count).

    Raises:
        OnnxModelError: every problem with the file or the spec, in one message.
    """
    import onnxruntime as ort

    data, checked = _checked(source, max_bytes, name, dict(input_size=input_size, channels=channels,
                                                           layout=layout, mean=mean, std=std))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    except _ort_errors() as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise OnnxModelError(f"onnxruntime cannot run {checked.name} ({first}); it may use operators outside the "
                             "standard ONNX domain: re-export it with standard operators") from None
    model = OnnxModel(session, checked.spec, checked.graph_input, checked.sha256, checked.name, checked.size_bytes)
    from ufm.audits.onnx_torch import nearest_arch
    model.nearest_arch = nearest_arch(parse_onnx(data, checked.name))  # which calibration row stands in for it
    return model


# ------------------------------------------------------------------------------------ export

class _Denormalise(nn.Module):
    """``model(x * std + mean)``: a ufm model (pixels in [0, 1]) that takes normalised inputs."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.std + self.mean)


def export_onnx(model: nn.Module, input_shape: Sequence[int], *, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, metadata: dict[str, Any] | None = None,
                opset: int = 17) -> bytes:
    """The ONNX bytes of a ufm model (pixels in [0, 1] -> logits), NCHW, any batch size.

    With ``mean``/``std`` the exported graph takes normalised inputs ``(pixel - mean) / std``, as
    most deployed classifiers do; the spec (:data:`SPEC_KEY`) and ``metadata`` go into the file's
    metadata, so :func:`load_onnx` reads the normalisation back without flags.
    """
    import onnx

    c, h, w = (int(v) for v in input_shape)
    spec = InputSpec(c, h, w, "NCHW", tuple(mean or ()), tuple(std or ()))
    net: nn.Module = getattr(model, "_module", model)  # Opacus wraps DP-SGD models
    if spec.normalised:
        m = torch.tensor(spec.mean if len(spec.mean) == c else spec.mean * c).view(1, c, 1, 1)
        s = torch.tensor(spec.std if len(spec.std) == c else spec.std * c).view(1, c, 1, 1)
        net = _Denormalise(net, m, s)
    was_training = net.training
    net = net.cpu().eval()
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated but needs no onnxscript
            torch.onnx.export(net, (torch.zeros(1, c, h, w),), buf, dynamo=False, opset_version=opset,
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    finally:
        net.train(was_training)
    proto = onnx.load_model_from_string(buf.getvalue())
    props = {SPEC_KEY: json.dumps({**spec.to_dict(), "output": "logits"})}
    props.update({f"ufm.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name = "ufm"
    return proto.SerializeToString()


def export_run(store: Any, run_id: str, *, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None) -> bytes:
    """ONNX bytes of a finished run's model, with its input spec and run id in the metadata."""
    rec = store.get(run_id)
    model = store.load_model(run_id)
    cfg = rec.config
    return export_onnx(model, rec.model_meta["input_shape"], mean=mean, std=std,
                       metadata={"run_id": rec.id, "arch": cfg.arch, "dataset": cfg.dataset,
                                 "num_classes": rec.model_meta["num_classes"]})
