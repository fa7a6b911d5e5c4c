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
it in its metadata (key :data:`SPEC_KEY`). The reading and the spec live in :mod:`ufm.audits.onnx_input`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ufm.audits.onnx_input import (SPEC_KEY, GraphInput, InputSpec, OnnxModelError, check_batch, graph_input,
                                   parse_onnx, read_model_bytes, resolve_spec)
from ufm.limits import MAX_BATCH_BYTES, MAX_ONNX_BYTES, image_bytes

PROB_SUM_TOL = 1e-3  # rows within this of 1 (and every value in [0, 1]) are probabilities


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
        check_batch(self.batch, spec.shape)
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
    check_batch(gi.batch, spec.shape)
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
    from ufm.audits.onnx_input import nearest_arch
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
