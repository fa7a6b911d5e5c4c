"""Hostile and careless input, second round (issue 18): planted ONNX files that try to read the
server's files, declare huge inputs or ignore their input; each test fails on the code before the
fix. The store's delete/orphan/mode cases are in ``tests/test_hostile_store.py``, the CLI's in
``tests/test_hostile_cli.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from onnx import helper as oh

from ufm.audits.model_audit import ModelAuditConfig, run_model_audit
from ufm.core.features import glyph
from ufm.limits import MAX_AUDIT_IMAGE_BYTES, MAX_BATCH_BYTES, MAX_INPUT_SIDE
from ufm.audits.onnx_input import OnnxModelError, parse_onnx
from ufm.audits.onnx_model import check_onnx, load_onnx

REPO = Path(__file__).resolve().parents[1]
OPSET = [oh.make_opsetid("", 17)]


def _external(name: str, location: str = "app.py") -> TensorProto:
    """A float tensor of 2 values whose bytes live in ``location`` (external data)."""
    t = TensorProto()
    t.name, t.data_type = name, TensorProto.FLOAT
    t.dims.extend([1, 2])
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "8")):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _io(shape=(None, 1, 4, 4), k: int = 2):
    return ([oh.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
            [oh.make_tensor_value_info("y", TensorProto.FLOAT, [shape[0], k])])


def _leaky_models() -> dict[str, onnx.ModelProto]:
    """A valid model (onnx.checker passes) with an external tensor in each place one can hide."""
    ins, outs = _io()
    head = [oh.make_node("Flatten", ["x"], ["f"]), oh.make_node("ReduceSum", ["f"], ["s"], keepdims=1)]
    models = {}
    # 1. a model-local function: a Constant node's value (the probe)
    fn = oh.make_function("evil", "Leak", ["X"], ["Y"], [
        oh.make_node("Constant", [], ["C"], value=_external("c")),
        oh.make_node("Mul", ["X", "C"], ["Y"])], OPSET)
    g = oh.make_graph(head + [oh.make_node("Leak", ["s"], ["y"], domain="evil")], "g", ins, outs)
    models["function"] = oh.make_model(g, opset_imports=OPSET + [oh.make_opsetid("evil", 1)], functions=[fn])
    # 2. an If's then/else bodies
    body = lambda n: oh.make_graph([oh.make_node("Constant", [], [n], value=_external(n))], n, [],  # noqa: E731
                                   [oh.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2])])
    g = oh.make_graph(head + [oh.make_node("Constant", [], ["b"], value=oh.make_tensor("b", TensorProto.BOOL, [], [1])),
                              oh.make_node("If", ["b"], ["c"], then_branch=body("t"), else_branch=body("e")),
                              oh.make_node("Mul", ["s", "c"], ["y"])], "g", ins, outs)
    models["subgraph"] = oh.make_model(g, opset_imports=OPSET)
    # 3. a sparse initialiser's values
    vals = _external("w")
    vals.dims[:] = [1]
    sp = oh.make_sparse_tensor(vals, oh.make_tensor("wi", TensorProto.INT64, [1], [0]), [1, 2])
    g = oh.make_graph(head + [oh.make_node("Mul", ["s", "w"], ["y"])], "g", ins, outs, sparse_initializer=[sp])
    models["sparse"] = oh.make_model(g, opset_imports=OPSET)
    # 4. a plain initialiser
    g = oh.make_graph(head + [oh.make_node("Mul", ["s", "w"], ["y"])], "g", ins, outs, initializer=[_external("w")])
    models["initializer"] = oh.make_model(g, opset_imports=OPSET)
    # 5. a Loop's body: one iteration adds the constant to a carried [1, 2]
    v = lambda n, shape=(1, 2): oh.make_tensor_value_info(n, TensorProto.FLOAT, list(shape))  # noqa: E731
    const = lambda n, kind, dims, vals: oh.make_node("Constant", [], [n], value=oh.make_tensor(n, kind, dims, vals))  # noqa: E731
    zero = const("z", TensorProto.FLOAT, [1, 2], [0, 0])
    loop = oh.make_graph([oh.make_node("Constant", [], ["c"], value=_external("lc")),
                          oh.make_node("Identity", ["b_in"], ["b_out"]), oh.make_node("Add", ["v_in", "c"], ["v_out"])],
                         "loop", [oh.make_tensor_value_info("i", TensorProto.INT64, []),
                                  oh.make_tensor_value_info("b_in", TensorProto.BOOL, []), v("v_in")],
                         [oh.make_tensor_value_info("b_out", TensorProto.BOOL, []), v("v_out")])
    g = oh.make_graph(head + [const("n", TensorProto.INT64, [], [1]), const("t", TensorProto.BOOL, [], [1]), zero,
                              oh.make_node("Loop", ["n", "t", "z"], ["c"], body=loop),
                              oh.make_node("Mul", ["s", "c"], ["y"])], "g", ins, outs)
    models["loop"] = oh.make_model(g, opset_imports=OPSET)
    # 6. a Scan's body: the state plus the constant, one step over s
    scan = oh.make_graph([oh.make_node("Constant", [], ["c"], value=_external("sc")),
                          oh.make_node("Add", ["st_in", "c"], ["st_out"]), oh.make_node("Identity", ["x_in"], ["x_out"])],
                         "scan", [v("st_in"), v("x_in", [1])], [v("st_out"), v("x_out", [1])])
    g = oh.make_graph(head + [zero, oh.make_node("Scan", ["z", "s"], ["c", "o"], body=scan, num_scan_inputs=1),
                              oh.make_node("Mul", ["s", "c"], ["y"])], "g", ins, outs)
    models["scan"] = oh.make_model(g, opset_imports=OPSET)
    # 7. an If inside a model-local function
    fn = oh.make_function("evil", "Leak", ["X"], ["Y"], [
        const("B", TensorProto.BOOL, [], [1]), oh.make_node("If", ["B"], ["C"], then_branch=body("ft"), else_branch=body("fe")),
        oh.make_node("Mul", ["X", "C"], ["Y"])], OPSET)
    g = oh.make_graph(head + [oh.make_node("Leak", ["s"], ["y"], domain="evil")], "g", ins, outs)
    models["function_if"] = oh.make_model(g, opset_imports=OPSET + [oh.make_opsetid("evil", 1)], functions=[fn])
    # 8. a Constant's sparse_value attribute
    vals = _external("sv")
    vals.dims[:] = [1]
    sp = oh.make_sparse_tensor(vals, oh.make_tensor("si", TensorProto.INT64, [1], [0]), [1, 2])
    g = oh.make_graph(head + [oh.make_node("Constant", [], ["c"], sparse_value=sp), oh.make_node("Mul", ["s", "c"], ["y"])],
                      "g", ins, outs)
    models["sparse_attribute"] = oh.make_model(g, opset_imports=OPSET)
    return models


LEAKY = ["function", "subgraph", "sparse", "initializer", "loop", "scan", "function_if", "sparse_attribute"]


@pytest.mark.parametrize("where", ["subgraph", "loop", "scan", "function_if"])
def test_the_planted_files_would_read_a_server_file_without_the_walk(where, tmp_path, monkeypatch):
    """Why the walk matters: onnxruntime given these models as bytes (no base folder) still opens
    the external location relative to its working folder, and the file's bytes become the logits."""
    import onnxruntime as ort

    (tmp_path / "app.py").write_bytes(np.array([1.0, 2.0], np.float32).tobytes())
    monkeypatch.chdir(tmp_path)
    try:
        session = ort.InferenceSession(_leaky_models()[where].SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - a later onnxruntime may refuse external data from bytes
        pytest.skip(f"this onnxruntime refuses the plant itself: {str(exc)[:120]}")
    y = session.run(None, {"x": np.ones((1, 1, 4, 4), np.float32)})[0]
    assert y.tolist() == [[16.0, 32.0]]  # sum(x) = 16 times the server file's two floats


@pytest.mark.parametrize("where", LEAKY)
def test_external_data_anywhere_is_refused_before_onnxruntime_sees_it(where, tmp_path, monkeypatch):
    assert sorted(_leaky_models()) == sorted(LEAKY)
    proto = _leaky_models()[where]
    onnx.checker.check_model(proto)  # valid ONNX: only ufm's own walk stands between it and app.py
    data = proto.SerializeToString()
    monkeypatch.chdir(REPO)  # where onnxruntime would resolve "app.py"
    for source in (data, tmp_path / "m.onnx"):
        (tmp_path / "m.onnx").write_bytes(data)
        with pytest.raises(OnnxModelError, match="external data file; ufm accepts only self-contained"):
            load_onnx(source)


def test_a_function_in_the_model_is_walked_even_when_unused():
    proto = _leaky_models()["function"]
    g = proto.graph
    del g.node[-1]
    g.node.append(oh.make_node("Concat", ["s", "s"], ["y"], axis=1))  # the function is never called
    with pytest.raises(OnnxModelError, match="tensor 'c'"):
        parse_onnx(proto.SerializeToString())


def _pool_model(shape, batch_dim=None) -> bytes:
    """x -> GlobalAveragePool -> Flatten: (N, C) scores, a few hundred bytes whatever the input."""
    ins = [oh.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, *shape])]
    outs = [oh.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, shape[0]])]
    g = oh.make_graph([oh.make_node("GlobalAveragePool", ["x"], ["p"]), oh.make_node("Flatten", ["p"], ["y"])],
                      "g", ins, outs)
    return oh.make_model(g, opset_imports=OPSET).SerializeToString()


