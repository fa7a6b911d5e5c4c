"""Exports: run JSON, runs CSV, self-contained HTML reports (offline plotly), and the CLI verbs for them."""

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import plotly.io as pio
import pytest
import torch

from ufm.version import __version__
from ufm.core.canary import CanaryChoice
from ufm.cli import main
from ufm.core.experiment import ExperimentConfig
from ufm.core.features import glyph
from ufm.reports.plots import histogram_figure
from ufm.reports.run_report import run_html, run_json, runs_csv, runs_table, study_html
from ufm.runs.store import Store
from ufm.runs.studies import create_study, expand, run_study, summary

CHROMIUM = Path("/usr/bin/chromium")
STUDY = "regularisers <b>& co</b>"  # markup in a name must come out escaped


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def home(tiny_data, tmp_path) -> Path:
    """A store with a finished 2 groups x 2 seeds study and one failed run."""
    base = ExperimentConfig(feature=glyph("A", size=3, offset=(0, 0)), dataset=str(tiny_data["train"]),
                            ood_source=str(tiny_data["ood"]), ood_size=30, epochs=2, patience=2, candidates=5,
                            canary=CanaryChoice("index", (0,)), device="cpu", lr=1e-3, batch_size=32)
    h = tmp_path / "home"
    with Store(h) as s:
        create_study(s, STUDY, "regularisers", base, expand("regularisers", base, regularisers=["none", "dropout"],
                                                             seeds=[0, 1]))
        run_study(s, STUDY)
        failed = s.create_run(base.replace(seed=7))
        s.mark_failed(failed, "ValueError: something <went> wrong")
    return h


def _embedded(html_text: str, values) -> bool:
    """Is this plotly array (a list, or plotly's base64 typed array) in the page's figure data?"""
    if isinstance(values, dict):  # {"dtype": "f8", "bdata": "..."}; plotly writes "/" as \u002f in HTML
        return values["bdata"].replace("/", "\\u002f") in html_text
    return json.dumps(values)[1:-1] in html_text


def _no_network(html_text: str) -> None:
    """No script, stylesheet or image is fetched: plotly.js is inline (its own source mentions URLs
    for map tiles and help pages as strings; those are not fetched by these figures)."""
    assert not re.search(r"<script[^>]*\bsrc\s*=", html_text, re.I), "a script is loaded from elsewhere"
    lib = re.search(r"<script[^>]*>(.*?)</script>", html_text, re.S)
    assert lib and "plotly.js v" in lib.group(1)[:200] and len(lib.group(1)) > 1_000_000  # the library itself
    page = html_text.replace(lib.group(1), "")
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page, re.I), "the page links out"
    assert not re.search(r"@import|url\(\s*[\"']?https?:", page, re.I)


def test_run_json_and_runs_csv(home):
    with Store(home) as s:
        runs = s.list_runs()
        done = next(r for r in runs if r.status == "done")
        d = json.loads(run_json(s, done.id))
        assert d["run"]["id"] == done.id and d["run"]["status"] == "done"
        assert d["result"]["M"] == pytest.approx(done.summary["M"]) and len(d["result"]["d_u"]) == 30
        failed = next(r for r in runs if r.status == "failed")
        d = json.loads(run_json(s, failed.id))
        assert d["result"] is None and "went" in d["run"]["error"]

        table = pd.read_csv(io.StringIO(runs_csv(s)))
        assert len(table) == 5 and list(table.columns) == list(runs_table(s).columns)
        assert set(table["status"]) == {"done", "failed"}
        row = table.set_index("id").loc[done.id]
        assert row["M"] == pytest.approx(done.summary["M"]) and row["code_version"] == __version__
        assert row["regularisers"] in ("none", "dropout") and row["canary"] == "canary at index 0"


def test_study_html_is_self_contained_with_figures_configs_and_versions(home):
    with Store(home) as s:
        page = study_html(s, STUDY)
        agg = summary(s, STUDY)
        done = [r for r in s.list_runs("done")]
        scores = {r.id: s.load_scores(r.id) for r in done}
    _no_network(page)
    assert page.startswith("<!DOCTYPE html>") and page.count("<script") == 1 + 5  # plotly.js + 5 figures
    assert page.count("Plotly.newPlot") == 5  # the bar chart and 4 histograms
    assert "regularisers &lt;b&gt;&amp; co&lt;/b&gt;" in page and "<b>& co</b>" not in page
    # the figures' data: every run's histogram and the group means
    for rid, (d_u, d_r) in scores.items():
        fig = json.loads(pio.to_json(histogram_figure(d_u, d_r)))
        assert _embedded(page, fig["data"][1]["y"]), f"histogram of run {rid} missing"
        assert rid in page
    for g in agg.itertuples():
        assert g.group in page and f"{g.mean_M:.4g}" in page
    assert "95% interval" in page and "Memorisation score M by setting" in page
    # config and versions
    assert "glyph A (3x3 px at row 0, col 0" in page and "dropout" in page
    assert f"<td>{torch.__version__}</td>" in page and __version__ in page


