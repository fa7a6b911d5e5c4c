"""ONNX models: reading and checking a file, the input spec, logits vs probabilities, export."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from ufm.core.models import build_model, predict_logits
from ufm.audits.onnx_input import SPEC_KEY, InputSpec, OnnxModelError, graph_input, parse_onnx
from ufm.audits.onnx_model import export_onnx, load_onnx


def _export(model: nn.Module, shape, *, dynamic=None, names=("x",)) -> bytes:
    buf = io.BytesIO()
    args = tuple(torch.zeros(*s) for s in ([shape] if isinstance(shape[0], int) else shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), args, buf, dynamo=False, input_names=list(names), output_names=["y"],
                          dynamic_axes=dynamic if dynamic is not None else {names[0]: {0: "n"}, "y": {0: "n"}})
    return buf.getvalue()


def _images(n=20, c=1, h=12, w=12, seed=0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


class Softmaxed(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).softmax(dim=1)


class NHWC(nn.Module):
    """Takes (N, H, W, C) like a Keras model."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2))


def test_export_round_trip_logits_and_metadata(one_torch_thread):
    model = build_model("cnn1", 3, (10, 10), 4).eval()
    data = export_onnx(model, (3, 10, 10), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), metadata={"run_id": "abc"})
    m = load_onnx(data)
    assert m.spec == InputSpec(3, 10, 10, "NCHW", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))  # from the metadata
    x = _images(16, 3, 10, 10)
    out = m(x)
    assert m.output_kind == "logits" and m.num_classes == 4 and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), predict_logits(model, x).numpy(), rtol=1e-4, atol=1e-5)
    props = {p.key: p.value for p in onnx.load_model_from_string(data).metadata_props}
    assert json.loads(props[SPEC_KEY])["mean"] == [0.5, 0.4, 0.3] and props["ufm.run_id"] == "abc"
    assert len(m.sha256) == 64


def test_probability_output_is_detected_and_turned_into_log_probs(one_torch_thread):
    net = nn.Sequential(nn.Flatten(), nn.Linear(144, 3)).eval()
    m = load_onnx(_export(Softmaxed(net), (1, 1, 12, 12)))
    x = _images()
    out = m(x)
    assert m.output_kind == "probabilities"
    # softmax of what the scorer sees equals the model's probabilities, i.e. softmax of its logits
    np.testing.assert_allclose(out.softmax(1).numpy(), predict_logits(net, x).softmax(1).numpy(), atol=1e-6)


def test_nhwc_layout_is_read_from_the_graph(one_torch_thread):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 8 * 8, 2)).eval()
    m = load_onnx(_export(NHWC(net), (1, 10, 10, 3)))
    assert m.spec.layout == "NHWC" and m.spec.shape == (3, 10, 10)
    x = _images(5, 3, 10, 10)
    np.testing.assert_allclose(m(x).numpy(), predict_logits(net, x).numpy(), rtol=1e-4, atol=1e-5)


def test_fixed_batch_graph_is_fed_in_chunks(one_torch_thread):
    net = nn.Sequential(nn.Flatten(), nn.Linear(144, 3)).eval()
    m = load_onnx(_export(net, (4, 1, 12, 12), dynamic={}))
    assert m.batch == 4
    x = _images(10)  # 4 + 4 + 2 (padded)
    np.testing.assert_allclose(m(x).numpy(), predict_logits(net, x).numpy(), rtol=1e-5, atol=1e-6)