# Linux keeps the pre-exec memory of a forked child in its peak RSS, so a CLI forked straight from this
# (large) pytest process would report pytest's size; a small launcher forks it instead and reports
# the peak of its one child (RUSAGE_CHILDREN of pytest would be the largest child the session ever reaped).
_LAUNCHER = """
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(rc)
"""


def _ufm(*args: str, home: Path, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """Run the CLI; returns (result with the launcher's line taken off stderr, the CLI's peak RSS in MB)."""
    env = {**os.environ, "UFM_HOME": str(home), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    home.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-c", _LAUNCHER, sys.executable, "-m", "ufm", *args], capture_output=True,
                       text=True, env=env, timeout=timeout, cwd=home.parent)
    *err, peak_kb = r.stderr.rstrip("\n").split("\n")
    stderr = "\n".join(err) + ("\n" if err else "")
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout, stderr), int(peak_kb) / 1024


def test_a_huge_declared_input_is_refused_in_one_line_before_any_image_is_made(tmp_path):
    big = tmp_path / "big.onnx"
    big.write_bytes(_pool_model((3, 20000, 20000), 1))
    assert big.stat().st_size < 400  # the 276-byte file asked for 9.6 GB
    noise = tmp_path / "noise.npz"
    np.savez(noise, x=np.zeros((4, 8, 8), np.uint8))
    r, peak_mb = _ufm("audit", "--model", str(big), "--ood", str(noise), "--ood-size", "2", "--candidates", "3",
                      home=tmp_path / "home")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "20000x20000" in lines[0] and f"{MAX_INPUT_SIDE}x{MAX_INPUT_SIDE}" in lines[0], lines
    assert peak_mb < 1500  # measured ~600 MB (torch and onnx imported); the old code died asking 9.6 GB
    # a dynamic input stated too large, and the page's check (no onnxruntime session in the server)
    dyn = _pool_model((3, None, None))
    with pytest.raises(OnnxModelError, match=f"up to {MAX_INPUT_SIDE}x{MAX_INPUT_SIDE}"):
        check_onnx(dyn, input_size=(6000, 6000))
    with pytest.raises(OnnxModelError, match="MAX_INPUT_SIDE"):
        check_onnx(big)


