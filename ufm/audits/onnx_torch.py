"""An ONNX classifier as a *trainable* torch module: the architecture of a shadow model.

A shadow bank (:mod:`ufm.audits.shadow`) trains models of the audited model's architecture
without the feature. The architecture is read from the ONNX graph by onnx2torch, checked, and
kept in the run store's home as a content-addressed file ``<home>/onnx/<sha256>.onnx``; a run's
config names it as the architecture ``"onnx:<sha256>"`` (:func:`onnx_arch`), and
:func:`ufm.core.models.build_model` builds that architecture by converting the file again and
re-initialising every weight (:func:`ufm.core.onnx_arch.build_onnx_arch`). The kept file carries the input spec it
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
from pathlib import Path

import numpy as np
import torch

from ufm.audits.onnx_model import SPEC_KEY, OnnxModel, OnnxModelError
from ufm.core.onnx_arch import ONNX_DIRS, ShadowNet, onnx_arch, onnx_dir, to_torch

MATCH_TOL = 1e-4  # largest |converted - onnxruntime| output difference accepted


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
        atomic_write(path, out, private=True)  # in a 0700 folder, made if missing
    if onnx_dir(home) not in ONNX_DIRS:
        ONNX_DIRS.append(onnx_dir(home))
    return onnx_arch(sha)
