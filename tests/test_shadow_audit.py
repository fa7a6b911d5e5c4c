"""Issue 20: a calibrated verdict for an ONNX model through shadow or supplied reference models."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config

R = 19  # the smallest bank that can reach p < 0.05 (kept small: the test trains 4 banks)


def _audit(store, tiny_data, cfg, data: bytes):
    from ufm.audits.model_audit import ModelAuditConfig, run_model_audit
    from ufm.audits.onnx_model import load_onnx

    config = ModelAuditConfig(feature=cfg.feature, ood=str(tiny_data["ood"]), ood_size=cfg.ood_size, candidates=5,
                         seed=cfg.seed)
    model = load_onnx(data)
    return model, run_model_audit(model, config)


@pytest.mark.parametrize("arch", ["mlp", "cnn1"])
def test_shadows_and_exported_bank_reproduce_ufms_reference_test(arch, tiny_data, tmp_path, one_torch_thread):
    from ufm.audits.onnx_model import export_run
    from ufm.audits.shadow import ShadowRecipe, calibrate_audit
    from ufm.measure.bank import bank_status, reference_scores, reference_test
    from ufm.runs.banks import build_bank
    from ufm.runs.jobs import measure
    from ufm.runs.store import Store

    cfg = tiny_config(tiny_data, arch=arch, epochs=3, patience=3)
    with Store(tmp_path / "home") as store:
        run_id, run, _ = measure(store, cfg)  # the target is itself a ufm run
        bank = build_bank(store, cfg, R)
        ufm_test = reference_test(store, cfg, run.score.M, R)
        ufm_refs = reference_scores(store, cfg, bank)
        target = export_run(store, run_id)
        model, result = _audit(store, tiny_data, cfg, target)
        assert result.score.M == pytest.approx(run.score.M, abs=1e-6)

        # --references-from: the bank's own models, exported to ONNX, run by onnxruntime
        folder = tmp_path / "refs"
        folder.mkdir()
        for i, rid in enumerate(bank):
            (folder / f"ref{i:02d}.onnx").write_bytes(export_run(store, rid))
        supplied = calibrate_audit(store, result, model, references_from=str(folder))
        assert np.allclose(supplied.reference["reference_M"], ufm_refs, atol=1e-6)
        assert supplied.verdict.test == "reference"
        assert supplied.verdict.p_value == pytest.approx(ufm_test.p_value, abs=1e-12)
        assert "you supplied" in supplied.verdict.calibration

        # --shadow-data: the audited graph converted, re-initialised and trained by ufm with the
        # target's recipe on the target's data: the shadows are the bank's models again
        recipe = ShadowRecipe(lr=cfg.learning_rate, batch_size=cfg.effective_batch_size, epochs=cfg.epochs,
                              patience=cfg.patience, val_fraction=cfg.val_fraction)
        shadow = calibrate_audit(store, result, model, model_bytes=target, shadow_data=str(tiny_data["train"]),
                                 references=R, recipe=recipe, device="cpu")
        assert np.allclose(shadow.reference["reference_M"], ufm_refs, atol=1e-5)
        assert shadow.verdict.p_value == pytest.approx(ufm_test.p_value, abs=1e-12)
        assert "similar recipe" in shadow.verdict.calibration
        # the shadows are runs in the store: a second audit (another feature) trains nothing
        n_runs = len(store.query("SELECT id FROM runs"))
        calibrate_audit(store, result, model, model_bytes=target, shadow_data=str(tiny_data["train"]),
                        references=R, recipe=recipe, device="cpu")
        assert len(store.query("SELECT id FROM runs")) == n_runs


def _graph_bytes(nodes, inits, out_dim=3) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_dim])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def test_unsupported_operator_is_one_line(tiny_data):
    from onnx import helper, numpy_helper

    from ufm.audits.onnx_model import OnnxModelError, load_onnx
    from ufm.audits.onnx_torch import keep_onnx

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(3, 144)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([0, 144], dtype=np.int64), "s")
    nodes = [helper.make_node("Reshape", ["x", "s"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["g"], transB=1),
             helper.make_node("Hardmax", ["g"], ["y"])]
    data = _graph_bytes(nodes, [w, shape])
    model = load_onnx(data)
    with pytest.raises(OnnxModelError) as e:
        keep_onnx(tiny_data["train"].parent / "home", data, model, torch.rand(4, 1, 12, 12))
    msg = str(e.value)
    assert "Hardmax" in msg and "\n" not in msg


def test_converted_outputs_that_differ_from_onnxruntime_are_refused():
    from ufm.audits.onnx_model import OnnxModelError, export_onnx, load_onnx
    from ufm.audits.onnx_torch import MATCH_TOL, to_torch, verify
    from ufm.core.models import build_model

    data = export_onnx(build_model("mlp", 1, (12, 12), 3), (1, 12, 12))
    model = load_onnx(data)
    x = torch.rand(8, 1, 12, 12)
    net = to_torch(data, model.spec, False)
    assert verify(net, model, x) <= MATCH_TOL  # the faithful conversion passes
    with torch.no_grad():
        lin = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
        lin.bias += 2e-4  # a conversion that changes the outputs by 2e-4 > 1e-4
    with pytest.raises(OnnxModelError) as e:
        verify(net, model, x)
    assert "differ from onnxruntime" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("shape,fix", [((10, 14, 14), "1x12x12"), ((10, 12, 12, 3), "1x12x12")])
def test_wrong_shape_shadow_data_is_one_line(shape, fix, tmp_path):
    from ufm.audits.shadow import shadow_dataset
    from ufm.core.data import DataUnavailable

    rng = np.random.default_rng(0)
    p = tmp_path / "shadow.npz"
    n = shape[0] * 4
    np.savez(p, x=rng.integers(0, 255, (n, *shape[1:])).astype(np.uint8), y=rng.integers(0, 3, n))
    with pytest.raises(DataUnavailable) as e:
        shadow_dataset(str(p), (1, 12, 12), 3, home=tmp_path / "home")
    assert fix in str(e.value) and "\n" not in str(e.value)


def test_shadow_data_with_other_classes_is_refused(tmp_path):
    from ufm.audits.shadow import shadow_dataset
    from ufm.core.data import DataUnavailable

    rng = np.random.default_rng(0)
    p = tmp_path / "shadow.npz"
    np.savez(p, x=rng.integers(0, 255, (60, 12, 12)).astype(np.uint8), y=rng.integers(0, 5, 60))
    with pytest.raises(DataUnavailable, match="5 classes but the model outputs 3"):
        shadow_dataset(str(p), (1, 12, 12), 3, home=tmp_path / "home")
    np.savez(p, x=rng.integers(0, 255, (60, 12, 12)).astype(np.uint8), y=rng.integers(0, 3, 60))
    assert Path(shadow_dataset(str(p), (1, 12, 12), 3, home=tmp_path / "home")).is_dir()


def test_reinitialise_is_seeded_and_changes_every_weight(tmp_path):
    from ufm.core.onnx_arch import reinitialise, to_torch
    from ufm.audits.onnx_model import export_onnx, load_onnx
    from ufm.core.models import build_model

    data = export_onnx(build_model("cnn1", 1, (12, 12), 3), (1, 12, 12))
    spec = load_onnx(data).spec
    nets = []
    for _ in range(2):
        net = to_torch(data, spec, False)
        before = [p.clone() for p in net.parameters()]
        torch.manual_seed(7)
        assert reinitialise(net.graph) == 5  # 2 conv + 3 dense layers
        assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
        nets.append(net)
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))


def test_nearest_architecture_labels_the_fast_test(cal_table):
    """The fast test of a foreign graph borrows the calibration row of the nearest of ufm's
    architectures, and says 'not calibrated for this architecture' when the study has none."""
    import onnx

    from ufm.audits.model_audit import choose_family
    from ufm.audits.onnx_model import export_onnx
    from ufm.audits.onnx_input import nearest_arch
    from ufm.core.features import glyph
    from ufm.core.models import build_model

    archs = {a: nearest_arch(onnx.load_model_from_string(export_onnx(build_model(a, 1, (28, 28), 3), (1, 28, 28))))
             for a in ("mlp", "cnn1", "cnn2")}
    assert archs == {"mlp": "mlp", "cnn1": "cnn1", "cnn2": "cnn2"}
    row = dict(kind="glyph", family="strokes", arch="cnn1", rate=0.0, low=0.0, high=0.05, calls=0, tests=100, models=10)
    cal_table(row, {**row, "kind": "text", "family": "strings", "arch": "mlp"})  # mlp: measured, not for glyphs
    fam, cal, reason = choose_family(glyph("A"), "strokes", "cnn1")
    assert reason is None and cal.arch == "cnn1"
    _, _, reason = choose_family(glyph("A"), "strokes", "mlp")
    assert "no measurement" in reason
    _, _, reason = choose_family(glyph("A"), "strokes", "cnn2")
    assert "not calibrated for this architecture" in reason


def test_cli_shadow_data_and_references_from(tiny_data, tmp_path, one_torch_thread, capsys):
    import json

    from ufm.audits.onnx_model import export_run
    from ufm.cli import main
    from ufm.measure.bank import reference_test
    from ufm.runs.banks import build_bank
    from ufm.runs.jobs import measure
    from ufm.runs.store import Store

    cfg = tiny_config(tiny_data, epochs=3, patience=3)
    home = tmp_path / "home"
    with Store(home) as store:
        run_id, run, _ = measure(store, cfg)
        bank = build_bank(store, cfg, R)
        expected = reference_test(store, cfg, run.score.M, R).p_value
        (tmp_path / "target.onnx").write_bytes(export_run(store, run_id))
        (tmp_path / "refs").mkdir()
        for i, rid in enumerate(bank):
            (tmp_path / "refs" / f"r{i:02d}.onnx").write_bytes(export_run(store, rid))
    base = ["audit", "--model", str(tmp_path / "target.onnx"), "--ood", str(tiny_data["ood"]), "--ood-size", "30",
            "--feature", "A", "--feature-size", "3", "--offset", "0", "0", "--candidates", "5", "--quiet",
            "--home", str(home), "--out", str(tmp_path / "a.json")]
    assert main(base + ["--references-from", str(tmp_path / "refs")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["verdict"]["test"] == "reference" and a["verdict"]["p_value"] == pytest.approx(expected)
    assert a["reference"]["references"] == R and not a["reference"]["shadows"]
    shadow = ["--shadow-data", str(tiny_data["train"]), "--references", str(R), "--shadow-lr", "1e-3",
              "--shadow-batch-size", "32", "--shadow-epochs", "3", "--shadow-patience", "3", "--device", "cpu"]
    assert main(base + shadow) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["verdict"]["p_value"] == pytest.approx(expected) and a["reference"]["shadows"]
    assert "similar recipe" in capsys.readouterr().out
    assert main(base + shadow + ["--references-from", str(tmp_path / "refs")]) == 2
    assert "not both" in capsys.readouterr().err
    (tmp_path / "few").mkdir()
    for i in range(3):
        (tmp_path / "few" / f"r{i}.onnx").write_bytes((tmp_path / "refs" / f"r{i:02d}.onnx").read_bytes())
    assert main(base + ["--references-from", str(tmp_path / "few")]) == 2
    assert "between 19 and" in capsys.readouterr().err


def test_page_calibration_inputs():
    from streamlit.testing.v1 import AppTest

    def page():
        import streamlit as st

        from dashboard import audit_ui
        st.write(repr(audit_ui.calibration_inputs()))

    at = AppTest.from_function(page, default_timeout=60)
    at.run()
    assert at.markdown[-1].value == "None"  # the fast test by default
    at.radio[0].set_value("shadow models ufm trains").run()
    at.text_input[0].set_value("mnist").run()
    got = at.markdown[-1].value
    assert "'shadow_data': 'mnist'" in got and "'references': 39" in got and "'lr': 0.001" in got
    assert any("similar recipe" in c.value for c in at.caption)
    at.text_input[0].set_value("/etc").run()  # outside the allowed data folders: one line, no traceback
    assert at.error and not at.exception


def test_background_task_stores_a_calibrated_audit_and_cancel_stores_nothing(tiny_data, tmp_path, one_torch_thread):
    from ufm.audits.model_audit import ModelAuditConfig
    from ufm.audits.model_audit_store import list_model_audits, load_model_audit
    from ufm.audits.onnx_model import export_run
    from ufm.audits.shadow import ShadowRecipe, shadow_audit_task
    from ufm.core.train import TrainingCancelled
    from ufm.measure.bank import bank_status
    from ufm.runs.jobs import measure
    from ufm.runs.store import Store

    cfg = tiny_config(tiny_data, epochs=2, patience=2)
    home = tmp_path / "home"
    with Store(home) as store:
        run_id, _, _ = measure(store, cfg)
        (tmp_path / "t.onnx").write_bytes(export_run(store, run_id))
    config = ModelAuditConfig(feature=cfg.feature, ood=str(tiny_data["ood"]), ood_size=30, candidates=5).to_dict()
    recipe = ShadowRecipe(lr=1e-3, batch_size=32, epochs=2, patience=2).__dict__
    cal = {"shadow_data": str(tiny_data["train"]), "references": R, "recipe": {**recipe, "regularisers": []}}
    cancel = tmp_path / "cancel"
    cancel.touch()
    with pytest.raises(TrainingCancelled):
        shadow_audit_task(lambda m: None, str(tmp_path / "t.onnx"), config, {}, str(home), "a" * 12, str(cancel), cal)
    cancel.unlink()
    messages = []
    shadow_audit_task(messages.append, str(tmp_path / "t.onnx"), config, {}, str(home), "b" * 12, str(cancel), cal)
    with Store(home) as store:
        assert [r.id for r in list_model_audits(store)] == ["b" * 12]
        result = load_model_audit(store, "b" * 12)
    assert result.verdict.test == "reference" and result.reference["references"] == R
    assert any("reference models" in m for m in messages) and messages[-1].startswith("done")


def test_cli_shadow_audit_of_an_npz_of_inference_images(tiny_data, tmp_path, one_torch_thread, capsys):
    """--ood FILE.npz with --shadow-data: the shadow runs read the audit's own inference images (they
    were handed the .npz, which a run cannot read, and the audit ended "no images under ...")."""
    import json

    from ufm.audits.audit_images import audit_inference_images
    from ufm.audits.onnx_model import export_run
    from ufm.cli import main
    from ufm.runs.jobs import measure
    from ufm.runs.store import Store

    home = tmp_path / "home"
    with Store(home) as store:
        run_id, _, _ = measure(store, tiny_config(tiny_data, epochs=2, patience=2))
        (tmp_path / "target.onnx").write_bytes(export_run(store, run_id))
    with np.load(tiny_data["ood"] / "test.npz") as f:
        np.savez(tmp_path / "ood.npz", x=f["x"][:40])
    assert main(["audit", "--model", str(tmp_path / "target.onnx"), "--ood", str(tmp_path / "ood.npz"),
                 "--ood-size", "30", "--feature", "A", "--feature-size", "3", "--offset", "0", "0", "--candidates", "5",
                 "--quiet", "--home", str(home), "--out", str(tmp_path / "a.json"), "--shadow-data",
                 str(tiny_data["train"]), "--references", str(R), "--shadow-lr", "1e-3", "--shadow-batch-size", "32",
                 "--shadow-epochs", "1", "--shadow-patience", "1", "--device", "cpu"]) == 0, capsys.readouterr().err
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["verdict"]["test"] == "reference" and a["reference"]["shadows"] and a["reference"]["references"] == R
    with Store(home) as store:
        shadows = [r for r in store.list_runs() if r.is_reference]
    assert len(shadows) == R and len({r.config_data["ood_source"] for r in shadows}) == 1
    kept = shadows[0].config_data["ood_source"]  # the audit's images, kept where a run can read them
    assert torch.equal(audit_inference_images(kept, (1, 12, 12), 30),
                       audit_inference_images(str(tmp_path / "ood.npz"), (1, 12, 12), 30))