def test_a_fixed_batch_larger_than_the_batch_memory_is_refused():
    n = MAX_BATCH_BYTES // (4 * 3 * 224 * 224) + 1
    with pytest.raises(OnnxModelError, match=f"fixed batch of {n} images of 3x224x224"):
        load_onnx(_pool_model((3, 224, 224), n))


def test_inference_images_that_would_not_fit_are_refused_before_loading(tmp_path):
    model = load_onnx(_pool_model((3, 1024, 1024)))
    config = ModelAuditConfig(glyph("A"), ood=str(tmp_path / "does-not-exist.npz"), ood_size=1000, candidates=3)
    most = MAX_AUDIT_IMAGE_BYTES // (4 * 3 * 1024 * 1024)
    with pytest.raises(ValueError, match=f"give --ood-size {most} or fewer"):
        run_model_audit(model, config)  # refused before the (missing) images are even looked for


def test_large_images_reach_onnxruntime_in_chunks_of_the_batch_memory(monkeypatch):
    import ufm.audits.onnx_model as om

    model = load_onnx(_pool_model((3, 64, 64)))
    seen = []
    real = model.session.run
    monkeypatch.setattr(model, "session", type("Spy", (), {"run": lambda self, o, feed: (
        seen.append(next(iter(feed.values())).shape[0]), real(o, feed))[1]})())
    monkeypatch.setattr(om, "MAX_BATCH_BYTES", 5 * 4 * 3 * 64 * 64)  # five images a call
    out = model(torch.rand(12, 3, 64, 64))
    assert out.shape == (12, 3) and seen == [5, 5, 2]