def test_dynamic_size_needs_a_statement_and_a_contradiction_is_refused(one_torch_thread):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)).eval()
    data = _export(net, (1, 1, 12, 12), dynamic={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n"}})
    with pytest.raises(OnnxModelError, match="dynamic height.*--input-size"):
        load_onnx(data)
    assert load_onnx(data, input_size=(16, 16)).spec.shape == (1, 16, 16)
    fixed = _export(net, (1, 1, 12, 12))
    with pytest.raises(OnnxModelError, match="takes height 12.*--input-size says 16"):
        load_onnx(fixed, input_size=(16, 16))
    with pytest.raises(OnnxModelError, match="takes channels 1.*--channels says 3"):
        load_onnx(fixed, channels=3)


@pytest.mark.parametrize("data, match", [
    (b"", "is empty"),
    (b"this is a text file, not a model\n" * 3, "not an ONNX model"),
    (bytes(range(256)) * 4, "not an ONNX model"),
])
def test_non_onnx_bytes_are_refused(data, match):
    with pytest.raises(OnnxModelError, match=match):
        load_onnx(data)


def test_unsupported_inputs_and_outputs_are_refused(one_torch_thread):
    class Two(nn.Module):
        def forward(self, a, b):
            return a.flatten(1) + b.flatten(1)

    with pytest.raises(OnnxModelError, match="2 inputs"):
        load_onnx(_export(Two(), [(1, 1, 2, 2), (1, 1, 2, 2)], names=("a", "b"), dynamic={}))
    with pytest.raises(OnnxModelError, match="rank 2; ufm needs an image batch of rank 4"):
        load_onnx(_export(nn.Linear(4, 2), (1, 4)))
    with pytest.raises(OnnxModelError, match="output 'y' has rank 4"):
        load_onnx(_export(nn.Conv2d(1, 2, 3), (1, 1, 6, 6)))


class Sigmoid1(nn.Module):
    def forward(self, x):
        return x.flatten(1).mean(1, keepdim=True).sigmoid()


class NaNOut(nn.Module):
    def forward(self, x):
        return torch.log(x.flatten(1)[:, :3] - 2.0)


def test_single_output_and_nan_outputs_give_one_clear_message(one_torch_thread):
    m = load_onnx(_export(Sigmoid1(), (1, 1, 4, 4)))
    with pytest.raises(OnnxModelError, match="K >= 2"):
        m(_images(3, 1, 4, 4))
    m = load_onnx(_export(NaNOut(), (1, 1, 4, 4)))
    with pytest.raises(OnnxModelError, match="NaN or infinite values for 3 of 3"):
        m(_images(3, 1, 4, 4))


def test_external_data_and_oversized_files_are_refused(tmp_path, one_torch_thread):
    proto = onnx.load_model_from_string(_export(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), (1, 1, 4, 4)))
    onnx.save_model(proto, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    with pytest.raises(OnnxModelError, match="external data"):
        load_onnx(tmp_path / "ext.onnx")
    data = proto.SerializeToString()
    with pytest.raises(OnnxModelError, match="larger than"):
        load_onnx(data, max_bytes=len(data) - 1)
    with pytest.raises(OnnxModelError, match="does not exist"):
        load_onnx(tmp_path / "missing.onnx")


def test_wrong_image_shape_is_refused(one_torch_thread):
    m = load_onnx(export_onnx(build_model("mlp", 1, (8, 8), 3), (1, 8, 8)))
    with pytest.raises(OnnxModelError, match="do not match the model's input"):
        m(_images(2, 1, 9, 9))


def test_input_spec_validation():
    with pytest.raises(OnnxModelError, match="channels must be 1 or 3"):
        InputSpec(4, 8, 8)
    with pytest.raises(OnnxModelError, match="both mean and std"):
        InputSpec(1, 8, 8, mean=(0.5,))
    with pytest.raises(OnnxModelError, match="std values must be > 0"):
        InputSpec(3, 8, 8, mean=(0.5,), std=(0.0,))
    with pytest.raises(OnnxModelError, match="1 or 3 values"):
        InputSpec(3, 8, 8, mean=(0.5, 0.5), std=(0.2, 0.2))
    s = InputSpec(3, 2, 2, mean=(0.5,), std=(0.5,))
    assert InputSpec.from_dict(s.to_dict()) == s
    np.testing.assert_allclose(s.prepare(torch.ones(1, 3, 2, 2)), np.ones((1, 3, 2, 2)))  # (1 - .5) / .5


def test_graph_input_reads_names_and_dims(one_torch_thread):
    proto = parse_onnx(export_onnx(build_model("mlp", 1, (6, 7), 2), (1, 6, 7)))
    gi = graph_input(proto)
    assert gi.name == "image" and gi.dims == (None, 1, 6, 7) and gi.layout == "NCHW" and gi.output_name == "logits"