def test_run_html_for_done_and_failed_runs(home):
    with Store(home) as s:
        done = s.list_runs("done")[0]
        failed = s.list_runs("failed")[0]
        page = run_html(s, done.id)
        bad = run_html(s, failed.id)
    _no_network(page)
    assert page.count("Plotly.newPlot") == 2 and done.summary["verdict"][:40] in page
    assert "Training curves" in page and f"<td>{torch.__version__}</td>" in page
    assert bad.count("Plotly.newPlot") == 0 and "something &lt;went&gt; wrong" in bad and "failed" in bad


def test_cli_exports(home, tmp_path, capsys):
    h = ["--home", str(home)]
    with Store(home) as s:
        rid = s.list_runs("done")[0].id
    out = tmp_path / "run.json"
    assert main(["runs", "export", rid[:8], "--format", "json", "--out", str(out), *h]) == 0
    assert json.loads(out.read_text())["run"]["id"] == rid
    out = tmp_path / "run.html"
    assert main(["runs", "export", rid, "--format", "html", "--out", str(out), *h]) == 0
    assert out.read_text().count("Plotly.newPlot") == 2
    out = tmp_path / "study.html"
    assert main(["studies", "export", STUDY, "--out", str(out), *h]) == 0
    assert out.read_text().count("Plotly.newPlot") == 5
    capsys.readouterr()

    assert main(["runs", "list", "--csv", *h]) == 0
    assert len(pd.read_csv(io.StringIO(capsys.readouterr().out))) == 5
    assert main(["studies", "list", "--json", *h]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == STUDY
    assert main(["studies", "show", STUDY, "--json", *h]) == 0
    assert [g["group"] for g in json.loads(capsys.readouterr().out)] == ["none", "dropout"]
    assert main(["studies", "export", "nope", "--out", str(tmp_path / "x.html"), *h]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ufm: error: no study named 'nope'") and STUDY in err
    assert main(["runs", "cancel", rid, *h]) == 0
    assert "already finished (done)" in capsys.readouterr().out


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium (/usr/bin/chromium) is not installed")
def test_study_report_renders_in_headless_chromium_offline(home, tmp_path):
    report = tmp_path / "study.html"
    with Store(home) as s:
        report.write_text(study_html(s, STUDY))
    proc = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                           report.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    # plotly drew every figure: each rendered plot has a plot-container with its main-svg layers
    assert dom.count('class="plot-container plotly"') == 5
    assert dom.count('class="main-svg"') >= 10
    assert "regularisers &lt;b&gt;&amp; co&lt;/b&gt;" in dom
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


# ------------------------------------------------------------------- formula-safe CSV

def test_csv_cells_that_look_like_formulas_are_quoted_numbers_stay_numeric():
    from ufm.reports.run_report import csv_safe, to_csv

    for bad in ("=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"):
        assert csv_safe(bad) == "'" + bad
    for ok in ("plain", "", " =x", -1.5, -3, None, True, float("nan")):
        assert csv_safe(ok) is ok
    df = pd.DataFrame({"name": ["=1+2", "ok", None], "M": [-0.25, 0.5, -1.0], "n": [-1, 2, 3],
                       "=col": ["-x", "y", "z"]})
    back = pd.read_csv(io.StringIO(to_csv(df)))
    assert list(back.columns) == ["name", "M", "n", "'=col"]
    assert back["name"].tolist()[:2] == ["'=1+2", "ok"] and pd.isna(back["name"][2])
    assert back["M"].tolist() == [-0.25, 0.5, -1.0] and back["M"].dtype == float and back["n"].dtype == int
    assert back["'=col"].tolist() == ["'-x", "y", "z"]
    assert df["name"][0] == "=1+2"  # the caller's frame is not changed


def test_every_csv_ufm_writes_is_formula_safe(tmp_path, capsys):
    from ufm.core.features import grid_feature
    from ufm.runs.studies import create_study, expand

    evil = "=cmd|' /C calc'!A0"
    base = ExperimentConfig(feature=grid_feature([[1, 0], [0, 1]], name="@evil feature"), dataset="-dataset")
    h = tmp_path / "home"
    with Store(h) as s:
        rid = s.create_run(base)
        s.mark_failed(rid, evil)
        create_study(s, "=study", "regularisers", base, expand("regularisers", base, regularisers=["none"], seeds=[0]))
        texts = {"runs_csv": runs_csv(s)}
    assert main(["runs", "list", "--csv", "--home", str(h)]) == 0
    texts["runs list --csv"] = capsys.readouterr().out
    assert main(["studies", "export", "=study", "--format", "csv", "--out", "-", "--home", str(h)]) == 0
    texts["studies export csv"] = capsys.readouterr().out
    for name, text in texts.items():
        table = pd.read_csv(io.StringIO(text))
        cells = [v for v in table.to_numpy().ravel() if isinstance(v, str)]
        assert not [c for c in cells if c[:1] in "=+-@\t\r"], (name, cells)
        assert "seed" not in table or table["seed"].dtype != object, name
    runs = pd.read_csv(io.StringIO(texts["runs_csv"]))
    assert runs.loc[runs["id"] == rid, "error"].item() == "'" + evil
    assert runs.loc[runs["id"] == rid, "feature"].item() == "'@evil feature"
    assert runs.loc[runs["id"] == rid, "dataset"].item() == "'-dataset"