_AX1 = oh.make_tensor("ax1", TensorProto.INT64, [1], [1])  # ReduceSum over axis 1 (opset 13+: an input)


def _constant_model(k: int = 3, side: int = 8) -> bytes:
    """Logits [0, 1, 2] whatever the image: 0 * sum(x) + const (the issue's "dead" model)."""
    ins, outs = _io((None, 1, side, side), k)
    g = oh.make_graph([oh.make_node("Flatten", ["x"], ["f"]), oh.make_node("ReduceSum", ["f", "ax1"], ["s"], keepdims=1),
                       oh.make_node("Mul", ["s", "zero"], ["z"]), oh.make_node("Add", ["z", "c"], ["y"])], "g", ins,
                      outs, initializer=[oh.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]), _AX1,
                                         oh.make_tensor("c", TensorProto.FLOAT, [1, k], list(range(k)))])
    return oh.make_model(g, opset_imports=OPSET).SerializeToString()


@pytest.mark.parametrize("labelled", [False, True])
def test_a_model_that_ignores_its_input_is_inconclusive_with_the_reason(labelled, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (40, 8, 8)).astype(np.uint8)
    np.savez(tmp_path / "ood.npz", x=x)
    np.savez(tmp_path / "lab.npz", x=x, y=rng.integers(0, 3, 40))
    config = ModelAuditConfig(glyph("A"), ood=str(tmp_path / "ood.npz"), ood_size=40, candidates=19,
                              labelled=str(tmp_path / "lab.npz") if labelled else None)
    result = run_model_audit(load_onnx(_constant_model()), config)
    assert result.score.M == 0 and result.score.X_u == 0 and np.isnan(result.score.p_value)
    assert result.verdict.status == "inconclusive", result.verdict.text
    assert "does not depend on its input" in result.verdict.text


def test_nan_t_test_p_values_alone_make_the_verdict_inconclusive():
    """The third of the reasons: outputs that move, but with no spread in d_u or d_r (NaN p)."""
    from types import SimpleNamespace

    from ufm.audits.model_audit import _decide, ignores_input

    clean = torch.rand(5, 3, generator=torch.Generator().manual_seed(0))
    score = SimpleNamespace(d_u=np.full(5, 0.1), d_r=np.full((1, 5), 0.1), candidate_X=np.array([0.1, 0.2]),
                            p_value=float("nan"), p_value_paired=0.4)
    dead = ignores_input(clean, score)
    assert dead is not None and "p-values are not numbers" in dead
    verdict = _decide(score, None, None, True, "", dead)
    assert verdict.status == "inconclusive" and verdict.p_value is None and "not numbers" in verdict.text
    score.p_value = 0.4
    assert ignores_input(clean, score) is None


