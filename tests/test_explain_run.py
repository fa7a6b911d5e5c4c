"""explain_run and the influence/sweep/explain CLI verbs on tiny data."""

import json

import pandas as pd
import torch

from ufm.core.canary import CanaryChoice
from ufm.cli import main
from ufm.core.experiment import ExperimentConfig, run_experiment
from ufm.attribution.explain import explain_run, write_explanation_pngs
from ufm.attribution.gradcam import gradcam
from ufm.core.features import glyph


def _tiny_args(tiny_data):
    return ["--dataset", str(tiny_data["train"]), "--ood-source", str(tiny_data["ood"]), "--ood-size", "20",
            "--feature-size", "3", "--offset", "0", "0", "--epochs", "3", "--candidates", "5", "--device", "cpu",
            "--quiet", "--lr", "0.003"]


def test_explain_run_shapes_and_consistency(tiny_data, tmp_path):
    cfg = ExperimentConfig(feature=glyph("A", size=3, offset=(0, 0)), dataset=str(tiny_data["train"]),
                           ood_source=str(tiny_data["ood"]), ood_size=20, arch="cnn1", epochs=2,
                           canary=CanaryChoice("index", (7,)), device="cpu", candidates=5)
    res = run_experiment(cfg)
    exp = explain_run(res.model, cfg, 7, n_ood=3)
    assert exp.method == "gradcam" and exp.canary.shape == (2, 1, 12, 12) and exp.ood.shape == (2, 3, 1, 12, 12)
    assert torch.equal(exp.canary[1, 0, 0:3, 0:3], torch.from_numpy(glyph("A", size=3).array()))
    assert not torch.equal(exp.canary[0], exp.canary[1])
    direct = gradcam(res.model, exp.canary)
    torch.testing.assert_close(direct.maps, exp.canary_maps)
    s = exp.summary()
    assert 0 <= s["canary_share_clean"] <= 1 and len(s["ood_shares_feature"]) == 3
    files = write_explanation_pngs(exp, tmp_path)
    assert len(files) == 2 + 2 * 3 and all(f.stat().st_size > 100 for f in files)
    assert exp.canary_figure().layout.title.text.startswith("GradCAM")
    mlp = run_experiment(cfg.replace(arch="mlp"))
    assert explain_run(mlp.model, cfg, 7, n_ood=1).method == "saliency"


def test_cli_influence_sweep_and_explain(tiny_data, tmp_path, capsys):
    args = _tiny_args(tiny_data)
    assert main(["influence", *args, "--checkpoints", "3", "--out", str(tmp_path / "s.csv")]) == 0
    table = pd.read_csv(tmp_path / "s.csv")
    # only the 270 images the reference model trained on are ranked (300 minus the 10% validation)
    assert list(table.columns) == ["index", "label", "self_influence", "rank"] and len(table) == 270
    assert main(["sweep-canaries", *args, "--top", "1", "--bottom", "1", "--checkpoints", "3",
                 "--out", str(tmp_path / "sw")]) == 0
    assert len(pd.read_csv(tmp_path / "sw" / "sweep.csv")) == 2
    assert "Pearson r" in capsys.readouterr().out
    assert main(["explain", *args, "--arch", "cnn1", "--canary-index", "3", "--n-ood", "2",
                 "--out", str(tmp_path / "ex")]) == 0
    summary = json.loads((tmp_path / "ex" / "explain.json").read_text())
    assert summary["method"] == "gradcam" and summary["canary_index"] == 3
    assert len(list((tmp_path / "ex").glob("*.png"))) == 6
    assert main(["explain", *args, "--no-canary", "--out", str(tmp_path / "ex2")]) == 2