def test_a_model_blind_to_the_features_place_is_inconclusive(tmp_path):
    """Outputs vary with the image but not with the corner the feature covers: X_u = X_r = 0."""
    ins, outs = _io((None, 1, 8, 8), 2)
    g = oh.make_graph([oh.make_node("Slice", ["x", "st", "en", "ax"], ["b"]),  # rows/cols 6..8 only
                       oh.make_node("Flatten", ["b"], ["f"]),
                       oh.make_node("ReduceSum", ["f", "ax1"], ["s"], keepdims=1),
                       oh.make_node("Mul", ["s", "w"], ["y"])], "g", ins, outs,
                      initializer=[oh.make_tensor("st", TensorProto.INT64, [2], [6, 6]),
                                   oh.make_tensor("en", TensorProto.INT64, [2], [8, 8]),
                                   oh.make_tensor("ax", TensorProto.INT64, [2], [2, 3]),
                                   oh.make_tensor("w", TensorProto.FLOAT, [1, 2], [1.0, -1.0]), _AX1])
    model = load_onnx(oh.make_model(g, opset_imports=OPSET).SerializeToString())
    x = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    result = run_model_audit(model, ModelAuditConfig(glyph("A"), ood="given", ood_size=30, candidates=19), x_ood=x)
    assert result.verdict.status == "inconclusive" and "X_u = X_r = 0" in result.verdict.text


from .test_app import app_env  # noqa: E402,F401 - the dashboard's test data folder and home


def test_the_audit_page_bounds_a_huge_input_in_one_line_and_never_runs_the_model(app_env, monkeypatch):
    """The issue's dashboard probes: a fixed 6000x6000 input was "Something went wrong" (a widget's
    max_value exceeded) and a 4096x4096 one grew the server by 2.3 GB. Now the page refuses the
    first in one line that names the limit, offers a 1024x1024 model no more images than fit, and
    never opens an onnxruntime session in the server (the audit runs in its own process)."""
    import onnxruntime as ort

    from dashboard import state
    from ufm.limits import max_images

    from .test_app import _app

    def in_the_server(*a, **k):
        raise AssertionError("onnxruntime opened in the web server")

    monkeypatch.setattr(ort, "InferenceSession", in_the_server)
    at = _app().switch_page("app_pages/audit.py").run()
    at.file_uploader(key="audit_upload").upload("huge.onnx", _pool_model((3, 6000, 6000), 1)).run()
    assert not at.exception and len(at.error) == 1, [e.value for e in at.error]
    assert "6000x6000" in at.error[0].value and f"up to {MAX_INPUT_SIDE}x{MAX_INPUT_SIDE}" in at.error[0].value
    kept = state.store().home / "audits" / "models"
    assert not kept.exists() or not any(kept.iterdir())  # refused before it was kept
    at.file_uploader(key="audit_upload").set_value(("dyn.onnx", _pool_model((3, None, None)), "application/octet-stream"))
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.number_input(key="audit_h").max == MAX_INPUT_SIDE  # a dynamic side cannot be stated larger
    at.number_input(key="audit_n").set_value(500).run()
    at.file_uploader(key="audit_upload").set_value(("large.onnx", _pool_model((3, MAX_INPUT_SIDE, MAX_INPUT_SIDE), 1),
                                                    "application/octet-stream")).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    most = max_images((3, MAX_INPUT_SIDE, MAX_INPUT_SIDE))
    assert at.number_input(key="audit_n").max == most and at.number_input(key="audit_n").value == most < 500
